"""Mean IoU between binarised attribution maps and ground-truth regions.

Two binarisations, both reported by the research (its ".43/.49" cells):

* ``"positive"`` — pixels where the map is strictly positive;
* ``"mean"`` — pixels where the map is strictly above its own mean.

For a pair (map, region), IoU = |B & R| / |B | R| (0 when both are empty). The dataset
number is the mean over classes of the per-class mean IoU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["binarize", "iou", "class_mean"]


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
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def class_mean(values: np.ndarray, classes: np.ndarray, num_classes: int) -> float:
    """Mean over the classes that have pairs of the per-class mean of ``values``."""
    values = np.asarray(values, np.float64)
    classes = np.asarray(classes, np.int64)
    sums = np.bincount(classes, weights=values, minlength=num_classes)
    counts = np.bincount(classes, minlength=num_classes)
    present = counts > 0
    if not present.any():
        return float("nan")
    return float((sums[present] / counts[present]).mean())
