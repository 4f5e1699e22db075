"""XRAI (``xrai``): each of its three steps against an independent computation.

* greedy selection (:func:`xrai_greedy`) == a direct NumPy transcription of PAIR's
  ``XRAI._xrai`` (dict of remaining masks, ``attr[mask].mean()`` gains, strict ``>``), exactly
  on integer-valued attributions (every sum is exact in float64, so the two must agree bit for
  bit, ties included) and to 1e-12 on random float64 attributions;
* segments (:func:`xrai_segments`) == scikit-image called directly with PAIR's settings, and
  the traced (``pure_callback``) path == the concrete one (plus empty padding);
* base attribution == xaijax's ``integrated-gradients`` from the per-image min and max
  baselines, averaged, channel max (PAIR) or sum;
* the map: (N, H, W), float64 in -> float64 out, == greedy(base attribution, segments).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models
from xaijax.methods.gradient import IntegratedGradients
from xaijax.methods.perturbation.xrai import XRAI, xrai_greedy, xrai_max_segments, xrai_segments


def pair_xrai_reference(attr: np.ndarray, masks: list[np.ndarray], area_perc_th: float = 1.0, min_pixel_diff: int = 50) -> np.ndarray:
    """PAIR's ``_xrai`` ("full" algorithm, density gain) transcribed loop for loop in NumPy."""
    out = np.full(attr.shape, -np.inf)
    current = np.zeros(attr.shape, bool)
    remaining = dict(enumerate(masks))
    area = 0.0
    while area <= area_perc_th:
        best_gain, best_key, drop = -np.inf, None, []
        for key, mask in remaining.items():
            diff = mask & ~current
            if diff.sum() < min_pixel_diff:
                drop.append(key)
                continue
            gain = attr[diff].mean() if diff.any() else -np.inf
            if gain > best_gain:
                best_gain, best_key = gain, key
        for key in drop:
            del remaining[key]
        if not remaining:
            break
        added = remaining.pop(best_key)
        out[added & ~current] = best_gain
        current = current | added
        area = current.mean()
    rest = out == -np.inf
    if rest.any():
        out[rest] = attr[rest].mean()
    return out


def _random_masks(rng: np.random.Generator, m: int, h: int, w: int) -> np.ndarray:
    """m random rectangles and random-threshold blobs (some small, so min_pixel_diff bites)."""
    masks = np.zeros((m, h, w), bool)
    for k in range(m):
        if k % 3 == 2:
            masks[k] = rng.random((h, w)) < rng.uniform(0.02, 0.3)
        else:
            r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[k, r0 : r0 + rng.integers(2, h), c0 : c0 + rng.integers(2, w)] = True
    return masks


@pytest.mark.parametrize("area_th,min_diff", [(1.0, 50), (0.4, 10), (1.0, 1)])
def test_greedy_matches_pair_transcription(area_th, min_diff):
    rng = np.random.default_rng(0)
    n, m, h, w = 3, 24, 20, 18
    masks = np.stack([_random_masks(rng, m, h, w) for _ in range(n)])
    masks[1, -5:] = False  # padding (empty masks) must change nothing
    with jax.enable_x64(True):
        # integer attributions: exact sums, so exact equality (ties broken alike: first mask)
        attr_int = rng.integers(-6, 7, size=(n, h, w)).astype(np.float64)
        attr_flt = rng.normal(size=(n, h, w))
        for attr, exact in ((attr_int, True), (attr_flt, False)):
            got = np.asarray(jax.jit(xrai_greedy, static_argnums=(2, 3))(attr, masks, area_th, min_diff))
            assert got.dtype == np.float64
            for i in range(n):
                ref = pair_xrai_reference(attr[i], list(masks[i]), area_th, min_diff)
                if exact:
                    np.testing.assert_array_equal(got[i], ref)
                else:
                    np.testing.assert_allclose(got[i], ref, rtol=1e-12, atol=1e-12)
    # the threshold really stops early: some pixels get the leftover mean (fewer distinct values)
    if area_th < 1:
        ref = pair_xrai_reference(attr_flt[0], list(masks[0]), area_th, min_diff)
        full = pair_xrai_reference(attr_flt[0], list(masks[0]), 1.0, min_diff)
        assert not np.array_equal(ref, full)


def test_greedy_area_threshold_boundary():
    """PAIR continues while the area is <= the threshold: a mask reaching it exactly (144 of 360
    pixels = 0.4) does not stop the loop; the next two regions keep their own gains."""
    attr = np.zeros((20, 18))
    attr[:8] = 3.0
    attr[8:14] = 2.0
    attr[14:] = -1.0
    masks = np.zeros((3, 20, 18), bool)
    masks[0, :8], masks[1, 8:14], masks[2, 14:] = True, True, True
    got = np.asarray(xrai_greedy(attr[None], masks[None], 0.4, 50))[0]
    np.testing.assert_array_equal(got, pair_xrai_reference(attr, list(masks), 0.4, 50))
    np.testing.assert_array_equal(got, attr)
    # just below: the loop stops after the first region; the rest gets its mean
    got = np.asarray(xrai_greedy(attr[None], masks[None], 0.399, 50))[0]
    np.testing.assert_array_equal(got[8:], np.full((12, 18), (6 * 2.0 - 6 * 1.0) / 12))


