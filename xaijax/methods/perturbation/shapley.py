"""Shapley values of image features: permutation sampling (Castro et al. 2009; Strumbelj and
Kononenko 2010) with antithetic permutations, and KernelSHAP (Lundberg and Lee, NeurIPS 2017).

The game: the players are the features of a feature mask (see
:mod:`~xaijax.methods.perturbation.features`: a grid by default, SLIC superpixels, or a given
mask); a coalition ``S`` keeps its features' pixels and replaces all others by the baseline;
its value ``v(S)`` is the target logit of that image. A pixel's attribution is its feature's
Shapley value (Captum's ``ShapleyValueSampling`` / ``KernelShap`` with ``feature_mask`` of
shape (N, 1, H, W) give it on every channel; xaijax returns it once per pixel). Efficiency:
the values of a sample's features sum to ``v(all) - v(none)``.

* ``shapley-sampling`` (:class:`ShapleySampling`): the mean over ``n_samples`` permutations of
  each feature's marginal contribution ``v(pre + f) - v(pre)`` when the features are added in
  the permutation's order to the baseline (Captum's ``ShapleyValueSampling``: ``n_samples``
  permutations, default 25, independent). xaijax draws them in *antithetic* pairs by default
  (permutation ``2k + 1`` is permutation ``2k`` reversed; ``antithetic=False``: independent),
  which cancels much of the variance (for two features one pair is exact). Cost: ``n_samples *
  (F - 1) + 2`` forward passes per batch (the full coalition is ``x`` itself, the empty one
  the baseline). Given
  ``permutations=`` (P, F) at call time, exactly those are averaged (all ``F!`` of them give
  the exact Shapley values).
* ``kernel-shap`` (:class:`KernelSHAP`): a weighted least-squares fit of the coalition values
  ``v(z) - v(none) ~ sum_f phi_f z_f`` with the Shapley kernel, solved on the device with the
  two end-point constraints exact (``phi_0 = v(none)``; ``sum phi = v(all) - v(none)``, through
  a KKT system) instead of Captum's approximation (the empty and full coalitions with weight
  1e6). Coalitions are sampled like Captum's: a size ``k`` in ``1 .. M-1`` with probability
  proportional to ``(M - 1) / (k (M - k))``, then ``k`` features uniformly, each sample weight
  1 (this is the Shapley kernel's distribution). Given ``coalitions=`` (S, F) binary at call
  time they get the kernel weights ``(M - 1) / (C(M, k) k (M - k))`` instead (all ``2^M - 2``
  proper coalitions give the exact Shapley values). On a model linear in the coalition vector
  any full-rank sample is exact. Captum's default ``n_samples`` is 25; xaijax's 200 (25 cannot
  determine more than 25 features; the least-squares system is solved for its minimum-norm
  solution when under-determined).

Randomness: permutation / coalition ``j`` and feature ``f`` use ``fold_in(fold_in(key(seed),
j), f)`` inside the jitted function — the same for every sample of the batch and independent
of ``chunk``, the batch and jit. Samples with fewer features than the batch's largest count
(superpixels) have absent features: dummy players, which change neither the Shapley values nor
the sampling of the present features (each draw ranks the present features by their own
uniform numbers), and get 0.

Memory: coalitions are evaluated ``chunk`` at a time in ``lax.scan`` (``chunk * N`` images);
the least-squares statistics (an (F, F) matrix per sample) are accumulated in the scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import as_seed, validate_positive_int
from xaijax.methods.perturbation.features import broadcast_features, compose, feature_counts, scan_scores
from xaijax.methods.perturbation.occlusion import FeatureMethod
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = [
    "as_key",
    "ShapleySampling",
    "KernelSHAP",
    "feature_uniforms",
    "sampled_permutations",
    "shapley_kernel_coalitions",
    "shapley_kernel_weights",
    "solve_kernel_shap",
]

_HI = jax.lax.Precision.HIGHEST


def as_key(seed: int | jax.Array) -> jax.Array:
    """A typed PRNG key: ``seed`` itself if it is one, else ``jax.random.key(seed)`` (an int)."""
    if hasattr(seed, "dtype") and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    return jax.random.key(seed)


def feature_uniforms(key: jax.Array, j: jax.Array, f: int) -> jax.Array:
    """(F,) uniform numbers of draw ``j``: feature ``g`` gets ``uniform(fold_in(fold_in(key, j), g))``
    (so a feature's number does not depend on how many features there are)."""
    kj = jax.random.fold_in(key, j)
    # float32 draws: the same permutations / coalitions whether or not float64 (jax_enable_x64) is on
    return jax.vmap(lambda g: jax.random.uniform(jax.random.fold_in(kj, g), dtype=jnp.float32))(jnp.arange(f))


def sampled_permutations(seed: int | jax.Array, indices: jax.Array, f: int, antithetic: bool = True) -> jax.Array:
    """Permutations number ``indices`` (m,) of ``range(f)``: (m, F) int32.

    Permutation ``j`` sorts the features by :func:`feature_uniforms` of draw ``j // 2``
    (antithetic; odd ``j``: reversed) or of draw ``j`` (``antithetic=False``)."""
    key = as_key(seed)
    idx = jnp.asarray(indices)
    draw = idx // 2 if antithetic else idx
    perm = jax.vmap(lambda d: jnp.argsort(feature_uniforms(key, d, f)))(draw).astype(jnp.int32)
    if antithetic:
        perm = jnp.where((idx % 2 == 1)[:, None], perm[:, ::-1], perm)
    return perm


def _validate_seed(owner: str, seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{owner}: seed must be an int, got {seed!r}")


@dataclasses.dataclass(frozen=True)
class ShapleySampling(FeatureMethod):
    """Shapley value sampling over feature permutations (see the module docstring).

    Attributes (besides the feature-mask fields of
    :class:`~xaijax.methods.perturbation.occlusion.FeatureMethod`):
      n_samples: permutations (>= 1; Captum's default 25).
      antithetic: draw permutations in (permutation, reversed) pairs.
      seed: PRNG seed of the permutations.

    Called as ``method(model, variables, x, target, feature_mask=None, baselines=None,
    permutations=None)`` -> (N, H, W); ``permutations``: a concrete (P, F) int array of
    permutations of ``range(F)`` used for every sample instead of sampled ones.
    """

    n_samples: int = 25
    antithetic: bool = True
    seed: int = 0

    _name = "shapley-sampling"

    def __post_init__(self) -> None:
        self._validate()
        validate_positive_int(self._name, "n_samples", self.n_samples)
        _validate_seed(self._name, self.seed)
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"{self._name}: antithetic must be a bool, got {self.antithetic!r}")

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None, permutations: Any = None,
    ) -> jax.Array:
        mask, f, base = self._prepare(x, feature_mask, baselines)
        given = None
        if permutations is not None:
            if isinstance(permutations, jax.core.Tracer):
                raise TypeError(f"{self._name}: permutations must be a concrete array")
            p = np.asarray(permutations)
            if p.ndim != 2 or p.shape[1] != f or p.shape[0] < 1 or not np.issubdtype(p.dtype, np.integer):
                raise ValueError(f"{self._name}: permutations must be an int array (P, F) = (P, {f}) with P >= 1; got {p.shape} {p.dtype}")
            if not (np.sort(p, axis=1) == np.arange(f)).all():
                raise ValueError(f"{self._name}: every row of permutations must be a permutation of 0 .. {f - 1}")
            given = jnp.asarray(p, jnp.int32)
        run = bind_static(_shapley, _shapley_jit, dataclasses.replace(self, seed=0), model, f)  # seed traced
        return run(variables, x, jnp.asarray(target), mask, base, given, jnp.asarray(self.seed))


