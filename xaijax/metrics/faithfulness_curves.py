"""Perturbation-curve faithfulness metrics: pixel-flipping, region perturbation (MoRF / LeRF),
selectivity, IROF, ROAD, average drop and increase in confidence.

Every metric follows the model-metric protocol of :mod:`xaijax.metrics.registry`:
``metric(model_fn, images, maps, targets) -> dict`` of per-image arrays (axis 0 = image) and
``metric.summarize(values) -> dict`` of floats. ``model_fn(x) -> logits`` takes NHWC images in
the model's input space (build it with :func:`xaijax.metrics.faithfulness.classifier_fn`);
``images`` (N, H, W, C) float, ``maps`` (N, H, W), ``targets`` (N,) int.

Conventions shared by the metrics of this module and of
:mod:`xaijax.metrics.faithfulness_correlation` (the helpers live here):

* **Features are pixels** (all channels of a pixel together), since xaijax maps are (H, W).
  Quantus broadcasts an (N, 1, H, W) map to the image's channels and treats every
  channel-pixel as a feature (ties between the channels of a pixel broken by NumPy's
  unstable argsort); for single-channel images both definitions coincide, which is how the
  Quantus parity tests are run.
* **Defaults are Quantus 0.6.0's** (the reference implementation of this catalogue); each
  docstring lists where the defining paper differs.
* **Map preprocessing** (Quantus' ``normalise`` / ``abs``): ``normalise=True`` divides each
  map by its maximum absolute value (skipped for an all-zero map), then ``abs=True`` takes
  absolute values. Quantus divides by the maximum over the *whole batch*; per image keeps
  images independent, and only scale-sensitive metrics (infidelity with ``normalise=True``)
  can differ.
* **Baselines** (``baseline``): ``"black"`` = the image's minimum over all pixels and channels
  (Quantus' ``"black"``, i.e. the darkest value *of the normalised input*), ``"white"`` = its
  maximum, ``"mean"`` = its mean, a float = that constant. xaijax computes the value once from
  the unperturbed image; Quantus recomputes it from the partially perturbed array at every
  step (the same for black/white; see IROF for the running mean, offered as an option).
* **Order**: pixels in decreasing order of the (preprocessed) map, ties broken as
  :func:`xaijax.metrics.faithfulness.saliency_rank` (the later pixel first); patches and
  superpixels by a stable sort of their attribution (the lower index first).
* **Batching**: per image, every perturbation step is built inside one jitted call and the
  steps go through the model ``steps_per_call`` at a time (``lax.map`` with a batch size);
  images go ``images_per_call`` at a time. No Python loop over images or steps.
* **Randomness**: metrics with random perturbations take an int ``seed``; draw ``r`` uses
  ``fold_in(key(seed), r)`` and the *same draws are used for every image* of a call (so a
  batch equals its images one at a time, and the draws can be handed to Quantus).
* **Bad input**: maps of another shape than the images, non-integer targets, NaN/inf in a
  map, a step/patch larger than the image -> ``ValueError`` naming the argument. All-zero or
  constant maps are legal: curve metrics then follow the tie order, correlation metrics give
  NaN for that image (documented per metric).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import minmax_normalize
from xaijax.metrics import faithfulness as _faith
from xaijax.metrics.registry import register_model_metric

__all__ = [
    "prepare",
    "prepare_map",
    "baseline_value",
    "step_scores",
    "patch_ids",
    "road_impute",
    "superpixels",
    "PixelFlipping",
    "RegionPerturbation",
    "Selectivity",
    "IROF",
    "ROAD",
    "AverageDrop",
    "IncreaseInConfidence",
    "Sufficiency",
]

ModelFn = Callable[[jax.Array], jax.Array]
_BASELINES = ("black", "white", "mean")


# ----------------------------------------------------------------------------- shared helpers


def _check_baseline(baseline: Any, name: str = "baseline") -> None:
    if isinstance(baseline, bool) or not (isinstance(baseline, (int, float)) or baseline in _BASELINES):
        raise ValueError(f"{name} must be one of {_BASELINES} or a number; got {baseline!r}")


def _check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int; got {value!r}")


def _check_score(owner: str, score: str) -> None:
    if score not in ("softmax", "logit"):
        raise ValueError(f"{owner}: score must be 'softmax' or 'logit'; got {score!r}")


def prepare(model_fn: ModelFn, images: Any, maps: Any, targets: Any) -> tuple[jax.tree_util.Partial, jax.Array, jax.Array, jax.Array]:
    """Validate the model-metric arguments; returns (model Partial, images, maps, targets).

    Maps take the images' float dtype (a float64 run stays float64). NaN or inf in a map is a
    ``ValueError`` naming the image.
    """
    images, maps, targets = _faith._check(images, maps, targets)  # also refuses NaN / inf maps
    fn = _faith._as_partial(model_fn)
    _faith._check_targets(targets, _faith._num_outputs(fn, images))
    return fn, images, maps, targets


def prepare_map(a: jax.Array, normalise: bool, abs_: bool) -> jax.Array:
    """Quantus' preprocessing of one map: divide by max|a| (if nonzero), then |.| if ``abs_``."""
    if normalise:
        m = jnp.max(jnp.abs(a))
        a = jnp.where(m > 0, a / jnp.where(m > 0, m, 1), a)
    return jnp.abs(a) if abs_ else a


