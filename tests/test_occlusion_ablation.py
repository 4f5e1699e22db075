"""Occlusion, feature ablation and feature permutation (xaijax.methods.perturbation.occlusion)
and the feature masks they use (xaijax.methods.perturbation.features).

Every map is checked in float64 against a direct Python loop over the windows / features on a
tiny nonlinear CNN, and against Captum 0.9.0 (``tests/fixtures/captum_perturbation_refs.npz``,
recorded by ``experiments/make_captum_perturbation_references.py`` on a tiny torchvision VGG16
run in float64). Alignment with Captum: xaijax's ``Occlusion(window=(h, w), stride=(sh, sw))``
is Captum's ``Occlusion.attribute(sliding_window_shapes=(C, h, w), strides=(C, sh, sw))`` (NCHW);
Captum's map carries the same value on every channel and is compared at channel 0. Captum
computes Occlusion's final division in float32 (``single_attrib.float() / weight``) even for
float64 inputs, so the agreement there is ~4e-8 of the map scale; feature ablation is float64
throughout (agreement ~1e-14).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import get
from xaijax.methods._core import NotApplicable
from xaijax.methods.perturbation import (
    FeatureAblation,
    FeaturePermutation,
    Occlusion,
    grid_feature_mask,
    slic_feature_mask,
    validate_feature_mask,
)
from xaijax.methods.perturbation.occlusion import batch_permutation, occlusion_positions
from tiny_models import TanhReluNet as Tiny, float64_variables

pytestmark = pytest.mark.usefixtures("x64")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "captum_perturbation_refs.npz")
SIZE = 12


@pytest.fixture(scope="module")
def setup():
    model = Tiny()
    x = np.random.default_rng(0).normal(size=(3, SIZE, SIZE, 3))
    v = float64_variables(model, SIZE, 0)  # nonzero biases
    return model, v, x, np.array([0, 2, 1])


def _to64(setup):
    model, v, x, t = setup
    return model, jax.tree_util.tree_map(jnp.asarray, v), jnp.asarray(x), jnp.asarray(t)


def _score(model, v, xs, t):
    out = np.asarray(model.apply(v, jnp.asarray(xs)))
    return out[np.arange(len(t)), t]


def test_occlusion_matches_loop(setup):
    model, v, x, t = _to64(setup)
    base = np.random.default_rng(1).normal(size=(SIZE, SIZE, 3))
    s0 = _score(model, v, x, t)
    for (wh, ww), (sh, sw), b in [((4, 4), (2, 2), None), ((5, 3), (3, 2), base)]:
        m = Occlusion(window=(wh, ww), stride=(sh, sw), chunk=7)
        ours = np.asarray(m(model, v, x, t, baselines=b))
        assert ours.dtype == np.float64
        fill = np.zeros((SIZE, SIZE, 3)) if b is None else b
        acc, cnt = np.zeros((3, SIZE, SIZE)), np.zeros((SIZE, SIZE))
        y = 0
        while True:  # Captum's positions: 0, s, 2s, ... until the window reaches the border
            x0 = 0
            while True:
                win = np.zeros((SIZE, SIZE))
                win[y : y + wh, x0 : x0 + ww] = 1
                xp = np.asarray(x) * (1 - win[..., None]) + fill * win[..., None]
                acc += (s0 - _score(model, v, xp, t))[:, None, None] * win
                cnt += win
                if x0 + ww >= SIZE:
                    break
                x0 += sw
            if y + wh >= SIZE:
                break
            y += sh
        np.testing.assert_allclose(ours, acc / cnt, rtol=0, atol=1e-12)
        assert np.abs(ours).max() > 1e-3


def test_occlusion_positions_follow_captum():
    # ceil((size - window) / stride) + 1 windows at multiples of the stride (last one cut)
    assert occlusion_positions(12, 5, 3).tolist() == [0, 3, 6, 9]
    assert occlusion_positions(12, 4, 4).tolist() == [0, 4, 8]
    assert occlusion_positions(12, 12, 5).tolist() == [0]


def _ablation_loop(model, v, x, t, mask, fill):
    s0 = _score(model, v, x, t)
    ref = np.zeros(mask.shape)
    for f in range(mask.max() + 1):
        sel = (mask == f).astype(float)[..., None]
        xp = np.asarray(x) * (1 - sel) + fill * sel
        ref += (s0 - _score(model, v, xp, t))[:, None, None] * sel[..., 0]
    return ref


def test_feature_ablation_matches_loop(setup):
    model, v, x, t = _to64(setup)
    rng = np.random.default_rng(2)
    cells = np.asarray(grid_feature_mask((SIZE, SIZE), 4))  # 9 cells
    mask = np.stack([rng.permutation(9)[cells], rng.permutation(9)[cells] % 5, np.zeros_like(cells)])  # 9, 5, 1 features
    base = rng.normal(size=(3, SIZE, SIZE, 3))
    ours = np.asarray(FeatureAblation(chunk=4)(model, v, x, t, feature_mask=mask, baselines=base))
    np.testing.assert_allclose(ours, _ablation_loop(model, v, x, t, mask, base), rtol=0, atol=1e-12)
    # the default grid (cell 16 > 12 px is refused) and a scalar baseline field
    ours = np.asarray(FeatureAblation(cell=5, baseline=0.3)(model, v, x, t))
    grid = np.broadcast_to(np.asarray(grid_feature_mask((SIZE, SIZE), 5)), (3, SIZE, SIZE))
    np.testing.assert_allclose(ours, _ablation_loop(model, v, x, t, grid, 0.3), rtol=0, atol=1e-12)


def test_feature_permutation_matches_loop(setup):
    model, v, x, t = _to64(setup)
    mask = np.broadcast_to(np.asarray(grid_feature_mask((SIZE, SIZE), 6)), (3, SIZE, SIZE))  # 4 features
    m = FeaturePermutation(cell=6, n_samples=2, seed=5, chunk=3)
    ours = np.asarray(m(model, v, x, t))
    s0 = _score(model, v, x, t)
    key = jax.random.key(5)
    ref = np.zeros((3, SIZE, SIZE))
    for r in range(2):
        for f in range(4):
            sigma = np.asarray(batch_permutation(jax.random.fold_in(jax.random.fold_in(key, r), f), 3))
            assert sorted(sigma.tolist()) == [0, 1, 2] and (sigma != np.arange(3)).any()
            sel = (mask == f)[..., None]
            xp = np.where(sel, np.asarray(x)[sigma], np.asarray(x))
            ref += (s0 - _score(model, v, xp, t))[:, None, None] * sel[..., 0] / 2
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # jitted (lax.scan inline) == unjitted; another chunk size changes nothing
    jit = jax.jit(lambda vv, xx: FeaturePermutation(cell=6, n_samples=2, seed=5, chunk=8)(model, vv, xx, t))
    np.testing.assert_allclose(np.asarray(jit(v, x)), ours, rtol=0, atol=1e-12)


def test_feature_permutation_needs_a_batch(setup):
    model, v, x, t = _to64(setup)
    with pytest.raises(NotApplicable, match="N >= 2"):
        FeaturePermutation(cell=6)(model, v, x[:1], t[:1])


def test_occlusion_chunk_and_jit_invariant(setup):
    model, v, x, t = _to64(setup)
    a = Occlusion(window=3, stride=2, chunk=5)(model, v, x, t)
    b = jax.jit(lambda vv, xx: Occlusion(window=3, stride=2, chunk=64)(model, vv, xx, t))(v, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    # samples are independent: one sample alone gives its row of the batch
    c = Occlusion(window=3, stride=2, chunk=5)(model, v, x[1:2], t[1:2])
    np.testing.assert_allclose(np.asarray(c)[0], np.asarray(a)[1], rtol=0, atol=1e-12)


def test_grid_and_slic_masks(setup):
    g = np.asarray(grid_feature_mask((5, 7), (2, 3)))
    assert g.shape == (5, 7) and g.max() == 3 * 3 - 1
    assert g[0].tolist() == [0, 0, 0, 1, 1, 1, 2] and g[4].tolist() == [6, 6, 6, 7, 7, 7, 8]
    model, v, x, t = _to64(setup)
    masks = slic_feature_mask(np.asarray(x), n_segments=6)
    assert masks.shape == (3, SIZE, SIZE) and masks.dtype == np.int32
    for m_ in masks:  # contiguous ids 0 .. F-1
        assert np.unique(m_).tolist() == list(range(m_.max() + 1)) and m_.max() >= 1
    validate_feature_mask(masks, 3, (SIZE, SIZE), "test")
    a = FeatureAblation(segmentation="slic", n_segments=6)(model, v, x, t)
    b = FeatureAblation()(model, v, x, t, feature_mask=masks)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)


def test_bad_arguments(setup):
    model, v, x, t = _to64(setup)
    with pytest.raises(ValueError, match="window"):
        Occlusion(window=13)(model, v, x, t)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(window=3, stride=4)(model, v, x, t)
    for bad in (dict(window=0), dict(stride=(1, 2, 3)), dict(chunk=0), dict(baseline="zero")):
        with pytest.raises(ValueError, match=list(bad)[0]):
            Occlusion(**bad)
    with pytest.raises(ValueError, match="baselines"):
        Occlusion(window=3, stride=2)(model, v, x, t, baselines=np.zeros((SIZE, SIZE)))
    gap = np.zeros((3, SIZE, SIZE), np.int32)
    gap[:, :6] = 2  # ids {0, 2}: 1 missing
    with pytest.raises(ValueError, match="feature_mask of sample 0 has gaps"):
        FeatureAblation()(model, v, x, t, feature_mask=gap)
    with pytest.raises(ValueError, match="feature_mask must have shape"):
        FeatureAblation()(model, v, x, t, feature_mask=np.zeros((2, SIZE, SIZE), np.int32))
    with pytest.raises(TypeError, match="feature_mask must hold integer"):
        FeatureAblation()(model, v, x, t, feature_mask=np.zeros((SIZE, SIZE)))
    with pytest.raises(ValueError, match="negative"):
        FeatureAblation()(model, v, x, t, feature_mask=-np.ones((SIZE, SIZE), np.int32))
    with pytest.raises(ValueError, match="cell"):
        FeatureAblation()(model, v, x, t)  # the default 16 px cell on a 12 px image
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda m_: FeatureAblation()(model, v, x, t, feature_mask=m_))(np.zeros((SIZE, SIZE), np.int32))
    with pytest.raises(TypeError, match="slic"):
        jax.jit(lambda xx: FeatureAblation(segmentation="slic")(model, v, xx, t))(x)
    for bad in (dict(segmentation="quickshift"), dict(cell=0), dict(n_segments=0), dict(chunk=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            FeatureAblation(**bad)
    with pytest.raises(ValueError, match="n_samples"):
        FeaturePermutation(n_samples=0)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        get("occlusion", windows=3)


# ------------------------------------------------------------------------- Captum references


@pytest.fixture(scope="module")
def captum():
    from xaijax import models
    from xaijax.checkpoints import from_torch_state_dict

    with np.load(FIXTURE) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    spec = meta["xaijax_constructor"]
    model = models.get(spec["arch"], **spec["kwargs"])
    size = meta["input_size"]
    sd = {k[3:]: a for k, a in arrays.items() if k.startswith("sd/")}
    v = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    v = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)
    return model, v, arrays, meta


def rel_err(ours, theirs_nchw) -> float:
    theirs = np.asarray(theirs_nchw)
    assert np.allclose(theirs, theirs[:, :1]), "Captum's channels should carry the same value"
    theirs = theirs[:, 0]
    scale = np.abs(theirs).max()
    assert scale > 0
    return float(np.abs(np.asarray(ours) - theirs).max() / scale)


def test_captum_occlusion_and_ablation(captum):
    model, v, arrays, meta = captum
    v = jax.tree_util.tree_map(jnp.asarray, v)
    x, t = jnp.asarray(arrays["x"]), jnp.asarray(arrays["target"].astype(np.int32))
    assert meta["versions"]["captum"] == "0.9.0"
    logits = np.asarray(model.apply(v, x))
    assert np.abs(logits - arrays["logits"]).max() < 1e-12  # the port is exact in float64
    for i, o in enumerate(meta["occlusion"]):
        ours = Occlusion(window=tuple(o["window"]), stride=tuple(o["stride"]), baseline=o["baseline"])(model, v, x, t)
        assert rel_err(ours, arrays[f"out/occlusion/{i}"]) < 2e-7, o  # Captum's final division is float32
    ours = FeatureAblation()(model, v, x, t, feature_mask=arrays["feature_mask"], baselines=arrays["baseline_image"])
    assert rel_err(ours, arrays["out/feature-ablation"]) < 1e-12
