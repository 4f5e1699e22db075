"""Taps, preprocessing, the method registry and plain gradient on closed-form networks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models, viz
from xaijax.models import layers, preprocess, taps


class TwoLayer(nn.Module):
    """x -> relu(conv1x1(x)) -> global mean -> dense; small enough to differentiate by hand."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(2, 1, bias=False, name="conv")(x)
        h = layers.ReLU(name="relu")(h)
        h = layers.AdaptiveAvgPool2d(1, name="pool")(h)
        h = layers.Flatten(name="flatten")(h)
        return layers.dense(3, bias=False, name="fc")(h)


@pytest.fixture(scope="module")
def two_layer():
    model = TwoLayer()
    w1 = jnp.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]])  # (C_in=3, C_out=2)
    w2 = jnp.array([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])  # (2, 3)
    variables = {"params": {"conv": {"kernel": w1[None, None]}, "fc": {"kernel": w2}}}
    x = jax.random.normal(jax.random.key(1), (2, 4, 5, 3))
    return model, variables, x, w1, w2


def test_taps_capture_and_add_give_activation_gradient(two_layer):
    model, variables, x, w1, w2 = two_layer
    out, acts = taps.forward(model, variables, x, capture=["relu", "pool"])
    h = jax.nn.relu(jnp.einsum("nhwc,cd->nhwd", x, w1))
    np.testing.assert_allclose(acts["relu"], h, rtol=1e-6)
    np.testing.assert_allclose(out, h.mean((1, 2)) @ w2, rtol=1e-5, atol=1e-6)
    # d logit_c / d relu_activation = w2[:, c] / (H*W) at every location
    zero = jnp.zeros_like(h)
    g = jax.grad(lambda d: taps.forward(model, variables, x, add={"relu": d})[0][:, 2].sum())(zero)
    np.testing.assert_allclose(g, jnp.broadcast_to(w2[:, 2] / 20.0, h.shape), rtol=1e-6)


def test_taps_unknown_layer_is_a_readable_error(two_layer):
    model, variables, x, *_ = two_layer
    with pytest.raises(ValueError, match=r"unknown layer name.*'rleu'.*did you mean 'relu'"):
        taps.forward(model, variables, x, capture=["rleu"])
    assert taps.layer_names(model, variables, x) == ["conv", "relu", "pool", "flatten", "fc"]


