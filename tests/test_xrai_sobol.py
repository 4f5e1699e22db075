"""Sobol attribution (xaijax.methods.perturbation.sobol), float64.

* Against a NumPy re-computation of the authors' algorithm (``fel-thomas/Sobol-Attribution-Method``:
  replicated design A, B, C_i from scipy's unscrambled Sobol sequence, nearest-neighbour mask
  upsampling, inpainting with baseline 0, Jansen's total-order estimator) on the same design:
  agreement to float64 rounding.
* Closed form: on a model linear in the input, the target logit is ``c . m + const`` in the cell
  mask values ``m`` (independent uniforms), whose total-order indices are ``c_i^2 / sum_j c_j^2``;
  the quasi-MC estimate converges to them.
* The nearest-neighbour grid equals torch's ``interpolate(mode="nearest")`` (when torch is
  installed).

XRAI is tested in ``tests/test_xrai.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import get
from xaijax.methods.perturbation import Sobol
from xaijax.methods.perturbation.sobol import sobol_design, sobol_grid_mask
from tiny_models import LinearNet as Linear, TanhReluNet as Tiny, float64_variables

pytestmark = pytest.mark.usefixtures("x64")
SIZE = 12


def _init(model, seed):
    return jax.tree_util.tree_map(jnp.asarray, float64_variables(model, SIZE, seed))


def _reference(model, v, x, t, g, nd):
    """The authors' algorithm in NumPy (f(B) evaluated and unused, as they do)."""
    d = g * g
    a, b = sobol_design(d, nd)
    c = np.repeat(a[None], d, 0)
    for i in range(d):
        c[i, :, i] = b[:, i]
    designs = np.concatenate([a, b, c.reshape(-1, d)])
    cells = sobol_grid_mask((SIZE, SIZE), g)
    out = []
    for xi, ti in zip(np.asarray(x), np.asarray(t)):
        up = designs[:, cells]  # nearest upsampling of every design
        y = np.asarray(model.apply(v, jnp.asarray(xi[None] * up[..., None])))[:, ti]
        fa, fc = y[:nd], y[2 * nd :].reshape(d, nd)
        var = np.sum((fa - fa.mean()) ** 2) / (nd - 1)
        out.append(np.array([np.sum((fa - fc[i]) ** 2) / (2 * nd * var) for i in range(d)]))
    return np.stack(out)


def test_sobol_matches_authors_algorithm():
    model = Tiny()
    v = _init(model, 0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)))
    t = jnp.asarray([0, 2])
    m = Sobol(grid_size=3, n_designs=16, chunk=20)  # chunks mix A rows and C rows
    ours = np.asarray(m.indices(model, v, x, t))
    ref = _reference(model, v, x, t, 3, 16)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert ref.max() > 1e-3
    maps = np.asarray(m(model, v, x, t))
    assert maps.dtype == np.float64
    np.testing.assert_allclose(maps, ours[:, sobol_grid_mask((SIZE, SIZE), 3)], rtol=0, atol=0)  # each pixel: its cell
    jitted = jax.jit(lambda vv, xx: Sobol(grid_size=3, n_designs=16, chunk=7)(model, vv, xx, t))(v, x)
    np.testing.assert_allclose(np.asarray(jitted), maps, rtol=0, atol=1e-12)


def test_sobol_linear_model_closed_form():
    model = Linear()
    v = _init(model, 1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, SIZE, SIZE, 3)))
    t = jnp.asarray([1])
    g = 2
    st = np.asarray(Sobol(grid_size=g, n_designs=1024, chunk=512).indices(model, v, x, t))[0]
    # logit = sum_i c_i m_i + const, c_i = sum over cell i of w . x
    w = np.asarray(v["params"]["Dense_0"]["kernel"])[:, 1].reshape(SIZE, SIZE, 3)
    cells = sobol_grid_mask((SIZE, SIZE), g)
    c = np.array([(w * np.asarray(x[0]))[cells == i].sum() for i in range(g * g)])
    np.testing.assert_allclose(st, c**2 / (c**2).sum(), rtol=0, atol=0.02)


def test_grid_is_torch_nearest():
    torch = pytest.importorskip("torch")
    for size, g in [((12, 12), 3), ((13, 10), 4), ((32, 32), 8)]:
        ids = np.arange(g * g, dtype=np.float64).reshape(1, 1, g, g)
        up = torch.nn.functional.interpolate(torch.from_numpy(ids), size).numpy()[0, 0]
        np.testing.assert_array_equal(sobol_grid_mask(size, g), up.astype(np.int32))


def test_bad_arguments():
    for bad in (dict(n_designs=48), dict(n_designs=1), dict(grid_size=0), dict(chunk=0), dict(seed=0.5), dict(scramble=1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            Sobol(**bad)
    model = Tiny()
    v = _init(model, 0)
    x = jnp.zeros((2, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="grid_size"):
        Sobol(grid_size=13)(model, v, x, 0)
    with pytest.raises(ValueError, match="baselines"):
        Sobol(grid_size=2, n_designs=2)(model, v, x, 0, baselines=np.zeros((5,)))
    mask = np.stack([np.zeros((SIZE, SIZE), np.int32), np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 2])
    with pytest.raises(ValueError, match="same number of features"):
        Sobol()(model, v, x, 0, feature_mask=mask)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        get("sobol", grid=4)
