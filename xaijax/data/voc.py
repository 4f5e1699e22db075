"""PASCAL VOC detection data (VOC 2007 test by default) as :class:`~xaijax.data.Record`.

Two sources give the same records:

* :func:`open_voc` -- a standard ``VOCdevkit/VOC2007`` folder::

      VOC2007/ImageSets/Main/<split>.txt   one image id per line (e.g. "000001")
      VOC2007/Annotations/<id>.xml          objects: name, pose, truncated, difficult, bndbox
      VOC2007/JPEGImages/<id>.jpg

  ``root`` may be the ``VOC2007`` folder itself, the ``VOCdevkit`` folder, or the folder
  holding ``VOCdevkit``. Records come in the order of ``<split>.txt``.
* :func:`open_voc_tfds` -- a prepared TensorFlow-Datasets ``voc/2007`` directory, read
  with ``tensorflow-datasets`` but *without* TensorFlow (both the ``tfrecord`` and the
  ``array_record`` file formats). Records come in the (shuffled) order TFDS stored them.

Classes: the 20 VOC classes in the standard (alphabetical) order, :data:`VOC_CLASSES`.

Box convention. VOC XML boxes are 1-based and inclusive: an object covering pixel columns
``xmin..xmax`` (1-based). :class:`~xaijax.data.Record` boxes are 0-based with exclusive
ends (pixel ``j`` covers ``[j, j+1)``), so the conversion is::

    [x0, y0, x1, y1] = [xmin - 1, ymin - 1, xmax, ymax]

e.g. ``<xmin>1</xmin> ... <xmax>30</xmax>`` covers columns 0..29, ``x0 = 0, x1 = 30``.
This is exactly the region TorchRay's ``voc_as_mask`` fills
(``mask[ymin-1:ymax, xmin-1:xmax]``). TFDS stores ``BBox(ymin/H, xmin/W, ymax/H, xmax/W)``
from the *raw* XML values, so the same record box is ``[xmin_n*W - 1, ymin_n*H - 1,
xmax_n*W, ymax_n*H]`` (snapped to 1/1000 px to undo float32 rounding).

Masks. VOC detection has boxes only: each object's ``Record.masks[k]`` is its *box region*
(:func:`~xaijax.data.records.boxes_to_mask` of its box; after resizing, of the scaled
box), so the union of a class's masks is the VOC pointing-game region. ``difficult`` is
the XML ``<difficult>`` flag (absent -> False); ``truncated`` and ``pose``, which Records
do not carry, are available from :meth:`VOCDataset.annotation`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from xaijax.data._base import (
    CorruptImageError,
    DatasetLayoutError,
    LoaderDataset,
    image_to_array,
    normalize_size,
    open_rgb,
    require_path,
    scale_boxes,
)
from xaijax.data.records import Record, boxes_to_mask

__all__ = [
    "VOC_CLASSES",
    "VOCAnnotation",
    "VOCDataset",
    "VOCTFDSDataset",
    "open_voc",
    "open_voc_tfds",
    "parse_voc_xml",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_CLASS_INDEX = {c: i for i, c in enumerate(VOC_CLASSES)}


@dataclasses.dataclass(frozen=True)
class VOCAnnotation:
    """One parsed VOC XML file.

    Attributes:
      image_id: the id from the split list (file stem).
      filename: ``<filename>`` (the image file name, e.g. ``"000001.jpg"``).
      width, height: ``<size>`` of the image in pixels.
      labels: (K,) int32 class indices into :data:`VOC_CLASSES`.
      boxes: (K, 4) float32 Record boxes ``[xmin - 1, ymin - 1, xmax, ymax]`` (module doc).
      difficult, truncated: (K,) bool flags.
      poses: per-object ``<pose>`` strings ("" if absent).
    """

    image_id: str
    filename: str
    width: int
    height: int
    labels: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray
    poses: tuple[str, ...]


def _text(elem: ET.Element, tag: str, path: str, default: str | None = None) -> str:
    child = elem.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise ValueError(f"{path}: missing <{tag}> in <{elem.tag}>")
    return child.text.strip()


def _flag(elem: ET.Element, tag: str, path: str) -> bool:
    value = _text(elem, tag, path, default="0")
    try:
        return bool(int(float(value)))
    except ValueError:
        raise ValueError(f"{path}: <{tag}> must be 0 or 1, got {value!r}") from None


def parse_voc_xml(path: str | os.PathLike, image_id: str | None = None) -> VOCAnnotation:
    """Parse a VOC annotation XML file (see :class:`VOCAnnotation` and the module doc).

    Raises ``ValueError`` naming the file for malformed XML, an unknown class name, a
    missing coordinate, or a box with ``xmax < xmin`` / ``ymax < ymin``.
    """
    path = os.fspath(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a valid XML file ({e})") from None
    if image_id is None:
        image_id = os.path.splitext(os.path.basename(path))[0]
    size = root.find("size")
    width = height = 0
    if size is not None:
        width = int(float(_text(size, "width", path, "0")))
        height = int(float(_text(size, "height", path, "0")))
    labels, boxes, difficult, truncated, poses = [], [], [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", path).lower()
        if name not in _CLASS_INDEX:
            raise ValueError(f"{path}: unknown VOC class {name!r}; expected one of {VOC_CLASSES}")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: object {name!r} has no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(_text(bb, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise ValueError(f"{path}: bad <bndbox> of object {name!r}: {e}") from None
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}: object {name!r} has an inverted box {[xmin, ymin, xmax, ymax]}")
        labels.append(_CLASS_INDEX[name])
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        difficult.append(_flag(obj, "difficult", path))
        truncated.append(_flag(obj, "truncated", path))
        poses.append(_text(obj, "pose", path, default=""))
    return VOCAnnotation(
        image_id=str(image_id),
        filename=_text(root, "filename", path, default=f"{image_id}.jpg"),
        width=width,
        height=height,
        labels=np.asarray(labels, np.int32).reshape(-1),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        difficult=np.asarray(difficult, bool).reshape(-1),
        truncated=np.asarray(truncated, bool).reshape(-1),
        poses=tuple(poses),
    )


def _box_record(
    image: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    difficult: np.ndarray,
    image_id: str,
    src_hw: tuple[int, int],
) -> Record:
    """Record whose masks are the box regions; ``boxes`` are in ``src_hw`` pixels."""
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, src_hw[1])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, src_hw[0])
    if (h, w) != src_hw:
        boxes = scale_boxes(boxes, src_hw, (h, w))
    masks = np.stack([boxes_to_mask(b[None], h, w) for b in boxes]) if len(boxes) else np.zeros((0, h, w), bool)
    return Record(image=image, labels=labels, boxes=boxes, masks=masks, difficult=difficult, image_id=image_id)


def _find_voc_dir(root: str, year: str) -> str:
    candidates = [root, os.path.join(root, f"VOC{year}"), os.path.join(root, "VOCdevkit", f"VOC{year}")]
    for c in candidates:
        if os.path.isdir(os.path.join(c, "ImageSets")) or os.path.isdir(os.path.join(c, "Annotations")):
            return c
    require_path(root, "VOC root", is_dir=True)
    raise DatasetLayoutError(
        f"VOC root {root!r}: no VOC{year} dataset found; expected the folder "
        f"{os.path.join(root, 'VOCdevkit', f'VOC{year}')!r} (or {root!r} itself, or "
        f"{os.path.join(root, f'VOC{year}')!r}) to contain ImageSets/Main, Annotations and JPEGImages"
    )


class VOCDataset(LoaderDataset):
    """VOC records from a ``VOCdevkit/VOC<year>`` folder; build with :func:`open_voc`.

    Annotations are parsed when the dataset is opened; images are decoded on access.
    """

    def __init__(self, voc_dir: str, split: str, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.voc_dir = voc_dir
        self.split = split
        self._size = size
        self._class_names = VOC_CLASSES
        list_file = require_path(
            os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt"), f"VOC split list of {split!r}", is_dir=False
        )
        ann_dir = require_path(os.path.join(voc_dir, "Annotations"), "VOC annotation folder", is_dir=True)
        self.image_dir = require_path(os.path.join(voc_dir, "JPEGImages"), "VOC image folder", is_dir=True)
        with open(list_file, encoding="utf-8") as f:
            # main lists hold one id per line; class lists ("<id> 1") also parse.
            ids = [line.split()[0] for line in f if line.strip()]
        self._annotations: list[VOCAnnotation] = []
        for image_id in ids:
            xml_path = require_path(
                os.path.join(ann_dir, f"{image_id}.xml"), f"annotation of image {image_id!r}", is_dir=False
            )
            self._annotations.append(parse_voc_xml(xml_path, image_id))

    def __len__(self) -> int:
        return len(self._annotations)

    def image_id(self, index: int) -> str:
        return self._annotations[self._index(index)].image_id

    def annotation(self, index: int) -> VOCAnnotation:
        """The parsed XML of image ``index`` (native pixel boxes, ``truncated``, ``pose``)."""
        return self._annotations[self._index(index)]

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, f"{self._annotations[self._index(index)].image_id}.jpg")

    def _load(self, index: int) -> Record:
        ann = self._annotations[index]
        path = self.image_path(index)
        if not os.path.isfile(path):
            raise CorruptImageError(f"image file {path!r} does not exist")
        img = open_rgb(path, repr(path))
        if ann.width and ann.height and (img.height, img.width) != (ann.height, ann.width):
            raise CorruptImageError(
                f"image {path!r} is {img.width}x{img.height} but its annotation says "
                f"{ann.width}x{ann.height} (width x height)"
            )
        src_hw = (img.height, img.width)
        return _box_record(image_to_array(img, self._size), ann.labels, ann.boxes, ann.difficult, ann.image_id, src_hw)


def open_voc(
    root: str | os.PathLike,
    split: str = "test",
    *,
    year: str | int = 2007,
    size: int | Sequence[int] | None = None,
) -> VOCDataset:
    """Open a PASCAL VOC detection split from a ``VOCdevkit`` folder.

    Args:
      root: the ``VOC<year>`` folder, the ``VOCdevkit`` folder, or the folder above it.
      split: the name of a list in ``ImageSets/Main`` (``"test"``, ``"trainval"``, ...).
      year: used to find ``VOC<year>`` under ``root``.
      size: ``None`` (native sizes), an int or ``(height, width)``: resize every record.

    Returns:
      A :class:`VOCDataset` (``len``, indexing, iteration, ``class_names`` = VOC_CLASSES).

    Raises:
      DatasetLayoutError (a ``FileNotFoundError``) naming the first missing folder/file
      (``ImageSets/Main/<split>.txt``, ``Annotations``, ``JPEGImages``, an id's XML);
      ValueError for a malformed XML file (named).
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty string, got {split!r}")
    voc_dir = _find_voc_dir(os.fspath(root), str(year))
    return VOCDataset(voc_dir, split, normalize_size(size))


# --------------------------------------------------------------------------- TFDS


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "open_voc_tfds needs the 'tensorflow-datasets' package (pip install tensorflow-datasets "
            "or xaijax[data]); TensorFlow itself is not needed to read prepared data. "
            f"Import failed with: {e}"
        ) from e
    return tfds


