"""Primitive layers shared by every architecture in the zoo.

Every operation that a relevance rule or a CAM method may need to see is its own
``flax.linen`` module with a torchvision-style name (``features.29``, ``layer4.1.relu``),
so that the propagation engine can intercept it with ``nn.intercept_methods`` and users
can address it by its dotted path. Parameterised layers are Flax's own ``nn.Conv``,
``nn.Dense`` and ``nn.BatchNorm`` (created through the helpers below so that padding,
epsilon and momentum match PyTorch); parameter-free operations are the small modules
defined here.

Computation follows the dtype of inputs and variables (cast both to float64 for
high-precision checks). Conventions: arrays are NHWC; pooling follows PyTorch's ``floor`` output-size rule
(``ceil_mode=False``); max pooling pads with ``-inf`` and average pooling counts padded
zeros (``count_include_pad=True``), as ``torch.nn.functional`` does by default.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BatchNorm",
    "conv",
    "dense",
    "batch_norm",
    "ReLU",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Flatten",
    "Dropout",
    "Add",
    "Concat",
    "Identity",
    "strided_windows",
]


def conv(
    features: int,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    bias: bool = True,
    name: str | None = None,
) -> nn.Conv:
    """A ``nn.Conv`` with PyTorch's explicit symmetric zero padding."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kh, kw),
        strides=(sh, sw),
        padding=((ph, ph), (pw, pw)),
        use_bias=bias,
        name=name,
    )


