"""FullGrad, NormGrad and CAMERAS against independent computations.

* resizers against ``torch.nn.functional.interpolate`` (bicubic, bilinear align_corners=True);
* FullGrad: completeness on piecewise-linear nets (incl. a tiny zoo ResNet with BatchNorm), and
  the saliency map against a hand-written functional network whose bias gradients are
  gradients w.r.t. explicit per-location bias tensors, post-processed as in the reference;
* NormGrad: the Frobenius norm of the weight gradient of an explicitly inserted, locally
  connected virtual identity layer (1x1, scaling, 3x3), single- and multi-layer;
* CAMERAS: torch-resized inputs, Grad-CAM's activation/gradient, torch-upsampled features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import models
from xaijax import imageops
from xaijax.methods import cam, gradient, registry
from xaijax.models import layers


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> maxpool -> conv -> ReLU ("act") -> flatten -> dense (all biased)."""

    cam_layer: str = "act"

    @nn.compact
    def __call__(self, x):
        h = layers.conv(4, 3, padding=1, name="conv1")(x)
        h = layers.batch_norm(False, name="bn1")(h)
        h = layers.ReLU(name="relu1")(h)
        h = layers.MaxPool2d(2, name="pool")(h)
        h = layers.conv(5, 3, padding=1, name="conv2")(h)
        h = layers.ReLU(name="act")(h)
        h = layers.Flatten(name="flatten")(h)
        return layers.dense(3, name="fc")(h)


class GapNet(nn.Module):
    """conv stride 2 -> ReLU ("act") -> global mean -> dense: accepts any input size."""

    cam_layer: str = "act"

    @nn.compact
    def __call__(self, x):
        h = layers.conv(6, 3, stride=2, padding=1, name="conv")(x)
        h = layers.ReLU(name="act")(h)
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(3, name="fc")(h)


def _maxpool2(h):
    """2x2/stride-2 max pooling with torch's gradient (``lax.reduce_window``), as the zoo's MaxPool2d."""
    from jax import lax

    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _vars(model, shape, seed):
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tmpl)


