"""The ``contrast`` combinator: contrastive explanations from any seed-taking method.

Contrastive methods (CLRP, Gu et al. 2018; c-EB, Zhang et al. 2016; SGLRP, Iwana et al.
2019) explain "why class t and not the others" by subtracting a map seeded with the *other*
classes from the map of the target. ``contrast(method)`` does this for any method that
accepts an explicit float seed as ``target`` (an (N, K) array weighting the model's
outputs, see :mod:`xaijax.methods.base`):

    R_t = method(x, onehot(t)),    R_d = method(x, dual),
    map = R_t - R_d * sum(R_t) / sum(R_d)       (scale="total", CLRP's scaling; per sample)
        = R_t / sum(R_t) - R_d / sum(R_d)       (scale="unit", the CLRP reference code)
        = R_t - R_d                              (scale="none")

with the dual seed ``dual`` a distribution over the classes other than ``t``:

* ``"uniform"``: ``1 / (K - 1)`` each (CLRP1 of the SGLRP authors' implementation);
* ``"logits"``: ``|z_i| / sum_{j != t} |z_j|`` from the model's logits ``z`` (CLRP authors'
  weighting);
* ``"softmax"``: ``y_i / sum_{j != t} y_j`` with ``y = softmax(z)`` (SGLRP's weighting of
  the others, ``y_t y_i``, normalised);
* a callable ``dual(logits (N, K), onehot (N, K)) -> (N, K)`` for anything else.

Sums that are zero drop the corresponding term (as :class:`xaijax.methods.lrp.CLRP`). With
``positive=True`` the result is clamped at 0 (the c-EB convention; CLRP/SGLRP show the
positive part too). For a method that is linear in its seed (gradient, gradient x input,
LRP with seed-scaled output relevance, RISE with ``score="logit"``... reduced with
``"sum"``), ``scale="none"`` equals the method applied to the seed ``onehot - dual``.

Which methods it applies to: every method with the standard signature ``method(model,
variables, x, target)`` that accepts a float seed — gradient, gradient x input, the gradient
family (Integrated Gradients, DeconvNet, Guided Backprop), LRP composites, Excitation
Backprop, Grad-CAM and the CAM family, RISE, Extremal Perturbation (``reward="simple"``),
and combinators over them (smooth, ucag). Methods that need class indices (CLRP, SGLRP:
already contrastive) reject a float seed: ``contrast`` raises a ``ValueError`` naming the
method. Methods with ``kind != "attribution"`` (pairwise similarity, D-RISE) are refused.

Both maps come from **one** call of ``method`` on the batch ``[x, x]`` with seeds ``[onehot,
dual]`` (samples of a batch are independent by the method contract), then split. Pure:
``jax.jit`` (model static) and ``jax.vmap`` apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods import registry
from xaijax.methods.base import check_inputs
from xaijax.methods.gradient import Gradient

__all__ = ["Contrast", "contrast", "dual_seed", "get_contrast"]

Method = Callable[..., jax.Array]
_DUALS = ("uniform", "logits", "softmax")
_SCALES = ("total", "unit", "none")


def dual_seed(dual: str | Callable[..., jax.Array], logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """(N, K) seed of the other classes (see the module docstring); rows sum to 1 for the named duals."""
    others = 1.0 - onehot
    if callable(dual):
        d = jnp.asarray(dual(logits, onehot))
        if d.shape != onehot.shape:
            raise ValueError(f"contrast: a dual callable must return the seed shape {onehot.shape}; got {d.shape}")
        return d.astype(onehot.dtype)
    if dual == "uniform":
        wts = others
    elif dual == "logits":
        wts = others * jnp.abs(logits)
    elif dual == "softmax":
        wts = others * jax.nn.softmax(logits, axis=-1)
    else:
        raise ValueError(f"contrast: dual must be one of {_DUALS} or a callable, got {dual!r}")
    tot = wts.sum(-1, keepdims=True)
    return jnp.where(tot > 0, wts / jnp.where(tot > 0, tot, 1.0), 0.0).astype(onehot.dtype)


def _per_sample_sum(r: jax.Array) -> jax.Array:
    return r.reshape(r.shape[0], -1).sum(-1).reshape((-1,) + (1,) * (r.ndim - 1))


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(b == 0, 0.0, a / jnp.where(b == 0, 1.0, b))


@dataclasses.dataclass(frozen=True)
class Contrast:
    """``method``'s map for the target minus its map for the other classes (module docstring).

    Attributes:
      method: an attribution method that accepts float seeds as target.
      dual: ``"uniform"``, ``"logits"``, ``"softmax"`` or a callable ``(logits, onehot) -> seed``.
      scale: ``"total"`` (dual scaled to the target's total, CLRP), ``"unit"`` (both
        normalised to unit sum) or ``"none"`` (plain difference).
      positive: clamp the result at 0.
    """

    method: Method
    dual: str | Callable[..., jax.Array] = "uniform"
    scale: str = "total"
    positive: bool = False

    def __post_init__(self) -> None:
        if not callable(self.method):
            raise TypeError(f"contrast needs a callable attribution method, got {self.method!r}")
        kind = getattr(self.method, "kind", "attribution")
        if kind != "attribution":
            raise ValueError(
                f"contrast applies to attribution methods (model, variables, x, target) -> (N, H, W); "
                f"{type(self.method).__name__} is a {kind!r} method"
            )
        if not callable(self.dual) and self.dual not in _DUALS:
            raise ValueError(f"contrast: dual must be one of {_DUALS} or a callable, got {self.dual!r}")
        if self.scale not in _SCALES:
            raise ValueError(f"contrast: scale must be one of {_SCALES}, got {self.scale!r}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) contrastive map of ``x`` (N, H, W, C) for class indices ``target`` (int or (N,))."""
        check_inputs(x)
        n = x.shape[0]
        t = jnp.asarray(target)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(
                f"contrast needs class indices as target (an int or an int array of shape ({n},)); got a {t.dtype} array"
            )
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (n,))
        if t.shape != (n,):
            raise ValueError(f"contrast: target must be an int or an int array of shape ({n},); got shape {t.shape}")
        needs_logits = self.dual in ("logits", "softmax") or callable(self.dual)
        if needs_logits:
            logits = model.apply(variables, x)
        else:
            logits = jax.eval_shape(lambda xx: model.apply(variables, xx), x)
        if len(logits.shape) != 2:
            raise ValueError(f"contrast needs a model with (N, K) outputs; got output shape {logits.shape}")
        k = logits.shape[-1]
        if k < 2:
            raise ValueError(f"contrast needs at least 2 classes, the model has {k}")
        if not isinstance(t, jax.core.Tracer):
            tn = np.asarray(t)
            bad = tn[(tn < 0) | (tn >= k)]
            if bad.size:
                raise ValueError(f"contrast: target class {int(bad[0])} is out of range for a model with {k} outputs")
        onehot = jax.nn.one_hot(t, k, dtype=jnp.float32)
        lg = logits.astype(jnp.float32) if needs_logits else jnp.zeros((n, k), jnp.float32)
        dual = dual_seed(self.dual, lg, onehot)
        seeds = jnp.concatenate([onehot, dual], axis=0).astype(x.dtype)
        try:
            maps = self.method(model, variables, jnp.concatenate([x, x], axis=0), seeds)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"contrast: {type(self.method).__name__} failed on float seeds (N, K) as target: {e} -- contrast needs "
                "a method that accepts float seeds (gradient, LRP, Grad-CAM, RISE, ...); CLRP and SGLRP take class "
                "indices only and are contrastive already"
            ) from None
        r_t, r_d = maps[:n], maps[n:]
        if self.scale == "none":
            out = r_t - r_d
        else:
            st, sd = _per_sample_sum(r_t), _per_sample_sum(r_d)
            if self.scale == "total":
                out = r_t - r_d * _safe_div(st, sd)
            else:
                out = _safe_div(r_t, st) - _safe_div(r_d, sd)
        if self.positive:
            out = jnp.maximum(out, 0.0)
        return out.astype(jnp.float32)


