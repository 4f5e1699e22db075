"""Relevance rules of transformer layers: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP
(Ali et al., ICML 2022).

Notation: a layer maps inputs ``x`` (or two factors ``a``, ``b``) to ``z``; ``R`` is the
relevance at ``z``; ``s = R / (z + eps sign z)`` (``sign 0 = +1``; a denominator that is
exactly zero gives zero relevance). Rules see the layer through
:class:`~xaijax.propagation.rules.LayerView`.

========================  ========================================================================
:class:`LayerNormRule`    LayerNorm ``z = (x - mean x) r scale + bias``, ``r = 1/sqrt(var x + e)``:
                          the normaliser ``r`` is held constant (AttnLRP's identity rule on the
                          normalisation, the same as CP-LRP's LayerNorm rule) and the remaining
                          affine map gets the epsilon rule:
                          ``R_i = x_i sum_j (delta_ij - 1/D) r scale_j s_j``. Conserving for
                          ``bias = 0``, ``eps = 0``: ``sum_i R_i = sum_j (x_j - mean) r scale_j s_j
                          = sum_j R_j``.
:class:`SoftmaxRule`      AttnLRP's softmax rule (Proposition 3.1, deep Taylor decomposition at
                          ``x`` with the bias term kept): ``R_in_i = x_i (R_i - p_i sum_j R_j)``
                          with ``p = softmax(x)`` over the softmax axis; inputs at ``-inf``
                          (masked logits) count as 0, as in the authors' ``lxt``. No division, no
                          stabiliser. Not conserving: ``sum_i R_in_i = sum_i x_i R_i - (sum_i x_i
                          p_i) sum_j R_j`` (the bias term absorbs the rest).
:class:`BilinearUniform`  AttnLRP's rule for products of ``n`` factors, each entering linearly
                          (``q.k^T``, ``attention.v``; Proposition 3.3: epsilon rule on the sum,
                          uniform rule on each product): ``R_k = x_k J_k^T s / n``. By Euler's
                          theorem ``sum_k x_k J_k^T s = n z s``, so ``sum_k sum R_k = sum R``
                          for ``eps = 0``.
:class:`ConstantFactor`   CP-LRP's attention rule: factor ``index`` (the attention probabilities in
                          ``attention.v``) is held constant, so the layer is linear in the other
                          factor, which gets everything: ``R_v = v J_v^T s``, ``R_attn = 0``.
                          Conserving for ``eps = 0``.
:class:`Stop`             no relevance passes (zeros for every input): CP-LRP's softmax, so the
                          ``q.k`` path receives nothing.
========================  ========================================================================

Element-wise activations (GELU) use :class:`~xaijax.propagation.rules.Pass` (AttnLRP's
identity rule), token re-arrangements :class:`~xaijax.propagation.rules.Vjp`, residual sums
and averages ``Epsilon(0)`` (the z-rule), dense/convolution layers epsilon or gamma
(:mod:`xaijax.propagation.composites`: ``attnlrp``, ``cp_lrp``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide
from xaijax.propagation.rules import LayerView, Rule, _check_number, _stabilize

__all__ = ["LayerNormRule", "SoftmaxRule", "BilinearUniform", "ConstantFactor", "Stop"]

Array = jax.Array


def _require_kind(rule: Rule, name: str, kind: str, wanted: str, what: str) -> None:
    if kind != wanted:
        raise ValueError(f"rule {rule!r} applies to {what} layers (kind {wanted!r}); layer {name!r} is a {kind!r} layer")


def _one_input(rule: Rule, name: str, in_shapes) -> None:
    if len(in_shapes) != 1:
        raise ValueError(f"rule {rule!r} handles single-input layers; layer {name!r} has {len(in_shapes)} inputs")


@dataclasses.dataclass(frozen=True)
class LayerNormRule(Rule):
    """AttnLRP / CP-LRP LayerNorm rule: normaliser held constant, epsilon rule on the rest.

    ``R_i = x_i sum_j (delta_ij - 1/D) r scale_j R_j / (z_j + eps sign z_j)`` over the
    normalised axis (``D`` entries, ``r = 1/sqrt(var + e)`` of that row); computed as
    ``x * J_lin^T s`` with ``J_lin`` the Jacobian of the layer's ``linearized`` view.
    Conserving for a zero LayerNorm bias and ``eps = 0``. Applies to ``layernorm`` layers.
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_number("LayerNormRule eps", self.eps)

    def check(self, name, kind, in_shapes, out_shape):
        _require_kind(self, name, kind, "layernorm", "LayerNorm")
        _one_input(self, name, in_shapes)

    def backward(self, layer: LayerView, xs, out, R):
        if layer.linearized is None:  # pragma: no cover - guaranteed for kind "layernorm"
            raise ValueError(f"layer {layer.name!r} has no linearized view; {self!r} needs a LayerNorm")
        x = xs[0]
        s = safe_divide(R, _stabilize(out, self.eps)).astype(out.dtype)
        _, pull = jax.vjp(layer.linearized, x)
        return (x * pull(s)[0],)


