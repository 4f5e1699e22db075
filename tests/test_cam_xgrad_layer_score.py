"""CAM, XGrad-CAM, Layer-CAM and Score-CAM against independent computations.

* CAM: the class-activation formula from the fc weights and a hand-written forward pass;
  the identity ``grad-cam = relu(cam) / (h w)`` on GAP + linear heads (tiny ResNet,
  DenseNet); clear errors for heads where CAM is undefined (VGG's fully connected head).
* XGrad-CAM, Layer-CAM (single and fused): numpy formulas on activations and gradients of a
  hand-written functional copy of a tiny network (explicit ``jax.grad``, no taps).
* Score-CAM: a slow Python loop over samples and channels, for chunk sizes that do and do
  not divide the channel count, with a dead (constant) channel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import models
from xaijax.methods import cam, registry
from xaijax.models import layers, taps

N_CLASSES = 3


class TwoConvNet(nn.Module):
    """conv(3x3, 4) -> ReLU "act1" (8x8) -> maxpool 2 -> conv(3x3, 5) -> ReLU "act2" (4x4) -> head -> fc.

    ``head="flatten"``: flatten + fc (gradients vary over space); ``"pool"``: global
    average pool + flatten + fc (the head CAM is defined for).
    """

    head: str = "flatten"
    cam_layer: str = "act2"

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act1")(layers.conv(4, 3, padding=1, name="conv1")(x))
        h = layers.MaxPool2d(2, name="pool")(h)
        h = layers.ReLU(name="act2")(layers.conv(5, 3, padding=1, name="conv2")(h))
        if self.head == "pool":
            h = layers.AdaptiveAvgPool2d(1, name="avgpool")(h)
        h = layers.Flatten(name="flatten")(h)
        return layers.dense(N_CLASSES, name="fc")(h)


def _maxpool2(h):
    """2x2/stride-2 max pooling with torch's gradient (``lax.reduce_window``), as the zoo's MaxPool2d."""
    from jax import lax

    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _conv(x, p):
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + p["bias"]


def _explicit(params, head):
    """Hand-written functional copy of TwoConvNet: (x -> (act1, act2), act1 -> out, act2 -> out)."""

    def tail2(a2):
        f = a2.mean((1, 2)) if head == "pool" else a2.reshape(a2.shape[0], -1)
        return jnp.dot(f, params["fc"]["kernel"], precision=jax.lax.Precision.HIGHEST) + params["fc"]["bias"]

    def act2_of(a1):
        n, h, w, c = a1.shape
        pooled = _maxpool2(a1)  # torch semantics: a tie's gradient goes to the first maximum
        return jax.nn.relu(_conv(pooled, params["conv2"]))

    def acts(x):
        a1 = jax.nn.relu(_conv(x, params["conv1"]))
        return a1, act2_of(a1)

    return acts, (lambda a1: tail2(act2_of(a1))), tail2


def _vars(model, shape, seed, scale=0.5):
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape) * scale, jnp.float32), tmpl)


def _grad_of(fn, a, targets):
    """dS/da with S = sum_n fn(a)[n, targets[n]] (explicit jax.grad)."""
    t = jnp.asarray(targets)
    return np.asarray(jax.grad(lambda z: fn(z)[jnp.arange(len(targets)), t].sum())(a), np.float64)


@pytest.fixture(scope="module")
def tiny():
    """Flatten-head and pool-head TwoConvNets with variables and an input batch."""
    x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 8, 8, 2)), jnp.float32)
    out = {}
    for head in ("flatten", "pool"):
        model = TwoConvNet(head=head)
        out[head] = (model, _vars(model, (1, 8, 8, 2), seed=11 if head == "flatten" else 12))
    return out, x


@pytest.fixture(scope="module")
def resnet():
    model = models.get("resnet18", num_classes=5, width=8, layers=(1, 1, 1, 1))
    variables = models.random_variables(model, (1, 96, 96, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 96, 96, 3)), jnp.float32)
    return model, variables, x


def _close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(1e-6, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# CAM
# --------------------------------------------------------------------------------------


def test_cam_equals_direct_formula_on_tiny_network(tiny):
    nets, x = tiny
    model, variables = nets["pool"]
    params = variables["params"]
    acts, _, _ = _explicit(params, "pool")
    a2 = np.asarray(acts(x)[1], np.float64)  # (2, 4, 4, 5)
    kernel = np.asarray(params["fc"]["kernel"], np.float64)  # (5, 3)
    targets = [2, 0]
    raw = np.einsum("nhwc,nc->nhw", a2, kernel[:, targets].T)
    assert raw.max() > 0 and raw.min() < 0  # the ReLU option matters
    up = np.asarray(cam.upsample_bilinear(jnp.asarray(raw, jnp.float32), (8, 8)))
    out = registry.get("cam")(model, variables, x, jnp.array(targets))
    assert out.shape == (2, 8, 8) and out.dtype == jnp.float32
    _close(out, up)
    _close(registry.get("cam", relu=True)(model, variables, x, jnp.array(targets)),
           cam.upsample_bilinear(jnp.asarray(np.maximum(raw, 0), jnp.float32), (8, 8)))
    # a seed weights the fc columns: the map is linear in the seed
    seed = jnp.array([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    raw_seed = np.einsum("nhwc,nk,ck->nhw", a2, np.asarray(seed, np.float64), kernel)
    _close(registry.get("cam")(model, variables, x, seed), _up(raw_seed))


def test_cam_equals_grad_cam_on_resnet(resnet):
    """GAP + linear head: dS/dA = W[:, t] / (h w) everywhere, so grad-cam = relu(cam) / (h w)."""
    model, variables, x = resnet
    target = jnp.array([3, 1])

    @jax.jit
    def run(v, xx):
        return (
            registry.get("cam")(model, v, xx, target),
            registry.get("cam", relu=True)(model, v, xx, target),
            registry.get("grad-cam")(model, v, xx, target),
            registry.get("cam", layer="layer4.0.relu")(model, v, xx, target),  # the same tensor as layer4
        )

    raw, relu_cam, grad_cam, alias = run(variables, x)
    assert np.asarray(raw).min() < 0 < np.asarray(raw).max()
    hw = 3 * 3  # layer4 of a 96-px input
    _close(relu_cam, np.asarray(grad_cam) * hw)
    # up to a positive per-image scale: fit it and check it is h*w for both images
    g, r = np.asarray(grad_cam, np.float64).reshape(2, -1), np.asarray(relu_cam, np.float64).reshape(2, -1)
    scale = (g * r).sum(1) / (g * g).sum(1)
    np.testing.assert_allclose(scale, [hw, hw], rtol=1e-4)
    _close(alias, raw)


class DropoutHead(nn.Module):
    """Inception-v3's head pattern: act -> avgpool -> dropout (identity in eval) -> flatten -> fc."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(4, 3, padding=1, name="conv")(x))
        h = layers.AdaptiveAvgPool2d(1, name="avgpool")(h)
        h = layers.Dropout(0.5, name="dropout")(h)
        return layers.dense(N_CLASSES, name="fc")(layers.Flatten(name="flatten")(h))


