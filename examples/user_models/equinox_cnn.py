"""A CNN written with Equinox: per-example, channels-first (``eqx.nn.Conv2d`` reads (C, H, W)).

``xaijax.wrap(model)`` vmaps it over the batch and transposes xaijax's NHWC images to NCHW.
The model exposes the activation that CAMs read by calling ``tap`` (an optional keyword):
``h = tap("features", h)``; the adapter presents it channels-last.

    xaijax explain --model examples.user_models.equinox_cnn:make --size 32 --method grad-cam \
        --param layer=features image.png
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, num_classes: int = 10, width: int = 16, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, width, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(width, width, 3, padding=1, key=k2)
        self.fc = eqx.nn.Linear(width, num_classes, key=k3)

    def __call__(self, x: jax.Array, *, tap: Callable[[str, jax.Array], jax.Array] | None = None) -> jax.Array:
        h = jax.nn.relu(self.conv1(x))
        h = eqx.nn.MaxPool2d(2, 2)(h)
        h = jax.nn.relu(self.conv2(h))
        if tap is not None:
            h = tap("features", h)
        return self.fc(jnp.mean(h, axis=(1, 2)))


def make(num_classes: int = 10, seed: int = 0) -> CNN:
    """A randomly initialised CNN (no dropout or BatchNorm, so nothing to switch to inference)."""
    return CNN(num_classes, key=jax.random.key(seed))
