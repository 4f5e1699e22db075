"""CAMs from perturbed activations: Ablation-CAM, Recipro-CAM.

Both methods change the CAM layer's activation and run *the rest of the network* on it:
:func:`forward_replacing` replaces the layer's output with a given array (the layers before it
are then dead code, which XLA drops: only the part of the network after the layer is computed).
Conventions as in :mod:`xaijax.methods.cam`: ``method(model, variables, x, target) -> (N, H, W)``,
``S = sum(seed * model(x))`` per sample, ``A`` (N, h, w, C) the CAM layer's activation
(``layer=None``: the model's ``cam_layer``; vision-transformer tokens become their patch grid
with :func:`~xaijax.methods._core.token_grid`), maps upsampled bilinearly (``align_corners=False``)
and not normalised.

* ``ablation-cam`` (Desai & Ramaswamy, WACV 2020). For each channel ``k`` the layer's output
  with channel ``k`` set to zero gives the score ``S_k``; the channel weight is the relative drop
  ``w_k = (S - S_k) / S`` (0 where ``S = 0``) and ``map = relu(sum_k w_k A_k)``. Channels are
  ablated ``chunk_size`` at a time (``jax.lax.map`` over chunks; each chunk is one forward pass of
  the rest of the network on ``N * chunk_size`` activations). On a token layer the channel is
  zeroed in every token, prefix tokens included (as pytorch-grad-cam's ``AblationLayerVit``).
  pytorch-grad-cam's ``AblationLayer`` sets the channel to 0 only when the layer's minimum
  (over the ablation batch) is 0, and to ``min - 1e7`` otherwise; xaijax always uses 0 (the
  paper's ablation; the two agree on a ReLU output). Its ``ratio_channels_to_ablate`` (skip
  channels judged unimportant by an Eigen-CAM mask; default 1.0 = all) is not offered: every
  channel is ablated.
* ``recipro-cam`` (Byun & Lee, 2022, "Recipro-CAM: gradient-free reciprocal class activation
  map", arXiv 2209.14074; authors' code ``sybyun/ReciproCAM``). For each position ``p`` of the
  layer's (h, w) grid, a *spatially masked* feature map keeps only ``A[p]``: with
  ``kernel="point"`` (the default: the paper's one-hot mask, and what the authors' code runs,
  ``_mosaic_feature(..., is_gaussian=False)`` in every version of ``src/recipro_cam.py``)
  ``F_p[q] = A[p] [q = p]``; with ``kernel="gaussian"`` (the optional branch of the authors'
  ``_mosaic_feature``) the feature vector ``A[p]`` is spread
  over the 3x3 neighbourhood of ``p`` with weights ``[[1,2,1],[2,4,2],[1,2,1]] / 16`` (cut at the
  borders): ``F_p[q] = g[q - p] A[p]``. Every ``F_p`` goes through the rest of the network and
  the map at ``p`` is the target's softmax probability ``sum_k seed_k softmax(f(F_p))_k``.
  Positions go ``chunk_size`` at a time through one batched pass. The authors min-max
  normalise the (h, w) map; xaijax keeps the probabilities (normalise with
  :func:`xaijax.imageops.minmax_normalize`). On a token layer the prefix tokens keep their values.
  pytorch-grad-cam 1.5.7 has no Recipro-CAM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.methods._core import as_seed, check_inputs, target_scores, token_grid, validate_positive_int
from xaijax.methods.cam import CamMethod, default_cam_layer
from xaijax.methods.registry import register
from xaijax.models import taps

__all__ = ["forward_replacing", "layer_activation", "AblationCAM", "ReciproCAM", "recipro_masks", "RECIPRO_KERNELS"]

#: Spatial kernels of Recipro-CAM (see the module docstring).
RECIPRO_KERNELS = ("gaussian", "point")
_GAUSS = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def forward_replacing(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, layer: str, value: jax.Array
) -> jax.Array:
    """The model output (N, K) when ``layer``'s output is replaced by ``value`` (its shape, batch N).

    ``x`` (N, H, W, C) only has to have the batch and shapes the model expects: the layers before
    ``layer`` run but their results are unused (XLA removes them under ``jit``), so this is the
    rest of the network from ``layer`` on. Layers after ``layer`` that read activations from
    before it (none in the zoo's CAM layers) would see ``x``'s.

    Raises:
      ValueError: ``layer`` is not called in the forward pass (with suggestions) or is called
        more than once.
    """
    seen: list[str] = []

    def on_call(name, module, call_next, args, kwargs):
        if name == layer:
            if seen:
                raise ValueError(f"layer {layer!r} is called more than once; its output cannot be replaced")
            seen.append(name)
            return value
        return call_next(*args, **kwargs)

    with taps.intercept_calls(on_call):
        out = model.apply(variables, x)
    if not seen:
        taps.check_layers(model, variables, x, [layer])
        raise ValueError(f"layer {layer!r} was not called in the forward pass")
    return out


def layer_activation(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, layer: str | None
) -> tuple[str, jax.Array, jax.Array, jax.Array]:
    """``(name, raw, grid, out)``: the CAM layer's name, its output as the model gives it
    (NHWC or tokens), that output as an NHWC grid (N, h, w, C), and the model output (N, K).
    No gradients flow through them (the perturbation CAMs do not differentiate)."""
    check_inputs(x)
    name = default_cam_layer(model) if layer is None else layer
    out, acts = taps.forward(model, variables, x, capture=[name])
    raw = jax.lax.stop_gradient(acts[name])
    grid = token_grid(model, raw, name)
    return name, raw, grid, jax.lax.stop_gradient(out)


def _chunks(total: int, chunk_size: int) -> jax.Array:
    """(n_chunks, chunk) indices covering ``range(total)``; the last chunk is padded by repeating indices."""
    chunk = min(chunk_size, total)
    n_chunks = -(-total // chunk)
    return jnp.asarray((np.arange(n_chunks * chunk) % total).reshape(n_chunks, chunk))


def _repeat(a: jax.Array, times: int) -> jax.Array:
    """(N, ...) -> (N * times, ...), each sample repeated ``times`` times (sample-major)."""
    return jnp.repeat(a, times, axis=0)


@dataclasses.dataclass(frozen=True)
class AblationCAM(CamMethod):
    """Ablation-CAM (see the module docstring): ``relu(sum_k (S - S_k) / S * A_k)`` upsampled.

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
      chunk_size: channels ablated per batched pass (memory ~ ``N * chunk_size`` activations;
        pytorch-grad-cam's ``batch_size``, also 32).
    """

    layer: str | None = None
    chunk_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_positive_int("ablation-cam", "chunk_size", self.chunk_size)

    def channel_weights(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> tuple[jax.Array, jax.Array]:
        """The layer's activation ``A`` (N, h, w, C) and the weights ``(S - S_k) / S`` (N, C)."""
        name, raw, a, out = layer_activation(model, variables, x, self.layer)
        n, c = x.shape[0], raw.shape[-1]
        seed = as_seed(target, out.shape[-1], n, out.dtype)
        s = target_scores(out, seed)  # (N,)
        ids = _chunks(c, self.chunk_size)
        chunk = ids.shape[1]
        xs = _repeat(x, chunk)
        seeds = _repeat(seed, chunk)

        def score_chunk(idx: jax.Array) -> jax.Array:
            keep = jnp.arange(c)[None, :] != idx[:, None]  # (chunk, C)
            keep = keep.reshape((1, chunk) + (1,) * (raw.ndim - 2) + (c,))
            ablated = jnp.where(keep, raw[:, None], jnp.zeros((), raw.dtype))  # (N, chunk, ...)
            value = ablated.reshape((n * chunk,) + raw.shape[1:])
            return target_scores(forward_replacing(model, variables, xs, name, value), seeds).reshape(n, chunk)

        scores = jnp.moveaxis(jax.lax.map(score_chunk, ids), 0, 1).reshape(n, -1)[:, :c]  # (N, C)
        w = imageops.safe_divide(s[:, None] - scores, jnp.broadcast_to(s[:, None], scores.shape))
        return a, w

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, C) ``w_k A_k``."""
        a, w = self.channel_weights(model, variables, x, target)
        return a * w.astype(a.dtype)[:, None, None, :]


def recipro_masks(h: int, w: int, kernel: str = "point") -> np.ndarray:
    """(h w, h, w) float64 spatial masks of Recipro-CAM, one per position ``p`` (row-major):
    ``M_p[q] = [q = p]`` (``"point"``) or ``g[q - p]`` with the 3x3 Gaussian ``g`` (``"gaussian"``)."""
    if kernel not in RECIPRO_KERNELS:
        raise ValueError(f"unknown Recipro-CAM kernel {kernel!r}; use one of {', '.join(RECIPRO_KERNELS)}")
    g = _GAUSS if kernel == "gaussian" else np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    m = np.zeros((h * w, h, w))
    for i in range(h):
        for j in range(w):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        m[i * w + j, i + di, j + dj] = g[di + 1, dj + 1]
    return m


@dataclasses.dataclass(frozen=True)
class ReciproCAM(CamMethod):
    """Recipro-CAM (see the module docstring): the target's softmax probability of the network
    run from the layer on each spatially masked feature map, upsampled.

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
      kernel: ``"point"`` (default: the paper's one-hot mask, as the authors' code runs) or
        ``"gaussian"`` (``A[p]`` spread over the 3x3 neighbourhood, the authors' optional branch).
      chunk_size: positions per batched pass (memory ~ ``N * chunk_size`` activations).
    """

    layer: str | None = None
    kernel: str = "point"
    chunk_size: int = 64

    supports_eigen_smooth = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_positive_int("recipro-cam", "chunk_size", self.chunk_size)
        if self.kernel not in RECIPRO_KERNELS:
            raise ValueError(f"unknown Recipro-CAM kernel {self.kernel!r}; use one of {', '.join(RECIPRO_KERNELS)}")

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w) target probability per masked position."""
        name, raw, a, out = layer_activation(model, variables, x, self.layer)
        n, h, w, c = a.shape
        positions = h * w
        seed = as_seed(target, out.shape[-1], n, out.dtype)
        masks = jnp.asarray(recipro_masks(h, w, self.kernel), a.dtype)  # (P, h, w)
        flat = a.reshape(n, positions, c)
        ids = _chunks(positions, self.chunk_size)
        chunk = ids.shape[1]
        xs = _repeat(x, chunk)
        seeds = _repeat(seed, chunk)
        prefix = raw.shape[1] - positions if raw.ndim == 3 else 0

        def score_chunk(idx: jax.Array) -> jax.Array:
            m = masks[idx]  # (chunk, h, w)
            mosaic = m[None, :, :, :, None] * flat[:, idx][:, :, None, None, :]  # (N, chunk, h, w, C)
            if raw.ndim == 3:  # tokens: prefix tokens unchanged, patch tokens row-major
                head = jnp.broadcast_to(raw[:, None, :prefix], (n, chunk, prefix, c))
                mosaic = jnp.concatenate([head, mosaic.reshape(n, chunk, positions, c)], axis=2)
            value = mosaic.reshape((n * chunk,) + raw.shape[1:])
            logits = forward_replacing(model, variables, xs, name, value)
            p = jax.nn.softmax(logits, axis=-1)
            return (p * seeds.astype(p.dtype)).sum(-1).reshape(n, chunk)

        probs = jnp.moveaxis(jax.lax.map(score_chunk, ids), 0, 1).reshape(n, -1)[:, :positions]
        return probs.reshape(n, h, w).astype(a.dtype)


register(
    "ablation-cam",
    AblationCAM,
    "Ablation-CAM (Desai & Ramaswamy 2020): channels weighted by the score drop when each is zeroed",
)
register(
    "recipro-cam",
    ReciproCAM,
    "Recipro-CAM (Byun & Lee 2022): target probability of the network run on spatially masked feature maps",
)
