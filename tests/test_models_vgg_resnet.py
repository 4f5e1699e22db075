"""VGG and ResNet: registry, shapes, pooling primitives and parity with PyTorch.

Full-size models are only traced (``jax.eval_shape``); numerical parity uses tiny widths and
small inputs: random PyTorch weights (and random BatchNorm running statistics) on the plain
torch reference models of ``torch_ref_vgg_resnet.py`` are ported with
``xaijax.checkpoints.from_torch_state_dict`` and the logits, intermediate activations and
input gradients are compared in float32 and float64.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_helpers import expected_flax_shapes

from xaijax.models import layers, registry, resnet, taps, vgg

VGG_CAM = {
    "vgg11": "features.19",
    "vgg11_bn": "features.27",
    "vgg13": "features.23",
    "vgg13_bn": "features.33",
    "vgg16": "features.29",
    "vgg16_bn": "features.42",
    "vgg19": "features.35",
    "vgg19_bn": "features.51",
}
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
VGG_CFG_KEY = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _shape_struct(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _abstract_variables(model, shape=(1, 224, 224, 3)) -> dict:
    return jax.eval_shape(model.init, jax.random.key(0), _shape_struct(shape))


def _flat_shapes(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out


# ---------------------------------------------------------------------------------------------
# (a) registry, output shapes, layer names (shape tracing only)
# ---------------------------------------------------------------------------------------------


def test_registered_names_families_and_cam_layers():
    known = set(registry.names())
    for name, cam in VGG_CAM.items():
        assert name in known
        s = registry.spec(name)
        assert (s.family, s.cam_layer, s.input_size, s.min_input_size) == ("vgg", cam, 224, 32)
    for name in RESNETS:
        assert name in known
        s = registry.spec(name)
        assert (s.family, s.cam_layer, s.input_size) == ("resnet", "layer4", 224)
    assert vgg.last_relu_index(vgg.CFGS["D"]) == 29
    assert vgg.last_relu_index(vgg.CFGS["D"], batch_norm=True) == 42
    m = registry.get("vgg16")
    assert (m.pool_size, m.hidden, m.num_classes, m.train) == (7, 4096, 1000, False)


@pytest.mark.parametrize("name", list(VGG_CAM) + RESNETS)
def test_full_size_output_shape_and_cam_layer(name):
    model = registry.get(name, num_classes=20)
    x = _shape_struct((2, 224, 224, 3))
    variables = _abstract_variables(model)
    cam = registry.spec(name).cam_layer

    def run(v, x):
        return taps.forward(model, v, x, capture=[cam])

    out, acts = jax.eval_shape(run, variables, x)
    assert out.shape == (2, 20) and out.dtype == jnp.float32
    want = (2, 14, 14, 512) if name.startswith("vgg") else (2, 7, 7, 512 if name in ("resnet18", "resnet34") else 2048)
    assert acts[cam].shape == want
    if name.startswith("vgg"):
        assert set(variables) == ({"params", "batch_stats"} if name.endswith("_bn") else {"params"})
    else:
        assert set(variables) == {"params", "batch_stats"}


def test_layer_names_vgg16_and_resnet50():
    x = _shape_struct((1, 224, 224, 3))
    m = registry.get("vgg16")
    names = taps.layer_names(m, _abstract_variables(m), x)
    assert [f"features.{i}" for i in range(31)] == [n for n in names if n.startswith("features.")]
    assert "features.29" in names and "features.23" in names and "features.31" not in names
    for n in ("avgpool", "flatten", "classifier.0", "classifier.4", "classifier.6"):
        assert n in names

    m = registry.get("resnet50")
    names = taps.layer_names(m, _abstract_variables(m), x)
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer4" in names and names[-3:] == ["avgpool", "flatten", "fc"]
    block = [n[len("layer4.0.") :] for n in names if n.startswith("layer4.0.")]
    assert block == [
        "conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3",
        "downsample", "downsample.0", "downsample.1", "add", "relu",
    ]  # fmt: skip
    assert "layer4.2.add" in names and "layer4.3" not in names and "layer1.1.downsample" not in names


def test_small_inputs_and_bad_configs_raise_readable_errors():
    m = registry.get("vgg16")
    v = _abstract_variables(m)
    with pytest.raises(ValueError, match=r"at least 32x32 pixels, got 16x40"):
        jax.eval_shape(m.apply, v, _shape_struct((1, 16, 40, 3)))
    with pytest.raises(ValueError, match=r"NHWC"):
        jax.eval_shape(m.apply, v, _shape_struct((224, 224, 3)))
    with pytest.raises(ValueError, match=r"positive ints or 'M'"):
        _abstract_variables(vgg.VGG(cfg=(8, "X", 8)), (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"4 positive block counts"):
        _abstract_variables(resnet.ResNet(layers=(1, 1, 1)), (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"groups=1 and width_per_group=64"):
        _abstract_variables(resnet.ResNet(resnet.BasicBlock, (1, 1, 1, 1), groups=2), (1, 32, 32, 3))
    # resnets accept any positive input side (torchvision's min_size is 1x1)
    m = registry.get("resnet18", num_classes=3)
    assert jax.eval_shape(m.apply, _abstract_variables(m, (1, 5, 5, 3)), _shape_struct((1, 5, 5, 3))).shape == (1, 3)


def test_width_multipliers_scale_channels():
    v = _abstract_variables(vgg.VGG(width=0.25, hidden=32, num_classes=5, pool_size=2), (1, 32, 32, 3))
    s = _flat_shapes(v["params"])
    assert s[("features", "0", "kernel")] == (3, 3, 3, 16)
    assert s[("features", "28", "kernel")] == (3, 3, 128, 128)
    assert s[("classifier", "0", "kernel")] == (2 * 2 * 128, 32)
    assert s[("classifier", "6", "kernel")] == (32, 5)
    v = _abstract_variables(vgg.VGG(width=1e-3, hidden=2, num_classes=2), (1, 32, 32, 3))
    assert all(s[-1] == 1 for k, s in _flat_shapes(v["params"]["features"]).items() if k[-1] == "kernel")
    v = _abstract_variables(resnet.ResNet(resnet.Bottleneck, (1, 1, 1, 1), width=8, num_classes=4), (1, 32, 32, 3))
    s = _flat_shapes(v["params"])
    assert s[("conv1", "kernel")] == (7, 7, 3, 8)
    assert s[("layer4", "0", "conv2", "kernel")] == (3, 3, 64, 64)
    assert s[("layer4", "0", "downsample", "0", "kernel")] == (1, 1, 128, 256)
    assert s[("fc", "kernel")] == (256, 4)


# ---------------------------------------------------------------------------------------------
# torch-backed tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    """The torch reference module (skips when torch is not installed)."""
    pytest.importorskip("torch")
    import torch_ref_vgg_resnet

    return torch_ref_vgg_resnet


def _porter():
    """``xaijax.checkpoints.from_torch_state_dict`` (its module directly until the package exports it)."""
    try:
        from xaijax.checkpoints import from_torch_state_dict
    except ImportError:
        from xaijax.checkpoints.mapping import from_torch_state_dict
    return from_torch_state_dict


def _torch_full_size(ref, name: str):
    import torch

    with torch.device("meta"):  # shapes only, no memory
        if name.startswith("vgg"):
            return ref.TorchVGG(vgg.CFGS[VGG_CFG_KEY[name.split("_")[0]]], batch_norm=name.endswith("_bn"))
        block = ref.TorchBasicBlock if name in ("resnet18", "resnet34") else ref.TorchBottleneck
        layers_ = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
                   "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}[name]  # fmt: skip
        return ref.TorchResNet(block, layers_)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "vgg11", "resnet18", "resnet50"])
def test_param_shapes_equal_torchvision_layout(ref, name):
    sd = _torch_full_size(ref, name).state_dict()
    got = _flat_shapes(_abstract_variables(registry.get(name)))
    assert got == expected_flax_shapes(sd)
    if name == "vgg16":  # torchvision's published parameter count
        assert sum(int(np.prod(s)) for s in got.values()) == 138_357_544
    if name == "resnet50":
        assert sum(int(np.prod(s)) for p, s in got.items() if p[0] == "params") == 25_557_032


@pytest.mark.parametrize("name", list(VGG_CAM))
def test_vgg_cam_layer_is_last_relu_of_torch_features(ref, name):
    import torch

    feats = _torch_full_size(ref, name).features
    last = max(i for i, m in enumerate(feats) if isinstance(m, torch.nn.ReLU))
    assert registry.spec(name).cam_layer == f"features.{last}"
    assert isinstance(feats[len(feats) - 1], torch.nn.MaxPool2d)


# (c) pooling primitives --------------------------------------------------------------------


def _pool_vs_torch(module, torch_fn, shape, seed=0, ties=False):
    """Values and input gradients (of sum(out * w), w random) of a flax pool vs torch;
    ``ties``: integer inputs, mostly 0 (as after a ReLU), so windows hold tied maxima."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)  # NHWC
    if ties:
        x = np.maximum(rng.integers(-3, 3, shape), 0).astype(np.float32)
    fwd = lambda x: module.apply({}, x)  # noqa: E731
    w = rng.standard_normal(jax.eval_shape(fwd, x).shape).astype(np.float32)
    out, g = jax.jit(lambda x, w: (fwd(x), jax.grad(lambda x: jnp.sum(fwd(x) * w))(x)))(x, w)
    out, g = np.asarray(out), np.asarray(g)

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out_t = torch_fn(xt)
    (out_t * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    return out


@pytest.mark.parametrize(
    "kernel, stride, padding, hw",
    [
        (2, 2, 0, (8, 8)),  # reshape path
        (2, 2, 0, (9, 7)),  # reshape path, odd sizes (last row/column dropped)
        (2, None, 0, (5, 6)),
        (3, 2, 1, (9, 9)),  # slice path (ResNet stem pool)
        (3, 2, 1, (10, 7)),
        (3, 2, 1, (1, 2)),
        (3, 1, 1, (5, 6)),
        (3, 3, 0, (7, 11)),
    ],
)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_maxpool_matches_torch_values_and_gradients(ref, kernel, stride, padding, hw, ties):
    """Also with tied maxima: torch sends the gradient to the first maximal entry (row-major)."""
    import torch.nn.functional as F

    mod = layers.MaxPool2d(kernel, stride, padding)
    out = _pool_vs_torch(
        mod, lambda t: F.max_pool2d(t, kernel, stride if stride is not None else kernel, padding), (2, *hw, 3), ties=ties
    )
    s = stride or kernel
    assert out.shape[1:3] == tuple((n + 2 * padding - kernel) // s + 1 for n in hw)


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 2, 1)])
def test_maxpool_propagates_nan_like_torch(kernel, stride, padding):
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 1, 0] = np.nan  # a window's second row: the fold must not drop it for a later 0
    out = np.asarray(layers.MaxPool2d(kernel, stride, padding).apply({}, x))
    # every window that contains the NaN: one of the 2x2/2 windows, all four 3x3/2 ones
    assert np.isnan(out[0, 0, 0, 0]) and np.isnan(out).sum() == {2: 1, 3: 4}[kernel]
    torch = pytest.importorskip("torch")
    theirs = torch.nn.functional.max_pool2d(torch.tensor(x.transpose(0, 3, 1, 2)), kernel, stride, padding)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(theirs.numpy().transpose(0, 2, 3, 1)))


