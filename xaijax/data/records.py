"""The record format shared by every dataset loader (synthetic scenes, VOC, COCO, ...).

A :class:`Record` is one annotated image held as NumPy arrays on the host:

=============  ===========  =========  ======================================================
field          shape        dtype      meaning
=============  ===========  =========  ======================================================
``image``      (H, W, 3)    float32    RGB in [0, 1] (no mean/std normalisation)
``labels``     (K,)         int32      class index of each object, >= 0
``boxes``      (K, 4)       float32    ``[x0, y0, x1, y1]`` in pixels, x1/y1 exclusive
``masks``      (K, H, W)    bool       each object's *visible* pixels (after occlusion)
``difficult``  (K,)         bool       VOC-style "difficult" flag of each object
``image_id``   --           str        a stable identifier of the image
=============  ===========  =========  ======================================================

Box convention: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)`` and belongs to a
box when its centre ``(j + 0.5, i + 0.5)`` lies in ``[x0, x1) x [y0, y1)``. For integer boxes
this is ``x0 <= j < x1`` and ``y0 <= i < y1``, so the tight box of a mask whose pixels span
columns ``j_min..j_max`` and rows ``i_min..i_max`` is ``[j_min, i_min, j_max + 1, i_max + 1]``
(see :func:`mask_to_box`). A VOC XML box (1-based, inclusive) converts as
``[xmin - 1, ymin - 1, xmax, ymax]``.

``K`` may be 0 (an image without annotated objects); then ``labels`` is ``(0,)``, ``boxes``
``(0, 4)`` and ``masks`` ``(0, H, W)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "Record",
    "multi_hot",
    "class_mask",
    "class_box_mask",
    "present_classes",
    "mask_to_box",
    "boxes_to_mask",
]


def _as_array(name: str, value: object, dtype: type, kinds: str) -> np.ndarray:
    """Convert ``value`` to ``dtype`` when its kind is one of ``kinds`` (lossless cases only)."""
    arr = np.asarray(value)
    if arr.size and arr.dtype.kind not in kinds:
        raise ValueError(
            f"Record.{name}: expected dtype {np.dtype(dtype).name} "
            f"(or a compatible kind {kinds!r}), got {arr.dtype}"
        )
    if arr.dtype != dtype:
        if arr.dtype.kind in "iu" and np.dtype(dtype).kind == "i" and arr.size:
            info = np.iinfo(dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"Record.{name}: values do not fit in {np.dtype(dtype).name}")
        arr = arr.astype(dtype)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
    """One annotated image (see the module docstring for shapes and conventions).

    Arrays are converted on construction where this is lossless (e.g. int64 labels become
    int32, a float64 image becomes float32, 0/1 integer masks become bool); anything else
    raises ``ValueError`` naming the field and what was expected. Records compare by
    identity (``eq=False``): compare fields with ``np.array_equal`` instead.
    """

    image: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    difficult: np.ndarray
    image_id: str

    def __post_init__(self) -> None:
        image = _as_array("image", self.image, np.float32, "f")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"Record.image: expected shape (H, W, 3), got {image.shape}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"Record.image: expected a non-empty image, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("Record.image: contains NaN or inf")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"Record.image: expected RGB values in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
            )

        labels = _as_array("labels", self.labels, np.int32, "iu")
        if labels.ndim != 1:
            raise ValueError(f"Record.labels: expected shape (K,), got {labels.shape}")
        k = labels.shape[0]
        if k and labels.min() < 0:
            raise ValueError(f"Record.labels: class indices must be >= 0, got {labels.min()}")

        boxes = _as_array("boxes", self.boxes, np.float32, "fiu")
        if boxes.size == 0 and k == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.shape != (k, 4):
            raise ValueError(
                f"Record.boxes: expected shape (K, 4) = ({k}, 4) to match labels, got {boxes.shape}"
            )
        if not np.all(np.isfinite(boxes)):
            raise ValueError("Record.boxes: contains NaN or inf")
        if k and (np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1])):
            bad = int(np.argmax((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])))
            raise ValueError(
                f"Record.boxes: expected [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, "
                f"got {boxes[bad].tolist()} for object {bad}"
            )

        masks = np.asarray(self.masks)
        if masks.dtype != np.bool_:
            if masks.size and (masks.dtype.kind not in "biuf" or not np.all((masks == 0) | (masks == 1))):
                raise ValueError(f"Record.masks: expected a bool array (or 0/1 values), got {masks.dtype}")
            masks = masks.astype(bool)
        if masks.size == 0 and k == 0:
            masks = masks.reshape(0, h, w)
        if masks.shape != (k, h, w):
            raise ValueError(
                f"Record.masks: expected shape (K, H, W) = ({k}, {h}, {w}) to match labels and "
                f"image, got {masks.shape}"
            )

        difficult = np.asarray(self.difficult)
        if difficult.dtype != np.bool_:
            if difficult.size and (
                difficult.dtype.kind not in "biu" or not np.all((difficult == 0) | (difficult == 1))
            ):
                raise ValueError(
                    f"Record.difficult: expected a bool array (or 0/1 integers), got {difficult.dtype}"
                )
            difficult = difficult.astype(bool)
        if difficult.shape != (k,):
            raise ValueError(
                f"Record.difficult: expected shape (K,) = ({k},) to match labels, got {difficult.shape}"
            )

        if not isinstance(self.image_id, str):
            raise ValueError(f"Record.image_id: expected a str, got {type(self.image_id).__name__}")

        for name, value in (
            ("image", image),
            ("labels", labels),
            ("boxes", boxes),
            ("masks", masks),
            ("difficult", difficult),
        ):
            object.__setattr__(self, name, value)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def num_objects(self) -> int:
        return int(self.labels.shape[0])


def _check_class(record: Record, c: int, name: str = "c") -> int:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer class index, got {c!r}")
    if c < 0:
        raise ValueError(f"{name}: expected a class index >= 0, got {c}")
    return int(c)


def _select(record: Record, c: int, include_difficult: bool) -> np.ndarray:
    sel = record.labels == c
    if not include_difficult:
        sel &= ~record.difficult
    return sel


def multi_hot(record: Record, num_classes: int, include_difficult: bool = True) -> np.ndarray:
    """(num_classes,) float32 vector with 1 for every class present in ``record``.

    With ``include_difficult=False`` a class counts only if it has a non-difficult object.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if record.num_objects and int(record.labels.max()) >= num_classes:
        raise ValueError(
            f"record {record.image_id!r} has label {int(record.labels.max())}, which is out of "
            f"range for num_classes={num_classes}"
        )
    out = np.zeros((int(num_classes),), np.float32)
    labels = record.labels if include_difficult else record.labels[~record.difficult]
    out[labels] = 1.0
    return out


