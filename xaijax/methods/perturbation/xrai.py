"""XRAI (Kapishnikov et al., ICCV 2019, "XRAI: Better Attributions Through Regions").

XRAI turns a pixel attribution into a region attribution:

1. **Base attribution**: Integrated Gradients (xaijax's ``integrated-gradients``) from two
   baselines, a *black* and a *white* image, averaged over the two, and reduced over channels.
   As in the reference implementation (PAIR's ``saliency`` library, ``saliency/core/xrai.py``)
   black and white are the constant images at the input's own minimum and maximum,
   ``min(x_i)`` and ``max(x_i)`` over all pixels and channels of each image ``x_i`` in the
   model's (normalised) input space (for a torchvision-normalised photo: roughly the darkest
   and brightest normalised value of that photo, the same value in every channel). PAIR
   reduces the channels of the averaged IG with a plain ``max`` (not ``abs``); that is the
   default here (``channel_reduction="max"``; ``"sum"`` gives IG's completeness-preserving sum).
2. **Segments** (host side, scikit-image; :func:`xrai_segments`): each image is min-max scaled
   to PAIR's value range [-1, 1] (globally over pixels and channels), resized to 224 x 224
   (``skimage.transform.resize``, ``order=3``, ``mode="constant"``, anti-aliasing), segmented
   with ``skimage.segmentation.felzenszwalb`` at the scales (50, 100, 150, 250, 500, 1200),
   ``sigma=0.8``, ``min_size=150``; each label map is resized back to H x W with
   nearest-neighbour (``order=0``); every label ``l`` in ``min .. max`` of a map becomes a mask
   (scales in order, labels ascending) dilated with ``skimage.morphology.disk(5)``. Felzenszwalb
   is scale sensitive: the fixed [-1, 1] range and the fixed 224 x 224 size make the segments
   independent of the input size and of a global affine normalisation, exactly as PAIR does
   (a per-channel normalisation, e.g. torchvision's mean / std, still rescales the colour
   distances Felzenszwalb thresholds: give the segments of the [0, 1] image with
   ``segments=`` to make them identical).
3. **Greedy selection** (:func:`xrai_greedy`, on the device: a ``lax.while_loop`` per image,
   vmapped over the batch, over an (M, H, W) mask stack padded with empty masks): PAIR's
   ``_xrai`` ("full" algorithm). While the selected area fraction is ``<= area_threshold``:
   drop every remaining mask that adds fewer than ``min_pixel_diff`` new pixels; stop if none is
   left; pick the mask with the largest gain = mean base attribution over its not yet selected
   pixels (ties: the first in stack order); its new pixels get that gain. Pixels never selected
   get the mean base attribution over all of them (PAIR's completeness filler).

Host segmentation and traced inputs: called on a concrete ``x`` the segments are computed
directly (the mask stack padded to the batch's largest count). Under ``jax.jit``/``jax.vmap``
the same host function runs through ``jax.pure_callback`` (``vmap_method="sequential"``) and
the stack is padded to its static bound ``len(scales) * (A // min_size)`` masks (``A`` = the
segmentation area, 224 * 224 by default: felzenszwalb's post-processing leaves no component
smaller than ``min_size``), so the method is jittable and vmappable end to end; padding masks are
empty, never selected, and change nothing. That bound is generous (2004 masks for the defaults;
at 224 x 224 about 100 MB of bool masks plus 400 MB as float32 per image in the greedy loop,
whose steps cost O(M * H * W)); for large batches under jit compute the masks outside with
:func:`xrai_segments` (padded only to the batch's largest count, typically a few hundred) and
pass ``segments=``. Precomputed masks can be passed as the call keyword
``segments=`` ((N, M, H, W) bool, e.g. :func:`xrai_segments` of the images), which skips the
host step (no callback under jit).

PAIR vs the paper vs here: PAIR's defaults are ``steps=100`` IG steps per baseline,
``area_threshold=1.0``, ``min_pixel_diff=50``; PAIR's IG uses the nodes ``linspace(0, 1, steps)``
with weights ``1/steps`` (both end points, a rule xaijax does not offer); here the IG rule is
xaijax's (``riemann-right`` by default; pass ``rule=`` to change it), so the base attribution
matches PAIR's up to the quadrature error. Constant images (max == min) are segmented as all
zeros (PAIR divides by zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, check_inputs, validate_number, validate_positive_int
from xaijax.methods.gradient import IntegratedGradients
from xaijax.methods.registry import register

__all__ = ["XRAI", "xrai_segments", "xrai_greedy", "xrai_max_segments"]

#: PAIR's Felzenszwalb settings (``_FELZENSZWALB_*`` in ``saliency/core/xrai.py``)
PAIR_SCALES: tuple[int, ...] = (50, 100, 150, 250, 500, 1200)
PAIR_SIGMA = 0.8
PAIR_MIN_SIZE = 150
PAIR_RESIZE = 224
PAIR_VALUE_RANGE = (-1.0, 1.0)
CHANNEL_REDUCTIONS = ("max", "sum")


def xrai_max_segments(
    size: tuple[int, int],
    scales: Sequence[float] = PAIR_SCALES,
    min_size: int = PAIR_MIN_SIZE,
    resize: int | None = PAIR_RESIZE,
) -> int:
    """Static upper bound on the number of masks :func:`xrai_segments` makes for an H x W image.

    Felzenszwalb merges every component smaller than ``min_size`` into a neighbour, so one scale
    gives at most ``A // min_size`` labels (``A``: the segmented area, ``resize**2`` or H*W);
    the masks per scale are ``max - min + 1 <= A // min_size`` labels (at least 1).
    """
    area = resize * resize if resize else size[0] * size[1]
    return len(scales) * max(1, area // max(int(min_size), 1))


def _check_segment_args(scales: Sequence[float], sigma: float, min_size: int, resize: int | None, dilation_radius: int) -> None:
    if len(tuple(scales)) == 0 or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"xrai: scales must be a non-empty sequence of positive numbers, got {scales!r}")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"xrai: sigma must be a non-negative number, got {sigma!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"xrai: min_size must be a positive int, got {min_size!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < 1):
        raise ValueError(f"xrai: resize must be None or a positive int, got {resize!r}")
    if isinstance(dilation_radius, bool) or not isinstance(dilation_radius, (int, np.integer)) or dilation_radius < 0:
        raise ValueError(f"xrai: dilation_radius must be a non-negative int, got {dilation_radius!r}")


def _segments_numpy(
    x: np.ndarray,
    scales: Sequence[float],
    sigma: float,
    min_size: int,
    resize: int | None,
    dilation_radius: int,
    pad_to: int | None,
) -> np.ndarray:
    """The host computation behind :func:`xrai_segments` (concrete NumPy (N, H, W, C) input)."""
    from skimage.morphology import dilation, disk
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize as sk_resize

    x = np.asarray(x, np.float64)
    n, h, w = x.shape[:3]
    footprint = disk(int(dilation_radius)) if dilation_radius else None
    stacks = []
    for img in x:  # host-side preprocessing, once per image
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        img = img * (PAIR_VALUE_RANGE[1] - PAIR_VALUE_RANGE[0]) + PAIR_VALUE_RANGE[0]
        if resize:
            img = sk_resize(img, (resize, resize), order=3, mode="constant", preserve_range=True, anti_aliasing=True)
        masks = []
        for scale in scales:
            seg = felzenszwalb(img, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
            if resize:
                seg = sk_resize(seg, (h, w), order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)
            for label in range(seg.min(), seg.max() + 1):
                m = seg == label
                masks.append(dilation(m, footprint=footprint).astype(bool) if footprint is not None else m)
        stacks.append(np.stack(masks))
    m_max = max(len(s) for s in stacks)
    if pad_to is not None:
        if m_max > pad_to:
            raise RuntimeError(f"xrai: {m_max} segments exceed the static bound {pad_to} (xrai_max_segments)")
        m_max = pad_to
    out = np.zeros((n, m_max, h, w), bool)
    for i, s in enumerate(stacks):
        out[i, : len(s)] = s
    return out


def xrai_segments(
    images: Any,
    scales: Sequence[float] = PAIR_SCALES,
    sigma: float = PAIR_SIGMA,
    min_size: int = PAIR_MIN_SIZE,
    resize: int | None = PAIR_RESIZE,
    dilation_radius: int = 5,
    pad_to: int | None = None,
) -> jax.Array | np.ndarray:
    """(N, M, H, W) bool dilated Felzenszwalb segment masks of images (N, H, W, C), as PAIR's XRAI.

    See the module docstring for the exact steps (min-max to [-1, 1] per image, resize to
    ``resize`` x ``resize`` — ``None``: no resize — felzenszwalb per scale, nearest resize back,
    one mask per label, dilation by ``disk(dilation_radius)``, 0: none). Images with fewer masks
    are padded with empty masks to the batch's largest count, or to ``pad_to``.

    Concrete images: computed on the host, a NumPy array. Traced images (under jit/vmap): a
    ``jax.pure_callback`` padded to ``pad_to`` (default :func:`xrai_max_segments`).
    """
    _check_segment_args(scales, sigma, min_size, resize, dilation_radius)
    scales = tuple(float(s) for s in scales)
    if np.ndim(images) != 4:
        raise ValueError(f"xrai: images must be an NHWC batch (N, H, W, C); got shape {np.shape(images)}")
    if not isinstance(images, jax.core.Tracer):
        return _segments_numpy(np.asarray(images), scales, sigma, min_size, resize, dilation_radius, pad_to)
    n, h, w = images.shape[:3]
    bound = xrai_max_segments((h, w), scales, min_size, resize) if pad_to is None else int(pad_to)

    def host(xx: np.ndarray) -> np.ndarray:
        return _segments_numpy(np.asarray(xx), scales, sigma, min_size, resize, dilation_radius, bound)

    shape = jax.ShapeDtypeStruct((n, bound, h, w), jnp.bool_)
    return jax.pure_callback(host, shape, images, vmap_method="sequential")


def _greedy_one(attr: jax.Array, masks: jax.Array, area_threshold: float, min_pixel_diff: int) -> jax.Array:
    """PAIR's ``_xrai`` for one image: attr (P,), masks (M, P) bool -> (P,) region map."""
    m, p = masks.shape
    dtype = attr.dtype
    neg_inf = jnp.asarray(-jnp.inf, dtype)

    # PAIR's ``mean(current) <= area_perc_th`` in float64, as a static count bound (exact)
    c_max = min(max(int(np.floor(area_threshold * p)) + 1, 0), p)
    while c_max >= 0 and c_max / p > area_threshold:
        c_max -= 1

    def cond(state):
        current, _, _, _, done = state
        return (~done) & (jnp.sum(current) <= c_max)

    # one (M, P) @ (P, 2) product per step gives every mask's new-pixel count and attribution
    # sum (counts are exact integers in a >= float32 accumulator); no (M, P) temporary per step
    acc = jnp.promote_types(dtype, jnp.float32)
    masks_f = masks.astype(acc)

    def body(state):
        current, alive, out, assigned, _ = state
        free = ~current
        rhs = jnp.stack([jnp.where(free, attr, 0).astype(acc), free.astype(acc)], axis=1)
        sums, cnt = jnp.dot(masks_f, rhs, precision=jax.lax.Precision.HIGHEST).T
        alive = alive & (cnt >= min_pixel_diff)
        done = ~jnp.any(alive)
        gains = jnp.where(alive, (sums / jnp.maximum(cnt, 1)).astype(dtype), neg_inf)
        best = jnp.argmax(gains)  # first maximum, as PAIR's strict ``>`` over masks in order
        new = masks[best] & free & ~done
        out = jnp.where(new, gains[best], out)
        assigned = assigned | new
        current = jnp.where(done, current, current | masks[best])
        alive = alive & ((jnp.arange(m) != best) | done)
        return current, alive, out, assigned, done

    init = (jnp.zeros(p, bool), jnp.ones(m, bool), jnp.zeros(p, dtype), jnp.zeros(p, bool), jnp.asarray(False))
    _, _, out, assigned, _ = jax.lax.while_loop(cond, body, init)
    rest = ~assigned
    n_rest = rest.sum()
    filler = jnp.where(rest, attr, 0).sum() / jnp.maximum(n_rest, 1).astype(dtype)
    return jnp.where(assigned, out, filler)


