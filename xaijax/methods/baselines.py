"""Reference baselines that ignore the model.

``center``: the centre baseline of the pointing-game tables — a map whose maximum is at
the image centre (it decreases with the squared distance to ``((H-1)/2, (W-1)/2)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods._core import Method, check_inputs
from xaijax.methods.registry import register

__all__ = ["Center"]


@dataclasses.dataclass(frozen=True)
class Center(Method):
    """Map = -(squared distance to the image centre); same for every sample and target."""

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        check_inputs(x)
        n, h, w = x.shape[:3]
        yy = (jnp.arange(h, dtype=x.dtype) - (h - 1) / 2) ** 2
        xx = (jnp.arange(w, dtype=x.dtype) - (w - 1) / 2) ** 2
        return jnp.broadcast_to(-(yy[:, None] + xx[None, :]), (n, h, w))


register("center", Center, "centre baseline (maximum at the image centre; ignores the model)")
