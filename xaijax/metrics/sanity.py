"""Sanity check by cascading randomisation (Adebayo et al., NeurIPS 2018).

The parameters of a trained model are re-initialised layer by layer **from the top (logits)
down**, cumulatively: step 1 randomises the last layer, step 2 the last two, ... and the
maps of every step are compared with the maps of the trained model. A method whose maps
barely change while the network is being destroyed does not explain the model.

* Layers: modules that own a ``kernel`` (convolutions and dense layers), in forward-call
  order (:func:`xaijax.models.taps.layer_names`); ``include_norm=True`` also counts
  BatchNorm modules (``scale`` without ``kernel``). ``layers=`` takes an explicit top-down
  list of module paths; a path may name a block (``"layer4"``) to randomise all of it at
  once, Adebayo's block-wise variant.
* Re-initialisation: the values :func:`xaijax.models.random_variables` gives for the same
  model and input shape with ``seed`` (He-normal kernels, zero biases; BatchNorm scale 1,
  bias 0 and, with ``include_norm``, running mean 0 / var 1). A layer randomised at step k
  keeps the same random values at every later step.
* Similarity, per image, between the trained-model map and the step-k map:
  Spearman rank correlation of the signed maps and of their absolute values (ties get
  average ranks, as ``scipy.stats.spearmanr``; a constant map gives NaN), and SSIM of the
  maps each min-max normalised to [0, 1] (data range 1).
* SSIM: :func:`ssim` follows ``skimage.metrics.structural_similarity``'s defaults for 2-D
  float images — a 7 x 7 **uniform** window, K1 = 0.01, K2 = 0.03, sample covariances
  (N / (N - 1) with N = 49), and the mean of the SSIM map over the pixels whose window lies
  inside the image (skimage crops (7 - 1) // 2 = 3 pixels at each border).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import minmax_normalize
from xaijax.models.init import random_variables
from xaijax.static_jit import bind_static
from xaijax.models.taps import layer_names

__all__ = [
    "rankdata",
    "spearman",
    "ssim",
    "randomizable_layers",
    "cascade_variables",
    "CascadeResult",
    "cascading_randomization",
    "plot_cascade",
    "plot_cascade_grid",
]

Explain = Callable[[nn.Module, Mapping[str, Any], jax.Array, Any], jax.Array]


# ----------------------------------------------------------------------------- similarity


def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis, ties sharing the mean of their ranks."""
    a = np.asarray(a, np.float64)
    flat = a.reshape(-1, a.shape[-1])
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="stable")
        s = row[order]
        new = np.concatenate([[True], s[1:] != s[:-1]])
        group = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], s.size)  # exclusive
        avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
        out[i, order] = avg[group]
    return out.reshape(a.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of (N, H, W) maps, per image: (N,), NaN for a constant map."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps must have the same shape (N, ...); got {a.shape} and {b.shape}")
    ra = rankdata(a.reshape(a.shape[0], -1))
    rb = rankdata(b.reshape(b.shape[0], -1))
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 1.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Mean SSIM of (N, H, W) image pairs, skimage's defaults (uniform window, sample covariance).

    Returns (N,) float32. H and W must be at least ``win_size`` (odd).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim needs two (N, H, W) arrays of the same shape; got {a.shape} and {b.shape}")
    if win_size % 2 == 0 or win_size < 3:
        raise ValueError(f"win_size must be odd and >= 3; got {win_size}")
    if min(a.shape[1:]) < win_size:
        raise ValueError(f"images of {a.shape[1:]} are smaller than the {win_size} x {win_size} SSIM window")
    npix = win_size * win_size
    kern = jnp.full((win_size, win_size, 1, 1), 1.0 / npix, jnp.float32)

    def box(x):  # valid-window means: exactly the pixels skimage keeps after its border crop
        return jax.lax.conv_general_dilated(
            x[..., None], kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )[..., 0]

    ux, uy = box(a), box(b)
    uxx, uyy, uxy = box(a * a), box(b * b), box(a * b)
    cov = npix / (npix - 1.0)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2))


# ----------------------------------------------------------------------------- randomisation


