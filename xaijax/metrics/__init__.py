"""Evaluation metrics: pointing game (hit and energy), mIoU, map density, deletion /
insertion, region insertion, sanity checks, detection mAP, and the registries the demo
iterates over (pair metrics: :func:`names`; model-based metrics: :func:`model_metric_names`)."""

from xaijax.metrics import density, detection, energy, faithfulness, iou, pointing, sanity
from xaijax.metrics import (  # noqa: F401  (importing registers the metrics of issue 23)
    axioms,
    complexity,
    faithfulness_correlation,
    faithfulness_curves,
    localisation,
    randomisation,
    robustness,
)
from xaijax.metrics.faithfulness import classifier_fn
from xaijax.metrics.pointing import PointingGame, is_difficult_pair, pointing_hits
from xaijax.metrics.registry import (
    PairBatch,
    describe,
    get,
    get_method_metric,
    get_model_metric,
    method_metric_names,
    model_metric_names,
    names,
    register,
    register_method_metric,
    register_model_metric,
)

__all__ = [
    "PairBatch",
    "PointingGame",
    "classifier_fn",
    "density",
    "describe",
    "detection",
    "energy",
    "faithfulness",
    "get",
    "get_method_metric",
    "get_model_metric",
    "iou",
    "is_difficult_pair",
    "method_metric_names",
    "model_metric_names",
    "names",
    "pointing",
    "pointing_hits",
    "register",
    "register_method_metric",
    "register_model_metric",
    "sanity",
]
