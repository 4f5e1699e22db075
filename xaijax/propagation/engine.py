"""The propagation engine: relevance rules as custom VJPs of an ordinary Flax forward pass.

How it works
------------
Relevance propagation (LRP, Excitation Backprop, ...) is a backward pass in which every
layer maps the relevance at its output to relevance at its inputs with its own rule. In JAX
that is a vector-Jacobian product in which the "cotangent" carries relevance and each
layer's VJP is replaced:

1. **Plan** (once per model, input shape and composite; cached): the model's ``apply`` is
   traced abstractly (``jax.eval_shape``) under ``flax.linen.intercept_methods`` to list
   the leaf layers in call order with their kinds (:data:`KINDS`), shapes and producers.
   From that the composite assigns each layer its rule (first/last layer, names, types,
   kinds), BatchNorms that directly follow a convolution/dense layer are marked for folding
   (:mod:`xaijax.propagation.canonizers`), and unsupported layer types are reported
   together in one readable error.
2. **Forward**: inside the traced function, ``model.apply`` runs again under an interceptor
   that wraps every leaf-layer call in a ``jax.custom_vjp``: the primal is the layer's own
   computation (an unbound clone of the module applied to the module's variables, passed
   explicitly so nothing is closed over), the residuals are its inputs, output and
   variables, and the backward applies the rule (:meth:`Rule.backward`) to the incoming
   cotangent. A convolution whose BatchNorm is folded is wrapped together with it, at the
   BatchNorm's call. Container modules (``features``, ``layer1.0``, ...) run unchanged, so
   the forward values are exactly the model's.
3. **Backward**: ``jax.vjp`` of that function, pulled back from the output relevance
   (e.g. the one-hot target times the logits), gives the relevance at the input — or, with
   ``read_at``, at any named layer's output (a zero "probe" added to that output has the
   relevance arriving there as its cotangent). With ``seed_at`` the function returns a
   named layer's output instead of the logits, so the backward pass *starts* there with a
   relevance of that layer's output shape (CAM-seeded methods such as RSP); the rule of
   that layer itself (and everything below it) applies, the layers above it are not
   propagated.

Transformer layers (:mod:`xaijax.models.transformer_layers`) are leaf layers of their own
kinds: ``layernorm``, ``softmax``, ``matmul`` (a bilinear product of two inputs),
``activation`` (GELU, Tanh), ``rearrange`` (patch tokens, head split/merge -- fused or of one
projection --, token concatenation and selection), ``average`` and ``mask`` (BERT's attention
mask on the logits, :class:`~xaijax.models.transformer_layers.MaskKeys`: its second input, the
float keep-mask, is a constant of the explained input and gets zero relevance). Embedding
lookups (``nn.Embed`` of integer ids: BERT's position and token-type embeddings) are not
layers of any kind: their outputs are constants with respect to the explained input (the word
embeddings), like a ViT's position embedding, and the relevance that reaches them in a sum
stays there, as relevance reaching a bias does. A layer may return a tuple of arrays (``SplitHeads``' q,
k, v): its custom VJP then receives a tuple of relevances, and only rules declaring
``multi_output`` (Vjp, Stop) apply to it; such outputs cannot be read with ``read_at`` or
seeded with ``seed_at``. Inputs broadcast over the batch (a position embedding or class
token of batch size 1) get the relevance summed over the batch, as their VJP would: it stays
there, like relevance reaching a bias.

Everything is traced JAX: wrap the calls in ``jax.jit`` (model static) and ``jax.vmap``;
the interception context is entered inside the traced function and the rule set is
static.

Operations that are not layer modules -- what a model computes between its layers with
functions (``nn.relu``, ``nn.max_pool``, ``jnp.mean``, a residual ``+``, ``nn.gelu``,
``jax.nn.softmax``, ``q @ k``), or inside a module of a type the engine does not know -- get
rules keyed by JAX primitive (:mod:`xaijax.propagation.functional`): the plan's trace is a
jaxpr in which intercepted layers are opaque, every other operation on the input's path is
classified (``Plan.functional``; an operation without a rule is an error listing it), and when
there is any, the forward pass is traced once more and re-evaluated with those rules. The zoo
models make every operation a named module, so for them this costs nothing.

Samples are independent: no rule mixes the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.models import layers as L
from xaijax.models import transformer_layers as T
from xaijax.models.adapters import propagation_refusal
from xaijax.models.taps import module_name
from xaijax.propagation.canonizers import batchnorm_affine, check_eval_batchnorm, fold_batchnorm
from xaijax.propagation import functional
from xaijax.propagation.composites import KINDS, Composite, resolve
from xaijax.propagation.rules import ConvGeometry, LayerView, Rule

__all__ = [
    "KINDS",
    "layer_kind",
    "LayerPlan",
    "Plan",
    "plan",
    "LayerRelevance",
    "pullback",
    "relevance",
    "relevance_trace",
]

Array = jax.Array
OutputRelevance = Callable[[Array], Array] | Array

_KIND_OF: tuple[tuple[type, str], ...] = (
    (nn.Conv, "conv"),
    (nn.Dense, "dense"),
    (nn.DenseGeneral, "dense"),
    (nn.BatchNorm, "batchnorm"),
    (L.ReLU, "relu"),
    (L.MaxPool2d, "maxpool"),
    (L.AvgPool2d, "avgpool"),
    (L.AdaptiveAvgPool2d, "avgpool"),
    (L.Flatten, "reshape"),
    (L.Dropout, "dropout"),
    (nn.Dropout, "dropout"),
    (L.Add, "add"),
    (L.Concat, "concat"),
    (L.Identity, "identity"),
    (T.LayerNorm, "layernorm"),
    (nn.LayerNorm, "layernorm"),
    (T.Softmax, "softmax"),
    (T.MatMul, "matmul"),
    (T.GELU, "activation"),
    (T.Tanh, "activation"),
    (T.PatchTokens, "rearrange"),
    (T.SplitHeads, "rearrange"),
    (T.Heads, "rearrange"),
    (T.MaskKeys, "mask"),
    (T.MergeHeads, "rearrange"),
    (T.TokenConcat, "rearrange"),
    (T.SelectToken, "rearrange"),
    (T.Average, "average"),
)

#: kinds whose output is non-negative when all their inputs are
_NONNEG_PRESERVING = ("maxpool", "avgpool", "reshape", "dropout", "identity", "concat", "add", "rearrange", "average")

#: kinds whose output is non-negative whatever their inputs
_NONNEG_OUTPUT = ("relu", "softmax")

_SUPPORTED = (
    "nn.Conv, nn.Dense, nn.BatchNorm, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Add, Concat, "
    "Identity, and the transformer layers LayerNorm, Softmax, MatMul, GELU, Tanh, PatchTokens, SplitHeads, Heads, "
    "MergeHeads, MaskKeys, TokenConcat, SelectToken, Average (xaijax.models.transformer_layers)"
)


def layer_kind(module: nn.Module) -> str | None:
    """The engine's kind of a module (one of :data:`KINDS`), or None for anything else."""
    for cls, kind in _KIND_OF:
        if isinstance(module, cls):
            return kind
    return None


