"""Multi-process evaluation on JAX's own distributed runtime (``xaijax eval --distributed``).

Every process runs the same ``xaijax eval`` command; :func:`initialize` connects them through
:func:`jax.distributed.initialize` (coordinator address, process count and this process's id
from arguments, else the environment, else JAX's cluster auto-detection: Slurm, Open MPI,
Kubernetes, Cloud TPU). Then:

* **one global mesh** (:func:`global_mesh`): a 1-D ``"data"`` mesh over every process's
  devices, process 0's first. The explanation method is jitted once over it
  (:class:`xaijax.evaluation.parallel.DataParallel`): each call's global batch is the
  processes' local batches side by side (:func:`jax.make_array_from_process_local_data`), each
  device explains its own slice.
* **no hand-made shard index**: the runner walks the to-do list in steps of
  ``batch x process_count`` images; process ``p`` evaluates block ``p`` of each step
  (:func:`process_block`), so the split follows from the process index alone.
* **lockstep**: every process must run the same global programs in the same order. A process
  whose images have fewer (image, class) pairs makes that many fewer calls, so after each
  step :func:`lockstep` pads every process to the largest call count with calls on zeros.
* **one store, one table**: process 0 alone opens the results stores and writes the tables. It
  broadcasts each method's to-do list (:func:`broadcast_indices`; the images its store does not
  hold yet) and, after each step, gathers the rows of every process (:func:`gather_rows`,
  an all-gather of their JSON over the global mesh) and appends them in one write. A run that
  is killed loses at most the step in flight; the same command resumes it (with any number of
  processes, or none: the store is the one a single-process run writes), never counting an
  image twice. Only process 0 needs the output folder; every process needs the weights and
  the dataset at the paths given.
* **failures**: a process that is killed takes the run down (the others lose their
  collectives' peer or the coordinator and stop); a Python error in one process outside the
  map computation (setup, opening the stores, reading images, writing rows) is announced to
  the others at the end of its step (:func:`all_or_none`), so every process stops at once. An
  error *inside* the sharded map computation (the jitted method that every process must join)
  leaves the others waiting in that collective until JAX's timeouts end them.

CPU collectives: JAX >= 0.10 uses gloo over TCP by default on CPU
(``jax_cpu_collectives_implementation``); :func:`initialize` selects it only where the user
has set none. ``eval --shard-index/--shard-count`` plus ``eval-merge`` remain for runs
without a coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

__all__ = [
    "initialize",
    "is_initialized",
    "global_mesh",
    "process_block",
    "broadcast_indices",
    "gather_rows",
    "lockstep",
    "all_or_none",
    "check_same",
    "ProcessFailed",
]

#: environment variables read where the arguments are not given (JAX itself reads only the
#: coordinator address; the other two follow its naming).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class ProcessFailed(RuntimeError):
    """Another process of a distributed run reported a failure (its own output says why)."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None


def is_initialized() -> bool:
    """Whether :func:`jax.distributed.initialize` has run in this process."""
    return bool(jax.distributed.is_initialized())


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> tuple[int, int]:
    """Join the distributed run; returns ``(process_index, process_count)``.

    Must run before anything else uses JAX in this process (the ``xaijax eval`` command calls it
    first). Each argument that is None is read from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; what is still missing is left to JAX's cluster
    auto-detection (Slurm, Open MPI, Kubernetes, Cloud TPU). A second call in an initialised
    process does nothing.

    Args:
      coordinator: ``host:port`` of process 0, reachable from every process (process 0 listens
        on that port on all its interfaces).
      num_processes: the number of processes (>= 1).
      process_id: this process's id in ``0 .. num_processes - 1``.
      initialization_timeout: seconds to wait for all processes to connect.

    Raises:
      ValueError: a malformed argument, missing settings that no cluster environment supplies,
        or JAX already in use in this process.
    """
    if is_initialized():
        return jax.process_index(), jax.process_count()
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:8476); got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1; got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in 0 .. {num_processes - 1} (--num-processes {num_processes}); got {process_id}")
    if jax.config.jax_cpu_collectives_implementation is None:  # cross-process collectives on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=initialization_timeout)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise ValueError(
                "--distributed: JAX was already used in this process; initialise the distributed runtime first "
                "(xaijax.evaluation.distributed.initialize before any other JAX call)"
            ) from None
        raise
    except ValueError as e:  # JAX's own: coordinator / count / id undefined and no cluster detected
        raise ValueError(
            f"--distributed: {e} Pass --coordinator HOST:PORT --num-processes N --process-id I (or set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or launch under Slurm / Open MPI"
        ) from None
    return jax.process_index(), jax.process_count()


