"""Attribution methods on vision transformers (ViT with torchvision names, distilled DeiT with
timm's): token grids for the CAM family, the default CAM layer, UCAG on a fixed-size model, and
the methods that are not defined there (NotApplicable with a message that says why).

Tiny models: 32 px images, 8 px patches (a 4 x 4 grid), 2 blocks, 16 wide, 5 classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from xaijax import imageops, models
from xaijax.methods import NotApplicable, registry
from xaijax.checkpoints.input_size import fixed_input_size
from xaijax.methods._core import layer_gradients, token_grid
from xaijax.methods.cam import GradCAM
from xaijax.methods.combinators import Ucag
from xaijax.models import taps, vit

TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5)
KINDS = ("vit", "deit_distilled")


def _model(kind: str) -> nn.Module:
    return vit.VisionTransformer(**TINY) if kind == "vit" else vit.DeiT(**TINY, distilled=True)


def _perturbed(model: nn.Module, dtype=jnp.float32):
    """Random weights with nonzero biases, LayerNorm affine parameters and prefix tokens."""
    v = models.random_variables(model, (1, 32, 32, 3), seed=0)
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        last = getattr(path[-1], "key", str(path[-1]))
        a = np.asarray(leaf, np.float64)
        if last in ("bias", "class_token", "cls_token", "dist_token"):
            a = rng.normal(0.0, 0.3, a.shape)
        elif last == "scale":
            a = rng.uniform(0.5, 1.5, a.shape)
        return jnp.asarray(a, dtype)

    return jax.tree_util.tree_map_with_path(fill, v)


def _x(n: int = 2, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(2).normal(size=(n, 32, 32, 3)), dtype)


# ----------------------------------------------------------------------------- token grids


@pytest.mark.parametrize("kind", KINDS)
def test_token_grid_is_the_manual_reshape(kind):
    m = _model(kind)
    p, g = m.num_prefix_tokens, m.grid_size
    assert (p, g) == ((1, 4) if kind == "vit" else (2, 4))
    a = np.random.default_rng(0).normal(size=(3, p + g * g, 7)).astype(np.float32)
    manual = np.zeros((3, g, g, 7), np.float32)
    for n in range(3):
        for i in range(g):
            for j in range(g):
                manual[n, i, j] = a[n, p + i * g + j]
    np.testing.assert_array_equal(np.asarray(token_grid(m, jnp.asarray(a), "t")), manual)
    # an NHWC map passes unchanged
    b = jnp.asarray(manual)
    assert token_grid(m, b, "t") is b


def test_token_grid_row_major_matches_the_patch_embedding():
    """The grid of the patch embedding's tokens is the patch embedding's own (h, w) map."""
    m = _model("vit")
    v = _perturbed(m)
    _, cap = taps.forward(m, v, _x(), capture=["conv_proj", "concat"])
    np.testing.assert_array_equal(np.asarray(token_grid(m, cap["concat"], "concat")), np.asarray(cap["conv_proj"]))


def test_token_grid_errors_say_what_is_missing():
    class NoFacts(nn.Module):
        pass

    class OnlyPrefix(nn.Module):
        num_prefix_tokens = 1

    a = jnp.zeros((2, 17, 8))
    with pytest.raises(ValueError, match=r"num_prefix_tokens.*and grid_size.*NoFacts does not"):
        token_grid(NoFacts(), a, "blocks.0")
    with pytest.raises(ValueError, match=r"needs the model to declare grid_size.*OnlyPrefix does not"):
        token_grid(OnlyPrefix(), a, "blocks.0")
    with pytest.raises(ValueError, match=r"outputs 16 tokens.*1 prefix token\(s\) and a 4x4 patch grid \(17 tokens\)"):
        token_grid(_model("vit"), jnp.zeros((2, 16, 8)), "x")
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        token_grid(_model("vit"), jnp.zeros((2, 8)), "x")


class _TokenModel(nn.Module):
    """A token model that does not declare num_prefix_tokens / grid_size."""

    @nn.compact
    def __call__(self, x):
        t = nn.Dense(8, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))  # (N, H*W, 8)
        return nn.Dense(5, name="head")(t.mean(1))


def test_cam_on_an_undeclared_token_layer_names_the_missing_facts():
    m = _TokenModel()
    x = _x()[:, :8, :8]
    v = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"turning them into a patch grid needs the model to declare num_prefix_tokens"):
        GradCAM(layer="embed")(m, v, x, 1)


# -------------------------------------------------------------- the default CAM layer and Grad-CAM


@pytest.mark.parametrize("kind", KINDS)
def test_last_block_output_has_zero_patch_gradients(kind, x64):
    """The head reads prefix tokens only (after a per-token LayerNorm): the target's gradient
    w.r.t. the last block's patch tokens is exactly zero, so Grad-CAM there is all zeros; at the
    default layer (the last block's first LayerNorm) it is not."""
    m = _model(kind)
    v, x = _perturbed(m, jnp.float64), _x(2, jnp.float64)
    last = m.block_layers[-1]
    assert m.cam_layer == last + (".ln_1" if kind == "vit" else ".norm1")
    t = jnp.array([1, 3])
    _, grads, _ = jax.jit(lambda v_, x_: layer_gradients(m, v_, x_, t, [last, m.cam_layer]))(v, x)
    p = m.num_prefix_tokens
    assert np.all(np.asarray(grads[last][:, p:]) == 0.0)
    assert np.abs(np.asarray(grads[last][:, :p])).min(axis=-1).max() > 0  # the prefix tokens do matter
    assert np.abs(np.asarray(grads[m.cam_layer][:, p:])).max() > 1e-3
    both = jax.jit(lambda v_, x_: (GradCAM(layer=last)(m, v_, x_, t), GradCAM()(m, v_, x_, t)))
    at_last, default = (np.asarray(a) for a in both(v, x))
    assert np.all(at_last == 0.0)
    assert default.shape == (2, 32, 32) and (default.reshape(2, -1).max(1) > 0).all()


def _ln(z, p):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _lin(z, p):
    return z @ p["kernel"] + p["bias"]


def _tail(kind: str, params, heads: int):
    """The model above the last block's first LayerNorm, written out by hand: ``(A, block input) -> logits``."""
    if kind == "vit":
        blk = params["encoder"]["layers"]["encoder_layer_1"]
        att, qkv, proj, ln2 = blk["self_attention"], "in_proj", "out_proj", blk["ln_2"]
        fc1, fc2 = blk["mlp"]["0"], blk["mlp"]["3"]
        final = params["encoder"]["ln"]
    else:
        blk = params["blocks"]["1"]
        att, qkv, proj, ln2 = blk["attn"], "qkv", "proj", blk["norm2"]
        fc1, fc2 = blk["mlp"]["fc1"], blk["mlp"]["fc2"]
        final = params["norm"]

    def f(a, xin):
        n, t, d = a.shape
        hd = d // heads
        q, k, v = jnp.split(_lin(a, att[qkv]), 3, axis=-1)
        split = lambda z: z.reshape(n, t, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        w = jax.nn.softmax(jnp.einsum("nhid,nhjd->nhij", q, k) / np.sqrt(hd), axis=-1)
        o = jnp.einsum("nhij,nhjd->nhid", w, v).transpose(0, 2, 1, 3).reshape(n, t, d)
        y = xin + _lin(o, att[proj])
        h = _lin(_ln(y, ln2), fc1)
        y = y + _lin(0.5 * h * (1.0 + erf(h / np.sqrt(2.0))), fc2)
        z = _ln(y, final)
        if kind == "vit":
            return _lin(z[:, 0], params["heads"]["head"])
        return 0.5 * (_lin(z[:, 0], params["head"]) + _lin(z[:, 1], params["head_dist"]))

    return f


@pytest.mark.parametrize("kind", KINDS)
def test_grad_cam_equals_hand_written_grad_cam_on_the_token_grid(kind, x64):
    m = _model(kind)
    v, x = _perturbed(m, jnp.float64), _x(2, jnp.float64)
    t = np.array([1, 3])
    out, cap = jax.jit(lambda v_, x_: taps.forward(m, v_, x_, capture=[m.block_layers[0], m.cam_layer]))(v, x)
    a, xin = cap[m.cam_layer], cap[m.block_layers[0]]
    tail = _tail(kind, v["params"], m.num_heads)
    logits, g = jax.jit(jax.value_and_grad(lambda aa: tail(aa, xin)[np.arange(2), t].sum()))(a)
    np.testing.assert_allclose(float(logits), float(np.asarray(out)[np.arange(2), t].sum()), rtol=1e-12)  # the hand tail is the model
    np.testing.assert_allclose(np.asarray(jax.jit(tail)(a, xin)), np.asarray(out), rtol=1e-12, atol=1e-12)
    p, s = m.num_prefix_tokens, m.grid_size
    ag = np.asarray(a)[:, p:].reshape(2, s, s, -1)
    gg = np.asarray(g)[:, p:].reshape(2, s, s, -1)
    cam = np.maximum((gg.mean(axis=(1, 2))[:, None, None, :] * ag).sum(-1), 0.0)
    expected = np.asarray(imageops.resize(jnp.asarray(cam), (32, 32)))
    assert np.abs(cam).max() > 1e-3
    both = jax.jit(lambda v_, x_: (GradCAM()(m, v_, x_, jnp.asarray(t)), GradCAM().layer_map(m, v_, x_, jnp.asarray(t))))
    got, raw = both(v, x)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(raw), (gg.mean(axis=(1, 2))[:, None, None, :] * ag).sum(-1), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ UCAG


class _Unsized(nn.Module):
    """The ViT without its ``image_size`` fact (declares only the token grid)."""

    inner: nn.Module
    num_prefix_tokens = 1
    grid_size = 4

    @nn.compact
    def __call__(self, x):
        return self.inner(x)


def test_ucag_resizes_patches_to_a_fixed_size_model(x64):
    """UCAG on a ViT zooms each patch to the model's image_size: the same map as an explicit zoom
    to that size on a model that does not declare it."""
    m = _model("vit")
    assert fixed_input_size(m) == 32 and fixed_input_size(models.get("resnet18", num_classes=5)) is None
    v, x = _perturbed(m, jnp.float64), _x(2, jnp.float64)
    u = Ucag(GradCAM(), n=2)
    g = u.geometry((32, 32), 32)
    assert g.patch == (17, 17) and g.zoom == (32, 32)  # 124 * 32 / 224 = 17 px patches, zoomed to 32 (not 2.6x: 44)
    assert u.geometry((32, 32)).zoom == (44, 44)
    t = jnp.array([1, 3])
    got = jax.jit(u, static_argnums=0)(m, v, x, t)
    wrapped = _Unsized(m)
    wv = {"params": {"inner": v["params"]}}
    explicit = Ucag(GradCAM(layer="inner." + m.cam_layer), n=2, scale=32 / 17 + 1e-9)
    assert explicit.geometry((32, 32)).zoom == (32, 32)
    ref = jax.jit(explicit, static_argnums=0)(wrapped, wv, x, t)
    assert float(jnp.abs(ref).max()) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- NotApplicable


NOT_APPLICABLE = {
    "deconvnet": r"'deconvnet' rule is defined by the masks of ReLUs.*no ReLU.*GELU.*plain input gradient",
    "guided-backprop": r"'guided' rule is defined by the masks of ReLUs.*no ReLU.*GELU.*plain input gradient",
    "fullgrad": r"FullGrad is defined for piecewise-linear \(ReLU\) networks.*LayerNorm",
    "rap": r"RAP is defined for piecewise-linear \(ReLU\) networks.*Softmax",
    "rsp": r"RSP is defined for piecewise-linear \(ReLU\) networks.*GELU",
    "contrastive-rsp": r"c\*RSP is defined for piecewise-linear \(ReLU\) networks",
    "excitation-backprop": r"Excitation Backprop is defined for piecewise-linear \(ReLU\) networks",
    "contrastive-excitation-backprop": r"Excitation Backprop is defined for piecewise-linear",
    "cam": r"CAM \(Zhou et al. 2016\) is defined only when .* global average pooling",
    "cameras": r"CAMERAS runs the model on the input resized to .*takes only 32x32 inputs",
}


@pytest.mark.parametrize("name", sorted(NOT_APPLICABLE))
def test_not_applicable_on_vit_says_why(name):
    m = _model("deit_distilled" if name in ("rsp", "cameras") else "vit")
    v, x = _perturbed(m), _x(1)
    method = registry.get(name)
    with pytest.raises(NotApplicable, match=NOT_APPLICABLE[name]):  # raised while tracing: nothing is computed
        jax.eval_shape(lambda v_, x_: method(m, v_, x_, jnp.array([1])), v, x)


def test_bilrp_default_rules_not_applicable_on_vit():
    m = _model("vit")
    v, x = _perturbed(m), _x(1)
    method = registry.get("bilrp", patch=8)
    with pytest.raises(NotApplicable, match=r"BiLRP with its default rules is defined for piecewise-linear"):
        jax.eval_shape(lambda v_, x_: method(m, v_, x_, x_[::-1]), v, x)


def test_cameras_at_scale_one_runs_on_vit():
    """Only resizing is refused: CAMERAS with the input's own size is defined (and is then Grad-CAM's
    activation x gradient map, min-max normalised)."""
    m = _model("vit")
    v, x = _perturbed(m), _x(2)
    out = jax.jit(registry.get("cameras", scales=(1.0,)), static_argnums=0)(m, v, x, jnp.array([1, 3]))
    assert out.shape == (2, 32, 32) and np.isfinite(np.asarray(out)).all() and float(out.max()) == pytest.approx(1.0)
