"""Relevance rules: what one layer does with the relevance that reaches its output.

A rule is a frozen, hashable dataclass (its hyperparameters are its fields) with one
method, :meth:`Rule.backward`, that maps the relevance ``R`` at a layer's output to the
relevance at each of its inputs. The engine (:mod:`xaijax.propagation.engine`) calls it from
the backward pass of a ``jax.custom_vjp`` that wraps the layer, so rules are ordinary
traced JAX code and run under ``jit``/``vmap``.

What a rule sees of a layer is a :class:`LayerView`:

* ``fn(*xs)`` — the layer's own forward function with its real parameters;
* for *weighted* layers (convolution, dense, batch norm, and a convolution/dense layer with
  the following batch norm folded in) also ``op(kernel, x)`` — the layer's linear map
  *without* bias, applied with any kernel — and the ``kernel`` and ``bias`` arrays. Rules
  that modify weights (z+, gamma, flat, ...) call ``op`` with modified kernels; the
  transposed map they need is ``jax.vjp`` of ``op`` (the standard "gradient of a modified
  forward pass" trick of zennit/iNNvestigate, here per layer).

Notation below: a linear layer ``z_j = sum_i x_i w_ij + b_j``; ``R_j`` relevance at output
``j``; ``W+ = max(W, 0)``, ``W- = min(W, 0)``, ``x+``/``x-`` likewise. Denominators that are
exactly zero give zero relevance (nothing is divided by zero); ``stabilizer`` adds
``stabilizer * sign(z)`` (``sign(0) = +1``) to the denominators of the modified rules.

Rules:

========================  ========================================================================
:class:`Epsilon`          ``R_i = x_i sum_j w_ij R_j / (z_j + eps sign z_j)``; ``eps = 0`` is the
                          z-rule (LRP-0). Works on any layer that is linear (or positively
                          homogeneous, e.g. max pooling) in its inputs, several inputs included:
                          average pools and residual sums use it with ``eps = 0``.
:class:`Gamma`            LRP-gamma, sign-aware (Montavon et al. 2019; zennit's generalised form):
                          positive outputs boost their positive contributions (``W + gamma
                          W+``, ``b + gamma b+`` on ``x+``), negative outputs their negative
                          ones (``W + gamma W-``, ``b + gamma b-`` on ``x+``), so no
                          denominator crosses zero.
:class:`AlphaBeta`        ``alpha`` times the positive and ``beta`` times the negative
                          contributions, each normalised on its own (Bach et al. 2015). Inputs of
                          either sign: positive contributions are ``x+ W+`` and ``x- W-`` (plus
                          ``b+``), negative ones ``x+ W-`` and ``x- W+`` (plus ``b-``), as in
                          zennit. ``ZPlus()`` is ``AlphaBeta(1, 0)``; ``bias=False`` ignores
                          the bias (the z+ of the CLRP / RAP / RSP authors' code).
:class:`ZBox`             z^B for the input layer with bounds ``low <= x <= high``: contributions
                          ``x_i w_ij - l_i w+_ij - h_i w-_ij`` (biases cancel).
:class:`PerSampleZBox`    z^B with each sample's own ``min(x)``/``max(x)`` as bounds (the RAP /
                          RSP reference code's input layer).
:class:`Flat`             every input in the receptive field gets an equal share (weights 1, input 1).
:class:`WSquare`          shares proportional to ``w_ij**2``.
:class:`Excitation`       Excitation Backprop's marginal winning probability (Zhang et al. 2016,
                          TorchRay form): ``R_i = x_i sum_j w+_ij R_j / (sum_i' x_i' w+_i'j)``,
                          no bias, inputs not clamped.
:class:`Pass`             identity: relevance passes unchanged (ReLU, batch norm in some schemes).
:class:`Vjp`              the ordinary vector-Jacobian product of the layer, ``J^T R`` (max
                          pooling = winner-take-all, flatten, concatenation = split by
                          channels, dropout).
:class:`Flipped`          applies another rule to the layer with negated weights and bias
                          (contrastive excitation backprop, CLRP's "negated" dual).
:class:`FlipContrast`     ``rule(layer) - rule(flipped layer)``: one-pass contrastive signal.
========================  ========================================================================

Conservation (``sum_i R_i == sum_j R_j``) holds exactly for Gamma, AlphaBeta with
``alpha - beta = 1``, ZBox, PerSampleZBox, Flat, WSquare, Excitation, Pass, Vjp of linear
index-moving layers, and Epsilon(0) on bias-free layers, wherever no denominator vanishes;
biases and ``eps`` absorb relevance otherwise.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide
from xaijax.models.layers import strided_windows

__all__ = [
    "LayerView",
    "Rule",
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ZBox",
    "PerSampleZBox",
    "Flat",
    "WSquare",
    "Excitation",
    "Pass",
    "Vjp",
    "Flipped",
    "FlipContrast",
    "WEIGHTED_KINDS",
    "ConvGeometry",
]

#: Layer kinds that expose ``op``/``kernel``/``bias`` to rules.
WEIGHTED_KINDS = ("conv", "dense", "batchnorm")

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution reads its inputs: enough to cut its input into patches.

    For rules that need a convolution with a *different kernel per sample* (RSP's
    weight-gradient kernels): with the patches ``P`` (N, *out_spatial, K) of an input, ``K``
    = prod(kernel_size) x C_in ordered like a flattened kernel (spatial offsets, then input
    channel), the layer's bias-free map is ``P @ kernel.reshape(K, C_out)``, so per-sample
    kernels become one batched matrix product instead of a grouped convolution (which XLA
    runs at a cost quadratic in the batch on CPU). Only plain convolutions have one:
    no feature groups, no input dilation, no mask.

    Attributes:
      kernel_size: spatial kernel shape, e.g. ``(3, 3)``.
      strides: per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per spatial axis.
      dilation: kernel dilation per spatial axis.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]

    def pads(self, spatial: Sequence[int]) -> list[tuple[int, int]]:
        """``(low, high)`` zero padding per spatial axis for an input of spatial shape ``spatial``."""
        if isinstance(self.padding, str):
            dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation)]
            return list(jax.lax.padtype_to_pads(tuple(spatial), dilated, self.strides, self.padding))
        return [tuple(p) for p in self.padding]

    def out_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the layer's output for an input of spatial shape ``spatial``."""
        return tuple(
            (n + lo + hi - (k - 1) * d - 1) // s + 1
            for n, (lo, hi), k, d, s in zip(spatial, self.pads(spatial), self.kernel_size, self.dilation, self.strides)
        )

    def patches(self, x: Array) -> Array:
        """The input's patches, (N, *out_spatial, prod(kernel_size) * C) for ``x`` (N, *spatial, C).

        Built from strided slices of the zero-padded input (cheap to transpose: the
        adjoint pads and adds).
        """
        spatial = x.shape[1:-1]
        if len(spatial) != len(self.kernel_size):
            raise ValueError(f"a {len(self.kernel_size)}-d convolution got an input of shape {x.shape}")
        xp = jnp.pad(x, [(0, 0), *self.pads(spatial), (0, 0)])
        return jnp.concatenate(strided_windows(xp, self.kernel_size, self.strides, self.dilation), axis=-1)


