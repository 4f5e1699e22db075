"""Shapley value sampling, KernelSHAP (xaijax.methods.perturbation.shapley) and LIME
(xaijax.methods.perturbation.lime), in float64 on a tiny nonlinear CNN.

* Exact Shapley values by enumeration of all 2^4 coalitions of a 4-feature mask are the
  reference: Shapley sampling over all 4! permutations and KernelSHAP over all 2^4 - 2 proper
  coalitions (Shapley kernel weights, exact end-point constraints) equal them to rounding;
  sampled permutations converge to them (antithetic pairs faster than independent draws; for
  two features one antithetic pair is exact); every sampled estimate is efficient (its values sum
  to v(all) - v(none)) exactly.
* KernelSHAP with *sampled* coalitions is exact on a model linear in the input (then the
  coalition value is linear in the coalition vector).
* LIME's surrogate equals a NumPy weighted least-squares / ridge fit on the same samples
  (reconstructed with :func:`lime_samples`) and the same kernel weights.
* Absent features (per-sample masks with fewer features than the batch) change nothing: a
  sample's map equals the map of that sample explained alone.
* Captum 0.9.0 (``tests/fixtures/captum_perturbation_refs.npz``, see
  ``experiments/make_captum_perturbation_references.py``): ``ShapleyValueSampling`` given the
  same permutations (through its ``permutation_generator``), ``ShapleyValues`` (exact), and
  ``Lime`` given the same samples (``perturb_func``) with ``SkLearnRidge(alpha=1)`` and its
  default cosine kernel on the images. Captum accumulates Shapley values in float32 and computes
  Lime's distances in float32 (``.float()``) even for float64 inputs, so the agreement is ~1e-7
  of the map scale. Captum's ``KernelShap`` draws its own coalitions and treats the end points
  as soft constraints (weight 1e6): it is not compared (the tests above check KernelSHAP exactly).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import get
from xaijax.methods.perturbation import KernelSHAP, Lime, ShapleySampling, grid_feature_mask
from xaijax.methods.perturbation.lime import lime_samples
from tiny_models import LinearNet as Linear, TanhReluNet as Tiny, float64_variables

pytestmark = pytest.mark.usefixtures("x64")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "captum_perturbation_refs.npz")
SIZE = 12


@pytest.fixture(scope="module")
def setup():
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3))
    mask4 = np.broadcast_to(np.asarray(grid_feature_mask((SIZE, SIZE), 6)), (2, SIZE, SIZE)).astype(np.int32)
    return Tiny(), float64_variables(Tiny(), SIZE, 0), x, np.array([0, 2]), mask4


def _j(v):
    return jax.tree_util.tree_map(jnp.asarray, v)


def _values(model, v, x, t, mask, f):
    """v(S) for every coalition S (tuple of kept features) by direct evaluation, baseline 0."""
    out = {}
    for r in range(f + 1):
        for s in itertools.combinations(range(f), r):
            keep = np.isin(mask, s)[..., None]
            logits = np.asarray(model.apply(v, jnp.asarray(np.asarray(x) * keep)))
            out[s] = logits[np.arange(len(t)), t]
    return out


def exact_shapley(model, v, x, t, mask, f):
    vals = _values(model, v, x, t, mask, f)
    phi = np.zeros((len(t), f))
    for i in range(f):
        for s, vs in vals.items():
            if i not in s:
                w = math.factorial(len(s)) * math.factorial(f - len(s) - 1) / math.factorial(f)
                phi[:, i] += w * (vals[tuple(sorted(s + (i,)))] - vs)
    return phi, vals


def _pix(phi, mask):
    return np.take_along_axis(phi, mask.reshape(len(phi), -1), 1).reshape(mask.shape)


@pytest.fixture(scope="module")
def exact(setup):
    model, v, x, t, mask = setup
    with jax.enable_x64(True):
        phi, vals = exact_shapley(model, _j(v), x, t, mask, 4)
    return phi, vals


def _per_feature(m, mask):
    """(N, F) values back from a per-pixel map (each feature's pixels hold its value)."""
    f = mask.max() + 1
    return np.stack([[np.asarray(m)[i][mask[i] == g][0] for g in range(f)] for i in range(len(m))])


def test_shapley_all_permutations_is_exact(setup, exact):
    model, v, x, t, mask = setup
    perms = np.array(list(itertools.permutations(range(4))))
    ours = ShapleySampling(chunk=16)(model, _j(v), jnp.asarray(x), t, feature_mask=mask, permutations=perms)
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(ours), _pix(exact[0], mask), rtol=0, atol=1e-12)
    phi, vals = exact
    assert np.abs(phi).max() > 0.01
    # the game is not additive (else every permutation would give the exact values)
    singles = np.stack([vals[(i,)] - vals[()] for i in range(4)], 1)
    assert np.abs(singles - phi).max() > 1e-3


