"""Class-activation-map methods: Grad-CAM and Grad-CAM++.

Both read the activation ``A`` (N, h, w, K) of one layer and the gradient
``g = dS/dA`` of the score ``S = sum(seed * model(x))`` (the target logit for an int
target), obtained with :func:`xaijax.models.taps.forward` (a zero array added to the layer's
output is differentiated: no hooks). The map is upsampled to the input size with
:func:`upsample_bilinear` (PyTorch's ``F.interpolate(mode="bilinear",
align_corners=False)``), and is *not* min-max normalised (metrics that need it normalise).

* ``grad-cam`` (Selvaraju et al., 2017): ``w_k = mean_ab g_abk``,
  ``cam = relu(sum_k w_k A_k)``.
* ``grad-cam-plus-plus`` (Chattopadhay et al., 2018), the closed form for an exponential
  output ``Y = exp(S)`` with ``S`` linear in ``A`` beyond the layer, as implemented by
  pytorch-grad-cam::

      alpha_abk = g_abk^2 / (2 g_abk^2 + (sum_ij A_ijk) g_abk^3)   (0 where g_abk = 0
                                                                   or the denominator is 0)
      w_k       = sum_ab alpha_abk relu(g_abk)
      cam       = relu(sum_k w_k A_k)

  The paper's weights carry an extra factor ``exp(S) > 0`` per sample (``dY/dA = exp(S) g``,
  ``d2Y/dA2 = exp(S) g^2``, ``d3Y/dA3 = exp(S) g^3``, which cancels in ``alpha``); like
  pytorch-grad-cam we drop it (it only rescales the map and overflows for large logits).
  pytorch-grad-cam adds ``1e-6`` to the denominator; ``eps`` reproduces that (default 0:
  the exact closed form).

Default layers (``layer=None``) come from :func:`default_cam_layer`: VGG -> its last ReLU
(``features.29`` for VGG16), ResNet -> ``layer4``, DenseNet -> ``relu`` (after ``norm5``),
Inception-v3 -> ``Mixed_7c``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods.base import as_seed, check_inputs
from xaijax.methods.registry import register
from xaijax.models import taps
from xaijax.models.densenet import DenseNet
from xaijax.models.inception import Inception3
from xaijax.models.resnet import ResNet
from xaijax.models.vgg import VGG, last_relu_index

__all__ = [
    "default_cam_layer",
    "activation_and_gradient",
    "upsample_bilinear",
    "GradCAM",
    "GradCAMPlusPlus",
]


def default_cam_layer(model: nn.Module) -> str:
    """The default CAM layer of a zoo model (the registry's ``cam_layer`` for its family).

    VGG: the last ReLU of ``features`` (``features.29`` for VGG16, ``features.42`` for
    VGG16-BN); ResNet: ``layer4``; DenseNet: ``relu``; Inception3: ``Mixed_7c``. Any other
    module may define a string attribute ``cam_layer``.

    Raises:
      ValueError: the model is not a zoo model and has no ``cam_layer`` attribute.
    """
    if isinstance(model, VGG):
        return f"features.{last_relu_index(model.cfg, model.batch_norm)}"
    if isinstance(model, ResNet):
        return "layer4"
    if isinstance(model, DenseNet):
        return "relu"
    if isinstance(model, Inception3):
        return "Mixed_7c"
    layer = getattr(model, "cam_layer", None)
    if isinstance(layer, str):
        return layer
    raise ValueError(
        f"no default CAM layer for a {type(model).__name__}; pass layer='<dotted layer name>' "
        "(see xaijax.models.taps.layer_names)"
    )


def activation_and_gradient(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, layer: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Activation of ``layer``, the gradient of the score w.r.t. it, and the model output.

    Args:
      x: NHWC input batch (N, H, W, C).
      target: int / int (N,) class indices or an (N, K) seed; score = sum(seed * output).
      layer: dotted layer name.

    Returns:
      ``(A, g, out)``: ``A`` and ``g = dS/dA`` with the layer output's shape, ``out`` (N, K).

    Raises:
      ValueError: unknown layer (with suggestions).
    """
    check_inputs(x)
    _, acts = jax.eval_shape(lambda xx: taps.forward(model, variables, xx, capture=[layer]), x)
    shape = acts[layer]

    def score(delta: jax.Array):
        out, a = taps.forward(model, variables, x, capture=[layer], add={layer: delta})
        seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
        return (out * seed).sum(), (a[layer], out)

    g, (a, out) = jax.grad(score, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    return a, g, out


def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (N, h, w) maps to (N, H, W) like ``F.interpolate(..., "bilinear", align_corners=False)``.

    Half-pixel centres, edge values clamped, no antialiasing (also when shrinking), i.e.
    PyTorch's default bilinear interpolation.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, h, w); got {maps.shape}")
    h, w = int(size[0]), int(size[1])
    if maps.shape[1:] == (h, w):
        return maps
    return jax.image.resize(maps, (maps.shape[0], h, w), method="linear", antialias=False)


def _layer_maps(model: nn.Module, variables, x, target, layer: str | None):
    name = default_cam_layer(model) if layer is None else layer
    a, g, out = activation_and_gradient(model, variables, x, target, name)
    if a.ndim != 4:
        raise ValueError(
            f"CAM layer {name!r} must output an NHWC feature map (N, h, w, K); its output has shape {a.shape}"
        )
    return a, g, out


@dataclasses.dataclass(frozen=True)
class GradCAM:
    """Grad-CAM: ``relu(sum_k mean_ab(g_abk) A_k)`` upsampled to the input size.

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
    """

    layer: str | None = None

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        a, g, _ = _layer_maps(model, variables, x, target, self.layer)
        w = g.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, K)
        cam = jax.nn.relu((w * a).sum(-1))
        return upsample_bilinear(cam, x.shape[1:3])


@dataclasses.dataclass(frozen=True)
class GradCAMPlusPlus:
    """Grad-CAM++ (closed form for an exponential output; see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      eps: added to the denominator of ``alpha`` (pytorch-grad-cam uses 1e-6; default 0).
    """

    layer: str | None = None
    eps: float = 0.0

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        a, g, _ = _layer_maps(model, variables, x, target, self.layer)
        g2 = g * g
        g3 = g2 * g
        sum_a = a.sum(axis=(1, 2), keepdims=True)  # (N, 1, 1, K)
        denom = 2.0 * g2 + sum_a * g3 + jnp.asarray(self.eps, g.dtype)
        ok = (g != 0) & (denom != 0)
        alpha = jnp.where(ok, g2 / jnp.where(ok, denom, 1.0), 0.0)
        w = (alpha * jax.nn.relu(g)).sum(axis=(1, 2), keepdims=True)
        cam = jax.nn.relu((w * a).sum(-1))
        return upsample_bilinear(cam, x.shape[1:3])


register("grad-cam", GradCAM, "Grad-CAM (Selvaraju et al. 2017) at the model's default CAM layer")
register(
    "grad-cam-plus-plus",
    GradCAMPlusPlus,
    "Grad-CAM++ (Chattopadhay et al. 2018), exponential-output closed form as in pytorch-grad-cam",
)
