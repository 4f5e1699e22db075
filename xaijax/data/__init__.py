"""Datasets in one record format, and bundled data files.

Every loader yields :class:`Record` (image (H, W, 3) float32 RGB in [0, 1], per-object
labels, boxes ``[x0, y0, x1, y1)``, visible masks, difficult flags). The synthetic benchmark
(:class:`SyntheticScenes`) generates records deterministically from (seed, split, index).

Real datasets (lazy, indexable, optional resizing; undecodable images skipped and counted):
:func:`open_voc` (VOCdevkit folder), :func:`open_voc_tfds` (prepared TFDS ``voc/2007``,
no TensorFlow needed), :func:`open_coco` (instances JSON + images, pycocotools) and
:func:`open_imagenet_seg` (``gtsegs_ijcv.mat``, h5py).
"""

from xaijax.data import synthetic
from xaijax.data._base import CorruptImageError, DatasetLayoutError, SkippedImageWarning
from xaijax.data.broden import BrodenDataset, open_broden
from xaijax.data.coco import COCODataset, open_coco
from xaijax.data.imagenet_val import ImageNetValDataset, open_imagenet_val
from xaijax.data.imagenet_seg import ImageNetSegDataset, open_imagenet_seg
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
from xaijax.data.voc import VOC_CLASSES, VOCDataset, VOCTFDSDataset, open_voc, open_voc_tfds

__all__ = [
    "BrodenDataset",
    "ImageNetValDataset",
    "open_broden",
    "open_imagenet_val",
    "COCODataset",
    "CorruptImageError",
    "DatasetLayoutError",
    "ImageNetSegDataset",
    "Record",
    "SkippedImageWarning",
    "VOCDataset",
    "VOCTFDSDataset",
    "VOC_CLASSES",
    "SyntheticScenes",
    "boxes_to_mask",
    "class_box_mask",
    "class_mask",
    "mask_to_box",
    "multi_hot",
    "open_coco",
    "open_imagenet_seg",
    "open_voc",
    "open_voc_tfds",
    "present_classes",
    "synthetic",
]
