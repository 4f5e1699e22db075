"""The user's own model (issue 21): one tiny network written five ways gives the same logits,
maps and metric values (float64, 1e-10), and every method a model kind does not support
raises the documented error.

The network: conv1 (3x3, 3 -> 8, bias) -> BatchNorm (running statistics) -> ReLU -> 2x2 max
pool -> ``layer4`` = relu(conv 3x3 8 -> 8) + residual -> global average pool -> fc (8 -> 5).
Written as a zoo-style linen model (xaijax.models.layers modules), a linen model the Flax way
(functional nn.relu / nn.max_pool / jnp.mean / ``+``), a Flax NNX module, an Equinox module
(per-example, channels-first) and a plain function ``apply(params, x, tap=None)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xaijax import methods, metrics, wrap
from xaijax.methods import NotApplicable
from xaijax.models import adapters, taps
from xaijax.models import layers as L

eqx = pytest.importorskip("equinox")

K = 5
C = 8


# ----------------------------------------------------------------------------- five forms


class ZooBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        y = L.ReLU(name="relu")(L.conv(C, 3, 1, 1, name="conv")(h))
        return L.Add(name="add")(y, h)


class ZooNet(nn.Module):
    cam_layer = "layer4"

    @nn.compact
    def __call__(self, x):
        h = L.conv(C, 3, 1, 1, name="conv1")(x)
        h = L.batch_norm(False, name="bn1")(h)
        h = L.ReLU(name="relu")(h)
        h = L.MaxPool2d(2, name="maxpool")(h)
        h = ZooBlock(name="layer4")(h)
        h = L.AdaptiveAvgPool2d(1, name="avgpool")(h)
        h = L.Flatten(name="flatten")(h)
        return nn.Dense(K, name="fc")(h)


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.relu(nn.Conv(C, (3, 3), padding=1, name="conv")(h)) + h


class FlaxNet(nn.Module):
    """Written like Flax's ImageNet example: functional activations and pooling."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(C, (3, 3), padding=1, name="conv1")(x)
        h = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(h)
        h = nn.max_pool(nn.relu(h), (2, 2), strides=(2, 2))
        h = FlaxBlock(name="layer4")(h)
        return nn.Dense(K, name="fc")(jnp.mean(h, axis=(1, 2)))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(C, C, (3, 3), padding=1, rngs=rngs)

    def __call__(self, h):
        return nnx.relu(self.conv(h)) + h


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, C, (3, 3), padding=1, rngs=rngs)
        self.bn1 = nnx.BatchNorm(C, epsilon=1e-5, rngs=rngs)
        self.layer4 = NNXBlock(rngs)
        self.fc = nnx.Linear(C, K, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        return self.fc(self.layer4(h).mean(axis=(1, 2)))


class EqxNet(eqx.Module):
    """Per-example and channels-first, as Equinox models are; BatchNorm as its eval affine."""

    conv1: eqx.nn.Conv2d
    bn_scale: jax.Array
    bn_bias: jax.Array
    bn_mean: jax.Array
    bn_var: jax.Array
    conv4: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __call__(self, x, *, tap=None):  # x (3, H, W)
        h = self.conv1(x)
        inv = (self.bn_scale / jnp.sqrt(self.bn_var + 1e-5))[:, None, None]
        h = jax.nn.relu((h - self.bn_mean[:, None, None]) * inv + self.bn_bias[:, None, None])
        h = eqx.nn.MaxPool2d(2, 2)(h)
        h = jax.nn.relu(self.conv4(h)) + h
        if tap is not None:
            h = tap("layer4", h)
        return self.fc(h.mean(axis=(1, 2)))


def apply_fn(params, x, tap=None):
    """The network as a plain function of a params pytree (NHWC batches)."""

    def conv(p, h):
        y = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["bias"]

    bn = params["bn1"]
    h = conv(params["conv1"], x)
    h = (h - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
    h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(conv(params["layer4"], h)) + h
    if tap is not None:
        h = tap("layer4", h)
    return jnp.mean(h, axis=(1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]


def _weights(dtype=jnp.float64):
    ks = jax.random.split(jax.random.key(21), 10)
    n = lambda k, s, scale=0.4: (scale * jax.random.normal(k, s)).astype(dtype)
    return {
        "conv1": {"kernel": n(ks[0], (3, 3, 3, C)), "bias": n(ks[1], (C,), 0.1)},
        "bn1": {"scale": 1.0 + n(ks[2], (C,), 0.2), "bias": n(ks[3], (C,), 0.1), "mean": n(ks[4], (C,), 0.1),
                "var": 0.5 + jnp.abs(n(ks[5], (C,), 0.5))},
        "layer4": {"kernel": n(ks[6], (3, 3, C, C), 0.3), "bias": n(ks[7], (C,), 0.1)},
        "fc": {"kernel": n(ks[8], (C, K), 0.8), "bias": n(ks[9], (K,), 0.1)},
    }


def _linen_variables(w):
    return {
        "params": {
            "conv1": dict(w["conv1"]),
            "bn1": {"scale": w["bn1"]["scale"], "bias": w["bn1"]["bias"]},
            "layer4": {"conv": dict(w["layer4"])},
            "fc": dict(w["fc"]),
        },
        "batch_stats": {"bn1": {"mean": w["bn1"]["mean"], "var": w["bn1"]["var"]}},
    }


def _nnx_model(w):
    m = NNXNet(nnx.Rngs(0))
    for mod, p in ((m.conv1, w["conv1"]), (m.bn1, w["bn1"]), (m.layer4.conv, w["layer4"]), (m.fc, w["fc"])):
        for k, a in p.items():
            getattr(mod, k).set_value(a)  # replaces the array (float64 here), no cast
    m.eval()
    return m


def _eqx_model(w):
    keys = jax.random.split(jax.random.key(0), 3)
    conv1 = eqx.nn.Conv2d(3, C, 3, padding=1, key=keys[0])
    conv4 = eqx.nn.Conv2d(C, C, 3, padding=1, key=keys[1])
    fc = eqx.nn.Linear(C, K, key=keys[2])
    oihw = lambda k: jnp.transpose(k, (3, 2, 0, 1))
    conv1 = eqx.tree_at(lambda c: (c.weight, c.bias), conv1, (oihw(w["conv1"]["kernel"]), w["conv1"]["bias"][:, None, None]))
    conv4 = eqx.tree_at(lambda c: (c.weight, c.bias), conv4, (oihw(w["layer4"]["kernel"]), w["layer4"]["bias"][:, None, None]))
    fc = eqx.tree_at(lambda f: (f.weight, f.bias), fc, (w["fc"]["kernel"].T, w["fc"]["bias"]))
    b = w["bn1"]
    return EqxNet(conv1, b["scale"], b["bias"], b["mean"], b["var"], conv4, fc)


def _forms(w):
    """``{form: (model, variables)}``, every form adapted by :func:`xaijax.wrap`."""
    lv = _linen_variables(w)
    return {
        "zoo": wrap(ZooNet(), lv),
        "flax": wrap(FlaxNet(), lv),
        "nnx": wrap(_nnx_model(w)),
        "equinox": wrap(_eqx_model(w)),
        "function": wrap(apply_fn, w),
    }


def _x(dtype=jnp.float64, n=2, size=16):
    return jax.random.normal(jax.random.key(3), (n, size, size, 3)).astype(dtype)


@pytest.fixture
def forms(x64):
    return _forms(_weights())


# ----------------------------------------------------------------------------- equality


def test_same_logits_every_form(forms):
    x = _x()
    ref = forms["zoo"][0].apply(forms["zoo"][1], x)
    assert ref.dtype == jnp.float64 and ref.shape == (2, K)
    assert float(jnp.abs(ref).max()) > 0.1
    for name, (m, v) in forms.items():
        out = m.apply(v, x)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize(
    "method",
    [
        ("gradient", {}),
        ("gradient-x-input", {}),
        ("integrated-gradients", {"steps": 8}),
        ("grad-cam", {"layer": "layer4"}),
        ("grad-cam-plus-plus", {"layer": "layer4"}),
        ("layer-cam", {"layer": "layer4"}),
        ("score-cam", {"layer": "layer4"}),
        ("smoothgrad", {"n": 4, "seed": 2}),
        ("rise", {"n": 64, "s": 4, "seed": 5, "chunk": 32}),
    ],
    ids=lambda m: m[0],
)
def test_same_maps_every_form(forms, method):
    name, kw = method
    fn = methods.get(name, **kw)
    x = _x()
    target = jnp.array([1, 3])
    ref = np.asarray(fn(*forms["zoo"], x, target))
    assert ref.shape == (2, 16, 16) and ref.dtype == np.float64
    assert np.abs(ref).max() > 1e-6  # a real map, not all zeros
    for form, (m, v) in forms.items():
        np.testing.assert_allclose(fn(m, v, x, target), ref, rtol=0, atol=1e-10 * max(1.0, np.abs(ref).max()), err_msg=form)


def test_layer_activation_and_gradient_every_form(forms):
    """The named layer's activation and dS/dA agree; a channels-first Equinox tap is shown NHWC."""
    x = _x()
    ref_a, ref_g, _ = methods.activation_and_gradient(*forms["zoo"], x, 2, "layer4")
    assert ref_a.shape == (2, 8, 8, C)
    for form, (m, v) in forms.items():
        a, g, _ = methods.activation_and_gradient(m, v, x, 2, "layer4")
        np.testing.assert_allclose(a, ref_a, rtol=0, atol=1e-10, err_msg=form)
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-10, err_msg=form)


def test_gradient_matches_direct_autodiff(forms):
    """Independent computation: jax.grad of the plain function itself."""
    w = _weights()
    x = _x()
    direct = jax.grad(lambda xx: apply_fn(w, xx)[:, 4].sum())(x).sum(-1)
    for form, (m, v) in forms.items():
        np.testing.assert_allclose(methods.get("gradient", reduce="sum")(m, v, x, 4), direct, rtol=0, atol=1e-10, err_msg=form)


def test_deletion_insertion_same_every_form(forms):
    x = _x()
    target = jnp.array([0, 2])
    maps = methods.get("grad-cam", layer="layer4")(*forms["zoo"], x, target)
    ref = None
    for form, (m, v) in forms.items():
        fn = metrics.faithfulness.classifier_fn(m, v)
        d = metrics.faithfulness.Deletion(step_pixels=32)(fn, x, maps, target)
        i = metrics.faithfulness.Insertion(step_pixels=32, kernel_size=5, sigma=2.0)(fn, x, maps, target)
        got = np.concatenate([d["curve"], i["curve"]], axis=1)
        if ref is None:
            ref = got
            assert ref.shape == (2, 2 * 9) and np.all((ref >= 0) & (ref <= 1))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10, err_msg=form)


def test_jit_and_vmap_of_wrapped_models(forms):
    """Methods stay pure: a jitted and a vmapped Grad-CAM on a wrapped model equal the eager one."""
    x = _x()
    gc = methods.get("grad-cam", layer="layer4")
    for form in ("nnx", "equinox", "function"):
        m, v = forms[form]
        eager = gc(m, v, x, 1)
        jitted = jax.jit(gc, static_argnums=0)(m, v, x, 1)
        np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-12, err_msg=form)
        vmapped = jax.vmap(lambda xi: gc(m, v, xi[None], 1)[0])(x)  # one sample at a time
        np.testing.assert_allclose(vmapped, eager, rtol=0, atol=1e-12, err_msg=form)


