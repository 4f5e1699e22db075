"""Robustness metrics: max/avg sensitivity, local Lipschitz, continuity, consistency, RIS/ROS/RRS.

Method-based metrics (:func:`xaijax.metrics.get_method_metric`): each re-runs an explanation
method on perturbed copies of the images and compares the maps. They share one call::

    metric = get_method_metric("max-sensitivity", n_samples=10)
    values = metric(model, variables, method, images, targets)   # {"max_sensitivity": (N,), ...}
    metric.summarize(values)                                      # {"max_sensitivity": 0.31}

Conventions shared by every metric here:

* ``images`` (N, H, W, C) normalised NHWC inputs, ``targets`` (N,) class indices, ``maps`` the
  method's (N, H, W) maps of ``images`` (computed when ``None``). Values are per image, float64.
* **Batching.** All perturbed inputs go through the method in one jitted program: the
  samples are drawn inside it and run in blocks (``lax.map``) of ``max(1, batch_size // N)``
  samples of each of the N images per method call (a method is batched already), so about
  ``max(batch_size, N)`` perturbed images are alive at a time. Methods that run their own loop (``runs_own_loop``) are called
  block by block from Python instead.
* **Randomness.** ``seed`` (int). The noise of an image depends on the seed and on the image's
  own values only (a hash of its bytes is folded into the key), never on its position in the
  batch: a batch gives the same values as its images one by one. ``perturbed=`` (an
  (N, S, H, W, C) array) replaces the sampler by explicit perturbed inputs (used to hand
  Quantus and xaijax the very same perturbations).
* **Map post-processing** before any comparison: ``normalise="max"`` divides each map by its
  largest absolute value (maps that are all zero are left alone), then ``abs_maps`` takes the
  absolute value. Quantus 0.6.0 normalises by the maximum over the *whole batch* by default
  (its ``normalise_by_max`` reduces over every axis including the batch); xaijax normalises
  each image on its own (Quantus' ``normalise_func_kwargs={"normalise_axes": [1, 2, 3]}``).
* **Prediction changes.** A perturbed input whose arg-max class differs from the original's
  is dropped from the max / mean when ``skip_changed_prediction`` (value NaN if every sample
  is dropped); the arrays ``changed`` report the fraction of such samples per image.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, check_inputs, class_indices
from xaijax.metrics.registry import register_method_metric
from xaijax.models import taps
from xaijax.static_jit import bind_static

__all__ = [
    "check_method_metric_inputs",
    "method_maps",
    "image_keys",
    "postprocess_maps",
    "explain_blocks",
    "map_blocks",
    "model_logits",
    "translate_x",
    "continuity_shifts",
    "consistency_scores",
    "MaxSensitivity",
    "AvgSensitivity",
    "LocalLipschitz",
    "Continuity",
    "Consistency",
    "RelativeInputStability",
    "RelativeOutputStability",
    "RelativeRepresentationStability",
]


# ----------------------------------------------------------------------------- shared pieces


def check_method_metric_inputs(model: Any, variables: Any, method: Any, images: Any, targets: Any, maps: Any = None):
    """Validate the arguments of a method metric; returns ``(images, targets, maps)`` as arrays.

    ``images`` keeps its floating dtype (float64 stays float64); ``targets`` becomes (N,)
    int32 range-checked against the model's outputs; ``maps`` (if given) must be (N, H, W).
    """
    if not callable(method):
        raise TypeError(f"method must be an xaijax Method (method(model, variables, x, target) -> maps); got {method!r}")
    if isinstance(method, Method) and not method.explains_classifier:
        raise ValueError(f"method must explain a classifier (kind 'attribution' or 'cam'); got kind {method.kind!r}")
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    check_inputs(images)
    x = jnp.asarray(images)
    n = x.shape[0]
    logits = jax.eval_shape(lambda v, xx: model.apply(v, xx), variables, x)
    if len(logits.shape) != 2 or logits.shape[0] != n:
        raise ValueError(f"model must map images (N, H, W, C) to logits (N, K); got output shape {logits.shape}")
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must be class indices (an int or (N,) ints); got dtype {t.dtype}")
    t = class_indices(jnp.asarray(t, jnp.int32), n, int(logits.shape[1]))
    if maps is not None:
        maps = jnp.asarray(maps)
        if maps.shape != x.shape[:3]:
            raise ValueError(f"maps must be (N, H, W) = {x.shape[:3]} like the images; got shape {maps.shape}")
    return x, jnp.asarray(t, jnp.int32), maps


def image_keys(images: Any, seed: int) -> jax.Array:
    """(N,) PRNG keys: ``fold_in(key(seed), crc32(bytes of image i))`` — a key that depends on the
    seed and the image's own values, not on its position in the batch."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int; got {seed!r}")
    arr = np.ascontiguousarray(np.asarray(images))
    h = np.array([zlib.crc32(arr[i].tobytes()) & 0x7FFFFFFF for i in range(arr.shape[0])], np.uint32)
    base = jax.random.key(int(seed))
    return jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.asarray(h))


