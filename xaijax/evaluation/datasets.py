"""Datasets by name for the evaluation experiments: synthetic, voc07, coco14, imagenet-seg.

Every dataset is a sized, indexable sequence of :class:`xaijax.data.Record` with
``class_names``; images of one run share one size (``size``) so that they batch and shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from xaijax.data.records import Record
from xaijax.data.synthetic import SyntheticScenes

__all__ = ["Dataset", "DATASETS", "open_dataset", "resize_record"]

DATASETS = ("synthetic", "voc07", "voc07-tfds", "coco14", "imagenet-seg", "imagenet-val")


class Dataset(Protocol):
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class _Synthetic:
    """A split of the bundled synthetic benchmark (native 128 px unless resized)."""

    def __init__(self, split: str, size: int | None) -> None:
        self.scenes = SyntheticScenes()
        self.split = split
        self.size = size
        self.class_names = self.scenes.class_names
        self._n = self.scenes.split_size(split)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Record:
        r = self.scenes.record(self.split, int(index))
        return resize_record(r, self.size) if self.size else r


def resize_record(r: Record, size: int) -> Record:
    """``r`` resized to ``size`` x ``size`` (bilinear image, nearest masks, scaled boxes)."""
    from PIL import Image

    h, w = r.image.shape[:2]
    if (h, w) == (size, size):
        return r
    img = np.stack(
        [np.asarray(Image.fromarray(r.image[..., c]).resize((size, size), Image.BILINEAR)) for c in range(3)], -1
    )
    masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in r.masks]) if len(r.masks) else np.zeros((0, size, size), bool)
    scale = np.asarray([size / w, size / h, size / w, size / h], np.float32)
    return Record(
        image=np.clip(img, 0.0, 1.0).astype(np.float32),
        labels=r.labels,
        boxes=r.boxes * scale,
        masks=masks,
        difficult=r.difficult,
        image_id=r.image_id,
    )


def open_dataset(
    name: str, data_dir: str | Path | None = None, split: str | None = None, size: int | None = None, boxes_dir: str | Path | None = None
) -> Any:
    """Open dataset ``name`` (one of :data:`DATASETS`).

    Args:
      name: ``"synthetic"`` (bundled, no ``data_dir``), ``"voc07"`` (a ``VOCdevkit`` folder or
        the folder holding it), ``"voc07-tfds"`` (a prepared TFDS ``voc/2007``: the TFDS data
        dir, read without TensorFlow), ``"coco14"`` (a folder with ``annotations/instances_val2014.json``
        and ``val2014/``), ``"imagenet-seg"`` (the ``gtsegs_ijcv.mat`` file or its folder),
        ``"imagenet-val"`` (ImageNet validation images in class folders; with ``boxes_dir``,
        the ILSVRC2012 validation bounding-box XMLs).
      split: dataset split (synthetic: ``test``/``val``/``train``; VOC: ``test``...).
      size: square side every image is resized to (default: 128 for synthetic, 224 otherwise).
    """
    if name == "synthetic":
        return _Synthetic(split or "test", size)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (the folder with the dataset files)")
    return _open_real(name, Path(data_dir), split, size or 224, boxes_dir)


def _open_real(name: str, data_dir: Path, split: str | None, size: int, boxes_dir: str | Path | None) -> Any:
    from xaijax.data import coco, imagenet_seg, imagenet_val, voc

    if name == "imagenet-val":
        return imagenet_val.open_imagenet_val(data_dir, size=size, boxes_dir=boxes_dir)
    if name == "voc07":
        return voc.open_voc(data_dir, split or "test", year=2007, size=size)
    if name == "voc07-tfds":
        return voc.open_voc_tfds(data_dir, split or "test", size=size)
    if name == "coco14":
        split = split or "val2014"
        return coco.open_coco(data_dir / "annotations" / f"instances_{split}.json", data_dir / split, size=size)
    mat = data_dir / "gtsegs_ijcv.mat" if data_dir.is_dir() else data_dir
    return imagenet_seg.open_imagenet_seg(mat, size=size)