def global_mesh() -> Mesh:
    """A 1-D mesh (axis ``"data"``) over every process's devices, grouped by process (process 0's
    first), so that process ``p``'s slice of a global batch is the ``p``-th contiguous block."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    counts = {p: sum(1 for d in devices if d.process_index == p) for p in range(jax.process_count())}
    if len(set(counts.values())) != 1:
        raise ValueError(f"--distributed needs the same number of devices in every process; got {counts} (process: devices)")
    return Mesh(np.asarray(devices), ("data",))


def process_block(step: Sequence[int], batch: int, index: int | None = None) -> list[int]:
    """Process ``index``'s block of ``step`` (the next ``batch x process_count`` images of the
    to-do list): items ``index * batch .. (index + 1) * batch - 1``, possibly fewer or none at the
    end of the list. Default ``index``: this process."""
    p = jax.process_index() if index is None else index
    return list(step[p * batch : (p + 1) * batch])


def _allgather(x: np.ndarray) -> np.ndarray:
    """``(process_count, *x.shape)``: ``x`` of every process (same shape and dtype everywhere)."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def _broadcast(x: np.ndarray) -> np.ndarray:
    """Process 0's ``x`` on every process (the others pass an array of the same shape and dtype)."""
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def broadcast_indices(indices: Sequence[int] | None) -> list[int]:
    """Process 0's ``indices`` on every process (the others pass None)."""
    mine = jax.process_index() == 0
    n = _broadcast(np.asarray([len(indices) if (mine and indices is not None) else 0], np.int64))[0]
    body = np.zeros(int(n), np.int64)
    if mine and indices is not None:
        body[:] = np.asarray(list(indices), np.int64)
    return [int(i) for i in _broadcast(body)] if len(body) else []


@contextlib.contextmanager
def all_or_none(active: bool, what: str) -> Iterator[None]:
    """Run the block in every process; when it raises in any process, every process raises.

    A process whose block raised tells the others (one all-gather of a failure flag) and raises
    its own error; the others raise :class:`ProcessFailed` naming it, instead of waiting in
    their next collective until JAX's heartbeat and shutdown timeouts (minutes). Every process
    must enter the same blocks in the same order. ``active=False``: just the block."""
    if not active:
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # (the collective itself may be what failed: a peer is gone)
            _allgather(np.asarray([1], np.int64))
        raise
    failed = [p for p, f in enumerate(_allgather(np.asarray([0], np.int64))[:, 0]) if f]
    if failed:
        raise ProcessFailed(
            f"process {', '.join(map(str, failed))} of the distributed run failed while {what} (see its output); "
            "this process stops too. Rows already stored are kept: run the same command again to resume"
        )


def check_same(value: Any, what: str) -> None:
    """Refuse to run when the processes disagree on ``value`` (JSON-serialisable): every process
    compares the SHA-256 of its ``value`` with process 0's.

    Raises:
      ValueError: in every process, naming the processes whose ``what`` differs from process 0's.
    """
    import hashlib

    digest = np.frombuffer(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest(), np.uint8)
    every = _allgather(digest)
    differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differ:
        raise ValueError(
            f"--distributed: process {', '.join(map(str, differ))} sees other {what} than process 0; give every process "
            "the same command and the same files (weights, dataset) at the paths it names"
        )


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's JSON-serialisable ``rows``, on every process, sorted by ``"index"``."""
    blob = np.frombuffer(json.dumps(rows, sort_keys=True).encode(), np.uint8)
    lengths = _allgather(np.asarray([blob.size], np.int64))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: blob.size] = blob
    every = _allgather(padded)
    out = [r for k, n in enumerate(lengths) for r in json.loads(bytes(every[k, : int(n)]).decode())]
    return sorted(out, key=lambda r: int(r["index"]))


def lockstep(explain: Any, variables: Any, x_example: np.ndarray, target_example: np.ndarray) -> None:
    """Pad every process's calls of the global-mesh ``explain``
    (:class:`~xaijax.evaluation.parallel.DataParallel`) to the same count: the process with
    fewer calls so far makes the difference on ``x_example``/``target_example`` (arrays of one
    real call's shape and dtype), so all processes run the same global programs in order."""
    calls = _allgather(np.asarray([explain.calls], np.int64))[:, 0]
    explain.catch_up(int(calls.max()), variables, x_example, target_example)
