"""The CAM family: maps computed at a layer from its activations (and gradients), upsampled.

Every method here has ``kind = "cam"`` and the convention ``method(model, variables, x,
target) -> (N, H, W)``: ``x`` is a normalised NHWC float batch, ``target`` class indices
(int or int (N,)) or an (N, K) seed, and the score is ``S = sum(seed * model(x))`` per
sample. ``A`` (N, h, w, K) is the activation of the CAM layer (a dotted layer name;
``layer=None`` picks :func:`default_cam_layer`, the model's ``cam_layer``: VGG's last ReLU
``features.29`` for VGG16, ResNet ``layer4``, DenseNet ``relu``, Inception ``Mixed_7c``),
``g = dS/dA`` its gradient (one backward pass, no hooks:
:func:`xaijax.methods.layer_gradients`). Maps are upsampled to the input size with
:func:`xaijax.imageops.resize` (PyTorch's ``bilinear``, ``align_corners=False``) and are
*not* min-max normalised at the end unless stated (metrics normalise when they need to).

Vision transformers. A CAM layer whose output is tokens (N, T, D) — a ViT/DeiT block or one of
its LayerNorms — is turned into an NHWC grid before any CAM computation, activations and
gradients alike: the model's ``num_prefix_tokens`` prefix tokens (class, distillation) are
dropped and the patch tokens reshaped to its ``grid_size`` (:func:`xaijax.methods._core.token_grid`;
the user never passes a reshape; a token layer on a model that does not declare both facts
raises a ``ValueError`` naming what is missing). The ViTs' default layer is the last block's
first LayerNorm (see :mod:`xaijax.models.vit`: at the block's output the patch tokens' gradients
are exactly zero). ``cam`` (Zhou et al.) needs a global-pooling head and is
:class:`~xaijax.methods.NotApplicable` on a ViT; ``cameras`` resizes the input and is
NotApplicable on a model that takes one input size only (``image_size``).

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
* ``hirescam`` (Draelos & Carin, 2020): ``cam = relu(sum_k g_k * A_k)`` (element-wise, no spatial
  averaging of the gradient). On a layer followed by global average pooling and one linear
  layer the gradient is constant over space and HiResCAM equals Grad-CAM.
* ``grad-cam-elementwise`` (pytorch-grad-cam's ``GradCAMElementWise``):
  ``cam = relu(sum_k relu(g_k * A_k))``.
* ``guided-grad-cam`` (Selvaraju et al., 2017): Guided Backprop's input gradient times the
  upsampled Grad-CAM map, reduced over colour channels (default ``abs-max``, so the map is
  ``guided-backprop * grad-cam``); a pixel-level map of kind ``"attribution"`` without a layer map.

Options of every CAM (keyword-only fields of :class:`CamMethod`, default off), pytorch-grad-cam's
call arguments: ``eigen_smooth`` replaces the channel sum of the weighted activations (``w_k A_k``
for Grad-CAM, Grad-CAM++, XGrad-CAM, CAM, Score-CAM, Ablation-CAM; ``g A`` for HiResCAM,
``relu(g A)`` element-wise, ``relu(g) A`` single-layer Layer-CAM) by their projection on the first
principal component (:func:`eigen_projection`; the sign is fixed, see there); methods whose map is
not such a sum (NormGrad, CAMERAS, multi-layer Layer-CAM, Eigen-CAM, EigenGrad-CAM, Recipro-CAM,
DFF) refuse it. ``aug_smooth`` averages the de-augmented maps of horizontally flipped and
brightness-scaled inputs (ttach's ``HorizontalFlip`` x ``Multiply([0.9, 1, 1.1])``, six
augmentations in one batched call, :func:`augmented_maps`); the peer min-max normalises each map
before averaging, xaijax averages them as they are. Further CAMs: :mod:`xaijax.methods.cam_ablation`
(Ablation-CAM, Recipro-CAM) and :mod:`xaijax.methods.cam_factorization` (Eigen-CAM, EigenGrad-CAM,
Deep Feature Factorization).

* ``cam`` (Zhou et al., CVPR 2016). Defined only for a head made of **global average
  pooling followed by one linear layer** (ResNet ``avgpool -> fc``, DenseNet
  ``avgpool -> classifier``, Inception-v3 ``avgpool -> dropout -> fc``): with ``W`` the
  linear layer's kernel (C, K), ``w_c = W @ seed`` (the column of the target class) and
  ``cam = sum_c w_c A_c`` (bias dropped: it is constant over space). As in the authors'
  code there is no ReLU by default (``relu=True`` adds one). The head is checked
  structurally during tracing: after the CAM layer the model must call, as a pure chain,
  an ``AdaptiveAvgPool2d`` to 1x1, then only ``Flatten`` or pass-through modules (eval
  dropout, identity), then exactly one ``nn.Dense`` whose output is the model's output.
  Anything else (VGG's three-layer fully connected classifier, a layer that is not the
  one feeding the pool) raises a ``ValueError``; use ``grad-cam``, which reduces to CAM
  on such heads: ``grad-cam = relu(cam) / (h w)``.

* ``xgrad-cam`` (Fu et al., BMVC 2020, "axiom-based Grad-CAM"):
  ``w_c = sum_ij (A_ijc / sum_ab A_abc) g_ijc`` and ``map = relu(sum_c w_c A_c)``. A
  channel whose activations sum to zero gets weight 0 (``eps`` is added to the
  denominator, default 0; pytorch-grad-cam uses 1e-7, torchcam 1e-8).

* ``layer-cam`` (Jiang et al., IEEE TIP 2021; authors' code ``PengtaoJiang/LayerCAM-jittor``):
  per location ``M = relu(sum_c relu(g_ijc) A_ijc)``. One layer: ``M`` upsampled, not
  normalised. Several layers (``layer=("layer2", "layer3", "layer4")``, one backward pass
  for all): each layer's map is scaled as in Eq. 9 of the paper,
  ``tanh(gamma * M / max(M))`` per sample (``gamma = 2``; 0 where ``max(M) = 0``), at its
  own resolution, then upsampled to the input size, and the maps are fused by the
  element-wise maximum (as torchcam's ``LayerCAM.fuse_cams``; ``fuse="mean"`` averages
  instead). Like torchcam, the scaling is applied to every fused layer (the paper motivates
  it for the shallow ones).

* ``score-cam`` (Wang et al., CVPR-W 2020; authors' code ``haofanwang/Score-CAM``). Every
  channel ``A_c`` is upsampled to the input size (bilinear, ``align_corners=False``),
  min-max normalised per sample to ``H_c`` in [0, 1], and the model is run on ``x * H_c``;
  the channel's weight is the *softmax* probability of the target,
  ``w_c = sum_k seed_k softmax(model(x * H_c))_k``, minus a baseline. ``baseline="none"``
  (default) follows the authors' code and pytorch-grad-cam, which drop the paper's
  ``f(X_b)`` term of the channel-wise increase of confidence; ``baseline="zero"`` is the
  paper's ``C(A_c) = f(X * H_c) - f(X_b)`` with ``X_b = 0`` (the input under an all-zero
  mask, i.e. the zero image in the model's normalised input space). Channels that are
  constant over the image get weight 0 (the authors' code skips them). The map is
  ``relu(sum_c w_c up(A_c))`` with the ReLU *after* upsampling, as in the reference.
  Masked inputs are scored ``chunk_size`` channels at a time (``jax.lax.map`` over chunks,
  each chunk one batched forward pass of ``N * chunk_size`` images), so memory is bounded
  by the chunk size, not the channel count. Note: pytorch-grad-cam's ``ScoreCAM`` differs
  from the paper in two ways we do not follow: it upsamples with ``align_corners=True``
  and it takes a softmax of the raw *logits* over channels instead of the softmax
  probability over classes.
* ``normgrad`` (Rebuffi et al., CVPR 2020; reference ``srebuffi/revisiting_saliency``,
  "norm" aggregation). A virtual identity layer inserted after layer ``l`` has, at
  location ``u``, the weight-gradient contribution ``g_u a_u^T`` (``a`` the layer output,
  ``g = dS/da``). The map is its Frobenius norm per location:

  - ``virtual="conv1x1"`` (default; NormGrad of the paper): ``||a_u|| * ||g_u||``;
  - ``"scaling"`` (virtual per-channel scaling layer): ``||a_u * g_u||``;
  - ``"conv3x3"`` (virtual 3x3 conv, zero padding 1): ``||patch_3x3(a)_u|| * ||g_u||``;
  - ``"bias"`` (virtual bias): ``||g_u||``.

  One layer (default: the CAM layer) gives the map upsampled bilinearly
  (``align_corners=False``) and *not* normalised, like Grad-CAM in xaijax. Several layers
  (``layer=("layer2.0", "layer3.0", ...)``) are combined as in the reference: each map is
  upsampled, min-max normalised per sample to [0, 1], and the maps are **multiplied**
  (all layers' gradients come from one backward pass).

* ``cameras`` (Jalwana et al., CVPR 2021; reference ``VisMIL/CAMERAS``). The input is
  resized to several resolutions (bicubic, PyTorch's ``a = -0.75``, ``align_corners=False``;
  scale factor 1 uses ``x`` itself); at each, the CAM layer's activation ``A_r`` and
  gradient ``G_r`` are recorded and both are upsampled bilinearly to the *input* size
  (as the reference does, not to the base feature size); they are averaged over
  resolutions, and ``map = relu(sum_k mean(G)_k * mean(A)_k)`` is min-max normalised per
  sample (0 where the map is constant). Default resolutions are the reference's
  ``224, 324, ..., 924`` for a 224-px input, i.e. scale factors ``(224 + 100 k) / 224``,
  ``k = 0..7``; other input sizes are scaled by the same factors. Every scale is traced in
  one function (a Python loop over static sizes); memory grows with the number of scales
  and with ``H * W * channels`` of the upsampled features. The reference drops
  resolutions whose top-1 class differs from the base one only when no class is given;
  xaijax always has a target, so every resolution counts (as in the reference with a
  given class).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax import imageops
from xaijax.checkpoints.input_size import fixed_input_size
from xaijax.methods._core import (
    Method,
    NotApplicable,
    as_seed,
    check_inputs,
    declared_layer,
    layer_gradients,
    reduce_channels,
    token_grid,
    validate_positive_int,
)
from xaijax.methods.combinators import Ucag
from xaijax.methods.gradient import modified_gradient
from xaijax.methods.registry import register
from xaijax.models import layers as L
from xaijax.models import taps

__all__ = [
    "default_cam_layer",
    "activation_and_gradient",
    "upsample_bilinear",
    "CamMethod",
    "AUG_FLIPS",
    "AUG_FACTORS",
    "augmented_maps",
    "eigen_projection",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "GradCAMElementWise",
    "GuidedGradCAM",
    "CAM",
    "gap_linear_head",
    "XGradCAM",
    "LayerCAM",
    "layercam_scale",
    "ScoreCAM",
    "NormGrad",
    "CAMERAS",
    "CAMERAS_REFERENCE_SCALES",
]

#: Scale factors of the reference CAMERAS resolutions 224, 324, ..., 924 for a 224-px input.
CAMERAS_REFERENCE_SCALES: tuple[float, ...] = tuple(r / 224 for r in range(224, 1000, 100))


def default_cam_layer(model: nn.Module) -> str:
    """The default CAM layer of a model: its ``cam_layer`` (one source per architecture).

    Zoo models declare it (VGG: the last ReLU of ``features``, ``features.29`` for VGG16,
    ``features.42`` for VGG16-BN; ResNet: ``layer4``; DenseNet: ``relu``; Inception3:
    ``Mixed_7c``); any other module may define a string attribute ``cam_layer``.

    Raises:
      NotApplicable: the model declares no ``cam_layer`` (pass ``layer=`` explicitly).
    """
    return declared_layer(model, "cam_layer", "CAM layer")


def activation_and_gradient(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, layer: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Activation of ``layer``, the gradient of the score w.r.t. it, and the model output.

    One layer of :func:`xaijax.methods.layer_gradients`: ``(A, g, out)`` with ``A`` and
    ``g = dS/dA`` of the layer output's shape and ``out`` (N, K).
    """
    acts, grads, out = layer_gradients(model, variables, x, target, [layer])
    return acts[layer], grads[layer], out


