"""UCAG against a Python loop over patches, torch resizing, scipy blurring and closed-form coverage."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import cam, registry
from xaijax import imageops
from xaijax.methods.combinators import unfold_conquer as U
from xaijax.models import layers

H, W = 24, 28


class TinyCamNet(nn.Module):
    """conv3x3 -> ReLU ("act") -> global mean -> dense; ``cam_layer`` makes Grad-CAM default to ``act``."""

    cam_layer: str = "act"

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(5, 3, padding=1, name="conv")(x))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(3, name="fc")(h)


@pytest.fixture(scope="module")
def setup():
    model = TinyCamNet()
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape), jnp.float32), tmpl)
    x = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
    return model, variables, x


# --------------------------------------------------------------------------------------
# building blocks: torch-convention resizing, kornia-style blur
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((7, 5), (17, 13)), ((17, 12), (44, 31)), ((44, 31), (17, 12)), ((6, 6), (6, 6))])
def test_resize_matches_torch(src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2,) + src + (3,)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(xt, size=dst, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(imageops.resize(jnp.asarray(x), dst, "bicubic"), ref, rtol=1e-5, atol=1e-5)
    ref_lin = torch.nn.functional.interpolate(xt[:, :1], size=dst, mode="bilinear", align_corners=False)[:, 0].numpy()
    mh, mw = imageops.resize_matrix(src[0], dst[0], "bilinear"), imageops.resize_matrix(src[1], dst[1], "bilinear")
    np.testing.assert_allclose(np.einsum("ah,nhw,bw->nab", mh, x[..., 0], mw), ref_lin, rtol=1e-5, atol=1e-5)


def test_gaussian_blur_matches_scipy_reflect():
    ndimage = pytest.importorskip("scipy.ndimage")
    m = np.random.default_rng(2).normal(size=(2, 9, 11))
    xs = np.arange(5) - 2.0
    g = np.exp(-(xs**2) / 18.0)
    g /= g.sum()
    ref = np.stack([ndimage.convolve(mi, np.outer(g, g), mode="mirror") for mi in m])  # mirror == torch 'reflect'
    np.testing.assert_allclose(imageops.gaussian_blur(jnp.asarray(m, jnp.float32)), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(imageops.minmax_normalize(jnp.ones((1, 3, 3))), 0.0)


# --------------------------------------------------------------------------------------
# geometry and coverage
# --------------------------------------------------------------------------------------


def test_reference_geometry_at_224():
    u = U.Ucag(cam.GradCAM())
    g = u.geometry((224, 224))
    assert g.patch == (124, 124) and g.zoom == (322, 322) and g.stride == (20, 20)
    assert g.offsets_h == (0, 20, 40, 60, 80, 100)
    cov = g.coverage((224, 224))
    # rows covered by patch i: [20 i, 20 i + 124)
    assert cov[0, 0] == 1 and cov[223, 223] == 1 and cov[112, 112] == 36 and cov[0, 112] == 6
    assert cov[19, 19] == 1 and cov[20, 20] == 4 and cov[110, 50] == 6 * 3
    assert cov.sum() == 36 * 124 * 124
    # other sizes scale proportionally; non-square images per axis
    g2 = u.geometry((112, 448))
    assert g2.patch == (62, 248) and g2.zoom == (161, 644) and g2.stride == (10, 40)
    with pytest.raises(ValueError, match="do not fit"):
        U.Ucag(cam.GradCAM(), stride=30).geometry((224, 224))


def test_coverage_through_the_pipeline():
    """A base method returning ones, no weights, no global map: out = count / (1 + count)."""
    ones = lambda model, variables, x, target: jnp.ones(x.shape[:3])  # noqa: E731
    u = U.Ucag(ones, n=3, patch=100, weighting="none", postprocess="none")  # the authors' code: no global map
    x = jnp.zeros((1, 20, 30, 3))
    out = np.asarray(u(None, {}, x, 0))[0]
    g = u.geometry((20, 30))
    count = np.zeros((20, 30))
    for oh in g.offsets_h:  # independent count by slicing
        for ow in g.offsets_w:
            count[oh : oh + g.patch[0], ow : ow + g.patch[1]] += 1
    np.testing.assert_array_equal(g.coverage((20, 30)), count)
    np.testing.assert_allclose(out, count / (1 + count), rtol=1e-6)
    # with the global map: (1 + count) / (1 + count) = 1 everywhere
    u2 = U.Ucag(ones, n=3, patch=100, weighting="none", postprocess="none", include_global=True)
    np.testing.assert_allclose(u2(None, {}, x, 0), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------
# the full aggregation against a loop over patches
# --------------------------------------------------------------------------------------


def _raw_grad_cam(model, variables, xx, t):
    """Grad-CAM before its ReLU at the layer's resolution (the authors' ``wonorm=True`` map)."""
    a, g, _ = cam.activation_and_gradient(model, variables, xx, t, "act")
    return (g.mean(axis=(1, 2), keepdims=True) * a).sum(-1)


def _loop_reference(model, variables, x, targets, n, u, weighting="prob"):
    """The authors' conquer step: patches cut by slicing and explained one at a time; each raw
    layer-resolution Grad-CAM resized straight to the patch size with torch's bilinear
    interpolation, weighted, placed and counted by slicing; divided by 1 + count (no global map)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    torch = pytest.importorskip("torch")
    g = u.geometry(x.shape[1:3])
    gc = jax.jit(lambda xx, t: _raw_grad_cam(model, variables, xx, t))
    fwd = jax.jit(lambda xx: model.apply(variables, xx))
    xs = np.asarray(x)
    res = []
    for b, t in enumerate(targets):
        canvas = np.zeros(x.shape[1:3])
        count = np.zeros(canvas.shape)
        maps, scores = [], []
        for oh in g.offsets_h:
            for ow in g.offsets_w:
                crop = xs[b : b + 1, oh : oh + g.patch[0], ow : ow + g.patch[1]]
                zoomed = imageops.resize(jnp.asarray(crop), g.zoom, "bicubic")
                m = torch.from_numpy(np.asarray(gc(zoomed, jnp.array([t])), np.float64))[:, None]
                up = torch.nn.functional.interpolate(m, size=g.patch, mode="bilinear", align_corners=False)
                maps.append(up[0, 0].numpy())
                out = np.asarray(fwd(zoomed), np.float64)[0]
                prob = np.exp(out - out.max()) / np.exp(out - out.max()).sum()
                scores.append(prob[t] if weighting == "prob" else out[t])
        wts = np.exp(np.array(scores)) / np.exp(np.array(scores)).max()
        k = 0
        for oh in g.offsets_h:
            for ow in g.offsets_w:
                canvas[oh : oh + g.patch[0], ow : ow + g.patch[1]] += wts[k] * maps[k]
                count[oh : oh + g.patch[0], ow : ow + g.patch[1]] += 1
                k += 1
        m = np.maximum(canvas / (1 + count), 0)
        m = (m - m.min()) / (m.max() - m.min())
        xs5 = np.arange(5) - 2.0
        gk = np.exp(-(xs5**2) / 18.0)
        gk /= gk.sum()
        res.append((ndimage.convolve(m, np.outer(gk, gk), mode="mirror"), wts))
    return res


