"""The faithfulness catalogue of issue 23 (``xaijax.metrics.faithfulness_curves`` and
``xaijax.metrics.faithfulness_correlation``) against known answers, direct NumPy/SciPy
computations and Quantus 0.6.0.

Quantus parity: ``tests/fixtures/quantus_faithfulness_refs.npz`` (written by
``experiments/make_quantus_faithfulness_references.py``, see its docstring) holds a tiny
torch CNN's state dict, single-channel 12 x 12 inputs, maps, and Quantus' outputs. The test
ports the weights to the same linen model (OIHW -> HWIO kernels, transposed linear weight),
runs xaijax in float64 with the same settings and compares. Quantus runs torch in float32,
so agreement is float32-level (``ATOL``); the orders, grids and draws are identical (same
subsets / uniform values handed to Quantus, ROAD with noise 0). Alignment: xaijax's maps
are (N, H, W) = Quantus' (N, 1, H, W); Quantus normalises maps by the batch's max |a| and
xaijax per image, which no compared metric depends on.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from xaijax import metrics
from xaijax.metrics import faithfulness_correlation as fcor
from xaijax.metrics import faithfulness_curves as fcur

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "quantus_faithfulness_refs.npz")
ATOL = 5e-6  # float32 (Quantus/torch) vs float64 (xaijax) on O(1) scores; measured <= 4.5e-7


class _Tiny(nn.Module):
    """The reference script's torch model: conv3x3(1->4) relu conv3x3(4->4) relu mean linear(4->3)."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
        h = jax.nn.relu(nn.Conv(4, (3, 3), padding=1)(h))
        return nn.Dense(3)(h.mean((1, 2)))


@pytest.fixture(scope="module")
def ref():
    z = np.load(FIXTURE)
    sd = {k[3:]: z[k].astype(np.float64) for k in z.files if k.startswith("sd/")}
    params = {
        "Conv_0": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0), "bias": sd["conv1.bias"]},
        "Conv_1": {"kernel": sd["conv2.weight"].transpose(2, 3, 1, 0), "bias": sd["conv2.bias"]},
        "Dense_0": {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]},
    }
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), {"params": params})
    return {
        "meta": json.loads(str(z["meta"])),
        "fn": metrics.classifier_fn(_Tiny(), variables),
        "x": z["x"].transpose(0, 2, 3, 1).astype(np.float64),
        "a": z["a"][:, 0].astype(np.float64),
        "t": z["targets"].astype(np.int32),
        "out": {k[4:]: z[k] for k in z.files if k.startswith("out/")},
    }


def _run(ref, name, **settings):
    with jax.enable_x64(True):
        return metrics.get_model_metric(name, **settings)(ref["fn"], ref["x"], ref["a"], ref["t"])


def test_ported_model_matches_the_torch_forward(ref):
    """Sanity of the port: the pixel-flipping curve's last point is the all-black image's softmax,
    which is the same for every map; compare with Quantus' last point."""
    v = _run(ref, "pixel-flipping")
    np.testing.assert_allclose(v["curve"][:, -1], ref["out"]["pixel_flipping_k1"][:, -1], atol=ATOL)


# ----------------------------------------------------------------------------- Quantus parity


@pytest.mark.parametrize("k", [1, 6])
def test_pixel_flipping_quantus(ref, k):
    v = _run(ref, "pixel-flipping", features_in_step=k)
    q = ref["out"][f"pixel_flipping_k{k}"]
    assert v["curve"].shape == q.shape
    np.testing.assert_allclose(v["curve"], q, atol=ATOL)
    np.testing.assert_allclose(v["auc"], np.trapezoid(q, axis=1), atol=ATOL * q.shape[1])


@pytest.mark.parametrize("p", [4, 8])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_quantus(ref, p, order):
    v = _run(ref, "region-perturbation", patch_size=p, order=order)
    q = ref["out"][f"region_perturbation_p{p}_{order}"]
    assert v["curve"].shape == q.shape
    np.testing.assert_allclose(v["curve"], q, atol=ATOL)
    np.testing.assert_allclose(v["aopc"], q.sum(1) / (q.shape[1] + 1), atol=ATOL)


