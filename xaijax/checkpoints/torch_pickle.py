"""Read PyTorch ``.pth`` / ``.pt`` checkpoints without torch and without running pickle code.

``torch.save`` writes a pickle in which every tensor is a call such as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and every storage is
a *persistent id* that points at raw bytes stored beside the pickle. This module replays
such pickles with a :class:`pickle.Unpickler` whose ``find_class`` hands out only an
allow-list of xaijax's own re-implementations (which build numpy arrays); any other global
-- ``os.system``, ``builtins.eval``, a pickled ``nn.Module`` class, ... -- raises
:class:`~xaijax.checkpoints.errors.UnsafeCheckpointError` before anything runs. Nothing in
this module imports torch.

Formats (facts from ``torch/serialization.py``):

* **zip** (torch >= 1.6, the default): a zip archive with one top folder (its name varies,
  often ``archive``) holding ``data.pkl`` (the pickle), ``data/<key>`` (one raw record per
  storage), ``byteorder`` (``little``/``big``; absent in old files = little) and bookkeeping
  records. Persistent ids are ``("storage", StorageType, key, location, numel)``.
* **legacy** (``_use_new_zipfile_serialization=False`` and torch 0.4 - 1.5): a stream of
  pickles -- the magic number ``0x1950A86A20F9469CFC6C``, the protocol version ``1001``, a
  ``sys_info`` dict, the main pickle, the sorted list of storage keys -- followed, for each
  key, by a little-endian int64 element count and the storage's raw little-endian bytes.
  Persistent ids are ``("storage", StorageType, key, location, numel, view_metadata)``.
* The pre-2018 *tar* format is recognised and refused with a clear error.

Result conventions: tensors become C-contiguous, writable :class:`numpy.ndarray` copies with
the tensor's shape (views with storage offsets and arbitrary strides are materialised; a
storage shared by several tensors is read once). dtypes map bit-exactly: float32/64/16,
int64/32/16/8, uint8/16/32/64, bool, complex64/128, and ``bfloat16`` / ``float8_*`` as the
``ml_dtypes`` types that JAX uses (``jnp.asarray`` accepts them directly; cast with
``.astype(np.float32)`` where float32 is wanted). ``torch.nn.Parameter`` is unwrapped to
its data. ``torch.Size`` becomes a tuple and ``torch.<dtype>`` objects become
:class:`TorchDtype`. Besides tensors, the allow-list admits what state dicts and ordinary
training checkpoints hold: ``collections.OrderedDict``, builtin ``set``/``frozenset``/
``complex``/``bytes`` (protocol-2 spellings), numpy scalars (e.g. ``best_acc1``) and
``argparse.Namespace`` (the ``args`` entry of torchvision's reference training scripts).

Public API: :func:`load_torch` (the whole pickled object), :func:`load_state_dict` (the flat
``name -> array`` dict inside it), :func:`find_state_dict` and :class:`TorchDtype`.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import pickle
from collections.abc import Callable, Mapping
from typing import IO, Any

import ml_dtypes
import numpy as np

from xaijax.checkpoints.errors import CheckpointError, CheckpointFormatError, UnsafeCheckpointError

__all__ = ["load_torch", "load_state_dict", "find_state_dict", "TorchDtype", "STATE_DICT_WRAPPER_KEYS"]

PathOrFile = str | os.PathLike | IO[bytes]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: Keys under which training scripts commonly nest the state dict, in order of preference.
STATE_DICT_WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "model_ema",
    "ema",
    "state",
)

# torch dtype name -> numpy dtype (None: a real torch dtype without a numpy equivalent).
_TORCH_DTYPES: dict[str, np.dtype | None] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}
for _name in (
    "complex32", "chalf", "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "float4_e2m1fn_x2",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
    *(f"int{i}" for i in range(1, 8)), *(f"uint{i}" for i in range(1, 8)),
):  # fmt: skip
    _TORCH_DTYPES[_name] = None

# legacy typed storage class name -> torch dtype name
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",  # bytes; the tensor's dtype comes from _rebuild_tensor_v3
}


class _Bad(Exception):
    """Internal: a structural problem found while replaying the pickle (becomes a format error)."""


def _refuse_state(obj: object) -> None:
    raise _Bad(f"the pickle tries to set attributes on {obj!r}")


class TorchDtype:
    """A ``torch.<dtype>`` object found in a checkpoint (e.g. ``TorchDtype('float32')``).

    ``numpy_dtype`` is the matching numpy dtype, or ``None`` where numpy has none (quantized
    and sub-byte types).
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def numpy_dtype(self) -> np.dtype | None:
        return _TORCH_DTYPES.get(self.name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDtype) and _canonical(other.name) == _canonical(self.name)

    def __hash__(self) -> int:
        return hash(("TorchDtype", _canonical(self.name)))

    def __reduce__(self) -> tuple:
        return (TorchDtype, (self.name,))

    def __setstate__(self, state: Any) -> None:  # reached only from a pickle's BUILD opcode
        _refuse_state(self)


