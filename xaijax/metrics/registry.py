"""Registries of evaluation metrics: *pair* metrics and *model-based* metrics.

Pair metrics score maps against ground-truth regions. A registered pair metric evaluates
a :class:`PairBatch` — one row per (image, class) pair — and returns per-pair values;
``summarize`` turns all values of a run into the dataset numbers. The demo and the
evaluation experiments iterate over :func:`names`, so a new metric shows up in every table
once it is registered here.

Model-based metrics (deletion, insertion, region insertion) also need the classifier. They
share one call::

    metric = get_model_metric("deletion")            # or with overrides: step_pixels=512
    values = metric(model_fn, images, maps, targets)  # per-image arrays, e.g. values["auc"]: (N,)
    row.update(metric.summarize(values))              # e.g. {"deletion_auc": 0.11}

where ``model_fn(x) -> logits`` takes images in the model's input space (normalised NHWC),
``images`` are those normalised images (N, H, W, C), ``maps`` (N, H, W) and ``targets``
(N,) ints. Build ``model_fn`` once per model with
:func:`xaijax.metrics.faithfulness.classifier_fn` (``classifier_fn(model, variables)``)
and reuse it: the compiled program is cached per function. Values from several batches
are concatenated along axis 0 before ``summarize``. :func:`model_metric_names` lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Protocol

import numpy as np

from xaijax.metrics import density as _density
from xaijax.metrics import energy as _energy
from xaijax.metrics import faithfulness as _faith
from xaijax.metrics import iou as _iou
from xaijax.metrics import pointing as _pointing

__all__ = [
    "PairBatch",
    "PairMetric",
    "register",
    "get",
    "names",
    "ModelMetric",
    "register_model_metric",
    "get_model_metric",
    "model_metric_names",
    "MethodMetric",
    "register_method_metric",
    "get_method_metric",
    "method_metric_names",
    "describe",
]


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """(image, class) pairs to score.

    Attributes:
      maps: (P, H, W) float attribution maps at image resolution.
      regions: (P, H, W) bool ground-truth region of the pair's class.
      classes: (P,) int class of each pair.
      dif: (P,) bool, True for pairs in the pointing game's DIF subset.
      images: optional (P, H, W, 3) RGB images of the pairs at image resolution (uint8), for
        metrics that look at the image (the dense-CRF refinement).
    """

    maps: np.ndarray
    regions: np.ndarray
    classes: np.ndarray
    dif: np.ndarray
    images: np.ndarray | None = None


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
    """Class-mean IoU of binarised maps (positive part — signed maps only, NaN otherwise — and
    above the mean); see :mod:`xaijax.metrics.iou`."""

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        return {
            "iou_positive": np.asarray(_iou.positive_iou(batch.maps, batch.regions)),
            "iou_mean": np.asarray(_iou.iou(_iou.binarize(batch.maps, "mean"), batch.regions)),
        }

    def summarize(self, values, classes, dif, num_classes):
        return {f"miou_{t}": _iou.class_mean(values[f"iou_{t}"], classes, num_classes) for t in ("positive", "mean")}


@dataclasses.dataclass(frozen=True)
class EnergyPointingMetric:
    """Energy-based pointing game (share of positive map energy in the class region); see :mod:`xaijax.metrics.energy`."""

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        return {"energy": np.asarray(_energy.energy_fraction(batch.maps, batch.regions))}

    def summarize(self, values, classes, dif, num_classes):
        return {
            "energy_pointing_all": _energy.class_mean_all(values["energy"], classes, num_classes),
            "energy_pointing_dif": _energy.class_mean_all(values["energy"], classes, num_classes, subset=dif),
        }


@dataclasses.dataclass(frozen=True)
class MapDensityMetric:
    """Positive / negative map density in the class region; see :mod:`xaijax.metrics.density`."""

    baseline: str = "mean"
    reference: str = "image"

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        d = _density.map_density(batch.maps, batch.regions, baseline=self.baseline, reference=self.reference)
        return {k: np.asarray(v) for k, v in d.items()}

    def summarize(self, values, classes, dif, num_classes):
        return _density.summarize_density(values)


@dataclasses.dataclass(frozen=True)
class ForegroundBackgroundIoUMetric:
    """Foreground/background mean IoU of maps thresholded at their mean (ImageNet-seg protocol).

    ``crf``: refine each thresholded map with a dense CRF on its image first (the "+ CRF" rows;
    ``True`` for :class:`xaijax.metrics.crf.DenseCRF`'s defaults, or a configured one).
    """

    threshold: str | float = "mean"
    crf: Any = None

    def __call__(self, batch: PairBatch) -> dict[str, np.ndarray]:
        if self.crf and batch.images is None:
            raise ValueError("fgbg-miou with crf needs the pair batch's images (PairBatch.images)")
        v = _iou.foreground_background_iou(batch.maps, batch.regions, self.threshold, crf=self.crf or None, images=batch.images)
        return {k: np.asarray(a) for k, a in v.items()}

    def summarize(self, values, classes, dif, num_classes):
        s = _iou.summarize_foreground_background(values)
        return {"fgbg_miou": s["miou_images"], "fgbg_miou_pixels": s["miou_pixels"]}


_REGISTRY: dict[str, Callable[[], PairMetric]] = {
    "pointing-game": PointingGameMetric,
    "miou": MeanIoUMetric,
    "energy-pointing": EnergyPointingMetric,
    "map-density": MapDensityMetric,
    "fgbg-miou": ForegroundBackgroundIoUMetric,
}


def _add(registry: dict[str, Callable[..., Any]], what: str, name: str, factory: Callable[..., Any]) -> None:
    """``registry[name] = factory``, refusing a name registered already (``what``: "metric", ...)."""
    if name in registry:
        raise ValueError(f"{what} {name!r} is already registered")
    registry[name] = factory


def _build(registry: dict[str, Callable[..., Any]], what: str, settings: str, name: str, options: dict[str, Any]) -> Any:
    """``registry[name](**options)``; an unknown name (with close names) or bad ``settings`` is a
    ``ValueError`` naming ``what`` ("metric", "model metric", "method metric")."""
    try:
        factory = registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}; registered: {', '.join(sorted(registry))}.{hint}") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"bad {settings} for {what} {name!r}: {e}") from None


def register(name: str, factory: Callable[[], PairMetric]) -> None:
    """Add a metric (``factory()`` builds it with default settings)."""
    _add(_REGISTRY, "metric", name, factory)


def get(name: str, **options: Any) -> PairMetric:
    """Build the registered metric ``name`` (``options``: its fields, e.g. ``crf=True`` for ``fgbg-miou``)."""
    return _build(_REGISTRY, "metric", "options", name, options)


def names() -> list[str]:
    """Registered metric names, sorted."""
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------- model-based metrics


class ModelMetric(Protocol):
    def __call__(self, model_fn: Callable[[Any], Any], images: Any, maps: Any, targets: Any) -> dict[str, np.ndarray]: ...

    def summarize(self, values: dict[str, np.ndarray]) -> dict[str, float]: ...


_MODEL_REGISTRY: dict[str, Callable[..., ModelMetric]] = {
    "deletion": _faith.Deletion,
    "insertion": _faith.Insertion,
    "region-insertion": _faith.RegionInsertion,
}


def register_model_metric(name: str, factory: Callable[..., ModelMetric]) -> None:
    """Add a model-based metric (``factory(**overrides)`` builds it)."""
    _add(_MODEL_REGISTRY, "model metric", name, factory)


def get_model_metric(name: str, **overrides: Any) -> ModelMetric:
    """Build the registered model-based metric ``name`` (keyword overrides of its settings)."""
    return _build(_MODEL_REGISTRY, "model metric", "settings", name, overrides)


def model_metric_names() -> list[str]:
    """Registered model-based metric names, sorted."""
    return sorted(_MODEL_REGISTRY)


# ----------------------------------------------------------------------------- method-based metrics


class MethodMetric(Protocol):
    """A metric that re-runs an explanation method (robustness, randomisation, axioms).

    ``metric(model, variables, method, images, targets, maps=None)``: ``model`` / ``variables``
    the classifier (a linen module and its variables), ``method`` an xaijax
    :class:`~xaijax.methods.Method` (``method(model, variables, x, target) -> (N, H, W)``),
    ``images`` (N, H, W, C) normalised inputs, ``targets`` (N,) class indices, ``maps`` the
    method's (N, H, W) maps of ``images`` (computed when ``None``). Returns per-image arrays
    (leading axis N; each image's values depend on that image only, so batches can be
    concatenated along axis 0 before ``summarize``, which gives the dataset numbers)::

        metric = get_method_metric("max-sensitivity", n_samples=10)
        values = metric(model, variables, get("gradient"), images, targets, maps=maps)
        row.update(metric.summarize(values))     # {"max_sensitivity": 0.21}

    Cost, in method calls per image: robustness metrics ``n_samples`` (Quantus' default 200:
    pass ``n_samples=`` for a quick run; continuity ``n_steps`` = 28), MPRT / smooth MPRT one
    (smooth: ``n_samples``) per randomised layer, eMPRT and random logit 1, completeness and
    input invariance 0-1; non-sensitivity one *forward pass* per pixel (per value with
    ``unit="value"``). Metrics that do not apply to a model raise
    :class:`~xaijax.methods.NotApplicable` (e.g. input invariance without a first-layer bias).
    """

    def __call__(self, model: Any, variables: Any, method: Any, images: Any, targets: Any, maps: Any = None) -> dict[str, np.ndarray]: ...

    def summarize(self, values: dict[str, np.ndarray]) -> dict[str, float]: ...


#: filled by the metric modules at import (xaijax.metrics.robustness, randomisation, axioms)
_METHOD_REGISTRY: dict[str, Callable[..., MethodMetric]] = {}


def register_method_metric(name: str, factory: Callable[..., MethodMetric]) -> None:
    """Add a method-based metric (``factory(**options)`` builds it)."""
    _add(_METHOD_REGISTRY, "method metric", name, factory)


def get_method_metric(name: str, **options: Any) -> MethodMetric:
    """Build the registered method-based metric ``name`` (keyword overrides of its settings)."""
    return _build(_METHOD_REGISTRY, "method metric", "settings", name, options)


def method_metric_names() -> list[str]:
    """Registered method-based metric names, sorted."""
    return sorted(_METHOD_REGISTRY)


def describe(name: str) -> str:
    """One line on a registered metric of any of the three registries: the first paragraph of
    its class docstring (``xaijax metrics`` and the tables' legends print it).

    Raises:
      ValueError: no registry has ``name``.
    """
    for registry in (_REGISTRY, _MODEL_REGISTRY, _METHOD_REGISTRY):
        if name in registry:
            doc = (getattr(registry[name], "__doc__", None) or "").strip()
            return " ".join(doc.split("\n\n", 1)[0].split()) or name
    known = sorted(set(_REGISTRY) | set(_MODEL_REGISTRY) | set(_METHOD_REGISTRY))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown metric {name!r}.{hint}")