def contrast(
    method: Method, dual: str | Callable[..., jax.Array] = "uniform", scale: str = "total", positive: bool = False
) -> Contrast:
    """Make ``method`` contrastive; see :class:`Contrast`."""
    return Contrast(method, dual, scale, positive)


_CONTRAST_FIELDS = ("dual", "scale", "positive")


def get_contrast(name: str, **hparams: Any) -> Contrast:
    """``contrast`` over the registered method ``name``.

    Keyword arguments prefixed ``contrast_`` configure the wrapper (``contrast_dual="softmax"``,
    ``contrast_scale="none"``, ``contrast_positive=True``); the rest are hyperparameters of
    the base method, built with :func:`xaijax.methods.registry.get`.
    """
    opts = {key[9:]: v for key, v in hparams.items() if key.startswith("contrast_")}
    bad = sorted(set(opts) - set(_CONTRAST_FIELDS))
    if bad:
        raise ValueError(
            f"unknown contrast option(s) {', '.join('contrast_' + b for b in bad)}; use contrast_ + one of {_CONTRAST_FIELDS}"
        )
    base = registry.get(name, **{key: v for key, v in hparams.items() if not key.startswith("contrast_")})
    return Contrast(base, **opts)


def _contrastive_gradient(reduce: str = "sum", dual: Any = "uniform", scale: str = "none", positive: bool = False) -> Contrast:
    return Contrast(Gradient(False, reduce), dual, scale, positive)


registry.register(
    "contrastive-gradient",
    _contrastive_gradient,
    "contrast over the input gradient: d(z_t - mean_{i!=t} z_i)/dx summed over channels (uniform dual, no scaling)",
)
