"""Relative Sectional Propagation (RSP) and its contrastive variant c*RSP.

Nam, Choi & Lee, "Interpreting Deep Neural Networks with Relative Sectional Propagation by
Analyzing Comparative Gradients and Hostile Activations", AAAI 2021. Written from the
authors' reference code (``wjNam/Relative_Sectional_Propagation``: ``main.py``,
``baselines/gradcam.py``, ``modules/layers.py``, ``modules/vgg.py``); where code and paper
differ the code is followed, and every deliberate difference is listed below.

RSP (:class:`RSP`, registered as ``rsp``) has two stages.

1. **Gradient activation map** at the CAM layer (:func:`default_cam_layer`: VGG's last
   ReLU, ``features.29`` for VGG16; ResNet ``layer4``) with activation ``A`` (N, h, w, C) and
   gradient ``g = dS/dA`` of the target score: Grad-CAM's channel weights
   ``w_c = mean_hw g_hwc`` times the activation, *kept per channel* (no channel sum, no
   ReLU), divided by its maximum plus 1e-9 (:func:`gradient_activation_map`)::

       seed = A * w / (max(A * w) + 1e-9)          (N, h, w, C)

2. **Sectional propagation** of that seed from the CAM layer's output down to the input
   with the RSP rules (:func:`xaijax.propagation.composites.rsp`,
   :mod:`xaijax.propagation.rsp_rules`): the positive and negative sections of the
   relevance are propagated with their own weight-gradient kernels; for kernels larger than
   1x1 the difference is doubled and uniformly shifted (near-zero relevance turns negative)
   so that every layer passes on the seed's total; residual sums split by ``max(x_k, 0) +
   1e-9``; the input layer uses z^B with the image's own minimum and maximum as bounds.

The map is the input relevance summed over channels, signed (the reference displays the
signed sum with a diverging colour map). Its per-sample total equals the seed's total
(up to relevance dropped where a receptive field is all zero).

c*RSP (:class:`ContrastiveRSP`, ``contrastive-rsp``): the seed contrasts the target with
*hostile* classes, as the reference's ``relative_GAM`` builds it (:func:`relative_seed`):
per-channel maps ``M_c`` (stage 1, each normalised by its own maximum) of the target and of
the ``m`` hostile classes, ``rel = m * M_target - sum_hostile M_c``; its positive part is
scaled to sum 1 and its negative part to the same total (so ``rel`` sums to about 0); the
result is summed over channels into a spatial map ``s``, whose positive part is scaled to sum
2 and negative part to sum -1; the seed puts ``s / C`` into every channel (total about 1).
Stage 2 is as for RSP. Hostile classes (``hostile=``): ``None`` (default) all other
classes; an int ``k``: the ``k`` highest-scoring classes other than the target.

Deliberate differences from the reference code:

* **Samples are independent.** The reference normalises the CAM by the maximum over the
  whole batch and sums the weight-gradient kernels of stage 2 over the batch (it runs with
  batch size 1); here every maximum, sum and kernel is per sample.
* **ResNet**: the reference's ``ResNet.RSP`` calls ``RSP_relprop`` on blocks that do not
  define it, and its Grad-CAM extractor only walks VGG's ``features``; the ResNet form here
  (stage 1 at ``layer4``, every block's layers with the per-layer RSP rules, the fork of each
  residual summing the relevance of both branches) is derived from the per-layer rules.
* **c*RSP**: the reference defines ``relative_GAM`` in ``main.py`` but never calls it (its
  target index ``g`` and the hostile classes ``pd_cat``, the multi-label predictions, come
  from outside); which classes are hostile is the ``hostile`` parameter here. Where the
  relevant part is empty (no negative entries) the reference divides 0 by 0 (NaN); here the
  part stays 0.
* **Input layer**: the reference applies its z^B rule to any convolution with 3 input
  channels; here it is the first convolution.
* Exactly-zero denominators give 0 (the reference's ``safe_divide``) also in the stage-1
  normalisations, which in the reference could divide by zero.

Families: the paper evaluates VGG-16 and ResNet-50 and the reference implements VGG and
ResNet only; DenseNet and Inception-v3 are rejected with a ``ValueError``
(:class:`~xaijax.methods.NotApplicable`), and so are models that are not piecewise linear
(vision transformers: LayerNorm, softmax, GELU). Other models work
when every layer below the CAM layer is one the engine knows (``layer=`` or a ``cam_layer``
attribute names the CAM layer).

Pure: ``jax.jit`` (model static) and ``jax.vmap`` apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide as _divide
from xaijax.methods._core import Method, NotApplicable, as_seed, check_inputs, class_indices, layer_output_shapes, reduce_channels, require_piecewise_linear
from xaijax.methods.cam import activation_and_gradient, default_cam_layer
from xaijax.methods.registry import register
from xaijax.models import taps
from xaijax.models.densenet import DenseNet
from xaijax.models.inception import Inception3
from xaijax.propagation import composites as C
from xaijax.propagation.engine import relevance

__all__ = [
    "RSP",
    "ContrastiveRSP",
    "rsp_layer",
    "gradient_activation_map",
    "relative_seed",
    "EPS",
]

Array = jax.Array

#: The constant of the reference's normalisations.
EPS = 1e-9


_RSP_NEEDS = (
    "its sectional rules propagate through convolutions and dense layers with ReLU, pooling, BatchNorm "
    "and residual sums"
)


def rsp_layer(model: nn.Module, layer: str | None = None) -> str:
    """The CAM layer where RSP starts (``layer``, else :func:`default_cam_layer`).

    Raises:
      NotApplicable: for DenseNet and Inception-v3 (RSP is defined for VGG and ResNet), or a
        model without a default CAM layer when ``layer`` is None.
    """
    if isinstance(model, (DenseNet, Inception3)):
        family = "DenseNet" if isinstance(model, DenseNet) else "Inception-v3"
        raise NotApplicable(
            f"RSP is defined for the VGG and ResNet families (the paper evaluates VGG-16 and ResNet-50, "
            f"and the reference code implements only those); {family} is not supported"
        )
    return default_cam_layer(model) if layer is None else layer


def gradient_activation_map(a: Array, g: Array) -> Array:
    """Stage 1 of RSP: per-channel gradient activation map, normalised per sample.

    Args:
      a: activation of the CAM layer (N, h, w, C).
      g: gradient of the target score with respect to it (N, h, w, C).

    Returns:
      ``A * mean_hw(g) / (max(A * mean_hw(g)) + 1e-9)``, (N, h, w, C); the maximum is over
      each sample's whole map (0 where the denominator is exactly 0).
    """
    cam = a * g.mean(axis=(1, 2), keepdims=True)
    top = cam.max(axis=(1, 2, 3), keepdims=True)
    return _divide(cam, top + jnp.asarray(EPS, cam.dtype))


def relative_seed(cam_target: Array, cam_hostile_sum: Array, num_hostile: int) -> Array:
    """c*RSP's seed from normalised per-channel maps (the reference's ``relative_GAM``).

    Args:
      cam_target: :func:`gradient_activation_map` of the target (N, h, w, C).
      cam_hostile_sum: sum of the hostile classes' maps (N, h, w, C).
      num_hostile: number of hostile classes ``m`` (>= 1).

    Returns:
      (N, h, w, C): every channel holds the same spatial map divided by C (see the module
      docstring); per-sample total ``2 P / (P + 1e-9) - Q / (Q - 1e-9)`` ~ 1 with ``P`` and
      ``-Q`` the totals of the positive and negative part of the channel-summed map.
    """
    eps = jnp.asarray(EPS, cam_target.dtype)
    axes = (1, 2, 3)
    rel = cam_target * num_hostile - cam_hostile_sum
    pos = jnp.maximum(rel, 0)
    pos = pos / (pos.sum(axes, keepdims=True) + eps)
    neg = jnp.minimum(rel, 0)
    neg = _divide(neg, neg.min(axes, keepdims=True))  # >= 0, maximum 1
    neg = neg / (neg.sum(axes, keepdims=True) + eps) * pos.sum(axes, keepdims=True)
    s = (pos - neg).sum(-1)  # (N, h, w)
    pv = jnp.where(s > 0, s, 0.0)
    nv = jnp.where(s <= 0, s, 0.0)
    pv = pv / (pv.sum((1, 2), keepdims=True) + eps) * 2.0
    nv = _divide(nv, nv.sum((1, 2), keepdims=True) + eps)
    spatial = pv - nv
    channels = cam_target.shape[-1]
    return jnp.broadcast_to((spatial / channels)[..., None], cam_target.shape).astype(cam_target.dtype)


def _check_map(a: Array, layer: str) -> None:
    if a.ndim != 4:
        raise ValueError(f"RSP layer {layer!r} must output an NHWC feature map (N, h, w, C); its output has shape {a.shape}")


def _check_reduce(reduce: str) -> None:
    if reduce not in ("sum", "abs-max", "abs-sum", "l2"):
        raise ValueError(f"unknown channel reduction {reduce!r}; use 'sum', 'abs-max', 'abs-sum' or 'l2'")


@dataclasses.dataclass(frozen=True)
class RSP(Method):
    """Relative Sectional Propagation (see the module docstring).

    Attributes:
      layer: CAM layer where stage 1 is computed and stage 2 starts (None:
        :func:`default_cam_layer`, VGG16 ``features.29``, ResNet ``layer4``).
      reduce: channel reduction of the input relevance (``"sum"``: signed relevance per pixel).

    ``__call__(model, variables, x, target)``: ``x`` NHWC (N, H, W, C); ``target`` int, int
    array (N,) or an (N, K) seed weighting the logits (for the Grad-CAM gradient);
    returns (N, H, W).
    """

    layer: str | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        _check_reduce(self.reduce)

    def seed(self, model: nn.Module, variables: Mapping[str, Any], x: Array, target: Any) -> tuple[str, Array]:
        """Stage 1: ``(layer name, seed (N, h, w, C))``."""
        check_inputs(x)
        require_piecewise_linear(model, variables, x, "RSP", _RSP_NEEDS)
        name = rsp_layer(model, self.layer)
        a, g, _ = activation_and_gradient(model, variables, x, target, name)
        _check_map(a, name)
        return name, gradient_activation_map(a, g)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: Array, target: Any) -> Array:
        name, seed = self.seed(model, variables, x, target)
        r = relevance(model, variables, x, seed, C.rsp(), seed_at=name)
        return reduce_channels(r, self.reduce)


@dataclasses.dataclass(frozen=True)
class ContrastiveRSP(Method):
    """c*RSP: RSP seeded with the target's map contrasted against hostile classes.

    Attributes:
      layer: CAM layer (as for :class:`RSP`).
      hostile: None (all other classes) or the number ``k`` of highest-scoring other classes.
      chunk: classes (reverse mode) or channels (forward mode) whose gradients are computed
        together (memory vs. speed; the result does not depend on it).
      reduce: channel reduction.

    ``target``: class indices (int or int array (N,)). Needs a model with at least 2 outputs.
    Cost: stage 1 needs, per hostile class ``c``, only the channel means of the gradient
    ``dS_c/dA`` (the map's maximum and the sum over classes follow from them exactly, see
    :func:`_hostile_sum`). They come from one linearisation of the layers above the CAM layer:
    in reverse mode one pass per hostile class, or — when all other classes are hostile and
    the CAM layer has fewer channels than the model has classes (VGG: 512 < 1000) — in forward
    mode, one pass per channel.
    """

    accepts_seed = False

    layer: str | None = None
    hostile: int | None = None
    chunk: int = 64
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.hostile is not None and (isinstance(self.hostile, bool) or not isinstance(self.hostile, int) or self.hostile < 1):
            raise ValueError(f"ContrastiveRSP hostile must be None (all other classes) or an int >= 1, got {self.hostile!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"ContrastiveRSP chunk must be an int >= 1, got {self.chunk!r}")
        _check_reduce(self.reduce)

    def seed(self, model: nn.Module, variables: Mapping[str, Any], x: Array, target: Any) -> tuple[str, Array]:
        """Stage 1: ``(layer name, seed (N, h, w, C))``."""
        check_inputs(x)
        require_piecewise_linear(model, variables, x, "c*RSP", _RSP_NEEDS)
        name = rsp_layer(model, self.layer)
        class_indices(target, x.shape[0], None, "contrastive-rsp")  # a float seed is refused before any work
        shape = layer_output_shapes(model, variables, x, [name])[name]

        def head(delta: Array):
            out, a = taps.forward(model, variables, x, capture=[name], add={name: delta})
            return out, a[name]

        zeros = jnp.zeros(shape.shape, shape.dtype)
        # one forward pass; its linearisation gives the target's gradient (transposed) and
        # the hostile classes' channel-mean gradients (forward or reverse mode, whichever
        # needs fewer passes through the head above the CAM layer)
        out, lin, a = jax.linearize(head, zeros, has_aux=True)
        _check_map(a, name)
        if a.shape[1] * a.shape[2] == 1:
            # every channel's normalised map is 1 at its single position: the target's and the
            # hostile classes' maps cancel and the seed is rounding noise
            raise ValueError(
                f"contrastive-rsp needs a CAM layer with more than one position; {name!r} is 1x1 for a "
                f"{x.shape[1]}x{x.shape[2]} input: use a larger input or pass layer= an earlier layer"
            )
        n, k = out.shape
        if k < 2:
            raise ValueError(f"contrastive-rsp needs a model with at least 2 outputs; this one has {k}")
        m = k - 1 if self.hostile is None else self.hostile
        if m > k - 1:
            raise ValueError(f"contrastive-rsp hostile={m} exceeds the {k - 1} classes other than the target")
        onehot = as_seed(class_indices(target, n, k, "contrastive-rsp"), k, n, out.dtype)
        lin_t = jax.linear_transpose(lin, zeros)

        (g_t,) = lin_t(onehot)
        cam_t = gradient_activation_map(a, g_t)
        if self.hostile is None:  # every other class
            weights = 1.0 - onehot
            idx = None
        else:  # the m highest-scoring other classes
            idx = jax.lax.top_k(jnp.where(onehot > 0, -jnp.inf, out), m)[1]
            weights = None
        channels = a.shape[-1]
        if idx is None and channels < k:
            wmean = _channel_means_forward(lin, a, self.chunk)  # (N, K, C), all classes
        else:
            classes = jnp.argsort(onehot, axis=-1, stable=True)[:, : k - 1] if idx is None else idx
            wmean = _channel_means_reverse(lin_t, classes, k, out.dtype, self.chunk)  # (N, m, C)
            weights = jnp.ones(classes.shape, out.dtype)
        return name, relative_seed(cam_t, _hostile_sum(a, wmean, weights), m)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: Array, target: Any) -> Array:
        name, seed = self.seed(model, variables, x, target)
        r = relevance(model, variables, x, seed, C.rsp(), seed_at=name)
        return reduce_channels(r, self.reduce)


def _channel_means_forward(lin: Callable[[Array], Array], a: Array, chunk: int) -> Array:
    """``mean_hw dS_c/dA[..., k]`` for every class ``c`` and channel ``k``, (N, K, C), in
    forward mode: one tangent per channel (ones on that channel at every position), ``chunk``
    channels at a time. ``lin``: the linearised map from an offset of the CAM layer's output
    (N, h, w, C) to the logits (N, K)."""
    n, h, w, c = a.shape
    eye = jnp.eye(c, dtype=a.dtype)

    def one(kk: Array) -> Array:
        return lin(jnp.broadcast_to(eye[kk], a.shape))  # (N, K)

    d = jax.lax.map(one, jnp.arange(c), batch_size=min(chunk, c))  # (C, N, K)
    return jnp.moveaxis(d, 0, -1) / jnp.asarray(h * w, a.dtype)


def _channel_means_reverse(lin_t: Callable, classes: Array, k: int, dtype: Any, chunk: int) -> Array:
    """``mean_hw dS_c/dA`` for the classes ``classes`` (N, m), (N, m, C), in reverse mode,
    ``chunk`` classes at a time."""
    m = classes.shape[1]

    def one(cls: Array) -> Array:
        (g,) = lin_t(jax.nn.one_hot(cls, k, dtype=dtype))
        return g.mean(axis=(1, 2))  # (N, C)

    d = jax.lax.map(one, classes.T, batch_size=min(chunk, m))  # (m, N, C)
    return jnp.moveaxis(d, 0, 1)


def _hostile_sum(a: Array, wmean: Array, weights: Array) -> Array:
    """``sum_c weights_c * gradient_activation_map(a, g_c)`` from the channel means ``wmean``
    (N, m, C) of the gradients ``g_c``, without forming the m maps.

    The map of class ``c`` is ``a * w_c / (max(a * w_c) + 1e-9)`` (0 where the denominator is
    0); the maximum over positions and channels is ``max_k w_ck * (max_hw a_k if w_ck >= 0
    else min_hw a_k)`` (multiplying by a constant is monotone, also in floating point, so this
    is the same number), and the sum over classes factors as ``a * sum_c weights_c w_c /
    (max_c + 1e-9)``.
    """
    amax = a.max(axis=(1, 2))[:, None, :]  # (N, 1, C)
    amin = a.min(axis=(1, 2))[:, None, :]
    top = jnp.maximum(wmean * amax, wmean * amin).max(-1, keepdims=True)  # (N, m, 1)
    coef = (weights[..., None] * _divide(wmean, top + jnp.asarray(EPS, a.dtype))).sum(1)  # (N, C)
    return a * coef[:, None, None, :]


register("rsp", RSP, "Relative Sectional Propagation (Nam et al. 2021), seeded at the CAM layer")
register("contrastive-rsp", ContrastiveRSP, "c*RSP: RSP seeded with the target contrasted against hostile classes")