@dataclasses.dataclass(frozen=True)
class LayerView:
    """A layer as a rule sees it (see the module docstring).

    Attributes:
      name: dotted layer name (for error messages).
      kind: one of :data:`~xaijax.propagation.composites.KINDS` (``conv``, ``dense``,
        ``batchnorm``, ``relu``, ..., the transformer kinds ``layernorm``, ``softmax``,
        ``matmul``, ``activation``, ``rearrange``, ``average``) or ``custom``.
      fn: ``fn(*xs) -> out``, the layer's forward function with its parameters.
      op: ``op(kernel, x) -> y``, linear in ``x``, bias-free (weighted layers only).
      kernel: weight array accepted by ``op`` (weighted layers only).
      bias: bias added to ``op``'s output, broadcast over the last axis, or None.
      nonneg: the inputs are known to be non-negative (outputs of ReLUs, or pools and
        concatenations of those); rules may skip terms that would be zero.
      geometry: a plain convolution's :class:`ConvGeometry` (None for other layers and for
        convolutions with feature groups, input dilation or a mask).
      axis: the normalised axis of a ``softmax`` or ``layernorm`` layer (else None).
      linearized: ``layernorm`` layers: ``linearized(x)``, the layer with its data-dependent
        normaliser ``1 / sqrt(var + eps)`` held constant (``stop_gradient``): the same values
        as ``fn``, the derivative of the remaining affine map (else None).
    """

    name: str
    kind: str
    fn: Callable[..., Array]
    op: Callable[[Array, Array], Array] | None = None
    kernel: Array | None = None
    bias: Array | None = None
    nonneg: bool = False
    geometry: ConvGeometry | None = None
    axis: int | None = None
    linearized: Callable[[Array], Array] | None = None

    def linear(self, rule: "Rule") -> tuple[Callable[[Array, Array], Array], Array, Array | None]:
        """``(op, kernel, bias)``; a readable error if the layer has no weights."""
        if self.op is None or self.kernel is None:
            raise ValueError(
                f"rule {rule!r} needs a weighted layer (one of {', '.join(WEIGHTED_KINDS)}); "
                f"layer {self.name!r} is a {self.kind!r} layer"
            )
        return self.op, self.kernel, self.bias

    def flipped(self) -> "LayerView":
        """The same layer with negated weights and bias (``-f``)."""
        fn = self.fn
        op = self.op
        return dataclasses.replace(
            self,
            fn=lambda *xs: -fn(*xs),
            op=op,
            kernel=None if self.kernel is None else -self.kernel,
            bias=None if self.bias is None else -self.bias,
        )


