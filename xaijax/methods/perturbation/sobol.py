"""Sobol attribution (Fel, Cadène, Chalvidal, Cord, Vigouroux and Serre, NeurIPS 2021: "Look at
the Variance! Efficient Black-box Explanations with Sobol-based Sensitivity Analysis").

The image is cut into a ``grid_size x grid_size`` grid (or the features of a given feature
mask); each cell ``i`` gets a continuous mask value ``m_i`` in [0, 1], the perturbed image is
``x * M + baseline * (1 - M)`` (the authors' ``inpainting`` perturbation, baseline 0), and the
attribution of a cell is its *total-order Sobol index* of the target logit over the masks,
estimated with Jansen's estimator on a quasi-Monte-Carlo replicated design:

* ``A``, ``B``: the two halves of the first ``n_designs`` points of an *unscrambled* Sobol
  sequence of dimension ``2 d`` (``scipy.stats.qmc.Sobol(2 d, scramble=False)``, on the host;
  ``scramble=True`` uses scipy's Owen scrambling seeded with ``seed``), ``d`` the number of cells;
* ``C_i``: ``A`` with column ``i`` taken from ``B``;
* ``ST_i = sum_r (f(A_r) - f(C_i,r))^2 / (2 n_designs Var(f(A)))``, ``Var`` with ``ddof=1``.

This is the authors' released code (``fel-thomas/Sobol-Attribution-Method``: grid 8, 64 designs,
``ScipySobolSequence``, ``JansenEstimator``, ``inpainting``; ``n_designs`` must be a power of two).
Differences, deliberate: the authors also evaluate ``f(B)``, which Jansen's estimator never reads
(xaijax skips those ``n_designs`` forward passes: ``n_designs * (d + 1)`` in all); the authors'
masks are upsampled with ``torch.nn.functional.interpolate`` (nearest: pixel ``h`` belongs to
cell ``floor(h * g / H)``), which xaijax's default grid reproduces, but their final ``g x g``
index map is resized bilinearly with OpenCV, while xaijax gives each pixel its cell's index
(as every feature method here does; resize the ``(g, g)`` map yourself for the smooth version:
:meth:`Sobol.indices` returns it).

Memory: designs are evaluated ``chunk`` at a time in ``lax.scan`` (``chunk * N`` images); the
scores of ``A`` are kept (``n_designs * N`` numbers). A sample whose ``f(A)`` has zero variance
(the target logit does not depend on the masks) gets indices 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, check_inputs, validate_positive_int
from xaijax.methods.perturbation.features import broadcast_baseline, broadcast_features, compose, scan_scores, validate_feature_mask
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = ["Sobol", "sobol_design", "sobol_grid_mask"]

_HI = jax.lax.Precision.HIGHEST


def sobol_design(dim: int, n_designs: int, scramble: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)``, each (n_designs, dim) float64: the first ``n_designs`` points of
    ``scipy.stats.qmc.Sobol(2 dim, scramble, seed)`` split into their two halves of columns."""
    from scipy.stats import qmc

    ab = qmc.Sobol(2 * dim, scramble=scramble, seed=seed if scramble else None).random(n_designs)
    return ab[:, :dim], ab[:, dim:]


def sobol_grid_mask(size: tuple[int, int], grid_size: int) -> np.ndarray:
    """(H, W) int32 cell ids of a ``grid_size x grid_size`` grid upsampled by nearest neighbour
    (torch's ``interpolate(mode="nearest")``: pixel ``h`` in cell row ``floor(h * g / H)``)."""
    h, w = size
    rows = np.floor(np.arange(h) * grid_size / h).astype(np.int32)
    cols = np.floor(np.arange(w) * grid_size / w).astype(np.int32)
    return rows[:, None] * grid_size + cols[None, :]