class _ScaledReLU(layers.ReLU):
    """A subclass calling ``super().__call__``: one layer call, though two ``__call__`` frames."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)

    def half(self, x):
        return 0.5 * x


class _Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        r = _ScaledReLU(name="relu")
        return r.half(r(x)).sum(axis=(1, 2))


def test_intercept_calls_sees_each_outermost_call_once():
    x = jnp.array([[[[1.0, -2.0]]]])
    seen = []

    def on_call(name, module, call_next, args, kwargs):
        seen.append((name, type(module).__name__))
        return call_next(*args, **kwargs)

    with taps.intercept_calls(on_call):
        out = _Nested().apply({}, x)
    np.testing.assert_allclose(out, [[1.0, 0.0]])
    # the root module, then the subclass once (its super().__call__ and the method .half are not seen)
    assert seen == [("", "_Nested"), ("relu", "_ScaledReLU")]

    # a replacement that never calls call_next, as a bare interceptor for nn.intercept_methods
    with nn.intercept_methods(taps.call_interceptor(lambda name, m, call_next, a, k: call_next(*a, **k) if name == "" else -a[0])):
        np.testing.assert_allclose(_Nested().apply({}, x), [[-0.5, 1.0]])


def test_gradient_methods_closed_form(two_layer):
    model, variables, x, w1, w2 = two_layer
    target = jnp.array([0, 2])
    pre = jnp.einsum("nhwc,cd->nhwd", x, w1)
    # d out_t / dx[n,h,w,:] = sum_d w1[:, d] * 1[pre_d > 0] * w2[d, t] / (H*W)
    expected = jnp.einsum("cd,nhwd,nd->nhwc", w1, (pre > 0).astype(x.dtype), w2[:, target].T) / 20.0
    g = methods.input_gradient(model, variables, x, target)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
    sal = jax.jit(methods.get("gradient"), static_argnums=0)(model, variables, x, target)
    np.testing.assert_allclose(sal, jnp.abs(expected).max(-1), rtol=1e-5, atol=1e-7)
    gxi = methods.get("gradient-x-input")(model, variables, x, target)
    np.testing.assert_allclose(gxi, (expected * x).sum(-1), rtol=1e-5, atol=1e-6)
    # an explicit seed equals the int target; samples are independent under vmap
    seed = jax.nn.one_hot(target, 3)
    np.testing.assert_allclose(methods.get("gradient")(model, variables, x, seed), sal, rtol=1e-6)
    one = jax.vmap(lambda xi, ti: methods.get("gradient")(model, variables, xi[None], ti[None])[0])(x, target)
    np.testing.assert_allclose(one, sal, rtol=1e-6)


def test_targets_and_registry_errors():
    with pytest.raises(ValueError, match="out of range"):
        methods.as_seed(jnp.array([0, 7]), 5, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        methods.as_seed(jnp.ones((2, 4)), 5, 2)
    with pytest.raises(ValueError, match=r"NHWC batch of shape \(N, H, W, C\); got shape \(4, 4, 3\)"):
        methods.get("gradient")(None, None, jnp.ones((4, 4, 3)), 0)
    with pytest.raises(TypeError, match="floating point"):
        methods.get("gradient")(None, None, jnp.ones((1, 4, 4, 3), jnp.uint8), 0)
    with pytest.raises(ValueError, match="Did you mean gradient"):
        methods.get("gradiant")
    with pytest.raises(ValueError, match="bad hyperparameters"):
        methods.get("gradient", nonsense=1)
    assert {"gradient", "gradient-x-input"} <= set(methods.names())


def test_preprocess_round_trip_and_checks():
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    for conv in ("torchvision", "caffe", "none"):
        np.testing.assert_allclose(preprocess.denormalize(preprocess.normalize(x, conv), conv), x, atol=1e-5)
    np.testing.assert_allclose(
        preprocess.normalize(jnp.full((1, 1, 1, 3), 0.5), "torchvision")[0, 0, 0],
        (0.5 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        preprocess.normalize(jnp.ones((1, 1, 1, 3)), "caffe")[0, 0, 0], 255.0 - np.array([123.68, 116.779, 103.939]), rtol=1e-6
    )
    with pytest.raises(TypeError, match="Divide uint8 images by 255"):
        preprocess.check_images(np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        preprocess.check_images(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"got range \[2, 2\]"):
        preprocess.check_images(np.full((1, 4, 4, 3), 2.0, np.float32), unit_range=True)
    with pytest.raises(ValueError, match="unknown preprocessing convention"):
        preprocess.normalize(x, "bgr")
    names = preprocess.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"


def test_load_image_resizes_and_crops(tmp_path):
    from PIL import Image

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255  # right half white
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = preprocess.load_image(tmp_path / "a.png", size=32, resize=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    # centre crop of a 64x32 resize: left half dark, right half bright
    assert img[:, :12].max() < 0.05 and img[:, 20:].min() > 0.95
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        preprocess.load_image(tmp_path / "b.png")


def test_viz_overlay_and_atomic_png(tmp_path):
    img = np.zeros((6, 6, 3))
    m = np.zeros((6, 6))
    m[2, 3] = 1.0
    o = viz.overlay(img, m, alpha=1.0)
    assert o.shape == (6, 6, 3)
    assert np.argmax(o[..., 0]) == 2 * 6 + 3  # jet: the maximum is red
    p = viz.save_png(tmp_path / "o.png", o)
    from PIL import Image

    assert np.asarray(Image.open(p)).shape == (6, 6, 3)
    assert [f.name for f in tmp_path.iterdir()] == ["o.png"]


def test_model_registry_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet5'.*Did you mean"):
        models.get("resnet5")
    assert {"vgg16", "resnet50", "densenet121", "inception_v3"} <= set(models.names())
    assert models.spec("vgg16").cam_layer == "features.29"
    assert models.spec("resnet50").cam_layer == "layer4"


def test_random_variables_he_normal_and_deterministic():
    model = models.get("resnet18", num_classes=3, width=8)
    v = models.random_variables(model, (1, 32, 32, 3), seed=4)
    k = np.asarray(v["params"]["layer3"]["0"]["conv2"]["kernel"])  # 3x3x32x32: fan_in 288
    assert k.shape == (3, 3, 32, 32)
    assert abs(k.std() - np.sqrt(2 / 288)) < 0.01
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], np.ones(8))
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], np.zeros(3))
    w = models.random_variables(model, (1, 32, 32, 3), seed=4)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v, w)
    assert jax.jit(model.apply)(v, jnp.ones((2, 32, 32, 3))).shape == (2, 3)


def test_taps_capture_batchnorm_layers():
    """BatchNorm layers are tapped with their eval-mode output (one call per layer)."""
    model = models.get("resnet18", num_classes=3, width=8)
    v = models.random_variables(model, (1, 32, 32, 3), seed=2)
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    _, acts = taps.forward(model, v, x, capture=["bn1", "conv1"])
    st = v["batch_stats"]["bn1"]
    p = v["params"]["bn1"]
    want = (acts["conv1"] - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(acts["bn1"], want, rtol=1e-5, atol=1e-5)


def test_check_inputs_names_the_dtype_to_cast_to():
    from xaijax.methods._core import check_inputs

    with pytest.raises(TypeError, match=r"x has dtype bfloat16.*x\.astype\(jnp\.float32\)"):
        check_inputs(jnp.zeros((1, 8, 8, 3), jnp.bfloat16))
    with pytest.raises(TypeError, match="x must be floating point"):
        check_inputs(jnp.zeros((1, 8, 8, 3), jnp.int32))
    check_inputs(jnp.zeros((1, 8, 8, 3), jnp.float32))  # accepted
