"""Mean IoU between binarised attribution maps and ground-truth regions.

Two binarisations, both reported by the research (its ".43/.49" cells):

* ``"positive"`` — pixels where the map is strictly positive;
* ``"mean"`` — pixels where the map is strictly above its own mean.

For a pair (map, region), IoU = |B & R| / |B | R| (0 when both are empty). The dataset
number is the mean over classes of the per-class mean IoU.

``miou_positive`` is defined for *signed* maps only (:func:`positive_iou`). The research
reports it for relevance maps whose sign means something (LRP, RAP, RSP: positive evidence for
the class, negative against it); there the positive part is the evidence *for* the class. A map
with no negative value (gradient magnitudes, CAMs after their ReLU, RISE, ...) is positive almost
everywhere, so its "positive part" is about the whole image and the IoU equals the region's area
fraction whatever the method does (0.0323 for 15 of 33 demo methods before this definition). Such
a pair has no ``iou_positive`` (NaN), :func:`class_mean` leaves it out, and a method none of whose
maps has a negative value gets NaN, shown as "n/a" in the tables; ``miou_mean`` is the number to
compare across all methods. :data:`MIOU_LEGEND` is the tables' legend text for both columns.

ImageNet-segmentation protocol (Guillaumin et al.'s 4,276 foreground masks, as used by RAP,
RSP and the seed's objectness table): :func:`foreground_background_iou` thresholds a map
(at its mean by default), takes the IoU of the predicted foreground with the ground-truth
foreground **and** of the predicted background with the ground-truth background, and
averages the two. :func:`summarize_foreground_background` reports that mean averaged over
images (``miou_images``) and, as the public evaluation scripts derived from Chefer et al.'s
``imagenet_seg_eval.py`` (e.g. ``agf/imagenet_seg_eval.py`` in KU-HJH/UCAG) accumulate it,
from intersections and unions summed over the whole dataset (``miou_pixels``).

Dense-CRF refinement (the seed's "+ CRF" rows): ``foreground_background_iou(..., crf=DenseCRF(),
images=...)`` refines each thresholded map with :class:`xaijax.metrics.crf.DenseCRF` on its
image before the IoU (the optional ``crf`` extra, ``pydensecrf2``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import minmax_normalize, safe_divide
from xaijax.metrics.crf import DenseCRF

__all__ = [
    "binarize",
    "iou",
    "positive_iou",
    "MIOU_LEGEND",
    "class_mean",
    "threshold_maps",
    "foreground_background_iou",
    "summarize_foreground_background",
]



#: What the mIoU columns of the tables measure (their legend).
MIOU_LEGEND: dict[str, str] = {
    "miou_positive": "mIoU of the map's positive part (pixels > 0) with the class region, for signed maps only: "
    "a pair whose map has no negative value is left out, and a method whose maps never have one is n/a (for such "
    "maps the positive part is about the whole image and the IoU only measures the region's size); "
    "mean IoU per class, mean over classes",
    "miou_mean": "mIoU of the pixels above the map's own mean with the class region (every map); "
    "mean IoU per class, mean over classes",
}


def binarize(maps: jax.Array, threshold: str = "mean") -> jax.Array:
    """(N, H, W) maps -> (N, H, W) bool by ``"positive"`` or ``"mean"`` thresholding."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got {maps.shape}")
    if threshold == "positive":
        return maps > 0
    if threshold == "mean":
        return maps > maps.mean(axis=(1, 2), keepdims=True)
    raise ValueError(f"unknown threshold {threshold!r}; use 'positive' or 'mean'")


def iou(masks: jax.Array, regions: jax.Array) -> jax.Array:
    """(N,) IoU of boolean (N, H, W) masks with boolean (N, H, W) regions."""
    masks = jnp.asarray(masks, bool)
    regions = jnp.asarray(regions, bool)
    if masks.shape != regions.shape:
        raise ValueError(f"masks and regions must have the same shape; got {masks.shape} and {regions.shape}")
    inter = jnp.sum(masks & regions, axis=(1, 2))
    union = jnp.sum(masks | regions, axis=(1, 2))
    return safe_divide(jnp.asarray(inter, float), union)


def positive_iou(maps: jax.Array, regions: jax.Array) -> jax.Array:
    """(N,) IoU of each map's positive part (> 0) with its region, NaN for a map with no
    negative value (the positive part of a non-negative map is not a decision of the method;
    see the module docstring)."""
    maps = jnp.asarray(maps)
    signed = jnp.any(binarize(-maps, "positive"), axis=(1, 2))
    value = iou(binarize(maps, "positive"), regions)
    return jnp.where(signed, value, jnp.nan)