# ----------------------------------------------------------------------------- layer names


def test_layer_names_of_each_kind(forms):
    x = _x()
    assert taps.layer_names(*forms["function"], x) == ["layer4"]
    assert taps.layer_names(*forms["equinox"], x) == ["layer4"]
    nnx_names = taps.layer_names(*forms["nnx"], x)
    assert set(nnx_names) == {"conv1", "bn1", "layer4", "layer4.conv", "fc"}
    v = forms["nnx"][1]
    # the standard NNX layers hold linen's layout under their attribute paths: the zoo's, re-keyed
    lv = _linen_variables(_weights())
    assert set(v) == {"params", "batch_stats"} and set(v["params"]) == {"conv1", "bn1", "layer4.conv", "fc"}
    np.testing.assert_array_equal(v["params"]["layer4.conv"]["kernel"], lv["params"]["layer4"]["conv"]["kernel"])
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], lv["batch_stats"]["bn1"]["var"])


def test_nnx_list_submodules_are_named_by_index(x64):
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

        def __call__(self, x):
            h = x.mean(axis=(1, 2))
            for layer in self.layers:
                h = layer(h)
            return h

    m = Stack(nnx.Rngs(1))
    wm, wv = wrap(m)
    x = _x(jnp.float32)
    assert taps.layer_names(wm, wv, x) == ["layers.0", "layers.1"]
    out, acts = taps.forward(wm, wv, x, capture=["layers.0"])
    np.testing.assert_allclose(out, m(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts["layers.0"], m.layers[0](x.mean(axis=(1, 2))), rtol=1e-6, atol=1e-6)


def test_batched_equinox_and_channels_last_function(x64):
    """``batched=True`` calls the model on the batch; ``layout="NCHW"`` transposes for a function."""
    w = _weights()
    x = _x()
    ref = apply_fn(w, x)

    def nchw_fn(params, xb):
        return apply_fn(params, jnp.moveaxis(xb, 1, -1))

    m, v = wrap(nchw_fn, w, layout="NCHW")
    np.testing.assert_allclose(m.apply(v, x), ref, rtol=0, atol=1e-12)
    e = _eqx_model(w)
    mb, vb = wrap(eqx.filter_vmap(e), batched=True)
    np.testing.assert_allclose(mb.apply(vb, x), ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- unsupported methods

RULE_BASED = ["lrp-epsilon", "lrp-epsilon-plus", "excitation-backprop", "rap", "rsp", "clrp"]


@pytest.mark.parametrize("form", ["equinox", "function"])
@pytest.mark.parametrize("name", RULE_BASED)
def test_rule_based_methods_refuse_functions_and_equinox(forms, form, name):
    """Rule-based propagation needs interceptable layers: the engine's plan raises
    ``adapters.propagation_refusal``'s message before any propagation."""
    m, v = forms[form]
    assert "needs interceptable layers" in adapters.propagation_refusal(m)
    kw = {"layer": "layer4"} if name in ("rsp", "excitation-backprop") else {}
    with pytest.raises(ValueError, match=r"rule-based propagation needs interceptable layers"):
        methods.get(name, **kw)(m, v, _x(), 1)


@pytest.mark.parametrize("form", ["equinox", "function"])
def test_fullgrad_refuses_functions_and_equinox(forms, form):
    """FullGrad's bias terms come from the layers' biases, which a function's bare operations hide."""
    m, v = forms[form]
    with pytest.raises(methods.NotApplicable, match="interceptable layers"):
        methods.get("fullgrad")(m, v, _x(), 1)


@pytest.mark.parametrize("form", ["equinox", "function", "nnx", "flax"])
@pytest.mark.parametrize("name", ["guided-backprop", "deconvnet"])
def test_relu_rule_methods_need_relu_modules(forms, form, name):
    """Guided Backprop / DeconvNet need ReLU layers; functional ReLUs are not modules."""
    m, v = forms[form]
    with pytest.raises(NotApplicable, match="ReLU"):
        methods.get(name)(m, v, _x(), 1)


def test_default_cam_layer_is_declared_or_refused(forms):
    """No default CAM layer on a wrapped model: NotApplicable asks for layer=..."""
    m, v = forms["nnx"]
    with pytest.raises(NotApplicable, match="layer="):
        methods.get("grad-cam")(m, v, _x(), 1)


# ----------------------------------------------------------------------------- bad input


def test_unknown_tap_name_lists_close_names(forms):
    m, v = forms["equinox"]
    with pytest.raises(ValueError, match="did you mean 'layer4'"):
        methods.get("grad-cam", layer="layer3")(m, v, _x(), 1)
    m, v = forms["nnx"]
    with pytest.raises(ValueError, match="did you mean 'layer4"):
        methods.get("grad-cam", layer="layer5")(m, v, _x(), 1)


def test_model_not_returning_logits(x64):
    w = _weights()

    def maps_fn(params, x):
        return x.sum(-1)  # (N, H, W): not logits

    with pytest.raises(ValueError, match=r"logits of shape \(N, K\) = \(2, K\).*shape \(2, 16, 16\)"):
        wrap(maps_fn, w, input_shape=(2, 16, 16, 3))
    m, v = wrap(maps_fn, w)
    with pytest.raises(ValueError, match=r"logits of shape \(N, K\)"):
        methods.get("gradient")(m, v, _x(), 1)

    class Tuple(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.mean((1, 2))), x

    tv = Tuple().init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"logits of shape \(N, K\).*got tuple"):
        wrap(Tuple(), tv, input_shape=(2, 16, 16, 3))


def test_training_mode_is_refused(x64):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.fc = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.drop(self.bn(x).mean((1, 2))))

    with pytest.raises(ValueError, match=r"training mode: BatchNorm 'bn'.*Dropout 'drop'.*model\.eval\(\)"):
        wrap(Net(nnx.Rngs(0)))

    class LinenNet(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=not self.train)(x)
            h = nn.Dropout(0.5, deterministic=not self.train)(h.mean((1, 2)))
            return nn.Dense(2)(h)

    v = LinenNet(False).init(jax.random.key(0), _x())
    wrap(LinenNet(False), v, input_shape=(2, 16, 16, 3))  # eval mode: fine
    with pytest.raises(ValueError, match="training mode.*BatchNorm 'BatchNorm_0'.*Dropout 'Dropout_0'.*train=False"):
        wrap(LinenNet(True), v, input_shape=(2, 16, 16, 3))

    drop = eqx.nn.Dropout(0.5)

    class EqxDrop(eqx.Module):
        fc: eqx.nn.Linear
        drop: eqx.nn.Dropout

        def __call__(self, x):
            return self.fc(self.drop(x.mean((1, 2))))

    e = EqxDrop(eqx.nn.Linear(3, 2, key=jax.random.key(0)), drop)
    with pytest.raises(ValueError, match=r"Dropout 'drop' \(inference=False\).*inference_mode"):
        wrap(e)
    wm, wv = wrap(eqx.nn.inference_mode(e))
    assert wm.apply(wv, _x()).shape == (2, 2)


