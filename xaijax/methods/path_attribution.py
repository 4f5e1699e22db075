"""Path and reference attribution methods: GradientSHAP / Expected Gradients, Blur IG, Guided IG.

Registered names:

* ``gradient-shap`` (Lundberg & Lee 2017, Captum's ``GradientShap``; Expected Gradients,
  Erion et al. 2021): for ``n_samples`` draws ``j``, a reference ``b_j`` drawn uniformly from a
  set of references, a point ``alpha_j ~ U[0, 1)`` on the straight line and (optionally)
  Gaussian noise ``eps_j`` of standard deviation ``stdevs`` on the input:
  ``mean_j (x_j - b_j) * grad f(b_j + alpha_j (x_j - b_j))`` with ``x_j = x + eps_j``. Its
  expectation over ``alpha`` and ``b`` is Integrated Gradients averaged over the references.
* ``blur-ig`` (Xu, Venugopalan & Sundararajan, CVPR 2020; PAIR ``saliency``'s ``BlurIG``): IG
  along the path of Gaussian blurs ``x(s) = blur(x, s)`` from the largest level ``s_steps``
  (``max_sigma``; with ``sqrt=True``, ``sqrt(max_sigma)``, as in PAIR) down to 0:
  ``-sum_i (s_{i+1} - s_i) * dx/ds(s_i) * grad f(x(s_i))``, ``s_i = i max_sigma / steps``
  (``sqrt=True``: ``sqrt(i max_sigma / steps)``), ``dx/ds`` by the forward difference
  ``(blur(x, s + grad_step) - blur(x, s)) / grad_step``. The blur is scipy's
  ``gaussian_filter(image, [s, s, 0], mode="constant")`` (zero padding, kernel truncated at
  ``4 s``), as in PAIR. ``sum(map) ~= f(x) - f(blur(x, s_steps))`` up to the path
  discretisation. (PAIR multiplies a whole batch of steps by the *last* step's ``ds``; with its
  defaults, ``batch_size=1``, and with ``sqrt=False`` that is the same; xaijax uses each step's own.)
* ``vargrad`` (Adebayo et al. 2018, "Local explanation methods ... sanity checks"; Captum's
  ``NoiseTunnel(Saliency)`` with ``nt_type="vargrad"``): :func:`~xaijax.methods.combinators.smooth`
  of the ``gradient`` method with ``mode="var"``, the variance of the gradient maps (channel
  reduction ``abs-max`` first, as ``smoothgrad``) over ``n`` noisy copies (noise 0.15 of the
  sample's range, as SmoothGrad).
* ``guided-ig`` (Kapishnikov et al., CVPR 2021; PAIR ``saliency``'s ``guided_ig_impl``): an
  adaptive path from the baseline to ``x``; at each of ``steps`` steps the ``fraction`` of
  features with the smallest absolute gradient move first, every feature staying within
  ``max_dist`` (in units of the straight-line path's ``alpha``) of the straight line, until the
  L1 distance to ``x`` has shrunk by ``1 / steps`` of the total. Attribution:
  ``sum over moves of (x_new - x_old) * grad f(x at the step's start)``. Its ends are the
  baseline and ``x`` exactly.

All maps are (N, H, W) at input resolution: the per-channel attribution (``attribution``)
reduced with :func:`~xaijax.methods.reduce_channels`, ``sum`` by default (the channel sum is
the relevance that sums to the score difference; Captum returns per-channel attributions,
PAIR ``saliency`` the per-channel mask). ``f`` is ``sum(seed * model(x))`` (the target
logit for a class index). A float64 input gives float64 maps.

Random draws (GradientSHAP, the default references) come from ``jax.random.key(seed)``
(streams split with ``fold_in``) and are shared by all samples of a batch, so a sample's map
does not depend on the rest of its batch.

Default references (:func:`reference_set`, used by GradientSHAP and DeepLIFT-SHAP when no
``baselines`` are given; Captum requires them): five per sample — zeros (the dataset's mean
colour in normalised space), the sample blurred with sigma = min(H, W) / 16 (the scipy blur
above), and three images of uniform noise over the sample's value range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, as_seed, check_inputs, reduce_channels, target_score, validate_number, validate_positive_int
from xaijax.methods.combinators.smoothing import Smooth, smooth
from xaijax.methods.gradient import Gradient
from xaijax.methods.registry import register

__all__ = [
    "scipy_gaussian_blur",
    "reference_set",
    "as_baseline",
    "gradient_shap_draws",
    "GradientShap",
    "BlurIG",
    "blur_ig_sigmas",
    "GuidedIG",
    "guided_ig_path",
    "DEFAULT_REFERENCES",
]

#: number of default references of :func:`reference_set` (zeros, blurred, 3 x uniform noise)
DEFAULT_REFERENCES = 5


# ----------------------------------------------------------------------------------- helpers


def _gauss_matrix(n: int, sigma: jax.Array, rmax: int, dtype: Any) -> jax.Array:
    """(n, n) matrix of scipy's 1-D Gaussian filter (truncate 4, zero padding) for a possibly
    traced ``sigma``; the identity for ``sigma == 0``. ``rmax`` bounds the kernel radius."""
    s = jnp.asarray(sigma, dtype)
    pos = s > 0
    ss = jnp.where(pos, s, 1)
    radius = jnp.floor(4.0 * ss + 0.5)
    t = jnp.arange(-rmax, rmax + 1, dtype=dtype)
    taps = jnp.where(jnp.abs(t) <= radius, jnp.exp(-0.5 / (ss * ss) * t * t), 0)
    d = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]).astype(dtype)
    m = jnp.where(jnp.abs(d) <= radius, jnp.exp(-0.5 / (ss * ss) * d * d), 0) / taps.sum()
    return jnp.where(pos, m, jnp.eye(n, dtype=dtype))


def scipy_gaussian_blur(x: jax.Array, sigma: Any, max_sigma: float | None = None) -> jax.Array:
    """Blur NHWC images spatially as ``scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0],
    mode="constant")`` (zero padding, kernel radius ``int(4 sigma + 0.5)``), channels apart.

    ``sigma`` may be traced (a step of a path); ``max_sigma`` (static) bounds it, default
    ``sigma`` itself when concrete. ``sigma == 0`` returns ``x``.
    """
    if max_sigma is None:
        max_sigma = float(sigma)
    rmax = int(4.0 * float(max_sigma) + 0.5) + 1
    mh = _gauss_matrix(x.shape[1], sigma, rmax, x.dtype)
    mw = _gauss_matrix(x.shape[2], sigma, rmax, x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x)


def as_baseline(owner: str, baseline: Any, x: jax.Array) -> jax.Array:
    """``baseline`` (a scalar, or an array broadcastable to ``x``: (C,), (H, W, C), (N, H, W, C))
    broadcast to ``x``'s shape and dtype; ``ValueError`` naming ``baseline`` otherwise."""
    b = jnp.asarray(baseline)
    if not jnp.issubdtype(b.dtype, jnp.number):
        raise ValueError(f"{owner}: baseline must be a number or a numeric array, got dtype {b.dtype}")
    try:
        return jnp.broadcast_to(b.astype(x.dtype), x.shape)
    except ValueError:
        raise ValueError(
            f"{owner}: baseline of shape {tuple(b.shape)} does not broadcast to the input shape {tuple(x.shape)}; "
            "pass a scalar, (C,), (H, W, C) or (N, H, W, C)"
        ) from None


