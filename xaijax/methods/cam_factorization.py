"""CAMs from factorised activations: Eigen-CAM, EigenGrad-CAM, Deep Feature Factorization.

Conventions as in :mod:`xaijax.methods.cam` (``method(model, variables, x, target) -> (N, H, W)``,
``A`` (N, h, w, C) the CAM layer's activation, ``g = dS/dA``; ``layer=None``: the model's
``cam_layer``; token layers of vision transformers become their patch grid; maps upsampled
bilinearly and not normalised).

* ``eigen-cam`` (Muhammad & Yeasin, IJCNN 2020): the activation projected on its first principal
  component, ``relu(X v_1)`` with ``X`` (h w, C) the activation centred over positions
  (:func:`xaijax.methods.cam.eigen_projection`, pytorch-grad-cam's ``get_2d_projection``; the
  sign of ``v_1`` is fixed so that ``sum(v_1) >= 0`` where the peer keeps LAPACK's arbitrary
  sign). Class-agnostic: the target is not used.
* ``eigengrad-cam`` (pytorch-grad-cam's ``EigenGradCAM``): the same projection of ``g * A``
  (HiResCAM's weighted activations), which makes it class-specific.
* ``deep-feature-factorization`` (Collins, Achanta & Süsstrunk, ECCV 2018; pytorch-grad-cam's
  ``DeepFeatureFactorization``). Per image, the activations as a (C, h w) matrix, each channel
  shifted by its minimum over positions to be non-negative, ``V = A^T - min``, are factorised
  ``V ~ W H`` with ``n_components`` components: concepts ``W + min`` (C, k) and their spatial
  maps ``H`` (k, h w). The peer uses scikit-learn's ``NMF(init="random", random_state=0)``
  (coordinate descent, ``max_iter=200``, ``tol=1e-4``) on the whole batch at once (one
  factorisation of (C, N h w)); xaijax factorises each image on its own (samples stay
  independent) on the device with Lee & Seung's multiplicative updates (:func:`nmf`): a fixed
  number of ``iterations`` (default 200, no tolerance test), a deterministic random start
  (``|N(0, 1)| * sqrt(mean(V) / k)`` from ``jax.random.PRNGKey(seed)``, scikit-learn's "random"
  scale), ``eps`` added to the update denominators. NMF's solution is not unique (order and
  scale of components, local minima), so the components differ from the peer's; the
  reconstruction error is what is comparable. Map for a target: the peer applies "a
  computation on the concepts" (in its examples the classifier head, then a softmax over
  classes) and labels each component with its top classes, but defines no single map per
  class. xaijax weights the components by that score: each concept ``c_j`` (C,) is placed at
  every position of the layer (a constant feature map; for prefix tokens of a transformer
  too), the rest of the network is run on it (for a global-average-pooling + linear head that
  is exactly the classifier applied to the concept, as in the peer's examples), and
  ``map = sum_j p_j H_j`` with ``p_j = sum_k seed_k softmax(f(c_j))_k`` the target's softmax
  probability for concept ``j``. :meth:`DeepFeatureFactorization.factorize` returns the
  concepts, the component maps and these scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide
from xaijax.methods._core import as_seed, validate_positive_int
from xaijax.methods.cam import CamMethod, HiResCAM, eigen_projection
from xaijax.methods.cam_ablation import forward_replacing, layer_activation
from xaijax.methods.registry import register

__all__ = ["EigenCAM", "EigenGradCAM", "DeepFeatureFactorization", "nmf", "nmf_init"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class EigenCAM(CamMethod):
    """Eigen-CAM (see the module docstring): ``relu(first principal component projection of A)``.

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
    """

    layer: str | None = None

    supports_eigen_smooth = False  # the map is a principal-component projection already

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w) signed projection (independent of ``target``)."""
        _, _, a, _ = layer_activation(model, variables, x, self.layer)
        return eigen_projection(a)