def _mapped_type(module: nn.Module, composite: Composite) -> bool:
    return any(isinstance(module, cls) for cls, _ in composite.types)


def _leaf_kind(module: nn.Module, composite: Composite) -> str | None:
    kind = layer_kind(module)
    if kind is None and _mapped_type(module, composite):
        return "custom"
    return kind


# ------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One leaf-layer call of the forward pass and the rule it gets.

    Attributes:
      index: position among the leaf-layer calls.
      name: dotted layer name.
      kind: one of :data:`KINDS` or ``"custom"``.
      type_name: the module's class name.
      rule: the rule (None for a BatchNorm folded into the preceding layer).
      in_shapes, out_shape: array shapes of the call; for a layer that returns a tuple of
        arrays (``multi_output``, e.g. SplitHeads' ``(q, k, v)``) ``out_shape`` is the tuple of
        their shapes.
      fold: for a convolution/dense layer, the index of the BatchNorm folded into it.
      folded_into: for a folded BatchNorm, the index of that convolution/dense layer.
      nonneg: every input is known to be non-negative (produced by a ReLU, or by pooling,
        reshaping, concatenating or adding such arrays); rules may skip vanishing terms.
      multi_output: the layer returns a tuple of arrays; its rule then receives ``out`` and
        ``R`` as tuples (only rules written for that, such as Vjp, apply).
    """

    index: int
    name: str
    kind: str
    type_name: str
    rule: Rule | None
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    fold: int | None = None
    folded_into: int | None = None
    nonneg: bool = False
    multi_output: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Leaf layers with their rules, the output shape of every named module call, and the
    shape of the model's logits (``logits_shape``, (N, K))."""

    layers: tuple[LayerPlan, ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    logits_shape: tuple[int, ...]
    functional: tuple[functional.Functional, ...] = ()

    def describe(self) -> str:
        """One line per layer (name, kind and rule), then one per functional operation
        (``<module path>:<primitive>``, its class and rule; see :mod:`xaijax.propagation.functional`)."""
        lines = []
        for e in self.layers:
            rule = f"folded into {self.layers[e.folded_into].name}" if e.folded_into is not None else repr(e.rule)
            extra = f" (+ {self.layers[e.fold].name})" if e.fold is not None else ""
            lines.append(f"{e.name or '<root>'}{extra}: {e.kind} -> {rule}")
        if self.functional:
            lines.append("functional operations:")
            lines.extend(f"{op.name}: {op.kind} -> {op.rule!r}" for op in self.functional)
        return "\n".join(lines)

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Output shape of the module called ``name`` (readable error if unknown/repeated)."""
        found = [s for n, s in self.outputs if n == name]
        if not found:
            known = [n for n, _ in self.outputs if n]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"unknown layer name {name!r}{hint}. The model has {len(known)} named layers, e.g. "
                + ", ".join(repr(k) for k in known[:: max(1, len(known) // 8)][:8])
            )
        if len(found) > 1:
            raise ValueError(f"layer {name!r} is called {len(found)} times; relevance cannot be read there")
        return found[0]


@dataclasses.dataclass(frozen=True)
class _Call:
    """One leaf-layer call as recorded by the graph trace (composite-independent)."""

    name: str
    kind: str
    module_type: type
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    nonneg: bool
    foldable: int | None  # index of a BatchNorm that reads only this layer's output
    multi_output: bool = False


@dataclasses.dataclass(frozen=True)
class _Graph:
    calls: tuple[_Call, ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    logits_shape: tuple[int, ...]
    functional: tuple[functional.Functional, ...] = ()  # classes only; rules come with the composite


def plan(model: nn.Module, variables: Mapping[str, Any], x: Array, composite: Composite | str = "zero") -> Plan:
    """Trace ``model`` on the shape of ``x`` and assign every leaf layer its rule.

    The trace (``jax.eval_shape``, no compilation) is cached per model, input and variable
    shapes and ``composite.types``; assigning rules for another composite is cheap.

    Raises:
      ValueError: unsupported layer types (all listed), a rule that does not fit its layer,
        a training-mode BatchNorm/Dropout, or non-array layer inputs.
    """
    composite = resolve(composite)
    refusal = propagation_refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    var_spec = tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)
    x_spec = (tuple(np.shape(x)), str(x.dtype))
    key = (model, composite.types, treedef, var_spec, x_spec)
    try:
        hash(key)
    except TypeError:
        graph = _trace_graph(*key)
    else:
        graph = _cached_graph(*key)
    return _assign_rules(graph, composite)


@functools.lru_cache(maxsize=64)
def _cached_graph(model, types, treedef, var_spec, x_spec) -> _Graph:
    return _trace_graph(model, types, treedef, var_spec, x_spec)


def _trace_graph(model, types, treedef, var_spec, x_spec) -> _Graph:
    variables = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in var_spec])
    x = jax.ShapeDtypeStruct(*x_spec)
    mapped = Composite(types=types)

    calls: list[dict[str, Any]] = []
    outputs: list[tuple[str, tuple[int, ...]]] = []
    stack: list[dict[str, Any]] = []
    keep: list[Any] = []  # keeps traced arrays alive so their ids stay unique
    producer: dict[int, int] = {}
    consumers: dict[int, list[int]] = defaultdict(list)
    nonneg: set[int] = set()  # ids of arrays known to be >= 0
    state = {"bypass": 0}

    def interceptor(next_fun, args, kwargs, context):
        if state["bypass"]:
            return next_fun(*args, **kwargs)
        if stack and context.module is not stack[-1]["module"]:
            stack[-1]["container"] = True
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        name = module_name(module)
        kind = _leaf_kind(module, mapped)
        if kind is None:  # a container, or a module whose operations are functional (classified below)
            frame = {"module": module, "container": False}
            stack.append(frame)
            try:
                out = next_fun(*args, **kwargs)
            finally:
                stack.pop()
            if isinstance(out, jax.Array):
                outputs.append((name, tuple(out.shape)))
            return out
        bad = [type(a).__name__ for a in args if not isinstance(a, jax.Array)]
        if bad:
            raise ValueError(f"layer {name!r} is called with non-array positional arguments ({', '.join(bad)})")
        if kind == "batchnorm":
            check_eval_batchnorm(module, name)
        if kind == "dropout" and (getattr(module, "train", False) or getattr(module, "deterministic", True) is False):
            raise ValueError(f"dropout layer {name!r} is active (training mode); propagation needs an eval-mode model")
        state["bypass"] += 1
        try:  # opaque, as the rules' wrappers make it in the forward pass
            out = functional.opaque(lambda *a: next_fun(*a, **kwargs), *args)
        finally:
            state["bypass"] -= 1
        multi = isinstance(out, tuple) and len(out) > 0 and all(isinstance(o, jax.Array) for o in out)
        if not multi and not isinstance(out, jax.Array):
            raise ValueError(f"layer {name!r} returns {type(out).__name__}, not an array (or a tuple of arrays)")
        outs = out if multi else (out,)
        index = len(calls)
        inputs_nonneg = all(id(a) in nonneg for a in args)
        if kind in _NONNEG_OUTPUT or (kind in _NONNEG_PRESERVING and inputs_nonneg):
            nonneg.update(id(o) for o in outs)
        calls.append(
            {
                "name": name,
                "kind": kind,
                "module_type": type(module),
                "in_shapes": tuple(tuple(a.shape) for a in args),
                "out_shape": tuple(tuple(o.shape) for o in outs) if multi else tuple(out.shape),
                "inputs": [id(a) for a in args],
                "out": None if multi else id(out),
                "nonneg": inputs_nonneg,
                "multi": multi,
            }
        )
        for a in args:
            consumers[id(a)].append(index)
        for o in outs:
            producer[id(o)] = index
        keep.extend(args)
        keep.extend(outs)
        if not multi:
            outputs.append((name, tuple(out.shape)))
        return out

    def run(v, xx):
        with nn.intercept_methods(interceptor):
            return model.apply(v, xx)

    closed, out = jax.make_jaxpr(run, return_shape=True)(variables, x)
    # every operation outside the intercepted layers: a functional rule, or an error listing it
    n_vars = len(jax.tree_util.tree_leaves(variables))
    try:
        ops = functional.analyse(closed, [False] * n_vars + [True])
    except ValueError as e:
        raise ValueError(f"{e} Layer types with a rule: {_SUPPORTED}.") from None
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 2:
        raise ValueError(f"the model must return logits of shape (N, K); got {out}")
    if not calls:
        raise ValueError("the model calls no layer the propagation engine can intercept")

    foldable: dict[int, int] = {}
    for j, c in enumerate(calls):
        if c["kind"] != "batchnorm" or len(c["inputs"]) != 1:
            continue
        i = producer.get(c["inputs"][0])
        if i is None or calls[i]["kind"] not in ("conv", "dense") or i in foldable:
            continue
        if consumers[calls[i]["out"]] == [j]:
            foldable[i] = j
    return _Graph(
        tuple(
            _Call(
                c["name"], c["kind"], c["module_type"], c["in_shapes"], c["out_shape"], c["nonneg"], foldable.get(i), c["multi"]
            )
            for i, c in enumerate(calls)
        ),
        tuple(outputs),
        tuple(out.shape),
        ops,
    )


def _assign_rules(graph: _Graph, composite: Composite) -> Plan:
    calls = graph.calls
    weighted = [i for i, c in enumerate(calls) if c.kind in ("conv", "dense")]
    first = weighted[0] if weighted else None
    last = weighted[-1] if weighted else None
    fold = {i: c.foldable for i, c in enumerate(calls) if c.foldable is not None} if composite.canonize else {}
    folded_into = {j: i for i, j in fold.items()}

    entries = []
    for i, c in enumerate(calls):
        if i in folded_into:
            rule = None
        else:
            rule = composite.rule_for(c.name, c.kind, c.module_type, first=i == first, last=i == last)
            if rule is None:  # pragma: no cover - custom kinds always have a mapped rule
                raise ValueError(f"no rule for layer {c.name!r} ({c.module_type.__name__})")
            out_shape = calls[fold[i]].out_shape if i in fold else c.out_shape
            if c.multi_output and not rule.multi_output:
                raise ValueError(
                    f"layer {c.name!r} ({c.module_type.__name__}) returns {len(c.out_shape)} arrays; rule {rule!r} "
                    "handles single-output layers (rules for several outputs: Vjp, Stop)"
                )
            rule.check(c.name, c.kind, c.in_shapes, out_shape)
        entries.append(
            LayerPlan(
                index=i,
                name=c.name,
                kind=c.kind,
                type_name=c.module_type.__name__,
                rule=rule,
                in_shapes=c.in_shapes,
                out_shape=c.out_shape,
                fold=fold.get(i),
                folded_into=folded_into.get(i),
                nonneg=c.nonneg,
                multi_output=c.multi_output,
            )
        )
    ops = []
    for op in graph.functional:
        rule = functional.rule_for(composite, op.name, op.kind)
        rule.check(op.name, functional.composite_kind(op.kind), op.in_shapes, op.out_shape)
        ops.append(dataclasses.replace(op, rule=rule))
    return Plan(tuple(entries), graph.outputs, graph.logits_shape, tuple(ops))


# ----------------------------------------------------------------------- layer views


def conv_geometry(module: nn.Module) -> ConvGeometry | None:
    """The :class:`ConvGeometry` of a plain ``nn.Conv`` (zero padding given as a string,
    ints or pairs; no feature groups, input dilation or mask), else None."""
    if not isinstance(module, nn.Conv) or module.mask is not None or module.feature_group_count != 1:
        return None
    kernel = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    rank = len(kernel)

    def per_axis(v: Any) -> tuple[int, ...]:
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    if any(d != 1 for d in per_axis(module.input_dilation)):
        return None
    try:
        padding = canonicalize_padding(module.padding, rank)  # flax's own reading of the attribute
    except ValueError:
        return None
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):  # CIRCULAR, REFLECT, CAUSAL pad with data
            return None
    else:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        if any(lo < 0 or hi < 0 for lo, hi in padding):  # cropping: not a zero pad
            return None
    strides, dilation = per_axis(module.strides), per_axis(module.kernel_dilation)
    if len(strides) != rank or len(dilation) != rank:
        return None
    return ConvGeometry(kernel, strides, padding, dilation)


def _view_builder(module: nn.Module, kind: str, kwargs: Mapping[str, Any], name: str, nonneg: bool) -> Callable[[Any], LayerView]:
    """``params -> LayerView`` for one (unfolded) layer; pure in ``params``."""
    unbound = module.clone(parent=None)

    def fn_of(params):
        return lambda *xs: unbound.apply(params, *xs, **kwargs)

    if kind in ("conv", "dense"):
        nobias = unbound.clone(use_bias=False)

        def op(k, x):
            return nobias.apply({"params": {"kernel": k}}, x)

        geometry = conv_geometry(unbound)

        def build(params):
            p = params["params"]
            bias = p["bias"] if unbound.use_bias else None
            return LayerView(name, kind, fn_of(params), op, p["kernel"], bias, nonneg, geometry)

        return build
    if kind == "batchnorm":

        def build(params):
            dtype = jnp.result_type(*[a.dtype for a in jax.tree_util.tree_leaves(params)])
            a, c = batchnorm_affine(unbound, params, dtype)
            return LayerView(name, kind, fn_of(params), lambda k, x: x * k, a, c, nonneg)

        return build
    if kind == "layernorm":
        return _layernorm_builder(unbound, fn_of, name, nonneg)
    if kind == "softmax":
        return lambda params: LayerView(name, kind, fn_of(params), nonneg=nonneg, axis=unbound.axis)
    return lambda params: LayerView(name, kind, fn_of(params), nonneg=nonneg)


def _layernorm_builder(unbound: nn.Module, fn_of: Callable[[Any], Callable[..., Array]], name: str, nonneg: bool):
    """View of a :class:`~xaijax.models.transformer_layers.LayerNorm` (or a ``flax.linen.LayerNorm``
    over the last axis) with ``linearized``: the layer with its normaliser ``rsqrt(var + eps)``
    held constant (``stop_gradient``), i.e. the same values as the layer and the derivative of
    the affine map ``(x - mean) * r * scale + bias`` with ``r`` fixed. It mirrors that module's
    formula (mean and biased variance over the last axis, ``eps`` inside the root); tests check
    that both give the same values."""
    epsilon = float(unbound.epsilon)
    if isinstance(unbound, nn.LayerNorm) and (
        unbound.reduction_axes not in (-1, (-1,)) or unbound.feature_axes not in (-1, (-1,))
    ):
        raise ValueError(
            f"LayerNorm {name!r} normalises over axes {unbound.reduction_axes} (features {unbound.feature_axes}); "
            "the layernorm rule handles the last axis only"
        )

    def build(params):
        p = params.get("params", {})
        scale, bias = p.get("scale", 1.0), p.get("bias", 0.0)

        def linearized(x):
            xc = x - jnp.mean(x, axis=-1, keepdims=True)
            r = jax.lax.stop_gradient(jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + epsilon))
            return xc * r * scale + bias

        return LayerView(name, "layernorm", fn_of(params), nonneg=nonneg, axis=-1, linearized=linearized)

    return build


def _folded_builder(
    lin: nn.Module, kind: str, kwargs: Mapping[str, Any], bn: nn.Module, name: str, nonneg: bool
) -> Callable[[Any], LayerView]:
    """``params -> LayerView`` of a convolution/dense layer with its BatchNorm folded in."""
    lin_unbound = lin.clone(parent=None)
    bn_unbound = bn.clone(parent=None)
    nobias = lin_unbound.clone(use_bias=False)
    geometry = conv_geometry(lin_unbound)

    def op(k, x):
        return nobias.apply({"params": {"kernel": k}}, x)

    def build(params):
        lp, bp = params["lin"], params["bn"]
        kernel = lp["params"]["kernel"]
        bias = lp["params"]["bias"] if lin_unbound.use_bias else None
        k2, b2 = fold_batchnorm(kernel, bias, bn_unbound, bp)

        def fn(x):
            return bn_unbound.apply(bp, lin_unbound.apply(lp, x, **kwargs))

        return LayerView(name, kind, fn, op, k2, b2, nonneg, geometry)

    return build


# ---------------------------------------------------------------------- forward pass


def _unbroadcast(r: Array, shape: tuple[int, ...]) -> Array:
    """``r`` summed down to an input's ``shape`` where a rule computed it broadcast (an input
    of shape (1, T, D) added to (N, T, D), e.g. a position embedding): what the VJP of the
    broadcast does. Other shape mismatches are left for JAX to report."""
    if r.shape == tuple(shape) or r.ndim != len(shape):
        return r
    axes = tuple(i for i, (a, b) in enumerate(zip(r.shape, shape)) if b == 1 and a != 1)
    return r.sum(axis=axes, keepdims=True) if axes else r


class _Runner:
    """Interceptor state for one traced forward pass (see the module docstring)."""

    def __init__(
        self,
        the_plan: Plan,
        composite: Composite,
        probes: Mapping[int, tuple[tuple[Array, ...], Array]] | None = None,
        reads: Mapping[str, Array] | None = None,
        capture: str | None = None,
    ):
        self.plan = the_plan
        self.composite = composite
        self.probes = probes or {}
        self.reads = dict(reads or {})
        self.capture = capture
        self.captured: Array | None = None
        # reading at a folded convolution means reading at its BatchNorm (relevance passes it)
        for e in the_plan.layers:
            if e.fold is not None and e.name in self.reads:
                self.reads[the_plan.layers[e.fold].name] = self.reads.pop(e.name)
            if e.fold is not None and e.name == self.capture:
                self.capture = the_plan.layers[e.fold].name
        self.bypass = 0
        self.index = 0
        self.pending: dict[int, tuple[LayerPlan, nn.Module, tuple[Array, ...], dict[str, Any]]] = {}
        self.keep: list[Any] = []

    @contextlib.contextmanager
    def bypassing(self) -> Iterator[None]:
        self.bypass += 1
        try:
            yield
        finally:
            self.bypass -= 1

    def _read(self, name: str, out: Array) -> Array:
        if name in self.reads:
            out = out + self.reads[name].astype(out.dtype)
        if self.capture is not None and name == self.capture:
            if self.captured is not None:  # pragma: no cover - Plan.output_shape rejects repeated layers
                raise RuntimeError(f"layer {name!r} is called more than once; the backward pass cannot start there")
            self.captured = out
        return out

    def wrap(self, rule: Rule, build: Callable[[Any], LayerView], params: Any, xs: tuple[Array, ...]) -> Array:
        runner = self

        @jax.custom_vjp
        def layer(params, *xs):
            with runner.bypassing():
                return build(params).fn(*xs)

        def fwd(params, *xs):
            with runner.bypassing():
                out = build(params).fn(*xs)
            return out, (params, xs, out)

        def bwd(res, R):
            params, xs, out = res
            with runner.bypassing():
                rin = rule.backward(build(params), xs, out, R)
            rin = tuple(_unbroadcast(jnp.asarray(r), x.shape).astype(x.dtype) for r, x in zip(rin, xs))
            return (jax.tree_util.tree_map(jnp.zeros_like, params),) + rin

        layer.defvjp(fwd, bwd)
        return layer(params, *xs)

    def __call__(self, next_fun, args, kwargs, context):
        if self.bypass or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        name = module_name(module)
        kind = _leaf_kind(module, self.composite)
        if kind is None:
            return self._read(name, next_fun(*args, **kwargs))
        if self.index >= len(self.plan.layers) or self.plan.layers[self.index].name != name:
            raise RuntimeError(
                f"the forward pass called layer {name!r} where the plan expected "
                f"{self.plan.layers[self.index].name if self.index < len(self.plan.layers) else 'no more layers'!r}; "
                "the model's call sequence must not depend on values"
            )
        entry = self.plan.layers[self.index]
        self.index += 1
        xs = tuple(args)
        in_probes, out_probe = self.probes.get(entry.index, (None, None))
        if in_probes is not None:
            xs = tuple(x + p.astype(x.dtype) for x, p in zip(xs, in_probes))

        if entry.fold is not None:  # convolution/dense whose BatchNorm comes next: wrap both there
            with self.bypassing():
                out = next_fun(*xs, **kwargs)
            self.pending[id(out)] = (entry, module, xs, dict(kwargs))
            self.keep.append(out)
            return out

        if entry.folded_into is not None:
            try:
                lin_entry, lin_module, lin_xs, lin_kwargs = self.pending.pop(id(args[0]))
            except KeyError:  # pragma: no cover - guaranteed by the plan
                raise RuntimeError(f"BatchNorm {name!r} does not receive the output of the layer folded into it") from None
            build = _folded_builder(lin_module, lin_entry.kind, lin_kwargs, module, lin_entry.name, lin_entry.nonneg)
            params = {"lin": lin_module.variables, "bn": module.variables}
            out = self.wrap(lin_entry.rule, build, params, lin_xs)
            _, out_probe = self.probes.get(lin_entry.index, (None, None))
        else:
            build = _view_builder(module, kind, kwargs, name, entry.nonneg)
            out = self.wrap(entry.rule, build, module.variables, xs)
        if out_probe is not None:
            out = jax.tree_util.tree_map(lambda o, p: o + p.astype(o.dtype), out, out_probe)
        if entry.multi_output:  # a tuple of arrays: not addressable by read_at / seed_at
            return out
        return self._read(name, out)


def _forward(model, variables, the_plan, composite, capture: str | None = None) -> Callable[..., Array]:
    """``f(x, probes, reads)``: the forward pass with rules attached; returns the logits, or the
    output of layer ``capture`` (where the backward pass then starts)."""

    def f(x, probes, reads):
        runner = _Runner(the_plan, composite, probes, reads, capture)
        with nn.intercept_methods(runner):
            out = model.apply(variables, x)
        if runner.index != len(the_plan.layers):  # pragma: no cover - guarded by the plan
            raise RuntimeError("the forward pass called fewer layers than planned")
        if capture is not None:
            if runner.captured is None:  # pragma: no cover - guarded by Plan.output_shape
                raise RuntimeError(f"layer {capture!r} was not called in the forward pass")
            return runner.captured
        return out

    if the_plan.functional:  # functional operations get their rules (see functional's docstring)
        def flags(args):  # (x, probes, reads): probes and reads are zero arrays added to read relevance
            x, probes, reads = args
            return (True, jax.tree_util.tree_map(lambda _: "probe", probes), jax.tree_util.tree_map(lambda _: "probe", reads))

        return functional.evaluate(f, composite, flags)
    return f


def _output_relevance(output_relevance: OutputRelevance, out: Array, seed_at: str | None = None) -> Array:
    r = output_relevance(out) if callable(output_relevance) else jnp.asarray(output_relevance)
    if tuple(r.shape) != tuple(out.shape):
        where = "the model output's" if seed_at is None else f"layer {seed_at!r}'s output"
        raise ValueError(f"output relevance must have {where} shape {tuple(out.shape)}; got {tuple(r.shape)}")
    return r.astype(out.dtype)


def _check_seed_at(the_plan: Plan, seed_at: str | None) -> None:
    if seed_at is not None:
        if not isinstance(seed_at, str) or not seed_at:
            raise ValueError(f"seed_at must be a dotted layer name, got {seed_at!r}")
        the_plan.output_shape(seed_at)  # readable error if unknown or called more than once


# ------------------------------------------------------------------------ public API


def pullback(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    composite: Composite | str = "zero",
    *,
    read_at: str | None = None,
    seed_at: str | None = None,
) -> tuple[Array, Callable[[Array], Array]]:
    """One forward pass with rules attached; returns ``(logits, backward)``.

    ``backward(R_out)`` maps an output relevance of the logits' shape (N, K) to the
    relevance at the input (shape of ``x``) — or at the output of layer ``read_at`` — and
    may be called several times (e.g. target and contrast seeds) without redoing the
    forward pass.

    ``seed_at``: a dotted layer name (leaf or container). The backward pass then starts at
    that layer's output: the first value returned is that layer's output (not the logits)
    and ``backward`` takes a relevance of its shape. The layer's own rule applies to the
    seed; layers above it are not propagated.
    """
    composite = resolve(composite)
    the_plan = plan(model, variables, x, composite)
    _check_seed_at(the_plan, seed_at)
    f = _forward(model, variables, the_plan, composite, seed_at)
    if read_at is None:
        out, vjp = jax.vjp(lambda xx: f(xx, None, None), x)
        return out, lambda r: vjp(_output_relevance(r, out, seed_at))[0]
    shape = the_plan.output_shape(read_at)
    probe = jnp.zeros(shape, x.dtype)
    out, vjp = jax.vjp(lambda p: f(x, None, {read_at: p}), probe)
    return out, lambda r: vjp(_output_relevance(r, out, seed_at))[0]


def relevance(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    output_relevance: OutputRelevance,
    composite: Composite | str = "zero",
    *,
    read_at: str | None = None,
    seed_at: str | None = None,
) -> Array:
    """Relevance at the input (or at layer ``read_at``'s output) of ``model`` on ``x``.

    Args:
      model, variables: a Flax model returning logits (N, K) and its variables (eval mode).
      x: input batch (any shape the model takes; NHWC for the zoo models).
      output_relevance: relevance of the logits, an array (N, K) or a function
        ``logits -> (N, K)`` (e.g. ``lambda out: one_hot * out`` for LRP).
      composite: a :class:`Composite` or a built-in composite name.
      read_at: a dotted module name (leaf or container, e.g. ``"features.23"``,
        ``"layer3"``): return the relevance arriving at that module's output instead.
      seed_at: a dotted module name: start the backward pass at that module's output
        instead of the logits; ``output_relevance`` then has (or, as a function, maps that
        layer's output to) the layer output's shape. ``read_at`` must lie below it.

    Returns:
      Relevance of ``x``'s shape (or of the layer output's shape), dtype of ``x``.
    """
    out, back = pullback(model, variables, x, composite, read_at=read_at, seed_at=seed_at)
    return back(output_relevance)


@dataclasses.dataclass(frozen=True)
class LayerRelevance:
    """Relevance around one layer (from :func:`relevance_trace`); a pytree (jit-returnable).

    Attributes:
      name, kind, rule: the layer and its rule (a folded BatchNorm is listed in ``folded``).
      inputs: relevance this layer sends to each of its inputs (shapes of the inputs).
      output: relevance arriving at its output (after the folded BatchNorm, if any); a tuple
        for a layer returning several arrays (SplitHeads).
    """

    name: str
    kind: str
    rule: Rule
    folded: str | None
    inputs: tuple[Array, ...]
    output: Array | tuple[Array, ...]

    def totals(self) -> tuple[Array, Array]:
        """Per-sample sums ``(sum of input relevance, output relevance)``, each (N,).

        An input broadcast over the batch (a transformer's class token, shape (1, 1, D)) has
        one relevance for the whole batch; it is added to every sample's input total.
        """
        tin = sum(r.reshape(r.shape[0], -1).sum(-1) for r in self.inputs)
        outs = self.output if isinstance(self.output, tuple) else (self.output,)
        tout = sum(r.reshape(r.shape[0], -1).sum(-1) for r in outs)
        return tin, tout


jax.tree_util.register_dataclass(
    LayerRelevance, data_fields=["inputs", "output"], meta_fields=["name", "kind", "rule", "folded"]
)


def relevance_trace(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    output_relevance: OutputRelevance,
    composite: Composite | str = "zero",
    *,
    seed_at: str | None = None,
) -> tuple[Array, dict[str, LayerRelevance]]:
    """Input relevance plus the relevance around every layer (to inspect or test rules).

    Returns ``(R_x, {layer name: LayerRelevance})`` in call order (folded BatchNorms are
    part of their convolution's entry). Zero-valued probes are added to every layer's
    inputs and output; their cotangents are the relevance there. ``seed_at``: start the
    backward pass at that layer's output (see :func:`relevance`); layers above it then
    report zero relevance.
    """
    composite = resolve(composite)
    the_plan = plan(model, variables, x, composite)
    _check_seed_at(the_plan, seed_at)
    probes = {}
    for e in the_plan.layers:
        if e.folded_into is not None:
            continue
        out_shape = the_plan.layers[e.fold].out_shape if e.fold is not None else e.out_shape
        out_probe = tuple(jnp.zeros(s, x.dtype) for s in out_shape) if e.multi_output else jnp.zeros(out_shape, x.dtype)
        probes[e.index] = (tuple(jnp.zeros(s, x.dtype) for s in e.in_shapes), out_probe)
    f = _forward(model, variables, the_plan, composite, seed_at)
    out, vjp = jax.vjp(lambda xx, pr: f(xx, pr, None), x, probes)
    rx, rp = vjp(_output_relevance(output_relevance, out, seed_at))
    trace = {}
    for e in the_plan.layers:
        if e.index not in rp:
            continue
        rin, rout = rp[e.index]
        key = e.name if e.name not in trace else f"{e.name}#{e.index}"
        trace[key] = LayerRelevance(
            name=e.name,
            kind=e.kind,
            rule=e.rule,
            folded=the_plan.layers[e.fold].name if e.fold is not None else None,
            inputs=tuple(rin),
            output=rout,
        )
    return rx, trace

