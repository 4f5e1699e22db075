"""RISE against a slow per-mask reference loop, scipy's zoom, and its invariances."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods.perturbation import rise as pt
from xaijax.methods import registry
from xaijax.models import layers

H, W = 12, 10


class TinyNet(nn.Module):
    """conv3x3 -> ReLU -> global mean -> dense (4 classes)."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(6, 3, padding=1, name="conv")(x))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(4, name="fc")(h)


@pytest.fixture(scope="module")
def setup():
    model = TinyNet()
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape), jnp.float32), tmpl)
    x = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
    return model, variables, x


def test_upsample_matrix_matches_scipy_zoom_mirror():
    """Our bilinear upsampling = scipy zoom(order=1, mode='mirror', grid_mode=True) = skimage resize(mode='reflect')."""
    ndimage = pytest.importorskip("scipy.ndimage")
    s, up = 5, 18
    g = np.random.default_rng(1).random((s, s))
    u = pt.rise_upsample_matrix(s, up)
    ref = ndimage.zoom(g, up / s, order=1, mode="mirror", grid_mode=True)
    assert ref.shape == (up, up)
    np.testing.assert_allclose(u @ g @ u.T, ref, atol=1e-12)
    np.testing.assert_allclose(u.sum(1), 1.0)


def test_masks_are_cropped_upsampled_grids():
    ndimage = pytest.importorskip("scipy.ndimage")
    s, p = 4, 0.5
    cell = pt.rise_cell_size((H, W), s)
    assert cell == (3, 3)
    key = jax.random.key(3)
    masks = np.asarray(pt.rise_masks(key, jnp.arange(6), (H, W), s, p))
    grids, shifts = jax.jit(jax.vmap(lambda i: pt.rise_grid_and_shift(key, i, s, p, cell)))(jnp.arange(6))
    for i in range(6):
        grid, (dy, dx) = np.asarray(grids[i], np.float64), np.asarray(shifts[i])
        assert set(np.unique(grid)) <= {0.0, 1.0}
        assert 0 <= dy < cell[0] and 0 <= dx < cell[1]
        up = ndimage.zoom(grid, (s + 1) * cell[0] / s, order=1, mode="mirror", grid_mode=True)
        np.testing.assert_allclose(masks[i], up[dy : dy + H, dx : dx + W], atol=1e-6)
    # the generator is indexed: a mask does not depend on what is generated with it
    perm = np.array([4, 1, 5, 0, 3, 2])
    np.testing.assert_array_equal(np.asarray(pt.rise_masks(key, jnp.asarray(perm), (H, W), s, p)), masks[perm])


@pytest.mark.parametrize("score", ["prob", "logit"])
def test_rise_matches_reference_loop(setup, score):
    model, variables, x = setup
    n, s, p, seed = 11, 3, 0.6, 5
    method = pt.RISE(n=n, s=s, p=p, score=score, seed=seed, chunk=4)  # 3 chunks, last one padded
    target = jnp.array([1, 3])
    got = np.asarray(jax.jit(method, static_argnums=0)(model, variables, x, target))

    masks = np.asarray(pt.rise_masks(jax.random.key(seed), jnp.arange(n), (H, W), s, p), np.float64)
    fwd = jax.jit(lambda xx: model.apply(variables, xx))
    ref = np.zeros((2, H, W))
    for i in range(n):  # slow reference: one mask at a time
        out = np.asarray(fwd(x * masks[i][None, :, :, None]), np.float64)
        if score == "prob":
            out = np.exp(out - out.max(-1, keepdims=True))
            out /= out.sum(-1, keepdims=True)
        for b, t in enumerate([1, 3]):
            ref[b] += out[b, t] * masks[i]
    ref /= n * p
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_rise_chunk_batch_jit_independence_and_determinism(setup):
    model, variables, x = setup
    base = dict(n=9, s=3, p=0.5, seed=2)
    ref = np.asarray(pt.RISE(chunk=9, **base)(model, variables, x, 2))  # eager, a single chunk
    # chunked (3 chunks, last one padded) and jitted: the same masks, the same map
    jitted = jax.jit(pt.RISE(chunk=4, **base), static_argnums=0)
    np.testing.assert_allclose(jitted(model, variables, x, 2), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(jitted(model, variables, x, 2)), np.asarray(jitted(model, variables, x, 2)))
    # a sample's map does not depend on the rest of its batch
    np.testing.assert_allclose(jitted(model, variables, x[1:], 2)[0], ref[1], rtol=1e-5, atol=1e-7)
    # masks are deterministic for a seed and differ between seeds
    m2 = np.asarray(pt.rise_masks(2, jnp.arange(9), (H, W), 3, 0.5))
    np.testing.assert_array_equal(m2, np.asarray(pt.rise_masks(jax.random.key(2), jnp.arange(9), (H, W), 3, 0.5)))
    assert np.abs(m2 - np.asarray(pt.rise_masks(3, jnp.arange(9), (H, W), 3, 0.5))).max() > 0.1