def xrai_greedy(attr: Any, masks: Any, area_threshold: float = 1.0, min_pixel_diff: int = 50) -> jax.Array:
    """PAIR's greedy region selection (``XRAI._xrai``, "full") for a batch, on the device.

    Args:
      attr: (N, H, W) base attribution.
      masks: (N, M, H, W) bool segment masks (empty masks are padding: never selected).
      area_threshold: stop once the selected area fraction exceeds this (PAIR: 1.0, all).
      min_pixel_diff: masks adding fewer new pixels are dropped for good (PAIR: 50; >= 1).

    Returns:
      (N, H, W) map in ``attr``'s dtype: each pixel the gain (mean attribution over the pixels
      its mask newly added) at which it was selected; never selected pixels: their mean
      attribution.
    """
    attr = jnp.asarray(attr)
    masks = jnp.asarray(masks, bool)
    if attr.ndim != 3 or masks.ndim != 4 or masks.shape[0] != attr.shape[0] or masks.shape[2:] != attr.shape[1:]:
        raise ValueError(f"xrai: expected attr (N, H, W) and masks (N, M, H, W); got {attr.shape} and {masks.shape}")
    if isinstance(min_pixel_diff, bool) or not isinstance(min_pixel_diff, (int, np.integer)) or min_pixel_diff < 1:
        raise ValueError(f"xrai: min_pixel_diff must be a positive int, got {min_pixel_diff!r}")
    n, h, w = attr.shape
    flat_m = masks.reshape(n, masks.shape[1], h * w)
    out = jax.vmap(lambda a, mm: _greedy_one(a, mm, float(area_threshold), int(min_pixel_diff)))(attr.reshape(n, h * w), flat_m)
    return out.reshape(n, h, w)


