"""Relevance rules of Relative Attributing Propagation (RAP; Nam et al., AAAI 2020).

RAP propagates a one-hot seed (value 1) from the classifier to the input with three rules
on the weighted layers, written here after the arithmetic of the authors' reference code
(``wjNam/Relative_Attributing_Propagation``, ``modules/layers.py``, the ``RAP_relprop``
methods). Notation as in :mod:`xaijax.propagation.rules`: a layer ``z_j = sum_i x_i w_ij +
b_j``, ``W+ = max(W, 0)``, ``|W-| = -min(W, 0)``, ``x+ = max(x, 0)``, ``|x-| = -min(x, 0)``,
``T_W(s)_i = sum_j w_ij s_j`` (the transposed linear map), ``a / b := 0`` where ``b == 0``
(the reference's ``safe_divide``). Every sum "per sample" runs over all non-batch axes.

:class:`AbsoluteInfluence` — the classifier (last dense layer), seeded with ``R`` = the
  one-hot seed. Contributions to the seeded outputs, ``C_i = x_i T_W(R)_i``, plus the bias:
  per sample ``Pos = sum_j R_j (x+ W+ + x- W-)_j`` and ``Neg = sum_j R_j (x+ W- + x- W+)_j``
  split ``b_j R_j`` into ``bp_j = b_j R_j Pos / (Pos + Neg)`` and ``bn_j = b_j R_j Neg /
  (Pos + Neg)``; ``bp`` goes to the ``x+ W+`` terms and ``bn`` to the ``x+ W-`` terms in
  proportion to their size: ``C += x+ (T_{W+}(bp / z++) + T_{W-}(bn / z+-))`` with ``z++ =
  x+ W+``, ``z+- = x+ W-`` (so ``sum C = sum_j R_j z_j``, the seeded logit). Then the
  *absolute influence normalisation*: ``R_i = |C_i| * sum(C) / sum(|C|)`` per sample — every
  input gets the magnitude of its influence, scaled to the seeded logit.

:class:`Relative` — every other convolution/dense layer. Each input path ``p`` (``p = x+``,
  and ``p = |x-|`` when inputs can be negative) has the positive and negative weight sums
  ``A = T'_{W+}(p)``, ``B = T'_{|W-|}(p)`` (forward maps, both >= 0); with ``R+ = max(R, 0)``
  and ``R- = min(R, 0)``:

  * dense layers: ``C_p = p (T_{W+}(R / A) + T_{|W-|}(R / (A + B)))`` — the whole relevance
    goes to the positive-weight contributions, and an extra ``R B / (A + B)`` to the
    negative-weight ones;
  * convolutions differ on the negative path: ``C_p = p (T_{W+}(R+ / A) + T_{|W-|}(R- / B +
    R / (A + B)))`` — negative relevance goes to the negative-weight contributions.

  Then the *uniform shift*: ``C = sum_p C_p``; every nonzero entry of ``C`` is moved by the
  same amount ``(sum C - sum R) / #nonzero(C)`` (per sample), so the layer passes on exactly
  the relevance it receives. The bias is not used (the reference's bias handling is
  commented out).

:class:`RelativeBox` — the input layer: z^B with per-sample bounds ``l = min(x)``, ``h =
  max(x)`` (minimum/maximum over the whole normalised image, all channels):
  ``R_i = x_i T_W(s)_i - l T_{W+}(s)_i - h T_{W-}(s)_i``, ``s = R / (x W - l W+ - h W-)``.
  The same rule as RSP's input layer: both names are aliases of
  :class:`~xaijax.propagation.rules.PerSampleZBox`.

Other layers (:func:`rap_composite`, used by :mod:`xaijax.methods.rap`):
pooling, residual adds and concatenations use the z-rule (``Epsilon(0)``), BatchNorm, ReLU
and dropout pass relevance unchanged.

Where xaijax deliberately differs from the reference code (documented facts, not bugs):

* Samples are independent. The reference decides "this is the classifier" by testing
  ``R.max() == 1`` over the whole batch; xaijax uses the position (last weighted layer).
* The reference shifts the ``x+`` and ``|x-|`` paths separately, each to the incoming total,
  so a layer with inputs of both signs passes on *twice* its relevance. This never happens
  in the reference networks (every layer but the input layer follows a ReLU or pooling of
  ReLU outputs, so the ``|x-|`` path is empty); xaijax shifts the sum of both paths once, which
  is identical for non-negative inputs and conserves relevance otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from xaijax.propagation.composites import Composite
from xaijax.imageops import safe_divide
from xaijax.propagation.rules import Epsilon, Pass, PerSampleZBox, Rule, Vjp, _linear_many, _single

__all__ = ["AbsoluteInfluence", "Relative", "RelativeBox", "rap_composite", "uniform_shift", "absolute_influence"]

Array = jax.Array

_LINEAR_KINDS = ("conv", "dense")


def _sample_sum(a: Array) -> Array:
    """Per-sample sum over all non-batch axes, shaped to broadcast against ``a``."""
    return a.reshape(a.shape[0], -1).sum(-1).reshape((-1,) + (1,) * (a.ndim - 1))


def uniform_shift(C: Array, total: Array) -> Array:
    """Move every nonzero entry of ``C`` by the same amount so that its per-sample sum is
    ``total`` (shape (N, 1, ...)); samples without nonzero entries are left at zero.

    ``C - (sum C - total) / #nonzero(C) * [C != 0]`` (the reference's ``shift_rel``).
    """
    nonzero = (C != 0).astype(C.dtype)
    shift = safe_divide(_sample_sum(C) - total.astype(C.dtype), _sample_sum(nonzero))
    return C - shift * nonzero


def absolute_influence(C: Array) -> Array:
    """``|C_i| * sum(C) / sum(|C|)`` per sample (the reference's ``redistribute``)."""
    a = jnp.abs(C)
    return a * safe_divide(_sample_sum(C), _sample_sum(a))


def _check_linear(rule: Rule, name: str, kind: str, in_shapes) -> None:
    if kind not in _LINEAR_KINDS:
        raise ValueError(
            f"rule {rule!r} needs a convolution or dense layer; layer {name!r} is a {kind!r} layer "
            "(RAP passes BatchNorm relevance unchanged: map it to Pass())"
        )
    if len(in_shapes) != 1:
        raise ValueError(f"rule {rule!r} handles single-input layers; layer {name!r} has {len(in_shapes)} inputs")


@dataclasses.dataclass(frozen=True)
class Relative(Rule):
    """RAP's rule for hidden convolution/dense layers (see the module docstring).

    Attributes:
      variant: ``"conv"`` or ``"dense"`` arithmetic on the negative path; ``"auto"``
        (default) picks by the layer kind, as the reference does.
    """

    variant: str = "auto"

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.variant not in ("auto", "conv", "dense"):
            raise ValueError(f"Relative variant must be 'auto', 'conv' or 'dense', got {self.variant!r}")

    def check(self, name, kind, in_shapes, out_shape):
        _check_linear(self, name, kind, in_shapes)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        conv = self.variant == "conv" or (self.variant == "auto" and layer.kind == "conv")
        kp, kn = jnp.maximum(k, 0), -jnp.minimum(k, 0)  # W+ and |W-|
        R = R.astype(x.dtype)
        rp, rn = jnp.maximum(R, 0), jnp.minimum(R, 0)

        def path(p: Array) -> Array:
            (a, b), transpose = _linear_many(op, (kp, kn), p)
            ab = safe_divide(R, a + b)
            if conv:
                s = jnp.stack([safe_divide(rp, a), safe_divide(rn, b) + ab])
            else:
                s = jnp.stack([safe_divide(R, a), ab])
            return p * transpose(s)

        if layer.nonneg:
            C = path(x)
        else:
            C = path(jnp.maximum(x, 0)) + path(-jnp.minimum(x, 0))
        return (uniform_shift(C, _sample_sum(R)),)


@dataclasses.dataclass(frozen=True)
class AbsoluteInfluence(Rule):
    """RAP's classifier rule: contributions to the seeded outputs with the bias split into
    its positive/negative shares, then absolute influence normalisation (module docstring).

    The relevance arriving at the layer's output is the seed itself (one-hot, value 1), not
    seed times logits; the input total is ``sum_j seed_j z_j``.
    """

    needs_weights: ClassVar[bool] = True

    def check(self, name, kind, in_shapes, out_shape):
        if kind != "dense":
            raise ValueError(
                f"RAP's classifier rule (absolute influence normalisation) is defined for a dense classifier "
                f"layer; the last weighted layer {name!r} is a {kind!r} layer"
            )
        _check_linear(self, name, kind, in_shapes)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, b = layer.linear(self)
        R = R.astype(x.dtype)
        _, pull = jax.vjp(lambda xx: op(k, xx), x)
        C = x * pull(R)[0]
        if b is not None:
            kp, kn = jnp.maximum(k, 0), jnp.minimum(k, 0)
            xp = x if layer.nonneg else jnp.maximum(x, 0)
            (z1, z2), transpose = _linear_many(op, (kp, kn), xp)  # x+ W+, x+ W-
            pos, neg = _sample_sum(z1 * R), _sample_sum(z2 * R)
            if not layer.nonneg:
                xn = jnp.minimum(x, 0)
                (z3, z4), _ = _linear_many(op, (kp, kn), xn)  # x- W+, x- W-
                pos, neg = pos + _sample_sum(z4 * R), neg + _sample_sum(z3 * R)
            bR = b.astype(x.dtype) * R
            bp = bR * safe_divide(pos, pos + neg)
            bn = bR * safe_divide(neg, pos + neg)
            C = C + xp * transpose(jnp.stack([safe_divide(bp, z1), safe_divide(bn, z2)]))
        return (absolute_influence(C),)


#: RAP's input-layer rule under its old name: :class:`~xaijax.propagation.rules.PerSampleZBox`.
RelativeBox = PerSampleZBox


def rap_composite(stabilizer: float = 0.0) -> Composite:
    """The RAP rule set (canonize=False: RAP uses each convolution's own weights and passes
    BatchNorm relevance unchanged, as the reference does).

    * first convolution/dense layer: :class:`~xaijax.propagation.rules.PerSampleZBox`
      (z^B with the sample's own bounds; ``stabilizer`` is its stabilizer);
    * last convolution/dense layer (the classifier): :class:`AbsoluteInfluence`;
    * other convolutions and dense layers: :class:`Relative`;
    * max/average pooling, residual adds and concatenations: ``Epsilon(0)`` (the z-rule,
      the reference's ``RelPropSimple``/``Cat``);
    * BatchNorm and ReLU: :class:`~xaijax.propagation.rules.Pass`; flatten, dropout,
      identity: :class:`~xaijax.propagation.rules.Vjp` (identity up to shape).
    """
    z = Epsilon(0.0)
    return Composite(
        conv=Relative(),
        dense=Relative(),
        first=PerSampleZBox(stabilizer),
        last=AbsoluteInfluence(),
        kinds={
            "batchnorm": Pass(),
            "relu": Pass(),
            "maxpool": z,
            "avgpool": z,
            "add": z,
            "concat": z,
            "reshape": Vjp(),
            "dropout": Vjp(),
            "identity": Vjp(),
        },
        canonize=False,
    )
