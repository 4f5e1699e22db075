"""Files of the tiny single-stage detector (:class:`xaijax.models.detector.TinyDetector`).

A native checkpoint (:func:`~xaijax.checkpoints.save_variables`) whose metadata holds
``arch = "tiny_detector"`` and the detector's configuration (``model_kwargs``, JSON of
:meth:`~xaijax.models.detector.TinyDetector.model_kwargs`); further string entries (training
configuration, recorded mAP, ``preprocess = "none"``) travel along. The model code knows
nothing about files: the dependency goes checkpoints -> models only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from xaijax.checkpoints.native import load_variables, save_variables
from xaijax.models.detector import ARCH_NAME, TinyDetector

__all__ = ["save_detector", "load_detector"]


def save_detector(path: str | os.PathLike, model: TinyDetector, variables: Mapping[str, Any], **extra: str) -> None:
    """Save ``variables`` with metadata ``{"arch": "tiny_detector", "model_kwargs": json, **extra}``
    (atomically; ``extra`` values are converted with ``str``)."""
    meta = {"arch": ARCH_NAME, "model_kwargs": json.dumps(model.model_kwargs(), sort_keys=True)}
    meta.update({str(k): str(v) for k, v in extra.items()})
    save_variables(path, variables, meta)


def load_detector(path: str | os.PathLike) -> tuple[TinyDetector, dict[str, Any], dict[str, str]]:
    """Rebuild a detector saved by :func:`save_detector`.

    Returns:
      ``(model, variables, metadata)`` with ``model`` in eval mode (``train=False``).

    Raises:
      ValueError: the file's metadata does not describe a ``tiny_detector``.
    """
    variables, meta = load_variables(path)
    if meta.get("arch") != ARCH_NAME:
        raise ValueError(f"{os.fspath(path)!r}: expected metadata arch={ARCH_NAME!r}, got {meta.get('arch')!r}")
    try:
        kwargs = json.loads(meta["model_kwargs"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r}: missing or invalid 'model_kwargs' metadata ({e})") from None
    if "layers" in kwargs:
        kwargs["layers"] = tuple(int(n) for n in kwargs["layers"])
    return TinyDetector(**kwargs), variables, meta
