"""Natural pre-images: activation maximisation and representation inversion.

Mahendran & Vedaldi, "Visualizing deep convolutional neural networks using natural
pre-images", IJCV 120 (2016); constants from the paper and the authors' MatConvNet code
(``aravindhm/nnpreimage``: ``core/get_defaults.m``, ``core/nnpreimage.m``,
``layers/tv.m``, ``layers/l2.m``). A pre-image is found by minimising the energy

    E(x) = C * l(phi(x), phi0) + lambda_alpha * R_alpha(x) + lambda_TV * R_TV^beta(x)
    subject to  ||x(u, v)|| <= B_plus  for every pixel (u, v)

over an image ``x`` in the model's *normalised* input space (NHWC, float32), where

* ``phi`` is the output of one named layer (:mod:`xaijax.models.taps` names, e.g.
  ``features.28``) or the model output (class logits) when ``layer is None``;
* **inversion**: ``l = ||phi(x) - phi0||^2 / ||phi0||^2`` with ``phi0 = phi(x0)`` of a given
  image (the paper's normalised reconstruction error);
* **activation maximisation**: ``l = -<phi(x), e> / Z`` where ``e`` selects a class logit,
  the spatial mean of channel ``c`` ("channel") or one unit ``(c, i, j)`` ("unit"), and ``Z``
  is a normalisation constant (the paper uses the maximum activation of the layer on natural
  images; see :attr:`PreImage.scale`);
* ``R_alpha(x) = 1 / (H W B^alpha) * sum_uv ||x(u, v)||^alpha`` — the alpha-norm of the
  colour vectors (paper: alpha = 6);
* ``R_TV^beta(x) = 1 / (H W V^beta) * sum_uvk ((x(u, v+1, k) - x(u, v, k))^2 +
  (x(u+1, v, k) - x(u, v, k))^2)^(beta / 2)`` with ``V = B / 6.5`` (paper: beta = 2; the
  last row/column is replicated, so its differences are zero, as in ``tv.m``);
* ``B`` is the typical norm of a pixel's colour vector of a mean-subtracted natural image
  (paper: B = 80 on the 0..255 scale), ``B_plus = 2 B`` (paper's ``x0_max = 160``) bounds
  each pixel's colour norm ("bounded range"), enforced by projection after every step.

**Jitter**: the image lives on a canvas ``T`` pixels larger than the input in each
direction; every step the network sees a crop at a random offset in ``{0..T}`` (the paper's
random translation; its default ``T + 1 = max(round(stride / 4), 1)`` with ``stride`` the
layer's total stride). The regularisers and the bound apply to the whole canvas; the result
is the central crop.

**Units of this implementation.** xaijax models take normalised inputs, so ``B`` must be
given in those units: :func:`paper_B` converts the paper's 80 (0..255 scale) for a
preprocessing convention (torchvision: ``80 / (255 * 0.226) = 1.388``, the mean ImageNet std
0.226; caffe: 80; none: ``80 / 255``).

**Batching.** Many units (or images to invert) are optimised at once: every run is a
``lax.scan`` over the steps, ``vmap``-ed over the units, in one ``jax.jit``. Every run uses the
*same* key (same initial noise, same jitter offsets), so a unit's result does not depend on
which other units are in the batch: the vmapped run equals one run per unit.

**Optimiser** (deliberate difference from the paper, whose code uses a momentum/AdaGrad
hybrid with a hand-scaled learning rate): optax, by default SGD with momentum 0.9 (as in the
paper) on the gradient divided by its global norm, with a cosine-decayed step of
``learning_rate * B * sqrt(H W)`` (image-norm units). Normalising by the *global* norm keeps
the direction of the gradient, so projected steps converge to the constrained optimum, and
makes the step independent of the scale of the objective; ``optimizer="adam"`` is offered for
comparison (per-coordinate normalisation biases the bounded optimum towards sign patterns).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xaijax.models import taps

__all__ = [
    "PreImage",
    "PreImageResult",
    "alpha_norm",
    "total_variation",
    "project_pixel_norm",
    "paper_B",
    "layer_shapes",
    "maximize",
    "invert",
]

#: The paper's B (typical colour-vector norm of a mean-subtracted pixel) on the 0..255 scale.
PAPER_B_255 = 80.0
#: The paper's TV scale: V = B / 6.5.
PAPER_V_DIVISOR = 6.5
#: Mean of the ImageNet per-channel standard deviations (0.229, 0.224, 0.225).
_IMAGENET_STD_MEAN = (0.229 + 0.224 + 0.225) / 3

Kind = Literal["channel", "unit"]


def paper_B(convention: str = "torchvision") -> float:
    """The paper's B = 80 (0..255 scale) in the units of a preprocessing convention.

    ``"torchvision"``: ``80 / (255 * 0.226) = 1.388`` (inputs divided by the ImageNet std);
    ``"caffe"``: 80 (0..255 minus the mean); ``"none"``: ``80 / 255`` (RGB in [0, 1]).
    """
    if convention == "torchvision":
        return PAPER_B_255 / (255.0 * _IMAGENET_STD_MEAN)
    if convention == "caffe":
        return PAPER_B_255
    if convention == "none":
        return PAPER_B_255 / 255.0
    raise ValueError(f"unknown preprocessing convention {convention!r}; use 'torchvision', 'caffe' or 'none'")


# ---------------------------------------------------------------------------------------
#                                                                           Regularisers
# ---------------------------------------------------------------------------------------


def _safe_pow(s: jax.Array, p: float) -> jax.Array:
    """``s ** p`` for ``s >= 0`` with value 0 and gradient 0 at ``s == 0`` (no NaN for p < 1)."""
    pos = s > 0
    return jnp.where(pos, jnp.where(pos, s, 1.0) ** p, 0.0)


def alpha_norm(x: jax.Array, alpha: float = 6.0, B: float = 1.0) -> jax.Array:
    """The paper's normalised alpha-norm ``R_alpha(x) = sum_uv ||x(u,v)||^alpha / (H W B^alpha)``.

    Args:
      x: images (N, H, W, K) (NHWC; ``||x(u,v)||`` is the Euclidean norm over the K channels).
      alpha: the exponent (paper: 6).
      B: the typical pixel norm (see :func:`paper_B`).

    Returns:
      (N,) float: one value per image.
    """
    x = jnp.asarray(x)
    h, w = x.shape[-3], x.shape[-2]
    sq = jnp.sum(x * x, axis=-1)  # (N, H, W)
    return jnp.sum(_safe_pow(sq, alpha / 2.0), axis=(-2, -1)) / (h * w * B**alpha)


def total_variation(x: jax.Array, beta: float = 2.0, V: float = 1.0) -> jax.Array:
    """The paper's ``R_TV^beta(x) = sum_uvk (dx^2 + dy^2)^(beta/2) / (H W V^beta)``.

    ``dx = x(u, v+1, k) - x(u, v, k)`` and ``dy = x(u+1, v, k) - x(u, v, k)``, with the
    last column/row replicated (its differences are 0), as in the authors' ``tv.m``.

    Args:
      x: images (N, H, W, K).
      beta: the exponent (paper: 2; beta = 1 is the classical isotropic TV).
      V: the scale (paper: ``V = B / 6.5``).

    Returns:
      (N,) float.
    """
    x = jnp.asarray(x)
    h, w = x.shape[-3], x.shape[-2]
    dx = jnp.concatenate([x[..., :, 1:, :] - x[..., :, :-1, :], jnp.zeros_like(x[..., :, :1, :])], axis=-2)
    dy = jnp.concatenate([x[..., 1:, :, :] - x[..., :-1, :, :], jnp.zeros_like(x[..., :1, :, :])], axis=-3)
    v = _safe_pow(dx * dx + dy * dy, beta / 2.0)
    return jnp.sum(v, axis=(-3, -2, -1)) / (h * w * V**beta)


def project_pixel_norm(x: jax.Array, bound: float) -> jax.Array:
    """Scale every pixel's colour vector (last axis) so that its norm is at most ``bound``.

    The Euclidean projection onto the paper's bounded-range set ``||x(u,v)|| <= B_plus``.
    """
    n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x * jnp.minimum(1.0, bound / jnp.maximum(n, 1e-30))


# ---------------------------------------------------------------------------------------
#                                                                          Configuration
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreImage:
    """Hyperparameters of a pre-image search (hashable: a static argument of ``jax.jit``).

    Attributes:
      steps: optimisation steps (the paper: 300, plus 50 at a tenth of the rate for inversion).
      learning_rate: initial step, in units of the image norm ``B * sqrt(H W)`` (SGD) or of
        ``B`` per coordinate (Adam); decayed to 0 by a cosine schedule.
      optimizer: ``"sgd"`` (momentum 0.9 on the globally normalised gradient) or ``"adam"``.
      momentum: SGD momentum (paper: 0.9).
      C: weight of the data term (paper: 1 for maximisation; 1, 20, 100 or 300 for
        inversion, more for deeper, less invertible layers).
      scale: ``Z`` of the maximisation loss ``-<phi(x), e> / Z``. ``None``: the largest
        ``|activation|`` of the layer on the initial noise image (the paper uses the largest
        activation on natural training images, times a receptive-field factor; pass that
        number here to follow it).
      alpha: exponent of the alpha-norm (paper: 6).
      lambda_alpha: weight of ``R_alpha`` (paper: 1 with its normalisation; 0 disables).
      beta: exponent of the TV regulariser (paper: 2).
      lambda_tv: weight of ``R_TV`` (paper: 1; 0 disables).
      B: typical pixel norm in normalised units (default: :func:`paper_B` for torchvision).
      B_plus: bound on every pixel's colour norm; ``None`` means ``2 B`` (paper's 160 for
        B = 80); ``math.inf`` disables the constraint.
      box: optional per-channel ``((lo_r, lo_g, lo_b), (hi_r, hi_g, hi_b))`` clip after every
        step, e.g. the normalised image of RGB [0, 1] (see :func:`valid_box`).
      jitter: largest random translation ``T`` in pixels; ``None``: the paper's rule
        ``max(round(stride / 4), 1) - 1``.
      init_scale: amplitude of the initial uniform noise as a fraction of ``B / sqrt(3)``
        per channel (the paper's code: 1/0.9 of it, i.e. its 95th percentile = ``B/sqrt(3)``);
        0 starts from the zero (mean) image.
    """

    steps: int = 200
    learning_rate: float = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    C: float = 1.0
    scale: float | None = None
    alpha: float = 6.0
    lambda_alpha: float = 1.0
    beta: float = 2.0
    lambda_tv: float = 1.0
    B: float = PAPER_B_255 / (255.0 * _IMAGENET_STD_MEAN)
    B_plus: float | None = None
    box: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    jitter: int | None = None
    init_scale: float = 1.0 / 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer; got {self.steps!r}")
        for name in ("learning_rate", "C", "lambda_alpha", "lambda_tv", "init_scale"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        if self.learning_rate == 0:
            raise ValueError("learning_rate must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'sgd' or 'adam'")
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"alpha and beta must be > 0; got alpha={self.alpha!r}, beta={self.beta!r}")
        if not self.B > 0:
            raise ValueError(f"B must be > 0; got {self.B!r}")
        if self.B_plus is not None and not self.B_plus > 0:
            raise ValueError(f"B_plus must be > 0 (or None for 2 B); got {self.B_plus!r}")
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (or None); got {self.scale!r}")
        if self.jitter is not None and (not isinstance(self.jitter, (int, np.integer)) or self.jitter < 0):
            raise ValueError(f"jitter must be an integer >= 0 (or None); got {self.jitter!r}")
        if self.box is not None:
            lo, hi = (tuple(float(v) for v in b) for b in self.box)
            if len(lo) != 3 or len(hi) != 3 or any(a >= b for a, b in zip(lo, hi)):
                raise ValueError(f"box must be ((lo_r, lo_g, lo_b), (hi_r, hi_g, hi_b)) with lo < hi; got {self.box!r}")
            object.__setattr__(self, "box", (lo, hi))

    @property
    def V(self) -> float:
        """The paper's TV scale ``V = B / 6.5``."""
        return self.B / PAPER_V_DIVISOR

    @property
    def bound(self) -> float:
        """The pixel-norm bound actually used (``2 B`` when ``B_plus`` is None)."""
        return 2.0 * self.B if self.B_plus is None else float(self.B_plus)

    def regularizer(self, x: jax.Array) -> jax.Array:
        """``lambda_alpha R_alpha(x) + lambda_tv R_TV(x)`` for images (N, H, W, K) -> (N,)."""
        r = jnp.zeros(x.shape[:-3], x.dtype)
        if self.lambda_alpha:
            r = r + self.lambda_alpha * alpha_norm(x, self.alpha, self.B)
        if self.lambda_tv:
            r = r + self.lambda_tv * total_variation(x, self.beta, self.V)
        return r

    def constrain(self, x: jax.Array) -> jax.Array:
        """Project onto the feasible set: pixel norm <= :attr:`bound`, then the optional box."""
        if math.isfinite(self.bound):
            x = project_pixel_norm(x, self.bound)
        if self.box is not None:
            x = jnp.clip(x, jnp.asarray(self.box[0], x.dtype), jnp.asarray(self.box[1], x.dtype))
        return x


def valid_box(convention: str = "torchvision") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel bounds of a normalised RGB image in [0, 1], for :attr:`PreImage.box`."""
    from xaijax.models.preprocess import normalize

    lo = np.asarray(normalize(jnp.zeros(3), convention))  # type: ignore[arg-type]
    hi = np.asarray(normalize(jnp.ones(3), convention))  # type: ignore[arg-type]
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


__all__.append("valid_box")


class PreImageResult(NamedTuple):
    """What a pre-image search returns.

    Attributes:
      images: (K, H, W, 3) float32 pre-images in the model's normalised input space.
      objective: (K,) the data quantity at the final image (no jitter): the selected
        activation for maximisation, the normalised error ``||phi - phi0||^2/||phi0||^2`` for
        inversion.
      energy: (K, steps) the total energy ``E`` (data term + regularisers) at every step.
      scale: the ``Z`` used (maximisation) or 1.0 (inversion).
    """

    images: jax.Array
    objective: jax.Array
    energy: jax.Array
    scale: float


# ---------------------------------------------------------------------------------------
#                                                                   Layers and validation
# ---------------------------------------------------------------------------------------


def layer_shapes(
    model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """``{layer name: output shape}`` of every named module (first call), in call order.

    Only shapes are traced (``jax.eval_shape``). Modules whose output is not an array are
    left out.
    """
    shapes: dict[str, tuple[int, ...] | None] = {}

    def on_call(name, module, call_next, args, kwargs):
        first = bool(name) and name not in shapes
        if first:
            shapes[name] = None  # reserve the slot: parents are listed before their children
        out = call_next(*args, **kwargs)
        if first and hasattr(out, "shape"):
            shapes[name] = tuple(out.shape)
        return out

    def run(v, xx):
        with taps.intercept_calls(on_call):
            return model.apply(v, xx)

    jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return {k: v for k, v in shapes.items() if v is not None}


def _layer_info(
    model: nn.Module, variables: Mapping[str, Any], layer: str | None, size: tuple[int, int]
) -> tuple[tuple[int, ...], int]:
    """Output shape of ``layer`` for one (1, H, W, 3) image, and its total stride.

    Raises a ValueError listing the valid layer names if ``layer`` is unknown.
    """
    shapes = layer_shapes(model, variables, (1, *size, 3))
    if layer is None:
        out = jax.eval_shape(lambda v, xx: model.apply(v, xx), variables, jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
        shape = tuple(out.shape)
    elif layer not in shapes:
        close = difflib.get_close_matches(layer, list(shapes), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown layer {layer!r}{hint}; valid layers: {', '.join(shapes)} (or None for the model output)")
    else:
        shape = shapes[layer]
    if len(shape) == 4:
        stride = max(1, round(size[0] / shape[1]))
    elif len(shape) == 2:
        spatial = [s[1] for s in shapes.values() if len(s) == 4 and s[1] > 0]
        stride = max(1, round(size[0] / min(spatial))) if spatial else 1
    else:
        raise ValueError(f"layer {layer!r} has output shape {shape}; need (1, H, W, C) or (1, C)")
    return shape, stride


def _default_jitter(stride: int) -> int:
    """The paper's jitter: ``max(round(stride / 4), 1)`` offsets, i.e. a largest shift one less."""
    return max(int(round(stride / 4)), 1) - 1


def _units_array(units: Any, kind: Kind, shape: tuple[int, ...], position: tuple[int, int] | None) -> np.ndarray:
    """Validate ``units`` and return an int32 (K, 3) array of (channel, row, col)."""
    if kind not in ("channel", "unit"):
        raise ValueError(f"unknown kind {kind!r}; use 'channel' or 'unit'")
    nch = shape[-1]
    u = np.asarray(units)
    if u.dtype == object or not (np.issubdtype(u.dtype, np.integer) or u.size == 0):
        raise ValueError(f"units must be integers (channel indices, or (channel, row, col) rows); got {units!r}")
    if u.ndim == 0:
        u = u[None]
    if u.size == 0:
        raise ValueError("units is empty; give at least one unit")
    spatial = len(shape) == 4
    if u.ndim == 2:
        if u.shape[1] != 3:
            raise ValueError(f"units of shape {u.shape} must be (K,) channels or (K, 3) rows of (channel, row, col)")
        if kind != "unit":
            raise ValueError("(channel, row, col) units need kind='unit'")
        if position is not None:
            raise ValueError("give the position either in the units rows or as position, not both")
        if not spatial:
            raise ValueError(f"the layer output has shape {shape} (no spatial positions); give channels only")
        out = u.astype(np.int64)
    elif u.ndim == 1:
        if kind == "unit" and spatial:
            h, w = shape[1], shape[2]
            i, j = position if position is not None else (h // 2, w // 2)
        else:
            if position is not None and kind == "unit":
                raise ValueError(f"the layer output has shape {shape} (no spatial positions); position must be None")
            i, j = 0, 0
        out = np.stack([u, np.full_like(u, i), np.full_like(u, j)], axis=1).astype(np.int64)
    else:
        raise ValueError(f"units must be (K,) channels or (K, 3) rows of (channel, row, col); got shape {u.shape}")
    bad = out[(out[:, 0] < 0) | (out[:, 0] >= nch), 0]
    if bad.size:
        raise ValueError(f"unit channel {int(bad[0])} is out of range: the layer has {nch} channels (0..{nch - 1})")
    if kind == "unit" and spatial:
        h, w = shape[1], shape[2]
        badp = out[(out[:, 1] < 0) | (out[:, 1] >= h) | (out[:, 2] < 0) | (out[:, 2] >= w)]
        if badp.size:
            raise ValueError(
                f"unit position ({int(badp[0, 1])}, {int(badp[0, 2])}) is out of range: the layer's map is {h}x{w}"
            )
    return out.astype(np.int32)


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    s = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)  # type: ignore[arg-type]
    if len(s) != 2 or min(s) < 1:
        raise ValueError(f"size must be a positive int or (H, W); got {size!r}")
    return s  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
#                                                                           Optimisation
# ---------------------------------------------------------------------------------------


def _optimizer(cfg: PreImage, image_norm: float) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        sched = optax.cosine_decay_schedule(cfg.learning_rate * cfg.B, cfg.steps)
        return optax.adam(sched)
    sched = optax.cosine_decay_schedule(cfg.learning_rate * image_norm, cfg.steps)

    def normalise_init(params):
        return optax.EmptyState()

    def normalise_update(updates, state, params=None):
        n = optax.tree.norm(updates)
        return jax.tree_util.tree_map(lambda g: g / jnp.maximum(n, 1e-30), updates), state

    return optax.chain(optax.GradientTransformation(normalise_init, normalise_update), optax.sgd(sched, cfg.momentum))


def _init_canvas(key: jax.Array, cfg: PreImage, shape: tuple[int, int, int]) -> jax.Array:
    k_init, _ = jax.random.split(key)
    u = jax.random.uniform(k_init, shape, jnp.float32, -1.0, 1.0)
    return cfg.constrain(u * (cfg.init_scale * cfg.B / math.sqrt(3.0)))


def _select(phi: jax.Array, unit: jax.Array, kind: Kind) -> jax.Array:
    """The scalar objective of one image's layer output ``phi`` (1, h, w, C) or (1, C)."""
    c, i, j = unit[0], unit[1], unit[2]
    if phi.ndim == 2:
        return phi[0, c]
    if kind == "channel":
        return jnp.mean(phi[0, :, :, c])
    return phi[0, i, j, c]


def _layer_output(model, variables, layer: str | None, x: jax.Array) -> jax.Array:
    if layer is None:
        return model.apply(variables, x)
    return taps.forward(model, variables, x, capture=[layer])[1][layer]


def _optimise(
    data_term: Callable[[jax.Array, Any], jax.Array],
    target: Any,
    key: jax.Array,
    cfg: PreImage,
    size: tuple[int, int],
    jitter: int,
) -> tuple[jax.Array, jax.Array]:
    """One pre-image search: ``lax.scan`` over ``cfg.steps``. Returns (image (H,W,3), energy (steps,))."""
    h, w = size
    t = jitter
    canvas = _init_canvas(key, cfg, (h + t, w + t, 3))
    opt = _optimizer(cfg, cfg.B * math.sqrt(h * w))
    state = opt.init(canvas)
    step_keys = jax.random.split(jax.random.fold_in(key, 1), cfg.steps)

    def energy(cv, k):
        if t:
            oy, ox = jax.random.randint(k, (2,), 0, t + 1)
            crop = jax.lax.dynamic_slice(cv, (oy, ox, 0), (h, w, 3))
        else:
            crop = cv
        return data_term(crop[None], target) + cfg.regularizer(cv[None])[0]

    def step(carry, k):
        cv, st = carry
        e, g = jax.value_and_grad(energy)(cv, k)
        upd, st = opt.update(g, st, cv)
        cv = cfg.constrain(optax.apply_updates(cv, upd))
        return (cv, st), e

    (canvas, _), energies = jax.lax.scan(step, (canvas, state), step_keys)
    c0 = t // 2
    return canvas[c0 : c0 + h, c0 : c0 + w, :], energies


def _maximize_impl(model, variables, units, scale, key, *, layer, kind, cfg, size, jitter):
    def data_term(x, unit):
        return -cfg.C * _select(_layer_output(model, variables, layer, x), unit, kind) / scale

    def one(unit):
        img, en = _optimise(data_term, unit, key, cfg, size, jitter)
        obj = _select(_layer_output(model, variables, layer, img[None]), unit, kind)
        return img, obj, en

    return jax.vmap(one)(units)


_maximize_jit = jax.jit(_maximize_impl, static_argnames=("model", "layer", "kind", "cfg", "size", "jitter"))


def _noise_scale_impl(model, variables, key, *, layer, cfg, size, jitter):
    h, w = size
    canvas = _init_canvas(key, cfg, (h + jitter, w + jitter, 3))
    c0 = jitter // 2
    phi = _layer_output(model, variables, layer, canvas[None, c0 : c0 + h, c0 : c0 + w])
    return jnp.max(jnp.abs(phi))


_noise_scale_jit = jax.jit(_noise_scale_impl, static_argnames=("model", "layer", "cfg", "size", "jitter"))


def _as_key(key: jax.Array | int | None) -> jax.Array:
    if key is None:
        key = 0
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def maximize(
    model: nn.Module,
    variables: Mapping[str, Any],
    units: Any,
    *,
    layer: str | None = None,
    kind: Kind = "channel",
    position: tuple[int, int] | None = None,
    size: int | tuple[int, int] = 224,
    key: jax.Array | int | None = None,
    config: PreImage = PreImage(),
) -> PreImageResult:
    """Activation maximisation of many units at once (one jitted, vmapped ``lax.scan``).

    Args:
      model, variables: a zoo model (or any Flax module with named layers) and its variables.
      units: channel indices, an int or an int array (K,); with ``kind="unit"`` also (K, 3)
        rows of (channel, row, col). For ``layer=None`` (the model output) these are classes.
      layer: a layer name (:func:`xaijax.models.taps.layer_names`), or None for the model
        output (class logits).
      kind: ``"channel"`` maximises the spatial mean of the channel's map, ``"unit"`` one
        position of it (``position`` or the map's centre, unless given per row). For layers
        without spatial axes both select ``phi[:, c]``.
      size: input side (or (H, W)) of the pre-image.
      key: PRNG key or int seed. Every unit uses this same key (same initial noise, same
        jitter offsets), so results do not depend on the batch composition.
      config: hyperparameters, see :class:`PreImage`.

    Returns:
      :class:`PreImageResult` with ``images`` (K, H, W, 3) in normalised input units.

    Raises:
      ValueError: unknown layer (the message lists the valid ones), unit/position out of range,
        bad configuration.
    """
    hw = _size_pair(size)
    shape, stride = _layer_info(model, variables, layer, hw)
    u = jnp.asarray(_units_array(units, kind, shape, position))
    jitter = _default_jitter(stride) if config.jitter is None else int(config.jitter)
    key = _as_key(key)
    scale = config.scale
    if scale is None:
        scale = float(_noise_scale_jit(model, variables, key, layer=layer, cfg=config, size=hw, jitter=jitter))
        scale = scale if scale > 0 else 1.0
    imgs, obj, en = _maximize_jit(
        model, variables, u, jnp.float32(scale), key, layer=layer, kind=kind, cfg=config, size=hw, jitter=jitter
    )
    return PreImageResult(imgs, obj, en, float(scale))


def _invert_impl(model, variables, x0, key, *, layer, cfg, channels, jitter):
    size = (x0.shape[1], x0.shape[2])

    def feats(x):
        phi = _layer_output(model, variables, layer, x)
        return phi if channels is None else phi[..., jnp.asarray(channels)]

    def data_term(x, target):
        phi0, norm0 = target
        d = feats(x) - phi0
        return cfg.C * jnp.sum(d * d) / norm0

    def one(img0):
        phi0 = feats(img0[None])
        norm0 = jnp.maximum(jnp.sum(phi0 * phi0), 1e-30)
        img, en = _optimise(data_term, (phi0, norm0), key, cfg, size, jitter)
        d = feats(img[None]) - phi0
        return img, jnp.sum(d * d) / norm0, en

    return jax.vmap(one)(x0)


_invert_jit = jax.jit(_invert_impl, static_argnames=("model", "layer", "cfg", "channels", "jitter"))


def invert(
    model: nn.Module,
    variables: Mapping[str, Any],
    x0: jax.Array,
    *,
    layer: str | None = None,
    channels: Sequence[int] | None = None,
    key: jax.Array | int | None = None,
    config: PreImage = PreImage(),
) -> PreImageResult:
    """Invert the representation ``phi0 = phi(x0)`` of each image (vmapped over the batch).

    Minimises ``C ||phi(x) - phi0||^2 / ||phi0||^2`` plus the regularisers of ``config``.

    Args:
      x0: (N, H, W, 3) images in the model's normalised input space.
      layer: layer whose output is ``phi`` (None: the model output).
      channels: optional subset of the layer's channels entering the loss (the paper's
        "filter group" masks); default all.
      key: PRNG key or int seed, shared by every image (initial noise and jitter).

    Returns:
      :class:`PreImageResult`; ``objective`` is the final normalised error per image.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim != 4 or x0.shape[-1] != 3:
        raise ValueError(f"x0 must have shape (N, H, W, 3) (NHWC, normalised RGB); got {x0.shape}")
    hw = (int(x0.shape[1]), int(x0.shape[2]))
    shape, stride = _layer_info(model, variables, layer, hw)
    if channels is not None:
        ch = np.asarray(channels)
        if ch.ndim != 1 or ch.size == 0 or not np.issubdtype(ch.dtype, np.integer):
            raise ValueError(f"channels must be a non-empty sequence of ints; got {channels!r}")
        bad = ch[(ch < 0) | (ch >= shape[-1])]
        if bad.size:
            raise ValueError(f"channel {int(bad[0])} is out of range: the layer has {shape[-1]} channels (0..{shape[-1] - 1})")
        channels = tuple(int(c) for c in ch)
    jitter = _default_jitter(stride) if config.jitter is None else int(config.jitter)
    imgs, err, en = _invert_jit(model, variables, x0, _as_key(key), layer=layer, cfg=config, channels=channels, jitter=jitter)
    return PreImageResult(imgs, err, en, 1.0)
