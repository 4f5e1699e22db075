"""Relevance rules of Relative Sectional Propagation (RSP; Nam, Choi & Lee, AAAI 2021).

Stage 2 of RSP ("sectional propagation") carries a signed relevance from the CAM layer
down to the input. These are the per-layer rules, written from the authors' reference code
(``wjNam/Relative_Sectional_Propagation``, ``modules/layers.py``, the ``RSP_relprop``
methods); the method itself is :mod:`xaijax.methods.rsp`. Where the code and the paper
differ, the code is followed. Notation per sample: ``x`` a layer's input, ``R`` the
relevance at its output, ``R+ = max(R, 0)`` the positive section and ``R- = max(-R, 0)``
the negative one (as a magnitude); ``a / b`` is 0 where ``b == 0`` ("safe divide", as in
the reference).

=======================  ======================================================================
:class:`RSPConv`         Hidden convolutions. With ``x1 = max(x, 0)``, the kernels are the
                         *weight gradients* of the two sections, ``G+ = dW <op(W, x1), R+>``
                         and ``G- = dW <op(W, x1), R->`` (the layer's own weights are not
                         used, only its geometry: kernel size, stride, padding). With
                         ``Za = op(G+, x1) [R+ != 0]``, ``Zb = op(G-, x1) [R- != 0]``::

                             C1 = x1 * op(G+)^T (R+ / Za)
                             C2 = x1 * op(G-)^T (R- / Zb)

                         1x1 kernels: ``R_in = C1 - C2``. Larger kernels:
                         ``C = 2 (C1 - C2)``, then the *uniform shift*
                         ``R_in = C - [C != 0] * sum(R) / #{C != 0}``: every nonzero entry
                         moves down by the same amount so the total is ``sum(R)`` again,
                         and near-zero relevance turns negative.
:class:`RSPInput`        The first convolution: z^B with per-sample scalar bounds ``l =
                         min(x)``, ``h = max(x)`` over the whole image (all pixels and
                         channels): ``R_i = sum_j (x_i w_ij - l w+_ij - h w-_ij) R_j / Z_j``,
                         no bias, no stabiliser. The same rule as RAP's input layer: an
                         alias of :class:`~xaijax.propagation.rules.PerSampleZBox`.
:class:`RSPShifted`      Max / average pooling: the z-rule on ``x + 1e-9``
                         (``R_i = (x_i + d) * dfn/dx_i * R / fn(x + d)``).
:class:`RSPAdd`          Residual sums: each input gets ``(max(x_k, 0) + 1e-9) / sum_k'
                         (max(x_k', 0) + 1e-9)`` of the relevance.
:class:`RSPBatchNorm`    A BatchNorm that is not folded: relevance passes where
                         ``x * scale != 0`` (the reference subtracts a share of the bias and
                         adds it back, which cancels), zero elsewhere.
=======================  ======================================================================

ReLU passes relevance unchanged (:class:`~xaijax.propagation.rules.Pass`); see
:func:`xaijax.propagation.composites.rsp` for the full layer -> rule map.

Conservation: every rule passes on exactly the relevance it receives, except where a
denominator vanishes (e.g. a receptive field whose inputs are all zero while its relevance
is not), where that relevance is dropped.

Batch independence (a deliberate difference): the reference computes the weight-gradient
kernels ``G+``/``G-`` with ``torch.autograd.grad`` on the whole batch, i.e. summed over the
samples (it is run with batch size 1); here they are computed per sample, so a sample's
relevance never depends on the others. For plain convolutions (a
:class:`~xaijax.propagation.rules.ConvGeometry` on the layer) that is
:func:`sectional_conv_patches`, batched matrix products over the input's patches; other
linear layers use :func:`sectional_conv` under ``vmap``. (Before splitting the sections the
reference also sums the relevance over batch and channels, ``rel_sum``, and recombines
``(rel_sum > 0) R + (rel_sum <= 0) R``; the two masks are complementary, so that step is
an identity and is omitted.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide
from xaijax.propagation.rules import ConvGeometry, PerSampleZBox, Rule, _single

__all__ = ["RSPConv", "RSPInput", "RSPShifted", "RSPAdd", "RSPBatchNorm", "SHIFT", "sectional_conv", "sectional_conv_patches"]

Array = jax.Array

#: The small constant the reference adds to pooled inputs and residual-sum inputs.
SHIFT = 1e-9


def _per_sample(f: Callable[[Array, Array], Array], x: Array, R: Array) -> Array:
    """Apply ``f(x_n, R_n)`` (each with a batch axis of 1) to every sample separately."""
    return jax.vmap(lambda xn, rn: f(xn[None], rn[None])[0])(x, R)


def _doubled_and_shifted(diff: Array, R: Array, pointwise: bool) -> Array:
    """``C1 - C2`` as is (1x1 kernels), else doubled and uniformly shifted per sample."""
    if pointwise:
        return diff
    axes = tuple(range(1, diff.ndim))
    c = 2.0 * diff
    nonzero = (c != 0).astype(c.dtype)
    shift = safe_divide(R.sum(axes, keepdims=True).astype(c.dtype), nonzero.sum(axes, keepdims=True))
    return c - shift * nonzero


def sectional_conv(op: Callable[[Array, Array], Array], kernel: Array, x: Array, R: Array, pointwise: bool) -> Array:
    """RSP's convolution rule for ONE sample (batch axis of size 1); see :class:`RSPConv`.

    Works for any linear ``op``; :func:`sectional_conv_patches` is the fast form for plain
    convolutions (the same numbers, a whole batch at once).

    Args:
      op: ``op(kernel, x)``, the layer's bias-free linear map.
      kernel: an array of the kernel's shape (only its shape matters: the rule's kernels are
        the weight gradients of the two sections).
      x: the layer input (1, H, W, C_in); its positive part is used.
      R: relevance at the output (1, h, w, C_out).
      pointwise: 1x1 kernel (no doubling, no shift).

    Returns:
      Relevance at the input (1, H, W, C_in).
    """
    x1 = jnp.maximum(x, 0)
    rp = jnp.maximum(R, 0).astype(x1.dtype)
    rn = jnp.maximum(-R, 0).astype(x1.dtype)
    sections = jnp.stack([rp, rn])
    # weight gradients of both sections in one batched kernel-VJP: G+ and G-
    _, kernel_vjp = jax.vjp(lambda k: op(k, x1), kernel)
    (grads,) = jax.vmap(kernel_vjp)(sections)
    # both sections' forward and transposed maps as one convolution (kernels stacked)
    z, pull = jax.vjp(lambda xx: jax.vmap(op, in_axes=(0, None))(grads, xx), x1)
    z = z * (sections != 0)  # Za = op(G+, x1) [R+ != 0], Zb = op(G-, x1) [R- != 0]
    signed = jnp.stack([rp, -rn])
    (back,) = pull(safe_divide(signed, z).astype(z.dtype))
    return _doubled_and_shifted(x1 * back, R, pointwise)  # x1 * back = C1 - C2


def sectional_conv_patches(geometry: ConvGeometry, x: Array, R: Array, pointwise: bool) -> Array:
    """RSP's convolution rule for a batch of samples, each with its own kernels; see :class:`RSPConv`.

    The per-sample weight gradients ``G+``/``G-`` make every sample's convolution different.
    As a grouped convolution (``vmap`` of :func:`sectional_conv`) XLA's CPU backend expands
    that to a block-diagonal kernel, a cost quadratic in the batch; here each step is one
    batched matrix product over the input's patches ``P`` (N, positions, K):
    ``G = P^T [R+, R-]``, ``Z = P G``, and the transposed map ``P^T`` of ``(R / Z) G^T``
    folds back through the adjoint of the patch extraction.

    Args:
      geometry: the convolution's :class:`~xaijax.propagation.rules.ConvGeometry`.
      x: the layer input (N, H, W, C_in); its positive part is used.
      R: relevance at the output (N, h, w, C_out).
      pointwise: 1x1 kernel (no doubling, no shift).

    Returns:
      Relevance at the input (N, H, W, C_in); each sample's depends on that sample only.
    """
    x1 = jnp.maximum(x, 0)
    rp = jnp.maximum(R, 0).astype(x1.dtype)
    rn = jnp.maximum(-R, 0).astype(x1.dtype)
    patches, fold = jax.vjp(geometry.patches, x1)
    n, k = patches.shape[0], patches.shape[-1]
    if patches.shape[1:-1] != R.shape[1:-1]:
        raise ValueError(f"convolution geometry {geometry} gives output positions {patches.shape[1:-1]}, the relevance has {R.shape[1:-1]}")
    p = patches.reshape(n, -1, k)
    sections = jnp.concatenate([rp, rn], axis=-1).reshape(n, p.shape[1], -1)  # (N, positions, 2 C_out)
    grads = jnp.einsum("npk,npo->nko", p, sections)  # [G+, G-] per sample, (N, K, 2 C_out)
    z = jnp.einsum("npk,nko->npo", p, grads) * (sections != 0)  # [Za, Zb]
    signed = jnp.concatenate([rp, -rn], axis=-1).reshape(sections.shape)
    back = jnp.einsum("npo,nko->npk", safe_divide(signed, z), grads)
    (back,) = fold(back.reshape(patches.shape))
    return _doubled_and_shifted(x1 * back, R, pointwise)  # x1 * back = C1 - C2


@dataclasses.dataclass(frozen=True)
class RSPConv(Rule):
    """RSP's sectional rule for hidden convolutions (see the module docstring).

    The 1x1 path (no doubling, no shift) is taken when the kernel's height (its first
    spatial axis) is 1 — the reference's test (``weight.shape[2] == 1`` on an OIHW kernel);
    for the square kernels of VGG and ResNet that is "kernel size 1".
    """

    needs_weights: ClassVar[bool] = True

    def check(self, name, kind, in_shapes, out_shape):
        if kind != "conv":
            raise ValueError(f"rule {self!r} applies to convolutions; layer {name!r} is a {kind!r} layer")
        super().check(name, kind, in_shapes, out_shape)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        op, k, _ = layer.linear(self)
        pointwise = k.shape[0] == 1
        if layer.geometry is not None:
            return (sectional_conv_patches(layer.geometry, x, R.astype(x.dtype), pointwise),)
        return (_per_sample(lambda xn, rn: sectional_conv(op, k, xn, rn, pointwise), x, R),)


#: RSP's input-layer rule: :class:`~xaijax.propagation.rules.PerSampleZBox` (z^B with the
#: sample's own min/max as bounds, no stabilizer), under the name of this family.
RSPInput = PerSampleZBox


@dataclasses.dataclass(frozen=True)
class RSPShifted(Rule):
    """z-rule on inputs shifted by ``shift`` (pooling layers in RSP).

    ``R = (x + d) * J^T (R_out / fn(x + d))`` with ``J`` the Jacobian of the layer at
    ``x + d``; max pooling gives winner-take-all, average pooling shares in proportion to
    ``x + d``.
    """

    shift: float = SHIFT

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer) + jnp.asarray(self.shift, xs[0].dtype)
        z, pull = jax.vjp(layer.fn, x)
        (g,) = pull(safe_divide(R.astype(z.dtype), z))
        return (x * g,)


@dataclasses.dataclass(frozen=True)
class RSPAdd(Rule):
    """Residual sums: input ``k`` gets ``R * (max(x_k, 0) + d) / sum_k' (max(x_k', 0) + d)``."""

    shift: float = SHIFT

    def backward(self, layer, xs, out, R):
        d = jnp.asarray(self.shift, xs[0].dtype)
        parts = [jnp.maximum(x, 0) + d for x in xs]
        z = parts[0]
        for p in parts[1:]:
            z = z + p
        s = safe_divide(R.astype(z.dtype), z)
        return tuple(p * s for p in parts)


@dataclasses.dataclass(frozen=True)
class RSPBatchNorm(Rule):
    """A BatchNorm not folded into a convolution: relevance passes where ``x * scale != 0``."""

    needs_weights: ClassVar[bool] = True

    def check(self, name, kind, in_shapes, out_shape):
        if kind != "batchnorm":
            raise ValueError(f"rule {self!r} applies to BatchNorm layers; layer {name!r} is a {kind!r} layer")
        super().check(name, kind, in_shapes, out_shape)

    def backward(self, layer, xs, out, R):
        x = _single(xs, self, layer)
        _, a, _ = layer.linear(self)
        return (jnp.where(x * a != 0, R, 0.0).astype(x.dtype),)
