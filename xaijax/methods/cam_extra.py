"""More gradient-and-activation saliency methods: FullGrad, NormGrad and CAMERAS.

All three follow the xaijax convention ``method(model, variables, x, target) -> (N, H, W)``
(see :mod:`xaijax.methods.base`): ``x`` is a normalised NHWC float batch, ``target`` class
indices or an (N, K) seed, and the score is ``S = sum(seed * model(x))`` per sample.
Gradients with respect to intermediate layer outputs are gradients with respect to a zero
array *added* to that output (no hooks), taken for all layers in one backward pass.

* ``fullgrad`` (Srinivas & Fleuret, NeurIPS 2019; reference ``idiap/fullgrad-saliency``).
  For a piecewise-linear network (ReLU, max/avg pooling, conv, dense, eval-mode BatchNorm,
  residual adds) the *full-gradient decomposition* is exact::

      S(x) = sum(dS/dx * x) + sum_l sum(dS/dz_l * b_l)

  where ``z_l`` is the output of every layer ``l`` with a bias ``b_l`` (broadcast over
  the output's channel axis). Biased layers are ``nn.Conv``/``nn.Dense`` with ``use_bias``
  and every ``nn.BatchNorm``, whose *effective* bias (as in the reference) is
  ``beta - running_mean * gamma / sqrt(running_var + eps)``: an eval-mode BatchNorm is
  ``y = a x + c`` per channel, and ``c`` is its bias. A bias of a convolution feeding a
  BatchNorm is counted at the convolution (its gradient already carries the BN scale), so
  the result is the same as the BN-folded network's. :func:`fullgrad_decompose` returns
  the raw terms. The saliency map follows the reference: each term ``t`` (the input term
  ``dS/dx * x`` and the bias term of every *spatial* layer; dense layers only enter the
  decomposition) is post-processed by ``psi(t) = |t| - min|t|`` divided by
  ``max(|t| - min|t|) + 1e-6`` (min and max over all of one sample's positions and
  channels), summed over channels, bilinearly resized to the input size with
  **align_corners=True** (as the reference does), and the maps are summed.

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
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods.base import as_seed, check_inputs
from xaijax.methods.cam import activation_and_gradient, default_cam_layer, upsample_bilinear
from xaijax.methods.registry import register
from xaijax.models import taps
from xaijax.propagation.canonizers import batchnorm_affine

__all__ = [
    "fullgrad_decompose",
    "FullGrad",
    "NormGrad",
    "CAMERAS",
    "resize_bicubic",
    "upsample_bilinear_align_corners",
    "CAMERAS_REFERENCE_SCALES",
]

_HIGHEST = jax.lax.Precision.HIGHEST

#: Scale factors of the reference CAMERAS resolutions 224, 324, ..., 924 for a 224-px input.
CAMERAS_REFERENCE_SCALES: tuple[float, ...] = tuple(r / 224 for r in range(224, 1000, 100))


# --------------------------------------------------------------------------------------
# resizing (separable interpolation matrices, PyTorch semantics)
# --------------------------------------------------------------------------------------


def _linear_matrix_align_corners(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of ``F.interpolate(mode="bilinear", align_corners=True)`` along one axis."""
    i = np.arange(n_out, dtype=np.float64)
    src = np.zeros(n_out) if n_out == 1 else i * (n_in - 1) / (n_out - 1)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def _cubic_weight(d: np.ndarray, a: float) -> np.ndarray:
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis."""
    i = np.arange(n_out, dtype=np.float64)
    src = (i + 0.5) * (n_in / n_out) - 0.5  # torch does not clamp the source index for cubic
    f = np.floor(src)
    t = src - f
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        idx = np.clip(f + k, 0, n_in - 1).astype(np.int64)
        np.add.at(m, (np.arange(n_out), idx), _cubic_weight(t - k, a))
    return m


def _apply_separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """Apply (H, h) and (W, w) matrices to the spatial axes 1, 2 of (N, h, w[, C])."""
    mh = jnp.asarray(mh, x.dtype)
    mw = jnp.asarray(mw, x.dtype)
    if x.ndim == 3:
        return jnp.einsum("Hh,nhw,Ww->nHW", mh, x, mw, precision=_HIGHEST)
    return jnp.einsum("Hh,nhwc,Ww->nHWc", mh, x, mw, precision=_HIGHEST)


def upsample_bilinear_align_corners(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (N, h, w) maps to (N, H, W) like ``F.interpolate(..., "bilinear", align_corners=True)``."""
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, h, w); got {maps.shape}")
    h, w = maps.shape[1:]
    H, W = int(size[0]), int(size[1])
    return _apply_separable(maps, _linear_matrix_align_corners(h, H), _linear_matrix_align_corners(w, W))