@dataclasses.dataclass(frozen=True)
class Sobol(Method):
    """Total-order Sobol indices of grid cells (see the module docstring).

    Attributes:
      grid_size: cells per side (the authors' default 8; at most the image side).
      n_designs: quasi-MC designs, a power of two (the authors' default 64).
      baseline: value where a mask is 0 (normalised space); ``baselines=`` at call time
        overrides it with an array (C,), (H, W, C) or (N, H, W, C).
      scramble, seed: scipy's Owen scrambling of the Sobol sequence (the authors: unscrambled).
      chunk: designs evaluated per ``lax.scan`` step.

    Called as ``method(model, variables, x, target, feature_mask=None, baselines=None)`` ->
    (N, H, W); ``feature_mask``: (N, H, W) or (H, W) int ids ``0 .. d-1`` shared in number by
    every sample, used instead of the grid.
    """

    grid_size: int = 8
    n_designs: int = 64
    baseline: float = 0.0
    scramble: bool = False
    seed: int = 0
    chunk: int = 64

    def __post_init__(self) -> None:
        validate_positive_int("sobol", "grid_size", self.grid_size)
        validate_positive_int("sobol", "n_designs", self.n_designs)
        validate_positive_int("sobol", "chunk", self.chunk)
        if self.n_designs < 2 or self.n_designs & (self.n_designs - 1):
            raise ValueError(f"sobol: n_designs must be a power of two >= 2 (a Sobol sequence's balance), got {self.n_designs!r}")
        if not isinstance(self.scramble, bool):
            raise ValueError(f"sobol: scramble must be a bool, got {self.scramble!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"sobol: seed must be an int, got {self.seed!r}")
        if not isinstance(self.baseline, (int, float, np.number)) or isinstance(self.baseline, bool):
            raise ValueError(f"sobol: baseline must be a float (use baselines= for an array), got {self.baseline!r}")

    def _mask(self, x: Any, feature_mask: Any) -> tuple[jax.Array, int]:
        n, h, w, _ = x.shape
        if feature_mask is None:
            if self.grid_size > min(h, w):
                raise ValueError(f"sobol: grid_size {self.grid_size} is larger than the image {(h, w)}")
            return jnp.broadcast_to(jnp.asarray(sobol_grid_mask((h, w), self.grid_size)), (n, h, w)), self.grid_size**2
        m = validate_feature_mask(feature_mask, n, (h, w), "sobol")
        counts = m.reshape(n, -1).max(-1) + 1
        if (counts != counts[0]).any():
            raise ValueError(f"sobol: every sample's feature_mask must have the same number of features; got {counts.tolist()}")
        return jnp.asarray(m), int(counts[0])

    def indices(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None,
    ) -> jax.Array:
        """(N, d) total-order Sobol indices of the cells (row-major: ``(N, g, g)`` after a reshape)
        or of the features of ``feature_mask``."""
        check_inputs(x)
        mask, d = self._mask(x, feature_mask)
        base = broadcast_baseline(self.baseline if baselines is None else baselines, tuple(x.shape), x.dtype, "sobol")
        a, b = sobol_design(d, self.n_designs, self.scramble, self.seed)
        run = bind_static(_sobol, _sobol_jit, self, model, d)
        return run(variables, x, jnp.asarray(target), mask, base, jnp.asarray(a, x.dtype), jnp.asarray(b, x.dtype))

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None,
    ) -> jax.Array:
        st = self.indices(model, variables, x, target, feature_mask=feature_mask, baselines=baselines)
        mask, _ = self._mask(x, feature_mask)
        return broadcast_features(st, mask)


def _sobol(cfg: Sobol, model, d, variables, x, target, mask, base, a, b) -> jax.Array:
    n = x.shape[0]
    nd = a.shape[0]
    count = nd * (d + 1)  # A, then C_0 .. C_{d-1}

    def design(idx):  # (m,) -> (m, d) mask values
        r = idx % nd
        col = idx // nd - 1  # -1: A; i: C_i
        return jnp.where(jnp.arange(d)[None] == col[:, None], b[r], a[r])

    def make_inputs(idx):
        vals = design(idx)  # (m, d)
        pix = vals[:, mask]  # (m, N, H, W)
        return compose(x[None], base[None], pix)

    def accumulate(carry, idx, valid, sc, s0):
        fa, st = carry
        r, col = idx % nd, idx // nd - 1
        is_a = valid & (col < 0)
        fa = fa + jnp.einsum("mr,mn->rn", jax.nn.one_hot(jnp.where(is_a, r, -1), nd, dtype=x.dtype), sc, precision=_HI)
        diff2 = (fa[r] - sc) ** 2  # (m, N); A rows of this chunk are already in fa
        is_c = valid & (col >= 0)
        st = st + jnp.einsum("mi,mn->ni", jax.nn.one_hot(jnp.where(is_c, col, -1), d, dtype=x.dtype), diff2, precision=_HI)
        return fa, st

    init = (jnp.zeros((nd, n), x.dtype), jnp.zeros((n, d), x.dtype))
    (fa, st), _ = scan_scores(model, variables, x, target, count, cfg.chunk, make_inputs, accumulate, init)
    var = jnp.var(fa, axis=0, ddof=1)  # (N,)
    safe = jnp.where(var > 0, var, 1)
    return jnp.where(var[:, None] > 0, st / (2 * nd * safe[:, None]), 0)


_sobol_jit = jax.jit(_sobol, static_argnums=(0, 1, 2))


register(
    "sobol",
    Sobol,
    "Sobol attribution (Fel et al. 2021): total-order Sobol indices of grid cells, quasi-MC masks, Jansen estimator",
)
