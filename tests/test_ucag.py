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
    u = U.Ucag(ones, n=3, patch=100, weighting="none", include_global=False, postprocess="none")
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
    u2 = U.Ucag(ones, n=3, patch=100, weighting="none", postprocess="none")
    np.testing.assert_allclose(u2(None, {}, x, 0), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------
# the full aggregation against a loop over patches
# --------------------------------------------------------------------------------------


def _loop_reference(model, variables, x, targets, n, u, weighting="prob"):
    """Patches cut by slicing, explained one at a time, placed and counted by slicing."""
    ndimage = pytest.importorskip("scipy.ndimage")
    g = u.geometry(x.shape[1:3])
    gc = jax.jit(lambda xx, t: cam.GradCAM()(model, variables, xx, t))
    fwd = jax.jit(lambda xx: model.apply(variables, xx))
    xs = np.asarray(x)
    res = []
    for b, t in enumerate(targets):
        canvas = np.asarray(gc(x[b : b + 1], jnp.array([t])), np.float64)[0]
        count = np.zeros(canvas.shape)
        maps, scores = [], []
        for oh in g.offsets_h:
            for ow in g.offsets_w:
                crop = xs[b : b + 1, oh : oh + g.patch[0], ow : ow + g.patch[1]]
                zoomed = imageops.resize(jnp.asarray(crop), g.zoom, "bicubic")
                m = gc(zoomed, jnp.array([t]))
                maps.append(np.asarray(cam.upsample_bilinear(m, g.patch), np.float64)[0])
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
    assert isinstance(u, U.Ucag) and u._use_cam_postprocess()
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
