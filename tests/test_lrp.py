"""LRP-family methods: registry, jit/vmap, closed forms for Excitation Backprop, the
contrastive combinations of CLRP and SGLRP, and the LRP-0 / gradient x input identity."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_helpers import conv_matrix

from xaijax import models
from xaijax.methods import excitation, lrp, registry
from xaijax.models import layers, taps
from xaijax.propagation import AlphaBeta, Excitation, Flipped, Gamma, Rule, ZPlus, composites, relevance, relevance_trace

LRP_FAMILY = [
    "lrp-epsilon",
    "lrp-epsilon-plus",
    "lrp-epsilon-plus-flat",
    "lrp-epsilon-gamma-box",
    "lrp-alpha1-beta0",
    "lrp-alpha2-beta1",
    "lrp-zplus-nobias-samplebox",
    "clrp",
    "sglrp",
    "excitation-backprop",
    "contrastive-excitation-backprop",
]


class Net(nn.Module):
    """Small bias-free CNN with the zoo's layer kinds: (N, 8, 8, 3) -> 3 logits."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(4, 3, 1, 1, bias=False, name="conv1")(x)
        h = layers.batch_norm(False, name="bn1")(h)
        h = layers.ReLU(name="relu1")(h)
        a = layers.conv(4, 3, 1, 1, bias=False, name="conv2")(h)
        h = layers.ReLU(name="relu2")(layers.Add(name="add")(a, h))
        p = layers.MaxPool2d(2, name="pool")(h)
        c = layers.Concat(name="concat")(p, layers.AvgPool2d(3, 1, 1, name="avg")(p))
        c = layers.ReLU(name="relu3")(layers.conv(6, 1, bias=False, name="conv3")(c))
        g = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="gap")(c))
        return layers.dense(3, bias=False, name="fc")(g)


@pytest.fixture(scope="module")
def net():
    model = Net()
    v = models.random_variables(model, (1, 8, 8, 3), seed=11)
    rng = np.random.default_rng(0)
    v["params"]["bn1"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    v["batch_stats"]["bn1"]["var"] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 8, 8, 3), np.float32))
    return model, v, x


def _method(name):
    if "excitation" in name:  # the small net has no default Excitation Backprop layer
        return registry.get(name, layer="pool")
    return registry.get(name)


@pytest.mark.parametrize("name", LRP_FAMILY)
def test_method_is_jittable_and_samples_are_independent(net, name):
    """Changing one sample of a batch leaves the other samples' maps unchanged."""
    model, v, x = net
    method = jax.jit(_method(name), static_argnums=0)
    target = jnp.array([0, 2, 1])
    maps = method(model, v, x, target)
    other = method(model, v, x.at[0].set(-2.0 * x[0]), target)
    assert maps.shape == (3, 8, 8) and maps.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(maps)))
    scale = float(jnp.abs(maps).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(other[1:]), np.asarray(maps[1:]), atol=1e-6 * scale)
    assert not np.allclose(np.asarray(other[0]), np.asarray(maps[0]), atol=1e-3 * scale)


@pytest.mark.parametrize("name", ["lrp-epsilon-gamma-box", "contrastive-excitation-backprop"])
def test_vmap_over_single_samples_equals_the_batch(net, name):
    model, v, x = net
    method = _method(name)
    target = jnp.array([0, 2, 1])

    @jax.jit
    def both(v, x, target):
        batched = method(model, v, x, target)
        one_by_one = jax.vmap(lambda xi, ti: method(model, v, xi[None], ti)[0])(x, target)
        return batched, one_by_one

    batched, one_by_one = both(v, x, target)
    np.testing.assert_allclose(np.asarray(one_by_one), np.asarray(batched), atol=1e-5 * float(jnp.abs(batched).max()))


