"""Evaluation metrics: pointing game, mIoU, detection mAP, and the registry the demo iterates over."""

from xaijax.metrics import detection, iou, pointing
from xaijax.metrics.pointing import PointingGame, is_difficult_pair, pointing_hits
from xaijax.metrics.registry import PairBatch, get, names, register

__all__ = ["PairBatch", "PointingGame", "detection", "get", "iou", "is_difficult_pair", "names", "pointing", "pointing_hits", "register"]
