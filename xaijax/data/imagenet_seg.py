"""ImageNet-segmentation (Guillaumin et al., IJCV 2014) as :class:`~xaijax.data.Record`.

The release used by the LRP / RAP / RSP / Transformer-Explainability evaluations is one
MATLAB v7.3 file, ``gtsegs_ijcv.mat`` (4,276 images with a foreground/background mask),
which is an HDF5 file; :func:`open_imagenet_seg` reads it with ``h5py``. Layout (HDF5
stores MATLAB's column-major arrays with their axes reversed)::

    value/img     (N, 1) object references; img[i, 0] -> uint8 (3, W, H) RGB image
                  (a grayscale image may be stored as (W, H))
    value/gt      (N, 1) object references; gt[i, 0] -> a (1, 1) MATLAB cell, i.e. an
                  array of references whose [0, 0] -> the (W, H) uint8 mask
    value/target  (optional) (N, 1) references -> uint16 MATLAB char array: the WordNet
                  id of the image's class, e.g. "n01443537"

so the image is ``transpose(2, 1, 0)`` -> (H, W, 3) and the mask ``transpose(1, 0)`` ->
(H, W), as the authors' loaders (``Imagenet_Segmentation``) do. Foreground is
``mask != 0``.

Records. Each image has one object, the foreground: ``labels = [0]`` (class
``"foreground"``; Records require labels >= 0, so the ImageNet class is *not* the label),
``masks[0]`` the ground-truth mask, ``boxes[0]`` its tight box
(:func:`~xaijax.data.records.mask_to_box`, recomputed after resizing), ``difficult`` False.
An all-background mask gives a record with no object (``K = 0``). The image's ImageNet
class is available separately: :meth:`ImageNetSegDataset.wnid` (from ``value/target`` when
the file has it, else ``None``) and :meth:`ImageNetSegDataset.class_index` -- its index in
the ``wnids`` list given to :func:`open_imagenet_seg` (the model's 1000 synsets in output
order), or -1 when unknown (no ``wnids`` list, no target, or a synset outside the list:
the 445 categories of the release are not all ILSVRC-2012 classes). The protocol of the
papers explains the top-1 *predicted* class, which needs no label.

An entry whose image or mask cannot be read, or whose mask size differs from its image,
is skipped and counted like an undecodable image (:mod:`xaijax.data._base`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from xaijax.data._base import (
    CorruptImageError,
    DatasetLayoutError,
    LoaderDataset,
    image_to_array,
    normalize_size,
    require_path,
    resize_masks,
)
from xaijax.data.records import Record, mask_to_box

__all__ = ["ImageNetSegDataset", "open_imagenet_seg", "IMAGENET_SEG_CLASSES"]

IMAGENET_SEG_CLASSES: tuple[str, ...] = ("foreground",)


def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError(
            "open_imagenet_seg needs the 'h5py' package to read the MATLAB v7.3 file "
            f"(pip install h5py, or xaijax[data]). Import failed with: {e}"
        ) from e
    return h5py


def _refs(ds, name: str, path: str) -> np.ndarray:
    """Flatten an (N, 1) / (1, N) array of object references to (N,)."""
    arr = ds[()]
    if arr.dtype.kind != "O" or arr.ndim not in (1, 2) or (arr.ndim == 2 and 1 not in arr.shape):
        raise ValueError(
            f"{path!r}: {name} must be an (N, 1) array of object references (MATLAB cell), "
            f"got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr.reshape(-1)


class ImageNetSegDataset(LoaderDataset):
    """ImageNet-segmentation records; build with :func:`open_imagenet_seg`."""

    def __init__(self, mat_path: str, size: tuple[int, int] | None, wnids: Sequence[str] | None) -> None:
        super().__init__()
        h5py = _import_h5py()
        self.mat_path = mat_path
        self._size = size
        self._class_names = IMAGENET_SEG_CLASSES
        self._wnid_index = None if wnids is None else {str(w): i for i, w in enumerate(wnids)}
        if not h5py.is_hdf5(mat_path):
            raise ValueError(
                f"{mat_path!r} is not an HDF5 file; expected the MATLAB v7.3 release gtsegs_ijcv.mat "
                "(older .mat versions are not HDF5)"
            )
        self._file = None
        f = h5py.File(mat_path, "r")
        try:
            for name in ("value/img", "value/gt"):
                if name not in f:
                    raise DatasetLayoutError(
                        f"{mat_path!r}: missing the dataset {name!r}; expected the gtsegs_ijcv.mat layout "
                        "(value/img and value/gt arrays of references)"
                    )
            self._img_refs = _refs(f["value/img"], "value/img", mat_path)
            self._gt_refs = _refs(f["value/gt"], "value/gt", mat_path)
            if len(self._img_refs) != len(self._gt_refs):
                raise ValueError(
                    f"{mat_path!r}: value/img has {len(self._img_refs)} entries but value/gt has {len(self._gt_refs)}"
                )
            self._wnids: list[str | None] = [None] * len(self._img_refs)
            if "value/target" in f:
                targets = _refs(f["value/target"], "value/target", mat_path)
                if len(targets) == len(self._img_refs):
                    self._wnids = [self._read_char(f, r) for r in targets]
        finally:
            f.close()

    @staticmethod
    def _read_char(f, ref) -> str | None:
        try:
            codes = np.asarray(f[ref][()]).reshape(-1)
            return "".join(chr(int(c)) for c in codes if int(c) != 0) or None
        except Exception:  # a malformed target only loses the class, not the image
            return None

    def _h5(self):
        if self._file is None:
            self._file = _import_h5py().File(self.mat_path, "r")
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles do not pickle; reopened lazily
        return state

    def close(self) -> None:
        """Close the HDF5 file (it is reopened on the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self._img_refs)

    def image_id(self, index: int) -> str:
        i = self._index(index)
        w = self._wnids[i]
        return f"imagenet_seg_{i:05d}" + (f"_{w}" if w else "")

    def wnid(self, index: int) -> str | None:
        """WordNet id of image ``index`` from ``value/target``, or ``None`` if the file has none."""
        return self._wnids[self._index(index)]

    def class_index(self, index: int) -> int:
        """Index of the image's synset in the ``wnids`` list given at opening, else -1."""
        w = self._wnids[self._index(index)]
        if w is None or self._wnid_index is None:
            return -1
        return self._wnid_index.get(w, -1)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        f = self._h5()
        try:
            img = np.asarray(f[self._img_refs[index]][()])
            cell = f[self._gt_refs[index]]
            if cell.dtype.kind != "O":
                raise ValueError(f"value/gt[{index}] is not a cell of references (dtype {cell.dtype})")
            gt = np.asarray(f[np.asarray(cell[()]).reshape(-1)[0]][()])
        except (KeyError, ValueError, TypeError, OSError, IndexError) as e:
            raise CorruptImageError(
                f"{self.mat_path!r} entry {index}: cannot read image/mask ({type(e).__name__}: {e})"
            ) from None
        if img.ndim == 3 and img.shape[0] == 3:
            img = img.transpose(2, 1, 0)
        elif img.ndim == 2:
            img = np.repeat(img.T[:, :, None], 3, axis=2)
        else:
            raise CorruptImageError(f"{self.mat_path!r} entry {index}: unexpected image shape {img.shape}")
        if gt.ndim != 2:
            raise CorruptImageError(f"{self.mat_path!r} entry {index}: unexpected mask shape {gt.shape}")
        gt = gt.T
        if gt.shape != img.shape[:2]:
            raise CorruptImageError(
                f"{self.mat_path!r} entry {index}: mask {gt.shape} and image {img.shape[:2]} differ in size"
            )
        if img.dtype != np.uint8:
            if img.size and (img.min() < 0 or img.max() > 255):
                raise CorruptImageError(f"{self.mat_path!r} entry {index}: image values outside [0, 255]")
            img = img.astype(np.uint8)
        if img.size == 0:
            raise CorruptImageError(f"{self.mat_path!r} entry {index}: empty image")
        return img, gt != 0

    def mask(self, index: int) -> np.ndarray:
        """(H, W) bool native-size foreground mask of image ``index``."""
        return self._read(self._index(index))[1]

    def _load(self, index: int) -> Record:
        img, mask = self._read(index)
        image = image_to_array(Image.fromarray(np.ascontiguousarray(img)), self._size)
        h, w = image.shape[:2]
        mask = resize_masks(mask[None], (h, w))[0]
        if mask.any():
            labels, boxes, masks = np.zeros(1, np.int32), mask_to_box(mask)[None], mask[None]
        else:
            labels, boxes, masks = np.zeros(0, np.int32), np.zeros((0, 4), np.float32), np.zeros((0, h, w), bool)
        return Record(
            image=image,
            labels=labels,
            boxes=boxes,
            masks=masks,
            difficult=np.zeros(len(labels), bool),
            image_id=self.image_id(index),
        )


def open_imagenet_seg(
    mat_path: str | os.PathLike,
    *,
    size: int | Sequence[int] | None = None,
    wnids: Sequence[str] | None = None,
) -> ImageNetSegDataset:
    """Open the ImageNet-segmentation release ``gtsegs_ijcv.mat``.

    Args:
      mat_path: path of the MATLAB v7.3 (HDF5) file.
      size: ``None`` (native sizes), an int or ``(height, width)``: resize every record
        (the mask by pixel-centre nearest neighbour, the box recomputed from it).
      wnids: optional synsets in model-output order, for :meth:`ImageNetSegDataset.class_index`.

    Raises:
      DatasetLayoutError naming a missing file or HDF5 dataset; ValueError for a file that
      is not HDF5 or not in the release layout; ImportError without ``h5py``.
    """
    path = require_path(mat_path, "ImageNet-segmentation file", is_dir=False)
    return ImageNetSegDataset(path, normalize_size(size), wnids)
