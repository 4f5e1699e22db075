"""BiLRP: second-order relevance of a similarity model (Eberle et al., TPAMI 2020).

A *similarity model* compares two images through a feature extractor ``phi``::

    s(x, x') = <phi(x), phi(x')> = sum_m phi_m(x) phi_m(x')

Here ``phi`` is a zoo model's output at a named layer (``features.29`` for VGG16,
``layer4`` for ResNet, ...), optionally pooled over space and/or randomly projected (see
:class:`BiLRP`). BiLRP explains ``s`` by *pairs* of input regions: with ``R_m(x)`` the LRP
explanation of the single feature ``phi_m`` on ``x`` (output relevance ``phi_m(x)``, summed
over colour channels),

    R_{pp'} = sum_m R_m(x)_p R_m(x')_{p'}

i.e. the sum over feature dimensions of the outer products of the two first-order maps. Both
maps are first summed over the pixels of each patch (``patch`` x ``patch`` pixels) — the
outer product is bilinear, so pooling before or after it gives the same numbers — so the
result is a (P, P') matrix of patch pairs for every sample pair. When every rule conserves
relevance (e.g. LRP-0 / gamma on bias-free layers) ``sum_{pp'} R_{pp'} = s(x, x')``.

How it runs
-----------
* ``x`` and ``x'`` are concatenated into one batch and go through one forward pass of the
  propagation engine (:func:`xaijax.propagation.pullback`), with the model wrapped so that
  its "output" is the chosen layer's activation (flattened). The rest of the network above
  that layer is traced but unused (XLA removes it under ``jit``).
* The relevance of feature ``m`` at that layer is ``a * d phi_m / d a`` (``a``: the layer's
  activation). The pooling/projection head is linear or positively homogeneous, so this is
  LRP's z-rule through the head and conserves ``phi_m`` exactly (Euler's theorem).
* The ``M`` backward passes are ``vmap``-ed over chunks of ``chunk`` feature dimensions and
  the chunks are accumulated with ``lax.scan``: memory grows with ``chunk``, not with ``M``.
  Cost: ``2 N M`` backward passes (one per image and feature dimension).

Rules. The default rule set (:func:`bilrp_composite`) is the authors' VGG-16 scheme: z^B on
the input layer (ImageNet-normalised RGB bounds), LRP-gamma with gamma 0.5 up to conv3_1,
0.25 up to conv4_1, 0.1 up to conv5_1 and 0 (the z-rule, stabiliser 1e-9) above, max pooling
winner-take-all. Other networks get the same schedule by relative depth among their
convolutions (the k-th of n convolutions uses the VGG-16 gamma of depth k / n). Any
:class:`~xaijax.propagation.Composite` or composite name can be passed instead. With the
default rules, a model that is not piecewise linear (a vision transformer: LayerNorm,
softmax, GELU) raises :class:`~xaijax.methods.NotApplicable`; an explicit ``composite`` is
left to the propagation engine.

Deliberate differences from the authors' code: patches are *sum*-pooled (the reference
average-pools, which only divides by the patch area) so that the pair relevances add up to
the similarity; patch grids cover the whole image (the last row/column of patches may be
smaller) instead of dropping a remainder; the optional random projection is scaled by
``1 / sqrt(projection)`` so that projected inner products approximate the unprojected ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.atomic import atomic_write
from xaijax.methods._core import Method, check_inputs, require_piecewise_linear
from xaijax.methods.registry import register
from xaijax.propagation import composites as C
from xaijax.propagation.composites import Composite
from xaijax.propagation.engine import plan, pullback
from xaijax.propagation.rules import Gamma, ZBox

__all__ = [
    "BiLRP",
    "BiLRPResult",
    "bilrp_composite",
    "gamma_schedule",
    "patch_grid",
    "plot_bilrp",
]

Array = jax.Array
POOLINGS = ("none", "sum", "mean", "max")

#: (upper bound of relative depth k / n, gamma) of the authors' VGG-16 schedule: with
#: n = 13 convolutions, conv k = 1..4 (conv1_2 .. conv3_1) get 0.5, k = 5..7 (conv3_2 ..
#: conv4_1) 0.25, k = 8..10 (conv4_2 .. conv5_1) 0.1, k = 11, 12 (conv5_2, conv5_3) 0.
_VGG16_SCHEDULE = ((5 / 13, 0.5), (8 / 13, 0.25), (11 / 13, 0.1), (math.inf, 0.0))


class BiLRPResult(NamedTuple):
    """What :class:`BiLRP` returns (a tuple; a pytree, so it can leave ``jax.jit``).

    Attributes:
      relevance: (N, P, P') relevance of patch ``p`` of ``x[n]`` together with patch ``p'``
        of ``x_prime[n]``; patches are numbered row-major (see :func:`patch_grid`).
      scores: (N,) similarity ``s(x[n], x_prime[n]) = <phi(x[n]), phi(x_prime[n])>``.
    """

    relevance: Array
    scores: Array


def patch_grid(height: int, width: int, patch: int | tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of the patch grid: ``(ceil(H / ph), ceil(W / pw))``.

    Patch ``p`` covers rows ``(p // cols) * ph`` .. and columns ``(p % cols) * pw`` ..; the
    last row/column of patches is cut at the image border when the size is not a multiple.
    """
    ph, pw = _patch_pair(patch)
    return -(-int(height) // ph), -(-int(width) // pw)


def _patch_pair(patch: int | tuple[int, int]) -> tuple[int, int]:
    p = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(patch)
    if len(p) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in p):
        raise ValueError(f"patch must be a positive int or a pair of positive ints, got {patch!r}")
    return int(p[0]), int(p[1])


def gamma_schedule(k: int, n: int) -> float:
    """Gamma of the ``k``-th (0-based) of ``n`` convolutions in the BiLRP default rule set.

    The authors' VGG-16 schedule by relative depth ``k / n`` (see the module docstring).
    """
    t = k / max(n, 1)
    for bound, gamma in _VGG16_SCHEDULE:
        if t < bound:
            return gamma
    return 0.0  # pragma: no cover - the last bound is infinite


def bilrp_composite(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    low: float | tuple[float, ...] | None = None,
    high: float | tuple[float, ...] | None = None,
) -> Composite:
    """The default BiLRP rule set for ``model`` on inputs shaped like ``x``.

    z^B on the first convolution/dense layer (bounds ``low``/``high``; default: the
    ImageNet-normalised range of RGB values in [0, 1]); the k-th of the model's n
    convolutions (in call order) gets ``Gamma(gamma_schedule(k, n))``; dense layers get
    ``Gamma(0)`` (the z-rule with a 1e-9 stabiliser, as for the reference's projection).
    Parameter-free layers keep the engine defaults (max pooling winner-take-all, average
    pooling and residual sums proportional).
    """
    p = plan(model, variables, x, "zero")
    convs = [e.name for e in p.layers if e.kind == "conv"]
    names = tuple((name, Gamma(gamma_schedule(k, len(convs)))) for k, name in enumerate(convs) if k > 0)
    return Composite(conv=Gamma(0.0), dense=Gamma(0.0), first=ZBox(low, high), names=names)


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _LayerOutput:
    """``model`` seen by the propagation engine as a model whose output is ``layer``'s
    activation, flattened to (N, D).

    The engine only calls ``.apply(variables, x)``; this runs the whole model (so every
    layer is intercepted and gets its rule as usual) and returns the chosen layer's output
    as recorded by Flax's ``capture_intermediates`` — the value *after* the engine's
    interception, so relevance seeded on it flows back through the rules. (A module called
    several times with the same name is rejected earlier, by the plan.)
    """

    model: nn.Module
    layer: str

    def apply(self, variables: Mapping[str, Any], x: Array) -> Array:
        path = tuple(self.layer.split("."))

        def wanted(module: nn.Module, method_name: str) -> bool:
            return method_name == "__call__" and tuple(module.path) == path

        _, state = self.model.apply(variables, x, capture_intermediates=wanted, mutable=["intermediates"])
        node: Any = state.get("intermediates", {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, Mapping) else {}
        calls = node.get("__call__") if isinstance(node, Mapping) else None
        if not calls:  # pragma: no cover - the plan checks the name first
            raise ValueError(f"layer {self.layer!r} was not called in the forward pass")
        a = calls[-1]  # the outermost call (a subclass calling super().__call__ records twice)
        if not isinstance(a, jax.Array):
            raise ValueError(f"layer {self.layer!r} returns {type(a).__name__}, not an array")
        return a.reshape(a.shape[0], -1)


# -------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class BiLRP(Method):
    """BiLRP explanation of ``s(x, x') = <phi(x), phi(x')>`` (see the module docstring).

    ``phi(x) = project(pool(a(x)))`` where ``a`` is the output of ``layer`` (NHWC, or any
    (N, ..., C) array; a (N, D) output is one location with D channels).

    Attributes:
      layer: dotted name of the layer whose output defines ``phi`` (None: the model's
        default CAM layer — VGG16 ``features.29``, ResNet ``layer4``, DenseNet ``relu``,
        Inception ``Mixed_7c``; see :func:`xaijax.methods.cam.default_cam_layer`).
      composite: the LRP rule set (a Composite or a built-in composite name); None: the
        authors' gamma schedule, :func:`bilrp_composite`.
      patch: patch side in pixels (int) or (rows, cols); relevance is summed per patch.
      chunk: feature dimensions propagated together (vmapped); bounds memory.
      pool: spatial pooling of ``a`` before the inner product — ``"none"`` (phi is the whole
        flattened map, M = h*w*C dimensions), ``"sum"``, ``"mean"`` or ``"max"`` over
        locations (M = C).
      projection: if set, ``phi`` is further mapped by a fixed Gaussian random matrix to this
        many dimensions (entries N(0, 1/projection); the reference's embedding, 100 there),
        which makes M = projection whatever the layer size.
      seed: PRNG seed of the projection matrix.

    Call: ``BiLRP(...)(model, variables, x, x_prime) -> BiLRPResult(relevance, scores)``
    with ``x``, ``x_prime`` normalised NHWC float batches of the same shape (N, H, W, C),
    ``relevance`` (N, P, P') with P = P' = rows * cols of :func:`patch_grid`, row-major, in
    the dtype of ``x``, and ``scores`` (N,). Pairs ``(x[n], x_prime[n])`` are independent.
    Jittable with the model static: ``jax.jit(method, static_argnums=0)``.
    """

    layer: str | None = None
    composite: Composite | str | None = None
    patch: int | tuple[int, int] = 16
    chunk: int = 32
    pool: str = "none"
    projection: int | None = None
    seed: int = 0

    kind: ClassVar[str] = "similarity"

    def __post_init__(self) -> None:
        if isinstance(self.patch, list):
            object.__setattr__(self, "patch", tuple(self.patch))
        _patch_pair(self.patch)
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
            raise ValueError(f"BiLRP chunk must be a positive int, got {self.chunk!r}")
        if self.pool not in POOLINGS:
            raise ValueError(f"BiLRP pool must be one of {', '.join(map(repr, POOLINGS))}; got {self.pool!r}")
        if self.projection is not None and (
            isinstance(self.projection, bool) or not isinstance(self.projection, (int, np.integer)) or self.projection < 1
        ):
            raise ValueError(f"BiLRP projection must be None or a positive int, got {self.projection!r}")
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"BiLRP layer must be a dotted layer name (str) or None, got {self.layer!r}")
        if self.composite is not None:
            C.resolve(self.composite)  # readable error for an unknown composite name now

    # -- phi's head: pooling and projection of the layer activation ------------------

    def _head(self, shape: tuple[int, ...], dtype) -> tuple[Any, int]:
        """``(g, M)``: ``g`` maps flattened activations (B, D) to features (B, M).

        ``shape`` is the layer output's shape (B, ..., C). ``g`` is linear (pool none, sum,
        mean) or positively homogeneous (max), so ``sum_d a_d dg_m/da_d = g_m(a)``.
        """
        channels = shape[-1] if len(shape) > 1 else 1
        locations = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        pool = self.pool

        def pooled(a: Array) -> Array:
            if pool == "none":
                return a
            a = a.reshape(a.shape[0], locations, channels)
            if pool == "sum":
                return a.sum(1)
            if pool == "mean":
                return a.mean(1)
            return a.max(1)

        m = locations * channels if pool == "none" else channels
        if self.projection is None:
            return pooled, m
        w = jax.random.normal(jax.random.key(self.seed), (m, self.projection), jnp.float32).astype(dtype) / np.sqrt(self.projection).astype(dtype)
        return (lambda a: pooled(a) @ w), int(self.projection)

    # -- the call ------------------------------------------------------------------

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: Array, x_prime: Array) -> BiLRPResult:
        check_inputs(x)
        check_inputs(x_prime)
        if tuple(x.shape) != tuple(x_prime.shape):
            raise ValueError(
                f"BiLRP compares x[n] with x_prime[n]: both must have the same shape (N, H, W, C); "
                f"got x {tuple(x.shape)} and x_prime {tuple(x_prime.shape)}"
            )
        if x.dtype != x_prime.dtype:
            raise ValueError(f"x and x_prime must have the same dtype; got {x.dtype} and {x_prime.dtype}")
        if self.composite is None:
            require_piecewise_linear(
                model,
                variables,
                x,
                "BiLRP with its default rules",
                "the authors' gamma schedule is for convolutions and dense layers with ReLU; pass composite= an "
                "LRP composite that covers the model's layers",
            )
        from xaijax.methods.cam import default_cam_layer

        layer = default_cam_layer(model) if self.layer is None else self.layer
        n, height, width = x.shape[:3]
        both = jnp.concatenate([x, x_prime], axis=0)  # (2N, H, W, C)

        # the layer must exist and be called once (readable errors from the plan); its
        # output shape tells the head which axes are locations and which are channels
        layer_shape = plan(model, variables, both, "zero").output_shape(layer)
        composite = bilrp_composite(model, variables, both) if self.composite is None else C.resolve(self.composite)

        feats, back = pullback(_LayerOutput(model, layer), variables, both, composite)  # (2N, D)
        g, m = self._head(tuple(layer_shape), feats.dtype)
        phi, g_vjp = jax.vjp(g, feats)  # (2N, M)
        scores = (phi[:n] * phi[n:]).sum(-1)

        rows, cols = patch_grid(height, width, self.patch)
        ph, pw = _patch_pair(self.patch)
        chunk = min(int(self.chunk), m)
        n_chunks = -(-m // chunk)

        def patch_sums(r: Array) -> Array:
            """(c, 2N, H, W, C) input relevance -> (c, 2N, P) relevance per patch."""
            r = r.sum(-1)
            r = jnp.pad(r, ((0, 0), (0, 0), (0, rows * ph - height), (0, cols * pw - width)))
            r = r.reshape(r.shape[:2] + (rows, ph, cols, pw)).sum((3, 5))
            return r.reshape(r.shape[:2] + (rows * cols,))

        def step(acc: Array, start: Array) -> tuple[Array, None]:
            onehot = jax.nn.one_hot(start + jnp.arange(chunk), m, dtype=phi.dtype)  # (c, M); 0 past M
            cot = jnp.broadcast_to(onehot[:, None, :], (chunk,) + phi.shape)  # (c, 2N, M)
            seeds = jax.vmap(lambda c: g_vjp(c)[0])(cot) * feats[None]  # (c, 2N, D): a * d phi_m / d a
            r = patch_sums(jax.vmap(back)(seeds))  # (c, 2N, P)
            return acc + jnp.einsum("cnp,cnq->npq", r[:, :n], r[:, n:]), None

        acc0 = jnp.zeros((n, rows * cols, rows * cols), x.dtype)
        relevance, _ = jax.lax.scan(step, acc0, jnp.arange(n_chunks) * chunk)
        return BiLRPResult(relevance.astype(x.dtype), scores.astype(x.dtype))


register("bilrp", BiLRP, "BiLRP: patch-pair relevance of a dot-product similarity (Eberle et al. 2020)")


# ---------------------------------------------------------------------------- plotting


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be an (H, W, 3) RGB or (H, W) grey image for display; got shape {a.shape}")
    if a.min() < 0.0 or a.max() > 1.0:  # e.g. a normalised image: rescale for display
        lo, hi = a.min(), a.max()
        a = (a - lo) / ((hi - lo) or 1.0)
    return a


def _centres(height: int, width: int, patch: tuple[int, int]) -> np.ndarray:
    """(P, 2) patch centres (x, y) in pixel coordinates (pixel centres at integers)."""
    ph, pw = patch
    rows, cols = patch_grid(height, width, patch)
    ys = [(r * ph + min((r + 1) * ph, height)) / 2 - 0.5 for r in range(rows)]
    xs = [(c * pw + min((c + 1) * pw, width)) / 2 - 0.5 for c in range(cols)]
    return np.array([(xx, yy) for yy in ys for xx in xs])


def plot_bilrp(
    image: np.ndarray,
    image_prime: np.ndarray,
    relevance: np.ndarray,
    patch: int | tuple[int, int] = 16,
    *,
    top_k: int = 50,
    gap: int | None = None,
    max_linewidth: float = 3.0,
    figsize: tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Draw two images side by side with lines between the patch centres of the top pairs.

    Args:
      image, image_prime: (H, W, 3) RGB (or (H, W) grey) images for display, values in
        [0, 1] (other ranges, e.g. normalised inputs, are min-max rescaled).
      relevance: (P, P') patch-pair relevance of this image pair (one sample of
        :attr:`BiLRPResult.relevance`; a leading axis of size 1 is accepted).
      patch: the patch size used to compute ``relevance``.
      top_k: number of pairs drawn, those with the largest ``|relevance|``.
      gap: pixels between the two images (default: 5% of the width).
      max_linewidth: line width of the strongest pair; width and opacity scale with
        ``|relevance| / max |relevance|``; red for positive, blue for negative relevance.
      figsize, dpi: figure size in inches and resolution (the PNG is figsize * dpi pixels).
      title: optional title (e.g. the similarity score).
      path: if given, the figure is also written there as PNG.

    Returns:
      The ``matplotlib.figure.Figure`` (Agg canvas; pyplot's state is not touched).

    Raises:
      ValueError: bad image shapes, or a relevance matrix that does not match the patch grids.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    a, b = _as_rgb(image, "image"), _as_rgb(image_prime, "image_prime")
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 3 and r.shape[0] == 1:
        r = r[0]
    ptch = _patch_pair(patch)
    pa, pb = _centres(*a.shape[:2], ptch), _centres(*b.shape[:2], ptch)
    if r.ndim != 2 or r.shape != (len(pa), len(pb)):
        raise ValueError(
            f"relevance must have shape (P, P') = ({len(pa)}, {len(pb)}) for images of sizes {a.shape[:2]} and "
            f"{b.shape[:2]} with patch {ptch}; got {r.shape}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    r = np.nan_to_num(r)

    h = max(a.shape[0], b.shape[0])
    g = int(round(0.05 * a.shape[1])) if gap is None else int(gap)
    if g < 0:
        raise ValueError(f"gap must be >= 0, got {gap!r}")
    canvas = np.ones((h, a.shape[1] + g + b.shape[1], 3))
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + g :] = b

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92 if title else 1.0))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)

    flat = r.ravel()
    k = min(int(top_k), flat.size)
    order = np.argsort(-np.abs(flat), kind="stable")[:k][::-1]  # strongest drawn last (on top)
    scale = np.abs(flat[order]).max() if k else 0.0
    if scale > 0:
        i, j = np.unravel_index(order, r.shape)
        start = pa[i]
        end = pb[j] + np.array([a.shape[1] + g, 0.0])
        w = np.abs(flat[order]) / scale
        colours = np.zeros((k, 4))
        colours[:, 0] = flat[order] > 0  # red
        colours[:, 2] = flat[order] <= 0  # blue
        colours[:, 3] = np.clip(0.15 + 0.85 * w, 0.0, 1.0)
        keep = w > 0
        lines = LineCollection(
            np.stack([start, end], axis=1)[keep], linewidths=(max_linewidth * w)[keep], colors=colours[keep]
        )
        ax.add_collection(lines)
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return fig