def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w) maps -> (N, H, W) like ``F.interpolate(..., "bilinear", align_corners=False)``
    (:func:`xaijax.imageops.resize`)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, h, w); got {maps.shape}")
    return imageops.resize(maps, size)


def _check_spatial(name: str, a: jax.Array) -> None:
    if a.ndim != 4:
        raise ValueError(f"CAM layer {name!r} must output an NHWC feature map (N, h, w, K); its output has shape {a.shape}")


def _grid(model: nn.Module, name: str, a: jax.Array) -> jax.Array:
    """The CAM layer's output ``a`` as an NHWC map: tokens (N, T, D) become the model's patch grid
    (:func:`~xaijax.methods._core.token_grid`); any other non-NHWC output is refused."""
    if a.ndim not in (3, 4):
        raise ValueError(
            f"CAM layer {name!r} must output an NHWC feature map (N, h, w, K) or vision-transformer tokens "
            f"(N, T, D); its output has shape {a.shape}"
        )
    return token_grid(model, a, name)


def _layer_name(model: nn.Module, layer: str | None) -> str:
    return default_cam_layer(model) if layer is None else layer


def _spatial_layers(model, variables, x, target, names):
    """``layer_gradients`` for ``names``, each an NHWC feature map (vision-transformer tokens
    turned into their patch grid by :func:`~xaijax.methods._core.token_grid`)."""
    acts, grads, out = layer_gradients(model, variables, x, target, names)
    acts = {k: _grid(model, k, acts[k]) for k in names}
    grads = {k: _grid(model, k, grads[k]) for k in names}
    for k in names:
        _check_spatial(k, acts[k])
    return acts, grads, out


