"""Occlusion (Zeiler and Fergus, ECCV 2014), feature ablation and feature permutation (Captum's
``Occlusion``, ``FeatureAblation`` and ``FeaturePermutation``; permutation importance after
Breiman 2001 / Fisher et al. 2019).

All three score a perturbed input by the target logit (``sum(seed * logits)``, the score of
:func:`xaijax.methods._core.target_scores`) and attribute the *drop* ``score(x) -
score(perturbed)`` — Captum's ``initial_eval - modified_eval`` with ``target`` selecting the
logit.

* ``occlusion`` (:class:`Occlusion`): a ``window = (h, w)`` rectangle of pixels (all channels)
  slides with ``stride = (sh, sw)`` and is replaced by the baseline; each pixel gets the mean
  drop over the windows covering it. Window positions follow Captum exactly: ``ceil((H - h) /
  sh) + 1`` positions per axis at ``0, sh, 2 sh, ...``; the last window may run past the border
  and is then cut there (Captum pads with a negative amount). Captum's
  ``Occlusion.attribute(x_nchw, sliding_window_shapes=(C, h, w), strides=(C, sh, sw),
  baselines=b)`` gives, on every channel, the value of xaijax's ``Occlusion(window=(h, w),
  stride=(sh, sw))`` map. A window larger than the image is an error (Captum asserts), and so is
  a stride larger than the window (pixels no window covers), unless the window spans that axis.
* ``feature-ablation`` (:class:`FeatureAblation`): each feature of a feature mask (see
  :mod:`~xaijax.methods.perturbation.features`: a grid by default, SLIC superpixels or a given
  mask) is replaced by the baseline on its own; each pixel gets its feature's drop (Captum's
  ``FeatureAblation`` with ``feature_mask`` of shape (N, 1, H, W)).
* ``feature-permutation`` (:class:`FeaturePermutation`): Captum's semantics — for feature ``f``
  a random permutation ``sigma`` of the *batch* (never the identity: redrawn until it is not,
  as Captum does) is drawn, and sample ``i``'s pixels of feature ``f`` (by sample ``i``'s mask)
  take sample ``sigma(i)``'s values at the same pixels; each pixel gets its feature's drop,
  averaged over ``n_samples`` independent permutations per feature (Captum: one). A sample's map
  therefore depends on the *other* samples of the batch (that is the method): it needs a batch
  of N >= 2 (Captum asserts ``batch_size > 1``); a batch of 1 raises
  :class:`~xaijax.methods._core.NotApplicable` (a ``ValueError``) — the method is not defined
  for one sample. The permutations depend on ``seed``, the feature, the draw and N only.

Channels: a feature (window, cell, superpixel) covers all channels of its pixels; Captum then
returns the same value on every channel of a pixel, and xaijax returns that value once (Captum's
attribution summed over channels is ``C`` times xaijax's map).

Baselines: the field ``baseline`` (a float, default 0: in normalised space, the dataset's mean
colour), or the call keyword ``baselines=`` — an array of shape (C,), (H, W, C) or (N, H, W, C)
(a blurred copy, per-sample references); any other shape is a ``ValueError``.

Memory and jit: perturbed inputs are made and evaluated ``chunk`` at a time inside
``lax.scan`` (``chunk * N`` images in memory, whatever the number of windows or features); the
computation is one jitted program (called unjitted, the method jits it itself; under the
caller's ``jit``/``vmap`` it is traced inline). Float64 in, float64 out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, NotApplicable, check_inputs, validate_positive_int
from xaijax.methods.perturbation.features import (
    broadcast_baseline,
    broadcast_features,
    compose,
    resolve_feature_mask,
    scan_scores,
    validate_segmentation,
)
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = ["Occlusion", "FeatureMethod", "FeatureAblation", "FeaturePermutation", "occlusion_positions", "batch_permutation", "feature_ablation_values"]


def _pair(owner: str, name: str, v: Any) -> tuple[int, int]:
    vals = (v, v) if not isinstance(v, (tuple, list)) else tuple(v)
    if len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 1 for a in vals):
        raise ValueError(f"{owner}: {name} must be a positive int or a pair (rows, cols) of them, got {v!r}")
    return int(vals[0]), int(vals[1])


def occlusion_positions(size: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of the windows along one axis (Captum: ``ceil((size - window) / stride) + 1``
    positions at multiples of ``stride``; the last window is cut at the border)."""
    return np.arange(int(np.ceil((size - window) / stride)) + 1) * stride