def baseline_value(x: jax.Array, baseline: str | float) -> jax.Array:
    """Scalar replacement value of one image (H, W, C): black = min, white = max, mean, or a constant."""
    if baseline == "black":
        return x.min()
    if baseline == "white":
        return x.max()
    if baseline == "mean":
        return x.mean()
    return jnp.asarray(baseline, x.dtype)


def pick(logits: jax.Array, t: jax.Array, score: str) -> jax.Array:
    """The target's softmax probability (``score="softmax"``) or logit of one (K,) output."""
    if score == "softmax":
        return jax.nn.softmax(logits)[t]
    return logits[t]


def step_scores(fn: Callable, make: Callable[[jax.Array], jax.Array], n: int, t: jax.Array, dtype: Any, score: str, chunk: int) -> jax.Array:
    """(n,) target scores of the images ``make(s)`` (H, W, C), s = 0..n-1, ``chunk`` per model call."""

    def one(s):
        out = fn(make(s)[None])[0].astype(dtype)
        return pick(out, t, score)

    return jax.lax.map(one, jnp.arange(n, dtype=jnp.int32), batch_size=max(1, min(int(chunk), int(n))))


def clean_score(fn: Callable, x: jax.Array, t: jax.Array, score: str) -> jax.Array:
    """Target score of the unperturbed image."""
    return pick(fn(x[None])[0].astype(x.dtype), t, score)


def patch_ids(h: int, w: int, patch: int) -> tuple[np.ndarray, int]:
    """(H, W) int32 patch index of every pixel and the number of patches.

    Quantus' grid: the image is padded to a multiple of ``patch`` (``floor`` of the padding
    before, ``ceil`` after) and cut into non-overlapping ``patch`` x ``patch`` blocks, numbered
    row-major; a border block covers fewer image pixels.
    """
    ph = (-h) % patch
    pw = (-w) % patch
    top, left = ph // 2, pw // 2
    gh, gw = (h + ph) // patch, (w + pw) // patch
    r = (np.arange(h) + top) // patch
    c = (np.arange(w) + left) // patch
    return (r[:, None] * gw + c[None, :]).astype(np.int32), gh * gw


