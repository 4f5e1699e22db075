"""Turning attribution maps into pictures: heatmaps, overlays, figures, atomic PNG writing.

Two levels:

* plain arrays: :func:`heatmap` (an (H, W) map -> RGB, one map at a time), :func:`overlay`
  and :func:`save_png`;
* figures a reader can compare (matplotlib, no pyplot state): :class:`MapScale` is *one*
  colour scale for maps shown side by side (a figure row): a diverging colour map centred at
  zero with symmetric limits when any of the maps has a negative value, a sequential one
  otherwise, limits shared by every map of the row. :func:`draw_map` shows a map over its
  image with a per-pixel alpha (strong values opaque, values near zero let the image through,
  so signed maps stay visible over the image), :func:`add_colorbar` draws the scale.
  :func:`map_grid_figure` (rows of maps, one scale and one colour bar per row, "n/a" cells),
  :func:`explain_figure` (the ``xaijax explain`` PNG: title with method, model, class and
  score, and a colour bar) and :func:`labelled_grid_figure` (tiles with a label each, for
  ``xaijax visualize``) build figures; :func:`save_figure` writes one atomically.
"""

from __future__ import annotations

import dataclasses
import io
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xaijax.atomic import atomic_bytes, atomic_write
from xaijax.imageops import minmax_normalize

__all__ = [
    "heatmap",
    "overlay",
    "save_png",
    "MapScale",
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
    "ROBUST_PERCENTILE",
    "draw_map",
    "add_colorbar",
    "map_grid_figure",
    "explain_figure",
    "labelled_grid_figure",
    "save_figure",
    "save_explanation",
]

#: Colour map of signed maps (diverging, white at zero: blue negative, red positive).
SIGNED_CMAP = "RdBu_r"
#: Colour map of non-negative maps (sequential, perceptually uniform).
UNSIGNED_CMAP = "inferno"
#: The colour limits of a row are this percentile of the row's values (of their magnitudes for
#: signed maps): one extreme pixel does not wash out every other map; values beyond the limits
#: take the end colours (the colour bar's arrows say so).
ROBUST_PERCENTILE = 99.5


def heatmap(m: np.ndarray, signed: bool | None = None) -> np.ndarray:
    """Colour an (H, W) map as an (H, W, 3) float RGB image in [0, 1], on its own scale.

    Signed maps (``signed=None`` detects negative values) use a blue-white-red colormap
    symmetric around zero (``bwr``); non-negative maps use ``jet`` over [min, max] (min-max
    normalised). For maps shown side by side use :class:`MapScale` instead (one scale for all).
    """
    from matplotlib import colormaps

    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"a map must have shape (H, W); got {m.shape}")
    m = np.nan_to_num(m)
    if signed is None:
        signed = bool((m < 0).any())
    if signed:
        s = np.abs(m).max() or 1.0
        return colormaps["bwr"]((m / s + 1) / 2)[..., :3]
    return colormaps["jet"](minmax_normalize(m[None])[0])[..., :3]


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the heatmap of ``m`` (H, W) over an RGB image (H, W, 3) in [0, 1]."""
    image = _rgb(image)
    m = _resized(m, image.shape[:2])
    return np.clip((1 - alpha) * image + alpha * heatmap(m), 0, 1)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) float [0, 1] or uint8 image as PNG, atomically (:func:`xaijax.atomic.atomic_write`)."""
    from PIL import Image

    path = Path(path)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
    return path


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3); got {image.shape}")
    return image


def _resized(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"a map must have shape (H, W); got {m.shape}")
    if m.shape != tuple(hw):
        from PIL import Image

        m = np.asarray(Image.fromarray(m.astype(np.float32)).resize((hw[1], hw[0]), Image.BILINEAR))
    return m