@dataclasses.dataclass(frozen=True)
class XRAI(Method):
    """XRAI region attribution (Kapishnikov et al., ICCV 2019), after PAIR's ``saliency.core.XRAI``.

    ``method(model, variables, x, target, *, segments=None) -> (N, H, W)`` maps in ``x``'s
    dtype. See the module docstring for the three steps and their conventions.

    Attributes:
      steps: IG steps per baseline (PAIR: 100).
      rule: IG quadrature rule (xaijax's; default ``riemann-right``; PAIR: ``linspace(0, 1)``).
      chunk: IG nodes per batched gradient call (``None``: all at once).
      channel_reduction: ``"max"`` (PAIR: max over channels of the averaged IG) or ``"sum"``.
      area_threshold: selected area fraction at which the greedy loop stops (PAIR: 1.0).
      min_pixel_diff: masks adding fewer new pixels are dropped (PAIR: 50).
      scales: Felzenszwalb scales (PAIR: 50, 100, 150, 250, 500, 1200).
      sigma: Felzenszwalb smoothing (PAIR: 0.8).
      min_size: Felzenszwalb minimum component size (PAIR: 150).
      resize: side the image is resized to for segmentation (PAIR: 224; ``None``: no resize).
      dilation_radius: disk radius each mask is dilated by (PAIR: 5; 0: none).
    """

    steps: int = 100
    rule: str = "riemann-right"
    chunk: int | None = None
    channel_reduction: str = "max"
    area_threshold: float = 1.0
    min_pixel_diff: int = 50
    scales: tuple[float, ...] = PAIR_SCALES
    sigma: float = PAIR_SIGMA
    min_size: int = PAIR_MIN_SIZE
    resize: int | None = PAIR_RESIZE
    dilation_radius: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(self.scales))
        self._ig()  # validates steps, rule, chunk
        if self.channel_reduction not in CHANNEL_REDUCTIONS:
            raise ValueError(f"xrai: channel_reduction must be one of {CHANNEL_REDUCTIONS}, got {self.channel_reduction!r}")
        validate_number("xrai", "area_threshold", self.area_threshold, low=0.0, high=1.0)
        validate_positive_int("xrai", "min_pixel_diff", self.min_pixel_diff)
        _check_segment_args(self.scales, self.sigma, self.min_size, self.resize, self.dilation_radius)

    def _ig(self) -> IntegratedGradients:
        return IntegratedGradients(steps=self.steps, rule=self.rule, chunk=self.chunk)

    def base_attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) base attribution: IG from the black (``min x_i``) and white (``max x_i``)
        baselines, averaged, reduced over channels by ``channel_reduction``."""
        check_inputs(x)
        ig = self._ig()
        lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
        a = (ig.attribution(model, variables, x, target, lo) + ig.attribution(model, variables, x, target, hi)) / 2
        return a.max(-1) if self.channel_reduction == "max" else a.sum(-1)

    def segments(self, x: Any) -> jax.Array | np.ndarray:
        """(N, M, H, W) bool masks of ``x`` with this method's settings (:func:`xrai_segments`)."""
        return xrai_segments(x, self.scales, self.sigma, self.min_size, self.resize, self.dilation_radius)

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, segments: Any = None
    ) -> jax.Array:
        """(N, H, W) XRAI maps for ``x`` (N, H, W, C); ``segments``: optional (N, M, H, W) bool masks."""
        check_inputs(x)
        n, h, w = x.shape[:3]
        if segments is None:
            segments = self.segments(x)
        elif np.ndim(segments) != 4 or tuple(np.shape(segments))[:1] + tuple(np.shape(segments))[2:] != (n, h, w):
            raise ValueError(f"xrai: segments must be (N, M, H, W) = ({n}, M, {h}, {w}) bool masks; got shape {np.shape(segments)}")
        attr = self.base_attribution(model, variables, x, target)
        return xrai_greedy(attr, segments, self.area_threshold, self.min_pixel_diff).astype(x.dtype)


register("xrai", XRAI, "XRAI (Kapishnikov et al., ICCV 2019): Felzenszwalb regions ranked greedily by black/white-baseline IG density (PAIR saliency)")
