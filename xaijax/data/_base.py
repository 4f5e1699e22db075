"""Shared machinery of the real-dataset loaders (VOC, COCO, ImageNet-segmentation).

Every loader is a :class:`LoaderDataset`: a sized, indexable sequence of
:class:`~xaijax.data.records.Record` with ``class_names``. Images are decoded lazily, one
per access, so opening a dataset of thousands of images is cheap.

Bad images. An image that cannot be read or decoded (missing file, truncated/corrupt
JPEG, a size that disagrees with its annotation) is *skipped and counted*, never fatal in
a long run:

* iterating (``for record in dataset``, :meth:`LoaderDataset.records`) skips it with a
  :class:`SkippedImageWarning` and goes on;
* ``dataset[i]`` raises :class:`CorruptImageError` (a ``ValueError``) for it, since an
  explicit index has no record to return; :meth:`LoaderDataset.get` returns ``None``;
* either way the index is recorded in :attr:`LoaderDataset.skipped` (index -> reason;
  recording is idempotent, so :attr:`LoaderDataset.num_skipped` counts distinct images).

Resizing. With ``size=(H', W')`` (or an int for a square) every image is resized to
exactly ``H' x W'`` (no aspect-ratio preservation, no crop), with PIL's bilinear filter
(antialiased when shrinking). Annotations follow the same map: a point ``(x, y)`` in the
continuous pixel-edge coordinates of :mod:`xaijax.data.records` goes to
``(x * W'/W, y * H'/H)``, so boxes are scaled by these factors, and a mask is resampled
by its pixel centres: output pixel ``(i, j)`` takes the input pixel containing the point
``((j + 0.5) * W/W', (i + 0.5) * H/H')`` (nearest neighbour, exact for integer factors).
Loaders whose masks *are* boxes (VOC) rebuild them from the scaled boxes instead.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from xaijax.data.records import Record

__all__ = [
    "CorruptImageError",
    "decode_rgb",
    "DatasetLayoutError",
    "LoaderDataset",
    "SkippedImageWarning",
    "normalize_size",
]


class DatasetLayoutError(FileNotFoundError):
    """A dataset directory or file does not have the expected layout (names what is missing)."""


class CorruptImageError(ValueError):
    """An image could not be read/decoded, or disagrees with its annotation."""


class SkippedImageWarning(UserWarning):
    """Emitted when iteration skips an image that could not be loaded."""


def normalize_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None`` | int ``s`` -> ``(s, s)`` | ``(H, W)``; validates positive integers."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"size: expected None, an int or (height, width), got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"size: expected positive integers (height, width), got {size!r}")
    return int(h), int(w)


def check_indices(indices: Sequence[int], n: int) -> list[int]:
    """``indices`` as a list of ints, each in ``[0, n)``; a ``ValueError`` names the first bad one."""
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise ValueError(f"indices: expected integers in [0, {n}), got {i!r}")
        out.append(int(i))
    return out


def require_path(path: str | os.PathLike, what: str, *, is_dir: bool) -> str:
    """Return ``path`` as str, or raise :class:`DatasetLayoutError` naming it and ``what`` it is."""
    path = os.fspath(path)
    ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not ok:
        kind = "folder" if is_dir else "file"
        raise DatasetLayoutError(f"{what}: expected the {kind} {path!r}, which does not exist")
    return path


#: PIL modes with 8 bits per channel: PIL's ``convert("RGB")`` reads them exactly (alpha dropped).
EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
#: PIL modes of 16-bit unsigned integer images (16-bit grayscale PNG and TIFF).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_rgb(img: Image.Image, name: str) -> np.ndarray:
    """A decoded PIL image -> (H, W, 3) float32 RGB in [0, 1], by bit depth.

    8-bit modes are divided by 255 (PIL's RGB conversion: grayscale replicated, palette
    expanded, alpha dropped); 16-bit grayscale (``I;16``, and ``I`` read from a PNG, whose
    integer images are at most 16 bits) is divided by 65535; 32-bit float grayscale (``F``,
    e.g. a float TIFF) is used as is when all its values are finite and in [0, 1]. Anything
    else (32-bit integer TIFFs, float images outside [0, 1], exotic modes) is refused with a
    :class:`CorruptImageError` naming ``name`` and the mode — never silently clipped, which
    is what ``convert("RGB")`` does to them (a 16-bit image turns all white).
    """
    mode = img.mode
    if mode in EIGHT_BIT_MODES:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and img.format == "PNG"):
        gray = np.asarray(img).astype(np.float32) / np.float32(65535.0)
    elif mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(gray)
        lo = float(gray[finite].min()) if finite.any() else float("nan")
        hi = float(gray[finite].max()) if finite.any() else float("nan")
        if not finite.all() or lo < 0.0 or hi > 1.0:
            raise CorruptImageError(
                f"image {name} is a 32-bit float image with values in [{lo:.4g}, {hi:.4g}]"
                + ("" if finite.all() else " and non-finite values")
                + "; xaijax reads float images only when they hold intensities in [0, 1]: rescale it to [0, 1] "
                "or save it as an 8- or 16-bit image"
            )
    else:
        what = "a 32-bit integer image" if mode == "I" else f"an image of PIL mode {mode!r}"
        raise CorruptImageError(
            f"image {name} is {what}, whose intensity range xaijax cannot know; save it as an 8-bit or "
            "16-bit image (or a float image in [0, 1])"
        )
    return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)


def open_rgb(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Decode an image file (path or encoded bytes) fully into an RGB PIL image.

    16-bit and float images are decoded by bit depth (:func:`decode_rgb`) and then quantised
    to 8 bits per channel (the datasets' common format); images whose range cannot be known
    are refused.

    Raises :class:`CorruptImageError` naming ``name`` if it cannot be read or decoded.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(source)))
        else:
            img = Image.open(os.fspath(source))
        img.load()  # force full decoding: truncated files fail here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
    if img.mode in EIGHT_BIT_MODES:
        return img.convert("RGB")
    rgb = decode_rgb(img, name)
    return Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))


def image_to_array(img: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) float32 in [0, 1], resized to ``size=(H, W)`` if given."""
    if size is not None and (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def scale_boxes(boxes: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Scale (K, 4) ``[x0, y0, x1, y1]`` boxes from an ``src_hw`` image to a ``dst_hw`` one."""
    sy = dst_hw[0] / src_hw[0]
    sx = dst_hw[1] / src_hw[1]
    factors = np.array([sx, sy, sx, sy], np.float64)
    return (np.asarray(boxes, np.float64).reshape(-1, 4) * factors).astype(np.float32)


def resize_masks(masks: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel-centre) resampling of (K, H, W) bool masks to (K, H', W')."""
    masks = np.asarray(masks, bool)
    k, h, w = masks.shape
    if (h, w) == dst_hw:
        return masks
    rows = np.minimum(((np.arange(dst_hw[0]) + 0.5) * (h / dst_hw[0])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(dst_hw[1]) + 0.5) * (w / dst_hw[1])).astype(np.int64), w - 1)
    return masks[:, rows[:, None], cols[None, :]]


class LoaderDataset(Sequence[Record]):
    """Base of the real-dataset loaders: a sized, indexable sequence of :class:`Record`.

    Subclasses set ``self._class_names`` and ``self._size`` and implement ``__len__``,
    :meth:`image_id` and ``_load(index) -> Record`` (raising :class:`CorruptImageError`
    for an unusable image). See the module docstring for skipping and resizing.
    """

    _class_names: tuple[str, ...]
    _size: tuple[int, int] | None

    def __init__(self) -> None:
        self.skipped: dict[int, str] = {}

    # ------------------------------------------------------------- subclass hooks
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_id(self, index: int) -> str:  # pragma: no cover - abstract
        """Stable identifier of image ``index`` (no decoding)."""
        raise NotImplementedError

    def _load(self, index: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names; ``Record.labels`` index into this tuple."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def size(self) -> tuple[int, int] | None:
        """Target ``(height, width)`` of every record, or ``None`` for native sizes."""
        return self._size

    @property
    def num_skipped(self) -> int:
        """Number of distinct images found unusable so far (see :attr:`skipped`)."""
        return len(self.skipped)

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an integer, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return i

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        """Record ``index``; raises :class:`CorruptImageError` (and records it) if unusable."""
        i = self._index(index)
        try:
            return self._load(i)
        except CorruptImageError as e:
            self.skipped[i] = str(e)
            raise

    def get(self, index: int) -> Record | None:
        """Record ``index``, or ``None`` (with a warning, counted) if its image is unusable."""
        i = self._index(index)
        try:
            return self[i]
        except CorruptImageError as e:
            warnings.warn(f"skipping image {i} ({self.image_id(i)}): {e}", SkippedImageWarning, stacklevel=2)
            return None

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        """Records ``start .. stop - 1`` in order, skipping unusable images (warned, counted)."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        for i in range(int(start), stop):
            r = self.get(i)
            if r is not None:
                yield r

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, classes={self.num_classes}, "
            f"size={self._size}, skipped={self.num_skipped})"
        )