@pytest.mark.parametrize(
    "kernel, stride, padding, hw",
    [(2, 2, 0, (8, 8)), (2, 2, 0, (9, 7)), (3, 2, 1, (9, 10)), (3, 1, 1, (5, 6)), (2, 1, 0, (4, 5))],
)
def test_avgpool_matches_torch(ref, kernel, stride, padding, hw):
    import torch.nn.functional as F

    _pool_vs_torch(layers.AvgPool2d(kernel, stride, padding), lambda t: F.avg_pool2d(t, kernel, stride, padding), (2, *hw, 3))


@pytest.mark.parametrize(
    "out_size, hw",
    [(7, (3, 3)), (7, (10, 10)), (7, (7, 7)), (1, (5, 6)), ((3, 4), (5, 9)), (2, (1, 1)), (3, (2, 2))],
)
def test_adaptive_avgpool_matches_torch(ref, out_size, hw):
    import torch.nn.functional as F

    out = _pool_vs_torch(layers.AdaptiveAvgPool2d(out_size), lambda t: F.adaptive_avg_pool2d(t, out_size), (2, *hw, 3))
    assert out.shape[1:3] == ((out_size, out_size) if isinstance(out_size, int) else out_size)


# (d) parity with random torch weights ------------------------------------------------------

# case -> model knobs (shared by the flax model and the torch reference), input H, W (odd sizes
# included), layers whose outputs are compared, and the precisions it is checked in.
_TINY: dict[str, dict[str, Any]] = {
    # 80 px -> 2x2 features -> adaptive pool to 7x7 (non-uniform bins); exercises the C,H,W
    # flatten permutation of classifier.0 with spatially distinct features.
    "vgg16_tiny": dict(
        kind="vgg", cfg=vgg.CFGS["D"], batch_norm=False, width=1 / 16, hidden=24, pool_size=7, hw=(80, 80),
        capture=["features.23", "features.29", "avgpool", "classifier.4"],
    ),
    # VGG11-BN, 96 px -> 3x3 features == pool_size (identity adaptive pool).
    "vgg11_bn_tiny": dict(
        kind="vgg", cfg=vgg.CFGS["A"], batch_norm=True, width=1 / 16, hidden=24, pool_size=3, hw=(96, 96),
        capture=["features.21", "features.27", "avgpool", "classifier.4"],
    ),
    "resnet_basic_tiny": dict(
        kind="resnet", block="basic", layers=(1, 1, 1, 1), width=4, hw=(57, 57),
        capture=["maxpool", "layer1", "layer2.0.downsample", "layer3", "layer4", "avgpool"],
    ),
    "resnet_bottleneck_tiny": dict(
        kind="resnet", block="bottleneck", layers=(1, 2, 1, 1), width=4, hw=(64, 48),
        capture=["maxpool", "layer1", "layer1.0.downsample", "layer2.1.bn2", "layer3", "layer4", "avgpool"],
    ),
    "resnext_tiny": dict(
        kind="resnet", block="bottleneck", layers=(1, 1, 1, 1), width=8, groups=2, width_per_group=32, hw=(40, 40),
        capture=["layer1", "layer3", "layer4"], precisions=("float32",),
    ),
}  # fmt: skip
_NUM_CLASSES = 7
_TARGET = 3


