"""DeconvNet, Guided Backprop, Integrated Gradients and SmoothGrad against independent values."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import gradient as gf
from xaijax.methods import registry
from xaijax.methods.combinators import smooth
from xaijax.methods.gradient import Gradient, input_gradient
from xaijax.models import layers

# --------------------------------------------------------------------------------------
# tiny networks
# --------------------------------------------------------------------------------------


class HandNet(nn.Module):
    """conv1x1 -> ReLU -> flatten -> dense -> ReLU -> dense, no biases (weights set by hand)."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(2, 1, bias=False, name="conv")(x)
        h = layers.ReLU(name="relu1")(h)
        h = layers.Flatten(name="flatten")(h)
        h = layers.dense(2, bias=False, name="fc1")(h)
        h = layers.ReLU(name="relu2")(h)
        return layers.dense(2, bias=False, name="fc2")(h)


W1 = np.array([[1.0, -1.0], [2.0, 1.0]])  # (C_in, C_out)
W2 = np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, 0.5], [0.5, -1.0]])  # (4, 2)
W3 = np.array([[2.0, -1.0], [1.0, 3.0]])  # (2, 2)
# one image, H=1, W=2, C=2: pixel 0 = (1, 0.5), pixel 1 = (-1, 2) (a negative input)
X_HAND = np.array([[[[1.0, 0.5], [-1.0, 2.0]]]])


@pytest.fixture(scope="module")
def hand():
    variables = {"params": {"conv": {"kernel": jnp.asarray(W1[None, None], jnp.float32)},
                            "fc1": {"kernel": jnp.asarray(W2, jnp.float32)},
                            "fc2": {"kernel": jnp.asarray(W3, jnp.float32)}}}  # fmt: skip
    x = jnp.asarray(np.concatenate([X_HAND, X_HAND]), jnp.float32)  # same image, targets 0 and 1
    return HandNet(), variables, x


def _numpy_backprop(x: np.ndarray, t: int, rule: str) -> np.ndarray:
    """Reference backward pass of HandNet written out with numpy (no autodiff)."""
    z1 = x.reshape(-1, 2) @ W1  # (pixels, 2)
    h1 = np.maximum(z1, 0).reshape(-1)  # flatten in (H, W, C) order
    z2 = h1 @ W2
    g_h2 = W3[:, t]

    def relu_back(z, g):
        if rule == "gradient":
            return g * (z > 0)
        if rule == "deconvnet":
            return np.maximum(g, 0)
        return g * (z > 0) * (g > 0)  # guided

    g_z2 = relu_back(z2, g_h2)
    g_h1 = W2 @ g_z2
    g_z1 = relu_back(z1.reshape(-1), g_h1).reshape(-1, 2)
    return (g_z1 @ W1.T).reshape(x.shape)


def test_hand_network_reference_values():
    # the numpy reference reproduces the values worked out by hand (z1 = [[2, -0.5], [3, 3]],
    # z2 = [0.5, -3.5]; target 0 -> dL/dh2 = (2, 1), target 1 -> (-1, 3))
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 0, "gradient")[0], [[2, 4], [-3, -3]])
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 0, "deconvnet")[0], [[-2, 5], [0, 0]])
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 0, "guided")[0], [[2, 4], [-1, 1]])
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 1, "gradient")[0], [[-1, -2], [1.5, 1.5]])
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 1, "deconvnet")[0], [[-3, 3], [1.5, 3]])
    np.testing.assert_allclose(_numpy_backprop(X_HAND[0], 1, "guided")[0], [[0, 0], [0, 0]])