def _canonical(name: str) -> str:
    aliases = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
               "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32"}  # fmt: skip
    return aliases.get(name, name)


class _StorageType:
    """Marker for ``torch.FloatStorage`` & co inside a persistent id; not callable."""

    __slots__ = ("name", "dtype_name")

    def __init__(self, name: str, dtype_name: str) -> None:
        self.name = name
        self.dtype_name = dtype_name

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __setstate__(self, state: Any) -> None:
        _refuse_state(self)


class _TypeMarker:
    """Marker for ``torch.Tensor`` / ``torch.nn.Parameter`` (only ever an argument)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __setstate__(self, state: Any) -> None:
        _refuse_state(self)


class _SafeCallable:
    """An allow-listed global: a named wrapper around one of this module's own functions."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name

    def __setstate__(self, state: Any) -> None:
        _refuse_state(self)


# ----------------------------------------------------------------------------- storages


class _RootStorage:
    """One serialized storage: its key, dtype, element count and (later) its bytes."""

    __slots__ = ("key", "dtype_name", "dtype", "numel", "nbytes", "pending")

    def __init__(self, key: str, dtype_name: str, numel: int) -> None:
        dtype = _TORCH_DTYPES.get(dtype_name)
        if dtype is None:
            raise _Bad(f"storage {key!r} has dtype torch.{dtype_name}, which has no numpy equivalent")
        self.key = key
        self.dtype_name = dtype_name
        self.dtype = dtype
        self.numel = numel
        self.nbytes = numel * dtype.itemsize
        self.pending: list[_PendingTensor] = []


class _StorageRef:
    """What a persistent id resolves to: a root storage, or a byte range of one (legacy views)."""

    __slots__ = ("root", "byte_offset", "nbytes", "dtype_name")

    def __init__(self, root: _RootStorage, byte_offset: int, nbytes: int, dtype_name: str) -> None:
        self.root = root
        self.byte_offset = byte_offset
        self.nbytes = nbytes
        self.dtype_name = dtype_name

    def __setstate__(self, state: Any) -> None:
        _refuse_state(self)


class _PendingTensor:
    """A tensor whose storage bytes have not been read yet; replaced by an array at the end."""

    __slots__ = ("ref", "dtype", "offset", "size", "stride", "conj", "neg", "value")

    def __init__(self, ref: _StorageRef, dtype: np.dtype, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], conj: bool, neg: bool) -> None:  # fmt: skip
        self.ref = ref
        self.dtype = dtype
        self.offset = offset
        self.size = size
        self.stride = stride
        self.conj = conj
        self.neg = neg
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        _refuse_state(self)