def _build_pair(ref, spec: dict[str, Any]):
    import torch

    torch.manual_seed(0)
    if spec["kind"] == "vgg":
        kw = dict(batch_norm=spec["batch_norm"], num_classes=_NUM_CLASSES, width=spec["width"],
                  hidden=spec["hidden"], pool_size=spec["pool_size"])  # fmt: skip
        return vgg.VGG(cfg=spec["cfg"], **kw), ref.TorchVGG(spec["cfg"], **kw)
    flax_block, torch_block = (
        (resnet.BasicBlock, ref.TorchBasicBlock) if spec["block"] == "basic" else (resnet.Bottleneck, ref.TorchBottleneck)
    )
    kw = dict(num_classes=_NUM_CLASSES, width=spec["width"], groups=spec.get("groups", 1),
              width_per_group=spec.get("width_per_group", 64))  # fmt: skip
    return resnet.ResNet(flax_block, spec["layers"], **kw), ref.TorchResNet(torch_block, spec["layers"], **kw)


def _torch_run(tmodel, x_nhwc: np.ndarray, capture: list[str]):
    """Torch logits, hooked activations (as NHWC numpy) and d(sum_n logit[n, target])/dx (NHWC)."""
    import torch

    acts: dict[str, Any] = {}
    hooks = [
        tmodel.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach().clone()))
        for name in capture
    ]
    try:
        dtype = next(tmodel.parameters()).dtype
        xt = torch.tensor(x_nhwc.transpose(0, 3, 1, 2), dtype=dtype, requires_grad=True)
        out = tmodel(xt)
        out[:, _TARGET].sum().backward()
    finally:
        for h in hooks:
            h.remove()

    def nhwc(t):
        a = t.numpy()
        return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a

    return out.detach().numpy(), {k: nhwc(v) for k, v in acts.items()}, nhwc(xt.grad)