@pytest.mark.parametrize(
    "rule,expected",
    [
        ("deconvnet", [[[[-2, 5], [0, 0]]], [[[-3, 3], [1.5, 3]]]]),
        ("guided", [[[[2, 4], [-1, 1]]], [[[0, 0], [0, 0]]]]),
    ],
)
def test_modified_gradients_match_hand_computation(hand, rule, expected):
    model, variables, x = hand
    target = jnp.array([0, 1])
    g = jax.jit(lambda v, xx: gf.modified_gradient(model, v, xx, target, rule))(variables, x)
    np.testing.assert_allclose(g, np.asarray(expected), atol=1e-6)
    # the plain gradient is untouched by the interception (and differs from both rules)
    np.testing.assert_allclose(input_gradient(model, variables, x, target)[0, 0], [[2, 4], [-3, -3]], atol=1e-6)
    name = "deconvnet" if rule == "deconvnet" else "guided-backprop"
    sal = registry.get(name)(model, variables, x, target)
    np.testing.assert_allclose(sal, np.abs(np.asarray(expected)).max(-1), atol=1e-6)
    summed = registry.get(name, reduce="sum", times_input=True)(model, variables, x, target)
    np.testing.assert_allclose(summed, (np.asarray(expected) * np.asarray(x)).sum(-1), atol=1e-6)


class SmallCNN(nn.Module):
    """conv3x3 -> ReLU -> maxpool -> conv3x3 -> ReLU ("act") -> global mean -> dense (biases)."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(4, 3, padding=1, name="conv1")(x)
        h = layers.ReLU(name="relu1")(h)
        h = layers.MaxPool2d(2, name="pool")(h)
        h = layers.conv(6, 3, padding=1, name="conv2")(h)
        h = layers.ReLU(name="act")(h)
        h = layers.AdaptiveAvgPool2d(1, name="avgpool")(h)
        h = layers.Flatten(name="flatten")(h)
        return layers.dense(3, name="fc")(h)


def _random_vars(model, shape, seed=0):
    """Random normal parameters with nonzero biases (init by eval_shape, filled by numpy)."""
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape) * 0.5, l.dtype), tmpl)


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN()
    variables = _random_vars(model, (1, 8, 8, 3))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 8, 8, 3)), jnp.float32)
    return model, variables, x


def test_no_relu_module_is_refused():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(x.reshape(x.shape[0], -1)))

    model = Plain()
    variables = _random_vars(model, (1, 2, 2, 1))
    with pytest.raises(ValueError, match="no xaijax.models.layers.ReLU modules"):
        registry.get("guided-backprop")(model, variables, jnp.ones((1, 2, 2, 1)), 0)
    with pytest.raises(ValueError, match="unknown ReLU rule"):
        gf.ModifiedGradient("zennit")


# --------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------


class Power(nn.Module):
    """f(x) = (flatten(x) @ W) ** p: homogeneous of degree p, so f(a x) = a**p f(x)."""

    p: int = 1

    @nn.compact
    def __call__(self, x):
        return layers.dense(2, bias=False, name="fc")(x.reshape(x.shape[0], -1)) ** self.p


def _ig_total(p: int, rule: str, steps: int) -> np.ndarray:
    """Sum of IG attributions / f(x) for the degree-p model and a zero baseline (float64)."""
    with jax.enable_x64(True):
        model = Power(p)
        w = jnp.asarray(np.random.default_rng(1).normal(size=(12, 2)) * 0.4, jnp.float64)
        variables = {"params": {"fc": {"kernel": w}}}
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 2, 3)), jnp.float64)
        target = jnp.array([0, 1])
        ig = gf.IntegratedGradients(steps=steps, rule=rule)
        maps, out = jax.jit(lambda v, xx: (ig(model, v, xx, target), model.apply(v, xx)))(variables, x)
        f = np.asarray(out)[[0, 1], [0, 1]]
        return np.asarray(maps.sum((1, 2))) / f


@pytest.mark.parametrize(
    "p,rule,steps,expected",
    [
        # integrand d/da f(a x) = p a^(p-1) f(x); the quadrature of p a^(p-1) on [0, 1]:
        (1, "riemann-left", 3, 1.0),  # constant integrand: every rule is exact
        (1, "riemann-right", 3, 1.0),
        (2, "riemann-middle", 3, 1.0),  # linear integrand: midpoint and trapezoid exact
        (2, "trapezoid", 3, 1.0),
        (2, "riemann-left", 4, 3 / 4),  # sum_k 2 (k/m) / m = (m - 1) / m
        (2, "riemann-right", 4, 5 / 4),  # (m + 1) / m
        (3, "riemann-middle", 4, 1 - 1 / (4 * 16)),  # midpoint error -h^2/4 for 3a^2
        (3, "trapezoid", 5, 1 + 1 / (2 * 16)),  # trapezoid error +h^2/2, h = 1/(m-1)
        (4, "gauss-legendre", 2, 1.0),  # 2-point Gauss-Legendre: exact for cubic integrands
        (6, "gauss-legendre", 3, 1.0),  # 3-point: exact up to degree 5
    ],
)
def test_ig_quadrature_rules_closed_form(p, rule, steps, expected):
    np.testing.assert_allclose(_ig_total(p, rule, steps), expected, rtol=1e-10)


def test_ig_gauss_legendre_inexact_beyond_its_degree():
    # for p = 5 the 2-point rule gives 5 * (1/2)(t1^4 + t2^4) instead of 1, t = (1 -+ 1/sqrt 3) / 2
    t = np.array([(1 - 3**-0.5) / 2, (1 + 3**-0.5) / 2])
    np.testing.assert_allclose(_ig_total(5, "gauss-legendre", 2), 5 * 0.5 * (t**4).sum(), rtol=1e-10)
    assert abs(5 * 0.5 * (t**4).sum() - 1) > 1e-3


class SmoothNet(nn.Module):
    """conv -> tanh -> conv -> softplus -> mean -> dense: smooth, for convergence checks."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(layers.conv(4, 3, padding=1, name="conv1")(x))
        h = nn.softplus(layers.conv(4, 3, padding=1, name="conv2")(h))
        return layers.dense(3, name="fc")(h.mean((1, 2)))