def resize_bicubic(x: jax.Array, size: tuple[int, int], a: float = -0.75) -> jax.Array:
    """Resize an NHWC batch (or (N, h, w) maps) like ``F.interpolate(..., "bicubic", align_corners=False)``.

    Keys cubic convolution with PyTorch's ``a = -0.75``, half-pixel centres, edge pixels
    replicated, no antialiasing.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"x must have shape (N, h, w, C) or (N, h, w); got {x.shape}")
    h, w = x.shape[1:3]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return x
    return _apply_separable(x, _cubic_matrix(h, H, a), _cubic_matrix(w, W, a))


def _resize_features_bilinear(a: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w, K) -> (N, H, W, K), bilinear, ``align_corners=False`` (as :func:`upsample_bilinear`)."""
    H, W = int(size[0]), int(size[1])
    if a.shape[1:3] == (H, W):
        return a
    return jax.image.resize(a, (a.shape[0], H, W, a.shape[3]), method="linear", antialias=False)


def _minmax(maps: jax.Array) -> jax.Array:
    """Per-sample min-max normalisation of (N, ...) to [0, 1]; constant maps become 0."""
    axes = tuple(range(1, maps.ndim))
    m = maps - maps.min(axis=axes, keepdims=True)
    top = m.max(axis=axes, keepdims=True)
    return jnp.where(top > 0, m / jnp.where(top > 0, top, 1.0), 0.0)


# --------------------------------------------------------------------------------------
# FullGrad
# --------------------------------------------------------------------------------------

_BIASED = (nn.Conv, nn.Dense, nn.BatchNorm)


def _effective_bias(module: nn.Module, name: str, kwargs: Mapping[str, Any]) -> jax.Array | None:
    """Bias ``b`` of a conv/dense layer, or ``c`` of an eval BatchNorm ``y = a x + c``; None if none."""
    if isinstance(module, nn.BatchNorm):
        ura = kwargs.get("use_running_average", None)
        ura = module.use_running_average if ura is None else ura
        if not ura:
            raise ValueError(
                f"BatchNorm layer {name!r} is in training mode; FullGrad needs an eval-mode model "
                "(build it with train=False) so that BatchNorm is affine with an effective bias"
            )
        axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
        if axis not in (-1, (-1,)):
            raise ValueError(f"BatchNorm layer {name!r} normalises axis {axis}; only the channel axis is supported")
        _, c = batchnorm_affine(module, module.variables)
        return c
    if getattr(module, "use_bias", False):
        return module.variables["params"]["bias"]
    return None


def _forward_biased(model, variables, x, deltas: Mapping[str, jax.Array] | None):
    """Forward pass that records every biased layer's output shape and effective bias.

    If ``deltas`` is given, ``deltas[name]`` is added to that layer's output. Nested calls of
    the same module (a subclass calling ``super().__call__``, as xaijax's BatchNorm does)
    are counted once, at the outermost call.

    Returns:
      ``(out, {name: (output, bias)})`` in call order.
    """
    records: dict[str, tuple[jax.Array, jax.Array]] = {}
    active: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, _BIASED):
            return next_fun(*args, **kwargs)
        name = taps.module_name(mod)
        if name in active:
            return next_fun(*args, **kwargs)
        bias = _effective_bias(mod, name, kwargs)  # before the call: a train-mode BN fails here
        active.add(name)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(name)
        if bias is None:
            return out
        if name in records:
            raise ValueError(f"layer {name!r} is called more than once; FullGrad cannot attribute its bias")
        if deltas is not None:
            out = out + deltas[name]
        records[name] = (out, bias)
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x)
    return out, records