def _jax_run(model, variables, x: jax.Array, capture: list[str]):
    def f(x):
        out, acts = taps.forward(model, variables, x, capture=capture)
        return out[:, _TARGET].sum(), (out, acts)

    (_, (out, acts)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
    return np.asarray(out), {k: np.asarray(v) for k, v in acts.items()}, np.asarray(g)


@pytest.fixture(scope="module", params=[(c, p) for c in _TINY for p in _TINY[c].get("precisions", ("float32", "float64"))], ids=lambda p: f"{p[0]}-{p[1]}")
def parity(request, ref):
    """Torch vs xaijax results on one tiny model in one precision (float64 via jax_enable_x64)."""
    from_torch_state_dict = _porter()
    case, precision = request.param
    spec = _TINY[case]
    fmodel, tmodel = _build_pair(ref, spec)
    ref.randomize_(tmodel, seed=1)
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    variables = from_torch_state_dict(fmodel, sd)
    x = np.random.default_rng(2).standard_normal((2, *spec["hw"], 3))

    prev = jax.config.jax_enable_x64
    try:
        if precision == "float64":
            jax.config.update("jax_enable_x64", True)
            # the float32 weights are upcast exactly on both sides
            variables = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), variables)
            tmodel = copy.deepcopy(tmodel).double()
            xj = jnp.asarray(x, jnp.float64)
        else:
            x = x.astype(np.float32)
            xj = jnp.asarray(x)
        ours = _jax_run(fmodel, variables, xj, spec["capture"])
    finally:
        jax.config.update("jax_enable_x64", prev)
    theirs = _torch_run(tmodel, x, spec["capture"])
    return dict(case=case, precision=precision, ours=ours, theirs=theirs, variables=variables)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.max(np.abs(b)))
    assert scale > 0, "reference is identically zero: the comparison would be vacuous"
    return float(np.max(np.abs(a - b))) / scale