@pytest.fixture(scope="module")
def smooth_net():
    model = SmoothNet()
    variables = _random_vars(model, (1, 6, 6, 3), seed=6)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    baseline = jnp.asarray(0.3 * rng.normal(size=(6, 6, 3)), jnp.float32)  # one array baseline for all samples
    return model, variables, x, baseline


def test_ig_completeness_and_convergence(smooth_net):
    model, variables, x, baseline = smooth_net
    target = jnp.array([1, 0])
    out_x = model.apply(variables, x)[jnp.arange(2), target]
    out_b = model.apply(variables, jnp.broadcast_to(baseline, x.shape))[jnp.arange(2), target]
    gap = np.asarray(out_x - out_b)
    assert np.all(np.abs(gap) > 0.2)

    cases = [("riemann-right", 4), ("riemann-right", 16), ("riemann-right", 64), ("riemann-middle", 4),
             ("riemann-middle", 16), ("trapezoid", 5), ("trapezoid", 17), ("gauss-legendre", 8)]  # fmt: skip
    igs = {c: registry.get("integrated-gradients", baseline=baseline, steps=c[1], rule=c[0]) for c in cases}
    totals = jax.jit(lambda v, xx: {c: ig(model, v, xx, target).sum((1, 2)) for c, ig in igs.items()})(variables, x)
    err = {c: np.abs(np.asarray(t) - gap).max() for c, t in totals.items()}
    # first-order rules: error ~ 1/m; midpoint and trapezoid: ~ 1/m^2; Gauss-Legendre: spectral
    e_right = [err["riemann-right", m] for m in (4, 16, 64)]
    assert e_right[1] < e_right[0] / 3 and e_right[2] < e_right[1] / 3
    assert e_right[2] < 0.03 * np.abs(gap).min()
    assert err["riemann-middle", 16] < err["riemann-middle", 4] / 8
    assert err["trapezoid", 17] < err["trapezoid", 5] / 8
    assert err["gauss-legendre", 8] < e_right[2] / 3


