"""Shared test helpers: reference computations several test files use."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def expected_flax_shapes(state_dict: dict[str, Any], skip_prefixes: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{(collection, *module path, leaf): shape}`` for a torch state dict (OIHW -> HWIO
    kernels, (out, in) -> (in, out) dense kernels, BatchNorm weight -> scale, running stats ->
    batch_stats); ``num_batches_tracked`` and keys under ``skip_prefixes`` are ignored."""
    out = {}
    for key, v in state_dict.items():
        *mod, leaf = key.split(".")
        shape = tuple(v.shape)
        if leaf == "num_batches_tracked" or key.startswith(skip_prefixes):
            continue
        if leaf == "weight" and len(shape) == 4:
            out[("params", *mod, "kernel")] = (shape[2], shape[3], shape[1], shape[0])
        elif leaf == "weight" and len(shape) == 2:
            out[("params", *mod, "kernel")] = (shape[1], shape[0])
        elif leaf == "weight":
            out[("params", *mod, "scale")] = shape
        elif leaf == "bias":
            out[("params", *mod, "bias")] = shape
        elif leaf == "running_mean":
            out[("batch_stats", *mod, "mean")] = shape
        elif leaf == "running_var":
            out[("batch_stats", *mod, "var")] = shape
        else:
            raise AssertionError(f"unexpected state-dict key {key}")
    return out


def as_f64(tree: Any) -> Any:
    """Every array of ``tree`` as a float64 jax array (use with the ``x64`` fixture)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def conv_matrix(kernel: np.ndarray, size: tuple[int, int], stride: int, pad: int) -> np.ndarray:
    """(in, out) matrix of a zero-padded 2D convolution on NHWC-flattened inputs/outputs."""
    kh, kw, cin, cout = kernel.shape
    H, W = size
    oh, ow = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    M = np.zeros((H, W, cin, oh, ow, cout))
    for p in range(oh):
        for q in range(ow):
            for a in range(kh):
                for c in range(kw):
                    i, j = p * stride - pad + a, q * stride - pad + c
                    if 0 <= i < H and 0 <= j < W:
                        M[i, j, :, p, q, :] = kernel[a, c]
    return M.reshape(H * W * cin, oh * ow * cout)


def minmax(m: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """pytorch-grad-cam's ``scale_cam_image`` per map: ``(m - min) / (eps + max(m - min))``
    over all axes but the first, in float64."""
    m = np.asarray(m, np.float64)
    axes = tuple(range(1, m.ndim))
    m = m - m.min(axis=axes, keepdims=True)
    return m / (eps + m.max(axis=axes, keepdims=True))


def fullgrad_postprocess(gx: np.ndarray, bias_terms: list[np.ndarray]) -> np.ndarray:
    """pytorch-grad-cam's FullGrad map rebuilt from a full-gradient decomposition.

    Args:
      gx: input gradient (N, H, W, C); ``|gx * x|`` is formed by the caller's decomposition
        (xaijax's ``fullgrad_decompose`` returns the input term already multiplied).
      bias_terms: per biased conv/BatchNorm layer, ``b * dS/dz`` (N, h, w, C_l); dense
        layers' (N, C) terms are not 2-D and must be left out.

    Returns:
      (N, H, W): each term's ``|.|`` min-max normalised per (sample, channel), bilinearly
      resized to (H, W) (half-pixel centres), summed over channels and terms, and the sum
      min-max normalised.
    """
    from xaijax.methods.cam import upsample_bilinear

    size = gx.shape[1:3]
    total = minmax(np.abs(np.asarray(gx)).transpose(0, 3, 1, 2)).sum(1)  # per (sample, channel)
    for term in bias_terms:
        term = np.asarray(term)
        per_channel = minmax(np.abs(term).transpose(0, 3, 1, 2).reshape(-1, *term.shape[1:3]))  # (N*C, h, w)
        up = np.asarray(upsample_bilinear(jnp.asarray(per_channel, jnp.float32), size))
        total = total + up.reshape(term.shape[0], term.shape[3], *size).sum(1)
    return minmax(total)
