"""BiLRP: closed forms on linear and bias-free ReLU similarity models, chunking against a
loop over feature dimensions, symmetry, batch independence, jit, the default gamma schedule,
conservation on a tiny VGG16, the plotting helper and input errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import models
from xaijax.methods import bilrp as B
from xaijax.methods import registry
from xaijax.models import layers, taps
from xaijax.propagation import Gamma, ZBox, relevance


class LinNet(nn.Module):
    """(N, 4, 4, 2) -> flatten -> fc (bias-free, 5 features) -> head (3 logits)."""

    @nn.compact
    def __call__(self, x):
        h = layers.Flatten(name="flat")(x)
        h = layers.dense(5, bias=False, name="fc")(h)
        return layers.dense(3, name="head")(h)


class ConvNet(nn.Module):
    """(N, 8, 8, 3) -> conv-relu-conv-relu ("relu2", (N, 4, 4, 3)) -> pooled head."""

    bias: bool = False

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu1")(layers.conv(4, 3, 1, 1, bias=self.bias, name="conv1")(x))
        h = layers.MaxPool2d(2, name="pool")(h)
        h = layers.ReLU(name="relu2")(layers.conv(3, 3, 1, 1, bias=self.bias, name="conv2")(h))
        h = layers.Flatten(name="flat")(layers.AdaptiveAvgPool2d(1, name="gap")(h))
        return layers.dense(2, name="fc")(h)


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


@pytest.fixture(scope="module")
def lin():
    model = LinNet()
    v = models.random_variables(model, (1, 4, 4, 2), seed=1)
    return model, v, _randn(2, (2, 4, 4, 2)), _randn(3, (2, 4, 4, 2))


@pytest.fixture(scope="module")
def conv():
    model = ConvNet()
    v = models.random_variables(model, (1, 8, 8, 3), seed=4)
    return model, v, _randn(5, (3, 8, 8, 3)), _randn(6, (3, 8, 8, 3))


@pytest.fixture(scope="module")
def conv_bias():
    """ConvNet with non-zero biases (relevance is not conserved; exercises the rules)."""
    model = ConvNet(bias=True)
    v = models.random_variables(model, (1, 8, 8, 3), seed=7)
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: _randn(8, a.shape, 0.3) if getattr(p[-1], "key", "") == "bias" else a, v
    )
    return model, v, _randn(9, (2, 8, 8, 3)), _randn(10, (2, 8, 8, 3))


def _patch_sum(r, patch):
    """(N, H, W) -> (N, P) sums over patch x patch blocks, row-major (H, W multiples of patch)."""
    n, h, w = r.shape
    return r.reshape(n, h // patch, patch, w // patch, patch).sum((2, 4)).reshape(n, -1)


# ------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("patch", [1, 2])
def test_linear_phi_closed_form(lin, patch):
    """phi(x) = W^T vec(x): R_pq = sum_m (sum_c x_pc W_pc,m)(sum_c x'_qc W_qc,m), sum = s."""
    model, v, x, xp = lin
    res = B.BiLRP(layer="fc", composite="zero", patch=patch, chunk=2)(model, v, x, xp)
    w = np.asarray(v["params"]["fc"]["kernel"]).reshape(4, 4, 2, 5)
    rx = np.einsum("nhwc,hwcm->mnhw", np.asarray(x), w)  # (M, N, H, W): R_m(x)
    rxp = np.einsum("nhwc,hwcm->mnhw", np.asarray(xp), w)
    ax = np.stack([_patch_sum(r, patch) for r in rx])
    axp = np.stack([_patch_sum(r, patch) for r in rxp])
    expected = np.einsum("mnp,mnq->npq", ax, axp)
    p = (4 // patch) ** 2
    assert res.relevance.shape == (2, p, p) and res.relevance.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(res.relevance), expected, rtol=1e-4, atol=1e-5)
    s = np.einsum("nd,nd->n", np.asarray(x).reshape(2, -1) @ w.reshape(-1, 5), np.asarray(xp).reshape(2, -1) @ w.reshape(-1, 5))
    np.testing.assert_allclose(np.asarray(res.scores), s, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.relevance).sum((1, 2)), s, rtol=1e-4)