def _subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def randomizable_layers(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, *, include_norm: bool = False) -> list[str]:
    """Module paths that own parameters, in forward-call order (bottom-up).

    A module counts if its ``params`` subtree holds a ``kernel`` array directly (conv,
    dense), or, with ``include_norm``, a ``scale`` array (normalisation layers).
    """
    params = variables.get("params", {})
    out = []
    for name in layer_names(model, variables, x):
        node = _subtree(params, name.split("."))
        if not isinstance(node, Mapping):
            continue
        leaves = {k for k, v in node.items() if not isinstance(v, Mapping)}
        if "kernel" in leaves or (include_norm and "scale" in leaves):
            out.append(name)
    return out


def _replace(tree: Any, fresh: Any, path: Sequence[str]) -> Any:
    if not path:
        return fresh
    if not isinstance(tree, Mapping) or path[0] not in tree:
        return tree
    new = dict(tree)
    new[path[0]] = _replace(tree[path[0]], fresh[path[0]], path[1:])
    return new


def cascade_variables(
    variables: Mapping[str, Any], fresh: Mapping[str, Any], layers_top_down: Sequence[str], k: int, *, include_norm: bool = False
) -> dict:
    """``variables`` with the first ``k`` of ``layers_top_down`` replaced by their values in ``fresh``.

    ``params`` are always replaced; other collections (``batch_stats``) only with
    ``include_norm``. Untouched subtrees are the very same arrays as in ``variables``.
    """
    if not 0 <= k <= len(layers_top_down):
        raise ValueError(f"k must be in [0, {len(layers_top_down)}]; got {k}")
    out = dict(variables)
    for name in layers_top_down[:k]:
        path = name.split(".")
        for col in out:
            if col != "params" and not include_norm:
                continue
            if _subtree(out[col], path) is not None:
                if _subtree(fresh[col], path) is None:
                    raise ValueError(f"layer {name!r} has no fresh values in collection {col!r}")
                out[col] = _replace(out[col], fresh[col], path)
    return out


@dataclasses.dataclass(frozen=True)
class CascadeResult:
    """Outcome of :func:`cascading_randomization`.

    Attributes:
      layers: the L module paths, top-down; step k (1..L) has ``layers[:k]`` randomised.
      maps: (L + 1, N, H, W) maps; index 0 is the trained model.
      spearman: (L, N) signed rank correlation of step k+1 with step 0.
      spearman_abs: (L, N) rank correlation of the absolute maps.
      ssim: (L, N) SSIM of the min-max normalised maps.
    """

    layers: tuple[str, ...]
    maps: np.ndarray
    spearman: np.ndarray
    spearman_abs: np.ndarray
    ssim: np.ndarray

    def summary(self) -> dict[str, list[float]]:
        """Per-layer means over images (NaN-aware) of each similarity."""
        return {k: np.nanmean(getattr(self, k), axis=1).tolist() for k in ("spearman", "spearman_abs", "ssim")}


def cascading_randomization(
    explain: Explain,
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    target: Any,
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    include_norm: bool = False,
    fresh: Mapping[str, Any] | None = None,
) -> CascadeResult:
    """Run the cascading randomisation test of ``explain`` on a batch.

    Args:
      explain: a method, ``explain(model, variables, x, target) -> (N, H, W)``.
      model, variables: the trained model.
      x: (N, H, W, C) normalised inputs.
      target: as the method takes it (int or (N,) ints).
      layers: top-down module paths to randomise in turn; default: every layer of
        :func:`randomizable_layers`, reversed.
      seed: seed of the re-initialisation.
      include_norm: also randomise (reset) normalisation layers and their statistics.
      fresh: the re-initialised variables (default ``random_variables(model, x.shape,
        seed)``); pass them to reuse one draw over many batches.

    Repeated calls with the same (hashable) method and model and the same input shapes reuse
    one compiled explanation.
    """
    x = jnp.asarray(x)
    if layers is None:
        layers = list(reversed(randomizable_layers(model, variables, x, include_norm=include_norm)))
    else:
        layers = list(layers)
        known = set(layer_names(model, variables, x))
        bad = [l for l in layers if l not in known or _subtree(variables.get("params", {}), l.split(".")) is None]
        if bad:
            raise ValueError(f"layers {bad} are not parameterised layers of the model")
    if not layers:
        raise ValueError("the model has no parameterised layers to randomise")
    if fresh is None:
        fresh = random_variables(model, tuple(x.shape), seed=seed)
    run = bind_static(_run_explain, _explain_jit, explain, model)
    maps = [np.asarray(run(variables, x, target), np.float64)]
    for k in range(1, len(layers) + 1):
        maps.append(np.asarray(run(cascade_variables(variables, fresh, layers, k, include_norm=include_norm), x, target), np.float64))
    stack = np.stack(maps)
    ref = stack[0]
    sp = np.stack([spearman(ref, m) for m in stack[1:]])
    sp_abs = np.stack([spearman(np.abs(ref), np.abs(m)) for m in stack[1:]])
    ss = np.stack([np.asarray(ssim(minmax_normalize(ref), minmax_normalize(m))) for m in stack[1:]])
    return CascadeResult(tuple(layers), stack, sp, sp_abs, ss)