def _one_layer(model, variables, x, target, layer: str | None):
    name = _layer_name(model, layer)
    acts, grads, out = _spatial_layers(model, variables, x, target, [name])
    return acts[name], grads[name], out


#: pytorch-grad-cam's default test-time augmentations (ttach ``HorizontalFlip()`` x ``Multiply([0.9, 1, 1.1])``).
AUG_FLIPS: tuple[bool, ...] = (False, True)
AUG_FACTORS: tuple[float, ...] = (0.9, 1.0, 1.1)


def eigen_projection(a: jax.Array) -> jax.Array:
    """(N, h, w, K) -> (N, h, w): each sample's activations projected on their first principal component.

    Per sample, ``X`` (h w, K) is centred over positions (each channel minus its spatial mean),
    ``X = U S V^T`` (SVD) and the map is ``X v_1`` (= ``s_1 u_1``), as pytorch-grad-cam's
    ``get_2d_projection`` (NaNs set to 0 first). That projection's sign is LAPACK's arbitrary choice
    in the peer (no sign correction); xaijax fixes it: ``v_1`` is flipped so that ``sum(v_1) >= 0``,
    which is the same as asking that the projection correlate non-negatively with the plain
    channel sum ``sum_k X_k`` (``<X v_1, X 1> = s_1^2 <v_1, 1>``) — for weighted activations, the
    map being smoothed. Maps differ from the peer's at most by that sign; batched (one vmapped SVD).
    """
    if a.ndim != 4:
        raise ValueError(f"activations must have shape (N, h, w, K); got {a.shape}")
    n, h, w, k = a.shape
    x = jnp.where(jnp.isnan(a), 0.0, a).reshape(n, h * w, k)
    x = x - x.mean(axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(x, full_matrices=False)
    v = vt[:, 0, :]  # (N, K)
    v = jnp.where(v.sum(-1, keepdims=True) < 0, -v, v)
    return jnp.einsum("npk,nk->np", x, v, precision=jax.lax.Precision.HIGHEST).reshape(n, h, w)


def _tile_target(target: Any, copies: int) -> Any:
    """``target`` for a batch made of ``copies`` stacked copies of the batch (augmentation-major)."""
    t = jnp.asarray(target)
    if t.ndim == 0:
        return target
    return jnp.tile(t, (copies,) + (1,) * (t.ndim - 1))


def augmented_maps(
    fn: Callable[..., jax.Array],
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    target: Any,
    flips: tuple[bool, ...] = AUG_FLIPS,
    factors: tuple[float, ...] = AUG_FACTORS,
) -> jax.Array:
    """(A, N, ...) de-augmented maps of ``fn(model, variables, x_a, target)`` over the test-time
    augmentations ``a = (flip, factor)`` for ``flip in flips``, ``factor in factors`` (ttach's
    product order: flips outer). ``x_a`` is ``x`` flipped left-right (width axis) if ``flip``,
    times ``factor`` (applied, as pytorch-grad-cam does, to the normalised model input); a map
    ``(N, h, w)`` is flipped back (ttach's ``Multiply`` has no de-augmentation). All ``A``
    augmentations go through ``fn`` as one batch of ``A * N`` images.
    """
    combos = [(bool(f), float(m)) for f in flips for m in factors]
    if not combos:
        raise ValueError("aug_flips and aug_factors must each hold at least one augmentation")
    n = x.shape[0]
    xs = [(x[:, :, ::-1] if f else x) * jnp.asarray(m, x.dtype) for f, m in combos]
    maps = fn(model, variables, jnp.concatenate(xs, 0), _tile_target(target, len(combos)))
    maps = maps.reshape((len(combos), n) + maps.shape[1:])
    return jnp.stack([maps[i][:, :, ::-1] if f else maps[i] for i, (f, _) in enumerate(combos)])


@dataclasses.dataclass(frozen=True)
class CamMethod(Method):
    """Base of the CAM family: ``kind = "cam"`` (UCAG applies its CAM post-processing).

    A CAM method computes :meth:`layer_map` — its map at the layer's resolution before the
    final ReLU — and ``__call__`` returns ``upsample(relu(layer_map))`` at the input size
    (methods whose reference orders these steps differently override ``_map``). Methods that
    weight the layer's activations (Grad-CAM, HiResCAM, ...) implement
    :meth:`weighted_activations` (N, h, w, K), whose channel sum is the layer map.

    Options of every CAM (keyword-only fields, default off), as pytorch-grad-cam's
    ``aug_smooth`` / ``eigen_smooth`` call arguments:

    Attributes:
      eigen_smooth: the layer map is the first principal component of the weighted
        activations (:func:`eigen_projection`) instead of their channel sum. Only for methods
        with weighted activations (``supports_eigen_smooth``); others raise ``ValueError``.
      aug_smooth: test-time augmentation — the map is the mean of the de-augmented maps of
        the augmented inputs (:func:`augmented_maps`: ``aug_flips`` x ``aug_factors``, by
        default ttach's horizontal flip x brightness ``0.9, 1, 1.1`` as pytorch-grad-cam), one
        batched call. pytorch-grad-cam min-max normalises each augmentation's map before
        averaging; xaijax averages the maps as they are (with only the identity augmentation
        the result is the plain map). :meth:`layer_map` averages the de-augmented layer maps
        (before the ReLU), ``__call__`` the final maps.
      aug_flips, aug_factors: the augmentations of ``aug_smooth``.
    """

    aug_smooth: bool = dataclasses.field(default=False, kw_only=True)
    eigen_smooth: bool = dataclasses.field(default=False, kw_only=True)
    aug_flips: tuple[bool, ...] = dataclasses.field(default=AUG_FLIPS, kw_only=True)
    aug_factors: tuple[float, ...] = dataclasses.field(default=AUG_FACTORS, kw_only=True)

    kind = "cam"
    has_layer_map = True
    #: whether the layer map is the channel sum of :meth:`weighted_activations` (eigen_smooth applies).
    supports_eigen_smooth = True

    def __post_init__(self) -> None:
        for name in ("aug_flips", "aug_factors"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a sequence (one entry per augmentation), got {value!r}")
        object.__setattr__(self, "aug_flips", tuple(bool(f) for f in self.aug_flips))
        object.__setattr__(self, "aug_factors", tuple(float(f) for f in self.aug_factors))
        if not self.aug_flips or not self.aug_factors:
            raise ValueError("aug_flips and aug_factors must each hold at least one augmentation")
        if self.eigen_smooth and not self.supports_eigen_smooth:
            raise ValueError(
                f"eigen_smooth is not defined for {type(self).__name__}: it projects weighted activations on their "
                "first principal component, and this method's map is not a sum of weighted activations"
            )

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        check_inputs(x)
        if self.aug_smooth:
            return augmented_maps(self._map, model, variables, x, target, self.aug_flips, self.aug_factors).mean(0)
        return self._map(model, variables, x, target)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w) map at the layer's resolution before the final ReLU (with ``aug_smooth``: the
        mean of the de-augmented layer maps)."""
        check_inputs(x)
        if self.aug_smooth:
            return augmented_maps(self._layer_map, model, variables, x, target, self.aug_flips, self.aug_factors).mean(0)
        return self._layer_map(model, variables, x, target)

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, K) weighted activations whose channel sum is the layer map."""
        raise NotImplementedError(f"{type(self).__name__} does not define weighted activations")

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        wa = self.weighted_activations(model, variables, x, target)
        return eigen_projection(wa) if self.eigen_smooth else wa.sum(-1)

    def _map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        return upsample_bilinear(jax.nn.relu(self._layer_map(model, variables, x, target)), x.shape[1:3])