def test_shapley_sampling_converges_and_is_efficient(setup, exact):
    model, v, x, t, mask = setup
    v, xj = _j(v), jnp.asarray(x)
    phi, vals = exact
    delta = vals[(0, 1, 2, 3)] - vals[()]
    errs = {}
    for anti, n, seed in [(True, 4, 1), (True, 4, 2), (True, 4, 3), (True, 256, 1), (True, 256, 2), (True, 256, 3), (False, 256, 1)]:
        m = ShapleySampling(n_samples=n, antithetic=anti, seed=seed, chunk=64)
        est = _per_feature(m(model, v, xj, t, feature_mask=mask), mask)
        np.testing.assert_allclose(est.sum(1), delta, rtol=0, atol=1e-12)  # efficiency, every estimate
        errs[anti, n, seed] = np.abs(est - phi).max()
    few = np.mean([errs[True, 4, s_] for s_ in (1, 2, 3)])
    many = np.mean([errs[True, 256, s_] for s_ in (1, 2, 3)])
    assert many < few / 2, errs  # the error shrinks (~1/sqrt(n)) as permutations grow
    assert max(many, errs[False, 256, 1]) < 0.1 * np.abs(phi).max(), errs
    # two features: one antithetic pair (both orders) is exact
    mask2 = (np.arange(SIZE)[None, None, :] >= 6).astype(np.int32).repeat(SIZE, 1).repeat(2, 0)
    phi2, _ = exact_shapley(model, v, x, t, mask2, 2)
    est = ShapleySampling(n_samples=2, seed=3)(model, v, xj, t, feature_mask=mask2)
    np.testing.assert_allclose(np.asarray(est), _pix(phi2, mask2), rtol=0, atol=1e-12)


def test_kernel_shap_all_coalitions_is_exact(setup, exact):
    model, v, x, t, mask = setup
    coal = np.array(list(itertools.product([0, 1], repeat=4)))  # the end points get weight 0
    ours = KernelSHAP(chunk=5)(model, _j(v), jnp.asarray(x), t, feature_mask=mask, coalitions=coal)
    np.testing.assert_allclose(np.asarray(ours), _pix(exact[0], mask), rtol=0, atol=1e-11)


def test_kernel_shap_sampled(setup, exact):
    model, v, x, t, mask = setup
    v, xj = _j(v), jnp.asarray(x)
    phi, vals = exact
    m = KernelSHAP(n_samples=400, seed=2, chunk=64)
    a = m(model, v, xj, t, feature_mask=mask)
    est = _per_feature(a, mask)
    np.testing.assert_allclose(est.sum(1), vals[(0, 1, 2, 3)] - vals[()], rtol=0, atol=1e-11)  # exact constraint
    assert np.abs(est - phi).max() < 0.3 * np.abs(phi).max()
    # chunking and jit change nothing
    b = jax.jit(lambda vv, xx: KernelSHAP(n_samples=400, seed=2, chunk=7)(model, vv, xx, t, feature_mask=mask))(v, xj)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    # a linear model: the coalition value is linear in z, so any full-rank sample is exact
    lin = Linear()
    vl = _j(float64_variables(lin, SIZE, 1))
    phil, _ = exact_shapley(lin, vl, x, t, mask, 4)
    ours = KernelSHAP(n_samples=12, seed=4)(lin, vl, xj, t, feature_mask=mask)
    np.testing.assert_allclose(np.asarray(ours), _pix(phil, mask), rtol=0, atol=1e-11)


def test_absent_features_change_nothing(setup):
    """Sample 1 has 3 features, sample 0 has 9 (the batch is padded to 9): sample 1's map in the
    batch equals its map explained alone, for every sampling method."""
    model, v, x, t, _ = setup
    v, xj = _j(v), jnp.asarray(x)
    cells = np.asarray(grid_feature_mask((SIZE, SIZE), 4))  # 9 cells
    mask = np.stack([cells, cells % 3]).astype(np.int32)
    for m in (ShapleySampling(n_samples=4, seed=1), KernelSHAP(n_samples=30, seed=1), Lime(n_samples=30, seed=1)):
        both = np.asarray(m(model, v, xj, t, feature_mask=mask))
        alone = np.asarray(m(model, v, xj[1:], t[1:], feature_mask=mask[1:]))
        np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-10, err_msg=type(m).__name__)


