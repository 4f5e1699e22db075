"""Perturbation methods: RISE (Petsiuk, Das and Saenko, BMVC 2018).

``rise``: the saliency of pixel ``(h, w)`` is the expected score of the target class over
random masks that keep that pixel,

    map(h, w) = sum_i score(x * M_i) * M_i(h, w) / (N * p),

with ``N`` masks ``M_i`` (values in [0, 1]) and keep-probability ``p``.

Masks, as in the authors' reference implementation (``eclique/RISE``, ``generate_masks``):

* a binary grid ``G`` of ``s x s`` cells, each cell kept (1) with probability ``p``;
* ``cell = ceil(H / s)`` (per spatial axis), the grid is upsampled *bilinearly* to
  ``(s + 1) * cell`` pixels with skimage's ``resize(order=1, mode="reflect")``
  convention: half-pixel centres (source coordinate ``(o + 0.5) * s / up - 0.5``) and
  mirror boundary (index -1 reads index 1, index s reads index s - 2);
* the upsampled mask is cropped to ``H x W`` at a random shift ``(dy, dx)``, each uniform
  in ``[0, cell)``.

Masking in normalised space: the masked input is ``x * M``. The model sees normalised
images, so a masked-out pixel becomes 0, i.e. the dataset's *mean colour* (not black, as
when the reference multiplies a [0, 1] image). The authors' PyTorch notebook also
multiplies the normalised tensor; TorchRay does the same.

Scores: ``score="prob"`` (default, the reference): softmax probability of the target class,
``sum_k seed_k softmax(out)_k`` for an explicit seed; ``score="logit"``: ``sum_k seed_k
out_k`` (the target logit); ``score="sigmoid"``: ``sum_k seed_k sigmoid(out_k)`` (TorchRay's
benchmark, for its multi-label VOC/COCO models); or a callable ``f(logits (..., K)) -> (..., K)``
whose output the seed weights. Normalisation: ``normalize="n-p"`` (default, the paper and the
authors' code) divides by ``N * p``; ``normalize="n"`` divides by ``N`` only (TorchRay).
TorchRay's score and normalisation are therefore ``RISE(score="sigmoid", normalize="n")``;
its masks differ (cells of ``ceil((H + ceil(H / s)) / s)`` px, torch's bilinear upsampling of
a reflect-padded grid; 8000 masks by default against 4000 here), so TorchRay's maps are
reproduced only with its masks given as ``masks=`` (below).

Given masks: ``method(model, variables, x, target, masks=M)`` uses the (N, H, W) array ``M``
instead of generated masks (``n`` is then ``M.shape[0]``; e.g. TorchRay's recorded
``filter_masks``), and ``mask_fn=f`` generates them with ``f(key, indices (m,), (H, W)) ->
(m, H, W)`` in place of :func:`rise_masks`. Everything is computed in the input's dtype (a
float64 run stays float64; generated masks are made in float32 and cast).

Randomness and memory: mask ``i`` is generated from ``fold_in(key(seed), i)`` *inside* the
jitted function, so a map depends only on ``seed``, the image size and the
hyperparameters — not on ``chunk``, the batch, or jit. Masks are made and applied in chunks
of ``chunk`` masks inside ``lax.scan``: memory is bounded by ``chunk * batch`` masked
images, never by ``N``. All samples of a batch share the same masks, and each sample's map
depends only on that sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xaijax.methods._core import Method, as_seed, check_inputs, validate_positive_int
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = ["RISE", "rise_cell_size", "rise_grid_and_shift", "rise_masks", "rise_upsample_matrix"]


def rise_cell_size(size: tuple[int, int], s: int) -> tuple[int, int]:
    """``(ceil(H / s), ceil(W / s))``: the size in pixels of one grid cell."""
    return int(math.ceil(size[0] / s)), int(math.ceil(size[1] / s))


def rise_upsample_matrix(s: int, up: int) -> np.ndarray:
    """Linear-interpolation matrix (up, s) of skimage ``resize(order=1, mode="reflect")``.

    Row ``o`` holds the weights of the ``s`` grid values for output pixel ``o``: source
    coordinate ``c = (o + 0.5) * s / up - 0.5``, neighbours ``floor(c)`` and
    ``floor(c) + 1`` with weights ``1 - t`` and ``t`` (``t = c - floor(c)``), indices
    outside ``[0, s)`` mirrored (``-1 -> 1``, ``s -> s - 2``).
    """
    if s < 2:
        raise ValueError(f"rise: s (grid cells per side) must be >= 2, got {s}")
    m = np.zeros((up, s), np.float64)
    for o in range(up):
        c = (o + 0.5) * s / up - 0.5
        i0 = math.floor(c)
        t = c - i0
        for idx, wgt in ((i0, 1.0 - t), (i0 + 1, t)):
            if idx < 0:
                idx = -idx
            elif idx > s - 1:
                idx = 2 * (s - 1) - idx
            m[o, idx] += wgt
    return m


def rise_grid_and_shift(
    key: jax.Array, index: jax.Array | int, s: int, p: float, cell: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Grid (s, s) of 0/1 float32 and shift (2,) int32 of mask ``index`` for ``key``.

    The mask's randomness is ``fold_in(key, index)``: independent of how masks are chunked.
    """
    k = jax.random.fold_in(key, index)
    kg, ks = jax.random.split(k)
    # explicit 32-bit draws: the same masks whether or not float64 (jax_enable_x64) is on
    grid = (jax.random.uniform(kg, (s, s), dtype=jnp.float32) < p).astype(jnp.float32)
    shift = jax.random.randint(ks, (2,), 0, jnp.asarray(cell, jnp.int32), dtype=jnp.int32)
    return grid, shift


