"""The pointing game (Zhang et al., 2018), with TorchRay's protocol.

For an (image, class) pair, the *point* is the location of the map's maximum (the first
one in row-major order if there are ties). It is a **hit** if some pixel of the class's
ground-truth region lies at Euclidean distance strictly less than ``tolerance`` pixels
(15 by default) from the point, i.e. ``dy**2 + dx**2 < tolerance**2``. The region is the
union of the class's instance masks (COCO, synthetic) or of its boxes (VOC).

Accuracy is computed per class, ``hits / (hits + misses)``, and the reported number is the
mean over the classes that have at least one evaluated pair. TorchRay averages over all
classes, a class with no evaluated pair scoring 0 (``hits / max(hits + misses, 1)``); on a
full VOC/COCO test set every class has pairs and the two agree (see
:meth:`PointingGame.result`).

Subsets: ``ALL`` uses every pair; ``DIF`` ("difficult") uses only pairs for which
:func:`is_difficult_pair` holds — the class covers less than a quarter of the image and at
least one other class (a distractor) is present. This is the rule of the Excitation
Backprop paper behind TorchRay's ``*_difficult.txt`` lists, implemented here instead of
vendoring the lists. Pairs whose every instance is flagged difficult (VOC's ``difficult``
tag) are skipped, as TorchRay does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pointing_hits", "is_difficult_pair", "PointingGame"]


def pointing_hits(maps: jax.Array, regions: jax.Array, tolerance: float = 15.0) -> jax.Array:
    """Hit/miss of a batch of maps against ground-truth regions.

    Args:
      maps: (N, H, W) saliency maps (any real values; the maximum is the point).
      regions: (N, H, W) bool, the target class's region.
      tolerance: radius in pixels (strict inequality).

    Returns:
      (N,) bool, True for a hit.
    """
    maps = jnp.asarray(maps)
    regions = jnp.asarray(regions, bool)
    if maps.ndim != 3 or maps.shape != regions.shape:
        raise ValueError(f"maps and regions must both be (N, H, W); got {maps.shape} and {regions.shape}")
    n, h, w = maps.shape
    idx = jnp.argmax(maps.reshape(n, -1), axis=1)
    py, px = idx // w, idx % w
    yy = jnp.arange(h)[None, :, None]
    xx = jnp.arange(w)[None, None, :]
    d2 = (yy - py[:, None, None]) ** 2 + (xx - px[:, None, None]) ** 2
    return jnp.any(regions & (d2 < tolerance**2), axis=(1, 2))


def is_difficult_pair(class_area_fraction: float, num_classes_present: int) -> bool:
    """DIF subset rule: the class covers < 1/4 of the image and another class is present."""
    return class_area_fraction < 0.25 and num_classes_present > 1


@dataclasses.dataclass
class PointingGame:
    """Accumulates hits per class; ``result()`` gives per-class and mean accuracy.

    Use ``update(classes, hits, difficult)`` once per batch of (image, class) pairs.
    """

    num_classes: int
    hits: np.ndarray = dataclasses.field(init=False)
    totals: np.ndarray = dataclasses.field(init=False)
    dif_hits: np.ndarray = dataclasses.field(init=False)
    dif_totals: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        z = lambda: np.zeros(self.num_classes, np.int64)  # noqa: E731
        self.hits, self.totals, self.dif_hits, self.dif_totals = z(), z(), z(), z()

    def update(self, classes: np.ndarray, hits: np.ndarray, difficult: np.ndarray | None = None) -> None:
        """Add pairs: ``classes`` (P,) int, ``hits`` (P,) bool, ``difficult`` (P,) bool (DIF)."""
        classes = np.asarray(classes, np.int64)
        hits = np.asarray(hits, bool)
        if classes.shape != hits.shape:
            raise ValueError(f"classes and hits must have the same shape; got {classes.shape} and {hits.shape}")
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class index out of range [0, {self.num_classes})")
        np.add.at(self.totals, classes, 1)
        np.add.at(self.hits, classes, hits.astype(np.int64))
        if difficult is not None:
            d = np.asarray(difficult, bool)
            np.add.at(self.dif_totals, classes[d], 1)
            np.add.at(self.dif_hits, classes[d], hits[d].astype(np.int64))

    @staticmethod
    def _acc(h: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.where(t > 0, h / np.maximum(t, 1), np.nan)

    @staticmethod
    def _mean(acc: np.ndarray) -> float:
        ok = ~np.isnan(acc)
        return float(acc[ok].mean()) if ok.any() else float("nan")

    def result(self) -> dict[str, float | list[float]]:
        """``{"all": mean accuracy, "dif": mean accuracy on DIF, "per_class_all": [...], ...}``.

        The mean is over the classes that have at least one pair (a class without pairs has
        accuracy NaN and is left out; NaN when no class has pairs). On a full VOC/COCO test set
        every class has pairs and this is TorchRay's mean over all classes; on a small run it
        keeps absent classes from counting as misses.
        """
        acc = self._acc(self.hits, self.totals)
        dif = self._acc(self.dif_hits, self.dif_totals)
        return {
            "all": self._mean(acc),
            "dif": self._mean(dif),
            "per_class_all": acc.tolist(),
            "per_class_dif": dif.tolist(),
            "pairs_all": int(self.totals.sum()),
            "pairs_dif": int(self.dif_totals.sum()),
        }