def _check_window(owner: str, size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> None:
    for axis, d, wd, st in zip(("rows", "cols"), size, window, stride):
        if wd > d:
            raise ValueError(f"{owner}: window {window} is larger than the image {size} ({axis}: {wd} > {d})")
        if st > wd and wd < d:
            raise ValueError(
                f"{owner}: stride {stride} is larger than the window {window} ({axis}): pixels between windows "
                "would never be occluded (Captum refuses this too)"
            )


def _baseline_of(owner: str, field: float, given: Any, x: jax.Array) -> jax.Array:
    return broadcast_baseline(field if given is None else given, tuple(x.shape), x.dtype, owner)


@dataclasses.dataclass(frozen=True)
class Occlusion(Method):
    """Occlusion: mean drop of the target logit over the sliding windows covering each pixel.

    Attributes:
      window: (rows, cols) of the occluding rectangle, or one int (Captum's
        ``sliding_window_shapes=(C, rows, cols)``). Default 8.
      stride: (rows, cols) step between windows, or one int (Captum's ``strides=(C, rows,
        cols)``; Captum's default stride is 1). Default 4 (half the window).
      baseline: fill value of the occluded pixels (normalised space); ``baselines=`` at call
        time overrides it with an array.
      chunk: windows evaluated per ``lax.scan`` step (memory ~ chunk x batch images).

    Called as ``method(model, variables, x, target, baselines=None)`` -> (N, H, W).
    """

    window: int | tuple[int, int] = 8
    stride: int | tuple[int, int] = 4
    baseline: float = 0.0
    chunk: int = 64

    def __post_init__(self) -> None:
        _pair("occlusion", "window", self.window)
        _pair("occlusion", "stride", self.stride)
        validate_positive_int("occlusion", "chunk", self.chunk)
        if not isinstance(self.baseline, (int, float, np.number)) or isinstance(self.baseline, bool):
            raise ValueError(f"occlusion: baseline must be a float (use baselines= for an array), got {self.baseline!r}")

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, baselines: Any = None
    ) -> jax.Array:
        check_inputs(x)
        _, h, w, _ = x.shape
        window, stride = _pair("occlusion", "window", self.window), _pair("occlusion", "stride", self.stride)
        _check_window("occlusion", (h, w), window, stride)
        base = _baseline_of("occlusion", self.baseline, baselines, x)
        run = bind_static(_occlusion, _occlusion_jit, self, model)
        return run(variables, x, jnp.asarray(target), base)