class _Context:
    """Per-file state of one load: the storages met so far and the persistent-id format."""

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy
        self.roots: dict[str, _RootStorage] = {}

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid:
            raise _Bad(f"unexpected persistent id {_short(pid)}")
        typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise _Bad(f"unexpected persistent id of kind {_short(typename)} (only storages are supported)")
        if self.legacy:
            if len(pid) != 6:
                raise _Bad(f"malformed legacy storage id {_short(pid)}")
            storage_type, key, _location, numel, view = pid[1:]
        else:
            if len(pid) != 5:
                raise _Bad(f"malformed storage id {_short(pid)}")
            storage_type, key, _location, numel = pid[1:]
            view = None
        if not isinstance(storage_type, _StorageType):
            raise _Bad(f"storage id names {_short(storage_type)}, not a storage type")
        key = _as_key(key)
        if not _is_index(numel):
            raise _Bad(f"storage {key!r} has an invalid element count {_short(numel)}")
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _RootStorage(key, storage_type.dtype_name, numel)
        elif root.dtype_name != storage_type.dtype_name or root.numel != numel:
            raise _Bad(f"storage {key!r} is declared twice with different types or sizes")
        if view is None:
            return _StorageRef(root, 0, root.nbytes, root.dtype_name)
        # legacy storage view: (view_key, offset, size), offset and size in elements of the root
        if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
            raise _Bad(f"malformed storage view {_short(view)}")
        isz = root.dtype.itemsize
        if (view[1] + view[2]) * isz > root.nbytes:
            raise _Bad(f"storage view {_short(view)} lies outside storage {key!r}")
        return _StorageRef(root, view[1] * isz, view[2] * isz, root.dtype_name)


def _as_key(key: Any) -> str:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key or len(key) > 64:
        raise _Bad(f"invalid storage key {_short(key)}")
    return key


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(x: Any, limit: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ----------------------------------------------------------------------------- rebuild functions


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if isinstance(x, list):
        x = tuple(x)
    if not isinstance(x, tuple) or not all(_is_index(v) for v in x):
        raise _Bad(f"tensor {what} must be a tuple of non-negative ints, got {_short(x)}")
    return x


def _make_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                 dtype: np.dtype | None = None, metadata: Any = None) -> _PendingTensor:  # fmt: skip
    if not isinstance(storage, _StorageRef):
        raise _Bad(f"a tensor is built from {_short(storage)} instead of a storage")
    if dtype is None:
        dtype = storage.root.dtype
    elif storage.dtype_name not in ("uint8", _dtype_name_of(dtype)):
        raise _Bad(f"a {dtype} tensor views a typed {storage.dtype_name} storage")
    if not _is_index(storage_offset):
        raise _Bad(f"invalid storage offset {_short(storage_offset)}")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Bad(f"tensor size {size} and stride {stride} differ in length")
    capacity = storage.nbytes // dtype.itemsize
    numel = math.prod(size)
    if numel > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= capacity:
            raise _Bad(
                f"tensor (offset {storage_offset}, size {size}, stride {stride}) reads element {last} "
                f"of a storage with {capacity} elements"
            )
        if numel * dtype.itemsize > max(1 << 34, 1024 * max(storage.nbytes, 1)):
            raise _Bad(f"tensor of size {size} expands a {storage.nbytes}-byte storage implausibly")
    conj = neg = False
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise _Bad(f"unsupported tensor metadata {_short(metadata)}")
        conj, neg = bool(metadata.get("conj", False)), bool(metadata.get("neg", False))
    t = _PendingTensor(storage, dtype, storage_offset, size, stride, conj, neg)
    storage.root.pending.append(t)
    return t


