"""Energy pointing, fg/bg mIoU, deletion/insertion, region insertion, map density and the
cascading-randomisation sanity check, against hand-computed values and independent
computations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from xaijax import imageops, metrics, models
from xaijax.metrics import density, energy, faithfulness as F, iou, sanity

# ----------------------------------------------------------------------------- energy pointing


def test_energy_fraction_by_hand():
    maps = np.array([[[1.0, 2.0], [3.0, -4.0]], [[0.0, -1.0], [0.0, 0.0]]])
    regions = np.array([[[True, False], [True, False]], [[True, True], [True, True]]])
    e = np.asarray(energy.energy_fraction(maps, regions))
    # image 0: positive energy 1 + 2 + 3 = 6, inside 1 + 3 = 4 (the -4 is not energy)
    # image 1: no positive energy -> 0, as the reference's nan_to_num
    np.testing.assert_allclose(e, [4 / 6, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        energy.energy_fraction(maps[0], regions[0])


def test_energy_fraction_keeps_float64(x64):
    maps = np.array([[[1.0, 2.0], [3.0, 1e-9]]])
    regions = np.array([[[True, False], [True, False]]])
    e = energy.energy_fraction(maps, regions)
    assert e.dtype == np.float64
    # 4 / (6 + 1e-9): the 1e-9 is below float32's resolution at 6, not at float64's
    np.testing.assert_allclose(np.asarray(e), [4.0 / (6.0 + 1e-9)], rtol=1e-14)
    assert float(e[0]) != 4.0 / 6.0


def test_energy_pointing_registry_class_means():
    maps = np.zeros((4, 3, 3), np.float32)
    regions = np.zeros((4, 3, 3), bool)
    regions[:, 0, :] = True  # top row is the region
    maps[0, 0, 0] = 1.0  # all inside -> 1
    maps[1, 0, 0], maps[1, 2, 2] = 1.0, 3.0  # 1/4
    maps[2, 2, 2] = 5.0  # 0
    maps[3, 0, 1], maps[3, 1, 1] = 1.0, 1.0  # 1/2
    classes, dif = np.array([0, 0, 1, 1]), np.array([False, True, True, False])
    batch = metrics.PairBatch(maps=maps, regions=regions, classes=classes, dif=dif)
    m = metrics.get("energy-pointing")
    v = m(batch)
    np.testing.assert_allclose(v["energy"], [1.0, 0.25, 0.0, 0.5], rtol=1e-6)
    s = m.summarize(v, classes, dif, num_classes=3)
    # ALL: class 0 mean 0.625, class 1 mean 0.25, class 2 has no pairs and is left out
    assert s["energy_pointing_all"] == pytest.approx((0.625 + 0.25) / 2)
    # DIF: class 0 -> 0.25 (pair 1), class 1 -> 0.0 (pair 2)
    assert s["energy_pointing_dif"] == pytest.approx(0.25 / 2)


# ----------------------------------------------------------------------------- fg/bg mIoU


def test_foreground_background_iou_by_hand():
    m = np.array([[[-1.0, 0.5], [2.0, 0.1]], [[0.0, 0.0], [0.0, 1.0]]])  # means 0.4 and 0.25
    g = np.array([[[False, True], [True, True]], [[False, False], [False, True]]])
    v = iou.foreground_background_iou(m, g)
    # image 0: pred fg {(0,1),(1,0)}: fg IoU 2/3; pred bg {(0,0),(1,1)} vs gt bg {(0,0)}: 1/2
    # image 1: perfect: 1 and 1
    np.testing.assert_allclose(v["iou_fg"], [2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(v["iou_bg"], [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(v["miou"], [7 / 12, 1.0], rtol=1e-6)
    s = iou.summarize_foreground_background({k: np.asarray(a) for k, a in v.items()})
    assert s["miou_images"] == pytest.approx((7 / 12 + 1.0) / 2)
    # dataset-level: fg (2 + 1) / (3 + 1) = 3/4; bg (1 + 3) / (2 + 3) = 4/5
    assert s["miou_pixels"] == pytest.approx((0.75 + 0.8) / 2)
    # numeric threshold on min-max normalised maps: image 0 -> [0, .5, 1, .3667] > .5 -> only (1,0)
    np.testing.assert_array_equal(iou.threshold_maps(m[:1], 0.5), [[[False, False], [True, False]]])
    with pytest.raises(ValueError, match="needs the images"):
        iou.foreground_background_iou(m, g, crf=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        iou.threshold_maps(m, 2.0)


# ----------------------------------------------------------------------------- deletion / insertion

W16 = jnp.arange(16.0).reshape(4, 4) / 8  # weights of the toy model; sum 15


def _toy(x):
    """Two logits: (sum_p w_p x_p, 0), so p(class 0) = sigmoid(sum_p w_p x_p)."""
    s = jnp.einsum("nhwc,hw->n", x, W16)
    return jnp.stack([s, jnp.zeros_like(s)], -1)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def test_trapezoid_aucs_by_hand():
    assert float(F.auc(np.array([1.0, 0.5, 0.0]))) == pytest.approx(0.5)
    c = np.array([0.9, 0.7, 0.2, 0.1, 0.0])
    assert float(F.auc(c)) == pytest.approx(np.trapezoid(c, np.linspace(0, 1, 5)))
    assert float(F.unit_auc(np.array([0.0, 1.0, 1.0]))) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least 2"):
        F.auc(np.array([1.0]))


def test_deletion_and_insertion_of_toy_linear_model_by_hand():
    x = jnp.ones((1, 4, 4, 1))
    m = W16[None]  # the map ranks pixels as the weights do: the top 4 are w = 12..15 / 8
    d = metrics.get_model_metric("deletion", step_pixels=4)(_toy, x, m, np.array([0]))
    # remaining sums after deleting the top 0, 4, 8, 12, 16 pixels: 15, 8.25, 3.5, 0.75, 0
    np.testing.assert_allclose(d["curve"][0], _sigmoid([15, 8.25, 3.5, 0.75, 0]), rtol=1e-5)
    np.testing.assert_allclose(d["auc"], F.auc(_sigmoid([15, 8.25, 3.5, 0.75, 0]))[None], rtol=1e-5)
    ins = F.causal_curves(_toy, x, m, 0, mode="insertion", step_pixels=4, substrate="zeros")
    np.testing.assert_allclose(ins[0], _sigmoid([0, 6.75, 11.5, 14.25, 15]), rtol=1e-5)
    # step that does not divide H*W: ceil(16 / 5) = 4 steps, counts 0, 5, 10, 15, 16
    c5 = F.causal_curves(_toy, x, m, 0, mode="deletion", step_pixels=5)
    top = np.sort(np.asarray(W16).ravel())[::-1]
    np.testing.assert_allclose(c5[0], _sigmoid([15 - top[:k].sum() for k in (0, 5, 10, 15, 16)]), rtol=1e-5)
    # reversed map: least relevant first -> deletion keeps the score high longer
    assert F.auc(F.causal_curves(_toy, x, -m, 0, mode="deletion", step_pixels=4))[0] > d["auc"][0]


def test_ucag_defaults_at_224_px_and_batched_equals_per_image():
    assert F.default_step_pixels(224, 224) == 1792 and F.num_steps(224, 224, 1792) == 28
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 224, 224, 3)).astype(np.float32))
    maps = jnp.asarray(rng.random((2, 224, 224)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32)) / 100

    def lin(z):  # per-channel means -> 4 logits
        return z.mean(axis=(1, 2)) @ w

    t = np.array([1, 3])
    d = F.causal_curves(lin, x, maps, t, mode="deletion")
    assert d.shape == (2, 29)
    p_full = np.asarray(jax.nn.softmax(lin(x)))[np.arange(2), t]
    np.testing.assert_allclose(d[:, 0], p_full, rtol=1e-5)  # untouched image
    np.testing.assert_allclose(d[:, -1], 0.25, rtol=1e-5)  # all zeros: uniform softmax
    ins = F.causal_curves(lin, x, maps, t, mode="insertion", images_per_call=2)
    p_blur = np.asarray(jax.nn.softmax(lin(F.gaussian_blur(x, 51, 50.0))))[np.arange(2), t]
    np.testing.assert_allclose(ins[:, 0], p_blur, rtol=1e-5)  # fully blurred start
    np.testing.assert_allclose(ins[:, -1], p_full, rtol=1e-5)  # fully revealed end
    per_image = np.concatenate([F.causal_curves(lin, x[i : i + 1], maps[i : i + 1], t[i : i + 1], mode="insertion") for i in range(2)])
    np.testing.assert_allclose(ins, per_image, rtol=1e-6, atol=1e-7)


def test_gaussian_blur_matches_scipy_reflect_and_kornia_kernel():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = F.gaussian_kernel1d(51, 50.0)
    assert g.sum() == pytest.approx(1.0) and np.allclose(g, g[::-1])
    assert g[0] / g[25] == pytest.approx(math.exp(-(25**2) / (2 * 50.0**2)))
    x = np.random.default_rng(1).random((2, 20, 24, 3)).astype(np.float32)
    k = F.gaussian_kernel1d(7, 2.0)
    ref = ndimage.correlate1d(ndimage.correlate1d(x, k, axis=1, mode="mirror"), k, axis=2, mode="mirror")
    np.testing.assert_allclose(np.asarray(F.gaussian_blur(x, 7, 2.0)), ref, rtol=1e-5, atol=1e-6)
    const = np.full((1, 30, 30, 3), 0.7, np.float32)
    np.testing.assert_allclose(np.asarray(F.gaussian_blur(const, 51, 50.0)), const, rtol=1e-5)


def test_saliency_rank_order_and_ties():
    r = np.asarray(F.saliency_rank(np.array([[[1.0, 1.0], [2.0, 0.0]]])))
    # descending; the tie between pixels 0 and 1 goes to the later one (flip of a stable argsort)
    np.testing.assert_array_equal(r, [[[2, 1], [0, 3]]])


def test_model_fn_validation():
    x, m = jnp.ones((1, 4, 4, 1)), W16[None]
    with pytest.raises(ValueError, match="out of range"):
        F.causal_curves(_toy, x, m, 2, mode="deletion", step_pixels=4)
    with pytest.raises(ValueError, match="maps must be"):
        F.causal_curves(_toy, x, m[:, :3], 0, mode="deletion")
    with pytest.raises(ValueError, match="mode"):
        F.causal_curves(_toy, x, m, 0, mode="del")
    with pytest.raises(ValueError, match="substrate"):
        F.causal_curves(_toy, x, m, 0, mode="deletion", substrate="noise")
    # a NaN pixel would be ranked first and deleted / inserted without a word: refused
    nan_map = np.array(m)
    nan_map[0, 1, 2] = np.nan
    for mode in ("deletion", "insertion"):
        with pytest.raises(ValueError, match="maps must be finite; map 0"):
            F.causal_curves(_toy, x, nan_map, 0, mode=mode, step_pixels=4)
    with pytest.raises(ValueError, match="maps must be finite"):
        F.region_insertion_curves(_toy, x, np.where(np.isnan(nan_map), np.inf, nan_map), 0)


# ----------------------------------------------------------------------------- region insertion


def _needs_three(x):
    """Class 0 wins iff at least 3 of the pixels at flat indices 5, 37, 90 are present (value 1)."""
    s = x.reshape(x.shape[0], -1)[:, jnp.array([5, 37, 90])].sum(-1)
    return jnp.stack([s, jnp.full_like(s, 2.5)], -1)


def test_region_insertion_of_known_ranking():
    x = jnp.ones((2, 10, 10, 1))  # 100 pixels: 1 %, ..., 20 % = 1, ..., 20 pixels
    m = np.zeros((2, 100), np.float32)
    m[0, [5, 37, 90]] = [3.0, 2.0, 1.0]  # the three needed pixels are ranked 0, 1, 2
    m[1] = np.linspace(1.0, 0.0, 100)  # value 1 - i/99: pixel i ranked i
    # move pixel 37 between pixels 3 and 4 (rank 4; pixel 5 becomes rank 6) and pixel 90
    # between pixels 13 and 14: 15 pixels (0..13 and 37) are above it, so its rank is 15
    m[1, 37], m[1, 90] = 0.96, 0.86
    metric = metrics.get_model_metric("region-insertion")
    v = metric(_needs_three, x, jnp.asarray(m.reshape(2, 10, 10)), np.array([0, 0]))
    # image 0: correct from 3 pixels on; image 1: from 16 pixels on (rank 15 included)
    np.testing.assert_array_equal(v["correct"][0], [0, 0] + [1] * 18)
    np.testing.assert_array_equal(v["correct"][1], [0] * 15 + [1] * 5)
    # unit-spacing trapezoid: sum - first/2 - last/2
    np.testing.assert_allclose(v["auc"], [18 - 0.5, 5 - 0.5])
    np.testing.assert_allclose(v["auc_norm"], np.array([17.5, 4.5]) / 19)
    s = metric.summarize(v)
    assert s["region_insertion_auc"] == pytest.approx(11.0)


# ----------------------------------------------------------------------------- density


def test_map_density_by_hand():
    m = np.zeros((1, 4, 4), np.float32)
    m[0, :2, :2] = [[1.0, 1.0], [1.0, -1.0]]
    m[0, 3, 3], m[0, 3, 0], m[0, 0, 3] = 2.0, -1.0, -1.0
    r = np.zeros((1, 4, 4), bool)
    r[0, :2, :2] = True
    d = density.map_density(m, r, baseline="zero")
    # D+ = (3 / 4) / (5 / 16) = 2.4; D- = (1 / 4) / (3 / 16) = 4/3
    np.testing.assert_allclose(d["density_pos"], [2.4], rtol=1e-6)
    np.testing.assert_allclose(d["density_neg"], [4 / 3], rtol=1e-6)
    o = density.map_density(m, r, baseline="zero", reference="outside")
    np.testing.assert_allclose(o["density_pos"], [(3 / 4) / (2 / 12)], rtol=1e-6)
    np.testing.assert_allclose(o["density_neg"], [(1 / 4) / (2 / 12)], rtol=1e-6)
    # non-negative map: no negative part around 0 (NaN), but one around the mean (1)
    cam = np.array([[[3.0, 1.0], [0.0, 0.0]]])
    rc = np.array([[[True, False], [False, False]]])
    z = density.map_density(cam, rc, baseline="zero")
    assert z["density_pos"][0] == pytest.approx((3 / 1) / (4 / 4)) and np.isnan(z["density_neg"][0])
    c = density.map_density(cam, rc)  # default: around the mean 1: R+ = [2,0,0,0], R- = [0,0,1,1]
    np.testing.assert_allclose([c["density_pos"][0], c["density_neg"][0]], [4.0, 0.0])
    s = density.summarize_density({k: np.asarray(v) for k, v in z.items()})
    assert s["density_pos"] == pytest.approx(3.0) and np.isnan(s["density_neg"])
    # uniform positive map -> density 1 whatever the region
    assert float(density.map_density(np.ones((1, 4, 4)), r, baseline="zero")["density_pos"][0]) == pytest.approx(1.0)
    assert np.isnan(density.map_density(np.ones((1, 4, 4)), r)["density_pos"][0])  # constant: nothing above the mean


def test_pair_registry_lists_new_metrics():
    assert {"energy-pointing", "map-density", "fgbg-miou", "miou", "pointing-game"} <= set(metrics.names())
    assert {"deletion", "insertion", "region-insertion"} <= set(metrics.model_metric_names())
    assert metrics.model_metric_names() == sorted(metrics.model_metric_names())
    with pytest.raises(ValueError, match="Did you mean deletion"):
        metrics.get_model_metric("deletio")
    with pytest.raises(ValueError, match="bad settings"):
        metrics.get_model_metric("deletion", steps=3)


# ----------------------------------------------------------------------------- sanity check


def test_spearman_against_scipy_and_identities():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, size=(3, 6, 7)).astype(float)  # many ties
    b = rng.normal(size=(3, 6, 7))
    got = sanity.spearman(a, b)
    want = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(sanity.spearman(b, b), 1.0)
    np.testing.assert_allclose(sanity.spearman(b, -b), -1.0)
    assert np.isnan(sanity.spearman(np.ones((1, 3, 3)), b[:1, :3, :3])[0])
    np.testing.assert_allclose(sanity.rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])


def _ssim_brute(x, y, data_range=1.0):
    """SSIM by explicit 7 x 7 windows (skimage's defaults), cropped borders."""
    c1, c2, n = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, 49
    vals = []
    for i in range(x.shape[0] - 6):
        for j in range(x.shape[1] - 6):
            p, q = x[i : i + 7, j : j + 7].ravel(), y[i : i + 7, j : j + 7].ravel()
            mp, mq = p.mean(), q.mean()
            vp, vq = p.var(ddof=1), q.var(ddof=1)
            cov = ((p - mp) * (q - mq)).sum() / (n - 1)
            vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(vals))


