"""torch <-> Flax name/layout mapping: round trips, strict errors, TorchRay's VGG16 layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import checkpoints, models
from xaijax.checkpoints import CheckpointMismatchError, from_torch_state_dict, to_torch_state_dict

TINY_VGG = {"num_classes": 5, "width": 1 / 16, "hidden": 16, "pool_size": 2}
TINY_RESNET = {"num_classes": 4, "width": 8, "layers": [1, 1, 1, 1]}


def _init(arch: str, kw: dict, size: int = 32):
    model = models.get(arch, **kw)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    v = models.random_variables(model, x.shape, seed=1)
    # random BN statistics so that a dropped/misplaced buffer would show
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: np.asarray(a) + (0.1 * rng.random(a.shape, np.float32) if "batch_stats" in str(p[0]) else 0), v
    )
    return model, v, x


@pytest.mark.parametrize("arch,kw", [("vgg16_bn", TINY_VGG), ("resnet50", TINY_RESNET)])
def test_to_torch_and_back_is_identity(arch, kw):
    model, v, x = _init(arch, kw)
    sd = to_torch_state_dict(model, v)
    if arch == "vgg16_bn":
        c = sd["classifier.0.weight"]
        assert c.shape == (16, 32 * 2 * 2)  # torch (out, C*H*W)
        k = np.asarray(v["params"]["classifier"]["0"]["kernel"])  # NHWC flatten: (H*W*C, out)
        # torch input index c*4 + h*2 + w  <->  xaijax input index (h*2 + w)*32 + c
        for ch, h, w in [(0, 0, 0), (5, 1, 0), (31, 1, 1)]:
            np.testing.assert_array_equal(c[:, ch * 4 + h * 2 + w], k[(h * 2 + w) * 32 + ch])
        assert sd["features.1.num_batches_tracked"].dtype == np.int64
    v2 = from_torch_state_dict(model, sd, input_shape=(1, 32, 32, 3))
    jax.tree_util.tree_map(np.testing.assert_array_equal, v2, jax.tree_util.tree_map(np.asarray, v))
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(v2, x), apply(v, x))


def test_strict_errors_list_every_key():
    model, v, _ = _init("resnet50", TINY_RESNET)
    sd = to_torch_state_dict(model, v)
    del sd["layer2.0.conv1.weight"]
    sd["layer9.weight"] = np.zeros(3)
    sd["fc.weight"] = np.zeros((10, sd["fc.weight"].shape[1]), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        from_torch_state_dict(model, sd, input_shape=(1, 32, 32, 3))
    msg = str(e.value)
    assert "missing keys (1): layer2.0.conv1.weight" in msg
    assert "unexpected keys (1): layer9.weight" in msg
    assert "mis-shaped keys (1): fc.weight" in msg
    assert "the checkpoint has 10 classes; build the model with num_classes=10" in msg
    # non-strict tolerates only unexpected keys
    del sd["layer9.weight"]
    sd["fc.weight"] = np.asarray(to_torch_state_dict(model, v)["fc.weight"])
    sd["layer2.0.conv1.weight"] = to_torch_state_dict(model, v)["layer2.0.conv1.weight"]
    sd["extra.bias"] = np.zeros(2)
    from_torch_state_dict(model, sd, input_shape=(1, 32, 32, 3), strict=False)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        from_torch_state_dict(model, sd, input_shape=(1, 32, 32, 3))


def test_guess_family_hint():
    model, v, _ = _init("resnet50", TINY_RESNET)
    vgg_model, vv, _ = _init("vgg16_bn", TINY_VGG)
    with pytest.raises(CheckpointMismatchError, match="looks like a vgg model, not a resnet model"):
        from_torch_state_dict(model, to_torch_state_dict(vgg_model, vv), input_shape=(1, 32, 32, 3))


def test_torchray_vgg16_layout(tmp_path):
    """TorchRay's Caffe-converted VGG16: classifier.0/2/4 as convs, BGR first conv, ceil pooling."""
    torch = pytest.importorskip("torch")
    from torch_ref_vgg_resnet import TorchVGG, randomize_

    from xaijax.models.vgg import CFGS

    tm = randomize_(TorchVGG(CFGS["D"], width=1 / 16, hidden=16, pool_size=2, num_classes=5), seed=1)
    for m in tm.features:
        if isinstance(m, torch.nn.MaxPool2d):
            m.ceil_mode = True
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    c_last = sd["features.28.weight"].shape[0]
    ray = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    ray["features.0.weight"] = sd["features.0.weight"][:, ::-1].copy()  # stored for BGR input
    ray["classifier.0.weight"] = sd["classifier.0.weight"].reshape(16, c_last, 2, 2)
    ray["classifier.0.bias"] = sd["classifier.0.bias"]
    ray["classifier.2.weight"] = sd["classifier.3.weight"].reshape(16, 16, 1, 1)
    ray["classifier.2.bias"] = sd["classifier.3.bias"]
    ray["classifier.4.weight"] = sd["classifier.6.weight"].reshape(5, 16, 1, 1)
    ray["classifier.4.bias"] = sd["classifier.6.bias"]
    path = tmp_path / "vgg16_voc.pth.tar"
    torch.save({k: torch.from_numpy(v) for k, v in ray.items()}, path)

    model, variables, info = checkpoints.load_torch_weights("vgg16", path, width=1 / 16, hidden=16, pool_size=2)
    assert info["source"] == "torchray" and info["model_kwargs"]["ceil_mode"] is True
    assert info["model_kwargs"]["num_classes"] == 5
    x = np.random.default_rng(0).normal(size=(2, 3, 36, 44)).astype(np.float32)  # odd sizes: ceil mode matters
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_imagenet_inception_gets_transform_input_and_aux_keys_are_ignored(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_ref_densenet_inception import Inception3Ref, randomize_

    tm = randomize_(Inception3Ref(num_classes=1000, width=1 / 16, aux_logits=True))
    path = tmp_path / "inception.pth"
    torch.save(tm.state_dict(), path)
    _, _, info = checkpoints.load_torch_weights("inception_v3", path, width=1 / 16)
    assert info["model_kwargs"]["transform_input"] is True and info["model_kwargs"]["num_classes"] == 1000
    assert info["ignored_keys"] and all(k.startswith("AuxLogits.") for k in info["ignored_keys"])
    _, _, info = checkpoints.load_torch_weights("inception_v3", path, width=1 / 16, transform_input=False)
    assert info["model_kwargs"]["transform_input"] is False
