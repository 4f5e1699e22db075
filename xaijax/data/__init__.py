"""Datasets in one record format, and bundled data files.

Every loader yields :class:`Record` (image (H, W, 3) float32 RGB in [0, 1], per-object
labels, boxes ``[x0, y0, x1, y1)``, visible masks, difficult flags). The synthetic benchmark
(:class:`SyntheticScenes`) generates records deterministically from (seed, split, index).
"""

from xaijax.data import synthetic
from xaijax.data.records import (
    Record,
    boxes_to_mask,
    class_box_mask,
    class_mask,
    mask_to_box,
    multi_hot,
    present_classes,
)
from xaijax.data.synthetic import SyntheticScenes

__all__ = [
    "Record",
    "SyntheticScenes",
    "boxes_to_mask",
    "class_box_mask",
    "class_mask",
    "mask_to_box",
    "multi_hot",
    "present_classes",
    "synthetic",
]
