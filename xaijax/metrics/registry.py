"""Registry of *localisation* metrics that score maps against ground-truth regions.

A registered metric evaluates a :class:`PairBatch` — one row per (image, class) pair — and
returns per-pair values; ``summarize`` turns all values of a run into the dataset numbers.
The demo and the evaluation experiments iterate over :func:`names`, so a new metric shows
up in every table once it is registered here.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Protocol

import numpy as np

from xaijax.metrics import iou as _iou
from xaijax.metrics import pointing as _pointing

__all__ = ["PairBatch", "PairMetric", "register", "get", "names"]


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """(image, class) pairs to score.

    Attributes:
      maps: (P, H, W) float attribution maps at image resolution.
      regions: (P, H, W) bool ground-truth region of the pair's class.
      classes: (P,) int class of each pair.
      dif: (P,) bool, True for pairs in the pointing game's DIF subset.
    """

    maps: np.ndarray
    regions: np.ndarray
    classes: np.ndarray
    dif: np.ndarray


class PairMetric(Protocol):
    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]: ...

    def summarize(self, values: dict[str, np.ndarray], classes: np.ndarray, dif: np.ndarray, num_classes: int) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class PointingGameMetric:
    """Pointing game (TorchRay protocol), ALL and DIF subsets; see :mod:`xaijax.metrics.pointing`."""

    tolerance: float = 15.0

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        return {"hit": np.asarray(_pointing.pointing_hits(batch.maps, batch.regions, self.tolerance))}

    def summarize(self, values, classes, dif, num_classes):
        pg = _pointing.PointingGame(num_classes)
        pg.update(classes, values["hit"], dif)
        r = pg.result()
        return {"pointing_all": r["all"], "pointing_dif": r["dif"]}


@dataclasses.dataclass(frozen=True)
class MeanIoUMetric:
    """Class-mean IoU of binarised maps (positive part, and above the mean); see :mod:`xaijax.metrics.iou`."""

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        return {
            f"iou_{t}": np.asarray(_iou.iou(_iou.binarize(batch.maps, t), batch.regions)) for t in ("positive", "mean")
        }

    def summarize(self, values, classes, dif, num_classes):
        return {f"miou_{t}": _iou.class_mean(values[f"iou_{t}"], classes, num_classes) for t in ("positive", "mean")}


_REGISTRY: dict[str, Callable[[], PairMetric]] = {
    "pointing-game": PointingGameMetric,
    "miou": MeanIoUMetric,
}


def register(name: str, factory: Callable[[], PairMetric]) -> None:
    """Add a metric (``factory()`` builds it with default settings)."""
    if name in _REGISTRY:
        raise ValueError(f"metric {name!r} is already registered")
    _REGISTRY[name] = factory


def get(name: str) -> PairMetric:
    """Build the registered metric ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(names())}.{hint}") from None


def names() -> list[str]:
    """Registered metric names, sorted."""
    return sorted(_REGISTRY)
