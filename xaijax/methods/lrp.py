"""Layer-wise relevance propagation, its contrastive variants, and Excitation Backprop.

All methods run the model's own forward pass with relevance rules attached as custom VJPs
(:mod:`xaijax.propagation`) and are called as ``method(model, variables, x, target) ->
(N, H, W)`` (see :mod:`xaijax.methods.base`). Pure: ``jax.jit`` (model static) and
``jax.vmap`` apply; samples are independent.

LRP (:class:`LRP`). The output relevance is ``seed * logits`` — the target logit for an int
target, or any output-shaped float seed weighting the logits — propagated to the input with
a composite (:mod:`xaijax.propagation.composites`) and summed over channels:

====================================  ====================================================
``lrp-epsilon``                       epsilon on every convolution and dense layer
``lrp-epsilon-plus``                  z+ (alpha1-beta0) on convolutions, epsilon on dense
``lrp-epsilon-plus-flat``             as above, flat rule on the first layer
``lrp-epsilon-gamma-box``             z^B on the first layer, gamma on convolutions,
                                      epsilon on dense layers
``lrp-alpha1-beta0``                  alpha1-beta0 (z+) on every convolution/dense layer
``lrp-alpha2-beta1``                  alpha2-beta1 on every convolution/dense layer
====================================  ====================================================

Hyperparameters: ``eps`` (1e-6), ``gamma`` (0.25), ``alpha``/``beta``, ``low``/``high`` (z^B
bounds; default: the ImageNet-normalised range of RGB values in [0, 1]) and ``composite``,
which replaces the whole rule set (a :class:`~xaijax.propagation.Composite` or a built-in
composite name). Residual sums split relevance in proportion to their inputs, concatenations
split by channel, max pooling is winner-take-all, average pooling proportional, and
BatchNorm is folded into the preceding convolution (see the composites module).

Contrastive LRP (:class:`CLRP`, Gu, Yang & Tresp, ACCV 2018). Two propagations with the
deep-Taylor rule set of the reference code (z^B on the input layer, z+ elsewhere): one from
the target, ``R_t`` (output relevance ``|z_t|`` at the target), one from the *dual* concept,
``R_d``; the map is ``R_t - R_d * sum(R_t) / sum(R_d)`` per sample, i.e. the dual is scaled
to the target's total before it is subtracted (the reference normalises both to unit sum and
subtracts, which is the same map divided by ``sum(R_t)``). The dual (``dual=``):

* ``"uniform"`` (default): all other classes with equal weight (CLRP1 as in the SGLRP
  authors' implementation);
* ``"logits"``: all other classes weighted by ``|z_i|`` (the CLRP authors' code);
* ``"negated"``: the target with negated classifier weights (CLRP2).

The positive part is what the references display; xaijax returns the signed map.

SGLRP (Iwana, Kuroki & Uchida, ICCVW 2019). Seeds from the softmax gradient: target
``y_t (1 - y_t)`` (plus 1e-8), others ``y_t y_i``; map ``R_target - R_others * sum(R_target)
/ sum(R_others)`` (``scaling=True``, as in the authors' code; ``scaling=False`` gives LRP of
the signed softmax gradient itself). Rule set as for CLRP.

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
subtracting at the classifier (:class:`~xaijax.propagation.rules.Contrast`), which needs one
pass and no contrast layer. The c-EB map is clamped at zero, as in TorchRay.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods.base import as_seed, check_inputs, reduce_channels
from xaijax.methods.registry import register
from xaijax.propagation import composites as C
from xaijax.propagation.composites import Composite
from xaijax.propagation.engine import plan, pullback, relevance
from xaijax.propagation.rules import Flipped

__all__ = ["LRP", "CLRP", "SGLRP", "ExcitationBackprop", "default_excitation_layer"]


def _seed(model, variables, x, target, composite: Composite, method: str | None = None) -> jax.Array:
    """The (N, K) seed of ``target``, checked before any propagation (K from the plan).

    ``method``: name of a method that accepts class indices only (for the error message).
    """
    n, k = plan(model, variables, x, composite).logits_shape
    t = jnp.asarray(target)
    if method is not None and not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{method} needs class indices as target (an int or an int array of shape (N,)); got a {t.dtype} seed")
    return as_seed(t, k, n, x.dtype)


def _per_sample_sum(r: jax.Array) -> jax.Array:
    return r.reshape(r.shape[0], -1).sum(-1).reshape((-1,) + (1,) * (r.ndim - 1))


def _subtract_scaled(r_target: jax.Array, r_dual: jax.Array) -> jax.Array:
    """``r_target - r_dual * sum(r_target) / sum(r_dual)`` per sample (dual dropped if its sum is 0)."""
    st, sd = _per_sample_sum(r_target), _per_sample_sum(r_dual)
    scale = jnp.where(sd == 0, 0.0, st / jnp.where(sd == 0, 1.0, sd))
    return r_target - r_dual * scale


@dataclasses.dataclass(frozen=True)
class LRP:
    """LRP with a composite: output relevance ``seed * logits``, channels reduced.

    Attributes:
      composite: layer -> rule map (a Composite or a built-in composite name).
      reduce: channel reduction of the input relevance (``"sum"``: relevance per pixel).
    """

    composite: Composite | str = "epsilon"
    reduce: str = "sum"

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        check_inputs(x)
        composite = C.resolve(self.composite)
        seed = _seed(model, variables, x, target, composite)
        r = relevance(model, variables, x, lambda out: seed.astype(out.dtype) * out, composite)
        return reduce_channels(r, self.reduce)


def _flip_classifier(model, variables, x, composite: Composite) -> Composite:
    """``composite`` with the classifier (last convolution/dense layer) rule applied to negated weights."""
    p = plan(model, variables, x, composite)
    last = [e for e in p.layers if e.kind in ("conv", "dense")][-1]
    return composite.replace(names=((last.name, Flipped(last.rule)),) + tuple(composite.names))


@dataclasses.dataclass(frozen=True)
class CLRP:
    """Contrastive LRP (see the module docstring).

    Attributes:
      composite: rule set (default: z^B on the input layer, z+ elsewhere).
      dual: ``"uniform"``, ``"logits"`` or ``"negated"``.
      reduce: channel reduction.
    """

    composite: Composite | str = "zplus-box"
    dual: str = "uniform"
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.dual not in ("uniform", "logits", "negated"):
            raise ValueError(f"CLRP dual must be 'uniform', 'logits' or 'negated', got {self.dual!r}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        check_inputs(x)
        composite = C.resolve(self.composite)
        onehot = _seed(model, variables, x, target, composite, "clrp")
        out, back = pullback(model, variables, x, composite)
        onehot = onehot.astype(out.dtype)
        r_target = back(onehot * jnp.abs(out))
        if self.dual == "negated":
            _, back_neg = pullback(model, variables, x, _flip_classifier(model, variables, x, composite))
            r_dual = back_neg(onehot * jnp.abs(out))
        elif self.dual == "logits":
            r_dual = back((1.0 - onehot) * jnp.abs(out))
        else:
            z_t = jnp.abs((onehot * out).sum(-1, keepdims=True))
            r_dual = back((1.0 - onehot) * z_t / max(out.shape[-1] - 1, 1))
        return reduce_channels(_subtract_scaled(r_target, r_dual), self.reduce)


@dataclasses.dataclass(frozen=True)
class SGLRP:
    """Softmax-gradient LRP (see the module docstring).

    Attributes:
      composite: rule set (default: z^B on the input layer, z+ elsewhere).
      scaling: scale the others' relevance to the target's total before subtracting.
      reduce: channel reduction.
    """

    composite: Composite | str = "zplus-box"
    scaling: bool = True
    reduce: str = "sum"

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        check_inputs(x)
        composite = C.resolve(self.composite)
        onehot = _seed(model, variables, x, target, composite, "sglrp")
        out, back = pullback(model, variables, x, composite)
        onehot = onehot.astype(out.dtype)
        y = jax.nn.softmax(out, axis=-1)
        y_t = (onehot * y).sum(-1, keepdims=True)
        r_target = back(onehot * (y_t * (1.0 - y_t) + 1e-8))
        r_others = back((1.0 - onehot) * y * y_t)
        r = _subtract_scaled(r_target, r_others) if self.scaling else r_target - r_others
        return reduce_channels(r, self.reduce)


def default_excitation_layer(model: nn.Module) -> str:
    """The stride-16 stage of a zoo model, where TorchRay reads Excitation Backprop.

    VGG: the fourth max pool (``features.23`` for VGG16, ``features.33`` for VGG16-BN);
    ResNet: ``layer3``; DenseNet: the second-to-last dense block; Inception-v3: ``Mixed_6e``.
    """
    from xaijax.models.densenet import DenseNet
    from xaijax.models.inception import Inception3
    from xaijax.models.resnet import ResNet
    from xaijax.models.vgg import VGG

    if isinstance(model, VGG):
        idx, pools = 0, 0
        for v in model.cfg:
            if v == "M":
                pools += 1
                if pools == 4:
                    return f"features.{idx}"
                idx += 1
            else:
                idx += 3 if model.batch_norm else 2
        raise ValueError(f"VGG cfg {model.cfg} has fewer than 4 poolings; pass layer= explicitly")
    if isinstance(model, ResNet):
        return "layer3"
    if isinstance(model, DenseNet):
        n = len(model.block_config)
        return f"features.denseblock{max(n - 1, 1)}"
    if isinstance(model, Inception3):
        return "Mixed_6e"
    raise ValueError(f"no default Excitation Backprop layer for a {type(model).__name__}; pass layer='<dotted layer name>'")


def _upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (``align_corners=False``)."""
    if maps.shape[1:] == tuple(size):
        return maps
    return jax.image.resize(maps, (maps.shape[0],) + tuple(size), method="linear", antialias=False)


