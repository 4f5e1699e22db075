"""Extremal Perturbation (Fong, Patrick and Vedaldi, ICCV 2019).

An extremal perturbation is a smooth mask ``m`` of fixed area ``a`` that maximises the
model's target score on the perturbed image ``x_m`` ("preserve": the image is kept where
``m = 1`` and blurred where ``m = 0``), or minimises it on the complement ("delete"), or
maximises the difference of the two ("dual"). The conventions and constants follow the
authors' implementation, TorchRay's ``torchray/attribution/extremal_perturbation.py``
(function ``extremal_perturbation`` and classes ``MaskGenerator`` / ``Perturbation``):

Mask parametrisation (``step = 7``, ``sigma = 21`` px, margin ``= sigma``). The parameters
are a coarse grid ``pm`` of ``ceil(H / step) x ceil(W / step)`` values in [0, 1], grid point
``i`` sitting at pixel ``step * i`` of the image. With ``P = 1 + ceil(2 sigma / step)`` (zero
padding of the grid) and ``R = 1 + ceil(sigma / step)`` (window radius), an output pixel
``u`` of the *full* mask (the image plus a margin of ``sigma`` px on every side, size
``step * (ceil(H / step) + 2P - 2R - 1) + 1`` per axis) sees the ``(2R + 1)^2`` grid points
``i = floor(u / step) + k - P``, ``k = 0 .. 2R``, with values ``v_i = pm_i * K(|u - margin -
step * i| / sigma)`` (``pm_i = 0`` outside the grid) and kernel ``K(z) = exp(-2 max(z - 1/2,
0)^2)``. The mask is their *smooth max* ``sum_i v_i softmax(20 v)_i`` (coldness 20), clamped
to [0, 1]; the image-sized mask is the full mask cropped at offset ``round(sigma)``.

Perturbation ("blur", ``max_blur = 20``, ``num_levels = 8``). A pyramid of ``L`` levels,
level ``l`` the image blurred by a Gaussian of standard deviation ``(1 - l / (L - 1)) *
max_blur`` (TorchRay's ``imsmooth``: separable, half-width ``ceil(4 sigma)``, normalised to
sum 1, zero padding), so level ``L - 1`` is the image itself. A mask value ``m`` picks level
``m (L - 1)`` with linear interpolation between the two nearest levels. "fade" uses
``x * l / (L - 1)`` as level ``l`` (i.e. the image scaled by the mask). Blurring happens in
the model's input space (normalised images), where zero padding is the dataset mean.

Objective and optimisation. Reward: the target logit ``y_t`` (``reward="simple"``, for a
float seed ``sum_k seed_k y_k``), or ``y_t - max_{c != t} y_c`` (``"contrastive"``, TorchRay's
``contrastive_reward``); negated for "delete"; for "dual" the preserve reward minus the
reward of the complementary perturbation. Area regulariser: the full mask's values are
sorted and compared with a reference vector that holds ``int(M (1 - a))`` zeros followed by
ones (``M`` = number of full-mask pixels): ``regul = -lambda_t * mean((sort(m) - ref)^2)``
with ``lambda_t = 300 * 1.0035^t`` at iteration ``t``. (The full mask has exact ties — pixels
with the same window pattern — and which tied pixel meets the reference's 0/1 step decides
where the gradient goes: ``jnp.sort`` is stable, i.e. ties are taken in row-major pixel order,
whereas TorchRay's ``torch.sort`` is not stable, so its tie order is unspecified.) The energy ``reward + regul`` is
maximised for ``max_iter = 800`` iterations of SGD with learning rate 0.01, momentum 0.9
and *dampening* 0.9 (PyTorch's SGD: the first step uses the raw gradient, later ones
``b = 0.9 b + 0.1 g``), starting from ``pm = 1``, and ``pm`` is clipped to [0, 1] after
every step. Jitter (default on): at even iterations the perturbed image is flipped
horizontally before it is given to the model. Default areas ``(0.1,)``; TorchRay's
pointing-game benchmark uses ``(0.025, 0.05, 0.1, 0.2)`` on VOC and ``(0.018, 0.025, 0.05,
0.1)`` on COCO, with ``smooth = 0.09``, and sums the masks over the areas.

In JAX: each SGD step is one jitted function; called on concrete arrays the method runs the
steps from a Python loop, and inside ``jit``/``vmap`` it runs them as one ``lax.scan`` (the
same step; the loop is up to 2x faster on XLA's CPU backend, which can run a network's
backward pass much slower inside a while loop). The mask generator and the perturbation are
``vmap``-ed over samples and areas, and all ``N x A`` (x2 for "dual")
perturbed images go through the model in one batch per iteration. Samples and areas are
independent problems (the energy is a sum of per-(sample, area) terms and the optimiser acts
elementwise), so running several areas at once gives the same masks as separate runs.
xaijax processes a batch of images (TorchRay: one image).

Output. :meth:`ExtremalPerturbation.masks` returns one mask per area, ``(N, A, H, W)``, as
TorchRay does; :meth:`ExtremalPerturbation.optimise` also returns the reward and
regulariser history; calling the method returns ``(N, H, W)``: the mask for a single area,
or for several areas their **sum** (``combine="sum"``, TorchRay's benchmark convention) or
mean (``combine="mean"``). ``smooth > 0`` blurs each mask with a Gaussian of standard
deviation ``smooth * min(H, W)`` (zero padding) before combining, as TorchRay's ``smooth``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, ClassVar, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from xaijax.methods._core import Method, as_seed, check_inputs
from xaijax.methods.registry import register
from xaijax.static_jit import bind_static

__all__ = [
    "ExtremalPerturbation",
    "ExtremalResult",
    "MaskGeometry",
    "blur_matrix",
    "extremal_mask",
    "mask_geometry",
    "perturbation_pyramid",
    "apply_perturbation",
    "torch_sgd",
]

_VARIANTS = ("preserve", "delete", "dual")
_PERTURBATIONS = ("blur", "fade")
_REWARDS = ("simple", "contrastive")
#: torch.finfo(torch.float32).eps, added to sqrt(2) sigma in TorchRay's Gaussian filter.
_EPS_F32 = 1.1920929e-07


# ----------------------------------------------------------------------------- masks


class MaskGeometry(NamedTuple):
    """Sizes of the smooth-mask generator for an image of ``shape = (H, W)``.

    ``shape_in``: parameter grid; ``shape_out``: full mask (image + margin);
    ``padding``/``radius``: grid padding and window radius (window ``2 radius + 1``);
    ``margin``: full-mask pixels on each side before the image; ``crop``: ``round(margin)``.
    """

    shape: tuple[int, int]
    step: int
    sigma: float
    margin: float
    padding: int
    radius: int
    shape_in: tuple[int, int]
    shape_out: tuple[int, int]
    crop: int


def mask_geometry(shape: tuple[int, int], step: int, sigma: float) -> MaskGeometry:
    """The generator's sizes (TorchRay's ``MaskGenerator`` with margin = sigma)."""
    step = int(step)
    sigma = float(sigma)
    if step < 1:
        raise ValueError(f"extremal-perturbation: step must be a positive int, got {step}")
    if not sigma > 0:
        raise ValueError(f"extremal-perturbation: sigma must be > 0, got {sigma}")
    margin = sigma
    padding = 1 + math.ceil((margin + sigma) / step)
    radius = 1 + math.ceil(sigma / step)
    shape_in = tuple(math.ceil(z / step) for z in shape)
    shape_mid = tuple(z + 2 * padding - (2 * radius + 1) + 1 for z in shape_in)
    shape_out = tuple(step * z - step + 1 for z in shape_mid)
    crop = round(margin)
    if any(o < crop + s for o, s in zip(shape_out, shape)):  # cannot happen with margin = sigma
        raise ValueError(f"extremal-perturbation: full mask {shape_out} does not contain the image {shape}")
    return MaskGeometry(tuple(shape), step, sigma, margin, padding, radius, shape_in, shape_out, crop)


def _window_weights(g: MaskGeometry) -> np.ndarray:
    """Kernel values ``K(|u - margin - step * i| / sigma)`` as ``(step, step, D * D)`` float64.

    Output pixel ``u = step * a + r`` (``0 <= r < step``) and window slot ``k`` read padded
    grid index ``a + k``, i.e. grid point ``i = a + k - P`` centred at ``margin + step * i``:
    the signed distance ``r - margin - step * (k - P)`` depends on ``r`` and ``k`` only, so
    one ``step x step`` tile of weights serves every grid cell.
    """
    d = 2 * g.radius + 1
    r, k = np.arange(g.step), np.arange(d)
    dist = r[:, None] - (g.margin + g.step * (k[None, :] - g.padding))  # (step, D)
    delta = np.sqrt(dist[:, None, :, None] ** 2 + dist[None, :, None, :] ** 2) / g.sigma  # (r, s, k, l)
    return np.exp(-2.0 * np.maximum(delta - 0.5, 0.0) ** 2).reshape(g.step, g.step, d * d)


def _slot_values(win: jax.Array, weight: jax.Array, j: jax.Array) -> jax.Array:
    """Window slot ``j``'s values ``v[a, r, b, s] = win[a, b, j] * weight[r, s, j]`` (mh, step, mw, step)."""
    wj = jax.lax.dynamic_index_in_dim(win, j, axis=-1, keepdims=False)
    kj = jax.lax.dynamic_index_in_dim(weight, j, axis=-1, keepdims=False)
    return wj[:, None, :, None] * kj[None, :, None, :]