def class_mean(values: np.ndarray, classes: np.ndarray, num_classes: int) -> float:
    """Mean over the classes that have pairs of the per-class mean of ``values``.

    NaN values (pairs without a value, e.g. :func:`positive_iou` of a non-negative map) are
    left out; NaN when no pair has a value."""
    values = np.asarray(values, np.float64)
    classes = np.asarray(classes, np.int64)
    keep = ~np.isnan(values)
    values, classes = values[keep], classes[keep]
    sums = np.bincount(classes, weights=values, minlength=num_classes)
    counts = np.bincount(classes, minlength=num_classes)
    present = counts > 0
    if not present.any():
        return float("nan")
    return float((sums[present] / counts[present]).mean())


def threshold_maps(maps: jax.Array, threshold: str | float = "mean") -> jax.Array:
    """(N, H, W) maps -> (N, H, W) bool foreground.

    ``threshold`` is ``"mean"`` (strictly above the map's own mean), ``"positive"``
    (strictly above 0), or a float ``t`` (strictly above ``t`` after min-max normalising
    each map to [0, 1]; a constant map has no foreground).
    """
    if isinstance(threshold, str):
        return binarize(maps, threshold)
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got {maps.shape}")
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"a numeric threshold applies to min-max normalised maps and must lie in [0, 1]; got {t}")
    return minmax_normalize(maps) > t  # a constant map normalises to 0, never above t >= 0


def foreground_background_iou(
    maps: jax.Array, masks: jax.Array, threshold: str | float = "mean", *, crf: Any = None, images: Any = None
) -> dict[str, jax.Array]:
    """Foreground and background IoU of thresholded maps with ground-truth foreground masks.

    Args:
      maps: (N, H, W) maps at mask resolution.
      masks: (N, H, W) bool ground-truth foreground.
      threshold: see :func:`threshold_maps` (``"mean"`` is the protocol's default).
      crf: ``None``, or a :class:`xaijax.metrics.crf.DenseCRF` that refines each thresholded
        map on its image before the IoU (``True``: ``DenseCRF()`` with its defaults).
      images: (N, H, W, 3) RGB images (uint8, or floats in [0, 1]) at mask resolution; needed
        with ``crf``.

    Returns:
      per-image ``iou_fg``, ``iou_bg``, ``miou`` = (iou_fg + iou_bg) / 2 (float, (N,)), and
      the integer counts ``inter_fg``, ``union_fg``, ``inter_bg``, ``union_bg`` (N,) for
      dataset-level accumulation. An empty union gives IoU 0, as :func:`iou` does.
    """
    masks = jnp.asarray(masks, bool)
    pred = threshold_maps(maps, threshold)
    if crf is not None and crf is not False:
        if images is None:
            raise ValueError("dense-CRF refinement needs the images: pass images=(N, H, W, 3) with crf")
        refine = DenseCRF() if crf is True else crf
        pred = jnp.asarray(refine.refine_batch(np.asarray(images), np.asarray(pred)))
    if pred.shape != masks.shape:
        raise ValueError(f"maps and masks must have the same shape (N, H, W); got {pred.shape} and {masks.shape}")
    out: dict[str, jax.Array] = {}
    for name, p, g in (("fg", pred, masks), ("bg", ~pred, ~masks)):
        inter = jnp.sum(p & g, axis=(1, 2))
        union = jnp.sum(p | g, axis=(1, 2))
        out[f"inter_{name}"], out[f"union_{name}"] = inter, union
        out[f"iou_{name}"] = safe_divide(jnp.asarray(inter, float), union)
    out["miou"] = (out["iou_fg"] + out["iou_bg"]) / 2
    return out


def summarize_foreground_background(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Dataset numbers from :func:`foreground_background_iou` values (concatenated over batches).

    ``miou_images``: mean over images of the per-image fg/bg mean IoU. ``miou_pixels``: the
    mean over {fg, bg} of (sum of intersections / sum of unions) over the dataset.
    ``iou_fg``/``iou_bg``: per-image means of each part.
    """
    v = {k: np.asarray(a) for k, a in values.items()}
    if v["miou"].size == 0:
        return {"miou_images": float("nan"), "miou_pixels": float("nan"), "iou_fg": float("nan"), "iou_bg": float("nan")}
    pix = [v[f"inter_{n}"].sum() / max(int(v[f"union_{n}"].sum()), 1) for n in ("fg", "bg")]
    return {
        "miou_images": float(v["miou"].mean()),
        "miou_pixels": float(np.mean(pix)),
        "iou_fg": float(v["iou_fg"].mean()),
        "iou_bg": float(v["iou_bg"].mean()),
    }
