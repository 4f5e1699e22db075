"""The propagation engine: rules against hand-written formulas, LRP-0 == gradient x input,
layer-by-layer conservation on tiny zoo models, BatchNorm folding, composites and errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_helpers import as_f64 as _f64, conv_matrix

from xaijax import models
from xaijax.models import layers
from xaijax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from xaijax.propagation import (
    AlphaBeta,
    Composite,
    Epsilon,
    Excitation,
    Flat,
    Gamma,
    Pass,
    WSquare,
    ZBox,
    Vjp,
    ZPlus,
    canonizers,
    composites,
    plan,
    relevance,
    relevance_trace,
)


# ------------------------------------------------------------ reference formulas (numpy)
#
# Dense layer: x (N, I), W (I, J), b (J,), R (N, J). Every rule is written as explicit
# contributions c[n, i, j] and normalisers, independently of the engine's VJP-based code.


def ref_rule(rule, x, W, b, R):
    x, W, b, R = (np.asarray(a, np.float64) for a in (x, W, b, R))
    c = x[:, :, None] * W[None]  # contributions x_i w_ij

    def share(contrib, bias, rel):
        z = contrib.sum(1) + bias
        return (contrib * np.where(z == 0, 0.0, rel / np.where(z == 0, 1.0, z))[:, None, :]).sum(2)

    if isinstance(rule, Epsilon):
        z = c.sum(1) + b
        den = z + rule.eps * np.where(z >= 0, 1.0, -1.0)
        return (c * (R / den)[:, None, :]).sum(2)
    if isinstance(rule, Gamma):
        return ref_gamma(x, W, b, R, rule.gamma, rule.stabilizer)
    if isinstance(rule, AlphaBeta):
        pos = share(np.maximum(c, 0), np.maximum(b, 0), R)
        neg = share(np.minimum(c, 0), np.minimum(b, 0), R)
        return rule.alpha * pos - rule.beta * neg
    if isinstance(rule, ZBox):
        lo = np.broadcast_to(np.asarray(rule.low, np.float64), x.shape)
        hi = np.broadcast_to(np.asarray(rule.high, np.float64), x.shape)
        cb = c - lo[:, :, None] * np.maximum(W, 0)[None] - hi[:, :, None] * np.minimum(W, 0)[None]
        return share(cb, 0.0, R)
    if isinstance(rule, Flat):
        return share(np.broadcast_to((W != 0).astype(np.float64), c.shape), 0.0, R)
    if isinstance(rule, WSquare):
        return share(np.broadcast_to(W * W, c.shape), 0.0, R)
    if isinstance(rule, Excitation):
        return share(x[:, :, None] * np.maximum(W, 0)[None], 0.0, R)
    raise AssertionError(rule)


def ref_gamma(x, W, b, R, gamma, stabilizer=0.0):
    """Sign-aware LRP-gamma (zennit's generalised ``Gamma``), one output unit at a time.

    An output ``z_j > 0`` shares ``R_j`` in proportion to ``x+_i (w + g w+)_ij + x-_i (w + g
    w-)_ij`` over a denominator that also has ``b_j + g b+_j``; ``z_j < 0`` uses ``x+_i (w + g
    w-)_ij + x-_i (w + g w+)_ij`` and ``b_j + g b-_j``; ``z_j == 0`` passes nothing.
    """
    x, W, b, R = (np.asarray(a, np.float64) for a in (x, W, b, R))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(W.shape[1]):
            z = float(x[n] @ W[:, j] + b[j])
            if z == 0:
                continue
            up = W[:, j] + gamma * np.maximum(W[:, j], 0)
            down = W[:, j] + gamma * np.minimum(W[:, j], 0)
            xp, xn = np.maximum(x[n], 0), np.minimum(x[n], 0)
            if z > 0:
                c, bias = xp * up + xn * down, b[j] + gamma * max(b[j], 0.0)
            else:
                c, bias = xp * down + xn * up, b[j] + gamma * min(b[j], 0.0)
            d = c.sum() + bias
            d = d + stabilizer * (1.0 if d >= 0 else -1.0)
            if d != 0:
                out[n] += c * R[n, j] / d
    return out


class TwoDense(nn.Module):
    """x (N, 4) -> fc1 (4 -> 3, bias) -> ReLU -> fc2 (3 -> 2, bias)."""

    @nn.compact
    def __call__(self, x):
        h = layers.dense(3, name="fc1")(x)
        h = layers.ReLU(name="relu")(h)
        return layers.dense(2, name="fc2")(h)


W1 = np.array([[1.0, -2.0, 0.5], [-1.5, 0.7, 2.0], [0.3, 1.1, -0.8], [2.2, -0.4, 0.9]])
B1 = np.array([0.2, -0.3, 0.1])
W2 = np.array([[1.2, -0.7], [-0.6, 1.5], [0.8, 0.4]])
B2 = np.array([0.05, -0.1])
X2 = np.array([[1.0, -2.0, 0.5, 1.5], [-0.3, 0.8, -1.2, 0.4], [0.9, 0.1, 1.3, -0.7]])


def two_dense_variables():
    return {"params": {"fc1": {"kernel": W1, "bias": B1}, "fc2": {"kernel": W2, "bias": B2}}}


def _two_dense_expected(rule_fc1, rule_fc2, seed):
    z1 = X2 @ W1 + B1
    h = np.maximum(z1, 0)
    z2 = h @ W2 + B2
    r2 = seed * z2
    rh = ref_rule(rule_fc2, h, W2, B2, r2)  # relevance at fc2's input = relu output (Pass)
    return ref_rule(rule_fc1, X2, W1, B1, rh)


LOW = (-1.0, -2.5, -1.0, -2.0)
HIGH = (1.5, 1.0, 2.0, 2.0)


@pytest.mark.parametrize(
    "rule",
    [Epsilon(0.0), Epsilon(0.3), Gamma(0.5, stabilizer=0.0), AlphaBeta(1.0, 0.0, 0.0), AlphaBeta(2.0, 1.0, 0.0),
     Flat(), WSquare(), Excitation(0.0)],
    ids=lambda r: repr(r),
)
def test_dense_rules_match_hand_formulas_on_two_layers(x64, rule):
    """Every rule on both layers (negative inputs at fc1, ReLU outputs at fc2), float64."""
    seed = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, -1.0]])
    r = relevance(TwoDense(), _f64(two_dense_variables()), jnp.asarray(X2), lambda out: jnp.asarray(seed) * out,
                  Composite(conv=Epsilon(0.0), dense=rule))
    np.testing.assert_allclose(np.asarray(r), _two_dense_expected(rule, rule, seed), rtol=1e-10, atol=1e-12)


def test_zbox_on_first_layer_matches_hand_formula(x64):
    seed = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rule = ZBox(LOW, HIGH, stabilizer=0.0)
    r = relevance(TwoDense(), _f64(two_dense_variables()), jnp.asarray(X2), lambda out: jnp.asarray(seed) * out,
                  Composite(dense=Epsilon(0.0), first=rule))
    expected = _two_dense_expected(rule, Epsilon(0.0), seed)
    np.testing.assert_allclose(np.asarray(r), expected, rtol=1e-10, atol=1e-12)
    # z^B conserves exactly (biases cancel): input total == relevance reaching fc1's output
    z2 = np.maximum(X2 @ W1 + B1, 0) @ W2 + B2
    rh = ref_rule(Epsilon(0.0), np.maximum(X2 @ W1 + B1, 0), W2, B2, seed * z2)
    np.testing.assert_allclose(np.asarray(r).sum(1), rh.sum(1), rtol=1e-10)


def test_hand_numbers_single_dense_layer(x64):
    """A 3-input, 1-output layer worked out on paper: x = (2, -1, 1), w = (1, 3, -2), b = 0.5.

    Contributions c = x * w = (2, -3, -2), z = -2.5, output relevance R = z (seed 1).
    """

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(1, name="fc")(x)

    v = {"params": {"fc": {"kernel": jnp.array([[1.0], [3.0], [-2.0]]), "bias": jnp.array([0.5])}}}
    x = jnp.array([[2.0, -1.0, 1.0]])

    def run(rule):
        return np.asarray(relevance(One(), v, x, lambda out: out, Composite(dense=rule)))[0]

    # LRP-0: R_i = c_i / z * R = c_i
    np.testing.assert_allclose(run(Epsilon(0.0)), [2.0, -3.0, -2.0], rtol=1e-12)
    # eps = 0.5: denominator z - 0.5 = -3 -> R_i = c_i * 5/6
    np.testing.assert_allclose(run(Epsilon(0.5)), [5 / 3, -2.5, -5 / 3], rtol=1e-12)
    # z+: the only positive contribution is x1 w1 = 2 (x2 < 0 meets w2 > 0); z+ = 2 + b+ = 2.5
    np.testing.assert_allclose(run(ZPlus(0.0)), [-2.0, 0.0, 0.0], rtol=1e-12)
    # alpha2-beta1: negative part (0, -3, -2), z- = -5 -> shares (0, .6, .4) of R;
    # R = 2 * (-2, 0, 0) - 1 * (0, -1.5, -1)
    np.testing.assert_allclose(run(AlphaBeta(2.0, 1.0, 0.0)), [-4.0, 1.5, 1.0], rtol=1e-12)
    # gamma = 1, negative output: the negative contributions are boosted. x+ = (2, 0, 1) meets
    # w + w- = (1, 3, -4), x- = (0, -1, 0) meets w + w+ = (2, 6, -2): c = (2, -6, -4), bias
    # b + b- = 0.5 -> d = -7.5, R_i = c_i * -2.5 / -7.5; total -8/3 = R - 0.5 R / d (bias share)
    np.testing.assert_allclose(run(Gamma(1.0, 0.0)), [2 / 3, -2.0, -4 / 3], rtol=1e-12)
    # flat: thirds; w^2: (1, 9, 4) / 14
    np.testing.assert_allclose(run(Flat()), [-2.5 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(run(WSquare()), np.array([1.0, 9.0, 4.0]) / 14 * -2.5, rtol=1e-12)
    # z^B with l = -3, h = 3: c_i = x_i w_i - l w+_i - h w-_i = (5, 6, 4), z = 15
    np.testing.assert_allclose(run(ZBox(-3.0, 3.0, 0.0)), np.array([5.0, 6.0, 4.0]) / 15 * -2.5, rtol=1e-12)
    # excitation: positive weights (1, 3, 0), no bias: x w+ = (2, -3, 0), z = -1
    np.testing.assert_allclose(run(Excitation(0.0)), [5.0, -7.5, 0.0], rtol=1e-12)


class OneConv(nn.Module):
    """x (N, 5, 5, 2) -> conv 3x3/2 pad 1 (3 ch, bias) -> flatten (relevance passes unchanged)."""

    @nn.compact
    def __call__(self, x):
        return layers.Flatten(name="flatten")(layers.conv(3, 3, 2, 1, name="conv")(x))


@pytest.mark.parametrize("stabilizer", [0.0, 0.05])
def test_gamma_is_sign_aware_on_one_dense_and_one_conv_layer(x64, stabilizer):
    """Gamma against the brute-force loop ``ref_gamma`` to 1e-12: inputs of both signs,
    outputs of both signs and exact zeros (no relevance passes there), a stabilizer."""
    rng = np.random.default_rng(7)
    # dense: 4 samples, the last one all-zero input, so its outputs are the biases (one is 0)
    x = rng.standard_normal((4, 6))
    x[3] = 0.0
    W, b = rng.standard_normal((6, 5)), np.array([0.3, -0.2, 0.0, 0.15, -0.4])
    R = rng.standard_normal((4, 5))
    z = x @ W + b
    assert (z > 0).any() and (z < 0).any() and (z == 0).sum() == 1
    v = {"params": {"fc": {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}}}

    class OneDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(5, name="fc")(x)

    for gamma in (0.0, 0.25, 3.0):
        rule = Gamma(gamma, stabilizer)
        r = relevance(OneDense(), v, jnp.asarray(x), lambda out: jnp.asarray(R), Composite(dense=rule))
        np.testing.assert_allclose(np.asarray(r), ref_gamma(x, W, b, R, gamma, stabilizer), rtol=1e-12, atol=1e-13)
    # convolution: the same formula on its (in, out) matrix
    xc = rng.standard_normal((3, 5, 5, 2))
    xc[2] = 0.0
    kc, bc = rng.standard_normal((3, 3, 2, 3)), np.array([0.2, 0.0, -0.1])
    vc = {"params": {"conv": {"kernel": jnp.asarray(kc), "bias": jnp.asarray(bc)}}}
    Rc = rng.standard_normal((3, 27))
    M = conv_matrix(kc, (5, 5), stride=2, pad=1)
    zc = xc.reshape(3, -1) @ M + np.tile(bc, 9)
    np.testing.assert_allclose(np.asarray(OneConv().apply(vc, jnp.asarray(xc))), zc, rtol=1e-12, atol=1e-12)
    assert (zc > 0).any() and (zc < 0).any() and (zc == 0).sum() == 9
    for gamma in (0.25, 3.0):
        rule = Gamma(gamma, stabilizer)
        r = relevance(OneConv(), vc, jnp.asarray(xc), lambda out: jnp.asarray(Rc), Composite(conv=rule))
        expected = ref_gamma(xc.reshape(3, -1), M, np.tile(bc, 9), Rc, gamma, stabilizer)
        np.testing.assert_allclose(np.asarray(r), expected.reshape(xc.shape), rtol=1e-12, atol=1e-13)
    # on non-negative inputs (a ReLU before the layer) with positive outputs it is the
    # original LRP-gamma: weights W + gamma W+, bias b + gamma b+
    h = np.abs(x[:3])
    Wp = np.abs(W)
    r = relevance(OneDense(), {"params": {"fc": {"kernel": jnp.asarray(Wp), "bias": jnp.asarray(np.abs(b))}}},
                  jnp.asarray(h), lambda out: jnp.asarray(R[:3]), Composite(dense=Gamma(0.5, 0.0)))
    c = h[:, :, None] * (1.5 * Wp)[None]
    np.testing.assert_allclose(np.asarray(r), (c * (R[:3] / (c.sum(1) + 1.5 * np.abs(b)))[:, None, :]).sum(2), rtol=1e-12)


class ConvFc(nn.Module):
    """x (N, 5, 5, 2) -> conv 3x3/2 pad 1 (3 ch, bias) -> flatten -> fc (2)."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(3, 3, 2, 1, name="conv")(x)
        h = layers.Flatten(name="flatten")(h)
        return layers.dense(2, name="fc")(h)


@pytest.mark.parametrize(
    "rule",
    [Epsilon(0.1), Gamma(0.25, 0.0), AlphaBeta(2.0, 1.0, 0.0), ZBox((-2.0, -1.5), (2.5, 3.0), 0.0), Flat(), WSquare()],
    ids=lambda r: type(r).__name__,
)
def test_conv_rules_equal_dense_rules_on_the_conv_matrix(x64, rule):
    """A strided, padded convolution behaves like the dense layer with its (in, out) matrix."""
    model = ConvFc()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 2))) * 1.2
    v = _f64(models.random_variables(model, x.shape, seed=1))  # (never eager model.init: slow)
    v["params"]["conv"]["bias"] = jnp.array([0.2, -0.1, 0.05])
    v["params"]["fc"]["bias"] = jnp.array([0.1, -0.2])
    seed = jnp.array([[1.0, 0.0], [0.3, 1.0]])
    r = relevance(model, v, x, lambda out: seed * out, Composite(conv=rule, dense=Epsilon(0.0)))

    k, b = np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"])
    M = conv_matrix(k, (5, 5), stride=2, pad=1)
    hf = np.asarray(x).reshape(2, -1) @ M + np.tile(b, 9)  # conv output, flattened
    wfc, bfc = np.asarray(v["params"]["fc"]["kernel"]), np.asarray(v["params"]["fc"]["bias"])
    r_h = ref_rule(Epsilon(0.0), hf, wfc, bfc, np.asarray(seed) * (hf @ wfc + bfc))
    bias_flat = np.tile(np.asarray(b), 9)
    xr = np.asarray(x).reshape(2, -1)
    if isinstance(rule, ZBox):
        rule = ZBox(tuple(np.tile(rule.low, 25)), tuple(np.tile(rule.high, 25)), 0.0)
    expected = ref_rule(rule, xr, M, bias_flat, r_h).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(r), expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------- LRP-0 == gradient x input


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        a = layers.conv(4, 3, 1, 1, bias=False, name="conv")(h)
        h = layers.Add(name="add")(a, h)
        return layers.ReLU(name="relu")(h)


