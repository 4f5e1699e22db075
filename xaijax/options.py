"""Command-line option values shared by the ``xaijax`` commands: ``key=value`` pairs (``--param``,
``--hparam``, ``--metric-param``) parsed into a dict."""

from __future__ import annotations

import json
from typing import Any, Sequence

__all__ = ["parse_key_values"]


def parse_key_values(items: Sequence[str], option: str = "--param") -> dict[str, Any]:
    """``["steps=50", "layer=features.29"]`` -> ``{"steps": 50, "layer": "features.29"}``: each
    value parsed as JSON when it is JSON (numbers, lists, booleans, null), else kept as a string.

    Raises:
      ValueError: an item without ``=`` or with an empty key (naming ``option`` and the item).
    """
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects key=value, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out
