"""Atomic file writes: a temporary file in the same folder, flushed, then renamed into place.

An interrupted run leaves either the previous complete file or none, never half a file, and a
failed write leaves no temporary file behind. Every file the package writes whole (results
tables, figures, PNGs, JSON records, checkpoints) goes through :func:`atomic_write` or its two
shorthands :func:`atomic_bytes` / :func:`atomic_text` / :func:`atomic_npy`.

Permissions are those a plain ``open(path, "w")`` gives: a new file gets ``0o666`` minus the
process umask (the temporary file is created with that mode, so the kernel applies the umask
and any default ACL); a file that is replaced keeps its permission bits.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_bytes", "atomic_text", "atomic_npy"]

_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def _create_temp(directory: str, name: str) -> tuple[str, int]:
    """A new empty file ``.NAME.XXXXXXXX.tmp`` in ``directory``, created with mode 0o666 (so
    that the umask applies, as for ``open(path, "w")``); returns its path and permission bits."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"cannot create a temporary file for {name!r} in {directory}")  # pragma: no cover


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` atomically, for writers that need a file name.

    ``write(tmp_path)`` must write the complete file to ``tmp_path`` (an empty file in the
    same folder as ``path``; it may also replace it, e.g. ``fig.savefig(tmp_path)`` or
    ``safetensors.numpy.save_file(..., tmp_path)``). Only when it returns is the file flushed
    to disk, given its permissions (see the module docstring) and renamed to ``path``
    (``os.replace``: atomic on POSIX and Windows). If ``write`` raises, the temporary file is
    removed, ``path`` is left untouched and the exception propagates.

    Raises:
      FileNotFoundError: the destination folder does not exist.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    tmp, mode = _create_temp(directory, os.path.basename(path))
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its permissions
        os.chmod(tmp, mode)  # also when the writer re-created the file with its own mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded (see :func:`atomic_write`)."""
    atomic_bytes(path, text.encode("utf-8"))


def atomic_npy(path: str | os.PathLike, array) -> None:
    """Write ``array`` to ``path`` atomically in NumPy's ``.npy`` format (see :func:`atomic_write`)."""
    import numpy as np  # numpy is a dependency of every caller; kept out of the module's import

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_bytes(path, buf.getvalue())
