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

The seeds may be weighted per sample (``weights=``): ``"one"`` (default) uses them as they
are; ``"abs-logit"`` multiplies both by ``|z_t|`` (CLRP's output relevance); and
``"softmax-gradient"`` multiplies the target's by ``y_t (1 - y_t) + 1e-8`` and the dual's
by ``y_t sum_{i != t} y_i`` (with the ``"softmax"`` dual: the entries ``y_t y_i`` of the
softmax gradient, SGLRP). Under ``scale="total"`` the dual's weight cancels.

``dual="target"`` with a ``dual_method`` contrasts the target with itself under another
method (CLRP2: the classifier's weights negated, ``LRP(..., flip_classifier=True)``).

Sums that are zero drop the corresponding term. With
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
dual]`` (samples of a batch are independent by the method contract), then split (two calls
when a ``dual_method`` is given). Everything is computed in the input's dtype. Pure:
``jax.jit`` (model static) and ``jax.vmap`` apply.

Registered prefix: ``contrast:<name>`` (:func:`get_contrast`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.imageops import safe_divide
from xaijax.methods import registry
from xaijax.methods._core import Method, Wrapper, as_method, check_inputs, class_indices

__all__ = ["Contrast", "contrast", "dual_seed", "seed_weights", "get_contrast"]

_DUALS = ("uniform", "logits", "softmax", "target")
_SCALES = ("total", "unit", "none")
_WEIGHTS = ("one", "abs-logit", "softmax-gradient")


def dual_seed(dual: str | Callable[..., jax.Array], logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """(N, K) seed of the other classes (see the module docstring); rows sum to 1 for the named duals."""
    others = 1.0 - onehot
    if dual == "target":
        return onehot
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
    return safe_divide(wts, wts.sum(-1, keepdims=True)).astype(onehot.dtype)


def seed_weights(weights: str | Callable[..., Any], logits: jax.Array, onehot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample factors ``(w_target, w_dual)``, each (N, 1), of the target and dual seeds (module docstring)."""
    if callable(weights):
        wt, wd = weights(logits, onehot)
        return jnp.asarray(wt, onehot.dtype).reshape(-1, 1), jnp.asarray(wd, onehot.dtype).reshape(-1, 1)
    if weights == "one":
        one = jnp.ones((onehot.shape[0], 1), onehot.dtype)
        return one, one
    if weights == "abs-logit":
        z_t = jnp.abs((onehot * logits).sum(-1, keepdims=True))
        return z_t, z_t
    if weights == "softmax-gradient":
        y = jax.nn.softmax(logits, axis=-1)
        y_t = (onehot * y).sum(-1, keepdims=True)
        return y_t * (1.0 - y_t) + 1e-8, y_t * ((1.0 - onehot) * y).sum(-1, keepdims=True)
    raise ValueError(f"contrast: weights must be one of {_WEIGHTS} or a callable, got {weights!r}")


def _per_sample_sum(r: jax.Array) -> jax.Array:
    return r.reshape(r.shape[0], -1).sum(-1).reshape((-1,) + (1,) * (r.ndim - 1))


@dataclasses.dataclass(frozen=True)
class Contrast(Wrapper):
    """``method``'s map for the target minus its map for the other classes (module docstring).

    Attributes:
      method: an attribution method that accepts float seeds as target.
      dual: ``"uniform"``, ``"logits"``, ``"softmax"`` or a callable ``(logits, onehot) -> seed``.
      scale: ``"total"`` (dual scaled to the target's total, CLRP), ``"unit"`` (both
        normalised to unit sum) or ``"none"`` (plain difference).
      positive: clamp the result at 0.
      weights: ``"one"``, ``"abs-logit"``, ``"softmax-gradient"`` or a callable
        ``(logits, onehot) -> (w_target, w_dual)`` scaling the two seeds per sample.
      dual_method: the method that explains the dual seed (``None``: ``method``).
    """

    method: Method
    dual: str | Callable[..., jax.Array] = "uniform"
    scale: str = "total"
    positive: bool = False
    weights: str | Callable[..., Any] = "one"
    dual_method: Method | None = None

    accepts_seed = False  # a contrast needs class indices (its own seeds come from them)

    def __post_init__(self) -> None:
        self._adopt_method("contrast")  # its kind is the wrapped method's: a contrastive CAM is still a CAM
        if self.dual_method is not None:
            object.__setattr__(self, "dual_method", as_method(self.dual_method))
            if not self.dual_method.explains_classifier:
                raise ValueError(f"contrast: the dual method {type(self.dual_method).__name__} is a {self.dual_method.kind!r} method")
        for m in (self.method, self.dual_method):
            if m is not None and not m.accepts_seed:
                raise ValueError(
                    f"contrast: {type(m).__name__} takes class indices only, not float seeds (N, K); contrast needs "
                    "a method that accepts float seeds (gradient, LRP, Grad-CAM, RISE, ...); CLRP and SGLRP are "
                    "contrastive already"
                )
        if not callable(self.dual) and self.dual not in _DUALS:
            raise ValueError(f"contrast: dual must be one of {_DUALS} or a callable, got {self.dual!r}")
        if self.dual == "target" and self.dual_method is None:
            raise ValueError("contrast: dual='target' contrasts the target with itself; it needs a dual_method")
        if self.scale not in _SCALES:
            raise ValueError(f"contrast: scale must be one of {_SCALES}, got {self.scale!r}")
        if not callable(self.weights) and self.weights not in _WEIGHTS:
            raise ValueError(f"contrast: weights must be one of {_WEIGHTS} or a callable, got {self.weights!r}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) contrastive map of ``x`` (N, H, W, C) for class indices ``target`` (int or (N,))."""
        check_inputs(x)
        n = x.shape[0]
        needs_logits = self.dual in ("logits", "softmax") or callable(self.dual) or self.weights != "one"
        if needs_logits:
            logits = model.apply(variables, x)
        else:
            logits = jax.eval_shape(lambda xx: model.apply(variables, xx), x)
        if len(logits.shape) != 2:
            raise ValueError(f"contrast needs a model with (N, K) outputs; got output shape {logits.shape}")
        k = logits.shape[-1]
        if k < 2:
            raise ValueError(f"contrast needs at least 2 classes, the model has {k}")
        t = class_indices(target, n, k, "contrast")
        onehot = jax.nn.one_hot(t, k, dtype=x.dtype)
        lg = logits.astype(x.dtype) if needs_logits else jnp.zeros((n, k), x.dtype)
        w_t, w_d = seed_weights(self.weights, lg, onehot)
        dual = dual_seed(self.dual, lg, onehot)
        if self.dual_method is None:
            maps = self.method(model, variables, jnp.concatenate([x, x], axis=0), jnp.concatenate([w_t * onehot, w_d * dual]))
            r_t, r_d = maps[:n], maps[n:]
        else:
            r_t = self.method(model, variables, x, w_t * onehot)
            r_d = self.dual_method(model, variables, x, w_d * dual)
        if self.scale == "none":
            out = r_t - r_d
        else:
            st, sd = _per_sample_sum(r_t), _per_sample_sum(r_d)
            if self.scale == "total":
                out = r_t - r_d * safe_divide(st, sd)
            else:
                out = safe_divide(r_t, st) - safe_divide(r_d, sd)
        if self.positive:
            out = jnp.maximum(out, 0.0)
        return out


def contrast(
    method: Method,
    dual: str | Callable[..., jax.Array] = "uniform",
    scale: str = "total",
    positive: bool = False,
    weights: str | Callable[..., Any] = "one",
    dual_method: Method | None = None,
) -> Contrast:
    """Make ``method`` contrastive; see :class:`Contrast`."""
    return Contrast(method, dual, scale, positive, weights, dual_method)


_CONTRAST_FIELDS = ("dual", "scale", "positive", "weights")


def get_contrast(name: str, **hparams: Any) -> Contrast:
    """``contrast`` over the registered method ``name``.

    Keyword arguments prefixed ``contrast_`` configure the wrapper (``contrast_dual="softmax"``,
    ``contrast_scale="none"``, ``contrast_positive=True``); the rest are hyperparameters of
    the base method, built with :func:`xaijax.methods.registry.get`.
    """
    return registry.get_wrapped("contrast", Contrast, _CONTRAST_FIELDS, name, hparams)


registry.register_prefix("contrast", get_contrast, "contrast (target minus the other classes)")