def test_cam_on_densenet_and_dropout_heads(tiny):
    dn = models.get(
        "densenet121", growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, bn_size=1, num_classes=4
    )
    v = models.random_variables(dn, (1, 64, 64, 3), seed=3)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
    target = jnp.array([0, 3])

    @jax.jit
    def run(vv, xx):
        a = cam.activation_and_gradient(dn, vv, xx, target, "relu")[0]
        return registry.get("cam", relu=True)(dn, vv, xx, target), registry.get("grad-cam")(dn, vv, xx, target), a

    relu_cam, grad_cam, a = run(v, x)
    assert a.shape == (2, 2, 2, 8) and np.asarray(grad_cam).max() > 0
    _close(relu_cam, np.asarray(grad_cam) * 4)
    # eval-mode dropout between the pool and the linear layer is a pass-through
    _, xt = tiny
    head = DropoutHead()
    hv = _vars(head, (1, 8, 8, 2), seed=2)
    a, _, _ = cam.activation_and_gradient(head, hv, xt, 1, "act")
    w = np.asarray(hv["params"]["fc"]["kernel"][:, 1], np.float64)
    raw = np.einsum("nhwc,c->nhw", np.asarray(a, np.float64), w)
    _close(registry.get("cam", layer="act")(head, hv, xt, 1), raw)


class TwoDenseHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(4, 3, padding=1, name="conv")(x))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        h = layers.ReLU(name="relu")(layers.dense(6, name="fc1")(h))
        return layers.dense(N_CLASSES, name="fc2")(h)


def _trace(method, model, variables, x, target=0):
    """Trace only (the head checks run while tracing): ShapeDtypeStructs in, shapes out."""
    spec = lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype)  # noqa: E731
    return jax.eval_shape(lambda v, xx: method(model, v, xx, target), jax.tree_util.tree_map(spec, variables), spec(x))


def test_cam_rejects_heads_it_does_not_define(resnet, tiny):
    vgg = models.get("vgg16", width=1 / 16, num_classes=5, hidden=32, pool_size=1)
    xv = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    vv = jax.eval_shape(lambda xx: vgg.init(jax.random.key(0), xx), xv)
    msg = r"CAM \(Zhou et al\. 2016\) is defined only.*'features\.29'.*3 linear layers.*grad-cam"
    with pytest.raises(ValueError, match=msg):
        _trace(registry.get("cam"), vgg, vv, xv)
    with pytest.raises(ValueError, match=r"after layer 'avgpool'.*3 linear layers.*'flatten', is not a global"):
        _trace(registry.get("cam", layer="avgpool"), vgg, vv, xv)
    model, variables, x = resnet
    with pytest.raises(ValueError, match=r"after layer 'layer3'.*'layer4\.0\.conv1', is not a global Adaptive"):
        _trace(registry.get("cam", layer="layer3"), model, variables, x)
    with pytest.raises(ValueError, match=r"CAM layer 'fc' must output an NHWC feature map"):
        _trace(registry.get("cam", layer="fc"), model, variables, x)
    nets, xt = tiny
    m, v = nets["flatten"]
    with pytest.raises(ValueError, match=r"'flatten', is not a global AdaptiveAvgPool2d"):
        _trace(registry.get("cam"), m, v, xt)
    head = TwoDenseHead()
    hv = _vars(head, (1, 8, 8, 2), seed=1)
    with pytest.raises(ValueError, match=r"2 linear layers \(fc1, fc2\).*more than one linear layer"):
        _trace(registry.get("cam", layer="act"), head, hv, xt)
    # the accepted heads trace (ResNet) and the map has the input's spatial size
    assert _trace(registry.get("cam"), model, variables, x).shape == (2, 96, 96)


# --------------------------------------------------------------------------------------
# XGrad-CAM and Layer-CAM against numpy formulas
# --------------------------------------------------------------------------------------


def _xgrad_ref(a, g):
    s = a.sum((1, 2), keepdims=True)
    w = np.where(s != 0, (a * g).sum((1, 2), keepdims=True) / np.where(s != 0, s, 1), 0)
    return (w * a).sum(-1)


def _up(m, size=(8, 8)):
    return np.asarray(cam.upsample_bilinear(jnp.asarray(m, jnp.float32), size), np.float64)