# -- one colour scale per row --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MapScale:
    """One colour scale for maps shown side by side (see the module docstring).

    Attributes:
      signed: some map has a negative value: diverging :data:`SIGNED_CMAP` centred at zero,
        ``vmin == -vmax``; otherwise sequential :data:`UNSIGNED_CMAP` over ``[vmin, vmax]``.
      vmin, vmax: the colour limits.
      cmap: the colour map's name.
      clipped_low, clipped_high: some value lies beyond ``vmin`` / ``vmax`` (shown in the end colour).
    """

    signed: bool
    vmin: float
    vmax: float
    cmap: str
    clipped_low: bool = False
    clipped_high: bool = False

    @classmethod
    def of(
        cls, maps: Sequence[np.ndarray | None], percentile: float = ROBUST_PERCENTILE, signed: bool | None = None
    ) -> "MapScale":
        """The scale of ``maps`` (``None`` entries, e.g. cells where a method is undefined, and
        non-finite values are ignored): signed if any value is negative (or as ``signed`` says);
        limits at the ``percentile`` of the values' magnitudes, ``[-p, p]`` (signed), or from the
        ``100 - percentile`` to the ``percentile`` of the values (non-negative: a map with an
        offset, such as RISE's mean probability, uses the whole colour range)."""
        parts = [np.asarray(m, np.float64).ravel() for m in maps if m is not None]
        v = np.concatenate(parts) if parts else np.zeros(1)
        v = v[np.isfinite(v)]
        if not v.size:
            v = np.zeros(1)
        if signed is None:
            signed = bool((v < 0).any())
        if signed:
            a = np.abs(v)
            lim = float(np.percentile(a, percentile)) or float(a.max()) or 1.0
            return cls(True, -lim, lim, SIGNED_CMAP, bool(v.min() < -lim), bool(v.max() > lim))
        lo, hi = float(np.percentile(v, 100.0 - percentile)), float(np.percentile(v, percentile))
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1.0
        return cls(False, lo, hi, UNSIGNED_CMAP, bool(v.min() < lo), bool(v.max() > hi))

    def norm(self):
        """A matplotlib ``Normalize`` with the scale's limits."""
        from matplotlib.colors import Normalize

        return Normalize(self.vmin, self.vmax, clip=True)

    def unit(self, m: np.ndarray) -> np.ndarray:
        """``m`` mapped to [0, 1] by the scale (0.5 is zero for a signed scale)."""
        m = np.nan_to_num(np.asarray(m, np.float64))
        return np.clip((m - self.vmin) / (self.vmax - self.vmin), 0.0, 1.0)

    def strength(self, m: np.ndarray) -> np.ndarray:
        """How strong each value is, in [0, 1]: ``|m| / vmax`` (signed), else :meth:`unit`."""
        if self.signed:
            return np.clip(np.abs(np.nan_to_num(np.asarray(m, np.float64))) / self.vmax, 0.0, 1.0)
        return self.unit(m)

    def colors(self, m: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB in [0, 1] of ``m`` on this scale."""
        from matplotlib import colormaps

        return colormaps[self.cmap](self.unit(m))[..., :3]

    def alpha(self, m: np.ndarray, opacity: float = 0.85) -> np.ndarray:
        """Per-pixel opacity of the map over its image, ``opacity * strength``: values near zero
        (signed) or near ``vmin`` (non-negative) let the image through."""
        return opacity * self.strength(m)

    @property
    def extend(self) -> str:
        """The colour bar's ``extend``: arrows at the ends where values were clipped."""
        return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
            (self.clipped_low, self.clipped_high)
        ]


def overlay_rgb(image: np.ndarray, m: np.ndarray, scale: MapScale | None = None, opacity: float = 0.85) -> np.ndarray:
    """(H, W, 3) RGB: the map ``m`` on ``scale`` (default: its own :meth:`MapScale.of`) over
    ``image`` with :meth:`MapScale.alpha` as per-pixel opacity."""
    image = _rgb(image)
    m = _resized(m, image.shape[:2])
    scale = scale or MapScale.of([m])
    a = scale.alpha(m, opacity)[..., None]
    return np.clip((1 - a) * image + a * scale.colors(m), 0.0, 1.0)


def draw_map(ax: Any, image: np.ndarray | None, m: np.ndarray, scale: MapScale, opacity: float = 0.85) -> Any:
    """Show ``m`` on ``scale`` over ``image`` (or alone when ``image`` is None) in ``ax``;
    returns the map's ``AxesImage`` (its ``cmap`` and ``norm`` are the scale's)."""
    if image is not None:
        image = _rgb(image)
        m = _resized(m, image.shape[:2])
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        alpha = scale.alpha(m, opacity)
    else:
        alpha = None
    im = ax.imshow(np.nan_to_num(np.asarray(m, np.float64)), cmap=scale.cmap, norm=scale.norm(), alpha=alpha,
                   interpolation="nearest")
    _bare(ax)
    return im


def add_colorbar(fig: Any, cax: Any, scale: MapScale, label: str | None = None, fontsize: float = 6) -> Any:
    """A colour bar of ``scale`` in ``cax``: ticks at the limits (and at zero for a signed scale)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=scale.norm(), cmap=colormaps[scale.cmap])
    cb = fig.colorbar(sm, cax=cax, extend=scale.extend)
    ticks = [scale.vmin, 0.0, scale.vmax] if scale.signed else [scale.vmin, scale.vmax]
    cb.set_ticks(ticks)
    cb.set_ticklabels([_num(t) for t in ticks])
    cb.ax.tick_params(labelsize=fontsize, length=2, pad=1)
    if label:
        cb.set_label(label, fontsize=fontsize)
    return cb


def _num(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.2g}" if 1e-2 <= abs(v) < 1e3 else f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _wrap(label: str, width: int) -> str:
    """``label`` on lines of at most ``width`` characters, broken after hyphens or spaces."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=True, break_long_words=True)) or label