def test_linear_phi_with_random_projection(lin):
    """phi(x) = P^T W^T vec(x) with P ~ N(0, 1/E) (seeded): closed form with the product W P."""
    model, v, x, xp = lin
    res = B.BiLRP(layer="fc", composite="zero", patch=1, chunk=3, projection=7, seed=3)(model, v, x, xp)
    proj = np.asarray(jax.random.normal(jax.random.key(3), (5, 7), jnp.float32)) / np.sqrt(7.0)
    w = np.asarray(v["params"]["fc"]["kernel"]).reshape(4, 4, 2, 5) @ proj  # (4, 4, 2, 7)
    rx = np.einsum("nhwc,hwcm->mnhw", np.asarray(x), w).reshape(7, 2, 16)
    rxp = np.einsum("nhwc,hwcm->mnhw", np.asarray(xp), w).reshape(7, 2, 16)
    np.testing.assert_allclose(np.asarray(res.relevance), np.einsum("mnp,mnq->npq", rx, rxp), rtol=1e-4, atol=1e-5)
    phi = lambda a: np.asarray(a).reshape(2, -1) @ w.reshape(-1, 7)  # noqa: E731
    np.testing.assert_allclose(np.asarray(res.scores), (phi(x) * phi(xp)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("pool", ["none", "sum", "mean", "max"])
def test_relu_phi_lrp0_equals_gradient_times_input(conv, pool):
    """Bias-free ReLU phi with LRP-0: R_m(x) = x * d phi_m / dx (summed over channels)."""
    model, v, x, xp = conv

    def phi(xx):
        _, acts = taps.forward(model, v, xx, ["relu2"])
        a = acts["relu2"].reshape(xx.shape[0], -1, 3)
        return {"none": a.reshape(xx.shape[0], -1), "sum": a.sum(1), "mean": a.mean(1), "max": a.max(1)}[pool]

    def first_order(xx):
        jac = jax.jacobian(lambda z: phi(z).sum(0))(xx)  # (M, N, H, W, C): samples independent
        return (jac * xx[None]).sum(-1)  # (M, N, H, W)

    rx, rxp = first_order(x), first_order(xp)
    ax = np.stack([_patch_sum(np.asarray(r), 2) for r in rx])
    axp = np.stack([_patch_sum(np.asarray(r), 2) for r in rxp])
    expected = np.einsum("mnp,mnq->npq", ax, axp)
    res = B.BiLRP(layer="relu2", composite="zero", patch=2, chunk=16, pool=pool)(model, v, x, xp)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(res.relevance), expected, atol=2e-5 * scale)
    s = (phi(x) * phi(xp)).sum(-1)
    np.testing.assert_allclose(np.asarray(res.scores), np.asarray(s), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.relevance).sum((1, 2)), np.asarray(s), rtol=1e-4)


# ------------------------------------------------- chunking, symmetry, batches, jit


def _loop_over_m(model, v, x, xp, composite, patch):
    """Independent reference: one engine call per feature dimension and image, in Python."""
    fm = B._LayerOutput(model, "relu2")
    dims = fm.apply(v, x).shape[1]

    @jax.jit
    def first_order(xx, m):  # LRP of feature m alone (seed: one-hot times the feature)
        e = jax.nn.one_hot(m, dims)
        return relevance(fm, v, xx, lambda out: e * out, composite).sum(-1)

    total = 0.0
    for m in range(dims):
        rx, rxp = first_order(x, m), first_order(xp, m)
        total = total + np.einsum("np,nq->npq", _patch_sum(np.asarray(rx), patch), _patch_sum(np.asarray(rxp), patch))
    return total


@pytest.fixture(scope="module")
def loop_reference(conv_bias):
    model, v, x, xp = conv_bias
    comp = B.bilrp_composite(model, v, x)
    return comp, _loop_over_m(model, v, x, xp, comp, 4)


@pytest.mark.parametrize("chunk", [1, 5, 48, 100])
def test_chunked_vmap_equals_loop_over_feature_dims(conv_bias, loop_reference, chunk):
    """M = 4*4*3 = 48 dims; chunks of 1, 5 (padded last chunk), 48 and more than M."""
    model, v, x, xp = conv_bias
    comp, expected = loop_reference
    res = B.BiLRP(layer="relu2", composite=comp, patch=4, chunk=chunk)(model, v, x, xp)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(res.relevance), expected, atol=1e-5 * scale)