def test_ssim_by_brute_force_and_skimage():
    rng = np.random.default_rng(3)
    x = rng.random((2, 12, 10))
    y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    got = np.asarray(sanity.ssim(x, y))
    np.testing.assert_allclose(got, [_ssim_brute(x[i], y[i]) for i in range(2)], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sanity.ssim(x, x)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="smaller than"):
        sanity.ssim(x[:, :5], y[:, :5])
    skm = pytest.importorskip("skimage.metrics")
    for i in range(2):
        assert got[i] == pytest.approx(skm.structural_similarity(x[i], y[i], data_range=1.0), rel=1e-4)


@pytest.fixture(scope="module")
def tiny_vgg():
    model = models.get("vgg16", width=1 / 16, num_classes=5, hidden=32, pool_size=1)
    variables = models.random_variables(model, (1, 32, 32, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32))
    return model, variables, x


def _leaves_by_path(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_cascade_changes_exactly_the_layers_in_order(tiny_vgg):
    model, variables, x = tiny_vgg
    layers = sanity.randomizable_layers(model, variables, x)
    convs = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert layers == convs + ["classifier.0", "classifier.3", "classifier.6"]
    top_down = layers[::-1]
    fresh = models.random_variables(model, x.shape, seed=7)
    orig = _leaves_by_path(variables)
    for k in range(len(top_down) + 1):
        v = sanity.cascade_variables(variables, fresh, top_down, k)
        leaves = _leaves_by_path(v)
        changed = {p for p in leaves if leaves[p] is not orig[p]}
        expect = {p for p in orig if any(p.startswith(f"['params']['{n.split('.')[0]}']['{n.split('.')[1]}']") for n in top_down[:k])}
        assert changed == expect, k
        for p in changed:
            assert np.array_equal(np.asarray(leaves[p]), np.asarray(_leaves_by_path(fresh)[p]))


class _Tiny(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> mean pool -> fc: three parameterised layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="conv2")(x))
        return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))