_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def _find_tfds_version_dir(path: str) -> str:
    """Resolve ``.../voc/2007/<version>`` from that folder, ``.../voc/2007`` or a data_dir."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    for base in (path, os.path.join(path, "voc", "2007")):
        if os.path.isdir(base):
            versions = [v for v in os.listdir(base) if _VERSION_RE.match(v)]
            versions = [v for v in versions if os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
            if versions:
                best = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
                return os.path.join(base, best)
    require_path(path, "TFDS VOC directory", is_dir=True)
    raise DatasetLayoutError(
        f"TFDS VOC directory {path!r}: expected a prepared dataset, i.e. the file "
        f"{os.path.join(path, 'dataset_info.json')!r} or "
        f"{os.path.join(path, 'voc', '2007', '<version>', 'dataset_info.json')!r}, which does not exist"
    )


def _tfrecord_index(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, data offset, length) of every record in TFRecord files (length CRCs not checked)."""
    index = []
    for p in paths:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            pos = 0
            while pos < size:
                header = f.read(12)
                if len(header) != 12:
                    raise ValueError(f"{p}: truncated TFRecord header at byte {pos}")
                (length,) = struct.unpack("<Q", header[:8])
                if pos + 12 + length + 4 > size:
                    raise ValueError(f"{p}: truncated TFRecord record at byte {pos}")
                index.append((p, pos + 12, length))
                pos += 12 + length + 4
                f.seek(pos)
    return index


