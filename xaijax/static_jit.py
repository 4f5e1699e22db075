"""Binding static arguments to a module-level jitted function.

A function jitted once at module level with ``static_argnums`` compiles once per distinct
static value (a method configuration, a Flax module) and input shapes, however often it is
called. Static arguments must be hashable; for those that are not (a module with a list
attribute), :func:`bind_static` falls back to jitting a closure, one compile per binding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

__all__ = ["bind_static"]


def bind_static(fn: Callable[..., Any], jitted: Callable[..., Any], *static: Any) -> Callable[..., Any]:
    """``jitted`` with its leading static arguments ``static`` bound, where ``jitted`` is
    ``jax.jit(fn, static_argnums=range(len(static)))`` made once by the caller; if any of
    ``static`` cannot be hashed, ``jax.jit(partial(fn, *static))`` instead."""
    try:
        hash(static)
    except TypeError:
        return jax.jit(functools.partial(fn, *static))
    return functools.partial(jitted, *static)