def _shapley(cfg: ShapleySampling, model, f, variables, x, target, mask, base, given, seed) -> jax.Array:
    n = x.shape[0]
    key = jax.random.key(seed)
    p = cfg.n_samples if given is None else given.shape[0]
    out_b = model.apply(variables, base)
    s_none = (out_b.astype(x.dtype) * as_seed(target, out_b.shape[-1], n, x.dtype)).sum(-1)  # (N,)

    def perms(j):
        return sampled_permutations(key, j, f, cfg.antithetic) if given is None else given[j]

    # evaluation q = (permutation j, step t): the first t + 1 features of permutation j kept;
    # its value enters the marginal of perm[t] with + and of perm[t + 1] with -.
    steps = f - 1

    def make_inputs(idx):
        j, t = idx // steps, idx % steps
        pm = perms(j)  # (m, F)
        rank = jnp.argsort(pm, axis=1)  # rank[g] = position of feature g in the permutation
        keep = rank <= t[:, None]  # (m, F)
        return compose(x[None], base[None], keep[:, mask])  # keep[:, mask]: (m, N, H, W)

    def accumulate(phi, idx, valid, sc, s0):
        j, t = idx // steps, idx % steps
        pm = perms(j)
        plus = jnp.take_along_axis(pm, t[:, None], 1)[:, 0]
        minus = jnp.take_along_axis(pm, t[:, None] + 1, 1)[:, 0]
        sign = jax.nn.one_hot(plus, f, dtype=x.dtype) - jax.nn.one_hot(minus, f, dtype=x.dtype)
        return phi + jnp.einsum("mn,mf->nf", jnp.where(valid[:, None], sc, 0), sign, precision=_HI)

    out0 = model.apply(variables, x)
    s_all = (out0.astype(x.dtype) * as_seed(target, out0.shape[-1], n, x.dtype)).sum(-1)
    phi = jnp.zeros((n, f), x.dtype)
    if steps > 0:
        phi, _ = scan_scores(model, variables, x, target, p * steps, cfg.chunk, make_inputs, accumulate, phi)
    ends = perms(jnp.arange(p))  # (P, F): v(all) to the last feature, -v(none) to the first
    first = jax.nn.one_hot(ends[:, 0], f, dtype=x.dtype).sum(0)
    last = jax.nn.one_hot(ends[:, -1], f, dtype=x.dtype).sum(0)
    phi = phi + s_all[:, None] * last[None] - s_none[:, None] * first[None]
    return broadcast_features(phi / p, mask)


