"""DenseNet and Inception-v3: registration, shapes, torchvision parameter layout, torch parity.

Full-size models are only ever traced (``jax.eval_shape``); numerical parity with the plain-torch
reference implementations of ``torch_ref_densenet_inception.py`` runs on tiny variants with
random weights and random BatchNorm statistics, in float32 and float64.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_helpers import expected_flax_shapes

from xaijax.models import densenet, inception, registry, taps

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

DENSENETS = {
    # name: (growth_rate, block_config, num_init_features)
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}
# torchvision's published parameter counts (DenseNet*_Weights / Inception_V3_Weights meta);
# Inception's 27,161,264 includes the 3,326,696 parameters of the AuxLogits head we do not build.
TORCHVISION_NUM_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "inception_v3": 27_161_264 - 3_326_696,
}


def _struct(shape: tuple[int, ...], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _abstract_variables(model: nn.Module, size: int) -> Any:
    return jax.eval_shape(model.init, jax.random.key(0), _struct((1, size, size, 3)))


@functools.lru_cache(maxsize=None)
def _full_size(name: str) -> tuple[nn.Module, Any]:
    """A registered full-size model (default settings) and its abstract variables (traced once)."""
    s = registry.spec(name)
    model = s.build()
    return model, _abstract_variables(model, s.input_size)


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, collections.abc.Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _call_counts(model: nn.Module, variables: Any, x: Any) -> collections.Counter:
    """How often each named module is called in one (abstract) forward pass."""
    counts: collections.Counter = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            counts[".".join(context.module.path)] += 1
        return next_fun(*args, **kwargs)

    def run(v, xx):
        with nn.intercept_methods(interceptor):
            return model.apply(v, xx)

    jax.eval_shape(run, variables, x)
    return counts


@contextlib.contextmanager
def _precision(dtype: str):
    """float64 runs with ``jax_enable_x64`` switched on, restoring the flag afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _rel_err(got: Any, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.max(np.abs(want))
    assert scale > 0
    return float(np.max(np.abs(got - want)) / scale)


# --------------------------------------------------------------------------------------
# (a) registration, shapes, layer names (no torch, no full-size compile)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DENSENETS))
def test_densenet_registration(name):
    s = registry.spec(name)
    growth, blocks, init = DENSENETS[name]
    assert (s.family, s.cam_layer, s.input_size, s.min_input_size) == ("densenet", "relu", 224, 29)
    m = registry.get(name, num_classes=7)
    assert isinstance(m, densenet.DenseNet)
    assert (m.growth_rate, tuple(m.block_config), m.num_init_features, m.bn_size, m.num_classes) == (
        growth, blocks, init, 4, 7,
    )
    assert m.drop_rate == 0 and m.train is False


def test_inception_registration():
    s = registry.spec("inception_v3")
    assert (s.family, s.cam_layer, s.input_size, s.min_input_size) == ("inception", "Mixed_7c", 299, 75)
    m = registry.get("inception_v3", num_classes=7)
    assert isinstance(m, inception.Inception3)
    assert (m.num_classes, m.width, m.transform_input, m.train) == (7, 1.0, False, False)


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201", "inception_v3"])
def test_full_size_parameter_count_matches_torchvision(name):
    _, v = _full_size(name)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"])) == TORCHVISION_NUM_PARAMS[name]


def test_densenet121_shapes_and_layer_names():
    s = registry.spec("densenet121")
    m, v = _full_size("densenet121")
    x = _struct((2, 224, 224, 3))
    out, acts = jax.eval_shape(
        lambda v, x: taps.forward(
            m, v, x, capture=["features.pool0", "features.denseblock1", "features.transition3", "features.denseblock4",
                              "features.denseblock4.denselayer16", "relu", "avgpool", "flatten"],
        ),
        v, x,
    )
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
    assert acts["features.pool0"].shape == (2, 56, 56, 64)
    assert acts["features.denseblock1"].shape == (2, 56, 56, 64 + 6 * 32)
    assert acts["features.transition3"].shape == (2, 7, 7, (256 + 24 * 32) // 2)
    assert acts["features.denseblock4"].shape == (2, 7, 7, 1024)
    assert acts["features.denseblock4.denselayer16"].shape == (2, 7, 7, 1024)
    assert acts["relu"].shape == (2, 7, 7, 1024)
    assert acts["avgpool"].shape == (2, 1, 1, 1024)
    assert acts["flatten"].shape == (2, 1024)

    names = taps.layer_names(m, v, x)
    assert s.cam_layer in names
    for n in ["features.conv0", "features.norm0", "features.relu0", "features.pool0", "features.transition1.pool",
              "features.denseblock3.denselayer24.concat", "features.denseblock2.denselayer1.relu2",
              "features.norm5", "relu", "avgpool", "flatten", "classifier"]:
        assert n in names, n
    assert "features.denseblock1.denselayer7" not in names  # block 1 has 6 layers
    assert not any(n.endswith("dropout") for n in names)  # drop_rate 0
    # every named layer is called exactly once (a requirement of taps and relevance rules)
    counts = _call_counts(m, v, x)
    assert set(counts) - {""} == set(names)
    assert {k: c for k, c in counts.items() if c != 1} == {}


def test_inception_v3_shapes_and_layer_names():
    s = registry.spec("inception_v3")
    m, v = _full_size("inception_v3")
    m = m.clone(transform_input=True)
    x = _struct((2, 299, 299, 3))
    expect = {
        "Conv2d_1a_3x3": (149, 32), "Conv2d_2b_3x3": (147, 64), "maxpool1": (73, 64),
        "Conv2d_4a_3x3": (71, 192), "maxpool2": (35, 192), "Mixed_5b": (35, 256), "Mixed_5d": (35, 288),
        "Mixed_6a": (17, 768), "Mixed_6e": (17, 768), "Mixed_7a": (8, 1280), "Mixed_7b": (8, 2048),
        "Mixed_7c": (8, 2048), "Mixed_7c.branch3x3dbl_concat": (8, 768), "Mixed_5b.pool": (35, 192),
        "Mixed_6a.pool": (17, 288), "avgpool": (1, 2048),
    }
    out, acts = jax.eval_shape(lambda v, x: taps.forward(m, v, x, capture=list(expect)), v, x)
    assert out.shape == (2, 1000)
    for n, (side, ch) in expect.items():
        assert acts[n].shape == (2, side, side, ch), n

    names = taps.layer_names(m, v, x)
    assert s.cam_layer in names
    for n in ["Conv2d_1a_3x3.conv", "Conv2d_1a_3x3.bn", "Conv2d_1a_3x3.relu", "Mixed_5b.branch5x5_2",
              "Mixed_6a.branch3x3dbl_3", "Mixed_6e.branch7x7dbl_5", "Mixed_7a.branch7x7x3_4",
              "Mixed_7b.branch3x3_concat", "Mixed_7c.concat", "dropout", "flatten", "fc"]:
        assert n in names, n
    assert not any("AuxLogits" in n for n in names)
    counts = _call_counts(m, v, x)
    assert set(counts) - {""} == set(names)
    assert {k: c for k, c in counts.items() if c != 1} == {}


def test_inception_width_multiplier_scales_every_conv():
    m = inception.Inception3(num_classes=3, width=1 / 16)
    v = _flat(_abstract_variables(m, 75)["params"])
    assert v[("Conv2d_1a_3x3", "conv", "kernel")].shape == (3, 3, 3, 2)
    assert v[("Mixed_5b", "branch5x5_1", "conv", "kernel")].shape == (1, 1, 12, 3)  # 48/16, in 192/16
    assert v[("Mixed_6b", "branch7x7_2", "conv", "kernel")].shape == (1, 7, 8, 8)  # channels_7x7 128/16
    assert v[("Mixed_7c", "branch3x3dbl_1", "conv", "kernel")].shape == (1, 1, 128, 28)  # 2048/16, 448/16
    assert v[("fc", "kernel")].shape == (128, 3)
    tiny = _flat(_abstract_variables(inception.Inception3(num_classes=3, width=1e-3), 75)["params"])
    assert tiny[("Conv2d_1a_3x3", "conv", "kernel")].shape == (3, 3, 3, 1)  # floor of 1 channel
    assert inception.scaled_channels(448, 0.1) == 44 and inception.scaled_channels(32, 0.01) == 1


def test_minimum_input_size():
    d, dv = _full_size("densenet121")
    assert jax.eval_shape(d.apply, dv, _struct((1, 29, 40, 3))).shape == (1, 1000)
    with pytest.raises(ValueError, match="at least 29x29"):
        jax.eval_shape(d.apply, dv, _struct((1, 28, 40, 3)))
    # the formula is tight: 5x5 works, and at 4x4 the (unchecked) feature stack's transition fails
    assert densenet.densenet_min_input_size(2) == 5
    small = densenet.DenseNet(growth_rate=2, block_config=(1, 1), num_init_features=4, num_classes=3)
    sv = _abstract_variables(small, 8)
    assert jax.eval_shape(small.apply, sv, _struct((1, 5, 5, 3))).shape == (1, 3)
    feats = densenet.DenseFeatures(2, (1, 1), 4)
    fv = jax.eval_shape(feats.init, jax.random.key(0), _struct((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        jax.eval_shape(feats.apply, fv, _struct((1, 4, 4, 3)))

    i = inception.Inception3(num_classes=3, width=1 / 16)
    iv = _abstract_variables(i, 75)
    assert jax.eval_shape(lambda v, x: taps.forward(i, v, x, capture=["Mixed_7c"]), iv, _struct((1, 75, 75, 3)))[1][
        "Mixed_7c"
    ].shape[1:3] == (1, 1)
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(i.apply, iv, _struct((1, 74, 80, 3)))


def test_bad_inputs_raise_clear_errors():
    d = densenet.DenseNet(growth_rate=2, block_config=(1, 1), num_init_features=4, num_classes=3)
    dv = _abstract_variables(d, 16)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(d.apply, dv, _struct((16, 16, 3)))
    with pytest.raises(ValueError, match="block_config"):
        jax.eval_shape(densenet.DenseNet(block_config=()).init, jax.random.key(0), _struct((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="growth_rate"):
        jax.eval_shape(densenet.DenseNet(growth_rate=0).init, jax.random.key(0), _struct((1, 32, 32, 3)))
    i = inception.Inception3(num_classes=3, width=1 / 16, transform_input=True)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        jax.eval_shape(i.init, jax.random.key(0), _struct((1, 75, 75, 1)))
    with pytest.raises(ValueError, match="width"):
        jax.eval_shape(inception.Inception3(width=0.0).init, jax.random.key(0), _struct((1, 75, 75, 3)))


def _random_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> Any:
    """Random numpy variables of the right shapes (no jitted Flax init: it is slow to compile)."""
    rng = np.random.default_rng(seed)
    template = jax.eval_shape(model.init, jax.random.key(0), _struct(input_shape))

    def fill(path, leaf):
        last = path[-1].key
        if last == "var":
            return (0.5 + rng.random(leaf.shape)).astype(np.float32)
        if last == "scale":
            return (1.0 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if last == "kernel" else 25
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, template)


def test_train_mode_batch_stats_and_dropout():
    """train=True: batch statistics are used and updated; dropout needs and uses its RNG."""
    x = np.random.default_rng(1).normal(size=(4, 33, 35, 3)).astype(np.float32)
    m = densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, drop_rate=0.3, num_classes=4)
    v = _random_variables(m, x.shape)
    mt = m.clone(train=True)
    train_step = jax.jit(lambda v, x, k: mt.apply(v, x, mutable=["batch_stats"], rngs={"dropout": k}))
    out1, upd = train_step(v, x, jax.random.key(2))
    out2, _ = train_step(v, x, jax.random.key(3))
    assert out1.shape == (4, 4) and bool(jnp.all(jnp.isfinite(out1)))
    assert not np.allclose(out1, out2)  # different dropout masks
    with pytest.raises(Exception, match="dropout"):  # train mode without a dropout RNG
        jax.eval_shape(lambda v, x: mt.apply(v, x, mutable=["batch_stats"]), v, x)
    # running mean of norm0 moves 10% of the way to the batch mean (torch momentum 0.1)
    h = jax.lax.conv_general_dilated(
        x, v["params"]["features"]["conv0"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    want = 0.9 * v["batch_stats"]["features"]["norm0"]["mean"] + 0.1 * np.asarray(h.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(upd["batch_stats"]["features"]["norm0"]["mean"], want, rtol=1e-5, atol=1e-6)

    # Inception: the same train-mode plumbing (traced only)
    i = inception.Inception3(num_classes=4, width=1 / 16, train=True)
    iv = _abstract_variables(i, 75)
    out, upd = jax.eval_shape(
        lambda v, x, k: i.apply(v, x, mutable=["batch_stats"], rngs={"dropout": k}),
        iv, _struct((2, 75, 75, 3)), jax.random.key(0),
    )
    assert out.shape == (2, 4)
    assert jax.tree.map(lambda a: a.shape, upd["batch_stats"]) == jax.tree.map(lambda a: a.shape, iv["batch_stats"])


# --------------------------------------------------------------------------------------
# (b) parameter layout at the default (torchvision) sizes, against the torch reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["densenet121", "inception_v3"])
def test_full_size_variable_shapes_equal_torch_reference(name):
    torch = pytest.importorskip("torch")
    import torch_ref_densenet_inception as ref

    torch.manual_seed(0)
    s = registry.spec(name)
    if s.family == "densenet":
        growth, blocks, init = DENSENETS[name]
        tm = ref.DenseNetRef(growth, blocks, init)
    else:
        tm = ref.Inception3Ref(aux_logits=True)
    sd = tm.state_dict()
    want = expected_flax_shapes(sd, ("AuxLogits.",))
    got = {k: tuple(a.shape) for k, a in _flat(_full_size(name)[1]).items()}
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
    assert {k: (got[k], want[k]) for k in got if got[k] != want[k]} == {}
    assert sum(v.numel() for k, v in sd.items() if k.endswith(("weight", "bias")) and not k.startswith("AuxLogits")) == (
        TORCHVISION_NUM_PARAMS[name]
    )


# --------------------------------------------------------------------------------------
# (c) numerical parity on tiny variants
# --------------------------------------------------------------------------------------

# Tap pairs: (xaijax layer, torch module whose forward-hook output it must equal).
_DENSE_TAPS = [
    ("features.pool0", "features.pool0"),
    ("features.denseblock1", "features.denseblock1"),
    ("features.denseblock1.denselayer2.conv2", "features.denseblock1.denselayer2"),  # new channels only
    ("features.transition1", "features.transition1"),
    ("features.denseblock2", "features.denseblock2"),
    ("features.norm5", "features.norm5"),
]
_INCEPTION_TAPS = [(n, n) for n in ["maxpool2", "Mixed_5b", "Mixed_6a", "Mixed_6e", "Mixed_7a",
                                    "Mixed_7b.branch3x3dbl_3a", "Mixed_7c", "avgpool"]]
CASES = {
    "densenet_tiny": dict(
        flax=lambda: densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=4, num_classes=10),
        torch=dict(kind="densenet", growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=4, num_classes=10),
        x_shape=(2, 3, 41, 50),  # odd feature-map sides before pool0 and the transition
        taps=_DENSE_TAPS,
        target=3,
    ),
    "inception_tiny": dict(
        flax=lambda: inception.Inception3(num_classes=10, width=1 / 16),
        torch=dict(kind="inception", num_classes=10, width=1 / 16),
        x_shape=(2, 3, 75, 75),
        taps=_INCEPTION_TAPS,
        target=7,
    ),
    "inception_tiny_transform_input": dict(
        flax=lambda: inception.Inception3(num_classes=6, width=1 / 16, transform_input=True),
        # aux_logits: the checkpoint carries AuxLogits.* keys, which the porter must ignore
        torch=dict(kind="inception", num_classes=6, width=1 / 16, transform_input=True, aux_logits=True),
        x_shape=(1, 3, 79, 88),
        taps=[("Conv2d_1a_3x3", "Conv2d_1a_3x3"), ("Mixed_6e", "Mixed_6e")],
        target=2,
    ),
}


def _porter():
    """The checkpoint porter under test (``xaijax.checkpoints.from_torch_state_dict``)."""
    from xaijax.checkpoints import from_torch_state_dict

    return from_torch_state_dict


def _torch_results(tm, x: np.ndarray, taps_: list, target: int | None, dtype: str) -> dict:
    """Logits, hooked activations (NHWC) and, if ``target`` is given, the input gradient (NHWC)."""
    import torch

    tmd = tm.double() if dtype == "float64" else tm.float()
    acts: dict[str, np.ndarray] = {}
    hooks = [
        tmd.get_submodule(tname).register_forward_hook(
            lambda mod, inp, out, key=fname: acts.__setitem__(key, _nhwc(out.detach().numpy()))
        )
        for fname, tname in taps_
    ]
    xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=target is not None)
    logits = tmd(xt)
    for h in hooks:
        h.remove()
    out = dict(logits=logits.detach().numpy(), acts=acts)
    if target is not None:
        logits[:, target].sum().backward()
        out["grad"] = _nhwc(xt.grad.numpy())
    tm.float()
    return out


def _build_case(name: str) -> dict:
    pytest.importorskip("torch")
    import torch_ref_densenet_inception as ref

    spec = CASES[name]
    kw = dict(spec["torch"])
    kind = kw.pop("kind")
    tm = ref.DenseNetRef(**kw) if kind == "densenet" else ref.Inception3Ref(**kw)
    ref.randomize_(tm, seed=len(name)).eval()
    # float32 weights; the float64 runs use exactly these values
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    model = spec["flax"]()
    variables = _porter()(model, sd)
    x = np.random.default_rng(0).normal(size=spec["x_shape"]).astype(np.float32)
    return dict(tm=tm, model=model, variables=variables, x=x, spec=spec, state_dict=sd)


@pytest.fixture(scope="module", params=["densenet_tiny", "inception_tiny"])
def case(request):
    """Torch reference (random weights + BN stats, eval) -> Flax variables via the checkpoint porter."""
    c = _build_case(request.param)
    spec = c["spec"]
    c["torch"] = {
        dt: _torch_results(c["tm"], c["x"], spec["taps"], spec["target"], dt) for dt in ("float32", "float64")
    }
    return c


def test_ported_variables_equal_torch_weights(case):
    """The porter put each torch tensor at its torchvision-named Flax path, transposed."""
    flat = _flat(case["variables"])
    sd = case["state_dict"]
    want = expected_flax_shapes(sd, ("AuxLogits.",))
    assert set(flat) == set(want)
    conv_key = next(k for k, v in sd.items() if v.ndim == 4)
    *mod, _ = conv_key.split(".")
    np.testing.assert_array_equal(flat[("params", *mod, "kernel")], np.transpose(sd[conv_key], (2, 3, 1, 0)))
    head = "classifier" if "classifier.weight" in sd else "fc"
    np.testing.assert_array_equal(flat[("params", head, "kernel")], sd[f"{head}.weight"].T)
    var_key = next(k for k in sd if k.endswith("running_var"))
    np.testing.assert_array_equal(flat[("batch_stats", *var_key.split(".")[:-1], "var")], sd[var_key])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_torch_reference(case, dtype):
    """Same logits, intermediate activations and input gradient as the torch reference.

    Tolerance (max abs difference relative to the reference's max abs value, for logits,
    activations and input gradients): 1e-5 in float32, 1e-10 in float64.
    """
    tol = {"float32": 1e-5, "float64": 1e-10}[dtype]
    want = case["torch"][dtype]
    model, spec = case["model"], case["spec"]
    names = [f for f, _ in spec["taps"]]

    def run(variables, x):
        def objective(xx):
            logits, acts = taps.forward(model, variables, xx, capture=names)
            return logits[:, spec["target"]].sum(), (logits, acts)

        return jax.grad(objective, has_aux=True)(x)

    with _precision(dtype):
        variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), case["variables"])
        x = jnp.asarray(_nhwc(case["x"]), dtype)
        grad, (logits, acts) = jax.jit(run)(variables, x)
        assert logits.dtype == jnp.dtype(dtype) and grad.dtype == jnp.dtype(dtype)
        assert _rel_err(logits, want["logits"]) <= tol
        for n in names:
            assert _rel_err(acts[n], want["acts"][n]) <= tol, n
        assert _rel_err(grad, want["grad"]) <= tol


def test_inception_transform_input_parity():
    """transform_input=True reproduces torchvision's channel re-normalisation (and the porter
    ignores the checkpoint's AuxLogits.* keys)."""
    c = _build_case("inception_tiny_transform_input")
    spec = c["spec"]
    assert any(k.startswith("AuxLogits.") for k in c["state_dict"])
    names = [f for f, _ in spec["taps"]]
    want = _torch_results(c["tm"], c["x"], spec["taps"], None, "float32")
    x = jnp.asarray(_nhwc(c["x"]))
    logits, acts = jax.jit(lambda v, x: taps.forward(c["model"], v, x, capture=names))(c["variables"], x)
    assert _rel_err(logits, want["logits"]) <= 1e-5
    for n in names:
        assert _rel_err(acts[n], want["acts"][n]) <= 1e-5, n
    # and the transform matters: without it the first layer's output differs
    plain = c["model"].clone(transform_input=False)
    _, plain_acts = jax.jit(lambda v, x: taps.forward(plain, v, x, capture=["Conv2d_1a_3x3"]))(c["variables"], x)
    assert _rel_err(plain_acts["Conv2d_1a_3x3"], want["acts"]["Conv2d_1a_3x3"]) > 1e-2


def test_densenet_train_mode_parity():
    """train=True normalises with batch statistics exactly as torch's .train() does."""
    torch = pytest.importorskip("torch")
    import torch_ref_densenet_inception as ref

    tm = ref.randomize_(ref.DenseNetRef(4, (2, 2), 8, 4, num_classes=5), seed=3).train()
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    model = densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, train=True)
    variables = _porter()(model, sd)
    x = np.random.default_rng(1).normal(size=(3, 3, 33, 33)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    got, upd = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(variables, _nhwc(x))
    assert _rel_err(got, want) <= 1e-5
    # running means follow torch's momentum-0.1 update
    np.testing.assert_allclose(
        upd["batch_stats"]["features"]["denseblock2"]["denselayer2"]["norm1"]["mean"],
        tm.features.denseblock2.denselayer2.norm1.running_mean.numpy(),
        rtol=1e-5, atol=1e-6,
    )