def _pair_segments_direct(img: np.ndarray) -> np.ndarray:
    """PAIR's Felzenszwalb masks of one (H, W, C) image with scikit-image called directly."""
    from skimage.morphology import dilation, disk
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    h, w = img.shape[:2]
    im = (img - img.min()) / (img.max() - img.min()) * 2.0 - 1.0
    im = resize(im, (224, 224), order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    masks = []
    for scale in (50, 100, 150, 250, 500, 1200):
        seg = felzenszwalb(im, scale=scale, sigma=0.8, min_size=150)
        seg = resize(seg, (h, w), order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)
        masks += [dilation(seg == lab, footprint=disk(5)) for lab in range(seg.min(), seg.max() + 1)]
    return np.stack(masks).astype(bool)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two 32 x 32 RGB images with structure (blocks + noise), torchvision-normalised-like range."""
    rng = np.random.default_rng(3)
    x = rng.normal(scale=0.3, size=(2, 32, 32, 3))
    x[0, 4:20, 6:28] += 1.5
    x[1, 10:30, 0:12, 0] -= 1.2
    return x


def test_segments_match_skimage_direct(images):
    got = xrai_segments(images)
    refs = [_pair_segments_direct(img) for img in images]
    assert got.shape == (2, max(len(r) for r in refs), 32, 32) and got.dtype == bool
    for i, ref in enumerate(refs):
        np.testing.assert_array_equal(got[i, : len(ref)], ref)
        assert not got[i, len(ref) :].any()  # padding is empty
    # traced (pure_callback, padded to the static bound) == concrete
    bound = xrai_max_segments((32, 32))
    assert bound == 6 * (224 * 224 // 150)
    traced = np.asarray(jax.jit(xrai_segments)(jnp.asarray(images)))
    assert traced.shape == (2, bound, 32, 32)
    np.testing.assert_array_equal(traced[:, : got.shape[1]], got)
    assert not traced[:, got.shape[1] :].any()
    # no resize, no dilation: the masks are exactly the label maps' indicator functions
    plain = xrai_segments(images[:1], scales=(100,), resize=None, dilation_radius=0)
    assert np.array_equal(plain[0].sum(0), np.ones((32, 32)))


@pytest.fixture(scope="module")
def vgg():
    model = models.get("vgg11", num_classes=5, width=1 / 16, hidden=16, pool_size=1)
    v = models.random_variables(model, (1, 32, 32, 3), seed=0)
    return model, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)


def test_base_attribution_is_ig_black_white_average(vgg, images):
    model, v64 = vgg
    t = jnp.array([1, 3])
    with jax.enable_x64(True):
        v = jax.tree_util.tree_map(jnp.asarray, v64)
        x = jnp.asarray(images)
        ig = IntegratedGradients(steps=4)
        lo = images.min(axis=(1, 2, 3))[:, None, None, None] * np.ones_like(images)  # PAIR: min(x) * ones_like(x)
        hi = images.max(axis=(1, 2, 3))[:, None, None, None] * np.ones_like(images)
        per_channel = (np.asarray(ig.attribution(model, v, x, t, jnp.asarray(lo))) + np.asarray(ig.attribution(model, v, x, t, jnp.asarray(hi)))) / 2
        got_max = np.asarray(XRAI(steps=4).base_attribution(model, v, x, t))
        got_sum = np.asarray(XRAI(steps=4, channel_reduction="sum").base_attribution(model, v, x, t))
    np.testing.assert_allclose(got_max, per_channel.max(-1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_sum, per_channel.sum(-1), rtol=1e-12, atol=1e-15)
    assert np.abs(got_max).max() > 0


def test_map_float64_and_composition(vgg, images):
    model, v64 = vgg
    t = jnp.array([1, 3])
    m = methods.get("xrai", steps=4)
    segs = xrai_segments(images)
    with jax.enable_x64(True):
        v = jax.tree_util.tree_map(jnp.asarray, v64)
        x = jnp.asarray(images)
        jitted = jax.jit(lambda v_, x_, s_: m(model, v_, x_, t, segments=s_))
        a = jitted(v, x, segs)
        assert a.shape == (2, 32, 32) and a.dtype == jnp.float64
        attr = np.asarray(m.base_attribution(model, v, x, t))
        b = m(model, v, x, t)  # segments computed on the host from concrete x
    for i in range(2):
        ref = pair_xrai_reference(attr[i], list(segs[i]), 1.0, 50)
        np.testing.assert_allclose(np.asarray(a[i]), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-15)
    # the map is piecewise constant on regions: far fewer distinct values than pixels
    assert len(np.unique(np.asarray(a[0]))) < 100


def test_validation():
    with pytest.raises(ValueError, match="min_pixel_diff"):
        XRAI(min_pixel_diff=0)
    with pytest.raises(ValueError, match="area_threshold"):
        XRAI(area_threshold=1.5)
    with pytest.raises(ValueError, match="channel_reduction"):
        XRAI(channel_reduction="abs")
    with pytest.raises(ValueError, match="scales"):
        XRAI(scales=())
    with pytest.raises(ValueError, match="steps"):
        XRAI(steps=0)
    with pytest.raises(ValueError, match="images"):
        xrai_segments(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="attr"):
        xrai_greedy(np.zeros((1, 4, 4)), np.zeros((1, 2, 4, 5), bool))