def test_lrp_zero_equals_gradient_x_input_method(net):
    model, v, x = net
    target = jnp.array([1, 0, 2])
    seed = jnp.asarray(np.eye(3, dtype=np.float32)[[1, 0, 2]])

    @jax.jit
    def run(v, x):
        gxi = jax.grad(lambda xx: (model.apply(v, xx) * seed).sum())(x) * x
        return registry.get("lrp-epsilon", eps=0.0)(model, v, x, target), gxi.sum(-1)

    r, g = run(v, x)
    np.testing.assert_allclose(np.asarray(r), np.asarray(g), atol=1e-5 * float(jnp.abs(g).max()))


def test_registry_hyperparameters_and_errors(net):
    assert set(LRP_FAMILY) <= set(registry.names())
    assert registry.get("lrp-epsilon", composite="alpha2-beta1") == registry.get("lrp-alpha2-beta1")
    assert registry.get("lrp-epsilon-gamma-box", gamma=0.5).composite.conv.gamma == 0.5
    assert registry.get("lrp-epsilon-plus", eps=0.1).composite.dense.eps == 0.1
    assert registry.get("lrp-alpha1-beta0", alpha=3.0, beta=2.0).composite.conv.beta == 2.0
    with pytest.raises(ValueError, match="bad hyperparameters for method 'lrp-epsilon'"):
        registry.get("lrp-epsilon", gamma=1.0)
    with pytest.raises(ValueError, match="not both"):
        registry.get("lrp-epsilon", eps=0.1, composite="zero")
    with pytest.raises(ValueError, match="dual must be"):
        registry.get("clrp", dual="others")
    model, v, x = net
    with pytest.raises(ValueError, match="target class 7 is out of range"):
        registry.get("lrp-epsilon")(model, v, x, 7)
    with pytest.raises(ValueError, match="clrp needs class indices"):
        registry.get("clrp")(model, v, x, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        registry.get("lrp-epsilon")(model, v, x[0], 0)


def test_default_excitation_layers_of_the_zoo():
    assert excitation.default_excitation_layer(models.get("vgg16")) == "features.23"  # pool4
    assert excitation.default_excitation_layer(models.get("vgg16_bn")) == "features.33"
    assert excitation.default_excitation_layer(models.get("vgg11")) == "features.15"
    assert excitation.default_excitation_layer(models.get("resnet50")) == "layer3"
    assert excitation.default_excitation_layer(models.get("densenet121")) == "features.denseblock3"
    assert excitation.default_excitation_layer(models.get("inception_v3")) == "Mixed_6e"
    with pytest.raises(ValueError, match="pass layer="):
        excitation.default_excitation_layer(Net())


# ------------------------------------------------------ Excitation Backprop, closed form


class PixelNet(nn.Module):
    """1x1 conv (per-pixel dense) -> ReLU -> global average -> dense; (N, 4, 5, 2) -> 3."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu")(layers.conv(4, 1, name="conv")(x))
        return layers.dense(3, name="fc")(layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="gap")(h)))


def test_excitation_backprop_closed_form_and_contrastive_variant():
    """Read at the ReLU: MWP p_h[a,b,c] = h[a,b,c] w+[c,t] / (HW sum_c' f_c' w+[c',t]) with
    f the pooled features; c-EB uses (-w)+ for the contrast and clamps at zero."""
    model = PixelNet()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 5, 2), np.float32))
    v = models.random_variables(model, x.shape, seed=5)
    v["params"]["fc"]["bias"] = jnp.array([0.5, -0.5, 0.2])  # EB ignores biases
    target = jnp.array([2, 0])
    eb, ceb = jax.jit(
        lambda v, x: (
            excitation.ExcitationBackprop(layer="relu")(model, v, x, target),
            excitation.ExcitationBackprop(layer="relu", contrastive=True)(model, v, x, target),
        )
    )(v, x)
    k, b = np.asarray(v["params"]["conv"]["kernel"][0, 0]), np.asarray(v["params"]["conv"]["bias"])
    h = np.maximum(np.einsum("nabi,ic->nabc", np.asarray(x), k) + b, 0)
    f = h.mean((1, 2))
    w = np.asarray(v["params"]["fc"]["kernel"])

    def mwp(wt):  # wt: (N, C) weights of the target column
        wp = np.maximum(wt, 0)
        return (h * wp[:, None, None, :]).sum(-1) / (20 * (f * wp).sum(-1))[:, None, None]

    wt = w[:, np.asarray(target)].T
    expected = mwp(wt)
    np.testing.assert_allclose(np.asarray(eb), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(eb).sum((1, 2)), [1.0, 1.0], rtol=1e-5)  # probability mass
    np.testing.assert_allclose(np.asarray(ceb), np.maximum(expected - mwp(-wt), 0), rtol=1e-5, atol=1e-8)


def test_contrastive_excitation_equals_torchray_two_pass_difference(net):
    """TorchRay subtracts the flipped-classifier signal at a contrast layer; by linearity that
    equals EB(normal) - EB(flipped classifier) read at the saliency layer."""
    model, v, x = net
    seed = jnp.asarray(np.eye(3, dtype=np.float32)[[0, 1, 2]])
    eb = composites.excitation()
    flipped = eb.replace(last=Flipped(Excitation()))

    @jax.jit
    def run(v, x):
        pos = relevance(model, v, x, seed, eb, read_at="pool").sum(-1)
        neg = relevance(model, v, x, seed, flipped, read_at="pool").sum(-1)
        one_pass = excitation.ExcitationBackprop(layer="pool", contrastive=True, resize=False)(model, v, x, jnp.array([0, 1, 2]))
        return pos, neg, one_pass

    pos, neg, one_pass = run(v, x)
    np.testing.assert_allclose(np.asarray(one_pass), np.maximum(np.asarray(pos - neg), 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pos.sum((1, 2))), np.ones(3), rtol=1e-4)


def test_excitation_backprop_on_tiny_vgg_reads_pool4_and_conserves_probability():
    model = models.get("vgg11", num_classes=5, width=1 / 16, hidden=16, pool_size=1)
    v = models.random_variables(model, (1, 32, 32, 3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    target = jnp.array([3, 1])
    small, full = jax.jit(
        lambda v, x: (
            excitation.ExcitationBackprop(resize=False)(model, v, x, target),
            excitation.ExcitationBackprop()(model, v, x, target),
        )
    )(v, x)
    assert small.shape == (2, 2, 2) and full.shape == (2, 32, 32)  # pool4 is stride 16
    np.testing.assert_allclose(np.asarray(small.sum((1, 2))), [1.0, 1.0], rtol=1e-4)
    assert float(small.min()) >= 0
    # bilinear upsampling (half-pixel centres) keeps the mean of a 2x2 map
    np.testing.assert_allclose(np.asarray(full.mean((1, 2))), np.asarray(small.mean((1, 2))), rtol=1e-5)


# ------------------------------------------------------------------ CLRP and SGLRP


def test_clrp_is_target_minus_scaled_dual(net):
    model, v, x = net
    target = jnp.array([2, 0, 1])
    comp = composites.zplus_box()

    @jax.jit
    def run(v, x):
        onehot = jax.nn.one_hot(target, 3)
        maps = {d: lrp.CLRP(comp, dual=d)(model, v, x, target) for d in ("uniform", "logits", "negated")}
        r_t = relevance(model, v, x, lambda out: onehot * jnp.abs(out), comp)
        r_u = relevance(model, v, x, lambda out: (1 - onehot) * 1.0, comp)  # any positive scale
        r_n = relevance(model, v, x, lambda out: onehot * jnp.abs(out), comp.replace(last=Flipped(comp.dense)))
        return maps, r_t, r_u, r_n

    maps, r_t, r_u, r_n = run(v, x)

    st = np.asarray(r_t).sum((1, 2, 3), keepdims=True)

    def expected(r_dual):  # a dual without any relevance (z+ found no positive evidence) is dropped
        sd = np.asarray(r_dual).sum((1, 2, 3), keepdims=True)
        return (np.asarray(r_t) - np.asarray(r_dual) * np.where(sd == 0, 0.0, st / np.where(sd == 0, 1, sd))).sum(-1)

    np.testing.assert_allclose(np.asarray(maps["uniform"]), expected(r_u), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(maps["negated"]), expected(r_n), rtol=1e-4, atol=1e-6)
    scale = float(np.abs(np.asarray(r_t)).sum())
    live = np.asarray(r_n).sum((1, 2, 3)) != 0
    assert live.sum() >= 2  # (here one sample's flipped classifier finds no positive evidence)
    for d, m in maps.items():  # the dual is scaled to the target's total: every map sums to zero
        keep = live if d == "negated" else np.ones(3, bool)
        np.testing.assert_allclose(np.asarray(m).sum((1, 2))[keep], 0.0, atol=1e-5 * scale, err_msg=d)
    assert not np.allclose(np.asarray(maps["uniform"]), np.asarray(maps["logits"]), rtol=1e-3)


def test_sglrp_seeds_are_the_softmax_gradient(net):
    """Without scaling SGLRP is LRP of the softmax gradient d y_t / d z (computed here with
    jax.jacobian); with scaling each map sums to zero."""
    model, v, x = net
    target = jnp.array([1, 2, 0])
    comp = composites.zplus_box()

    @jax.jit
    def run(v, x):
        out = model.apply(v, x)
        grad_softmax = jax.vmap(lambda z, t: jax.jacobian(jax.nn.softmax)(z)[t])(out, target)
        ref = relevance(model, v, x, grad_softmax, comp).sum(-1)
        return (lrp.SGLRP(comp, scaling=False)(model, v, x, target), lrp.SGLRP(comp)(model, v, x, target), ref)

    plain, scaled, ref = run(v, x)
    scale = float(jnp.abs(ref).max())
    # the method adds 1e-8 to the target seed (as the reference code does): negligible here
    np.testing.assert_allclose(np.asarray(plain), np.asarray(ref), atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(scaled).sum((1, 2)), 0.0, atol=1e-4 * float(jnp.abs(scaled).sum()))


def test_flat_first_layer_conserves_on_full_vgg16_under_jit():
    """Regression: XLA on CPU used to fold the flat rule's constant all-ones convolution into
    the channel sum and return ~1e27 on full-size VGG16 (found by the zennit comparison)."""
    from xaijax import methods as _methods
    from xaijax import models as _models

    m = _models.get("vgg16")
    v = _models.random_variables(m, (1, 112, 112, 3), seed=0)  # zero biases: relevance is conserved
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 112, 112, 3)).astype(np.float32))
    logits = m.apply(v, x)
    t = jnp.array([int(jnp.argmax(logits))])
    r = jax.jit(lambda vv, xx: _methods.get("lrp-epsilon-plus-flat")(m, vv, xx, t))(v, x)
    assert float(r.sum()) == pytest.approx(float(logits[0, t[0]]), rel=1e-3)


# ------------------------------------------------ gamma on residual networks (issue 25.1)


def _tiny_resnet(seed: int, *, shifts: bool = True):
    """ResNet18 at width 4, one block per stage, float64, random kernels and BatchNorm
    statistics/affines (``shifts=False``: zero means and BatchNorm biases, so the folded
    convolutions have no bias), no classifier bias; convolution outputs of both signs reach
    the residual sums."""
    model = models.get("resnet18", num_classes=5, width=4, layers=(1, 1, 1, 1))
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((4, 32, 32, 3)))
    rng = np.random.default_rng(100 + seed)

    def draw(path, a):
        key = [getattr(p, "key", str(p)) for p in path]
        if key[0] == "batch_stats" and key[-1] == "mean":
            return jnp.asarray(rng.normal(0.0, 0.5, a.shape) if shifts else np.zeros(a.shape))
        if key[0] == "batch_stats" and key[-1] == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, a.shape))
        if key[-1] == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape))
        if key[-1] == "bias" and key[1] != "fc":
            return jnp.asarray(rng.normal(0.0, 0.3, a.shape) if shifts else np.zeros(a.shape))
        if key[-1] == "bias":  # no classifier bias: what reaches the convolutions is the logit
            return jnp.zeros(a.shape)
        return jnp.asarray(np.asarray(a, np.float64))

    v = jax.tree_util.tree_map_with_path(draw, models.random_variables(model, x.shape, seed=seed))
    return model, v, x


@dataclasses.dataclass(frozen=True)
class _LiteralGamma(Rule):
    """The gamma rule before issue 25: ``W + gamma W+`` and ``b + gamma b+`` for every output,
    whatever its sign (kept here only to show what the sign-aware rule fixes)."""

    gamma: float = 0.25
    needs_weights: ClassVar[bool] = True

    def backward(self, layer, xs, out, R):
        (x,) = xs
        op, k, b = layer.linear(self)
        z, pull = jax.vjp(lambda xx: op(k + self.gamma * jnp.maximum(k, 0), xx), x)
        d = z + b + self.gamma * jnp.maximum(b, 0)
        d = d + 1e-9 * jnp.where(d >= 0, 1.0, -1.0)
        return (x * pull(R / d)[0],)


def test_gamma_totals_stay_bounded_on_a_residual_network(x64):
    """lrp-epsilon-gamma-box on a tiny ResNet: the input total stays within a small factor of
    the target logit (biases absorb a part), where the literal rule's denominators cross zero
    at negative convolution outputs and the totals run to many times the logit, either sign."""
    model, v, x = _tiny_resnet(6)
    logits = model.apply(v, x)
    target = jnp.argmax(logits, -1)
    zt = np.asarray(logits[jnp.arange(4), target])
    method = jax.jit(lrp.LRP(composites.epsilon_gamma_box(), reduce="sum"), static_argnums=0)
    ratio = np.asarray(method(model, v, x, target).sum((1, 2))) / zt
    assert np.all(np.isfinite(ratio)) and np.all((ratio > 0.2) & (ratio < 1.5)), ratio  # (0.43, 0.85, 0.63, 0.68)
    literal = lrp.LRP(composites.epsilon_gamma_box().replace(conv=_LiteralGamma()), reduce="sum")
    old = np.asarray(jax.jit(literal, static_argnums=0)(model, v, x, target).sum((1, 2))) / zt
    assert np.abs(old).max() > 20 and old.min() < 0, old  # (-4.4, 65.6, -0.64, 1.2) for this draw


@pytest.mark.parametrize("seed", [1, 4])
def test_gamma_layers_never_amplify_relevance_beyond_their_bound(x64, seed):
    """Per output unit, ``sum_i |R_i| <= (2 + gamma) / gamma * |R_j|``. For ``z_j > 0`` (the
    other sign is symmetric) with ``P`` / ``N`` the magnitudes of the contributions pushing
    the output up / down, ``z = P - N + b > 0``: the denominator is ``d = z + gamma (P + b+)
    >= gamma (P + b+)`` and the shares add up to ``(1 + gamma) P + N < (2 + gamma) P + b+``.
    So every Gamma layer satisfies ``sum |R_in| <= (2 + gamma) / gamma * sum |R_out|``, here
    per sample on a tiny ResNet whose convolution outputs of both signs carry relevance. The
    literal rule breaks the bound where its denominator nears zero."""
    model, v, x = _tiny_resnet(seed)
    logits = model.apply(v, x)
    oh = jax.nn.one_hot(jnp.argmax(logits, -1), 5, dtype=x.dtype)

    def worst(comp):
        _, trace = jax.jit(lambda vv, xx: relevance_trace(model, vv, xx, lambda o: oh * o, comp))(v, x)
        ratios = []  # per layer and sample: sum |R_in| / sum |R_out|
        for lr in trace.values():
            if isinstance(lr.rule, (Gamma, _LiteralGamma)):
                r_in = np.abs(np.asarray(lr.inputs[0])).reshape(4, -1).sum(1)
                r_out = np.abs(np.asarray(lr.output)).reshape(4, -1).sum(1)
                assert np.all(r_out > 0)
                ratios.append((r_in / r_out).max())
        assert len(ratios) >= 8
        return max(ratios)

    assert worst(composites.epsilon_gamma_box(gamma=0.25)) <= 9.0 * (1 + 1e-12)  # measured 2.1 / 1.5
    assert worst(composites.epsilon_gamma_box(gamma=1.0)) <= 3.0 * (1 + 1e-12)
    assert worst(composites.epsilon_gamma_box().replace(conv=_LiteralGamma())) > 9.0  # measured 57 / 29


def test_gamma_conserves_on_bias_free_residual_layers(x64):
    """With no biases (zero BatchNorm shifts folded into bias-free convolutions) and no
    stabilizer, every Gamma layer passes on exactly the relevance it receives, outputs of
    both signs included."""
    model, v, x = _tiny_resnet(1, shifts=False)
    comp = composites.epsilon_gamma_box().replace(conv=Gamma(0.25, 0.0))
    logits = model.apply(v, x)
    oh = jax.nn.one_hot(jnp.argmax(logits, -1), 5, dtype=x.dtype)
    _, trace = jax.jit(lambda vv, xx: relevance_trace(model, vv, xx, lambda o: oh * o, comp))(v, x)
    checked = 0
    for lr in trace.values():
        if isinstance(lr.rule, Gamma):
            tin, tout = (np.asarray(t) for t in lr.totals())
            np.testing.assert_allclose(tin, tout, rtol=1e-9, atol=1e-12 * np.abs(tout).max(), err_msg=lr.name)
            checked += 1
    assert checked >= 8


# ------------------------------------------ the RAP / RSP authors' LRP baseline (issue 25.2)


class TwoLayer(nn.Module):
    """x (N, 6, 6, 3) -> conv 3x3 pad 1 (4 ch, bias) -> ReLU -> max-pool 2 -> global average
    -> dense (3, bias): the input layer, the classifier and the parameter-free rules."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu")(layers.conv(4, 3, 1, 1, name="conv")(x))
        h = layers.AdaptiveAvgPool2d(1, name="gap")(layers.MaxPool2d(2, name="pool")(h))
        return layers.dense(3, name="fc")(layers.Flatten(name="flatten")(h))


def _sdiv(a, b):
    """The reference's safe_divide: a / b where b != 0, else 0."""
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def authors_lrp_numpy(x, k, b, W, c, target):
    """``relprop(R = output * T, alpha=1)`` of wjNam/Relative_Attributing_Propagation
    (modules/layers.py) on :class:`TwoLayer`, written out in float64 NumPy: Linear = z+ on
    ``x+`` with ``W+`` and no bias, safe division; AdaptiveAvgPool2d / MaxPool2d = the z-rule
    (``RelPropSimple``); ReLU passes; the 3-channel input convolution = z^B with the
    image's own min/max as bounds and ``+ 1e-9`` in its denominator."""
    n = x.shape[0]
    M = conv_matrix(k, (6, 6), stride=1, pad=1)  # (108, 144)
    xf = x.reshape(n, -1)
    h = np.maximum(xf @ M + np.tile(b, 36), 0).reshape(n, 6, 6, 4)
    p = h.reshape(n, 3, 2, 3, 2, 4).max((2, 4))
    g = p.mean((1, 2))
    z = g @ W + c
    R = z * np.eye(3)[target]  # seed: the target logit
    Wp = np.maximum(W, 0)
    Rg = g * (_sdiv(R, g @ Wp) @ Wp.T)  # classifier: z+, bias ignored
    Rp = p * (_sdiv(Rg, p.sum((1, 2))))[:, None, None, :]  # average pool: z-rule (x_i R / sum x)
    Rh = np.zeros_like(h)
    for i in range(n):
        for a in range(3):
            for bb in range(3):
                for ch in range(4):
                    win = h[i, 2 * a:2 * a + 2, 2 * bb:2 * bb + 2, ch]
                    r, q = np.unravel_index(np.argmax(win), win.shape)  # first maximum (row-major)
                    Rh[i, 2 * a + r, 2 * bb + q, ch] = win[r, q] * _sdiv(Rp[i, a, bb, ch], p[i, a, bb, ch])
    lo, hi = xf.min(1, keepdims=True), xf.max(1, keepdims=True)
    Mp, Mn = np.maximum(M, 0), np.minimum(M, 0)
    ones = np.ones_like(xf)
    Za = xf @ M - (lo * ones) @ Mp - (hi * ones) @ Mn + 1e-9
    S = Rh.reshape(n, -1) / Za
    return (xf * (S @ M.T) - lo * (S @ Mp.T) - hi * (S @ Mn.T)).reshape(x.shape)


def test_authors_lrp_matches_a_numpy_transcription_of_their_code(x64):
    model = TwoLayer()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6, 6, 3))
    k, b = rng.standard_normal((3, 3, 3, 4)) * 0.5, rng.normal(0, 0.3, 4)
    W, c = rng.standard_normal((4, 3)), np.array([0.4, -0.3, 0.2])
    v = {"params": {"conv": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)},
                    "fc": {"kernel": jnp.asarray(W), "bias": jnp.asarray(c)}}}
    target = np.array([0, 2, 1])
    expected = authors_lrp_numpy(x, k, b, W, c, target)
    assert np.abs(expected).max() > 0
    oh = jnp.asarray(np.eye(3)[target])
    r = relevance(model, v, jnp.asarray(x), lambda out: oh * out, composites.zplus_nobias_samplebox())
    np.testing.assert_allclose(np.asarray(r), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    # the registered method is that composite, channels summed
    m = registry.get("lrp-zplus-nobias-samplebox")
    np.testing.assert_allclose(np.asarray(m(model, v, jnp.asarray(x), jnp.asarray(target))), expected.sum(-1),
                               rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    # xaijax's own z+ counts b+ of the classifier: a different map on this biased network
    other = relevance(model, v, jnp.asarray(x), lambda out: oh * out,
                      composites.zplus_nobias_samplebox().replace(dense=ZPlus(0.0)))
    assert not np.allclose(np.asarray(other), expected, rtol=1e-3)


def _biased(model, shape, seed):
    """Float64 random variables with random biases, BatchNorm statistics and affines."""
    rng = np.random.default_rng(seed + 50)

    def draw(path, a):
        key = [getattr(p, "key", str(p)) for p in path]
        if key[-1] in ("bias", "mean"):
            return jnp.asarray(rng.normal(0.0, 0.3, a.shape))
        if key[-1] in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape))
        return jnp.asarray(np.asarray(a, np.float64))

    return jax.tree_util.tree_map_with_path(draw, models.random_variables(model, shape, seed=seed))


