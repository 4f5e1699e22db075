"""The ``smooth`` combinator — SmoothGrad / noise tunnel (Smilkov et al., 2017) and VarGrad.

Average a method's maps over ``n`` noisy copies of the input (``mode="mean"``), or take their
variance (``mode="var"``: VarGrad, Adebayo et al., 2018; Captum's ``NoiseTunnel`` with
``nt_type="vargrad"``). Works for every method with the
standard signature ``method(model, variables, x, target) -> (N, H, W)``. Registered prefix:
``smooth:<name>`` (:func:`get_smooth`; options prefixed ``smooth_``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods import registry
from xaijax.methods._core import Method, Wrapper, check_inputs, validate_number, validate_positive_int

__all__ = ["MODES", "Smooth", "smooth", "get_smooth"]

#: ``Smooth.mode``: the mean of the noisy maps (SmoothGrad) or their variance (VarGrad)
MODES = ("mean", "var")


@dataclasses.dataclass(frozen=True)
class Smooth(Wrapper):
    """Average (or variance) of ``method`` over ``n`` noisy copies of the input (SmoothGrad /
    noise tunnel / VarGrad).

    For each sample ``x_i`` the noise level is ``sigma_i = noise * (max(x_i) - min(x_i))``
    (the range over all pixels and channels of that sample, in the model's input space),
    and the map is ``mean_j method(x_i + sigma_i * eps_j)`` (``squared=True``: the mean of
    the *squared* maps, SmoothGrad-squared of Hooker et al. 2019). ``mode="var"`` (VarGrad)
    returns instead the variance ``mean_j m_j**2 - (mean_j m_j)**2`` of the maps ``m_j`` over
    the copies, computed as the mean squared deviation from their mean (population variance,
    ``ddof = 0``, as Captum's ``vargrad``). Channel reduction happens inside ``method``, i.e.
    before averaging (Captum's noise tunnel takes the mean/variance of per-channel
    attributions).

    The standard-normal patterns ``eps_j`` (shape (n, H, W, C), drawn in float32 and cast to
    the input's dtype) depend only on ``seed`` and the image shape, and are shared by all
    samples of a batch, so a sample's map does not
    depend on the rest of its batch (``jit``/``vmap``/batch give identical results) and is
    deterministic for a seed.

    Attributes:
      method: any attribution method (``method(model, variables, x, target) -> (N, H, W)``).
      n: number of noisy copies (>= 1).
      noise: noise standard deviation as a fraction of each sample's value range (>= 0).
      squared: average squared maps instead of maps.
      seed: PRNG seed of the noise patterns.
      chunk: noisy copies per vmapped call of ``method`` (``None``: all ``n`` at once); the
        copies are processed in ``lax.map`` chunks of this size to bound memory.
      mode: ``"mean"`` (SmoothGrad) or ``"var"`` (VarGrad; not combined with ``squared``).
    """

    method: Method
    n: int = 50
    noise: float = 0.15
    squared: bool = False
    seed: int = 0
    chunk: int | None = None
    mode: str = "mean"

    def __post_init__(self) -> None:
        self._adopt_method("smooth")
        validate_positive_int("smooth", "n", self.n)
        validate_number("smooth", "noise", self.noise, low=0.0)  # a fraction of each sample's value range
        validate_positive_int("smooth", "chunk", self.chunk, optional=True)
        if self.mode not in MODES:
            raise ValueError(f"smooth: mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "var" and self.squared:
            raise ValueError("smooth: squared=True averages squared maps; it does not combine with mode='var' (VarGrad)")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Maps (N, H, W) averaged over the noisy copies of ``x`` (N, H, W, C)."""
        check_inputs(x)
        # drawn in float32 and cast: a float64 input sees the same noise as its float32 copy
        eps = jax.random.normal(jax.random.key(self.seed), (self.n,) + tuple(x.shape[1:]), dtype=jnp.float32).astype(x.dtype)
        span = x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3))
        sigma = (jnp.asarray(self.noise, x.dtype) * span)[:, None, None, None]  # (N, 1, 1, 1)

        def one(e: jax.Array) -> jax.Array:
            m = self.method(model, variables, x + sigma * e[None], target)
            return m * m if self.squared else m

        if self.chunk is None or self.chunk >= self.n:
            maps = jax.vmap(one)(eps)
        else:
            maps = jax.lax.map(one, eps, batch_size=self.chunk)
        if self.mode == "var":
            return maps.var(axis=0)
        return maps.mean(axis=0)


def smooth(
    method: Method,
    n: int = 50,
    noise: float = 0.15,
    squared: bool = False,
    seed: int = 0,
    chunk: int | None = None,
    mode: str = "mean",
) -> Smooth:
    """Wrap ``method`` in SmoothGrad-style noise averaging (``mode="var"``: VarGrad); see :class:`Smooth`."""
    return Smooth(method, n, noise, squared, seed, chunk, mode)


_SMOOTH_FIELDS = tuple(f.name for f in dataclasses.fields(Smooth) if f.name != "method")


def get_smooth(name: str, **hparams: Any) -> Smooth:
    """``smooth`` over the registered method ``name`` (the ``smooth:<name>`` lookup).

    Keyword arguments prefixed ``smooth_`` configure the wrapper (``smooth_n=20``); the rest
    are hyperparameters of the base method.
    """
    return registry.get_wrapped("smooth", Smooth, _SMOOTH_FIELDS, name, hparams)


registry.register_prefix("smooth", get_smooth, "SmoothGrad-style noise averaging")
