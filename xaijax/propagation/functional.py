"""Relevance rules for the functional operations of a forward pass, keyed by JAX primitive.

The engine (:mod:`xaijax.propagation.engine`) attaches rules to *layer modules* by intercepting
their calls. Models also compute between layers with plain functions, as Flax's own examples
do: ``nn.relu(x)``, ``nn.max_pool(...)``, ``nn.avg_pool(...)``, ``jnp.mean(x, axis=(1, 2))``, a
residual ``residual + y``, a normalisation ``(x - mean) / std`` inside the model. Those calls
leave no module behind; they are JAX primitives in the traced program. This module gives each
of them a rule.

How: the forward pass, with its intercepted layers already wrapped in their rules' custom VJPs
(opaque ``custom_vjp_call`` equations), is traced to a jaxpr and evaluated again equation by
equation. An equation whose inputs do not depend on the model input is a constant and runs as
is; every other equation is classified by its primitive:

=============  ===================================================  ==============================
class          primitives                                           rule
=============  ===================================================  ==============================
``layer``      ``custom_vjp_call`` (the engine's layer wrappers,      their own
               or a custom VJP of the user's)
``relu``       ``jax.nn.relu`` / ``nn.relu``, ``max(x, 0)``           the composite's ``relu`` rule
``maxpool``    ``reduce_window_max`` (``nn.max_pool``), ``reduce_max``  the composite's ``maxpool`` rule
``avgpool``    ``reduce_window_sum`` (``nn.avg_pool``), ``reduce_sum``  the composite's ``avgpool`` rule
               (``jnp.mean``, ``jnp.sum``)                            (z-rule by default)
``add``        ``add`` / ``sub`` of two values that depend on the     the composite's ``add`` rule
               input through different paths (residual sums)          (z-rule by default)
``bias``       a constant added to an activation (a position           the composite's ``add`` rule
               embedding, ``h + b``)                                  (z-rule: it absorbs its share)
``scale``      ``mul`` / ``div`` by a constant, ``neg``,                :class:`~xaijax.propagation.rules.Pass`
               ``convert_element_type``; a constant added to the      (relevance unchanged)
               model input itself (an in-model normalisation) or
               inside an element-wise activation (``1 + erf(...)``)
``activation`` an element-wise function of one value (``tanh``,       the composite's ``activation``
               ``exp``, ``erf``, ``logistic``, ``integer_pow``, ...:   rule (identity by default:
               ``nn.gelu``, ``nn.silu``, ``nn.sigmoid``, ...)          AttnLRP's rule)
``merge``      a sum or product of two values that come from the      :class:`ToFirst`: the whole
               same value by element-wise steps (inside GELU:         activation passes its relevance
               ``x * Phi(x)``)                                        back unchanged
``matmul``     ``dot_general`` of two activations (``q.k``,           the composite's ``matmul`` rule
               ``attention.v`` in ``nn.dot_product_attention``), a    (AttnLRP's uniform rule by
               product of two activations (a gate)                    default); the attention
                                                                      probabilities come first
``softmax``    ``exp(x - stop_gradient(max x)) / sum(...)``           the composite's ``softmax``
               (``jax.nn.softmax``, recognised as one operation)       rule (AttnLRP's by default)
``move``       reshape, transpose, broadcast, squeeze, slice, gather,  the ordinary derivative
               concatenate, pad, copy, ... (re-arrangements)           (exact for re-arrangements)
``call``       ``jit`` / ``pjit``, other ``custom_jvp_call``          their equations, classified
=============  ===================================================  ==============================

``scale`` is the z-rule of ``x -> a * x``: all of the relevance goes back to ``x`` (the gradient
would scale it by ``a``). A constant offset on the model input itself (reached from the input by
re-arrangements and scalings only) is the input's reference point (an in-model normalisation
``(x - mean) / std``), not a bias: relevance passes. A constant added to any other activation is
a bias, as in a layer, and gets the z-rule of the sum (the zoo's ``Add`` of a position
embedding does the same). ``avgpool`` is applied to the *sum* (``nn.avg_pool`` and ``jnp.mean`` divide by the
window size afterwards, a ``scale``): the z-rule splits a sum in proportion to its terms, as the
zoo's pooling layers do, so a model written with functions and the same model written with
the zoo's layers get the same relevance (tested for a Flax-example ResNet and for a ViT
written with ``nn.LayerNorm``, ``nn.MultiHeadDotProductAttention`` and ``nn.gelu``).

Any other primitive on the input's path (a ``dot_general`` with a weight outside a layer
module, ``cumsum``, ``sort``, control flow, ...) has no rule: the plan lists every such
operation with its module path, and a model puts the computation in a ``flax.linen`` module
and maps the module's type to a rule (``Composite(types={MyLayer: rules.Epsilon(0.0)})``).

Operation names are ``<module path>:<primitive>`` from the equations' name stacks (Flax
records each module call there), e.g. ``layer1.0:add`` or ``:reduce_sum`` at the root.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from xaijax.propagation.composites import Composite
from xaijax.propagation.rules import LayerView, Pass, Rule

__all__ = ["FunctionalOp", "Functional", "ToFirst", "analyse", "evaluate", "opaque", "rule_for", "composite_kind", "CLASSES"]

Array = jax.Array

#: Every class an operation on the input's path can have (see the module docstring).
CLASSES = ("relu", "maxpool", "avgpool", "add", "bias", "scale", "activation", "merge", "matmul", "softmax")

_MOVE = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "dynamic_slice",
        "gather",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
        "reduce_precision",
        "optimization_barrier",
    }
)
_POOL = {"reduce_window_max": "maxpool", "reduce_max": "maxpool", "reduce_window_sum": "avgpool", "reduce_sum": "avgpool"}
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_PASS = Pass()
_NAME = re.compile(r"[A-Za-z0-9_]+")


class FunctionalOp:
    """Marker type of functional operations in ``Composite.rule_for`` (``types`` never match it)."""


@dataclasses.dataclass(frozen=True)
class Functional:
    """One functional operation on the input's path and its rule.

    Attributes:
      name: ``<module path>:<primitive>`` (``#k`` appended from the second occurrence on).
      primitive: the JAX primitive.
      kind: one of :data:`CLASSES`.
      rule: the rule its backward pass applies.
      in_shapes, out_shape: shapes of the operands on the input's path and of the output.
    """

    name: str
    primitive: str
    kind: str
    rule: Rule
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]


# ------------------------------------------------------------------------ classification

#: element-wise functions of one operand (a region of them is one activation, e.g. GELU, SiLU)
_UNARY = frozenset(
    {
        "tanh", "exp", "exp2", "log", "log1p", "expm1", "logistic", "erf", "erfc", "erf_inv", "integer_pow",
        "square", "sqrt", "rsqrt", "cbrt", "abs", "sin", "cos", "tan", "atan", "sinh", "cosh", "asinh", "acosh",
        "atanh", "asin", "acos",
    }
)
#: element-wise functions of two operands
_BINARY = frozenset({"mul", "div", "add", "sub", "max", "min", "pow", "atan2", "add_any"})
#: operations whose output carries no relevance (comparisons, rounding, indices)
_CUT = frozenset(
    {
        "stop_gradient", "gt", "lt", "ge", "le", "eq", "ne", "and", "or", "not", "xor", "sign", "floor", "ceil",
        "round", "argmax", "argmin", "is_finite", "iota", "random_bits", "random_wrap", "random_unwrap",
    }
)


@dataclasses.dataclass(frozen=True)
class ToFirst(Rule):
    """All relevance to the first operand: the inner products and sums of one element-wise
    activation (``x * Phi(x)`` in GELU, ``x + c x**3`` inside it) pass the activation's
    relevance back to ``x`` unchanged -- AttnLRP's identity rule for the whole activation."""

    def backward(self, layer, xs, out, R):
        return (R.astype(xs[0].dtype),) + tuple(jnp.zeros_like(x) for x in xs[1:])


_TO_FIRST = ToFirst()
#: classes whose rule is fixed (not the composite's)
_FIXED: dict[str, Rule] = {"scale": _PASS, "merge": _TO_FIRST}
#: the composite kind whose rule a class takes ("merge" is part of an activation, "bias" a sum)
_KIND = {"merge": "activation", "bias": "add"}


def _scope(eqn: Any, prefix: str | None) -> str:
    """Dotted module path of an equation; ``prefix``: the enclosing call's path (None at the top)."""
    stack = str(eqn.source_info.name_stack).split("/")
    # module names only: drop transformation and function scopes (jnp.einsum's spec, "jvp(...)")
    parts = [p for p in stack if p and _NAME.fullmatch(p)]
    if prefix is None:  # Flax's name stack starts with the root module's class name; the zoo's names omit it
        return ".".join(parts[1:]) if stack and stack[0] and parts and parts[0] == stack[0] else ".".join(parts)
    return ".".join([prefix] * bool(prefix) + parts)


def _is_relu_call(eqn: Any) -> bool:
    if eqn.primitive.name != "custom_jvp_call":
        return False
    inner = eqn.params["call_jaxpr"].jaxpr.eqns
    return len(inner) == 1 and inner[0].primitive.name in _CALLS and inner[0].params.get("name") == "relu"


def _inner(eqn: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a call-like equation."""
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _classify(eqn: Any, on_path: Sequence[bool], known: Sequence[Any], roots: Sequence[Any], tags: Sequence[str | None] = ()) -> str:
    """The class of an equation with at least one operand on the input's path.

    Returns one of :data:`CLASSES`, ``"merge"`` (a binary step inside one element-wise
    activation), ``"layer"``, ``"move"``, ``"call"``, ``"const"`` (the output carries no
    relevance) or ``"unsupported"``. ``known``: the concrete value of each constant operand
    where it is known (literals), else None; ``roots``: each path operand's element-wise root
    (the value an element-wise chain started from), else None; ``tags``: each operand's
    provenance, ``"input"`` (the model input, re-arranged or scaled) or ``"act"`` (inside an
    element-wise activation), else None.
    """
    p = eqn.primitive.name
    out_shape = _shape(eqn.outvars[0]) if eqn.outvars else ()
    path_shapes = [_shape(v) for v, f in zip(eqn.invars, on_path) if f]
    elementwise = all(s == out_shape for s in path_shapes)
    if p in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
        return "layer"
    if _is_relu_call(eqn):
        return "relu"
    if p in _CALLS or p == "custom_jvp_call" or p in ("checkpoint", "remat"):
        return "call"
    if p in _CUT:
        return "const"
    if p in _MOVE:
        return "move"
    if p == "select_n":
        return "move" if not on_path[0] else "unsupported"
    if p in ("convert_element_type", "neg"):
        return "scale"
    if p in _POOL:
        return _POOL[p]
    if p == "dot_general":
        return "matmul" if all(on_path) else "unsupported"  # a weight outside a layer module: no rule
    if p in _UNARY and sum(on_path) == 1 and elementwise:
        return "activation"
    if p == "max" and len(on_path) == 2 and sum(on_path) == 1:
        value = known[on_path.index(False)]
        if value is not None and np.all(np.asarray(value) == 0):
            return "relu"
        return "activation" if elementwise else "unsupported"  # max(x, c): an element-wise activation
    if p in _BINARY and len(on_path) == 2:
        if not all(on_path):
            if p in ("div", "pow") and not on_path[0]:  # c / x, c ** x: element-wise functions of x
                return "activation" if elementwise else "unsupported"
            if p in ("max", "min", "atan2", "pow"):
                return "activation" if elementwise else "unsupported"
            if p in ("add", "sub", "add_any") and next(t for t, f in zip(tags, on_path) if f) not in ("input", "act"):
                return "bias"  # a constant added to an activation: a bias (position embedding)
            return "scale"
        if elementwise and roots[0] is not None and roots[0] == roots[1]:
            return "merge"  # both operands come from the same value by element-wise steps
        if p in ("add", "sub", "add_any"):
            return "add"
        if p == "mul":
            return "matmul"  # a product of two activations (a gate): the bilinear rule
    return "unsupported"


def _softmax_patterns(eqns: Sequence[Any]) -> tuple[dict[int, tuple[Any, int]], set[int]]:
    """Softmaxes written as ``exp(x - stop_gradient(max x)) / sum(exp(...))`` (``jax.nn.softmax``).

    Returns ``({id(div equation): (x, axis)}, {ids of the equations inside those patterns})``;
    a pattern counts only if its inner values are used nowhere else.
    """
    producer = {v: e for e in eqns for v in e.outvars}
    uses: dict[Any, int] = {}
    for e in eqns:
        for v in e.invars:
            if not isinstance(v, jcore.Literal):
                uses[v] = uses.get(v, 0) + 1
    found: dict[int, tuple[Any, int]] = {}
    inside: set[int] = set()
    for e in eqns:
        if e.primitive.name != "div" or any(isinstance(v, jcore.Literal) for v in e.invars):
            continue
        num, den = e.invars
        chain = []
        d = producer.get(den)
        while d is not None and d.primitive.name in ("broadcast_in_dim", "reshape") and uses.get(d.outvars[0]) == 1:
            chain.append(d)
            d = producer.get(d.invars[0])
        if d is None or d.primitive.name != "reduce_sum" or d.invars[0] is not num or len(d.params["axes"]) != 1:
            continue
        ex = producer.get(num)
        if ex is None or ex.primitive.name != "exp" or uses.get(num) != 2 or uses.get(d.outvars[0]) != 1:
            continue
        x = ex.invars[0]
        shift = producer.get(x)
        inner = [ex, d, *chain]
        stop = None if shift is None or isinstance(shift.invars[1], jcore.Literal) else producer.get(shift.invars[1])
        if (
            shift is not None
            and shift.primitive.name == "sub"
            and (stop is None or stop.primitive.name == "stop_gradient")
            and uses.get(x) == 1
            and _shape(shift.invars[0]) == _shape(x)
        ):
            inner.append(shift)
            x = shift.invars[0]
            # the max that the shift subtracts (reduce_max -> max(., -inf) -> broadcast -> stop_gradient)
            q = stop
            while q is not None and q.primitive.name in ("stop_gradient", "broadcast_in_dim", "reshape", "max", "reduce_max"):
                if any(uses.get(o) != 1 for o in q.outvars):
                    break
                inner.append(q)
                if q.primitive.name == "reduce_max":
                    break
                q = next((producer.get(v) for v in q.invars if not isinstance(v, jcore.Literal)), None)
        if isinstance(x, jcore.Literal):
            continue
        axis = int(d.params["axes"][0])
        found[id(e)] = (x, axis)
        inside.update(id(q) for q in inner)
    return found, inside


# ------------------------------------------------------------------------ evaluation


class _Context:
    def __init__(self, composite: Composite | None, apply_rules: bool):
        self.composite = composite
        self.apply_rules = apply_rules
        self.ops: list[Functional] = []
        self.unsupported: list[str] = []
        self.counts: dict[str, int] = {}

    def name(self, scope: str, primitive: str) -> str:
        base = f"{scope}:{primitive}"
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    def rule(self, name: str, kind: str) -> Rule:
        return rule_for(self.composite, name, kind)


def rule_for(composite: Composite | None, name: str, kind: str) -> Rule:
    """The rule of a functional operation of class ``kind`` named ``name`` under ``composite``:
    fixed for ``scale`` (Pass) and ``merge`` (:class:`ToFirst`), else the composite's rule of
    that layer kind (name patterns first), else its default."""
    if kind in _FIXED:
        return _FIXED[kind]
    if composite is None:
        composite = Composite()
    rule = composite.rule_for(name, composite_kind(kind), FunctionalOp)
    return _PASS if rule is None else rule


def composite_kind(cls: str) -> str:
    """The layer kind (:data:`xaijax.propagation.composites.KINDS`) whose rules a class takes."""
    return _KIND.get(cls, cls)


def _bind(eqn: Any, args: Sequence[Any]) -> Any:
    """Evaluate one equation on ``args`` (as ``jax.core.eval_jaxpr`` does)."""
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


def _with_rule(rule: Rule, view: Callable[[Callable[..., Array]], LayerView], fn: Callable[..., Array], consts: tuple, xs: tuple) -> Array:
    """``fn(consts, *xs)`` whose backward pass applies ``rule`` (``consts`` get zero cotangents);
    ``view(f)`` is the :class:`LayerView` of the function ``f(*xs)``."""

    @jax.custom_vjp
    def op(consts, *xs):
        return fn(consts, *xs)

    def fwd(consts, *xs):
        out = fn(consts, *xs)
        return out, (consts, xs, out)

    def bwd(res, R):
        consts, xs, out = res
        rin = rule.backward(view(lambda *a: fn(consts, *a)), xs, out, R)
        rin = tuple(jnp.asarray(r).astype(x.dtype) for r, x in zip(rin, xs))
        return (jax.tree_util.tree_map(jnp.zeros_like, consts),) + rin

    op.defvjp(fwd, bwd)
    return op(consts, *xs)


def _live(jaxpr: Any) -> list[Any]:
    """The equations whose outputs are used (dead code, e.g. the plain convolution whose
    BatchNorm the engine folds into one wrapped layer, is skipped)."""
    used = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
            live.append(eqn)
            used.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live[::-1]


def _eval(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    on_path: Sequence[bool],
    ctx: _Context,
    prefix: str | None,
    arg_roots: Sequence[Any] | None = None,
    arg_tags: Sequence[str | None] | None = None,
) -> tuple[list[Any], list[bool], list[Any], list[str | None]]:
    env: dict[Any, Any] = {}
    path: dict[Any, bool] = {}
    known: dict[Any, Any] = {}
    root: dict[Any, Any] = {}
    tag: dict[Any, str | None] = {}  # "input": the model input re-arranged or scaled; "act": inside an activation
    probs: set[Any] = set()  # softmax outputs (attention probabilities), re-arranged or cast

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def is_path(v):
        return False if isinstance(v, jcore.Literal) else path.get(v, False)

    def known_value(v):
        return v.val if isinstance(v, jcore.Literal) else known.get(v)

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    probe: set[Any] = set()  # zero probes the engine adds to read relevance (ordinary derivative)
    for i, (v, a, p) in enumerate(zip(jaxpr.invars, args, on_path)):
        env[v] = a
        path[v] = bool(p)
        root[v] = arg_roots[i] if arg_roots is not None and arg_roots[i] is not None else v
        if isinstance(p, str) and p == "probe":
            probe.add(v)
        tag[v] = arg_tags[i] if arg_tags is not None else ("input" if p is True else None)

    eqns = _live(jaxpr)
    softmax_at, inside = _softmax_patterns(eqns)

    for eqn in eqns:
        ins = [read(v) for v in eqn.invars]
        flags = [is_path(v) for v in eqn.invars]
        multiple = eqn.primitive.multiple_results
        out_roots: list[Any] = [None] * len(eqn.outvars)
        out_tags: list[str | None] = [None] * len(eqn.outvars)
        cls = None
        path_vars = [v for v, f in zip(eqn.invars, flags) if f]
        if path_vars and all(v in probe for v in path_vars):  # a probe, cast or broadcast
            out = _bind(eqn, ins)
            outs = list(out) if multiple else [out]
            out_flags = [True] * len(outs)
            probe.update(eqn.outvars)
        elif eqn.primitive.name in ("add", "add_any") and len(path_vars) == 2 and any(v in probe for v in path_vars):
            out = _bind(eqn, ins)  # value + probe: the ordinary derivative hands the probe the relevance there
            outs = [out]
            out_flags = [True]
            out_roots = [root.get(next(v for v in path_vars if v not in probe))]
            out_tags = [tag.get(next(v for v in path_vars if v not in probe))]
        elif not any(flags) or id(eqn) in inside:
            out = _bind(eqn, ins)
            outs = list(out) if multiple else [out]
            out_flags = [any(flags)] * len(outs)
            if not any(flags) and eqn.primitive.name in ("broadcast_in_dim", "convert_element_type"):
                if known_value(eqn.invars[0]) is not None:
                    known[eqn.outvars[0]] = known_value(eqn.invars[0])
        else:
            in_roots = [root.get(v) if f else None for v, f in zip(eqn.invars, flags)]
            in_tags = [tag.get(v) if f else None for v, f in zip(eqn.invars, flags)]
            path_tags = {tag.get(v) for v in path_vars}
            same_tag = path_tags.pop() if len(path_tags) == 1 else None
            if id(eqn) in softmax_at:
                cls = "softmax"
            else:
                cls = _classify(eqn, flags, [known_value(v) for v in eqn.invars], in_roots, in_tags)
            scope = _scope(eqn, prefix)
            if cls == "call":
                sub, sub_consts = _inner(eqn)
                n_extra = len(ins) - len(sub.invars)  # custom_jvp_call / closed_call carry no extras
                outs, out_flags, out_roots, out_tags = _eval(
                    sub, sub_consts, ins[n_extra:], flags[n_extra:], ctx, scope, in_roots[n_extra:], in_tags[n_extra:]
                )
            elif cls in ("layer", "move", "const", "unsupported"):
                if cls == "unsupported":
                    ctx.unsupported.append(f"{scope or '<root>'}: {eqn.primitive.name}")
                out = _bind(eqn, ins)
                outs = list(out) if multiple else [out]
                out_flags = [cls != "const"] * len(outs)
                if cls == "move":
                    out_tags = [same_tag] * len(outs)
            else:
                if len(eqn.outvars) != 1:  # pragma: no cover - the classes above have one output
                    raise RuntimeError(f"functional operation {eqn.primitive.name!r} has {len(eqn.outvars)} outputs")
                label = {"custom_jvp_call": "relu", "div": "softmax"}.get(eqn.primitive.name, eqn.primitive.name)
                name = ctx.name(scope, label if cls in ("relu", "softmax") else eqn.primitive.name)
                rule = ctx.rule(name, cls)
                axis = None
                if cls == "softmax":
                    x_var, axis = softmax_at[id(eqn)]
                    xs, cs = (read(x_var),), ()

                    def fn(cs_, x, _axis=axis):
                        return jax.nn.softmax(x, axis=_axis)

                else:
                    var_idx = tuple(i for i, f in enumerate(flags) if f)
                    if cls == "matmul" and len(var_idx) == 2 and eqn.invars[var_idx[1]] in probs and eqn.invars[var_idx[0]] not in probs:
                        var_idx = var_idx[::-1]  # attention probabilities first, as in the zoo's MatMul()(attn, v)
                    const_idx = tuple(i for i, f in enumerate(flags) if not f)
                    xs = tuple(ins[i] for i in var_idx)
                    cs = tuple(jnp.asarray(ins[i]) for i in const_idx)

                    def fn(cs_, *xs_, _eqn=eqn, _var=var_idx, _const=const_idx, _n=len(ins), _multiple=multiple):
                        full: list[Any] = [None] * _n
                        for i, c in zip(_const, cs_):
                            full[i] = c
                        for i, x in zip(_var, xs_):
                            full[i] = x
                        out = _bind(_eqn, full)
                        return out[0] if _multiple else out

                out_shape = _shape(eqn.outvars[0])
                kind = composite_kind(cls)
                ctx.ops.append(Functional(name, eqn.primitive.name, cls, rule, tuple(tuple(x.shape) for x in xs), out_shape))
                if ctx.apply_rules:
                    rule.check(name, kind, [tuple(x.shape) for x in xs], out_shape)

                    def view(f, _name=name, _kind=kind, _axis=axis):
                        return LayerView(_name, _kind, f, axis=_axis)

                    out = _with_rule(rule, view, fn, cs, xs)
                else:
                    out = fn(cs, *xs)
                outs, out_flags = [out], [True]
                path_root = next(r for r in in_roots if r is not None)
                if cls in ("activation", "merge"):  # element-wise: the chain's root carries on
                    out_roots, out_tags = [path_root], ["act"]
                elif cls == "scale":
                    out_tags = [same_tag]
                    if all(tuple(x.shape) == out_shape for x in xs):
                        out_roots = [path_root]
        if cls == "softmax" or (cls in ("move", "scale") and any(v in probs for v in eqn.invars if not isinstance(v, jcore.Literal))):
            probs.update(eqn.outvars)
        for v, o, f, r, t in zip(eqn.outvars, outs, out_flags, out_roots, out_tags):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = o
            path[v] = f
            if f:
                root[v] = r if r is not None else v
                tag[v] = t
    outs_ = jaxpr.outvars
    return [read(v) for v in outs_], [is_path(v) for v in outs_], [root.get(v) for v in outs_], [tag.get(v) for v in outs_]


def opaque(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as one opaque ``custom_vjp_call`` (ordinary derivative): how the plan's
    trace hides a layer's inner operations, as the rules' wrappers do in the forward pass."""

    @jax.custom_vjp
    def call(*a):
        return fn(*a)

    def fwd(*a):
        return fn(*a), a

    def bwd(a, ct):
        return jax.vjp(fn, *a)[1](ct)

    call.defvjp(fwd, bwd)
    return call(*args)


def _no_rule_error(unsupported: Sequence[str]) -> ValueError:
    listed = ", ".join(dict.fromkeys(unsupported))
    return ValueError(
        f"no propagation rule for operation(s) {listed}. Functional operations with a rule: "
        "nn.relu / max(x, 0), max and sum pooling (nn.max_pool, nn.avg_pool, jnp.max, jnp.mean, jnp.sum), "
        "sums of two activations, constants added or multiplied, element-wise activations (nn.gelu, nn.silu, "
        "jnp.tanh, ...), jax.nn.softmax, products of two activations (q.k, attention.v) and re-arrangements "
        "(see xaijax.propagation.functional). Put any other computation in a flax.linen Module and give "
        "its type a rule: Composite(types={MyLayer: rules.Epsilon(0.0)}) (rules without weights: "
        "Epsilon, Vjp, Pass)."
    )


def analyse(closed: Any, on_path: Sequence[bool], composite: Composite | None = None) -> tuple[Functional, ...]:
    """The functional operations on the input's path in a traced program, with their rules.

    Args:
      closed: a ``ClosedJaxpr`` (``jax.make_jaxpr``) in which layers with rules are opaque
        ``custom_vjp_call`` equations (see :func:`opaque`).
      on_path: for each flat input, whether relevance flows through it (the model input,
        probes) or it is a constant (variables).
      composite: assigns the rules (None: no rules, classes only).

    Raises:
      ValueError: operations with no rule, all listed with their module paths.
    """
    ctx = _Context(composite, apply_rules=False)
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    jax.eval_shape(lambda *a: _eval(closed.jaxpr, closed.consts, a, on_path, ctx, None)[0], *args)
    if ctx.unsupported:
        raise _no_rule_error(ctx.unsupported)
    return tuple(ctx.ops)


def evaluate(fn: Callable[..., Any], composite: Composite, on_path: Callable[[Any], Any]) -> Callable[..., Any]:
    """``fn`` with the functional operations on the input's path carrying their rules.

    ``fn(*args)`` is traced to a jaxpr (its layers with rules already opaque custom VJPs) and
    evaluated again equation by equation (see the module docstring). ``on_path(args)`` gives,
    for ``args``' pytree, a matching pytree of flags: True where relevance flows, False for
    constants, ``"probe"`` for zero arrays added to values to read the relevance arriving
    there (their sums keep the ordinary derivative, which hands each probe that relevance).
    """

    def wrapped(*args):
        flat, treedef = jax.tree_util.tree_flatten(args)
        flags = jax.tree_util.tree_leaves(on_path(args))
        if len(flags) != len(flat):  # pragma: no cover - a programming error in the caller
            raise RuntimeError("on_path must give one flag per array argument")
        closed, out_shape = jax.make_jaxpr(lambda *f: fn(*jax.tree_util.tree_unflatten(treedef, f)), return_shape=True)(*flat)
        ctx = _Context(composite, apply_rules=True)
        outs = _eval(closed.jaxpr, closed.consts, flat, flags, ctx, None)[0]
        if ctx.unsupported:  # pragma: no cover - the plan raises first
            raise _no_rule_error(ctx.unsupported)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