# ----------------------------------------------------------------------------- helpers


def _sign1(z: Array) -> Array:
    """sign(z) with sign(0) = +1."""
    return jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _stabilize(z: Array, eps: float) -> Array:
    return z if eps == 0 else z + eps * _sign1(z)


def _add_bias(z: Array, bias: Array | None) -> Array:
    return z if bias is None else z + bias


def _linear_many(
    op: Callable[[Array, Array], Array], kernels: Sequence[Array], x: Array
) -> tuple[Array, Callable[[Array], Array]]:
    """Several kernels applied to the same ``x`` as one operation.

    Returns ``(z, transpose)``: ``z[b] = op(kernels[b], x)`` stacked on a new leading axis,
    and ``transpose(s) = sum_b op(kernels[b], .)^T s[b]`` (shape of ``x``). ``vmap`` over the
    kernels folds them into the output-feature axis of a single convolution / matrix product
    (grouped convolutions included), so the input is read once and XLA runs one (wider)
    kernel instead of several. Dense kernels are applied one by one (memory-bound products).
    """
    if kernels[0].ndim > 2 and len(kernels) > 1:  # convolution kernels: one wider convolution
        stacked = jnp.stack([jnp.asarray(k) for k in kernels])
        z, pull = jax.vjp(lambda xx: jax.vmap(op, in_axes=(0, None))(stacked, xx), x)
        return z, lambda s: pull(jnp.asarray(s).astype(z.dtype))[0]
    # dense kernels (and single kernels): separate products; stacking large dense kernels
    # only adds a copy of the weights to a memory-bound operation
    zs, pulls = zip(*(jax.vjp(lambda xx, k=k: op(k, xx), x) for k in kernels))
    z = jnp.stack(zs)

    def transpose(s: Array) -> Array:
        s = jnp.asarray(s).astype(z.dtype)
        return sum(pull(s[i])[0] for i, pull in enumerate(pulls))

    return z, transpose