def test_ucag_grad_cam_matches_patch_loop(setup):
    model, variables, x = setup
    n = 3
    u = registry.get("ucag-grad-cam", n=n)
    assert isinstance(u, U.Ucag) and u._use_cam_postprocess() and not u.include_global
    targets = [1, 2]
    got = np.asarray(jax.jit(u, static_argnums=0)(model, variables, x, jnp.array(targets)))
    ref = _loop_reference(model, variables, x, targets, n, u)
    for b in range(2):
        np.testing.assert_allclose(got[b], ref[b][0], rtol=2e-4, atol=2e-5)
    # confidence weights exp(s_k) / max_j exp(s_j), patch k = i * n + j
    wts = np.asarray(u.patch_weights(model, variables, u.patches(x), jnp.array(targets)))
    for b in range(2):
        np.testing.assert_allclose(wts[b], ref[b][1], rtol=1e-5)
        assert wts[b].max() == pytest.approx(1.0) and (wts[b] > 0).all()
    # per-sample independence and chunked processing give the same maps
    np.testing.assert_allclose(u(model, variables, x[1:], 2)[0], got[1], rtol=2e-4, atol=2e-5)
    chunked = U.Ucag(cam.GradCAM(), n=n, chunk=4)
    np.testing.assert_allclose(jax.jit(chunked, static_argnums=0)(model, variables, x, jnp.array(targets)), got,
                               rtol=2e-4, atol=2e-5)