def test_rise_constant_model_gives_mean_mask_over_p():
    """A model that ignores its input: map = score * mean_i(M_i) / p, averaging to ~score."""

    class Const(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.zeros((x.shape[0], 4)) + jnp.array([0.0, 1.0, 2.0, 3.0])

    x = jnp.ones((1, H, W, 3))
    n, s, p = 50, 4, 0.5
    got = np.asarray(pt.RISE(n=n, s=s, p=p, chunk=16)(Const(), {}, x, 3))
    prob3 = np.exp(3.0) / np.exp([0.0, 1.0, 2.0, 3.0]).sum()
    masks = np.asarray(pt.rise_masks(0, jnp.arange(n), (H, W), s, p))
    np.testing.assert_allclose(got[0], prob3 * masks.mean(0) / p, rtol=1e-5)


def test_rise_registered_and_validates():
    m = registry.get("rise", n=8, chunk=4)
    assert isinstance(m, pt.RISE) and m.n == 8 and m.s == 7 and m.p == 0.5
    assert pt.RISE() == pt.RISE(n=4000, s=7, p=0.5, score="prob", seed=0, chunk=100)
    with pytest.raises(ValueError, match="p"):
        pt.RISE(p=0.0)
    with pytest.raises(ValueError, match="score"):
        pt.RISE(score="tanh")
    with pytest.raises(ValueError, match="s"):
        pt.RISE(s=1)
    with pytest.raises(ValueError, match="chunk"):
        pt.RISE(chunk=0)


def test_rise_torchray_protocol_on_given_masks_in_float64(setup, x64):
    """TorchRay's benchmark formula on recorded masks: sum_i sigmoid(z(x * M_i))_t M_i / N, in float64."""
    model, variables, x = setup
    rng = np.random.default_rng(3)
    masks = rng.uniform(size=(7, H, W))  # any recorded masks, values in [0, 1]
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64_ = jnp.asarray(x, jnp.float64)
    method = pt.RISE(score="sigmoid", normalize="n", chunk=3)  # 3 chunks, the last padded
    got = method(model, v64, x64_, jnp.array([0, 2]), masks=jnp.asarray(masks))
    assert got.dtype == jnp.float64
    fwd = jax.jit(lambda xx: model.apply(v64, xx))
    ref = np.zeros((2, H, W))
    for i in range(len(masks)):
        z = np.asarray(fwd(x64_ * masks[i][None, :, :, None]))
        sig = 1.0 / (1.0 + np.exp(-z))
        for b, t in enumerate([0, 2]):
            ref[b] += sig[b, t] * masks[i]
    np.testing.assert_allclose(np.asarray(got), ref / len(masks), rtol=1e-12, atol=1e-14)
    # the paper's normalisation divides by N * p instead; a callable score equals the named one
    paper = pt.RISE(score=jax.nn.sigmoid, p=0.5, chunk=3)(model, v64, x64_, jnp.array([0, 2]), masks=jnp.asarray(masks))
    np.testing.assert_allclose(np.asarray(paper), ref / (len(masks) * 0.5), rtol=1e-12, atol=1e-14)


def test_rise_mask_generator_and_mask_validation(setup):
    model, variables, x = setup

    def halves(key, idx, size):  # mask i keeps the left half for even i, the right half for odd i
        left = (jnp.arange(size[1]) < size[1] // 2).astype(jnp.float32)
        row = jnp.where((idx % 2 == 0)[:, None], left[None], 1.0 - left[None])
        return jnp.broadcast_to(row[:, None, :], (idx.shape[0],) + tuple(size))

    gen = pt.RISE(n=4, chunk=4, mask_fn=halves, score="logit", normalize="n")
    given = halves(None, jnp.arange(4), (H, W))
    np.testing.assert_allclose(
        gen(model, variables, x, 1), pt.RISE(score="logit", normalize="n")(model, variables, x, 1, masks=given), rtol=1e-6
    )
    with pytest.raises(ValueError, match="masks must have shape"):
        pt.RISE()(model, variables, x, 1, masks=jnp.ones((3, H + 1, W)))
    with pytest.raises(ValueError, match="normalize"):
        pt.RISE(normalize="np")
    with pytest.raises(ValueError, match="score"):
        pt.RISE(score="softmax")


def test_seeded_draws_do_not_depend_on_float64_mode():
    """RISE masks, Shapley permutations / KernelSHAP coalitions and GradientSHAP's draws are the
    same with and without jax_enable_x64, so a float64 run checks the float32 run's computation
    (the float64 peer benchmark gives TorchRay the masks of the float32 run)."""
    from xaijax.methods.path_attribution import gradient_shap_draws
    from xaijax.methods.perturbation.shapley import sampled_permutations, shapley_kernel_coalitions

    def draws():
        return (np.asarray(pt.rise_masks(3, jnp.arange(6), (20, 20), 5, 0.5), np.float64),
                np.asarray(sampled_permutations(4, jnp.arange(5), 9)),
                np.asarray(shapley_kernel_coalitions(5, jnp.arange(7), jnp.asarray([9, 6]), 9)),
                *(np.asarray(a, np.float64) for a in gradient_shap_draws(6, 5, 3, (4, 4, 3), jnp.float32)))

    plain = draws()
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        wide = draws()
    finally:
        jax.config.update("jax_enable_x64", prev)
    for a, b in zip(plain, wide):
        np.testing.assert_array_equal(a, b)
    assert plain[0].min() < plain[0].max()  # real masks, not a constant
