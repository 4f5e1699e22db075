"""Excitation Backprop and contrastive Excitation Backprop (c-EB).

All methods run the model's own forward pass with relevance rules attached as custom VJPs
(:mod:`xaijax.propagation`) and are called as ``method(model, variables, x, target) ->
(N, H, W)``. Pure: ``jax.jit`` (model static) and ``jax.vmap`` apply; samples are
independent.

Excitation Backprop (Zhang et al., ECCV 2016; TorchRay's implementation). Marginal winning
probabilities from a one-hot seed (value 1, not the logit) with positive weights and no
bias on convolutions/dense layers, proportional average pooling and residual sums,
BatchNorm passed through, ReLU/max pooling gradients; the saliency is read at an
intermediate layer (default: the stride-16 stage — VGG pool4 ``features.23``, ResNet
``layer3``, DenseNet ``features.denseblock{n-1}``, Inception ``Mixed_6e``), summed over
channels and bilinearly upsampled to the input size. The contrastive variant (c-EB) flips
the classifier's weights for the contrast signal and subtracts it; TorchRay does this in two
passes with the subtraction at a "contrast layer" (VGG ``relu7``, ResNet ``avgpool``), but
since propagation below that layer is linear in the signal the result is the same as
subtracting at the classifier (:class:`~xaijax.propagation.rules.FlipContrast`), which needs one
pass and no contrast layer. The c-EB map is clamped at zero, as in TorchRay.

Models that are not piecewise linear (vision transformers: LayerNorm, softmax, GELU) raise
:class:`~xaijax.methods.NotApplicable`: Excitation Backprop is defined for ReLU networks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax import imageops
from xaijax.methods._core import Method, as_seed, check_inputs, declared_layer, require_piecewise_linear
from xaijax.methods.registry import register
from xaijax.propagation import composites as C
from xaijax.propagation.engine import plan, relevance

__all__ = ["ExcitationBackprop", "default_excitation_layer"]


def default_excitation_layer(model: nn.Module) -> str:
    """The stride-16 stage of a model, where TorchRay reads Excitation Backprop: its ``excitation_layer``.

    Zoo models declare it: VGG: the fourth max pool (``features.23`` for VGG16,
    ``features.33`` for VGG16-BN); ResNet: ``layer3``; DenseNet: the second-to-last dense
    block; Inception-v3: ``Mixed_6e``. Any other module may define a string attribute
    ``excitation_layer``.

    Raises:
      NotApplicable: the model declares none (pass ``layer=`` explicitly).
    """
    return declared_layer(model, "excitation_layer", "Excitation Backprop layer")


@dataclasses.dataclass(frozen=True)
class ExcitationBackprop(Method):
    """(Contrastive) Excitation Backprop read at an intermediate layer (see module docstring).

    Attributes:
      layer: dotted layer name where the saliency is read (None: :func:`default_excitation_layer`).
      contrastive: c-EB (classifier weights flipped for the contrast signal; map clamped at 0).
      resize: upsample the (N, h, w) map to the input size (False: return it at layer size).
      stabilizer: added to the MWP denominators (TorchRay: 1e-20).
    """

    layer: str | None = None
    contrastive: bool = False
    resize: bool = True
    stabilizer: float = 1e-20

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        check_inputs(x)
        require_piecewise_linear(
            model,
            variables,
            x,
            "Excitation Backprop",
            "marginal winning probabilities flow through the positive weights of convolutions and dense layers and ReLUs",
        )
        layer = default_excitation_layer(model) if self.layer is None else self.layer
        comp = C.contrastive_excitation(self.stabilizer) if self.contrastive else C.excitation(self.stabilizer)
        n, k = plan(model, variables, x, comp).logits_shape
        seed = as_seed(target, k, n, x.dtype)
        r = relevance(model, variables, x, lambda out: seed.astype(out.dtype), comp, read_at=layer)
        if r.ndim != 4:
            raise ValueError(f"Excitation Backprop layer {layer!r} must output an NHWC map; its output has shape {r.shape}")
        s = r.sum(-1)
        if self.contrastive:
            s = jnp.maximum(s, 0.0)
        return imageops.resize(s, x.shape[1:3]) if self.resize else s


register(
    "excitation-backprop",
    lambda layer=None, resize=True, stabilizer=1e-20: ExcitationBackprop(layer, False, resize, stabilizer),
    "Excitation Backprop, TorchRay form (Zhang et al. 2016)",
)
register(
    "contrastive-excitation-backprop",
    lambda layer=None, resize=True, stabilizer=1e-20: ExcitationBackprop(layer, True, resize, stabilizer),
    "contrastive Excitation Backprop (c-EB), TorchRay form",
)
