"""Localisation metrics of the Quantus catalogue, batched: maps against ground-truth regions.

Registered pair metrics (:mod:`xaijax.metrics.registry`; one row per (image, class) pair):

==========================  ======================================  ==========================
name                        per-pair key                            kernel
==========================  ======================================  ==========================
relevance-mass-accuracy     ``relevance_mass_accuracy``             :func:`relevance_mass_accuracy`
relevance-rank-accuracy     ``relevance_rank_accuracy``             :func:`relevance_rank_accuracy`
top-k-intersection          ``top_k_intersection``                  :func:`top_k_intersection`
attribution-localisation    ``attribution_localisation``            :func:`attribution_localisation`
auc                         ``localisation_auc``                    :func:`roc_auc`
==========================  ======================================  ==========================

Focus (Arias-Duart et al. 2022) needs the model and the method (it explains mosaics):
:func:`focus_mosaics` and :func:`focus`, registered as the method metric ``focus``
(:class:`FocusMetric`) when the registry has method metrics.

Conventions shared by every kernel here:

* ``maps`` (N, H, W) real, ``regions`` (N, H, W) bool (anything else: ``ValueError`` naming the
  argument). Float64 maps give float64 values, float32 maps float32; integer maps are
  promoted to float32. Pairs are independent: a batch of N gives the values of N batches of 1.
* **What is transformed.** Quantus 0.6.0 first divides *all* attributions of a call by their
  largest absolute value (``normalise_by_max`` over the whole batch: one positive scalar) and
  then, where its ``abs`` is on, takes absolute values. Every metric in this file is invariant
  to a positive scale of the map, so that normalisation never changes a value here (up to
  Quantus' 1e-9 stabilisers); the sign treatment does, and it is the ``transform`` argument:
  ``"signed"`` (the map as is), ``"positive"`` (``max(R, 0)``), ``"abs"`` (``|R|``). Each
  kernel documents the paper's choice (the default) and Quantus' where they differ.
* **Undefined values are NaN rows**, as in Quantus: an empty region, a mass ratio whose
  denominator is 0 (a map with no relevance of the counted sign), AUC of a region that covers
  the whole image. NaN or infinite map values are refused by the registered metrics
  (``ValueError`` naming ``maps``); the kernels, which run under ``jit``, cannot check values
  and return NaN for them.
* **Ties** in ranking metrics (rank accuracy, top-k): the places left at the cut-off are shared
  among the tied pixels in proportion (the expectation over a random tie-break), so that a
  constant map scores the region's area fraction. Quantus sorts with NumPy's unstable
  ``argsort``, whose tie order is unspecified; the two agree whenever the cut-off value is
  not tied.
* **Summaries** (``summarize``): the per-class mean of the pair values, then the mean over the
  classes that have pairs, leaving NaN rows out (:func:`xaijax.metrics.iou.class_mean`) — the
  convention of the other xaijax tables. Quantus returns the per-sample values and leaves the
  aggregation to the caller (``return_aggregate``: a plain mean over samples).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import as_float
from xaijax.metrics import registry as _registry
from xaijax.metrics.iou import class_mean

__all__ = [
    "TRANSFORMS",
    "ClassMeanSummary",
    "check_pair_inputs",
    "transform_maps",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
    "attribution_localisation",
    "roc_auc",
    "RelevanceMassAccuracy",
    "RelevanceRankAccuracy",
    "TopKIntersection",
    "AttributionLocalisation",
    "LocalisationAUC",
    "focus_layout",
    "focus_quadrants",
    "focus_mosaics",
    "focus",
    "FocusMetric",
]

#: sign treatments of a map before a metric: as is, positive part, absolute value.
TRANSFORMS = ("signed", "positive", "abs")

#: Quantus' top-k default (1000 pixels) as a fraction of a 224 x 224 image.
QUANTUS_TOP_K_FRACTION = 1000 / (224 * 224)


# ----------------------------------------------------------------------------- shared pieces


def _check_maps(maps: Any, name: str = "maps") -> jax.Array:
    maps = as_float(maps)
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) attribution maps; got shape {maps.shape}")
    return maps


def _check_pairs(maps: Any, regions: Any) -> tuple[jax.Array, jax.Array]:
    maps = _check_maps(maps)
    regions = jnp.asarray(regions)
    if regions.shape != maps.shape:
        raise ValueError(f"regions must have the maps' shape (N, H, W) = {maps.shape}; got {regions.shape}")
    return maps, regions.astype(bool)


def transform_maps(maps: jax.Array, transform: str) -> jax.Array:
    """``"signed"``: the map as is; ``"positive"``: ``max(R, 0)``; ``"abs"``: ``|R|``."""
    if transform == "signed":
        return maps
    if transform == "positive":
        return jnp.maximum(maps, 0)
    if transform == "abs":
        return jnp.abs(maps)
    raise ValueError(f"transform must be one of {TRANSFORMS}; got {transform!r}")


def check_pair_inputs(maps: Any, regions: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Host-side checks of a registered metric's inputs (the kernels check shapes only).

    ``maps`` must be a finite real (N, H, W) array, ``regions`` (if given) a boolean or 0/1
    array of the same shape. Raises ``ValueError`` naming the argument.
    """
    m = np.asarray(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must be (N, H, W) attribution maps; got shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
        raise ValueError(f"maps must be real-valued; got dtype {m.dtype}")
    bad = ~np.isfinite(m).reshape(m.shape[0], -1).all(axis=1)
    if bad.any():
        raise ValueError(f"maps must be finite; pairs {np.flatnonzero(bad).tolist()} hold NaN or infinite values")
    if regions is None:
        return m, None
    r = np.asarray(regions)
    if r.shape != m.shape:
        raise ValueError(f"regions must have the maps' shape (N, H, W) = {m.shape}; got {r.shape}")
    if r.dtype != bool:
        if not np.isin(r, (0, 1)).all():
            raise ValueError("regions must be boolean masks (or 0/1)")
        r = r.astype(bool)
    return m, r


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, NaN where den == 0 (the documented NaN row; no NaN in gradients)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.nan)


