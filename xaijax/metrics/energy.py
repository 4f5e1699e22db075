"""Energy-based pointing game (Score-CAM, Wang et al. 2020; used by UCAG, Hong et al. 2023).

Instead of asking whether the map's single maximum falls on the object, the energy-based
game asks *how much* of the map's energy falls on it. For an (image, class) pair with map
``R`` and class region ``B`` (union of the class's boxes or instance masks)::

    energy(R, B) = sum_{p in B} R+_p / sum_{p} R+_p,      R+ = max(R, 0)

a number in [0, 1]; a map with no positive energy scores 0 (the reference code turns the
0/0 into 0 with ``nan_to_num``).

Provenance: ``EnergyPointingGame.evaluate`` in the UCAG authors' ``pointing_game.py``
(KU-HJH/UCAG) divides ``(map * mask).sum()`` by ``map.sum()``; its maps are CAMs after
ReLU and min-max normalisation, hence non-negative, and for those the positive part above
is the same number. xaijax takes the positive part explicitly so that signed maps
(LRP, RAP, gradients) give a fraction in [0, 1] rather than a ratio of signed sums.

Aggregation: per-class mean of the pair values, then the mean over the classes that have
pairs (the pointing game's convention). The authors' code averages over all classes, a class
without pairs counting 0 (it divides by ``max(count, 1)``); on a full VOC/COCO test set
every class has pairs and the two agree, on a small run xaijax does not count absent classes
as failures. ALL uses every pair, DIF the pointing game's difficult subset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import as_float

__all__ = ["energy_fraction", "class_mean_all"]


def energy_fraction(maps: jax.Array, regions: jax.Array) -> jax.Array:
    """Fraction of positive map energy inside the region, per pair.

    Args:
      maps: (N, H, W) real-valued maps at image resolution.
      regions: (N, H, W) bool class regions.

    Returns:
      (N,) in [0, 1], the maps' float dtype (integer maps: float32); 0 where a map has no
      positive value.
    """
    maps = as_float(maps)
    regions = jnp.asarray(regions, bool)
    if maps.ndim != 3 or maps.shape != regions.shape:
        raise ValueError(f"maps and regions must both be (N, H, W); got {maps.shape} and {regions.shape}")
    pos = jnp.maximum(maps, 0.0)
    inside = jnp.sum(jnp.where(regions, pos, 0.0), axis=(1, 2))
    total = jnp.sum(pos, axis=(1, 2))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)


def class_mean_all(values: np.ndarray, classes: np.ndarray, num_classes: int, subset: np.ndarray | None = None) -> float:
    """Mean over the classes with pairs of the per-class mean of ``values`` (absent classes are
    left out, as in :class:`xaijax.metrics.PointingGame`; NaN when no class has pairs).

    Args:
      values: (P,) per-pair values.
      classes: (P,) int class of each pair.
      num_classes: number of classes of the dataset.
      subset: optional (P,) bool selecting the pairs to use (e.g. DIF).
    """
    values = np.asarray(values, np.float64)
    classes = np.asarray(classes, np.int64)
    if values.shape != classes.shape:
        raise ValueError(f"values and classes must have the same shape; got {values.shape} and {classes.shape}")
    if subset is not None:
        keep = np.asarray(subset, bool)
        values, classes = values[keep], classes[keep]
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes})")
    sums = np.bincount(classes, weights=values, minlength=num_classes)
    counts = np.bincount(classes, minlength=num_classes)
    present = counts > 0
    return float((sums[present] / counts[present]).mean()) if present.any() else float("nan")
