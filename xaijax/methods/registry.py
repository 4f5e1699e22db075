"""Method registry: names -> attribution-method constructors.

A *method* is a callable ``method(model, variables, x, target) -> maps`` built from its
hyperparameters (a frozen dataclass or ``functools.partial``); see :mod:`xaijax.methods.base`.
``get("gradient")`` builds one with default hyperparameters, ``get("integrated-gradients",
steps=32)`` overrides them; ``names()`` lists everything registered (the demo, the CLI and
the evaluation experiments iterate over it).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

__all__ = ["register", "get", "names", "describe", "kind"]

_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}


def register(name: str, factory: Callable[..., Any], summary: str = "") -> None:
    """Register ``factory(**hparams) -> method`` under ``name`` (lower-case, dash-separated)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = (factory, summary)


def get(name: str, **hparams: Any) -> Any:
    """Build the registered method ``name`` with hyperparameter overrides ``hparams``.

    ``"contrast:<name>"`` makes any seed-accepting method contrastive
    (:func:`xaijax.methods.contrast.get_contrast`). ``"ucag:<name>"`` wraps any registered method in UCAG (:func:`xaijax.methods.ucag.get_ucag`;
    hyperparameters prefixed ``ucag_`` configure the wrapper, the rest the base method).
    """
    if name.startswith("contrast:"):
        from xaijax.methods.contrast import get_contrast

        get(name[9:])  # readable error for an unknown base method
        return get_contrast(name[9:], **hparams)
    if name.startswith("ucag:"):
        from xaijax.methods.ucag import get_ucag

        get(name[5:])  # readable error for an unknown base method
        return get_ucag(name[5:], **hparams)
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


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """One-line summary of a registered method."""
    get_ok = name in _REGISTRY
    if not get_ok:
        get(name)  # raises the readable error
    return _REGISTRY[name][1]


def kind(name: str) -> str:
    """What a registered method explains: ``"attribution"`` (the default: ``method(model,
    variables, x, target) -> (N, H, W)`` maps of image classifiers), or another kind declared
    by the method class's ``kind`` attribute (``"similarity"`` for BiLRP, ``"detection"`` for
    D-RISE), whose call signatures differ. The demo and the evaluation experiments run the
    attribution methods only."""
    return str(getattr(get(name), "kind", "attribution"))
