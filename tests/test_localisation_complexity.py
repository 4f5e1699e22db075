"""Localisation and complexity metrics (issue 23): closed forms, direct NumPy counts, Quantus parity.

Quantus parity (``tests/fixtures/quantus_localisation_refs.npz``, recorded by
``experiments/make_quantus_localisation_references.py`` with Quantus 0.6.0, float64 maps):
each run of the fixture names the xaijax call that reproduces it (``meta["runs"]``). Alignment:

* Quantus divides the maps of a call by their largest absolute value (a positive scale, which
  none of these metrics sees except through Quantus' stabilisers) and then takes ``abs`` where
  its default says so; xaijax's ``transform`` states the sign treatment instead
  (relevance mass accuracy: Quantus ``"signed"``; attribution localisation: ``"abs"``, or
  ``"positive"`` for Quantus' ``abs=False, positive_attributions=True``).
* sparseness and effective complexity: Quantus' default normalises by the batch maximum (and
  sparseness then adds 1e-7: xaijax ``offset=1e-7``), xaijax by each map's: the per-map runs
  compare directly, the default runs through ``normalise=False`` on maps divided by the batch
  maximum (:func:`test_quantus_batch_normalisation_couples_maps` shows the coupling).
* focus: the fixture's maps stand for mosaics' maps, its ``quadrants`` for Quantus' ``custom_batch``.
* top-k intersection: the sparse map (row 3) has a tie at the k-th value (zeros), where Quantus'
  unstable argsort picks an unspecified subset and xaijax shares the places in proportion; that
  row is checked to be tied and left out of the comparison.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import metrics
from xaijax.metrics import complexity as cx
from xaijax.metrics import localisation as loc

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "quantus_localisation_refs.npz")

LOCALISATION = ["relevance-mass-accuracy", "relevance-rank-accuracy", "top-k-intersection", "attribution-localisation", "auc"]
COMPLEXITY = ["sparseness", "complexity", "effective-complexity"]


@pytest.fixture(scope="module")
def refs():
    with np.load(FIXTURE) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = json.loads(str(data["meta"]))
    return data


def _rect(h=10, w=12, box=(2, 6, 3, 8)):
    r = np.zeros((1, h, w), bool)
    r[0, box[0] : box[1], box[2] : box[3]] = True
    return r


# ----------------------------------------------------------------------------- Quantus parity


def _xaijax_run(name: str, maps: np.ndarray, regions: np.ndarray, quadrants: np.ndarray) -> np.ndarray:
    batch_max = np.abs(maps).max()
    calls = {
        "relevance_mass_accuracy": lambda: loc.relevance_mass_accuracy(maps, regions, transform="signed"),
        "relevance_rank_accuracy": lambda: loc.relevance_rank_accuracy(maps, regions),
        "top_k_intersection_k40": lambda: loc.top_k_intersection(maps, regions, k=40),
        "top_k_intersection_k40_ci": lambda: loc.top_k_intersection(maps, regions, k=40, concept_influence=True),
        "attribution_localisation": lambda: loc.attribution_localisation(maps, regions, transform="abs"),
        "attribution_localisation_positive": lambda: loc.attribution_localisation(maps, regions, transform="positive"),
        "auc": lambda: loc.roc_auc(maps, regions),
        "sparseness": lambda: cx.sparseness(maps / batch_max, offset=1e-7, normalise=False),
        "sparseness_per_map": lambda: cx.sparseness(maps, offset=1e-7),
        "complexity": lambda: cx.complexity(maps),
        "effective_complexity": lambda: cx.effective_complexity(maps / batch_max, normalise=False),
        "effective_complexity_per_map": lambda: cx.effective_complexity(maps),
        "effective_complexity_eps0.1": lambda: cx.effective_complexity(maps / batch_max, eps=0.1, normalise=False),
        "effective_complexity_eps0.1_per_map": lambda: cx.effective_complexity(maps, eps=0.1),
        "focus": lambda: loc.focus(maps, quadrants),
    }
    with jax.enable_x64(True):
        out = calls[name]()
        assert out.dtype == jnp.float64, (name, out.dtype)
        return np.asarray(out)


RUNS = [
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection_k40",
    "top_k_intersection_k40_ci",
    "attribution_localisation",
    "attribution_localisation_positive",
    "auc",
    "sparseness",
    "sparseness_per_map",
    "complexity",
    "effective_complexity",
    "effective_complexity_per_map",
    "effective_complexity_eps0.1",
    "effective_complexity_eps0.1_per_map",
    "focus",
]


@pytest.mark.parametrize("run", RUNS)
def test_quantus_parity(refs, run):
    assert set(RUNS) == set(refs["meta"]["runs"]), "every recorded run is compared"
    maps, regions = refs["maps"], refs["regions"]
    ref = refs[f"out/{run}"]
    ours = _xaijax_run(run, maps, regions, refs["quadrants"])
    keep = np.ones(len(ref), bool)
    if run.startswith("top_k"):
        # row 3: the 40th largest value is 0 and shared by many pixels (see the module docstring)
        desc = np.sort(maps[3].ravel())[::-1]
        assert desc[39] == desc[40] == 0.0
        keep[3] = False
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=0, atol=1e-6, err_msg=run)


def test_quantus_batch_normalisation_couples_maps(refs):
    """The default (batch-normalised) effective complexity of the small-scale map differs from
    its per-map value: the reason xaijax normalises per map."""
    a, b = refs["out/effective_complexity_eps0.1"], refs["out/effective_complexity_eps0.1_per_map"]
    assert a[7] == 0 and b[7] > 300
    a, b = refs["out/sparseness"], refs["out/sparseness_per_map"]
    assert abs(a[7] - b[7]) > 1e-3 and np.abs(a[:7] - b[:7]).max() < 1e-4


# ----------------------------------------------------------------------------- closed forms


def test_gini_closed_forms():
    one_hot = np.zeros((1, 8, 8))
    one_hot[0, 3, 5] = -2.5
    with jax.enable_x64(True):
        np.testing.assert_allclose(cx.sparseness(one_hot), [1 - 1 / 64], rtol=0, atol=1e-15)
        np.testing.assert_allclose(cx.sparseness(np.full((1, 8, 8), 0.3)), [0.0], atol=1e-15)
        # two equal non-zero values out of n: G = 1 - 2/n
        two = np.zeros((1, 4, 5))
        two[0, 0, 0] = two[0, 3, 4] = 1.0
        np.testing.assert_allclose(cx.sparseness(two), [1 - 2 / 20], atol=1e-15)
        # against a direct NumPy Gini (mean absolute difference form)
        a = np.random.default_rng(0).normal(size=(3, 6, 7))
        v = np.abs(a).reshape(3, -1)
        n = v.shape[1]
        gini = np.abs(v[:, :, None] - v[:, None, :]).sum((1, 2)) / (2 * n * v.sum(1))
        np.testing.assert_allclose(cx.sparseness(a), gini, rtol=1e-12)


def test_entropy_closed_forms():
    with jax.enable_x64(True):
        np.testing.assert_allclose(cx.complexity(np.full((2, 7, 9), -1.3)), [np.log(63)] * 2, rtol=1e-14)
        one_hot = np.zeros((1, 7, 9))
        one_hot[0, 2, 2] = 4.0
        np.testing.assert_allclose(cx.complexity(one_hot), [0.0], atol=1e-15)
        half = np.zeros((1, 4, 4))
        half[0, :2] = 1.0  # 8 equal pixels
        np.testing.assert_allclose(cx.complexity(half), [np.log(8)], rtol=1e-14)


def test_effective_complexity_count():
    a = np.random.default_rng(1).normal(size=(2, 9, 9))
    a[1, :4] = 0
    for eps in (1e-5, 0.3):
        rel = np.abs(a) / np.abs(a).max(axis=(1, 2), keepdims=True)
        np.testing.assert_array_equal(cx.effective_complexity(a, eps=eps), (rel > eps).sum((1, 2)))
    assert float(cx.effective_complexity(np.zeros((1, 4, 4)))[0]) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_map_equal_to_region_and_inside_out(dtype):
    r = _rect()
    m = r.astype(dtype)
    inv = (~r).astype(dtype)
    with jax.enable_x64(True):
        for f in (loc.relevance_mass_accuracy, loc.relevance_rank_accuracy, loc.roc_auc, loc.attribution_localisation):
            assert float(f(m, r)[0]) == 1.0, f.__name__
            assert float(f(inv, r)[0]) == 0.0, f.__name__
            assert f(m, r).dtype == dtype, f.__name__
        assert float(loc.top_k_intersection(m, r, k=20)[0]) == 1.0  # region has 20 pixels
        assert float(loc.top_k_intersection(inv, r, k=20)[0]) == 0.0
        assert float(loc.attribution_localisation(m, r, weighted=True)[0]) == pytest.approx(120 / 20)
        # a map spread uniformly: chance levels
        c = np.full_like(m, 0.7)
        assert float(loc.attribution_localisation(c, r, weighted=True)[0]) == pytest.approx(1.0)
        assert float(loc.roc_auc(c, r)[0]) == 0.5
        assert float(loc.relevance_rank_accuracy(c, r)[0]) == pytest.approx(20 / 120)
        assert float(loc.top_k_intersection(c, r, k=30, concept_influence=True)[0]) == pytest.approx(1.0)


def test_transforms_of_mass_accuracy():
    r = _rect()
    m = np.where(r, 2.0, -1.0)
    m[0, 0, 0] = 3.0  # outside, positive
    pos = loc.relevance_mass_accuracy(m, r)
    assert float(pos[0]) == pytest.approx(40 / 43)
    signed = loc.relevance_mass_accuracy(m, r, transform="signed")
    assert float(signed[0]) == pytest.approx(40 / (40 + 3 - 99))
    ab = loc.relevance_mass_accuracy(m, r, transform="abs")
    assert float(ab[0]) == pytest.approx(40 / (40 + 3 + 99))


# ----------------------------------------------------------------------------- direct counts


def _numpy_top_k(maps, regions, k):
    out = []
    for a, s in zip(maps.reshape(len(maps), -1), regions.reshape(len(maps), -1)):
        order = np.argsort(-a, kind="stable")
        out.append(s[order[:k]].sum() / k)
    return np.asarray(out)


def test_top_k_against_numpy_count():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(5, 16, 16))
    regions = rng.uniform(size=(5, 16, 16)) < 0.3
    for k in (1, 7, 50, 256):
        np.testing.assert_allclose(loc.top_k_intersection(maps, regions, k=k), _numpy_top_k(maps, regions, k), rtol=1e-6)
    # a fraction of the pixels: round(0.1 * 256) = 26
    np.testing.assert_allclose(loc.top_k_intersection(maps, regions, k=0.1), _numpy_top_k(maps, regions, 26), rtol=1e-6)
    # the default: Quantus' 1000 pixels of 224 x 224 as a share: round(256 * 0.0199) = 5
    np.testing.assert_allclose(loc.top_k_intersection(maps, regions), _numpy_top_k(maps, regions, 5), rtol=1e-6)
    # rank accuracy: K = region size
    ks = regions.reshape(5, -1).sum(1)
    direct = [_numpy_top_k(maps[i : i + 1], regions[i : i + 1], int(ks[i]))[0] for i in range(5)]
    np.testing.assert_allclose(loc.relevance_rank_accuracy(maps, regions), direct, rtol=1e-6)


def test_ties_share_the_cutoff():
    """Map values 5 > 3 = 3 = 3 > 0...; region = {the 5, one of the 3s}; k = 2: the 5 is in,
    one place is left for three tied pixels of which one is in the region: 1 + 1/3 hits."""
    m = np.zeros((1, 3, 3))
    m[0, 0, :] = [5, 3, 3]
    m[0, 1, 0] = 3
    r = np.zeros((1, 3, 3), bool)
    r[0, 0, 0] = r[0, 1, 0] = True
    assert float(loc.top_k_intersection(m, r, k=2)[0]) == pytest.approx((1 + 1 / 3) / 2)
    assert float(loc.relevance_rank_accuracy(m, r)[0]) == pytest.approx((1 + 1 / 3) / 2)


def test_auc_against_pairwise_count():
    rng = np.random.default_rng(3)
    maps = np.round(rng.normal(size=(4, 9, 11)), 1)  # many ties
    regions = rng.uniform(size=(4, 9, 11)) < 0.4
    expect = []
    for a, s in zip(maps.reshape(4, -1), regions.reshape(4, -1)):
        p, q = a[s][:, None], a[~s][None, :]
        expect.append(((p > q) + 0.5 * (p == q)).mean())
    with jax.enable_x64(True):
        np.testing.assert_allclose(loc.roc_auc(maps, regions), expect, rtol=1e-12)


# ----------------------------------------------------------------------------- bad input


def _batch(maps, regions):
    n = len(maps)
    return metrics.PairBatch(maps, regions, np.zeros(n, int), np.zeros(n, bool))


@pytest.mark.parametrize("name", LOCALISATION + COMPLEXITY)
def test_bad_inputs(name):
    metric = metrics.get(name)
    r = np.concatenate([_rect(), _rect()])
    m = np.random.default_rng(4).normal(size=r.shape)
    with pytest.raises(ValueError, match="regions"):
        metric(_batch(m, r[:, :, :-1]))
    bad = m.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"maps.*\[1\]"):
        metric(_batch(bad, r))
    with pytest.raises(ValueError, match="maps"):
        metric(_batch(m[0], r[0]))


def test_undefined_rows_are_nan():
    r = np.concatenate([_rect(), _rect(), np.zeros((1, 10, 12), bool), np.ones((1, 10, 12), bool)])
    m = np.random.default_rng(5).normal(size=r.shape)
    m[0] = 0.0  # all-zero map
    m[1] = -np.abs(m[1])  # no positive relevance
    vals = {}
    for name in LOCALISATION + COMPLEXITY:
        vals.update(metrics.get(name)(_batch(m, r)))
    nan = {k: np.isnan(v).tolist() for k, v in vals.items()}
    assert nan["relevance_mass_accuracy"] == [True, True, True, False]
    assert nan["attribution_localisation"] == [True, True, True, False]
    assert nan["relevance_rank_accuracy"] == [False, False, True, False]
    assert nan["top_k_intersection"] == [False, False, True, False]
    assert nan["localisation_auc"] == [False, False, True, True]  # empty region, whole image
    assert nan["sparseness"] == [True, False, False, False]
    assert nan["complexity"] == [True, False, False, False]
    assert vals["effective_complexity"][0] == 0 and not np.isnan(vals["effective_complexity"]).any()
    # summaries leave NaN rows out: class 0 = rows 0, 1; class 1 = rows 2, 3
    s = metrics.get("relevance-mass-accuracy").summarize(vals, np.asarray([0, 0, 1, 1]), np.zeros(4, bool), 2)
    assert s == {"relevance_mass_accuracy": pytest.approx(vals["relevance_mass_accuracy"][3])}


def test_bad_settings():
    r = _rect()
    m = r.astype(np.float32)
    with pytest.raises(ValueError, match="k must"):
        loc.top_k_intersection(m, r, k=121)
    with pytest.raises(ValueError, match="k as a float"):
        loc.top_k_intersection(m, r, k=1.5)
    with pytest.raises(ValueError, match="transform"):
        loc.relevance_mass_accuracy(m, r, transform="square")
    with pytest.raises(ValueError, match="bad options"):
        metrics.get("top-k-intersection", kk=3)


def test_registered_with_quantus_settings(refs):
    """The registered metrics with Quantus' settings give the fixture's numbers (float32 maps)."""
    maps, regions = refs["maps"].astype(np.float32), refs["regions"]
    b = _batch(maps, regions)
    got = metrics.get("relevance-mass-accuracy", transform="signed")(b)["relevance_mass_accuracy"]
    np.testing.assert_allclose(got, refs["out/relevance_mass_accuracy"], atol=2e-6)
    got = metrics.get("attribution-localisation", transform="abs")(b)["attribution_localisation"]
    np.testing.assert_allclose(got, refs["out/attribution_localisation"], atol=2e-6)
    got = metrics.get("auc")(b)["localisation_auc"]
    np.testing.assert_allclose(got, refs["out/auc"], atol=1e-6)
    got = metrics.get("complexity")(b)["complexity"]
    np.testing.assert_allclose(got, refs["out/complexity"], atol=1e-5)


# ----------------------------------------------------------------------------- focus


def test_focus_closed_forms():
    q = np.asarray([[True, False, False, True], [False, True, True, False], [True, True, False, False]])
    regions = loc.focus_quadrants((6, 8), q)
    assert regions.sum((1, 2)).tolist() == [24, 24, 24]
    assert regions[0, 0, 0] and regions[0, 5, 7] and not regions[0, 0, 7] and regions[1, 0, 7]
    maps = np.where(regions, 2.0, -1.0)
    maps[2] = 1.0
    np.testing.assert_allclose(loc.focus(maps, q), [1.0, 1.0, 0.5])
    np.testing.assert_allclose(loc.focus(-maps, q)[:2], [0.0, 0.0])  # positive relevance only outside
    assert np.isnan(loc.focus(-np.ones((1, 6, 8)), q[:1])[0])  # no positive relevance
    with pytest.raises(ValueError, match="quadrants"):
        loc.focus(maps, q[:, :3])


@pytest.fixture(scope="module")
def focus_setup():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5)(jax.nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))

    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 16, 16, 3)), jnp.float32)
    model = Tiny()
    return model, model.init(jax.random.key(0), x), x, np.asarray([1, 4, 1])


def test_focus_mosaics(focus_setup):
    from xaijax.data import SyntheticScenes
    from xaijax.imageops import resize

    _, _, x, t = focus_setup
    scenes = SyntheticScenes(size=32, test_size=60)
    mosaics, quadrants = loc.focus_mosaics(x, t, scenes, convention="none")
    assert mosaics.shape == x.shape and mosaics.dtype == x.dtype
    own = np.asarray(resize(x, (8, 8)))
    for i in range(3):
        layout = loc.focus_layout(int(t[i]))
        assert sorted(layout) == [0, 1, 2, 3] and quadrants[i].tolist() == [q in layout[:2] for q in range(4)]
        tiles = [np.asarray(mosaics[i, r : r + 8, c : c + 8]) for r in (0, 8) for c in (0, 8)]
        np.testing.assert_array_equal(tiles[layout[0]], own[i])  # the explained image
        for q in layout[1:]:  # benchmark tiles, in [0, 1] with convention "none"
            assert tiles[q].min() >= 0 and tiles[q].max() <= 1
        # the same class gets the same companions and layout whatever the batch
    np.testing.assert_array_equal(np.asarray(mosaics[0])[np.asarray(loc.focus_quadrants((16, 16), quadrants[:1])[0]) == 0],
                                  np.asarray(mosaics[2])[np.asarray(loc.focus_quadrants((16, 16), quadrants[2:])[0]) == 0])
    with pytest.raises(ValueError, match="targets"):
        loc.focus_mosaics(x, np.asarray([1, 2, 12]), scenes)
    with pytest.raises(ValueError, match="even"):
        loc.focus_mosaics(x[:, :15, :15], t, scenes)


def test_focus_metric(focus_setup):
    from xaijax import methods

    model, variables, x, t = focus_setup
    metric = metrics.get_method_metric("focus", size=32)
    const = lambda m, v, xx, tt: jnp.ones(xx.shape[:3], xx.dtype)  # noqa: E731
    np.testing.assert_allclose(metric(model, variables, const, x, t)["focus"], [0.5] * 3)
    grad = methods.get("gradient")
    vals = metric(model, variables, grad, x, t)["focus"]
    assert vals.shape == (3,) and np.all((vals >= 0) & (vals <= 1))
    single = metric(model, variables, grad, x[1:2], t[1:2])["focus"]
    np.testing.assert_allclose(single, vals[1:2], rtol=1e-6)
    assert metric.summarize({"focus": np.asarray([0.2, np.nan, 0.4])}) == {"focus": pytest.approx(0.3)}
