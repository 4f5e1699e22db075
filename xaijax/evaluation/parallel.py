"""Data parallelism over local devices with ``jax.sharding``: one code path from 1 CPU to 8 GPUs.

An explanation function ``fn(variables, x, target)`` runs under ``jax.shard_map`` on a 1-D
device mesh (axis ``"data"``): the variables replicated, each device explaining its slice of
the batch, the result gathered along the batch. Batches are padded to a multiple of the device count and the padding is
cut off again, so the caller never sees it. Samples are independent in every xaijax method,
so a sharded run gives the same maps as a single-device run.

Multi-process (``xaijax eval --distributed``, :mod:`xaijax.evaluation.distributed`): the mesh
spans every process's devices; each process passes its own slice of the global batch (the
same shape in every process) and gets its own slice of the maps back, and every process must
make the same calls in the same order (:meth:`DataParallel.catch_up`). Without a coordinator,
each process evaluates its own slice of the dataset on its local devices
(``shard_index``/``shard_count`` in :func:`xaijax.evaluation.runner.run_experiment`) into
its own results store, merged afterwards (``xaijax eval-merge``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["make_mesh", "DataParallel"]


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over the first ``devices`` local devices (default: all)."""
    local = jax.local_devices()
    n = len(local) if devices is None else int(devices)
    if not 1 <= n <= len(local):
        raise ValueError(f"--devices must be between 1 and {len(local)} (local {local[0].platform} devices); got {devices}")
    return Mesh(np.asarray(local[:n]), ("data",))


class DataParallel:
    """``fn(variables, x, target) -> maps`` jitted over a device mesh, batch split along ``"data"``.

    Call it with host arrays of any batch size; it pads to a multiple of the device count,
    runs, and returns a NumPy array without the padding.

    On a mesh over several processes' devices (:func:`xaijax.evaluation.distributed.global_mesh`)
    the arrays are this process's part of the global batch, padded to a multiple of its local
    device count, and the result is this process's part of the maps; ``calls`` counts the calls
    so that :meth:`catch_up` can keep the processes in lockstep.
    """

    def __init__(self, fn: Callable[..., Any], mesh: Mesh) -> None:
        self.mesh = mesh
        me = jax.process_index()
        self.n = sum(1 for d in mesh.devices.flat if d.process_index == me)  # this process's devices
        self.multiprocess = self.n != mesh.devices.size
        self.calls = 0
        self._rep = NamedSharding(mesh, PartitionSpec())
        self._split = NamedSharding(mesh, PartitionSpec("data"))
        # shard_map: each device runs ``fn`` on its own slice of the batch (the methods are
        # per-sample independent), so XLA never has to partition a method's internals across
        # devices. (Letting the SPMD partitioner split the batch of a plain jit gave wrong maps
        # for RSP, whose per-sample weight-gradient convolutions become batch-grouped
        # convolutions; shard_map keeps every method's arithmetic exactly as on one device.)
        spec_rep, spec_split = PartitionSpec(), PartitionSpec("data")
        local = jax.shard_map(fn, mesh=mesh, in_specs=(spec_rep, spec_split, spec_split), out_specs=spec_split, check_vma=False)
        self._fn = jax.jit(local, in_shardings=(self._rep, self._split, self._split), out_shardings=self._split)
        self._variables = None
        self._placed = None

    def _place_variables(self, variables: Any) -> Any:
        if self._variables is not variables:
            if self.multiprocess:  # the same values in every process, replicated over the global mesh
                self._placed = jax.tree.map(lambda a: jax.make_array_from_process_local_data(self._rep, np.asarray(a)), variables)
            else:
                self._placed = jax.device_put(variables, self._rep)
            self._variables = variables
        return self._placed

    def __call__(self, variables: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        pad = (-b) % self.n
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
            target = np.concatenate([target, np.repeat(target[-1:], pad, 0)])
        self.calls += 1
        if not self.multiprocess:
            out = self._fn(self._place_variables(variables), jax.device_put(x, self._split), jax.device_put(target, self._split))
            return np.asarray(out)[:b]
        xs, ts = (jax.make_array_from_process_local_data(self._split, np.asarray(a)) for a in (x, target))
        out = self._fn(self._place_variables(variables), xs, ts)
        local = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in local])[:b]

    def catch_up(self, calls: int, variables: Any, x: np.ndarray, target: np.ndarray) -> None:
        """Call on ``x``/``target`` (discarding the maps) until ``calls`` calls were made: the
        processes of a multi-process mesh must run the same global programs in the same order,
        so one that had fewer (image, class) pairs to explain makes up the difference."""
        while self.calls < calls:
            self(variables, x, target)