@pytest.mark.parametrize("p", [4, 8])
def test_selectivity_quantus(ref, p):
    v = _run(ref, "selectivity", patch_size=p)
    np.testing.assert_allclose(v["curve"], ref["out"][f"selectivity_p{p}"], atol=ATOL)


@pytest.mark.parametrize("k", [1, 6])
def test_faithfulness_estimate_quantus(ref, k):
    v = _run(ref, "faithfulness-estimate", features_in_step=k)
    np.testing.assert_allclose(v["correlation"], ref["out"][f"faithfulness_estimate_k{k}"], atol=ATOL)


def test_faithfulness_correlation_quantus_same_subsets(ref):
    s = ref["meta"]["settings"]["faithfulness_correlation"]
    v = _run(ref, "faithfulness-correlation", nr_runs=s["nr_runs"], subset_size=s["subset_size"], seed=s["seed"])
    np.testing.assert_allclose(v["correlation"], ref["out"]["faithfulness_correlation"], atol=ATOL)


def test_monotonicity_correlation_quantus_same_draws(ref):
    s = ref["meta"]["settings"]["monotonicity_correlation"]
    v = _run(ref, "monotonicity-correlation", nr_samples=s["nr_samples"], features_in_step=s["features_in_step"], seed=s["seed"])
    np.testing.assert_allclose(v["correlation"], ref["out"]["monotonicity_correlation"], atol=ATOL)


def test_infidelity_quantus(ref):
    v = _run(ref, "infidelity")
    np.testing.assert_allclose(v["infidelity"], ref["out"]["infidelity"], rtol=1e-5)


def test_irof_quantus(ref):
    np.testing.assert_array_equal(fcur.superpixels(ref["x"]), ref["out"]["irof_segments"])
    v = _run(ref, "irof", running_mean=True)
    np.testing.assert_allclose(v["aoc"], ref["out"]["irof"], rtol=1e-5)
    # the clean-image mean (default) differs from Quantus' drifting mean, but not by much here
    assert np.all(np.isfinite(_run(ref, "irof")["aoc"]))


def test_road_quantus_noise_free(ref):
    v = _run(ref, "road", noise=0.0)
    q = ref["out"]["road_correct"]
    assert v["correct"].shape == q.shape
    np.testing.assert_array_equal(v["correct"], q)


_impute = jax.jit(fcur.road_impute)


def test_road_imputation_matches_quantus_spsolve(ref):
    """The device CG solve reproduces Quantus' scipy ``spsolve`` imputation to 1e-9."""
    x, a = ref["x"], ref["a"]
    h, w = a.shape[1:]
    for j, p in enumerate(ref["out"]["road_imputed_percentages"]):
        for i in range(x.shape[0]):
            idx = np.argsort(-a[i].reshape(-1), kind="stable")[: int(h * w * p / 100)]
            mask = np.zeros(h * w, bool)
            mask[idx] = True
            with jax.enable_x64(True):
                got = np.asarray(_impute(jnp.asarray(x[i]), jnp.asarray(mask.reshape(h, w))))
            np.testing.assert_allclose(got[..., 0], ref["out"]["road_imputed"][j, i], atol=1e-9)


def test_quantus_monotonicity_is_constant_true(ref):
    """Documents Quantus 0.6.0's defect (see :class:`Monotonicity`): True for every input,
    while xaijax's definition says the reference maps are not monotonic on this model."""
    assert np.all(ref["out"]["monotonicity"] == 1.0)
    v = _run(ref, "monotonicity")
    np.testing.assert_allclose(v["monotonic"], _numpy_monotonicity(ref["fn"], ref["x"], ref["a"], ref["t"]))
    assert v["monotonic"].min() == 0.0


# ----------------------------------------------------------------------------- direct loops


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


_apply = jax.jit(lambda f, x: f(x))


def _predict(fn, xs):
    with jax.enable_x64(True):
        return np.asarray(_apply(fn, jnp.asarray(xs)))