@pytest.mark.parametrize("head", ["flatten", "pool"])
def test_xgrad_cam_direct_formula(tiny, head):
    nets, x = tiny
    model, variables = nets[head]
    acts, tail1, tail2 = _explicit(variables["params"], head)
    a1, a2 = acts(x)
    targets = [1, 2]
    for layer, a, tail in (("act2", a2, tail2), ("act1", a1, tail1)):
        g = _grad_of(tail, a, targets)
        a = np.asarray(a, np.float64)
        pre = _xgrad_ref(a, g)
        assert pre.max() > 0
        out = registry.get("xgrad-cam", layer=layer)(model, variables, x, jnp.array(targets))
        _close(out, _up(np.maximum(pre, 0)))
    # eps as in pytorch-grad-cam
    g = _grad_of(tail2, a2, targets)
    a = np.asarray(a2, np.float64)
    w = (a * g).sum((1, 2), keepdims=True) / (a.sum((1, 2), keepdims=True) + 1e-7)
    _close(registry.get("xgrad-cam", eps=1e-7)(model, variables, x, jnp.array(targets)),
           _up(np.maximum((w * a).sum(-1), 0)))
    # on a GAP head the gradient is constant per channel, so XGrad-CAM's weights equal Grad-CAM's
    if head == "pool":
        _close(registry.get("xgrad-cam")(model, variables, x, jnp.array(targets)),
               registry.get("grad-cam")(model, variables, x, jnp.array(targets)))


def _layercam_ref(a, g):
    return np.maximum((np.maximum(g, 0) * a).sum(-1), 0)


def test_layer_cam_single_layer_direct_formula(tiny):
    nets, x = tiny
    model, variables = nets["flatten"]
    acts, tail1, tail2 = _explicit(variables["params"], "flatten")
    a1, a2 = acts(x)
    targets = [0, 2]
    for layer, a, tail in (("act2", a2, tail2), ("act1", a1, tail1), (None, a2, tail2)):
        g = _grad_of(tail, a, targets)
        ref = _layercam_ref(np.asarray(a, np.float64), g)
        assert ref.max() > 0
        out = registry.get("layer-cam", layer=layer)(model, variables, x, jnp.array(targets))
        _close(out, _up(ref))
    # Layer-CAM differs from Grad-CAM where gradients vary over space
    gc = np.asarray(registry.get("grad-cam")(model, variables, x, jnp.array(targets)))
    lc = np.asarray(registry.get("layer-cam")(model, variables, x, jnp.array(targets)))
    assert np.abs(gc / gc.max() - lc / lc.max()).max() > 1e-2


@pytest.mark.parametrize("fuse", ["max", "mean"])
def test_layer_cam_fused_direct_formula(tiny, fuse):
    nets, x = tiny
    model, variables = nets["flatten"]
    acts, tail1, tail2 = _explicit(variables["params"], "flatten")
    a1, a2 = acts(x)
    targets = [2, 1]
    scaled = []
    for a, tail in ((a1, tail1), (a2, tail2)):
        m = _layercam_ref(np.asarray(a, np.float64), _grad_of(tail, a, targets))
        top = m.max((1, 2), keepdims=True)
        assert np.all(top > 0)
        scaled.append(_up(np.tanh(2.0 * m / top)))  # Eq. 9, gamma = 2, then upsampled
    ref = np.maximum(*scaled) if fuse == "max" else (scaled[0] + scaled[1]) / 2
    out = registry.get("layer-cam", layer=("act1", "act2"), fuse=fuse)(model, variables, x, jnp.array(targets))
    assert out.shape == (2, 8, 8)
    _close(out, ref)
    assert 0 <= float(np.asarray(out).min()) and float(np.asarray(out).max()) < 1
    # the two layers really are at different resolutions and both matter
    assert np.abs(scaled[0] - scaled[1]).max() > 1e-2
    # a list is accepted and normalised to a tuple (hashable, jit-static)
    assert registry.get("layer-cam", layer=["act1", "act2"]).layer == ("act1", "act2")


# --------------------------------------------------------------------------------------
# Score-CAM against a slow loop
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def score_net(tiny):
    """Pool-head net whose act2 channel 0 is dead (constant 0): conv2 bias -50."""
    nets, x = tiny
    model, variables = nets["pool"]
    params = jax.tree_util.tree_map(lambda l: l, variables["params"])
    params["conv2"] = dict(params["conv2"], bias=params["conv2"]["bias"].at[0].set(-50.0))
    return model, {"params": params}, x


