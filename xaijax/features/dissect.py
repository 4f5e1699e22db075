"""Neuron-concept explanations: Network Dissection and compositional explanations.

* Network Dissection (Bau, Zhou, Khosla, Oliva & Torralba, CVPR 2017): every unit (channel)
  ``u`` of a layer gets a threshold ``T_u``, the dataset-wide top-``quantile`` level of its
  activations (``quantile = 0.005`` -> the 99.5th percentile over all images and
  positions). Its activation map of each image is upsampled bilinearly to the resolution
  of the concept masks (half-pixel centres, clamped edges: PIL's ``BILINEAR`` when
  enlarging, NetDissect's upsampling; float32 :func:`xaijax.imageops.resize_matrix`
  products ``R A C^T``) and thresholded, ``S_u = up(A_u) > T_u``, and the unit is scored
  against each concept ``c`` by the dataset-wide intersection over union
  ``IoU(u, c) = sum_x |S_u(x) & L_c(x)| / sum_x |S_u(x) | L_c(x)|``. The unit's label is its
  best concept; NetDissect calls a unit a detector when that IoU exceeds 0.04.
* Compositional explanations (Mu & Andreas, NeurIPS 2020; code ``jayelm/compexp``): the
  label is a logical formula of concepts, found by beam search. The beam starts with the
  ``beam_size`` best single concepts of nonzero IoU; each of ``max_formula_length - 1``
  rounds extends every beam formula ``F`` by every concept ``c`` as ``F OR c``,
  ``F AND c`` and ``F AND NOT c`` (formulas grow left-nested: ``(a OR b) AND NOT c``),
  scores the candidates by IoU with formula masks (per-pixel boolean operations on the
  concept masks, counts accumulated over the dataset), and keeps the ``beam_size`` best
  of the old beam plus the candidates. Defaults follow ``compexp/vision/settings.py``:
  ``BEAM_SIZE = 5``, ``MAX_FORMULA_LENGTH = 3``, ``FORMULA_COMPLEXITY_PENALTY = 1``,
  ``TOPN = 5``, ``QUANTILE = 0.005``; the IoU is ``I / (|S_u| + |F| - I + 1e-10)``.

Where xaijax differs from the reference code, on purpose:

* Formulas with the same dataset counts ``(|S & F|, |F|)`` -- hence the same IoU and, in
  practice, the same mask on the dataset: logically equivalent ones such as ``a AND b`` /
  ``b AND a`` or ``a OR a`` / ``a``, and ones that coincide on the data such as
  ``cross AND NOT disc`` / ``cross`` where objects never overlap -- occupy one beam slot,
  the first found (the old beam before new candidates; shorter formulas first). compexp
  keeps such duplicates, which fills its beam with copies of one mask.
* IoU is computed over the whole dataset for every concept (as compexp does). The
  original NetDissect counts, for each concept category, the unit's pixels only in images
  where that category is annotated; the two agree when every image is annotated in every
  category (the synthetic benchmark).

Streaming, constant memory. Nothing that grows with the number of images is kept in
memory. Pass 1 runs the network, updates a :class:`StreamingQuantile` per unit and a
streaming top-k of images per unit, and appends activations and concept label stacks to
two temporary files (read back in batches, not memory-mapped). Pass 2 upsamples and
thresholds the activations and, for every *atom* -- a distinct set of concepts a pixel
carries (in the synthetic benchmark at most 14: one per class, plus distractor and
background) -- counts its pixels and, per unit, its firing pixels. Every count the beam
search needs is then exact arithmetic on these (units x atoms) histograms: a formula is a
boolean function of the concepts, hence constant on each atom, so
``|S & F & c| = sum_t hist[u, t] F(t) c(t)``. Memory is O(units x atoms), bounded by the
concept vocabulary, not by the image count. If a dataset has more than
``DissectConfig.max_atoms`` atoms (Broden's many label combinations can), the search falls
back to the per-pixel path: one pass per beam round, accumulating for every beam formula
``F`` of every unit ``|S & F & c|`` and ``|F & c|`` for all concepts ``c`` present in the
batch with two matrix products per batch, from which the IoUs of all three extensions
follow (``|S & (F OR c)| = |S & F| + |S & c| - |S & F & c|`` and so on). Both paths give
identical counts (tested). Image batches are padded to one shape (one compilation) and
unit chunks bound the size of the per-pixel formula masks.

Data: any object with ``concept_names``, ``concept_categories``, ``num_layers``,
``mask_shape``, ``__len__``, ``images(indices)`` and ``load(indices) -> (images (n, H, W,
3) float32 in [0, 1], labels (n, L, M, N) int)`` where ``labels`` stacks ``L`` label maps
holding ``concept index + 1`` (0 = none), e.g. :class:`xaijax.data.concepts.SyntheticConcepts`
or :class:`xaijax.data.broden.BrodenDataset`. Activations are NHWC ``(n, h, w, U)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.atomic import atomic_bytes, atomic_text
from xaijax.imageops import resize_matrix

__all__ = [
    "DissectConfig",
    "DissectResult",
    "Formula",
    "StreamingQuantile",
    "StreamingTopK",
    "dissect",
    "dissect_activations",
    "formula_masks",
    "formula_to_str",
    "save_figure",
    "write_tables",
]

OR, AND, AND_NOT = 1, 2, 3
_OP_NAMES = {OR: "OR", AND: "AND", AND_NOT: "AND NOT"}
_CAND_OPS = (OR, AND, AND_NOT)  # compexp's order: (Or, False), (And, False), (And, True)

#: A formula: ``(first concept, ((op, concept), ...))``, evaluated left to right.
Formula = tuple[int, tuple[tuple[int, int], ...]]


# ----------------------------------------------------------------------------- quantiles


class StreamingQuantile:
    """Per-unit quantiles of a stream of values in memory independent of the stream length.

    Each unit keeps a histogram of ``bins`` equal bins on a power-of-two grid: bin ``k``
    is ``[k w, (k + 1) w)`` with ``w = 2**e``; the histogram is a window of ``bins``
    consecutive bins starting at the bin of the unit's minimum. When new values do not fit
    the window, ``w`` doubles as often as needed (each new bin is the union of two old
    bins, so the counts merge exactly) and the window slides to the new minimum. The
    initial ``w`` is the smallest power of two for which the first batch fits.

    Error bound. :meth:`quantile` follows ``numpy.quantile``'s default ("linear") rule: it
    interpolates between the order statistics ``x_(k)`` and ``x_(k+1)`` with
    ``k = floor((n - 1) q)``. Each order statistic is located exactly in its bin by the
    cumulative counts and estimated inside the bin (uniform spread), so it is off by less
    than ``w``, and so is their convex combination; the result is also clipped to the exact
    running [min, max]. Hence ``|estimate - numpy.quantile| <= w`` (:meth:`error_bound`),
    with ``w <= 2 (max - min) / (bins - 2)`` (doubling stops as soon as the data fit; a
    unit whose first batch is constant starts from ``w = 2**-24 max(1, |value|)`` instead).
    Memory: ``units x bins`` int64 counts (2048 bins: 16 KiB per unit).
    """

    def __init__(self, num_units: int, bins: int = 2048) -> None:
        if not isinstance(num_units, (int, np.integer)) or num_units < 1:
            raise ValueError(f"num_units: expected a positive integer, got {num_units!r}")
        if not isinstance(bins, (int, np.integer)) or bins < 8:
            raise ValueError(f"bins: expected an integer >= 8, got {bins!r}")
        self.num_units, self.bins = int(num_units), int(bins)
        self.counts = np.zeros((self.num_units, self.bins), np.int64)
        self.n = np.zeros(self.num_units, np.int64)
        self.vmin = np.full(self.num_units, np.inf)
        self.vmax = np.full(self.num_units, -np.inf)
        self.exp = np.zeros(self.num_units, np.int64)  # bin width 2**exp
        self.start = np.zeros(self.num_units, np.int64)  # absolute index of window bin 0

    @staticmethod
    def _bin(v: np.ndarray, exp: np.ndarray) -> np.ndarray:
        return np.floor(np.ldexp(v, -exp)).astype(np.int64)

    def _fit_exp(self, lo: np.ndarray, hi: np.ndarray, exp: np.ndarray) -> np.ndarray:
        """Smallest exp' >= exp with floor(hi / 2**exp') - floor(lo / 2**exp') < bins."""
        exp = exp.copy()
        for _ in range(2100):  # float64 exponents span ~2100 doublings
            bad = self._bin(hi, exp) - self._bin(lo, exp) >= self.bins
            if not bad.any():
                return exp
            exp[bad] += 1
        raise ValueError("StreamingQuantile: values out of range (inf or NaN?)")

    def update(self, values: np.ndarray) -> None:
        """Add ``values`` (n, units): column ``u`` holds new values of unit ``u``."""
        v = np.asarray(values, np.float64)
        if v.ndim != 2 or v.shape[1] != self.num_units:
            raise ValueError(f"values: expected shape (n, {self.num_units}), got {v.shape}")
        if v.shape[0] == 0:
            return
        if not np.all(np.isfinite(v)):
            raise ValueError("values: contain NaN or inf")
        bmin, bmax = v.min(0), v.max(0)
        new = self.n == 0
        if new.any():  # initial bin width from the first batch
            span = bmax[new] - bmin[new]
            e = np.where(
                span > 0,
                np.ceil(np.log2(np.maximum(span, 1e-300) / (self.bins - 2))),
                np.floor(np.log2(np.maximum(np.abs(bmax[new]), 1.0))) - 24,
            ).astype(np.int64)
            self.exp[new] = self._fit_exp(bmin[new], bmax[new], e)
            self.start[new] = self._bin(bmin[new], self.exp[new])
            self.vmin[new], self.vmax[new] = bmin[new], bmax[new]
        lo, hi = np.minimum(self.vmin, bmin), np.maximum(self.vmax, bmax)
        exp = self._fit_exp(lo, hi, self.exp)
        start = self._bin(lo, exp)
        moved = (exp != self.exp) | (start != self.start)
        if moved.any():  # merge and slide: old absolute bin k -> k >> shift (floor division)
            rows = np.flatnonzero(moved)
            shift = (exp - self.exp)[rows][:, None]
            old_abs = self.start[rows][:, None] + np.arange(self.bins)[None]
            pos = np.clip((old_abs >> shift) - start[rows][:, None], 0, self.bins - 1)
            flat = (np.arange(rows.size)[:, None] * self.bins + pos).ravel()
            merged = np.bincount(flat, weights=self.counts[rows].ravel(), minlength=rows.size * self.bins)
            self.counts[rows] = np.rint(merged).astype(np.int64).reshape(rows.size, self.bins)
            self.exp[rows], self.start[rows] = exp[rows], start[rows]
        self.vmin, self.vmax = lo, hi
        pos = np.clip(self._bin(v, self.exp[None]) - self.start[None], 0, self.bins - 1)
        flat = (pos + np.arange(self.num_units)[None] * self.bins).ravel()
        self.counts += np.bincount(flat, minlength=self.num_units * self.bins).reshape(self.num_units, self.bins)
        self.n += v.shape[0]

    def error_bound(self) -> np.ndarray:
        """(units,) float64: the bin width ``w``, a bound on ``|quantile - numpy.quantile|``."""
        return np.ldexp(1.0, self.exp)

    def quantile(self, q: float) -> np.ndarray:
        """(units,) float64 estimate of ``numpy.quantile(all values of unit u, q)``."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q: expected a probability in [0, 1], got {q!r}")
        if np.any(self.n == 0):
            raise ValueError("StreamingQuantile: no values seen yet")
        h = (self.n - 1) * float(q)
        k = np.floor(h).astype(np.int64)
        g = h - k
        cum = np.cumsum(self.counts, axis=1)
        w = self.error_bound()

        def order_stat(j: np.ndarray) -> np.ndarray:
            i = np.minimum((cum <= j[:, None]).sum(1), self.bins - 1)  # first bin with cum > j
            before = np.where(i > 0, cum[np.arange(self.num_units), np.maximum(i - 1, 0)], 0)
            inbin = np.maximum(self.counts[np.arange(self.num_units), i], 1)
            frac = (j - before + 0.5) / inbin
            return (self.start + i + frac) * w

        lo = order_stat(k)
        hi = order_stat(np.minimum(k + 1, self.n - 1))
        return np.clip(lo + g * (hi - lo), self.vmin, self.vmax)


class StreamingTopK:
    """Per-unit top-``k`` images by their maximum activation, with those activation maps.

    Ties keep the earlier image. Memory: ``units x k`` scores/indices and ``units x k x h x w``
    activation maps, independent of the number of images.
    """

    def __init__(self, num_units: int, k: int, map_shape: tuple[int, int]) -> None:
        self.k = int(k)
        self.scores = np.full((num_units, self.k), -np.inf, np.float32)
        self.indices = np.full((num_units, self.k), -1, np.int64)
        self.maps = np.zeros((num_units, self.k) + tuple(map_shape), np.float32)

    def update(self, acts: np.ndarray, indices: np.ndarray) -> None:
        """``acts`` (n, h, w, units) of dataset items ``indices`` (n,)."""
        acts = np.asarray(acts, np.float32)
        scores = acts.max(axis=(1, 2)).T  # (U, n)
        all_s = np.concatenate([self.scores, scores], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, : self.k]
        all_i = np.concatenate([self.indices, np.broadcast_to(np.asarray(indices)[None], scores.shape)], 1)
        all_m = np.concatenate([self.maps, acts.transpose(3, 0, 1, 2)], 1)
        self.scores = np.take_along_axis(all_s, order, 1)
        self.indices = np.take_along_axis(all_i, order, 1)
        self.maps = np.take_along_axis(all_m, order[:, :, None, None], 1)


# ----------------------------------------------------------------------------- formulas


def formula_to_str(formula: Formula | None, names: Sequence[str]) -> str:
    """``"(a OR b) AND NOT c"``; ``"-"`` for no formula."""
    if formula is None:
        return "-"
    first, terms = formula
    s = names[first]
    for j, (op, c) in enumerate(terms):
        s = f"({s})" if j else s
        s = f"{s} {_OP_NAMES[op]} {names[c]}"
    return s


def _eval_bool(formula: Formula, value: Callable[[int], Any]) -> Any:
    first, terms = formula
    x = value(first)
    for op, c in terms:
        y = value(c)
        x = (x | y) if op == OR else (x & y) if op == AND else (x & ~y)
    return x


def formula_masks(formula: Formula, masks: np.ndarray) -> np.ndarray:
    """Evaluate ``formula`` on concept masks (C, ...) bool -> (...) bool."""
    return _eval_bool(formula, lambda c: np.asarray(masks[c], bool))


def _length(formula: Formula) -> int:
    return 1 + len(formula[1])


# ----------------------------------------------------------------------------- config / result


@dataclasses.dataclass(frozen=True)
class DissectConfig:
    """Hyperparameters (defaults: NetDissect / compexp, see the module docstring).

    Attributes:
      quantile: top fraction of activations above the threshold (0.005 -> 99.5th percentile).
      beam_size: formulas kept per beam round.
      max_formula_length: concepts per formula (1: Network Dissection only).
      complexity_penalty: candidate IoU x penalty ** (length - 1) when ranking (1: none).
      top_k: top-activating images kept per unit (for the figure).
      batch_size: images per batch (padded to this size, one compilation).
      bins: histogram bins of the streaming quantile (its error bound scales as 1/bins).
      detector_iou: IoU above which a unit counts as a detector (NetDissect: 0.04).
      chunk_pixels_units: budget ``pixels x units x beam`` of one formula-statistics call.
      max_atoms: largest number of distinct per-pixel concept sets ("atoms") for which the
        counts are kept per atom (fast path, 2 passes in all); beyond it, every beam round
        re-reads the data and works per pixel (``0`` forces the per-pixel path).
    """

    quantile: float = 0.005
    beam_size: int = 5
    max_formula_length: int = 3
    complexity_penalty: float = 1.0
    top_k: int = 5
    batch_size: int = 16
    bins: int = 2048
    detector_iou: float = 0.04
    chunk_pixels_units: int = 1 << 23
    max_atoms: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile: expected a fraction in (0, 1), got {self.quantile!r}")
        for name in ("beam_size", "max_formula_length", "top_k", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not 0.0 < self.complexity_penalty <= 1.0:
            raise ValueError(f"complexity_penalty: expected a value in (0, 1], got {self.complexity_penalty!r}")


@dataclasses.dataclass
class DissectResult:
    """Everything a dissection found. Per-unit arrays follow ``units`` (the channel indices).

    ``iou`` (U, C) single-concept IoUs; ``best_concept`` (U,) argmax (-1 if the unit never
    fires on any concept); ``formulas`` the best beam formula per unit (None if none);
    ``formula_iou`` its IoU; ``thresholds`` / ``threshold_error`` the per-unit activation
    thresholds and their documented error bound; ``hits`` pixels above threshold;
    ``concept_pixels`` (C,) pixels of each concept; ``top_indices`` / ``top_scores`` /
    ``top_maps`` the streaming top-k (dataset indices, max activations, (U, k, h, w) maps).
    """

    layer: str
    units: np.ndarray
    concept_names: tuple[str, ...]
    concept_categories: tuple[str, ...]
    num_images: int
    total_pixels: int
    thresholds: np.ndarray
    threshold_error: np.ndarray
    hits: np.ndarray
    concept_pixels: np.ndarray
    intersections: np.ndarray
    iou: np.ndarray
    best_concept: np.ndarray
    best_iou: np.ndarray
    formulas: list
    formula_iou: np.ndarray
    beams: list
    top_indices: np.ndarray
    top_scores: np.ndarray
    top_maps: np.ndarray
    config: DissectConfig

    def concept_str(self, i: int) -> str:
        c = int(self.best_concept[i])
        return "-" if c < 0 else self.concept_names[c]

    def formula_str(self, i: int) -> str:
        return formula_to_str(self.formulas[i], self.concept_names)

    def rows(self, image_ids: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
        """One dict per unit (the CSV/Markdown table)."""
        out = []
        for i, u in enumerate(self.units):
            c = int(self.best_concept[i])
            f = self.formulas[i]
            out.append(
                {
                    "unit": int(u),
                    "concept": self.concept_str(i),
                    "category": "-" if c < 0 else self.concept_categories[c],
                    "iou": float(self.best_iou[i]),
                    "formula": self.formula_str(i),
                    "formula_length": 0 if f is None else _length(f),
                    "formula_iou": float(self.formula_iou[i]),
                    "threshold": float(self.thresholds[i]),
                    "threshold_error": float(self.threshold_error[i]),
                    "fire_rate": float(self.hits[i]) / max(self.total_pixels, 1),
                    "top_images": ";".join(
                        (image_ids(int(j)) if image_ids else str(int(j))) for j in self.top_indices[i] if j >= 0
                    ),
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        t = self.config.detector_iou
        det = self.best_iou > t
        cats: dict[str, int] = {}
        for i in np.flatnonzero(det):
            k = self.concept_categories[int(self.best_concept[i])]
            cats[k] = cats.get(k, 0) + 1
        return {
            "layer": self.layer,
            "images": self.num_images,
            "units": int(self.units.size),
            "concepts": len(self.concept_names),
            "detector_iou": t,
            "detectors": int(det.sum()),
            "unique_concepts": len({int(c) for c in self.best_concept[det]}),
            "detectors_per_category": cats,
            "formula_above": int((self.formula_iou > t).sum()),
            "mean_iou": float(self.best_iou.mean()),
            "mean_formula_iou": float(self.formula_iou.mean()),
        }


# ----------------------------------------------------------------------------- jitted pieces


@jax.jit
def _unit_masks(acts: jax.Array, thr: jax.Array, rows: jax.Array, cols: jax.Array, valid: jax.Array) -> jax.Array:
    """(n, h, w, U) activations -> (n*M*N, U) float32 0/1: bilinear upsampling > threshold."""
    up = jnp.einsum("Mh,nhwu->nMwu", rows, acts, precision=jax.lax.Precision.HIGHEST)
    up = jnp.einsum("Nw,nMwu->nMNu", cols, up, precision=jax.lax.Precision.HIGHEST)
    s = (up > thr).astype(jnp.float32) * valid[:, None, None, None]
    return s.reshape(-1, s.shape[-1])


@jax.jit
def _dense(labels: jax.Array, ids: jax.Array, valid: jax.Array) -> jax.Array:
    """(n, L, M, N) labels, (Cb,) concept ids -> (n*M*N, Cb + 2) float32; columns FALSE, TRUE last."""
    eq = jnp.any(labels[..., None] == (ids + 1)[None, None, None, None], axis=1)  # (n, M, N, Cb)
    d = eq.reshape(-1, ids.shape[0]).astype(jnp.float32)
    p = jnp.broadcast_to(valid[:, None, None], labels.shape[:1] + labels.shape[2:]).reshape(-1, 1)
    return jnp.concatenate([d, jnp.zeros_like(p), p.astype(jnp.float32)], axis=1)


@jax.jit
def _formula_stats(smask: jax.Array, dense: jax.Array, first: jax.Array, ops: jax.Array, args: jax.Array):
    """Counts for K = units x beam formulas (unit of formula k: ``smask[:, k]``, pre-repeated).

    Returns ``a`` (K, Cb+2) = |S & F & c|, ``fc`` (K, Cb+2) = |F & c|, ``sf`` (K,) = |S & F|,
    ``f`` (K,) = |F|. ``first`` (K,), ``ops``/``args`` (K, T) are column positions in ``dense``.
    """
    f = dense[:, first]  # (P, K)
    for j in range(ops.shape[1]):
        g = dense[:, args[:, j]]
        op = ops[:, j][None]
        f = jnp.where(op == OR, jnp.maximum(f, g), jnp.where(op == AND, f * g, jnp.where(op == AND_NOT, f * (1 - g), f)))
    sf = f * smask
    hp = jax.lax.Precision.HIGHEST
    a = jnp.dot(sf.T, dense, precision=hp)
    fc = jnp.dot(f.T, dense, precision=hp)
    return a, fc, sf.sum(0), f.sum(0)


# ----------------------------------------------------------------------------- the passes


class _Spill:
    """Fixed-size records appended to a temporary file and read back in order (no mmap)."""

    def __init__(self, directory: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = os.path.join(directory, name)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.rec = int(np.prod(shape)) * self.dtype.itemsize
        self.f = open(self.path, "w+b")

    def append(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, self.dtype).tobytes())

    def read(self, start: int, n: int) -> np.ndarray:
        self.f.flush()
        self.f.seek(start * self.rec)
        buf = self.f.read(n * self.rec)
        return np.frombuffer(buf, self.dtype).reshape((n,) + self.shape)

    def close(self) -> None:
        self.f.close()
        try:
            os.remove(self.path)
        except OSError:
            pass


def _check_dataset(dataset: Any) -> None:
    need = ("concept_names", "concept_categories", "num_layers", "mask_shape", "load", "images", "__len__")
    missing = [a for a in need if not hasattr(dataset, a)]
    if missing:
        raise ValueError(
            f"dataset: {type(dataset).__name__} has no per-pixel concept masks (missing {', '.join(missing)}); "
            "dissection needs a concept dataset such as xaijax.data.concepts.SyntheticConcepts or "
            "xaijax.data.broden.BrodenDataset"
        )
    if len(dataset) < 1:
        raise ValueError("dataset: is empty")
    if len(dataset.concept_names) < 1:
        raise ValueError("dataset: defines no concepts")


@jax.jit
def _segment_hist(smask: jax.Array, seg: jax.Array, zeros: jax.Array) -> jax.Array:
    """(P, U) unit masks, (P,) atom of each pixel -> (T, U) firing pixels per atom (T = len(zeros))."""
    return jax.ops.segment_sum(smask, seg, num_segments=zeros.shape[0])


def _collect_atoms(batches, U: int, L: int, C: int, max_atoms: int, bar) -> tuple | None:
    """One pass: atoms (distinct sorted per-pixel label sets), their pixel counts and the
    (U, T) firing-pixel histogram. ``None`` (after the pass) if there are more than
    ``max_atoms`` atoms: the caller then uses the per-pixel path."""
    index: dict[bytes, int] = {}
    rows: list[np.ndarray] = []
    count = np.zeros(0, np.int64)
    hist = np.zeros((U, 0), np.int64)
    radix = C + 1
    packable = L * math.log2(radix) < 62
    for labs, smask in batches:
        bar.update()
        if len(rows) > max_atoms:
            break
        pix = np.sort(labs.transpose(0, 2, 3, 1).reshape(-1, L), axis=1)  # (n*M*N, L)
        if packable:  # one int64 key per pixel: much faster than unique over rows
            key = pix.astype(np.int64) @ (radix ** np.arange(L, dtype=np.int64))
            ukey, first, inv = np.unique(key, return_index=True, return_inverse=True)
            uniq = pix[first]
        else:
            uniq, inv = np.unique(pix, axis=0, return_inverse=True)
        gid = np.empty(len(uniq), np.int64)
        for i, r in enumerate(uniq):
            key = r.tobytes()
            if key not in index:
                index[key] = len(rows)
                rows.append(r.copy())
            gid[i] = index[key]
        if len(rows) > max_atoms:
            break
        T = len(rows)
        if count.size < T:
            count = np.concatenate([count, np.zeros(T - count.size, np.int64)])
            hist = np.concatenate([hist, np.zeros((U, T - hist.shape[1]), np.int64)], 1)
        np.add.at(count, gid, np.bincount(inv.ravel(), minlength=len(uniq)))
        seg = np.zeros(smask.shape[0], np.int32)  # padded images' pixels: segment 0, smask 0 there
        seg[: inv.size] = inv.ravel()
        tb = _bucket(len(uniq))
        h = _segment_hist(smask, jnp.asarray(seg), jnp.zeros(tb, jnp.float32))
        hist[:, gid] += np.rint(np.asarray(h)[: len(uniq)].T).astype(np.int64)
    if len(rows) > max_atoms:
        return None
    member = np.zeros((len(rows), C + 1), bool)
    for t, r in enumerate(rows):
        member[t, r] = True
    return member[:, 1:], count, hist


def _atom_stats(beam_formulas, B: int, member: np.ndarray, count: np.ndarray, hist: np.ndarray):
    """Formula counts from atom histograms: same outputs as the per-pixel accumulation."""
    U, T = hist.shape
    F = np.zeros((U, B, T), np.float64)
    cols = member.T  # (C, T)
    for u in range(U):
        for j, fm in enumerate(beam_formulas[u]):
            if fm is None:
                continue
            F[u, j] = 1.0 if fm == "TRUE" else formula_masks(fm, cols)
    mem = member.astype(np.float64)
    hf = hist[:, None, :] * F  # (U, B, T)
    cf = count[None, None, :] * F
    A = np.rint(hf @ mem).astype(np.int64)
    FC = np.rint(cf @ mem).astype(np.int64)
    return A, FC, np.rint(hf.sum(-1)).astype(np.int64), np.rint(cf.sum(-1)).astype(np.int64)


def _bucket(n: int) -> int:
    return max(8, 1 << max(0, (n - 1)).bit_length())


def dissect_activations(
    activation_fn: Callable[[np.ndarray], Any],
    dataset: Any,
    *,
    layer: str = "layer",
    units: Sequence[int] | None = None,
    num_units: int | None = None,
    config: DissectConfig | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> DissectResult:
    """Dissect the units computed by ``activation_fn`` on ``dataset`` (see the module docstring).

    Args:
      activation_fn: images (n, H, W, 3) float32 in [0, 1] -> activations (n, h, w, U_all).
      dataset: a concept dataset (module docstring).
      layer: name used in the result.
      units: channel indices to dissect (default: all).
      num_units: the layer's channel count, to validate ``units`` before any work (default:
        taken from the first batch).
      config: hyperparameters.
      indices: dataset items to use (default: all, in order).
      progress: show a tqdm progress bar.
      cache_dir: where the temporary activation/label files go (default: the system temp).
    """
    cfg = config or DissectConfig()
    _check_dataset(dataset)
    n_items = len(dataset)
    idx_all = np.arange(n_items) if indices is None else np.asarray(list(indices), np.int64)
    if idx_all.size == 0:
        raise ValueError("indices: selects no images")
    if idx_all.min() < 0 or idx_all.max() >= n_items:
        raise ValueError(f"indices: expected values in [0, {n_items}), got range [{idx_all.min()}, {idx_all.max()}]")
    if num_units is not None and units is not None:
        _check_units(units, num_units, layer)
    names = tuple(dataset.concept_names)
    cats = tuple(dataset.concept_categories)
    C = len(names)
    M, N = (int(v) for v in dataset.mask_shape)
    L = int(dataset.num_layers)
    bs = int(cfg.batch_size)
    if bs * M * N >= 1 << 24:
        raise ValueError(f"batch_size: {bs} images x {M}x{N} mask pixels must stay below 2**24 (exact float32 counts)")
    n_img = int(idx_all.size)
    n_batches = -(-n_img // bs)
    rounds = cfg.max_formula_length - 1
    lab_dtype = np.uint8 if C + 1 < 256 else np.int16 if C + 1 < 32768 else np.int32

    from tqdm import tqdm

    bar = tqdm(total=n_batches * (2 + rounds), desc=f"dissect {layer}", unit="batch", disable=not progress)
    tmp = tempfile.mkdtemp(prefix="xaijax-dissect-", dir=None if cache_dir is None else os.fspath(cache_dir))
    spills: list[_Spill] = []
    try:
        # ---- pass 1: activations, thresholds, top-k; spill activations and labels
        sel = None
        quant = topk = act_spill = lab_spill = None
        h = w = 0
        for b in range(n_batches):
            ids = idx_all[b * bs : (b + 1) * bs]
            images, labels = dataset.load([int(i) for i in ids])
            labels = np.asarray(labels)
            if labels.shape != (len(ids), L, M, N):
                raise ValueError(f"dataset.load: expected labels of shape {(len(ids), L, M, N)}, got {labels.shape}")
            pad = bs - len(ids)
            x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images
            acts = np.asarray(activation_fn(x), np.float32)
            if acts.ndim != 4:
                raise ValueError(
                    f"layer {layer!r}: activations have shape {acts.shape}; dissection needs a spatial "
                    "(N, H, W, C) layer such as a convolution or its ReLU"
                )
            acts = acts[: len(ids)]
            if sel is None:
                total_units = acts.shape[-1]
                sel = np.arange(total_units) if units is None else _check_units(units, total_units, layer)
                h, w = acts.shape[1:3]
                quant = StreamingQuantile(sel.size, cfg.bins)
                topk = StreamingTopK(sel.size, cfg.top_k, (h, w))
                act_spill = _Spill(tmp, "acts.bin", (h, w, sel.size), np.float32)
                lab_spill = _Spill(tmp, "labels.bin", (L, M, N), lab_dtype)
                spills += [act_spill, lab_spill]
            acts = acts[..., sel]
            quant.update(acts.reshape(-1, sel.size))
            topk.update(acts, ids)
            act_spill.append(acts)
            lab_spill.append(labels.astype(lab_dtype))
            bar.update()
        U = sel.size
        thresholds = quant.quantile(1.0 - cfg.quantile)
        thr_dev = jnp.asarray(thresholds, jnp.float32)
        rows_m = jnp.asarray(resize_matrix(h, M), jnp.float32)
        cols_m = jnp.asarray(resize_matrix(w, N), jnp.float32)
        P = bs * M * N

        def batches(atoms_only: bool = False):
            for b in range(n_batches):
                n = min(bs, n_img - b * bs)
                acts = act_spill.read(b * bs, n)
                labs = lab_spill.read(b * bs, n).astype(np.int32)
                present = np.unique(labs)
                present = present[present > 0] - 1
                cb = _bucket(present.size)
                ids = np.full(cb, -2, np.int32)
                ids[: present.size] = present
                if n < bs:
                    acts = np.concatenate([acts, np.zeros((bs - n,) + acts.shape[1:], np.float32)])
                    labs = np.concatenate([labs, np.zeros((bs - n,) + labs.shape[1:], np.int32)])
                valid = jnp.asarray(np.arange(bs) < n, jnp.float32)
                smask = _unit_masks(jnp.asarray(acts), thr_dev, rows_m, cols_m, valid)
                if atoms_only:
                    yield labs[:n], smask
                    continue
                dense = _dense(jnp.asarray(labs), jnp.asarray(ids), valid)
                yield present, cb, smask, dense

        # ---- formula statistics over the dataset for a beam of B formulas per unit
        def accumulate(beam_formulas: list[list[Formula | None]], B: int):
            T = max(rounds, 1)
            K_unit = B
            uc = max(1, min(U, cfg.chunk_pixels_units // max(P * K_unit, 1)))
            n_chunks = -(-U // uc)
            A = np.zeros((U, B, C), np.int64)
            FC = np.zeros((U, B, C), np.int64)
            SF = np.zeros((U, B), np.int64)
            FS = np.zeros((U, B), np.int64)
            rep = np.repeat(np.arange(uc), B)
            for present, cb, smask, dense in batches():
                col = np.full(C, cb, np.int32)  # absent concepts -> the FALSE column
                col[present] = np.arange(present.size, dtype=np.int32)
                first = np.full((U, B), cb, np.int32)
                ops = np.zeros((U, B, T), np.int32)
                args = np.full((U, B, T), cb, np.int32)
                for u in range(U):
                    for j, fm in enumerate(beam_formulas[u]):
                        if fm is None:
                            continue
                        if fm == "TRUE":
                            first[u, j] = cb + 1
                            continue
                        first[u, j] = col[fm[0]]
                        for t, (op, c) in enumerate(fm[1]):
                            ops[u, j, t], args[u, j, t] = op, col[c]
                for k in range(n_chunks):
                    lo, hi_ = k * uc, min(U, (k + 1) * uc)
                    sm = smask[:, lo:hi_]
                    if hi_ - lo < uc:
                        sm = jnp.concatenate([sm, jnp.zeros((P, uc - (hi_ - lo)), sm.dtype)], 1)
                    fi = np.full((uc, B), cb, np.int32)
                    op_ = np.zeros((uc, B, T), np.int32)
                    ar = np.full((uc, B, T), cb, np.int32)
                    fi[: hi_ - lo], op_[: hi_ - lo], ar[: hi_ - lo] = first[lo:hi_], ops[lo:hi_], args[lo:hi_]
                    a, fc, sf, f = _formula_stats(
                        sm[:, rep], dense, jnp.asarray(fi.ravel()), jnp.asarray(op_.reshape(-1, T)),
                        jnp.asarray(ar.reshape(-1, T)),
                    )
                    nu = hi_ - lo
                    a = np.rint(np.asarray(a)).astype(np.int64).reshape(uc, B, -1)[:nu]
                    fc = np.rint(np.asarray(fc)).astype(np.int64).reshape(uc, B, -1)[:nu]
                    A[lo:hi_, :, present] += a[:, :, : present.size]
                    FC[lo:hi_, :, present] += fc[:, :, : present.size]
                    SF[lo:hi_] += np.rint(np.asarray(sf)).astype(np.int64).reshape(uc, B)[:nu]
                    FS[lo:hi_] += np.rint(np.asarray(f)).astype(np.int64).reshape(uc, B)[:nu]
                bar.update()
            return A, FC, SF, FS

        # ---- pass 2 (atom path): per-unit histograms over "atoms", the distinct per-pixel
        # concept sets; every formula count is then a small product on the host.
        atoms = _collect_atoms(batches(atoms_only=True), U, L, C, cfg.max_atoms, bar)
        if atoms is not None:
            member, atom_count, atom_hist = atoms
            bar.update(n_batches * rounds)

            def accumulate(beam_formulas: list[list[Formula | None]], B: int):  # noqa: F811
                return _atom_stats(beam_formulas, B, member, atom_count, atom_hist)
        else:
            bar.total = bar.n + n_batches * (1 + rounds)
            bar.refresh()

        # ---- pass 2: single concepts (formula TRUE, candidates TRUE AND c)
        A, FC, SF, FS = accumulate([["TRUE"] for _ in range(U)], 1)
        inter = A[:, 0]  # |S_u & c|
        concept_pixels = FC[0, 0]  # |c|
        hits = SF[:, 0]  # |S_u|
        total_pixels = int(FS[0, 0])
        iou = inter / (hits[:, None] + concept_pixels[None] - inter + 1e-10)
        best_concept = np.where(iou.max(1) > 0, np.argmax(iou, 1), -1)
        best_iou = np.where(best_concept >= 0, iou.max(1), 0.0)

        # initial beams: the beam_size best single concepts of nonzero IoU
        B = cfg.beam_size
        beams: list[list[tuple]] = []  # (formula, raw IoU, ranking score, (|S & F|, |F|))
        for u in range(U):
            order = np.argsort(-iou[u], kind="stable")
            beams.append(
                [((int(c), ()), float(iou[u, c]), float(iou[u, c]), (int(inter[u, c]), int(concept_pixels[c])))
                 for c in order[:B] if iou[u, c] > 0]
            )

        # ---- passes 3..: beam search rounds
        for r in range(rounds):
            forms = [[e[0] for e in beams[u]] + [None] * (B - len(beams[u])) for u in range(U)]
            A, FC, SF, FS = accumulate(forms, B)
            with np.errstate(invalid="ignore", divide="ignore"):
                I = np.stack([SF[:, :, None] + inter[:, None, :] - A, A, SF[:, :, None] - A], -1)
                X = np.stack([FS[:, :, None] + concept_pixels[None, None] - FC, FC, FS[:, :, None] - FC], -1)
                cand = I / (hits[:, None, None, None] + X - I + 1e-10)  # (U, B, C, 3)
            for u in range(U):
                if not beams[u]:
                    continue
                nb = len(beams[u])
                raw = cand[u, :nb].ravel()
                pen = np.array([cfg.complexity_penalty ** _length(e[0]) for e in beams[u]])  # new length - 1
                score = (cand[u, :nb] * pen[:, None, None]).ravel()
                allscore = np.concatenate([[e[2] for e in beams[u]], score])
                order = np.argsort(-allscore, kind="stable")
                new: list[tuple] = []
                seen: set = set()
                for o in order:
                    if o < nb:
                        entry = beams[u][o]
                    else:
                        j, rest = divmod(int(o - nb), C * 3)
                        c, opi = divmod(rest, 3)
                        base = beams[u][j][0]
                        fm = (base[0], base[1] + ((_CAND_OPS[opi], c),))
                        pen = cfg.complexity_penalty ** (_length(fm) - 1)
                        opi_key = (int(I[u, j, c, opi]), int(X[u, j, c, opi]))
                        entry = (fm, float(raw[o - nb]), float(raw[o - nb]) * pen, opi_key)
                    key = entry[3]
                    if key in seen:
                        continue
                    seen.add(key)
                    new.append(entry)
                    if len(new) == B:
                        break
                beams[u] = new
        formulas = [b[0][0] if b else None for b in beams]
        formula_iou = np.array([b[0][1] if b else 0.0 for b in beams])
    finally:
        bar.close()
        for s in spills:
            s.close()
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return DissectResult(
        layer=layer,
        units=sel,
        concept_names=names,
        concept_categories=cats,
        num_images=n_img,
        total_pixels=total_pixels,
        thresholds=thresholds,
        threshold_error=quant.error_bound(),
        hits=hits,
        concept_pixels=concept_pixels,
        intersections=inter,
        iou=iou,
        best_concept=best_concept,
        best_iou=best_iou,
        formulas=formulas,
        formula_iou=formula_iou,
        beams=[[(e[0], e[1]) for e in b] for b in beams],
        top_indices=topk.indices,
        top_scores=topk.scores,
        top_maps=topk.maps,
        config=cfg,
    )


def _check_units(units: Sequence[int], total: int, layer: str) -> np.ndarray:
    arr = np.asarray(list(units))
    if arr.size == 0:
        raise ValueError("units: selects no units")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"units: expected integer channel indices, got {list(units)[:5]!r}")
    bad = arr[(arr < 0) | (arr >= total)]
    if bad.size:
        raise ValueError(
            f"units: {bad[:5].tolist()} out of range for layer {layer!r}, which has {total} channels (0..{total - 1})"
        )
    if np.unique(arr).size != arr.size:
        raise ValueError("units: contains duplicates")
    return arr.astype(np.int64)


def dissect(
    model: Any,
    variables: Any,
    layer: str,
    dataset: Any,
    *,
    units: Sequence[int] | None = None,
    config: DissectConfig | None = None,
    preprocess: str = "torchvision",
    indices: Sequence[int] | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> DissectResult:
    """Dissect the channels of ``layer`` of a zoo model on a concept dataset.

    ``preprocess`` is the input convention of the weights
    (:func:`xaijax.models.preprocess.normalize`). Raises ``ValueError`` for a layer the model
    does not have (listing the valid ones), a non-spatial layer, units out of range, or a
    dataset without concept masks -- all before the first batch is processed.
    """
    from xaijax.models import taps
    from xaijax.models.preprocess import normalize

    _check_dataset(dataset)
    normalize(jnp.zeros((1, 1, 1, 3)), preprocess)  # validates the convention
    shape = np.asarray(dataset.images([0])).shape
    probe = jax.ShapeDtypeStruct((1,) + shape[1:], jnp.float32)
    known = taps.layer_names(model, variables, probe)
    if layer not in known:
        close = difflib.get_close_matches(layer, known, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"layer: the model has no layer {layer!r}{hint}; valid layers: {', '.join(known)}")

    @jax.jit
    def run(v, x):
        _, caps = taps.forward(model, v, normalize(x, preprocess), capture=[layer])
        return caps[layer]

    out = jax.eval_shape(run, variables, probe)
    if len(out.shape) != 4:
        raise ValueError(
            f"layer {layer!r}: outputs shape {tuple(out.shape)}; dissection needs a spatial (N, H, W, C) layer "
            "such as a convolution or its ReLU"
        )
    return dissect_activations(
        lambda x: run(variables, jnp.asarray(x)),
        dataset,
        layer=layer,
        units=units,
        num_units=int(out.shape[-1]),
        config=config,
        indices=indices,
        progress=progress,
        cache_dir=cache_dir,
    )


# ----------------------------------------------------------------------------- outputs


def write_tables(result: DissectResult, out: str | os.PathLike, image_ids: Callable[[int], str] | None = None,
                 stem: str = "dissect") -> dict[str, Path]:
    """Write ``<stem>.csv`` (all columns) and ``<stem>.md`` (summary + table); returns the paths."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows(image_ids)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_text(out / f"{stem}.csv", buf.getvalue())
    s = result.summary()
    cfg = result.config
    lines = [
        f"# Dissection of `{result.layer}`",
        "",
        f"{s['images']} images, {s['units']} units, {s['concepts']} concepts; threshold: top {cfg.quantile:.3%} "
        f"of each unit's activations; beam {cfg.beam_size}, formulas up to length {cfg.max_formula_length}.",
        "",
        f"- units whose best single concept has IoU > {s['detector_iou']}: **{s['detectors']}** "
        f"({s['unique_concepts']} distinct concepts; per category: "
        + (", ".join(f"{k} {v}" for k, v in sorted(s["detectors_per_category"].items())) or "none")
        + ")",
        f"- units whose best formula has IoU > {s['detector_iou']}: **{s['formula_above']}**",
        f"- mean IoU: single concept {s['mean_iou']:.4f}, formula {s['mean_formula_iou']:.4f}",
        "",
        "| unit | concept | category | IoU | formula | formula IoU |",
        "|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['unit']} | {r['concept']} | {r['category']} | {r['iou']:.4f} | {r['formula']} | {r['formula_iou']:.4f} |"
        )
    atomic_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    return {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def overlay_tile(image: np.ndarray, act_map: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W, 3) image with the thresholded, bilinearly upsampled activation overlaid.

    Pixels below threshold are dimmed to 30 %, the region's outline is drawn in yellow.
    """
    H, W = image.shape[:2]
    rows = resize_matrix(act_map.shape[0], H).astype(np.float32)
    cols = resize_matrix(act_map.shape[1], W).astype(np.float32)
    up = rows @ act_map @ cols.T
    mask = up > threshold
    out = image * np.where(mask, 1.0, 0.3)[..., None]
    out[_outline(mask)] = (1.0, 0.9, 0.0)
    return np.clip(out, 0.0, 1.0)


def save_figure(
    result: DissectResult,
    dataset: Any,
    path: str | os.PathLike,
    max_units: int = 64,
    columns: int | None = None,
) -> Path:
    """PNG: for each unit (up to ``max_units``, by channel order) its top-k images, overlaid.

    Each strip is titled ``unit: concept (IoU) | formula (IoU)``. Uses matplotlib's Agg
    canvas directly (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nu = min(int(result.units.size), int(max_units))
    k = result.top_indices.shape[1]
    cols = columns or (1 if nu <= 4 else 2 if nu <= 16 else 4)
    rows = -(-nu // cols)
    fig = Figure(figsize=(cols * (k * 1.05 + 0.1), rows * 1.45 + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(nu):
        idx = [int(j) for j in result.top_indices[i] if j >= 0]
        imgs = np.asarray(dataset.images(idx)) if idx else np.zeros((0, 8, 8, 3), np.float32)
        H, W = imgs.shape[1:3] if idx else (8, 8)
        gap = max(2, W // 32)
        strip = np.ones((H, k * W + (k - 1) * gap, 3))
        for t, j in enumerate(idx):
            strip[:, t * (W + gap) : t * (W + gap) + W] = overlay_tile(imgs[t], result.top_maps[i, t], float(result.thresholds[i]))
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(
            f"unit {int(result.units[i])}: {result.concept_str(i)} ({result.best_iou[i]:.2f}) | "
            f"{result.formula_str(i)} ({result.formula_iou[i]:.2f})",
            fontsize=6.5,
        )
    fig.subplots_adjust(left=0.005, right=0.995, top=1 - 0.3 / (rows * 1.45 + 0.3), bottom=0.005, wspace=0.03, hspace=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_bytes(path, buf.getvalue())
    return path