def postprocess_maps(a: jax.Array, normalise: str, abs_maps: bool) -> jax.Array:
    """Per-map post-processing over the last two axes (H, W): ``normalise`` ``"max"`` (divide by
    the largest |value|; an all-zero map is left as is) or ``"none"``; then ``abs_maps``."""
    if normalise == "max":
        m = jnp.abs(a).max(axis=(-2, -1), keepdims=True)
        a = a / jnp.where(m > 0, m, 1.0)
    elif normalise != "none":
        raise ValueError(f"normalise must be 'max' or 'none'; got {normalise!r}")
    return jnp.abs(a) if abs_maps else a


def _validate_common(obj: Any) -> None:
    for name in ("n_samples", "batch_size"):
        v = getattr(obj, name, 1)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if getattr(obj, "normalise", "none") not in ("max", "none"):
        raise ValueError(f"normalise must be 'max' or 'none'; got {obj.normalise!r}")


def _call_method(method: Any, model: nn.Module, variables: Any, x: jax.Array, t: jax.Array) -> jax.Array:
    return method(model, variables, x, t)


_call_method_jit = jax.jit(_call_method, static_argnums=(0, 1))


def map_blocks(fn: Callable[[jax.Array, jax.Array], jax.Array], xs: jax.Array, ts: jax.Array, batch_size: int, *, python_loop: bool = False) -> jax.Array:
    """``fn(x_block, t_block)`` over blocks of ``batch_size`` rows of ``xs`` (M, ...) and ``ts``
    (M,), concatenated: ``lax.map`` over the blocks (a Python loop with ``python_loop``). The
    last block is padded by repeating the last row; the padding is dropped."""
    m = xs.shape[0]
    b = min(batch_size, m)
    nb = -(-m // b)
    pad = nb * b - m
    if pad:
        xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, 0)])
        ts = jnp.concatenate([ts, jnp.repeat(ts[-1:], pad, 0)])
    xb = xs.reshape((nb, b) + xs.shape[1:])
    tb = ts.reshape((nb, b))
    if python_loop:
        out = jnp.stack([fn(xb[i], tb[i]) for i in range(nb)])
    else:
        out = jax.lax.map(lambda a: fn(a[0], a[1]), (xb, tb))
    return out.reshape((nb * b,) + out.shape[2:])[:m]


def explain_blocks(method: Any, model: nn.Module, variables: Any, xs: jax.Array, ts: jax.Array, batch_size: int) -> jax.Array:
    """Maps of many inputs: ``xs`` (M, H, W, C), ``ts`` (M,) -> (M, H, W), ``batch_size`` inputs
    per method call (``lax.map`` over blocks inside one jitted program; Python blocks for methods
    that run their own loop)."""
    return map_blocks(lambda a, t: method(model, variables, a, t), xs, ts, batch_size, python_loop=_own_loop(method))


def _own_loop(method: Any) -> bool:
    return isinstance(method, Method) and method.runs_own_loop


def method_maps(method, model, variables, x, t, maps):
    """The method's maps of ``x`` (``maps`` when given): the explanation every method metric starts from
    (jitted once per method and model; own-loop methods called as they are)."""
    if maps is not None:
        return jnp.asarray(maps)
    if _own_loop(method):
        return method(model, variables, x, t)
    return bind_static(_call_method, _call_method_jit, method, model)(variables, x, t)