def test_ig_chunking_baseline_override_and_errors(smooth_net):
    model, variables, x, baseline = smooth_net
    target = jnp.array([1, 1])
    full = gf.IntegratedGradients(baseline=baseline, steps=12, rule="riemann-middle")
    chunked = gf.IntegratedGradients(baseline=baseline, steps=12, rule="riemann-middle", chunk=5)
    other = gf.IntegratedGradients(steps=12, rule="riemann-middle")  # baseline given at call time

    @jax.jit
    def run(v, xx, b):
        return full(model, v, xx, target), chunked(model, v, xx, target), other(model, v, xx, target, baseline=b)

    ref, ch, over = run(variables, x, baseline)
    np.testing.assert_allclose(ch, ref, rtol=1e-5, atol=1e-6)  # lax.map chunks of 5, 5 and 2 nodes
    np.testing.assert_allclose(over, ref, rtol=1e-5, atol=1e-6)
    # the map is sum_c (x - x') * sum_k w_k grad f(x' + a_k (x - x')), node by node
    grad = jax.jit(lambda xx: input_gradient(model, variables, xx, target))
    alphas, weights = gf.quadrature("riemann-middle", 12)
    grads = sum(w * grad(baseline + a * (x - baseline)) for a, w in zip(alphas, weights))
    np.testing.assert_allclose(ref, ((x - baseline) * grads).sum(-1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not broadcast"):
        gf.IntegratedGradients(baseline=jnp.zeros((5, 3)))(model, variables, x, target)
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        registry.get("integrated-gradients", rule="simpson")
    with pytest.raises(ValueError, match="steps >= 2"):
        gf.IntegratedGradients(steps=1, rule="trapezoid")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        gf.IntegratedGradients(steps=0)


def test_quadrature_weights():
    for rule in gf.QUADRATURE_RULES:
        a, w = gf.quadrature(rule, 7)
        assert a.shape == w.shape == (7,)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(gf.quadrature("trapezoid", 3)[1], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(gf.quadrature("riemann-left", 4)[0], [0, 0.25, 0.5, 0.75])


# --------------------------------------------------------------------------------------
# SmoothGrad
# --------------------------------------------------------------------------------------


def _jit(method):
    return jax.jit(method, static_argnums=0)


def test_smoothgrad_noise_free_is_gradient_and_deterministic(cnn):
    model, variables, x = cnn
    target = jnp.array([0, 2, 1])
    variants = {
        "plain0": registry.get("smoothgrad", n=3, noise=0.0),
        "squared0": registry.get("smoothgrad", n=3, noise=0.0, squared=True),
        "seed7": registry.get("smoothgrad", n=6, seed=7),
        "seed8": registry.get("smoothgrad", n=6, seed=8),
        "seed7_chunked": registry.get("smoothgrad", n=6, seed=7, chunk=4),  # lax.map: 4 + remainder 2
        "grad": Gradient(),
    }
    # one compilation for all variants (noise generation dominates compile time on CPU)
    r = jax.jit(lambda v, xx: {k: m(model, v, xx, target) for k, m in variants.items()})(variables, x)
    np.testing.assert_allclose(r["plain0"], r["grad"], rtol=1e-6)
    np.testing.assert_allclose(r["squared0"], r["grad"] ** 2, rtol=1e-5)
    assert np.abs(np.asarray(r["seed7"] - r["seed8"])).max() > 1e-4  # another seed, other noise
    assert np.abs(np.asarray(r["seed7"] - r["grad"])).max() > 1e-4  # noise changes the map
    np.testing.assert_allclose(r["seed7_chunked"], r["seed7"], rtol=1e-5, atol=1e-7)
    # (determinism across separate traces: see test_jit_vmap_batch_independence)


def test_smooth_noise_is_the_same_in_float64(x64):
    """The noise patterns are drawn in float32 and cast, so a float64 run sees the float32 noise
    (to float32 rounding) and the two maps agree: float64 checks of SmoothGrad are meaningful."""

    def probe(model, variables, x, target):
        return x[..., 0] * 1.0

    x32 = jnp.linspace(-1.0, 3.0, 2 * 4 * 5 * 2, dtype=jnp.float32).reshape(2, 4, 5, 2)
    m = smooth(probe, n=6, noise=0.3, seed=5)
    out32 = np.asarray(m(None, None, x32, 0))
    out64 = m(None, None, x32.astype(jnp.float64), 0)
    assert out64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out64), out32, rtol=1e-6, atol=1e-6)
    # and the noise is not trivially zero
    assert np.abs(out32 - np.asarray(x32[..., 0])).max() > 0.05


def test_smooth_noise_convention_with_a_probe_method():
    """A probe 'method' returning its (noisy) input shows the exact noise that was added."""

    def probe(model, variables, x, target):
        return x[..., 0] * 1.0

    x = jnp.stack([jnp.linspace(-1, 3, 4 * 5 * 2).reshape(4, 5, 2), jnp.linspace(0, 0.5, 40).reshape(4, 5, 2)])
    n, noise, seed = 5, 0.2, 3
    sigma = noise * np.array([4.0, 0.5])  # max - min of each sample
    run = jax.jit(lambda xx: (smooth(probe, n=n, noise=noise, seed=seed)(None, None, xx, 0),
                              smooth(probe, n=n, noise=noise, seed=seed, squared=True)(None, None, xx, 0),
                              jax.random.normal(jax.random.key(seed), (n, 4, 5, 2))))  # the documented noise
    out, sq, eps = run(x)
    expected = np.asarray(x[..., 0]) + sigma[:, None, None] * np.asarray(eps[..., 0].mean(0))[None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    noisy = np.asarray(x[None, ..., 0]) + sigma[None, :, None, None] * np.asarray(eps[:, None, ..., 0])
    np.testing.assert_allclose(sq, (noisy**2).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n must be a positive int"):
        smooth(probe, n=0)
    with pytest.raises(ValueError, match="noise must be a non-negative"):
        smooth(probe, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):  # infinite noise would give all-NaN maps
        smooth(probe, noise=float("inf"))


def test_numeric_options_take_numpy_scalars_and_refuse_non_finite_values():
    from xaijax.methods._core import validate_number
    from xaijax.methods.cam import GradCAM
    from xaijax.methods.deeplift import DeepLift
    from xaijax.methods.path_attribution import BlurIG, GradientShap, GuidedIG

    # NumPy scalars (e.g. values read from a config array) are numbers like Python's
    assert GuidedIG(fraction=np.float32(0.25)).fraction == np.float32(0.25)
    assert DeepLift(eps=np.float64(1e-9)).eps == 1e-9
    assert gf.IntegratedGradients(chunk=np.int64(4)).chunk == 4
    # infinite / NaN settings would give NaN maps without an error: refused, naming the argument
    with pytest.raises(ValueError, match="gradient-shap: stdevs must be a non-negative number"):
        GradientShap(stdevs=float("inf"))
    with pytest.raises(ValueError, match="blur-ig: max_sigma must be a positive number"):
        BlurIG(max_sigma=float("nan"))
    with pytest.raises(ValueError, match=r"guided-ig: fraction must be a number in \[0, 1\]"):
        GuidedIG(fraction=True)
    with pytest.raises(ValueError, match=r"m: v must be a number in \(0, 1\]"):
        validate_number("m", "v", 0.0, low=0.0, high=1.0, strict_low=True)
    validate_number("m", "v", 1.0, low=0.0, high=1.0, strict_low=True)
    with pytest.raises(TypeError, match="aug_flips must be a sequence"):
        GradCAM(aug_flips=True)


# --------------------------------------------------------------------------------------
# jit / vmap / batch independence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("deconvnet", {}),
        ("guided-backprop", {}),
        ("integrated-gradients", {"steps": 6, "chunk": 4}),
        ("smoothgrad", {"n": 4}),
    ],
)
def test_jit_vmap_batch_independence(cnn, name, kwargs):
    model, variables, x = cnn
    target = jnp.array([2, 0, 1])
    method = registry.get(name, **kwargs)
    jitted = _jit(method)(model, variables, x, target)
    assert jitted.shape == x.shape[:3] and jitted.dtype == jnp.float32
    assert np.abs(np.asarray(jitted)).max() > 0
    # one sample at a time under vmap: a sample's map does not depend on its batch
    one_by_one = jax.jit(jax.vmap(lambda xi, ti: method(model, variables, xi[None], ti[None])[0]))(x, target)
    np.testing.assert_allclose(one_by_one, jitted, rtol=1e-4, atol=1e-6)
    # (smoothgrad: the vmapped trace draws its noise anew, so equality also shows determinism)
    if name in ("deconvnet", "guided-backprop"):  # eager == jit (cheap here; IG/smoothgrad eager is slow)
        np.testing.assert_allclose(method(model, variables, x, target), jitted, rtol=1e-4, atol=1e-6)
    if name != "smoothgrad":  # an explicit output seed equals the int target
        seed = jax.nn.one_hot(target, 3)
        np.testing.assert_allclose(_jit(method)(model, variables, x, seed), jitted, rtol=1e-5, atol=1e-6)
