"""What every attribution method shares: the call signature, targets and seeds.

Convention: ``method(model, variables, x, target) -> maps`` where

* ``model`` is a Flax module (a zoo model or any module with that call signature) and
  ``variables`` its variables;
* ``x`` is an NHWC float batch, already normalised for the model (N, H, W, C);
* ``target`` is either class indices — an int or an int array of shape (N,) — or an
  explicit *seed*: a float array shaped like the model output (N, K) that weights the
  logits (contrastive methods are built from seeds, and users may compose their own);
* ``maps`` is float32 of shape (N, H, W): one relevance/saliency value per pixel.

Methods are pure: wrap them in ``jax.jit`` (the model is a static, hashable argument) or
``jax.vmap``; samples in a batch are independent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_seed", "check_inputs", "reduce_channels"]


def check_inputs(x: jax.Array) -> None:
    """Raise a readable error unless ``x`` is a floating NHWC batch (N, H, W, C)."""
    shape = tuple(np.shape(x))
    if len(shape) != 4:
        raise ValueError(f"x must be an NHWC batch of shape (N, H, W, C); got shape {shape}")
    dtype = np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"x must be floating point (normalised float32 images); got dtype {dtype}")


def as_seed(target: int | jax.Array | np.ndarray, num_outputs: int, batch: int, dtype=jnp.float32) -> jax.Array:
    """Turn a target into an output-shaped seed of shape (batch, num_outputs).

    Args:
      target: an int (same class for every sample), int array (batch,), or float array
        (batch, num_outputs) used as is.
      num_outputs: size of the model's output (number of classes).
      batch: batch size N.

    Raises:
      ValueError: wrong shape, or (for concrete values) a class index out of range.
    """
    t = jnp.asarray(target)
    if jnp.issubdtype(t.dtype, jnp.integer):
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"target must be an int or an int array of shape ({batch},); got shape {t.shape}")
        if not isinstance(t, jax.core.Tracer):
            bad = np.asarray(t)[(np.asarray(t) < 0) | (np.asarray(t) >= num_outputs)]
            if bad.size:
                raise ValueError(f"target class {int(bad[0])} is out of range for a model with {num_outputs} outputs")
        return jax.nn.one_hot(t, num_outputs, dtype=dtype)
    if t.shape != (batch, num_outputs):
        raise ValueError(
            f"a float target is a seed and must have the output's shape ({batch}, {num_outputs}); got {t.shape}"
        )
    return t.astype(dtype)


def reduce_channels(a: jax.Array, how: str) -> jax.Array:
    """Reduce an (N, H, W, C) input attribution to an (N, H, W) map.

    ``"sum"`` (relevance, gradient x input), ``"abs-max"`` (max of |.| over channels,
    Simonyan et al. 2014), ``"abs-sum"``, ``"l2"`` (Euclidean norm over channels).
    """
    if how == "sum":
        return a.sum(-1)
    if how == "abs-max":
        return jnp.abs(a).max(-1)
    if how == "abs-sum":
        return jnp.abs(a).sum(-1)
    if how == "l2":
        return jnp.sqrt((a * a).sum(-1))
    raise ValueError(f"unknown channel reduction {how!r}; use 'sum', 'abs-max', 'abs-sum' or 'l2'")
