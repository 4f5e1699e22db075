"""Method registry: names -> attribution-method constructors.

A *method* is a :class:`~xaijax.methods._core.Method` built from its hyperparameters (a
frozen dataclass). ``get("gradient")`` builds one with default hyperparameters,
``get("integrated-gradients", steps=32)`` overrides them; ``names()`` lists everything
registered (the demo, the CLI and the evaluation experiments iterate over it).

Combinators register a *prefix* (``register_prefix("ucag", get_ucag)``): ``get("ucag:rsp")``
then calls ``get_ucag("rsp", **hparams)``. The registry imports no method module; importing
:mod:`xaijax.methods` registers everything.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Sequence

from xaijax.methods._core import Method

__all__ = ["register", "register_prefix", "get", "get_wrapped", "names", "prefixes", "describe", "describe_prefix", "kind"]

_REGISTRY: dict[str, tuple[Callable[..., Method], str]] = {}
_PREFIXES: dict[str, tuple[Callable[..., Method], str]] = {}


def register(name: str, factory: Callable[..., Method], summary: str = "") -> None:
    """Register ``factory(**hparams) -> method`` under ``name`` (lower-case, dash-separated)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if ":" in name:
        raise ValueError(f"method names cannot contain ':' (reserved for prefixes); got {name!r}")
    _REGISTRY[name] = (factory, summary)


def register_prefix(prefix: str, factory: Callable[..., Method], summary: str = "") -> None:
    """Register ``factory(base_name, **hparams) -> method`` for names ``"<prefix>:<base_name>"``."""
    if prefix in _PREFIXES:
        raise ValueError(f"method prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = (factory, summary)


def get(name: str, **hparams: Any) -> Method:
    """Build the registered method ``name`` with hyperparameter overrides ``hparams``.

    ``"<prefix>:<name>"`` applies a registered combinator to the method ``name`` (e.g.
    ``"contrast:gradient"``, ``"ucag:rsp"``; see :func:`prefixes`).

    Raises:
      ValueError: unknown name or prefix (with suggestions), or bad hyperparameters.
    """
    if ":" in name:
        prefix, base = name.split(":", 1)
        if prefix not in _PREFIXES:
            raise ValueError(f"unknown method prefix {prefix!r} in {name!r}; registered prefixes: {', '.join(prefixes())}")
        get(base)  # readable error for an unknown base method
        return _PREFIXES[prefix][0](base, **hparams)
    try:
        factory, _ = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(names())}.{hint}") from None
    try:
        return factory(**hparams)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for method {name!r}: {e}") from None


def get_wrapped(prefix: str, wrapper: Callable[..., Method], fields: Sequence[str], name: str, hparams: Mapping[str, Any]) -> Method:
    """``wrapper(get(name, **rest), **options)``: the ``<prefix>:<name>`` lookup of a combinator.

    Keys ``<prefix>_<field>`` of ``hparams`` configure the wrapper (``field`` one of
    ``fields``); all other keys are hyperparameters of the base method ``name``.
    """
    p = prefix + "_"
    options = {key[len(p):]: v for key, v in hparams.items() if key.startswith(p)}
    bad = sorted(set(options) - set(fields))
    if bad:
        raise ValueError(f"unknown {prefix} option(s) {', '.join(p + b for b in bad)}; use {p} + one of {tuple(fields)}")
    return wrapper(get(name, **{key: v for key, v in hparams.items() if not key.startswith(p)}), **options)


def names() -> list[str]:
    """Registered method names, sorted (prefixed combinations not included)."""
    return sorted(_REGISTRY)


def prefixes() -> list[str]:
    """Registered combinator prefixes, sorted."""
    return sorted(_PREFIXES)


def describe(name: str) -> str:
    """One-line summary of a registered method or prefix combination."""
    if ":" in name:
        get(name)  # raises the readable error
        prefix, base = name.split(":", 1)
        return f"{_PREFIXES[prefix][1]} over {base}"
    if name not in _REGISTRY:
        get(name)  # raises the readable error
    return _REGISTRY[name][1]


def describe_prefix(prefix: str) -> str:
    """One-line summary of a registered combinator prefix (``"ucag"``)."""
    if prefix not in _PREFIXES:
        raise ValueError(f"unknown method prefix {prefix!r}; registered prefixes: {', '.join(prefixes())}")
    return _PREFIXES[prefix][1]


def kind(name: str) -> str:
    """What a registered method explains: its declared ``Method.kind`` (see
    :data:`xaijax.methods._core.KINDS`). The demo and the evaluation experiments run the
    classifier kinds (``"attribution"``, ``"cam"``) only."""
    return get(name).kind
