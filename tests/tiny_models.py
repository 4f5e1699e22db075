"""Tiny classifiers shared by the perturbation-method tests (occlusion/ablation, Shapley/LIME,
XRAI/Sobol): small enough for exact enumerations and direct loops in float64."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TanhReluNet(nn.Module):
    """conv 3x3 (4) -> tanh -> conv 3x3 stride 2 (4) -> ReLU -> mean -> dense (3): nonlinear, so
    feature effects do not add up."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3, 3))(x))
        h = jax.nn.relu(nn.Conv(4, (3, 3), strides=2)(h))
        return nn.Dense(3)(h.mean((1, 2)))


class LinearNet(nn.Module):
    """One dense layer on the flattened image (3 classes): every attribution has a closed form."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def float64_variables(model: nn.Module, size: int, seed: int) -> Any:
    """The model's variables for (1, size, size, 3) inputs as float64 NumPy arrays, every value
    shifted by 0.05 so that biases are not zero."""
    v = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.float32))
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + 0.05, v)
