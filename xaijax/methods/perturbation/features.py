"""Feature masks for the perturbation methods, and the chunked evaluation of perturbed inputs.

A *feature mask* partitions each image's pixels into features: an int array ``(N, H, W)``
(or ``(H, W)``, shared by the batch) whose values are feature ids ``0 .. F_i - 1`` for sample
``i`` (every id present: no gaps). A feature covers all channels of its pixels (Captum's
``feature_mask`` of shape ``(N, 1, H, W)``, broadcast over channels). Samples may have
different feature counts ``F_i`` (superpixels): the batch is padded to ``F = max_i F_i``, and
the ids ``F_i .. F - 1`` of sample ``i`` are *absent* features (no pixels; they change nothing
and get attribution 0).

Where masks come from:

* :func:`grid_feature_mask` — square cells of ``cell`` pixels, row-major ids (the default of
  the feature methods; built with ``jnp`` ops, so it exists inside ``jit``);
* :func:`slic_feature_mask` — SLIC superpixels from scikit-image on the host (concrete images
  only; each image min-max scaled to [0, 1] first, ids relabelled to ``0 .. F_i - 1``);
* given by the user: checked by :func:`validate_feature_mask` (integer dtype, shape, no gaps).

Perturbing: ``keep`` is a binary vector per sample over the features (1: the original pixels,
0: the baseline's); :func:`compose` builds the perturbed images. :func:`scan_scores` evaluates
``count`` perturbations in chunks of ``chunk`` inside ``lax.scan`` (memory: ``chunk * N``
images, whatever ``count`` is) and folds each chunk's target scores into an accumulator.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import as_seed

__all__ = [
    "grid_feature_mask",
    "slic_feature_mask",
    "validate_feature_mask",
    "feature_counts",
    "broadcast_features",
    "compose",
    "broadcast_baseline",
    "scan_scores",
    "SEGMENTATIONS",
    "validate_segmentation",
    "resolve_feature_mask",
]


def grid_feature_mask(size: tuple[int, int], cell: int | tuple[int, int]) -> jax.Array:
    """(H, W) int32 feature ids of a grid of ``cell`` pixel cells (``(ch, cw)`` or one int).

    Cell ``(r, c)`` (row-major, ``ceil(W / cw)`` cells per row) has id ``r * ceil(W / cw) + c``;
    the last row / column of cells is partial when the size is not a multiple of the cell.
    """
    ch, cw = (cell, cell) if isinstance(cell, (int, np.integer)) else (int(cell[0]), int(cell[1]))
    h, w = int(size[0]), int(size[1])
    if ch < 1 or cw < 1:
        raise ValueError(f"grid cell must be positive, got {cell!r}")
    per_row = -(-w // cw)
    rows = jax.lax.broadcasted_iota(jnp.int32, (h, w), 0) // ch
    cols = jax.lax.broadcasted_iota(jnp.int32, (h, w), 1) // cw
    return rows * per_row + cols


def slic_feature_mask(images: Any, n_segments: int = 50, compactness: float = 10.0, sigma: float = 1.0) -> np.ndarray:
    """(N, H, W) int32 SLIC superpixels (scikit-image ``segmentation.slic``) of concrete images (N, H, W, C).

    Each image is min-max scaled to [0, 1] (the methods see normalised images) and segmented
    with ``slic(img, n_segments, compactness, sigma, start_label=0, channel_axis=-1)``; labels
    are relabelled to ``0 .. F_i - 1`` (``F_i`` varies between images; SLIC's count is
    approximate).
    """
    if isinstance(images, jax.core.Tracer):
        raise TypeError(
            "slic_feature_mask runs scikit-image on the host and needs concrete images; under jit/vmap "
            "compute the mask outside and pass it as feature_mask="
        )
    from skimage.segmentation import slic

    x = np.asarray(images, np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be an NHWC batch (N, H, W, C); got shape {x.shape}")
    out = np.empty(x.shape[:3], np.int32)
    for i, img in enumerate(x):  # host-side preprocessing, once per image (not a hot path)
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        seg = slic(img, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0, channel_axis=-1)
        out[i] = np.unique(seg, return_inverse=True)[1].reshape(seg.shape)
    return out


def validate_feature_mask(mask: Any, n: int, size: tuple[int, int], owner: str, name: str = "feature_mask") -> np.ndarray:
    """The mask as an (N, H, W) int32 NumPy array, checked.

    Raises:
      TypeError: a traced mask (the feature count is a static shape: pass a concrete array) or
        a non-integer dtype.
      ValueError: a shape other than (H, W) or (N, H, W); negative ids; a sample whose ids are
        not exactly ``0 .. F_i - 1`` (gaps) — the message names ``name`` and the sample.
    """
    if isinstance(mask, jax.core.Tracer):
        raise TypeError(
            f"{owner}: {name} must be a concrete array (its number of features sets static shapes); "
            "it is traced here — build it outside jit/vmap"
        )
    m = np.asarray(mask)
    if not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"{owner}: {name} must hold integer feature ids, got dtype {m.dtype}")
    h, w = size
    if m.shape == (h, w):
        m = np.broadcast_to(m, (n, h, w))
    if m.shape != (n, h, w):
        raise ValueError(f"{owner}: {name} must have shape (N, H, W) = {(n, h, w)} or (H, W) = {(h, w)}; got {m.shape}")
    if m.min() < 0:
        raise ValueError(f"{owner}: {name} holds negative ids (min {int(m.min())}); ids must be 0 .. F-1")
    for i in range(n):
        ids = np.unique(m[i])
        if ids[-1] != len(ids) - 1:
            missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise ValueError(
                f"{owner}: {name} of sample {i} has gaps: ids up to {int(ids[-1])} but {shown} missing; ids must be "
                "0 .. F-1 with every id present (relabel with np.unique(mask, return_inverse=True))"
            )
    return np.ascontiguousarray(m, np.int32)


def feature_counts(mask: jax.Array) -> jax.Array:
    """(N,) int32 number of features ``F_i = max id + 1`` of each sample of an (N, H, W) mask."""
    return mask.reshape(mask.shape[0], -1).max(-1) + 1


def broadcast_features(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-feature values (N, F) -> per-pixel map (N, H, W): each pixel gets its feature's value."""
    n, h, w = mask.shape
    return jnp.take_along_axis(values, mask.reshape(n, h * w), axis=1).reshape(n, h, w)