def _box(op: Callable[[Array, Array], Array], k: Array, x: Array, lo: Array, hi: Array, R: Array, stabilizer: float) -> Array:
    """z^B: ``x T_k(s) - lo T_{k+}(s) - hi T_{k-}(s)``, ``s = R / (op(k, x) - op(k+, lo) - op(k-, hi))``.

    The three products are one operation: inputs ``[x, lo, hi]`` against kernels ``[k, -k+,
    -k-]``, concatenated along the input-channel axis (an ordinary convolution / matrix product
    with three times the input channels), or batched with ``vmap`` for grouped convolutions.
    """
    kp, kn = jnp.maximum(k, 0), jnp.minimum(k, 0)
    ks = (k, -kp, -kn)
    xs = (x, lo.astype(x.dtype), hi.astype(x.dtype))
    if k.ndim >= 2 and k.shape[-2] == x.shape[-1]:  # not grouped: concatenate input channels
        kc, xc = jnp.concatenate(ks, axis=-2), jnp.concatenate(xs, axis=-1)
        z, pull = jax.vjp(lambda xx: op(kc, xx), xc)
        g = pull(safe_divide(R, _stabilize(z, stabilizer)).astype(z.dtype))[0]
        c = x.shape[-1]
        return sum(a * g[..., i * c:(i + 1) * c] for i, a in enumerate(xs))
    kst, xst = jnp.stack(ks), jnp.stack(xs)
    zs, pull = jax.vjp(lambda xx: jax.vmap(op)(kst, xx), xst)
    s = safe_divide(R, _stabilize(zs.sum(0), stabilizer)).astype(zs.dtype)
    g = pull(jnp.broadcast_to(s, zs.shape))[0]
    return (xst * g).sum(0)


def _single(xs: Sequence[Array], rule: "Rule", layer: LayerView) -> Array:
    if len(xs) != 1:
        raise ValueError(f"rule {rule!r} handles single-input layers; layer {layer.name!r} has {len(xs)} inputs")
    return xs[0]


def _check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------- rules


class Rule:
    """Base class of relevance rules (subclasses are frozen dataclasses).

    ``needs_weights``: the rule uses ``op``/``kernel``/``bias`` (only weighted layers).
    ``multi_output``: the rule handles layers that return a tuple of arrays (``out`` and
    ``R`` are then tuples); the engine refuses other rules on such layers at plan time.
    """

    needs_weights: ClassVar[bool] = False
    multi_output: ClassVar[bool] = False

    def backward(self, layer: LayerView, xs: tuple[Array, ...], out: Array, R: Array) -> tuple[Array, ...]:
        """Relevance at each input (shapes of ``xs``) from the relevance ``R`` at ``out``."""
        raise NotImplementedError

    def check(self, name: str, kind: str, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...]) -> None:
        """Raise a readable ``ValueError`` if the rule cannot handle this layer (plan time)."""
        if self.needs_weights and kind not in WEIGHTED_KINDS:
            raise ValueError(
                f"rule {self!r} needs a weighted layer (one of {', '.join(WEIGHTED_KINDS)}); "
                f"layer {name!r} is a {kind!r} layer"
            )
        if self.needs_weights and len(in_shapes) != 1:
            raise ValueError(f"rule {self!r} handles single-input layers; layer {name!r} has {len(in_shapes)} inputs")


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon; ``eps=0`` is the z-rule (LRP-0). Any layer linear in its inputs.

    ``R_k = x_k * J_k^T (R / (z + eps sign z))`` for every input ``k``, where ``J_k`` is the
    layer's Jacobian with respect to input ``k`` and ``z`` its output (bias included).
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_number("Epsilon eps", self.eps)

    def backward(self, layer, xs, out, R):
        s = safe_divide(R, _stabilize(out, self.eps))
        _, pullback = jax.vjp(layer.fn, *xs)
        grads = pullback(s.astype(out.dtype))
        return tuple(x * g for x, g in zip(xs, grads))


