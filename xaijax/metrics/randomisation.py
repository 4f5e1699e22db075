"""Randomisation metrics: model parameter randomisation (MPRT, smooth and efficient MPRT), random logit.

Method-based metrics (see :mod:`xaijax.metrics.robustness` for the shared call and
conventions). The re-initialisation, layer order and similarity functions are those of
:mod:`xaijax.metrics.sanity` (Adebayo et al.'s cascading randomisation), reused here:

* layers: :func:`~xaijax.metrics.sanity.randomizable_layers` (modules owning a ``kernel``, in
  forward order); ``layers=`` an explicit bottom-up list of module paths;
* fresh values: :func:`xaijax.models.random_variables` with ``seed`` (He-normal kernels, zero
  biases), or ``fresh=`` given to the call (e.g. the values a torch ``reset_parameters`` gave,
  to compare with Quantus on the very same randomised models);
* :func:`~xaijax.metrics.sanity.cascade_variables` builds each randomised model.

Each randomised model is one call of the jitted method on the whole batch (the compiled
program is reused for every layer: the variables are arguments, not constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from xaijax.metrics import sanity
from xaijax.metrics.registry import register_method_metric
from xaijax.metrics.robustness import (
    _call_method,
    _call_method_jit,
    _own_loop,
    check_method_metric_inputs,
    image_keys,
    model_logits,
    postprocess_maps,
)
from xaijax.models.init import random_variables
from xaijax.static_jit import bind_static

__all__ = [
    "SIMILARITIES",
    "similarity",
    "ssim_flat",
    "histogram_entropy",
    "randomised_variables",
    "MPRT",
    "SmoothMPRT",
    "EfficientMPRT",
    "RandomLogit",
]

ORDERS = ("top-down", "bottom-up", "independent")


# ----------------------------------------------------------------------------- similarities


def ssim_flat(a: np.ndarray, b: np.ndarray, win_size: int = 7) -> np.ndarray:
    """SSIM of flattened maps, per row: (N, F) pairs -> (N,), as Quantus 0.6.0's ``ssim`` does
    (``skimage.metrics.structural_similarity`` on the 1-D vectors: uniform window of ``win_size``,
    K1 0.01, K2 0.03, sample covariances, border of (win_size - 1) // 2 cropped, data range =
    max - min over both vectors)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape[-1] < win_size:
        raise ValueError(f"maps of {a.shape[-1]} values are shorter than the SSIM window {win_size}")
    dr = np.maximum(a, b).max(-1, keepdims=True) - np.minimum(a, b).min(-1, keepdims=True)
    dr = np.where(dr > 0, dr, 1.0)
    win = lambda v: np.lib.stride_tricks.sliding_window_view(v, win_size, axis=-1).mean(-1)
    ux, uy = win(a), win(b)
    cov = win_size / (win_size - 1.0)
    vx = cov * (win(a * a) - ux * ux)
    vy = cov * (win(b * b) - uy * uy)
    vxy = cov * (win(a * b) - ux * uy)
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(-1)


def _ssim_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of (N, H, W) maps (skimage's 2-D defaults, :func:`xaijax.metrics.sanity.ssim`), data
    range = max - min over both maps of a pair (as Quantus chooses it)."""
    lo = np.minimum(a.min((1, 2)), b.min((1, 2)))[:, None, None]
    hi = np.maximum(a.max((1, 2)), b.max((1, 2)))[:, None, None]
    dr = np.where(hi - lo > 0, hi - lo, 1.0)
    return np.asarray(sanity.ssim(jnp.asarray(a / dr, jnp.float32), jnp.asarray(b / dr, jnp.float32)), np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1) - a.reshape(a.shape[0], -1).mean(1, keepdims=True)
    b = b.reshape(b.shape[0], -1) - b.reshape(b.shape[0], -1).mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


#: similarity name -> f((N, H, W), (N, H, W)) -> (N,)
SIMILARITIES = {
    "spearman": lambda a, b: sanity.spearman(a, b),
    "pearson": _pearson,
    "ssim": lambda a, b: ssim_flat(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)),
    "ssim-2d": _ssim_2d,
}


def similarity(name: str, a: Any, b: Any) -> np.ndarray:
    """Per-image similarity of two (N, H, W) map stacks (float64 (N,)): ``"spearman"`` (rank
    correlation of the flattened maps, average ranks for ties; NaN for a constant map; Quantus'
    ``correlation_spearman``), ``"pearson"``, ``"ssim"`` (Quantus' ``ssim``: 1-D SSIM of the
    flattened maps, :func:`ssim_flat`), ``"ssim-2d"`` (2-D SSIM, 7 x 7 window)."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; use one of {sorted(SIMILARITIES)}")
    return np.asarray(SIMILARITIES[name](np.asarray(a, np.float64), np.asarray(b, np.float64)), np.float64)