def _score_cam_loop(model, variables, x, targets, baseline):
    """Slow reference: every sample, every channel, one forward pass (the authors' loop)."""
    a = np.asarray(taps.forward(model, variables, x, capture=["act2"])[1]["act2"], np.float64)
    n, size = x.shape[0], x.shape[1:3]
    maps, weights = [], []
    for i in range(n):
        base = 0.0
        if baseline == "zero":
            base = float(jax.nn.softmax(model.apply(variables, jnp.zeros_like(x[i : i + 1])))[0, targets[i]])
        total = np.zeros(size)
        ws = []
        for c in range(a.shape[-1]):
            up = _up(a[i : i + 1, :, :, c], size)[0]
            if up.max() == up.min():
                ws.append(0.0)
                continue
            mask = (up - up.min()) / (up.max() - up.min())
            p = jax.nn.softmax(model.apply(variables, x[i : i + 1] * jnp.asarray(mask[None, :, :, None], jnp.float32)))
            w = float(p[0, targets[i]]) - base
            ws.append(w)
            total += w * up
        maps.append(np.maximum(total, 0))
        weights.append(ws)
    return np.stack(maps), np.array(weights)


@pytest.mark.parametrize("baseline,chunks", [("none", (2, 5)), ("zero", (3,))])
def test_score_cam_matches_slow_loop(score_net, baseline, chunks):
    """C = 5 channels: chunk 5 divides it, 2 and 3 do not (the last chunk is padded)."""
    model, variables, x = score_net
    targets = jnp.array([1, 0])
    ref_map, ref_w = _score_cam_loop(model, variables, x, [1, 0], baseline)
    assert np.all(ref_w[:, 0] == 0)  # the dead channel is skipped
    assert ref_map.max() > 0
    if baseline == "zero":
        assert (ref_w[:, 1:] < 0).any() and (ref_w[:, 1:] > 0).any()
    for chunk in chunks:
        method = registry.get("score-cam", layer="act2", chunk_size=chunk, baseline=baseline)
        both = jax.jit(lambda v, xx: (method.channel_weights(model, v, xx, targets)[1], method(model, v, xx, targets)))
        w, maps = both(variables, x)
        assert w.shape == (2, 5)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
        _close(maps, ref_map)


