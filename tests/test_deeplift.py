"""DeepLIFT (rescale) and DeepLIFT-SHAP: closed forms, summation-to-delta, Captum float64 references.

* On a linear model DeepLIFT is ``gradient x (x - x0)``.
* Summation-to-delta, ``sum(attribution) == f(x) - f(x0)`` in float64, on the battery's tiny
  zoo VGG (ReLU -> max pool, VGG's order) and ResNet (BatchNorm, residual sums, the stem's
  overlapping 3x3/2 max pool), and on an MLP with GELU (the rescale rule on a non-ReLU
  activation); DeepLIFT-SHAP sums to ``f(x) - mean_b f(b)``.
* Captum 0.9.0's ``DeepLift`` / ``DeepLiftShap`` (``tests/fixtures/captum_path_refs.npz``,
  recorded by ``experiments/make_captum_path_references.py``, float64) on a tiny CNN of conv,
  max pool, BatchNorm and ReLU blocks: the Flax twin below has the torch module names, the
  weights are ported in float64 (``_port64``: the layout ``from_torch_state_dict`` gives, without
  its cast to float32) and the per-channel attributions (NCHW
  there, NHWC here) are compared directly, no normalisation (<= 1e-12 relative to the largest
  value; measured 1e-15). The script's docstring says why the max pools precede the ReLUs in
  that network (Captum's delta is wrong when a ReLU feeds a max pool).
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models
from xaijax.checkpoints import from_torch_state_dict
from xaijax.methods import NotApplicable
from xaijax.methods.deeplift import DeepLift, DeepLiftShap, deeplift_multipliers
from xaijax.models import layers as L
from xaijax.models import transformer_layers as T

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "captum_path_refs.npz")


class _Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = L.conv(4, 3, 1, 1, name="0")(x)
        x = L.MaxPool2d(2, 2, name="1")(x)
        x = L.batch_norm(False, name="2")(x)
        x = L.ReLU(name="3")(x)
        x = L.conv(8, 3, 1, 1, name="4")(x)
        x = L.MaxPool2d(2, 2, name="5")(x)
        x = L.batch_norm(False, name="6")(x)
        x = L.ReLU(name="7")(x)
        x = L.conv(8, 3, 1, 1, name="8")(x)
        x = L.batch_norm(False, name="9")(x)
        return L.ReLU(name="10")(x)


class _Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return L.dense(5, name="2")(L.ReLU(name="1")(L.dense(16, name="0")(x)))


class CaptumNet(nn.Module):
    """The Flax twin of the torch network of ``make_captum_path_references.py``."""

    @nn.compact
    def __call__(self, x):
        x = _Features(name="features")(x)
        x = L.Flatten(name="flatten")(L.AdaptiveAvgPool2d(1, name="pool")(x))
        return _Head(name="classifier")(x)


@functools.lru_cache(maxsize=None)
def _captum():
    z = np.load(FIXTURE)
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
    return z, sd


def _port64(sd) -> dict:
    """The torch state dict as the twin's variables, kept in float64 (conv OIHW -> HWIO, linear
    (out, in) -> (in, out), BatchNorm weight/bias/running statistics -> scale/bias/mean/var)."""
    params: dict = {"features": {}, "classifier": {}}
    stats: dict = {"features": {}}
    for key in {k.rsplit(".", 1)[0] for k in sd if not k.endswith("num_batches_tracked")}:
        group, idx = key.split(".")
        w, b = np.asarray(sd[key + ".weight"], np.float64), np.asarray(sd[key + ".bias"], np.float64)
        if key + ".running_mean" in sd:
            params[group][idx] = {"scale": w, "bias": b}
            stats[group][idx] = {"mean": np.asarray(sd[key + ".running_mean"]), "var": np.asarray(sd[key + ".running_var"])}
        elif w.ndim == 4:
            params[group][idx] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
        else:
            params[group][idx] = {"kernel": w.T, "bias": b}
    return _to64({"params": params, "batch_stats": stats})


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_captum_reference_deeplift_and_shap(x64):
    z, sd = _captum()
    model = CaptumNet()
    v = _port64(sd)
    # the same structure as xaijax's converter gives (which casts to the parameters' float32)
    ported = from_torch_state_dict(model, sd, input_shape=(1, 16, 16, 3))
    assert jax.tree_util.tree_structure(ported) == jax.tree_util.tree_structure(v)
    for a, b in zip(jax.tree_util.tree_leaves(ported), jax.tree_util.tree_leaves(v)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=1e-6, atol=1e-7)
    x, t = jnp.asarray(z["x"]), jnp.asarray(z["target"])
    assert x.dtype == jnp.float64

    @jax.jit
    def run(v_, x_, b_, bs_):
        return (
            DeepLift(baseline=b_).attribution(model, v_, x_, t),
            DeepLift().attribution(model, v_, x_, t),
            DeepLiftShap(baselines=bs_).attribution(model, v_, x_, t),
            DeepLiftShap(baselines=bs_, chunk=3).attribution(model, v_, x_, t),
            methods.get("deeplift")(model, v_, x_, t),
        )

    dl, d0, ds, dc, map0 = run(v, x, jnp.asarray(z["baseline"]), jnp.asarray(z["baselines"]))
    assert dl.dtype == jnp.float64
    assert _rel(dl, z["out/deeplift"]) < 1e-12, _rel(dl, z["out/deeplift"])
    assert _rel(d0, z["out/deeplift_zero"]) < 1e-12, _rel(d0, z["out/deeplift_zero"])
    assert _rel(ds, z["out/deeplift_shap"]) < 1e-12, _rel(ds, z["out/deeplift_shap"])
    # chunked over the references: the same
    np.testing.assert_allclose(np.asarray(dc), np.asarray(ds), rtol=0, atol=1e-12)
    # DeepLIFT-SHAP sums to f(x) - mean_b f(b) (Captum's convergence delta is ~1e-14 too)
    f = lambda xx: model.apply(v, xx)  # noqa: E731
    fb = np.stack([np.asarray(f(jnp.broadcast_to(b, x.shape)))[np.arange(2), z["target"]] for b in z["baselines"]]).mean(0)
    fx = np.asarray(f(x))[np.arange(2), z["target"]]
    np.testing.assert_allclose(np.asarray(ds.sum((1, 2, 3))), fx - fb, rtol=1e-10, atol=1e-10)
    assert np.abs(z["out/delta/deeplift_shap"]).max() < 1e-10
    # the map is the channel sum
    np.testing.assert_allclose(np.asarray(map0), np.asarray(d0.sum(-1)), rtol=0, atol=1e-12)


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return L.dense(4, name="fc")(L.Flatten(name="flatten")(x))


def test_linear_model_is_gradient_times_delta(x64):
    model = _Linear()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 5, 2)))
    x0 = jnp.asarray(rng.normal(size=(3, 4, 5, 2)))
    v = _to64(model.init(jax.random.key(0), x))
    t = jnp.array([0, 3, 1])
    a = DeepLift(baseline=x0).attribution(model, v, x, t)
    w = np.asarray(v["params"]["fc"]["kernel"])  # (40, 4)
    expected = (np.asarray(x - x0).reshape(3, -1) * w[:, np.asarray(t)].T).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(a), expected, rtol=1e-13, atol=1e-13)
    g = jax.grad(lambda xx: (model.apply(v, xx) * jax.nn.one_hot(t, 4)).sum())(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(g * (x - x0)), rtol=1e-13, atol=1e-13)


def _zoo(arch: str):
    from test_battery import ARCHS, _perturb

    reg, kw, size = ARCHS[arch]
    model = models.get(reg, num_classes=5, **kw)
    v = _perturb(models.random_variables(model, (1, size, size, 3), seed=0), seed=1)
    return model, _to64(v), size


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_summation_to_delta_zoo(x64, arch):
    """ReLU -> max pool (VGG), BatchNorm, residual sums and the overlapping stem max pool
    (ResNet), float64: sum(attribution) == f(x) - f(x0)."""
    model, v, size = _zoo(arch)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, size, size, 3)))
    x0 = jnp.asarray(0.3 * rng.normal(size=(2, size, size, 3)))
    t = jnp.array([1, 3])
    a = jax.jit(lambda v_, x_, b_: DeepLift(baseline=b_).attribution(model, v_, x_, t))(v, x, x0)
    assert a.dtype == jnp.float64
    out = lambda xx: np.asarray(model.apply(v, xx))[np.arange(2), np.asarray(t)]  # noqa: E731
    delta = out(x) - out(x0)
    np.testing.assert_allclose(np.asarray(a.sum((1, 2, 3))), delta, rtol=1e-10, atol=1e-10 * np.abs(delta).max())
    # not the gradient x delta (the network is not linear): DeepLIFT is its own method
    g = jax.grad(lambda xx: (model.apply(v, xx) * jax.nn.one_hot(t, 5)).sum())(x)
    assert np.abs(np.asarray(g * (x - x0)) - np.asarray(a)).max() > 1e-3 * np.abs(np.asarray(a)).max()


class _GeluMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = T.GELU(name="act")(L.dense(6, name="fc1")(L.Flatten(name="flatten")(x)))
        return L.dense(3, name="fc2")(h)


def test_rescale_rule_on_gelu_and_eps_fallback(x64):
    """One GELU layer: the rescale rule gives summation-to-delta; the multiplier of each hidden
    unit is (y - y0) / (h - h0); features equal to the reference get zero attribution."""
    model = _GeluMLP()
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 2)))
    x0 = jnp.asarray(rng.normal(size=(2, 3, 3, 2))).at[:, 0, 0, :].set(x[:, 0, 0, :])
    v = _to64(model.init(jax.random.key(1), x))
    t = jnp.array([2, 0])
    a = DeepLift(baseline=x0).attribution(model, v, x, t)
    out = lambda xx: np.asarray(model.apply(v, xx))[np.arange(2), np.asarray(t)]  # noqa: E731
    np.testing.assert_allclose(np.asarray(a.sum((1, 2, 3))), out(x) - out(x0), rtol=1e-12)
    assert np.all(np.asarray(a[:, 0, 0, :]) == 0)
    # closed form: m_x = W1 diag((gelu(h) - gelu(h0)) / (h - h0)) W2[:, t]
    p = v["params"]
    w1, b1 = np.asarray(p["fc1"]["kernel"]), np.asarray(p["fc1"]["bias"])
    w2 = np.asarray(p["fc2"]["kernel"])
    xf, x0f = np.asarray(x).reshape(2, -1), np.asarray(x0).reshape(2, -1)
    h, h0 = xf @ w1 + b1, x0f @ w1 + b1
    gelu = lambda u: np.asarray(jax.nn.gelu(jnp.asarray(u), approximate=False))  # noqa: E731
    m = (gelu(h) - gelu(h0)) / (h - h0) * w2[:, np.asarray(t)].T  # (2, 6)
    expected = (xf - x0f) * (m @ w1.T)
    np.testing.assert_allclose(np.asarray(a).reshape(2, -1), expected, rtol=1e-10, atol=1e-12)


def test_deeplift_shap_is_mean_of_deeplift_and_default_references(x64):
    model = CaptumNet()
    _, sd = _captum()
    v = _port64(sd)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 16, 3)))
    t = jnp.array([0, 4])
    refs = methods.path_attribution.reference_set("deeplift-shap", x, None, 0)
    assert refs.shape == (5, 2, 16, 16, 3)

    @jax.jit
    def run(v_, x_, refs_):
        shap = DeepLiftShap(chunk=2).attribution(model, v_, x_, t)
        each = [DeepLift(baseline=refs_[b]).attribution(model, v_, x_, t) for b in range(5)]
        return shap, each

    a, each = run(v, x, refs)
    assert a.dtype == jnp.float64
    mean = sum(np.asarray(e) for e in each) / 5
    np.testing.assert_allclose(np.asarray(a), mean, rtol=1e-10, atol=1e-12 * np.abs(mean).max())
    out = lambda xx: np.asarray(model.apply(v, xx))[np.arange(2), np.asarray(t)]  # noqa: E731
    fb = np.mean([out(refs[b]) for b in range(5)], axis=0)
    np.testing.assert_allclose(np.asarray(a.sum((1, 2, 3))), out(x) - fb, rtol=1e-9)


def test_transformer_and_functional_models_are_refused():
    from test_battery import ARCHS

    reg, kw, size = ARCHS["vit"]
    vit = models.get(reg, num_classes=5, **kw)
    v = models.random_variables(vit, (1, size, size, 3), seed=0)
    x = jnp.zeros((1, size, size, 3))
    with pytest.raises(NotApplicable, match="LayerNorm"):
        jax.eval_shape(lambda xx: methods.get("deeplift")(vit, v, xx, 0), x)

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return L.dense(2, name="fc")(L.Flatten(name="flatten")(x * 2.0 + 1.0).mean(-1, keepdims=True) * 3.0)

    m = Scaled()
    xs = jnp.ones((1, 2, 2, 1))
    vs = m.init(jax.random.key(0), xs)
    with pytest.raises(NotApplicable, match="scale"):
        deeplift_multipliers(m, vs, xs, jnp.zeros_like(xs), 0)


def test_bad_inputs():
    model = _Linear()
    x = jnp.ones((2, 4, 5, 2))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="baseline"):
        DeepLift(baseline=jnp.zeros((3, 3)))(model, v, x, 0)
    with pytest.raises(ValueError, match="baselines"):
        DeepLiftShap(baselines=jnp.zeros((2, 4, 4, 2)))(model, v, x, 0)
    with pytest.raises(ValueError, match="chunk"):
        DeepLiftShap(chunk=0)
    with pytest.raises(ValueError, match="eps"):
        DeepLift(eps=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        DeepLift(reduce="mean")
