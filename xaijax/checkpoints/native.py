"""Native xaijax checkpoints: Flax variable trees with a small ``str -> str`` metadata header.

The format is chosen by the file extension:

* ``.safetensors`` -- the variables are flattened to ``/``-joined keys
  (``params/features/0/kernel``, see :func:`~xaijax.checkpoints.safetensors_io.flatten_variables`)
  and stored with the metadata in the safetensors header (``__metadata__``). Readable by any
  safetensors tool; recommended.
* ``.msgpack`` -- ``flax.serialization.msgpack_serialize`` of the map

  .. code-block:: python

      {"__xaijax__": "variables/1",      # format marker and version
       "metadata": {str: str, ...},
       "variables": {...nested variable tree...}}

  A ``.msgpack`` file without the marker -- e.g. ``flax.serialization.to_bytes(variables)``
  written by other code -- is read as a bare variable tree with empty metadata.

Metadata carries what is needed to rebuild the model, as strings, e.g. ``{"arch": "vgg16",
"num_classes": "20", "model_kwargs": "{...json...}"}``; :func:`load_variables` returns it
unchanged so that callers (the CLI, :mod:`xaijax.checkpoints.convert`) can check it against
the requested architecture. Both writers are atomic (:mod:`xaijax.atomic`): a failed save
leaves no partial file and never damages an existing one.

Loaded variables are nested plain ``dict`` s of writable numpy arrays with the saved dtypes
(bfloat16 stays ``ml_dtypes.bfloat16``); pass them straight to ``model.apply``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xaijax.atomic import atomic_bytes
from xaijax.checkpoints.errors import CheckpointFormatError
from xaijax.checkpoints.safetensors_io import (
    flatten_variables,
    load_safetensors,
    save_safetensors,
    unflatten_variables,
    validate_metadata,
)

__all__ = ["save_variables", "load_variables", "NATIVE_FORMATS", "MSGPACK_FORMAT_TAG"]

#: File extensions understood by :func:`save_variables` / :func:`load_variables`.
NATIVE_FORMATS = (".safetensors", ".msgpack")
#: Value of the ``"__xaijax__"`` marker of ``.msgpack`` files written by this version.
MSGPACK_FORMAT_TAG = "variables/1"
_MARKER = "__xaijax__"


def _format_of(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in NATIVE_FORMATS:
        raise ValueError(
            f"unsupported checkpoint extension {suffix or '(none)'!r} for {os.fspath(path)!r}; "
            f"use one of {', '.join(NATIVE_FORMATS)}"
        )
    return suffix


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save a Flax variable tree (``{"params": ..., "batch_stats": ...}``) atomically.

    Args:
      path: destination ending in ``.safetensors`` or ``.msgpack``; its directory must exist.
      variables: nested mapping (``dict`` / ``FrozenDict``) of numpy or JAX arrays with
        string keys that contain no ``/``.
      metadata: optional ``str -> str`` entries (architecture name, ``num_classes``, ...).

    Raises:
      ValueError: unsupported extension, bad variable names or leaves, non-string metadata;
        nothing is written then.
    """
    fmt = _format_of(path)
    meta = validate_metadata(metadata)
    flat = flatten_variables(variables)
    if fmt == ".safetensors":
        save_safetensors(path, flat, meta)
        return
    from flax import serialization

    payload = {_MARKER: MSGPACK_FORMAT_TAG, "metadata": meta, "variables": unflatten_variables(flat)}
    atomic_bytes(path, serialization.msgpack_serialize(payload))


def _writable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _writable(v) for k, v in tree.items()}
    if isinstance(tree, np.generic):
        return np.asarray(tree).copy()
    if isinstance(tree, np.ndarray) and not tree.flags.writeable:
        return tree.copy()
    return tree


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a file written by :func:`save_variables`.

    Returns:
      ``(variables, metadata)``: the nested variable tree (plain dicts of numpy arrays) and
      the ``str -> str`` metadata (``{}`` when the file has none).

    Raises:
      FileNotFoundError: no such file.
      ValueError: unsupported extension.
      CheckpointFormatError: corrupt, truncated or not a checkpoint of that format.
    """
    fmt = _format_of(path)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if fmt == ".safetensors":
        flat, meta = load_safetensors(path)
        try:
            return unflatten_variables(flat), meta
        except ValueError as e:
            raise CheckpointFormatError(f"cannot read '{path}': {e}") from None
    from flax import serialization

    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        raise CheckpointFormatError(f"cannot read '{path}': the file is empty")
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointFormatError(f"cannot read '{path}': not a valid msgpack checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"cannot read '{path}': expected a msgpack map, found {type(state).__name__}")
    if _MARKER in state:
        if state[_MARKER] != MSGPACK_FORMAT_TAG:
            raise CheckpointFormatError(
                f"cannot read '{path}': unknown xaijax msgpack format {state[_MARKER]!r} (this version reads "
                f"{MSGPACK_FORMAT_TAG!r})"
            )
        variables, meta = state.get("variables", {}), state.get("metadata", {})
        try:
            meta = validate_metadata(meta)
        except ValueError as e:
            raise CheckpointFormatError(f"cannot read '{path}': {e}") from None
    else:
        variables, meta = state, {}
    if not isinstance(variables, dict):
        raise CheckpointFormatError(f"cannot read '{path}': the variables entry is not a map")
    return _writable(variables), meta