def _apply(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x)


_apply_jit = jax.jit(_apply, static_argnums=(0,))


def model_logits(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    """``model.apply(variables, x)``, jitted once per model and input shape."""
    return bind_static(_apply, _apply_jit, model)(variables, x)


def _flat_norm(a: jax.Array, axes: int, ord: int = 2) -> jax.Array:
    """Norm over the last ``axes`` axes (ord 1 or 2)."""
    ax = tuple(range(a.ndim - axes, a.ndim))
    return jnp.abs(a).sum(ax) if ord == 1 else jnp.sqrt((a * a).sum(ax))


def _reduce(stats: np.ndarray, how: str) -> np.ndarray:
    """(N, S) -> (N,) NaN-aware max / mean (NaN only where every sample is NaN)."""
    ok = ~np.isnan(stats)
    any_ok = ok.any(1)
    if how == "max":
        v = np.where(ok, stats, -np.inf).max(1)
    else:
        v = np.where(ok, stats, 0.0).sum(1) / np.maximum(ok.sum(1), 1)
    return np.where(any_ok, v, np.nan)


# ----------------------------------------------------------------------------- perturbation engine


@dataclasses.dataclass(frozen=True)
class _NoiseMetric:
    """Shared engine of the metrics that re-explain noisy copies of each image.

    Subclasses define ``_noise(key, shape, dtype)`` (additive noise of one sample), the
    per-sample statistic ``_stat`` and the reduction ``reduce`` over samples.
    """

    key: ClassVar[str] = ""
    reduce: ClassVar[str] = "max"
    needs_logits: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _validate_common(self)

    # -- overridden
    def _noise(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        raise NotImplementedError

    def _stat(self, a, ap, x, xp, h, hp):
        raise NotImplementedError

    def _layers(self, model, variables, x) -> tuple[str, ...]:
        return ()

    # -- engine
    def __call__(self, model, variables, method, images, targets, maps=None, *, perturbed=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        n = x.shape[0]
        if perturbed is not None:
            perturbed = jnp.asarray(perturbed, x.dtype)
            if perturbed.ndim != 5 or perturbed.shape[0] != n or perturbed.shape[2:] != x.shape[1:]:
                raise ValueError(f"perturbed must be (N, S, H, W, C) with (N, H, W, C) = {x.shape}; got shape {perturbed.shape}")
            s = perturbed.shape[1]
            src = perturbed
        else:
            s = self.n_samples
            src = image_keys(x, self.seed)
        a_ref = method_maps(method, model, variables, x, t, maps)
        layers = self._layers(model, variables, x) if self.needs_hidden else ()
        k = max(1, min(s, self.batch_size // n))
        if _own_loop(method):
            stats, changed = _noise_stats(self, method, model, layers, k, s, variables, x, t, a_ref, src)
        else:
            run = bind_static(_noise_stats, _noise_stats_jit, self, method, model, layers, k, s)
            stats, changed = run(variables, x, t, a_ref, src)
        stats = np.asarray(stats, np.float64)
        changed = np.asarray(changed, bool)
        if self.skip_changed_prediction:
            stats = np.where(changed, np.nan, stats)
        return {self.key: _reduce(stats, self.reduce), "changed": changed.mean(1).astype(np.float64)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        v = np.asarray(values[self.key], np.float64)
        return {self.key: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")}


def _forward(model, variables, x, layers):
    if not layers:
        return model.apply(variables, x), None
    out, acts = taps.forward(model, variables, x, capture=layers)
    return out, jnp.concatenate([acts[l].reshape(x.shape[0], -1) for l in layers], axis=1)


def _noise_stats(cfg, method, model, layers, k, s, variables, x, t, a_ref, src):
    """(N, S) statistics and (N, S) prediction-changed flags, samples in blocks of ``k``."""
    n = x.shape[0]
    nb = -(-s // k)
    a = postprocess_maps(a_ref.astype(x.dtype), cfg.normalise, cfg.abs_maps)
    logits, hid = _forward(model, variables, x, layers)
    pred = logits.argmax(-1)
    explicit = not (hasattr(src, "dtype") and jax.dtypes.issubdtype(src.dtype, jax.dtypes.prng_key))

    def block(i):
        idx = i * k + jnp.arange(k)
        if explicit:
            xp = jnp.take(src, jnp.minimum(idx, s - 1), axis=1)  # (N, k, H, W, C)
        else:
            def one(key):
                return jax.vmap(lambda j: cfg._noise(jax.random.fold_in(key, j), x.shape[1:], x.dtype))(idx)

            xp = x[:, None] + jax.vmap(one)(src)
        flat = xp.reshape((n * k,) + x.shape[1:])
        tt = jnp.repeat(t, k)
        ap = method(model, variables, flat, tt).reshape((n, k) + x.shape[1:3]).astype(x.dtype)
        ap = postprocess_maps(ap, cfg.normalise, cfg.abs_maps)
        lp, hp = _forward(model, variables, flat, layers)
        changed = (lp.argmax(-1).reshape(n, k) != pred[:, None])
        h = logits if not cfg.needs_hidden else hid
        hp = lp.reshape(n, k, -1) if not cfg.needs_hidden else hp.reshape(n, k, -1)
        st = cfg._stat(a[:, None], ap, x[:, None], xp, h[:, None], hp)
        return st, changed

    if _own_loop(method):
        outs = [block(jnp.asarray(i)) for i in range(nb)]
        st = jnp.stack([o[0] for o in outs])
        ch = jnp.stack([o[1] for o in outs])
    else:
        st, ch = jax.lax.map(block, jnp.arange(nb))
    # (nb, N, k) -> (N, nb * k)[:, :s]
    st = jnp.moveaxis(st, 0, 1).reshape(n, nb * k)[:, :s]
    ch = jnp.moveaxis(ch, 0, 1).reshape(n, nb * k)[:, :s]
    return st, ch


_noise_stats_jit = jax.jit(_noise_stats, static_argnums=(0, 1, 2, 3, 4, 5))


# ----------------------------------------------------------------------------- sensitivity


@dataclasses.dataclass(frozen=True)
class MaxSensitivity(_NoiseMetric):
    """Max-Sensitivity (Yeh et al., NeurIPS 2019, "On the (in)fidelity and sensitivity of explanations").

    Protocol, per image x with map a = Phi(x): draw ``n_samples`` inputs x' = x + u with every
    value of u uniform in [-radius, radius] (an L-inf ball), explain each (same target), and
    report ``max_s ||a - a'_s||_F / ||a||_F`` (``relative=True``) or ``max_s ||a - a'_s||_F``
    (``relative=False``). Lower is more robust.

    Defaults: the paper's estimator is the maximum over a Monte-Carlo sample of the ball and
    the *un-normalised* difference norm; Quantus 0.6.0 (``MaxSensitivity``) divides by
    ``||a||`` (its ``norm_denominator``), uses radius 0.2 (``lower_bound``), 200 samples, no map
    normalisation or absolute value, and keeps samples that change the prediction
    (``return_nan_when_prediction_changes=False``). xaijax's defaults are Quantus'.

    Attributes:
      n_samples: perturbations per image (Quantus 200).
      radius: half-width of the uniform noise, in the units of the normalised input.
      relative: divide by the norm of the original map.
      normalise, abs_maps: map post-processing (module docstring).
      skip_changed_prediction: drop samples whose arg-max class changes.
      seed: PRNG seed; batch_size: perturbed images per method call.

    Returns ``{"max_sensitivity": (N,), "changed": (N,) fraction of samples with a changed prediction}``.
    """

    n_samples: int = 200
    radius: float = 0.2
    relative: bool = True
    normalise: str = "none"
    abs_maps: bool = False
    skip_changed_prediction: bool = False
    seed: int = 0
    batch_size: int = 64

    key: ClassVar[str] = "max_sensitivity"
    reduce: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0; got {self.radius!r}")

    def _noise(self, key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -self.radius, self.radius)

    def _stat(self, a, ap, x, xp, h, hp):
        num = _flat_norm(a - ap, 2)
        if not self.relative:
            return num
        return num / _flat_norm(a, 2)


@dataclasses.dataclass(frozen=True)
class AvgSensitivity(MaxSensitivity):
    """Avg-Sensitivity (Yeh et al., NeurIPS 2019): :class:`MaxSensitivity` with the *mean* over
    the samples instead of the maximum (same defaults; Quantus 0.6.0 ``AvgSensitivity``: radius
    0.2, 200 samples, relative to ``||a||``). Returns ``{"avg_sensitivity": (N,), "changed": (N,)}``."""

    key: ClassVar[str] = "avg_sensitivity"
    reduce: ClassVar[str] = "mean"


# ----------------------------------------------------------------------------- local Lipschitz


@dataclasses.dataclass(frozen=True)
class LocalLipschitz(_NoiseMetric):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018, "On the robustness of
    interpretability methods").

    Protocol, per image: ``max_s ||a - a'_s||_2 / (||x - x'_s||_2 + 1e-10)`` over ``n_samples``
    inputs x' = x + e with Gaussian e (mean ``mean``, standard deviation ``std`` per value),
    maps post-processed first (module docstring). Lower is more robust.

    Defaults: the paper maximises the ratio over an eps-ball (with Bayesian optimisation or
    sampling); Quantus 0.6.0 (``LocalLipschitzEstimate``) samples 200 Gaussian perturbations
    (mean 0, std 0.1), normalises the maps by their maximum (batch-wide there, per image here)
    and adds 1e-10 to the denominator. xaijax's defaults are Quantus'.

    Returns ``{"local_lipschitz": (N,), "changed": (N,)}``.
    """

    n_samples: int = 200
    std: float = 0.1
    mean: float = 0.0
    normalise: str = "max"
    abs_maps: bool = False
    skip_changed_prediction: bool = False
    seed: int = 0
    batch_size: int = 64

    key: ClassVar[str] = "local_lipschitz"
    reduce: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.std > 0:
            raise ValueError(f"std must be > 0; got {self.std!r}")

    def _noise(self, key, shape, dtype):
        return self.mean + self.std * jax.random.normal(key, shape, dtype)

    def _stat(self, a, ap, x, xp, h, hp):
        return _flat_norm(a - ap, 2) / (_flat_norm(x - xp, 3) + 1e-10)


# ----------------------------------------------------------------------------- relative stability


@dataclasses.dataclass(frozen=True)
class _RelativeStability(_NoiseMetric):
    """Shared fields of RIS / ROS / RRS (Agarwal et al. 2022, "Rethinking stability for
    attribution-based explanations")."""

    n_samples: int = 200
    low: float = 0.02
    high: float = 0.2
    eps_min: float = 1e-6
    normalise: str = "none"
    abs_maps: bool = False
    skip_changed_prediction: bool = True
    seed: int = 0
    batch_size: int = 64

    reduce: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.high > self.low:
            raise ValueError(f"high must be > low; got low={self.low!r}, high={self.high!r}")
        if not self.eps_min > 0:
            raise ValueError(f"eps_min must be > 0; got {self.eps_min!r}")

    def _noise(self, key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, self.low, self.high)

    def _rel(self, u, up, axes):
        """||(u - u') / u~|| with u~ = u + eps_min where u == 0."""
        return _flat_norm((u - up) / (u + (u == 0) * self.eps_min), axes)

    def _explanation_term(self, a, ap):
        return self._rel(a, ap, 2)

    def _den(self, d):
        return d + (d == 0) * self.eps_min


_RS_DOC = """

    Protocol, per image: ``n_samples`` inputs x' = x + u with every value of u uniform in
    [``low``, ``high``]; the value is the maximum over the samples x' that keep the predicted
    class of ::

        ||(e_x - e_x') / e~_x||_2 / d~,   d = ||{den}||_2

    where ``e~ = e + eps_min`` at entries where e == 0 and ``d~ = d + eps_min`` if d == 0,
    else d (division-safe), computed exactly as Quantus 0.6.0 does (``eps_min`` is added only
    where a value is exactly 0, so a denominator of 1e-8 divides by 1e-8).

    Defaults = Quantus 0.6.0: uniform noise in [0.02, 0.2] (its ``batch_uniform_noise`` with
    ``lower_bound`` 0.02, ``upper_bound`` 0.2 — positive shifts only), 200 samples, eps_min
    1e-6, no normalisation or absolute value. The paper takes the maximum over perturbations
    that keep the prediction: xaijax drops those samples (``skip_changed_prediction=True``);
    Quantus marks them NaN and then takes ``np.max``, so one changed sample makes the image's
    value NaN there.
"""


@dataclasses.dataclass(frozen=True)
class RelativeInputStability(_RelativeStability):
    __doc__ = "Relative Input Stability, RIS (Agarwal et al. 2022)." + _RS_DOC.format(den="(x - x') / x~") + """
    Returns ``{"ris": (N,), "changed": (N,)}``.
    """

    key: ClassVar[str] = "ris"

    def _stat(self, a, ap, x, xp, h, hp):
        return self._explanation_term(a, ap) / self._den(self._rel(x, xp, 3))


@dataclasses.dataclass(frozen=True)
class RelativeOutputStability(_RelativeStability):
    __doc__ = "Relative Output Stability, ROS (Agarwal et al. 2022)." + _RS_DOC.format(den="h_x - h_x'") + """
    h: the model's logits (Quantus' ``model.predict`` without softmax).
    Returns ``{"ros": (N,), "changed": (N,)}``.
    """

    key: ClassVar[str] = "ros"

    def _stat(self, a, ap, x, xp, h, hp):
        return self._explanation_term(a, ap) / self._den(_flat_norm(h - hp, 1))


@dataclasses.dataclass(frozen=True)
class RelativeRepresentationStability(_RelativeStability):
    __doc__ = "Relative Representation Stability, RRS (Agarwal et al. 2022)." + _RS_DOC.format(den="(L_x - L_x') / L~_x") + """
    L: the outputs of the layers ``layers`` (dotted module paths), flattened and concatenated;
    ``None`` (the default, as Quantus' ``layer_names=None``) takes every module called in the
    forward pass (xaijax's module list: torchvision-named layers, ReLU and pooling modules of
    the zoo models; Quantus hooks every torch submodule). Give a layer for comparable numbers.
    Returns ``{"rrs": (N,), "changed": (N,)}``.
    """

    layers: tuple[str, ...] | None = None

    key: ClassVar[str] = "rrs"
    needs_hidden: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            if isinstance(self.layers, str):
                object.__setattr__(self, "layers", (self.layers,))
            else:
                object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers:
                raise ValueError("layers must name at least one layer (or be None for every layer)")

    def _layers(self, model, variables, x):
        if self.layers is None:
            names = tuple(taps.layer_names(model, variables, x))
        else:
            taps.check_layers(model, variables, x, list(self.layers))
            names = self.layers
        return names

    def _stat(self, a, ap, x, xp, h, hp):
        return self._explanation_term(a, ap) / self._den(self._rel(h, hp, 1))


# ----------------------------------------------------------------------------- continuity


def translate_x(x: jax.Array, dx: int | jax.Array, fill: jax.Array) -> jax.Array:
    """Shift (N, H, W, C) images by ``dx`` pixels along W (positive: to the right; may be traced),
    filling the uncovered columns with ``fill`` (N,) (Quantus' ``batched_translation``, direction x)."""
    w = x.shape[2]
    col = jnp.arange(w) - dx
    inside = (col >= 0) & (col < w)
    moved = jnp.take(x, jnp.clip(col, 0, w - 1), axis=2)
    return jnp.where(inside[None, None, :, None], moved, fill[:, None, None, None].astype(x.dtype))


def continuity_shifts(width: int, n_steps: int) -> tuple[int, ...]:
    """Quantus 0.6.0's translation schedule: ``dx = (2 W + 1) // n_steps``; shifts
    ``-W + dx, -W + 2 dx, ..., -W + n_steps dx`` (all 0 when ``n_steps > 2 W + 1``)."""
    dx = (2 * width + 1) // n_steps
    return tuple(-width + dx * (i + 1) for i in range(n_steps))


@dataclasses.dataclass(frozen=True)
class Continuity:
    """Continuity (Montavon et al. 2018, "Methods for interpreting and understanding deep
    neural networks", section on explanation continuity).

    Protocol, per image: translate the image horizontally by each shift of ``shifts`` (default:
    Quantus' schedule :func:`continuity_shifts` with ``n_steps``), filling uncovered columns
    with the image's minimum (Quantus' ``"black"`` baseline), explain each translated image
    (same target) and report ``max_shift ||a - a'||_1 / (||x - x'||_2 + 1e-9)`` with maps
    post-processed (``normalise``, ``abs_maps``). Lower is more continuous.

    Defaults: Montavon et al. define continuity as the largest ratio ``||R(x) - R(x')||_1 /
    ||x - x'||_2`` over nearby inputs and illustrate it with translations; Quantus 0.6.0
    (``Continuity``): 28 translation steps, map normalisation (batch-wide there, per image
    here) and absolute value on, ``"black"`` fill. One shift per step of a ``lax.map`` (the
    method is called on the N translated images of that shift). With ``n_steps > 2 W + 1`` the schedule's step is
    0 and every shift is ``-W``: each "translated" image is the fill alone, as in Quantus (give
    ``n_steps <= 2 W + 1`` or explicit ``shifts`` for small images).

    Returns ``{"continuity": (N,), "changed": (N,)}`` (fraction of shifts that change the
    prediction: the shifted image's predicted class differs from the unshifted image's; Quantus'
    ``return_nan_when_prediction_changes`` compares it with the targets ``y_batch`` instead,
    the same thing when the targets are the predicted classes).
    """

    n_steps: int = 28
    shifts: tuple[int, ...] | None = None
    normalise: str = "max"
    abs_maps: bool = True
    skip_changed_prediction: bool = False
    batch_size: int = 64

    key: ClassVar[str] = "continuity"

    def __post_init__(self) -> None:
        _validate_common(self)
        if not isinstance(self.n_steps, (int, np.integer)) or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive int; got {self.n_steps!r}")
        if self.shifts is not None:
            object.__setattr__(self, "shifts", tuple(int(s) for s in self.shifts))
            if not self.shifts:
                raise ValueError("shifts must not be empty")

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        shifts = self.shifts if self.shifts is not None else continuity_shifts(x.shape[2], self.n_steps)
        a_ref = method_maps(method, model, variables, x, t, maps)
        dx = jnp.asarray(shifts, jnp.int32)
        if _own_loop(method):
            st, ch = _continuity_stats(self, method, model, variables, x, t, a_ref, dx)
        else:
            st, ch = bind_static(_continuity_stats, _continuity_stats_jit, self, method, model)(variables, x, t, a_ref, dx)
        st = np.asarray(st, np.float64)
        ch = np.asarray(ch, bool)
        if self.skip_changed_prediction:
            st = np.where(ch, np.nan, st)
        return {"continuity": _reduce(st, "max"), "changed": ch.mean(1).astype(np.float64)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"continuity": float(np.nanmean(values["continuity"]))}


def _continuity_stats(cfg, method, model, variables, x, t, a_ref, shifts):
    """(N, S) ratios and prediction-changed flags; one shift (N translated images) per step,
    translated inside the step (never all S x N images at once)."""
    fill = x.reshape(x.shape[0], -1).min(1)
    a = postprocess_maps(a_ref.astype(x.dtype), cfg.normalise, cfg.abs_maps)
    pred = model.apply(variables, x).argmax(-1)

    def step(dx):
        xp = translate_x(x, dx, fill)
        ap = postprocess_maps(method(model, variables, xp, t).astype(x.dtype), cfg.normalise, cfg.abs_maps)
        st = _flat_norm(a - ap, 2, ord=1) / (_flat_norm(x - xp, 3) + 1e-9)
        return st, model.apply(variables, xp).argmax(-1) != pred

    if _own_loop(method):
        outs = [step(d) for d in shifts]
        st, ch = jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])
    else:
        st, ch = jax.lax.map(step, shifts)
    return st.T, ch.T


_continuity_stats_jit = jax.jit(_continuity_stats, static_argnums=(0, 1, 2))


# ----------------------------------------------------------------------------- consistency


def _label_key(codes: np.ndarray) -> float:
    """A 52-bit hash of an integer array, exact in float64 (equal arrays <-> equal keys, up to
    hash collisions of probability ~2^-52)."""
    d = zlib.crc32(codes.tobytes()) | (zlib.adler32(codes.tobytes()) << 32)
    return float(d & ((1 << 52) - 1))


@dataclasses.dataclass(frozen=True)
class Consistency:
    """Consistency (Dasgupta, Frost & Moshkovitz, ICML 2022, "Framework for evaluating
    faithfulness of local explanations").

    Protocol: each map is *discretised* into a label; consistency is the probability that two
    images with the same explanation label have the same predicted class. Per image i (of the
    whole evaluated set): ``sum_{j != i} [pred_j == pred_i][label_j == label_i] /
    (sum_{j != i} [label_j == label_i] + 1e-9)``; the dataset value is the mean over i. Higher
    is more consistent.

    The per-image values of ``__call__`` are that image's ``label`` (a float64 52-bit hash of
    its discretised map) and predicted class ``pred``, which depend on the image alone;
    :meth:`summarize` computes the consistency over *all* images it is given (concatenate the
    batches first). Quantus 0.6.0 computes it within each batch it processes (``batch_size``
    images, default 64), so its value depends on batching; with one batch they agree.

    Discretisation ``discretise`` (maps post-processed first, as Quantus: normalised by the
    maximum and absolute value):

    * ``"top-n-sign"`` (Quantus' default ``top_n_sign``): the signs of the first ``n`` = 5
      entries of the flattened map — literally the first ``n`` pixels in raster order (Quantus
      flattens a (1, H, W) map), not the ``n`` largest; with ``abs_maps`` the signs are 0/1.
    * ``"sign"``: the sign of every entry; ``"rank"``: the full descending order of the entries.

    Returns ``{"label": (N,), "pred": (N,)}`` (float64); ``summarize`` -> ``{"consistency": c}``.
    """

    discretise: str = "top-n-sign"
    n: int = 5
    normalise: str = "max"
    abs_maps: bool = True

    def __post_init__(self) -> None:
        if self.discretise not in ("top-n-sign", "sign", "rank"):
            raise ValueError(f"discretise must be 'top-n-sign', 'sign' or 'rank'; got {self.discretise!r}")
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"n must be a positive int; got {self.n!r}")
        _validate_common(self)

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        a = method_maps(method, model, variables, x, t, maps)
        a = np.asarray(postprocess_maps(jnp.asarray(a), self.normalise, self.abs_maps)).reshape(x.shape[0], -1)
        if self.discretise == "top-n-sign":
            codes = np.sign(a[:, : self.n]).astype(np.int8)
        elif self.discretise == "sign":
            codes = np.sign(a).astype(np.int8)
        else:
            codes = np.argsort(-a, axis=1, kind="stable").astype(np.int64)
        labels = np.array([_label_key(np.ascontiguousarray(c)) for c in codes], np.float64)
        pred = np.asarray(model_logits(model, variables, x)).argmax(-1).astype(np.float64)
        return {"label": labels, "pred": pred}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"consistency": float(np.mean(consistency_scores(values["label"], values["pred"])))}


def consistency_scores(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Per-image consistency over a set: (N,) from (N,) labels and (N,) predicted classes."""
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    off = ~np.eye(labels.shape[0], dtype=bool)
    same_label = (labels[None] == labels[:, None]) & off
    same_pred = (preds[None] == preds[:, None]) & off
    return (same_pred & same_label).sum(-1) / (same_label.sum(-1) + 1e-9)


register_method_metric("max-sensitivity", MaxSensitivity)
register_method_metric("avg-sensitivity", AvgSensitivity)
register_method_metric("local-lipschitz", LocalLipschitz)
register_method_metric("continuity", Continuity)
register_method_metric("consistency", Consistency)
register_method_metric("ris", RelativeInputStability)
register_method_metric("ros", RelativeOutputStability)
register_method_metric("rrs", RelativeRepresentationStability)
