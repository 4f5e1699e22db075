"""Model-based faithfulness metrics: deletion / insertion (UCAG protocol) and MoRF region insertion.

All metrics take a **model function** ``model_fn(x) -> logits`` mapping a batch of images
*as the model consumes them* (NHWC float32, already normalised, e.g. ImageNet mean/std) to
logits (B, K), the images in that same space (N, H, W, C), maps (N, H, W) and target
classes (N,). Every perturbation step of one image is built inside a single jitted call and
all steps of that image go through the model as **one batch** (``lax.map`` over images,
``images_per_call`` images at a time). Pass ``classifier_fn(model, variables)`` (a
:class:`jax.tree_util.Partial`, so the weights are a traced argument rather than constants
baked into the compiled program) or any function; build it once and reuse it, since the
compiled program is cached per function.

Pixel order: pixels are taken in decreasing order of the map; ties are broken as
``flip(argsort(map, stable))`` orders them (the later pixel in row-major order first), the
reference's ``np.flip(np.argsort(...))`` with a stable sort.

Deletion / insertion (Petsiuk et al. 2018, as run by UCAG's ``insdel.py``, KU-HJH/UCAG):

* ``step_pixels`` pixels change per step; the reference uses ``int(input_size * 8)``, i.e.
  1792 for 224 x 224, so the default here is ``8 * W``. The number of steps is
  ``ceil(H * W / step_pixels)`` (28 at 224 px) and the curve has ``steps + 1`` points: the
  score of the untouched start image, then after every step (the last step may change fewer
  pixels);
* deletion starts from the image and replaces pixels by **zeros of the model's input
  space** (``torch.zeros_like`` of the *normalised* tensor in the reference, so in pixel
  space the ImageNet mean colour);
* insertion starts from a blurred copy and reveals the image's pixels; the blur is
  ``kornia.filters.gaussian_blur2d(x, (51, 51), (50., 50.))`` of the normalised tensor:
  a separable Gaussian, ``g(k) ~ exp(-k^2 / (2 sigma^2))`` for k = -25..25, normalised to
  sum 1, with kornia's default ``reflect`` border: :func:`xaijax.imageops.gaussian_blur`
  with ``(51, 50.0)`` (re-exported here; its own defaults are UCAG's ``(5, 3.0)``);
* the score is the softmax probability of the target class; the AUC is the trapezoid rule
  on the uniform grid [0, 1]: ``(sum(c) - c[0]/2 - c[-1]/2) / (len(c) - 1)``.

Region insertion, MoRF (the seed's "incremental MoRF insertion: starts from 1% to 20% of
total pixels in increments of 1%"): for f = 1%, ..., 20%, the ``round(f * H * W)`` most
relevant pixels of the image are placed on the baseline and the model's top-1 decision is
compared with the target (1 if correct, else 0). The seed does not say what the other
pixels are; xaijax uses the same baseline as deletion, zeros of the normalised input (the
dataset-mean colour), and offers the insertion blur as ``substrate="blur"``. The AUC is the
trapezoid rule with unit spacing between the 1 % steps, i.e. in accuracy x percentage
points (at most 19 for 20 steps), the scale of the seed's table (values 1.2 - 3.7);
``auc_norm`` divides by ``len(fractions) - 1`` to give [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import gaussian_blur, gaussian_kernel1d  # re-exported: the insertion substrate's blur

__all__ = [
    "ModelFn",
    "classifier_fn",
    "gaussian_kernel1d",
    "gaussian_blur",
    "saliency_rank",
    "default_step_pixels",
    "num_steps",
    "auc",
    "unit_auc",
    "causal_curves",
    "region_insertion_curves",
    "Deletion",
    "Insertion",
    "RegionInsertion",
    "MORF_FRACTIONS",
]

ModelFn = Callable[[jax.Array], jax.Array]

#: 1 %, 2 %, ..., 20 % of the pixels.
MORF_FRACTIONS: tuple[float, ...] = tuple(i / 100 for i in range(1, 21))


@dataclasses.dataclass(frozen=True)
class _Apply:
    """``model.apply(variables, x)`` as a hashable function of (variables, x)."""

    model: nn.Module

    def __call__(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x)


def classifier_fn(model: nn.Module, variables: Mapping[str, Any]) -> jax.tree_util.Partial:
    """``x -> model.apply(variables, x)`` with the variables as pytree leaves (not jit constants)."""
    return jax.tree_util.Partial(_Apply(model), variables)


def _as_partial(model_fn: ModelFn) -> jax.tree_util.Partial:
    if isinstance(model_fn, jax.tree_util.Partial):
        return model_fn
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable images -> logits; got {type(model_fn).__name__}")
    return jax.tree_util.Partial(model_fn)


# ----------------------------------------------------------------------------- order, AUC


def saliency_rank(maps: jax.Array) -> jax.Array:
    """(N, H, W) maps -> (N, H, W) int32 rank of each pixel, 0 for the most salient.

    Order: ``flip(argsort(map, stable))`` (ties: the later pixel in row-major order first).
    """
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got shape {maps.shape}")
    n, h, w = maps.shape

    def one(m):
        order = jnp.argsort(m.reshape(-1), stable=True)[::-1]
        return jnp.zeros(h * w, jnp.int32).at[order].set(jnp.arange(h * w, dtype=jnp.int32)).reshape(h, w)

    return jax.vmap(one)(maps)


def default_step_pixels(height: int, width: int) -> int:
    """UCAG's pixels per step, ``8 * width`` (1792 at 224 px)."""
    del height
    return 8 * int(width)


