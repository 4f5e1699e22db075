"""Fast host-side initialisation of zoo models.

``model.init`` compiles every random initialiser, which takes many seconds for deep
models on a CPU. :func:`random_variables` only traces shapes (``jax.eval_shape``) and fills
them with numpy: He-normal kernels (std = sqrt(2 / fan_in), torchvision's choice for ReLU
networks), zero biases, BatchNorm scale 1 / bias 0 / mean 0 / var 1. Deterministic for a
seed; the result is a plain dict of ``jnp`` float32 arrays.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["random_variables"]


def random_variables(model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3), seed: int = 0) -> dict:
    """He-normal random variables for ``model`` on inputs of ``input_shape`` (NHWC)."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    template = jax.eval_shape(lambda xx: model.init(jax.random.key(0), xx), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf) -> jax.Array:
        names = [getattr(p, "key", str(p)) for p in path]
        shape, last = leaf.shape, names[-1]
        if last == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif last in ("scale", "var"):
            v = np.ones(shape, np.float32)
        else:  # bias, mean
            v = np.zeros(shape, np.float32)
        return jnp.asarray(v, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, template)