class Mixed(nn.Module):
    """Every layer kind of the zoo, bias-free: conv, BN, ReLU, residual add, max/avg/adaptive
    pooling, concat, flatten, dropout, identity, dense. Input (N, 8, 8, 3)."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(4, 3, 1, 1, bias=False, name="conv1")(x)
        h = layers.ReLU(name="relu1")(h)
        h = Block(name="block")(h)
        p = layers.MaxPool2d(2, name="maxpool")(h)
        q = layers.AvgPool2d(3, 1, 1, name="avgpool")(p)
        c = layers.Concat(name="concat")(p, q)
        c = layers.conv(6, 1, bias=False, name="conv3")(c)
        c = layers.batch_norm(False, name="bn")(c)
        c = layers.ReLU(name="relu3")(c)
        c = layers.Identity(name="tap")(c)
        g = layers.AdaptiveAvgPool2d(2, name="gap")(c)
        f = layers.Flatten(name="flatten")(g)
        f = layers.Dropout(0.5, name="drop")(f)
        return layers.dense(3, bias=False, name="fc")(f)


def mixed_variables(dtype=jnp.float32):
    model = Mixed()
    v = jax.tree_util.tree_map(lambda a: a.astype(dtype), models.random_variables(model, (1, 8, 8, 3), seed=3))
    rng = np.random.default_rng(0)
    v["batch_stats"]["bn"]["var"] = jnp.asarray(rng.uniform(0.5, 2.0, 6), dtype)
    v["params"]["bn"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 6), dtype)
    return model, v


def test_lrp0_equals_gradient_times_input_float64(x64):
    model, v = mixed_variables(jnp.float64)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 8, 8, 3)))
    seed = jnp.asarray(np.eye(3)[[0, 2, 1]])

    @jax.jit
    def both(v, x):
        r = relevance(model, v, x, lambda out: seed * out, "zero")
        return r, jax.grad(lambda xx: (model.apply(v, xx) * seed).sum())(x) * x

    r, gxi = both(v, x)
    assert r.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(r), np.asarray(gxi), rtol=0, atol=1e-10 * float(jnp.abs(gxi).max()))
    # and the total is the target logit (conservation on a bias-free network)
    np.testing.assert_allclose(np.asarray(r.sum((1, 2, 3))), np.asarray((model.apply(v, x) * seed).sum(1)), rtol=1e-10)


# ---------------------------------------------------------------- BatchNorm folding


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = layers.conv(3, 3, 1, 1, name="conv")(x)
        h = layers.batch_norm(False, name="bn")(h)
        h = layers.ReLU(name="relu")(h)
        h = layers.AdaptiveAvgPool2d(1, name="pool")(h)
        return layers.dense(2, bias=False, name="fc")(layers.Flatten(name="flatten")(h))


class ConvOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = layers.conv(3, 3, 1, 1, name="conv")(x)
        h = layers.ReLU(name="relu")(h)
        h = layers.AdaptiveAvgPool2d(1, name="pool")(h)
        return layers.dense(2, bias=False, name="fc")(layers.Flatten(name="flatten")(h))


def test_batchnorm_folding_equals_explicitly_merged_conv(x64):
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6, 2)))
    v = _f64(models.random_variables(ConvBN(), x.shape, seed=6))
    v["params"]["conv"]["bias"] = jnp.array([0.3, -0.2, 0.1])
    rng = np.random.default_rng(1)
    v["params"]["bn"] = {"scale": jnp.asarray(rng.uniform(-1.5, 1.5, 3)), "bias": jnp.asarray(rng.normal(size=3))}
    v["batch_stats"]["bn"] = {"mean": jnp.asarray(rng.normal(size=3)), "var": jnp.asarray(rng.uniform(0.3, 2, 3))}
    bn = layers.batch_norm(False)
    k, b = canonizers.fold_batchnorm(v["params"]["conv"]["kernel"], v["params"]["conv"]["bias"], bn, {
        "params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]})
    merged = {"params": {"conv": {"kernel": k, "bias": b}, "fc": v["params"]["fc"]}}
    out_bn, out_merged = jax.jit(lambda v, m, x: (ConvBN().apply(v, x), ConvOnly().apply(m, x)))(v, merged, x)
    np.testing.assert_allclose(np.asarray(out_bn), np.asarray(out_merged), rtol=1e-12)
    seed = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    comp = Composite(conv=AlphaBeta(2.0, 1.0), dense=Epsilon(0.0))

    @jax.jit
    def run(v, merged, x):
        return (
            relevance(ConvBN(), v, x, lambda out: seed * out, comp),
            relevance(ConvOnly(), merged, x, lambda out: seed * out, comp),
            relevance(ConvBN(), v, x, lambda out: seed * out, comp.replace(canonize=False)),
        )

    r_folded, r_merged, r_plain = run(v, merged, x)
    np.testing.assert_allclose(np.asarray(r_folded), np.asarray(r_merged), rtol=1e-10, atol=1e-13)
    p = plan(ConvBN(), v, x, comp)
    assert [(e.name, e.fold, e.folded_into) for e in p.layers[:2]] == [("conv", 1, None), ("bn", None, 0)]
    # without canonization the BN passes relevance and the conv's own weights are used: different
    assert not np.allclose(np.asarray(r_plain), np.asarray(r_folded), rtol=1e-3)


# ------------------------------------------------- conservation on tiny zoo models

# tiny variants (few layers keep XLA compile times low); every layer kind of the family is present
ZOO = {
    "vgg11": (dict(num_classes=5, width=1 / 16, hidden=16, pool_size=1), 32),
    "resnet18": (dict(num_classes=5, width=8, layers=(1, 1, 1, 1)), 16),
    "densenet121": (dict(num_classes=5, growth_rate=4, block_config=(2, 2), num_init_features=8), 16),
}


def _zoo(name, bn_random=False):
    kw, size = ZOO[name]
    model = models.get(name, **kw)
    v = models.random_variables(model, (1, size, size, 3))
    if bn_random:  # non-trivial BatchNorm scales and variances, zero shift (keeps the net bias-free)
        rng = np.random.default_rng(2)

        def f(path, a):
            last = getattr(path[-1], "key", None)
            if last == "scale":
                return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
            if last == "var":
                return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
            return a

        v = jax.tree_util.tree_map_with_path(f, v)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, size, size, 3), np.float32))
    return model, v, x


@pytest.mark.parametrize(
    "name,composite",
    [
        ("vgg11", composites.alpha_beta(1.0, 0.0)),
        ("resnet18", composites.epsilon_gamma_box(eps=0.0)),
        ("densenet121", composites.epsilon_plus_flat(eps=0.0)),
    ],
    ids=["vgg11-alpha1beta0", "resnet18-gammabox", "densenet121-plusflat"],
)
def test_relevance_is_conserved_layer_by_layer(name, composite):
    """On bias-free zoo models every layer passes on exactly the relevance it receives
    (residual adds, concatenations, folded BatchNorms included) and the input total is the
    target logit."""
    model, v, x = _zoo(name, bn_random=name == "resnet18")
    seed = jnp.asarray(np.eye(5, dtype=np.float32)[[1, 3]])
    rx, trace, out = jax.jit(
        lambda v, x: relevance_trace(model, v, x, lambda out: seed * out, composite) + (model.apply(v, x),)
    )(v, x)
    logit = (out * seed).sum(1)
    scale = float(jnp.abs(logit).max())
    kinds = set()
    for lr in trace.values():
        tin, tout = lr.totals()
        kinds.add(lr.kind)
        np.testing.assert_allclose(np.asarray(tin), np.asarray(tout), atol=2e-5 * scale, err_msg=lr.name)
    np.testing.assert_allclose(np.asarray(rx.sum((1, 2, 3))), np.asarray(logit), atol=5e-5 * scale)
    expected = {"vgg11": {"maxpool", "avgpool"}, "resnet18": {"add"}, "densenet121": {"concat", "batchnorm"}}[name]
    assert expected <= kinds
    if name == "resnet18":  # every BatchNorm of a ResNet follows a convolution and is folded
        assert all(lr.folded for lr in trace.values() if lr.kind == "conv")


def test_every_zoo_model_has_a_rule_for_every_layer_under_every_composite():
    specs = dict(ZOO)
    specs["inception_v3"] = (dict(num_classes=5, width=1 / 16), 75)
    for name, (kw, size) in specs.items():
        model = models.get(name, **kw)
        v = models.random_variables(model, (1, size, size, 3))
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        for cname in composites.names():
            p = plan(model, v, x, cname)
            assert all(e.rule is not None or e.folded_into is not None for e in p.layers)
        if name == "inception_v3":  # full trace of a propagation (forward and backward) without compiling
            out = jax.eval_shape(lambda v, x: relevance(model, v, x, lambda o: o, "epsilon-gamma-box"), v, x)
            assert out.shape == x.shape


# --------------------------------------------------------- tracing and read_at


def test_read_at_returns_relevance_arriving_at_a_layer_or_container():
    model, v = mixed_variables()
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 8, 3), np.float32))
    seed = jnp.asarray(np.eye(3, dtype=np.float32)[[1, 2]])
    init = lambda out: seed * out
    reads = [("block", "block.relu"), ("conv3", "conv3")]  # a container; a conv with a folded BN

    @jax.jit
    def run(v, x):
        rx, trace = relevance_trace(model, v, x, init, "epsilon-plus")
        read = {layer: relevance(model, v, x, init, "epsilon-plus", read_at=layer) for layer, _ in reads}
        return rx, trace, read, relevance(model, v, x, init, "epsilon-plus")

    rx, trace, read, r_plain = run(v, x)
    for layer, traced in reads:
        np.testing.assert_allclose(np.asarray(read[layer]), np.asarray(trace[traced].output), rtol=1e-5, atol=1e-7)
    # the relevance reaching the block's output is what the maxpool (its only reader) sends down
    np.testing.assert_allclose(np.asarray(read["block"]), np.asarray(trace["maxpool"].inputs[0]), rtol=1e-5, atol=1e-7)
    assert trace["conv3"].folded == "bn" and "bn" not in trace
    np.testing.assert_allclose(np.asarray(rx), np.asarray(r_plain), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------- composites and errors


def test_composite_precedence_and_hashing():
    class Marker(nn.Module):
        pass

    comp = Composite(
        conv=Epsilon(0.1),
        dense=Epsilon(0.2),
        first=Flat(),
        last=WSquare(),
        kinds={"maxpool": Epsilon(0.0)},
        names={"features.1*": Pass(), "classifier.6": Gamma()},
        types={nn.Dense: Vjp()},
    )
    assert isinstance(comp.kinds, tuple) and hash(comp) == hash(Composite(**{f: getattr(comp, f) for f in (
        "conv", "dense", "first", "last", "kinds", "names", "types", "canonize")}))
    conv, dense = nn.Conv(1, (1, 1)), nn.Dense(1)
    assert comp.rule_for("classifier.6", "dense", dense, last=True) == Gamma()  # names first
    assert comp.rule_for("features.10", "conv", conv, first=True) == Pass()  # pattern beats position
    assert comp.rule_for("features.0", "conv", conv, first=True) == Flat()
    assert comp.rule_for("fc", "dense", dense, last=True) == WSquare()
    assert comp.rule_for("classifier.0", "dense", dense) == Vjp()  # type beats kind
    assert comp.rule_for("features.2", "conv", conv) == Epsilon(0.1)
    assert comp.rule_for("features.4", "maxpool", Marker()) == Epsilon(0.0)
    assert comp.rule_for("x", "relu", Marker()) == Pass()  # default
    with pytest.raises(ValueError, match="unknown layer kind 'pool'"):
        Composite(kinds={"pool": Epsilon()})
    with pytest.raises(ValueError, match="must be a Rule"):
        Composite(conv="epsilon")
    with pytest.raises(ValueError, match="unknown composite 'epsilon-pls'"):
        composites.get("epsilon-pls")
    with pytest.raises(ValueError, match="alpha"):
        AlphaBeta(-1.0, 0.0)


def test_old_rule_names_warn_and_resolve_to_the_renamed_rules():
    """``rules.Gradient`` / ``rules.Contrast`` were renamed (``Vjp``, ``FlipContrast``) so as not
    to clash with the methods ``xaijax.methods.Gradient`` / ``Contrast``; the old names still
    import, with a DeprecationWarning, and are in no ``__all__``."""
    import xaijax.propagation as P
    from xaijax.propagation import rules

    for old, new in (("Gradient", rules.Vjp), ("Contrast", rules.FlipContrast)):
        with pytest.warns(DeprecationWarning, match=f"rules.{old} is deprecated"):
            assert getattr(rules, old) is new
        with pytest.warns(DeprecationWarning):
            assert getattr(P, old) is new
        assert old not in rules.__all__ and old not in P.__all__
    with pytest.warns(DeprecationWarning):
        from xaijax.propagation.rules import Gradient  # noqa: F401  (the import statement works too)
    with pytest.raises(AttributeError, match="no attribute 'Gradiant'"):
        rules.Gradiant  # noqa: B018


class Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return 2.0 * x


class Squash(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.cumsum(x, axis=-1)  # no functional rule


class WithScale(nn.Module):
    inner: type = Scale

    @nn.compact
    def __call__(self, x):
        h = layers.dense(3, bias=False, name="fc1")(x)
        h = self.inner(name="scale")(h)
        h = layers.ReLU(name="relu")(h)
        return layers.dense(2, bias=False, name="fc2")(h)


def test_unknown_layer_types_are_listed_and_can_be_mapped():
    x = jnp.asarray(X2, jnp.float32)
    # a module of unknown type whose operations all have functional rules runs (2 * x: relevance passes)
    model = WithScale()
    v = models.random_variables(model, x.shape)
    gxi = jax.grad(lambda xx: model.apply(v, xx).sum())(x) * x
    r = relevance(model, v, x, lambda out: out, "zero")
    np.testing.assert_allclose(np.asarray(r), np.asarray(gxi), rtol=1e-5, atol=1e-6)
    # one computing something without a rule is listed by its path, with the way to give it one
    model = WithScale(Squash)
    with pytest.raises(ValueError, match=r"no propagation rule for operation\(s\) scale: cumsum\..*Composite\(types=\{MyLayer.*Layer types with a rule"):
        relevance(model, v, x, lambda out: out, "zero")
    comp = Composite(types={Squash: Epsilon(0.0)})
    r = relevance(model, v, x, lambda out: out, comp)
    h = np.asarray(x) @ np.asarray(v["params"]["fc1"]["kernel"])
    upper = np.triu(np.ones((h.shape[-1], h.shape[-1])))  # cumsum: z = h @ upper
    z = h @ upper
    a = np.maximum(z, 0)
    out = a @ np.asarray(v["params"]["fc2"]["kernel"])
    # LRP-0 by hand: fc2 (z-rule), ReLU (pass), cumsum (z-rule, mapped), fc1 (z-rule)
    w2 = np.asarray(v["params"]["fc2"]["kernel"])
    ra = a * (np.ones_like(out) @ w2.T)  # sum_k a_j w_jk R_k / out_k with R_k = out_k
    rh = h * ((ra / np.where(z == 0, 1, z)) @ upper.T)
    w1 = np.asarray(v["params"]["fc1"]["kernel"])
    rx = np.asarray(x) * ((rh / np.where(h == 0, 1, h)) @ w1.T)
    np.testing.assert_allclose(np.asarray(r), rx, rtol=1e-4, atol=1e-5)


def test_readable_errors_for_misfit_rules_training_mode_and_layer_names():
    model, v = mixed_variables()
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"needs a weighted layer.*'maxpool' is a 'maxpool' layer"):
        plan(model, v, x, Composite(kinds={"maxpool": Gamma()}))
    with pytest.raises(ValueError, match="Pass\\(\\) needs a single input"):
        plan(model, v, x, Composite(kinds={"add": Pass()}))
    with pytest.raises(ValueError, match="unknown layer name 'maxpol'.*did you mean 'maxpool'"):
        relevance(model, v, x, lambda out: out, "zero", read_at="maxpol")
    with pytest.raises(ValueError, match="ZBox default bounds.*'fc1' has 4 input channels"):
        plan(TwoDense(), two_dense_variables(), jnp.asarray(X2, jnp.float32), composites.epsilon_gamma_box())
    with pytest.raises(ValueError, match="output relevance must have the model output's shape"):
        relevance(model, v, x, jnp.ones((1, 5)), "zero")

    class TrainBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(2, name="fc")(layers.batch_norm(True, name="bn")(x))

    xb = jnp.ones((2, 3))
    vb = models.random_variables(TrainBN(), xb.shape)
    with pytest.raises(ValueError, match="'bn' is in training mode"):
        relevance(TrainBN(), vb, xb, lambda out: out, "zero")


def test_zbox_default_bounds_are_the_normalised_unit_range():
    lo = composites.epsilon_gamma_box().first
    assert lo == ZBox()
    from xaijax.propagation.rules import _imagenet_bound

    np.testing.assert_allclose(_imagenet_bound("low"), -np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD))
    np.testing.assert_allclose(_imagenet_bound("high"), (1 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD))
