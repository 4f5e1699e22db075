"""xaijax.models.preprocess.convention: the one decision of a checkpoint's input convention.

Order: an explicit override, then the checkpoint's recorded ``metadata["preprocess"]``, then
"caffe" for TorchRay sources, else "torchvision"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xaijax import checkpoints, models
from xaijax.models.preprocess import CONVENTIONS, convention

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_each_source_of_the_decision_wins_in_order():
    torchray_recorded = {"source": "torchray", "metadata": {"preprocess": "none"}}
    assert convention(torchray_recorded, "torchvision") == "torchvision"  # 1. override beats everything
    assert convention(torchray_recorded) == "none"  # 2. the recorded value beats the source
    assert convention({"source": "torchray", "metadata": {}}) == "caffe"  # 3. TorchRay source
    assert convention({"source": "torchray"}) == "caffe"  # torch files have no metadata
    assert convention({"source": "torchvision"}) == "torchvision"  # 4. default
    assert convention({"source": "native", "metadata": {"arch": "vgg16"}}) == "torchvision"
    assert convention({}) == "torchvision"
    for c in CONVENTIONS:
        assert convention({"source": "torchray", "metadata": {"preprocess": "caffe"}}, c) == c
        assert convention({"metadata": {"preprocess": c}}) == c


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown preprocessing convention 'imagenet' \(the explicit"):
        convention({"source": "torchvision"}, "imagenet")
    with pytest.raises(ValueError, match=r"'bgr' \(recorded in the checkpoint's metadata; pass --preprocess"):
        convention({"metadata": {"preprocess": "bgr"}})
    assert convention({"metadata": {"preprocess": "bgr"}}, "caffe") == "caffe"  # the override repairs a bad record
    with pytest.raises(ValueError, match="dict returned by xaijax.checkpoints.load"):
        convention("torchvision")  # type: ignore[arg-type]


def test_loaded_checkpoints_decide_from_their_metadata(tmp_path):
    _, _, info = checkpoints.load(None, WEIGHTS / "synthetic_vgg16.safetensors")
    assert info["metadata"]["preprocess"] == "torchvision" and convention(info) == "torchvision"
    _, _, meta = checkpoints.load_detector(WEIGHTS / "synthetic_detector.safetensors")
    assert convention({"metadata": meta}) == "none"
    # a native file recording "caffe" is read as caffe, whatever its source says
    kw = {"num_classes": 3, "width": 8}
    v = models.random_variables(models.get("resnet18", **kw), (1, 32, 32, 3))
    path = tmp_path / "r.safetensors"
    checkpoints.save_variables(path, v, {"arch": "resnet18", "model_kwargs": json.dumps(kw), "preprocess": "caffe"})
    _, _, info = checkpoints.load(None, path)
    assert convention(info) == "caffe" and convention(info, "none") == "none"
    # a native file that records no convention falls back on its source
    checkpoints.save_variables(path, v, {"arch": "resnet18", "model_kwargs": json.dumps(kw), "source": "torchray"})
    assert convention(checkpoints.load(None, path)[2]) == "caffe"


def test_ported_files_record_their_convention(tmp_path):
    torch = pytest.importorskip("torch")
    kw = {"num_classes": 5, "width": 1 / 16, "hidden": 16, "pool_size": 1}
    model = models.get("vgg16", **kw)
    sd = checkpoints.to_torch_state_dict(model, models.random_variables(model, (1, 32, 32, 3)))
    torchvision_file = tmp_path / "tv.pth"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, torchvision_file)
    # the same weights in TorchRay's layout: classifier.{0,3,6} stored as classifier.{0,2,4}
    ray = {k.replace("classifier.3.", "classifier.2.").replace("classifier.6.", "classifier.4."): v for k, v in sd.items()}
    torchray_file = tmp_path / "ray.pth"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in ray.items()}, torchray_file)
    for src, want in ((torchvision_file, "torchvision"), (torchray_file, "caffe")):
        _, _, torch_info = checkpoints.load("vgg16", src, width=1 / 16, hidden=16, pool_size=1)
        assert convention(torch_info) == want
        dst = tmp_path / f"{src.stem}.safetensors"
        checkpoints.port("vgg16", src, dst, width=1 / 16, hidden=16, pool_size=1)
        _, _, info = checkpoints.load(None, dst)
        assert info["metadata"]["preprocess"] == want and convention(info) == want