def test_default_composite_is_used_when_none(conv_bias, loop_reference):
    model, v, x, xp = conv_bias
    _, expected = loop_reference
    res = B.BiLRP(layer="relu2", patch=4, chunk=48)(model, v, x, xp)
    np.testing.assert_allclose(np.asarray(res.relevance), expected, atol=1e-5 * np.abs(expected).max())


def test_swapping_inputs_transposes_relevance(conv_bias):
    model, v, x, xp = conv_bias
    method = B.BiLRP(layer="relu2", patch=2, chunk=16, pool="sum")
    a, b = method(model, v, x, xp), method(model, v, xp, x)
    scale = float(jnp.abs(a.relevance).max())
    np.testing.assert_allclose(np.asarray(b.relevance), np.asarray(a.relevance).transpose(0, 2, 1), atol=1e-6 * scale)
    np.testing.assert_allclose(np.asarray(b.scores), np.asarray(a.scores), rtol=1e-6)


def test_jit_and_batch_independence(conv_bias):
    """jit equals eager; changing pair 0 leaves pair 1 unchanged."""
    model, v, x, xp = conv_bias
    method = B.BiLRP(layer="relu2", patch=(2, 4), chunk=7, pool="none")
    eager = method(model, v, x, xp)
    jitted = jax.jit(method, static_argnums=0)
    a = jitted(model, v, x, xp)
    assert a.relevance.shape == (2, 8, 8)
    scale = float(jnp.abs(a.relevance).max())
    np.testing.assert_allclose(np.asarray(a.relevance), np.asarray(eager.relevance), atol=1e-6 * scale)
    b = jitted(model, v, x.at[0].set(-x[0]), xp)
    np.testing.assert_allclose(np.asarray(b.relevance[1]), np.asarray(a.relevance[1]), atol=1e-6 * scale)
    np.testing.assert_allclose(np.asarray(b.scores[1]), np.asarray(a.scores[1]), rtol=1e-6)
    assert not np.allclose(np.asarray(b.relevance[0]), np.asarray(a.relevance[0]), atol=1e-3 * scale)


def test_uneven_patches_cover_the_image(lin):
    """4x4 image, patch 3: a 2x2 grid whose last row/column has width 1; nothing is dropped."""
    model, v, x, xp = lin
    assert B.patch_grid(4, 4, 3) == (2, 2)
    full = B.BiLRP(layer="fc", composite="zero", patch=1, chunk=5)(model, v, x, xp).relevance
    coarse = B.BiLRP(layer="fc", composite="zero", patch=3, chunk=5)(model, v, x, xp).relevance
    groups = np.array([[0, 0, 0, 1]] * 3 + [[2, 2, 2, 3]]).ravel()  # patch of each pixel (row-major)
    onehot = np.eye(4)[groups]  # (16, 4)
    np.testing.assert_allclose(np.asarray(coarse), onehot.T @ np.asarray(full) @ onehot, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ zoo and rules


@pytest.fixture(scope="module")
def vgg():
    model = models.get("vgg16", width=1 / 16, num_classes=5, hidden=16, pool_size=1)
    v = models.random_variables(model, (1, 32, 32, 3), seed=0)
    return model, v, _randn(11, (1, 32, 32, 3)), _randn(12, (1, 32, 32, 3))


def test_default_composite_follows_the_authors_vgg16_schedule(vgg):
    """Reference code: gamma 0.5 for torch index i <= 10, 0.25 for 11..17, 0.1 for 18..24, 0 above;
    z^B on the input layer."""
    model, v, x, _ = vgg
    comp = B.bilrp_composite(model, v, x)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]

    def reference_gamma(i):
        return 0.5 if i <= 10 else 0.25 if i <= 17 else 0.1 if i <= 24 else 0.0

    for k, i in enumerate(convs):
        rule = comp.rule_for(f"features.{i}", "conv", nn.Conv, first=k == 0)
        if k == 0:
            assert isinstance(rule, ZBox)
        else:
            assert rule == Gamma(reference_gamma(i)), (i, rule)
    assert comp.rule_for("classifier.6", "dense", nn.Dense) == Gamma(0.0)