def _flat(maps: jax.Array, regions: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = maps.shape[0]
    return maps.reshape(n, -1), regions.reshape(n, -1)


def _top_hits(a: jax.Array, s: jax.Array, k: jax.Array) -> jax.Array:
    """Expected number of region pixels among the ``k`` largest values of each row of ``a``
    (ties at the cut-off share the remaining places in proportion). ``a`` (N, D), ``s`` (N, D)
    bool, ``k`` (N,) int with 1 <= k <= D (rows with k = 0 give 0)."""
    d = a.shape[1]
    desc = -jnp.sort(-a, axis=1)
    t = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, d - 1)[:, None], axis=1)  # the k-th largest value
    above = a > t
    tied = a == t
    n_above = jnp.sum(above, axis=1)
    n_tied = jnp.sum(tied, axis=1)
    in_above = jnp.sum(above & s, axis=1).astype(a.dtype)
    in_tied = jnp.sum(tied & s, axis=1).astype(a.dtype)
    share = (k - n_above).astype(a.dtype) * in_tied / jnp.maximum(n_tied, 1).astype(a.dtype)
    return jnp.where(k > 0, in_above + share, 0)


# ----------------------------------------------------------------------------- kernels


@functools.partial(jax.jit, static_argnames=("transform",))
def relevance_mass_accuracy(maps: jax.Array, regions: jax.Array, transform: str = "positive") -> jax.Array:
    """Relevance mass accuracy (Arras et al. 2022, CLEVR-XAI): share of the relevance mass in the region.

    Protocol, per pair: ``R' = transform(R)``; value ``sum_{p in GT} R'_p / sum_p R'_p``.
    NaN for an empty region or a zero denominator.

    Defaults: the paper counts positive relevance only (``transform="positive"``, a value in
    [0, 1]). Quantus 0.6.0 (``RelevanceMassAccuracy``: ``abs=False``, ``normalise=True``)
    sums the *signed* values (``transform="signed"``), so its ratio can leave [0, 1] when a map
    has negative values. With ``"positive"`` the value equals the energy-based pointing game's
    per-pair fraction (:func:`xaijax.metrics.energy.energy_fraction`) except that a map with
    no positive value is NaN here, 0 there.

    Args:
      maps: (N, H, W) attribution maps.
      regions: (N, H, W) bool ground-truth regions.
      transform: ``"positive"`` (paper), ``"signed"`` (Quantus) or ``"abs"``.

    Returns:
      (N,) values, the maps' float dtype.
    """
    maps, regions = _check_pairs(maps, regions)
    a, s = _flat(transform_maps(maps, transform), regions)
    inside = jnp.sum(jnp.where(s, a, 0), axis=1)
    value = _ratio(inside, jnp.sum(a, axis=1))
    return jnp.where(jnp.any(s, axis=1), value, jnp.nan)