def _rank_desc(values: jax.Array) -> jax.Array:
    """Rank (0 = largest) of a 1-D array by a stable sort of ``-values`` (ties: lower index first)."""
    order = jnp.argsort(-values, stable=True)
    return jnp.zeros(values.shape[0], jnp.int32).at[order].set(jnp.arange(values.shape[0], dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("metric", "images_per_call"))
def _run(metric: Any, fn: jax.tree_util.Partial, images: jax.Array, maps: jax.Array, targets: jax.Array, extra: Any, seed: jax.Array, images_per_call: int) -> dict:
    """``metric._image(fn, x, a, t, extra, key)`` over all images, ``images_per_call`` at a time
    (``key = key(seed)``, the same for every image; the seed is traced, so a new seed does not
    recompile)."""
    key = jax.random.key(seed)

    def one(args):
        x, a, t, e = args
        return metric._image(fn, x, a, t, e, key)

    return jax.lax.map(one, (images, maps, targets, extra), batch_size=max(1, min(int(images_per_call), images.shape[0])))


def run(metric: Any, model_fn: ModelFn, images: Any, maps: Any, targets: Any, extra: Any = None) -> dict[str, np.ndarray]:
    """Validate, run ``metric._image`` batched and jitted, return float64 NumPy arrays."""
    fn, images, maps, targets = prepare(model_fn, images, maps, targets)
    metric._validate(images.shape)
    if extra is None:
        extra = jnp.zeros((images.shape[0],), jnp.int32)
    seed = getattr(metric, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"{type(metric).__name__}: seed must be an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if seed != 0:  # the seed is a traced argument: the compiled program is shared by all seeds
        metric = dataclasses.replace(metric, seed=0)
    out = _run(metric, fn, images, maps, targets, extra, jnp.asarray(seed, jnp.uint32), int(getattr(metric, "images_per_call", 1)))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _mean(a: Any) -> float:
    a = np.asarray(a, np.float64)
    return float(np.nanmean(a)) if a.size and np.isfinite(a).any() else float("nan")


def trapezoid(curve: np.ndarray) -> np.ndarray:
    """Quantus' AUC: ``np.trapz(curve, dx=1)`` along the last axis (0 for a single point)."""
    c = np.asarray(curve, np.float64)
    if c.shape[-1] < 2:
        return np.zeros(c.shape[:-1])
    return c.sum(-1) - c[..., 0] / 2 - c[..., -1] / 2


# ----------------------------------------------------------------------------- pixel-flipping


@dataclasses.dataclass(frozen=True)
class PixelFlipping:
    """Pixel-flipping (Bach et al., PLoS ONE 2015), as Quantus 0.6.0 ``PixelFlipping``.

    Protocol: pixels are replaced by the baseline in decreasing order of the map,
    ``features_in_step`` at a time, **cumulatively**; after every step the target's score
    (softmax probability) is recorded. ``curve`` (N, S), ``S = ceil(H*W / features_in_step)``
    (no point for the unperturbed image, as Quantus); ``auc`` = trapezoid with unit spacing
    (Quantus' ``get_auc_score``); ``auc_norm`` = the same on [0, 1] (``auc / (S - 1)``).
    Lower is better. Maps: Quantus' ``normalise=True``, ``abs=False`` (order only, so neither
    changes the result unless ``abs``).

    Defaults = Quantus: ``features_in_step=1``, baseline ``"black"`` (the image's minimum),
    softmax scores. Bach et al. flip (invert) pixels in patches of a few pixels, or replace them
    by uniform noise; they report the curve of the classifier's output.
    """

    features_in_step: int = 1
    baseline: str | float = "black"
    score: str = "softmax"
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape: tuple[int, ...]) -> None:
        _check_positive("pixel-flipping", "features_in_step", self.features_in_step)
        _check_positive("pixel-flipping", "steps_per_call", self.steps_per_call)
        _check_baseline(self.baseline)
        _check_score("pixel-flipping", self.score)
        if self.features_in_step > shape[1] * shape[2]:
            raise ValueError(f"pixel-flipping: features_in_step={self.features_in_step} exceeds the {shape[1] * shape[2]} pixels of an image")

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        k = self.features_in_step
        rank = _faith.saliency_rank(prepare_map(a, self.normalise, self.abs)[None])[0]
        b = baseline_value(x, self.baseline)
        steps = -(-h * w // k)
        curve = step_scores(fn, lambda s: jnp.where((rank < (s + 1) * k)[..., None], b, x), steps, t, x.dtype, self.score, self.steps_per_call)
        return {"curve": curve}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        v = run(self, model_fn, images, maps, targets)
        c = v["curve"]
        v["auc"] = trapezoid(c)
        v["auc_norm"] = v["auc"] / max(c.shape[-1] - 1, 1)
        return v

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"pixel_flipping_auc": _mean(values["auc"]), "pixel_flipping_auc_norm": _mean(values["auc_norm"])}


# ----------------------------------------------------------------------------- region perturbation / selectivity


def _patch_curve(metric, fn, x, a, t, patch, order, regions):
    """Scores after cumulatively replacing the ``regions`` first patches (in ``order``)."""
    h, w, _ = x.shape
    pid, n = patch_ids(h, w, patch)
    a = prepare_map(a, metric.normalise, metric.abs)
    sums = jax.ops.segment_sum(a.reshape(-1), jnp.asarray(pid.reshape(-1)), num_segments=n)
    prank = _rank_desc(sums if order == "morf" else -sums)
    key = prank[jnp.asarray(pid)]
    b = baseline_value(x, metric.baseline)
    steps = min(regions, n)
    return step_scores(fn, lambda s: jnp.where((key <= s)[..., None], b, x), steps, t, x.dtype, metric.score, metric.steps_per_call)


def _check_patch(owner: str, patch: int, shape: tuple[int, ...]) -> None:
    _check_positive(owner, "patch_size", patch)
    if patch > min(shape[1], shape[2]):
        raise ValueError(f"{owner}: patch_size={patch} is larger than the image ({shape[1]} x {shape[2]})")


@dataclasses.dataclass(frozen=True)
class RegionPerturbation:
    """Region perturbation (Samek et al., IEEE TNNLS 2017), as Quantus 0.6.0 ``RegionPerturbation``.

    Protocol: the image is cut into non-overlapping ``patch_size`` squares (Quantus' grid, see
    :func:`patch_ids`), ranked by the sum of the map over each patch (``order="morf"``: most
    relevant first; ``"lerf"``: least relevant first); the first ``regions_evaluation`` patches
    are replaced by the baseline **cumulatively**. ``curve`` (N, L) = ``f(x) - f(x_k)`` (softmax
    of the target), k = 1..L; ``aopc`` = the paper's AOPC, ``sum_{k=0}^{L} (f(x) - f(x_k)) /
    (L + 1)`` (the k = 0 term is 0); ``auc`` = Quantus' unit-spacing trapezoid of ``curve``.
    MoRF: higher AOPC is better; LeRF: lower.

    Defaults = Quantus: ``patch_size=8``, ``regions_evaluation=100``, baseline ``"black"``,
    softmax. Samek et al. use 9 x 9 regions around each pixel (overlapping, chosen greedily),
    replaced by uniform random values, L = 100 and AOPC.
    """

    patch_size: int = 8
    order: str = "morf"
    regions_evaluation: int = 100
    baseline: str | float = "black"
    score: str = "softmax"
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape):
        _check_patch("region-perturbation", self.patch_size, shape)
        _check_positive("region-perturbation", "regions_evaluation", self.regions_evaluation)
        _check_positive("region-perturbation", "steps_per_call", self.steps_per_call)
        if self.order not in ("morf", "lerf"):
            raise ValueError(f"region-perturbation: order must be 'morf' or 'lerf'; got {self.order!r}")
        _check_baseline(self.baseline)
        _check_score("region-perturbation", self.score)

    def _image(self, fn, x, a, t, extra, key):
        ys = _patch_curve(self, fn, x, a, t, self.patch_size, self.order, self.regions_evaluation)
        return {"curve": clean_score(fn, x, t, self.score) - ys}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        v = run(self, model_fn, images, maps, targets)
        c = v["curve"]
        v["aopc"] = c.sum(-1) / (c.shape[-1] + 1)
        v["auc"] = trapezoid(c)
        return v

    def summarize(self, values):
        return {f"region_perturbation_{self.order}_aopc": _mean(values["aopc"]), f"region_perturbation_{self.order}_auc": _mean(values["auc"])}