@dataclasses.dataclass(frozen=True)
class ExcitationBackprop:
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
        layer = default_excitation_layer(model) if self.layer is None else self.layer
        comp = C.contrastive_excitation(self.stabilizer) if self.contrastive else C.excitation(self.stabilizer)
        seed = _seed(model, variables, x, target, comp)
        r = relevance(model, variables, x, lambda out: seed.astype(out.dtype), comp, read_at=layer)
        if r.ndim != 4:
            raise ValueError(f"Excitation Backprop layer {layer!r} must output an NHWC map; its output has shape {r.shape}")
        s = r.sum(-1)
        if self.contrastive:
            s = jnp.maximum(s, 0.0)
        return _upsample(s, x.shape[1:3]) if self.resize else s


def _lrp_factory(make_composite):
    def factory(composite: Composite | str | None = None, reduce: str = "sum", **hparams: Any) -> LRP:
        if composite is not None:
            if hparams:
                raise TypeError(f"pass either composite= or rule hyperparameters {sorted(hparams)}, not both")
            return LRP(C.resolve(composite), reduce)
        return LRP(make_composite(**hparams), reduce)

    return factory


register(
    "lrp-epsilon",
    _lrp_factory(lambda eps=1e-6: C.epsilon(eps)),
    "LRP-epsilon on every layer (Bach et al. 2015)",
)
register(
    "lrp-epsilon-plus",
    _lrp_factory(lambda eps=1e-6: C.epsilon_plus(eps)),
    "LRP: z+ on convolutions, epsilon on dense layers",
)
register(
    "lrp-epsilon-plus-flat",
    _lrp_factory(lambda eps=1e-6: C.epsilon_plus_flat(eps)),
    "LRP: flat first layer, z+ on convolutions, epsilon on dense layers",
)
register(
    "lrp-epsilon-gamma-box",
    _lrp_factory(lambda eps=1e-6, gamma=0.25, low=None, high=None: C.epsilon_gamma_box(eps, gamma, low, high)),
    "LRP: z^B first layer, gamma on convolutions, epsilon on dense layers",
)
register(
    "lrp-alpha1-beta0",
    _lrp_factory(lambda alpha=1.0, beta=0.0: C.alpha_beta(alpha, beta)),
    "LRP-alpha1-beta0 (z+) on every layer",
)
register(
    "lrp-alpha2-beta1",
    _lrp_factory(lambda alpha=2.0, beta=1.0: C.alpha_beta(alpha, beta)),
    "LRP-alpha2-beta1 on every layer",
)


def _clrp(composite: Composite | str | None = None, dual: str = "uniform", reduce: str = "sum", low=None, high=None) -> CLRP:
    comp = C.resolve(composite) if composite is not None else C.zplus_box(low, high)
    return CLRP(comp, dual, reduce)


def _sglrp(composite: Composite | str | None = None, scaling: bool = True, reduce: str = "sum", low=None, high=None) -> SGLRP:
    comp = C.resolve(composite) if composite is not None else C.zplus_box(low, high)
    return SGLRP(comp, scaling, reduce)


register("clrp", _clrp, "contrastive LRP: target minus scaled dual relevance (Gu et al. 2018)")
register("sglrp", _sglrp, "softmax-gradient LRP (Iwana et al. 2019)")
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