def fullgrad_decompose(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Full-gradient decomposition of the score ``S = sum(seed * model(x))`` (one backward pass).

    Args:
      x: NHWC batch (N, H, W, C).
      target: int / int (N,) class indices or an (N, K) seed.

    Returns:
      ``(input_term, bias_terms, out)``: ``input_term = dS/dx * x`` (N, H, W, C);
      ``bias_terms[name] = dS/dz * b`` with the layer output's shape (N, h, w, K) or (N, K),
      for every layer with a (effective) bias (a dict: JAX sorts its keys when it crosses
      ``jit``); ``out`` the model output
      (N, K). For piecewise-linear networks ``sum(input_term[n]) + sum_l sum(bias_terms[l][n])
      == S[n]`` (completeness).
    """
    check_inputs(x)
    _, shapes = jax.eval_shape(lambda xx: _forward_biased(model, variables, xx, None), x)
    zeros = {k: jnp.zeros(o.shape, o.dtype) for k, (o, _) in shapes.items()}

    def score(xx, deltas):
        out, rec = _forward_biased(model, variables, xx, deltas)
        seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
        return (out * seed).sum(), (out, {k: b for k, (_, b) in rec.items()})

    (gx, gz), (out, biases) = jax.grad(score, argnums=(0, 1), has_aux=True)(x, zeros)
    bias_terms = {k: gz[k] * biases[k].astype(gz[k].dtype) for k in shapes}
    return gx * x, bias_terms, out


def _fullgrad_postprocess(t: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``|t|`` shifted to min 0 and divided by (max + eps), per sample (the reference's ``_postProcess``)."""
    axes = tuple(range(1, t.ndim))
    t = jnp.abs(t)
    t = t - t.min(axis=axes, keepdims=True)
    return t / (t.max(axis=axes, keepdims=True) + eps)


@dataclasses.dataclass(frozen=True)
class FullGrad:
    """FullGrad saliency (see the module docstring).

    Attributes:
      eps: added to the maximum in the per-term normalisation (reference: 1e-6).
    """

    eps: float = 1e-6

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        input_term, bias_terms, _ = fullgrad_decompose(model, variables, x, target)
        size = x.shape[1:3]
        cam = _fullgrad_postprocess(input_term, self.eps).sum(-1)
        for t in bias_terms.values():
            if t.ndim == 4:
                cam = cam + upsample_bilinear_align_corners(_fullgrad_postprocess(t, self.eps).sum(-1), size)
        return cam


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
class NormGrad:
    """NormGrad (see the module docstring).

    Attributes:
      layer: a dotted layer name, a tuple of names (multi-layer: product of min-max
        normalised upsampled maps), or ``None`` (:func:`default_cam_layer`).
      virtual: ``"conv1x1"`` (default), ``"scaling"``, ``"conv3x3"`` or ``"bias"``.
    """

    layer: str | tuple[str, ...] | None = None
    virtual: str = "conv1x1"

    def __post_init__(self):
        if self.virtual not in _VIRTUAL:
            raise ValueError(f"unknown NormGrad virtual layer {self.virtual!r}; use one of {', '.join(_VIRTUAL)}")
        if isinstance(self.layer, list):
            object.__setattr__(self, "layer", tuple(self.layer))
        if isinstance(self.layer, tuple) and not self.layer:
            raise ValueError("layer must name at least one layer")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        check_inputs(x)
        size = x.shape[1:3]
        if self.layer is None or isinstance(self.layer, str):
            name = default_cam_layer(model) if self.layer is None else self.layer
            a, g, _ = activation_and_gradient(model, variables, x, target, name)
            _check_spatial(name, a)
            return upsample_bilinear(_normgrad_layer_map(a, g, self.virtual), size)
        names = list(self.layer)
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be distinct; got {names}")
        _, acts = jax.eval_shape(lambda xx: taps.forward(model, variables, xx, capture=names), x)

        def score(deltas):
            out, a = taps.forward(model, variables, x, capture=names, add=deltas)
            seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
            return (out * seed).sum(), a

        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in acts.items()}
        grads, a = jax.grad(score, has_aux=True)(zeros)
        result = None
        for k in names:
            _check_spatial(k, a[k])
            m = _minmax(upsample_bilinear(_normgrad_layer_map(a[k], grads[k], self.virtual), size))
            result = m if result is None else result * m
        return result


def _check_spatial(name: str, a: jax.Array) -> None:
    if a.ndim != 4:
        raise ValueError(f"layer {name!r} must output an NHWC feature map (N, h, w, K); its output has shape {a.shape}")


# --------------------------------------------------------------------------------------
# CAMERAS
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CAMERAS:
    """CAMERAS (see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`default_cam_layer`).
      scales: input resize factors (``None``: :data:`CAMERAS_REFERENCE_SCALES`, the
        reference's 224..924 px for 224-px inputs). Sizes are ``round(H * s), round(W * s)``.
    """

    layer: str | None = None
    scales: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
            if not self.scales or any(not s > 0 for s in self.scales):
                raise ValueError(f"scales must be a non-empty tuple of positive factors; got {self.scales}")

    def sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Input resolutions (H_r, W_r) used for an input of spatial size ``size``."""
        scales = CAMERAS_REFERENCE_SCALES if self.scales is None else self.scales
        return [(max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s)))) for s in scales]

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map in [0, 1] for ``x`` (N, H, W, C)."""
        check_inputs(x)
        name = default_cam_layer(model) if self.layer is None else self.layer
        size = x.shape[1:3]
        sizes = self.sizes(size)
        mean_a = mean_g = None
        for hw in sizes:
            xr = resize_bicubic(x, hw)
            a, g, _ = activation_and_gradient(model, variables, xr, target, name)
            _check_spatial(name, a)
            a = _resize_features_bilinear(a, size)
            g = _resize_features_bilinear(g, size)
            mean_a = a if mean_a is None else mean_a + a
            mean_g = g if mean_g is None else mean_g + g
        n = len(sizes)
        sal = jax.nn.relu(((mean_a / n) * (mean_g / n)).sum(-1))
        return _minmax(sal)


register("fullgrad", FullGrad, "FullGrad (Srinivas & Fleuret 2019): input-gradient x input plus all bias-gradients")
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