def rise_masks(
    seed: int | jax.Array, indices: jax.Array, size: tuple[int, int], s: int = 7, p: float = 0.5
) -> jax.Array:
    """RISE masks number ``indices`` (M,) for images of ``size = (H, W)``: (M, H, W) float32.

    ``seed`` is an int or a JAX PRNG key. Mask ``i`` is the same whatever else is
    generated with it (see :func:`rise_grid_and_shift`).
    """
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    return _rise_masks(key, jnp.asarray(indices), (int(size[0]), int(size[1])), int(s), float(p))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _rise_masks(key: jax.Array, indices: jax.Array, size: tuple[int, int], s: int, p: float) -> jax.Array:
    h, w = size
    cell = rise_cell_size((h, w), s)
    uh = jnp.asarray(rise_upsample_matrix(s, (s + 1) * cell[0]), jnp.float32)  # (up_h, s)
    uw = jnp.asarray(rise_upsample_matrix(s, (s + 1) * cell[1]), jnp.float32)  # (up_w, s)

    def one(i):
        grid, shift = rise_grid_and_shift(key, i, s, p, cell)
        rh = jax.lax.dynamic_slice_in_dim(uh, shift[0], h, axis=0)  # rows of the crop
        rw = jax.lax.dynamic_slice_in_dim(uw, shift[1], w, axis=0)
        return jnp.einsum("ha,ab,wb->hw", rh, grid, rw, precision=jax.lax.Precision.HIGHEST)

    return jax.vmap(one)(indices)


_SCORES = ("prob", "logit", "sigmoid")
_NORMALIZE = ("n-p", "n")


_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "prob": lambda z: jax.nn.softmax(z, axis=-1),
    "sigmoid": jax.nn.sigmoid,
    "logit": lambda z: z,
}