# -- figures --------------------------------------------------------------------------------


def map_grid_figure(
    images: Sequence[np.ndarray],
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]],
    *,
    column_titles: Sequence[str] | None = None,
    regions: Sequence[np.ndarray | None] | None = None,
    groups: Sequence[Any] | None = None,
    header: str | None = "image",
    cell: float = 1.2,
    label_width: float = 1.35,
    missing: str = "n/a",
    missing_note: str = "not defined\nfor this model",
    percentile: float = ROBUST_PERCENTILE,
):
    """Rows of maps, one column per image: one colour map per row (diverging and centred at zero
    when any map of the row has a negative value, sequential otherwise; :class:`MapScale`) with
    limits shared by the row and a colour bar; row labels in a column of their own (never
    clipped); ``missing`` (default "n/a") in cells whose map is ``None``.

    Args:
      images: (H, W, 3) images in [0, 1], one per column.
      rows: ``(label, maps)`` with one (H, W) map or ``None`` per column.
      column_titles: one title per column (over the first row).
      regions: optional (H, W) bool regions outlined in white on every cell of their column.
      groups: optional group key per column (consecutive columns, e.g. the model they show):
        the limits are then shared within each group of a row, with a colour bar after each
        group; the colour map (signed or not) is still one per row. ``None``: one group.
      header: label of a first row showing the images alone (``None``: no such row).
      cell: side of one cell in inches.
      label_width: width of the row-label column in inches.
    Returns a matplotlib ``Figure`` with attributes ``row_scales`` (per row, a list of one
    :class:`MapScale` per group; ``None`` for the header row), ``grid_axes`` (per row, the
    cells' axes), ``row_labels`` (the label ``Text`` objects) and ``colorbars`` (per row).
    """
    from matplotlib.figure import Figure

    n_cols = len(images)
    if n_cols == 0:
        raise ValueError("map_grid_figure needs at least one image")
    for label, maps in rows:
        if len(maps) != n_cols:
            raise ValueError(f"row {label!r} has {len(maps)} maps for {n_cols} images")
    keys = list(groups) if groups is not None else [0] * n_cols
    if len(keys) != n_cols:
        raise ValueError(f"groups has {len(keys)} entries for {n_cols} images")
    spans: list[list[int]] = []
    for c, key in enumerate(keys):
        if spans and keys[spans[-1][0]] == key:
            spans[-1].append(c)
        else:
            spans.append([c])
    all_rows: list[tuple[str, Sequence[np.ndarray | None] | None]] = ([(header, None)] if header is not None else []) + list(rows)
    n_rows = max(1, len(all_rows))
    title_h = 0.32 if column_titles else 0.05
    gap, cbar_pad, cbar_w, cbar_labels = 0.04, 0.05, 0.09, 0.42
    # x positions (inches): label column, then each group's cells followed by its colour bar
    xs, cbar_xs, x = [], [], label_width
    for span in spans:
        for c in span:
            xs.append(x)
            x += cell + gap
        cbar_xs.append(x - gap + cbar_pad)
        x += cbar_pad + cbar_w + cbar_labels
    width = x - gap
    height = title_h + n_rows * cell + (n_rows - 1) * gap + 0.05
    fig = Figure(figsize=(width, height))
    fig.row_scales, fig.grid_axes, fig.row_labels, fig.colorbars = [], [], [], []
    for r, (label, maps) in enumerate(all_rows):
        top = height - title_h - r * (cell + gap)
        y0 = (top - cell) / height
        lab = fig.add_axes((0.02 / width, y0, (label_width - 0.06) / width, cell / height))
        lab.axis("off")
        fig.row_labels.append(lab.text(1.0, 0.5, _wrap(label, 17), ha="right", va="center", fontsize=7, transform=lab.transAxes))
        if maps is not None:
            signed = MapScale.of(maps, percentile).signed  # one colour map for the whole row
            scales = [MapScale.of([maps[c] for c in span], percentile, signed=signed) for span in spans]
        else:
            scales = None
        fig.row_scales.append(scales)
        cells, bars = [], []
        for g, span in enumerate(spans):
            for c in span:
                ax = fig.add_axes((xs[c] / width, y0, cell / width, cell / height))
                cells.append(ax)
                m = None if maps is None else maps[c]
                if maps is None:
                    ax.imshow(np.clip(_rgb(images[c]), 0, 1), interpolation="nearest")
                    _bare(ax)
                elif m is None:
                    ax.set_facecolor("0.93")
                    ax.text(0.5, 0.56, missing, ha="center", va="center", fontsize=9, color="0.35", transform=ax.transAxes)
                    if missing_note:
                        ax.text(0.5, 0.3, missing_note, ha="center", va="center", fontsize=5, color="0.45", transform=ax.transAxes)
                    _bare(ax)
                else:
                    draw_map(ax, images[c], m, scales[g])
                region = None if regions is None else regions[c]
                if region is not None and (maps is None or m is not None):
                    ax.contour(np.asarray(region, float), levels=[0.5], colors="white", linewidths=0.6)
                if r == 0 and column_titles:
                    ax.set_title(column_titles[c], fontsize=7, pad=2)
            if scales is not None and any(maps[c] is not None for c in span):  # (no bar for a group of n/a cells)
                cax = fig.add_axes((cbar_xs[g] / width, y0 + 0.08 * cell / height, cbar_w / width, 0.84 * cell / height))
                bars.append(add_colorbar(fig, cax, scales[g], fontsize=5))
        fig.grid_axes.append(cells)
        fig.colorbars.append(bars)
    return fig


