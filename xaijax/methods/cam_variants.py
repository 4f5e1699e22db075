"""More class-activation-map methods: CAM, XGrad-CAM, Layer-CAM and Score-CAM.

All follow the xaijax convention ``method(model, variables, x, target) -> (N, H, W)`` (see
:mod:`xaijax.methods.base`): ``x`` is a normalised NHWC float batch, ``target`` class
indices (int or int (N,)) or an (N, K) seed, and the score is ``S = sum(seed * model(x))``
per sample. ``A`` (N, h, w, C) is the activation of the CAM layer (a dotted layer name;
``layer=None`` picks :func:`xaijax.methods.cam.default_cam_layer`: VGG's last ReLU,
ResNet ``layer4``, DenseNet ``relu``, Inception ``Mixed_7c``), ``g = dS/dA`` its gradient
(one backward pass, no hooks: :func:`xaijax.methods.cam.activation_and_gradient`). Maps
are upsampled to the input size with :func:`xaijax.methods.cam.upsample_bilinear`
(PyTorch's ``bilinear``, ``align_corners=False``) and, like Grad-CAM in xaijax, are *not*
min-max normalised at the end (metrics normalise when they need to).

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods.base import as_seed, check_inputs
from xaijax.methods.cam import activation_and_gradient, default_cam_layer, upsample_bilinear
from xaijax.methods.registry import register
from xaijax.models import layers as L
from xaijax.models import taps

__all__ = ["CAM", "XGradCAM", "LayerCAM", "ScoreCAM", "gap_linear_head"]


def _check_spatial(name: str, a: jax.Array) -> None:
    if a.ndim != 4:
        raise ValueError(
            f"CAM layer {name!r} must output an NHWC feature map (N, h, w, C); its output has shape {a.shape}"
        )


def _layer_name(model: nn.Module, layer: str | None) -> str:
    return default_cam_layer(model) if layer is None else layer


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
      ValueError: unknown layer (with suggestions), or a head that is not
        global-average-pooling + one linear layer.
    """
    check_inputs(x)
    seen: dict[str, Any] = {}
    calls: list[_Call] = []
    stack: list[_Call | None] = []
    active: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = taps.module_name(context.module)
        if name in active:  # a subclass calling super().__call__: same module
            return next_fun(*args, **kwargs)
        rec = None
        if "out" in seen:
            rec = _Call(name, context.module, args[0] if args else None)
            calls.append(rec)
            for parent in stack:
                if parent is not None:
                    parent.leaf = False
        stack.append(rec)
        active.add(name)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(name)
            stack.pop()
        if rec is not None:
            rec.out = out
            if isinstance(context.module, nn.Dense):
                rec.kernel = context.module.variables["params"]["kernel"]
        if name == layer:
            if "out" in seen:
                raise ValueError(f"layer {layer!r} is called more than once; CAM needs a single call")
            seen["out"] = out
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x)
    if "out" not in seen:
        taps.check_layers(model, variables, x, [layer])  # raises the readable unknown-layer error
        raise ValueError(f"layer {layer!r} was not called in the forward pass")
    a = seen["out"]
    _check_spatial(layer, a)
    leaves = [c for c in calls if c.leaf]

    def fail(why: str):
        listed = ", ".join(f"{c.name} ({type(c.module).__name__})" for c in leaves[:12])
        if len(leaves) > 12:
            listed += f", ... ({len(leaves)} layers)"
        dense = [c.name for c in leaves if isinstance(c.module, nn.Dense)]
        extra = f"; its head has {len(dense)} linear layers ({', '.join(dense)})" if len(dense) > 1 else ""
        raise ValueError(
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
    if pool.arg is not a:
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
class CAM:
    """Class activation map (Zhou et al. 2016): ``sum_c W[c, target] A_c`` upsampled.

    Defined only for global-average-pooling + single-linear heads (see the module docstring);
    other heads raise a ``ValueError``.

    Attributes:
      layer: dotted name of the layer feeding the global pool (``None``:
        :func:`~xaijax.methods.cam.default_cam_layer`).
      relu: apply a ReLU to the map (default False: the raw map, as in the authors' code).
    """

    layer: str | None = None
    relu: bool = False

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        name = _layer_name(model, self.layer)
        a, kernel, out = gap_linear_head(model, variables, x, name)
        seed = as_seed(target, out.shape[-1], out.shape[0], a.dtype)
        w = seed @ kernel.astype(a.dtype).T  # (N, C)
        cam = jnp.einsum("nhwc,nc->nhw", a, w, precision=jax.lax.Precision.HIGHEST)
        if self.relu:
            cam = jax.nn.relu(cam)
        return upsample_bilinear(cam, x.shape[1:3])


# --------------------------------------------------------------------------------------
# XGrad-CAM (Fu et al. 2020)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XGradCAM:
    """XGrad-CAM: ``relu(sum_c w_c A_c)``, ``w_c = sum_ij A_ijc g_ijc / sum_ij A_ijc``.

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
      eps: added to ``sum_ij A_ijc`` (default 0; a zero sum gives weight 0).
    """

    layer: str | None = None
    eps: float = 0.0

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        name = _layer_name(model, self.layer)
        a, g, _ = activation_and_gradient(model, variables, x, target, name)
        _check_spatial(name, a)
        denom = a.sum(axis=(1, 2), keepdims=True) + jnp.asarray(self.eps, a.dtype)
        ok = denom != 0
        w = jnp.where(ok, (a * g).sum(axis=(1, 2), keepdims=True) / jnp.where(ok, denom, 1.0), 0.0)
        cam = jax.nn.relu((w * a).sum(-1))
        return upsample_bilinear(cam, x.shape[1:3])


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
class LayerCAM:
    """Layer-CAM, single layer or fused over several layers (see the module docstring).

    Attributes:
      layer: a dotted layer name, ``None`` (:func:`~xaijax.methods.cam.default_cam_layer`), or
        a tuple of names (fused map in [0, 1)).
      gamma: scale of the ``tanh`` of the multi-layer fusion (paper: 2).
      fuse: ``"max"`` (element-wise maximum, default) or ``"mean"`` of the scaled maps.
    """

    layer: str | tuple[str, ...] | None = None
    gamma: float = 2.0
    fuse: str = "max"

    def __post_init__(self):
        if isinstance(self.layer, list):
            object.__setattr__(self, "layer", tuple(self.layer))
        if isinstance(self.layer, tuple):
            if not self.layer:
                raise ValueError("layer must name at least one layer")
            if len(set(self.layer)) != len(self.layer):
                raise ValueError(f"layer names must be distinct; got {list(self.layer)}")
        if self.fuse not in _FUSE:
            raise ValueError(f"unknown Layer-CAM fusion {self.fuse!r}; use one of {', '.join(_FUSE)}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive; got {self.gamma}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        check_inputs(x)
        size = x.shape[1:3]
        if self.layer is None or isinstance(self.layer, str):
            name = _layer_name(model, self.layer)
            a, g, _ = activation_and_gradient(model, variables, x, target, name)
            _check_spatial(name, a)
            return upsample_bilinear(_layercam_map(a, g), size)
        names = list(self.layer)
        _, shapes = jax.eval_shape(lambda xx: taps.forward(model, variables, xx, capture=names), x)

        def score(deltas):
            out, acts = taps.forward(model, variables, x, capture=names, add=deltas)
            seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
            return (out * seed).sum(), acts

        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        grads, acts = jax.grad(score, has_aux=True)(zeros)
        maps = []
        for k in names:
            _check_spatial(k, acts[k])
            m = layercam_scale(_layercam_map(acts[k], grads[k]), self.gamma)
            maps.append(upsample_bilinear(m, size))
        stacked = jnp.stack(maps)
        return stacked.max(0) if self.fuse == "max" else stacked.mean(0)


# --------------------------------------------------------------------------------------
# Score-CAM (Wang et al. 2020)
# --------------------------------------------------------------------------------------

_BASELINES = ("none", "zero")


def _resize_channels(a: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w, c) -> (N, H, W, c), bilinear, ``align_corners=False`` (as :func:`upsample_bilinear`)."""
    H, W = int(size[0]), int(size[1])
    if a.shape[1:3] == (H, W):
        return a
    return jax.image.resize(a, (a.shape[0], H, W, a.shape[3]), method="linear", antialias=False)


def target_probability(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, seed: jax.Array) -> jax.Array:
    """``sum_k seed_k softmax(model(x))_k`` per sample: (N,) for ``x`` (N, H, W, C), ``seed`` (N, K)."""
    p = jax.nn.softmax(model.apply(variables, x), axis=-1)
    return (p * seed.astype(p.dtype)).sum(-1)


@dataclasses.dataclass(frozen=True)
class ScoreCAM:
    """Score-CAM (see the module docstring).

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
      chunk_size: channels scored per batched forward pass (memory ~ ``N * chunk_size`` images).
      baseline: ``"none"`` (authors' code: weight = softmax probability of the masked input)
        or ``"zero"`` (minus the probability of the zero input, the paper's ``f(X_b)``).
    """

    layer: str | None = None
    chunk_size: int = 32
    baseline: str = "none"

    def __post_init__(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {self.chunk_size!r}")
        if self.baseline not in _BASELINES:
            raise ValueError(f"unknown Score-CAM baseline {self.baseline!r}; use one of {', '.join(_BASELINES)}")

    def channel_weights(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> tuple[jax.Array, jax.Array]:
        """The CAM layer's activation ``A`` (N, h, w, C) and the channel weights ``w`` (N, C)."""
        check_inputs(x)
        name = _layer_name(model, self.layer)
        out, acts = taps.forward(model, variables, x, capture=[name])
        a = jax.lax.stop_gradient(acts[name])
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
            up = _resize_channels(jnp.take(a, idx, axis=-1), size)  # (N, H, W, chunk)
            lo = up.min(axis=(1, 2), keepdims=True)
            span = up.max(axis=(1, 2), keepdims=True) - lo
            const = span <= 0
            masks = jnp.where(const, 0.0, (up - lo) / jnp.where(const, 1.0, span)).astype(x.dtype)
            masked = x[:, None] * jnp.moveaxis(masks, -1, 1)[..., None]  # (N, chunk, H, W, C_in)
            flat = masked.reshape((n * chunk,) + x.shape[1:])
            s = target_probability(model, variables, flat, jnp.repeat(seed, chunk, axis=0)).reshape(n, chunk)
            return jnp.where(const[:, 0, 0, :], 0.0, s - base)  # (N, chunk)

        scores = jax.lax.map(score_chunk, ids)  # (n_chunks, N, chunk)
        return a, jnp.moveaxis(scores, 0, 1).reshape(n, n_chunks * chunk)[:, :c]

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        a, w = self.channel_weights(model, variables, x, target)
        cam = jnp.einsum("nhwc,nc->nhw", a, w.astype(a.dtype), precision=jax.lax.Precision.HIGHEST)
        return jax.nn.relu(upsample_bilinear(cam, x.shape[1:3]))



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
