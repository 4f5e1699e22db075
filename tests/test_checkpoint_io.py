"""Checkpoint file formats: safe torch pickle reader, safetensors, native save/load.

torch is used only to WRITE fixture files (tests that need it importorskip it); everything is
read back with xaijax's torch-free reader and compared bit for bit with torch's own values.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from xaijax.checkpoints import safetensors_io, torch_pickle
from xaijax.checkpoints.errors import CheckpointError, CheckpointFormatError, UnsafeCheckpointError
from xaijax.checkpoints.native import load_variables, save_variables
from xaijax.checkpoints.safetensors_io import (
    flatten_variables,
    load_safetensors,
    save_safetensors,
    unflatten_variables,
)
from xaijax.checkpoints.torch_pickle import find_state_dict, load_state_dict, load_torch

FORMATS = ["zip", "legacy"]


def _save(torch, obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _bits(torch, t) -> bytes:
    """Raw bytes of a tensor's values in C order (works for every dtype, bfloat16 included)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _expected_dtypes(torch) -> dict:
    return {
        torch.float32: np.float32,
        torch.float64: np.float64,
        torch.float16: np.float16,
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.int16: np.int16,
        torch.int8: np.int8,
        torch.uint8: np.uint8,
        torch.bool: np.bool_,
        torch.complex64: np.complex64,
        torch.complex128: np.complex128,
        torch.uint16: np.uint16,  # saved via _rebuild_tensor_v3 + UntypedStorage
        torch.uint32: np.uint32,
        torch.uint64: np.uint64,
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
        torch.float8_e5m2: ml_dtypes.float8_e5m2,
    }