def num_steps(height: int, width: int, step_pixels: int) -> int:
    """``ceil(H * W / step_pixels)`` steps (28 for 224 x 224 at 1792)."""
    if step_pixels < 1:
        raise ValueError(f"step_pixels must be >= 1; got {step_pixels}")
    return -(-int(height) * int(width) // int(step_pixels))


def auc(curve: np.ndarray | jax.Array) -> np.ndarray:
    """Trapezoid AUC of curves sampled on a uniform grid over [0, 1]; last axis is the curve."""
    c = np.asarray(curve, np.float64)
    if c.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points; got {c.shape[-1]}")
    return (c.sum(-1) - c[..., 0] / 2 - c[..., -1] / 2) / (c.shape[-1] - 1)


def unit_auc(curve: np.ndarray | jax.Array) -> np.ndarray:
    """Trapezoid AUC with unit spacing between points (region insertion's scale)."""
    c = np.asarray(curve, np.float64)
    if c.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points; got {c.shape[-1]}")
    return c.sum(-1) - c[..., 0] / 2 - c[..., -1] / 2


# ----------------------------------------------------------------------------- core


def _check(images, maps, targets) -> tuple[jax.Array, jax.Array, jax.Array]:
    images = jnp.asarray(images)
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be a float NHWC batch (N, H, W, C) in the model's input space; got {images.shape} {images.dtype}")
    maps = jnp.asarray(maps, images.dtype)  # a float64 run stays float64 (also the ranking)
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must be (N, H, W) = {images.shape[:3]} to match images; got {maps.shape}")
    bad = ~np.isfinite(np.asarray(maps)).reshape(maps.shape[0], -1).all(axis=1)
    if bad.any():  # a NaN would be ranked first and perturbed silently
        raise ValueError(f"maps must be finite; map {int(np.flatnonzero(bad)[0])} contains NaN or inf")
    t = np.asarray(targets)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices; got dtype {t.dtype}")
    if t.ndim == 0:
        t = np.broadcast_to(t, (images.shape[0],))
    if t.shape != (images.shape[0],):
        raise ValueError(f"targets must be an int or an int array of shape ({images.shape[0]},); got {t.shape}")
    return images, maps, jnp.asarray(t, jnp.int32)


def _num_outputs(fn: jax.tree_util.Partial, images: jax.Array) -> int:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(f"model_fn must map (B, H, W, C) images to (B, K) logits; it returned shape {out.shape} for B=1")
    return int(out.shape[1])


def _check_targets(targets: jax.Array, k: int) -> None:
    t = np.asarray(targets)
    bad = t[(t < 0) | (t >= k)]
    if bad.size:
        raise ValueError(f"target class {int(bad[0])} is out of range for a model with {k} outputs")


@functools.partial(
    jax.jit, static_argnames=("counts", "reveal", "substrate", "kernel_size", "sigma", "score", "images_per_call")
)
def _perturbation_scores(
    fn: jax.tree_util.Partial,
    images: jax.Array,
    maps: jax.Array,
    targets: jax.Array,
    *,
    counts: tuple[int, ...],
    reveal: bool,
    substrate: str,
    kernel_size: int,
    sigma: float,
    score: str,
    images_per_call: int,
) -> jax.Array:
    """(N, len(counts)) scores; step s takes the ``counts[s]`` top-ranked pixels from
    the image (``reveal``) or from the substrate (not ``reveal``)."""
    cnt = jnp.asarray(counts, jnp.int32)

    def one(args):
        x, m, t = args
        rank = saliency_rank(m[None])[0]
        sub = jnp.zeros_like(x) if substrate == "zeros" else gaussian_blur(x[None], kernel_size, sigma)[0]
        top = (rank[None] < cnt[:, None, None])[..., None]  # (S, H, W, 1)
        xs = jnp.where(top, x[None], sub[None]) if reveal else jnp.where(top, sub[None], x[None])
        logits = fn(xs)  # one forward pass for all steps of this image
        if score == "probability":
            return jax.nn.softmax(logits.astype(x.dtype), axis=-1)[:, t]
        return (jnp.argmax(logits, axis=-1) == t).astype(x.dtype)

    return jax.lax.map(one, (images, maps, targets), batch_size=images_per_call)


_SUBSTRATES = ("zeros", "blur")


def causal_curves(
    model_fn: ModelFn,
    images: jax.Array,
    maps: jax.Array,
    targets: jax.Array | int,
    *,
    mode: str,
    step_pixels: int | None = None,
    substrate: str | None = None,
    kernel_size: int = 51,
    sigma: float = 50.0,
    images_per_call: int = 1,
) -> np.ndarray:
    """Deletion (``mode="deletion"``) or insertion (``"insertion"``) curves.

    Args:
      model_fn: images (B, H, W, C) in the model's input space -> logits (B, K).
      images: (N, H, W, C) float, normalised as the model expects (float64 images give a
        float64 computation: the maps' ranking, the blur and the softmax).
      maps: (N, H, W) saliency maps.
      targets: (N,) int target classes (or one int for all).
      mode: ``"deletion"`` or ``"insertion"``.
      step_pixels: pixels changed per step; default ``8 * W`` (1792 at 224 px).
      substrate: ``"zeros"`` (deletion's default) or ``"blur"`` (insertion's default).
      kernel_size, sigma: the blur (UCAG: 51, 50).
      images_per_call: images whose step batches share one model call.

    Returns:
      (N, steps + 1) float64 softmax probabilities of the target.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    substrate = substrate or ("zeros" if mode == "deletion" else "blur")
    if substrate not in _SUBSTRATES:
        raise ValueError(f"substrate must be one of {_SUBSTRATES}; got {substrate!r}")
    images, maps, targets = _check(images, maps, targets)
    _, h, w, _ = images.shape
    step = int(step_pixels) if step_pixels is not None else default_step_pixels(h, w)
    s = num_steps(h, w, step)
    counts = tuple(min(i * step, h * w) for i in range(s + 1))
    fn = _as_partial(model_fn)
    _check_targets(targets, _num_outputs(fn, images))
    out = _perturbation_scores(
        fn, images, maps, targets, counts=counts, reveal=(mode == "insertion"), substrate=substrate,
        kernel_size=int(kernel_size), sigma=float(sigma), score="probability", images_per_call=int(images_per_call),
    )
    return np.asarray(out, np.float64)


def region_insertion_curves(
    model_fn: ModelFn,
    images: jax.Array,
    maps: jax.Array,
    targets: jax.Array | int,
    *,
    fractions: Sequence[float] = MORF_FRACTIONS,
    substrate: str = "zeros",
    kernel_size: int = 51,
    sigma: float = 50.0,
    images_per_call: int = 1,
) -> np.ndarray:
    """MoRF region insertion: (N, len(fractions)) top-1 correctness (1.0 / 0.0).

    At fraction f the ``round(f * H * W)`` most relevant pixels are taken from the image and
    every other pixel from the substrate (zeros of the input space by default).
    """
    if substrate not in _SUBSTRATES:
        raise ValueError(f"substrate must be one of {_SUBSTRATES}; got {substrate!r}")
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr):
        raise ValueError(f"fractions must be a non-empty sequence of values in [0, 1]; got {fractions!r}")
    images, maps, targets = _check(images, maps, targets)
    _, h, w, _ = images.shape
    counts = tuple(int(math.floor(f * h * w + 0.5)) for f in fr)
    fn = _as_partial(model_fn)
    _check_targets(targets, _num_outputs(fn, images))
    out = _perturbation_scores(
        fn, images, maps, targets, counts=counts, reveal=True, substrate=substrate,
        kernel_size=int(kernel_size), sigma=float(sigma), score="correct", images_per_call=int(images_per_call),
    )
    return np.asarray(out, np.float64)


# ----------------------------------------------------------------------------- registry classes


def _mean(a: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    return float(a.mean()) if a.size else float("nan")


@dataclasses.dataclass(frozen=True)
class Deletion:
    """Deletion game (UCAG protocol): per image ``curve`` (N, steps+1) and ``auc`` (N,); lower is better."""

    step_pixels: int | None = None
    substrate: str = "zeros"
    kernel_size: int = 51
    sigma: float = 50.0
    images_per_call: int = 1

    mode = "deletion"

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        c = causal_curves(
            model_fn, images, maps, targets, mode=self.mode, step_pixels=self.step_pixels, substrate=self.substrate,
            kernel_size=self.kernel_size, sigma=self.sigma, images_per_call=self.images_per_call,
        )
        return {"curve": c, "auc": auc(c)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {f"{self.mode}_auc": _mean(values["auc"])}


@dataclasses.dataclass(frozen=True)
class Insertion(Deletion):
    """Insertion game (UCAG protocol): pixels revealed over the blurred image; higher is better."""

    substrate: str = "blur"

    mode = "insertion"


@dataclasses.dataclass(frozen=True)
class RegionInsertion:
    """MoRF region insertion 1..20 %: per image ``correct`` (N, F), ``auc`` (unit spacing) and ``auc_norm``."""

    fractions: tuple[float, ...] = MORF_FRACTIONS
    substrate: str = "zeros"
    kernel_size: int = 51
    sigma: float = 50.0
    images_per_call: int = 1

    def __call__(self, model_fn: ModelFn, images, maps, targets) -> dict[str, np.ndarray]:
        c = region_insertion_curves(
            model_fn, images, maps, targets, fractions=self.fractions, substrate=self.substrate,
            kernel_size=self.kernel_size, sigma=self.sigma, images_per_call=self.images_per_call,
        )
        a = unit_auc(c) if c.shape[-1] > 1 else c[..., 0]
        return {"correct": c, "auc": a, "auc_norm": a / max(c.shape[-1] - 1, 1)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"region_insertion_auc": _mean(values["auc"]), "region_insertion_auc_norm": _mean(values["auc_norm"])}