def compose(x: jax.Array, baseline: jax.Array, keep_pixels: jax.Array) -> jax.Array:
    """Perturbed images ``x * keep + baseline * (1 - keep)``: ``keep_pixels`` (..., N, H, W) in [0, 1]."""
    k = keep_pixels[..., None].astype(x.dtype)
    return x * k + baseline * (1 - k)


def broadcast_baseline(baseline: Any, x_shape: tuple[int, ...], dtype: Any, owner: str, name: str = "baselines") -> jax.Array:
    """The baseline as an (N, H, W, C) array of ``dtype``: a scalar, (C,), (H, W, C) or (N, H, W, C).

    Raises:
      ValueError: any other shape (the message names ``name``).
    """
    b = jnp.asarray(baseline)
    n, h, w, c = x_shape
    allowed = ((), (c,), (h, w, c), (n, h, w, c))
    if tuple(b.shape) not in allowed:
        raise ValueError(
            f"{owner}: {name} must be a scalar or have shape (C,) = {(c,)}, (H, W, C) = {(h, w, c)} or "
            f"(N, H, W, C) = {(n, h, w, c)}; got {tuple(b.shape)}"
        )
    if not (jnp.issubdtype(b.dtype, jnp.floating) or jnp.issubdtype(b.dtype, jnp.integer)):
        raise TypeError(f"{owner}: {name} must be numeric, got dtype {b.dtype}")
    return jnp.broadcast_to(b.astype(dtype), x_shape)