@dataclasses.dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma, sign-aware (Montavon et al. 2019; generalised as in zennit's ``Gamma``).

    Positive and negative outputs are redistributed with their own gamma-boosted
    contributions. With ``z_j`` the layer's output (bias included), ``W^+ = W + gamma W+``,
    ``W^- = W + gamma W-``, ``b^+ = b + gamma b+``, ``b^- = b + gamma b-``::

        z_j > 0:  c_ij = x+_i w^+_ij + x-_i w^-_ij,   d_j = sum_i c_ij + b^+_j
        z_j < 0:  c_ij = x+_i w^-_ij + x-_i w^+_ij,   d_j = sum_i c_ij + b^-_j
        R_i = sum_j c_ij R_j / (d_j + stabilizer sign d_j)

    and outputs with ``z_j == 0`` pass no relevance. A positive output boosts the
    contributions that push it up (``x+ W+`` and ``x- W-``), a negative output those that push
    it down, so the denominator keeps the sign of ``z_j`` with ``|d_j| >= |z_j|`` (it never
    crosses zero), and a unit passes on at most ``(2 + gamma) / gamma`` times ``|R_j|`` in
    absolute relevance. On non-negative inputs with positive outputs (a layer followed by a ReLU
    that is active) this is the original LRP-gamma, ``R_i = x_i sum_j (w_ij + gamma w+_ij)
    R_j / (sum_i' x_i' (w_i'j + gamma w+_i'j) + b_j + gamma b+_j)``; the literal original
    applied to negative outputs (as in ResNets, where relevance reaches convolution outputs
    of either sign through the residual sums) divides by a denominator that can cross zero.

    Conservation: ``sum_i R_i = sum_j R_j (d_j - b^±_j) / d_j`` — exact on bias-free layers
    with ``stabilizer=0`` wherever ``z_j != 0``; the boosted bias absorbs its share otherwise.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-9

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_number("Gamma gamma", self.gamma)
        _check_number("Gamma stabilizer", self.stabilizer)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, b = layer.linear(self)
        g = self.gamma
        # Every product term x_i w_ij is boosted by gamma where its sign is the output's:
        # (x w)+ = (|x| |w| + x w) / 2 and (x w)- = (x w - |x| |w|) / 2, so the denominators
        # need only x W (the output minus its bias) and |x| |W|, and the relevance two
        # transposed products: R = x (1 + g/2) W^T (s+ + s-) + |x| (g/2) |W|^T (s+ - s-).
        # (The same arithmetic as W + gamma W+ on x+ plus W + gamma W- on x-, in half the
        # products: two instead of four forward products, two instead of four transposed.)
        ax = x if layer.nonneg else jnp.abs(x)
        ka = jnp.abs(k)
        za, ta = jax.vjp(lambda v: op(ka, v), ax)  # |x| |W|
        zx = out.astype(za.dtype) if b is None else out.astype(za.dtype) - b  # x W
        d_pos = _add_bias(zx + g * 0.5 * (za + zx), None if b is None else b + g * jnp.maximum(b, 0))
        d_neg = _add_bias(zx + g * 0.5 * (zx - za), None if b is None else b + g * jnp.minimum(b, 0))
        R = R.astype(za.dtype)
        zero = jnp.zeros((), R.dtype)
        s_pos = jnp.where(out > 0, safe_divide(R, _stabilize(d_pos, self.stabilizer)), zero)
        s_neg = jnp.where(out < 0, safe_divide(R, _stabilize(d_neg, self.stabilizer)), zero)
        tw = jax.linear_transpose(lambda v: op(k, v), x)
        return (x * ((1 + 0.5 * g) * tw(s_pos + s_neg)[0]) + ax * (0.5 * g * ta(s_pos - s_neg)[0]),)


@dataclasses.dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: ``alpha * R(positive part) - beta * R(negative part)``.

    Positive contributions ``x+ W+ + x- W-`` (denominator also gets ``b+``), negative
    contributions ``x+ W- + x- W+`` (denominator gets ``b-``). Conserving when
    ``alpha - beta = 1`` and both parts are non-zero (and, with a bias, up to its share).
    ``AlphaBeta(1, 0)`` is z+.

    ``bias=False`` ignores the layer's bias (zennit's ``zero_params=["bias"]``): the
    denominators are the contributions alone, so ``alpha - beta = 1`` conserves exactly
    wherever they are non-zero — the z+ of the CLRP and RAP/RSP authors' reference code.
    """

    alpha: float = 1.0
    beta: float = 0.0
    stabilizer: float = 1e-9
    bias: bool = True

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_number("AlphaBeta alpha", self.alpha)
        _check_number("AlphaBeta beta", self.beta)
        _check_number("AlphaBeta stabilizer", self.stabilizer)
        if not isinstance(self.bias, bool):
            raise ValueError(f"AlphaBeta bias must be True (use the layer's bias) or False (ignore it), got {self.bias!r}")

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, b = layer.linear(self)
        if not self.bias:
            b = None
        kp, kn = jnp.maximum(k, 0), jnp.minimum(k, 0)
        bp = None if b is None else jnp.maximum(b, 0)
        bn = None if b is None else jnp.minimum(b, 0)
        # one stacked operation for the W+ and W- products (W+ only when beta == 0), and one
        # transposed operation for both relevance shares
        kernels = (kp, kn) if self.beta != 0 else (kp,)
        xp = x if layer.nonneg else jnp.maximum(x, 0)
        zp, tp = _linear_many(op, kernels, xp)
        if layer.nonneg:
            pos = _add_bias(zp[0], bp)
            s_pos = self.alpha * safe_divide(R, _stabilize(pos, self.stabilizer))
            if self.beta == 0:
                return (xp * tp(s_pos[None]),)
            neg = _add_bias(zp[1], bn)
            s_neg = -self.beta * safe_divide(R, _stabilize(neg, self.stabilizer))
            return (xp * tp(jnp.stack([s_pos, s_neg])),)
        xn = jnp.minimum(x, 0)
        zn, tn = _linear_many(op, (kn, kp) if self.beta != 0 else (kn,), xn)  # x- W- (positive), x- W+ (negative)
        pos = _add_bias(zp[0] + zn[0], bp)
        s_pos = self.alpha * safe_divide(R, _stabilize(pos, self.stabilizer))
        if self.beta == 0:
            return (xp * tp(s_pos[None]) + xn * tn(s_pos[None]),)
        neg = _add_bias(zp[1] + zn[1], bn)
        s_neg = -self.beta * safe_divide(R, _stabilize(neg, self.stabilizer))
        s = jnp.stack([s_pos, s_neg])
        return (xp * tp(s) + xn * tn(s),)


def ZPlus(stabilizer: float = 1e-9, bias: bool = True) -> AlphaBeta:
    """The z+ rule: ``AlphaBeta(alpha=1, beta=0)``; ``bias=False`` ignores the layer's bias.

    ``R_i = sum_j (x+_i w+_ij + x-_i w-_ij) R_j / (sum_i' (x+_i' w+_i'j + x-_i' w-_i'j) + b+_j)``
    (``b+_j`` only with ``bias=True``, as zennit's ``ZPlus``).
    """
    return AlphaBeta(1.0, 0.0, stabilizer, bias)


def _bounds(value: float | tuple[float, ...] | None, default: tuple[float, ...], x: Array, which: str, layer: LayerView) -> Array:
    v = jnp.asarray(default if value is None else value, dtype=x.dtype)
    if v.ndim == 1 and v.shape[0] != x.shape[-1]:
        raise ValueError(
            f"ZBox {which} bound has {v.shape[0]} values but layer {layer.name!r} has inputs with "
            f"{x.shape[-1]} channels (last axis); pass a scalar or one value per channel"
        )
    return jnp.broadcast_to(v, x.shape)


def _imagenet_bound(which: str) -> tuple[float, ...]:
    from xaijax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    edge = 0.0 if which == "low" else 1.0
    return tuple((edge - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@dataclasses.dataclass(frozen=True)
class ZBox(Rule):
    """z^B rule for the input layer (Montavon et al. 2017) with box bounds.

    ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) R_j / z_j`` with ``z_j`` the sum of those
    contributions over ``i`` (biases cancel). ``low``/``high``: a scalar or one value per
    input channel (last axis). Default (None): the range of RGB values in [0, 1] after
    ImageNet mean/std normalisation, ``((0 - mean) / std, (1 - mean) / std)``.
    """

    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None
    stabilizer: float = 1e-9

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(float(t) for t in v))
            elif v is not None and not isinstance(v, (int, float, tuple)):
                raise ValueError(f"ZBox {name} must be a number, a tuple of per-channel numbers or None; got {v!r}")
        _check_number("ZBox stabilizer", self.stabilizer)

    def check(self, name, kind, in_shapes, out_shape):
        super().check(name, kind, in_shapes, out_shape)
        channels = in_shapes[0][-1]
        for which in ("low", "high"):
            v = getattr(self, which)
            n = 3 if v is None else (len(v) if isinstance(v, tuple) else 1)
            if v is None and channels != 3:
                raise ValueError(
                    f"ZBox default bounds are the ImageNet-normalised RGB range (3 channels); layer "
                    f"{name!r} has {channels} input channels: pass low= and high= explicitly"
                )
            if n != 1 and n != channels:
                raise ValueError(
                    f"ZBox {which} has {n} values but layer {name!r} has {channels} input channels"
                )

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        lo = _bounds(self.low, _imagenet_bound("low"), x, "low", layer)
        hi = _bounds(self.high, _imagenet_bound("high"), x, "high", layer)
        return (_box(op, k, x, lo, hi, R, self.stabilizer),)


@dataclasses.dataclass(frozen=True)
class PerSampleZBox(Rule):
    """z^B with each sample's own bounds: ``l = min(x)``, ``h = max(x)`` over the whole sample.

    ``R_i = sum_j (x_i w_ij - l w+_ij - h w-_ij) R_j / z_j`` with ``z_j`` the sum of those
    contributions over ``i`` (biases cancel), ``l``/``h`` the minimum/maximum of the sample's
    entire input (every pixel and channel, one scalar pair per sample). The input-layer rule of
    the RAP and RSP reference code and of those authors' LRP baseline
    (:func:`~xaijax.propagation.composites.zplus_nobias_box`); known there as
    ``RelativeBox`` (:mod:`~xaijax.propagation.rap_rules`) and ``RSPInput``
    (:mod:`~xaijax.propagation.rsp_rules`), both aliases of this rule.

    ``stabilizer`` is added (times ``sign z``, ``sign 0 = +1``) to the denominators; with 0
    (default) a vanishing denominator gives zero relevance. The denominators are ``>= 0``
    (each contribution is ``(x_i - l) w+_ij + (x_i - h) w-_ij >= 0``), so a stabilizer ``s``
    is the reference LRP code's ``z + s``.
    """

    stabilizer: float = 0.0

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_number("PerSampleZBox stabilizer", self.stabilizer)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        flat = x.reshape(x.shape[0], -1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        lo = jnp.broadcast_to(flat.min(-1).reshape(shape), x.shape)
        hi = jnp.broadcast_to(flat.max(-1).reshape(shape), x.shape)
        return (_box(op, k, x, lo, hi, R.astype(x.dtype), self.stabilizer),)


@dataclasses.dataclass(frozen=True)
class Flat(Rule):
    """Flat rule: every input of the receptive field gets an equal share (weights and input 1)."""

    needs_weights: ClassVar[bool] = True

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        return (_shares(op, k * 0 + 1, x, R),)  # data-dependent ones: see _shares


@dataclasses.dataclass(frozen=True)
class WSquare(Rule):
    """w^2 rule: shares proportional to the squared weights (input replaced by 1)."""

    needs_weights: ClassVar[bool] = True

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        return (_shares(op, k * k, x, R),)


def _shares(op, k, x, R):
    """``R_i = sum_j k_ij R_j / sum_i' k_i'j`` (input-independent shares; padding excluded).

    The all-ones input (and the flat rule's all-ones kernel) are built as ``x * 0 + 1`` rather
    than as constants: with constant ones, XLA on CPU folds the count convolution into a following channel reduction and
    returns garbage (relevance of 1e27 for VGG16 at 112 px under ``jit`` when the result is
    summed over channels); a data-dependent operand keeps the arithmetic as written.
    """
    z, pull = jax.vjp(lambda xx: op(k, xx), x * 0 + 1)
    return pull(safe_divide(R, z).astype(z.dtype))[0]


@dataclasses.dataclass(frozen=True)
class Excitation(Rule):
    """Excitation Backprop (marginal winning probability), TorchRay's form.

    ``R_i = x_i sum_j w+_ij R_j / (sum_i' x_i' w+_i'j + stabilizer)``: positive weights, no
    bias, inputs used as they are (non-negative after a ReLU).
    """

    stabilizer: float = 1e-20

    needs_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_number("Excitation stabilizer", self.stabilizer)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        kp = jnp.maximum(k, 0)
        z, pull = jax.vjp(lambda xx: op(kp, xx), x)
        return (x * pull(safe_divide(R, z + self.stabilizer).astype(z.dtype))[0],)


@dataclasses.dataclass(frozen=True)
class Pass(Rule):
    """Identity: relevance passes unchanged (single input of the output's shape)."""

    def check(self, name, kind, in_shapes, out_shape):
        if len(in_shapes) != 1 or tuple(in_shapes[0]) != tuple(out_shape):
            raise ValueError(
                f"rule Pass() needs a single input of the output's shape; layer {name!r} maps "
                f"{[tuple(s) for s in in_shapes]} to {tuple(out_shape)}"
            )

    def backward(self, layer, xs, out, R):
        return (R.astype(xs[0].dtype),)


@dataclasses.dataclass(frozen=True)
class Vjp(Rule):
    """The ordinary vector-Jacobian product of the layer: ``R_in = J^T R`` (chain rule).

    Relevance is moved as a gradient would be: winner-take-all for max pooling, split by
    channels for concatenations, identity up to shape for flatten/dropout/identity layers
    and for the transformers' token re-arrangements (``rearrange``: patch tokens, head
    split/merge, token concatenation and selection, where it is exact: every output entry is
    one input entry). Also the rule of layers returning several arrays (``out`` and ``R``
    are then tuples).
    (Formerly ``rules.Gradient``, renamed so as not to be confused with the attribution
    method :class:`xaijax.methods.Gradient`.)
    """

    multi_output: ClassVar[bool] = True

    def backward(self, layer, xs, out, R):
        _, pullback = jax.vjp(layer.fn, *xs)
        # a layer returning a tuple of arrays (SplitHeads' q, k, v) gets a tuple of relevances
        return tuple(pullback(jax.tree_util.tree_map(lambda r, o: r.astype(o.dtype), R, out)))


@dataclasses.dataclass(frozen=True)
class Flipped(Rule):
    """``rule`` applied to the layer with negated weights and bias (``-f``)."""

    rule: Rule = dataclasses.field(default_factory=lambda: Epsilon(0.0))

    @property
    def needs_weights(self) -> bool:  # type: ignore[override]
        return True

    def check(self, name, kind, in_shapes, out_shape):
        Rule.check(self, name, kind, in_shapes, out_shape)
        self.rule.check(name, kind, in_shapes, out_shape)

    def backward(self, layer, xs, out, R):
        return self.rule.backward(layer.flipped(), xs, -out, R)


@dataclasses.dataclass(frozen=True)
class FlipContrast(Rule):
    """``rule(layer) - rule(layer with negated weights)`` in one backward pass.

    (Formerly ``rules.Contrast``, renamed so as not to be confused with the contrastive
    combinator :class:`xaijax.methods.Contrast`.)

    On the classifier layer this gives contrastive Excitation Backprop (Zhang et al. 2016):
    the relevance of the target minus that of its "opposite" (flipped classifier weights),
    propagated together below this layer because propagation is linear in the relevance.
    """

    rule: Rule = dataclasses.field(default_factory=Excitation)

    @property
    def needs_weights(self) -> bool:  # type: ignore[override]
        return True

    def check(self, name, kind, in_shapes, out_shape):
        Rule.check(self, name, kind, in_shapes, out_shape)
        self.rule.check(name, kind, in_shapes, out_shape)

    def backward(self, layer, xs, out, R):
        pos = self.rule.backward(layer, xs, out, R)
        neg = self.rule.backward(layer.flipped(), xs, -out, R)
        return tuple(p - n for p, n in zip(pos, neg))


#: Old names of renamed rules: importable for now, with a DeprecationWarning.
_DEPRECATED = {"Gradient": "Vjp", "Contrast": "FlipContrast"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"xaijax.propagation.rules.{name} is deprecated: use rules.{new} (the old name clashed with "
            f"xaijax.methods.{name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
