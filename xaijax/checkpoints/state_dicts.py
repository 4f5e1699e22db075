"""Reading a torch-named state dict ``{torch key: array}`` from a file, whatever its format: a
torch ``.pth``/``.pt``/``.bin`` file through the safe reader (no torch import, no pickle code run)
or a ``.safetensors`` file with torch names. The one home of that dispatch (the image porter of
:mod:`xaijax.checkpoints.convert` and the BERT porter of :mod:`xaijax.checkpoints.bert_mapping`
both read with it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xaijax.checkpoints.safetensors_io import load_safetensors
from xaijax.checkpoints.torch_pickle import load_state_dict

__all__ = ["read_torch_state_dict"]


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{torch key: array}`` of a torch file (safe reader) or of a torch-named ``.safetensors``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    return load_state_dict(path)