def _numpy_monotonicity(fn, x, a, t):
    out = []
    for xi, ai, ti in zip(x, a, t):
        order = np.argsort(np.abs(ai / np.abs(ai).max()).reshape(-1), kind="stable")
        cur = np.full_like(xi, xi.min()).reshape(-1, xi.shape[-1])
        flat = xi.reshape(-1, xi.shape[-1])
        curve = []
        for p in order:
            cur[p] = flat[p]
            curve.append(_softmax(_predict(fn, cur.reshape(xi.shape)[None]))[0, ti])
        out.append(float(np.all(np.diff(curve) >= 0)))
    return np.array(out)


def test_pixel_flipping_against_numpy_loop(ref):
    """3-channel images on a random-weight model: a direct NumPy loop, one forward per step."""
    model = _Tiny()
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3))
    a = np.random.default_rng(2).normal(size=(2, 6, 6))
    t = np.array([0, 2], np.int32)
    r = np.random.default_rng(4)
    shapes = {"Conv_0": (3, 3, 3, 4), "Conv_1": (3, 3, 4, 4), "Dense_0": (4, 3)}
    params = {k: {"kernel": r.normal(size=sh), "bias": r.normal(size=sh[-1:]) * 0.1} for k, sh in shapes.items()}
    with jax.enable_x64(True):  # (no model.init: eager flax init is slow)
        fn = metrics.classifier_fn(model, jax.tree_util.tree_map(jnp.asarray, {"params": params}))
        got = metrics.get_model_metric("pixel-flipping", features_in_step=4, steps_per_call=3)(fn, x, a, t)["curve"]
    for i in range(2):
        order = np.argsort(-a[i].reshape(-1), kind="stable")
        cur = x[i].reshape(-1, 3).copy()
        curve = []
        for s in range(0, 36, 4):
            cur[order[s : s + 4]] = x[i].min()
            curve.append(_softmax(_predict(fn, cur.reshape(1, 6, 6, 3)))[0, t[i]])
        np.testing.assert_allclose(got[i], curve, rtol=1e-12)