@pytest.mark.parametrize(
    "space,distance,alpha,width",
    [("input", "cosine", 1.0, 1.0), ("interpretable", "euclidean", 0.0, 2.0), ("interpretable", "cosine", 0.5, 0.25)],
)
def test_lime_matches_numpy_weighted_least_squares(setup, space, distance, alpha, width):
    model, v, x, t, mask = setup
    v, xj = _j(v), jnp.asarray(x)
    s, f = 24, 4
    m = Lime(n_samples=s, alpha=alpha, kernel_width=width, distance=distance, distance_space=space, seed=7, chunk=5)
    ours = np.asarray(m(model, v, xj, t, feature_mask=mask))
    z = np.asarray(lime_samples(7, np.arange(s), np.array([f, f]), f)).astype(float)  # (S, N, F)
    for i in range(2):
        keep = z[:, i][:, mask[i]]  # (S, H, W)
        xp = np.asarray(x[i])[None] * keep[..., None]
        y = np.asarray(model.apply(v, jnp.asarray(xp)))[:, t[i]]
        if space == "input":
            a, b = np.asarray(x[i]).ravel(), xp.reshape(s, -1)
            if distance == "cosine":  # torch's CosineSimilarity: a zero image has similarity 0
                d = 1 - b @ a / np.maximum(np.linalg.norm(a) * np.linalg.norm(b, axis=1), 1e-8)
            else:
                d = np.linalg.norm(b - a, axis=1)
        else:
            k = z[:, i].sum(1)
            d = 1 - np.sqrt(k / f) if distance == "cosine" else np.sqrt(f - k)
        w = np.exp(-(d**2) / (2 * width**2))
        design = np.concatenate([z[:, i], np.ones((s, 1))], 1)
        if alpha == 0:
            coef = np.linalg.lstsq(design * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
        else:
            pen = np.diag([alpha] * f + [0.0])
            coef = np.linalg.solve(design.T @ (w[:, None] * design) + pen, design.T @ (w * y))
        np.testing.assert_allclose(ours[i], coef[:f][mask[i]], rtol=0, atol=1e-10 * max(1.0, np.abs(coef).max()))
    assert np.abs(ours).max() > 1e-3


def test_bad_arguments(setup):
    model, v, x, t, mask = setup
    v, xj = _j(v), jnp.asarray(x)
    for cls in (ShapleySampling, KernelSHAP, Lime):
        with pytest.raises(ValueError, match="n_samples"):
            cls(n_samples=0)
        with pytest.raises(ValueError, match="seed"):
            cls(seed=1.5)
        with pytest.raises(ValueError, match="baselines"):
            cls(n_samples=2)(model, v, xj, t, feature_mask=mask, baselines=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="permutations"):
        ShapleySampling()(model, v, xj, t, feature_mask=mask, permutations=np.array([[0, 1, 1, 2]]))
    with pytest.raises(ValueError, match="coalitions"):
        KernelSHAP()(model, v, xj, t, feature_mask=mask, coalitions=np.array([[0, 2, 1, 0]]))
    fewer = np.array(mask)
    fewer[1] = np.minimum(fewer[1], 2)  # image 1 has 3 features, image 0 all 4
    with pytest.raises(ValueError, match="must have all 4 features"):
        KernelSHAP()(model, v, xj, t, feature_mask=fewer, coalitions=np.array([[1, 0, 1, 0]]))
    # the same for superpixels the method makes itself: SLIC gives these images 3 and 2 features
    two = np.array(x)
    two[1] = 0.0
    two[1, :, :6] = 1.0
    with pytest.raises(ValueError, match="must have all 3 features"):
        KernelSHAP(segmentation="slic", n_segments=4)(model, v, jnp.asarray(two), t, coalitions=np.array([[1, 0, 1]]))
    with pytest.raises(ValueError, match="samples"):
        Lime()(model, v, xj, t, feature_mask=mask, samples=np.ones((3, 5)))
    for bad in (dict(alpha=-1.0), dict(kernel_width=0.0), dict(distance="manhattan"), dict(distance_space="pixels")):
        with pytest.raises(ValueError, match=list(bad)[0]):
            Lime(**bad)
    with pytest.raises(ValueError, match="antithetic"):
        ShapleySampling(antithetic=1)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        get("kernel-shap", samples=3)


# ------------------------------------------------------------------------- Captum references


def test_captum_shapley_and_lime():
    from xaijax import models
    from xaijax.checkpoints import from_torch_state_dict

    with np.load(FIXTURE) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    model = models.get(meta["xaijax_constructor"]["arch"], **meta["xaijax_constructor"]["kwargs"])
    sd = {k[3:]: a for k, a in arrays.items() if k.startswith("sd/")}
    size = meta["input_size"]
    v = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), v)
    x, t = jnp.asarray(arrays["x"]), jnp.asarray(arrays["target"].astype(np.int32))
    grid = arrays["grid_mask"]

    def rel_err(ours, theirs):
        theirs = theirs[:, 0]
        return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())

    ours = ShapleySampling()(model, v, x, t, feature_mask=grid, permutations=arrays["permutations"])
    assert rel_err(ours, arrays["out/shapley-sampling"]) < 5e-7  # Captum accumulates in float32
    perms = np.array(list(itertools.permutations(range(4))))
    ours = ShapleySampling()(model, v, x, t, feature_mask=grid, permutations=perms)
    assert rel_err(ours, arrays["out/shapley-exact"]) < 5e-7
    lime = meta["lime"]
    ours = Lime(alpha=lime["alpha"], kernel_width=lime["kernel_width"], distance=lime["distance"])(
        model, v, x, t, feature_mask=grid, samples=arrays["lime_samples"]
    )
    assert rel_err(ours, arrays["out/lime"]) < 1e-6  # Captum's kernel distance is float32