def reference_set(owner: str, x: jax.Array, baselines: Any = None, seed: int = 0) -> jax.Array:
    """References (B, N, H, W, C) for each sample of ``x`` (N, H, W, C).

    Args:
      baselines: None (the default set of the module docstring, B = 5), an array (B, H, W, C)
        shared by all samples, or (N, B, H, W, C), a set per sample.
      seed: PRNG seed of the default set's noise images (shared by all samples).

    Raises:
      ValueError: naming ``baselines`` if its shape does not fit.
    """
    n, h, w, c = x.shape
    if baselines is None:
        zeros = jnp.zeros_like(x)
        blurred = scipy_gaussian_blur(x, min(h, w) / 16.0)
        u = jax.random.uniform(jax.random.key(seed), (DEFAULT_REFERENCES - 2, h, w, c), dtype=jnp.float32).astype(x.dtype)
        lo = x.min(axis=(1, 2, 3))[None, :, None, None, None]
        hi = x.max(axis=(1, 2, 3))[None, :, None, None, None]
        noise = lo + u[:, None] * (hi - lo)
        return jnp.concatenate([zeros[None], blurred[None], noise], axis=0)
    b = jnp.asarray(baselines)
    if not jnp.issubdtype(b.dtype, jnp.number):
        raise ValueError(f"{owner}: baselines must be a numeric array, got dtype {b.dtype}")
    b = b.astype(x.dtype)
    if b.ndim == 4 and b.shape[1:] == (h, w, c) and b.shape[0] >= 1:
        return jnp.broadcast_to(b[:, None], (b.shape[0], n, h, w, c))
    if b.ndim == 5 and b.shape[0] == n and b.shape[2:] == (h, w, c) and b.shape[1] >= 1:
        return jnp.moveaxis(b, 1, 0)
    raise ValueError(
        f"{owner}: baselines must be None, an array (B, H, W, C) = (B, {h}, {w}, {c}) shared by all samples, or "
        f"(N, B, H, W, C) = ({n}, B, {h}, {w}, {c}), B >= 1; got shape {tuple(b.shape)}"
    )