@dataclasses.dataclass(frozen=True)
class SoftmaxRule(Rule):
    """AttnLRP's softmax rule: ``R_in = x * (R - p * sum_axis(R))``, ``p`` the softmax output.

    ``-inf`` inputs (masked positions) count as 0. Applies to ``softmax`` layers (the axis is
    the layer's). Not conserving (see the module docstring).
    """

    def check(self, name, kind, in_shapes, out_shape):
        _require_kind(self, name, kind, "softmax", "softmax")
        _one_input(self, name, in_shapes)

    def backward(self, layer: LayerView, xs, out, R):
        axis = -1 if layer.axis is None else layer.axis
        x = xs[0]
        x = jnp.where(jnp.isneginf(x), jnp.zeros((), x.dtype), x)
        R = R.astype(out.dtype)
        return (x * (R - out * R.sum(axis=axis, keepdims=True)),)


@dataclasses.dataclass(frozen=True)
class BilinearUniform(Rule):
    """AttnLRP's uniform rule for multilinear layers: ``R_k = x_k J_k^T (R / (z + eps sign z)) / n``.

    For a layer of ``n`` inputs that is linear in each input separately (the bilinear
    ``MatMul``: ``q.k^T`` and ``attention.v``; an element-wise product), every factor gets
    the same share of each product term. Conserving for ``eps = 0`` (Euler's theorem).
    With one input it is the epsilon rule.
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_number("BilinearUniform eps", self.eps)

    def backward(self, layer: LayerView, xs, out, R):
        s = safe_divide(R, _stabilize(out, self.eps)) / len(xs)
        _, pull = jax.vjp(layer.fn, *xs)
        return tuple(x * g for x, g in zip(xs, pull(s.astype(out.dtype))))


@dataclasses.dataclass(frozen=True)
class ConstantFactor(Rule):
    """CP-LRP's attention rule: input ``index`` held constant, the other factor gets everything.

    ``R_index = 0``; every other input ``k``: ``R_k = x_k J_k^T (R / (z + eps sign z))``.
    For ``attention.v`` (``MatMul()(attn, v)``, ``index=0``) that is the z/epsilon rule of the
    linear map ``v -> A v`` with the attention ``A`` fixed: conserving for ``eps = 0``.
    Layers with two inputs only.
    """

    index: int = 0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index not in (0, 1):
            raise ValueError(f"ConstantFactor index must be 0 or 1 (the factor held constant), got {self.index!r}")
        _check_number("ConstantFactor eps", self.eps)

    def check(self, name, kind, in_shapes, out_shape):
        if len(in_shapes) != 2:
            raise ValueError(f"rule {self!r} handles layers with two factors; layer {name!r} has {len(in_shapes)} inputs")

    def backward(self, layer: LayerView, xs, out, R):
        s = safe_divide(R, _stabilize(out, self.eps)).astype(out.dtype)
        _, pull = jax.vjp(layer.fn, *xs)
        grads = pull(s)
        return tuple(jnp.zeros_like(x) if k == self.index else x * g for k, (x, g) in enumerate(zip(xs, grads)))


@dataclasses.dataclass(frozen=True)
class Stop(Rule):
    """No relevance passes: zeros for every input (CP-LRP's softmax; any layer)."""

    multi_output: ClassVar[bool] = True

    def backward(self, layer: LayerView, xs, out, R):
        return tuple(jnp.zeros_like(x) for x in xs)