def _grad_x_input(model, variables, x, target):
    """Gradient x input summed over channels, the method under test of the sanity check."""
    g = jax.grad(lambda z: model.apply(variables, z)[:, target].sum())(x)
    return (g * x).sum(-1)


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    variables = models.random_variables(model, (1, 12, 12, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 12, 12, 3)).astype(np.float32))
    return model, variables, x


def test_cascading_randomization_end_to_end_and_plots(tiny, tmp_path):
    model, variables, x = tiny
    assert sanity.randomizable_layers(model, variables, x) == ["conv1", "conv2", "fc"]
    res = sanity.cascading_randomization(_grad_x_input, model, variables, x, 1, seed=3)
    assert res.layers == ("fc", "conv2", "conv1") and res.maps.shape == (4, 2, 12, 12)
    assert res.spearman.shape == res.spearman_abs.shape == res.ssim.shape == (3, 2)
    run = jax.jit(lambda v: _grad_x_input(model, v, x, 1))
    np.testing.assert_allclose(res.maps[0], np.asarray(run(variables)), rtol=1e-4, atol=1e-7)
    fresh = models.random_variables(model, x.shape, seed=3)
    m2 = np.asarray(run(sanity.cascade_variables(variables, fresh, res.layers, 2)))
    np.testing.assert_allclose(res.maps[2], m2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.spearman[1], sanity.spearman(res.maps[0], m2), rtol=1e-6)
    np.testing.assert_allclose(res.ssim[1], np.asarray(sanity.ssim(imageops.minmax_normalize(res.maps[0]), imageops.minmax_normalize(np.float64(m2)))), rtol=1e-5)
    assert np.all(res.spearman_abs[-1] < 0.99)  # a fully random network explains differently
    # identical maps -> 1 for every similarity
    np.testing.assert_allclose(sanity.spearman(res.maps[0], res.maps[0]), 1.0)
    np.testing.assert_allclose(np.asarray(sanity.ssim(*(imageops.minmax_normalize(res.maps[0]),) * 2)), 1.0, rtol=1e-6)
    f1 = sanity.plot_cascade(res, tmp_path / "curves.png", title="gradient x input")
    f2 = sanity.plot_cascade_grid(res, tmp_path / "grid.png", images=(0, 1))
    assert len(f1.axes) == 1 and len(f2.axes) == 2 * 4
    for name in ("curves.png", "grid.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not parameterised"):
        sanity.cascading_randomization(_grad_x_input, model, variables, x, 1, layers=["conv3"])