def _random_tensor(torch, dtype, shape, gen):
    """Random *bit patterns* (NaN payloads, -0, inf, subnormals included) of ``dtype``."""
    n = int(np.prod(shape))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- dtypes and views


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_round_trips_bit_exactly(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    table = _expected_dtypes(torch)
    tensors = {str(dt): _random_tensor(torch, dt, (3, 5), gen) for dt in table}
    tensors["scalar"] = torch.tensor(-0.0)
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.int64)
    tensors["special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out = load_torch(_save(torch, tensors, tmp_path / "dtypes.pth", fmt))

    assert list(out) == list(tensors)
    for key, t in tensors.items():
        got = out[key]
        assert isinstance(got, np.ndarray), key
        want_dtype = table.get(t.dtype, None) or t.numpy().dtype
        assert got.dtype == np.dtype(want_dtype), key
        assert got.shape == tuple(t.shape), key
        assert got.tobytes() == _bits(torch, t), key
        assert got.flags.c_contiguous and got.flags.writeable, key
    # a dtype numpy knows natively also compares by value against torch's own .numpy()
    np.testing.assert_array_equal(out["torch.int16"], tensors["torch.int16"].numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_offsets_strides_and_shared_storage(tmp_path, fmt, monkeypatch):
    torch = pytest.importorskip("torch")
    base = torch.arange(120, dtype=torch.float64).reshape(4, 5, 6)
    views = {
        "base": base,
        "transposed": base.transpose(0, 2),
        "sliced": base[1:3, ::2, 1:5],
        "offset_column": base[..., 3],
        "permuted_step": base.permute(2, 0, 1)[::2],
        "flat_window": base.reshape(-1)[7:20],
        "expanded": base[0, 0, :3].expand(4, 3),  # stride 0
        "matrix_t": torch.arange(12.0).reshape(3, 4).t(),
    }
    assert not views["sliced"].is_contiguous() and views["offset_column"].storage_offset() == 3
    path = _save(torch, views, tmp_path / "views.pth", fmt)

    reads: collections.Counter[str] = collections.Counter()
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        n = name if isinstance(name, str) else name.filename
        if "/data/" in n:
            reads[n] += 1
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    out = load_torch(path)
    for key, t in views.items():
        np.testing.assert_array_equal(out[key], t.numpy(), err_msg=key)
        assert out[key].shape == tuple(t.shape) and out[key].flags.c_contiguous
    if fmt == "zip":
        # all views of `base` share one storage, which is read exactly once
        assert len(reads) == 2 and set(reads.values()) == {1}
    # results are independent copies, not aliases of one buffer
    out["base"][0, 0, 0] = -1.0
    assert out["transposed"][0, 0, 0] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameters_subclass_state_conj_and_neg_bits(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    with_attr = torch.arange(3.0)
    with_attr.note = "python state"  # pickled through torch._tensor._rebuild_from_type_v2
    obj = {
        "param": torch.nn.Parameter(torch.full((2, 2), 0.5)),
        "with_attr": with_attr,
        # lazily conjugated: conj bit in the tensor metadata
        "conj": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj(),
        # neg bit (a separate storage: torch refuses two dtypes on one storage)
        "neg": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj().imag,
    }
    assert obj["conj"].is_conj() and obj["neg"].is_neg()
    out = load_torch(_save(torch, obj, tmp_path / "p.pth", fmt))
    np.testing.assert_array_equal(out["param"], np.full((2, 2), 0.5, np.float32))
    np.testing.assert_array_equal(out["with_attr"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(out["conj"], np.array([1 - 2j, 3 + 1j], np.complex64))
    np.testing.assert_array_equal(out["neg"], np.array([-2.0, 1.0], np.float32))


def test_big_endian_zip_archive(tmp_path):
    torch = pytest.importorskip("torch")
    values = {
        "f32": np.array([1.5, -2.25, 3e-8, np.inf], np.float32),
        "i16": np.array([[1, -2], [300, -32768]], np.int16),
        "c64": np.array([1 + 2j, -3.5 - 0.25j], np.complex64),
    }
    storage_types = {"f32": torch.FloatStorage, "i16": torch.ShortStorage, "c64": torch.ComplexFloatStorage}
    obj, records = {}, {}
    for i, (k, v) in enumerate(values.items()):
        storage = _FakeStorage(str(i), storage_types[k], v.size)
        obj[k] = _FakeTensor(storage, 0, v.shape, tuple(s // v.itemsize for s in v.strides))
        records[f"data/{i}"] = v.astype(v.dtype.newbyteorder(">")).tobytes()  # big-endian bytes
    path = _write_zip(tmp_path / "be.pth", _craft_pickle(torch, obj), records, byteorder=b"big")
    out = load_torch(path)
    for k, v in values.items():
        assert out[k].dtype == v.dtype and out[k].dtype.isnative
        np.testing.assert_array_equal(out[k], v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_newer_pickle_protocol(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    obj = {"w": torch.arange(6.0).reshape(2, 3).t(), "meta": {"dtype": torch.float16, "size": torch.Size([2, 3])}}
    path = tmp_path / "p4.pth"
    torch.save(obj, path, pickle_protocol=4, _use_new_zipfile_serialization=(fmt == "zip"))
    out = load_torch(path)
    np.testing.assert_array_equal(out["w"], obj["w"].numpy())
    assert out["meta"]["size"] == (2, 3) and type(out["meta"]["size"]) is tuple
    assert out["meta"]["dtype"] == torch_pickle.TorchDtype("half") and out["meta"]["dtype"].numpy_dtype == np.float16


def test_legacy_storage_views(tmp_path):
    """Pre-1.0 legacy files could reference a slice of a storage (``view_metadata``)."""
    torch = pytest.importorskip("torch")
    root = np.arange(10, dtype=np.int32)

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, tuple) and o and o[0] == "VIEW":  # (VIEW, view_key, offset, numel)
                return ("storage", torch.IntStorage, "140", "cpu", root.size, o[1:])
            return None

        def reducer_override(self, o):
            if isinstance(o, _FakeTensor):
                return (torch._utils._rebuild_tensor, (o.storage, o.offset, o.size, o.stride))
            return NotImplemented

    obj = {"a": _FakeTensor(("VIEW", "141", 2, 6), 1, (2, 2), (2, 1)), "b": _FakeTensor(("VIEW", "142", 8, 2), 0, (2,), (1,))}
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    body = _legacy_stream(buf.getvalue())[: -len(pickle.dumps([], protocol=2))]
    body += pickle.dumps(["140"], protocol=2) + root.size.to_bytes(8, "little") + root.tobytes()
    (tmp_path / "old.pth").write_bytes(body)
    out = load_torch(tmp_path / "old.pth")
    np.testing.assert_array_equal(out["a"], [[3, 4], [5, 6]])  # view starts at element 2, tensor offset 1
    np.testing.assert_array_equal(out["b"], [8, 9])
    # a tensor reaching past the end of its view is refused even though the root is larger
    obj = {"c": _FakeTensor(("VIEW", "143", 2, 3), 1, (3,), (1,))}
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    body = _legacy_stream(buf.getvalue())[: -len(pickle.dumps([], protocol=2))]
    body += pickle.dumps(["140"], protocol=2) + root.size.to_bytes(8, "little") + root.tobytes()
    (tmp_path / "bad.pth").write_bytes(body)
    _assert_format_error(tmp_path / "bad.pth", "reads element 3 of a storage with 3")


# ----------------------------------------------------------------------------- state dicts


def _tiny_state_dict(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    return model.state_dict()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "nested", "torchvision_reference"])
def test_load_state_dict_unwraps_and_strips_prefix(tmp_path, fmt, wrap):
    torch = pytest.importorskip("torch")
    import argparse

    sd = _tiny_state_dict(torch)
    obj = {
        "plain": sd,
        "state_dict": {"epoch": 3, "arch": "tiny", "state_dict": sd, "best_acc1": torch.tensor(0.5)},
        "model": {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
        "module_prefix": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
        "nested": {"checkpoint": {"model_state_dict": sd}, "step": 10},
        "torchvision_reference": {
            "model": sd,
            "epoch": 7,
            "args": argparse.Namespace(lr=0.1, arch="tiny"),
            "best_acc1": np.float64(0.75),
        },
    }[wrap]
    got = load_state_dict(_save(torch, obj, tmp_path / "sd.pth", fmt))
    assert type(got) is dict and list(got) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    assert got["0.weight"].shape == (4, 3, 3, 3)  # torch layout: OIHW
    assert got["1.num_batches_tracked"].dtype == np.int64
    if wrap == "torchvision_reference":
        whole = load_torch(tmp_path / "sd.pth")
        assert whole["args"].lr == 0.1 and whole["args"].arch == "tiny" and whole["epoch"] == 7
        assert isinstance(whole["best_acc1"], np.float64) and whole["best_acc1"] == 0.75


def test_find_state_dict_explicit_key_and_errors():
    a = {"w": np.zeros(2)}
    b = {"w": np.ones(2)}
    obj = {"ema": {"state_dict": b}, "model": a, "epoch": 1}
    assert find_state_dict(obj)["w"].sum() == 0.0  # "model" is a known wrapper key
    assert find_state_dict(obj, "ema/state_dict")["w"].sum() == 2.0
    with pytest.raises(CheckpointFormatError, match="no entry 'ema/nope'"):
        find_state_dict(obj, "ema/nope")
    with pytest.raises(CheckpointFormatError, match="cannot find a state dict.*epoch"):
        find_state_dict({"a": a, "b": b, "epoch": 1})
    with pytest.raises(CheckpointFormatError, match="not a dict of tensors"):
        find_state_dict(obj, "epoch")


def test_prefix_only_stripped_when_common(tmp_path):
    torch = pytest.importorskip("torch")
    obj = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert list(load_state_dict(_save(torch, obj, tmp_path / "m.pth", "zip"))) == ["module.a", "b"]
    obj = {"module.a": torch.zeros(1), "module.b": torch.ones(1)}
    path = _save(torch, obj, tmp_path / "m2.pth", "zip")
    assert list(load_state_dict(path)) == ["a", "b"]
    assert list(load_state_dict(path, strip_prefix=None)) == ["module.a", "module.b"]


def test_reads_from_a_file_object():
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.int32)}, buf)
    buf.seek(0)
    np.testing.assert_array_equal(load_state_dict(buf)["w"], [0, 1, 2, 3])


# ----------------------------------------------------------------------------- hostile files


class _EvilSystem:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


class _EvilOpen:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (builtins.open, (str(self.target), "w"))


# the name pickle records for each callable: 'posix.system' on Linux, 'io.open' for builtins.open
_EVIL = {
    "system": (_EvilSystem, f"{os.system.__module__}.{os.system.__name__}"),
    "open": (_EvilOpen, f"{builtins.open.__module__}.{builtins.open.__name__}"),
}


def _legacy_stream(main_pickle: bytes) -> bytes:
    """Header pickles of torch's legacy format followed by ``main_pickle`` (facts: serialization.py)."""
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}})
    )
    return head + main_pickle + pickle.dumps([], protocol=2)


def _write_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None, *, prefix: str = "archive",
               byteorder: bytes | None = b"little") -> Path:  # fmt: skip
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for name, data in (records or {}).items():
            zf.writestr(f"{prefix}/{name}", data)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


