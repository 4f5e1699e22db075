"""A resumable, append-only results store: one JSON line per evaluated image.

Long evaluation runs (thousands of images x several methods) must survive being killed.
Each run writes a JSON-lines file:

* line 1, the header: ``{"xaijax_results_store": 1, "config": {...}}`` — everything that
  decides the numbers (experiment, dataset, split, image size, model and weights digest,
  method and its hyperparameters, metric settings). Opening an existing store with a
  different configuration is refused (:class:`StoreMismatchError`), so results of two
  configurations are never mixed.
* one line per image: ``{"index": i, "image_id": ..., ...}`` with that image's values (or
  ``"skipped": reason`` for an image that failed to decode).

Lines are appended and flushed (``fsync``) after each batch of images, so a killed run loses
at most the batch in flight. On reopening, a torn last line (the process died mid-write) is
cut off (a damaged line anywhere else is refused, never silently dropped with what follows), images already stored are reported by :meth:`ResultsStore.done`, and an index that
somehow appears twice is counted once (the first line wins), so no image is ever counted
twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["ResultsStore", "StoreMismatchError"]

_MAGIC = "xaijax_results_store"
_VERSION = 1


class StoreMismatchError(ValueError):
    """An existing results store was written with a different configuration."""


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, sort_keys=True))


def _lock(path: Path) -> Any:
    """An exclusive advisory lock on ``path.lock`` held while the store is open (POSIX);
    a second process writing the same store is refused instead of interleaving lines."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return None
    fh = open(path.with_name(path.name + ".lock"), "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise StoreMismatchError(
            f"{path} is being written by another process; run one process per results store "
            "(multi-host runs: one --out folder or --shard-index per process)"
        ) from None
    return fh


class ResultsStore:
    """Append-only per-image results with a configuration header (see module docstring).

    Args:
      path: the ``.jsonl`` file (created with its folder if missing).
      config: JSON-serialisable configuration; must equal the stored one when resuming.
    """

    def __init__(self, path: str | Path, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.config = _canonical(config)
        self._rows: dict[int, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            with open(self.path, "w") as f:
                f.write(json.dumps({_MAGIC: _VERSION, "config": self.config}, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
            stored = header["config"]
            assert header.get(_MAGIC) == _VERSION
        except Exception:
            raise StoreMismatchError(
                f"{self.path} is not an xaijax results store (or is damaged at its first line); "
                "delete it or choose another output folder to start fresh"
            ) from None
        if stored != self.config:
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {self.config.get(k)!r}" for k in diff[:4])
            raise StoreMismatchError(
                f"{self.path} holds results of a different configuration ({detail}); refusing to mix them. "
                "Delete the file (or use another --out folder) to start fresh"
            )
        good_end = len(lines[0]) + 1
        body = lines[1:]
        last = max((k for k, line in enumerate(body) if line.strip()), default=-1)
        for k, line in enumerate(body):
            if not line.strip():
                good_end += len(line) + 1
                continue
            try:
                row = json.loads(line)
                idx = int(row["index"])
            except Exception:
                if k == last:
                    break  # a torn final write (the process died mid-line): cut it off
                raise StoreMismatchError(
                    f"{self.path} is damaged at line {k + 2} (not a result row); refusing to resume from it. "
                    "Repair or delete the file (or use another --out folder) to start fresh"
                ) from None
            self._rows.setdefault(idx, row)
            good_end += len(line) + 1
        good_end = min(good_end, len(raw))
        if good_end < len(raw) or (raw and not raw.endswith(b"\n")):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                if good_end and not raw[:good_end].endswith(b"\n"):
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")

    def close(self) -> None:
        """Release the store's lock (also released when the process exits)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def __del__(self) -> None:
        self.close()

    def done(self) -> set[int]:
        """Indices of the images already stored (evaluated or skipped)."""
        return set(self._rows)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Store per-image rows (each with an int ``"index"``); already stored indices are ignored."""
        new = []
        for row in rows:
            idx = int(row["index"])
            if idx in self._rows:
                continue
            row = _canonical(row)
            self._rows[idx] = row
            new.append(json.dumps(row, sort_keys=True))
        if not new:
            return
        with open(self.path, "a") as f:
            f.write("\n".join(new) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> Iterator[dict[str, Any]]:
        """Stored rows in index order."""
        for idx in sorted(self._rows):
            yield self._rows[idx]

    def __len__(self) -> int:
        return len(self._rows)
