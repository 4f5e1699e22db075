"""Model registry: architecture names -> constructors and per-architecture facts.

``xaijax.models.get("resnet50", num_classes=20)`` builds a module; ``names()`` lists what is
registered. Each entry also records the facts methods need: the architecture family (used
by the checkpoint porter), the default CAM layer, the natural input size and the
preprocessing convention of its usual pretrained weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

__all__ = ["ArchSpec", "register", "get", "spec", "names"]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Facts about a registered architecture.

    Attributes:
      name: registry name (``"vgg16"``).
      family: ``"vgg"``, ``"resnet"``, ``"densenet"`` or ``"inception"``.
      build: constructor; keyword arguments override the defaults (``num_classes``, widths).
      input_size: natural input side in pixels (224, or 299 for Inception-v3).
      min_input_size: smallest input side the architecture accepts.
    """

    name: str
    family: str
    build: Callable[..., nn.Module]
    input_size: int = 224
    min_input_size: int = 32

    @property
    def cam_layer(self) -> str:
        """Default layer for CAM methods (``"features.29"`` for VGG16): the built model's ``cam_layer``.

        The model classes are the one source of this fact (a VGG with another ``cfg``
        has another last ReLU)."""
        return self.build().cam_layer


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec_: ArchSpec) -> ArchSpec:
    """Add an architecture to the registry (name must be new)."""
    if spec_.name in _REGISTRY:
        raise ValueError(f"architecture {spec_.name!r} is already registered")
    _REGISTRY[spec_.name] = spec_
    return spec_


def spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of a registered architecture, with a clear error if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(names())}.{hint}") from None


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name``; ``kwargs`` override its defaults.

    Lists among ``kwargs`` (e.g. ``layers=[1, 1, 1, 1]`` read back from a checkpoint's JSON
    metadata) become tuples, so that the module stays hashable: methods that jit a step with
    the model as a static argument (extremal perturbation) need that."""
    return spec(name).build(**{k: _frozen(v) for k, v in kwargs.items()})


def _frozen(v: Any) -> Any:
    """Lists (nested too) as tuples."""
    return tuple(_frozen(e) for e in v) if isinstance(v, (list, tuple)) else v


def names() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)