class VOCTFDSDataset(LoaderDataset):
    """VOC records from a prepared TFDS ``voc/<year>`` directory; build with :func:`open_voc_tfds`."""

    def __init__(self, version_dir: str, split: str, size: tuple[int, int] | None) -> None:
        super().__init__()
        tfds = _import_tfds()
        self._size = size
        self._class_names = VOC_CLASSES
        self.version_dir = version_dir
        self.split = split
        builder = tfds.builder_from_directory(version_dir)
        info = builder.info
        if info.name != "voc":
            raise ValueError(f"{version_dir!r} holds the TFDS dataset {info.name!r}, not 'voc'")
        names = tuple(info.features["objects"]["label"].names)
        if names != VOC_CLASSES:
            raise ValueError(f"{version_dir!r}: unexpected VOC label names {names}")
        if split not in info.splits:
            raise ValueError(f"split: {split!r} is not prepared in {version_dir!r}; available: {sorted(info.splits)}")
        self._features = info.features
        self._decoders = {"image": tfds.decode.SkipDecoding()}
        fmt = getattr(info.file_format, "value", str(info.file_format))
        self.file_format = str(fmt)
        paths = [os.fspath(p) for p in info.splits[split].filepaths]
        for p in paths:
            require_path(p, f"TFDS shard of split {split!r}", is_dir=False)
        if self.file_format == "tfrecord":
            self._source = None
            self._index_table = _tfrecord_index(paths)
        elif self.file_format == "array_record":
            self._source = builder.as_data_source(split, decoders=self._decoders)
            self._index_table = None
        else:
            raise ValueError(f"{version_dir!r}: unsupported TFDS file format {self.file_format!r}")
        self._length = len(self._index_table) if self._index_table is not None else len(self._source)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_source"] = None  # re-created lazily in worker processes
        return state

    def __len__(self) -> int:
        return self._length

    def _example(self, index: int) -> dict:
        if self._index_table is not None:
            path, offset, length = self._index_table[index]
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
            return self._features.deserialize_example_np(raw, decoders=self._decoders)
        if self._source is None:
            tfds = _import_tfds()
            self._source = tfds.builder_from_directory(self.version_dir).as_data_source(
                self.split, decoders=self._decoders
            )
        return self._source[index]

    @staticmethod
    def _name(example: dict) -> str:
        name = example["image/filename"]
        name = name.decode("utf-8") if isinstance(name, (bytes, np.bytes_)) else str(name)
        return os.path.splitext(name)[0]

    def image_id(self, index: int) -> str:
        return self._name(self._example(self._index(index)))

    def _load(self, index: int) -> Record:
        ex = self._example(index)
        image_id = self._name(ex)
        img = open_rgb(ex["image"], f"{image_id!r} (TFDS {self.split}[{index}])")
        h, w = img.height, img.width
        objs = ex["objects"]
        labels = np.asarray(objs["label"], np.int32).reshape(-1)
        bbox = np.asarray(objs["bbox"], np.float64).reshape(-1, 4)  # (ymin, xmin, ymax, xmax) / size
        raw = bbox * np.array([h, w, h, w], np.float64)
        raw = np.round(raw * 1000.0) / 1000.0  # undo float32 rounding of integer pixel values
        boxes = np.stack([raw[:, 1] - 1.0, raw[:, 0] - 1.0, raw[:, 3], raw[:, 2]], axis=1)
        difficult = np.asarray(objs["is_difficult"], bool).reshape(-1)
        return _box_record(image_to_array(img, self._size), labels, boxes, difficult, image_id, (h, w))

    def truncated(self, index: int) -> np.ndarray:
        """(K,) bool ``is_truncated`` flags of image ``index`` (no image decoding)."""
        return np.asarray(self._example(self._index(index))["objects"]["is_truncated"], bool).reshape(-1)


def open_voc_tfds(
    path: str | os.PathLike,
    split: str = "test",
    *,
    size: int | Sequence[int] | None = None,
) -> VOCTFDSDataset:
    """Open a split of a prepared TFDS ``voc`` dataset without TensorFlow.

    Args:
      path: the TFDS ``data_dir`` (holding ``voc/2007/<version>``), ``.../voc/2007`` (the
        highest version is used) or the version folder itself (with ``dataset_info.json``).
      split: ``"test"``, ``"train"`` or ``"validation"`` (TFDS names), as prepared.
      size: ``None`` (native sizes), an int or ``(height, width)``: resize every record.

    Raises:
      ImportError if ``tensorflow-datasets`` is not installed (TensorFlow is not needed);
      DatasetLayoutError naming the missing ``dataset_info.json`` or shard file;
      ValueError for a dataset that is not VOC or a split that was not prepared.
    """
    _import_tfds()
    return VOCTFDSDataset(_find_tfds_version_dir(os.fspath(path)), split, normalize_size(size))
