"""Correlation faithfulness metrics: faithfulness correlation and estimate, monotonicity
(Arya et al.), monotonicity correlation (Nguyen & Martinez), sensitivity-n and infidelity.

Same protocol and conventions as :mod:`xaijax.metrics.faithfulness_curves` (read its module
docstring: features are pixels, Quantus 0.6.0 defaults, per-image map normalisation, baselines,
batching, seeds, bad input). Correlations are computed per image over its perturbations; a map
that makes the attribution side constant (e.g. an all-zero or constant map) gives NaN for that
image (Pearson/Spearman of a constant), which ``summarize`` skips (``nanmean``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.metrics import faithfulness as _faith
from xaijax.metrics.faithfulness_curves import (
    ModelFn,
    _check_baseline,
    _check_positive,
    _check_score,
    _mean,
    baseline_value,
    clean_score,
    patch_ids,
    pick,
    prepare_map,
    run,
    step_scores,
)
from xaijax.metrics.registry import register_model_metric

__all__ = [
    "pearson",
    "spearman",
    "random_subsets",
    "uniform_draws",
    "FaithfulnessCorrelation",
    "FaithfulnessEstimate",
    "Monotonicity",
    "MonotonicityCorrelation",
    "SensitivityN",
    "Infidelity",
]


# ----------------------------------------------------------------------------- statistics and draws


def pearson(u: jax.Array, v: jax.Array) -> jax.Array:
    """Pearson correlation of two 1-D arrays (NaN if either is constant), as ``scipy.stats.pearsonr``."""
    u = u - u.mean()
    v = v - v.mean()
    return jnp.sum(u * v) / jnp.sqrt(jnp.sum(u * u) * jnp.sum(v * v))


def _average_ranks(u: jax.Array) -> jax.Array:
    s = jnp.sort(u)
    lo = jnp.searchsorted(s, u, side="left")
    hi = jnp.searchsorted(s, u, side="right")
    return (lo + hi + 1).astype(u.dtype) / 2  # 1-based average rank of ties


def spearman(u: jax.Array, v: jax.Array) -> jax.Array:
    """Spearman correlation (Pearson of average ranks, as ``scipy.stats.spearmanr``)."""
    return pearson(_average_ranks(u), _average_ranks(v))


def _subset_mask(key: jax.Array, n_pixels: int, size: int) -> jax.Array:
    return jax.random.permutation(key, n_pixels) < size  # a uniformly random subset of `size` pixels


def random_subsets(seed: int, n_pixels: int, draws: int, size: int) -> np.ndarray:
    """(draws, size) sorted pixel indices of the random subsets xaijax uses: draw r is the
    pixels ``i`` with ``permutation(fold_in(key(seed), r), n_pixels)[i] < size`` (row-major
    flat pixel indices; hand them to Quantus to reproduce the same perturbations)."""
    key = jax.random.key(int(seed))
    masks = jax.vmap(lambda r: _subset_mask(jax.random.fold_in(key, r), n_pixels, size))(jnp.arange(draws))
    return np.stack([np.flatnonzero(m) for m in np.asarray(masks)]) if draws else np.zeros((0, size), np.int64)


def uniform_draws(seed: int, n: int, low: float, high: float, dtype: Any = jnp.float32) -> np.ndarray:
    """(n,) the uniform baseline values of :class:`MonotonicityCorrelation` (draw i: ``fold_in(key(seed), i)``)."""
    key = jax.random.key(int(seed))
    return np.asarray(jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), dtype, low, high))(jnp.arange(n)))


def _check_steps(owner: str, k: int, shape: tuple[int, ...]) -> None:
    _check_positive(owner, "features_in_step", k)
    if k > shape[1] * shape[2]:
        raise ValueError(f"{owner}: features_in_step={k} exceeds the {shape[1] * shape[2]} pixels of an image")


def _common(owner: str, m: Any) -> None:
    _check_baseline(m.baseline)
    _check_score(owner, m.score)
    _check_positive(owner, "steps_per_call", m.steps_per_call)


# ----------------------------------------------------------------------------- faithfulness correlation / estimate


@dataclasses.dataclass(frozen=True)
class FaithfulnessCorrelation:
    """Faithfulness correlation (Bhatt et al., IJCAI 2020), as Quantus 0.6.0 ``FaithfulnessCorrelation``.

    Protocol: ``nr_runs`` random subsets S of ``subset_size`` pixels (uniform, without
    replacement; :func:`random_subsets`, the same subsets for every image); for each, the
    subset is set to the baseline and ``f(x) - f(x_S)`` (target **logit**) is paired with
    ``sum_{i in S} a_i``; ``correlation`` (N,) is the Pearson correlation over the runs.
    Higher is better. NaN for a constant map.

    Defaults = Quantus: ``nr_runs=100``, ``subset_size=224``, baseline ``"black"``, logits
    (``softmax=False``), ``normalise=True`` (no effect on a correlation), ``abs=False``. Bhatt et
    al. define it with a reference baseline value and random subsets of fixed size |S|,
    averaged over test points.
    """

    nr_runs: int = 100
    subset_size: int = 224
    baseline: str | float = "black"
    score: str = "logit"
    seed: int = 0
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 128
    images_per_call: int = 1

    def _validate(self, shape):
        _common("faithfulness-correlation", self)
        _check_positive("faithfulness-correlation", "nr_runs", self.nr_runs)
        _check_positive("faithfulness-correlation", "subset_size", self.subset_size)
        if self.subset_size > shape[1] * shape[2]:
            raise ValueError(f"faithfulness-correlation: subset_size={self.subset_size} exceeds the {shape[1] * shape[2]} pixels of an image")

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        a = prepare_map(a, self.normalise, self.abs)
        masks = jax.vmap(lambda r: _subset_mask(jax.random.fold_in(key, r), h * w, self.subset_size).reshape(h, w))(jnp.arange(self.nr_runs))
        b = baseline_value(x, self.baseline)
        ys = step_scores(fn, lambda s: jnp.where(masks[s][..., None], b, x), self.nr_runs, t, x.dtype, self.score, self.steps_per_call)
        deltas = clean_score(fn, x, t, self.score) - ys
        sums = jnp.sum(jnp.where(masks, a[None], 0), axis=(1, 2))
        return {"correlation": pearson(sums, deltas)}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"faithfulness_correlation": _mean(values["correlation"])}


@dataclasses.dataclass(frozen=True)
class FaithfulnessEstimate:
    """Faithfulness estimate (Alvarez-Melis & Jaakkola, NeurIPS 2018), as Quantus 0.6.0 ``FaithfulnessEstimate``.

    Protocol: pixels in decreasing order of the map, ``features_in_step`` at a time; each group
    alone (**not** cumulative) is set to the baseline and ``f(x) - f(x_group)`` (target logit) is
    paired with the group's summed attribution; ``correlation`` (N,) is the Pearson correlation
    over the ``ceil(H*W / features_in_step)`` groups. Higher is better. NaN for a constant map.

    Defaults = Quantus: ``features_in_step=1``, baseline ``"black"``, logits. The paper removes
    one feature (or concept) at a time and correlates the probability drops with the relevances.
    """

    features_in_step: int = 1
    baseline: str | float = "black"
    score: str = "logit"
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape):
        _common("faithfulness-estimate", self)
        _check_steps("faithfulness-estimate", self.features_in_step, shape)

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        k = self.features_in_step
        a = prepare_map(a, self.normalise, self.abs)
        group = _faith.saliency_rank(a[None])[0] // k
        n = -(-h * w // k)
        b = baseline_value(x, self.baseline)
        ys = step_scores(fn, lambda s: jnp.where((group == s)[..., None], b, x), n, t, x.dtype, self.score, self.steps_per_call)
        sums = jax.ops.segment_sum(a.reshape(-1), group.reshape(-1), num_segments=n)
        return {"correlation": pearson(sums, clean_score(fn, x, t, self.score) - ys)}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"faithfulness_estimate": _mean(values["correlation"])}


# ----------------------------------------------------------------------------- monotonicity


@dataclasses.dataclass(frozen=True)
class Monotonicity:
    """Monotonicity (Arya et al. 2019, AIX360 ``monotonicity_metric``).

    Protocol: start from the all-baseline image and **insert** the image's pixels in
    *increasing* order of the (absolute) map, ``features_in_step`` at a time, cumulatively;
    ``curve`` (N, S) is the target's softmax after each insertion; ``monotonic`` (N,) is 1.0 if
    the curve never decreases (``all(diff(curve) >= 0)``), else 0.0. Higher is better.

    Defaults = Quantus 0.6.0's settings: ``features_in_step=1``, ``abs=True``, baseline
    ``"black"``, softmax. **Quantus 0.6.0's ``Monotonicity`` never inserts the image**: it
    replaces the selected entries of the all-baseline array by the baseline value of that
    array (its own minimum, i.e. the baseline again), so its curve is constant and it returns
    True for every input; xaijax implements the definition (insertion of the image's values)
    and is tested against a direct NumPy loop instead.
    """

    features_in_step: int = 1
    baseline: str | float = "black"
    score: str = "softmax"
    normalise: bool = True
    abs: bool = True
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape):
        _common("monotonicity", self)
        _check_steps("monotonicity", self.features_in_step, shape)

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        k = self.features_in_step
        a = prepare_map(a, self.normalise, self.abs)
        rank = _faith.saliency_rank(-a[None])[0]  # 0 = least relevant
        b = baseline_value(x, self.baseline)
        n = -(-h * w // k)
        curve = step_scores(fn, lambda s: jnp.where((rank < (s + 1) * k)[..., None], x, b), n, t, x.dtype, self.score, self.steps_per_call)
        return {"curve": curve, "monotonic": jnp.all(jnp.diff(curve) >= 0).astype(x.dtype)}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"monotonicity": _mean(values["monotonic"])}


@dataclasses.dataclass(frozen=True)
class MonotonicityCorrelation:
    """Monotonicity correlation (Nguyen & Martinez 2020), as Quantus 0.6.0 ``MonotonicityCorrelation``.

    Protocol: pixels in *increasing* order of the (absolute) map, ``features_in_step`` at a
    time; each group alone (not cumulative) is replaced ``nr_samples`` times by a random value
    ``u ~ U(uniform_low, uniform_high)`` (one scalar per draw, as Quantus' ``"uniform"``
    baseline; draw ``i = step * nr_samples + sample`` uses ``fold_in(key(seed), i)``,
    :func:`uniform_draws`); the group's "variance" ``mean_samples (f(x_u) - f(x))^2 / f(x)^2``
    (``1 / f(x)^2`` replaced by 1 when ``|f(x)| < eps``) is paired with its summed
    attribution; ``correlation`` (N,) is the Spearman correlation over the groups. Higher is
    better. NaN for a constant map.

    Defaults = Quantus: ``nr_samples=100``, ``features_in_step=1``, ``abs=True``, uniform
    values in [0, 1], ``eps=1e-5``, softmax. That is ``H*W*100`` forward passes per image (5
    million at 224 px): use ``features_in_step`` for large images. Nguyen & Martinez sample
    each feature from its (data) distribution.
    """

    nr_samples: int = 100
    features_in_step: int = 1
    uniform_low: float = 0.0
    uniform_high: float = 1.0
    eps: float = 1e-5
    seed: int = 0
    score: str = "softmax"
    normalise: bool = True
    abs: bool = True
    steps_per_call: int = 256
    images_per_call: int = 1

    baseline = "black"  # unused; keeps the shared checks simple

    def _validate(self, shape):
        _common("monotonicity-correlation", self)
        _check_steps("monotonicity-correlation", self.features_in_step, shape)
        _check_positive("monotonicity-correlation", "nr_samples", self.nr_samples)
        if not self.uniform_high >= self.uniform_low:
            raise ValueError(f"monotonicity-correlation: uniform_high must be >= uniform_low; got {self.uniform_low}, {self.uniform_high}")

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        k, r = self.features_in_step, self.nr_samples
        a = prepare_map(a, self.normalise, self.abs)
        group = _faith.saliency_rank(-a[None])[0] // k  # increasing order
        n = -(-h * w // k)

        def make(i):
            u = jax.random.uniform(jax.random.fold_in(key, i), (), x.dtype, self.uniform_low, self.uniform_high)
            return jnp.where((group == i // r)[..., None], u, x)

        ys = step_scores(fn, make, n * r, t, x.dtype, self.score, self.steps_per_call).reshape(n, r)
        y = clean_score(fn, x, t, self.score)
        inv = jnp.where(jnp.abs(y) >= self.eps, 1 / jnp.abs(y), 1.0) ** 2
        var = jnp.mean((ys - y) ** 2, axis=1) * inv
        sums = jax.ops.segment_sum(a.reshape(-1), group.reshape(-1), num_segments=n)
        return {"correlation": spearman(sums, var)}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"monotonicity_correlation": _mean(values["correlation"])}


# ----------------------------------------------------------------------------- sensitivity-n


def default_n_values(n_pixels: int, count: int = 10, max_fraction: float = 0.8) -> tuple[int, ...]:
    """``count`` log-spaced subset sizes from 1 to ``floor(max_fraction * n_pixels)`` (duplicates dropped)."""
    top = max(1, int(max_fraction * n_pixels))
    return tuple(int(v) for v in np.unique(np.round(np.geomspace(1, top, count)).astype(int)))


@dataclasses.dataclass(frozen=True)
class SensitivityN:
    """Sensitivity-n (Ancona et al., ICLR 2018).

    Protocol (the paper's): for every subset size n in ``n_values``, ``nr_subsets`` uniformly
    random subsets of n pixels (draw ``j`` of size index ``i`` uses ``fold_in(key(seed), i *
    nr_subsets + j)``; the same subsets for every image) are set to the baseline; the Pearson
    correlation over the subsets between ``sum_{S} a`` and ``f(x) - f(x_S)`` is
    ``correlation`` (N, len(n_values)); ``mean`` (N,) averages it over n. Higher is better.

    Defaults: ``n_values`` = 10 log-spaced sizes from 1 to 80 % of the pixels
    (:func:`default_n_values`; Quantus' ``n_max_percentage=0.8``), ``nr_subsets=100`` (the
    paper), baseline ``"black"`` (Quantus; the paper uses 0 = black in its input space),
    softmax (Quantus; the paper uses the target's output before the softmax: ``score="logit"``).

    **Quantus 0.6.0 differs** in kind: it removes pixels cumulatively in decreasing order of
    the map (n = 1, 2, ... up to 80 %) and correlates, at every n, *across the images of the
    batch* (one number per n, not per image, only for the first batch). That value depends
    on which images share a batch, so it does not fit the per-image protocol and is not
    reproduced.
    """

    n_values: tuple[int, ...] | None = None
    nr_subsets: int = 100
    baseline: str | float = "black"
    score: str = "softmax"
    seed: int = 0
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def __post_init__(self):  # a list is accepted (the compiled program is keyed on a tuple)
        if self.n_values is not None:
            object.__setattr__(self, "n_values", tuple(int(v) for v in np.atleast_1d(self.n_values)))

    def sizes(self, h: int, w: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.n_values) if self.n_values is not None else default_n_values(h * w)

    def _validate(self, shape):
        _common("sensitivity-n", self)
        _check_positive("sensitivity-n", "nr_subsets", self.nr_subsets)
        hw = shape[1] * shape[2]
        ns = self.sizes(shape[1], shape[2])
        if not ns or any(not 1 <= v <= hw for v in ns):
            raise ValueError(f"sensitivity-n: n_values must be subset sizes in [1, {hw}]; got {self.n_values!r}")

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        ns = jnp.asarray(self.sizes(h, w), jnp.int32)
        r = self.nr_subsets
        a = prepare_map(a, self.normalise, self.abs)
        b = baseline_value(x, self.baseline)
        total = ns.shape[0] * r

        def one(i):  # one draw: its score and its attribution sum (the mask built once)
            mask = (jax.random.permutation(jax.random.fold_in(key, i), h * w) < ns[i // r]).reshape(h, w)
            out = fn(jnp.where(mask[..., None], b, x)[None])[0].astype(x.dtype)
            return pick(out, t, self.score), jnp.sum(jnp.where(mask, a, 0))

        ys, sums = jax.lax.map(one, jnp.arange(total, dtype=jnp.int32), batch_size=max(1, min(self.steps_per_call, total)))
        deltas = (clean_score(fn, x, t, self.score) - ys).reshape(-1, r)
        corr = jax.vmap(pearson)(sums.reshape(-1, r), deltas)
        return {"correlation": corr, "mean": corr.mean()}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"sensitivity_n": _mean(values["mean"])}


# ----------------------------------------------------------------------------- infidelity


@dataclasses.dataclass(frozen=True)
class Infidelity:
    """Infidelity (Yeh et al., NeurIPS 2019): ``E_I[(I^T a - (f(x) - f(x - I)))^2]``, with
    ``I^T a = sum_{pixels} a * sum_channels I`` and target logits.

    ``perturbation="patches"`` (default, Quantus 0.6.0 ``Infidelity``): for each size in
    ``patch_sizes``, the ``p`` x ``p`` patches of Quantus' grid (:func:`patch_ids`) are set to the
    baseline **cumulatively in row-major order**; perturbation k is ``I_k = x - x_k``; the value
    is the mean over k and over the patch sizes. Quantus repeats this ``n_perturb_samples``
    times, but it is deterministic (the black baseline), so xaijax computes it once. Quantus
    crashes on images whose side is not a multiple of the patch size; xaijax uses its padded
    grid.

    ``perturbation="noise"`` (the paper's "noisy baseline"): ``I ~ N(0, noise_std^2)`` per
    pixel and channel, ``n_perturb_samples`` draws (draw r: ``fold_in(key(seed), r)``, the same for
    every image), mean over the draws.

    ``infidelity`` (N,), lower is better. Defaults = Quantus: ``patch_sizes=(4,)``, baseline
    ``"black"``, logits, ``normalise=False``, ``abs=False``; the paper additionally scales the
    attribution optimally (``beta``), which neither library does.
    """

    perturbation: str = "patches"
    patch_sizes: tuple[int, ...] = (4,)
    baseline: str | float = "black"
    n_perturb_samples: int = 10
    noise_std: float = 0.2
    seed: int = 0
    score: str = "logit"
    normalise: bool = False
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def __post_init__(self):  # a list is accepted (the compiled program is keyed on a tuple)
        object.__setattr__(self, "patch_sizes", tuple(np.atleast_1d(self.patch_sizes).tolist()))

    def _validate(self, shape):
        _common("infidelity", self)
        if self.perturbation not in ("patches", "noise"):
            raise ValueError(f"infidelity: perturbation must be 'patches' or 'noise'; got {self.perturbation!r}")
        if self.perturbation == "patches":
            if not self.patch_sizes:
                raise ValueError("infidelity: patch_sizes must not be empty")
            for p in self.patch_sizes:
                _check_positive("infidelity", "patch_sizes", p)
                if p > min(shape[1], shape[2]):
                    raise ValueError(f"infidelity: patch_sizes entry {p} is larger than the image ({shape[1]} x {shape[2]})")
        else:
            _check_positive("infidelity", "n_perturb_samples", self.n_perturb_samples)
            if not self.noise_std > 0:
                raise ValueError(f"infidelity: noise_std must be > 0; got {self.noise_std!r}")

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        a = prepare_map(a, self.normalise, self.abs)
        y = clean_score(fn, x, t, self.score)
        if self.perturbation == "noise":
            noise = lambda s: jax.random.normal(jax.random.fold_in(key, s), x.shape, x.dtype) * self.noise_std
            ys = step_scores(fn, lambda s: x - noise(s), self.n_perturb_samples, t, x.dtype, self.score, self.steps_per_call)
            dots = jax.lax.map(lambda s: jnp.sum(a * noise(s).sum(-1)), jnp.arange(self.n_perturb_samples))
            return {"infidelity": jnp.mean((y - ys - dots) ** 2)}
        b = baseline_value(x, self.baseline)
        diff = (x - b).sum(-1)  # I^T a for a removed pixel: a * sum_c (x - b)
        per_size = []
        for p in self.patch_sizes:
            pid, n = patch_ids(h, w, p)
            pid = jnp.asarray(pid)
            ys = step_scores(fn, lambda s: jnp.where((pid <= s)[..., None], b, x), n, t, x.dtype, self.score, self.steps_per_call)
            dots = jnp.cumsum(jax.ops.segment_sum((a * diff).reshape(-1), pid.reshape(-1), num_segments=n))
            per_size.append(jnp.mean((y - ys - dots) ** 2))
        return {"infidelity": jnp.mean(jnp.stack(per_size))}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"infidelity": _mean(values["infidelity"])}


register_model_metric("faithfulness-correlation", FaithfulnessCorrelation)
register_model_metric("faithfulness-estimate", FaithfulnessEstimate)
register_model_metric("monotonicity", Monotonicity)
register_model_metric("monotonicity-correlation", MonotonicityCorrelation)
register_model_metric("sensitivity-n", SensitivityN)
register_model_metric("infidelity", Infidelity)
