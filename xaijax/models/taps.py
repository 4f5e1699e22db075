"""Named access to intermediate layers of any zoo model.

A layer is addressed by the dotted path of its module, the torchvision name
(``features.29``, ``layer4``, ``layer4.2.relu``, ``denseblock4``, ``Mixed_7c``).
Two operations cover what CAM methods and rules need:

* :func:`forward` returns the model output together with the outputs of chosen layers;
* the same call can *add* a given array to chosen layer outputs, so the gradient of the
  output with respect to that array (taken at zero) is the gradient with respect to the
  layer's activation — the pure-JAX replacement for PyTorch's backward hooks.

:func:`intercept_calls` (and :func:`call_interceptor`, the same as a bare
``flax.linen`` interceptor) is the one home of the bookkeeping every layer-level
interceptor shares: only ``__call__``, the module's dotted name, and each layer call seen
once, at its outermost call (a subclass calling ``super().__call__`` is one call).

Everything here is traceable: use it inside ``jax.jit``/``jax.vmap``/``jax.grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

__all__ = [
    "module_name",
    "OnCall",
    "call_interceptor",
    "intercept_calls",
    "forward",
    "layer_names",
    "check_layers",
    "LayerCall",
    "Summary",
    "summary",
    "abstract_key",
]

#: ``on_call(name, module, call_next, args, kwargs) -> output`` of :func:`intercept_calls`.
OnCall = Callable[[str, nn.Module, Callable[..., Any], tuple, dict], Any]


def module_name(module: nn.Module) -> str:
    """Dotted torchvision-style path of a bound module (``""`` for the root)."""
    return ".".join(module.path)


def call_interceptor(on_call: OnCall) -> Callable[..., Any]:
    """A ``flax.linen`` method interceptor handing each outermost module call to ``on_call``.

    ``on_call(name, module, call_next, args, kwargs)`` returns the call's output: usually
    ``call_next(*args, **kwargs)``, possibly modified, or a replacement computed without
    ``call_next``. ``name`` is :func:`module_name` (``""`` for the root module). Only
    ``__call__`` is seen, other methods run unchanged; a module's nested call of its own
    ``__call__`` (a subclass calling ``super().__call__``) runs straight through, so each
    layer call is seen once. A parent's ``on_call`` encloses its children's (call order).
    Pass it to ``nn.intercept_methods``; :func:`intercept_calls` does that for you.
    """
    active: set[str] = set()  # modules being called

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = module_name(context.module)
        if name in active:
            return next_fun(*args, **kwargs)
        active.add(name)
        try:
            return on_call(name, context.module, next_fun, args, kwargs)
        finally:
            active.discard(name)

    return interceptor


@contextlib.contextmanager
def intercept_calls(on_call: OnCall) -> Iterator[None]:
    """Context in which every outermost module call goes through ``on_call`` (see :func:`call_interceptor`).

    Enter it inside the function that is traced (jitted, differentiated)::

        with taps.intercept_calls(on_call):
            out = model.apply(variables, x)
    """
    with nn.intercept_methods(call_interceptor(on_call)):
        yield


def forward(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    capture: Sequence[str] = (),
    add: Mapping[str, jax.Array] | None = None,
    **apply_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run ``model`` on ``x`` (NHWC) and return ``(output, {layer: activation})``.

    Args:
      model: a zoo model (any ``flax.linen`` module whose layers are named submodules).
      variables: its variables (``params`` and, for BatchNorm models, ``batch_stats``).
      x: input batch, NHWC.
      capture: dotted layer names whose outputs are returned (after any ``add``).
      add: ``{layer: array}`` added to those layers' outputs (same shape as the output).
      apply_kwargs: forwarded to ``model.apply``.

    Raises:
      ValueError: if a requested layer is not called during the forward pass.
    """
    add = dict(add or {})
    wanted = set(capture) | set(add)
    captured: dict[str, jax.Array] = {}

    def on_call(name, module, call_next, args, kwargs):
        out = call_next(*args, **kwargs)
        if name in wanted:
            if name in captured:
                raise ValueError(f"layer {name!r} is called more than once; it cannot be tapped")
            if name in add:
                out = out + add[name]
            captured[name] = out
        return out

    with intercept_calls(on_call):
        out = model.apply(variables, x, **apply_kwargs)
    missing = wanted - set(captured)
    if missing:
        _raise_unknown(sorted(missing), layer_names(model, variables, x))
    return out, {k: captured[k] for k in capture}