def _x(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _conv(x, k, stride=1):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    return model, _vars(model, (1, 8, 8, 2), seed=0), _x((2, 8, 8, 2), 1), jnp.array([0, 2])


# --------------------------------------------------------------------------------------
# resizing parity with torch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((3, 4), (7, 10)), ((5, 5), (3, 2)), ((1, 1), (3, 4)), ((4, 3), (1, 5))])
def test_resizers_match_torch(src, dst):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    img = np.random.default_rng(0).normal(size=(2,) + src + (3,)).astype(np.float32)
    t = torch.from_numpy(img).permute(0, 3, 1, 2)
    ref = f.interpolate(t, size=dst, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(imageops.resize(jnp.asarray(img), dst, "bicubic"), ref, rtol=1e-5, atol=1e-5)
    ref = f.interpolate(t[:, :1], size=dst, mode="bilinear", align_corners=True)[:, 0].numpy()
    out = imageops.resize(jnp.asarray(img[..., 0]), dst, "bilinear-align-corners")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# FullGrad
# --------------------------------------------------------------------------------------


def _tiny_functional(p, s, x, per_loc):
    """TinyNet by hand; ``per_loc`` holds zero per-location bias tensors for conv1, bn1, conv2, fc."""
    z1 = _conv(x, p["conv1"]["kernel"]) + p["conv1"]["bias"] + per_loc["conv1"]
    a = p["bn1"]["scale"] / jnp.sqrt(s["bn1"]["var"] + 1e-5)
    c = p["bn1"]["bias"] - s["bn1"]["mean"] * a
    h = jax.nn.relu(z1 * a + c + per_loc["bn1"])
    n, hh, ww, ch = h.shape
    h = _maxpool2(h)  # torch semantics: a tie's gradient goes to the first maximum
    h = jax.nn.relu(_conv(h, p["conv2"]["kernel"]) + p["conv2"]["bias"] + per_loc["conv2"])
    out = h.reshape(n, -1) @ p["fc"]["kernel"] + p["fc"]["bias"] + per_loc["fc"]
    return out, {"conv1": p["conv1"]["bias"], "bn1": c, "conv2": p["conv2"]["bias"], "fc": p["fc"]["bias"]}


def test_fullgrad_decomposition_and_map_match_hand_written_network(tiny):
    torch = pytest.importorskip("torch")
    model, v, x, target = tiny
    p, s = v["params"], v["batch_stats"]
    input_term, bias_terms, out = jax.jit(lambda vv, xx: gradient.fullgrad_decompose(model, vv, xx, target))(v, x)
    assert sorted(bias_terms) == ["bn1", "conv1", "conv2", "fc"]

    zeros = {"conv1": jnp.zeros((2, 8, 8, 4)), "bn1": jnp.zeros((2, 8, 8, 4)), "conv2": jnp.zeros((2, 4, 4, 5)),
             "fc": jnp.zeros((2, 3))}

    def score(xx, per_loc):
        o, biases = _tiny_functional(p, s, xx, per_loc)
        return o[jnp.arange(2), target].sum(), (o, biases)

    (gx, gb), (o, biases) = jax.jit(jax.grad(score, argnums=(0, 1), has_aux=True))(x, zeros)
    np.testing.assert_allclose(out, o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(input_term, gx * x, rtol=1e-5, atol=1e-6)
    for k in zeros:
        np.testing.assert_allclose(bias_terms[k], gb[k] * biases[k], rtol=1e-5, atol=1e-6)
    # completeness: the decomposition sums to the target logit, per sample
    total = np.asarray(gx * x).sum((1, 2, 3)) + sum(np.asarray(gb[k] * biases[k]).reshape(2, -1).sum(1) for k in zeros)
    np.testing.assert_allclose(total, np.asarray(o)[np.arange(2), target], rtol=1e-4, atol=1e-5)

    def post(t):  # the reference's _postProcess, in numpy (N, C, H, W)
        t = np.abs(t)
        t = t - t.reshape(len(t), -1).min(1)[:, None, None, None]
        return t / (t.reshape(len(t), -1).max(1)[:, None, None, None] + 1e-6)

    nchw = lambda t: np.asarray(t, np.float64).transpose(0, 3, 1, 2)
    expected = post(nchw(gx * x)).sum(1)
    for k in ("conv1", "bn1", "conv2"):  # spatial layers only (conv2: 4x4 -> 8x8, align_corners=True); dense layers enter only the decomposition
        up = torch.nn.functional.interpolate(
            torch.from_numpy(post(nchw(gb[k] * biases[k]))), size=(8, 8), mode="bilinear", align_corners=True
        )
        expected = expected + up.sum(1).numpy()
    method = registry.get("fullgrad")
    # vmapped one sample at a time (under jit): the reference's per-sample normalisation
    maps = jax.jit(jax.vmap(lambda xx, tt: method(model, v, xx[None], tt[None])[0]))(x, target)
    assert maps.shape == (2, 8, 8)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)


def test_fullgrad_completeness_on_zoo_resnet_with_batchnorm():
    model = models.get("resnet18", num_classes=5, width=4, layers=(1, 1, 1, 1))
    v = _vars(model, (1, 16, 16, 3), seed=3)
    x = _x((2, 16, 16, 3), 4)
    seed = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5)), jnp.float32)  # a float seed target
    input_term, bias_terms, out = jax.jit(lambda vv, xx: gradient.fullgrad_decompose(model, vv, xx, seed))(v, x)
    n_bn = sum(1 for k in bias_terms if ".bn" in k or k == "bn1" or "downsample.1" in k)
    assert n_bn == len(bias_terms) - 1 >= 8 and "fc" in bias_terms  # every BatchNorm once, the fc; no bias-free conv
    total = input_term.sum((1, 2, 3)) + sum(t.reshape(2, -1).sum(1) for t in bias_terms.values())
    np.testing.assert_allclose(total, (out * seed).sum(1), rtol=2e-4, atol=2e-4)