def class_mask(record: Record, c: int, include_difficult: bool = True) -> np.ndarray:
    """(H, W) bool: union of the visible masks of the objects of class ``c`` (all False if absent)."""
    c = _check_class(record, c)
    sel = _select(record, c, include_difficult)
    return np.any(record.masks[sel], axis=0) if sel.any() else np.zeros(record.image.shape[:2], bool)


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool union of ``boxes`` (N, 4) ``[x0, y0, x1, y1]``, by the pixel-centre rule.

    Pixel ``(i, j)`` is inside a box when ``x0 <= j + 0.5 < x1`` and ``y0 <= i + 0.5 < y1``;
    boxes may extend past the image and are clipped.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx = np.arange(width) + 0.5
    cy = np.arange(height) + 0.5
    out = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:  # loop over boxes (few), not pixels
        cols = (cx >= x0) & (cx < x1)
        rows = (cy >= y0) & (cy < y1)
        out |= rows[:, None] & cols[None, :]
    return out


def class_box_mask(record: Record, c: int, include_difficult: bool = True) -> np.ndarray:
    """(H, W) bool: union of the boxes of the objects of class ``c`` as a mask (VOC-style region)."""
    c = _check_class(record, c)
    sel = _select(record, c, include_difficult)
    return boxes_to_mask(record.boxes[sel], record.height, record.width)


def present_classes(record: Record, include_difficult: bool = True) -> np.ndarray:
    """Sorted unique class indices (int32) of the objects in ``record``.

    With ``include_difficult=False`` only classes with at least one non-difficult object.
    """
    labels = record.labels if include_difficult else record.labels[~record.difficult]
    return np.unique(labels).astype(np.int32)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """(4,) float32 tight box ``[x0, y0, x1, y1]`` (x1/y1 exclusive) of a non-empty (H, W) mask."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape (H, W), got {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask: is empty, so it has no bounding box")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