def _softmax_shift(win: jax.Array) -> jax.Array:
    """Per grid cell ``max_j |win[a, b, j]|`` (mh, 1, mw, 1): bounds every ``|v|`` of the cell (weights <= 1)."""
    return jnp.abs(win).max(-1)[:, None, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _smooth_max(win: jax.Array, weight: jax.Array, coldness: float) -> jax.Array:
    """Smooth max ``sum_j v_j softmax(c v)_j`` over the ``J`` window slots.

    ``win`` (mh, mw, J) window of grid values per grid cell, ``weight`` (step, step, J):
    returns (mh, step, mw, step).

    The softmax is shifted by a per-cell bound of ``|v|`` (:func:`_softmax_shift`) instead of
    each pixel's own maximum; softmax does not depend on the shift. With parameters in
    [0, 1], as the optimisation keeps them, the exponents lie in ``[-c, 0]``; in general in
    ``[-2 c max|pm|, 0]``, within float32's range while that is above -87. The cell
    shift needs no reduction over the slots at every pixel. A per-pixel maximum makes XLA's
    CPU backend recompute the 81-way maximum inside each slot's fusion of the backward pass.

    The forward pass adds the slots one at a time in a ``fori_loop`` of elementwise ops
    (unrolled, it runs 2.5x faster but compiles 3x slower). The custom VJP,
    ``dv = g softmax(c v) (1 + c (v - f))``, builds the slot gradients in one fused pass and
    sums them over the ``step x step`` pixels of each cell as ``step^2`` strided slices.
    That keeps a reduction over non-minor axes out of the graph.
    On CPU, at 224 px, the mask's forward pass takes 16 ms (the per-pixel-max broadcast form
    took 113 ms), and its value and gradient 20 ms (74 ms).
    """
    return _smooth_max_fwd(win, weight, coldness)[0]


def _smooth_max_fwd(win, weight, coldness):
    shift = _softmax_shift(win)

    def add_slot(j, st):
        v = _slot_values(win, weight, j)
        e = jnp.exp(coldness * (v - shift))
        return st[0] + e, st[1] + v * e

    zero = jnp.zeros((win.shape[0], weight.shape[0], win.shape[1], weight.shape[1]), win.dtype)
    s, t = jax.lax.fori_loop(0, win.shape[-1], add_slot, (zero, zero))
    f = t / s
    return f, (win, weight, s, f)


def _smooth_max_bwd(coldness, res, g):
    win, weight, s, f = res
    v = win[:, None, :, None, :] * weight[None, :, None, :, :]  # (mh, step, mw, step, J)
    e = jnp.exp(coldness * (v - _softmax_shift(win)[..., None]))
    gv = (g / s)[..., None] * e * (1.0 + coldness * (v - f[..., None])) * weight[None, :, None, :, :]
    step_h, step_w = weight.shape[0], weight.shape[1]
    gwin = sum(gv[:, r, :, q, :] for r in range(step_h) for q in range(step_w))
    # the weights are constants of the mask geometry: no gradient flows to them
    return gwin, jnp.zeros_like(weight)


_smooth_max.defvjp(_smooth_max_fwd, _smooth_max_bwd)


def extremal_mask(pm: jax.Array, g: MaskGeometry, coldness: float = 20.0) -> tuple[jax.Array, jax.Array]:
    """Smooth mask from parameters ``pm`` (h_in, w_in): ``(cropped (H, W), full shape_out)``.

    See the module docstring; ``vmap`` over leading axes of ``pm`` for several masks. The
    ``(2R + 1)^2`` grid values each output pixel sees are read as shifted slices of the padded
    grid (one slice per window slot), broadcast over the ``step x step`` pixels of a grid cell
    and weighted by :func:`_window_weights`. Parameters are meant to lie in [0, 1] (the
    optimisation clips them there); at the default coldness 20 the smooth max is exact to
    rounding for ``|pm| <= 2`` (see :func:`_smooth_max`).
    """
    if tuple(pm.shape) != tuple(g.shape_in):
        raise ValueError(f"extremal mask parameters must have shape {g.shape_in}, got {pm.shape}")
    d, st = 2 * g.radius + 1, g.step
    ho, wo = g.shape_out
    mh, mw = -(-ho // st), -(-wo // st)  # grid cells that cover the full mask
    pm = jnp.asarray(pm)
    padded = jnp.pad(pm if jnp.issubdtype(pm.dtype, jnp.floating) else pm.astype(jnp.float32), g.padding)
    win = jnp.stack([padded[k : k + mh, l : l + mw] for k in range(d) for l in range(d)], axis=-1)  # (mh, mw, J)
    weight = jnp.asarray(_window_weights(g), padded.dtype)
    full = _smooth_max(win, weight, float(coldness)).reshape(mh * st, mw * st)[:ho, :wo]
    full = _clamp01(full)
    c = g.crop
    return full[c : c + g.shape[0], c : c + g.shape[1]], full


def _clamp01(v: jax.Array) -> jax.Array:
    """Clamp to [0, 1] with torch's gradient (passed where ``0 <= v <= 1``, ties included)."""
    return jnp.where(v < 0.0, 0.0, jnp.where(v > 1.0, 1.0, v))


# ----------------------------------------------------------------------------- perturbation


def blur_matrix(n: int, sigma: float, dtype: Any = np.float32) -> np.ndarray:
    """(n, n) matrix (``dtype``, float32 as TorchRay's) of TorchRay's 1-D Gaussian filter with zero padding.

    Taps ``f_i ∝ exp(-(i / (sqrt(2) sigma + eps))^2)``, ``i = -W .. W``, ``W = ceil(4 sigma)``,
    normalised to sum 1; row ``o`` holds the weights of inputs ``o - W .. o + W`` that lie in
    the image (``sigma = 0``: the identity).
    """
    sigma = float(sigma)
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    width = math.ceil(4 * sigma)
    i = np.arange(-width, width + 1, dtype=np.float64)
    f = np.exp(-((i / (math.sqrt(2.0) * sigma + _EPS_F32)) ** 2))
    f /= f.sum()
    m = np.zeros((n, n), np.float64)
    for o in range(n):
        lo, hi = max(0, o - width), min(n, o + width + 1)
        m[o, lo:hi] = f[lo - o + width : hi - o + width]
    return m.astype(dtype)


def perturbation_pyramid(x: jax.Array, kind: str = "blur", num_levels: int = 8, max_blur: float = 20.0) -> jax.Array:
    """(L, H, W, C) perturbation levels of one image ``x`` (H, W, C); level ``L - 1`` is ``x``."""
    if kind not in _PERTURBATIONS:
        raise ValueError(f"extremal-perturbation: perturbation must be one of {_PERTURBATIONS}, got {kind!r}")
    h, w = x.shape[0], x.shape[1]
    levels = []
    for lvl in range(num_levels):
        t = lvl / (num_levels - 1)
        if kind == "fade":
            levels.append(x * t)
        else:
            bh = jnp.asarray(blur_matrix(h, (1.0 - t) * max_blur, x.dtype))
            bw = jnp.asarray(blur_matrix(w, (1.0 - t) * max_blur, x.dtype))
            levels.append(jnp.einsum("hi,ijc,wj->hwc", bh, x, bw, precision=jax.lax.Precision.HIGHEST))
    return jnp.stack(levels).astype(x.dtype)


def apply_perturbation(pyramid: jax.Array, mask: jax.Array) -> jax.Array:
    """Perturbed image (H, W, C): mask (H, W) in [0, 1] indexes the pyramid (L, H, W, C) linearly.

    ``w = m (L - 1)``, ``k = floor(w)``: ``(1 - (w - k)) y_k + (w - k) y_{min(k + 1, L - 1)}``
    (gradient through ``w - k`` only, as in TorchRay).
    """
    n_levels = pyramid.shape[0]
    w = mask.astype(pyramid.dtype) * (n_levels - 1)
    k = jnp.clip(jnp.floor(w), 0, n_levels - 1)
    frac = (w - k)[..., None]
    ki = jax.lax.stop_gradient(k).astype(jnp.int32)
    y0 = jnp.take_along_axis(pyramid, ki[None, :, :, None], axis=0)[0]
    y1 = jnp.take_along_axis(pyramid, jnp.minimum(ki + 1, n_levels - 1)[None, :, :, None], axis=0)[0]
    return (1.0 - frac) * y0 + frac * y1


# ----------------------------------------------------------------------------- optimiser


def torch_sgd(learning_rate: float, momentum: float = 0.9, dampening: float = 0.9) -> optax.GradientTransformation:
    """PyTorch's SGD with momentum *and dampening* as an optax transformation (descent).

    ``b_1 = g_1``; ``b_t = momentum b_{t-1} + (1 - dampening) g_t``; update ``-lr b_t``.
    (optax's ``sgd``/``trace`` have no dampening.)
    """

    def init(params):
        return (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        del params
        buf, count = state
        buf = jax.tree_util.tree_map(
            lambda b, g: jnp.where(count == 0, g, momentum * b + (1.0 - dampening) * g), buf, grads
        )
        return jax.tree_util.tree_map(lambda b: -learning_rate * b, buf), (buf, count + 1)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- method


class ExtremalResult(NamedTuple):
    """Output of :meth:`ExtremalPerturbation.optimise`.

    ``masks`` (N, A, H, W) in the input's dtype (after ``smooth``), ``full_masks`` (N, A, H_out, W_out) the
    last iteration's masks with margin, ``reward`` and ``regul`` (T, N, A) per iteration
    (before the update of that iteration, as TorchRay's history).
    """

    masks: jax.Array
    full_masks: jax.Array
    reward: jax.Array
    regul: jax.Array


def _check_pos_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"extremal-perturbation: {name} must be an int >= {minimum}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ExtremalPerturbation(Method):
    """Extremal Perturbation (see the module docstring for the algorithm and its sources).

    Attributes:
      areas: target areas, fractions of the full mask in (0, 1); one mask per area.
      variant: ``"preserve"``, ``"delete"`` or ``"dual"``.
      perturbation: ``"blur"`` or ``"fade"``.
      max_iter: optimisation steps (TorchRay: 800).
      num_levels: perturbation pyramid levels (8).
      max_blur: standard deviation of the strongest blur in pixels (20).
      step: grid step of the mask parameters in pixels (7).
      sigma: mask smoothing radius in pixels (21); also the margin.
      jitter: flip the perturbed image horizontally at even iterations (True).
      reward: ``"simple"`` (target logit / seed-weighted logits) or ``"contrastive"``
        (target logit minus the largest other logit; class-index targets only).
      learning_rate, momentum, dampening: PyTorch-style SGD (0.01, 0.9, 0.9).
      regul_weight, regul_growth: area-loss weight 300, multiplied by 1.0035 per iteration.
      coldness: smooth-max temperature of the mask generator (20).
      smooth: blur the final masks with sigma ``smooth * min(H, W)`` (0: off).
      combine: how :meth:`__call__` merges several areas: ``"sum"`` or ``"mean"``.
      progress: show a tqdm bar over the SGD steps with the mean reward and area term
        (concrete inputs only: under ``jit``/``vmap`` the steps are one ``lax.scan`` and a
        warning says that no bar is shown). Not part of the configuration's equality or
        hash, so it never causes a recompile.

    ``runs_own_loop``: call this method on concrete arrays, not under ``jax.jit``; it jits
    its SGD step itself and runs it from a Python loop (see :func:`_optimise`).
    """

    runs_own_loop: ClassVar[bool] = True
    has_progress: ClassVar[bool] = True

    areas: tuple[float, ...] = (0.1,)
    variant: str = "preserve"
    perturbation: str = "blur"
    max_iter: int = 800
    num_levels: int = 8
    max_blur: float = 20.0
    step: int = 7
    sigma: float = 21.0
    jitter: bool = True
    reward: str = "simple"
    learning_rate: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    regul_weight: float = 300.0
    regul_growth: float = 1.0035
    coldness: float = 20.0
    smooth: float = 0.0
    combine: str = "sum"
    progress: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        areas = self.areas
        if isinstance(areas, (int, float, np.floating)) and not isinstance(areas, bool):
            object.__setattr__(self, "areas", (float(areas),))
        else:
            try:
                object.__setattr__(self, "areas", tuple(float(a) for a in areas))
            except (TypeError, ValueError):
                raise ValueError(f"extremal-perturbation: areas must be a float or a sequence of floats, got {areas!r}") from None
        if not self.areas:
            raise ValueError("extremal-perturbation: areas must not be empty")
        bad = [a for a in self.areas if not 0.0 < a < 1.0]
        if bad:
            raise ValueError(f"extremal-perturbation: every area must be in (0, 1), got {bad[0]!r}")
        if self.variant not in _VARIANTS:
            raise ValueError(f"extremal-perturbation: variant must be one of {_VARIANTS}, got {self.variant!r}")
        if self.perturbation not in _PERTURBATIONS:
            raise ValueError(f"extremal-perturbation: perturbation must be one of {_PERTURBATIONS}, got {self.perturbation!r}")
        if self.reward not in _REWARDS:
            raise ValueError(f"extremal-perturbation: reward must be one of {_REWARDS}, got {self.reward!r}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"extremal-perturbation: combine must be 'sum' or 'mean', got {self.combine!r}")
        _check_pos_int("max_iter", self.max_iter)
        _check_pos_int("num_levels", self.num_levels, 2)
        _check_pos_int("step", self.step)
        if not float(self.sigma) > 0:
            raise ValueError(f"extremal-perturbation: sigma must be > 0, got {self.sigma!r}")
        if not float(self.max_blur) > 0:
            raise ValueError(f"extremal-perturbation: max_blur must be > 0, got {self.max_blur!r}")
        if not float(self.learning_rate) > 0:
            raise ValueError(f"extremal-perturbation: learning_rate must be > 0, got {self.learning_rate!r}")
        if not float(self.smooth) >= 0:
            raise ValueError(f"extremal-perturbation: smooth must be >= 0, got {self.smooth!r}")

    # -- public API ---------------------------------------------------------------------

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) in ``x``'s dtype: the mask of the single area, or the sum/mean over ``areas``."""
        m = self.masks(model, variables, x, target)
        return m.sum(1) if self.combine == "sum" else m.mean(1)

    def masks(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, A, H, W) in ``x``'s dtype: one mask per sample and area (``A = len(areas)``)."""
        return self.optimise(model, variables, x, target).masks

    def optimise(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> ExtremalResult:
        """Run the optimisation; masks plus the energy history (:class:`ExtremalResult`)."""
        check_inputs(x)
        n, h, w, c = x.shape
        out_shape = jax.eval_shape(lambda xx: model.apply(variables, xx), x[:1])
        if len(out_shape.shape) != 2:
            raise ValueError(f"extremal-perturbation needs a model with (N, K) outputs; got output shape {out_shape.shape}")
        k = out_shape.shape[-1]
        t = jnp.asarray(target)
        if self.reward == "contrastive" and not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError("extremal-perturbation: reward='contrastive' needs class indices as target, not a float seed")
        seed = as_seed(t, k, n, x.dtype)  # (N, K); a float64 run optimises in float64
        mask_geometry((h, w), self.step, self.sigma)  # readable errors before tracing
        return _optimise(self, model, variables, x, seed)


def _traced(*trees: Any) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the call sits inside ``jit``/``vmap``/``grad``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _optimise(
    cfg: ExtremalPerturbation, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, seed: jax.Array
) -> ExtremalResult:
    """The optimisation: ``max_iter`` SGD steps of :func:`_step` between :func:`_start` and :func:`_finish`.

    Concrete inputs: a Python loop over one jitted step. Traced inputs (the caller jits or
    vmaps the method): one ``lax.scan`` inside the caller's trace. Both run the same step.
    The loop exists for speed: XLA's CPU backend can run a network's backward pass much
    slower inside a while loop. VGG16 at 224 px, batch 1, one area: 1.90 s per iteration in
    ``lax.scan``, 0.83 s from the loop (ResNet50: about 0.5 s either way). Dispatching a compiled
    step from Python costs microseconds.
    """
    if _traced(variables, x, seed):
        if cfg.progress:
            warnings.warn("extremal-perturbation: progress=True has no effect under jit/vmap (the SGD steps run "
                          "inside one lax.scan); call the method on concrete arrays to see the bar", stacklevel=4)
        return _optimise_scan(cfg, model, variables, x, seed)
    step = bind_static(_step, _step_jit, cfg, model)  # (a module with unhashable attributes: one compile per call)
    pyramids, carry = _start(cfg, x)
    history = []
    bar = tqdm(total=cfg.max_iter, desc="extremal perturbation", unit="step", disable=not cfg.progress)
    for it in range(cfg.max_iter):
        carry, energy = step(variables, pyramids, seed, carry, np.int32(it))
        history.append(energy)
        if cfg.progress:  # count finished steps, not dispatched ones
            reward, regul = jax.block_until_ready(energy)
            if it % 10 == 0 or it == cfg.max_iter - 1:
                bar.set_postfix(reward=f"{float(reward.mean()):.4g}", area=f"{float(regul.mean()):.4g}", refresh=False)
            bar.update()
    bar.close()
    rewards = jnp.stack([r for r, _ in history])
    reguls = jnp.stack([r for _, r in history])
    return _finish_jit(cfg, x.shape, carry[2], rewards, reguls)


def _optimise_scan(
    cfg: ExtremalPerturbation, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, seed: jax.Array
) -> ExtremalResult:
    pyramids, carry = _start(cfg, x)
    step = functools.partial(_step, cfg, model, variables, pyramids, seed)
    carry, (rewards, reguls) = jax.lax.scan(step, carry, jnp.arange(cfg.max_iter, dtype=jnp.int32))
    return _finish(cfg, x.shape, carry[2], rewards, reguls)


def _optimiser(cfg: ExtremalPerturbation) -> optax.GradientTransformation:
    return torch_sgd(float(cfg.learning_rate), float(cfg.momentum), float(cfg.dampening))


def _masks_of(cfg: ExtremalPerturbation, hw: tuple[int, int]):
    """Parameters (N, A, h_in, w_in) -> (cropped (N, A, H, W), full (N, A, Ho, Wo)) masks."""
    g = mask_geometry(hw, cfg.step, cfg.sigma)
    return jax.vmap(jax.vmap(lambda p: extremal_mask(p, g, float(cfg.coldness))))


@functools.partial(jax.jit, static_argnums=(0,))
def _start(cfg: ExtremalPerturbation, x: jax.Array) -> tuple[jax.Array, tuple]:
    """Perturbation pyramids (N, L, H, W, C) and the initial carry ``(pm, optimiser state, pm)``."""
    n, h, w, _ = x.shape
    g = mask_geometry((h, w), cfg.step, cfg.sigma)
    pyramids = jax.vmap(lambda xi: perturbation_pyramid(xi, cfg.perturbation, cfg.num_levels, cfg.max_blur))(x)
    pm0 = jnp.ones((n, len(cfg.areas)) + tuple(g.shape_in), x.dtype)
    return pyramids, (pm0, _optimiser(cfg).init(pm0), pm0)


def _step(
    cfg: ExtremalPerturbation,
    model: nn.Module,
    variables: Mapping[str, Any],
    pyramids: jax.Array,
    seed: jax.Array,
    carry: tuple,
    it: jax.Array,
) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
    """One SGD step on the energy: ``(pm, state, _) -> (pm', state', pm)`` and (reward, regul) (N, A)."""
    n, _, h, w, c = pyramids.shape
    k = seed.shape[-1]
    a = len(cfg.areas)
    make = _masks_of(cfg, (h, w))
    g = mask_geometry((h, w), cfg.step, cfg.sigma)
    m_full = g.shape_out[0] * g.shape_out[1]
    n_zero = np.array([int(m_full * (1.0 - ar)) for ar in cfg.areas], np.int32)  # TorchRay's reference
    dt = pyramids.dtype
    reference = jnp.asarray(np.arange(m_full)[None, :] >= n_zero[:, None], dt)  # (A, M)
    perturb = jax.vmap(jax.vmap(apply_perturbation, in_axes=(None, 0)), in_axes=(0, 0))  # (N,L..),(N,A,H,W)

    def score(out: jax.Array, s: jax.Array) -> jax.Array:  # out (N, A, K), s (N, 1, K)
        out = out.astype(dt)
        if cfg.reward == "contrastive":
            others = jnp.where(s > 0, -jnp.inf, out).max(-1)
            return (out * s).sum(-1) - others
        return (out * s).sum(-1)

    def energy(pm: jax.Array):
        crop, full = make(pm)  # (N, A, H, W), (N, A, Ho, Wo)
        if cfg.variant == "delete":
            imgs = perturb(pyramids, 1.0 - crop)
        elif cfg.variant == "preserve":
            imgs = perturb(pyramids, crop)
        else:
            imgs = jnp.concatenate([perturb(pyramids, crop), perturb(pyramids, 1.0 - crop)], axis=1)
        imgs = imgs.reshape((-1, h, w, c)).astype(pyramids.dtype)
        if cfg.jitter:
            imgs = jnp.where(it % 2 == 0, imgs[:, :, ::-1, :], imgs)
        out = model.apply(variables, imgs).reshape((n, -1, k))
        if cfg.variant == "dual":
            reward = score(out[:, :a], seed[:, None]) - score(out[:, a:], seed[:, None])
        else:
            reward = score(out, seed[:, None])
            if cfg.variant == "delete":
                reward = -reward
        lam = cfg.regul_weight * jnp.power(jnp.asarray(cfg.regul_growth, dt), it.astype(dt))
        srt = jnp.sort(full.reshape(n, a, m_full), axis=-1)
        regul = -lam * ((srt - reference[None]) ** 2).mean(-1)
        return -(reward + regul).sum(), (reward, regul)

    pm, state, _ = carry
    (_, (reward, regul)), grad = jax.value_and_grad(energy, has_aux=True)(pm)
    upd, state = _optimiser(cfg).update(grad, state, pm)
    new = jnp.clip(optax.apply_updates(pm, upd), 0.0, 1.0)
    return (new, state, pm), (reward, regul)


_step_jit = jax.jit(_step, static_argnums=(0, 1))


def _finish(
    cfg: ExtremalPerturbation, shape: tuple[int, ...], pm_last: jax.Array, rewards: jax.Array, reguls: jax.Array
) -> ExtremalResult:
    """Masks of the last iteration's parameters (as TorchRay: made before its update), smoothed."""
    _, h, w, _ = shape
    crop, full = jax.lax.stop_gradient(_masks_of(cfg, (h, w))(pm_last))
    if cfg.smooth > 0:
        s = float(cfg.smooth) * min(h, w)
        bh, bw = jnp.asarray(blur_matrix(h, s, crop.dtype)), jnp.asarray(blur_matrix(w, s, crop.dtype))
        crop = jnp.einsum("hi,naij,wj->nahw", bh, crop, bw, precision=jax.lax.Precision.HIGHEST)
    return ExtremalResult(crop, full, rewards, reguls)


_finish_jit = jax.jit(_finish, static_argnums=(0, 1))


def _extremal(areas: Any = (0.1,), **hparams: Any) -> ExtremalPerturbation:
    return ExtremalPerturbation(areas=areas, **hparams)


register(
    "extremal-perturbation",
    _extremal,
    "Extremal Perturbation (Fong et al. 2019): optimised smooth preserve-mask of fixed area, TorchRay constants",
)