def histogram_entropy(maps: Any, n_bins: int = 100) -> np.ndarray:
    """Discrete entropy (natural log) of the histogram of each map: (N, ...) -> (N,); ``n_bins``
    equal bins between the map's min and max (``np.histogram``), Quantus' ``discrete_entropy``."""
    m = np.asarray(maps, np.float64).reshape(np.shape(maps)[0], -1)
    out = np.empty(m.shape[0])
    for i, row in enumerate(m):
        hist, _ = np.histogram(row, bins=n_bins)
        out[i] = scipy.stats.entropy(hist)
    return out


# ----------------------------------------------------------------------------- randomised models


def randomised_variables(
    model: Any, variables: Mapping[str, Any], x: Any, order: str, *, layers: Sequence[str] | None = None,
    seed: int = 0, include_norm: bool = False, fresh: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[dict]]:
    """The randomised models of a parameter-randomisation test: ``(names, variables_list)``.

    ``order``: ``"top-down"`` (cascading from the logits down: step k randomises the top k
    layers, Adebayo et al.'s cascading test), ``"bottom-up"`` (cascading from the input up),
    ``"independent"`` (step k randomises layer k only, all others trained). ``names[k]`` is
    the layer randomised last at step k.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    if layers is None:
        layers = sanity.randomizable_layers(model, variables, x, include_norm=include_norm)
    else:
        layers = list(layers)
        known = set(sanity.randomizable_layers(model, variables, x, include_norm=True))
        bad = [l for l in layers if l not in known]
        if bad:
            raise ValueError(f"layers {bad} are not parameterised layers of the model; known: {sorted(known)}")
    if not layers:
        raise ValueError("the model has no parameterised layers to randomise")
    if fresh is None:
        fresh = random_variables(model, tuple(np.shape(x)), seed=seed)
    dtype = jnp.result_type(jax.tree_util.tree_leaves(variables)[0])
    fresh = jax.tree_util.tree_map(lambda f: jnp.asarray(f, dtype if jnp.issubdtype(jnp.result_type(f), jnp.floating) else None), dict(fresh))
    seq = list(reversed(layers)) if order == "top-down" else list(layers)
    if order == "independent":
        vs = [sanity.cascade_variables(variables, fresh, [l], 1, include_norm=include_norm) for l in seq]
    else:
        vs = [sanity.cascade_variables(variables, fresh, seq, k, include_norm=include_norm) for k in range(1, len(seq) + 1)]
    return seq, vs


def _maps(method, model, variables, x, t):
    if _own_loop(method):
        return method(model, variables, x, t)
    return bind_static(_call_method, _call_method_jit, method, model)(variables, x, t)


# ----------------------------------------------------------------------------- MPRT


@dataclasses.dataclass(frozen=True)
class MPRT:
    """Model Parameter Randomisation Test (Adebayo et al., NeurIPS 2018, "Sanity checks for
    saliency maps").

    Protocol: the maps of the trained model are compared, image by image, with the maps of
    randomised models — one per layer, in ``order`` (cascading ``"top-down"``, the paper's
    cascading test; ``"independent"``, the paper's independent test; ``"bottom-up"``) — with
    ``similarity`` after map post-processing (``normalise``, ``abs_maps``). A method that
    explains the model gives low similarity; a model-independent method (edge detector,
    :class:`~xaijax.methods.baselines.Center`) gives 1.

    Defaults: Adebayo et al. report Spearman rank correlation (of absolute and signed maps),
    SSIM and HOG similarity; Quantus 0.6.0 (``MPRT``): ``layer_order="top_down"``, Spearman,
    map normalisation (batch-wide there, per image here — irrelevant to a rank correlation)
    and absolute value on, randomisation by torch's ``reset_parameters`` of every module that
    has one (xaijax: He-normal kernels and zero biases of every conv/dense layer, see the
    module docstring; pass ``fresh=`` to use other values). Quantus also reports the
    similarity of the trained model with itself ("original", 1 for deterministic methods).

    Returns ``{"similarity": (N, L) per layer in randomisation order, "similarity_mean": (N,),
    "similarity_last": (N,)}``; the layer names are :meth:`layer_names`. ``similarity_last``
    is Quantus' ``return_last_correlation``. ``similarity_mean`` is the mean over the L
    randomised models; Quantus 0.6.0's ``return_average_correlation`` also averages in its
    "original" entry (its loop skips a key ``"orig"``, but the entry is stored as
    ``"original"``), i.e. it returns ``(s_original + L * similarity_mean) / (L + 1)``, with
    ``s_original = 1`` for a deterministic method.
    """

    order: str = "top-down"
    similarity: str = "spearman"
    normalise: str = "max"
    abs_maps: bool = True
    layers: tuple[str, ...] | None = None
    include_norm: bool = False
    seed: int = 0

    key: ClassVar[str] = "mprt"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}; got {self.order!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}; got {self.similarity!r}")
        if self.normalise not in ("max", "none"):
            raise ValueError(f"normalise must be 'max' or 'none'; got {self.normalise!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def layer_names(self, model: Any, variables: Any, images: Any) -> list[str]:
        """The layers in randomisation order (column k of ``similarity`` randomised ``names[k]`` last)."""
        x = jnp.asarray(images)
        layers = list(self.layers) if self.layers is not None else sanity.randomizable_layers(model, variables, x, include_norm=self.include_norm)
        return list(reversed(layers)) if self.order == "top-down" else layers

    def _explain(self, method, model, variables, x, t):
        return _maps(method, model, variables, x, t)

    def __call__(self, model, variables, method, images, targets, maps=None, *, fresh=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        _, vs = randomised_variables(model, variables, x, self.order, layers=self.layers, seed=self.seed,
                                     include_norm=self.include_norm, fresh=fresh)
        a0 = self._explain(method, model, variables, x, t) if maps is None or type(self) is not MPRT else maps
        post = lambda a: np.asarray(postprocess_maps(jnp.asarray(a, x.dtype), self.normalise, self.abs_maps), np.float64)
        a0 = post(a0)
        sims = np.stack([similarity(self.similarity, a0, post(self._explain(method, model, v, x, t))) for v in vs], axis=1)
        return {"similarity": sims, "similarity_mean": sims.mean(1), "similarity_last": sims[:, -1]}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        k = self.key
        return {f"{k}_mean": float(np.nanmean(values["similarity_mean"])), f"{k}_last": float(np.nanmean(values["similarity_last"]))}


@dataclasses.dataclass(frozen=True)
class SmoothMPRT(MPRT):
    """Smooth MPRT, sMPRT (Hedström et al. 2023, "Sanity checks revisited: an exploration to
    repair the model parameter randomisation test").

    Protocol: :class:`MPRT` where every map (trained and randomised models) is *denoised*: the
    mean of the method's maps of ``n_samples`` copies x + e, e Gaussian with standard
    deviation ``noise_magnitude * (max(x) - min(x))`` per image, except the last copy, which
    is x itself (e = 0, as Quantus 0.6.0 does it, so that ``n_samples=1`` is the plain
    method). The noise of an image is drawn
    once (from ``seed`` and the image's values) and reused for every model, which removes the
    noise's own variance from the comparison; Quantus draws new noise for every model.

    Defaults = Quantus 0.6.0 (``SmoothMPRT``): 50 samples, noise magnitude 0.1 (its docstring:
    the paper's ImageNet setting), ``layer_order="bottom_up"``, Spearman, normalisation and
    absolute value on. A given ``maps`` is ignored (the denoised maps are recomputed).
    Returns as :class:`MPRT`.
    """

    order: str = "bottom-up"
    n_samples: int = 50
    noise_magnitude: float = 0.1
    batch_size: int = 64

    key: ClassVar[str] = "smooth_mprt"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_samples", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not self.noise_magnitude >= 0:
            raise ValueError(f"noise_magnitude must be >= 0; got {self.noise_magnitude!r}")

    def _explain(self, method, model, variables, x, t):
        keys = image_keys(x, self.seed)
        if _own_loop(method):
            return _smooth_maps(self, method, model, variables, x, t, keys)
        return bind_static(_smooth_maps, _smooth_maps_jit, self, method, model)(variables, x, t, keys)


def _smooth_maps(cfg, method, model, variables, x, t, keys):
    """Mean map over the copies; ``max(1, batch_size // N)`` copies of every image per method
    call, drawn inside the step (sample j of image i from ``fold_in(key_i, j)``; the last
    sample, ``j = n_samples - 1``, is noise-free)."""
    n, s = x.shape[0], cfg.n_samples
    k = max(1, min(s, cfg.batch_size // n))
    nb = -(-s // k)
    flat = x.reshape(n, -1)
    std = (cfg.noise_magnitude * (flat.max(1) - flat.min(1)))[:, None, None, None, None]

    def block(i):
        idx = i * k + jnp.arange(k)
        noise = jax.vmap(lambda key: jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), x.shape[1:], x.dtype))(idx))(keys)
        noise = jnp.where((idx == s - 1)[None, :, None, None, None], 0.0, noise)  # Quantus: the last copy is x
        xs = (x[:, None] + std * noise).reshape((n * k,) + x.shape[1:])
        a = method(model, variables, xs, jnp.repeat(t, k)).reshape((n, k) + x.shape[1:3]).astype(x.dtype)
        return jnp.where((idx < s)[None, :, None, None], a, 0.0).sum(1)

    if _own_loop(method):
        total = sum(block(jnp.asarray(i)) for i in range(nb))
    else:
        total = jax.lax.map(block, jnp.arange(nb)).sum(0)
    return total / s


_smooth_maps_jit = jax.jit(_smooth_maps, static_argnums=(0, 1, 2))


@dataclasses.dataclass(frozen=True)
class EfficientMPRT:
    """Efficient MPRT, eMPRT (Hedström et al. 2024, "A fresh look at sanity checks for saliency maps").

    Protocol, per image: the relative rise in explanation complexity when the whole model is
    randomised, ``(H(a_random) - H(a)) / H(a)``, where H is the discrete entropy (natural log)
    of a histogram of the map with ``n_bins`` equal bins (:func:`histogram_entropy`) and
    a_random the map of the fully randomised model (all layers, cascading). Higher means the
    explanation reacts more to the randomisation.

    Defaults = Quantus 0.6.0 (``EfficientMPRT``): ``skip_layers=True`` (only the fully
    randomised model is explained), 100 bins (its ``n_bins_default``, no bin rule), no map
    normalisation or absolute value. Also returned: the entropies of both maps and of the
    models' softmax outputs (Quantus' "model scores").

    Returns ``{"emprt": (N,), "entropy": (N,), "entropy_random": (N,), "model_entropy": (N,),
    "model_entropy_random": (N,)}``.
    """

    n_bins: int = 100
    normalise: str = "none"
    abs_maps: bool = False
    layers: tuple[str, ...] | None = None
    include_norm: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_bins, (int, np.integer)) or self.n_bins < 1:
            raise ValueError(f"n_bins must be a positive int; got {self.n_bins!r}")
        if self.normalise not in ("max", "none"):
            raise ValueError(f"normalise must be 'max' or 'none'; got {self.normalise!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def __call__(self, model, variables, method, images, targets, maps=None, *, fresh=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        _, vs = randomised_variables(model, variables, x, "bottom-up", layers=self.layers, seed=self.seed,
                                     include_norm=self.include_norm, fresh=fresh)
        full = vs[-1]
        a0 = maps if maps is not None else _maps(method, model, variables, x, t)
        ar = _maps(method, model, full, x, t)
        post = lambda a: np.asarray(postprocess_maps(jnp.asarray(a, x.dtype), self.normalise, self.abs_maps), np.float64)
        h0 = histogram_entropy(post(a0), self.n_bins)
        hr = histogram_entropy(post(ar), self.n_bins)
        p0 = np.asarray(jax.nn.softmax(model_logits(model, variables, x)), np.float64)
        pr = np.asarray(jax.nn.softmax(model_logits(model, full, x)), np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = (hr - h0) / h0
        return {
            "emprt": rel,
            "entropy": h0,
            "entropy_random": hr,
            "model_entropy": scipy.stats.entropy(p0, axis=1),
            "model_entropy_random": scipy.stats.entropy(pr, axis=1),
        }

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"emprt": float(np.nanmean(values["emprt"]))}


# ----------------------------------------------------------------------------- random logit


def random_other_class(keys: jax.Array, targets: Any, num_classes: int) -> np.ndarray:
    """One class != target per image: ``r`` uniform in [0, K - 2] (from the image's key), mapped to
    the r-th class of the sorted classes without the target (Quantus' construction)."""
    r = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes - 1))(keys))
    t = np.asarray(targets)
    return np.where(r < t, r, r + 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RandomLogit:
    """Random Logit test (Sixt, Granz & Landgraf, ICML 2020, "When explanations lie: why many
    modified BP attributions fail").

    Protocol, per image: explain the target class and one other class drawn uniformly from the
    remaining K - 1 classes (:func:`random_other_class`), and report the ``similarity`` of the
    two maps after post-processing. A class-sensitive method gives low similarity; one that
    ignores the class (e.g. :class:`~xaijax.methods.baselines.Center`) gives 1.

    Defaults = Quantus 0.6.0 (``RandomLogit``): SSIM (its ``ssim`` of the *flattened* maps:
    ``"ssim"``; ``"ssim-2d"`` compares the 2-D maps), map normalisation on (batch-wide there,
    per image here), no absolute value; Quantus draws the classes with ``np.random.seed(seed)``
    over the batch (xaijax: from ``seed`` and each image's values) and needs ``num_classes``
    (xaijax reads it from the model). ``off_targets=`` in the call gives the other classes.

    Returns ``{"similarity": (N,), "off_target": (N,) the class used}``.
    """

    similarity: str = "ssim"
    normalise: str = "max"
    abs_maps: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}; got {self.similarity!r}")
        if self.normalise not in ("max", "none"):
            raise ValueError(f"normalise must be 'max' or 'none'; got {self.normalise!r}")

    def __call__(self, model, variables, method, images, targets, maps=None, *, off_targets=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        k = int(jax.eval_shape(lambda v, xx: model.apply(v, xx), variables, x).shape[1])
        if k < 2:
            raise ValueError("random-logit needs a model with at least 2 classes")
        if off_targets is None:
            off = random_other_class(image_keys(x, self.seed), t, k)
        else:
            off = np.asarray(off_targets)
            if off.shape != (x.shape[0],) or off.dtype.kind not in "iu" or (off == np.asarray(t)).any() or (off < 0).any() or (off >= k).any():
                raise ValueError(f"off_targets must be (N,) class indices in [0, {k}) different from the targets; got {off!r}")
        a0 = maps if maps is not None else _maps(method, model, variables, x, t)
        a1 = _maps(method, model, variables, x, jnp.asarray(off, jnp.int32))
        post = lambda a: np.asarray(postprocess_maps(jnp.asarray(a, x.dtype), self.normalise, self.abs_maps), np.float64)
        return {"similarity": similarity(self.similarity, post(a0), post(a1)), "off_target": off.astype(np.float64)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"random_logit": float(np.nanmean(values["similarity"]))}


register_method_metric("mprt", MPRT)
register_method_metric("smooth-mprt", SmoothMPRT)
register_method_metric("efficient-mprt", EfficientMPRT)
register_method_metric("random-logit", RandomLogit)
