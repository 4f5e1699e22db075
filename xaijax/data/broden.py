"""Reader of the Broden dataset (Bau et al., CVPR 2017) for neuron-concept dissection.

On-disk layout (``broden1_224`` / ``broden1_227`` as released with NetDissect)::

    DIR/index.csv      one row per image; columns image, split, ih, iw, sh, sw and one column
                       per concept category: color, object, part, material, scene, texture
    DIR/label.csv      number, name, category, frequency, coverage, syns  (number 0 = "-")
    DIR/c_<cat>.csv    code, number, name, frequency, coverage: the labels of one category
                       (``number`` is the global label number of label.csv)
    DIR/images/...     the images (``image`` column, relative to DIR/images) and label PNGs

A category cell of ``index.csv`` holds ``;``-separated entries, each either

* the name of a label PNG (relative to ``DIR/images``) of size ``sh x sw`` whose pixel
  value encodes a global label number as ``R + 256 * G`` (0 = unlabelled); a category
  may have several PNG layers (overlapping parts), or
* an integer: an image-level label (``scene``, ``texture``) that covers the whole image.

``ih x iw`` is the image size, ``sh x sw`` the segmentation size (half the image size in
``broden1_224``: concept masks are compared at that resolution, as in NetDissect).

:class:`BrodenDataset` exposes the interface of
:class:`xaijax.data.concepts.SyntheticConcepts` used by :mod:`xaijax.features.dissect`:
``concept_names``, ``concept_categories``, ``num_layers``, ``mask_shape``, ``len()``,
``images(indices)`` and ``load(indices) -> (images (n, H, W, 3) float32 in [0, 1],
labels (n, L, M, N) int32)`` where ``labels`` holds ``concept index + 1`` (0 = none) and
``L`` is the largest number of entries any selected image has in the selected categories.
Concepts are the labels with ``code >= 1`` of the selected categories' ``c_*.csv`` files
(each global label once), in category order then code order; a label listed by several
categories gets the one label.csv credits with the most images (NetDissect's "primary
category" rule uses coverage; the counts in label.csv's ``category`` field are what that
file provides).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from xaijax.data._base import DatasetLayoutError, check_indices, normalize_size

__all__ = ["BRODEN_CATEGORIES", "BrodenDataset", "decode_label_png", "open_broden"]

BRODEN_CATEGORIES: tuple[str, ...] = ("color", "object", "part", "material", "scene", "texture")
_META = ("image", "split", "ih", "iw", "sh", "sw")


def decode_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int32 global label numbers of a Broden label PNG: ``R + 256 * G``."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"Broden: missing {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _int(value: str, what: str) -> int:
    if not re.fullmatch(r"\s*-?\d+\s*", value or ""):
        raise ValueError(f"Broden: {what}: expected an integer, got {value!r}")
    return int(value)


class BrodenDataset:
    """Broden images with per-pixel concept labels (see the module docstring).

    Args:
      directory: the dataset folder (holding ``index.csv``).
      categories: concept categories to use (default: every category column of
        ``index.csv`` that has a ``c_<cat>.csv`` file).
      split: keep only rows of this split (``"train"``/``"val"``); default all rows.
      size: resize images to this (H, W) or side (PIL bilinear); default: native size,
        which must then be the same for every selected image.
      mask_size: resample label maps to this (M, N) or side (nearest neighbour, pixel
        centres); default ``(sh, sw)``, which must then be the same for every image.
      max_images: keep only the first ``max_images`` selected rows.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        categories: Sequence[str] | None = None,
        split: str | None = None,
        size: int | tuple[int, int] | None = None,
        mask_size: int | tuple[int, int] | None = None,
        max_images: int | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise DatasetLayoutError(f"Broden: dataset directory not found: {self.directory}")
        fields, rows = _read_csv(os.path.join(self.directory, "index.csv"))
        missing = [c for c in _META if c not in fields]
        if missing:
            raise DatasetLayoutError(
                f"Broden: index.csv lacks column(s) {missing}; expected {list(_META)} plus categories"
            )
        available = [c for c in fields if c not in _META and os.path.isfile(self._c_path(c))]
        if categories is None:
            categories = available
        else:
            categories = list(categories)
            bad = [c for c in categories if c not in available]
            if bad:
                raise ValueError(
                    f"Broden: unknown or unavailable categor(ies) {bad}; this dataset has {available} "
                    "(a category needs an index.csv column and a c_<cat>.csv file)"
                )
        if not categories:
            raise DatasetLayoutError(
                f"Broden: no concept categories in {self.directory} (index.csv columns {fields}, "
                "each needs a c_<cat>.csv file)"
            )
        self.categories: tuple[str, ...] = tuple(categories)

        # labels: global number -> name; per-category image counts from label.csv
        _, lrows = _read_csv(os.path.join(self.directory, "label.csv"))
        names: dict[int, str] = {}
        counts: dict[int, dict[str, int]] = {}
        for r in lrows:
            num = _int(r.get("number", ""), "label.csv number")
            names[num] = r.get("name", str(num))
            cc: dict[str, int] = {}
            for part in (r.get("category") or "").split(";"):
                m = re.fullmatch(r"\s*([^()]+)\((\d+)\)\s*", part)
                if m:
                    cc[m.group(1)] = int(m.group(2))
            counts[num] = cc
        order: list[int] = []
        cat_of: dict[int, str] = {}
        for cat in self.categories:
            _, crows = _read_csv(self._c_path(cat))
            for r in sorted(crows, key=lambda r: _int(r.get("code", ""), f"c_{cat}.csv code")):
                code = _int(r.get("code", ""), f"c_{cat}.csv code")
                num = _int(r.get("number", ""), f"c_{cat}.csv number")
                if code < 1 or num < 1:
                    continue
                if num not in names:
                    names[num] = r.get("name", str(num))
                if num not in cat_of:
                    order.append(num)
                    cat_of[num] = cat
                elif counts.get(num, {}).get(cat, 0) > counts.get(num, {}).get(cat_of[num], 0):
                    cat_of[num] = cat
        self.label_numbers: tuple[int, ...] = tuple(order)
        self.concept_names: tuple[str, ...] = tuple(names[n] for n in order)
        self.concept_categories: tuple[str, ...] = tuple(cat_of[n] for n in order)
        top = max(order, default=0)
        self._lookup = np.zeros(max(top, max(names, default=0)) + 1, np.int32)  # number -> concept + 1
        self._lookup[np.asarray(order, np.intp)] = np.arange(1, len(order) + 1, dtype=np.int32)

        # rows
        self._rows: list[dict] = []
        for n, r in enumerate(rows):
            if split is not None and r["split"] != split:
                continue
            where = f"index.csv row {n + 2}"
            entries: list[int | str] = []
            for cat in self.categories:
                for e in (r.get(cat) or "").split(";"):
                    e = e.strip()
                    if not e:
                        continue
                    entries.append(int(e) if re.fullmatch(r"-?\d+", e) else e)
            self._rows.append(
                {
                    "image": r["image"],
                    "split": r["split"],
                    "ih": _int(r["ih"], f"{where} ih"),
                    "iw": _int(r["iw"], f"{where} iw"),
                    "sh": _int(r["sh"], f"{where} sh"),
                    "sw": _int(r["sw"], f"{where} sw"),
                    "entries": entries,
                }
            )
            if max_images is not None and len(self._rows) >= max_images:
                break
        if not self._rows:
            raise ValueError(f"Broden: no images selected in {self.directory} (split={split!r})")
        self.size = normalize_size(size)
        self.mask_size = normalize_size(mask_size)
        if self.size is None and len({(r["ih"], r["iw"]) for r in self._rows}) > 1:
            raise ValueError("Broden: images have different sizes (ih, iw); pass size=(H, W) to resize them")
        if self.mask_size is None and len({(r["sh"], r["sw"]) for r in self._rows}) > 1:
            raise ValueError(
                "Broden: segmentations have different sizes (sh, sw); pass mask_size=(M, N) to resample them"
            )
        self.num_layers: int = max(1, max(len(r["entries"]) for r in self._rows))

    def _c_path(self, cat: str) -> str:
        return os.path.join(self.directory, f"c_{cat}.csv")

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.size or (self._rows[0]["ih"], self._rows[0]["iw"])

    @property
    def mask_shape(self) -> tuple[int, int]:
        return self.mask_size or (self._rows[0]["sh"], self._rows[0]["sw"])

    def __len__(self) -> int:
        return len(self._rows)

    def _check(self, indices: Sequence[int]) -> list[int]:
        return check_indices(indices, len(self))

    def image_id(self, i: int) -> str:
        return self._rows[self._check([i])[0]]["image"]

    def _image(self, i: int) -> np.ndarray:
        row = self._rows[i]
        path = os.path.join(self.directory, "images", row["image"])
        if not os.path.isfile(path):
            raise DatasetLayoutError(f"Broden: image file not found: {path}")
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.size is not None and im.size != (self.size[1], self.size[0]):
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            return np.asarray(im, np.float32) / np.float32(255.0)

    def images(self, indices: Sequence[int]) -> np.ndarray:
        """(n, H, W, 3) float32 RGB in [0, 1]."""
        idx = self._check(indices)
        h, w = self.image_shape
        return np.stack([self._image(i) for i in idx]) if idx else np.zeros((0, h, w, 3), np.float32)

    def labels(self, i: int) -> np.ndarray:
        """(L, M, N) int32 label stack of item ``i``: concept index + 1 (0 = none)."""
        i = self._check([i])[0]
        row = self._rows[i]
        sh, sw = row["sh"], row["sw"]
        m, n = self.mask_shape
        out = np.zeros((self.num_layers, m, n), np.int32)
        rr = np.minimum(((np.arange(m) + 0.5) * (sh / m)).astype(np.intp), sh - 1)
        cc = np.minimum(((np.arange(n) + 0.5) * (sw / n)).astype(np.intp), sw - 1)
        lut = self._lookup
        for layer, e in enumerate(row["entries"]):
            if isinstance(e, int):
                out[layer] = lut[e] if 0 <= e < lut.size else 0
                continue
            path = os.path.join(self.directory, "images", e)
            if not os.path.isfile(path):
                raise DatasetLayoutError(f"Broden: label image not found: {path}")
            num = decode_label_png(path)
            if num.shape != (sh, sw):
                raise ValueError(f"Broden: {path} is {num.shape[0]}x{num.shape[1]}, index.csv says sh x sw = {sh}x{sw}")
            num = num[rr][:, cc]
            out[layer] = np.where(num < lut.size, lut[np.minimum(num, lut.size - 1)], 0)
        return out

    def load(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, H, W, 3) float32 in [0, 1] and label stacks (n, L, M, N) int32."""
        idx = self._check(indices)
        labs = [self.labels(i) for i in idx]
        m, n = self.mask_shape
        return self.images(idx), (np.stack(labs) if labs else np.zeros((0, self.num_layers, m, n), np.int32))


def open_broden(directory: str | os.PathLike, **kwargs) -> BrodenDataset:
    """:class:`BrodenDataset` of ``directory`` (keyword arguments as for the class)."""
    return BrodenDataset(directory, **kwargs)