def test_fullgrad_rejects_train_mode_batchnorm():
    class TrainBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = layers.batch_norm(True, name="bn")(layers.conv(2, 1, name="conv")(x))
            return layers.dense(2, name="fc")(layers.Flatten(name="flatten")(h))

    model = TrainBN()
    v = _vars(model, (1, 4, 4, 1), seed=0)
    with pytest.raises(ValueError, match="BatchNorm layer 'bn' is in training mode"):
        registry.get("fullgrad")(model, v, _x((1, 4, 4, 1), 0), 0)


# --------------------------------------------------------------------------------------
# NormGrad
# --------------------------------------------------------------------------------------


def _virtual_layer_norms(p, s, x, target, layer, virtual):
    """Frobenius norm of dS/dW_u for a locally connected virtual layer inserted after ``layer``.

    W_u is the identity (conv1x1: C x C matrix; scaling: diagonal C; conv3x3: 9 x C x C with
    the identity at the centre tap), a different copy at every location u.
    """

    def insert(h, w):
        if virtual == "conv1x1":
            return jnp.einsum("nhwc,hwcd->nhwd", h, w)
        if virtual == "scaling":
            return h * w
        hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.stack([hp[:, i : i + h.shape[1], j : j + h.shape[2]] for i in range(3) for j in range(3)], 3)
        return jnp.einsum("nhwoc,hwocd->nhwd", patches, w)

    def net(w, x1):
        z1 = _conv(x1, p["conv1"]["kernel"]) + p["conv1"]["bias"]
        a = p["bn1"]["scale"] / jnp.sqrt(s["bn1"]["var"] + 1e-5)
        h = jax.nn.relu(z1 * a + p["bn1"]["bias"] - s["bn1"]["mean"] * a)
        if layer == "relu1":
            h = insert(h, w)
        n, hh, ww, ch = h.shape
        h = _maxpool2(h)  # torch semantics: a tie's gradient goes to the first maximum
        h = jax.nn.relu(_conv(h, p["conv2"]["kernel"]) + p["conv2"]["bias"])
        if layer == "act":
            h = insert(h, w)
        return (h.reshape(n, -1) @ p["fc"]["kernel"] + p["fc"]["bias"])[0, target]

    hw, c = (8, 4) if layer == "relu1" else (4, 5)
    eye = jnp.broadcast_to(jnp.eye(c), (hw, hw, c, c))
    w0 = {"conv1x1": eye, "scaling": jnp.ones((hw, hw, c)),
          "conv3x3": jnp.zeros((hw, hw, 9, c, c)).at[:, :, 4].set(eye)}[virtual]
    maps = []
    grad = jax.jit(jax.grad(net))
    for i in range(x.shape[0]):  # one sample at a time: the weight gradient is per sample
        gw = grad(w0, x[i : i + 1])
        maps.append(np.sqrt((np.asarray(gw, np.float64) ** 2).reshape(hw, hw, -1).sum(-1)))
    return np.stack(maps)


@pytest.mark.parametrize("virtual", ["conv1x1", "scaling", "conv3x3"])
def test_normgrad_is_norm_of_virtual_layer_weight_gradient(tiny, virtual):
    model, v, x, _ = tiny
    target = 1
    method = registry.get("normgrad", layer="relu1", virtual=virtual)
    maps = jax.jit(lambda vv, xx: method(model, vv, xx, target))(v, x)
    expected = _virtual_layer_norms(v["params"], v["batch_stats"], x, target, "relu1", virtual)
    assert expected.max() > 0
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)


