"""Canonization: eval-mode BatchNorm as an affine map, folded into the preceding layer.

An eval-mode ``nn.BatchNorm`` computes ``y = a * x + c`` per channel (last axis) with
``a = scale / sqrt(var + epsilon)`` and ``c = bias - mean * a``. When its input is the
output of a convolution or dense layer ``z = op(W, x) + b`` and nothing else reads that
output, the pair is one linear layer with kernel ``W * a`` (scaled along the output-channel
axis, the kernel's last axis in Flax) and bias ``a * b + c``: the classic BatchNorm
canonizer of zennit, which lets weight-based rules (z+, gamma, z^B, ...) see the effective
weights instead of treating the normalisation as a separate layer.

xaijax canonizes *virtually*: the model and its variables stay as they are; the propagation
engine (:mod:`xaijax.propagation.engine`) applies the rule of the convolution to the folded
pair and passes relevance through the folded BatchNorm unchanged. :func:`fold_batchnorm`
also returns the merged variables for anyone who wants them explicitly (tests check the
equivalence).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["batchnorm_affine", "fold_batchnorm", "check_eval_batchnorm"]


def check_eval_batchnorm(module: nn.BatchNorm, name: str) -> None:
    """Raise unless ``module`` normalises with running statistics over the last axis."""
    if not module.use_running_average:
        raise ValueError(
            f"BatchNorm layer {name!r} is in training mode (use_running_average=False); relevance "
            "propagation needs an eval-mode model (build it with train=False)"
        )
    axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
    if axis not in (-1, (-1,)):
        raise ValueError(f"BatchNorm layer {name!r} normalises axis {axis}; only the last (channel) axis is supported")


def batchnorm_affine(module: nn.BatchNorm, variables: Mapping[str, Any], dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(a, c)`` with ``BN(x) = a * x + c`` for an eval-mode BatchNorm and its variables.

    Args:
      module: the ``nn.BatchNorm`` (its ``epsilon``, ``use_scale``, ``use_bias`` are read).
      variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` of the layer.
      dtype: computation dtype (default: that of the running mean).

    Returns:
      a, c: arrays of shape (C,).
    """
    stats = variables["batch_stats"]
    params = variables.get("params", {})
    mean, var = stats["mean"], stats["var"]
    dtype = dtype or mean.dtype
    mean, var = mean.astype(dtype), var.astype(dtype)
    a = jax.lax.rsqrt(var + jnp.asarray(module.epsilon, dtype))
    if module.use_scale:
        a = a * params["scale"].astype(dtype)
    c = -mean * a
    if module.use_bias:
        c = c + params["bias"].astype(dtype)
    return a, c


def fold_batchnorm(
    kernel: jax.Array, bias: jax.Array | None, module: nn.BatchNorm, bn_variables: Mapping[str, Any]
) -> tuple[jax.Array, jax.Array]:
    """Kernel and bias of ``BN(op(kernel, x) + bias)`` as one linear layer.

    ``kernel`` has the output channels on its last axis (Flax ``nn.Conv`` HWIO, ``nn.Dense``
    (in, out)); ``bias`` is (out,) or None. Returns ``(kernel * a, a * bias + c)``.
    """
    a, c = batchnorm_affine(module, bn_variables, kernel.dtype)
    folded_bias = c if bias is None else a * bias + c
    return kernel * a, folded_bias