def test_zoo_model_conserves_similarity(vgg):
    """Bias-free tiny VGG16 (random variables have zero biases), default rules: sum R = s."""
    model, v, x, xp = vgg
    res = jax.jit(B.BiLRP(layer="features.16", patch=8, chunk=16, pool="sum"), static_argnums=0)(model, v, x, xp)
    assert res.relevance.shape == (1, 16, 16)
    assert float(res.scores[0]) > 0
    np.testing.assert_allclose(np.asarray(res.relevance).sum((1, 2)), np.asarray(res.scores), rtol=1e-4)
    _, acts = taps.forward(model, v, jnp.concatenate([x, xp]), ["features.16"])
    f = acts["features.16"].sum((1, 2))
    np.testing.assert_allclose(np.asarray(res.scores[0]), float((f[0] * f[1]).sum()), rtol=1e-5)


def test_registry_and_kind():
    method = registry.get("bilrp", patch=8, pool="sum")
    assert isinstance(method, B.BiLRP) and method.patch == 8 and method.pool == "sum"
    assert B.BiLRP.kind == "similarity"
    assert registry.kind("bilrp") == "similarity"


# ------------------------------------------------------------------------ errors


def test_errors(lin):
    model, v, x, xp = lin
    method = B.BiLRP(layer="fc", composite="zero", patch=1)
    with pytest.raises(ValueError, match="same shape"):
        method(model, v, x, xp[:1])
    with pytest.raises(ValueError, match="same shape"):
        method(model, v, x, xp[:, :2])
    with pytest.raises(ValueError, match="NHWC"):
        method(model, v, x[0], xp[0])
    with pytest.raises(ValueError, match="unknown layer name 'fcc'.*'fc'"):
        B.BiLRP(layer="fcc", composite="zero")(model, v, x, xp)
    with pytest.raises(ValueError, match="pool"):
        B.BiLRP(pool="avg")
    with pytest.raises(ValueError, match="patch"):
        B.BiLRP(patch=0)
    with pytest.raises(ValueError, match="chunk"):
        B.BiLRP(chunk=0)
    with pytest.raises(ValueError, match="projection"):
        B.BiLRP(projection=0)
    with pytest.raises(ValueError, match="unknown composite"):
        B.BiLRP(composite="nope")


# ---------------------------------------------------------------------- plotting


def test_plot_writes_png_of_the_requested_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    img, img2 = rng.uniform(size=(32, 32, 3)), rng.uniform(size=(32, 32))
    rel = rng.standard_normal((16, 16))
    path = tmp_path / "pairs.png"
    fig = B.plot_bilrp(img, img2, rel, patch=8, top_k=10, figsize=(6.0, 3.0), dpi=50, title="s = 1.0", path=path)
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.size == (300, 150)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    ax = fig.axes[0]
    (lines,) = ax.collections
    segments = lines.get_segments()
    assert len(segments) == 10
    # the 10 strongest pairs, weakest first; red (R, G, B = 1, 0, 0) if positive, blue if negative
    order = np.argsort(-np.abs(rel).ravel())[:10][::-1]
    colours = lines.get_colors()
    np.testing.assert_array_equal(colours[:, 0] == 1, rel.ravel()[order] > 0)
    np.testing.assert_array_equal(colours[:, 2] == 1, rel.ravel()[order] <= 0)
    widths = np.asarray(lines.get_linewidths())
    np.testing.assert_allclose(widths, 3.0 * np.abs(rel.ravel()[order]) / np.abs(rel).max())
    top = np.unravel_index(np.argmax(np.abs(rel)), rel.shape)
    # the strongest pair is drawn last, between the centres of its patches (second image shifted)
    gap = round(0.05 * 32)
    start = ((top[0] % 4) * 8 + 3.5, (top[0] // 4) * 8 + 3.5)
    end = ((top[1] % 4) * 8 + 3.5 + 32 + gap, (top[1] // 4) * 8 + 3.5)
    np.testing.assert_allclose(segments[-1], [start, end])
    assert pixels.shape == (150, 300, 3)


def test_plot_rejects_mismatched_relevance():
    img = np.zeros((32, 32, 3))
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        B.plot_bilrp(img, img, np.zeros((16, 15)), patch=8)
    with pytest.raises(ValueError, match="image"):
        B.plot_bilrp(np.zeros((32, 32, 4)), img, np.zeros((16, 16)), patch=8)