@dataclasses.dataclass(frozen=True)
class EigenGradCAM(CamMethod):
    """EigenGrad-CAM (see the module docstring): the first-principal-component projection of ``g * A``
    (HiResCAM with ``eigen_smooth=True``).

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
    """

    layer: str | None = None

    supports_eigen_smooth = False  # the map is a principal-component projection already

    def weighted_activations(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> jax.Array:
        """(N, h, w, C) ``g * A``."""
        return HiResCAM(self.layer).weighted_activations(model, variables, x, target)

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        return eigen_projection(self.weighted_activations(model, variables, x, target))


def nmf_init(v: jax.Array, k: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Deterministic random start ``(W0, H0)`` for ``v`` (m, n): ``|N(0, 1)| * sqrt(mean(v) / k)``
    of shapes (m, k) and (k, n) from ``jax.random.PRNGKey(seed)``."""
    m, n = v.shape
    kw, kh = jax.random.split(jax.random.PRNGKey(seed))
    scale = jnp.sqrt(jnp.maximum(v.mean(), 0.0) / k)
    w0 = scale * jnp.abs(jax.random.normal(kw, (m, k), v.dtype))
    h0 = scale * jnp.abs(jax.random.normal(kh, (k, n), v.dtype))
    return w0, h0


def nmf(
    v: jax.Array, k: int, iterations: int = 200, seed: int = 0, eps: float = 1e-12, init: tuple[jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Non-negative matrix factorisation ``v ~ W H`` (Frobenius loss) by Lee & Seung's multiplicative
    updates, ``H <- H * (W^T V) / (W^T W H + eps)`` then ``W <- W * (V H^T) / (W H H^T + eps)``,
    for a fixed number of ``iterations`` (one ``lax.fori_loop``; jittable, vmappable). Each update
    does not increase ``||V - W H||_F`` (exactly so for ``eps = 0``). A ratio ``0 / 0`` (possible
    with ``eps = 0`` where ``v`` has an all-zero row or column) is taken as 0, so the factors stay
    finite.

    Args:
      v: non-negative (m, n) matrix.
      k: number of components.
      init: ``(W0, H0)``; ``None``: :func:`nmf_init` with ``seed``.

    Returns:
      ``(W, H)`` of shapes (m, k) and (k, n), non-negative.
    """
    validate_positive_int("nmf", "k", k)
    validate_positive_int("nmf", "iterations", iterations)
    w, h = nmf_init(v, k, seed) if init is None else init
    e = jnp.asarray(eps, v.dtype)

    def step(_, wh):
        w, h = wh
        # 0 / 0 (a zero row or column of v, e.g. a dead channel, with eps = 0) keeps the entry at 0
        h = h * safe_divide(jnp.matmul(w.T, v, precision=_HI), jnp.matmul(jnp.matmul(w.T, w, precision=_HI), h, precision=_HI) + e)
        w = w * safe_divide(jnp.matmul(v, h.T, precision=_HI), jnp.matmul(w, jnp.matmul(h, h.T, precision=_HI), precision=_HI) + e)
        return w, h

    return jax.lax.fori_loop(0, iterations, step, (w, h))


@dataclasses.dataclass(frozen=True)
class DeepFeatureFactorization(CamMethod):
    """Deep Feature Factorization (see the module docstring): components of a per-image NMF of the
    layer's activations, weighted by the target's probability for each concept.

    Attributes:
      layer: dotted layer name (``None``: :func:`~xaijax.methods.cam.default_cam_layer`).
      n_components: number of NMF components (concepts). pytorch-grad-cam's
        ``DeepFeatureFactorization.__call__`` defaults to 16, its ``dff`` function and
        ``run_dff_on_image`` to 5; xaijax uses 5.
      iterations: multiplicative-update iterations (scikit-learn's ``max_iter`` is 200).
      seed: PRNG seed of the deterministic start.
      eps: added to the update denominators.
    """

    layer: str | None = None
    n_components: int = 5
    iterations: int = 200
    seed: int = 0
    eps: float = 1e-12

    supports_eigen_smooth = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_positive_int("deep-feature-factorization", "n_components", self.n_components)
        validate_positive_int("deep-feature-factorization", "iterations", self.iterations)
        if not self.eps >= 0:
            raise ValueError(f"deep-feature-factorization: eps must be >= 0, got {self.eps!r}")

    def factorize(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(concepts, maps, scores)``: concepts ``W + min`` (N, C, k), component maps ``H``
        (N, k, h, w) and each concept's target probability ``p_j`` (N, k)."""
        name, raw, a, out = layer_activation(model, variables, x, self.layer)
        n, h, w, c = a.shape
        k = self.n_components
        seed = as_seed(target, out.shape[-1], n, out.dtype)
        v = jnp.where(jnp.isnan(a), 0.0, a).reshape(n, h * w, c).transpose(0, 2, 1)  # (N, C, P)
        offset = v.min(axis=-1, keepdims=True)
        wk, hk = jax.vmap(lambda m: nmf(m, k, self.iterations, self.seed, self.eps))(v - offset)
        concepts = wk + offset  # (N, C, k)
        # each concept as a constant layer output, through the rest of the network
        value = jnp.broadcast_to(concepts.transpose(0, 2, 1)[:, :, None, :], (n, k, raw[0].size // raw.shape[-1], c))
        value = value.reshape((n * k,) + raw.shape[1:]).astype(raw.dtype)
        logits = forward_replacing(model, variables, jnp.repeat(x, k, axis=0), name, value)
        p = jax.nn.softmax(logits, axis=-1)
        scores = (p * jnp.repeat(seed, k, axis=0).astype(p.dtype)).sum(-1).reshape(n, k)
        return concepts, hk.reshape(n, k, h, w), scores.astype(a.dtype)

    def _layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w) ``sum_j p_j H_j`` (non-negative)."""
        _, maps, scores = self.factorize(model, variables, x, target)
        return jnp.einsum("nk,nkhw->nhw", scores, maps, precision=_HI)


register("eigen-cam", EigenCAM, "Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the layer's activations")
register(
    "eigengrad-cam",
    EigenGradCAM,
    "EigenGrad-CAM (pytorch-grad-cam): first principal component of gradient times activation",
)
register(
    "deep-feature-factorization",
    DeepFeatureFactorization,
    "Deep Feature Factorization (Collins et al. 2018): per-image NMF of the activations, components "
    "weighted by the target's probability for each concept",
)
