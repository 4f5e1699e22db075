"""RSP and c*RSP: stage 1 against numpy closed forms, the stage-2 rules against hand numbers
and a loop-based numpy implementation, conservation of the seed total on tiny VGG/ResNet,
the engine's ``seed_at``, jit/vmap/batch independence and readable errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_helpers import as_f64 as _f64

from xaijax import models
from xaijax.methods import rsp
from xaijax.models import layers as L
from xaijax.models import taps
from xaijax.propagation import LayerView, composites, relevance, relevance_trace
from xaijax.propagation.rules import ConvGeometry
from xaijax.propagation.rsp_rules import RSPAdd, RSPConv, RSPInput, RSPShifted


# ----------------------------------------------------------------- numpy references


def conv_np(x, k, stride=1, pad=0):
    """x (N, H, W, Ci), k (kh, kw, Ci, Co) -> (N, Ho, Wo, Co); zero padding, no bias."""
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
            out += np.einsum("nyxi,io->nyxo", patch, k[a, b])
    return out


def conv_t_np(s, k, x_shape, stride=1, pad=0):
    """The adjoint of ``conv_np(., k)`` applied to ``s`` (shape ``x_shape``)."""
    kh, kw = k.shape[:2]
    n, h, w, _ = x_shape
    ho, wo = s.shape[1:3]
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, k.shape[2]))
    for a in range(kh):
        for b in range(kw):
            xp[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride] += np.einsum(
                "nyxo,io->nyxi", s, k[a, b]
            )
    return xp[:, pad : pad + h, pad : pad + w]


def wgrad_np(x, r, kshape, stride=1, pad=0):
    """d/dk <conv_np(x, k), r> for ONE sample: (kh, kw, Ci, Co)."""
    kh, kw = kshape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = r.shape[1:3]
    g = np.zeros(kshape)
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
            g[a, b] = np.einsum("nyxi,nyxo->io", patch, r)
    return g


def safe(a, b):
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def sectional_np(x, R, kshape, stride=1, pad=0):
    """RSP's convolution rule, one sample at a time (written from the reference's steps)."""
    out = []
    for n in range(x.shape[0]):
        xn, rn = x[n : n + 1], R[n : n + 1]
        x1 = np.maximum(xn, 0)
        rpos, rneg = np.maximum(rn, 0), -np.minimum(rn, 0)
        gp, gn = wgrad_np(x1, rpos, kshape, stride, pad), wgrad_np(x1, rneg, kshape, stride, pad)
        za = conv_np(x1, gp, stride, pad) * (rpos != 0)
        zb = conv_np(x1, gn, stride, pad) * (rneg != 0)
        c1 = x1 * conv_t_np(safe(rpos, za), gp, x1.shape, stride, pad)
        c2 = x1 * conv_t_np(safe(rneg, zb), gn, x1.shape, stride, pad)
        if kshape[0] == 1:
            out.append(c1 - c2)
            continue
        c = 2 * (c1 - c2)
        nz = c != 0
        out.append(c - nz * rn.sum() / nz.sum())
    return np.concatenate(out)


def zbox_np(x, R, k, stride=1, pad=0):
    """z^B with per-sample bounds min(x), max(x); no bias."""
    out = []
    kp, kn = np.maximum(k, 0), np.minimum(k, 0)
    for n in range(x.shape[0]):
        xn, rn = x[n : n + 1], R[n : n + 1]
        lo, hi = np.full_like(xn, xn.min()), np.full_like(xn, xn.max())
        z = conv_np(xn, k, stride, pad) - conv_np(lo, kp, stride, pad) - conv_np(hi, kn, stride, pad)
        s = safe(rn, z)
        out.append(
            xn * conv_t_np(s, k, xn.shape, stride, pad)
            - lo * conv_t_np(s, kp, xn.shape, stride, pad)
            - hi * conv_t_np(s, kn, xn.shape, stride, pad)
        )
    return np.concatenate(out)


def _conv_view(kshape, stride=1, pad=0, name="conv", patches=False):
    """A LayerView of a bias-free convolution (for calling rules directly); ``patches``: with
    its ConvGeometry (RSPConv then takes the batched patch path, else the per-sample vmap)."""

    def op(k, x):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    k = jnp.zeros(kshape)
    geometry = ConvGeometry(tuple(kshape[:2]), (stride, stride), ((pad, pad), (pad, pad)), (1, 1)) if patches else None
    return LayerView(name, "conv", lambda x: op(k, x), op, k, None, geometry=geometry)


def _apply(rule, view, xs, R):
    """``rule.backward`` on a layer view, jitted (faster than op-by-op dispatch)."""
    return jax.jit(lambda xs, R: rule.backward(view, xs, None, R))(tuple(xs), R)


# ----------------------------------------------------------------------- tiny nets


class Tiny(nn.Module):
    """conv 3x3 -> relu -> conv 3x3/2 -> relu -> conv 1x1 -> relu [CAM layer] -> GAP -> fc."""

    cam_layer = "relu3"

    @nn.compact
    def __call__(self, x):
        h = L.ReLU(name="relu1")(L.conv(4, 3, 1, 1, name="conv1")(x))
        h = L.ReLU(name="relu2")(L.conv(5, 3, 2, 1, name="conv2")(h))
        h = L.ReLU(name="relu3")(L.conv(6, 1, 1, 0, name="conv3")(h))
        return L.dense(4, name="fc")(L.Flatten(name="flatten")(L.AdaptiveAvgPool2d(1, name="gap")(h)))


def _tiny_variables(seed=0):
    model = Tiny()
    v = models.random_variables(model, (1, 8, 8, 3), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for layer in ("conv1", "conv2", "conv3", "fc"):  # non-zero biases (RSP ignores them; the forward uses them)
        b = v["params"][layer]["bias"]
        v["params"][layer]["bias"] = jnp.asarray(rng.uniform(0.0, 0.3, b.shape), jnp.float32)
    return model, v


@pytest.fixture(scope="module")
def tiny():
    model, v = _tiny_variables()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, 3), np.float32))
    return model, v, x


def _tiny_forward_np(v, x):
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    a1 = np.maximum(conv_np(x, p["conv1"]["kernel"], 1, 1) + p["conv1"]["bias"], 0)
    a2 = np.maximum(conv_np(a1, p["conv2"]["kernel"], 2, 1) + p["conv2"]["bias"], 0)
    a3 = np.maximum(conv_np(a2, p["conv3"]["kernel"]) + p["conv3"]["bias"], 0)
    logits = a3.mean((1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]
    return p, (a1, a2, a3), logits


def _cam_np(a3, W, cls):
    """Stage 1 with the closed-form gradient of GAP + dense: dS_c/dA = W[:, c] / (h w)."""
    h, w = a3.shape[1:3]
    cam = a3 * W[:, cls].T[:, None, None, :] / (h * w)
    return cam / (cam.max(axis=(1, 2, 3), keepdims=True) + 1e-9)


# -------------------------------------------------------------------------- stage 1


def test_stage1_is_the_per_channel_gradient_activation_map(tiny, x64):
    model, v, x = tiny
    v, x = _f64(v), _f64(x)
    xn = np.asarray(x)
    p, (_, _, a3), _ = _tiny_forward_np(v, xn)
    target = np.array([0, 3, 2])
    assert rsp.rsp_layer(model) == "relu3"
    seed = jax.jit(lambda v, x, t: rsp.RSP().seed(model, v, x, t)[1])(v, x, jnp.asarray(target))
    expected = _cam_np(a3, p["fc"]["kernel"], target)
    np.testing.assert_allclose(np.asarray(seed), expected, rtol=1e-10, atol=1e-12)
    # per-sample normalisation: the maximum of every sample's map is 1 / (1 + 1e-9 / max)
    assert np.all(np.abs(np.asarray(seed).max((1, 2, 3)) - 1.0) < 1e-6)


def test_contrastive_seed_matches_numpy_transcription_of_relative_gam(tiny, x64):
    model, v, x = tiny
    v, x = _f64(v), _f64(x)
    xn = np.asarray(x)
    p, (_, _, a3), logits = _tiny_forward_np(v, xn)
    W = p["fc"]["kernel"]
    target = np.array([1, 0, 3])
    for hostile in (None, 2):
        rows = []
        for n in range(3):
            others = [c for c in range(4) if c != target[n]]
            if hostile is not None:
                others = sorted(others, key=lambda c: -logits[n, c])[:hostile]
            cams = {c: _cam_np(a3[n : n + 1], W, np.array([c]))[0] for c in [target[n]] + others}
            rel = cams[target[n]] * len(others) - sum(cams[c] for c in others)
            pos = np.maximum(rel, 0)
            pos = pos / (pos.sum() + 1e-9)
            neg = np.minimum(rel, 0)
            neg = neg / neg.min() if neg.min() < 0 else neg  # (the reference: 0 / 0 = NaN)
            neg = neg / (neg.sum() + 1e-9) * pos.sum()
            s = (pos - neg).sum(-1)
            pv = (s > 0) * s
            nv = (s <= 0) * s
            pv = pv / (pv.sum() + 1e-9) * 2
            nv = nv / (nv.sum() + 1e-9)
            rows.append(np.broadcast_to(((pv - nv) / rel.shape[-1])[..., None], rel.shape))
        method = rsp.ContrastiveRSP(hostile=hostile, chunk=2)
        seed = jax.jit(lambda v, x, t: method.seed(model, v, x, t)[1])(v, x, jnp.asarray(target))
        np.testing.assert_allclose(np.asarray(seed), np.stack(rows), rtol=1e-9, atol=1e-12)
        # every channel holds the same spatial map; the total is 2 - 1 = 1 (up to the 1e-9 terms),
        # or 2 where the channel-summed map has no negative part
        has_neg = np.array([(r.sum(-1) < 0).any() for r in rows])
        np.testing.assert_allclose(np.asarray(seed.sum((1, 2, 3))), 2.0 - has_neg, atol=1e-6)
        assert has_neg.any()


# ------------------------------------------------------------- stage 2: the rules


@pytest.mark.parametrize("patches", [False, True], ids=["vmap", "patches"])
def test_rsp_conv_rule_hand_numbers_pointwise_and_shifted(x64, patches):
    # 1x1 kernel, 2 input channels (one input negative), 1 output channel, relevance +2 / -1:
    # x1 = [(1, 2), (3, 0)]; G+ = 2 (1, 2) = (2, 4); G- = 1 (3, 0); Za = 10, Zb = 9
    x = jnp.asarray([[[[1.0, 2.0], [3.0, -1.0]]]])  # (1, 1, 2, 2)
    R = jnp.asarray([[[[2.0], [-1.0]]]])  # (1, 1, 2, 1)
    (r,) = _apply(RSPConv(), _conv_view((1, 1, 2, 1), patches=patches), (x,), R)
    np.testing.assert_allclose(np.asarray(r)[0, 0], [[0.4, 1.6], [-1.0, 0.0]], atol=1e-12)
    # (2, 1) kernel (height 2: the doubled-and-shifted path), x = (2, 1), R = 3:
    # G+ = (6, 3); Z = 15; C = 2 (2.4, 0.6) = (4.8, 1.2); shift 3 / 2 -> (3.3, -0.3)
    x = jnp.asarray([[[[2.0]], [[1.0]]]])  # (1, 2, 1, 1)
    R = jnp.asarray([[[[3.0]]]])
    (r,) = _apply(RSPConv(), _conv_view((2, 1, 1, 1), patches=patches), (x,), R)
    np.testing.assert_allclose(np.asarray(r).ravel(), [3.3, -0.3], atol=1e-12)
    # negative relevance through the same kernel: C = -2 (2.4, 0.6); shift -3 / 2 -> (-3.3, 0.3)
    (r,) = _apply(RSPConv(), _conv_view((2, 1, 1, 1), patches=patches), (x,), -R)
    np.testing.assert_allclose(np.asarray(r).ravel(), [-3.3, 0.3], atol=1e-12)


@pytest.mark.parametrize("patches", [False, True], ids=["vmap", "patches"])
@pytest.mark.parametrize("kshape,stride,pad", [((3, 3, 3, 4), 1, 1), ((3, 3, 3, 4), 2, 1), ((1, 1, 3, 4), 1, 0), ((1, 1, 3, 4), 2, 0)])
def test_rsp_conv_rule_matches_loop_reference_with_signed_inputs(x64, kshape, stride, pad, patches):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 3))  # negative inputs are clamped by the rule
    view = _conv_view(kshape, stride, pad, patches=patches)
    out_shape = view.fn(jnp.asarray(x)).shape
    R = rng.standard_normal(out_shape) * (rng.random(out_shape) < 0.8)  # signed, some zeros
    rule = jax.jit(lambda x, R: RSPConv().backward(view, (x,), None, R)[0])
    r = rule(jnp.asarray(x), jnp.asarray(R))
    np.testing.assert_allclose(np.asarray(r), sectional_np(x, R, kshape, stride, pad), rtol=1e-9, atol=1e-12)
    if kshape[0] > 1:  # the uniform shift restores the total exactly
        np.testing.assert_allclose(np.asarray(r).sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-9)
    else:  # 1x1: relevance of pixels whose inputs are all <= 0 (Za = 0) is dropped, the rest is kept
        live = (np.maximum(x, 0).sum(-1, keepdims=True) > 0)[:, ::stride, ::stride]
        np.testing.assert_allclose(np.asarray(r).sum((1, 2, 3)), (R * live).sum((1, 2, 3)), rtol=1e-9)
    # an all-positive seed: the pointwise path keeps every share >= 0, the doubled-and-shifted
    # path turns the smallest (near-zero) shares negative
    rp = rule(jnp.asarray(x), jnp.asarray(np.abs(R)))
    assert (float(rp.min()) < 0) == (kshape[0] > 1)


@pytest.mark.parametrize(
    "kernel,strides,padding,dilation",
    [((3, 3), 1, "SAME", 1), ((3, 3), 2, 1, 1), ((1, 1), 2, 0, 1), ((3, 3), 1, "VALID", 2), ((1, 3), 1, (0, 1), 1), ((2, 3), (2, 1), ((0, 1), (2, 0)), 1), ((3, 3), 2, "SAME", 1)],
)
def test_conv_geometry_patches_times_kernel_is_the_convolution(x64, kernel, strides, padding, dilation):
    """The engine's ConvGeometry of an nn.Conv: patches @ kernel reproduces the layer exactly
    (offset-major, then input channel, as a flattened HWIO kernel)."""
    from xaijax.propagation.engine import conv_geometry

    conv = nn.Conv(4, kernel, strides=strides, padding=padding, kernel_dilation=dilation, use_bias=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)))
    k = jnp.asarray(rng.standard_normal((*kernel, 3, 4)))
    y = conv.apply({"params": {"kernel": k}}, x)
    g = conv_geometry(conv)
    assert g is not None and g.out_spatial(x.shape[1:3]) == y.shape[1:3]
    p = g.patches(x)
    np.testing.assert_allclose(np.asarray(p @ k.reshape(-1, 4)), np.asarray(y), rtol=1e-12, atol=1e-12)
    # layers the patch path does not describe fall back to the per-sample vmap
    assert conv_geometry(nn.Conv(4, (3, 3), feature_group_count=3)) is None
    assert conv_geometry(nn.Conv(4, (3, 3), padding="CIRCULAR")) is None
    assert conv_geometry(nn.Conv(4, (3, 3), input_dilation=2)) is None
    assert conv_geometry(nn.Conv(4, (3, 3), padding=((-1, 0), (1, 1)))) is None
    assert conv_geometry(nn.Dense(4)) is None


def test_input_pool_and_add_rules_hand_numbers(x64):
    # z^B with the image's own bounds: 1x1 kernel w = (1, -1), x = (0.5, -1) and (2, 0)
    x = jnp.asarray([[[[0.5, -1.0], [2.0, 0.0]]]])  # lo = -1, hi = 2
    R = jnp.asarray([[[[1.0], [2.0]]]])
    view = _conv_view((1, 1, 2, 1))
    view = LayerView("c", "conv", view.fn, view.op, jnp.asarray([[[[1.0], [-1.0]]]]), None)
    (r,) = _apply(RSPInput(), view, (x,), R)
    # position 0: terms (0.5 - (-1)) * 1 = 1.5 and (-1) * (-1) - 2 * (-1) = 3; Z = 4.5
    # position 1: (2 + 1) = 3 and 0 + 2 = 2; Z = 5
    np.testing.assert_allclose(np.asarray(r)[0, 0], [[1.5 / 4.5, 3 / 4.5], [2 * 3 / 5, 2 * 2 / 5]], atol=1e-12)
    # residual sum: shares max(x, 0) + 1e-9
    a, b = jnp.asarray([[3.0, -2.0]]), jnp.asarray([[1.0, 0.0]])
    add = LayerView("add", "add", lambda u, w: u + w)
    ra, rb = _apply(RSPAdd(), add, (a, b), jnp.asarray([[8.0, 5.0]]))
    np.testing.assert_allclose(np.asarray(ra), [[6.0, 2.5]], rtol=1e-9)  # two zero inputs: equal shares
    np.testing.assert_allclose(np.asarray(rb), [[2.0, 2.5]], rtol=1e-9)
    # max pooling on x + 1e-9: winner takes all; average pooling: shares x + 1e-9
    pool = LayerView("pool", "maxpool", lambda u: u.max(-1, keepdims=True))
    (rp,) = _apply(RSPShifted(), pool, (jnp.asarray([[1.0, 3.0, 2.0]]),), jnp.asarray([[6.0]]))
    np.testing.assert_allclose(np.asarray(rp), [[0.0, 6.0, 0.0]], atol=1e-12)
    avg = LayerView("avg", "avgpool", lambda u: u.mean(-1, keepdims=True))
    (ra,) = _apply(RSPShifted(), avg, (jnp.asarray([[0.0, 0.0]]),), jnp.asarray([[4.0]]))
    np.testing.assert_allclose(np.asarray(ra), [[2.0, 2.0]], rtol=1e-9)  # all-zero inputs share equally


def test_stage2_on_tiny_net_matches_numpy_layer_by_layer(tiny, x64):
    """RSP end to end on conv3x3 (input, z^B) -> conv3x3/2 (shifted) -> conv1x1 (pointwise)."""
    model, v, x = tiny
    v, x = _f64(v), _f64(x)
    xn = np.asarray(x)
    p, (a1, a2, a3), _ = _tiny_forward_np(v, xn)
    target = np.array([2, 1, 0])
    R3 = _cam_np(a3, p["fc"]["kernel"], target)
    R2 = sectional_np(a2, R3, p["conv3"]["kernel"].shape)
    R1 = sectional_np(a1, R2, p["conv2"]["kernel"].shape, 2, 1)
    R0 = zbox_np(xn, R1, p["conv1"]["kernel"], 1, 1)

    @jax.jit
    def run(v, x, target, R3):
        return rsp.RSP()(model, v, x, target), relevance_trace(model, v, x, R3, composites.rsp(), seed_at="relu3")[1]

    maps, trace = run(v, x, jnp.asarray(target), jnp.asarray(R3))
    np.testing.assert_allclose(np.asarray(maps), R0.sum(-1), rtol=1e-8, atol=1e-12)
    # the map's total is the seed's total
    np.testing.assert_allclose(np.asarray(maps).sum((1, 2)), R3.sum((1, 2, 3)), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(trace["conv3"].inputs[0]), R2, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(np.asarray(trace["conv2"].inputs[0]), R1, rtol=1e-8, atol=1e-12)
    assert float(jnp.abs(trace["fc"].output).max()) == 0.0  # above the seed: nothing propagates


# ------------------------------------------------------------- zoo: conservation

ZOO = {
    "vgg11": (dict(num_classes=5, width=1 / 16, hidden=16, pool_size=1), 32, "features.19"),
    "resnet18": (dict(num_classes=5, width=8, layers=(1, 1, 1, 1)), 32, "layer4"),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_seed_total_is_conserved_layer_by_layer_on_tiny_zoo_models(name):
    kw, size, layer = ZOO[name]
    model = models.get(name, **kw)
    v = models.random_variables(model, (1, size, size, 3), seed=4)
    if name == "resnet18":  # non-trivial BatchNorms (scale, variance, shift)
        rng = np.random.default_rng(5)

        def f(path, a):
            last = getattr(path[-1], "key", None)
            if last in ("scale", "var"):
                return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
            if last in ("bias", "mean"):
                return jnp.asarray(rng.uniform(-0.2, 0.2, a.shape), a.dtype)
            return a

        v = jax.tree_util.tree_map_with_path(f, v)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, size, size, 3), np.float32))
    target = jnp.array([1, 4])
    assert rsp.rsp_layer(model) == layer
    assert rsp.rsp_layer(models.get("vgg16")) == "features.29" and rsp.rsp_layer(models.get("resnet50")) == "layer4"
    seed = jax.jit(lambda v, x, t: rsp.RSP().seed(model, v, x, t)[1])(v, x, target)
    assert float(seed.min()) < 0 < float(seed.max())  # a signed seed

    @jax.jit
    def run(v, x, seed):
        return relevance_trace(model, v, x, seed, composites.rsp(), seed_at=layer)

    rx, trace = run(v, x, seed)
    total = np.asarray(seed.sum((1, 2, 3)))
    scale = float(jnp.abs(seed).sum((1, 2, 3)).max())
    kinds = set()
    for lr in trace.values():
        tin, tout = lr.totals()
        if float(jnp.abs(lr.output).max()) > 0:
            kinds.add(lr.kind)
        np.testing.assert_allclose(np.asarray(tin), np.asarray(tout), atol=2e-5 * scale, err_msg=lr.name)
    np.testing.assert_allclose(np.asarray(rx.sum((1, 2, 3))), total, atol=5e-5 * scale)
    expected = {"vgg11": {"conv", "relu", "maxpool"}, "resnet18": {"conv", "relu", "maxpool", "add", "batchnorm"}}[name]
    assert expected <= kinds
    assert "dense" not in kinds  # the classifier is above the CAM layer
    # kernels > 1x1 turn near-zero relevance negative: the input map has both signs
    assert float(rx.sum(-1).min()) < 0 < float(rx.sum(-1).max())


# ------------------------------------------------------------------ engine: seed_at


class BiasFree(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = L.ReLU(name="relu1")(L.conv(4, 3, 1, 1, bias=False, name="conv1")(x))
        h = L.MaxPool2d(2, name="pool")(h)
        h = L.ReLU(name="relu2")(L.conv(5, 3, 1, 1, bias=False, name="conv2")(h))
        return L.dense(3, bias=False, name="fc")(L.Flatten(name="flatten")(h))


def test_seed_at_starts_the_backward_pass_at_a_layer(x64):
    """LRP-0 seeded at a layer equals gradient x input of <layer output, seed> (bias-free
    ReLU net); reading at an intermediate layer and a callable seed work with it."""
    model = BiasFree()
    v = _f64(models.random_variables(model, (1, 8, 8, 3), seed=7))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 8, 3)))
    c = jnp.asarray(np.random.default_rng(9).standard_normal((2, 4, 4, 5)))
    @jax.jit
    def run(v, x):
        def inner(xx):
            _, acts = taps.forward(model, v, xx, capture=["relu2"])
            return (acts["relu2"] * c).sum(), acts["relu2"]

        g, a = jax.grad(inner, has_aux=True)(x)
        got = relevance(model, v, x, a * c, "zero", seed_at="relu2")  # an array seed
        got_fn = relevance(model, v, x, lambda out: out * c, "zero", seed_at="relu2")  # a function of the output
        at_pool = relevance(model, v, x, lambda out: out * c, "zero", seed_at="relu2", read_at="pool")
        _, trace = relevance_trace(model, v, x, lambda out: out * c, "zero", seed_at="relu2")
        return x * g, got, got_fn, at_pool, trace["pool"].output, (a * c).sum((1, 2, 3))

    expected, got, got_fn, at_pool, traced_pool, total = run(v, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got_fn), np.asarray(expected), rtol=1e-9, atol=1e-12)
    assert at_pool.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(np.asarray(at_pool), np.asarray(traced_pool), rtol=1e-9, atol=1e-12)
    # LRP-0 on the bias-free conv2 conserves: the pool output receives the seed's total
    np.testing.assert_allclose(np.asarray(at_pool.sum((1, 2, 3))), np.asarray(total), rtol=1e-9)
    seed = c
    with pytest.raises(ValueError, match="unknown layer name 'relu9'"):
        relevance(model, v, x, seed, "zero", seed_at="relu9")
    with pytest.raises(ValueError, match=r"layer 'relu2'.s output shape \(2, 4, 4, 5\)"):
        relevance(model, v, x, seed[:, :2], "zero", seed_at="relu2")


# ---------------------------------------------------------- jit, vmap, independence


@pytest.mark.parametrize("method", [rsp.RSP(), rsp.ContrastiveRSP(hostile=2)], ids=["rsp", "contrastive-rsp"])
def test_jit_vmap_and_sample_independence(tiny, method):
    model, v, x = tiny
    target = jnp.array([0, 2, 1])

    @jax.jit
    def run(v, x, target):
        batched = method(model, v, x, target)
        one_by_one = jax.vmap(lambda xi, ti: method(model, v, xi[None], ti)[0])(x, target)
        changed = method(model, v, x.at[0].set(-2.0 * x[0]), target)
        return batched, one_by_one, changed

    maps, one_by_one, changed = run(v, x, target)
    assert maps.shape == (3, 8, 8) and maps.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(maps)))
    scale = float(jnp.abs(maps).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(one_by_one), np.asarray(maps), atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(changed[1:]), np.asarray(maps[1:]), atol=1e-6 * scale)
    assert not np.allclose(np.asarray(changed[0]), np.asarray(maps[0]), atol=1e-3 * scale)


def test_registry_and_errors(tiny):
    from xaijax.methods import registry

    model, v, x = tiny
    assert isinstance(registry.get("rsp"), rsp.RSP)
    assert registry.get("contrastive-rsp", hostile=1) == rsp.ContrastiveRSP(hostile=1)
    assert registry.get("rsp", layer="relu2").layer == "relu2"
    with pytest.raises(ValueError, match="out of range"):
        rsp.RSP()(model, v, x, 7)
    with pytest.raises(ValueError, match="out of range"):
        rsp.ContrastiveRSP()(model, v, x, jnp.array([0, 1, 4]))
    with pytest.raises(ValueError, match="class indices"):
        rsp.ContrastiveRSP()(model, v, x, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="hostile=4 exceeds the 3 classes"):
        rsp.ContrastiveRSP(hostile=4)(model, v, x, 0)
    with pytest.raises(ValueError, match="hostile must be None"):
        rsp.ContrastiveRSP(hostile=0)
    with pytest.raises(ValueError, match="unknown channel reduction"):
        rsp.RSP(reduce="mean")
    with pytest.raises(ValueError, match="NHWC"):
        rsp.RSP(layer="flatten")(model, v, x, 0)
    for name, kw in [
        ("densenet121", dict(num_classes=5, growth_rate=4, block_config=(2, 2), num_init_features=8)),
        ("inception_v3", dict(num_classes=5, width=1 / 16)),
    ]:
        with pytest.raises(ValueError, match="defined for the VGG and ResNet families"):
            rsp.RSP()(models.get(name, **kw), {}, jnp.zeros((1, 75, 75, 3)), 0)
    with pytest.raises(ValueError, match="applies to convolutions"):
        RSPConv().check("fc", "dense", [(1, 4)], (1, 2))


def test_contrastive_rsp_refuses_a_one_position_cam_layer():
    """At a 1x1 CAM layer every channel's normalised map is 1, target and hostile maps cancel and
    the seed is rounding noise (jit vs no-jit differed by up to 100 % of the map): a clear error."""
    import jax.numpy as jnp

    from xaijax import methods, models
    from xaijax.models.init import random_variables

    m = models.get("resnet18", num_classes=4, width=8, layers=(1, 1, 1, 1))
    v = random_variables(m, (1, 32, 32, 3))
    with pytest.raises(ValueError, match="more than one position"):
        methods.get("contrastive-rsp")(m, v, jnp.ones((1, 32, 32, 3)), 1)
    assert methods.get("contrastive-rsp")(m, v, jnp.ones((1, 64, 64, 3)), 1).shape == (1, 64, 64)
