"""Bundled synthetic benchmark: deterministic procedural multi-object scenes with exact ground truth.

Real evaluations of attribution methods use VOC 2007 / COCO; this generator lets the whole
pipeline (training small classifiers/detectors, pointing game, mIoU, deletion/insertion)
run offline. Every record is a pure function of ``(seed, split, index)``:
``np.random.default_rng([seed, split_id, index])`` drives all randomness, so any subset of
any split can be regenerated independently, in any order, on any worker.

Classes (``CLASS_NAMES``): each class has a SHAPE, a characteristic HUE and a TEXTURE.
Four pairs share hue *and* texture, so only shape separates them; the others differ in
hue (and often texture) as well:

==  ==========  ===========  ========  ==================================
id  name        hue (deg)    texture   shape
==  ==========  ===========  ========  ==================================
0   disc        red (0)      solid     filled circle
1   square      red (0)      solid     square                  (pair 0/1)
2   triangle    yellow (55)  stripes   equilateral triangle
3   star        yellow (55)  stripes   five-pointed star       (pair 2/3)
4   ring        blue (225)   dots      annulus (hole 1/2 of radius)
5   hexagon     blue (225)   dots      regular hexagon         (pair 4/5)
6   cross       green (120)  checker   plus sign
7   diamond     green (120)  checker   rhombus, aspect ~0.55   (pair 6/7)
8   half_disc   cyan (185)   stripes   half of a disc
9   bar         magenta (310) stripes  long thin rectangle
10  crescent    orange (28)  solid     disc minus an offset disc
11  arrow       purple (270) checker   arrow (shaft + triangular head)
==  ==========  ===========  ========  ==================================

``num_classes < 12`` uses the first ``num_classes`` classes (the benchmark uses 12).

Scene recipe (in drawing order, later things occlude earlier ones):

1. Background: a low-frequency colour gradient (bilinear 4x4 grid of muted colours), a
   mid-frequency luminance texture, 2-6 soft muted blobs and 2-7 thin muted lines.
2. 0..``max_distractors`` distractors that are not in the class set, in neutral
   (low-saturation) colours: irregular random polygons and thin scribbles (polylines).
3. ``min_objects``..``max_objects`` objects, classes uniform (a class may repeat). Each has
   a circumscribed diameter of ``scale * size`` with ``scale ~ U(scale_range)``, a random
   rotation, a mild random aspect ratio (x0.89..x1.13 per axis), a colour jittered within the
   class's band (hue +-8 deg, saturation 0.6..1, value 0.65..1), texture period ~0.42 x
   radius (>= 3.2 px) with a random phase, and a soft lighting gradient. Placement is
   rejected and redrawn (up to 24 tries, shrinking after 12) if it would leave an earlier
   object with fewer than ``min_visible_fraction`` of its pixels or fewer than
   ``min_visible_pixels`` pixels visible; an object with no acceptable placement is
   skipped (rare; the first object is always placed).
4. Per-pixel Gaussian noise (sigma 0.01..0.035), clipped to [0, 1].

Shapes are rendered from signed distance functions with one-pixel anti-aliasing. An
object's full mask is ``{pixel centres strictly inside the shape}`` clipped to the image
(its anti-aliased coverage exceeds 1/2 exactly there); its visible mask (``Record.masks``) is
its full mask minus the full masks of all later objects, so visible masks are disjoint and
non-empty, and ``Record.boxes`` are their tight boxes (``records.mask_to_box``), so box and
mask agree exactly.

Difficult rule (VOC-like; ``a_vis`` = visible pixels, ``a_full`` = pixels of the full mask,
``H*W`` = image pixels)::

    difficult = a_vis < difficult_area * H * W  or  a_vis < difficult_visible * a_full

with defaults ``difficult_area = 0.01`` (1% of the image: 163.84 px at 128x128) and
``difficult_visible = 0.4`` (more than 60% occluded). Both comparisons are strict and done
in float64. Truncation by the image border is not occlusion: ``a_full`` is already clipped.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from collections.abc import Iterator

import numpy as np

from xaijax.data.records import Record, mask_to_box, multi_hot

__all__ = [
    "CLASS_NAMES",
    "CLASS_STYLES",
    "SPLITS",
    "ClassStyle",
    "ObjectSpec",
    "Scene",
    "SyntheticScenes",
]

_F = np.float32


@dataclasses.dataclass(frozen=True)
class ClassStyle:
    """Appearance of one class: shape name, hue band centre (degrees) and texture name."""

    name: str
    hue: float
    texture: str  # "solid" | "stripes" | "checker" | "dots"


CLASS_STYLES: tuple[ClassStyle, ...] = (
    ClassStyle("disc", 0.0, "solid"),
    ClassStyle("square", 0.0, "solid"),
    ClassStyle("triangle", 55.0, "stripes"),
    ClassStyle("star", 55.0, "stripes"),
    ClassStyle("ring", 225.0, "dots"),
    ClassStyle("hexagon", 225.0, "dots"),
    ClassStyle("cross", 120.0, "checker"),
    ClassStyle("diamond", 120.0, "checker"),
    ClassStyle("half_disc", 185.0, "stripes"),
    ClassStyle("bar", 310.0, "stripes"),
    ClassStyle("crescent", 28.0, "solid"),
    ClassStyle("arrow", 270.0, "checker"),
)
CLASS_NAMES: tuple[str, ...] = tuple(s.name for s in CLASS_STYLES)
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

_HUE_JITTER = 8.0  # degrees
_MAX_TRIES = 24


# ----------------------------------------------------------------------------- geometry


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star(points: int, inner: float) -> np.ndarray:
    a = math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _unit(verts: np.ndarray) -> np.ndarray:
    """Scale a polygon so that its farthest vertex is at distance 1 from the origin."""
    verts = np.asarray(verts, np.float64)
    return (verts / np.max(np.hypot(verts[:, 0], verts[:, 1]))).astype(_F)


_POLYGONS: dict[str, np.ndarray] = {
    "square": _unit(_regular(4, phase=math.pi / 4)),
    "triangle": _unit(_regular(3)),
    "star": _unit(_star(5, 0.45)),
    "hexagon": _unit(_regular(6, phase=0.0)),
    "cross": _unit(
        [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
         (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    ),
    "diamond": _unit([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]),
    "bar": _unit([(-1, -0.27), (1, -0.27), (1, 0.27), (-1, 0.27)]),
    "arrow": _unit([(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55), (0.15, 0.2), (-1, 0.2)]),
}


def _polygon_sdf(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact signed distance (negative inside) from points (u, v) to a simple polygon (E, 2).

    ``u``/``v`` broadcast to (h, w); edges go on a leading axis so inner loops run over pixels.
    """
    u, v = np.broadcast_arrays(np.asarray(u, _F), np.asarray(v, _F))
    a = np.asarray(verts, _F)
    e = np.roll(a, -1, axis=0) - a
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    ex, ey = e[:, 0, None, None], e[:, 1, None, None]
    wx, wy = u[None] - ax, v[None] - ay  # (E, h, w)
    inv_len2 = (1.0 / np.maximum((e * e).sum(1), 1e-12)).astype(_F)[:, None, None]
    t = _clip01((wx * ex + wy * ey) * inv_len2)
    dx = wx - t * ex
    dy = wy - t * ey
    dist = np.sqrt(np.min(dx * dx + dy * dy, axis=0))
    # even-odd crossing test along +u: edge straddles the row and crosses right of the point,
    # i.e. sign(ey) * (wx * ey - wy * ex) < 0 (no division)
    straddle = (wy >= 0) != (wy >= ey)
    right = (wx * ey - wy * ex) * np.sign(ey) < 0
    inside = (np.count_nonzero(straddle & right, axis=0) % 2) == 1
    return np.where(inside, -dist, dist)