def dense(features: int, bias: bool = True, name: str | None = None) -> nn.Dense:
    """A ``nn.Dense`` (PyTorch ``nn.Linear``)."""
    return nn.Dense(features, use_bias=bias, name=name)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` over the last axis whose running variance is updated like PyTorch's.

    Same parameters (``scale``, ``bias``), statistics (``mean``, ``var`` in
    ``batch_stats``), fields and eval-mode output as Flax's ``nn.BatchNorm``, and
    ``isinstance(m, nn.BatchNorm)`` holds. Two differences: in train mode the running
    variance is updated with the *unbiased* batch variance (``n / (n - 1)``, as torch does;
    the batch itself is normalised with the biased one, as in both frameworks), and the
    computation is written out here in one method, so an interceptor sees exactly one call
    per layer. ``axis_name``/``mask`` (cross-device / masked statistics) are not supported.
    """

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None):
        if mask is not None or self.axis_name is not None or self.axis != -1:
            raise NotImplementedError("xaijax's BatchNorm normalises the last axis without masks or axis_name")
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        if ura:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
        mul = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            mul = mul * scale
        y = (x - mean) * mul
        return y + bias if bias is not None else y


def batch_norm(train: bool, eps: float = 1e-5, name: str | None = None) -> nn.BatchNorm:
    """A BatchNorm matching ``torch.nn.BatchNorm2d`` (momentum 0.1 in torch's sense).

    In eval mode (``train=False``) it normalises with the running statistics stored in the
    ``batch_stats`` collection, exactly like a torch module in ``.eval()``; in train mode
    the running statistics follow torch's update (see :class:`BatchNorm`).
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=eps,
        name=name,
    )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ReLU(nn.Module):
    """Rectified linear unit as a named module (so rules and CAM layers can address it)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


class Identity(nn.Module):
    """Returns its input; a named hook point (e.g. TorchRay-style ``avgpool`` taps)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def strided_windows(
    x: jax.Array,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int] | None = None,
    what: str = "window",
) -> list[jax.Array]:
    """What a window sliding over ``x`` sees, one array per kernel offset.

    ``x`` (N, *spatial, C), already padded; the result holds ``prod(kernel)`` arrays of shape
    (N, *out_spatial, C), kernel offsets in row-major order, where ``out = (n - (k - 1) d - 1)
    // s + 1`` per axis. Pooling reduces over them; a convolution's patches concatenate them.
    Strided slices are cheap to transpose (the adjoint pads and adds). Raises ``ValueError``
    when the window does not fit (``what`` names it in the message).
    """
    spatial = x.shape[1:-1]
    dilation = (1,) * len(kernel) if dilation is None else tuple(dilation)
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(spatial, kernel, dilation, strides)]
    if min(out) < 1:
        raise ValueError(
            f"{what} {tuple(kernel)} does not fit a {'x'.join(map(str, spatial))} feature map: the input image is too small"
        )
    windows = []
    for offset in itertools.product(*[range(k) for k in kernel]):
        start = (0, *[o * d for o, d in zip(offset, dilation)], 0)
        limit = (x.shape[0], *[b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out, strides)], x.shape[-1])
        windows.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
    return windows


def _blocks(x: jax.Array, k: tuple[int, int]) -> jax.Array:
    """NHWC -> (N, H//kh, kh, W//kw, kw, C): non-overlapping windows (floor: edges dropped)."""
    n, h, w, c = x.shape
    oh, ow = h // k[0], w // k[1]
    if oh < 1 or ow < 1:
        raise ValueError(f"pooling window {k} does not fit a {h}x{w} feature map: the input image is too small")
    return x[:, : oh * k[0], : ow * k[1], :].reshape(n, oh, k[0], ow, k[1], c)


def _ceil_extra(size: int, k: int, s: int, p: int) -> int:
    """Extra bottom/right padding that turns floor into PyTorch's ``ceil_mode`` output size."""
    out_floor = (size + 2 * p - k) // s + 1
    out_ceil = -(-(size + 2 * p - k) // s) + 1
    if (out_ceil - 1) * s >= size + p:  # torch: the last window must start inside the input
        out_ceil -= 1
    return (out_ceil - out_floor) * s if out_ceil > out_floor else 0


class MaxPool2d(nn.Module):
    """Max pooling with PyTorch semantics (``-inf`` padding, floor or ceil output size).

    Computed from strided slices of the input, one per window offset; the maximum's gradient
    goes to the first maximal entry of each window (row-major), exactly as
    ``lax.reduce_window`` and ``torch.nn.MaxPool2d``, without the slow backward pass of
    ``reduce_window`` on CPU. ``ceil_mode=True`` matches
    ``torch.nn.MaxPool2d(..., ceil_mode=True)`` (used by Caffe-converted models).
    """

    kernel: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = _pair(self.kernel)
        s = _pair(self.stride if self.stride is not None else self.kernel)
        p = _pair(self.padding)
        extra = (0, 0)
        if self.ceil_mode:
            extra = (_ceil_extra(x.shape[1], k[0], s[0], p[0]), _ceil_extra(x.shape[2], k[1], s[1], p[1]))
        if p != (0, 0) or extra != (0, 0):
            pads = ((0, 0), (p[0], p[0] + extra[0]), (p[1], p[1] + extra[1]), (0, 0))
            x = jnp.pad(x, pads, constant_values=-jnp.inf)
        return _first_max(strided_windows(x, k, s, what="pooling window"))


def _first_max(windows: Sequence[jax.Array]) -> jax.Array:
    """Elementwise maximum of the windows whose gradient goes entirely to the *first* maximal one.

    That is PyTorch's (and ``lax.reduce_window``'s) max-pooling gradient; a plain ``max``
    reduction would split it equally among tied entries (all-zero windows after a ReLU tie),
    which changes Grad-CAM++, Excitation Backprop and every other method that reads
    gradients at pooled layers. A left fold of ``where(m >= w, m, w)`` keeps the earlier
    entry on ties, and each ``where`` sends the whole cotangent to the entry it selected, so
    forward and backward are elementwise selects that XLA fuses with the strided slices
    (a stacked ``argmax`` over a leading axis is ~40x slower on CPU).
    """
    m = windows[0]
    for w in windows[1:]:
        m = jnp.where((m >= w) | jnp.isnan(m), m, w)  # NaN propagates, as in torch
    return m


class AvgPool2d(nn.Module):
    """Average pooling with PyTorch defaults (zero padding counted in the divisor)."""

    kernel: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = _pair(self.kernel)
        s = _pair(self.stride if self.stride is not None else self.kernel)
        p = _pair(self.padding)
        if k == s and p == (0, 0):
            return _blocks(x, k).mean(axis=(2, 4))
        if p != (0, 0):
            x = jnp.pad(x, ((0, 0), (p[0], p[0]), (p[1], p[1]), (0, 0)))
        return sum(strided_windows(x, k, s, what="pooling window")) / (k[0] * k[1])


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row-stochastic (size_out, size_in) matrix of PyTorch's adaptive average pooling bins.

    Bin ``i`` covers ``[floor(i*H/out), ceil((i+1)*H/out))`` exactly as
    ``torch.nn.AdaptiveAvgPool2d``; this also covers ``size_out > size_in`` (replication).
    """
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveAvgPool2d(nn.Module):
    """``torch.nn.AdaptiveAvgPool2d``: NHWC -> N,out_h,out_w,C (``(1, 1)`` = global average)."""

    output_size: int | tuple[int, int] = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        oh, ow = _pair(self.output_size)
        h, w = x.shape[1], x.shape[2]
        if (oh, ow) == (1, 1):
            return jnp.mean(x, axis=(1, 2), keepdims=True)
        if (oh, ow) == (h, w):
            return x
        mh = jnp.asarray(adaptive_pool_matrix(h, oh), dtype=x.dtype)
        mw = jnp.asarray(adaptive_pool_matrix(w, ow), dtype=x.dtype)
        return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x)


class Flatten(nn.Module):
    """Flattens N,H,W,C to N,H*W*C (NHWC order; ported VGG weights are permuted to match)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class Dropout(nn.Module):
    """Dropout that is the identity unless ``train=True`` (needs a ``dropout`` RNG then)."""

    rate: float = 0.5
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dropout(self.rate, deterministic=not self.train)(x)


class Add(nn.Module):
    """Elementwise sum of the branches of a residual connection (a rule hook point)."""

    @nn.compact
    def __call__(self, *xs: jax.Array) -> jax.Array:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Concat(nn.Module):
    """Channel concatenation (DenseNet, Inception branches; a rule hook point)."""

    @nn.compact
    def __call__(self, *xs: jax.Array) -> jax.Array:
        return jnp.concatenate(xs, axis=-1)