def test_wrap_argument_errors(x64):
    w = _weights()
    with pytest.raises(TypeError, match="flax.linen Module, a Flax NNX Module, an Equinox Module or a function"):
        wrap(42)
    with pytest.raises(ValueError, match="needs its variables"):
        wrap(ZooNet())
    with pytest.raises(ValueError, match="needs its parameters"):
        wrap(apply_fn)
    with pytest.raises(TypeError, match="without variables"):
        wrap(_nnx_model(w), w)
    with pytest.raises(ValueError, match="layout must be one of"):
        wrap(apply_fn, w, layout="HWC")
    with pytest.raises(ValueError, match=r"input_shape must be a batch shape \(N, H, W, C\)"):
        wrap(apply_fn, w, input_shape=(16, 16, 3))
    m, _ = wrap(apply_fn, w)
    with pytest.raises(ValueError, match=r"variables\['params'\] lacks"):
        m.apply({"params": {}}, _x())

    def two_taps(params, x, tap):
        h = tap("a", x)
        return tap("a", h).mean((1, 2))

    for batched in (True, False):
        m, v = wrap(two_taps, w, batched=batched)
        with pytest.raises(ValueError, match="tap name 'a' is used twice"):
            m.apply(v, _x())


def test_propagation_refusal_only_for_functions_and_equinox(forms):
    for form in ("zoo", "flax", "nnx"):
        assert adapters.propagation_refusal(forms[form][0]) is None
    assert "the Equinox model EqxNet" in adapters.propagation_refusal(forms["equinox"][0])
    assert "the model function apply_fn" in adapters.propagation_refusal(forms["function"][0])