@pytest.mark.parametrize("kind", sorted(_EVIL))
@pytest.mark.parametrize("container", ["raw_pickle", "legacy", "zip", "torch_save"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, kind, container):
    cls, global_name = _EVIL[kind]
    target = tmp_path / "pwned"
    payload = pickle.dumps({"weight": [1.0, 2.0], "x": cls(target)}, protocol=2)

    # the fixture is live: an ordinary unpickler really would run it
    probe = tmp_path / "probe"
    res = pickle.loads(pickle.dumps(cls(probe), protocol=2))
    if hasattr(res, "close"):
        res.close()
    assert probe.exists()

    path = tmp_path / "evil.pth"
    if container == "raw_pickle":
        path.write_bytes(payload)
    elif container == "legacy":
        path.write_bytes(_legacy_stream(payload))
    elif container == "zip":
        _write_zip(path, payload)
    else:
        torch = pytest.importorskip("torch")
        torch.save({"weight": torch.ones(2), "x": cls(target)}, path)

    for loader in (load_torch, load_state_dict):
        with pytest.raises(UnsafeCheckpointError) as err:
            loader(path)
        msg = str(err.value)
        assert f"'{global_name}'" in msg and "evil.pth" in msg and "not a tensor type" in msg
        assert err.value.global_name == global_name
        assert isinstance(err.value, ValueError) and "\n" not in msg
    assert not target.exists()


def test_pickled_module_is_refused_with_a_hint(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        load_torch(tmp_path / "whole.pth")


def test_build_on_allowed_globals_is_refused(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2; {"__defaults__": ...}; BUILD  -- would patch our function
    evil = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__)sb."
    path = tmp_path / "build.pth"
    _write_zip(path, evil)
    with pytest.raises(CheckpointFormatError, match="set attributes"):
        load_torch(path)
    assert torch_pickle._rebuild_tensor_v2.__defaults__ == (False, None, None)


# ----------------------------------------------------------------------------- corrupt files


class _FakeStorage:
    def __init__(self, key: str, storage_type, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, offset: int, size, stride) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _craft_pickle(torch, obj) -> bytes:
    """A data.pkl exactly as torch writes it, but with tensor geometry chosen by the test."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _FakeStorage):
                return ("storage", o.storage_type, o.key, "cpu", o.numel)
            return None

        def reducer_override(self, o):
            if isinstance(o, _FakeTensor):
                args = (o.storage, o.offset, o.size, o.stride, False, collections.OrderedDict())
                return (torch._utils._rebuild_tensor_v2, args)
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _assert_format_error(path: Path, match: str) -> CheckpointFormatError:
    with pytest.raises(CheckpointFormatError, match=match) as err:
        load_torch(path)
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg
    # no chained zipfile / pickle traceback
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
    return err.value


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
        (pickle.dumps({"w": [1.0]}, protocol=2), "plain pickle"),
        (b"PK\x03\x04" + bytes(100), "truncated or corrupt zip"),
        ((13).to_bytes(8, "little") + b'{"w":{"x":1}}', "looks like a .safetensors file"),
    ],
    ids=["empty", "random", "plain_pickle", "zip_header_only", "safetensors"],
)
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    _assert_format_error(path, match)


@pytest.mark.parametrize("cut", ["half", "end_record", "inside_pickle", "inside_storage"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_checkpoints(tmp_path, fmt, cut):
    torch = pytest.importorskip("torch")
    good = _save(torch, {"w": torch.arange(64.0), "b": torch.ones(3)}, tmp_path / "good.pth", fmt).read_bytes()
    n = {"half": len(good) // 2, "end_record": len(good) - 10, "inside_pickle": 40, "inside_storage": len(good) - 100}[cut]
    path = tmp_path / "cut.pth"
    path.write_bytes(good[:n])
    _assert_format_error(path, "truncated|corrupt|ends inside")


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    torch = pytest.importorskip("torch")
    values = torch.arange(32, dtype=torch.float32)
    good = bytearray(_save(torch, {"w": values}, tmp_path / "g.pth", "zip").read_bytes())
    at = bytes(good).index(values.numpy().tobytes()) + 17
    good[at] ^= 0xFF
    path = tmp_path / "crc.pth"
    path.write_bytes(bytes(good))
    _assert_format_error(path, "CRC")


def test_zip_structure_errors(tmp_path):
    torch = pytest.importorskip("torch")
    st = _FakeStorage("0", torch.FloatStorage, 6)
    data = np.arange(6, dtype=np.float32).tobytes()

    ok = _write_zip(tmp_path / "ok.pth", _craft_pickle(torch, {"w": _FakeTensor(st, 1, (2, 2), (2, 1))}), {"data/0": data})
    np.testing.assert_array_equal(load_torch(ok)["w"], [[1, 2], [3, 4]])  # the crafting itself is sound

    oob = _craft_pickle(torch, {"w": _FakeTensor(st, 2, (2, 3), (3, 1))})  # last element 7 of 6
    _assert_format_error(_write_zip(tmp_path / "oob.pth", oob, {"data/0": data}), "reads element 7 of a storage with 6")
    good_pkl = _craft_pickle(torch, {"w": _FakeTensor(st, 0, (6,), (1,))})
    _assert_format_error(_write_zip(tmp_path / "short.pth", good_pkl, {"data/0": data[:-4]}), "holds 20 bytes, expected 24")
    _assert_format_error(_write_zip(tmp_path / "missing.pth", good_pkl, {}), "missing")
    _assert_format_error(_write_zip(tmp_path / "order.pth", good_pkl, {"data/0": data}, byteorder=b"middle"), "byte order")

    nopkl = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(nopkl, "w") as zf:
        zf.writestr("archive/other.txt", b"hi")
    _assert_format_error(nopkl, "without exactly one data.pkl")
    script = _write_zip(tmp_path / "script.pt", pickle.dumps({}, protocol=2), {"constants.pkl": b"", "code/m.py": b""})
    _assert_format_error(script, "TorchScript")
    # a different archive folder name is fine
    other = _write_zip(tmp_path / "other.pth", good_pkl, {"data/0": data}, prefix="my_model", byteorder=None)
    np.testing.assert_array_equal(load_torch(other)["w"], np.arange(6))


def test_errors_are_value_errors():
    assert issubclass(CheckpointFormatError, CheckpointError) and issubclass(CheckpointError, ValueError)
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert not issubclass(UnsafeCheckpointError, CheckpointFormatError)


# ----------------------------------------------------------------------------- safetensors / native


def _variables():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    return {
        "params": {
            "features": {"0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)}},
            "classifier": {"kernel": rng.normal(size=(4, 2))},  # float64
        },
        "batch_stats": {
            "bn": {
                "mean": jnp.asarray(rng.normal(size=4), dtype=jnp.bfloat16),  # a JAX array
                "var": rng.normal(size=4).astype(ml_dtypes.bfloat16),
            }
        },
        "counters": {
            "steps": np.asarray(7, np.int64),
            "ids": np.arange(3, dtype=np.int32),
            "mask": np.array([[True, False], [False, True]]),
            "pixels": np.arange(5, dtype=np.uint8),
        },
    }


_FLAT_KEYS = {
    "params/features/0/kernel",
    "params/features/0/bias",
    "params/classifier/kernel",
    "batch_stats/bn/mean",
    "batch_stats/bn/var",
    "counters/steps",
    "counters/ids",
    "counters/mask",
    "counters/pixels",
}


def _assert_same_tree(got, want, path=""):
    assert isinstance(got, dict) and set(got) == set(want), path
    for k, w in want.items():
        if isinstance(w, dict):
            _assert_same_tree(got[k], w, f"{path}/{k}")
        else:
            w = np.asarray(w)
            g = got[k]
            assert isinstance(g, np.ndarray), f"{path}/{k}"
            assert g.dtype == w.dtype and g.shape == w.shape, f"{path}/{k}"
            assert g.tobytes() == w.tobytes(), f"{path}/{k}"


def test_flatten_and_unflatten_variables():
    from flax.core import freeze

    variables = _variables()
    flat = flatten_variables(freeze(variables))  # FrozenDict works too
    assert set(flat) == _FLAT_KEYS
    assert flat["batch_stats/bn/mean"].dtype == ml_dtypes.bfloat16
    _assert_same_tree(unflatten_variables(flat), variables)
    with pytest.raises(ValueError, match="without '/'"):
        flatten_variables({"params": {"a/b": np.zeros(1)}})
    with pytest.raises(ValueError, match="only numeric"):
        flatten_variables({"params": {"a": np.array(["text"], dtype=object)}})
    with pytest.raises(ValueError, match="conflicts"):
        unflatten_variables({"a/b": np.zeros(1), "a/b/c": np.zeros(1)})


def test_safetensors_round_trip_with_metadata(tmp_path):
    variables = _variables()
    flat = flatten_variables(variables)
    flat["float8"] = np.arange(4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    meta = {"arch": "vgg16", "num_classes": "20"}
    save_safetensors(tmp_path / "v.safetensors", flat, meta)
    got, got_meta = load_safetensors(tmp_path / "v.safetensors")
    assert got_meta == meta
    assert set(got) == set(flat)
    for k, v in flat.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
        assert got[k].flags.writeable
    # the file is an ordinary safetensors file: the reference reader agrees
    from safetensors import safe_open

    with safe_open(tmp_path / "v.safetensors", framework="np") as f:
        assert f.metadata() == meta
        np.testing.assert_array_equal(f.get_tensor("params/classifier/kernel"), flat["params/classifier/kernel"])


@pytest.mark.parametrize("ext", [".safetensors", ".msgpack"])
def test_native_round_trip(tmp_path, ext):
    variables = _variables()
    meta = {"arch": "resnet18", "num_classes": "10", "model_kwargs": '{"width": 8}'}
    path = tmp_path / f"model{ext}"
    save_variables(path, variables, metadata=meta)
    got, got_meta = load_variables(path)
    assert got_meta == meta
    _assert_same_tree(got, variables)
    # without metadata
    save_variables(path, variables)
    assert load_variables(path)[1] == {}


@pytest.mark.parametrize("ext", [".safetensors", ".msgpack"])
def test_native_variables_drive_a_flax_model(tmp_path, ext):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    variables = model.init(jax.random.key(0), x)
    save_variables(tmp_path / f"m{ext}", variables, {"arch": "mlp"})
    loaded, meta = load_variables(tmp_path / f"m{ext}")
    np.testing.assert_array_equal(model.apply(loaded, x), model.apply(variables, x))


def test_plain_flax_msgpack_is_read_as_variables(tmp_path):
    from flax import serialization

    variables = {"params": {"w": np.arange(3.0, dtype=np.float32)}}
    (tmp_path / "plain.msgpack").write_bytes(serialization.to_bytes(variables))
    got, meta = load_variables(tmp_path / "plain.msgpack")
    assert meta == {}
    _assert_same_tree(got, variables)


def test_native_input_errors(tmp_path):
    v = {"params": {"w": np.zeros(2, np.float32)}}
    with pytest.raises(ValueError, match="unsupported checkpoint extension '.npz'"):
        save_variables(tmp_path / "x.npz", v)
    with pytest.raises(ValueError, match="str -> str.*num_classes"):
        save_variables(tmp_path / "x.safetensors", v, {"num_classes": 10})
    with pytest.raises(FileNotFoundError):
        save_variables(tmp_path / "no_dir" / "x.msgpack", v)
    with pytest.raises(FileNotFoundError):
        load_variables(tmp_path / "absent.safetensors")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("ext", [".safetensors", ".msgpack"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_native_corrupt_files(tmp_path, ext, damage):
    path = tmp_path / f"m{ext}"
    save_variables(path, _variables(), {"arch": "x"})
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\xc1" + bytes(64)}[damage])
    with pytest.raises(CheckpointFormatError, match="cannot read") as err:
        load_variables(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ext", [".safetensors", ".msgpack"])
def test_atomic_write_keeps_old_file_when_the_final_flush_fails(tmp_path, ext, monkeypatch):
    path = tmp_path / f"m{ext}"
    save_variables(path, {"params": {"w": np.ones(2, np.float32)}}, {"arch": "old"})
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        save_variables(path, _variables(), {"arch": "new"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    assert load_variables(path)[1] == {"arch": "old"}


def test_atomic_write_leaves_no_partial_file_when_the_writer_fails(tmp_path, monkeypatch):
    import safetensors.numpy

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("writer crashed")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="writer crashed"):
        save_safetensors(tmp_path / "new.safetensors", {"w": np.zeros(3)})
    assert os.listdir(tmp_path) == []
    # a leaf that cannot be serialised fails before anything is written
    with pytest.raises(ValueError, match="only numeric"):
        save_variables(tmp_path / "obj.msgpack", {"params": {"w": np.array([object()])}})
    assert os.listdir(tmp_path) == []


def test_atomic_write_unit(tmp_path):
    target = tmp_path / "t.bin"
    safetensors_io.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"hello"))
    assert target.read_bytes() == b"hello"
    with pytest.raises(ZeroDivisionError):
        safetensors_io.atomic_write(target, lambda tmp: (Path(tmp).write_bytes(b"half"), 1 / 0))
    assert target.read_bytes() == b"hello" and os.listdir(tmp_path) == ["t.bin"]