# --------------------------------------------------------------------------------------
# Grad-CAM, Grad-CAM++
# --------------------------------------------------------------------------------------


def _gradcam_weighted(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM's weighted activations ``mean_ab(g_abk) A_k`` (N, h, w, K)."""
    return g.mean(axis=(1, 2), keepdims=True) * a


@dataclasses.dataclass(frozen=True)
class GradCAM(CamMethod):
    """Grad-CAM: ``relu(sum_k mean_ab(g_abk) A_k)`` upsampled to the input size.

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
    """

    layer: str | None = None

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, K) ``mean_ab(g_abk) A_k``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        return _gradcam_weighted(a, g)


@dataclasses.dataclass(frozen=True)
class GradCAMPlusPlus(CamMethod):
    """Grad-CAM++ (closed form for an exponential output; see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      eps: added to the denominator of ``alpha`` (pytorch-grad-cam uses 1e-6; default 0).
    """

    layer: str | None = None
    eps: float = 0.0

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, K) ``w_k A_k``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        g2 = g * g
        g3 = g2 * g
        sum_a = a.sum(axis=(1, 2), keepdims=True)  # (N, 1, 1, K)
        denom = 2.0 * g2 + sum_a * g3 + jnp.asarray(self.eps, g.dtype)
        ok = (g != 0) & (denom != 0)
        alpha = jnp.where(ok, g2 / jnp.where(ok, denom, 1.0), 0.0)
        w = (alpha * jax.nn.relu(g)).sum(axis=(1, 2), keepdims=True)
        return w * a