@pytest.mark.parametrize(
    "method",
    [
        ("lrp-epsilon", {}),
        ("lrp-epsilon-plus", {}),
        ("lrp-alpha1-beta0", {}),
        ("lrp-epsilon-gamma-box", {}),
        ("clrp", {}),
        ("rap", {}),
        ("rsp", {"layer": "layer4"}),
        ("fullgrad", {}),
        ("excitation-backprop", {"layer": "layer4"}),
    ],
    ids=lambda m: m[0],
)
def test_rule_based_maps_same_on_flax_and_nnx_forms(forms, method):
    """LRP composites, CLRP, RAP, RSP and FullGrad: the Flax-style linen form (functional ops get
    the engine's functional rules) and the NNX form (its Conv/Linear/BatchNorm run as linen
    layers) give the zoo form's map."""
    name, kw = method
    x = _x()
    target = jnp.array([1, 3])
    ref = np.asarray(methods.get(name, **kw)(*forms["zoo"], x, target))
    assert ref.shape == (2, 16, 16) and np.abs(ref).max() > 1e-3
    for form in ("flax", "nnx"):
        got = methods.get(name, **kw)(*forms[form], x, target)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * np.abs(ref).max(), err_msg=form)


def test_linen_model_is_returned_as_is(x64):
    lv = _linen_variables(_weights())
    model = ZooNet()
    m, v = wrap(model, lv, input_shape=(1, 16, 16, 3))
    assert m is model and v is lv
    assert adapters.model_kind(model) == "linen" and adapters.model_kind(apply_fn) == "function"


