"""Image and map operations shared by methods, metrics and figures: one home for each.

* :func:`resize` — PyTorch's ``F.interpolate`` conventions: ``"bilinear"`` (half-pixel
  centres, ``align_corners=False``, no antialiasing, also when shrinking),
  ``"bilinear-align-corners"`` (``align_corners=True``) and ``"bicubic"`` (Keys cubic
  convolution with ``a = -0.75``, half-pixel centres, border pixels replicated, no
  antialiasing); ``"bicubic-antialias"`` (``F.interpolate(mode="bicubic", antialias=True)``:
  Keys cubic with ``a = -0.5``, support widened by the scale when shrinking, weights
  normalised per output; what timm resamples position embeddings with).
  :func:`resize_matrix` is the same operation along one axis as a matrix.
* :func:`gaussian_blur` — separable Gaussian with reflect borders (kornia's
  ``gaussian_blur2d`` default, the taps of :func:`gaussian_kernel1d`).
* :func:`minmax_normalize` — per-sample ``(m - min) / (max - min)``, constant maps -> 0.
* :func:`safe_divide` — ``a / b`` with 0 where ``b == 0``, NaN-free also in the gradient.

All functions keep the floating dtype of their input (a float64 run stays float64) and are
jittable; the interpolation and blur matrices are built in float64 NumPy at trace time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RESIZE_METHODS",
    "resize_matrix",
    "resize",
    "gaussian_kernel1d",
    "blur_matrix",
    "gaussian_blur",
    "minmax_normalize",
    "safe_divide",
    "as_float",
]

RESIZE_METHODS = ("bilinear", "bilinear-align-corners", "bicubic", "bicubic-antialias")
_HI = jax.lax.Precision.HIGHEST


def _cubic_weight(d: np.ndarray, a: float) -> np.ndarray:
    d = np.abs(d)
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _resize_matrix_cached(in_size: int, out_size: int, method: str, a: float) -> np.ndarray:
    rows = np.arange(out_size)
    m = np.zeros((out_size, in_size), np.float64)
    if method == "bilinear-align-corners":
        src = np.zeros(out_size) if out_size == 1 else rows * (in_size - 1) / (out_size - 1)
        i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        t = src - i0
        np.add.at(m, (rows, i0), 1.0 - t)
        np.add.at(m, (rows, i1), t)
        return m
    if method == "bicubic-antialias":
        scale = in_size / out_size
        support = 2.0 * scale if scale >= 1.0 else 2.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
            w = _cubic_weight((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
        return m
    src = (rows + 0.5) * (in_size / out_size) - 0.5
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps negative source coordinates for linear modes
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, in_size - 1)
        t = src - i0
        np.add.at(m, (rows, i0), 1.0 - t)
        np.add.at(m, (rows, i1), t)
        return m
    f = np.floor(src)  # torch does not clamp the source coordinate for cubic
    t = src - f
    for k in range(-1, 3):
        idx = np.clip(f + k, 0, in_size - 1).astype(np.int64)
        np.add.at(m, (rows, idx), _cubic_weight(t - k, a))
    return m


def resize_matrix(in_size: int, out_size: int, method: str = "bilinear", a: float = -0.75) -> np.ndarray:
    """(out_size, in_size) float64 matrix of a 1-D resize in PyTorch's convention.

    Args:
      in_size, out_size: lengths (>= 1).
      method: one of :data:`RESIZE_METHODS`.
      a: the cubic convolution parameter (``"bicubic"`` only; PyTorch uses -0.75).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; use one of {', '.join(RESIZE_METHODS)}")
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    return _resize_matrix_cached(in_size, out_size, method, float(a)).copy()