def test_cascading_randomization_compiles_once_and_takes_fresh_variables(tiny):
    model, variables, x = tiny
    traces = []

    def counted(m, v, xx, t):  # a plain function: hashable, so the module-level jit caches it
        traces.append(xx.shape)
        return _grad_x_input(m, v, xx, t)

    a = sanity.cascading_randomization(counted, model, variables, x, 1, seed=3)
    assert len(traces) == 1  # every cascade step reuses one compile
    # a second batch of the same shape, with the fresh draw passed in: still that one compile,
    # and the same result as letting the function draw it
    fresh = models.random_variables(model, (1, *x.shape[1:]), seed=3)
    b = sanity.cascading_randomization(counted, model, variables, x, 1, seed=99, fresh=fresh)
    assert len(traces) == 1
    np.testing.assert_array_equal(a.maps, b.maps)
    # an unhashable method still works (a fresh jit per call)
    class Unhashable:
        __hash__ = None

        def __call__(self, m, v, xx, t):
            return _grad_x_input(m, v, xx, t)

    c = sanity.cascading_randomization(Unhashable(), model, variables, x, 1, seed=3)
    np.testing.assert_allclose(c.maps, a.maps, rtol=1e-6, atol=1e-7)


def test_randomizable_layers_with_norm_and_batch_stats():
    model = models.get("resnet18", width=8, num_classes=5)
    variables = models.random_variables(model, (1, 32, 32, 3), seed=1)
    variables = jax.tree_util.tree_map(lambda a: a + 0.5, variables)  # "trained": differs from the fresh init
    x = jnp.zeros((1, 32, 32, 3))
    plain = sanity.randomizable_layers(model, variables, x)
    withbn = sanity.randomizable_layers(model, variables, x, include_norm=True)
    assert plain[:2] == ["conv1", "layer1.0.conv1"] and plain[-1] == "fc"
    assert withbn[:3] == ["conv1", "bn1", "layer1.0.conv1"] and set(plain) < set(withbn)
    fresh = models.random_variables(model, x.shape, seed=0)
    v = sanity.cascade_variables(variables, fresh, ["fc", "layer4.1.bn2"], 2, include_norm=True)
    np.testing.assert_array_equal(v["batch_stats"]["layer4"]["1"]["bn2"]["var"], 1.0)
    np.testing.assert_array_equal(v["params"]["layer4"]["1"]["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(v["batch_stats"]["layer4"]["1"]["bn1"]["var"], 1.5)  # untouched
    v0 = sanity.cascade_variables(variables, fresh, ["layer4.1.bn2"], 1)  # without include_norm
    np.testing.assert_array_equal(v0["batch_stats"]["layer4"]["1"]["bn2"]["var"], 1.5)


def test_classifier_fn_matches_plain_function(tiny):
    model, variables, x = tiny
    maps = jnp.asarray(np.random.default_rng(5).random((2, 12, 12)).astype(np.float32))
    fn = metrics.classifier_fn(model, variables)
    a = F.causal_curves(fn, x, maps, np.array([1, 4]), mode="deletion")
    b = F.causal_curves(lambda z: model.apply(variables, z), x, maps, np.array([1, 4]), mode="deletion")
    assert a.shape == (2, 3)  # 8 * 12 = 96 px per step -> ceil(144 / 96) = 2 steps
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    p = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, x)))
    np.testing.assert_allclose(a[:, 0], p[[0, 1], [1, 4]], rtol=1e-5)
    p0 = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, jnp.zeros_like(x))))
    np.testing.assert_allclose(a[:, -1], p0[[0, 1], [1, 4]], rtol=1e-5)