# ----------------------------------------------------------------------------- the examples

EXAMPLES = [  # (entry point, CAM layer, LRP defined)
    ("examples.user_models.flax_resnet:make", "layer2.0", True),
    ("examples.user_models.nnx_cnn:make", "conv2", True),
    ("examples.user_models.equinox_cnn:make", "features", False),
    ("examples/user_models/plain_function.py:make", "block2", False),
]


@pytest.mark.parametrize("spec,layer,lrp", EXAMPLES, ids=["flax_resnet", "nnx_cnn", "equinox_cnn", "plain_function"])
def test_examples_explained_and_scored(spec, layer, lrp, monkeypatch):
    """Each example model (loaded as ``--model`` loads it) with Grad-CAM, RISE and (where
    defined) LRP-epsilon, scored by deletion / insertion. Identities: a curve starts (deletion)
    or ends (insertion) at the target's softmax probability on the untouched image; Grad-CAM
    at the layer equals relu(sum_k mean_ab(dS/dA_k) A_k) of the layer's activation and gradient,
    upsampled. Where LRP is not defined it raises."""
    from pathlib import Path

    from xaijax.models import entry_points

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    model, variables, _ = entry_points.load(spec)
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    target = jnp.array([1, 4])
    cam = methods.get("grad-cam", layer=layer)
    a, g, _ = methods.activation_and_gradient(model, variables, x, target, layer)
    low = jax.nn.relu((a * g.mean(axis=(1, 2), keepdims=True)).sum(-1))
    assert float(low.max()) > 0
    maps = {"grad-cam": cam(model, variables, x, target), "rise": methods.get("rise", n=16, s=4, chunk=16)(model, variables, x, target)}
    np.testing.assert_allclose(maps["grad-cam"], methods.upsample_bilinear(low, (32, 32)), rtol=1e-5, atol=1e-6)
    if lrp:
        maps["lrp-epsilon"] = methods.get("lrp-epsilon")(model, variables, x, target)
    else:
        with pytest.raises(ValueError, match="rule-based propagation needs interceptable layers"):
            methods.get("lrp-epsilon")(model, variables, x, target)
    probs = np.asarray(jax.nn.softmax(model.apply(variables, x), -1))[np.arange(2), np.asarray(target)]
    fn = metrics.faithfulness.classifier_fn(model, variables)
    for name, m in maps.items():
        assert m.shape == (2, 32, 32) and bool(jnp.isfinite(m).all()), name
        d = metrics.faithfulness.Deletion(step_pixels=256)(fn, x, m, target)
        i = metrics.faithfulness.Insertion(step_pixels=256, kernel_size=5, sigma=2.0)(fn, x, m, target)
        np.testing.assert_allclose(d["curve"][:, 0], probs, rtol=1e-5)
        np.testing.assert_allclose(i["curve"][:, -1], probs, rtol=1e-5)
        assert np.all((d["auc"] >= 0) & (d["auc"] <= 1)) and np.all((i["auc"] >= 0) & (i["auc"] <= 1))