def _zplus_denominators(model, variables, x):
    """``{layer: sum_i x+_i w+_ij}`` of every convolution / dense layer (bias ignored), from
    the layer's own input and kernel, with lax directly (independently of the engine)."""
    dens = {}

    def on_call(name, module, call_next, args, kwargs):
        out = call_next(*args, **kwargs)
        if isinstance(module, (nn.Conv, nn.Dense)):
            kp = jnp.maximum(module.variables["params"]["kernel"], 0)
            xp = jnp.maximum(args[0], 0)
            if isinstance(module, nn.Dense):
                dens[name] = xp @ kp
            else:
                dens[name] = jax.lax.conv_general_dilated(
                    xp, kp, module.strides, module.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    precision=jax.lax.Precision.HIGHEST)
        return out

    with taps.intercept_calls(on_call):
        model.apply(variables, x)
    return dens


@pytest.mark.parametrize(
    "arch,kwargs",
    [("vgg16", {"width": 1 / 16, "num_classes": 5, "hidden": 16, "pool_size": 1}),
     ("resnet50", {"width": 4, "num_classes": 5, "layers": (1, 1, 1, 1)})],
    ids=["vgg16", "resnet50"],
)
def test_authors_lrp_input_total_is_the_target_logit(x64, arch, kwargs):
    """The identity of the authors' rules, in float64 on networks with random biases and
    BatchNorm statistics. Every rule ignores biases: z+ passes on ``sum_j R_j [d_j != 0]``
    (``d_j = sum_i x+_i w+_ij``: relevance reaching a unit with no positive contribution is
    dropped, which happens where a bias or BatchNorm shift alone made the unit non-zero),
    z^B (no stabilizer), BatchNorm/ReLU (pass) and the z-rule on pooling / residual sums
    conserve. So layer by layer ``sum R_in = sum R_out - dropped``, and the input total is the
    seed, the target logit (its bias included), less everything dropped."""
    model = models.get(arch, **kwargs)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 32, 32, 3)))
    v = _biased(model, x.shape, 2)
    logits = model.apply(v, x)
    target = jnp.array([0, 3, 4])
    zt = np.asarray(logits[jnp.arange(3), target])
    oh = jax.nn.one_hot(target, 5, dtype=x.dtype)
    comp = composites.zplus_nobias_samplebox(input_stabilizer=0.0)
    rx, trace = jax.jit(lambda vv, xx: relevance_trace(model, vv, xx, lambda o: oh * o, comp))(v, x)
    dens = _zplus_denominators(model, v, x)
    dropped_total = np.zeros(3)
    for lr in trace.values():
        tin, tout = (np.asarray(t) for t in lr.totals())
        dropped = np.zeros(3)
        if isinstance(lr.rule, AlphaBeta):  # z+ (the input layer is z^B)
            out = np.asarray(lr.output)
            dropped = np.where(np.asarray(dens[lr.name]) == 0, out, 0.0).reshape(3, -1).sum(1)
        np.testing.assert_allclose(tin, tout - dropped, rtol=1e-10, atol=1e-12 * np.abs(zt).max(), err_msg=lr.name)
        dropped_total += dropped
    np.testing.assert_allclose(np.asarray(rx.sum((1, 2, 3))), zt - dropped_total, rtol=1e-10, atol=1e-12 * np.abs(zt).max())
    assert np.abs(dropped_total).max() < 0.2 * np.abs(zt).max()  # a small part (the rest: the logit)
    # the reference's 1e-9 on the input layer's (non-negative) denominators changes little
    default = lrp.LRP(composites.zplus_nobias_samplebox())(model, v, x, target)
    np.testing.assert_allclose(np.asarray(default.sum((1, 2))), zt - dropped_total, rtol=1e-6)
    # xaijax's zplus-box counts b+ in its denominators: biases absorb relevance there
    ours = lrp.LRP(composites.zplus_box(-3.0, 3.0))(model, v, x, target)
    assert not np.allclose(np.asarray(ours.sum((1, 2))), zt - dropped_total, rtol=1e-3)


def test_clrp_and_sglrp_take_the_reference_rule_sets(net):
    model, v, x = net
    assert registry.get("clrp", composite="zplus-nobias-samplebox").composite == composites.zplus_nobias_samplebox()
    assert registry.get("sglrp", composite="zplus-nobias-samplebox").composite == composites.zplus_nobias_samplebox()
    ref = registry.get("clrp", low=-2.1179, high=2.64, bias=False)
    assert ref.composite == composites.zplus_box(-2.1179, 2.64, bias=False)
    assert ref.composite.conv == ZPlus(bias=False) != ZPlus()
    with pytest.raises(ValueError, match="either composite="):
        registry.get("clrp", composite="zplus-box", bias=False)
    m = jax.jit(registry.get("clrp", composite="zplus-nobias-samplebox"), static_argnums=0)
    assert bool(jnp.all(jnp.isfinite(m(model, v, x, jnp.array([0, 2, 1])))))
