"""Plain gradient saliency (Simonyan et al., 2014) and gradient x input.

``gradient``: d(seed . f(x)) / dx, reduced over channels (default ``abs-max``, the paper's
saliency map). ``gradient-x-input``: elementwise product with the input, summed over
channels (default ``sum``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from xaijax.methods.base import as_seed, check_inputs, reduce_channels
from xaijax.methods.registry import register

__all__ = ["Gradient", "input_gradient"]


def input_gradient(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
    """Gradient of ``sum(seed * model(x))`` w.r.t. ``x``; shape of ``x``."""
    check_inputs(x)

    def score(xx):
        out = model.apply(variables, xx)
        seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
        return (out * seed).sum()

    return jax.grad(score)(x)


@dataclasses.dataclass(frozen=True)
class Gradient:
    """Gradient saliency; ``times_input=True`` gives gradient x input.

    Attributes:
      times_input: multiply the gradient by the input before reducing channels.
      reduce: channel reduction (see :func:`xaijax.methods.base.reduce_channels`).
    """

    times_input: bool = False
    reduce: str = "abs-max"

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        g = input_gradient(model, variables, x, target)
        if self.times_input:
            g = g * x
        return reduce_channels(g, self.reduce)


register("gradient", lambda reduce="abs-max": Gradient(False, reduce), "input gradient (Simonyan et al. 2014)")
register("gradient-x-input", lambda reduce="sum": Gradient(True, reduce), "gradient times input")