def test_cli_explain_with_model_entry_point(tmp_path, monkeypatch):
    """``xaijax explain --model file.py:factory`` writes the same map as the Python API."""
    from pathlib import Path

    from PIL import Image

    from xaijax import cli
    from xaijax.models import entry_points
    from xaijax.models.preprocess import load_image, normalize

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    spec = "examples/user_models/nnx_cnn.py:make"
    argv = ["explain", "--model", spec, "--size", "32", "--preprocess", "none", "--method", "grad-cam",
            "--param", "layer=conv2", "--target", "3", "--out", str(tmp_path / "out"), str(tmp_path / "img.png")]
    assert cli.main(argv) == 0
    got = np.load(tmp_path / "out" / "img.grad-cam.npy")
    model, variables, _ = entry_points.load(spec)
    x = normalize(load_image(tmp_path / "img.png", 32, None)[None], "none")
    ref = np.asarray(methods.get("grad-cam", layer="conv2")(model, variables, jnp.asarray(x), jnp.array([3])))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert cli.main(["predict", "--model", spec, "--size", "32", str(tmp_path / "img.png")]) == 0
    # a file path whose module defines dataclasses (linen, Equinox) loads too
    assert entry_points.load("examples/user_models/flax_resnet.py:make")[2]["metadata"]["input_size"] == 32
    assert entry_points.load("examples/user_models/equinox_cnn.py:make")[2]["arch"] == "examples/user_models/equinox_cnn.py:make"
    # exactly one of --weights / --model; a factory without input_size needs --size
    assert cli.main(["explain", "--method", "gradient", str(tmp_path / "img.png")]) == 2
    assert cli.main(["explain", "--model", spec, "--method", "gradient", str(tmp_path / "img.png")]) == 2
    assert cli.main(["explain", "--model", "examples.user_models.nnx_cnn:nope", "--size", "32", "--method", "gradient",
                     str(tmp_path / "img.png")]) == 2


