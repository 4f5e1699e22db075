"""Atomic file writes: a temporary file in the same folder, flushed, then renamed into place.

An interrupted run leaves either the previous complete file or none, never half a file.
Results tables, figures and JSON records across the package are written through these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_bytes", "atomic_text"]


def atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    atomic_bytes(path, text.encode())