def explain_figure(
    image: np.ndarray,
    m: np.ndarray,
    *,
    method: str,
    model: str,
    target: int | None = None,
    class_name: str | None = None,
    score: float | None = None,
    score_name: str = "logit",
    logit: float | None = None,
    percentile: float = ROBUST_PERCENTILE,
):
    """The ``xaijax explain`` figure: the image, then the map over it on its :class:`MapScale`
    with a colour bar; the title names the method, the model, the explained class (index and
    name where known) and the model's score for it (``score_name`` ``score``, e.g. "softmax
    0.912", and the ``logit`` where given). The title is also ``fig.title_text``, the colour
    bar ``fig.colorbars[0]``."""
    from matplotlib.figure import Figure

    image = _rgb(image)
    m = _resized(m, image.shape[:2])
    scale = MapScale.of([m], percentile)
    cls = "" if target is None else f"class {target}"
    if class_name and class_name != f"class {target}":
        cls = f"{cls} '{class_name}'" if cls else f"'{class_name}'"
    scores = [f"{score_name} {score:.3f}" if score is not None else None, f"logit {logit:.3f}" if logit is not None else None]
    line2 = ", ".join(p for p in (cls, *scores) if p)
    title = f"{method} on {model}" + (f"\n{line2}" if line2 else "")
    fig = Figure(figsize=(5.6, 3.05))
    fig.suptitle(title, fontsize=9, y=0.985, va="top")
    a0 = fig.add_axes((0.02, 0.04, 0.4, 0.72))
    a0.imshow(np.clip(image, 0, 1), interpolation="nearest")
    a0.set_title("input", fontsize=7, pad=2)
    _bare(a0)
    a1 = fig.add_axes((0.45, 0.04, 0.4, 0.72))
    draw_map(a1, image, m, scale)
    a1.set_title("map over the input" + (" (signed)" if scale.signed else ""), fontsize=7, pad=2)
    cax = fig.add_axes((0.87, 0.08, 0.025, 0.64))
    fig.colorbars = [add_colorbar(fig, cax, scale, fontsize=6)]
    fig.title_text = title
    return fig


def save_explanation(path: str | os.PathLike, image: np.ndarray, m: np.ndarray, **info: Any) -> Path:
    """:func:`explain_figure` of ``image`` and ``m`` (``info``: its keyword arguments) saved
    atomically as a PNG at ``path``."""
    return save_figure(path, explain_figure(image, m, **info))


def labelled_grid_figure(
    tiles: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str],
    *,
    title: str | None = None,
    cols: int | None = None,
    cell: float = 1.15,
):
    """Tiles (RGB in [0, 1]) row-major with one label over each (the unit, class or image it
    shows), and an optional title; returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    tiles = list(tiles)
    if len(labels) != len(tiles):
        raise ValueError(f"{len(tiles)} tiles but {len(labels)} labels")
    k = len(tiles)
    cols = cols or int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    title_h = 0.45 if title else 0.05
    lab_h, gap = 0.22, 0.06
    width = cols * cell + (cols + 1) * gap
    height = title_h + rows * (cell + lab_h) + rows * gap
    fig = Figure(figsize=(width, height))
    if title:
        fig.suptitle(_wrap(title, int(width * 13)), fontsize=8, y=1 - 0.04 / height, va="top")
    for n, (t, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(n, cols)
        top = height - title_h - r * (cell + lab_h + gap) - lab_h
        ax = fig.add_axes(((gap + c * (cell + gap)) / width, (top - cell) / height, cell / width, cell / height))
        ax.imshow(np.clip(np.asarray(t, np.float64), 0, 1), interpolation="nearest")
        ax.set_title(label, fontsize=6, pad=2)
        _bare(ax)
    return fig


def save_figure(path: str | os.PathLike, fig: Any, dpi: float = 100) -> Path:
    """Write a matplotlib figure as PNG atomically; returns the path."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_bytes(path, buf.getvalue())
    return path