def test_logit_weights(setup):
    model, variables, x = setup
    u = U.Ucag(cam.GradCAM(), n=2, weighting="logit")
    p = u.patches(x[:1])
    wts = np.asarray(u.patch_weights(model, variables, p, 0))[0]
    logits = np.asarray(model.apply(variables, p[0]))[:, 0]
    np.testing.assert_allclose(wts, np.exp(logits - logits.max()), rtol=1e-5)
    assert np.asarray(U.Ucag(cam.GradCAM(), n=2, weighting="none").patch_weights(model, variables, p, 0)).tolist() == [[1.0] * 4]


def test_get_ucag_and_validation():
    u = U.get_ucag("grad-cam", layer="act", ucag_n=4, ucag_weighting="none")
    assert u == U.Ucag(cam.GradCAM("act"), n=4, weighting="none")
    assert U.get_ucag("gradient").postprocess == "auto" and not U.get_ucag("gradient")._use_cam_postprocess()
    with pytest.raises(ValueError, match="ucag_bogus"):
        U.get_ucag("grad-cam", ucag_bogus=1)
    with pytest.raises(ValueError, match="weighting"):
        U.Ucag(cam.GradCAM(), weighting="softmax")
    with pytest.raises(ValueError, match="seed"):
        U.Ucag(cam.GradCAM(), n=2)._repeat_target(jnp.ones((3, 4)), 2)


@pytest.mark.parametrize("name", ["grad-cam", "xgrad-cam", "layer-cam", "score-cam", "grad-cam-plus-plus", "cam"])
def test_every_cam_method_gets_the_cam_postprocessing(setup, name):
    """The CAM post-processing (ReLU, min-max, 5x5 blur) follows the declared kind, whatever module
    the method lives in: every CAM map lands in [0, 1] with its maximum blurred below 1, and equals
    UCAG without post-processing put through ReLU, min-max and the blur."""
    model, variables, x = setup
    base = registry.get(name, layer="act") if name != "score-cam" else registry.get(name, layer="act", chunk_size=4)
    assert base.kind == "cam" and base.has_layer_map
    u = U.Ucag(base, n=2)
    assert u._use_cam_postprocess()
    got = np.asarray(u(model, variables, x, jnp.array([1, 2])))
    raw = U.Ucag(base, n=2, postprocess="none")(model, variables, x, jnp.array([1, 2]))
    want = imageops.gaussian_blur(imageops.minmax_normalize(jax.nn.relu(raw)), 5, 3.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.min() >= -1e-6 and got.max() <= 1 + 1e-6
    # a non-CAM method gets none of it
    assert not U.Ucag(registry.get("gradient"), n=2)._use_cam_postprocess()


def test_float64_stays_float64_and_matches_float32(setup, request):
    model, variables, x = setup
    u = U.Ucag(cam.GradCAM("act"), n=2)
    f32 = np.asarray(u(model, variables, x, 1))
    request.getfixturevalue("x64")
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    m64 = u(model, v64, jnp.asarray(x, jnp.float64), 1)
    assert m64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(m64), f32, rtol=1e-3, atol=1e-4)


def test_include_global_adds_the_whole_image_layer_map(setup):
    """The paper's averaging: (G + sum_k w_k M_k) / (1 + count), G the raw whole-image map resized."""
    model, variables, x = setup
    without = U.Ucag(cam.GradCAM("act"), n=2, postprocess="none")
    with_g = U.Ucag(cam.GradCAM("act"), n=2, postprocess="none", include_global=True)
    g = without.geometry(x.shape[1:3])
    count = g.coverage(x.shape[1:3])
    whole = np.asarray(imageops.resize(_raw_grad_cam(model, variables, x, 1), x.shape[1:3]))
    np.testing.assert_allclose(
        np.asarray(with_g(model, variables, x, 1)) - np.asarray(without(model, variables, x, 1)),
        whole / (1 + count), rtol=1e-4, atol=1e-6,
    )
