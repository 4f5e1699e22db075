"""The contrast combinator against explicit differences of two method calls, closed forms
for methods linear in their seed, and its errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods.combinators import contrastive as ct
from xaijax.methods import registry
from xaijax.methods.perturbation import DRise
from xaijax.methods.gradient import Gradient
from xaijax.methods.lrp import CLRP, LRP
from xaijax.methods.perturbation import RISE
from xaijax.models import layers

H, W, K = 8, 7, 4


class TinyNet(nn.Module):
    """conv3x3 -> ReLU -> global mean -> dense (4 classes)."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(6, 3, padding=1, name="conv")(x))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(K, name="fc")(h)


@pytest.fixture(scope="module")
def setup():
    model = TinyNet()
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape), jnp.float32), tmpl)
    x = jnp.asarray(rng.normal(size=(3, H, W, 3)), jnp.float32)
    return model, variables, x


TARGET = jnp.array([0, 2, 3])


def _onehot():
    return jax.nn.one_hot(TARGET, K)


def test_dual_seeds_closed_forms(setup):
    model, variables, x = setup
    z = np.asarray(model.apply(variables, x), np.float64)
    oh = np.asarray(_onehot())
    others = 1 - oh
    uni = np.asarray(ct.dual_seed("uniform", jnp.asarray(z), _onehot()))
    np.testing.assert_allclose(uni, others / 3, rtol=1e-6)
    lg = np.asarray(ct.dual_seed("logits", jnp.asarray(z), _onehot()))
    np.testing.assert_allclose(lg, others * np.abs(z) / (others * np.abs(z)).sum(1, keepdims=True), rtol=1e-5)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sm = np.asarray(ct.dual_seed("softmax", jnp.asarray(z), _onehot()))
    np.testing.assert_allclose(sm, others * p / (others * p).sum(1, keepdims=True), rtol=1e-5)
    for d in (uni, lg, sm):
        np.testing.assert_allclose(d.sum(1), 1.0, rtol=1e-6)
        assert np.all(d[oh.astype(bool)] == 0)


@pytest.mark.parametrize("dual", ["uniform", "logits", "softmax"])
@pytest.mark.parametrize("scale", ["total", "unit", "none"])
def test_contrast_equals_explicit_difference_of_two_calls(setup, dual, scale):
    model, variables, x = setup
    base = LRP("epsilon")
    got = np.asarray(ct.contrast(base, dual=dual, scale=scale)(model, variables, x, TARGET))
    seed_d = ct.dual_seed(dual, model.apply(variables, x), _onehot())
    r_t = np.asarray(base(model, variables, x, _onehot()), np.float64)  # two separate calls
    r_d = np.asarray(base(model, variables, x, seed_d), np.float64)
    st, sd = r_t.sum((1, 2))[:, None, None], r_d.sum((1, 2))[:, None, None]
    ref = {"none": r_t - r_d, "total": r_t - r_d * st / sd, "unit": r_t / st - r_d / sd}[scale]
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())
    assert got.shape == (3, H, W) and got.dtype == np.float32
    # positive=True is the positive part of the same map
    pos = np.asarray(ct.contrast(base, dual=dual, scale=scale, positive=True)(model, variables, x, TARGET))
    np.testing.assert_allclose(pos, np.maximum(got, 0.0), rtol=1e-6, atol=1e-7)


def test_linear_methods_give_the_map_of_the_contrastive_seed(setup):
    """gradient (channel sum) and RISE with logit scores are linear in the seed, so with
    scale='none' the contrast is the method's map for the seed onehot - dual."""
    model, variables, x = setup
    oh = _onehot()
    dual = jnp.full((3, K), 1 / 3) * (1 - oh)
    g = Gradient(False, "sum")
    np.testing.assert_allclose(
        ct.contrast(g, scale="none")(model, variables, x, TARGET), g(model, variables, x, oh - dual), rtol=1e-5, atol=1e-6
    )
    r = RISE(n=12, s=3, score="logit", chunk=6)
    np.testing.assert_allclose(
        ct.contrast(r, scale="none")(model, variables, x, TARGET), r(model, variables, x, oh - dual), rtol=1e-4, atol=1e-5
    )


def test_registered_contrastive_gradient_closed_form(setup):
    model, variables, x = setup
    m = registry.get("contrastive-gradient")
    assert isinstance(m, ct.Contrast) and m.scale == "none" and m.dual == "uniform"

    def score(xx):  # z_t - mean of the other logits, summed over the batch
        z = model.apply(variables, xx)
        oh = jax.nn.one_hot(TARGET, K)
        return (z * oh).sum() - (z * (1 - oh)).sum() / (K - 1)

    ref = jax.grad(score)(x).sum(-1)
    np.testing.assert_allclose(np.asarray(jax.jit(m, static_argnums=0)(model, variables, x, TARGET)), ref, rtol=1e-5, atol=1e-6)
    # the generic lookup: contrast over any registered method, wrapper options prefixed contrast_
    c = ct.get_contrast("lrp-epsilon", eps=1e-3, contrast_scale="unit", contrast_dual="softmax")
    assert isinstance(c.method, LRP) and (c.scale, c.dual) == ("unit", "softmax")
    with pytest.raises(ValueError, match="contrast_"):
        ct.get_contrast("gradient", contrast_bogus=1)


def test_errors(setup):
    model, variables, x = setup
    with pytest.raises(ValueError, match="float seeds"):
        ct.contrast(CLRP())(model, variables, x, TARGET)  # CLRP takes class indices only
    with pytest.raises(ValueError, match="'detection' method"):
        ct.contrast(DRise(n=4))
    with pytest.raises(ValueError, match="class indices"):
        ct.contrast(Gradient())(model, variables, x, _onehot())
    with pytest.raises(ValueError, match="out of range"):
        ct.contrast(Gradient())(model, variables, x, 4)
    with pytest.raises(ValueError, match="shape"):
        ct.contrast(Gradient())(model, variables, x, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="scale"):
        ct.contrast(Gradient(), scale="max")
    with pytest.raises(ValueError, match="dual"):
        ct.contrast(Gradient(), dual="random")
    with pytest.raises(TypeError, match="callable"):
        ct.contrast("gradient")
    with pytest.raises(ValueError, match="seed shape"):
        ct.contrast(Gradient(), dual=lambda z, oh: z[:, :2])(model, variables, x, TARGET)


def test_contrast_prefix_in_the_registry():
    from xaijax import methods as _methods
    from xaijax.methods.combinators import get_contrast as _get_contrast

    assert _methods.get("contrast:gradient", contrast_scale="none") == _get_contrast("gradient", contrast_scale="none")
    with pytest.raises(ValueError, match="unknown method 'gradiant'"):
        _methods.get("contrast:gradiant")
