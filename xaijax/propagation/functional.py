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

============  =====================================================  ==============================
class         primitives                                              rule
============  =====================================================  ==============================
``layer``     ``custom_vjp_call`` (the engine's layer wrappers,        their own
              or a custom VJP of the user's)
``relu``      ``jax.nn.relu`` / ``nn.relu``, ``max(x, 0)``             the composite's ``relu`` rule
``maxpool``   ``reduce_window_max`` (``nn.max_pool``), ``reduce_max``  the composite's ``maxpool`` rule
``avgpool``   ``reduce_window_sum`` (``nn.avg_pool``), ``reduce_sum``  the composite's ``avgpool`` rule
              (``jnp.mean``, ``jnp.sum``)                              (z-rule by default)
``add``       ``add`` / ``sub`` of two values that both depend on      the composite's ``add`` rule
              the input (residual sums)                                (z-rule by default)
``scale``     ``add`` / ``sub`` / ``mul`` / ``div`` with one constant  :class:`~xaijax.propagation.rules.Pass`
              operand, ``neg``, ``convert_element_type``               (relevance unchanged)
``move``      reshape, transpose, broadcast, squeeze, slice, gather,   the ordinary derivative
              concatenate, pad, copy, ... (re-arrangements)            (exact for re-arrangements)
``call``      ``jit`` / ``pjit``, other ``custom_jvp_call``            their equations, classified
============  =====================================================  ==============================

``scale`` is the z-rule of an element-wise affine map with constant coefficients: ``a * x``
gives back all of its relevance to ``x`` (the gradient would scale it by ``a``), and a constant
offset is the input's reference point (an in-model normalisation), not a bias that absorbs
relevance. ``avgpool`` is applied to the *sum* (``nn.avg_pool`` and ``jnp.mean`` divide by the
window size afterwards, a ``scale``): the z-rule splits a sum in proportion to its terms, as the
zoo's pooling layers do, so a model written with functions and the same model written with
the zoo's layers get the same relevance.

Any other primitive on the input's path (``exp``, ``tanh``, a product of two activations, a
``dot_general`` with a weight outside a layer module, control flow, ...) has no rule: the
plan lists every such operation with its module path, and a model puts the computation in a
``flax.linen`` module and maps the module's type to a rule
(``Composite(types={MyLayer: rules.Epsilon(0.0)})``).

Operation names are ``<module path>:<primitive>`` from the equations' name stacks (Flax
records each module call there), e.g. ``layer1.0:add`` or ``:reduce_sum`` at the root.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from xaijax.propagation.composites import Composite
from xaijax.propagation.rules import LayerView, Pass, Rule

__all__ = ["FunctionalOp", "Functional", "analyse", "evaluate", "opaque", "CLASSES"]

Array = jax.Array

