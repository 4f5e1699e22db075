"""Relative Attributing Propagation (RAP; Nam, Gur, Choi, Wolf & Lee, AAAI 2020).

RAP explains the class chosen by ``target`` by propagating a one-hot seed (value 1 at the
class, not the logit) from the classifier to the input with the rules of
:mod:`xaijax.propagation.rap_rules`:

* classifier (last dense layer): contributions to the class score with the bias split
  between the positive and negative contributions, then *absolute influence
  normalisation* — every input unit gets ``|r_i| * sum(r) / sum(|r|)``, so all units are
  ranked by the magnitude of their influence and the total is the class logit;
* hidden convolutions and dense layers: relevance split into its positive and negative
  parts, propagated through ``W+`` and ``|W-|`` separately (convolutions send negative
  relevance through ``|W-|``, dense layers through ``W+``), followed by a *uniform shift*
  (every nonzero entry moved by the same amount so the layer total equals the incoming
  total — relevance is conserved layer by layer);
* input layer: z^B with per-sample bounds (minimum and maximum of the normalised image);
* max/average pooling, residual adds, concatenations: the z-rule; BatchNorm, ReLU, dropout:
  relevance passes unchanged (BatchNorm is *not* folded into the convolution).

The result is a signed map, relevance summed over colour channels, per sample totalling the
target logit (``seed . logits`` for a float seed).

Families. The paper and the reference code (``wjNam/Relative_Attributing_Propagation``)
define RAP for VGG (plain and with BatchNorm) and ResNet (its ``RAP_relprop`` exists for
VGG and ResNet-50 style bottleneck networks). xaijax applies the same layer rules to every
zoo classifier built from the layer kinds above: VGG, ResNet (basic blocks included: the
relevance of a block input is the sum over its consumers, as in the reference's bottleneck;
the reference's basic-block code path does not run), DenseNet
(pre-activation BatchNorms pass, concatenations use the z-rule) and Inception-v3 (with
``transform_input=False``: RAP's input rule needs the model input to reach the first
convolution unchanged, so ``transform_input=True`` is refused with a clear error).
The classifier must be a dense layer (absolute influence normalisation is defined for it);
anything else raises a ``ValueError`` at plan time. Models that are not piecewise linear
(vision transformers: LayerNorm, softmax, GELU) raise :class:`~xaijax.methods.NotApplicable`.

Deliberate differences from the reference code (see also the rules module): samples are
independent (the reference detects the classifier by ``R.max() == 1`` over the batch;
xaijax uses the layer's position), and a layer whose inputs have both signs is shifted once
for both input paths (the reference's per-path shift would pass on twice the relevance;
this does not arise in the reference networks). With an explicit float seed the classifier
rule is applied to that seed as is (the reference always uses the one-hot seed).

Pure: ``jax.jit`` (model static) and ``jax.vmap`` apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from xaijax.methods._core import Method, NotApplicable, as_seed, check_inputs, reduce_channels, require_piecewise_linear
from xaijax.methods.registry import register
from xaijax.models.inception import Inception3
from xaijax.propagation.engine import plan, relevance
from xaijax.propagation.rap_rules import rap_composite

__all__ = ["RAP"]


_RAP_NEEDS = (
    "its rules split relevance through the positive and negative weights of convolutions and dense layers, "
    "with ReLU, pooling, BatchNorm and residual sums"
)


def _check_model(model: nn.Module) -> None:
    if isinstance(model, Inception3) and model.transform_input:
        raise NotApplicable(
            "RAP needs the model input to reach the first convolution unchanged (its input rule uses the "
            "image's own bounds); build Inception3 with transform_input=False and apply the re-normalisation "
            "to x before calling the method"
        )


@dataclasses.dataclass(frozen=True)
class RAP(Method):
    """Relative Attributing Propagation (see the module docstring).

    Attributes:
      reduce: channel reduction of the input relevance (``"sum"``, as in the reference).
      stabilizer: added (times sign) to the input layer's z^B denominators (reference: 0).
    """

    reduce: str = "sum"
    stabilizer: float = 0.0

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """RAP maps (N, H, W) float32 for class indices (int or (N,)) or a float seed (N, K)."""
        check_inputs(x)
        _check_model(model)
        require_piecewise_linear(model, variables, x, "RAP", _RAP_NEEDS)
        composite = rap_composite(self.stabilizer)
        n, k = plan(model, variables, x, composite).logits_shape
        seed = as_seed(target, k, n, x.dtype)
        r = relevance(model, variables, x, lambda out: seed.astype(out.dtype), composite)
        return reduce_channels(r, self.reduce).astype(x.dtype)


register(
    "rap",
    lambda reduce="sum", stabilizer=0.0: RAP(reduce, stabilizer),
    "Relative Attributing Propagation (Nam et al. 2020)",
)
