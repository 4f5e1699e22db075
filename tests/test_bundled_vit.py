"""The bundled ViT and the input-size rule: native round trip of a ViT with its architecture
metadata, the input size read from the model / checkpoint, and the trained weights' mAP."""

from __future__ import annotations

import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import checkpoints, cli, models, training
from xaijax.checkpoints.errors import CheckpointMismatchError
from xaijax.checkpoints.input_size import fixed_input_size, model_input_size
from xaijax.data import SyntheticScenes
from xaijax.evaluation.runner import EvalConfig, model_size
from xaijax.models.preprocess import normalize
from xaijax.models.vit import VisionTransformer

BUNDLED_VIT = Path(__file__).resolve().parents[1] / "weights" / "synthetic_vit.safetensors"

TINY = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 24, "num_classes": 5}


def _random_variables(model, size: int, seed: int = 0) -> dict:
    """Every leaf (position embedding and class token included) drawn from N(0, 0.1^2)."""
    template = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), template)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny ViT saved with its architecture metadata (as train_classifier writes it)."""
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    model = models.get("vit_b_16", **TINY)
    variables = _random_variables(model, TINY["image_size"])
    meta = {"arch": "vit_b_16", "model_kwargs": json.dumps(TINY), "train": json.dumps({"loss": "sigmoid_bce"})}
    checkpoints.save_variables(path, variables, metadata=meta)
    return path, model, variables


def test_native_round_trip_rebuilds_the_vit_with_its_knobs(tiny_vit):
    path, model, variables = tiny_vit
    loaded, v2, info = checkpoints.load(None, path)
    assert isinstance(loaded, VisionTransformer)
    for k, want in TINY.items():
        assert getattr(loaded, k) == want, k
    assert loaded == model  # same module configuration (eps etc.)
    flat1, flat2 = checkpoints.flatten_variables(variables), checkpoints.flatten_variables(v2)
    assert sorted(flat1) == sorted(flat2)
    for k in flat1:
        np.testing.assert_array_equal(np.asarray(flat1[k]), flat2[k])
    assert v2["params"]["encoder"]["pos_embedding"].shape == (1, 1 + (32 // 8) ** 2, 16)
    x = np.random.default_rng(1).random((2, 32, 32, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, x)), np.asarray(loaded.apply(v2, x)))
    assert info["model_kwargs"]["image_size"] == 32 and info["arch"] == "vit_b_16"


def test_metadata_with_another_image_size_is_refused(tiny_vit, tmp_path):
    path, _, variables = tiny_vit
    bad = tmp_path / "bad.safetensors"
    checkpoints.save_variables(bad, variables, metadata={"arch": "vit_b_16", "model_kwargs": json.dumps({**TINY, "image_size": 48})})
    with pytest.raises(CheckpointMismatchError, match="pos_embedding"):
        checkpoints.load(None, bad)


def test_input_size_comes_from_the_vit_not_the_registry(tiny_vit):
    path, _, _ = tiny_vit
    model, _, info = checkpoints.load(None, path)
    assert models.spec("vit_b_16").input_size == 224  # the registry's default: what must not be used
    assert fixed_input_size(model) == 32
    assert model_input_size(model, info) == 32
    assert model_input_size(model, info, requested=32) == 32
    assert model_input_size(model, info, fallback=128) == 32
    with pytest.raises(ValueError, match=r"--size\) 48.*32x32"):
        model_input_size(model, info, requested=48)
    # the evaluation runner reads it too (before: 128 for the synthetic dataset, whatever the model)
    assert model_size(EvalConfig("pointing", Path("."), ("gradient",)), model, info) == 32
    with pytest.raises(ValueError, match="32x32"):
        model_size(EvalConfig("pointing", Path("."), ("gradient",), size=128), model, info)


def test_input_size_of_models_without_a_fixed_size():
    cnn = models.get("resnet18", num_classes=3, width=8)
    assert fixed_input_size(cnn) is None
    trained = {"arch": "resnet18", "metadata": {"dataset": json.dumps({"size": 96})}}
    assert model_input_size(cnn, trained) == 96  # the training images' size
    assert model_input_size(cnn, trained, requested=64) == 64  # any size works: --size wins
    bare = {"arch": "resnet18", "metadata": {}}
    assert model_input_size(cnn, bare, fallback=128) == 128
    assert model_input_size(cnn, bare) == 224  # the architecture's natural size
    assert model_input_size(models.get("inception_v3", num_classes=3), {"arch": "inception_v3", "metadata": {}}) == 299
    with pytest.raises(ValueError, match="size"):
        model_input_size(cnn, bare, requested=0)


def test_predict_feeds_the_vit_its_own_size(tiny_vit, tmp_path, capsys):
    from PIL import Image

    path, model, variables = tiny_vit
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(2).random((50, 40, 3)) * 255).astype(np.uint8)).save(img)
    assert cli.main(["predict", "--weights", str(path), "--top", "5", str(img)]) == 0
    out = capsys.readouterr().out
    assert "32x32 px" in out
    # the printed logits are the model's on the image loaded at 32 px (torchvision crop: nothing recorded)
    from xaijax.models.preprocess import load_image

    logits = np.asarray(model.apply(variables, normalize(load_image(img, 32)[None], "torchvision")))[0]
    top = int(np.argmax(logits))
    first = [ln.split() for ln in out.splitlines() if ln.startswith("  ") and ln.split()[0].isdigit()][0]
    assert int(first[0]) == top and float(first[2]) == pytest.approx(float(logits[top]), abs=1e-4)
    assert cli.main(["predict", "--weights", str(path), "--size", "64", str(img)]) == 2
    err = capsys.readouterr().err
    assert "--size" in err and "32x32" in err and "Traceback" not in err


@pytest.mark.skipif(not BUNDLED_VIT.is_file(), reason="weights/synthetic_vit.safetensors not bundled")
def test_bundled_vit_is_trained():
    model, variables, info = checkpoints.load(None, BUNDLED_VIT)
    ds = SyntheticScenes()
    assert isinstance(model, VisionTransformer)
    assert model.image_size == ds.size and model_input_size(model, info) == ds.size
    meta = info["metadata"]
    test = ds.batch("test", 0, 100)
    res = training.evaluate(model, variables, test["images"], test["multi_hot"], 50, meta["preprocess"])
    # recomputed here from the images: the script recorded the mAP of the first 100 test images
    assert res["map"] == pytest.approx(float(meta["test_map_100"]), abs=1e-4)
    m64, _ = training.mean_average_precision(res["logits"][:64], test["multi_hot"][:64])
    chance = training.chance_map(test["multi_hot"][:64])
    assert m64 > chance + 0.2, (m64, chance)


def test_visualize_feeds_the_vit_its_own_size(tiny_vit, tmp_path):
    path, _, _ = tiny_vit
    out = tmp_path / "vis"
    assert cli.main(["visualize", "--weights", str(path), "--layer", "logits", "--units", "0:2", "--steps", "2",
                     "--batch", "2", "--out", str(out)]) == 0
    assert np.load(out / "logits_class.npy").shape == (2, 32, 32, 3)


def _train_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "train_classifier.py"
    spec = importlib.util.spec_from_file_location("train_classifier_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_script_vit_config_and_init():
    tc = _train_script()
    cfg = tc.CONFIGS["vit"]
    assert tc.registry_name("vit") == "vit_b_16" and tc.registry_name("resnet18") == "resnet18"
    assert cfg["model_kwargs"]["image_size"] == SyntheticScenes().size
    model = models.get("vit_b_16", **TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    p = tc.vit_init(shapes["params"], seed=3)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(p).items()}
    assert set(flat) == {"/".join(k) for k in flax.traverse_util.flatten_dict(shapes["params"])}
    for k, v in flat.items():
        name = k.rsplit("/", 1)[-1]
        if name in ("kernel", "pos_embedding"):
            assert np.abs(v).max() <= 2 * tc.VIT_INIT_STD and v.std() > 0, k
        elif name == "scale":
            np.testing.assert_array_equal(v, 1.0)
        else:  # biases, class token
            np.testing.assert_array_equal(v, 0.0)
    # a truncated standard normal (cut at 2) has std 0.8796; the MLP kernel has 16*24 draws
    assert np.std(flat["encoder/layers/encoder_layer_0/mlp/0/kernel"]) == pytest.approx(0.8796 * 0.02, rel=0.15)
    again = tc.vit_init(shapes["params"], seed=3)
    np.testing.assert_array_equal(again["conv_proj"]["kernel"], p["conv_proj"]["kernel"])
    with pytest.raises(ValueError, match="vit_init.*weird"):
        tc.vit_init({"weird": jax.ShapeDtypeStruct((2,), jnp.float32)}, seed=0)


@pytest.mark.skipif(not BUNDLED_VIT.is_file(), reason="weights/synthetic_vit.safetensors not bundled")
def test_bundled_vit_metadata_matches_the_script():
    tc = _train_script()
    _, meta = checkpoints.load_variables(BUNDLED_VIT)
    assert meta["arch"] == tc.registry_name("vit")
    assert json.loads(meta["model_kwargs"]) == tc.CONFIGS["vit"]["model_kwargs"]
    assert meta["command"].startswith("python experiments/train_classifier.py --arch vit ")