def _dtype_name_of(dtype: np.dtype) -> str:
    for name, dt in _TORCH_DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _PendingTensor:
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _PendingTensor:  # fmt: skip
    return _make_tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> _PendingTensor:  # fmt: skip
    if not isinstance(dtype, TorchDtype):
        raise _Bad(f"tensor dtype {_short(dtype)} is not a torch dtype")
    np_dtype = dtype.numpy_dtype
    if np_dtype is None:
        raise _Bad(f"tensors of dtype torch.{dtype.name} are not supported (no numpy equivalent)")
    return _make_tensor(storage, storage_offset, size, stride, dtype=np_dtype, metadata=metadata)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Any:
    if not isinstance(data, _PendingTensor):
        raise _Bad(f"a Parameter wraps {_short(data)} instead of a tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not isinstance(func, _SafeCallable) or not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise _Bad(f"unsupported tensor subclass reconstruction {_short((func, new_type))}")
    out = func(*args)
    if not isinstance(out, _PendingTensor):
        raise _Bad("_rebuild_from_type_v2 did not rebuild a tensor")
    return out  # python attributes set on the tensor (``state``) are dropped


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _int_tuple(dims, "torch.Size")


class _NumpyDtypeSpec:
    """Stand-in for ``numpy.dtype(...)`` during unpickling; only plain numeric dtypes."""

    __slots__ = ("dtype",)

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(code, str) or len(code) > 8:
            raise _Bad(f"unsupported numpy dtype {_short(code)}")
        try:
            dt = np.dtype(code)
        except TypeError as e:
            raise _Bad(f"unsupported numpy dtype {code!r}") from e
        if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
            raise _Bad(f"unsupported numpy dtype {code!r} (only numeric scalars are read)")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        # numpy's state is (version, byteorder, subdescr, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _Bad(f"unsupported numpy dtype state {_short(state)}")
        if any(s is not None for s in state[2:5]):
            raise _Bad("structured numpy dtypes are not supported")
        self.dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


def _numpy_scalar(spec: Any, data: Any = None) -> np.generic:
    if not isinstance(spec, _NumpyDtypeSpec) or not isinstance(data, bytes) or len(data) != spec.dtype.itemsize:
        raise _Bad("malformed numpy scalar")
    return np.frombuffer(data, dtype=spec.dtype)[0].astype(spec.dtype.newbyteorder("="))


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol-2 pickles spell a ``bytes`` object as _codecs.encode(latin-1 text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad("_codecs.encode is only accepted for latin-1 encoded bytes")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _SafeCallable("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _SafeCallable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _SafeCallable("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _SafeCallable("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _SafeCallable(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    ("torch._tensor", "_rebuild_from_type_v2"): _SafeCallable("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
    ("torch.tensor", "_rebuild_from_type_v2"): _SafeCallable("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
    ("torch", "Size"): _SafeCallable("torch.Size", _torch_size),
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    ("torch.nn", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    ("numpy.core.multiarray", "scalar"): _SafeCallable("numpy.core.multiarray.scalar", _numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _SafeCallable("numpy._core.multiarray.scalar", _numpy_scalar),
    ("numpy", "dtype"): _NumpyDtypeSpec,
    ("_codecs", "encode"): _SafeCallable("_codecs.encode", _codecs_encode),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
}

_STORAGE_MARKERS = {name: _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()}


def _printable(s: str, limit: int = 120) -> str:
    s = s if s.isprintable() else s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only from the allow-list and storages via a context."""

    def __init__(self, file: IO[bytes], filename: str, context: _Context | None) -> None:
        super().__init__(file, encoding="latin1")
        self._filename = filename
        self._context = context
        self._namespace_cls: type | None = None

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Bad("malformed global reference")
        mod = {"__builtin__": "builtins", "torch.cuda": "torch"}.get(module, module)
        if mod in ("torch", "torch.storage") and name in _STORAGE_MARKERS:
            return _STORAGE_MARKERS[name]
        if mod == "torch" and name in _TORCH_DTYPES:
            return TorchDtype(name)
        if (mod, name) == ("argparse", "Namespace"):
            # a fresh subclass per file: a hostile BUILD on the class cannot touch argparse itself
            if self._namespace_cls is None:
                self._namespace_cls = type("Namespace", (argparse.Namespace,), {"__module__": "argparse"})
            return self._namespace_cls
        obj = _ALLOWED.get((mod, name))
        if obj is not None:
            return obj
        dotted = _printable(f"{module}.{name}")
        hint = ""
        if module.startswith("torch.nn.modules") or module == "__main__" or module.startswith("torchvision."):
            hint = " (a whole pickled model? re-save it with torch.save(model.state_dict(), path))"
        raise UnsafeCheckpointError(
            f"refusing to load '{self._filename}': it references the global '{dotted}', which is not "
            f"a tensor type; the file may contain code{hint}",
            global_name=f"{module}.{name}",
        )

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        if self._context is None:
            raise _Bad("unexpected persistent id in a header pickle")
        return self._context.persistent_load(pid)


# ----------------------------------------------------------------------------- materialising


def _materialise(root: _RootStorage, data: bytes | memoryview, big_endian: bool) -> None:
    """Turn every pending tensor of ``root`` into a numpy array copied out of ``data``."""
    if len(data) != root.nbytes:
        raise _Bad(f"storage {root.key!r} holds {len(data)} bytes, expected {root.nbytes}")
    for t in root.pending:
        isz = t.dtype.itemsize
        capacity = t.ref.nbytes // isz
        if any(n == 0 for n in t.size):
            arr = np.empty(t.size, dtype=t.dtype)
        else:
            buf: Any = data
            if big_endian and isz > 1:
                unit = isz // 2 if t.dtype.kind == "c" else isz
                raw = np.frombuffer(data, dtype=np.dtype(f">u{unit}"), count=capacity * isz // unit, offset=t.ref.byte_offset)
                buf = raw.astype(np.dtype(f"<u{unit}")).tobytes()
                start = t.offset * isz
            else:
                start = t.ref.byte_offset + t.offset * isz
            # np.ndarray over the buffer checks again that every strided element lies inside it
            view = np.ndarray(t.size, dtype=t.dtype, buffer=buf, offset=start, strides=tuple(s * isz for s in t.stride))
            arr = np.array(view, copy=True, order="C")
        if t.conj:
            arr = np.conj(arr)
        if t.neg:
            arr = np.negative(arr)
        t.value = arr
    root.pending = []


def _resolve(obj: Any, memo: dict[int, Any]) -> Any:
    """Replace pending tensors by their arrays throughout a container tree (in place for dict/list)."""
    if isinstance(obj, _PendingTensor):
        if obj.value is None:
            raise _Bad(f"storage {obj.ref.root.key!r} is referenced but its data is missing")
        return obj.value
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, dict):
        memo[oid] = obj
        for k, v in list(obj.items()):
            obj[k] = _resolve(v, memo)
        return obj
    if isinstance(obj, list):
        memo[oid] = obj
        for i, v in enumerate(obj):
            obj[i] = _resolve(v, memo)
        return obj
    if isinstance(obj, tuple):
        memo[oid] = obj
        new = tuple(_resolve(v, memo) for v in obj)
        memo[oid] = new
        return new
    if isinstance(obj, argparse.Namespace):
        memo[oid] = obj
        for k, v in list(vars(obj).items()):
            setattr(obj, k, _resolve(v, memo))
        return obj
    if isinstance(obj, (set, frozenset)) and any(isinstance(v, _PendingTensor) for v in obj):
        raise _Bad("a set of tensors cannot be represented with numpy arrays")
    return obj


# ----------------------------------------------------------------------------- file formats


def _load_zip(f: IO[bytes], name: str) -> Any:
    import zipfile

    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names):
            raise _Bad("this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; "
                       "save model.state_dict() with torch.save instead")  # fmt: skip
        if len(pkls) != 1:
            raise _Bad("zip archive without exactly one data.pkl; not a torch.save checkpoint"
                       if not pkls else f"zip archive with several pickles {pkls}")  # fmt: skip
        prefix = pkls[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").strip()
            if order not in (b"little", b"big"):
                raise _Bad(f"unknown byte order {order[:16]!r}")
            big_endian = order == b"big"
        ctx = _Context(legacy=False)
        with zf.open(pkls[0]) as pf:
            result = _SafeUnpickler(pf, name, ctx).load()
        for key in sorted(ctx.roots, key=lambda k: (len(k), k)):
            root = ctx.roots[key]
            record = f"{prefix}data/{key}"
            if root.nbytes == 0:
                data: bytes = b""
            else:
                if record not in names:
                    raise _Bad(f"storage record {record!r} is missing")
                size = zf.getinfo(record).file_size
                if size != root.nbytes:
                    raise _Bad(f"storage record {record!r} holds {size} bytes, expected {root.nbytes}")
                data = zf.read(record)  # verifies the CRC
            _materialise(root, data, big_endian)
        return _resolve(result, {})


def _load_legacy(f: IO[bytes], name: str) -> Any:
    first = f.read(1)
    f.seek(0)
    if first != b"\x80":
        head = f.read(16)
        f.seek(0)
        hint = " (it looks like a .safetensors file: use load_safetensors)" if head[8:10] == b'{"' else ""
        raise CheckpointFormatError(
            f"cannot read '{name}': not a PyTorch checkpoint (neither a zip archive nor a legacy "
            f"torch.save stream){hint}"
        )
    magic = _SafeUnpickler(f, name, None).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(
            f"cannot read '{name}': a plain pickle, not a torch.save checkpoint (no legacy magic number)"
        )
    protocol = _SafeUnpickler(f, name, None).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise _Bad(f"unsupported legacy protocol version {_short(protocol)}")
    sys_info = _SafeUnpickler(f, name, None).load()
    if not isinstance(sys_info, dict):
        raise _Bad("malformed legacy sys_info header")
    ctx = _Context(legacy=True)
    result = _SafeUnpickler(f, name, ctx).load()
    keys = _SafeUnpickler(f, name, None).load()
    if not isinstance(keys, list):
        raise _Bad("malformed legacy storage key list")
    pos = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(pos)
    for key in keys:
        key = _as_key(key)
        root = ctx.roots.get(key)
        if root is None:
            raise _Bad(f"storage {key!r} is listed but never used")
        head = f.read(8)
        if len(head) != 8:
            raise _Bad("file ends inside the storage data (truncated)")
        numel = int.from_bytes(head, "little", signed=True)
        if numel != root.numel:
            raise _Bad(f"storage {key!r} holds {numel} elements, the pickle expects {root.numel}")
        if f.tell() + root.nbytes > end:
            raise _Bad("file ends inside the storage data (truncated)")
        data = f.read(root.nbytes)
        _materialise(root, data, big_endian=False)  # legacy storages are always little-endian
    return _resolve(result, {})


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def load_torch(path: PathOrFile) -> Any:
    """Read everything a ``torch.save`` file holds, with tensors as numpy arrays.

    Args:
      path: a ``.pth``/``.pt``/``.pth.tar`` file (zip or legacy format), or a seekable binary
        file object.

    Returns:
      The pickled object with every tensor / ``nn.Parameter`` replaced by a C-contiguous
      :class:`numpy.ndarray` copy of its values (torch shape and dtype; see the module
      docstring for the dtype table). Containers keep their type (``dict``, ``OrderedDict``,
      ``list``, ``tuple``).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafeCheckpointError: the pickle references a global that is not on the allow-list
        (nothing from the file is executed).
      CheckpointFormatError: empty, truncated, corrupt or not a torch checkpoint, or a tensor
        type numpy cannot hold.
    """
    import zipfile

    if hasattr(path, "read"):
        f, name, close = path, getattr(path, "name", "<stream>"), False
    else:
        name = os.fspath(path)
        if os.path.isdir(name):
            raise IsADirectoryError(f"expected a checkpoint file, got the directory '{name}'")
        f, close = open(name, "rb"), True  # noqa: SIM115
    try:
        head = f.read(512)
        f.seek(0)
        if not head:
            raise CheckpointFormatError(f"cannot read '{name}': the file is empty")
        try:
            if head.startswith(b"PK"):  # torch's zip writer starts with a local file header
                if not zipfile.is_zipfile(f):
                    raise CheckpointFormatError(
                        f"cannot read '{name}': truncated or corrupt zip archive (no end-of-archive record)"
                    )
                f.seek(0)
                return _load_zip(f, name)
            if len(head) >= 262 and head[257:262] == b"ustar":
                raise CheckpointFormatError(
                    f"cannot read '{name}': the pre-2018 tar checkpoint format is not supported; "
                    "re-save it with a current torch"
                )
            return _load_legacy(f, name)
        except CheckpointError:
            raise
        except _Bad as e:
            raise CheckpointFormatError(f"cannot read '{name}': {e}") from None
        except Exception as e:  # zipfile / pickle / struct internals: report, never leak the traceback
            raise CheckpointFormatError(f"cannot read '{name}': corrupt or truncated checkpoint ({_one_line(e)})") from None
    finally:
        if close:
            f.close()


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, np.ndarray) for v in obj.values())
    )


def _describe_keys(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [_short(k, 40) for k in list(obj)[:12]]
        more = " ..." if len(obj) > 12 else ""
        return f"a dict with keys [{', '.join(keys)}{more}]"
    return f"a {type(obj).__name__}"


def find_state_dict(obj: Any, key: str | None = None, *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Find the flat ``name -> array`` state dict inside a loaded checkpoint object.

    Without ``key``: ``obj`` itself if it is a non-empty dict of arrays with string keys;
    otherwise the first of :data:`STATE_DICT_WRAPPER_KEYS` present (``{"state_dict": ...}``,
    ``{"model": ...}``, ...), else the only value that is a dict of arrays, else the only value
    that is a dict; searched up to four levels deep. With ``key`` (``"model"`` or a ``/``-separated path ``"ema/state_dict"``) that
    entry is taken.

    Raises:
      CheckpointFormatError: no unambiguous state dict; the message lists the keys found.
    """
    if key is not None:
        cur = obj
        for part in key.split("/"):
            if not isinstance(cur, Mapping) or part not in cur:
                raise CheckpointFormatError(f"{source}: no entry {key!r} (found {_describe_keys(cur)})")
            cur = cur[part]
        if not _is_tensor_dict(cur):
            raise CheckpointFormatError(f"{source}: entry {key!r} is not a dict of tensors ({_describe_keys(cur)})")
        return dict(cur)
    cur = obj
    for _ in range(4):
        if _is_tensor_dict(cur):
            return dict(cur)
        if not isinstance(cur, Mapping):
            break
        nxt = next((cur[k] for k in STATE_DICT_WRAPPER_KEYS if k in cur and isinstance(cur[k], Mapping)), None)
        if nxt is None:  # else the only dict of tensors, else the only dict at all
            tensor_dicts = [v for v in cur.values() if _is_tensor_dict(v)]
            dicts = [v for v in cur.values() if isinstance(v, Mapping)]
            nxt = tensor_dicts[0] if len(tensor_dicts) == 1 else dicts[0] if len(dicts) == 1 else None
        if nxt is None:
            break
        cur = nxt
    raise CheckpointFormatError(
        f"{source}: cannot find a state dict (a dict of tensors) in {_describe_keys(cur)}; "
        "pass key=... to choose the entry"
    )


def load_state_dict(path: PathOrFile, *, key: str | None = None, strip_prefix: str | None = "module.") -> dict[str, np.ndarray]:
    """Read the flat ``name -> array`` state dict of a torch checkpoint, safely.

    Unwraps training checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, see
    :func:`find_state_dict`) and strips ``strip_prefix`` (default ``"module."``, added by
    ``nn.DataParallel`` / DDP) when *every* key starts with it.

    Returns:
      A ``dict`` (file order) of torch parameter/buffer names to numpy arrays in torch layout
      (conv kernels OIHW, linear weights (out, in)).

    Raises:
      UnsafeCheckpointError, CheckpointFormatError: see :func:`load_torch`.
    """
    source = getattr(path, "name", "<stream>") if hasattr(path, "read") else os.fspath(path)
    sd = find_state_dict(load_torch(path), key, source=f"'{source}'")
    if strip_prefix and all(k.startswith(strip_prefix) for k in sd):
        sd = {k[len(strip_prefix) :]: v for k, v in sd.items()}
    return sd