#: Every class an operation on the input's path can have (see the module docstring).
CLASSES = ("relu", "maxpool", "avgpool", "add", "scale")

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
_AFFINE = frozenset({"add", "sub", "mul", "div", "add_any"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_PASS = Pass()


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


def _scope(eqn: Any, prefix: str | None) -> str:
    """Dotted module path of an equation; ``prefix``: the enclosing call's path (None at the top)."""
    parts = [p for p in str(eqn.source_info.name_stack).split("/") if p]
    if prefix is None:  # Flax's name stack starts with the root module's class name; the zoo's names omit it
        return ".".join(parts[1:])
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


def _classify(eqn: Any, on_path: Sequence[bool], known: Sequence[Any]) -> str:
    """The class of an equation with at least one operand on the input's path.

    Returns one of :data:`CLASSES`, ``"layer"``, ``"move"``, ``"call"``, ``"const"`` (an
    operation that cuts the path, e.g. ``stop_gradient``) or ``"unsupported"``. ``known``:
    the concrete value of each constant operand where it is known (literals), else None.
    """
    p = eqn.primitive.name
    if p in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
        return "layer"
    if _is_relu_call(eqn):
        return "relu"
    if p in _CALLS or p == "custom_jvp_call" or p in ("checkpoint", "remat"):
        return "call"
    if p == "stop_gradient":
        return "const"
    if p in _MOVE:
        return "move"
    if p == "select_n":
        return "move" if not on_path[0] else "unsupported"
    if p == "convert_element_type" or p == "neg":
        return "scale"
    if p in _POOL:
        return _POOL[p]
    if p == "max" and len(on_path) == 2 and sum(on_path) == 1:
        value = known[on_path.index(False)]
        if value is not None and np.all(np.asarray(value) == 0):
            return "relu"
        return "unsupported"
    if p in _AFFINE and len(on_path) == 2:
        if all(on_path):
            return "add" if p in ("add", "sub", "add_any") else "unsupported"
        if p == "div" and not on_path[0]:  # constant / activation
            return "unsupported"
        return "scale"
    return "unsupported"


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
        if kind == "scale" or self.composite is None:
            return _PASS
        rule = self.composite.rule_for(name, kind, FunctionalOp)
        return _PASS if rule is None else rule


def _bind(eqn: Any, args: Sequence[Any]) -> Any:
    """Evaluate one equation on ``args`` (as ``jax.core.eval_jaxpr`` does)."""
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


def _with_rule(rule: Rule, name: str, kind: str, fn: Callable[..., Array], consts: tuple, xs: tuple) -> Array:
    """``fn(consts, *xs)`` whose backward pass applies ``rule`` (``consts`` get zero cotangents)."""

    @jax.custom_vjp
    def op(consts, *xs):
        return fn(consts, *xs)

    def fwd(consts, *xs):
        out = fn(consts, *xs)
        return out, (consts, xs, out)

    def bwd(res, R):
        consts, xs, out = res
        view = LayerView(name, kind, lambda *a: fn(consts, *a))
        rin = rule.backward(view, xs, out, R)
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


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], on_path: Sequence[bool], ctx: _Context, prefix: str | None) -> tuple[list[Any], list[bool]]:
    env: dict[Any, Any] = {}
    path: dict[Any, bool] = {}
    known: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def is_path(v):
        return False if isinstance(v, jcore.Literal) else path.get(v, False)

    def known_value(v):
        return v.val if isinstance(v, jcore.Literal) else known.get(v)

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, p in zip(jaxpr.invars, args, on_path):
        env[v] = a
        path[v] = bool(p)

    for eqn in _live(jaxpr):
        ins = [read(v) for v in eqn.invars]
        flags = [is_path(v) for v in eqn.invars]
        multiple = eqn.primitive.multiple_results
        if not any(flags):
            out = _bind(eqn, ins)
            outs = list(out) if multiple else [out]
            out_flags = [False] * len(outs)
            if eqn.primitive.name in ("broadcast_in_dim", "convert_element_type") and known_value(eqn.invars[0]) is not None:
                known[eqn.outvars[0]] = known_value(eqn.invars[0])
        else:
            cls = _classify(eqn, flags, [known_value(v) for v in eqn.invars])
            scope = _scope(eqn, prefix)
            if cls == "call":
                sub, sub_consts = _inner(eqn)
                n_extra = len(ins) - len(sub.invars)  # custom_jvp_call / closed_call carry no extras
                outs, out_flags = _eval(sub, sub_consts, ins[n_extra:], flags[n_extra:], ctx, scope)
            elif cls in ("layer", "move"):
                out = _bind(eqn, ins)
                outs = list(out) if multiple else [out]
                out_flags = [True] * len(outs)
            elif cls == "const":
                out = _bind(eqn, ins)
                outs = list(out) if multiple else [out]
                out_flags = [False] * len(outs)
            elif cls == "unsupported":
                ctx.unsupported.append(f"{scope or '<root>'}: {eqn.primitive.name}")
                out = _bind(eqn, ins)
                outs = list(out) if multiple else [out]
                out_flags = [True] * len(outs)
            else:
                name = ctx.name(scope, "relu" if eqn.primitive.name == "custom_jvp_call" else eqn.primitive.name)
                rule = ctx.rule(name, cls)
                var_idx = tuple(i for i, f in enumerate(flags) if f)
                const_idx = tuple(i for i, f in enumerate(flags) if not f)
                xs = tuple(ins[i] for i in var_idx)
                cs = tuple(jnp.asarray(ins[i]) for i in const_idx)
                if len(eqn.outvars) != 1:  # pragma: no cover - the classes above have one output
                    raise RuntimeError(f"functional operation {name!r} has {len(eqn.outvars)} outputs")

                def fn(cs_, *xs_, _eqn=eqn, _var=var_idx, _const=const_idx, _n=len(ins), _multiple=multiple):
                    full: list[Any] = [None] * _n
                    for i, c in zip(_const, cs_):
                        full[i] = c
                    for i, x in zip(_var, xs_):
                        full[i] = x
                    out = _bind(_eqn, full)
                    return out[0] if _multiple else out

                out_aval = eqn.outvars[0].aval
                ctx.ops.append(
                    Functional(name, eqn.primitive.name, cls, rule, tuple(tuple(x.shape) for x in xs), tuple(out_aval.shape))
                )
                if ctx.apply_rules:
                    rule.check(name, cls, [tuple(x.shape) for x in xs], tuple(out_aval.shape))
                    out = _with_rule(rule, name, cls, fn, cs, xs)
                else:
                    out = fn(cs, *xs)
                outs, out_flags = [out], [True]
        for v, o, f in zip(eqn.outvars, outs, out_flags):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = o
            path[v] = f
    return [read(v) for v in jaxpr.outvars], [is_path(v) for v in jaxpr.outvars]


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
        "sums of two activations, element-wise affine maps with constants, and re-arrangements "
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
    for ``args``' pytree, a matching pytree of booleans: True where relevance flows.
    """

    def wrapped(*args):
        flat, treedef = jax.tree_util.tree_flatten(args)
        flags = jax.tree_util.tree_leaves(on_path(args))
        if len(flags) != len(flat):  # pragma: no cover - a programming error in the caller
            raise RuntimeError("on_path must give one flag per array argument")
        closed, out_shape = jax.make_jaxpr(lambda *f: fn(*jax.tree_util.tree_unflatten(treedef, f)), return_shape=True)(*flat)
        ctx = _Context(composite, apply_rules=True)
        outs, _ = _eval(closed.jaxpr, closed.consts, flat, flags, ctx, None)
        if ctx.unsupported:  # pragma: no cover - the plan raises first
            raise _no_rule_error(ctx.unsupported)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
