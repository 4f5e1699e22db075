"""ImageNet (ILSVRC2012) validation images in the class-folder layout, with optional boxes.

Layout (what torchvision's ``ImageFolder`` reads, and what the usual ``valprep.sh`` makes of
the validation tarball)::

    val/
      n01440764/ILSVRC2012_val_00000293.JPEG
      n01443537/...
      ...

Class index = position of the folder's synset id (``wnid``) in the *sorted* list of the
folder names found, which for the full 1,000 folders is the standard ImageNet class order
(the order of torchvision's pretrained heads). Pass ``wnids`` to fix the order when only
some classes are present.

Objects. Without boxes each image holds one object: its class, covering the whole image.
With ``boxes_dir`` (the ILSVRC2012 validation bounding-box XMLs, one
``<image stem>.xml`` per image, objects named by wnid, the PASCAL VOC XML format), every box
of the file is an object of that image's class; the box is converted like a VOC box
(1-based inclusive -> ``[xmin - 1, ymin - 1, xmax, ymax]``; ILSVRC's own convention is not
documented, so boxes may be off by at most one pixel) and its mask is the box region. This
is what the UCAG deletion/insertion (no boxes needed) and map-density (boxes) tables use.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from xaijax.data._base import (
    DatasetLayoutError,
    LoaderDataset,
    image_to_array,
    normalize_size,
    open_rgb,
    require_path,
    scale_boxes,
)
from xaijax.data.records import Record, boxes_to_mask

__all__ = ["ImageNetValDataset", "open_imagenet_val"]

_EXTENSIONS = (".jpeg", ".jpg", ".png")


class ImageNetValDataset(LoaderDataset):
    """ImageNet validation images by class folder (see the module docstring)."""

    def __init__(self, root: str, size: tuple[int, int] | None, wnids: Sequence[str] | None, boxes_dir: str | None) -> None:
        super().__init__()
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not found:
            raise DatasetLayoutError(f"ImageNet validation folder {root!r} has no class sub-folders (expected e.g. {root}/n01440764/*.JPEG)")
        order = list(wnids) if wnids is not None else found
        index = {w: i for i, w in enumerate(order)}
        unknown = [w for w in found if w not in index]
        if unknown:
            raise ValueError(f"class folders not in the given wnids: {unknown[:5]}")
        self._class_names = tuple(order)
        self._size = size
        self._boxes_dir = boxes_dir
        self._items: list[tuple[str, int]] = []
        for w in found:
            folder = os.path.join(root, w)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(_EXTENSIONS):
                    self._items.append((os.path.join(folder, f), index[w]))
        if not self._items:
            raise DatasetLayoutError(f"no images (.JPEG/.jpg/.png) in the class folders of {root!r}")

    def __len__(self) -> int:
        return len(self._items)

    def image_id(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self._items[index][0]))[0]

    def _boxes(self, index: int, label: int, hw: tuple[int, int]) -> np.ndarray:
        if self._boxes_dir is None:
            return np.asarray([[0.0, 0.0, hw[1], hw[0]]], np.float32)
        path = os.path.join(self._boxes_dir, self.image_id(index) + ".xml")
        if not os.path.isfile(path):
            raise DatasetLayoutError(f"bounding-box file missing: {path!r}")
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{path}: not a valid XML file ({e})") from None
        boxes = []
        for obj in root.findall("object"):
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"{path}: an object has no <bndbox>")
            try:
                x0, y0, x1, y1 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: bad <bndbox> coordinates") from None
            boxes.append([x0 - 1.0, y0 - 1.0, x1, y1])
        if not boxes:
            raise ValueError(f"{path}: no <object> boxes")
        b = np.asarray(boxes, np.float32)
        b[:, 0::2] = np.clip(b[:, 0::2], 0, hw[1])
        b[:, 1::2] = np.clip(b[:, 1::2], 0, hw[0])
        return b

    def _load(self, index: int) -> Record:
        path, label = self._items[index]
        img = open_rgb(path, path)
        src = (img.height, img.width)
        image = image_to_array(img, self._size)
        dst = image.shape[:2]
        boxes = self._boxes(index, label, src)
        if dst != src:
            boxes = scale_boxes(boxes, src, dst)
        masks = np.stack([boxes_to_mask(b[None], dst[0], dst[1]) for b in boxes]) if len(boxes) else np.zeros((0, *dst), bool)
        k = len(boxes)
        return Record(
            image=image,
            labels=np.full((k,), label, np.int32),
            boxes=boxes,
            masks=masks,
            difficult=np.zeros((k,), bool),
            image_id=self.image_id(index),
        )


def open_imagenet_val(
    root: str | os.PathLike,
    *,
    size: int | Sequence[int] | None = None,
    wnids: Sequence[str] | None = None,
    boxes_dir: str | os.PathLike | None = None,
) -> ImageNetValDataset:
    """Open ImageNet validation images in class folders (see the module docstring).

    Args:
      root: the folder holding one sub-folder per synset (``n01440764/`` ...).
      size: ``None`` (native sizes), an int or ``(height, width)``: resize every record.
      wnids: class order (default: the sorted folder names).
      boxes_dir: optional folder of ILSVRC2012 validation bounding-box XMLs.
    """
    root = require_path(root, "ImageNet validation folder", is_dir=True)
    if boxes_dir is not None:
        boxes_dir = require_path(boxes_dir, "ImageNet bounding-box folder", is_dir=True)
    return ImageNetValDataset(root, normalize_size(size), wnids, boxes_dir)