@dataclasses.dataclass(frozen=True)
class Selectivity:
    """Selectivity (Montavon et al., Digital Signal Processing 2018), as Quantus 0.6.0 ``Selectivity``.

    Protocol: all ``patch_size`` patches (Quantus' grid, :func:`patch_ids`) are replaced by the
    baseline in decreasing order of their summed attribution, cumulatively; ``curve`` (N, P) is
    the target's softmax after each removal; ``auc`` = unit-spacing trapezoid (Quantus'
    ``get_auc_score``), ``auc_norm`` = ``auc / (P - 1)``. Lower is better.

    Defaults = Quantus: ``patch_size=8``, baseline ``"black"``, softmax. Montavon et al. remove
    4 x 4 patches (replaced by noise/blur) and plot the function value against the number of
    removed patches.
    """

    patch_size: int = 8
    baseline: str | float = "black"
    score: str = "softmax"
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape):
        _check_patch("selectivity", self.patch_size, shape)
        _check_positive("selectivity", "steps_per_call", self.steps_per_call)
        _check_baseline(self.baseline)
        _check_score("selectivity", self.score)

    def _image(self, fn, x, a, t, extra, key):
        h, w, _ = x.shape
        return {"curve": _patch_curve(self, fn, x, a, t, self.patch_size, "morf", patch_ids(h, w, self.patch_size)[1])}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        v = run(self, model_fn, images, maps, targets)
        c = v["curve"]
        v["auc"] = trapezoid(c)
        v["auc_norm"] = v["auc"] / max(c.shape[-1] - 1, 1)
        return v

    def summarize(self, values):
        return {"selectivity_auc": _mean(values["auc"]), "selectivity_auc_norm": _mean(values["auc_norm"])}


# ----------------------------------------------------------------------------- IROF


