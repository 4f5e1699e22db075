"""A model that is just a function ``apply(params, x) -> logits`` of a params pytree.

``xaijax.wrap(apply, params)`` makes it a model every gradient, perturbation and CAM method
takes. Accepting a keyword ``tap`` exposes named activations: ``h = tap("block2", h)``.

    xaijax explain --model examples.user_models.plain_function:make --method rise image.png
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def conv(p: dict[str, jax.Array], x: jax.Array, stride: int = 1) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def apply(params: dict[str, Any], x: jax.Array, tap: Callable[[str, jax.Array], jax.Array] | None = None) -> jax.Array:
    """x (N, H, W, 3) -> logits (N, K)."""
    tap = tap or (lambda name, h: h)
    h = tap("block1", jax.nn.relu(conv(params["block1"], x)))
    h = tap("block2", jax.nn.relu(conv(params["block2"], h, stride=2)))
    return jnp.mean(h, axis=(1, 2)) @ params["head"]["w"] + params["head"]["b"]


def init_params(key: jax.Array, num_classes: int = 10, width: int = 16) -> dict[str, Any]:
    k1, k2, k3 = jax.random.split(key, 3)
    he = lambda k, shape: jax.random.normal(k, shape) * jnp.sqrt(2.0 / (shape[0] * shape[1] * shape[2]))
    return {
        "block1": {"w": he(k1, (3, 3, 3, width)), "b": jnp.zeros(width)},
        "block2": {"w": he(k2, (3, 3, width, width)), "b": jnp.zeros(width)},
        "head": {"w": jax.random.normal(k3, (width, num_classes)) / jnp.sqrt(width), "b": jnp.zeros(num_classes)},
    }


def make(num_classes: int = 10, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """The function, random params and the input size for ``xaijax explain --model``."""
    return {"model": apply, "variables": init_params(jax.random.key(seed), num_classes), "input_size": size}