def test_road_imputation_against_direct_scipy_solve():
    """Own sparse system (3 channels, masks touching the border), solved by scipy."""
    rng = np.random.default_rng(3)
    h, w = 9, 7
    x = rng.normal(size=(h, w, 3))
    mask = rng.random((h, w)) < 0.6
    mask[0, 0] = mask[-1, -1] = True
    wts = {(di, dj): (1 / 6 if di == 0 or dj == 0 else 1 / 12) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)}
    ids = -np.ones((h, w), int)
    ids[mask] = np.arange(mask.sum())
    A = scipy.sparse.lil_matrix((mask.sum(), mask.sum()))
    b = np.zeros((mask.sum(), 3))
    for i, j in zip(*np.nonzero(mask)):
        r = ids[i, j]
        for (di, dj), wt in wts.items():
            ii, jj = i + di, j + dj
            if 0 <= ii < h and 0 <= jj < w:
                A[r, r] += wt
                if mask[ii, jj]:
                    A[r, ids[ii, jj]] -= wt
                else:
                    b[r] += wt * x[ii, jj]
    sol = scipy.sparse.linalg.spsolve(A.tocsc(), b)
    want = x.copy()
    want[mask] = sol
    with jax.enable_x64(True):
        got = np.asarray(fcur.road_impute(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=1e-10)
    # fully masked: no known pixel, the solution is 0 (no NaN)
    with jax.enable_x64(True):
        full = np.asarray(fcur.road_impute(jnp.asarray(x), jnp.ones((h, w), bool)))
    np.testing.assert_array_equal(full, 0.0)


def test_average_drop_against_numpy(ref):
    fn, x, a, t = ref["fn"], ref["x"], ref["a"], ref["t"]
    with jax.enable_x64(True):
        v = metrics.get_model_metric("average-drop")(fn, x, a, t)
    e = (a - a.min((1, 2), keepdims=True)) / np.ptp(a, axis=(1, 2), keepdims=True)
    y = _softmax(_predict(fn, x))[np.arange(3), t]
    o = _softmax(_predict(fn, x * e[..., None]))[np.arange(3), t]
    np.testing.assert_allclose(v["drop"], np.maximum(y - o, 0) / y, rtol=1e-12)
    np.testing.assert_array_equal(v["increase"], (o > y).astype(float))
    s = metrics.get_model_metric("increase-in-confidence").summarize(v)
    assert s == {"increase_in_confidence": 100 * float(np.mean(o > y))}


# ----------------------------------------------------------------------------- known answers: a linear model


def _linear(shape=(8, 8, 3), seed=0, positive=False, channel_shared=False):
    """f(x) = [<W, x> + 0.3, 0]: the exact attribution of class 0 relative to the black baseline
    b = min(x) is ``sum_c W * (x - b)`` (gradient x (input - baseline))."""
    rng = np.random.default_rng(seed)
    wgt = rng.normal(size=shape)
    if channel_shared:
        wgt = np.repeat(wgt[..., :1], shape[-1], -1)
    if positive:
        wgt = np.abs(wgt) + 0.1
    def fn(x):
        s = jnp.sum(x * jnp.asarray(wgt, x.dtype), axis=(1, 2, 3)) + 0.3
        return jnp.stack([s, jnp.zeros_like(s)], -1)

    x = rng.normal(size=(4,) + shape)
    exact = np.sum(wgt[None] * (x - x.min((1, 2, 3), keepdims=True)), -1)
    return fn, wgt, x, exact, np.zeros(4, np.int32)


@pytest.mark.parametrize(
    "name,settings,key",
    [
        ("faithfulness-correlation", {"nr_runs": 40, "subset_size": 10}, "correlation"),
        ("faithfulness-estimate", {}, "correlation"),
        ("sensitivity-n", {"score": "logit", "nr_subsets": 20, "n_values": (1, 5, 30)}, "correlation"),
    ],
)
def test_linear_model_exact_attribution_is_perfect(name, settings, key):
    fn, _, x, exact, t = _linear()
    with jax.enable_x64(True):
        v = metrics.get_model_metric(name, **settings)(fn, x, exact, t)
    np.testing.assert_allclose(v[key], 1.0, atol=1e-10)


def test_linear_model_infidelity_is_zero():
    """Infidelity's complete explanation of a linear model is its gradient (I^T a = f(x) - f(x - I)
    for every I), here one weight per pixel shared by the channels."""
    fn, wgt, x, _, t = _linear(channel_shared=True)
    with jax.enable_x64(True):
        v = metrics.get_model_metric("infidelity", patch_sizes=(2, 3))(fn, x, np.broadcast_to(wgt[..., 0], x.shape[:3]), t)
    np.testing.assert_allclose(v["infidelity"], 0.0, atol=1e-18)
    with jax.enable_x64(True):  # noise: I^T a = f(x) - f(x - I) when a = the per-pixel weight
        v = metrics.get_model_metric("infidelity", perturbation="noise")(fn, x, np.broadcast_to(wgt[..., 0], x.shape[:3]), t)
    np.testing.assert_allclose(v["infidelity"], 0.0, atol=1e-18)
    with jax.enable_x64(True):  # and a wrong map is penalised
        v = metrics.get_model_metric("infidelity", perturbation="noise")(fn, x, -np.broadcast_to(wgt[..., 0], x.shape[:3]), t)
    assert np.all(v["infidelity"] > 1e-3)


def test_linear_model_monotonicity():
    """Positive weights: inserting pixels in any order raises the logit -> monotonic softmax."""
    fn, _, x, exact, t = _linear(positive=True)
    with jax.enable_x64(True):
        v = metrics.get_model_metric("monotonicity")(fn, x, exact, t)
    np.testing.assert_array_equal(v["monotonic"], 1.0)
    assert np.all(np.diff(v["curve"], axis=1) >= 0)
    fn, _, x, exact, t = _linear()  # mixed signs: |a| order inserts negative contributions too
    with jax.enable_x64(True):
        assert metrics.get_model_metric("monotonicity")(fn, x, exact, t)["monotonic"].max() == 0.0


def test_random_map_correlation_is_near_zero():
    """Faithfulness correlation of maps independent of the model: each image's value is a
    sample correlation over nr_runs subsets with population correlation ~ corr(random, exact)
    over pixels (|.| ~ 1/sqrt(64)); the mean over 4 images x 2 seeds has sd about
    sqrt((1/64 + 1/200) / 8) = 0.05, so |mean| < 0.25 is a 5-sigma bound."""
    fn, _, x, exact, t = _linear()
    rnd = np.random.default_rng(11).normal(size=exact.shape)
    vals = []
    with jax.enable_x64(True):
        for seed in (0, 1):
            vals.append(metrics.get_model_metric("faithfulness-correlation", nr_runs=200, subset_size=10, seed=seed)(fn, x, rnd, t)["correlation"])
            assert np.all(metrics.get_model_metric("faithfulness-correlation", nr_runs=200, subset_size=10, seed=seed)(fn, x, exact, t)["correlation"] > 0.999)
    assert abs(np.mean(vals)) < 0.25


def test_sensitivity_n_against_numpy(ref):
    fn, x, a, t = ref["fn"], ref["x"][:1], ref["a"][:1], ref["t"][:1]
    m = fcor.SensitivityN(n_values=(3, 40), nr_subsets=12, seed=5)
    with jax.enable_x64(True):
        got = m(fn, x, a, t)["correlation"][0]
        subsets = [fcor.random_subsets(0, 1, 1, 1)]  # noqa: F841 (exercise the helper)
        key = jax.random.key(5)
        want = []
        y = _softmax(_predict(fn, x))[0, t[0]]
        an = a[0] / np.abs(a[0]).max()
        for i, n in enumerate((3, 40)):
            sums, deltas = [], []
            for j in range(12):
                perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i * 12 + j), 144))
                sel = (perm < n).reshape(12, 12)
                xp = np.where(sel[..., None], x[0].min(), x[0])
                sums.append(an[sel].sum())
                deltas.append(y - _softmax(_predict(fn, xp[None]))[0, t[0]])
            want.append(np.corrcoef(sums, deltas)[0, 1])
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_spearman_matches_scipy_with_ties():
    import scipy.stats

    u = np.array([1.0, 2.0, 2.0, 3.0, 0.5, 2.0])
    v = np.array([0.1, 0.3, 0.2, 0.2, 0.0, 0.9])
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(fcor.spearman(jnp.asarray(u), jnp.asarray(v))), scipy.stats.spearmanr(u, v)[0], atol=1e-12)


