"""xaijax.atomic: every file the package writes whole gets the same permissions (those of a
plain ``open(path, "w")``), and a failing writer leaves neither the file nor a temporary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from xaijax import atomic, viz
from xaijax.checkpoints import safetensors_io, save_safetensors, save_variables
from xaijax.evaluation.tables import write_tables


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a hard-coded mode cannot pass by accident."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _writers(d: Path) -> dict[str, Path]:
    """Every kind of atomic writer in the package, each writing one new file in ``d``."""
    atomic.atomic_bytes(d / "bytes.bin", b"abc")
    atomic.atomic_text(d / "text.txt", "abc\n")
    atomic.atomic_write(d / "callable.bin", lambda tmp: Path(tmp).write_bytes(b"abc"))
    viz.save_png(d / "overlay.png", viz.overlay(np.zeros((4, 4, 3)), np.eye(4)))
    save_safetensors(d / "flat.safetensors", {"w": np.zeros(3, np.float32)})
    save_variables(d / "tree.msgpack", {"params": {"w": np.zeros(3, np.float32)}})
    write_tables(d, [{"method": "m", "score": 1.0}], ["# t"], {"rows": []})
    return {p.name: p for p in d.iterdir()}


def test_every_writer_gives_the_mode_of_a_plain_open(tmp_path, umask_027):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    want = _mode(plain)
    assert want == 0o666 & ~umask_027 == 0o640
    out = tmp_path / "out"
    out.mkdir()
    files = _writers(out)
    assert sorted(files) == sorted(
        ["bytes.bin", "text.txt", "callable.bin", "overlay.png", "flat.safetensors", "tree.msgpack",
         "results.json", "results.csv", "results.md"]
    )
    assert {n: oct(_mode(p)) for n, p in files.items()} == {n: oct(want) for n in files}


def test_a_writer_that_recreates_its_file_still_gets_the_standard_mode(tmp_path, umask_027):
    def recreate(tmp: str) -> None:  # as some libraries do: unlink, then create with their own mode
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"abc")
        os.close(fd)

    atomic.atomic_write(tmp_path / "f.bin", recreate)
    assert _mode(tmp_path / "f.bin") == 0o640 and (tmp_path / "f.bin").read_bytes() == b"abc"


def test_a_replaced_file_keeps_its_permissions_like_open_does(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("old")
    os.chmod(p, 0o604)
    with open(p, "w") as f:  # the reference: open(path, "w") keeps an existing file's mode
        f.write("x")
    assert _mode(p) == 0o604
    atomic.atomic_text(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o604
    viz.save_png(p, np.zeros((2, 2, 3)))
    assert _mode(p) == 0o604


def _failing_writers(d: Path, monkeypatch) -> list:
    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("writer failed")

    def fsync_fails(fd):
        raise OSError(28, "No space left on device")

    return [
        ("callable", lambda: atomic.atomic_write(d / "c.bin", half_then_fail), RuntimeError),
        ("png of a bad array", lambda: viz.save_png(d / "bad.png", np.zeros((2, 2, 5), np.uint8)), (TypeError, ValueError)),
        ("safetensors of a bad tensor", lambda: save_safetensors(d / "bad.safetensors", {"w": np.zeros(2, np.complex128)}), ValueError),
        ("bytes, flush fails", lambda: (monkeypatch.setattr(os, "fsync", fsync_fails), atomic.atomic_bytes(d / "b.bin", b"x")), OSError),
    ]


def test_a_failing_writer_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    for what, call, exc in _failing_writers(tmp_path, monkeypatch):
        with pytest.raises(exc):
            call()
        assert os.listdir(tmp_path) == [], what
    monkeypatch.undo()


def test_a_failing_writer_leaves_an_existing_file_untouched(tmp_path):
    p = tmp_path / "keep.bin"
    atomic.atomic_bytes(p, b"complete")
    with pytest.raises(ZeroDivisionError):
        atomic.atomic_write(p, lambda tmp: (Path(tmp).write_bytes(b"partial"), 1 / 0))
    assert p.read_bytes() == b"complete" and os.listdir(tmp_path) == ["keep.bin"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt too (BaseException)
        atomic.atomic_write(p, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert p.read_bytes() == b"complete" and os.listdir(tmp_path) == ["keep.bin"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory does not exist"):
        atomic.atomic_text(tmp_path / "nowhere" / "t.txt", "x")
    assert os.listdir(tmp_path) == []


def test_one_atomic_writer():
    # the checkpoint module's name is the same function, not a copy
    assert safetensors_io.atomic_write is atomic.atomic_write