def _occlusion(cfg: Occlusion, model: nn.Module, variables, x, target, base) -> jax.Array:
    n, h, w, _ = x.shape
    (wh, ww), (sh, sw) = _pair("occlusion", "window", cfg.window), _pair("occlusion", "stride", cfg.stride)
    ys, xs = occlusion_positions(h, wh, sh), occlusion_positions(w, ww, sw)
    count = len(ys) * len(xs)
    ys_j, xs_j = jnp.asarray(ys, jnp.int32), jnp.asarray(xs, jnp.int32)
    rows, cols = jnp.arange(h), jnp.arange(w)

    def windows(idx):  # (m,) -> (m, H, W) bool: True inside the window
        y0, x0 = ys_j[idx // len(xs)], xs_j[idx % len(xs)]
        r = (rows[None] >= y0[:, None]) & (rows[None] < y0[:, None] + wh)
        c = (cols[None] >= x0[:, None]) & (cols[None] < x0[:, None] + ww)
        return r[:, :, None] & c[:, None, :]

    def make_inputs(idx):
        keep = ~windows(idx)  # (m, H, W)
        return compose(x[None], base[None], jnp.broadcast_to(keep[:, None], (idx.shape[0], n, h, w)))

    def accumulate(acc, idx, valid, sc, s0):
        drop = jnp.where(valid[:, None], s0[None] - sc, 0)  # (m, N)
        return acc + jnp.einsum("mn,mhw->nhw", drop, windows(idx).astype(x.dtype), precision=jax.lax.Precision.HIGHEST)

    acc, _ = scan_scores(model, variables, x, target, count, cfg.chunk, make_inputs, accumulate, jnp.zeros((n, h, w), x.dtype))
    cy = ((np.arange(h)[:, None] >= ys[None]) & (np.arange(h)[:, None] < ys[None] + wh)).sum(1)
    cx = ((np.arange(w)[:, None] >= xs[None]) & (np.arange(w)[:, None] < xs[None] + ww)).sum(1)
    return acc / jnp.asarray(np.outer(cy, cx), x.dtype)


_occlusion_jit = jax.jit(_occlusion, static_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class FeatureMethod(Method):
    """Shared fields of the methods over a feature mask (see :mod:`~xaijax.methods.perturbation.features`).

    Attributes:
      segmentation: ``"grid"`` (cells of ``cell`` pixels, the default) or ``"slic"`` (SLIC
        superpixels from scikit-image, concrete inputs only) — used when no ``feature_mask=`` is
        given at call time.
      cell: grid cell side in pixels (an int or (rows, cols)).
      n_segments, compactness: SLIC's parameters.
      baseline: value of removed features (normalised space); ``baselines=`` overrides it.
      chunk: perturbed inputs evaluated per ``lax.scan`` step (memory ~ chunk x batch images).
    """

    segmentation: str = "grid"
    cell: int | tuple[int, int] = 16
    n_segments: int = 50
    compactness: float = 10.0
    baseline: float = 0.0
    chunk: int = 64

    _name = "feature method"

    def _validate(self) -> None:
        validate_segmentation(self._name, self.segmentation, self.cell, self.n_segments)
        validate_positive_int(self._name, "chunk", self.chunk)
        if not isinstance(self.baseline, (int, float, np.number)) or isinstance(self.baseline, bool):
            raise ValueError(f"{self._name}: baseline must be a float (use baselines= for an array), got {self.baseline!r}")

    def _prepare(self, x: jax.Array, feature_mask: Any, baselines: Any) -> tuple[jax.Array, int, jax.Array]:
        check_inputs(x)
        mask, f = resolve_feature_mask(self._name, x, feature_mask, self.segmentation, self.cell, self.n_segments, self.compactness)
        return mask, f, _baseline_of(self._name, self.baseline, baselines, x)


@dataclasses.dataclass(frozen=True)
class FeatureAblation(FeatureMethod):
    """Feature ablation: each feature replaced by the baseline alone; a pixel gets its
    feature's drop of the target logit. Fields: see :class:`FeatureMethod`.

    Called as ``method(model, variables, x, target, feature_mask=None, baselines=None)`` ->
    (N, H, W); ``feature_mask``: (N, H, W) or (H, W) int ids ``0 .. F-1`` (concrete).
    """

    _name = "feature-ablation"

    def __post_init__(self) -> None:
        self._validate()

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None,
        baselines: Any = None,
    ) -> jax.Array:
        mask, f, base = self._prepare(x, feature_mask, baselines)
        run = bind_static(_ablation, _ablation_jit, self, model, f)
        return run(variables, x, jnp.asarray(target), mask, base)


def feature_ablation_values(cfg: FeatureAblation, model: nn.Module, f: int, variables, x, target, mask, base) -> jax.Array:
    """(N, F) drops of the target logit when each feature alone is replaced by the baseline."""
    n, h, w, _ = x.shape

    def make_inputs(idx):
        keep = mask[None] != idx[:, None, None, None]  # (m, N, H, W)
        return compose(x[None], base[None], keep)

    def accumulate(phi, idx, valid, sc, s0):
        drop = jnp.where(valid[:, None], s0[None] - sc, 0)  # (m, N)
        return phi + jnp.einsum("mn,mf->nf", drop, jax.nn.one_hot(idx, f, dtype=x.dtype), precision=jax.lax.Precision.HIGHEST)

    phi, _ = scan_scores(model, variables, x, target, f, cfg.chunk, make_inputs, accumulate, jnp.zeros((n, f), x.dtype))
    return phi


def _ablation(cfg, model, f, variables, x, target, mask, base) -> jax.Array:
    return broadcast_features(feature_ablation_values(cfg, model, f, variables, x, target, mask, base), mask)


_ablation_jit = jax.jit(_ablation, static_argnums=(0, 1, 2))


def batch_permutation(key: jax.Array, n: int) -> jax.Array:
    """A uniformly random permutation of ``range(n)`` other than the identity (n >= 2): redrawn
    from ``fold_in(key, attempt)`` until it is not the identity, as Captum redraws."""
    ident = jnp.arange(n)

    def draw(a):
        return jax.random.permutation(jax.random.fold_in(key, a), n)

    def cond(state):
        return jnp.all(state[1] == ident)

    def body(state):
        return state[0] + 1, draw(state[0] + 1)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), draw(0)))[1]