# ----------------------------------------------------------------------------- seeds, bad input


def test_seed_changes_the_draws_and_is_reproducible(ref):
    a = _run(ref, "faithfulness-correlation", nr_runs=20, subset_size=30, seed=1)["correlation"]
    b = _run(ref, "faithfulness-correlation", nr_runs=20, subset_size=30, seed=1)["correlation"]
    c = _run(ref, "faithfulness-correlation", nr_runs=20, subset_size=30, seed=2)["correlation"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    s = fcor.random_subsets(1, 144, 20, 30)
    assert s.shape == (20, 30) and all(len(set(r)) == 30 for r in s)


def test_constant_map_gives_documented_nan_row(ref):
    a = ref["a"].copy()
    a[1] = 0.0
    with jax.enable_x64(True):
        m = metrics.get_model_metric("faithfulness-estimate", features_in_step=6)
        v = m(ref["fn"], ref["x"], a, ref["t"])
    assert np.isnan(v["correlation"][1]) and np.isfinite(v["correlation"][[0, 2]]).all()
    assert np.isfinite(m.summarize(v)["faithfulness_estimate"])


@pytest.mark.parametrize(
    "name,settings,maps,match",
    [
        ("pixel-flipping", {}, "shape", "maps"),
        ("pixel-flipping", {}, "nan", "maps"),
        ("pixel-flipping", {"features_in_step": 1000}, None, "features_in_step"),
        ("region-perturbation", {"patch_size": 13}, None, "patch_size"),
        ("selectivity", {"patch_size": 0}, None, "patch_size"),
        ("faithfulness-correlation", {"subset_size": 145}, None, "subset_size"),
        ("infidelity", {"patch_sizes": (20,)}, None, "patch_sizes"),
        ("road", {"percentages": (120,)}, None, "percentages"),
        ("region-perturbation", {"order": "random"}, None, "order"),
        ("sensitivity-n", {"n_values": (0,)}, None, "n_values"),
        ("pixel-flipping", {"baseline": "grey"}, None, "baseline"),
        ("faithfulness-correlation", {"seed": -1, "subset_size": 16}, None, r"seed must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_bad_input(ref, name, settings, maps, match):
    a = ref["a"]
    if maps == "shape":
        a = a[:, :-1]
    elif maps == "nan":
        a = a.copy()
        a[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=match):
        metrics.get_model_metric(name, **settings)(ref["fn"], ref["x"], a, ref["t"])


def test_sufficiency_quantus(ref):
    """Sufficiency is batch-coupled (not registered; see its docstring): compare whole calls."""
    z = np.load(FIXTURE)
    with jax.enable_x64(True):
        v3 = fcur.Sufficiency()(ref["fn"], ref["x"], ref["a"], ref["t"])["sufficiency"]
        x6 = z["out/sufficiency6_x"].transpose(0, 2, 3, 1).astype(np.float64)
        v6 = fcur.Sufficiency()(ref["fn"], x6, z["out/sufficiency6_a"][:, 0].astype(np.float64), np.arange(6, dtype=np.int32) % 3)["sufficiency"]
        pred = np.argmax(_predict(ref["fn"], x6), -1)
    np.testing.assert_array_equal(pred, z["out/sufficiency6_pred"])
    np.testing.assert_allclose(v3, ref["out"]["sufficiency"], atol=1e-12)
    np.testing.assert_allclose(v6, ref["out"]["sufficiency6"], atol=1e-12)
    assert 0 < v6.sum() < 6  # the case discriminates


def test_sufficiency_definition():
    """Two identical maps with the same prediction and one far map: 1, 1, 0 (no close neighbour)."""
    fn, _, x, _, t = _linear()
    a = np.random.default_rng(0).normal(size=(3, 8, 8))
    a[1] = a[0]
    a[2] = -5 * a[0] + 3
    x = x[:3].copy()
    x[1] = x[0] + 0.01
    with jax.enable_x64(True):
        v = fcur.Sufficiency()(fn, x, a, t[:3])["sufficiency"]
        pred = np.argmax(np.asarray(fn(jnp.asarray(x))), -1)
    assert pred[0] == pred[1]
    np.testing.assert_array_equal(v, [1.0, 1.0, 0.0])


def test_irof_clean_mean_against_numpy_loop(ref):
    """IROF's default (the clean image's mean as baseline) against a direct loop over Quantus' superpixels."""
    fn, x, a, t = ref["fn"], ref["x"][:1], ref["a"][:1], ref["t"][:1]
    with jax.enable_x64(True):
        v = metrics.get_model_metric("irof")(fn, x, a, t)
    seg = ref["out"]["irof_segments"][0]
    n = seg.max() + 1
    score = np.array([a[0][seg == s].mean() for s in range(n)])
    cur = x[0].copy()
    y = _softmax(_predict(fn, x))[0, t[0]]
    curve = []
    for s in np.argsort(-score, kind="stable"):
        cur[seg == s] = x[0].mean()
        curve.append(_softmax(_predict(fn, cur[None]))[0, t[0]] / y)
    assert v["num_segments"][0] == n
    np.testing.assert_allclose(v["curve"][0, :n], curve, rtol=1e-10)
    np.testing.assert_allclose(v["aoc"][0], n - np.trapezoid(curve), rtol=1e-10)


def test_road_lerf_is_morf_of_the_negated_map(ref):
    pc = (10, 50, 90)
    with jax.enable_x64(True):
        lerf = metrics.get_model_metric("road", percentages=pc, order="lerf", noise=0.0)(ref["fn"], ref["x"], ref["a"], ref["t"])
        morf = metrics.get_model_metric("road", percentages=pc, order="morf", noise=0.0)(ref["fn"], ref["x"], -ref["a"], ref["t"])
    np.testing.assert_allclose(lerf["probability"], morf["probability"], rtol=1e-12)
