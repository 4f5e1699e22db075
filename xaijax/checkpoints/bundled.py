"""The weights bundled with a source checkout (``weights/``): the synthetic-benchmark models."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["weights_dir", "bundled_weights"]


def weights_dir() -> Path:
    """The bundled ``weights/`` folder (override with the environment variable ``XAIJAX_WEIGHTS``)."""
    env = os.environ.get("XAIJAX_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights"


def bundled_weights(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The bundled weights file ``name`` (e.g. ``"synthetic_vgg16.safetensors"``) in ``folder``
    (default :func:`weights_dir`).

    Raises:
      FileNotFoundError: no such file.
    """
    path = (Path(folder) if folder is not None else weights_dir()) / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled weights file missing: {path} (run from a clone of the repository, or set XAIJAX_WEIGHTS)")
    return path