@dataclasses.dataclass(frozen=True)
class FeaturePermutation(FeatureMethod):
    """Feature permutation importance over the batch (Captum's ``FeaturePermutation``; see the
    module docstring for the batch semantics: N >= 2, samples are coupled by design).

    Attributes (besides those of :class:`FeatureMethod`; ``baseline`` is unused — the batch
    is the reference):
      n_samples: independent batch permutations per feature, averaged (Captum: 1).
      seed: PRNG seed; permutation ``r`` of feature ``f`` comes from
        ``fold_in(fold_in(key(seed), r), f)`` (independent of ``chunk`` and jit).

    Called as ``method(model, variables, x, target, feature_mask=None)`` -> (N, H, W).
    """

    n_samples: int = 1
    seed: int = 0

    _name = "feature-permutation"

    def __post_init__(self) -> None:
        self._validate()
        validate_positive_int(self._name, "n_samples", self.n_samples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"{self._name}: seed must be an int, got {self.seed!r}")

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, feature_mask: Any = None
    ) -> jax.Array:
        check_inputs(x)
        if x.shape[0] < 2:
            raise NotApplicable(
                "feature-permutation permutes each feature across the batch and needs a batch of N >= 2 samples "
                f"(got N = {x.shape[0]}); Captum asserts the same. For one image use feature-ablation"
            )
        mask, f, _ = self._prepare(x, feature_mask, None)
        run = bind_static(_permutation, _permutation_jit, dataclasses.replace(self, seed=0), model, f)  # seed traced
        return run(variables, x, jnp.asarray(target), mask, jnp.asarray(self.seed))


def _permutation(cfg: FeaturePermutation, model, f, variables, x, target, mask, seed) -> jax.Array:
    n, h, w, _ = x.shape
    key = jax.random.key(seed)

    def make_inputs(idx):  # idx = draw * F + feature
        feat, draw = idx % f, idx // f
        sigma = jax.vmap(lambda r, ff: batch_permutation(jax.random.fold_in(jax.random.fold_in(key, r), ff), n))(draw, feat)
        inside = mask[None] == feat[:, None, None, None]  # (m, N, H, W): sample i's pixels of the feature
        return jnp.where(inside[..., None], x[sigma], x[None])

    def accumulate(phi, idx, valid, sc, s0):
        drop = jnp.where(valid[:, None], s0[None] - sc, 0)
        return phi + jnp.einsum("mn,mf->nf", drop, jax.nn.one_hot(idx % f, f, dtype=x.dtype), precision=jax.lax.Precision.HIGHEST)

    count = f * cfg.n_samples
    phi, _ = scan_scores(model, variables, x, target, count, cfg.chunk, make_inputs, accumulate, jnp.zeros((n, f), x.dtype))
    return broadcast_features(phi / cfg.n_samples, mask)


_permutation_jit = jax.jit(_permutation, static_argnums=(0, 1, 2))


register("occlusion", Occlusion, "Occlusion (Zeiler & Fergus 2014): mean target-logit drop over sliding baseline windows (Captum Occlusion)")
register("feature-ablation", FeatureAblation, "Feature ablation: target-logit drop per feature (grid/SLIC/given mask) replaced by a baseline (Captum FeatureAblation)")
register("feature-permutation", FeaturePermutation, "Permutation importance (Breiman 2001; Captum FeaturePermutation): logit drop when a feature is permuted across the batch")
