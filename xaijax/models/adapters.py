"""Adapters: explain the user's own JAX model (Flax linen, Flax NNX, Equinox, a plain function).

Every method is called as ``method(model, variables, x, target)`` with ``model`` a
``flax.linen`` module returning logits (N, K) and ``variables`` its variables. :func:`wrap`
turns any model kind into such a pair::

    model, variables = xaijax.wrap(my_model)                  # NNX or Equinox module
    model, variables = xaijax.wrap(apply_fn, params)          # apply_fn(params, x) -> logits
    model, variables = xaijax.wrap(linen_module, variables)   # returned as is (validated)
    maps = xaijax.methods.get("grad-cam", layer="layer4")(model, variables, x, target)

What each method family needs from a model, and what each kind gives:

================  ==============  ========================  ===============================
family            needs           linen / NNX               Equinox / plain function
================  ==============  ========================  ===============================
gradient,         logits          yes                       yes
perturbation
(RISE, ...),
metrics
CAM, layer        named           every submodule (linen:   the activations the model
methods           activations     module path; NNX:         routes through ``tap(name, h)``
                                  attribute path)
rule-based        interceptable   linen layers; NNX's       no: the engine raises, naming
(LRP, EB, RAP,    layers          Conv/Linear/BatchNorm     the layers it cannot
RSP)                              run as linen layers       intercept
================  ==============  ========================  ===============================

**Named activations of functions and Equinox models.** If the function (or the Equinox
module's ``__call__``) accepts a keyword argument ``tap``, the adapter passes
``tap(name, h) -> h``; the model writes ``h = tap("layer4", h)`` and ``layer4`` is then a layer
name for :mod:`xaijax.models.taps`, :func:`xaijax.methods.layer_gradients` and every CAM,
with gradients (each tap is a named identity ``flax.linen`` module, :class:`Tap`).

**Equinox conventions.** Equinox models take one example at a time (``eqx.nn.Conv2d`` reads
(C, H, W)): by default the adapter vmaps the model over the batch and feeds it channels-first
images (``layout="NCHW"``: x (N, H, W, C) is transposed to (N, C, H, W)); a channels-first
activation given to ``tap`` is presented to the rest of xaijax channels-last (N, h, w, C), as
CAMs expect. Pass ``batched=True`` for a model that takes batches and ``layout="NHWC"`` for a
channels-last one. A per-example model with taps runs twice per call (once to record the
tapped activations, once with them routed through the named taps); a batched one runs once.

**NNX.** The module is split with ``nnx.split`` into a graph definition (static) and its
floating-point state (the variables: ``variables["params"]["<attribute path>"]``, e.g.
``"blocks.0.scale"``, for arrays outside the standard layers below); the call merges them
with ``nnx.merge`` inside the traced function. Every callable submodule's output is a named layer, addressed by its
attribute path (``layer4``, ``layers.3``, ``layer4.conv``). Non-floating state (RNG keys and
counts) is held as a constant. For rule-based propagation, every plain ``nnx.Conv``,
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.BatchNorm`` and ``nnx.LayerNorm`` of the merged copy is replaced by the equivalent
``flax.linen`` layer (same hyper-parameters) named by its path, whose arrays are
``variables["params"][path]`` (and ``variables["batch_stats"][path]`` for BatchNorm's
statistics): the engine intercepts them as it intercepts any linen layer, and the functional
operations between them (``nnx.relu``, pooling, means, residual sums) get the engine's
functional rules. Other submodules' outputs pass a named identity layer (:class:`NNXTap`).

**Bad input** is refused with a readable error before any heavy computation: a model kind that
is not recognised, missing or unexpected variables, training-mode BatchNorm / Dropout (linen
with ``input_shape``; NNX; Equinox), a tap name used for two different activations, and a
model that does not return (N, K) logits (at the first trace; at :func:`wrap` time when
``input_shape`` is given). Unknown layer names are reported by :mod:`xaijax.models.taps`
with the closest names.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from flax import errors as flax_errors
import jax.numpy as jnp
import numpy as np

from xaijax.models import layers as L
from xaijax.models.taps import call_interceptor

__all__ = [
    "wrap",
    "model_kind",
    "Tap",
    "FunctionModel",
    "NNXModel",
    "NNXTap",
    "check_logits",
    "check_eval_mode",
    "propagation_refusal",
]

KINDS = ("linen", "nnx", "equinox", "function")

_LAYOUTS = ("NHWC", "NCHW")


class Tap(nn.Module):
    """A named identity layer: the point where an adapted model exposes an activation.

    Its name is the layer name for :mod:`xaijax.models.taps` (``taps.forward`` captures its
    output and adds to it; gradients flow through it unchanged).
    """

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return h


@dataclasses.dataclass(frozen=True, eq=False)
class _Held:
    """A value kept static in a module by identity (hash and equality of the holder itself)."""

    value: Any


def _static(value: Any) -> Any:
    """``value`` itself if hashable (it is part of a static module), else held by identity."""
    try:
        hash(value)
    except TypeError:
        return _Held(value)
    return value


def _unstatic(value: Any) -> Any:
    return value.value if isinstance(value, _Held) else value


def _is_array(a: Any) -> bool:
    return isinstance(a, (jax.Array, np.ndarray)) and not jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key)


def _flatten(tree: Any, suffix: str = "") -> tuple[dict[str, Any], Any, tuple[str, ...], tuple[tuple[int, Any], ...]]:
    """``(arrays by dotted path, treedef, paths in leaf order, ((index, non-array leaf), ...))``;
    a trailing ``suffix`` is dropped from the paths (NNX's ``.value`` of each Variable)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays: dict[str, Any] = {}
    paths: list[str] = []
    others: list[tuple[int, Any]] = []
    for i, (path, leaf) in enumerate(leaves):
        key = jax.tree_util.keystr(path, simple=True, separator=".") or "leaf"
        if suffix and key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
        if _is_array(leaf):
            if key in arrays:
                raise ValueError(f"two parameter leaves have the same path {key!r}; use distinct dictionary keys")
            arrays[key] = jnp.asarray(leaf)
            paths.append(key)
        else:
            paths.append("")
            others.append((i, leaf))
    return arrays, jax.tree_util.tree_structure(tree), tuple(paths), tuple(others)


def _unflatten(treedef: Any, paths: Sequence[str], others: Sequence[tuple[int, Any]], arrays: Mapping[str, Any]) -> Any:
    other = dict(others)
    leaves = [other[i] if not p else arrays[p] for i, p in enumerate(paths)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _accepts_tap(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("tap")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def check_logits(out: Any, batch: int, who: str) -> None:
    """Raise ``ValueError`` unless ``out`` is an (N, K) array of logits with N = ``batch``."""
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != batch:
        got = f"shape {tuple(shape)}" if shape is not None else type(out).__name__
        raise ValueError(
            f"{who} must return logits of shape (N, K) = ({batch}, K) for a batch of {batch}; got {got}. "
            "Return the classifier's logits (drop auxiliary outputs, keep the batch axis first)"
        )


# ------------------------------------------------------------------ functions (and Equinox)


def _to_channels_last(h: jax.Array, layout: str, per_example: bool) -> jax.Array:
    spatial = h.ndim == (3 if per_example else 4)
    return jnp.moveaxis(h, -3, -1) if layout == "NCHW" and spatial else h


def _from_channels_last(h: jax.Array, layout: str, per_example: bool) -> jax.Array:
    spatial = h.ndim == (3 if per_example else 4)
    return jnp.moveaxis(h, -1, -3) if layout == "NCHW" and spatial else h


class FunctionModel(nn.Module):
    """``flax.linen`` wrapper of ``fn(params, x[, tap=]) -> logits`` (see :func:`wrap`).

    Attributes:
      fn: the model function (static; hashable or held by identity).
      treedef, paths, others: the structure of ``params``, the dotted path of each array
        leaf (its name in ``variables["params"]``) and the non-array leaves (static).
      accepts_tap: pass ``tap(name, h)`` to ``fn``.
      batched: ``fn`` takes a batch; ``False``: it takes one example and is vmapped.
      layout: ``"NHWC"`` or ``"NCHW"`` (x is transposed to channels-first before ``fn``).
      who: the model's description in error messages.
    """

    fn: Any
    treedef: Any
    paths: tuple[str, ...]
    others: Any
    accepts_tap: bool = False
    batched: bool = True
    layout: str = "NHWC"
    who: str = "the model function"

    def _params(self) -> Any:
        return _unflatten(self.treedef, self.paths, _unstatic(self.others), _read_params(self, self.who))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fn = _unstatic(self.fn)
        params = self._params()
        if self.layout == "NCHW":
            x = jnp.moveaxis(x, -1, -3)
        taps: dict[str, Tap] = {}

        def tap_module(name: Any) -> Tap:
            if not isinstance(name, str) or not name:
                raise TypeError(f"tap(name, h): name must be a non-empty string, got {name!r}")
            if name in self.paths:
                raise ValueError(f"tap name {name!r} is also a parameter path; choose another name")
            if name not in taps:
                taps[name] = Tap(name=name)
            return taps[name]

        if self.batched:
            if not self.accepts_tap:
                out = fn(params, x)
            else:
                used: set[str] = set()

                def tap(name: str, h: jax.Array) -> jax.Array:
                    m = tap_module(name)
                    if name in used:
                        raise ValueError(f"tap name {name!r} is used twice in one call; give each activation its own name")
                    used.add(name)
                    return _from_channels_last(m(_to_channels_last(h, self.layout, False)), self.layout, False)

                out = fn(params, x, tap=tap)
        else:
            out = self._per_example(fn, params, x, tap_module)
        check_logits(out, x.shape[0], self.who)
        return out

    def _per_example(self, fn: Callable[..., Any], params: Any, x: jax.Array, tap_module: Callable[[str], Tap]) -> jax.Array:
        if not self.accepts_tap:
            return jax.vmap(lambda xi: fn(params, xi))(x)

        def one(xi, deltas):
            seen: dict[str, jax.Array] = {}

            def tap(name: str, h: jax.Array) -> jax.Array:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"tap(name, h): name must be a non-empty string, got {name!r}")
                if name in seen:
                    raise ValueError(f"tap name {name!r} is used twice in one call; give each activation its own name")
                if name in deltas:
                    h = h + deltas[name]
                seen[name] = h
                return h

            return fn(params, xi, tap=tap), seen

        # Pass 1 records the tapped activations A; each goes through its named Tap module at
        # batch level (where taps.forward captures it and adds to it), and the difference
        # Tap(A) - A (zero, or what an interceptor added) enters pass 2 at the same point.
        _, acts = jax.vmap(lambda xi: one(xi, {}))(x)
        deltas = {}
        for name, a in acts.items():
            routed = _from_channels_last(tap_module(name)(_to_channels_last(a, self.layout, False)), self.layout, False)
            deltas[name] = routed - a
        out, _ = jax.vmap(one)(x, deltas)
        return out


def _read_params(module: nn.Module, who: str) -> dict[str, Any]:
    """The arrays ``variables["params"][path]`` of every path the wrapper was built with."""
    given = module.variables.get("params", {})
    paths = [p for p in module.paths if p]
    missing = [p for p in paths if p not in given]
    if missing:
        raise ValueError(
            f"variables['params'] lacks {len(missing)} array(s) of {who}, e.g. {missing[:3]}; pass the variables "
            "that xaijax.wrap returned (the wrapper has no initialiser)"
        )
    return {p: given[p] for p in paths}


@dataclasses.dataclass(frozen=True)
class _EquinoxCall:
    """``(params, x[, tap=]) -> eqx.combine(params, static)(x[, tap=])``."""

    static: Any
    accepts_tap: bool

    def __call__(self, params: Any, x: jax.Array, **kwargs: Any) -> jax.Array:
        import equinox as eqx  # the user's model is an Equinox module, so equinox is installed

        return eqx.combine(params, _unstatic(self.static))(x, **kwargs)


# ------------------------------------------------------------------------------------ NNX


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


class _NNXTapped:
    """Stands in for one submodule of the merged NNX copy: its output goes through a tap."""

    def __init__(self, module: Any, tap: nn.Module) -> None:
        self.module = module
        self.tap = tap

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        return self.tap(out) if isinstance(out, jax.Array) else out


class NNXTap(L.Identity):
    """The named identity layer after an NNX submodule that is not a standard layer (a block, a
    custom module): relevance passes through it unchanged, as through the zoo's ``Identity``."""


class _LinenLayer:
    """Stands in for an ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.BatchNorm`` / ``nnx.LayerNorm`` of the merged copy: the
    equivalent ``flax.linen`` layer, named by the NNX attribute path, reading the same arrays from
    the wrapper's variables (so the propagation engine intercepts it like any linen layer)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        extra = {k: v for k, v in kwargs.items() if v is not None}  # e.g. out_sharding=None from nnx.MultiHeadAttention
        if args or extra:
            raise ValueError(
                f"NNX layer {self.layer.name!r} is called with extra arguments ({', '.join(extra) or len(args)}); "
                "xaijax runs it as a linen layer on one array"
            )
        return self.layer(x)


#: the linen layer equivalent to each standard NNX layer, and where its arrays live:
#: ``(linen class, {NNX leaf: (collection, linen leaf)})``.
_LINEN_OF = {
    "conv": (nn.Conv, {"kernel": ("params", "kernel"), "bias": ("params", "bias")}),
    "dense": (nn.Dense, {"kernel": ("params", "kernel"), "bias": ("params", "bias")}),
    "batchnorm": (nn.BatchNorm, {"scale": ("params", "scale"), "bias": ("params", "bias"), "mean": ("batch_stats", "mean"), "var": ("batch_stats", "var")}),
    "layernorm": (nn.LayerNorm, {"scale": ("params", "scale"), "bias": ("params", "bias")}),
    "densegeneral": (nn.DenseGeneral, {"kernel": ("params", "kernel"), "bias": ("params", "bias")}),
}


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(a) for a in v)
    if isinstance(v, tuple):
        return tuple(_hashable(a) for a in v)
    return v


def _linen_spec(m: Any) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
    """``(kind, linen keyword arguments)`` of a standard NNX layer, or None (kept as NNX)."""
    from flax import nnx

    if type(m) is nnx.Conv:
        if m.mask is not None or m.conv_general_dilated is not jax.lax.conv_general_dilated or m.preferred_element_type is not None:
            return None
        kw = dict(features=m.out_features, kernel_size=tuple(m.kernel.get_value().shape[:-2]), strides=m.strides,
                  padding=m.padding, input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                  feature_group_count=m.feature_group_count, use_bias=m.use_bias, dtype=m.dtype,
                  param_dtype=m.param_dtype, precision=m.precision)
        return "conv", tuple((k, _hashable(v)) for k, v in kw.items())
    if type(m) is nnx.Linear:
        if m.dot_general is not jax.lax.dot_general or m.preferred_element_type is not None:
            return None
        kw = dict(features=m.out_features, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype, precision=m.precision)
        return "dense", tuple(kw.items())
    if type(m) is nnx.BatchNorm:
        if m.axis_name is not None:
            return None
        kw = dict(use_running_average=True, axis=_hashable(m.axis), momentum=m.momentum, epsilon=m.epsilon, dtype=m.dtype,
                  param_dtype=m.param_dtype, use_bias=m.use_bias, use_scale=m.use_scale,
                  use_fast_variance=m.use_fast_variance)
        return "batchnorm", tuple(kw.items())
    if type(m) is nnx.LinearGeneral:  # nnx.MultiHeadAttention's query / key / value / out
        if m.batch_axis or m.dot_general is not None or getattr(m, "dot_general_cls", None) is not None:
            return None
        if getattr(m, "preferred_element_type", None) is not None:
            return None
        kw = dict(features=_hashable(m.out_features), axis=_hashable(m.axis), use_bias=m.use_bias, dtype=m.dtype,
                  param_dtype=m.param_dtype, precision=m.precision)
        return "densegeneral", tuple(kw.items())
    if type(m) is nnx.LayerNorm:
        if m.axis_name is not None:
            return None
        kw = dict(epsilon=m.epsilon, dtype=m.dtype, param_dtype=m.param_dtype, use_bias=m.use_bias, use_scale=m.use_scale,
                  reduction_axes=_hashable(m.reduction_axes), feature_axes=_hashable(m.feature_axes),
                  use_fast_variance=m.use_fast_variance)
        return "layernorm", tuple(kw.items())
    return None


class NNXModel(nn.Module):
    """``flax.linen`` wrapper of a Flax NNX module (see :func:`wrap`).

    Attributes:
      graphdef: ``nnx.split``'s graph definition (static).
      treedef, paths, others: structure of the floating-point state, the dotted path of each
        array and its non-array leaves.
      rest: the non-floating state (RNG keys, counters), held as a constant.
      layers: attribute paths of the callable submodules, each a named layer.
      linen_layers: ``(path, kind, linen keyword arguments)`` of the standard layers
        (``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm``) run as the equivalent linen layers.
      locations: ``(array path, collection, layer path, leaf)`` of the arrays those layers read
        from ``variables[collection][layer path][leaf]``; every other array is
        ``variables["params"][array path]``.
    """

    graphdef: Any
    treedef: Any
    paths: tuple[str, ...]
    others: Any
    rest: Any
    layers: tuple[str, ...]
    linen_layers: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()
    locations: tuple[tuple[str, str, str, str], ...] = ()

    def _arrays(self) -> dict[str, Any]:
        where = {a: (c, p, leaf) for a, c, p, leaf in self.locations}
        arrays, missing = {}, []
        for key in self.paths:
            if not key:
                continue
            col, sub, leaf = where.get(key, ("params", None, key))
            tree = self.variables.get(col, {})
            tree = tree.get(sub, {}) if sub is not None else tree
            if leaf in tree:
                arrays[key] = tree[leaf]
            else:
                missing.append(f"{col}/{sub}/{leaf}" if sub is not None else key)
        if missing:
            raise ValueError(
                f"the variables lack {len(missing)} array(s) of the NNX model, e.g. {missing[:3]}; pass the variables "
                "that xaijax.wrap returned (the wrapper has no initialiser)"
            )
        return arrays

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        from flax import nnx

        state = _unflatten(self.treedef, self.paths, _unstatic(self.others), self._arrays())
        model = nnx.merge(self.graphdef, state, *_unstatic(self.rest))
        specs = {p: (kind, dict(kw)) for p, kind, kw in self.linen_layers}
        wanted = set(self.layers)
        found = [(path, m) for path, m in nnx.iter_modules(model) if _path_name(path) in wanted]
        for path, m in found:
            name = _path_name(path)
            if name in specs:
                kind, kw = specs[name]
                stand_in: Any = _LinenLayer(_LINEN_OF[kind][0](**kw, name=name))
            else:
                stand_in = _NNXTapped(m, NNXTap(name=name))
            parent = model
            for p in path[:-1]:
                parent = parent[p] if isinstance(p, int) else getattr(parent, p)
            if isinstance(path[-1], int):
                parent[path[-1]] = stand_in
            else:
                object.__setattr__(parent, path[-1], stand_in)
        out = model(x)
        check_logits(out, x.shape[0], "the NNX model")
        return out


def _nnx_eval_problems(model: Any) -> list[str]:
    from flax import nnx

    bad = []
    for path, m in nnx.iter_modules(model):
        name = _path_name(path) or "<root>"
        if isinstance(m, nnx.BatchNorm) and not m.use_running_average:
            bad.append(f"BatchNorm {name!r} (use_running_average=False)")
        if isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0:
            bad.append(f"Dropout {name!r} (deterministic=False)")
    return bad


def _wrap_nnx(model: Any) -> tuple[nn.Module, dict[str, Any]]:
    from flax import nnx

    bad = _nnx_eval_problems(model)
    if bad:
        raise ValueError(
            "the NNX model is in training mode: " + ", ".join(bad) + ". Call model.eval() (or build it with "
            "use_running_average=True / deterministic=True) before explaining it"
        )

    def floating(path: Any, value: Any) -> bool:
        v = value.get_value() if isinstance(value, nnx.Variable) else value
        return _is_array(v) and jnp.issubdtype(v.dtype, jnp.inexact)

    graphdef, state, *rest = nnx.split(model, floating, ...)
    arrays, treedef, paths, others = _flatten(state, suffix=".value")
    modules = [(_path_name(p), m) for p, m in nnx.iter_modules(model) if p and callable(m)]
    linen_layers, locations = [], []
    variables: dict[str, Any] = {"params": {}}
    for name, m in modules:
        spec = _linen_spec(m)
        leaves = _LINEN_OF[spec[0]][1] if spec is not None else {}
        if spec is None or not all(f"{name}.{leaf}" in arrays for leaf in leaves if getattr(m, leaf, None) is not None):
            continue
        linen_layers.append((name, spec[0], spec[1]))
        for leaf, (col, linen_leaf) in leaves.items():
            key = f"{name}.{leaf}"
            if key in arrays:
                variables.setdefault(col, {}).setdefault(name, {})[linen_leaf] = arrays.pop(key)
                locations.append((key, col, name, linen_leaf))
    variables["params"].update(arrays)
    wrapped = NNXModel(
        graphdef=graphdef, treedef=treedef, paths=paths, others=_static(others), rest=_Held(tuple(rest)),
        layers=tuple(n for n, _ in modules), linen_layers=tuple(linen_layers), locations=tuple(locations),
    )
    return wrapped, variables


# ------------------------------------------------------------------------------- Equinox


def _equinox_eval_problems(model: Any) -> list[str]:
    import equinox as eqx

    bad = []
    mods = jax.tree_util.tree_leaves_with_path(
        model, is_leaf=lambda m: isinstance(m, (eqx.nn.Dropout, eqx.nn.BatchNorm))
    )
    for path, m in mods:
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "<root>"
        if isinstance(m, eqx.nn.BatchNorm):
            bad.append(f"BatchNorm {name!r} (stateful: needs an eqx.nn.State, which wrap does not thread)" if m.inference else f"BatchNorm {name!r} (inference=False)")
        elif isinstance(m, eqx.nn.Dropout) and not m.inference and m.p > 0:
            bad.append(f"Dropout {name!r} (inference=False)")
    return bad


def _wrap_equinox(model: Any, batched: bool | None, layout: str | None) -> tuple[nn.Module, dict[str, Any]]:
    import equinox as eqx

    bad = _equinox_eval_problems(model)
    if bad:
        raise ValueError(
            "the Equinox model cannot be explained as it is: " + ", ".join(bad) + ". Use "
            "model = eqx.nn.inference_mode(model) for Dropout; fold BatchNorm statistics into the model"
        )
    params, static = eqx.partition(model, eqx.is_array)
    accepts_tap = _accepts_tap(model.__call__)
    arrays, treedef, paths, others = _flatten(params)
    wrapped = FunctionModel(
        fn=_EquinoxCall(_static(static), accepts_tap), treedef=treedef, paths=paths, others=_static(others),
        accepts_tap=accepts_tap, batched=bool(batched) if batched is not None else False,
        layout=layout or "NCHW", who=f"the Equinox model {type(model).__name__}",
    )
    return wrapped, {"params": arrays}


# ------------------------------------------------------------------- rule-based propagation


def propagation_refusal(model: Any) -> str | None:
    """Why rule-based propagation (LRP, EB, RAP, RSP, ...) cannot run on ``model``, or None.

    A wrapped function or Equinox model (:class:`FunctionModel`) has no layers to intercept: its
    convolutions and matrix products are bare JAX operations. The propagation engine may ask this
    before tracing (one home for the message); any other module, a wrapped NNX model included
    (its standard layers run as linen layers), returns None.
    """
    if isinstance(model, FunctionModel):
        return (
            f"rule-based propagation needs interceptable layers: {model.who} is adapted from a function of "
            "arrays, whose convolutions and matrix products are not flax.linen layers. Pass a flax.linen or "
            "Flax NNX model (nn.Conv / nnx.Conv, nn.Dense / nnx.Linear, BatchNorm), or use the gradient, CAM "
            "or perturbation families"
        )
    return None


# ---------------------------------------------------------------------------------- linen


def check_eval_mode(model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``model`` on a batch of ``input_shape`` (N, H, W, C) is not a
    classifier in eval mode: BatchNorm normalising with batch statistics, Dropout active, or
    an output that is not (N, K) logits. Only shapes are traced (``jax.eval_shape``)."""
    bad: list[str] = []

    def on_call(name, module, call_next, args, kwargs):
        label = name or "<root>"
        if isinstance(module, nn.BatchNorm):
            ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            if not (module.use_running_average if ura is None else ura):
                bad.append(f"BatchNorm {label!r} (use_running_average=False)")
                return args[0]  # same shape; the trace goes on to report every layer
        if isinstance(module, nn.Dropout) and module.rate > 0:
            det = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
            det = module.deterministic if det is None else det
            if not det:
                bad.append(f"Dropout {label!r} (deterministic=False)")
                return args[0]
        return call_next(*args, **kwargs)

    def run(v, xx):
        with nn.intercept_methods(call_interceptor(on_call)):
            return model.apply(v, xx)

    shape = tuple(int(s) for s in input_shape)
    training = "the linen model is in training mode: {}; build it with train=False"
    try:
        out = jax.eval_shape(run, variables, jax.ShapeDtypeStruct(shape, _float_dtype(variables)))
    except flax_errors.ScopeCollectionNotFound as e:
        if bad:
            raise ValueError(training.format(", ".join(bad))) from None
        raise ValueError(
            f"the linen model needs a variable collection that was not given ({e.col_name!r}): pass all of its "
            "variables (params, batch_stats, ...)"
        ) from None
    except flax_errors.FlaxError:
        if bad:  # e.g. a training-mode BatchNorm writing batch_stats
            raise ValueError(training.format(", ".join(bad))) from None
        raise
    if bad:
        raise ValueError(training.format(", ".join(bad)))
    check_logits(out, shape[0], f"the linen model {type(model).__name__}")


# -------------------------------------------------------------------------------- wrap


def model_kind(model: Any) -> str:
    """``"linen"``, ``"nnx"``, ``"equinox"`` or ``"function"`` (any other callable).

    Raises:
      TypeError: ``model`` is none of these.
    """
    if isinstance(model, nn.Module):
        return "linen"
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    if callable(model):
        return "function"
    raise TypeError(
        "model must be a flax.linen Module, a Flax NNX Module, an Equinox Module or a function "
        f"apply(params, x) -> logits; got {type(model).__name__}"
    )


def wrap(
    model: Any,
    variables: Any = None,
    *,
    batched: bool | None = None,
    layout: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Adapt the user's model to ``(linen module, variables)``, what every method takes.

    Args:
      model: a ``flax.linen`` Module (returned as is), a Flax NNX Module (in eval mode), an
        Equinox Module, or a function ``apply(params, x) -> logits``. Functions and Equinox
        modules may accept a keyword ``tap`` to expose named activations (module docstring).
      variables: the linen module's variables, or the function's ``params`` (any pytree);
        ``None`` for NNX and Equinox (their arrays live in the module).
      batched: whether a function / Equinox module takes a batch (default: functions yes,
        Equinox no; a per-example model is vmapped over the batch).
      layout: ``"NHWC"`` or ``"NCHW"``, the image layout the model reads (default: NHWC,
        Equinox NCHW). xaijax's inputs are always NHWC (N, H, W, C); with ``"NCHW"`` they
        are transposed before the model.
      input_shape: an example batch shape (N, H, W, C): if given, the wrapped model is
        traced once on it (shapes only) and must return (N, K) logits; a linen model is also
        checked for training-mode BatchNorm / Dropout.

    Returns:
      ``(module, variables)``: call methods as ``method(module, variables, x, target)`` with
      x (N, H, W, C); the logits are the model's own (N, K). For functions and Equinox,
      ``variables = {"params": {dotted path: array}}`` (e.g. ``"block1.w"``); for NNX, each
      ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.BatchNorm`` has linen's layout under its attribute
      path (``variables["params"]["layer4.conv"]["kernel"]``, ``variables["batch_stats"]["bn1"]``)
      and other arrays are ``variables["params"]["<dotted path>"]``.

    Raises:
      TypeError: an unknown model kind, or variables given where none are expected.
      ValueError: missing variables, an invalid ``layout``, a model in training mode, or
        (with ``input_shape``) output that is not (N, K) logits.
    """
    kind = model_kind(model)
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be None or a bool; got {batched!r}")
    if kind in ("nnx", "equinox") and variables is not None:
        raise TypeError(f"an {'NNX' if kind == 'nnx' else 'Equinox'} module holds its own arrays: call wrap(model) without variables")
    if kind == "linen":
        if variables is None:
            raise ValueError("a flax.linen module needs its variables: wrap(model, variables)")
        if batched is False or layout not in (None, "NHWC"):
            raise ValueError("a flax.linen module is used as it is: it must take NHWC batches (batched/layout do not apply)")
        wrapped, out_vars = model, variables
        if input_shape is not None:
            check_eval_mode(model, variables, _input_shape(input_shape))
        return wrapped, out_vars
    if kind == "nnx":
        if batched is False or layout not in (None, "NHWC"):
            raise ValueError("an NNX module is called as it is: it must take NHWC batches (batched/layout do not apply)")
        wrapped, out_vars = _wrap_nnx(model)
    elif kind == "equinox":
        wrapped, out_vars = _wrap_equinox(model, batched, layout)
    else:
        if variables is None:
            raise ValueError("a model function needs its parameters: wrap(apply_fn, params) for apply_fn(params, x) -> logits")
        arrays, treedef, paths, others = _flatten(variables)
        accepts_tap = _accepts_tap(model)
        wrapped = FunctionModel(
            fn=_static(model), treedef=treedef, paths=paths, others=_static(others), accepts_tap=accepts_tap,
            batched=True if batched is None else batched, layout=layout or "NHWC",
            who=f"the model function {getattr(model, '__name__', type(model).__name__)}",
        )
        out_vars = {"params": arrays}
    if input_shape is not None:
        shape = _input_shape(input_shape)
        jax.eval_shape(lambda v, xx: wrapped.apply(v, xx), out_vars, jax.ShapeDtypeStruct(shape, _float_dtype(out_vars)))
    return wrapped, out_vars


def _float_dtype(variables: Any) -> Any:
    """The dtype of the first floating-point array of ``variables`` (float32 if none): the
    dtype of the example input traced by the checks."""
    for a in jax.tree_util.tree_leaves(variables):
        if _is_array(a) and jnp.issubdtype(a.dtype, jnp.floating):
            return a.dtype
    return jnp.float32


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of ints (N, H, W, C); got {input_shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be a batch shape (N, H, W, C) of positive ints; got {input_shape!r}")
    return shape
