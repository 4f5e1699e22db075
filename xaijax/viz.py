"""Turning attribution maps into pictures: heatmaps, overlays, atomic PNG writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xaijax.atomic import atomic_write
from xaijax.imageops import minmax_normalize

__all__ = ["heatmap", "overlay", "save_png"]


def heatmap(m: np.ndarray, signed: bool | None = None) -> np.ndarray:
    """Colour an (H, W) map as an (H, W, 3) float RGB image in [0, 1].

    Signed maps (``signed=None`` detects negative values) use a blue-white-red colormap
    symmetric around zero (``bwr``); non-negative maps use ``jet`` over [min, max] (min-max normalised).
    """
    from matplotlib import colormaps

    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"a map must have shape (H, W); got {m.shape}")
    m = np.nan_to_num(m)
    if signed is None:
        signed = bool((m < 0).any())
    if signed:
        s = np.abs(m).max() or 1.0
        return colormaps["bwr"]((m / s + 1) / 2)[..., :3]
    return colormaps["jet"](minmax_normalize(m[None])[0])[..., :3]


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the heatmap of ``m`` (H, W) over an RGB image (H, W, 3) in [0, 1]."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3); got {image.shape}")
    m = np.asarray(m)
    if m.shape != image.shape[:2]:
        from PIL import Image

        m = np.asarray(Image.fromarray(m.astype(np.float32)).resize(image.shape[1::-1], Image.BILINEAR))
    return np.clip((1 - alpha) * image + alpha * heatmap(m), 0, 1)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) float [0, 1] or uint8 image as PNG, atomically (:func:`xaijax.atomic.atomic_write`)."""
    from PIL import Image

    path = Path(path)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
    return path
