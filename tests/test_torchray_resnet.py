"""TorchRay's Caffe-converted ResNet50 (VOC/COCO pointing-game models) -> xaijax.

TorchRay (``torchray/benchmark/models.py``, ``_load_caffe_resnet50``) patches torchvision's
ResNet50 into the original Caffe network: the stem ``conv1`` has a bias, the stem max-pool is
3x3/2 with padding 0 and ``ceil_mode=True``, and the first block of ``layer2``..``layer4``
strides its 1x1 ``conv1`` (``conv2`` has stride 1). Its checkpoint stores every BatchNorm as a
Caffe BatchNorm ("0": running statistics) + Scale ("1": weight, bias) pair and the stem
``conv1`` for BGR input. Here a tiny plain-torch model is patched the same way, randomised,
saved in that on-disk layout, loaded with :func:`xaijax.checkpoints.load_torch_weights` and
compared with the torch forward pass.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_ref_vgg_resnet import TorchBottleneck, TorchResNet, randomize_  # noqa: E402

from xaijax import checkpoints  # noqa: E402
from xaijax.checkpoints.convert import _torchray_resnet_to_torchvision  # noqa: E402

TINY = {"width": 8, "layers": (1, 1, 1, 1), "num_classes": 20}
# odd sizes; stem conv gives 20 x 23, so the ceil-mode stem pool adds a row (20 is even) but
# not a column (23 is odd), and every later stride-2 stage sees odd sizes
X_SHAPE = (2, 3, 39, 45)


class TorchCaffeResNet(TorchResNet):
    """TorchResNet patched exactly as TorchRay's ``_load_caffe_resnet50`` patches torchvision's."""

    def __init__(self, **kw) -> None:
        super().__init__(TorchBottleneck, **kw)
        self.conv1 = torch.nn.Conv2d(3, self.conv1.out_channels, 7, 2, 3, bias=True)
        self.maxpool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        for i in range(2, 5):
            getattr(self, f"layer{i}")[0].conv1.stride = (2, 2)
            getattr(self, f"layer{i}")[0].conv2.stride = (1, 1)


def _to_torchray_layout(tm: torch.nn.Module) -> dict[str, np.ndarray]:
    """torchvision names -> TorchRay's file: each BatchNorm split into ".0" (Caffe BatchNorm:
    running statistics) and ".1" (Caffe Scale: weight, bias); stem conv1 stored for BGR input.
    The inverse of TorchRay's rename + BGR->RGB flip."""
    bns = {name for name, m in tm.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    out = {}
    for k, v in tm.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in bns:
            k = f"{mod}.{'1' if leaf in ('weight', 'bias') else '0'}.{leaf}"
        out[k] = v.detach().numpy()
    out["conv1.weight"] = out["conv1.weight"][:, ::-1].copy()
    return out


@pytest.fixture(scope="module")
def ray(tmp_path_factory):
    tm = randomize_(TorchCaffeResNet(**TINY), seed=3)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    ray_sd = _to_torchray_layout(tm)
    path = tmp_path_factory.mktemp("torchray") / "resnet50_voc-tiny.pth.tar"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ray_sd.items()}, path)
    x = np.random.default_rng(0).normal(size=X_SHAPE).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    return {"path": path, "sd": sd, "ray_sd": ray_sd, "x": x, "want": want}


def test_file_layout_is_torchrays(ray):
    """The synthetic file has the real checkpoint's key pattern (so the test exercises it)."""
    keys = set(ray["ray_sd"])
    for k in ("bn1.0.running_mean", "bn1.1.weight", "conv1.bias", "layer1.0.bn3.0.running_var",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.0.running_mean",
              "layer2.0.downsample.1.1.bias", "fc.weight"):
        assert k in keys, k
    assert not any(re.search(r"bn\d\.(weight|bias|running_\w+)$", k) for k in keys)
    # TorchRay's own rename (models.py, _load_caffe_resnet50) recovers the torch names
    def rename(name: str) -> str:
        name = re.sub(r"bn(\d).(0|1).(.*)", r"bn\1.\3", name)
        return re.sub(r"downsample.(\d).(0|1).(.*)", r"downsample.\1.\3", name)

    assert sorted(map(rename, keys)) == sorted(ray["sd"])  # one-to-one onto torchvision's names
    ours = _torchray_resnet_to_torchvision(ray["ray_sd"])
    assert set(ours) == set(ray["sd"])
    for k, v in ours.items():
        want = ray["sd"][k]
        np.testing.assert_array_equal(v, want, err_msg=k)  # conv1 flipped back to RGB, rest as is


def test_load_matches_caffe_resnet_logits(ray):
    model, variables, info = checkpoints.load_torch_weights(
        "resnet50", ray["path"], width=8, layers=(1, 1, 1, 1), num_classes=20
    )
    assert info["source"] == "torchray"
    kw = info["model_kwargs"]
    assert kw["stride_in_1x1"] is True and kw["stem_bias"] is True and kw["caffe_stem_pool"] is True
    assert kw["num_classes"] == 20
    assert variables["params"]["conv1"]["bias"].shape == (8,)
    got = np.asarray(model.apply(variables, jnp.asarray(ray["x"].transpose(0, 2, 3, 1))))
    want = ray["want"]
    assert got.shape == want.shape == (2, 20)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-5, rel


def test_num_classes_is_read_from_the_head(ray):
    _, _, info = checkpoints.load_torch_weights("resnet50", ray["path"], width=8, layers=(1, 1, 1, 1))
    assert info["model_kwargs"]["num_classes"] == 20


def test_each_caffe_switch_matters(ray):
    """Turning a Caffe switch off changes the logits (or the parameter set): each is needed."""
    want = ray["want"]
    x = jnp.asarray(ray["x"].transpose(0, 2, 3, 1))
    for flag in ("stride_in_1x1", "caffe_stem_pool"):
        model, variables, _ = checkpoints.load_torch_weights(
            "resnet50", ray["path"], width=8, layers=(1, 1, 1, 1), **{flag: False}
        )
        got = np.asarray(model.apply(variables, x))
        assert np.abs(got - want).max() / np.abs(want).max() > 1e-3, flag
    with pytest.raises(checkpoints.CheckpointMismatchError, match="conv1"):
        checkpoints.load_torch_weights("resnet50", ray["path"], width=8, layers=(1, 1, 1, 1), stem_bias=False)


def test_port_round_trip_keeps_caffe_config(ray, tmp_path):
    dst = tmp_path / "resnet50_voc.safetensors"
    checkpoints.port("resnet50", ray["path"], dst, width=8, layers=(1, 1, 1, 1))
    model, variables, info = checkpoints.load(None, dst)
    assert info["source"] == "torchray" and info["model_kwargs"]["stride_in_1x1"] is True
    got = np.asarray(model.apply(variables, jnp.asarray(ray["x"].transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ray["want"], rtol=1e-5, atol=1e-5 * np.abs(ray["want"]).max())


def test_torchray_resnet_with_another_arch_family_is_rejected(ray):
    with pytest.raises(checkpoints.CheckpointMismatchError, match="resnet"):
        checkpoints.load_torch_weights("vgg16", ray["path"])
