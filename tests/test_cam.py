"""Grad-CAM and Grad-CAM++ against direct formulas, brute-force derivatives and torch resizing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import models
from xaijax.methods import cam, registry
from xaijax.models import layers, taps


class HeadNet(nn.Module):
    """conv3x3 -> ReLU ("act") -> [flatten | global mean] -> dense.

    Beyond ``act`` the score is linear in the activation, so the exponential-output closed
    form of Grad-CAM++ is exact. ``head="flatten"`` makes the gradient vary over space.
    """

    head: str = "flatten"
    num_classes: int = 3
    cam_layer: str = "act"  # picked up by cam.default_cam_layer

    @nn.compact
    def __call__(self, x):
        h = layers.conv(3, 3, padding=1, name="conv")(x)
        h = layers.ReLU(name="act")(h)
        if self.head == "flatten":
            h = layers.Flatten(name="flatten")(h)
        else:
            h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(self.num_classes, name="fc")(h)


def _vars(model, shape, seed, scale=0.5, dtype=jnp.float32):
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape) * scale, dtype), tmpl)


# --------------------------------------------------------------------------------------
# upsampling parity with torch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,dst", [((2, 3), (7, 10)), ((2, 2), (64, 64)), ((9, 8), (4, 5)), ((1, 1), (4, 3)), ((5, 4), (5, 4))]
)
def test_upsample_bilinear_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    maps = np.random.default_rng(0).normal(size=(2,) + src).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=dst, mode="bilinear", align_corners=False)
    out = cam.upsample_bilinear(jnp.asarray(maps), dst)
    assert out.shape == (2,) + dst
    np.testing.assert_allclose(out, ref[:, 0].numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# default layers
# --------------------------------------------------------------------------------------


def test_default_cam_layer_matches_model_registry():
    for name in models.names():
        assert cam.default_cam_layer(models.get(name)) == models.spec(name).cam_layer, name
    assert cam.default_cam_layer(models.get("vgg16")) == "features.29"
    assert cam.default_cam_layer(models.get("vgg16_bn")) == "features.42"
    assert cam.default_cam_layer(models.get("vgg11", width=0.25)) == "features.19"
    assert cam.default_cam_layer(models.get("resnet50")) == "layer4"
    assert cam.default_cam_layer(HeadNet()) == "act"

    class Anonymous(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match="no default CAM layer for a Anonymous; pass layer="):
        cam.default_cam_layer(Anonymous())


# --------------------------------------------------------------------------------------
# Grad-CAM on zoo models
# --------------------------------------------------------------------------------------


def test_grad_cam_resnet_equals_class_activation_map():
    """ResNet: layer4 -> global mean -> fc, so dS/dA_abk = W_fc[k, t] / (h w) everywhere and
    Grad-CAM = relu(sum_k W_fc[k, t] A_k) / (h w): the CAM of Zhou et al. from the fc weights."""
    model = models.get("resnet18", num_classes=5, width=8, layers=(1, 1, 1, 1))
    variables = models.random_variables(model, (1, 96, 96, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 96, 96, 3)), jnp.float32)
    target = jnp.array([2, 1])

    @jax.jit
    def run(v, xx):
        return registry.get("grad-cam")(model, v, xx, target), taps.forward(model, v, xx, capture=["layer4"])[1]["layer4"]

    maps, a = run(variables, x)
    assert a.shape == (2, 3, 3, 64)
    w = variables["params"]["fc"]["kernel"][:, target].T  # (N, K)
    pre = jnp.einsum("nhwk,nk->nhw", a, w) / 9.0
    assert np.all(np.asarray(pre).max((1, 2)) > 0) and np.all(np.asarray(pre).min((1, 2)) < 0)  # ReLU matters
    np.testing.assert_allclose(maps, cam.upsample_bilinear(jax.nn.relu(pre), (96, 96)), rtol=1e-4, atol=1e-6)


def test_grad_cam_vgg_direct_formula_with_taps():
    model = models.get("vgg11", num_classes=4, width=1 / 16, hidden=8, pool_size=2)
    variables = models.random_variables(model, (1, 64, 64, 3), seed=2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
    target = jnp.array([1, 2])
    layer = "features.19"  # vgg11's last ReLU, the default

    @jax.jit
    def run(v, xx):
        _, acts = taps.forward(model, v, xx, capture=[layer])
        a = acts[layer]
        score = lambda d: taps.forward(model, v, xx, add={layer: d})[0][jnp.arange(2), target].sum()
        g = jax.grad(score)(jnp.zeros_like(a))
        return registry.get("grad-cam")(model, v, xx, target), a, g

    maps, a, g = run(variables, x)
    assert a.shape == (2, 4, 4, 32)  # the last ReLU precedes the last max-pool
    expected = jax.nn.relu((g.mean((1, 2), keepdims=True) * a).sum(-1))
    assert np.abs(np.asarray(g)).max() > 0
    np.testing.assert_allclose(maps, cam.upsample_bilinear(expected, (64, 64)), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------
# Grad-CAM++ against brute-force derivatives
# --------------------------------------------------------------------------------------


def _brute_force_grad_cam_pp(model, variables, x1, t, layer="act"):
    """Paper's formula with Y = exp(S) and derivatives of Y taken numerically exactly by autodiff:
    d^kY/dA_ij^k along each coordinate direction (nested jax.grad, k = 1, 2, 3)."""
    _, acts = taps.forward(model, variables, x1, capture=[layer])
    a = acts[layer]

    def y(delta):
        return jnp.exp(taps.forward(model, variables, x1, add={layer: delta})[0][0, t])

    basis = jnp.eye(a.size, dtype=a.dtype).reshape((a.size,) + a.shape)

    def along(e):
        h = lambda s: y(s * e)
        d1 = jax.grad(h)
        d2 = jax.grad(d1)
        d3 = jax.grad(d2)
        return d1(0.0), d2(0.0), d3(0.0)

    d1, d2, d3 = (v.reshape(a.shape) for v in jax.vmap(along)(basis))
    sum_a = a.sum((1, 2), keepdims=True)
    denom = 2 * d2 + sum_a * d3
    alpha = jnp.where(d2 != 0, d2 / jnp.where(denom == 0, 1.0, denom), 0.0)
    w = (alpha * jax.nn.relu(d1)).sum((1, 2), keepdims=True)
    return jax.nn.relu((w * a).sum(-1))[0], jnp.exp(taps.forward(model, variables, x1)[0][0, t])


@pytest.mark.parametrize("head", ["flatten", "pool"])
def test_grad_cam_pp_equals_brute_force_higher_derivatives(head):
    with jax.enable_x64(True):
        model = HeadNet(head=head)
        variables = _vars(model, (1, 4, 4, 2), seed=4, scale=0.6, dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4, 2)), jnp.float64)
        targets = [0, 2]
        target = jnp.array(targets)
        maps = jax.jit(registry.get("grad-cam-plus-plus"), static_argnums=0)(model, variables, x, target)
        for i in range(2):
            ref, exp_s = jax.jit(lambda v, xi: _brute_force_grad_cam_pp(model, v, xi, targets[i]))(variables, x[i : i + 1])
            assert np.asarray(ref).max() > 1e-3  # a non-trivial map
            # the closed form drops the positive per-sample factor exp(S)
            np.testing.assert_allclose(maps[i] * exp_s, ref, rtol=1e-9, atol=1e-12)
        grad_cam = registry.get("grad-cam")(model, variables, x, target)
        if head == "flatten":  # alpha varies over space here, so the two methods differ
            assert np.abs(np.asarray(maps / maps.max() - grad_cam / grad_cam.max())).max() > 1e-3


def test_grad_cam_pp_eps_and_zero_gradients():
    model = HeadNet()
    variables = _vars(model, (1, 4, 4, 2), seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 4, 2)), jnp.float32)
    target = jnp.array([1, 0])
    # eps=1e-6: pytorch-grad-cam's formula, written out from A and dS/dA in numpy
    a, g, _ = cam.activation_and_gradient(model, variables, x, target, "act")
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    aij = g**2 / (2 * g**2 + a.sum((1, 2), keepdims=True) * g**3 + 1e-6)
    aij = np.where(g != 0, aij, 0)
    w = (np.maximum(g, 0) * aij).sum((1, 2), keepdims=True)
    ref = np.maximum((w * a).sum(-1), 0)
    out = registry.get("grad-cam-plus-plus", eps=1e-6)(model, variables, x, target)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-8)
    # a zero seed gives zero gradients: all-zero maps, no NaN from 0/0
    zero = jnp.zeros((2, 3))
    for name in ("grad-cam", "grad-cam-plus-plus"):
        m = registry.get(name)(model, variables, x, zero)
        assert np.all(np.isfinite(np.asarray(m))) and np.all(np.asarray(m) == 0)


# --------------------------------------------------------------------------------------
# errors, jit / vmap / batch independence
# --------------------------------------------------------------------------------------


def test_bad_layers_are_readable_errors():
    model = HeadNet()
    variables = _vars(model, (1, 4, 4, 2), seed=5)
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"unknown layer name.*'atc'.*did you mean 'act'"):
        registry.get("grad-cam", layer="atc")(model, variables, x, 0)
    with pytest.raises(ValueError, match=r"CAM layer 'flatten' must output an NHWC feature map"):
        registry.get("grad-cam-plus-plus", layer="flatten")(model, variables, x, 0)
    with pytest.raises(ValueError, match=r"NHWC batch"):
        registry.get("grad-cam")(model, variables, jnp.ones((4, 4, 2)), 0)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        registry.get("grad-cam", layers="act")


class PoolNet(nn.Module):
    """conv -> ReLU -> maxpool -> conv -> ReLU ("act", half resolution) -> mean -> dense -> ReLU -> dense."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu1")(layers.conv(4, 3, padding=1, name="conv1")(x))
        h = layers.MaxPool2d(2, name="pool")(h)
        h = layers.ReLU(name="act")(layers.conv(6, 3, padding=1, name="conv2")(h))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        h = layers.ReLU(name="relu3")(layers.dense(5, name="fc1")(h))
        return layers.dense(3, name="fc2")(h)


@pytest.mark.parametrize("name", ["grad-cam", "grad-cam-plus-plus"])
def test_jit_vmap_batch_independence(name):
    model = PoolNet()
    variables = _vars(model, (1, 8, 8, 3), seed=7)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 8, 8, 3)), jnp.float32)
    target = jnp.array([2, 0, 1])
    method = registry.get(name, layer="act")
    eager = method(model, variables, x, target)
    assert eager.shape == (3, 8, 8) and np.asarray(eager).max() > 0
    jitted = jax.jit(method, static_argnums=0)(model, variables, x, target)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-7)
    one_by_one = jax.jit(jax.vmap(lambda xi, ti: method(model, variables, xi[None], ti[None])[0]))(x, target)
    np.testing.assert_allclose(one_by_one, eager, rtol=1e-5, atol=1e-7)
    seeded = method(model, variables, x, jax.nn.one_hot(target, 3))
    np.testing.assert_allclose(seeded, eager, rtol=1e-5, atol=1e-7)
    # the layer is at half resolution, so the map was upsampled 2x
    a, g, _ = cam.activation_and_gradient(model, variables, x, target, "act")
    assert a.shape == (3, 4, 4, 6)