def superpixels(images: Any, n_segments: int = 100, compactness: float = 10.0) -> np.ndarray:
    """(N, H, W) int32 SLIC labels 0..n-1 of each image, on the host (scikit-image), as Quantus.

    Quantus calls ``skimage.segmentation.slic(img, start_label=0)`` on the (H, W, C) image in
    float64 (the model's input space), i.e. ``n_segments=100``, ``compactness=10``.
    """
    from skimage.segmentation import slic

    x = np.asarray(images, np.float64)
    return np.stack([slic(im, n_segments=int(n_segments), compactness=float(compactness), start_label=0, channel_axis=-1) for im in x]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class IROF:
    """Iterative Removal of Features (Rieger & Hansen 2020), as Quantus 0.6.0 ``IROF``.

    Protocol: SLIC superpixels of each image (host, :func:`superpixels`); each superpixel's
    score is the mean of the map over it; superpixels are replaced by the baseline in
    decreasing order of that score, **cumulatively**; ``curve`` (N, max_segments) =
    ``f(x_k) / f(x)`` (target softmax), zero-padded after the image's ``num_segments``;
    ``aoc`` = ``num_segments - trapz(curve[:num_segments])`` (Quantus' area over the curve with
    unit spacing); ``aoc_norm`` = ``aoc / num_segments``. Higher is better.

    Defaults = Quantus: SLIC ``n_segments=100``, ``compactness=10``; baseline ``"mean"``;
    softmax. ``running_mean=True`` reproduces Quantus' mean when Quantus is called one image at
    a time: Quantus takes the mean of the *already perturbed* image at every step (so it
    drifts), over the whole array it is given (all images of its batch), whereas xaijax takes
    it per image; the default uses the clean
    image's mean, as the paper ("replaced by the mean value"). The paper normalises the x axis
    to [0, 1] (``aoc_norm``-like). Curves longer than ``max_segments`` are an error (raise it).
    Quantus' trapezoid also runs over the zero padding of a batch (adding half the last real
    point for images with fewer superpixels than the batch's maximum); xaijax does not.
    """

    n_segments: int = 100
    compactness: float = 10.0
    max_segments: int = 200
    baseline: str | float = "mean"
    running_mean: bool = False
    score: str = "softmax"
    normalise: bool = True
    abs: bool = False
    steps_per_call: int = 256
    images_per_call: int = 1

    def _validate(self, shape):
        _check_positive("irof", "n_segments", self.n_segments)
        _check_positive("irof", "max_segments", self.max_segments)
        _check_positive("irof", "steps_per_call", self.steps_per_call)
        _check_baseline(self.baseline)
        _check_score("irof", self.score)
        if self.running_mean and self.baseline != "mean":
            raise ValueError(f"irof: running_mean=True needs baseline='mean'; got {self.baseline!r}")

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        self._validate(np.shape(images))
        labels = superpixels(images, self.n_segments, self.compactness)
        counts = labels.reshape(labels.shape[0], -1).max(axis=1) + 1
        if counts.max(initial=0) > self.max_segments:
            raise ValueError(f"irof: SLIC gave {int(counts.max())} superpixels, more than max_segments={self.max_segments}; raise max_segments")
        if counts.size and counts.min() < 2:
            raise ValueError("irof: an image has fewer than 2 superpixels (Quantus' minimum); use a larger image or more n_segments")
        steps = int(counts.max(initial=1))
        inner = _IROFSteps(self, steps)
        v = run(inner, model_fn, images, maps, targets, extra=jnp.asarray(labels))
        c = v["curve"]
        pos = np.arange(c.shape[1])[None, :]
        c = np.where(pos < counts[:, None], c, 0.0)
        aoc = counts - np.array([trapezoid(row[:k]) for row, k in zip(c, counts)])
        out = np.zeros((c.shape[0], self.max_segments))
        out[:, : c.shape[1]] = c
        return {"curve": out, "num_segments": counts.astype(np.float64), "aoc": aoc, "aoc_norm": aoc / counts}

    def summarize(self, values):
        return {"irof_aoc": _mean(values["aoc"]), "irof_aoc_norm": _mean(values["aoc_norm"])}


@dataclasses.dataclass(frozen=True)
class _IROFSteps:
    """IROF's jitted kernel with the batch's superpixel count as a static step count."""

    cfg: IROF
    steps: int

    @property
    def images_per_call(self) -> int:
        return self.cfg.images_per_call

    def _validate(self, shape):
        pass

    def _image(self, fn, x, a, t, labels, key):
        cfg = self.cfg
        n = self.steps
        a = prepare_map(a, cfg.normalise, cfg.abs)
        lab = labels.reshape(-1)
        cnt = jax.ops.segment_sum(jnp.ones_like(a.reshape(-1)), lab, num_segments=n)
        mean = jax.ops.segment_sum(a.reshape(-1), lab, num_segments=n) / jnp.where(cnt > 0, cnt, 1)
        srank = _rank_desc(jnp.where(cnt > 0, mean, -jnp.inf))  # absent labels go last
        key = srank[labels]
        if cfg.running_mean:
            order = jnp.argsort(srank)  # segment id at each rank
            seg_sum = jax.ops.segment_sum(x.sum(-1).reshape(-1), lab, num_segments=n)[order]
            seg_cnt = cnt[order] * x.shape[-1]

            def body(m, args):
                s_sum, s_cnt = args
                return m + (s_cnt * m - s_sum) / x.size, m  # the mean before this step is its value

            _, vals = jax.lax.scan(body, x.mean(), (seg_sum, seg_cnt))
            make = lambda s: jnp.where((key <= s)[..., None], vals[key][..., None], x)
        else:
            b = baseline_value(x, cfg.baseline)
            make = lambda s: jnp.where((key <= s)[..., None], b, x)
        y = clean_score(fn, x, t, cfg.score)
        return {"curve": step_scores(fn, make, n, t, x.dtype, cfg.score, cfg.steps_per_call) / y}


# ----------------------------------------------------------------------------- ROAD

#: ROAD's neighbour weights (Rong et al. 2022): 1/6 for the 4 direct, 1/12 for the 4 diagonal neighbours.
ROAD_KERNEL = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def _neighbour_sum(v: jax.Array) -> jax.Array:
    """sum_j w_ij v_j over the 8 neighbours of every pixel (zero outside the image); v (H, W, ...)."""
    h, w = v.shape[:2]
    p = jnp.pad(v, ((1, 1), (1, 1)) + ((0, 0),) * (v.ndim - 2))
    out = jnp.zeros_like(v)
    for di in range(3):
        for dj in range(3):
            if ROAD_KERNEL[di, dj]:
                out = out + ROAD_KERNEL[di, dj] * p[di : di + h, dj : dj + w]
    return out


def road_impute(x: jax.Array, mask: jax.Array, *, tol: float | None = None, max_iter: int = 2000) -> jax.Array:
    """ROAD's linear imputation of the masked pixels of one image (noise-free).

    Every masked pixel's value is the weighted mean of its (up to 8) neighbours inside the
    image, masked or not (weights :data:`ROAD_KERNEL`, renormalised at the border): for masked
    i, ``D_i v_i - sum_{j masked} w_ij v_j = sum_{j known} w_ij x_j`` with
    ``D_i = sum_{j in image} w_ij``. Channels are independent systems with the same matrix.
    This is the sparse system of Rong et al.'s ``NoisyLinearImputer`` (and Quantus'
    ``noisy_linear_imputation``, solved there with ``scipy.sparse.linalg.spsolve`` on the host);
    here it is solved on the device by **conjugate gradients** on the masked pixels (the matrix
    is symmetric positive definite when every masked region touches a known pixel), vmappable
    over masks and images, to the relative residual ``tol`` (default 1e-12 in float64, 1e-6 in
    float32) or ``max_iter`` iterations. A fully masked image has no known pixel: the
    solution is 0.

    Args:
      x: (H, W, C) image; mask: (H, W) bool, True = impute.
    Returns:
      (H, W, C) image with the masked pixels replaced by the solution.
    """
    m = mask.astype(x.dtype)[..., None]
    d = _neighbour_sum(jnp.ones(x.shape[:2], x.dtype))[..., None]
    if tol is None:
        tol = 1e-12 if x.dtype == jnp.float64 else 1e-6

    def apply(v):
        return m * (d * v - _neighbour_sum(m * v))

    b = m * _neighbour_sum((1 - m) * x)
    bb = jnp.sum(b * b)
    thresh = (tol**2) * bb

    def cond(state):
        i, _, r, _, rr = state
        return (i < max_iter) & (rr > thresh)

    def body(state):
        i, v, r, p, rr = state
        ap = apply(p)
        pap = jnp.sum(p * ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1), 0)
        v = v + alpha * p
        r = r - alpha * ap
        rr_new = jnp.sum(r * r)
        p = r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1), 0) * p
        return i + 1, v, r, p, rr_new

    v0 = jnp.zeros_like(x)
    _, v, _, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), v0, b, b, bb))
    return jnp.where(m > 0, v, x)