def as_float(x: jax.Array) -> jax.Array:
    """``x`` as a JAX array of a floating dtype: float inputs keep theirs (a float64 run stays
    float64), integer and bool inputs become float32."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """Apply (H, h) and (W, w) matrices to axes 1, 2 of (N, h, w) or (N, h, w, C)."""
    mh = jnp.asarray(mh, x.dtype)
    mw = jnp.asarray(mw, x.dtype)
    if x.ndim == 3:
        return jnp.einsum("Hh,nhw,Ww->nHW", mh, x, mw, precision=_HI)
    return jnp.einsum("Hh,nhwc,Ww->nHWc", mh, x, mw, precision=_HI)


def resize(x: jax.Array, size: tuple[int, int], method: str = "bilinear", a: float = -0.75) -> jax.Array:
    """Resize maps (N, h, w) or NHWC images (N, h, w, C) to spatial ``size`` (H, W).

    ``method``: ``"bilinear"`` (``F.interpolate(mode="bilinear", align_corners=False)``),
    ``"bilinear-align-corners"`` or ``"bicubic"`` (``a``: cubic parameter). Returns the input
    unchanged when the size already matches.
    """
    x = as_float(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"resize takes maps (N, h, w) or images (N, h, w, C); got shape {x.shape}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; use one of {', '.join(RESIZE_METHODS)}")
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[1:3]) == (h, w):
        return x
    if method == "bilinear":
        # equal to the interpolation matrix (to 1e-15 in float64) and faster
        return jax.image.resize(x, (x.shape[0], h, w) + tuple(x.shape[3:]), method="linear", antialias=False)
    return _separable(x, resize_matrix(x.shape[1], h, method, a), resize_matrix(x.shape[2], w, method, a))


def gaussian_kernel1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps at offsets ``arange(size) - size // 2`` (+0.5 for even sizes), kornia's."""
    if int(size) < 1 or not float(sigma) > 0:
        raise ValueError(f"kernel size must be >= 1 and sigma > 0; got size={size}, sigma={sigma}")
    t = np.arange(int(size), dtype=np.float64) - int(size) // 2
    if int(size) % 2 == 0:
        t = t + 0.5
    g = np.exp(-(t**2) / (2.0 * float(sigma) ** 2))
    return g / g.sum()


@functools.lru_cache(maxsize=64)
def _blur_matrix_cached(n: int, size: int, sigma: float) -> np.ndarray:
    g = gaussian_kernel1d(size, sigma)
    left = size // 2
    right = size - 1 - left
    padded_eye = np.pad(np.eye(n), ((left, right), (0, 0)), mode="reflect")  # row i + left <- source
    return sum(g[k] * padded_eye[k : k + n] for k in range(size))


def blur_matrix(n: int, size: int, sigma: float) -> np.ndarray:
    """(n, n) float64 matrix applying the 1-D Gaussian of :func:`gaussian_kernel1d` with reflect borders."""
    if int(n) < 1:
        raise ValueError(f"blur needs a positive length, got {n}")
    gaussian_kernel1d(size, sigma)  # validates
    return _blur_matrix_cached(int(n), int(size), float(sigma)).copy()


def gaussian_blur(x: jax.Array, kernel_size: int = 5, sigma: float = 3.0) -> jax.Array:
    """Separable Gaussian blur of maps (N, H, W) or images (N, H, W, C).

    Reflect borders without repeating the edge pixel (kornia's ``gaussian_blur2d`` default),
    applied as two matrix products (exact for any size). UCAG post-processes CAMs with
    ``(5, 3.0)``; the deletion/insertion protocol blurs images with ``(51, 50.0)``.
    """
    x = as_float(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"gaussian_blur takes (N, H, W) maps or (N, H, W, C) images; got shape {x.shape}")
    return _separable(
        x,
        blur_matrix(x.shape[1], kernel_size, sigma),
        blur_matrix(x.shape[2], kernel_size, sigma),
    )


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def minmax_normalize(maps):
    """Per-sample ``(m - min) / (max - min)`` over all axes but the first; constant maps become 0.

    Works on NumPy arrays (computed in NumPy, dtype kept) and JAX arrays alike.
    """
    xp = _xp(maps)
    axes = tuple(range(1, maps.ndim))
    lo = maps.min(axis=axes, keepdims=True)
    span = maps.max(axis=axes, keepdims=True) - lo
    ok = span > 0
    return xp.where(ok, (maps - lo) / xp.where(ok, span, 1), 0).astype(maps.dtype)


def safe_divide(num, den):
    """``num / den`` with 0 where ``den == 0`` (no NaN or inf, also not in the gradient); dtype of ``num``."""
    xp = _xp(num) if isinstance(num, np.ndarray) and isinstance(den, np.ndarray) else jnp
    zero = den == 0
    return xp.where(zero, 0, num / xp.where(zero, 1, den)).astype(num.dtype)