# --------------------------------------------------------------------------------------
# HiResCAM, element-wise Grad-CAM, Guided Grad-CAM
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HiResCAM(CamMethod):
    """HiResCAM (Draelos & Carin, 2020): ``relu(sum_k g_k * A_k)`` upsampled (gradient times
    activation element-wise, no spatial averaging of the gradient).

    Equals Grad-CAM where the layer is followed by global average pooling and one linear layer
    (the gradient is then constant over space, so it equals its spatial mean), as the paper shows.

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
    """

    layer: str | None = None

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, K) ``g * A``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        return g * a


@dataclasses.dataclass(frozen=True)
class GradCAMElementWise(CamMethod):
    """Element-wise Grad-CAM (pytorch-grad-cam's ``GradCAMElementWise``): ``relu(sum_k relu(g_k * A_k))``
    upsampled (HiResCAM with the ReLU applied to each product before the channel sum).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
    """

    layer: str | None = None

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, K) ``relu(g * A)``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        return jax.nn.relu(g * a)


@dataclasses.dataclass(frozen=True)
class GuidedGradCAM(CamMethod):
    """Guided Grad-CAM (Selvaraju et al., 2017): Guided Backprop times the upsampled Grad-CAM map.

    ``map = reduce_c(gb_c * up(relu(gradcam)))`` with ``gb`` the Guided Backprop input gradient
    (N, H, W, C) (:func:`xaijax.methods.gradient.modified_gradient`, rule ``"guided"``) and the
    Grad-CAM map upsampled bilinearly to the input and *not* normalised. As the Grad-CAM map is
    non-negative, with the default ``reduce="abs-max"`` (the ``guided-backprop`` method's) the map
    is exactly ``guided-backprop map * grad-cam map``. pytorch-grad-cam (its ``cam.py`` example)
    multiplies ``GuidedBackpropReLUModel``'s 3-channel gradient by the min-max normalised Grad-CAM
    mask and shows the product as an image. A pixel-level map: ``kind = "attribution"`` (UCAG's CAM
    post-processing, a blur, does not apply) and no layer map. ``eigen_smooth`` and
    ``aug_smooth`` apply to the Grad-CAM factor and to the whole product respectively.
    NotApplicable on models without ReLU modules (vision transformers), as Guided Backprop.

    Attributes:
      layer: Grad-CAM's dotted layer name (``None``: :func:`default_cam_layer`).
      reduce: channel reduction of the product (:func:`~xaijax.methods._core.reduce_channels`).
    """

    layer: str | None = None
    reduce: str = "abs-max"

    kind = "attribution"
    has_layer_map = False

    def __post_init__(self) -> None:
        super().__post_init__()
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)  # raises for an unknown reduction

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """Grad-CAM's (N, h, w, K) ``mean_ab(g_abk) A_k``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        return _gradcam_weighted(a, g)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        raise NotImplementedError("GuidedGradCAM is a pixel-level map and has no layer map (has_layer_map is False)")

    def _map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        cam = upsample_bilinear(jax.nn.relu(self._layer_map(model, variables, x, target)), x.shape[1:3])
        gb = modified_gradient(model, variables, x, target, "guided")
        return reduce_channels(gb * cam[..., None].astype(gb.dtype), self.reduce)


# --------------------------------------------------------------------------------------
# CAM (Zhou et al. 2016)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One intercepted ``__call__`` after the CAM layer finished."""

    name: str
    module: nn.Module
    arg: Any
    out: Any = None
    leaf: bool = True
    kernel: Any = None