@dataclasses.dataclass(frozen=True)
class ROAD:
    """RemOve And Debias (Rong et al., ICML 2022), as Quantus 0.6.0 ``ROAD``.

    Protocol: for every percentage p, the ``int(H*W*p/100)`` most (``order="morf"``) or least
    (``"lerf"``) relevant pixels are replaced by ROAD's noisy linear imputation
    (:func:`road_impute`, then ``+ noise * N(0, 1)`` per imputed value) of the *clean* image
    (not cumulative), and the model's top-1 decision is compared with the target.
    ``correct`` (N, P) is 1/0, ``probability`` (N, P) the target's softmax; ``accuracy`` (N,)
    the mean of ``correct`` over the percentages. Quantus returns, per percentage, the mean of
    ``correct`` over the images (``summarize`` gives ``road_{order}_accuracy``, the mean over
    both). MoRF: lower is better; LeRF: higher.

    Defaults = Quantus: ``percentages = 1, 3, ..., 99``, ``noise=0.01``, MoRF only in Quantus.
    The paper evaluates 10 %, 20 %, ..., 90 % with both MoRF and LeRF, noise 0.01 (the authors'
    ``NoisyLinearImputer``). Noise draws: ``fold_in(key(seed), percentage index)``, one normal
    per pixel and channel (only the imputed ones are used), the same for every image. Quantus
    solves each system with scipy's sparse LU on the host, image by image and percentage by
    percentage; here all percentages of an image are imputed in one vmapped CG solve
    (``cg_tol``, ``cg_max_iter``; see :func:`road_impute`).
    """

    percentages: tuple[float, ...] = tuple(range(1, 100, 2))
    order: str = "morf"
    noise: float = 0.01
    seed: int = 0
    cg_tol: float | None = None
    cg_max_iter: int = 2000
    steps_per_call: int = 64
    images_per_call: int = 1

    def __post_init__(self):  # a list is accepted (the compiled program is keyed on a tuple)
        object.__setattr__(self, "percentages", tuple(float(p) for p in np.atleast_1d(self.percentages)))

    def _validate(self, shape):
        if not self.percentages or any(not 0 <= float(p) <= 100 for p in self.percentages):
            raise ValueError(f"road: percentages must be a non-empty sequence of values in [0, 100]; got {self.percentages!r}")
        if self.order not in ("morf", "lerf"):
            raise ValueError(f"road: order must be 'morf' or 'lerf'; got {self.order!r}")
        if not self.noise >= 0:
            raise ValueError(f"road: noise must be >= 0; got {self.noise!r}")
        _check_positive("road", "cg_max_iter", self.cg_max_iter)
        _check_positive("road", "steps_per_call", self.steps_per_call)

    def counts(self, h: int, w: int) -> tuple[int, ...]:
        """Pixels imputed at each percentage: ``int(H*W*p/100)`` (Quantus)."""
        return tuple(int(h * w * float(p) / 100) for p in self.percentages)

    def _image(self, fn, x, a, t, extra, key):
        h, w, c = x.shape
        rank = _faith.saliency_rank((a if self.order == "morf" else -a)[None])[0]
        cnt = jnp.asarray(self.counts(h, w), jnp.int32)

        def make(s):
            mask = rank < cnt[s]
            imp = road_impute(x, mask, tol=self.cg_tol, max_iter=self.cg_max_iter)
            eps = jax.random.normal(jax.random.fold_in(key, s), x.shape, x.dtype)
            return jnp.where(mask[..., None], imp + self.noise * eps, x)

        def one(s):
            out = fn(make(s)[None])[0].astype(x.dtype)
            return jax.nn.softmax(out)[t], (jnp.argmax(out) == t).astype(x.dtype)

        n = len(self.percentages)
        prob, correct = jax.lax.map(one, jnp.arange(n, dtype=jnp.int32), batch_size=max(1, min(self.steps_per_call, n)))
        return {"probability": prob, "correct": correct}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        v = run(self, model_fn, images, maps, targets)
        v["accuracy"] = v["correct"].mean(-1)
        return v

    def summarize(self, values):
        return {f"road_{self.order}_accuracy": _mean(values["accuracy"]), f"road_{self.order}_probability": _mean(values["probability"])}