def test_normgrad_multi_layer_is_product_of_normalised_maps(tiny):
    model, v, x, _ = tiny
    target = 2
    fn = jax.jit(lambda vv, xx: registry.get("normgrad", layer=("relu1", "act"))(model, vv, xx, target))
    maps = fn(v, x)
    e1 = _virtual_layer_norms(v["params"], v["batch_stats"], x, target, "relu1", "conv1x1")
    e2 = _virtual_layer_norms(v["params"], v["batch_stats"], x, target, "act", "conv1x1")
    e2 = np.asarray(cam.upsample_bilinear(jnp.asarray(e2), (8, 8)))
    mm = lambda m: (m - m.min((1, 2), keepdims=True)) / (m - m.min((1, 2), keepdims=True)).max((1, 2), keepdims=True)
    np.testing.assert_allclose(maps, mm(e1) * mm(e2), rtol=1e-4, atol=1e-6)
    # default layer = the CAM layer ("act"), upsampled and not normalised
    single = registry.get("normgrad")(model, v, x, target)
    np.testing.assert_allclose(single, e2, rtol=1e-4, atol=1e-6)


def test_normgrad_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown NormGrad virtual layer 'conv5x5'"):
        registry.get("normgrad", virtual="conv5x5")
    with pytest.raises(ValueError, match="distinct"):
        model = GapNet()
        registry.get("normgrad", layer=("act", "act"))(model, _vars(model, (1, 8, 8, 1), 0), _x((1, 8, 8, 1), 0), 0)


# --------------------------------------------------------------------------------------
# CAMERAS
# --------------------------------------------------------------------------------------


def test_cameras_matches_direct_multiscale_computation():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    model = GapNet()
    v = _vars(model, (1, 8, 8, 2), seed=6)
    x = _x((2, 8, 8, 2), 7)
    target = jnp.array([0, 2])
    scales = (1.0, 1.5, 2.0)
    method = registry.get("cameras", scales=scales)
    assert method.sizes((8, 8)) == [(8, 8), (12, 12), (16, 16)]
    maps = jax.jit(lambda vv, xx: method(model, vv, xx, target))(v, x)

    acc_a = acc_g = 0.0
    for r in (8, 12, 16):
        t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
        xr = t if r == 8 else f.interpolate(t, size=(r, r), mode="bicubic", align_corners=False)
        a, g, _ = cam.activation_and_gradient(model, v, jnp.asarray(xr.permute(0, 2, 3, 1).numpy()), target, "act")
        up = lambda z: f.interpolate(torch.from_numpy(np.asarray(z)).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
                                     align_corners=False).numpy()
        acc_a, acc_g = acc_a + up(a), acc_g + up(g)
    sal = np.maximum((acc_a / 3 * acc_g / 3).sum(1), 0)
    assert sal.max() > 0 and (sal == 0).any()  # the ReLU matters
    sal = sal - sal.min((1, 2), keepdims=True)
    sal = sal / sal.max((1, 2), keepdims=True)
    np.testing.assert_allclose(maps, sal, rtol=1e-4, atol=1e-5)
    assert cam.CAMERAS().sizes((224, 224)) == [(r, r) for r in range(224, 1000, 100)]


def test_cameras_rejects_bad_scales():
    with pytest.raises(ValueError, match="positive factors"):
        registry.get("cameras", scales=(1.0, 0.0))


# --------------------------------------------------------------------------------------
# shared conventions: registry, jit/vmap, per-sample independence
# --------------------------------------------------------------------------------------


def test_cameras_is_per_sample_and_vmappable():
    # (FullGrad is checked under vmap, NormGrad on a batch, against per-sample references above)
    model = GapNet()
    v = _vars(model, (1, 8, 8, 2), seed=8)
    x, target = _x((2, 8, 8, 2), 9), jnp.array([1, 0])
    method = registry.get("cameras", scales=(1.0, 2.0))
    batch = jax.jit(lambda vv, xx, tt: method(model, vv, xx, tt))(v, x, target)
    one = jax.vmap(lambda xx, tt: method(model, v, xx[None], tt[None])[0])(x, target)
    assert batch.shape == (2, 8, 8) and np.isfinite(np.asarray(batch)).all()
    assert np.asarray(batch).std() > 0
    np.testing.assert_allclose(batch, one, rtol=1e-4, atol=1e-5)