_shapley_jit = jax.jit(_shapley, static_argnums=(0, 1, 2))


def shapley_kernel_weights(sizes: jax.Array, m: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Shapley kernel ``(M - 1) / (C(M, k) k (M - k))`` of coalitions of ``sizes`` k among ``m``
    features, in ``dtype`` (0 where ``k`` is 0 or ``M``: those are the exact end-point constraints)."""
    k = jnp.asarray(sizes).astype(dtype)
    mm = jnp.asarray(m, k.dtype)
    inner = (k > 0) & (k < mm)
    ks = jnp.where(inner, k, 1.0)
    log_binom = jax.lax.lgamma(mm + 1) - jax.lax.lgamma(ks + 1) - jax.lax.lgamma(mm - ks + 1)
    w = (mm - 1) / (ks * (mm - ks)) * jnp.exp(-log_binom)
    return jnp.where(inner, w, 0.0)


def shapley_kernel_coalitions(seed: int | jax.Array, indices: jax.Array, counts: jax.Array, f: int) -> jax.Array:
    """Sampled KernelSHAP coalitions number ``indices`` (m,) for samples with ``counts`` (N,)
    features each: (m, N, F) bool.

    Coalition ``j`` of a sample with ``M`` features: with ``(k_size, k_feat) = split(fold_in(key,
    j))``, a size ``k`` in ``1 .. M-1`` with probability proportional to ``1 / (k (M - k))``
    (inverse CDF of ``uniform(k_size)``), then the ``k`` present features with the smallest
    :func:`feature_uniforms` ``(k_feat, 0, F)``. ``M = 1``: an empty coalition (the constraint
    alone decides)."""
    key = as_key(seed)
    counts = jnp.asarray(counts)
    ks = jnp.arange(1, max(f, 2))  # candidate sizes 1 .. F-1

    def one(j):
        ksize, kfeat = jax.random.split(jax.random.fold_in(key, j))
        u_size = jax.random.uniform(ksize, dtype=jnp.float32)
        u = feature_uniforms(kfeat, 0, f)  # (F,)

        def per_sample(mi):
            p = jnp.where(ks < mi, 1.0 / (ks * jnp.maximum(mi - ks, 1)), 0.0)
            cdf = jnp.cumsum(p) / jnp.maximum(p.sum(), 1e-30)
            k = 1 + jnp.sum(cdf < u_size)
            present = jnp.arange(f) < mi
            uu = jnp.where(present, u, jnp.inf)
            rank = jnp.sum(uu[None, :] < uu[:, None], axis=1)
            return present & (rank < k) & (mi > 1)

        return jax.vmap(per_sample)(counts)

    return jax.vmap(one)(jnp.asarray(indices))


def solve_kernel_shap(a: jax.Array, b: jax.Array, delta: jax.Array, present: jax.Array) -> jax.Array:
    """Minimise ``sum_z w (y_z - phi . z)^2`` subject to ``sum_present phi = delta``: the KKT system
    ``[[A, 1], [1^T, 0]] [phi; lambda] = [b; delta]`` with ``A = sum w z z^T`` (F, F), ``b = sum w
    y z`` (F,); absent features get ``phi = 0``. Minimum-norm solution (least squares) when
    singular."""
    f = a.shape[-1]
    pres = present.astype(a.dtype)
    a = a + jnp.diag(1 - pres)
    kkt = jnp.block([[a, pres[:, None]], [pres[None, :], jnp.zeros((1, 1), a.dtype)]])
    rhs = jnp.concatenate([b, delta[None]])
    sol = jnp.linalg.lstsq(kkt, rhs)[0]
    return sol[:f] * pres


@dataclasses.dataclass(frozen=True)
class KernelSHAP(FeatureMethod):
    """KernelSHAP over a feature mask (see the module docstring).

    Attributes (besides the feature-mask fields of
    :class:`~xaijax.methods.perturbation.occlusion.FeatureMethod`):
      n_samples: sampled coalitions (>= 1; Captum's default 25).
      seed: PRNG seed of the coalitions.

    Called as ``method(model, variables, x, target, feature_mask=None, baselines=None,
    coalitions=None)`` -> (N, H, W); ``coalitions``: a concrete (S, F) 0/1 array used for every
    sample instead of sampled ones, weighted by the Shapley kernel (every sample must then have
    all F features).
    """

    n_samples: int = 200
    seed: int = 0

    _name = "kernel-shap"

    def __post_init__(self) -> None:
        self._validate()
        validate_positive_int(self._name, "n_samples", self.n_samples)
        _validate_seed(self._name, self.seed)

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None, coalitions: Any = None,
    ) -> jax.Array:
        mask, f, base = self._prepare(x, feature_mask, baselines)
        given = None
        if coalitions is not None:
            if isinstance(coalitions, jax.core.Tracer):
                raise TypeError(f"{self._name}: coalitions must be a concrete array")
            c = np.asarray(coalitions)
            if c.ndim != 2 or c.shape[1] != f or c.shape[0] < 1 or not np.isin(c, (0, 1)).all():
                raise ValueError(f"{self._name}: coalitions must be a 0/1 array (S, F) = (S, {f}) with S >= 1; got shape {c.shape}")
            # whatever made the mask (given, grid, SLIC with a different count per image)
            if not isinstance(mask, jax.core.Tracer) and (np.asarray(mask).reshape(mask.shape[0], -1).max(-1) + 1 != f).any():
                raise ValueError(
                    f"{self._name}: with coalitions=, every sample's feature mask must have all {f} features; "
                    "these images have fewer (superpixels): explain them one at a time or give one shared feature_mask"
                )
            given = jnp.asarray(c, bool)
        run = bind_static(_kernel_shap, _kernel_shap_jit, dataclasses.replace(self, seed=0), model, f)  # seed traced
        return run(variables, x, jnp.asarray(target), mask, base, given, jnp.asarray(self.seed))


def _kernel_shap(cfg: KernelSHAP, model, f, variables, x, target, mask, base, given, seed) -> jax.Array:
    n = x.shape[0]
    key = jax.random.key(seed)
    counts = feature_counts(mask)  # (N,)
    present = jnp.arange(f)[None] < counts[:, None]  # (N, F)
    count = cfg.n_samples if given is None else given.shape[0]
    out_b = model.apply(variables, base)
    s_none = (out_b.astype(x.dtype) * as_seed(target, out_b.shape[-1], n, x.dtype)).sum(-1)

    def coal(idx):  # (m, N, F) bool, (m, N) weights
        if given is None:
            z = shapley_kernel_coalitions(key, idx, counts, f)
            w = jnp.ones(z.shape[:2], x.dtype)
        else:
            z = jnp.broadcast_to(given[idx][:, None], (idx.shape[0], n, f)) & present[None]  # absent features out
            w = shapley_kernel_weights(z.sum(-1), counts[None], x.dtype)
        return z, w

    def make_inputs(idx):
        z, _ = coal(idx)
        keep = jnp.take_along_axis(z, mask.reshape(1, n, -1).astype(jnp.int32), axis=2)
        return compose(x[None], base[None], keep.reshape((idx.shape[0],) + mask.shape))

    def accumulate(carry, idx, valid, sc, s0):
        a, b = carry
        z, w = coal(idx)
        z = z.astype(x.dtype)
        w = jnp.where(valid[:, None], w, 0)
        y = sc - s_none[None]
        a = a + jnp.einsum("mn,mnf,mng->nfg", w, z, z, precision=_HI)
        b = b + jnp.einsum("mn,mnf->nf", w * y, z, precision=_HI)
        return a, b

    init = (jnp.zeros((n, f, f), x.dtype), jnp.zeros((n, f), x.dtype))
    (a, b), s_all = scan_scores(model, variables, x, target, count, cfg.chunk, make_inputs, accumulate, init)
    phi = jax.vmap(solve_kernel_shap)(a, b, s_all - s_none, present)
    return broadcast_features(phi, mask)


_kernel_shap_jit = jax.jit(_kernel_shap, static_argnums=(0, 1, 2))


register(
    "shapley-sampling",
    ShapleySampling,
    "Shapley value sampling (Castro et al. 2009; Captum ShapleyValueSampling) over features, antithetic permutations",
)
register(
    "kernel-shap",
    KernelSHAP,
    "KernelSHAP (Lundberg & Lee 2017): Shapley-kernel weighted least squares over features, exact end-point constraints",
)