# ----------------------------------------------------------------------------- average drop / increase in confidence


@dataclasses.dataclass(frozen=True)
class AverageDrop:
    """Average drop and increase in confidence (Chattopadhay et al., WACV 2018, Grad-CAM++).

    Protocol: the map, min-max normalised to [0, 1] per image (:func:`xaijax.imageops.minmax_normalize`;
    a constant map becomes 0, i.e. everything masked), is used as a soft mask
    ``x_m = E * x + (1 - E) * baseline``; with ``Y`` the target's softmax on ``x`` and ``O`` on
    ``x_m``: ``drop = max(0, Y - O) / Y`` and ``increase = [O > Y]`` per image. The paper's
    numbers are ``100 * mean(drop)`` (% average drop, lower is better) and ``100 *
    mean(increase)`` (% increase in confidence, higher is better); ``summarize`` gives them in
    percent. The paper multiplies the explanation map with the [0, 1] image, so a masked pixel
    is black; here the mask acts in the model's input space with ``baseline=0.0`` (the dataset
    mean colour for mean/std-normalised inputs); ``baseline="black"`` gives the image's
    minimum. Not in Quantus 0.6.0.
    """

    baseline: str | float = 0.0
    images_per_call: int = 16

    name = "average_drop"

    def _validate(self, shape):
        _check_baseline(self.baseline)
        _check_positive(self.name, "images_per_call", self.images_per_call)

    def _image(self, fn, x, a, t, extra, key):
        e = minmax_normalize(a[None])[0][..., None]
        xm = e * x + (1 - e) * baseline_value(x, self.baseline)
        p = jax.nn.softmax(fn(jnp.stack([x, xm])).astype(x.dtype), axis=-1)[:, t]
        y, o = p[0], p[1]
        return {"drop": jnp.maximum(y - o, 0) / y, "increase": (o > y).astype(x.dtype), "score": y, "masked_score": o}

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        return run(self, model_fn, images, maps, targets)

    def summarize(self, values):
        return {"average_drop": 100 * _mean(values["drop"]), "increase_in_confidence": 100 * _mean(values["increase"])}