def _shape_sdf(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance in local units (circumradius 1) of the class shape ``name``."""
    if name in _POLYGONS:
        return _polygon_sdf(u, v, _POLYGONS[name])
    rho = np.sqrt(u * u + v * v)
    if name == "disc":
        return rho - 1.0
    if name == "ring":
        return np.abs(rho - 0.75) - 0.25
    if name == "half_disc":
        return np.maximum(rho - 1.0, -v)
    if name == "crescent":
        return np.maximum(rho - 1.0, 0.82 - np.sqrt((u - 0.45) ** 2 + v * v))
    raise ValueError(f"unknown shape {name!r}")


def _segments_dist(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from points (x, y) (broadcasting to (h, w)) to the polyline through ``pts`` (P, 2)."""
    x, y = np.broadcast_arrays(np.asarray(x, _F), np.asarray(y, _F))
    a = np.asarray(pts[:-1], _F)
    e = np.asarray(pts[1:], _F) - a
    ex, ey = e[:, 0, None, None], e[:, 1, None, None]
    wx, wy = x[None] - a[:, 0, None, None], y[None] - a[:, 1, None, None]
    inv_len2 = (1.0 / np.maximum((e * e).sum(1), 1e-12)).astype(_F)[:, None, None]
    t = _clip01((wx * ex + wy * ey) * inv_len2)
    dx = wx - t * ex
    dy = wy - t * ey
    return np.sqrt(np.min(dx * dx + dy * dy, axis=0))


def _window(x_lo: float, x_hi: float, y_lo: float, y_hi: float, size: int):
    """Pixel window covering [x_lo, x_hi] x [y_lo, y_hi] (+1 px), clipped; None if empty.

    Returns ``((row_slice, col_slice), xs (1, w), ys (h, 1))`` with pixel-centre coordinates.
    """
    x0 = max(int(math.floor(x_lo)) - 1, 0)
    x1 = min(int(math.ceil(x_hi)) + 2, size)
    y0 = max(int(math.floor(y_lo)) - 1, 0)
    y1 = min(int(math.ceil(y_hi)) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = (np.arange(x0, x1, dtype=_F) + _F(0.5))[None, :]
    ys = (np.arange(y0, y1, dtype=_F) + _F(0.5))[:, None]
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; h in turns [0, 1), s, v in [0, 1]; returns (..., 3) float32."""
    if isinstance(h, float) and isinstance(s, float) and isinstance(v, float):  # incl. np.float64
        return np.array(colorsys.hsv_to_rgb(float(h) % 1.0, float(s), float(v)), _F)
    h, s, v = (np.asarray(z, np.float64) for z in (h, s, v))
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    return np.choose(i[..., None], choices).astype(_F)


def _clip01(x: np.ndarray) -> np.ndarray:
    """clip(x, 0, 1) in place (cheaper than np.clip for the many small arrays here)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _composite(img: np.ndarray, win, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place ``img[win] = img[win] * (1 - alpha) + colour * alpha``.

    ``alpha`` is (h, w); ``colour`` is (h, w, 3) or (3,).
    """
    view = img[win]
    view += (colour - view) * alpha[..., None]


@functools.lru_cache(maxsize=64)
def _linear_taps(n_out: int, n_in: int, nodes_span_image: bool):
    """Indices and weights of 1-D linear interpolation from ``n_in`` to ``n_out`` samples.

    ``nodes_span_image``: the ``n_in`` samples are grid nodes spread from the first to the
    last output pixel centre (smooth random fields); otherwise both are pixel rasters with
    aligned centres and clamped edges (bilinear resize). Returns ``(lo, hi, frac)`` with
    ``out = x[lo] * (1 - frac) + x[hi] * frac``; frac is (n_out, 1, 1) float32.
    """
    if nodes_span_image:
        pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    else:
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(_F)[:, None, None]
    for arr in (lo, hi, frac):
        arr.flags.writeable = False
    return lo, hi, frac


def _resize(x: np.ndarray, n_out: int, nodes_span_image: bool) -> np.ndarray:
    """Separable linear resize of (h, h, c) ``x`` to (n_out, n_out, c) float32.

    Written with gathers and elementwise arithmetic on purpose: BLAS matmuls this small run
    slower than this, and much slower when a threaded BLAS competes with other processes.
    """
    lo, hi, frac = _linear_taps(n_out, x.shape[0], nodes_span_image)
    y = x[lo] + (x[hi] - x[lo]) * frac  # rows
    y = y.transpose(1, 0, 2)
    lo, hi, frac = _linear_taps(n_out, x.shape[1], nodes_span_image)
    z = y[lo] + (y[hi] - y[lo]) * frac  # columns
    return np.ascontiguousarray(z.transpose(1, 0, 2), dtype=_F)


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """Drawing parameters of one placed object (for inspection and debugging).

    ``centre`` is (x, y) in pixels; ``radius`` the circumscribed radius in pixels before the
    aspect jitter ``aspect`` (sx, sy); ``angle`` in radians; ``rgb`` the primary colour.
    """

    label: int
    centre: tuple[float, float]
    radius: float
    angle: float
    aspect: tuple[float, float]
    rgb: tuple[float, float, float]
    texture: str


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """A record plus what the generator knows beyond it.

    ``full_masks`` (K, H, W) bool: each object's whole shape clipped to the image, before
    occlusion (``record.masks`` is the visible part). ``objects``: the drawing parameters.
    """

    record: Record
    full_masks: np.ndarray
    objects: tuple[ObjectSpec, ...]


@dataclasses.dataclass(frozen=True)
class SyntheticScenes:
    """Configuration of the synthetic multi-object benchmark (see the module docstring).

    Attributes:
      size: image side in pixels (square images, ``size x size``).
      num_classes: number of classes used, the first ``num_classes`` of ``CLASS_NAMES``.
      min_objects, max_objects: number of objects attempted per image (uniform).
      scale_range: (lo, hi) circumscribed object diameter as a fraction of ``size``.
      max_distractors: at most this many non-class distractor shapes (uniform 0..max).
      seed: benchmark seed (non-negative integer).
      difficult_area, difficult_visible: the difficult rule's thresholds (module docstring).
      min_visible_fraction, min_visible_pixels: occlusion limits enforced by placement.
      train_size, val_size, test_size: number of records in each split.
    """

    size: int = 128
    num_classes: int = len(CLASS_STYLES)
    min_objects: int = 1
    max_objects: int = 4
    scale_range: tuple[float, float] = (0.10, 0.45)
    max_distractors: int = 3
    seed: int = 0
    difficult_area: float = 0.01
    difficult_visible: float = 0.4
    min_visible_fraction: float = 0.25
    min_visible_pixels: int = 12
    train_size: int = 10_000
    val_size: int = 1_000
    test_size: int = 1_000

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(self.size) or self.size < 32:
            raise ValueError(f"size: expected an integer >= 32, got {self.size!r}")
        if not is_int(self.num_classes) or not 2 <= self.num_classes <= len(CLASS_STYLES):
            raise ValueError(
                f"num_classes: expected an integer in [2, {len(CLASS_STYLES)}], got {self.num_classes!r}"
            )
        if not (is_int(self.min_objects) and is_int(self.max_objects)) or not (
            1 <= self.min_objects <= self.max_objects <= 12
        ):
            raise ValueError(
                "min_objects, max_objects: expected integers with 1 <= min_objects <= max_objects "
                f"<= 12, got {self.min_objects!r}, {self.max_objects!r}"
            )
        lo_hi = tuple(self.scale_range)
        if len(lo_hi) != 2 or not 0.02 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ValueError(
                f"scale_range: expected (lo, hi) with 0.02 <= lo <= hi <= 1, got {self.scale_range!r}"
            )
        object.__setattr__(self, "scale_range", (float(lo_hi[0]), float(lo_hi[1])))
        if not is_int(self.max_distractors) or self.max_distractors < 0:
            raise ValueError(f"max_distractors: expected an integer >= 0, got {self.max_distractors!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed!r}")
        if not 0.0 <= self.difficult_area < 1.0:
            raise ValueError(f"difficult_area: expected a fraction in [0, 1), got {self.difficult_area!r}")
        if not 0.0 <= self.difficult_visible <= 1.0:
            raise ValueError(
                f"difficult_visible: expected a fraction in [0, 1], got {self.difficult_visible!r}"
            )
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"min_visible_fraction: expected a fraction in [0, 1], got {self.min_visible_fraction!r}"
            )
        if not is_int(self.min_visible_pixels) or self.min_visible_pixels < 1:
            raise ValueError(f"min_visible_pixels: expected an integer >= 1, got {self.min_visible_pixels!r}")
        for name in ("train_size", "val_size", "test_size"):
            n = getattr(self, name)
            if not is_int(n) or n < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {n!r}")

    # ------------------------------------------------------------------ public API

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the ``num_classes`` classes in use."""
        return CLASS_NAMES[: self.num_classes]

    def split_size(self, split: str) -> int:
        """Number of records in ``split`` ("train", "val" or "test")."""
        self._split_id(split)
        return int(getattr(self, f"{split}_size"))

    def record(self, split: str, index: int) -> Record:
        """The record ``index`` of ``split``; a pure function of ``(seed, split, index)``."""
        return self.scene(split, index).record

    def scene(self, split: str, index: int) -> Scene:
        """Like :meth:`record`, plus full (unoccluded) masks and drawing parameters."""
        split_id = self._split_id(split)
        n = self.split_size(split)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < n:
            raise ValueError(f"index: expected an integer in [0, {n}) for split {split!r}, got {index!r}")
        rng = np.random.default_rng([int(self.seed), split_id, int(index)])
        return self._generate(rng, f"synthetic-s{self.seed}-{split}-{int(index):06d}")

    def records(self, split: str, start: int, n: int) -> list[Record]:
        """Records ``start .. start + n - 1`` of ``split``."""
        self._check_range(split, start, n)
        return [self.record(split, i) for i in range(start, start + n)]

    def batch(self, split: str, start: int, n: int) -> dict[str, object]:
        """Records ``start .. start + n - 1`` of ``split`` stacked for training/evaluation.

        Returns a dict with ``images`` (n, H, W, 3) float32 in [0, 1], ``multi_hot``
        (n, C) float32 (every object counts, difficult ones included), and per-record lists
        ``labels`` [(K_i,) int32], ``boxes`` [(K_i, 4) float32], ``masks`` [(K_i, H, W) bool],
        ``difficult`` [(K_i,) bool], ``image_ids`` [str].
        """
        recs = self.records(split, start, n)
        size = self.size
        return {
            "images": np.stack([r.image for r in recs]) if recs else np.zeros((0, size, size, 3), _F),
            "multi_hot": (
                np.stack([multi_hot(r, self.num_classes) for r in recs])
                if recs
                else np.zeros((0, self.num_classes), _F)
            ),
            "labels": [r.labels for r in recs],
            "boxes": [r.boxes for r in recs],
            "masks": [r.masks for r in recs],
            "difficult": [r.difficult for r in recs],
            "image_ids": [r.image_id for r in recs],
        }

    def iter_batches(
        self, split: str, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, object]]:
        """Yield :meth:`batch` dicts over records ``[start, stop)`` (last batch may be short)."""
        stop = self.split_size(split) if stop is None else stop
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self._check_range(split, start, stop - start)
        for s in range(start, stop, batch_size):
            yield self.batch(split, s, min(batch_size, stop - s))

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _split_id(split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
        return SPLITS[split]

    def _check_range(self, split: str, start: int, n: int) -> None:
        total = self.split_size(split)
        if not isinstance(start, (int, np.integer)) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"start, n: expected integers, got {start!r}, {n!r}")
        if start < 0 or n < 0 or start + n > total:
            raise ValueError(
                f"start={start}, n={n}: records [start, start + n) must lie in [0, {total}) "
                f"for split {split!r}"
            )

    def _generate(self, rng: np.random.Generator, image_id: str) -> Scene:
        size = self.size
        img = self._background(rng)
        for _ in range(int(rng.integers(0, self.max_distractors + 1))):
            self._draw_distractor(rng, img)

        full: list[np.ndarray] = []  # full masks of placed objects
        vis: list[np.ndarray] = []  # current visible masks
        specs: list[ObjectSpec] = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            label = int(rng.integers(0, self.num_classes))
            style = CLASS_STYLES[label]
            placed = None
            for attempt in range(_MAX_TRIES):
                scale = rng.uniform(*self.scale_range)
                if attempt >= _MAX_TRIES // 2:
                    scale = max(self.scale_range[0], scale * 0.6)
                radius = 0.5 * scale * size
                margin = 0.5 * radius
                cx = rng.uniform(margin, size - margin)
                cy = rng.uniform(margin, size - margin)
                angle = rng.uniform(0.0, 2 * math.pi)
                aspect = tuple(np.exp(rng.uniform(-0.12, 0.12, size=2)).tolist())
                geom = self._object_geometry(style.name, cx, cy, radius, angle, aspect)
                if geom is None:
                    continue
                win, sdf, u, v = geom
                m = np.zeros((size, size), bool)
                m[win] = sdf < 0
                area = int(m.sum())
                if area < self.min_visible_pixels:
                    continue
                ok = True
                for f, vm in zip(full, vis):
                    left = int(np.count_nonzero(vm & ~m))
                    if left < self.min_visible_pixels or left < self.min_visible_fraction * int(f.sum()):
                        ok = False
                        break
                if ok:
                    placed = (win, sdf, u, v, m, cx, cy, radius, angle, aspect)
                    break
            if placed is None:
                continue
            win, sdf, u, v, m, cx, cy, radius, angle, aspect = placed
            rgb = self._draw_object(rng, img, style, win, sdf, u, v, radius, aspect)
            vis = [vm & ~m for vm in vis]
            full.append(m)
            vis.append(m.copy())
            specs.append(
                ObjectSpec(
                    label, (float(cx), float(cy)), float(radius), float(angle), aspect, rgb, style.texture
                )
            )

        sigma = rng.uniform(0.01, 0.035)  # uniform noise with this standard deviation
        img += (rng.random(img.shape, dtype=_F) - _F(0.5)) * _F(sigma * math.sqrt(12.0))
        np.clip(img, 0.0, 1.0, out=img)

        k = len(specs)
        masks = np.stack(vis) if k else np.zeros((0, size, size), bool)
        full_masks = np.stack(full) if k else np.zeros((0, size, size), bool)
        labels = np.array([s.label for s in specs], np.int32)
        boxes = np.stack([mask_to_box(mm) for mm in vis]) if k else np.zeros((0, 4), _F)
        a_vis = masks.reshape(k, size * size).sum(1).astype(np.float64)
        a_full = full_masks.reshape(k, size * size).sum(1).astype(np.float64)
        difficult = (a_vis < self.difficult_area * size * size) | (a_vis < self.difficult_visible * a_full)
        record = Record(
            image=img, labels=labels, boxes=boxes, masks=masks, difficult=difficult, image_id=image_id
        )
        return Scene(record=record, full_masks=full_masks, objects=tuple(specs))

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """(size, size, 3) float32 background; the smooth layers are drawn at half resolution."""
        size = self.size
        hs = (size + 1) // 2  # half-resolution canvas for the smooth layers
        f = hs / size  # full-resolution pixels -> half-resolution pixels
        # low-frequency colour gradient from a 4x4 grid of muted colours
        g = 4
        grid = _hsv_to_rgb(
            rng.uniform(0, 1, (g, g)), rng.uniform(0.05, 0.4, (g, g)), rng.uniform(0.3, 0.85, (g, g))
        )
        half = _resize(grid, hs, nodes_span_image=True)
        # mid-frequency luminance texture
        g2 = 12
        tex = rng.normal(0.0, 0.05, (g2, g2, 1)).astype(_F)
        half += _resize(tex, hs, nodes_span_image=True)
        # soft blobs
        for _ in range(int(rng.integers(2, 7))):
            cx, cy = (rng.uniform(0, size, 2) * f).tolist()
            rx, ry = (rng.uniform(0.03, 0.22, 2) * size * f).tolist()
            ang = float(rng.uniform(0, math.pi))
            soft = float(rng.uniform(2.0, 5.0)) * f
            rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.45), rng.uniform(0.2, 0.9))
            opacity = float(rng.uniform(0.3, 0.75))
            rmax = max(rx, ry) + soft
            w = _window(cx - rmax, cx + rmax, cy - rmax, cy + rmax, hs)
            if w is None:
                continue
            win, xs, ys = w
            dx, dy = xs - cx, ys - cy
            c, s = math.cos(ang), math.sin(ang)
            q = np.sqrt(((c * dx + s * dy) * (1.0 / rx)) ** 2 + ((c * dy - s * dx) * (1.0 / ry)) ** 2)
            alpha = _clip01(0.5 - (q - 1.0) * (min(rx, ry) / soft)) * opacity
            _composite(half, win, alpha, rgb)
        img = _resize(half, size, nodes_span_image=False)
        # thin lines
        for _ in range(int(rng.integers(2, 8))):
            p0 = rng.uniform(-0.1, 1.1, 2) * size
            p1 = p0 + rng.normal(0, 0.35, 2) * size
            width = float(rng.uniform(0.6, 2.0))
            rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.95))
            opacity = float(rng.uniform(0.5, 0.9))
            self._draw_polyline(img, np.stack([p0, p1]), width, rgb, opacity)
        return img

    def _draw_polyline(
        self, img: np.ndarray, pts: np.ndarray, width: float, rgb: np.ndarray, opacity: float
    ) -> None:
        pad = width + 1.0
        w = _window(
            float(pts[:, 0].min()) - pad,
            float(pts[:, 0].max()) + pad,
            float(pts[:, 1].min()) - pad,
            float(pts[:, 1].max()) + pad,
            self.size,
        )
        if w is None:
            return
        win, xs, ys = w
        d = _segments_dist(xs, ys, pts)
        alpha = _clip01((0.5 * width + 0.5) - d) * opacity
        _composite(img, win, alpha, rgb)

    def _draw_distractor(self, rng: np.random.Generator, img: np.ndarray) -> None:
        size = self.size
        rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.18), rng.uniform(0.15, 0.95))
        if rng.uniform() < 0.55:  # irregular polygon
            n = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = rng.uniform(0.35, 1.0, n)
            radius = 0.5 * float(rng.uniform(0.08, 0.32)) * size
            cx, cy = rng.uniform(0, size, 2).tolist()
            verts = np.stack([cx + radius * rad * np.cos(ang), cy + radius * rad * np.sin(ang)], 1)
            w = _window(cx - radius, cx + radius, cy - radius, cy + radius, size)
            if w is None:
                return
            win, xs, ys = w
            sdf = _polygon_sdf(xs, ys, verts.astype(_F))
            alpha = _clip01(0.5 - sdf)
            _composite(img, win, alpha, rgb)
        else:  # scribble
            n = int(rng.integers(3, 7))
            steps = rng.normal(0, 1, (n - 1, 2))
            lengths = rng.uniform(0.05, 0.2, (n - 1, 1)) * size
            steps *= lengths / np.maximum(np.linalg.norm(steps, axis=1, keepdims=True), 1e-9)
            p0 = rng.uniform(0.1, 0.9, 2) * size
            pts = np.concatenate([p0[None], p0 + np.cumsum(steps, 0)], 0)
            self._draw_polyline(img, pts, float(rng.uniform(1.0, 2.5)), rgb, 1.0)

    def _object_geometry(
        self, shape: str, cx: float, cy: float, radius: float, angle: float, aspect: tuple[float, float]
    ):
        """Window, signed distance in pixels and local coordinates (u, v) of one object."""
        ext = radius * max(aspect)
        w = _window(cx - ext, cx + ext, cy - ext, cy + ext, self.size)
        if w is None:
            return None
        win, xs, ys = w
        dx, dy = xs - _F(cx), ys - _F(cy)
        c, s = _F(math.cos(angle)), _F(math.sin(angle))
        u = (c * dx + s * dy) / _F(radius * aspect[0])
        v = (-s * dx + c * dy) / _F(radius * aspect[1])
        sdf = _shape_sdf(shape, u, v) * _F(radius * min(aspect))
        return win, sdf.astype(_F), u, v

    def _draw_object(
        self,
        rng: np.random.Generator,
        img: np.ndarray,
        style: ClassStyle,
        win,
        sdf: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        radius: float,
        aspect: tuple[float, float],
    ) -> tuple[float, float, float]:
        hue = (style.hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) / 360.0
        sat = rng.uniform(0.6, 1.0)
        val = rng.uniform(0.65, 1.0)
        primary = _hsv_to_rgb(hue, sat, val)
        if style.texture == "dots":
            secondary = _hsv_to_rgb(hue, sat * 0.25, 1.0)
        else:
            secondary = _hsv_to_rgb(hue, sat, val * 0.35)
        period = max(3.2, 0.42 * radius)
        phase = rng.uniform(0.0, 1.0, 2)
        light = rng.uniform(0, 2 * math.pi)
        # object-frame pixel coordinates (texture rotates and scales with the object)
        px = u * _F(radius * aspect[0] / period) + _F(phase[0])
        py = v * _F(radius * aspect[1] / period) + _F(phase[1])
        if style.texture == "stripes":
            t = _clip01(0.5 + np.sin(2 * np.pi * px) * _F(period / (2 * np.pi)))
        elif style.texture == "checker":
            t = _clip01(0.5 + np.sin(np.pi * px) * np.sin(np.pi * py) * _F(period / 3.0))
        elif style.texture == "dots":
            d = np.sqrt((px - np.round(px)) ** 2 + (py - np.round(py)) ** 2) * _F(period)
            t = _clip01(0.28 * period - d + 0.5)
        else:
            t = np.zeros_like(u)
        shade = 1.0 + 0.12 * (math.cos(light) * u + math.sin(light) * v)
        colour = (primary * (1 - t[..., None]) + secondary * t[..., None]) * shade[..., None]
        alpha = _clip01(0.5 - sdf)
        _composite(img, win, alpha, colour.astype(_F))
        return tuple(float(x) for x in primary)
