"""MS COCO instance annotations (COCO 2014 val for the pointing game) as :class:`~xaijax.data.Record`.

:func:`open_coco` reads an instances JSON (e.g. ``annotations/instances_val2014.json``)
and an image folder (e.g. ``val2014/``, holding each image's ``file_name``). Masks are
decoded with ``pycocotools`` (an optional dependency): polygons, uncompressed RLE and
compressed RLE all go through ``COCO.annToMask`` at the image size from the JSON.

Images are taken in increasing COCO image-id order (as torchvision's/TorchRay's
``CocoDetection``), including images without annotations (``K = 0``). ``Record.image_id``
is the file-name stem (e.g. ``"COCO_val2014_000000000042"``, the key of TorchRay's
difficult-subset lists); the numeric id is :meth:`COCODataset.coco_image_id`.

Classes: the JSON's categories sorted by category id are mapped to contiguous indices
``0 .. C-1`` (80 classes for COCO: id 1 "person" -> 0, ..., id 90 "toothbrush" -> 79),
with ``class_names`` the JSON names (COCO spelling: "airplane", "couch", "tv", ...);
:attr:`COCODataset.category_ids` maps back.

Objects, in the JSON's annotation order for the image: ``labels`` the contiguous class,
``boxes`` the JSON ``bbox`` ``[x, y, w, h]`` as ``[x, y, x + w, y + h]`` -- COCO boxes are
already in continuous pixel-edge coordinates (pixel ``j`` covers ``[j, j+1)``), as are
Record boxes -- clipped to the image; ``masks`` the decoded instance masks (a box comes
from the annotation's polygon, so it can differ slightly from the tight box of the
rasterised mask); ``difficult`` False, unless ``crowd="difficult"``.

Crowd regions (``iscrowd = 1``, RLE masks covering a group of objects). TorchRay's COCO
pointing game (``coco_as_mask``) takes the class region as the union of ``annToMask`` of
*every* annotation of the class, crowd ones included, and its class list includes classes
present only as crowds. The default ``crowd="include"`` reproduces that: crowd
annotations are ordinary objects. ``crowd="exclude"`` drops them; ``crowd="difficult"``
keeps them flagged ``difficult`` (a class present only as a crowd is then skipped by
evaluations that skip all-difficult classes, and ``include_difficult=False`` leaves crowd
regions out of :func:`~xaijax.data.records.class_mask`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np

from xaijax.data._base import (
    CorruptImageError,
    LoaderDataset,
    image_to_array,
    normalize_size,
    open_rgb,
    require_path,
    resize_masks,
    scale_boxes,
)
from xaijax.data.records import Record

__all__ = ["COCODataset", "open_coco", "CROWD_MODES"]

CROWD_MODES = ("include", "exclude", "difficult")


def _import_coco():
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise ImportError(
            "open_coco needs the 'pycocotools' package to decode instance masks "
            f"(pip install pycocotools, or xaijax[data]). Import failed with: {e}"
        ) from e
    return COCO


class COCODataset(LoaderDataset):
    """COCO records; build with :func:`open_coco` (see the module docstring)."""

    def __init__(
        self,
        annotation_json: str,
        image_dir: str,
        size: tuple[int, int] | None,
        crowd: str,
        require_objects: bool,
    ) -> None:
        super().__init__()
        COCO = _import_coco()
        self.annotation_json = annotation_json
        self.image_dir = image_dir
        self.crowd = crowd
        self._size = size
        try:
            with open(annotation_json, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotation_json!r}: not a valid JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{annotation_json!r}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{annotation_json!r}: not a COCO instances file, missing the key {key!r}")
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        self.coco = coco

        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.category_ids: tuple[int, ...] = tuple(int(c["id"]) for c in cats)
        self._class_names = tuple(str(c["name"]) for c in cats)
        self._cat_index = {cid: i for i, cid in enumerate(self.category_ids)}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in self._cat_index:
                raise ValueError(
                    f"{annotation_json!r}: annotation {ann.get('id')} has category_id "
                    f"{ann['category_id']}, which is not among the categories"
                )

        ids = sorted(int(i) for i in coco.imgs)
        self._anns: dict[int, list[dict]] = {}
        for i in ids:
            anns = coco.imgToAnns.get(i, [])
            if crowd == "exclude":
                anns = [a for a in anns if not a.get("iscrowd", 0)]
            self._anns[i] = list(anns)
        if require_objects:
            ids = [i for i in ids if self._anns[i]]
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def coco_image_id(self, index: int) -> int:
        """The numeric COCO image id of image ``index``."""
        return self._ids[self._index(index)]

    def image_info(self, index: int) -> dict:
        """The JSON ``images`` entry of image ``index`` (file_name, width, height, ...)."""
        return self.coco.imgs[self._ids[self._index(index)]]

    def image_id(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.image_info(index)["file_name"]))[0]

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.image_info(index)["file_name"])

    def annotations(self, index: int) -> list[dict]:
        """The JSON annotations of image ``index``, in the order of the record's objects."""
        return list(self._anns[self._ids[self._index(index)]])

    def labels(self, index: int) -> np.ndarray:
        """(K,) int32 contiguous class indices of image ``index`` (no image decoding)."""
        anns = self._anns[self._ids[self._index(index)]]
        return np.asarray([self._cat_index[int(a["category_id"])] for a in anns], np.int32).reshape(-1)

    def _load(self, index: int) -> Record:
        info = self.image_info(index)
        path = self.image_path(index)
        if not os.path.isfile(path):
            raise CorruptImageError(f"image file {path!r} does not exist")
        img = open_rgb(path, repr(path))
        h, w = int(info["height"]), int(info["width"])
        if (img.height, img.width) != (h, w):
            raise CorruptImageError(
                f"image {path!r} is {img.width}x{img.height} but the annotation file says {w}x{h} (width x height)"
            )
        anns = self._anns[self._ids[index]]
        k = len(anns)
        labels = self.labels(index)
        boxes = np.zeros((k, 4), np.float32)
        masks = np.zeros((k, h, w), bool)
        difficult = np.zeros((k,), bool)
        for j, a in enumerate(anns):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes[j] = [x, y, x + max(bw, 0.0), y + max(bh, 0.0)]
            if a.get("segmentation"):
                try:
                    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
                        warnings.simplefilter("ignore", DeprecationWarning)
                        m = self.coco.annToMask(a)
                except Exception as e:  # malformed segmentation: a data error, named
                    raise ValueError(
                        f"{self.annotation_json!r}: cannot decode the segmentation of annotation {a.get('id')} "
                        f"({type(e).__name__}: {e})"
                    ) from None
                masks[j] = np.asarray(m, bool).reshape(h, w)
            difficult[j] = self.crowd == "difficult" and bool(a.get("iscrowd", 0))
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, h)
        image = image_to_array(img, self._size)
        if self._size is not None and self._size != (h, w):
            boxes = scale_boxes(boxes, (h, w), self._size)
            masks = resize_masks(masks, self._size)
        return Record(
            image=image, labels=labels, boxes=boxes, masks=masks, difficult=difficult, image_id=self.image_id(index)
        )


def open_coco(
    annotation_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    size: int | Sequence[int] | None = None,
    crowd: str = "include",
    require_objects: bool = False,
) -> COCODataset:
    """Open a COCO instances annotation file with its image folder.

    Args:
      annotation_json: e.g. ``.../annotations/instances_val2014.json``.
      image_dir: the folder holding the images' ``file_name`` (e.g. ``.../val2014``).
      size: ``None`` (native sizes), an int or ``(height, width)``: resize every record.
      crowd: ``"include"`` (TorchRay protocol, default), ``"exclude"`` or ``"difficult"``
        -- how ``iscrowd`` annotations enter the records (module docstring).
      require_objects: drop images without (remaining) annotations.

    Raises:
      DatasetLayoutError naming a missing annotation file or image folder; ValueError for a
      JSON that is not a COCO instances file; ImportError without ``pycocotools``.
    """
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd: expected one of {CROWD_MODES}, got {crowd!r}")
    ann = require_path(annotation_json, "COCO annotation file", is_dir=False)
    img_dir = require_path(image_dir, "COCO image folder", is_dir=True)
    return COCODataset(ann, img_dir, normalize_size(size), crowd, bool(require_objects))