@dataclasses.dataclass(frozen=True)
class IncreaseInConfidence(AverageDrop):
    """Increase in confidence (Chattopadhay et al. 2018): the same soft-mask protocol as
    :class:`AverageDrop`; ``summarize`` reports ``increase_in_confidence`` (percent of images whose
    target softmax rises on the masked image). Higher is better."""

    name = "increase_in_confidence"

    def summarize(self, values):
        return {"increase_in_confidence": 100 * _mean(values["increase"])}


register_model_metric("pixel-flipping", PixelFlipping)
register_model_metric("region-perturbation", RegionPerturbation)
register_model_metric("selectivity", Selectivity)
register_model_metric("irof", IROF)
register_model_metric("road", ROAD)
register_model_metric("average-drop", AverageDrop)
register_model_metric("increase-in-confidence", IncreaseInConfidence)


# ----------------------------------------------------------------------------- sufficiency (batch-coupled)


_predict = jax.jit(lambda fn, x: fn(x))


@functools.partial(jax.jit, static_argnames=("threshold",))
def _sufficiency(a: jax.Array, pred: jax.Array, threshold: float) -> jax.Array:
    n = a.shape[0]
    var = jnp.var(a, axis=0, ddof=1)
    diff = a[:, None, :] - a[None, :, :]
    dist = jnp.sqrt(jnp.sum(diff * diff / var, axis=-1))  # scipy's seuclidean with V = column variances
    m = jnp.max(jnp.abs(dist))
    dist = jnp.where(m > 0, dist / jnp.where(m > 0, m, 1), dist)  # Quantus normalise_by_max of the matrix
    sim = (dist <= threshold) & ~jnp.eye(n, dtype=bool)
    same = pred[:, None] == pred[None, :]
    cnt = sim.sum(-1)
    return jnp.where(cnt > 0, (sim & same).sum(-1) / jnp.where(cnt > 0, cnt, 1), 0.0).astype(a.dtype)


@dataclasses.dataclass(frozen=True)
class Sufficiency:
    """Sufficiency (Dasgupta, Frost & Moshkovitz, ICML 2022), as Quantus 0.6.0 ``Sufficiency``.

    **Batch-coupled by definition**: image i's value is the share of the *other images of the
    call* whose explanation is close to i's and whose predicted class equals i's (0 if none is
    close). Closeness: the standardised Euclidean distance between the flattened maps (scipy's
    ``seuclidean``, per-pixel variance over the call's maps, ddof 1), divided by the largest
    distance of the call, ``<= threshold``. Maps are preprocessed as Quantus: divided by the
    largest |value| *of the whole call* (a global scale, which the standardised distance
    ignores), then ``abs``. ``sufficiency`` (N,); higher is better. A pixel constant over all
    maps makes its variance 0 and the distances inf/NaN (as scipy).

    Defaults = Quantus: ``threshold=0.6``, ``abs=True``, ``normalise=True``. Because a value
    depends on which images share the call, "a batch == its images one at a time" does not
    hold (a single image scores 0): evaluate the whole set in one call. It declares this with
    ``per_image = False``: ``xaijax eval`` then scores each batch's pairs in one unpadded call
    (the neighbours of a pair are the other pairs of its batch of ``--batch`` images), and the
    battery checks permutation equivariance instead of batch == single images.
    """

    #: a value depends on the other images of the call (see above)
    per_image: ClassVar[bool] = False

    threshold: float = 0.6
    normalise: bool = True
    abs: bool = True

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        if not 0 <= float(self.threshold):
            raise ValueError(f"sufficiency: threshold must be >= 0; got {self.threshold!r}")
        fn, images, maps, targets = prepare(model_fn, images, maps, targets)
        a = maps.reshape(maps.shape[0], -1)
        if self.normalise:
            m = jnp.max(jnp.abs(a))
            a = jnp.where(m > 0, a / jnp.where(m > 0, m, 1), a)
        if self.abs:
            a = jnp.abs(a)
        pred = jnp.argmax(_predict(fn, images), axis=-1)
        return {"sufficiency": np.asarray(_sufficiency(a, pred, float(self.threshold)), np.float64)}

    def summarize(self, values):
        return {"sufficiency": _mean(values["sufficiency"])}


register_model_metric("sufficiency", Sufficiency)
