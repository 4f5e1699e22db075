"""GradientSHAP, Blur IG, Guided IG and VarGrad against direct computations (float64).

* GradientSHAP == a loop over the same draws (:func:`gradient_shap_draws`) computed one by one
  with ``jax.grad`` (exact); with many draws its mean converges to Integrated Gradients
  averaged over the references (Monte-Carlo tolerance).
* Blur IG: the scipy-convention blur equals ``scipy.ndimage.gaussian_filter(..., mode="constant")``;
  the method equals a NumPy loop of PAIR ``saliency``'s algorithm (scipy blurs, one gradient
  per step); completeness ``sum ~= f(x) - f(blur(x, max_sigma))`` up to the discretisation.
* Guided IG equals a direct NumPy implementation of PAIR's ``guided_ig_impl`` (written here
  from the published algorithm: Python loops, ``np.quantile(..., method="lower")``) on a tiny
  ReLU CNN; on a linear model it is ``w (x - x0)`` (the path ends exactly at ``x``); with
  ``max_dist = 0`` it is left-Riemann IG on the straight line.
* VarGrad == ``np.var`` (ddof 0) of the same noisy gradient maps computed in a loop.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from xaijax import methods
from xaijax.methods import IntegratedGradients
from xaijax.methods.combinators import Smooth
from xaijax.methods.gradient import Gradient
from xaijax.methods.path_attribution import (
    BlurIG,
    GradientShap,
    GuidedIG,
    blur_ig_sigmas,
    gradient_shap_draws,
    guided_ig_path,
    scipy_gaussian_blur,
)
from xaijax.models import layers as L


class _Tiny(nn.Module):
    """conv 3x3 (4) -> ReLU -> max pool 2 -> conv 3x3 (4) -> tanh-free ReLU -> mean -> dense (3)."""

    @nn.compact
    def __call__(self, x):
        x = L.ReLU(name="r1")(L.conv(4, 3, 1, 1, name="c1")(x))
        x = L.MaxPool2d(2, 2, name="p1")(x)
        x = L.ReLU(name="r2")(L.conv(4, 3, 1, 1, name="c2")(x))
        return L.dense(3, name="fc")(x.mean((1, 2)))


class _Smooth(nn.Module):
    """A smooth model (softplus), for the completeness checks of the quadratures."""

    @nn.compact
    def __call__(self, x):
        x = jax.nn.softplus(L.conv(4, 3, 1, 1, name="c1")(x))
        return L.dense(3, name="fc")(x.mean((1, 2)))


def _setup(model, size=8, n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, size, size, 3)))
    v = model.init(jax.random.key(seed), x)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
    return v, x


def _grad1(model, v, k):
    """Gradient of the class-k logit of one (H, W, C) image, float64 NumPy."""
    g = jax.jit(jax.grad(lambda z: model.apply(v, z[None])[0, k]))
    return lambda z: np.asarray(g(jnp.asarray(z)))


# ------------------------------------------------------------------------------ GradientSHAP


def test_gradient_shap_equals_loop_over_the_same_draws(x64):
    model = _Tiny()
    v, x = _setup(model)
    t = np.array([0, 2])
    refs = np.random.default_rng(1).normal(size=(3, 8, 8, 3))
    m = GradientShap(baselines=jnp.asarray(refs), n_samples=6, stdevs=0.2, seed=3, chunk=4)
    a = m.attribution(model, v, x, jnp.asarray(t))
    assert a.dtype == jnp.float64
    idx, alpha, eps = (np.asarray(d) for d in gradient_shap_draws(3, 6, 3, (8, 8, 3), jnp.float64))
    for i in range(2):
        g = _grad1(model, v, t[i])
        total = np.zeros((8, 8, 3))
        for j in range(6):
            xn = np.asarray(x[i]) + 0.2 * eps[j]
            b = refs[idx[j]]
            total += (xn - b) * g(b + alpha[j] * (xn - b))
        np.testing.assert_allclose(np.asarray(a[i]), total / 6, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(m(model, v, x, jnp.asarray(t))), np.asarray(a.sum(-1)), atol=1e-14)


def test_gradient_shap_mean_converges_to_ig_over_references(x64):
    model = _Smooth()
    v, x = _setup(model, size=6, n=1)
    refs = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 6, 3)))
    a = GradientShap(baselines=refs, n_samples=4000, seed=0, chunk=1000).attribution(model, v, x, 1)
    ig = IntegratedGradients(steps=16, rule="gauss-legendre")
    expected = sum(np.asarray(ig.attribution(model, v, x, 1, baseline=refs[b])) for b in range(2)) / 2
    err = np.linalg.norm(np.asarray(a) - expected) / np.linalg.norm(expected)
    assert err < 0.05, err  # Monte-Carlo error of 4000 draws (~1/sqrt(n) of the spread)
    # completeness in expectation: sum ~= f(x) - mean f(b)
    f = lambda z: float(model.apply(v, z)[0, 1])  # noqa: E731
    fb = np.mean([f(refs[b][None]) for b in range(2)])
    assert abs(float(a.sum()) - (f(x) - fb)) < 0.05 * abs(f(x) - fb) + 1e-3


# ------------------------------------------------------------------------------------ Blur IG


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.7, 2.3, 11.0])
def test_scipy_gaussian_blur(x64, sigma):
    x = np.random.default_rng(3).normal(size=(2, 9, 7, 3))
    ours = np.asarray(scipy_gaussian_blur(jnp.asarray(x), sigma))
    ref = np.stack([x[i] if sigma == 0 else ndimage.gaussian_filter(x[i], sigma=[sigma, sigma, 0], mode="constant") for i in range(2)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


def _blur_ig_numpy(model, v, x, k, max_sigma, steps, grad_step, sqrt):
    """PAIR saliency's BlurIG.GetMask (batch_size 1), written out with scipy blurs."""
    g = _grad1(model, v, k)
    blur = lambda img, s: img if s == 0 else ndimage.gaussian_filter(img, sigma=[s, s, 0], mode="constant")  # noqa: E731
    sig = [math.sqrt(i * max_sigma / steps) if sqrt else i * max_sigma / steps for i in range(steps + 1)]
    total = np.zeros_like(x)
    for i in range(steps):
        xs = blur(x, sig[i])
        dxds = (blur(x, sig[i] + grad_step) - xs) / grad_step
        total += (sig[i + 1] - sig[i]) * dxds * g(xs)
    return -total


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_equals_pair_algorithm(x64, sqrt):
    model = _Tiny()
    v, x = _setup(model)
    t = np.array([1, 0])
    m = BlurIG(max_sigma=6.0, steps=12, sqrt=sqrt, chunk=5)
    a = m.attribution(model, v, x, jnp.asarray(t))
    assert a.dtype == jnp.float64
    for i in range(2):
        ref = _blur_ig_numpy(model, v, np.asarray(x[i]), t[i], 6.0, 12, 0.01, sqrt)
        np.testing.assert_allclose(np.asarray(a[i]), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    assert np.allclose(blur_ig_sigmas(6.0, 12, False)[[0, -1]], [0.0, 6.0])


def test_blur_ig_completeness(x64):
    model = _Smooth()
    v, x = _setup(model, size=8, n=1)
    a = BlurIG(max_sigma=8.0, steps=400, grad_step=1e-4).attribution(model, v, x, 2)
    f = lambda z: float(model.apply(v, z)[0, 2])  # noqa: E731
    delta = f(x) - f(scipy_gaussian_blur(x, 8.0))
    assert abs(float(a.sum()) - delta) < 0.02 * abs(delta), (float(a.sum()), delta)


# ----------------------------------------------------------------------------------- Guided IG


def _guided_ig_numpy(grad, x, x0, steps, fraction, max_dist):
    """Guided IG as published (Kapishnikov et al. 2021; PAIR saliency's guided_ig_impl)."""
    x, x0 = np.asarray(x, np.float64), np.asarray(x0, np.float64)
    z = x0.copy()
    l1_total = np.abs(x - x0).sum()
    attr = np.zeros_like(x)
    for step in range(steps):
        g_actual = grad(z)
        g = g_actual.copy()
        alpha = (step + 1.0) / steps
        a_min, a_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        z_min, z_max = x0 + (x - x0) * a_min, x0 + (x - x0) * a_max
        l1_target = l1_total * (1 - (step + 1) / steps)
        gamma = np.inf
        while gamma > 1.0:
            z_old = z.copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                z_alpha = np.where(x - x0 != 0, (z - x0) / (x - x0), np.nan)
            z_alpha[np.isnan(z_alpha)] = a_max
            z[z_alpha < a_min] = z_min[z_alpha < a_min]
            l1_current = np.abs(z - x).sum()
            if math.isclose(l1_target, l1_current, rel_tol=1e-9, abs_tol=1e-9):
                attr += (z - z_old) * g_actual
                break
            g[z == z_max] = np.inf
            threshold = np.quantile(np.abs(g), fraction, method="lower")
            s = np.logical_and(np.abs(g) <= threshold, g != np.inf)
            l1_s = (np.abs(z - z_max) * s).sum()
            gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else np.inf
            if gamma > 1.0:
                z[s] = z_max[s]
            else:
                z[s] = (z + (z_max - z) * gamma)[s]
            attr += (z - z_old) * g_actual
    return attr, z


def test_guided_ig_equals_direct_numpy(x64):
    model = _Tiny()
    v, x = _setup(model, size=6)
    x0 = 0.2 * np.random.default_rng(4).normal(size=(2, 6, 6, 3))
    t = np.array([2, 1])
    m = GuidedIG(baseline=jnp.asarray(x0), steps=16, fraction=0.25, max_dist=0.1, chunk=1)
    a = m.attribution(model, v, x, jnp.asarray(t))
    assert a.dtype == jnp.float64
    for i in range(2):
        ref, end = _guided_ig_numpy(_grad1(model, v, t[i]), x[i], x0[i], 16, 0.25, 0.1)
        np.testing.assert_allclose(end, np.asarray(x[i]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(a[i]), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_guided_ig_path_endpoints_and_straight_line_limit(x64):
    rng = np.random.default_rng(5)
    x, x0 = jnp.asarray(rng.normal(size=(4, 5, 3))), jnp.asarray(rng.normal(size=(4, 5, 3)))
    w = jnp.asarray(rng.normal(size=(4, 5, 3)))
    attr, end = guided_ig_path(lambda z: w, x, x0, 10, 0.25, 0.02)
    np.testing.assert_allclose(np.asarray(end), np.asarray(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(attr), np.asarray(w * (x - x0)), rtol=1e-10, atol=1e-12)
    # max_dist = 0: every step moves all features to the straight line's next point (left Riemann IG)
    model = _Smooth()
    v, xb = _setup(model, size=6, n=2)
    gig = GuidedIG(steps=8, max_dist=0.0).attribution(model, v, xb, jnp.array([0, 1]))
    ig = IntegratedGradients(steps=8, rule="riemann-left").attribution(model, v, xb, jnp.array([0, 1]))
    np.testing.assert_allclose(np.asarray(gig), np.asarray(ig), rtol=1e-10, atol=1e-12 * float(jnp.abs(ig).max()))


# ------------------------------------------------------------------------------------- VarGrad


def test_vargrad_is_the_variance_of_the_noisy_gradient_maps(x64):
    model = _Tiny()
    v, x = _setup(model)
    t = jnp.array([0, 2])
    m = methods.get("vargrad", n=5, noise=0.2, seed=7, chunk=2)
    a = m(model, v, x, t)
    assert a.dtype == jnp.float64
    eps = np.asarray(jax.random.normal(jax.random.key(7), (5, 8, 8, 3), dtype=jnp.float32), np.float64)
    span = np.asarray(x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None]
    grad = Gradient(False, "abs-max")
    maps = np.stack([np.asarray(grad(model, v, x + 0.2 * span * eps[j][None], t)) for j in range(5)])
    np.testing.assert_allclose(np.asarray(a), maps.var(axis=0), rtol=1e-10, atol=1e-14)
    mean = Smooth(grad, n=5, noise=0.2, seed=7)(model, v, x, t)
    np.testing.assert_allclose(np.asarray(mean), maps.mean(axis=0), rtol=1e-10, atol=1e-14)
    assert methods.get("smooth:gradient", smooth_mode="var", smooth_n=5, smooth_noise=0.2, smooth_seed=7).mode == "var"


# --------------------------------------------------------------------------------- bad inputs


def test_bad_inputs(x64):
    model = _Tiny()
    v, x = _setup(model)
    x = x.astype(jnp.float32)
    with pytest.raises(ValueError, match="n_samples"):
        GradientShap(n_samples=0)
    with pytest.raises(ValueError, match="stdevs"):
        GradientShap(stdevs=-1.0)
    with pytest.raises(ValueError, match="baselines"):
        GradientShap(baselines=jnp.zeros((2, 5, 5, 3)))(model, v, x, 0)
    with pytest.raises(ValueError, match="chunk"):
        GradientShap(chunk=0)
    with pytest.raises(ValueError, match="steps"):
        BlurIG(steps=0)
    with pytest.raises(ValueError, match="max_sigma"):
        BlurIG(max_sigma=-1.0)
    with pytest.raises(ValueError, match="steps"):
        GuidedIG(steps=0)
    with pytest.raises(ValueError, match="fraction"):
        GuidedIG(fraction=1.5)
    with pytest.raises(ValueError, match="baseline"):
        GuidedIG(baseline=jnp.zeros((4, 4)))(model, v, x, 0)
    with pytest.raises(ValueError, match="mode"):
        Smooth(Gradient(), mode="median")
    with pytest.raises(ValueError, match="squared"):
        Smooth(Gradient(), mode="var", squared=True)