def _scores(out: jax.Array, seed: jax.Array, how: str | Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Score per row of ``out`` (..., K) against ``seed`` (..., K)."""
    transform = how if callable(how) else _TRANSFORMS[how]
    return (transform(out) * seed).sum(-1)


@dataclasses.dataclass(frozen=True)
class RISE(Method):
    """RISE saliency (see the module docstring for the exact masks and conventions).

    Attributes:
      n: number of masks N (>= 1).
      s: grid cells per side (>= 2).
      p: keep-probability of a cell, in (0, 1].
      score: ``"prob"`` (softmax probability of the target), ``"logit"``, ``"sigmoid"``
        (TorchRay) or a callable ``logits (..., K) -> scores (..., K)``.
      normalize: ``"n-p"`` (divide by ``N * p``, the paper) or ``"n"`` (by ``N``, TorchRay).
      seed: PRNG seed of the masks.
      chunk: masks generated and applied per ``lax.scan`` step (memory ~ chunk x batch
        masked images).
      mask_fn: ``None`` (:func:`rise_masks`) or a generator ``f(key, indices (m,), (H, W)) ->
        (m, H, W)`` of masks with values in [0, 1].
      progress: show a tqdm bar over the masks (concrete inputs only: under ``jit``/``vmap`` the
        chunks are one ``lax.scan`` and a warning says that no bar is shown). Not part of the
        configuration's equality or hash, so it never causes a recompile.

    ``runs_own_loop``: called on concrete arrays, the method jits its chunk step itself and
    runs it from a Python loop (the same step a jitted call scans over).
    """

    runs_own_loop: ClassVar[bool] = True
    has_progress: ClassVar[bool] = True

    n: int = 4000
    s: int = 7
    p: float = 0.5
    score: str | Callable[[jax.Array], jax.Array] = "prob"
    seed: int = 0
    chunk: int = 100
    normalize: str = "n-p"
    mask_fn: Callable[..., jax.Array] | None = None
    progress: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        validate_positive_int("rise", "n", self.n)
        validate_positive_int("rise", "chunk", self.chunk)
        if isinstance(self.s, bool) or not isinstance(self.s, int) or self.s < 2:
            raise ValueError(f"rise: s (grid cells per side) must be an int >= 2, got {self.s!r}")
        if not 0.0 < float(self.p) <= 1.0:
            raise ValueError(f"rise: p (keep probability) must be in (0, 1], got {self.p!r}")
        if not callable(self.score) and self.score not in _SCORES:
            raise ValueError(f"rise: score must be one of {_SCORES} or a callable, got {self.score!r}")
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"rise: normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise TypeError(f"rise: mask_fn must be None or a callable (key, indices, (H, W)) -> masks, got {self.mask_fn!r}")

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, masks: Any = None
    ) -> jax.Array:
        """(B, H, W) saliency for ``x`` (B, H, W, C); ``masks``: optional given masks (N, H, W).

        Concrete inputs: the mask chunks run from a Python loop over one jitted step (with a
        progress bar when ``progress``); traced inputs (the caller jits or vmaps the method):
        the same step in one ``lax.scan``."""
        check_inputs(x)
        b, h, w, c = x.shape
        out_shape = jax.eval_shape(lambda xx: model.apply(variables, xx), x[:1])
        k = out_shape.shape[-1]
        seed = as_seed(target, k, b, x.dtype)  # (B, K)
        if masks is not None:
            given = jnp.asarray(masks)
            if given.ndim != 3 or tuple(given.shape[1:]) != (h, w) or given.shape[0] < 1:
                raise ValueError(f"rise: masks must have shape (N, {h}, {w}) with N >= 1; got {tuple(given.shape)}")
            n = int(given.shape[0])
        else:
            given, n = None, self.n
        key = jax.random.key(self.seed)
        chunk = min(self.chunk, n)
        n_chunks = -(-n // chunk)
        if given is not None and n_chunks * chunk != n:  # pad with empty masks (scored 0 below)
            given = jnp.concatenate([given, jnp.zeros((n_chunks * chunk - n, h, w), given.dtype)])
        acc = jnp.zeros((b, h, w), x.dtype)
        if _traced(variables, x, seed, given):
            if self.progress:
                warnings.warn("rise: progress=True has no effect under jit/vmap (the mask chunks run inside one "
                              "lax.scan); call the method on concrete arrays to see the bar", stacklevel=2)
            step = functools.partial(_rise_step, self, model, chunk, n)
            sal, _ = jax.lax.scan(lambda a, ci: (step(a, variables, x, seed, key, given, ci), None), acc, jnp.arange(n_chunks))
        else:
            step = bind_static(_rise_step, _rise_step_jit, self, model, chunk, n)
            bar = tqdm(total=n, desc="rise", unit="mask", disable=not self.progress)
            for ci in range(n_chunks):
                acc = step(acc, variables, x, seed, key, given, np.int32(ci))
                if self.progress:  # count finished chunks, not dispatched ones
                    jax.block_until_ready(acc)
                    bar.update(min(chunk, n - ci * chunk))
            bar.close()
            sal = acc
        return sal / (n * float(self.p) if self.normalize == "n-p" else n)


def _traced(*trees: Any) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the call sits inside ``jit``/``vmap``/``grad``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _rise_step(cfg: RISE, model: nn.Module, chunk: int, n: int, acc, variables, x, seed, key, given, ci):
    """``acc`` plus the score-weighted masks of chunk ``ci`` (masks ``ci * chunk ...``; those
    past ``n`` score 0)."""
    b, h, w, c = x.shape
    k = seed.shape[-1]
    idx = ci * chunk + jnp.arange(chunk)
    if given is not None:
        m = jax.lax.dynamic_slice_in_dim(given, ci * chunk, chunk)
    elif cfg.mask_fn is not None:
        m = jnp.asarray(cfg.mask_fn(key, idx, (h, w)))
    else:
        m = rise_masks(key, idx, (h, w), cfg.s, cfg.p)
    m = m.astype(x.dtype)  # (m, H, W)
    xm = (x[None] * m[:, None, :, :, None]).reshape((chunk * b, h, w, c))
    out = model.apply(variables, xm).reshape((chunk, b, k)).astype(x.dtype)
    sc = _scores(out, seed[None], cfg.score)  # (m, B)
    sc = jnp.where((idx < n)[:, None], sc, 0.0)
    return acc + jnp.einsum("mb,mhw->bhw", sc, m, precision=jax.lax.Precision.HIGHEST)


_rise_step_jit = jax.jit(_rise_step, static_argnums=(0, 1, 2, 3))


register(
    "rise",
    RISE,
    "RISE (Petsiuk et al. 2018): random-mask sampling, mean target probability per pixel",
)