def _tol(p, f32: float = 1e-5) -> float:
    return f32 if p["precision"] == "float32" else 1e-10


def test_parity_logits(parity):
    ours, theirs = parity["ours"][0], parity["theirs"][0]
    assert ours.dtype == np.dtype(parity["precision"])
    assert ours.shape == (2, _NUM_CLASSES)
    assert np.std(theirs) > 1e-3  # not a degenerate network
    assert _rel_err(ours, theirs) <= _tol(parity)


def test_parity_intermediate_activations(parity):
    ours, theirs = parity["ours"][1], parity["theirs"][1]
    assert set(ours) == set(theirs) == set(_TINY[parity["case"]]["capture"])
    for name in ours:
        assert _rel_err(ours[name], theirs[name]) <= _tol(parity), name


def test_parity_input_gradient(parity):
    # float32: a ReLU whose pre-activation lies within rounding error of 0 may switch between
    # the two frameworks and move the gradient locally; 1e-4 leaves room for that, float64
    # is the tight check.
    ours, theirs = parity["ours"][2], parity["theirs"][2]
    assert _rel_err(ours, theirs) <= _tol(parity, f32=1e-4)


@pytest.fixture(scope="module")
def train_step(ref):
    """One train-mode forward pass (batch statistics) of a tiny ResNet in flax and torch."""
    import torch

    from_torch_state_dict = _porter()
    fmodel, tmodel = _build_pair(ref, _TINY["resnet_basic_tiny"])
    ref.randomize_(tmodel, seed=3)
    variables = from_torch_state_dict(fmodel, {k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
    x = np.random.default_rng(4).standard_normal((3, 32, 32, 3)).astype(np.float32)
    out, updates = jax.jit(lambda v, x: fmodel.clone(train=True).apply(v, x, mutable=["batch_stats"]))(variables, x)
    tmodel.train()
    with torch.no_grad():
        out_t = tmodel(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    return dict(out=np.asarray(out), out_t=out_t, stats=updates["batch_stats"], tmodel=tmodel, old=variables["batch_stats"])


_TRAIN_BN = ("bn1", "layer1.0.bn2", "layer3.0.downsample.1", "layer4.0.bn1")


def _stats_at(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_batchnorm_train_mode_matches_torch(train_step):
    """train=True: normalisation with batch statistics; running means move with momentum 0.1."""
    assert _rel_err(train_step["out"], train_step["out_t"]) <= 1e-4
    for key in _TRAIN_BN:
        new, old = _stats_at(train_step["stats"], key), _stats_at(train_step["old"], key)
        mod = train_step["tmodel"].get_submodule(key)
        assert not np.allclose(new["mean"], old["mean"])
        np.testing.assert_allclose(new["mean"], mod.running_mean.numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_train_mode_running_var_matches_torch(train_step):
    for key in _TRAIN_BN:
        new = _stats_at(train_step["stats"], key)
        mod = train_step["tmodel"].get_submodule(key)
        np.testing.assert_allclose(new["var"], mod.running_var.numpy(), rtol=1e-4, atol=1e-5)