def layer_names(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> list[str]:
    """Dotted names of every module called in a forward pass on ``x``, in call order.

    Only shapes are traced (:func:`summary`: ``jax.eval_shape``, cached), so this is cheap even
    for large models.
    """
    return [c.name for c in summary(model, variables, x).layers if c.name]


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One named module of a forward pass, as :func:`summary` saw it.

    Attributes:
      name: dotted name (:func:`module_name`; ``""`` for the root module).
      module_type: the module's class.
      calls: how often it was called (outermost calls, as :func:`intercept_calls` counts them).
      output: its first call's output as ``jax.ShapeDtypeStruct`` (a pytree of them for a
        tuple or dict output).
    """

    name: str
    module_type: type
    calls: int
    output: Any


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one abstract forward pass (``model.apply(variables, x)``) shows: the output's
    shape and dtype (a ``jax.ShapeDtypeStruct`` pytree) and every module called, in call order."""

    output: Any
    layers: tuple[LayerCall, ...]

    def layer(self, name: str) -> LayerCall | None:
        """The :class:`LayerCall` of ``name``, or None if no module of that name is called."""
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, LayerCall]:
        return {c.name: c for c in self.layers}


def abstract_key(model: Any, variables: Any, x: Any) -> Hashable | None:
    """A cache key for what a trace of ``model`` on ``(variables, x)`` depends on besides
    values: the model, the variables' tree structure and each leaf's shape and dtype, and
    ``x``'s shape and dtype. Works on concrete and traced arrays alike; None when the model
    (or a leaf's description) cannot be hashed."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    try:
        key = (
            model,
            tree,
            tuple((np.shape(v), str(getattr(v, "dtype", type(v)))) for v in leaves),
            np.shape(x),
            str(getattr(x, "dtype", type(x))),
        )
        hash(key)
    except TypeError:
        return None
    return key


#: abstract_key -> Summary (bounded: cleared when full).
_SUMMARIES: dict[Hashable, Summary] = {}


def summary(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *, partial: bool = False) -> Summary:
    """One abstract forward pass of ``model`` on ``x`` (``jax.eval_shape``: nothing is computed),
    recording the output's shape and every module call; cached per :func:`abstract_key`.

    The methods' set-up questions (how many classes the model has, which layer kinds it
    calls, the shape of a tapped layer, the layer names) are all answered from this one
    trace, so jitting a method traces the model for them once instead of once per question,
    and a second method on the same model and shapes does not trace it again. Works on
    traced arguments (inside ``jit``/``vmap``).

    Args:
      partial: if the forward pass fails, return the layers called before the failure (their
        outputs None where the call did not finish; ``output`` None) instead of raising.

    Raises:
      whatever the forward pass raises (a bad input, a train-mode BatchNorm), unless
      ``partial``; nothing is cached then.
    """
    key = abstract_key(model, variables, x)
    if key is not None and key in _SUMMARIES:
        return _SUMMARIES[key]
    seen: dict[str, list[Any]] = {}  # name -> [module type, calls, output]

    def on_call(name, module, call_next, args, kwargs):
        if name in seen:
            seen[name][1] += 1
            return call_next(*args, **kwargs)
        entry = seen[name] = [type(module), 1, None]  # entered now: call order
        out = call_next(*args, **kwargs)
        entry[2] = jax.tree_util.tree_map(_shape_of, out)
        return out

    def run(v, xx):
        with intercept_calls(on_call):
            return model.apply(v, xx)

    def layers() -> tuple[LayerCall, ...]:
        return tuple(LayerCall(n, t, c, o) for n, (t, c, o) in seen.items())

    try:
        out = jax.eval_shape(run, variables, x)
    except Exception:
        if partial:
            return Summary(output=None, layers=layers())
        raise
    result = Summary(output=out, layers=layers())
    if key is not None:
        if len(_SUMMARIES) >= 256:
            _SUMMARIES.clear()
        _SUMMARIES[key] = result
    return result


def _shape_of(a: Any) -> Any:
    return jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") and hasattr(a, "dtype") else a


def check_layers(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, layers: Sequence[str]) -> None:
    """Raise a readable ``ValueError`` if any of ``layers`` is not a layer of ``model``."""
    known = layer_names(model, variables, x)
    missing = [l for l in layers if l not in known]
    if missing:
        _raise_unknown(missing, known)


def _raise_unknown(missing: Sequence[str], known: Sequence[str]) -> None:
    hints = []
    for m in missing:
        close = difflib.get_close_matches(m, known, n=3)
        hints.append(f"{m!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(
        "unknown layer name(s): " + "; ".join(hints) + f". The model has {len(known)} named layers, e.g. "
        + ", ".join(repr(k) for k in known[:: max(1, len(known) // 8)][:8])
    )
