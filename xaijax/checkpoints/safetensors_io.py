"""``.safetensors`` files of flat ``name -> numpy array`` dicts, and Flax variable flattening.

* :func:`save_safetensors` / :func:`load_safetensors` -- flat dicts with an optional
  ``str -> str`` metadata header, through the ``safetensors`` package (its numpy API).
  Writes are atomic (:func:`xaijax.atomic.atomic_write`): a temporary file in the destination
  directory is written, flushed to disk and then renamed over the destination, so a crash or
  an error never leaves a partial file behind and an existing file is replaced only by a
  complete one.
* :func:`flatten_variables` / :func:`unflatten_variables` -- Flax variable trees
  (``{"params": {"features": {"0": {"kernel": ...}}}}``) <-> flat dicts with ``/``-joined
  keys (``"params/features/0/kernel"``).

dtypes round-trip bit-exactly: bool, (u)int8/16/32/64, float16/32/64, complex64, and the
``ml_dtypes`` types JAX uses (``bfloat16``, ``float8_e4m3fn``, ``float8_e5m2``,
``float8_e4m3fnuz``, ``float8_e5m2fnuz``, ``float8_e8m0fnu``). complex128 is not part of the
safetensors format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from xaijax.atomic import atomic_write  # re-exported: the one atomic writer is xaijax.atomic's
from xaijax.checkpoints.errors import CheckpointFormatError

__all__ = [
    "save_safetensors",
    "load_safetensors",
    "flatten_variables",
    "unflatten_variables",
    "atomic_write",
    "validate_metadata",
    "SEPARATOR",
]

#: Separator of the path components of a flattened variable key.
SEPARATOR = "/"

# safetensors dtype tags that safetensors' numpy backend cannot build (no numpy attribute)
_ML_DTYPES = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Check that ``metadata`` is a ``str -> str`` mapping (or None) and return it as a dict.

    Raises:
      ValueError: a key or value is not a string (convert numbers with ``str()`` or
        ``json.dumps`` first).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(
                f"metadata must map str -> str; entry {k!r}: {v!r} is {type(k).__name__} -> {type(v).__name__} "
                "(convert numbers with str() or json.dumps)"
            )
    return dict(metadata)


def _as_array(key: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise ValueError(f"tensor {key!r}: cannot convert {type(value).__name__} to an array ({e})") from None
    if arr.dtype.kind not in "biufc" and arr.dtype not in _ML_DTYPES.values():
        raise ValueError(f"tensor {key!r} has dtype {arr.dtype}; only numeric arrays can be saved")
    return arr if arr.flags.c_contiguous else np.array(arr, order="C")  # keeps 0-d arrays 0-d


def save_safetensors(path: str | os.PathLike, flat: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write a flat ``name -> array`` dict to a ``.safetensors`` file, atomically.

    Args:
      path: destination file (its directory must exist).
      flat: ``str`` keys to numpy / JAX arrays or scalars (any shape; copied to C order).
      metadata: optional ``str -> str`` header entries (e.g. ``{"arch": "vgg16",
        "num_classes": "20"}``).

    Raises:
      ValueError: a non-string key, a non-numeric array, an unsupported dtype (complex128)
        or bad metadata; nothing is written then.
    """
    from safetensors import numpy as st_numpy

    meta = validate_metadata(metadata)
    if not isinstance(flat, Mapping):
        raise ValueError(f"expected a dict of name -> array, got {type(flat).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"tensor names must be non-empty strings, got {k!r}")
        arrays[k] = _as_array(k, v)

    def write(tmp: str) -> None:
        try:
            st_numpy.save_file(arrays, tmp, metadata=meta or None)
        except Exception as e:
            if type(e).__name__ == "SafetensorError" or isinstance(e, (ValueError, TypeError)):
                raise ValueError(f"cannot save {os.fspath(path)!r} as safetensors: {e}") from None
            raise

    atomic_write(path, write)


def _read_raw(path: str, key: str, dtype: np.dtype) -> np.ndarray:
    """One tensor read straight from the file layout: u64 header length, JSON header, data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[key]
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        buf = bytearray(f.read(end - begin))
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a ``.safetensors`` file.

    Returns:
      ``(flat, metadata)``: ``name -> numpy array`` (writable arrays, keys sorted) and the
      ``str -> str`` metadata header (``{}`` when the file has none).

    Raises:
      FileNotFoundError: no such file.
      CheckpointFormatError: not a valid safetensors file (empty, truncated, bad header).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such safetensors file: {path}")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                dtype_tag = f.get_slice(key).get_dtype()
                if dtype_tag in _ML_DTYPES and dtype_tag != "BF16":
                    # safetensors' numpy backend has no float8 types: read the raw bytes
                    out[key] = _read_raw(path, key, _ML_DTYPES[dtype_tag])
                else:
                    arr = f.get_tensor(key)
                    out[key] = arr if arr.flags.writeable else arr.copy()
    except FileNotFoundError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointFormatError(f"cannot read '{path}': not a valid safetensors file ({type(e).__name__}: {msg})") from None
    return out, metadata


# ----------------------------------------------------------------------------- flattening


def flatten_variables(variables: Mapping[str, Any], sep: str = SEPARATOR) -> dict[str, np.ndarray]:
    """Flatten a Flax variable tree into ``{"params/features/0/kernel": array, ...}``.

    Nested mappings (``dict``, ``FrozenDict``) become ``sep``-joined keys; every leaf is
    converted with ``np.asarray`` (JAX arrays are copied to the host; dtype and shape kept).
    Empty sub-dicts carry no array and are dropped.

    Raises:
      ValueError: a non-string key, a key containing ``sep`` (it could not be unflattened)
        or a leaf that is not a numeric array.
    """
    if not isinstance(variables, Mapping):
        raise ValueError(f"variables must be a (nested) dict of arrays, got {type(variables).__name__}")
    out: dict[str, np.ndarray] = {}

    def walk(tree: Mapping[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            if not isinstance(k, str) or not k or sep in k:
                where = f" under {prefix.rstrip(sep)!r}" if prefix else ""
                raise ValueError(f"variable name {k!r}{where} must be a non-empty string without {sep!r}")
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}{sep}")
            else:
                out[prefix + k] = _as_array(prefix + k, v)

    walk(variables, "")
    return out


def unflatten_variables(flat: Mapping[str, Any], sep: str = SEPARATOR) -> dict[str, Any]:
    """Inverse of :func:`flatten_variables`: ``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``.

    Leaves are kept as they are (numpy arrays from the loaders). Returns plain nested dicts,
    which ``flax.linen.Module.apply`` accepts.

    Raises:
      ValueError: an empty path component, or a key that is both a leaf and a prefix of
        another key (``"a/b"`` and ``"a/b/c"``).
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise ValueError(f"flat keys must be strings, got {key!r}")
        parts = key.split(sep)
        if any(not p for p in parts):
            raise ValueError(f"flat key {key!r} has an empty path component")
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"flat key {key!r} conflicts with the leaf {sep.join(parts[: i + 1])!r}")
            node = child
        if parts[-1] in node:
            raise ValueError(f"flat key {key!r} conflicts with keys below it")
        node[parts[-1]] = value
    return out
