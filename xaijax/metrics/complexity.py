"""Complexity metrics of the Quantus catalogue, batched: how concentrated a map is.

Registered pair metrics (:mod:`xaijax.metrics.registry`; they read the maps and ignore the
regions):

=====================  =========================  ===============================
name                   per-pair key               kernel
=====================  =========================  ===============================
sparseness             ``sparseness``             :func:`sparseness` (Gini index)
complexity             ``complexity``             :func:`complexity` (entropy)
effective-complexity   ``effective_complexity``   :func:`effective_complexity`
=====================  =========================  ===============================

All three score ``|R|`` (the papers' and Quantus 0.6.0's default ``abs=True``). Quantus first
divides all maps of a call by their largest absolute value (``normalise_by_max`` over the
*whole batch*), then takes ``abs``. The Gini index and the entropy are invariant to that
positive scale; the effective complexity's threshold is not, and there xaijax divides each
map by its own maximum so that pairs stay independent (Quantus couples the maps of a batch:
see :func:`effective_complexity`). Maps (N, H, W) real; float64 in, float64 out; the
registered metrics refuse NaN/infinite maps (``ValueError`` naming ``maps``); an all-zero map
has no Gini index or entropy (NaN row) and an effective complexity of 0. ``summarize``: the
per-class mean, then the mean over classes (NaN rows left out), as the other xaijax tables;
Quantus leaves aggregation to the caller.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.metrics import registry as _registry
from xaijax.metrics.localisation import ClassMeanSummary, _check_maps, _ratio, check_pair_inputs

__all__ = [
    "sparseness",
    "complexity",
    "effective_complexity",
    "Sparseness",
    "Complexity",
    "EffectiveComplexity",
]


def _max_normalise(a: jax.Array) -> jax.Array:
    """(N, D) non-negative rows divided by their maximum; all-zero rows stay 0."""
    m = jnp.max(a, axis=1, keepdims=True)
    return jnp.where(m > 0, a / jnp.where(m > 0, m, 1), 0)


def _abs_flat(maps: jax.Array) -> jax.Array:
    maps = _check_maps(maps)
    return jnp.abs(maps).reshape(maps.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("offset", "normalise"))
def sparseness(maps: jax.Array, offset: float = 0.0, normalise: bool = True) -> jax.Array:
    """Sparseness (Chalasani et al. 2020): the Gini index of ``|R|``.

    Protocol, per pair: ``a = |R| / max|R| + offset`` (``normalise``; else ``|R| + offset``) flattened and sorted ascending
    ``a_(1) <= ... <= a_(n)`` (n = H W); value
    ``sum_k (2k - n - 1) a_(k) / (n sum_k a_(k))`` (Hurley & Rickard's Gini index, the form in
    the authors' code). 0 for a constant map, ``1 - 1/n`` for a map with a single non-zero
    pixel (1 in the limit of many pixels), NaN for an all-zero map (with ``offset`` 0).

    Defaults: the paper and xaijax use no offset. Quantus 0.6.0 (``Sparseness``: ``abs=True``,
    ``normalise=True``) adds ``1e-7`` after normalising the batch by its largest absolute
    value, which keeps all-zero maps defined (0) and lowers other values by about
    ``1e-7 n / sum a`` relative — more for a map whose maximum is small against the batch's:
    Quantus' value of a map depends on the other maps of the call. ``offset=1e-7`` reproduces
    a batch of one; ``normalise=False, offset=1e-7`` on maps divided by the batch's largest
    absolute value reproduces a batch.

    Args:
      maps: (N, H, W) attribution maps.
      offset: added to every normalised value (Quantus: 1e-7).
      normalise: divide each map by its largest absolute value first (the Gini index is
        scale-invariant: this only sets the scale ``offset`` is added at).

    Returns:
      (N,) values in [0, 1), the maps' float dtype.
    """
    a = _abs_flat(maps)
    n = a.shape[1]
    a = (_max_normalise(a) if normalise else a) + offset
    a = jnp.sort(a, axis=1)
    k = jnp.arange(1, n + 1, dtype=a.dtype)
    return _ratio(jnp.sum((2 * k - n - 1) * a, axis=1), n * jnp.sum(a, axis=1))


@jax.jit
def complexity(maps: jax.Array) -> jax.Array:
    """Complexity (Bhatt et al. 2020): the entropy of the fractional contributions ``|R_p| / sum |R|``.

    Protocol, per pair: ``P_p = |R_p| / sum_q |R_q|``; value ``-sum_p P_p log P_p`` (natural log,
    ``0 log 0 = 0``). ``log(H W)`` for a constant map, 0 for a single non-zero pixel, NaN for
    an all-zero map. Quantus 0.6.0 (``Complexity``: ``abs=True``, ``normalise=True``, a
    positive scale) evaluates ``log(P + 1e-12)``, which differs by at most about ``n 1e-12``.

    Args:
      maps: (N, H, W) attribution maps.

    Returns:
      (N,) values in [0, log(H W)], the maps' float dtype.
    """
    a = _abs_flat(maps)
    total = jnp.sum(a, axis=1, keepdims=True)
    p = a / jnp.where(total > 0, total, 1)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0), axis=1)
    return jnp.where(total[:, 0] > 0, h, jnp.nan)


@functools.partial(jax.jit, static_argnames=("eps", "normalise"))
def effective_complexity(maps: jax.Array, eps: float = 1e-5, normalise: bool = True) -> jax.Array:
    """Effective complexity (Nguyen & Martínez 2020), as Quantus implements it: the number of
    pixels whose relevance exceeds a threshold.

    Protocol, per pair: ``a = |R| / max|R|`` (``normalise``; an all-zero map stays 0) or
    ``|R|``; value ``#{p : a_p > eps}``, an integer in [0, H W] (returned as a float).

    Defaults: ``eps = 1e-5`` as Quantus 0.6.0 (``EffectiveComplexity``: ``abs=True``,
    ``normalise=True``). Quantus normalises by the largest absolute value of the *whole batch*,
    so a map's count there depends on the other maps of the call; xaijax normalises each map
    by its own maximum (a batch of one gives Quantus' number; ``normalise=False`` on maps
    divided by the batch maximum gives Quantus' batched number). The paper defines the
    effective complexity through the model (the number of top-ranked features whose
    attributions matter for the output within a tolerance eps); like Quantus this is the
    model-free count.

    Args:
      maps: (N, H, W) attribution maps.
      eps: threshold on the (normalised) absolute relevance.
      normalise: divide each map by its largest absolute value first.

    Returns:
      (N,) counts, the maps' float dtype.
    """
    a = _abs_flat(maps)
    if normalise:
        a = _max_normalise(a)
    return jnp.sum(a > eps, axis=1).astype(a.dtype)


# ----------------------------------------------------------------------------- pair metrics


def _maps(batch: _registry.PairBatch) -> np.ndarray:
    return check_pair_inputs(batch.maps, batch.regions)[0]


@dataclasses.dataclass(frozen=True)
class Sparseness(ClassMeanSummary):
    """Sparseness (Chalasani et al. 2020): Gini index of |map| (higher: fewer pixels carry the relevance).

    :func:`sparseness` per pair (key ``sparseness``); ``offset=1e-7`` for Quantus."""

    offset: float = 0.0
    normalise: bool = True
    key = "sparseness"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        return {self.key: np.asarray(sparseness(_maps(batch), offset=self.offset, normalise=self.normalise))}


@dataclasses.dataclass(frozen=True)
class Complexity(ClassMeanSummary):
    """Complexity (Bhatt et al. 2020): entropy of the fractional contributions |map| / sum |map| (lower: simpler).

    :func:`complexity` per pair (key ``complexity``)."""

    key = "complexity"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        return {self.key: np.asarray(complexity(_maps(batch)))}


@dataclasses.dataclass(frozen=True)
class EffectiveComplexity(ClassMeanSummary):
    """Effective complexity (Nguyen & Martinez 2020): number of pixels whose normalised |map| exceeds ``eps`` (lower: simpler).

    :func:`effective_complexity` per pair (key ``effective_complexity``)."""

    eps: float = 1e-5
    normalise: bool = True
    key = "effective_complexity"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        return {self.key: np.asarray(effective_complexity(_maps(batch), eps=self.eps, normalise=self.normalise))}


_registry.register("sparseness", Sparseness)
_registry.register("complexity", Complexity)
_registry.register("effective-complexity", EffectiveComplexity)
