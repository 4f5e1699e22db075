"""Nested parameter dicts as flat ``{path tuple: leaf}`` maps and back (the porters' common form)."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["flatten", "unflatten"]


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{("params", "conv1", "kernel"): array, ...}`` of a nested mapping (insertion order)."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The nested dict of a ``{path tuple: leaf}`` map (inverse of :func:`flatten`)."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out