def _validate_chunk(owner: str, chunk: Any) -> None:
    validate_positive_int(owner, "chunk", chunk, optional=True)


def _map(fn: Callable[[Any], jax.Array], xs: Any, count: int, chunk: int | None) -> jax.Array:
    """``vmap(fn)(xs)``, or ``lax.map`` in chunks of ``chunk`` (memory bound)."""
    if chunk is None or chunk >= count:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk)


def _score_grad(model: nn.Module, variables: Mapping[str, Any], target: Any) -> Callable[[jax.Array], jax.Array]:
    return jax.grad(lambda xx: target_score(model.apply(variables, xx), target))


# ------------------------------------------------------------------------------ GradientSHAP


def gradient_shap_draws(seed: int, n_samples: int, n_refs: int, shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The random draws of :class:`GradientShap`: reference indices (n_samples,) in
    ``[0, n_refs)``, path points ``alpha`` (n_samples,) in [0, 1) and standard-normal input noise
    (n_samples, *shape), from ``fold_in(key(seed), 0 | 1 | 2)`` (drawn in float32 and cast, so a
    float64 run sees the draws of its float32 copy)."""
    key = jax.random.key(seed)
    idx = jax.random.randint(jax.random.fold_in(key, 0), (n_samples,), 0, n_refs, dtype=jnp.int32)
    alpha = jax.random.uniform(jax.random.fold_in(key, 1), (n_samples,), dtype=jnp.float32).astype(dtype)
    eps = jax.random.normal(jax.random.fold_in(key, 2), (n_samples,) + tuple(shape), dtype=jnp.float32).astype(dtype)
    return idx, alpha, eps


@dataclasses.dataclass(frozen=True, eq=False)
class GradientShap(Method):
    """GradientSHAP / Expected Gradients (see the module docstring).

    Attributes:
      baselines: the reference set: None (:func:`reference_set`'s default five references;
        Captum has no default and requires them), (B, H, W, C) or (N, B, H, W, C), in the
        model's (normalised) input space.
      n_samples: draws per sample (Captum's default 5; Expected Gradients uses one draw per
        training step, and many for a map).
      stdevs: standard deviation of the Gaussian noise added to the input, in the model's input
        space (Captum's default 0.0: none).
      seed: PRNG seed of the draws (:func:`gradient_shap_draws`) and of the default references.
      chunk: draws per vmapped gradient call (``None``: all ``n_samples`` at once).
      reduce: channel reduction (default ``sum``).

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    baselines: Any = None
    n_samples: int = 5
    stdevs: float = 0.0
    seed: int = 0
    chunk: int | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        validate_positive_int("gradient-shap", "n_samples", self.n_samples)
        validate_number("gradient-shap", "stdevs", self.stdevs, low=0.0)
        _validate_chunk("gradient-shap", self.chunk)
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel attribution, shape of ``x`` (N, H, W, C)."""
        check_inputs(x)
        refs = reference_set("gradient-shap", x, self.baselines, self.seed)
        idx, alpha, eps = gradient_shap_draws(self.seed, self.n_samples, refs.shape[0], x.shape[1:], x.dtype)
        grad = _score_grad(model, variables, target)
        std = jnp.asarray(self.stdevs, x.dtype)

        def one(draw: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            i, a, e = draw
            b = refs[i]
            xn = x + std * e[None]
            return (xn - b) * grad(b + a * (xn - b))

        return _map(one, (idx, alpha, eps), self.n_samples, self.chunk).mean(axis=0)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target), self.reduce)


# ------------------------------------------------------------------------------------ Blur IG


def blur_ig_sigmas(max_sigma: float, steps: int, sqrt: bool) -> np.ndarray:
    """The ``steps + 1`` blur levels of :class:`BlurIG` (float64), 0 first."""
    i = np.arange(steps + 1, dtype=np.float64)
    s = i * float(max_sigma) / float(steps)
    return np.sqrt(s) if sqrt else s


@dataclasses.dataclass(frozen=True)
class BlurIG(Method):
    """Blur Integrated Gradients (see the module docstring); PAIR ``saliency``'s defaults.

    Attributes:
      max_sigma: the largest blur (the path's start), in pixels (PAIR: 50); with ``sqrt=True``
        the largest blur is ``sqrt(max_sigma)`` (PAIR's spacing).
      steps: path steps (PAIR: 100).
      grad_step: the blur increment of the forward difference ``dx/ds`` (PAIR: 0.01).
      sqrt: space the blur levels as ``sqrt(i max_sigma / steps)`` (PAIR: False).
      chunk: steps per vmapped gradient call (``None``: all at once).
      reduce: channel reduction (default ``sum``).
    """

    max_sigma: float = 50.0
    steps: int = 100
    grad_step: float = 0.01
    sqrt: bool = False
    chunk: int | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        validate_positive_int("blur-ig", "steps", self.steps)
        for name in ("max_sigma", "grad_step"):
            validate_number("blur-ig", name, getattr(self, name), low=0.0, strict_low=True)
        _validate_chunk("blur-ig", self.chunk)
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel attribution, shape of ``x`` (N, H, W, C)."""
        check_inputs(x)
        sig = blur_ig_sigmas(self.max_sigma, self.steps, self.sqrt)
        top = float(sig[-1]) + float(self.grad_step)
        s = jnp.asarray(sig[:-1], x.dtype)
        ds = jnp.asarray(np.diff(sig), x.dtype)
        h = jnp.asarray(self.grad_step, x.dtype)
        grad = _score_grad(model, variables, target)

        def one(step: tuple[jax.Array, jax.Array]) -> jax.Array:
            si, di = step
            xs = scipy_gaussian_blur(x, si, top)
            dxds = (scipy_gaussian_blur(x, si + h, top) - xs) / h
            return di * dxds * grad(xs)

        return -_map(one, (s, ds), self.steps, self.chunk).sum(axis=0)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target), self.reduce)


# ----------------------------------------------------------------------------------- Guided IG

#: PAIR's tolerance for "L1 distance reached" (``math.isclose`` rel and abs)
_GIG_EPS = 1e-9


def guided_ig_path(
    grad_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array,
    steps: int,
    fraction: float,
    max_dist: float,
) -> tuple[jax.Array, jax.Array]:
    """Guided IG of one input (any shape): ``(attribution, end point of the path)``.

    ``grad_fn(z)`` is the gradient of the explained score at ``z`` (shape of ``x``). The steps
    run in a ``lax.fori_loop``, the moves inside a step in a ``lax.while_loop`` (at most one
    per feature, plus one), exactly as PAIR's ``guided_ig_impl`` (see the module docstring).
    """
    dtype = x.dtype
    shape = x.shape
    xi = x.reshape(-1)
    xb = baseline.reshape(-1).astype(dtype)
    d = xi - xb
    size = xi.shape[0]
    l1_total = jnp.abs(d).sum()
    q = int(math.floor(float(fraction) * (size - 1)))  # np.quantile(..., method="lower")
    inf = jnp.asarray(jnp.inf, dtype)
    nz = d != 0

    def step(k, carry):
        z, attr = carry
        g = grad_fn(z.reshape(shape)).reshape(-1).astype(dtype)
        alpha = (k + 1.0) / steps
        amin = jnp.maximum(alpha - max_dist, 0.0).astype(dtype)
        amax = jnp.minimum(alpha + max_dist, 1.0).astype(dtype)
        zmin = xb + d * amin
        zmax = xb + d * amax
        l1_target = l1_total * (1 - (k + 1.0) / steps)

        def cond(state):
            _, _, gamma, done, it = state
            return (gamma > 1.0) & ~done & (it <= size)

        def body(state):
            z, attr, _, _, it = state
            z_old = z
            za = jnp.where(nz, (z - xb) / jnp.where(nz, d, 1), amax)
            z = jnp.where(za < amin, zmin, z)
            l1_cur = jnp.abs(z - xi).sum()
            close = jnp.abs(l1_target - l1_cur) <= jnp.maximum(_GIG_EPS * jnp.maximum(jnp.abs(l1_target), jnp.abs(l1_cur)), _GIG_EPS)
            ga = jnp.where(z == zmax, inf, jnp.abs(g))
            threshold = jnp.sort(ga)[q]
            sel = (ga <= threshold) & (ga != inf)
            l1_s = (jnp.abs(z - zmax) * sel).sum()
            gamma = jnp.where(l1_s > 0, (l1_cur - l1_target) / jnp.where(l1_s > 0, l1_s, 1), inf)
            moved = jnp.where(gamma > 1.0, jnp.where(sel, zmax, z), jnp.where(sel, z + (zmax - z) * gamma, z))
            z = jnp.where(close, z, moved)
            attr = attr + (z - z_old) * g
            return z, attr, gamma, close, it + 1

        z, attr, _, _, _ = jax.lax.while_loop(cond, body, (z, attr, inf, jnp.asarray(False), jnp.asarray(0)))
        return z, attr

    z, attr = jax.lax.fori_loop(0, steps, step, (xb, jnp.zeros_like(xi)))
    return attr.reshape(shape), z.reshape(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class GuidedIG(Method):
    """Guided Integrated Gradients (see the module docstring); PAIR ``saliency``'s defaults.

    Attributes:
      baseline: the path's start, a scalar or an array broadcastable to ``x`` (default 0.0:
        zeros in the model's input space, PAIR's default).
      steps: path steps (PAIR: 200).
      fraction: the fraction of features, those with the smallest absolute gradient, moved per
        move (PAIR: 0.25).
      max_dist: how far (in units of the straight line's alpha) a feature may lead or lag the
        straight-line path (PAIR: 0.02; 0 gives IG on the straight line, 1 the unbounded path).
      chunk: samples per vmapped path (``None``: the whole batch). The steps are sequential
        (each depends on the gradient at the previous point).
      reduce: channel reduction (default ``sum``).

    Precision: the path is made of discrete choices (which features fall under the gradient
    quantile, which have reached ``x_max``), so rounding differences between two compilations
    of the same float32 computation (jit vs op-by-op, a batch of 2 vs batches of 1) can flip a
    choice and the maps then differ by more than rounding; the more steps, the likelier. On the
    battery's tiny ResNet with the default 200 steps they differed by 0.045 of the map scale
    (float32), by 2e-7 with 20 steps, and by 3e-16 in float64 at 20 steps. PAIR computes the
    path in float64 (NumPy); run float64 for reproducible maps.

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    baseline: Any = 0.0
    steps: int = 200
    fraction: float = 0.25
    max_dist: float = 0.02
    chunk: int | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        validate_positive_int("guided-ig", "steps", self.steps)
        for name in ("fraction", "max_dist"):
            validate_number("guided-ig", name, getattr(self, name), low=0.0, high=1.0)
        _validate_chunk("guided-ig", self.chunk)
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel attribution, shape of ``x`` (N, H, W, C)."""
        check_inputs(x)
        n = x.shape[0]
        base = as_baseline("guided-ig", self.baseline, x)
        k = jax.eval_shape(lambda xx: model.apply(variables, xx), x[:1]).shape[-1]
        seeds = as_seed(target, k, n, x.dtype)

        def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            xi, bi, si = args
            grad_fn = jax.grad(lambda z: (model.apply(variables, z[None])[0] * si).sum())
            return guided_ig_path(grad_fn, xi, bi, self.steps, float(self.fraction), float(self.max_dist))[0]

        return _map(one, (x, base, seeds), n, self.chunk)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target), self.reduce)


def _vargrad(n: int = 50, noise: float = 0.15, seed: int = 0, chunk: int | None = None, reduce: str = "abs-max") -> Smooth:
    return smooth(Gradient(False, reduce), n=n, noise=noise, seed=seed, chunk=chunk, mode="var")


register(
    "vargrad",
    _vargrad,
    "VarGrad (Adebayo et al. 2018): variance of gradient maps over noisy copies of the input (smooth, mode='var')",
)
register(
    "gradient-shap",
    GradientShap,
    "GradientSHAP / Expected Gradients (Lundberg & Lee 2017; Erion et al. 2021): gradients at random points between random references and the input",
)
register("blur-ig", BlurIG, "Blur IG (Xu et al. 2020): integrated gradients along a path of Gaussian blurs")
register("guided-ig", GuidedIG, "Guided IG (Kapishnikov et al. 2021): integrated gradients along an adaptive, gradient-guided path")