def gap_linear_head(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, layer: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Activation of ``layer``, the kernel of the linear layer after global pooling, and the output.

    Runs one forward pass and checks that the model's head beyond ``layer`` is
    ``AdaptiveAvgPool2d(1) -> [Flatten | pass-through]* -> Dense`` applied as a chain to the
    layer's output, the Dense's output being the model output.

    Args:
      x: NHWC batch (N, H, W, C_in).
      layer: dotted layer name.

    Returns:
      ``(A, W, out)``: ``A`` (N, h, w, C), ``W`` the Dense kernel (C, K), ``out`` (N, K).

    Raises:
      ValueError: unknown layer (with suggestions).
      NotApplicable: a head that is not global-average-pooling + one linear layer.
    """
    check_inputs(x)
    seen: dict[str, Any] = {}
    calls: list[_Call] = []
    stack: list[_Call | None] = []

    def on_call(name, module, call_next, args, kwargs):
        rec = None
        if "out" in seen:
            rec = _Call(name, module, args[0] if args else None)
            calls.append(rec)
            for parent in stack:
                if parent is not None:
                    parent.leaf = False
        stack.append(rec)
        try:
            out = call_next(*args, **kwargs)
        finally:
            stack.pop()
        if rec is not None:
            rec.out = out
            if isinstance(module, nn.Dense):
                rec.kernel = module.variables["params"]["kernel"]
        if name == layer:
            if "out" in seen:
                raise ValueError(f"layer {layer!r} is called more than once; CAM needs a single call")
            seen["out"] = out
        return out

    with taps.intercept_calls(on_call):
        out = model.apply(variables, x)
    if "out" not in seen:
        taps.check_layers(model, variables, x, [layer])  # raises the readable unknown-layer error
        raise ValueError(f"layer {layer!r} was not called in the forward pass")
    a_out = seen["out"]
    a = _grid(model, layer, a_out)
    _check_spatial(layer, a)
    leaves = [c for c in calls if c.leaf]

    def fail(why: str):
        listed = ", ".join(f"{c.name} ({type(c.module).__name__})" for c in leaves[:12])
        if len(leaves) > 12:
            listed += f", ... ({len(leaves)} layers)"
        dense = [c.name for c in leaves if isinstance(c.module, nn.Dense)]
        extra = f"; its head has {len(dense)} linear layers ({', '.join(dense)})" if len(dense) > 1 else ""
        raise NotApplicable(
            f"CAM (Zhou et al. 2016) is defined only when the CAM layer's output goes through global average "
            f"pooling and a single linear layer that gives the model output; after layer {layer!r} "
            f"{type(model).__name__} calls: {listed or 'nothing'}{extra}. {why} "
            "Use 'grad-cam' (CAM's generalisation to any head) for this model, or pass the layer that feeds "
            "the global pool."
        )

    if not leaves:
        fail("No layer follows it.")
    pool = leaves[0]
    is_gap = getattr(pool.out, "ndim", 0) == 4 and pool.out.shape[1:3] == (1, 1)
    if not (isinstance(pool.module, L.AdaptiveAvgPool2d) and is_gap):
        fail(f"The first layer after it, {pool.name!r}, is not a global AdaptiveAvgPool2d(1).")
    if pool.arg is not a_out:
        fail(f"The global pool {pool.name!r} does not take the layer's output as its input.")
    if sum(isinstance(c.module, nn.Dense) for c in leaves) > 1:
        fail("There is more than one linear layer.")
    prev = pool
    for c in leaves[1:-1]:
        passthrough = isinstance(c.module, (L.Flatten, L.Identity)) or c.out is c.arg
        if not passthrough:
            fail(
                f"Layer {c.name!r} ({type(c.module).__name__}) between the pool and the linear layer "
                "is not a flatten or identity."
            )
        if c.arg is not prev.out:
            fail(f"Layer {c.name!r} does not take the previous layer's output.")
        prev = c
    fc = leaves[-1]
    if len(leaves) < 2 or not isinstance(fc.module, nn.Dense):
        fail("The last layer is not a single linear (Dense) layer.")
    if fc.arg is not prev.out or fc.out is not out:
        fail(f"The linear layer {fc.name!r} is not applied directly to the pooled features to give the output.")
    kernel = fc.kernel
    if kernel.ndim != 2 or kernel.shape[0] != a.shape[-1]:
        fail(f"The linear layer's kernel has shape {kernel.shape}, not ({a.shape[-1]}, K).")
    return a, kernel, out


@dataclasses.dataclass(frozen=True)
class CAM(CamMethod):
    """Class activation map (Zhou et al. 2016): ``sum_c W[c, target] A_c`` upsampled.

    Defined only for global-average-pooling + single-linear heads (see the module docstring);
    other heads raise a ``ValueError``.

    Attributes:
      layer: dotted name of the layer feeding the global pool (``None``:
        :func:`default_cam_layer`).
      relu: apply a ReLU to the map (default False: the raw map, as in the authors' code).
    """

    layer: str | None = None
    relu: bool = False

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, C) ``W[c, target] A_c`` (the layer map, no ReLU, is their channel sum)."""
        a, kernel, out = gap_linear_head(model, variables, x, _layer_name(model, self.layer))
        seed = as_seed(target, out.shape[-1], out.shape[0], a.dtype)
        w = jnp.matmul(seed, kernel.astype(a.dtype).T, precision=jax.lax.Precision.HIGHEST)  # (N, C)
        return a * w[:, None, None, :]

    def _map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        cam = self._layer_map(model, variables, x, target)
        if self.relu:
            cam = jax.nn.relu(cam)
        return upsample_bilinear(cam, x.shape[1:3])


# --------------------------------------------------------------------------------------
# XGrad-CAM (Fu et al. 2020)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XGradCAM(CamMethod):
    """XGrad-CAM: ``relu(sum_c w_c A_c)``, ``w_c = sum_ij A_ijc g_ijc / sum_ij A_ijc``.

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      eps: added to ``sum_ij A_ijc`` (default 0; a zero sum gives weight 0).
    """

    layer: str | None = None
    eps: float = 0.0

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, C) ``w_c A_c``."""
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        denom = a.sum(axis=(1, 2), keepdims=True) + jnp.asarray(self.eps, a.dtype)
        w = imageops.safe_divide((a * g).sum(axis=(1, 2), keepdims=True), denom)
        return w * a


# --------------------------------------------------------------------------------------
# Layer-CAM (Jiang et al. 2021)
# --------------------------------------------------------------------------------------

_FUSE = ("max", "mean")


def _layercam_map(a: jax.Array, g: jax.Array) -> jax.Array:
    """(N, h, w) ``relu(sum_c relu(g) * A)``."""
    return jax.nn.relu((jax.nn.relu(g) * a).sum(-1))


def layercam_scale(m: jax.Array, gamma: float) -> jax.Array:
    """Eq. 9 of the Layer-CAM paper per sample: ``tanh(gamma * m / max(m))`` (0 where max <= 0)."""
    top = m.max(axis=(1, 2), keepdims=True)
    return jnp.where(top > 0, jnp.tanh(gamma * m / jnp.where(top > 0, top, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class LayerCAM(CamMethod):
    """Layer-CAM, single layer or fused over several layers (see the module docstring).

    Attributes:
      layer: a dotted layer name, ``None`` (:func:`default_cam_layer`), or
        a tuple of names (fused map in [0, 1)).
      gamma: scale of the ``tanh`` of the multi-layer fusion (paper: 2).
      fuse: ``"max"`` (element-wise maximum, default) or ``"mean"`` of the scaled maps.
    """

    layer: str | tuple[str, ...] | None = None
    gamma: float = 2.0
    fuse: str = "max"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer, list):
            object.__setattr__(self, "layer", tuple(self.layer))
        if isinstance(self.layer, tuple) and self.eigen_smooth:
            raise ValueError("eigen_smooth is defined for a single Layer-CAM layer, not for a fused multi-layer map")
        if isinstance(self.layer, tuple):
            if not self.layer:
                raise ValueError("layer must name at least one layer")
            if len(set(self.layer)) != len(self.layer):
                raise ValueError(f"layer names must be distinct; got {list(self.layer)}")
        if self.fuse not in _FUSE:
            raise ValueError(f"unknown Layer-CAM fusion {self.fuse!r}; use one of {', '.join(_FUSE)}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive; got {self.gamma}")

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """One layer: (N, h, w, C) ``relu(g) A``."""
        if isinstance(self.layer, tuple):
            raise ValueError("a fused multi-layer Layer-CAM has no weighted activations of one layer")
        a, g, _ = _one_layer(model, variables, x, target, self.layer)
        return jax.nn.relu(g) * a

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """One layer: (N, h, w) ``sum_c relu(g) A`` before the ReLU; several: the fused map (N, H, W)."""
        if self.layer is None or isinstance(self.layer, str):
            return super()._layer_map(model, variables, x, target)
        size = x.shape[1:3]
        names = list(self.layer)
        acts, grads, _ = _spatial_layers(model, variables, x, target, names)
        maps = []
        for k in names:
            m = layercam_scale(_layercam_map(acts[k], grads[k]), self.gamma)
            maps.append(upsample_bilinear(m, size))
        stacked = jnp.stack(maps)
        return stacked.max(0) if self.fuse == "max" else stacked.mean(0)


# --------------------------------------------------------------------------------------
# Score-CAM (Wang et al. 2020)
# --------------------------------------------------------------------------------------

_BASELINES = ("none", "zero")


def target_probability(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, seed: jax.Array) -> jax.Array:
    """``sum_k seed_k softmax(model(x))_k`` per sample: (N,) for ``x`` (N, H, W, C), ``seed`` (N, K)."""
    p = jax.nn.softmax(model.apply(variables, x), axis=-1)
    return (p * seed.astype(p.dtype)).sum(-1)


@dataclasses.dataclass(frozen=True)
class ScoreCAM(CamMethod):
    """Score-CAM (see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      chunk_size: channels scored per batched forward pass (memory ~ ``N * chunk_size`` images).
      baseline: ``"none"`` (authors' code: weight = softmax probability of the masked input)
        or ``"zero"`` (minus the probability of the zero input, the paper's ``f(X_b)``).
    """

    layer: str | None = None
    chunk_size: int = 32
    baseline: str = "none"

    def __post_init__(self):
        super().__post_init__()
        validate_positive_int("score-cam", "chunk_size", self.chunk_size)
        if self.baseline not in _BASELINES:
            raise ValueError(f"unknown Score-CAM baseline {self.baseline!r}; use one of {', '.join(_BASELINES)}")

    def channel_weights(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> tuple[jax.Array, jax.Array]:
        """The CAM layer's activation ``A`` (N, h, w, C) and the channel weights ``w`` (N, C)."""
        check_inputs(x)
        name = _layer_name(model, self.layer)
        out, acts = taps.forward(model, variables, x, capture=[name])
        a = _grid(model, name, jax.lax.stop_gradient(acts[name]))
        _check_spatial(name, a)
        n, size, c = x.shape[0], x.shape[1:3], a.shape[-1]
        seed = as_seed(target, out.shape[-1], n, x.dtype)
        chunk = min(self.chunk_size, c)
        n_chunks = -(-c // chunk)
        ids = (jnp.arange(n_chunks * chunk) % c).reshape(n_chunks, chunk)  # padding repeats channels
        if self.baseline == "zero":
            base = target_probability(model, variables, jnp.zeros_like(x), seed)[:, None]  # (N, 1)
        else:
            base = jnp.zeros((n, 1), x.dtype)

        def score_chunk(idx: jax.Array) -> jax.Array:
            up = imageops.resize(jnp.take(a, idx, axis=-1), size)  # (N, H, W, chunk)
            const = up.max(axis=(1, 2), keepdims=True) <= up.min(axis=(1, 2), keepdims=True)
            per_channel = jnp.moveaxis(up, -1, 1).reshape((-1,) + tuple(size))  # (N * chunk, H, W)
            masks = imageops.minmax_normalize(per_channel).reshape((n, -1) + tuple(size)).astype(x.dtype)
            masked = x[:, None] * masks[..., None]  # (N, chunk, H, W, C_in)
            flat = masked.reshape((n * chunk,) + x.shape[1:])
            s = target_probability(model, variables, flat, jnp.repeat(seed, chunk, axis=0)).reshape(n, chunk)
            return jnp.where(const[:, 0, 0, :], 0.0, s - base)  # (N, chunk)

        scores = jax.lax.map(score_chunk, ids)  # (n_chunks, N, chunk)
        return a, jnp.moveaxis(scores, 0, 1).reshape(n, n_chunks * chunk)[:, :c]

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, C) ``w_c A_c`` at the layer's resolution."""
        a, w = self.channel_weights(model, variables, x, target)
        return a * w.astype(a.dtype)[:, None, None, :]

    def _map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """The ReLU comes after the upsampling, as in the reference."""
        return jax.nn.relu(upsample_bilinear(self._layer_map(model, variables, x, target), x.shape[1:3]))




# --------------------------------------------------------------------------------------
# NormGrad
# --------------------------------------------------------------------------------------

_VIRTUAL = ("conv1x1", "scaling", "conv3x3", "bias")


def _normgrad_layer_map(a: jax.Array, g: jax.Array, virtual: str) -> jax.Array:
    """(N, h, w) Frobenius norm of the virtual layer's per-location weight gradient."""
    gn = jnp.sqrt((g * g).sum(-1))
    if virtual == "conv1x1":
        return jnp.sqrt((a * a).sum(-1)) * gn
    if virtual == "scaling":
        ag = a * g
        return jnp.sqrt((ag * ag).sum(-1))
    if virtual == "conv3x3":
        sq = (a * a).sum(-1)
        patch = jax.lax.reduce_window(sq, 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)))
        return jnp.sqrt(patch) * gn
    return gn  # "bias"


@dataclasses.dataclass(frozen=True)
class NormGrad(CamMethod):
    """NormGrad (see the module docstring).

    Attributes:
      layer: a dotted layer name, a tuple of names (multi-layer: product of min-max
        normalised upsampled maps), or ``None`` (:func:`default_cam_layer`).
      virtual: ``"conv1x1"`` (default), ``"scaling"``, ``"conv3x3"`` or ``"bias"``.
    """

    layer: str | tuple[str, ...] | None = None
    virtual: str = "conv1x1"

    supports_eigen_smooth = False

    def __post_init__(self):
        super().__post_init__()
        if self.virtual not in _VIRTUAL:
            raise ValueError(f"unknown NormGrad virtual layer {self.virtual!r}; use one of {', '.join(_VIRTUAL)}")
        if isinstance(self.layer, list):
            object.__setattr__(self, "layer", tuple(self.layer))
        if isinstance(self.layer, tuple) and not self.layer:
            raise ValueError("layer must name at least one layer")

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """One layer: the (N, h, w) norm map at the layer's resolution; several: their product (N, H, W)."""
        size = x.shape[1:3]
        if self.layer is None or isinstance(self.layer, str):
            a, g, _ = _one_layer(model, variables, x, target, self.layer)
            return _normgrad_layer_map(a, g, self.virtual)
        names = list(self.layer)
        a, grads, _ = _spatial_layers(model, variables, x, target, names)
        result = None
        for k in names:
            m = imageops.minmax_normalize(upsample_bilinear(_normgrad_layer_map(a[k], grads[k], self.virtual), size))
            result = m if result is None else result * m
        return result



# --------------------------------------------------------------------------------------
# CAMERAS
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CAMERAS(CamMethod):
    """CAMERAS (see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      scales: input resize factors (``None``: :data:`CAMERAS_REFERENCE_SCALES`, the
        reference's 224..924 px for 224-px inputs). Sizes are ``round(H * s), round(W * s)``.
    """

    layer: str | None = None
    scales: tuple[float, ...] | None = None

    supports_eigen_smooth = False

    def __post_init__(self):
        super().__post_init__()
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
            if not self.scales or any(not s > 0 for s in self.scales):
                raise ValueError(f"scales must be a non-empty tuple of positive factors; got {self.scales}")

    def sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Input resolutions (H_r, W_r) used for an input of spatial size ``size``."""
        scales = CAMERAS_REFERENCE_SCALES if self.scales is None else self.scales
        return [(max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s)))) for s in scales]

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map in [0, 1] for ``x`` (N, H, W, C): CAMERAS accumulates at the input resolution."""
        name = _layer_name(model, self.layer)
        size = x.shape[1:3]
        sizes = self.sizes(size)
        fixed = fixed_input_size(model)
        if fixed is not None and any(hw != (fixed, fixed) for hw in sizes):
            raise NotApplicable(
                f"CAMERAS runs the model on the input resized to {sorted(set(sizes))}; {type(model).__name__} takes only "
                f"{fixed}x{fixed} inputs (its position embedding is made for one patch grid), and resizing back to "
                f"{fixed} px would give the same features at every scale. Use grad-cam or another CAM method"
            )
        mean_a = mean_g = None
        for hw in sizes:
            xr = imageops.resize(x, hw, "bicubic")
            a, g, _ = _one_layer(model, variables, xr, target, name)
            a = imageops.resize(a, size)
            g = imageops.resize(g, size)
            mean_a = a if mean_a is None else mean_a + a
            mean_g = g if mean_g is None else mean_g + g
        n = len(sizes)
        sal = jax.nn.relu(((mean_a / n) * (mean_g / n)).sum(-1))
        return imageops.minmax_normalize(sal)



register("grad-cam", GradCAM, "Grad-CAM (Selvaraju et al. 2017) at the model's default CAM layer")
register(
    "grad-cam-plus-plus",
    GradCAMPlusPlus,
    "Grad-CAM++ (Chattopadhay et al. 2018), exponential-output closed form as in pytorch-grad-cam",
)

register(
    "hirescam",
    HiResCAM,
    "HiResCAM (Draelos & Carin 2020): gradient times activation summed over channels, no gradient averaging",
)
register(
    "grad-cam-elementwise",
    GradCAMElementWise,
    "Element-wise Grad-CAM (pytorch-grad-cam): ReLU of gradient times activation, summed over channels",
)
register(
    "guided-grad-cam",
    GuidedGradCAM,
    "Guided Grad-CAM (Selvaraju et al. 2017): Guided Backprop times the upsampled Grad-CAM map",
)
register("cam", CAM, "CAM (Zhou et al. 2016): linear-layer weights on the features before global average pooling")
register("xgrad-cam", XGradCAM, "XGrad-CAM (Fu et al. 2020): axiom-based, activation-weighted gradient averages")
register(
    "layer-cam",
    LayerCAM,
    "Layer-CAM (Jiang et al. 2021): positive gradients times activations per location; multi-layer fusion",
)
register(
    "score-cam",
    ScoreCAM,
    "Score-CAM (Wang et al. 2020): channels weighted by the target probability of the channel-masked input",
)

register(
    "normgrad",
    NormGrad,
    "NormGrad (Rebuffi et al. 2020): norm of a virtual identity layer's per-location weight gradient",
)
register(
    "cameras",
    CAMERAS,
    "CAMERAS (Jalwana et al. 2021): activations and gradients accumulated over input resolutions",
)


def _ucag_grad_cam(layer: str | None = None, **options: Any) -> Ucag:
    return Ucag(GradCAM(layer), **options)


register(
    "ucag-grad-cam",
    _ucag_grad_cam,
    "UCAG (Hwang et al. 2023) over Grad-CAM: 6x6 zoomed patches, confidence-weighted, blurred",
)
