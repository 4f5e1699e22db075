"""UCAG — Unfold and Conquer Attribution Guidance (Hwang et al., AAAI 2023), as a combinator.

``ucag(method)`` explains an image with any attribution ``method`` on ``n x n`` overlapping
patches that are upsampled (a zoom-in), and averages the results (optionally together with
the whole-image map). For an image of size (H, W) and reference defaults for 224 px inputs:

1. Patches. Side ``P = int(patch * H / reference_size)`` (124 px at 224), stride
   ``stride`` (``None``: ``(H - P) // (n - 1)``, 20 px at 224; an explicit stride is
   given in reference pixels and scaled the same way), top-left corners ``i * stride`` for
   ``i < n`` on each axis, i.e. ``n * n`` patches (36). Height and width are scaled
   separately. The authors' code computes the stride as ``(H - P + 2) // (n - 1)``; that
   equals ours at 224 px but can push the last patch past the border at other sizes.
2. Zoom: each patch is resized to ``S = int(P * scale)`` (322 px for ``scale=2.6``) with
   bicubic interpolation in PyTorch's convention (``F.interpolate(mode="bicubic",
   align_corners=False)``, a = -0.75, clamped borders, no antialiasing): see
   :func:`xaijax.imageops.resize_matrix`. A model that takes one input size only (its
   ``image_size``, :func:`xaijax.checkpoints.input_size.fixed_input_size`: the vision transformers,
   whose position embedding is made for one patch grid) gets its patches resized to that
   size instead (a zoom of ``image_size / P``, e.g. 224 / 124 = 1.8 for 224-px ViTs), since
   it cannot take ``S``-px images.
3. Conquer: all ``N * n * n`` patches go through ``method`` in ONE call (a batch of
   patches; samples are independent, so this is a vmap over patches), each with its
   sample's target. ``chunk`` instead processes them in ``lax.map`` chunks. For a method
   with a layer map (``has_layer_map``: the CAM family) the patch maps are its *raw* maps
   at the layer's resolution (:meth:`~xaijax.methods.Method.layer_map`: Grad-CAM's
   ``sum_k w_k A_k`` before the ReLU), as in the authors' code; any other method gives its
   maps at the zoomed patch's resolution.
4. Confidence weights (``weighting="prob"``, the reference): ``s_k`` = softmax probability
   of the target on patch ``k`` (``sum(seed * softmax(out))`` for a seed target),
   ``w_k = exp(s_k) / max_j exp(s_j)`` over the sample's patches. ``"logit"`` uses the
   target logit for ``s_k``; ``"none"`` sets ``w_k = 1``.
5. Each patch map is resized directly to ``P`` with PyTorch-style bilinear interpolation (as
   the authors' code does), weighted and placed: every pixel gets
   ``sum_{k covering it} w_k M_k / (1 + count)``, exactly what the authors' released code
   computes (the default, ``include_global=False``). The paper's text suggests averaging
   with the whole-image map ``G``; ``include_global=True`` does that:
   ``(G + sum_k w_k M_k) / (1 + count)``, where ``G`` is the method's map of the whole
   image (for a layer-map method, its raw layer map resized bilinearly to (H, W)).
6. Post-processing of CAM maps (``postprocess="cam"``): ReLU, per-sample min-max
   normalisation to [0, 1] (a constant map becomes 0), Gaussian blur (5 x 5, sigma 3,
   reflect borders; kornia's ``gaussian_blur2d`` as in the reference). ``"auto"`` (the
   default) applies it when ``method`` declares ``kind == "cam"`` (every method of the CAM
   family: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, Score-CAM, CAM, NormGrad, CAMERAS);
   ``"none"`` never does.

Everything is computed in the input's dtype (a float64 run stays float64). Deliberate
differences from the authors' code: samples of a batch are explained independently, and a
constant map is normalised to 0 (the reference divides by zero).

Registered prefix: ``ucag:<name>`` (:func:`get_ucag`) builds UCAG over any registered method;
``ucag-grad-cam`` is registered by the CAM family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.methods import registry
from xaijax.checkpoints.input_size import fixed_input_size
from xaijax.methods._core import Method, Wrapper, check_inputs, class_indices, target_scores, validate_positive_int

__all__ = ["Ucag", "ucag", "get_ucag", "UcagGeometry"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class UcagGeometry:
    """Patch layout on one axis pair: patch side ``patch``, zoomed side ``zoom``, offsets."""

    patch: tuple[int, int]
    zoom: tuple[int, int]
    stride: tuple[int, int]
    offsets_h: tuple[int, ...]
    offsets_w: tuple[int, ...]

    def coverage(self, size: tuple[int, int]) -> np.ndarray:
        """(H, W) int array: number of patches covering each pixel."""
        rows = np.zeros(size[0], np.int64)
        cols = np.zeros(size[1], np.int64)
        for o in self.offsets_h:
            rows[o : o + self.patch[0]] += 1
        for o in self.offsets_w:
            cols[o : o + self.patch[1]] += 1
        return rows[:, None] * cols[None, :]


@dataclasses.dataclass(frozen=True)
class Ucag(Wrapper):
    """Unfold-and-conquer wrapper of ``method`` (see the module docstring for the formulas).

    Attributes:
      method: any attribution method ``method(model, variables, x, target) -> (N, H, W)``.
      n: patches per side (``n * n`` patches).
      patch: patch side in reference pixels (scaled by ``H / reference_size``).
      scale: zoom factor of each patch.
      stride: patch stride in reference pixels (``None``: ``(H - P) // (n - 1)``).
      reference_size: input side the ``patch``/``stride`` values refer to (224).
      weighting: ``"prob"`` | ``"logit"`` | ``"none"`` (confidence weights).
      include_global: add the whole-image map to the numerator (the paper's averaging;
        default False: the authors' released code).
      postprocess: ``"auto"`` | ``"cam"`` | ``"none"``.
      chunk: ``None`` (all patches in one call) or patches per ``lax.map`` chunk.
    """

    method: Method
    n: int = 6
    patch: int = 124
    scale: float = 2.6
    stride: int | None = None
    reference_size: int = 224
    weighting: str = "prob"
    include_global: bool = False
    postprocess: str = "auto"
    chunk: int | None = None

    def __post_init__(self) -> None:
        self._adopt_method("ucag")
        validate_positive_int("ucag", "n", self.n)
        validate_positive_int("ucag", "patch", self.patch)
        validate_positive_int("ucag", "reference_size", self.reference_size)
        validate_positive_int("ucag", "stride", self.stride, optional=True)
        if not float(self.scale) > 0:
            raise ValueError(f"ucag: scale must be positive, got {self.scale!r}")
        if self.weighting not in ("prob", "logit", "none"):
            raise ValueError(f"ucag: weighting must be 'prob', 'logit' or 'none', got {self.weighting!r}")
        if self.postprocess not in ("auto", "cam", "none"):
            raise ValueError(f"ucag: postprocess must be 'auto', 'cam' or 'none', got {self.postprocess!r}")
        validate_positive_int("ucag", "chunk", self.chunk, optional=True)

    # ---------------------------------------------------------------- geometry
    def geometry(self, size: tuple[int, int], input_size: int | None = None) -> UcagGeometry:
        """Patch sides, zoomed sides, strides and offsets for an (H, W) image.

        ``input_size``: the only input side the model takes (``None``: any; patches are zoomed by
        ``scale``); given, every patch is resized to ``input_size`` instead.
        """
        patch, zoom, stride, offsets = [], [], [], []
        for dim in (int(size[0]), int(size[1])):
            p = int(self.patch * dim / self.reference_size)
            if not 1 <= p <= dim:
                raise ValueError(
                    f"ucag: patch {self.patch} (of {self.reference_size} px) gives {p} px patches for a {dim} px image"
                )
            if self.stride is not None:
                st = max(1, int(self.stride * dim / self.reference_size))
            else:
                st = (dim - p) // (self.n - 1) if self.n > 1 else 0
            if (self.n - 1) * st + p > dim:
                raise ValueError(
                    f"ucag: {self.n} patches of {p} px with stride {st} do not fit in {dim} px; "
                    "lower n, patch or stride"
                )
            z = int(p * float(self.scale)) if input_size is None else int(input_size)
            if z < 1:
                raise ValueError(f"ucag: scale {self.scale} shrinks {p} px patches to nothing")
            patch.append(p)
            zoom.append(z)
            stride.append(st)
            offsets.append(tuple(i * st for i in range(self.n)))
        return UcagGeometry(tuple(patch), tuple(zoom), tuple(stride), offsets[0], offsets[1])

    def _crop_resize(self, dim: int, p: int, z: int, offsets: tuple[int, ...]) -> np.ndarray:
        """(n, z, dim): crop at each offset then bicubic resize p -> z, as one matrix per patch."""
        r = imageops.resize_matrix(p, z, "bicubic")
        m = np.zeros((len(offsets), z, dim))
        for i, o in enumerate(offsets):
            m[i, :, o : o + p] = r
        return m

    def _place(self, dim: int, p: int, z: int, offsets: tuple[int, ...]) -> np.ndarray:
        """(n, dim, z): bilinear resize of a z-pixel map to p, then place at each offset."""
        r = imageops.resize_matrix(z, p, "bilinear")
        m = np.zeros((len(offsets), dim, z))
        for i, o in enumerate(offsets):
            m[i, o : o + p, :] = r
        return m

    def patches(self, x: jax.Array, input_size: int | None = None) -> jax.Array:
        """Zoomed patches of ``x`` (N, H, W, C): (N, n*n, S_h, S_w, C), patch ``k = i * n + j``
        (``input_size``: see :meth:`geometry`)."""
        check_inputs(x)
        n_, h, w, c = x.shape
        g = self.geometry((h, w), input_size)
        ah = jnp.asarray(self._crop_resize(h, g.patch[0], g.zoom[0], g.offsets_h), x.dtype)
        aw = jnp.asarray(self._crop_resize(w, g.patch[1], g.zoom[1], g.offsets_w), x.dtype)
        p = jnp.einsum("iah,nhwc,jbw->nijabc", ah, x, aw, precision=_HI)
        return p.reshape((n_, self.n * self.n) + g.zoom + (c,))

    def _repeat_target(self, target: Any, batch: int) -> jax.Array:
        t = jnp.asarray(target)
        k = self.n * self.n
        if jnp.issubdtype(t.dtype, jnp.integer):
            return jnp.repeat(class_indices(t, batch, None), k)
        if t.ndim != 2 or t.shape[0] != batch:
            raise ValueError(f"a float target is a seed and must have shape ({batch}, num_classes); got {t.shape}")
        return jnp.repeat(t, k, axis=0)

    def patch_weights(self, model: nn.Module, variables: Mapping[str, Any], patches: jax.Array, target: Any) -> jax.Array:
        """Confidence weights (N, n*n) of zoomed ``patches`` (N, n*n, S_h, S_w, C).

        ``w_k = exp(s_k) / max_j exp(s_j)`` with ``s_k`` the target's softmax probability
        (``"prob"``) or logit (``"logit"``) on patch ``k``; ones for ``"none"``.
        """
        b, k = patches.shape[:2]
        if self.weighting == "none":
            return jnp.ones((b, k), patches.dtype)
        flat = patches.reshape((b * k,) + patches.shape[2:])
        t = self._repeat_target(target, b)
        out = self._map_patches(lambda xx, tt: model.apply(variables, xx), flat, t)
        if self.weighting == "prob":
            out = jax.nn.softmax(out, axis=-1)
        s = target_scores(out, t).reshape((b, k))
        return jnp.exp(s - s.max(axis=1, keepdims=True))

    def _map_patches(self, fn: Callable[[jax.Array, jax.Array], jax.Array], flat: jax.Array, t: jax.Array) -> jax.Array:
        """``fn`` over the flat patch batch: one call, or ``lax.map`` chunks of ``chunk`` patches."""
        if self.chunk is None or self.chunk >= flat.shape[0]:
            return fn(flat, t)
        return jax.lax.map(lambda a: fn(a[0][None], a[1][None])[0], (flat, t), batch_size=self.chunk)

    def _use_cam_postprocess(self) -> bool:
        if self.postprocess != "auto":
            return self.postprocess == "cam"
        return self.method.kind == "cam"

    # ---------------------------------------------------------------- the method
    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """UCAG map (N, H, W) for ``x`` (N, H, W, C)."""
        check_inputs(x)
        b, h, w, _ = x.shape
        fixed = fixed_input_size(model)
        g = self.geometry((h, w), fixed)
        k = self.n * self.n
        patches = self.patches(x, fixed)  # (B, k, S_h, S_w, C)
        flat = patches.reshape((b * k,) + patches.shape[2:])
        t = self._repeat_target(target, b)
        explain = self.method.layer_map if self.method.has_layer_map else self.method
        maps = self._map_patches(lambda xx, tt: explain(model, variables, xx, tt), flat, t)
        if maps.ndim != 3 or maps.shape[0] != b * k or (not self.method.has_layer_map and maps.shape[1:] != g.zoom):
            raise ValueError(f"ucag: the base method returned maps of shape {maps.shape}, expected {(b * k,) + g.zoom}")
        src = tuple(maps.shape[1:])
        dtype = x.dtype
        maps = maps.reshape((b, self.n, self.n) + src).astype(dtype)
        wts = self.patch_weights(model, variables, patches, target).reshape((b, self.n, self.n)).astype(dtype)
        lh = jnp.asarray(self._place(h, g.patch[0], src[0], g.offsets_h), dtype)
        lw = jnp.asarray(self._place(w, g.patch[1], src[1], g.offsets_w), dtype)
        canvas = jnp.einsum("iha,nijab,jwb,nij->nhw", lh, maps, lw, wts, precision=_HI)
        count = jnp.asarray(g.coverage((h, w)), dtype)
        if self.include_global:
            whole = explain(model, variables, x, target)
            canvas = canvas + imageops.resize(whole, (h, w)).astype(dtype)
        out = canvas / (1.0 + count)
        if self._use_cam_postprocess():
            out = imageops.gaussian_blur(imageops.minmax_normalize(jax.nn.relu(out)), 5, 3.0)
        return out


_UCAG_FIELDS = tuple(f.name for f in dataclasses.fields(Ucag) if f.name != "method")


def ucag(method: Method, **options: Any) -> Ucag:
    """Wrap ``method`` in unfold-and-conquer; ``options`` are :class:`Ucag`'s fields (n, patch, scale, ...)."""
    return Ucag(method, **options)


def get_ucag(name: str, **hparams: Any) -> Ucag:
    """UCAG over the registered method ``name`` (the ``ucag:<name>`` lookup).

    Keyword arguments prefixed ``ucag_`` configure the wrapper (``ucag_n=4``,
    ``ucag_weighting="none"``, ...); all others are hyperparameters of the base method,
    built with :func:`xaijax.methods.registry.get`.
    """
    return registry.get_wrapped("ucag", Ucag, _UCAG_FIELDS, name, hparams)


registry.register_prefix("ucag", get_ucag, "UCAG (Hwang et al. 2023): zoomed patches, confidence-weighted")
