"""A user model named by a Python entry point, ``package.module:factory`` (``--model`` of
``xaijax explain`` and ``xaijax eval``).

The factory is called without arguments and returns one of:

* ``(model, variables)`` — anything :func:`xaijax.models.adapters.wrap` takes (a ``flax.linen``
  module and its variables, or ``apply(params, x) -> logits`` and its params);
* a model alone — a Flax NNX module (in eval mode) or an Equinox module;
* a dict ``{"model": ..., "variables": ... (optional), "wrap": {...} (keyword arguments of
  wrap: ``batched``, ``layout``), "input_size": int, "preprocess": "torchvision" | "caffe" |
  "none", "class_names": [str, ...], "output": "softmax" | "sigmoid", "whole_image": bool}``.
  The metadata keys say what a checkpoint's metadata says (:func:`xaijax.models.preprocess.recorded`):
  the square input side, the normalisation the model expects, the class names, the output
  activation and whether images are resized whole (``True``) or resized and centre-cropped.

``module`` is imported from the current directory first (as ``python -m`` does); a path
``path/to/file.py:factory`` is also accepted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from xaijax.models.adapters import wrap

__all__ = ["load", "digest", "METADATA_KEYS"]

#: Metadata a factory may return next to its model (see the module docstring).
METADATA_KEYS = ("input_size", "preprocess", "class_names", "output", "whole_image")

_DICT_KEYS = ("model", "variables", "wrap") + METADATA_KEYS


def _import(spec: str) -> tuple[Any, str]:
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--model expects package.module:factory (or path/to/file.py:factory); got {spec!r}")
    where, attr = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model {spec}: no such file {where}")
        name = f"xaijax_user_model_{path.stem}"
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module  # dataclasses (linen, Equinox modules) look their module up while the file runs
        try:
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[name]
            raise
    else:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f"--model {spec}: cannot import {where!r} ({e}); run from the folder that holds it") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"--model {spec}: {where} has no callable {attr!r}")
    return factory, attr


def load(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    """Call the factory named by ``spec`` and adapt its model: ``(module, variables, info)``.

    ``info`` has the form of :func:`xaijax.checkpoints.load`'s: ``{"arch": spec, "source":
    "entry-point", "metadata": {...}}`` with the factory's metadata (only the keys it gave), so
    :func:`xaijax.models.preprocess.recorded` and ``preprocess.convention`` read it as they
    read a checkpoint's.

    Raises:
      ValueError: a malformed spec, an import failure, an unknown dict key or a bad metadata
        value (each message names the spec); the errors of :func:`wrap`.
    """
    factory, _ = _import(spec)
    made = factory()
    meta: dict[str, Any] = {}
    wrap_kw: Mapping[str, Any] = {}
    if isinstance(made, Mapping):
        unknown = sorted(set(made) - set(_DICT_KEYS))
        if unknown or "model" not in made:
            raise ValueError(
                f"--model {spec}: the factory's dict needs 'model' and may hold {', '.join(_DICT_KEYS[1:])}; "
                f"got keys {sorted(made)}"
            )
        model, variables = made["model"], made.get("variables")
        wrap_kw = made.get("wrap") or {}
        if not isinstance(wrap_kw, Mapping):
            raise ValueError(f"--model {spec}: 'wrap' must be a dict of keyword arguments of xaijax.wrap")
        meta = {k: made[k] for k in METADATA_KEYS if made.get(k) is not None}
    elif isinstance(made, tuple) and len(made) == 2:
        model, variables = made
    else:
        model, variables = made, None
    _check_meta(spec, meta)
    module, out_vars = wrap(model, variables, **wrap_kw)
    return module, out_vars, {"arch": spec, "source": "entry-point", "metadata": meta}


def _check_meta(spec: str, meta: Mapping[str, Any]) -> None:
    size = meta.get("input_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"--model {spec}: input_size must be a positive int (pixels); got {size!r}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"--model {spec}: class_names must be a list of strings")
    if isinstance(names, tuple):
        meta["class_names"] = list(names)  # type: ignore[index]


def digest(variables: Any) -> str:
    """SHA-256 of the variables' structure, shapes, dtypes and bytes: identifies the weights of a
    model that has no checkpoint file (results stores compare it on resume)."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    h.update(str(jax.tree_util.tree_structure(variables)).encode())
    for path, leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
