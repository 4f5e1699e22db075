"""Shared test helper: the Flax variable shapes a torchvision state dict should map to."""

from __future__ import annotations

from typing import Any


def expected_flax_shapes(state_dict: dict[str, Any], skip_prefixes: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{(collection, *module path, leaf): shape}`` for a torch state dict (OIHW -> HWIO
    kernels, (out, in) -> (in, out) dense kernels, BatchNorm weight -> scale, running stats ->
    batch_stats); ``num_batches_tracked`` and keys under ``skip_prefixes`` are ignored."""
    out = {}
    for key, v in state_dict.items():
        *mod, leaf = key.split(".")
        shape = tuple(v.shape)
        if leaf == "num_batches_tracked" or key.startswith(skip_prefixes):
            continue
        if leaf == "weight" and len(shape) == 4:
            out[("params", *mod, "kernel")] = (shape[2], shape[3], shape[1], shape[0])
        elif leaf == "weight" and len(shape) == 2:
            out[("params", *mod, "kernel")] = (shape[1], shape[0])
        elif leaf == "weight":
            out[("params", *mod, "scale")] = shape
        elif leaf == "bias":
            out[("params", *mod, "bias")] = shape
        elif leaf == "running_mean":
            out[("batch_stats", *mod, "mean")] = shape
        elif leaf == "running_var":
            out[("batch_stats", *mod, "var")] = shape
        else:
            raise AssertionError(f"unexpected state-dict key {key}")
    return out