def _run_explain(explain: Explain, model: nn.Module, variables: Any, x: jax.Array, target: Any) -> jax.Array:
    return explain(model, variables, x, target)


_explain_jit = jax.jit(_run_explain, static_argnums=(0, 1))


# ----------------------------------------------------------------------------- plots


def _save(fig, path: str | os.PathLike | None) -> None:
    if path is None:
        return
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from xaijax.atomic import atomic_bytes

    FigureCanvasAgg(fig)
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight")
    atomic_bytes(path, buf.getvalue())


def plot_cascade(result: CascadeResult, path: str | os.PathLike | None = None, title: str = ""):
    """Per-layer curves (mean over images, band = one std) of the three similarities.

    The x axis lists the layers in the order they are randomised (top-down, cumulative);
    returns the matplotlib ``Figure`` (Agg, no display) and writes it to ``path`` if given.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.35 * len(result.layers) + 2), 4))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(result.layers))
    for key, label in (("spearman_abs", "Spearman (abs)"), ("spearman", "Spearman (signed)"), ("ssim", "SSIM")):
        v = getattr(result, key)
        m, s = np.nanmean(v, axis=1), np.nanstd(v, axis=1)
        ax.plot(xs, m, marker="o", label=label)
        ax.fill_between(xs, m - s, m + s, alpha=0.2)
    ax.set_xticks(xs)
    ax.set_xticklabels(result.layers, rotation=70, fontsize=7)
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_xlabel("randomised down to layer (cascading, top-down)")
    ax.set_ylabel("similarity to trained-model map")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_cascade_grid(
    result: CascadeResult, path: str | os.PathLike | None = None, images: Sequence[int] = (0,), max_columns: int | None = None
):
    """Map grid: one row per image, columns = trained model then each cascade step.

    Each column's title (``trained`` or the last randomised layer) is set at 45 degrees in a
    band at the top that is sized for the longest title, so no title is clipped however the
    figure is saved (the runner saves it without ``bbox_inches="tight"``); they are also
    ``fig.column_titles``."""
    from matplotlib.figure import Figure

    from xaijax.viz import heatmap

    cols = list(range(result.maps.shape[0]))
    if max_columns is not None and len(cols) > max_columns:
        cols = sorted(set(np.linspace(0, len(cols) - 1, max_columns).round().astype(int).tolist()))
    for i in images:
        if not 0 <= i < result.maps.shape[1]:
            raise ValueError(f"image index {i} out of range [0, {result.maps.shape[1]})")
    names = ["trained"] + list(result.layers)
    cell, gap, fontsize = 1.4, 0.05, 6
    longest = max(len(names[k]) for k in cols)
    # a 45-degree title of L characters at 6 pt (about 0.05 in per character) rises about
    # 0.71 * 0.05 * L inches; the band also leaves room for the part that leans past the last column
    band = 0.2 + 0.04 * longest
    right = 0.15 + 0.035 * len(names[cols[-1]])
    width = 0.15 + len(cols) * cell + (len(cols) - 1) * gap + right  # (left: a rotated title's descent)
    height = band + len(images) * cell + (len(images) - 1) * gap + 0.05
    fig = Figure(figsize=(width, height))
    titles = []
    for r, i in enumerate(images):
        for c, k in enumerate(cols):
            x0 = (0.15 + c * (cell + gap)) / width
            y0 = (height - band - r * (cell + gap) - cell) / height
            ax = fig.add_axes((x0, y0, cell / width, cell / height))
            ax.imshow(heatmap(result.maps[k, i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                titles.append(ax.set_title(names[k], fontsize=fontsize, rotation=45, ha="left", va="bottom",
                                           rotation_mode="anchor", loc="left"))
    fig.column_titles = titles
    _save(fig, path)
    return fig