def test_score_cam_seed_target_is_weighted_probability(score_net):
    model, variables, x = score_net
    seed = jnp.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    m = registry.get("score-cam", chunk_size=2)

    @jax.jit
    def run(v, xx):
        targets = (seed, jnp.array([0, 0]), jnp.array([1, 1]), jnp.array([2, 2]))
        return [m.channel_weights(model, v, xx, t)[1] for t in targets]

    w_seed, w0, w1, w2 = run(variables, x)
    np.testing.assert_allclose(w_seed[0], w1[0], rtol=1e-6)
    np.testing.assert_allclose(w_seed[1], 0.5 * (w0[1] + w2[1]), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# jit / vmap / batch independence, zoo models, errors
# --------------------------------------------------------------------------------------

METHODS = [
    ("cam", {}, "pool"),
    ("xgrad-cam", {}, "flatten"),
    ("layer-cam", {}, "flatten"),
    ("layer-cam", {"layer": ("act1", "act2")}, "flatten"),
    ("score-cam", {"chunk_size": 2}, "pool"),
]


@pytest.mark.parametrize("name,hp,head", METHODS)
def test_jit_vmap_batch_independence(tiny, name, hp, head):
    nets, x = tiny
    model, variables = nets[head]
    x3 = jnp.concatenate([x, x[:1] * -0.5])
    target = jnp.array([2, 0, 1])
    method = registry.get(name, **hp)
    batch, seeded = jax.jit(
        lambda v, xx: (method(model, v, xx, target), method(model, v, xx, jax.nn.one_hot(target, N_CLASSES)))
    )(variables, x3)
    assert batch.shape == (3, 8, 8) and batch.dtype == jnp.float32
    assert np.asarray(batch).max() > 0 and np.all(np.isfinite(np.asarray(batch)))
    np.testing.assert_allclose(seeded, batch, rtol=1e-5, atol=1e-6)
    one_by_one = jax.jit(jax.vmap(lambda xi, ti: method(model, variables, xi[None], ti[None])[0]))(x3, target)
    np.testing.assert_allclose(one_by_one, batch, rtol=1e-5, atol=1e-6)
    # a sample's map does not depend on the rest of the batch (here: sample 0 alone, eagerly)
    np.testing.assert_allclose(method(model, variables, x3[:1], target[:1])[0], batch[0], rtol=1e-5, atol=1e-6)


def test_zoo_models_run_jitted(resnet):
    model, variables, x = resnet
    target = jnp.array([0, 4])
    fused = registry.get("layer-cam", layer=("layer2", "layer3", "layer4"))
    maps = jax.jit(lambda v, xx: [m(model, v, xx, target) for m in (registry.get("xgrad-cam"), fused)])(variables, x)
    for out in maps:
        assert out.shape == (2, 96, 96) and np.all(np.isfinite(np.asarray(out))) and np.asarray(out).max() > 0
    vgg = models.get("vgg16", width=1 / 16, num_classes=5, hidden=32, pool_size=1)
    vv = models.random_variables(vgg, (1, 32, 32, 3), seed=4)
    xv = jnp.asarray(np.random.default_rng(4).normal(size=(1, 32, 32, 3)), jnp.float32)

    @jax.jit
    def run(v, xx):
        a, g, _ = cam.activation_and_gradient(vgg, v, xx, 1, "features.29")
        ms = [registry.get(n)(vgg, v, xx, 1) for n in ("layer-cam", "xgrad-cam")]
        return a, g, ms, registry.get("score-cam", chunk_size=12).channel_weights(vgg, v, xx, 1)[1]

    a, g, (lc, xg), w = run(vv, xv)
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    assert a.shape == (1, 2, 2, 32)
    _close(lc, _up(_layercam_ref(a, g), (32, 32)))
    _close(xg, _up(np.maximum(_xgrad_ref(a, g), 0), (32, 32)))
    # Score-CAM weights are target probabilities of masked inputs (0 for constant channels)
    w = np.asarray(w)
    assert w.shape == (1, 32) and np.all((w >= 0) & (w <= 1)) and w.max() > 0


def test_readable_errors(tiny):
    nets, x = tiny
    model, variables = nets["pool"]
    for name in ("cam", "xgrad-cam", "layer-cam", "score-cam"):
        with pytest.raises(ValueError, match=r"unknown layer name.*'act3'.*did you mean 'act2'.*named layers, e\.g\."):
            registry.get(name, layer="act3")(model, variables, x, 0)
    with pytest.raises(ValueError, match=r"unknown layer name.*'act9'"):
        registry.get("layer-cam", layer=("act1", "act9"))(model, variables, x, 0)
    for name in ("xgrad-cam", "layer-cam", "score-cam"):
        with pytest.raises(ValueError, match=r"CAM layer 'flatten' must output an NHWC feature map"):
            registry.get(name, layer="flatten")(model, variables, x, 0)
    with pytest.raises(ValueError, match="unknown Layer-CAM fusion 'sum'"):
        registry.get("layer-cam", layer=("act1", "act2"), fuse="sum")
    with pytest.raises(ValueError, match="at least one layer"):
        registry.get("layer-cam", layer=())
    with pytest.raises(ValueError, match="distinct"):
        registry.get("layer-cam", layer=("act1", "act1"))
    with pytest.raises(ValueError, match="gamma must be positive"):
        registry.get("layer-cam", gamma=0.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        registry.get("score-cam", chunk_size=0)
    with pytest.raises(ValueError, match="unknown Score-CAM baseline 'blur'"):
        registry.get("score-cam", baseline="blur")
    with pytest.raises(ValueError, match="NHWC batch"):
        registry.get("score-cam")(model, variables, x[0], 0)
    with pytest.raises(ValueError, match="out of range"):
        registry.get("cam")(model, variables, x, 7)
    assert {"cam", "xgrad-cam", "layer-cam", "score-cam"} <= set(registry.names())
