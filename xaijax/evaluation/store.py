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
appears twice is counted once, so no image is ever counted twice: an evaluated row wins over
a ``skipped`` one (a resumed run retries the images it could not read, see
:meth:`ResultsStore.skipped`, and appends their rows), otherwise the first line wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["ResultsStore", "StoreMismatchError", "merge_shards", "read_store", "latest_rows"]

_MAGIC = "xaijax_results_store"
_VERSION = 1


def _supersedes(row: dict[str, Any], stored: dict[str, Any] | None) -> bool:
    """Whether ``row`` replaces the ``stored`` row of its index: nothing stored yet, or an
    evaluated row for an image that was stored as skipped."""
    return stored is None or ("skipped" in stored and "skipped" not in row)


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
            "(multi-host runs: --distributed, where process 0 alone writes, or one --out folder per --shard-index)"
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
        stored, rows, good_end = _parse(raw, self.path)
        if stored != self.config:
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {self.config.get(k)!r}" for k in diff[:4])
            raise StoreMismatchError(
                f"{self.path} holds results of a different configuration ({detail}); refusing to mix them. "
                "Delete the file (or use another --out folder) to start fresh"
            )
        for row in rows:
            idx = int(row["index"])
            if _supersedes(row, self._rows.get(idx)):
                self._rows[idx] = row
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

    def skipped(self) -> set[int]:
        """Indices stored only as ``skipped`` (the image could not be read): worth retrying."""
        return {i for i, row in self._rows.items() if "skipped" in row}

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Store per-image rows (each with an int ``"index"``). An already stored index is
        ignored, unless it was stored as ``skipped`` and the new row is an evaluated one."""
        new = []
        for row in rows:
            idx = int(row["index"])
            if not _supersedes(row, self._rows.get(idx)):
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


def _parse(raw: bytes, path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """A store file's ``(config, rows in file order, byte length of its intact part)``; a torn
    last line is left out (the length stops before it); any other damage raises."""
    lines = raw.split(b"\n")
    try:
        header = json.loads(lines[0])
        config = header["config"]
        assert header.get(_MAGIC) == _VERSION
    except Exception:
        raise StoreMismatchError(
            f"{path} is not an xaijax results store (or is damaged at its first line); "
            "delete it or choose another output folder to start fresh"
        ) from None
    rows = []
    good_end = len(lines[0]) + 1
    body = lines[1:]
    last = max((k for k, line in enumerate(body) if line.strip()), default=-1)
    for k, line in enumerate(body):
        if line.strip():
            try:
                row = json.loads(line)
                int(row["index"])
            except Exception:
                if k == last:
                    break  # a torn final write (the process died mid-line): cut it off
                raise StoreMismatchError(
                    f"{path} is damaged at line {k + 2} (not a result row); refusing to use it. "
                    "Repair or delete the file (or use another --out folder) to start fresh"
                ) from None
            rows.append(row)
        good_end += len(line) + 1
    return config, rows, min(good_end, len(raw))


def read_store(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config, rows)`` of a results store, read without taking its lock or repairing it
    (rows in file order; a torn last line is left out). Raises :class:`StoreMismatchError`
    for a file that is not a results store or is damaged elsewhere."""
    config, rows, _ = _parse(Path(path).read_bytes(), path)
    return config, rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per index, in index order, as :class:`ResultsStore` counts them (an evaluated row
    wins over a ``skipped`` one, otherwise the first wins): for rows read with :func:`read_store`."""
    kept: dict[int, dict[str, Any]] = {}
    for row in rows:
        idx = int(row["index"])
        if _supersedes(row, kept.get(idx)):
            kept[idx] = row
    return [kept[i] for i in sorted(kept)]


def merge_shards(sources: Iterable[str | Path], out: str | Path) -> dict[str, int]:
    """Merge the results stores of a sharded run (``--shard-index i --shard-count n``, one
    folder per process) into ``out``, as if one process had evaluated every image.

    Every ``*.jsonl`` results store in the ``sources`` folders is grouped by file name (one per
    experiment and method). The stores of a group must hold the same configuration apart from
    the shard, and together all ``n`` shards of it; their rows go into ``out/NAME`` with the
    configuration of an unsharded run (``shard = [0, 1]``). An existing store there with that
    configuration is extended (merging twice adds nothing). Then the same ``xaijax eval``
    command without the shard options, with ``--out`` set to ``out``, finds every image done and
    writes the tables. Returns ``{file name: rows in the merged store}``.
    """
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("merge: no shard folders given")
    groups: dict[str, list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]] = {}
    for src in sources:
        if not src.is_dir():
            raise ValueError(f"merge: {src} is not a folder")
        for f in sorted(src.glob("*.jsonl")):
            config, rows = read_store(f)
            groups.setdefault(f.name, []).append((f, config, rows))
    if not groups:
        raise ValueError(f"merge: no results stores (*.jsonl) in {', '.join(map(str, sources))}")
    merged: dict[str, int] = {}
    for name, stores in sorted(groups.items()):
        shards = [tuple(c.get("shard", (0, 1))) for _, c, _ in stores]
        count = shards[0][1]
        base = {k: v for k, v in stores[0][1].items() if k != "shard"}
        for f, c, _ in stores[1:]:
            other = {k: v for k, v in c.items() if k != "shard"}
            if other != base:
                diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
                raise StoreMismatchError(f"merge: {f} and {stores[0][0]} differ in {', '.join(diff)}; they are not shards of one run")
        if any(n != count for _, n in shards):
            raise StoreMismatchError(f"merge: the {name} stores have different shard counts: {sorted(set(n for _, n in shards))}")
        have = sorted(i for i, _ in shards)
        if have != list(range(count)):
            missing = sorted(set(range(count)) - set(have))
            detail = f"shards {missing} are missing" if missing else f"some shards appear twice ({have})"
            raise StoreMismatchError(f"merge: {name}: {detail} (of {count})")
        store = ResultsStore(Path(out) / name, {**base, "shard": [0, 1]})
        try:
            store.append(sorted((r for _, _, rows in stores for r in rows), key=lambda r: int(r["index"])))
            merged[name] = len(store)
        finally:
            store.close()
    return merged