def test_cli_eval_with_model_entry_point(tmp_path, monkeypatch):
    """``xaijax eval insdel --model ...`` runs on the synthetic data and records the model by its
    entry point and the variables' digest; a second run resumes (the configuration matches)."""
    import json
    from pathlib import Path

    from xaijax import cli
    from xaijax.models import entry_points

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    spec = "examples/user_models/plain_function.py:make"
    out = tmp_path / "eval"
    argv = ["eval", "insdel", "--model", spec, "--seeds", "top1", "--images", "2", "--size", "32", "--methods",
            "gradient", "--batch", "2", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    _, variables, _ = entry_points.load(spec)
    assert res["model"]["weights"] == spec and res["model"]["weights_sha256"] == entry_points.digest(variables)
    row = res["rows"][0]
    assert row["images"] == 2 and 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    assert cli.main(argv) == 0  # resumes: same configuration, nothing recomputed
    assert json.loads((out / "results.json").read_text())["rows"][0]["deletion_auc"] == row["deletion_auc"]
    assert cli.main(argv[:4] + ["--weights", "w.safetensors"] + argv[4:]) == 2  # not both


def test_entry_point_dict_is_checked(tmp_path, monkeypatch):
    from xaijax.models import entry_points

    (tmp_path / "bad_factory.py").write_text(
        "def extra():\n    return {'model': print, 'variables': {}, 'colour': 1}\n"
        "def size():\n    return {'model': print, 'variables': {}, 'input_size': -3}\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"needs 'model' and may hold.*got keys \['colour'"):
        entry_points.load("bad_factory:extra")
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        entry_points.load("bad_factory:size")
    with pytest.raises(ValueError, match="expects package.module:factory"):
        entry_points.load("bad_factory")
    with pytest.raises(ValueError, match="cannot import"):
        entry_points.load("no_such_module_xyz:make")


def test_variables_digest_tracks_the_weights(x64):
    from xaijax.models import entry_points

    w = _weights()
    d = entry_points.digest(w)
    assert d == entry_points.digest(_weights()) and len(d) == 64
    w2 = jax.tree_util.tree_map(lambda a: a, w)
    w2["fc"]["bias"] = w2["fc"]["bias"].at[0].add(1e-12)
    assert entry_points.digest(w2) != d


def test_nnx_layernorm_and_functional_gelu_match_linen_under_attnlrp(x64):
    """An NNX token model (nnx.LayerNorm, nnx.Linear, nnx.gelu, a mean over tokens) gets the same
    AttnLRP relevance as the same network in linen: its LayerNorm runs as nn.LayerNorm (the
    layernorm rule), the GELU and the mean get the functional rules."""
    from flax import nnx

    from xaijax.propagation import engine, relevance

    class Tokens(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(6, param_dtype=jnp.float64, rngs=rngs)
            self.fc1 = nnx.Linear(6, 8, param_dtype=jnp.float64, rngs=rngs)
            self.fc2 = nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return jnp.mean(self.fc2(nnx.gelu(self.fc1(self.ln(x)))), axis=1)

    class LinenTokens(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(param_dtype=jnp.float64, name="ln")(x)
            h = nn.Dense(3, param_dtype=jnp.float64, name="fc2")(nn.gelu(nn.Dense(8, param_dtype=jnp.float64, name="fc1")(h)))
            return jnp.mean(h, axis=1)

    nnx_model = Tokens(nnx.Rngs(3))
    nnx_model.ln.scale[...] = nnx_model.ln.scale[...] + jnp.arange(6.0) / 10
    nnx_model.ln.bias[...] = nnx_model.ln.bias[...] + 0.1
    m, v = wrap(nnx_model)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6), jnp.float64)
    lv = {"params": {"ln": {"scale": nnx_model.ln.scale[...], "bias": nnx_model.ln.bias[...]},
                     **{n: {"kernel": getattr(nnx_model, n).kernel[...], "bias": getattr(nnx_model, n).bias[...]} for n in ("fc1", "fc2")}}}
    np.testing.assert_allclose(np.asarray(m.apply(v, x)), np.asarray(LinenTokens().apply(lv, x)), rtol=1e-12)
    assert {e.name: e.kind for e in engine.plan(m, v, x, "attnlrp").layers}["ln"] == "layernorm"

    def seed(out):
        return jax.nn.one_hot(jnp.argmax(out, 1), 3, dtype=out.dtype) * out

    r_nnx = relevance(m, v, x, seed, "attnlrp")
    r_linen = relevance(LinenTokens(), lv, x, seed, "attnlrp")
    assert float(jnp.abs(r_linen).max()) > 0
    np.testing.assert_allclose(np.asarray(r_nnx), np.asarray(r_linen), rtol=0, atol=1e-10 * float(jnp.abs(r_linen).max()))


def test_nnx_multi_head_attention_matches_linen_under_attnlrp(x64):
    """nnx.MultiHeadAttention (its LinearGeneral projections run as nn.DenseGeneral, the attention
    itself gets the functional rules: q.k, softmax, attention.v) == nn.MultiHeadDotProductAttention."""
    from flax import nnx

    from xaijax.propagation import engine, relevance

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(2, 8, param_dtype=jnp.float64, decode=False, deterministic=True, rngs=rngs)
            self.head = nnx.Linear(8, 3, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.mean(x + self.attn(x), axis=1))

    class LinenAttn(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(2, param_dtype=jnp.float64, deterministic=True, name="attn")(x)
            return nn.Dense(3, param_dtype=jnp.float64, name="head")(jnp.mean(x + h, axis=1))

    model = Attn(nnx.Rngs(4))
    m, v = wrap(model)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8), jnp.float64)
    pick = lambda mod: {"kernel": mod.kernel[...], "bias": mod.bias[...]}  # noqa: E731
    lv = {"params": {"attn": {n: pick(getattr(model.attn, n)) for n in ("query", "key", "value", "out")}, "head": pick(model.head)}}
    # NNX's and linen's attention modules order their arithmetic differently: equal to ~1e-8 in float64
    np.testing.assert_allclose(np.asarray(m.apply(v, x)), np.asarray(model(x)), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(m.apply(v, x)), np.asarray(LinenAttn().apply(lv, x)), rtol=1e-6)
    kinds = {e.name: e.kind for e in engine.plan(m, v, x, "attnlrp").layers}
    assert kinds["attn.query"] == "dense" and kinds["attn.out"] == "dense"
    assert "softmax" in {o.kind for o in engine.plan(m, v, x, "attnlrp").functional}

    def seed(out):
        return jax.nn.one_hot(jnp.argmax(out, 1), 3, dtype=out.dtype) * out

    for composite in ("attnlrp", "cp-lrp"):
        r_nnx = relevance(m, v, x, seed, composite)
        r_linen = relevance(LinenAttn(), lv, x, seed, composite)
        assert float(jnp.abs(r_linen).max()) > 0
        np.testing.assert_allclose(np.asarray(r_nnx), np.asarray(r_linen), rtol=0, atol=1e-6 * float(jnp.abs(r_linen).max()))