@jax.jit
def relevance_rank_accuracy(maps: jax.Array, regions: jax.Array) -> jax.Array:
    """Relevance rank accuracy (Arras et al. 2022): the share of the region among the K most
    relevant pixels, K = the region's size.

    Protocol, per pair: K = |GT|; take the K pixels with the largest (signed) map values;
    value = |top-K ∩ GT| / K, in [0, 1]; NaN for an empty region. Ties at the cut-off share
    the remaining places in proportion, so a constant map scores K / (H W) (the module
    docstring). The ranking uses the map as is, as both the paper and Quantus 0.6.0
    (``RelevanceRankAccuracy``: ``abs=False``, ``normalise=True``, a positive scale) do.

    Args:
      maps: (N, H, W) attribution maps.
      regions: (N, H, W) bool ground-truth regions.

    Returns:
      (N,) values, the maps' float dtype.
    """
    maps, regions = _check_pairs(maps, regions)
    a, s = _flat(maps, regions)
    k = jnp.sum(s, axis=1)
    return _ratio(_top_hits(a, s, k), k.astype(a.dtype))


def _resolve_k(k: int | float, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise ValueError(f"k must be a pixel count (int) or a fraction of the image (float in (0, 1]); got {k!r}")
    if isinstance(k, (float, np.floating)):
        if not 0 < k <= 1:
            raise ValueError(f"k as a float is a fraction of the image's pixels in (0, 1]; got {k}")
        return max(1, int(round(k * d)))
    if not 1 <= k <= d:
        raise ValueError(f"k must lie in [1, H*W] = [1, {d}] pixels; got {k}")
    return int(k)


@functools.partial(jax.jit, static_argnames=("k", "concept_influence"))
def top_k_intersection(
    maps: jax.Array, regions: jax.Array, k: int | float = QUANTUS_TOP_K_FRACTION, concept_influence: bool = False
) -> jax.Array:
    """Top-k intersection (Theiner et al. 2021): the share of the k most relevant pixels that
    lie in the region.

    Protocol, per pair: take the k pixels with the largest (signed) map values; value =
    |top-k ∩ GT| / k in [0, 1]; with ``concept_influence`` multiplied by (H W) / |GT| (the
    paper's concept influence: 1 is chance level). NaN for an empty region. Ties at the
    cut-off: see the module docstring.

    Defaults: Quantus 0.6.0 (``TopKIntersection``) uses ``k=1000`` pixels whatever the image
    size and refuses images with fewer pixels; xaijax's default is the same share of a
    224 x 224 image, ``k = 1000 / 224**2`` of the pixels (rounded, at least 1), so 128 px
    images use 327 pixels and the value keeps its meaning across sizes. Pass ``k=1000`` (an
    int) for Quantus' count. Both rank the map as is (Quantus: ``abs=False``, and its
    ``normalise`` is a positive scale).

    Args:
      maps: (N, H, W) attribution maps.
      regions: (N, H, W) bool ground-truth regions.
      k: pixel count (int) or fraction of the H W pixels (float in (0, 1]).
      concept_influence: multiply by (H W) / |GT|.

    Returns:
      (N,) values, the maps' float dtype.
    """
    maps, regions = _check_pairs(maps, regions)
    a, s = _flat(maps, regions)
    kk = _resolve_k(k, a.shape[1])
    value = _top_hits(a, s, jnp.full((a.shape[0],), kk)) / kk
    size = jnp.sum(s, axis=1)
    if concept_influence:
        value = _ratio(value * a.shape[1], size.astype(a.dtype))
    return jnp.where(size > 0, value, jnp.nan)


@functools.partial(jax.jit, static_argnames=("transform", "weighted"))
def attribution_localisation(
    maps: jax.Array, regions: jax.Array, transform: str = "positive", weighted: bool = False
) -> jax.Array:
    """Attribution localisation (Kohlbrenner et al. 2020): the inside-total relevance ratio.

    Protocol, per pair: ``R' = transform(R)``; ``mu = sum_{p in GT} R'_p / sum_p R'_p``;
    weighted: ``mu_w = mu * (H W) / |GT|`` (a map spread uniformly scores 1 whatever the
    region's size). NaN for an empty region or a zero denominator.

    Defaults and Quantus 0.6.0 (``AttributionLocalisation``):

    * sign: the paper counts positive relevance (``transform="positive"``); Quantus' defaults
      ``abs=True`` (after its batch max-normalisation), so it scores ``|R|``
      (``transform="abs"``; its ``positive_attributions`` clipping comes after the ``abs`` and
      changes nothing then).
    * Quantus adds 1e-9 to the denominator (after normalising the batch to max |R| = 1) and
      sets values above 1 to NaN (only possible for signed maps).
    * weighting: Quantus multiplies by ``|GT| / x_batch[2:].size`` — the *batch* sliced from
      its third sample on, (N - 2) C H W elements, where the image size was meant — so its
      weighted values depend on the batch size and are not reproduced; xaijax weights by
      (H W) / |GT| as the paper motivates it (chance level 1).
    * Quantus' ``max_size`` (largest region share, default 1.0) only warns; the caller selects
      pairs here.

    Args:
      maps: (N, H, W) attribution maps.
      regions: (N, H, W) bool ground-truth regions.
      transform: ``"positive"`` (paper), ``"abs"`` (Quantus) or ``"signed"``.
      weighted: the size-weighted ratio ``mu_w``.

    Returns:
      (N,) values, the maps' float dtype.
    """
    maps, regions = _check_pairs(maps, regions)
    a, s = _flat(transform_maps(maps, transform), regions)
    size = jnp.sum(s, axis=1)
    mu = _ratio(jnp.sum(jnp.where(s, a, 0), axis=1), jnp.sum(a, axis=1))
    if weighted:
        mu = _ratio(mu * a.shape[1], size.astype(a.dtype))
    return jnp.where(size > 0, mu, jnp.nan)


@jax.jit
def roc_auc(maps: jax.Array, regions: jax.Array) -> jax.Array:
    """ROC AUC of the map as a pixel classifier of the region (Fawcett 2006).

    Protocol, per pair: the map's values score every pixel, the region gives the labels;
    AUC = P(score of a region pixel > score of an outside pixel) + 1/2 P(equal), i.e. the area
    under the ROC curve with ties as diagonal segments — what Quantus 0.6.0 (``AUC``:
    ``abs=False``, ``normalise=True``, a positive scale) computes with scikit-learn's
    ``roc_curve`` and ``auc``. 1: every region pixel above every other pixel; 0: the reverse;
    1/2: a constant map. NaN when the region is empty or covers the whole image.

    Computed from one sort of each pair's scores (labels alongside): every region pixel is
    credited with the outside pixels below its value plus half of those tied with it,
    counted per group of equal values: O(HW log HW).

    Args:
      maps: (N, H, W) attribution maps.
      regions: (N, H, W) bool ground-truth regions.

    Returns:
      (N,) values in [0, 1], the maps' float dtype.
    """
    maps, regions = _check_pairs(maps, regions)
    a, s = _flat(maps, regions)

    def one(ai: jax.Array, si: jax.Array) -> jax.Array:
        v, lab = jax.lax.sort((ai, si), num_keys=1)  # ascending scores, labels alongside
        d = v.shape[0]
        group = jnp.cumsum(jnp.concatenate([jnp.ones(1, bool), v[1:] != v[:-1]])) - 1  # tied values share a group
        neg_in = jax.ops.segment_sum((~lab).astype(ai.dtype), group, num_segments=d)  # outside pixels per group
        credit = jnp.cumsum(neg_in) - neg_in / 2  # outside pixels below the group + half of those tied with it
        n_pos = jnp.sum(lab)
        return _ratio(jnp.sum(jnp.where(lab, credit[group], 0)), (n_pos * (d - n_pos)).astype(ai.dtype))

    return jax.vmap(one)(a, s)


# ----------------------------------------------------------------------------- pair metrics


class ClassMeanSummary:
    """``summarize`` of a pair metric with one per-pair value under the class attribute ``key``."""

    key = ""

    def summarize(self, values, classes, dif, num_classes) -> dict[str, float]:
        """``{key: mean over the classes with pairs of the per-class mean}`` (NaN rows left out)."""
        return {self.key: class_mean(values[self.key], classes, num_classes)}


def _pairs(batch: _registry.PairBatch) -> tuple[np.ndarray, np.ndarray]:
    return check_pair_inputs(batch.maps, batch.regions)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class RelevanceMassAccuracy(ClassMeanSummary):
    """Relevance mass accuracy (Arras et al. 2022): share of the positive relevance inside the region.

    :func:`relevance_mass_accuracy` per pair (key ``relevance_mass_accuracy``);
    ``transform="signed"`` for Quantus' default."""

    key = "relevance_mass_accuracy"

    transform: str = "positive"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        m, r = _pairs(batch)
        return {self.key: np.asarray(relevance_mass_accuracy(m, r, transform=self.transform))}


@dataclasses.dataclass(frozen=True)
class RelevanceRankAccuracy(ClassMeanSummary):
    """Relevance rank accuracy (Arras et al. 2022): share of the K most relevant pixels inside the region (K = its area).

    :func:`relevance_rank_accuracy` per pair (key ``relevance_rank_accuracy``)."""

    key = "relevance_rank_accuracy"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        m, r = _pairs(batch)
        return {self.key: np.asarray(relevance_rank_accuracy(m, r))}


@dataclasses.dataclass(frozen=True)
class TopKIntersection(ClassMeanSummary):
    """Top-k intersection (Theiner et al. 2021): share of the k most relevant pixels inside the region.

    :func:`top_k_intersection` per pair (key ``top_k_intersection``); ``k=1000`` for Quantus'
    default pixel count."""

    key = "top_k_intersection"

    k: int | float = QUANTUS_TOP_K_FRACTION
    concept_influence: bool = False

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        m, r = _pairs(batch)
        v = top_k_intersection(m, r, k=self.k, concept_influence=self.concept_influence)
        return {self.key: np.asarray(v)}


@dataclasses.dataclass(frozen=True)
class AttributionLocalisation(ClassMeanSummary):
    """Attribution localisation (Kohlbrenner et al. 2020): positive relevance inside the region / in total.

    :func:`attribution_localisation` per pair (key ``attribution_localisation``);
    ``transform="abs"`` for Quantus' default."""

    key = "attribution_localisation"

    transform: str = "positive"
    weighted: bool = False

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        m, r = _pairs(batch)
        v = attribution_localisation(m, r, transform=self.transform, weighted=self.weighted)
        return {self.key: np.asarray(v)}


@dataclasses.dataclass(frozen=True)
class LocalisationAUC(ClassMeanSummary):
    """ROC AUC of the map as a pixel classifier of the region (Fawcett 2006; 0.5: chance).

    :func:`roc_auc` per pair (key ``localisation_auc``)."""

    key = "localisation_auc"

    def __call__(self, batch: _registry.PairBatch) -> dict[str, np.ndarray]:
        m, r = _pairs(batch)
        return {self.key: np.asarray(roc_auc(m, r))}


_registry.register("relevance-mass-accuracy", RelevanceMassAccuracy)
_registry.register("relevance-rank-accuracy", RelevanceRankAccuracy)
_registry.register("top-k-intersection", TopKIntersection)
_registry.register("attribution-localisation", AttributionLocalisation)
_registry.register("auc", LocalisationAUC)


# ----------------------------------------------------------------------------- focus


#: the six ways to put the two target-class tiles into the four quadrants (0 top-left,
#: 1 top-right, 2 bottom-left, 3 bottom-right)
_QUADRANT_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def focus_layout(target: int, seed: int = 0) -> tuple[int, int, int, int]:
    """The quadrants of one focus mosaic for class ``target``: ``(q_image, q_same, q_other1,
    q_other2)`` — where the explained image, the second image of its class and the two images
    of other classes go. A function of ``(target, seed)`` only."""
    rng = np.random.default_rng([int(seed), 0xF0C05, int(target)])
    pair = _QUADRANT_PAIRS[int(rng.integers(len(_QUADRANT_PAIRS)))]
    rest = tuple(q for q in range(4) if q not in pair)
    first = int(rng.integers(2))
    return (pair[first], pair[1 - first]) + rest  # type: ignore[return-value]


def focus_quadrants(shape: tuple[int, int], quadrants: Any) -> np.ndarray:
    """(N, H, W) bool regions: the union of each row's target quadrants.

    ``quadrants`` (N, 4) bool flags in the order top-left, top-right, bottom-left, bottom-right
    (Quantus' ``c_batch``); the split is at ``H // 2``, ``W // 2`` as in Quantus."""
    q = np.asarray(quadrants, bool)
    if q.ndim != 2 or q.shape[1] != 4:
        raise ValueError(f"quadrants must be (N, 4) bool flags; got shape {q.shape}")
    h, w = shape
    top = np.arange(h)[:, None] < h // 2
    left = np.arange(w)[None, :] < w // 2
    parts = np.stack([top & left, top & ~left, ~top & left, ~top & ~left])  # (4, H, W)
    return np.einsum("nq,qhw->nhw", q.astype(np.int32), parts.astype(np.int32)) > 0


@functools.lru_cache(maxsize=256)
def _companions(scenes: Any, split: str, seed: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three benchmark images in [0, 1] for class ``target``'s mosaic: one that shows the class,
    two that do not; the first such records in a permutation of ``split`` fixed by
    ``(seed, target)``."""
    n = scenes.split_size(split)
    order = np.random.default_rng([int(seed), 0xF0C05, int(target), 1]).permutation(n)
    same: list[np.ndarray] = []
    other: list[np.ndarray] = []
    for i in order:
        rec = scenes.record(split, int(i))
        (same if target in set(np.asarray(rec.labels).tolist()) else other).append(rec.image)
        if len(same) >= 1 and len(other) >= 2:
            return same[0], other[0], other[1]
    raise ValueError(f"split {split!r} of the benchmark has no mosaic for class {target}: it needs one image with and two without it")


def focus_mosaics(
    images: Any, targets: Any, scenes: Any = None, *, convention: str = "torchvision", split: str = "test", seed: int = 0
) -> tuple[jax.Array, np.ndarray]:
    """Focus mosaics (Arias-Duart et al. 2022) around the images to explain.

    Each mosaic is a 2 x 2 grid at the images' own size (each tile resized to half the side,
    bilinear): the image itself and a second image of its target class from the synthetic
    benchmark (the "target" tiles), and two benchmark images without that class. The
    benchmark images (:class:`xaijax.data.SyntheticScenes`, ``split``) and the quadrants
    (:func:`focus_layout`) depend on ``(target, seed)`` only, so an image's mosaic does not
    depend on the rest of its batch.

    Args:
      images: (N, H, W, C) model inputs (already normalised), H and W even.
      targets: (N,) int target classes (classes of the benchmark).
      scenes: the benchmark (default ``SyntheticScenes()``).
      convention: the normalisation of ``images`` (:func:`xaijax.models.preprocess.normalize`),
        applied to the benchmark tiles.
      split, seed: where the companion images come from.

    Returns:
      ``(mosaics (N, H, W, C) in the images' dtype, quadrants (N, 4) bool)``: the mosaics and
      which quadrants hold the target class.
    """
    from xaijax.data.synthetic import SyntheticScenes
    from xaijax.imageops import resize
    from xaijax.models.preprocess import normalize

    scenes = SyntheticScenes() if scenes is None else scenes
    x = jnp.asarray(images)
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be floating (N, H, W, C); got {x.dtype} {x.shape}")
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"images must have an even height and width for 2 x 2 mosaics; got {h} x {w}")
    t = np.asarray(targets).reshape(-1)
    if t.shape != (n,) or t.dtype.kind not in "iu":
        raise ValueError(f"targets must be (N,) = ({n},) ints; got {t.dtype} {t.shape}")
    if t.min() < 0 or t.max() >= scenes.num_classes:
        raise ValueError(f"targets must be classes of the benchmark, in [0, {scenes.num_classes}); got {t.tolist()}")
    classes = sorted(set(t.tolist()))
    comp = {k: np.stack(_companions(scenes, split, int(seed), k)) for k in classes}  # (3, S, S, 3) each
    comp_x = normalize(jnp.asarray(np.concatenate([comp[k] for k in classes]), x.dtype), convention)
    if comp_x.shape[-1] != c:
        raise ValueError(f"images must have {comp_x.shape[-1]} channels like the benchmark; got {c}")
    hh, hw = h // 2, w // 2
    comp_t = resize(comp_x, (hh, hw)).reshape(len(classes), 3, hh, hw, c)
    own = resize(x, (hh, hw))
    slot = {k: i for i, k in enumerate(classes)}
    tiles = jnp.stack([own, comp_t[np.asarray([slot[k] for k in t.tolist()])][:, 0]] + [comp_t[np.asarray([slot[k] for k in t.tolist()])][:, j] for j in (1, 2)], 1)
    layout = np.asarray([focus_layout(k, seed) for k in t.tolist()])  # (N, 4): quadrant of tile j
    inv = np.argsort(layout, axis=1)  # tile in quadrant q
    grid = jnp.take_along_axis(tiles, jnp.asarray(inv)[:, :, None, None, None], axis=1)  # (N, 4, hh, hw, C) by quadrant
    top = jnp.concatenate([grid[:, 0], grid[:, 1]], axis=2)
    bottom = jnp.concatenate([grid[:, 2], grid[:, 3]], axis=2)
    quadrants = np.zeros((n, 4), bool)
    quadrants[np.arange(n), layout[:, 0]] = True
    quadrants[np.arange(n), layout[:, 1]] = True
    return jnp.concatenate([top, bottom], axis=1), quadrants


def focus(maps: Any, quadrants: Any) -> jax.Array:
    """Focus of mosaic maps: the share of positive relevance on the target-class tiles.

    Protocol, per mosaic (Arias-Duart et al. 2022): ``R+ = max(R, 0)``; value
    ``sum_{p in target tiles} R+_p / sum_p R+_p`` in [0, 1] — :func:`relevance_mass_accuracy`
    with ``transform="positive"`` against :func:`focus_quadrants`; NaN for a map with no
    positive value. Quantus 0.6.0 (``Focus``: ``abs=False``, ``normalise=True``) computes the
    same after dividing the batch by its largest absolute value and adds 1e-9 to the
    denominator (a map with no positive value scores 0 there).

    Args:
      maps: (N, H, W) maps of the mosaics.
      quadrants: (N, 4) bool, the quadrants of the target class (top-left, top-right,
        bottom-left, bottom-right).
    """
    maps = _check_maps(maps)
    regions = focus_quadrants(maps.shape[1:], quadrants)
    if regions.shape[0] != maps.shape[0]:
        raise ValueError(f"quadrants must have one row per map ({maps.shape[0]}); got {regions.shape[0]}")
    return relevance_mass_accuracy(maps, regions, transform="positive")


@dataclasses.dataclass(frozen=True)
class FocusMetric:
    """Focus (Arias-Duart et al. 2022): share of positive relevance on the target-class tiles of a 2x2 mosaic.

    A method metric: explain each image's focus mosaic and score :func:`focus`.

    ``metric(model, variables, method, images, targets, maps=None) -> {"focus": (N,)}``: for each
    image, :func:`focus_mosaics` builds its mosaic (the image, one more benchmark image of its
    target class, two benchmark images without it), ``method`` explains the mosaics for the
    targets, and :func:`focus` scores the maps (``maps``, the maps of the images themselves, are
    not used). ``summarize``: the mean over images (NaN rows left out).

    Settings: ``convention`` — the normalisation the model's inputs use (the benchmark tiles get
    the same; ``"torchvision"``, ``"caffe"`` or ``"none"``); ``split``, ``seed`` — which benchmark
    images and quadrants; ``size`` — the benchmark's image side (tiles are resized to half the
    input side in any case).

    Paper and Quantus: the paper builds mosaics of four dataset images, two of the target class;
    Quantus takes mosaics from the caller (its ``build_single_mosaic`` concatenates full-size
    images into a mosaic of twice the side, which a fixed-size model cannot take). Here a
    mosaic keeps the model's input size, and the explained image is one of its two target tiles.
    """

    convention: str = "torchvision"
    split: str = "test"
    seed: int = 0
    size: int = 128

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        from xaijax.data.synthetic import SyntheticScenes
        from xaijax.metrics.robustness import method_maps, check_method_metric_inputs

        x, t, _ = check_method_metric_inputs(model, variables, method, images, targets, None)
        mosaics, quadrants = focus_mosaics(x, np.asarray(t), SyntheticScenes(size=self.size), convention=self.convention, split=self.split, seed=self.seed)
        m = method_maps(method, model, variables, mosaics, t, None)
        return {"focus": np.asarray(focus(m, quadrants))}

    def summarize(self, values: dict[str, np.ndarray]) -> dict[str, float]:
        v = np.asarray(values["focus"], np.float64)
        v = v[~np.isnan(v)]
        return {"focus": float(v.mean()) if v.size else float("nan")}


_registry.register_method_metric("focus", FocusMetric)
