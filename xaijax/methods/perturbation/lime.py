"""LIME (Ribeiro, Singh and Guestrin, KDD 2016) over image features, with Captum's ``Lime``
defaults for the sampling and the similarity kernel.

Interpretable representation: a binary vector ``z`` over the features of a feature mask (see
:mod:`~xaijax.methods.perturbation.features`: a grid by default, SLIC superpixels or a given
mask); ``z_f = 1`` keeps feature ``f``'s pixels, ``0`` replaces them by the baseline. Samples:
``z_f ~ Bernoulli(0.5)`` independently (Captum's ``default_perturb_func``; like Captum, the
unperturbed ``z = 1`` is not added). Each sample is scored by the target logit of its image
and weighted by an exponential kernel ``exp(-d^2 / (2 kernel_width^2))`` of its distance ``d``
to the original:

* ``distance_space="input"`` (Captum's default): ``d`` between the flattened original and
  perturbed *images* — ``distance="cosine"`` (``1 - cos``, Captum's default) or
  ``"euclidean"``; ``kernel_width`` 1.0 (Captum's default). The euclidean distance of
  images is large (tens to hundreds of input units at real sizes): with ``kernel_width=1``
  every weight underflows to 0 and the map is all zeros, as in Captum; scale
  ``kernel_width`` to the distances when using it;
* ``distance_space="interpretable"`` (the ``lime`` package's images explainer): ``d`` between
  ``z`` and the all-ones vector (cosine: ``1 - sqrt(|z| / M)``, 1 for ``z = 0``; euclidean:
  ``sqrt(M - |z|)``); the ``lime`` package uses cosine with ``kernel_width=0.25``.

Surrogate: a linear model with an intercept, ``y ~ b + sum_f w_f z_f``, fitted by weighted
ridge regression (``alpha``; the intercept is not penalised; ``alpha=0``: weighted least
squares, minimum-norm solution if under-determined), solved on the device from the
normal-equation statistics accumulated in the ``lax.scan`` over the samples. A pixel's
attribution is its feature's coefficient ``w_f``. Captum's default surrogate is
``SkLearnLasso(alpha=0.01)`` (an L1 penalty, coordinate descent); the ``lime`` package's is
``Ridge(alpha=1)``, xaijax's default.

Randomness: sample ``j``, feature ``f`` from ``fold_in(fold_in(key(seed), j), f)`` (see
:func:`lime_samples`), shared by the samples of the batch, independent of ``chunk``, batch
and jit. Features absent from a sample (fewer superpixels than the batch's largest count) are
never set and get coefficient 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import validate_positive_int
from xaijax.methods.perturbation.features import broadcast_features, compose, feature_counts, scan_scores
from xaijax.methods.perturbation.occlusion import FeatureMethod
from xaijax.methods.perturbation.shapley import as_key, feature_uniforms
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = ["Lime", "lime_samples", "lime_weights", "solve_ridge"]

_HI = jax.lax.Precision.HIGHEST
_DISTANCES = ("cosine", "euclidean")
_SPACES = ("input", "interpretable")


def lime_samples(seed: int | jax.Array, indices: jax.Array, counts: jax.Array, f: int) -> jax.Array:
    """Binary samples number ``indices`` (m,) for samples with ``counts`` (N,) features: (m, N, F)
    bool; ``z[j, i, g] = feature_uniforms(key, j, F)[g] < 0.5`` for present features ``g <
    counts[i]``, else False."""
    key = as_key(seed)
    u = jax.vmap(lambda j: feature_uniforms(key, j, f))(jnp.asarray(indices))  # (m, F)
    present = jnp.arange(f)[None] < jnp.asarray(counts)[:, None]  # (N, F)
    return (u[:, None, :] < 0.5) & present[None]


def lime_weights(
    x: jax.Array, perturbed: jax.Array, z: jax.Array, counts: jax.Array, distance: str, space: str, kernel_width: float
) -> jax.Array:
    """Kernel weights (m, N) of samples ``z`` (m, N, F) with images ``perturbed`` (m, N, H, W, C)
    of the originals ``x`` (N, H, W, C) (see the module docstring)."""
    if space == "input":
        a = x.reshape(1, x.shape[0], -1)
        b = perturbed.reshape(perturbed.shape[:2] + (-1,))
        if distance == "cosine":
            cos = (a * b).sum(-1) / jnp.maximum(jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1)), 1e-8)
            d = 1 - cos
        else:
            d = jnp.sqrt(((a - b) ** 2).sum(-1))
    else:
        k = z.sum(-1).astype(x.dtype)
        m = jnp.asarray(counts, x.dtype)[None]
        d = 1 - jnp.sqrt(k / m) if distance == "cosine" else jnp.sqrt(m - k)
    return jnp.exp(-(d**2) / (2 * kernel_width**2))


def solve_ridge(a: jax.Array, b: jax.Array, alpha: float, present: jax.Array) -> jax.Array:
    """Coefficients (F,) of the ridge fit from the statistics of the design ``[z, 1]``: ``a``
    (F + 1, F + 1) ``= sum w [z, 1][z, 1]^T``, ``b`` (F + 1,) ``= sum w y [z, 1]``; the
    intercept (last) is not penalised; absent features get 0; least-squares minimum-norm
    solution when singular."""
    f = present.shape[0]
    pres = present.astype(a.dtype)
    reg = jnp.concatenate([alpha * pres + (1 - pres), jnp.zeros((1,), a.dtype)])
    sol = jnp.linalg.lstsq(a + jnp.diag(reg), b)[0]
    return sol[:f] * pres


@dataclasses.dataclass(frozen=True)
class Lime(FeatureMethod):
    """LIME with a ridge surrogate (see the module docstring).

    Attributes (besides the feature-mask fields of
    :class:`~xaijax.methods.perturbation.occlusion.FeatureMethod`):
      n_samples: perturbed samples (>= 1; Captum's default 50).
      alpha: ridge penalty (>= 0; 0: least squares). Default 1.0 (the ``lime`` package).
      kernel_width: width of the exponential kernel (> 0; Captum's default 1.0).
      distance: ``"cosine"`` (Captum's default) or ``"euclidean"``.
      distance_space: ``"input"`` (Captum) or ``"interpretable"`` (the ``lime`` package).
      seed: PRNG seed of the samples.

    Called as ``method(model, variables, x, target, feature_mask=None, baselines=None,
    samples=None)`` -> (N, H, W); ``samples``: a concrete (S, F) 0/1 array of interpretable
    samples used for every image instead of drawn ones (e.g. to match another library's draws).
    """

    n_samples: int = 50
    alpha: float = 1.0
    kernel_width: float = 1.0
    distance: str = "cosine"
    distance_space: str = "input"
    seed: int = 0

    _name = "lime"

    def __post_init__(self) -> None:
        self._validate()
        validate_positive_int(self._name, "n_samples", self.n_samples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"lime: seed must be an int, got {self.seed!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) or not self.alpha >= 0:
            raise ValueError(f"lime: alpha (ridge penalty) must be a float >= 0, got {self.alpha!r}")
        if isinstance(self.kernel_width, bool) or not isinstance(self.kernel_width, (int, float, np.number)) or not self.kernel_width > 0:
            raise ValueError(f"lime: kernel_width must be a float > 0, got {self.kernel_width!r}")
        if self.distance not in _DISTANCES:
            raise ValueError(f"lime: distance must be one of {_DISTANCES}, got {self.distance!r}")
        if self.distance_space not in _SPACES:
            raise ValueError(f"lime: distance_space must be one of {_SPACES}, got {self.distance_space!r}")

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None, samples: Any = None,
    ) -> jax.Array:
        mask, f, base = self._prepare(x, feature_mask, baselines)
        given = None
        if samples is not None:
            if isinstance(samples, jax.core.Tracer):
                raise TypeError("lime: samples must be a concrete array")
            z = np.asarray(samples)
            if z.ndim != 2 or z.shape[1] != f or z.shape[0] < 1 or not np.isin(z, (0, 1)).all():
                raise ValueError(f"lime: samples must be a 0/1 array (S, F) = (S, {f}) with S >= 1; got shape {z.shape}")
            given = jnp.asarray(z, bool)
        run = bind_static(_lime, _lime_jit, dataclasses.replace(self, seed=0), model, f)  # seed traced: no recompile per seed
        return run(variables, x, jnp.asarray(target), mask, base, given, jnp.asarray(self.seed))


def _lime(cfg: Lime, model, f, variables, x, target, mask, base, given, seed) -> jax.Array:
    n = x.shape[0]
    key = jax.random.key(seed)
    counts = feature_counts(mask)
    present = jnp.arange(f)[None] < counts[:, None]

    def perturbed(idx):
        if given is None:
            z = lime_samples(key, idx, counts, f)  # (m, N, F)
        else:
            z = given[idx][:, None, :] & present[None]
        keep = jnp.take_along_axis(z, jnp.broadcast_to(mask.reshape(1, n, -1), (idx.shape[0], n, mask[0].size)), axis=2)
        return z, compose(x[None], base[None], keep.reshape((idx.shape[0],) + mask.shape))

    def make_inputs(idx):
        return perturbed(idx)[1]

    def accumulate(carry, idx, valid, sc, s0):
        a, b = carry
        z, xp = perturbed(idx)
        w = lime_weights(x, xp, z, counts, cfg.distance, cfg.distance_space, cfg.kernel_width)
        w = jnp.where(valid[:, None], w, 0)
        d = jnp.concatenate([z.astype(x.dtype), jnp.ones(z.shape[:2] + (1,), x.dtype)], -1)  # (m, N, F + 1)
        a = a + jnp.einsum("mn,mnf,mng->nfg", w, d, d, precision=_HI)
        b = b + jnp.einsum("mn,mnf->nf", w * sc, d, precision=_HI)
        return a, b

    init = (jnp.zeros((n, f + 1, f + 1), x.dtype), jnp.zeros((n, f + 1), x.dtype))
    count = cfg.n_samples if given is None else given.shape[0]
    (a, b), _ = scan_scores(model, variables, x, target, count, cfg.chunk, make_inputs, accumulate, init)
    coef = jax.vmap(lambda aa, bb, pp: solve_ridge(aa, bb, float(cfg.alpha), pp))(a, b, present)
    return broadcast_features(coef, mask)


_lime_jit = jax.jit(_lime, static_argnums=(0, 1, 2))


register(
    "lime",
    Lime,
    "LIME (Ribeiro et al. 2016; Captum Lime sampling/kernel): weighted ridge surrogate over features",
)
