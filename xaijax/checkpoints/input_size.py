"""The input size a loaded model is fed: one rule for ``predict``, ``explain``, ``eval`` and the demo.

:func:`model_input_size` decides the side of the square NHWC input a model loaded by
:func:`xaijax.checkpoints.load` gets, from (first that applies):

1. ``requested`` (a ``--size`` flag), which must agree with a fixed size (below);
2. the model's own fixed input size: a module with an ``image_size`` attribute (ViT, DeiT),
   whose position embedding was made for exactly ``image_size x image_size`` inputs;
3. what the checkpoint records (:func:`xaijax.models.preprocess.recorded`: metadata
   ``input_size``, else the image size of the dataset it was trained on);
4. ``fallback`` (a caller's default, e.g. the dataset's native size);
5. the natural input size of the registered architecture ``info["arch"]`` (224; 299 for
   Inception-v3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xaijax.models import preprocess, registry

__all__ = ["fixed_input_size", "model_input_size"]


def fixed_input_size(model: Any) -> int | None:
    """The only input side ``model`` accepts (its ``image_size``: ViT, DeiT), or None when any size works."""
    size = getattr(model, "image_size", None)
    if size is None or isinstance(size, bool):
        return None
    return int(size)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of pixels; got {value!r}")
    return int(value)


def model_input_size(
    model: Any,
    info: Mapping[str, Any] | None = None,
    requested: int | None = None,
    fallback: int | None = None,
) -> int:
    """Side in pixels of the square input to feed ``model`` (see the module docstring for the order).

    Args:
      model: the module returned by :func:`xaijax.checkpoints.load`.
      info: its ``info`` dict (``arch``, ``metadata``); None: nothing recorded.
      requested: a size asked for explicitly (``--size``), or None.
      fallback: the caller's default when neither the model nor the checkpoint fixes a size.

    Returns:
      the side ``S`` of (N, S, S, 3) inputs.

    Raises:
      ValueError: ``requested`` or ``fallback`` not a positive int; ``requested`` differs from
        the model's fixed ``image_size`` (the message names both); a recorded size that is not
        a positive int.
    """
    fixed = fixed_input_size(model)
    if requested is not None:
        requested = _positive("size (--size)", requested)
        if fixed is not None and requested != fixed:
            raise ValueError(
                f"size (--size) {requested}: {type(model).__name__} takes only {fixed}x{fixed} px inputs (its position "
                f"embedding was made for that size); drop --size, or pass --size {fixed}"
            )
        return requested
    if fixed is not None:
        return fixed
    if info is not None:
        recorded = preprocess.recorded(info).input_size
        if recorded is not None:
            return int(recorded)
    if fallback is not None:
        return _positive("fallback", fallback)
    arch = (info or {}).get("arch")
    if arch is None:
        raise ValueError("model_input_size: nothing fixes the input size (no image_size, no recorded size, no arch, no fallback)")
    return int(registry.spec(arch).input_size)