def scan_scores(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    target: Any,
    count: int,
    chunk: int,
    make_inputs: Callable[[jax.Array], jax.Array],
    accumulate: Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], Any],
    init: Any,
) -> tuple[Any, jax.Array]:
    """Evaluate ``count`` perturbations of the batch ``x`` (N, H, W, C), ``chunk`` at a time.

    Args:
      target: class indices or an (N, K) seed; the score of an output row is ``sum(seed * out)``
        (the target logit), as :func:`xaijax.methods._core.target_scores`.
      make_inputs: ``indices (chunk,) -> images (chunk, N, H, W, C)``; indices past ``count``
        are clipped to ``count - 1`` (their scores are masked).
      accumulate: ``(carry, indices (chunk,), valid (chunk,) bool, scores (chunk, N), score of x
        (N,)) -> carry`` (``scores`` are zeroed where not ``valid``).
      init: the initial carry.

    Returns:
      ``(carry, score of x (N,))``. Memory: ``chunk * N`` perturbed images per scan step.
    """
    n = x.shape[0]
    out0 = model.apply(variables, x)
    seed = as_seed(target, out0.shape[-1], n, x.dtype)
    s0 = (out0.astype(x.dtype) * seed).sum(-1)
    chunk = min(chunk, count)
    n_chunks = -(-count // chunk)

    def step(carry, ci):
        idx = ci * chunk + jnp.arange(chunk)
        valid = idx < count
        xs = make_inputs(jnp.minimum(idx, count - 1))
        out = model.apply(variables, xs.reshape((chunk * n,) + x.shape[1:]))
        sc = (out.reshape(chunk, n, -1).astype(x.dtype) * seed[None]).sum(-1)
        sc = jnp.where(valid[:, None], sc, 0)
        return accumulate(carry, idx, valid, sc, s0), None

    carry, _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
    return carry, s0


#: how the feature methods make their mask when none is given.
SEGMENTATIONS = ("grid", "slic")


def validate_segmentation(owner: str, segmentation: str, cell: Any, n_segments: Any) -> None:
    """Check the mask hyperparameters shared by the feature methods (ValueError naming the field)."""
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"{owner}: segmentation must be one of {SEGMENTATIONS}, got {segmentation!r}")
    cells = (cell, cell) if not isinstance(cell, tuple) else cell
    if len(cells) != 2 or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in cells):
        raise ValueError(f"{owner}: cell must be a positive int or a pair of them, got {cell!r}")
    if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or n_segments < 1:
        raise ValueError(f"{owner}: n_segments must be a positive int, got {n_segments!r}")


def resolve_feature_mask(
    owner: str, x: Any, feature_mask: Any, segmentation: str, cell: Any, n_segments: int, compactness: float
) -> tuple[jax.Array, int]:
    """``(mask (N, H, W) int32, F)``: the given ``feature_mask`` (validated), else the configured
    segmentation of ``x`` (``"grid"``: cells of ``cell`` pixels; ``"slic"``: scikit-image SLIC on
    the host, concrete ``x`` only). ``F`` (static) is the largest feature count of the batch."""
    n, h, w, _ = x.shape
    if feature_mask is not None:
        m = validate_feature_mask(feature_mask, n, (h, w), owner)
        return jnp.asarray(m), int(m.max()) + 1
    if segmentation == "grid":
        ch, cw = (cell, cell) if not isinstance(cell, tuple) else cell
        if ch > h or cw > w:
            raise ValueError(f"{owner}: cell {(ch, cw)} is larger than the image {(h, w)}")
        f = (-(-h // ch)) * (-(-w // cw))
        return jnp.broadcast_to(grid_feature_mask((h, w), (ch, cw)), (n, h, w)), f
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{owner}: segmentation='slic' runs scikit-image on the host and needs concrete images; under "
            "jit/vmap pass feature_mask=slic_feature_mask(images) computed outside"
        )
    m = slic_feature_mask(x, n_segments, compactness)
    return jnp.asarray(m), int(m.max()) + 1
