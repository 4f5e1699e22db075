"""Results that used to be wrong without a word (issue 19): a target class outside the model's
range under ``jax.jit``, a model evaluated on another dataset's classes, checkpoints' recorded
input size / class names / output activation ignored by ``predict``/``explain``, 16-bit and
float images read as all white, and ``miou_positive`` on maps without negative values."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from xaijax import checkpoints, cli, data, methods, metrics, models
from xaijax.data._base import CorruptImageError, open_rgb
from xaijax.evaluation import EvalConfig, run_experiment
from xaijax.methods import as_seed, class_indices, target_scores
from xaijax.metrics import iou
from xaijax.models import preprocess
from xaijax.models.preprocess import load_image, normalize

# --------------------------------------------------------------------------------------
# 1. targets out of range; class counts in eval
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = models.get("resnet18", num_classes=3, width=8, layers=(1, 1, 1, 1))
    variables = models.random_variables(model, (1, 32, 32, 3), seed=0)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    return model, variables, x


def test_seed_row_of_a_traced_out_of_range_class_is_nan():
    seed = jax.jit(lambda t: as_seed(t, 3, 3))(jnp.asarray([0, 3, -1]))
    np.testing.assert_array_equal(np.asarray(seed[0]), [1.0, 0.0, 0.0])
    assert np.isnan(np.asarray(seed[1:])).all()
    scores = jax.jit(target_scores)(jnp.ones((2, 3)), jnp.asarray([2, 5]))
    assert float(scores[0]) == 1.0 and np.isnan(float(scores[1]))
    with pytest.raises(ValueError, match=r"target class 5 is out of range for a model with 3 outputs \(valid classes: 0..2\)"):
        as_seed(np.asarray([2, 5]), 3, 2)  # concrete: the eager check
    with pytest.raises(ValueError, match="target class -1 is out of range"):
        class_indices(-1, 2, 3)


@pytest.mark.parametrize("name,hp", [("gradient", {}), ("grad-cam", {}), ("lrp-epsilon", {}), ("rise", {"n": 16}),
                                     ("center", {}), ("contrast:gradient", {})])
def test_traced_out_of_range_class_gives_a_nan_map_and_leaves_the_others_alone(name, hp, tiny):
    model, variables, x = tiny
    method = methods.get(name, **hp)
    explain = jax.jit(method, static_argnums=0)
    ok = np.asarray(explain(model, variables, x, jnp.asarray([1, 2])))
    got = np.asarray(explain(model, variables, x, jnp.asarray([1, 3])))  # class 3 of a 3-class model
    assert np.isnan(got[1]).all(), "an out-of-range class must give an all-NaN map (not all zeros)"
    assert np.isfinite(got[0]).all()
    np.testing.assert_allclose(got[0], ok[0], rtol=1e-5, atol=1e-6)  # samples stay independent
    with pytest.raises(ValueError, match="target class 3 is out of range"):
        method(model, variables, x, np.asarray([1, 3]))  # concrete: raises before any work


def _weights(path: Path, num_classes: int, **meta: str) -> Path:
    kw = {"num_classes": num_classes, "width": 8, "layers": [1, 1, 1, 1]}
    m = models.get("resnet18", **kw)
    checkpoints.save_variables(path, models.random_variables(m, (1, 32, 32, 3)), metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw), **meta})
    return path


def test_eval_compares_class_counts_and_names_before_the_first_image(tmp_path):
    names = list(data.SyntheticScenes().class_names)
    cases = [
        (_weights(tmp_path / "w10.safetensors", 10), "the model has 10 outputs but the synthetic dataset has 12 classes"),
        (_weights(tmp_path / "w1000.safetensors", 1000), "the model has 1000 outputs but the synthetic dataset has 12 classes"),
        (_weights(tmp_path / "w12.safetensors", 12, class_names=json.dumps(names[1:] + names[:1])),
         "class 0 is 'square' in the checkpoint but 'disc' in the dataset"),
    ]
    for w, message in cases:
        out = tmp_path / f"out-{w.stem}"
        with pytest.raises(ValueError, match=message):
            run_experiment(EvalConfig("pointing", out, ("center",), weights=str(w), images=2), progress=False)
        assert not out.exists()  # nothing read, nothing written
    # the same names in the same order (and --seeds top1 with another class count) run
    w = _weights(tmp_path / "ok.safetensors", 12, class_names=json.dumps(names))
    res = run_experiment(EvalConfig("pointing", tmp_path / "ok", ("center",), weights=str(w), images=1), progress=False)
    assert res["rows"][0]["images"] == 1
    res = run_experiment(EvalConfig("segmentation", tmp_path / "top1", ("center",), weights=str(cases[0][0]), images=1, seeds="top1"),
                         progress=False)
    assert res["rows"][0]["images"] == 1


# --------------------------------------------------------------------------------------
# 2. predict / explain use what the checkpoint records
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diamond(tmp_path_factory):
    """A held-out synthetic scene with one diamond (class 7), as an 8-bit PNG."""
    scenes = data.SyntheticScenes()
    r = next(r for r in (scenes.record("test", i) for i in range(50)) if list(r.labels) == [7])
    path = tmp_path_factory.mktemp("img") / "diamond.png"
    Image.fromarray(np.round(r.image * 255).astype(np.uint8)).save(path)
    return path


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]


def test_predict_and_explain_use_the_recorded_size_names_and_activation(diamond, tmp_path, capsys):
    w = checkpoints.bundled_weights("synthetic_vgg16.safetensors")
    model, variables, info = checkpoints.load(None, w)
    rec = preprocess.recorded(info)
    assert (rec.input_size, rec.whole_image, rec.output) == (128, True, "sigmoid") and rec.class_names[7] == "diamond"

    assert cli.main(["predict", "--weights", str(w), "--top", "3", str(diamond)]) == 0
    out = capsys.readouterr().out
    assert "128x128 px" in out and "sigmoid = P(class present)" in out
    header = next(line for line in out.splitlines() if line.split()[:1] == ["index"])
    assert header.split() == ["index", "sigmoid", "logit", "class"]
    top = _rows(out)[0]
    assert top[0] == "7" and top[3] == "diamond"
    # the printed numbers are the model's on the whole 128 px image (the file records 128 px)
    want = np.asarray(model.apply(variables, normalize(load_image(diamond, 128, 128)[None])))[0, 7]
    assert float(top[2]) == pytest.approx(float(want), abs=1e-3)
    assert float(top[1]) == pytest.approx(float(jax.nn.sigmoid(want)), abs=1e-4)
    assert want > 2.0  # confidently a diamond (at 224 px with the 256/224 crop it is not)

    # flags override the record
    assert cli.main(["predict", "--weights", str(w), "--activation", "softmax", "--size", "96", "--top", "1", str(diamond)]) == 0
    out = capsys.readouterr().out
    assert "96x96 px" in out and next(ln for ln in out.splitlines() if ln.split()[:1] == ["index"]).split()[1] == "softmax"

    assert cli.main(["explain", "--weights", str(w), "--method", "gradient", "--out", str(tmp_path / "ex"), str(diamond)]) == 0
    out = capsys.readouterr().out
    assert "diamond (class 7," in out and "sigmoid" in out
    assert np.load(tmp_path / "ex" / "diamond.gradient.npy").shape == (128, 128)


# --------------------------------------------------------------------------------------
# 3. image decoding by bit depth
# --------------------------------------------------------------------------------------


def test_16_bit_and_float_images_are_decoded_by_bit_depth(tmp_path):
    ramp = np.linspace(0.0, 1.0, 40 * 40).reshape(40, 40)
    p16 = tmp_path / "gray16.png"
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(p16)
    assert Image.open(p16).mode == "I;16"
    img = load_image(p16, 40, 40)  # no resize, no crop
    assert img.shape == (40, 40, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[..., 0], ramp, atol=1e-4)  # not all white
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    # the dataset loaders' decoder: the same values, quantised to 8 bits
    np.testing.assert_allclose(np.asarray(open_rgb(p16, "gray16"), np.float32)[..., 1] / 255.0, ramp, atol=0.5 / 255 + 1e-6)

    pf = tmp_path / "float.tif"
    Image.fromarray(ramp.astype(np.float32)).save(pf)
    np.testing.assert_allclose(load_image(pf, 40, 40)[..., 1], ramp, atol=1e-6)
    resized = load_image(pf, 20)  # the float path resizes and crops like the 8-bit one
    assert resized.shape == (20, 20, 3) and 0.0 <= resized.min() and resized.max() <= 1.0

    bad = tmp_path / "float255.tif"
    Image.fromarray((ramp * 255).astype(np.float32)).save(bad)
    with pytest.raises(ValueError, match=r"float image with values in \[0, 255\].*only when they hold intensities in \[0, 1\]"):
        load_image(bad, 40)
    with pytest.raises(CorruptImageError, match="float image"):
        open_rgb(bad, "float255")
    i32 = tmp_path / "int32.tif"
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(i32)
    with pytest.raises(ValueError, match="32-bit integer image"):
        load_image(i32, 40)
    # 8-bit images are unchanged
    p8 = tmp_path / "rgb.png"
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(p8)
    np.testing.assert_array_equal(load_image(p8, 40, 40), rgb.astype(np.float32) / 255.0)


def test_directory_and_bomb_errors(tmp_path, monkeypatch):
    with pytest.raises(IsADirectoryError, match="is a directory, not an image file"):
        load_image(tmp_path, 32)
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(p)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="refusing to decode .*big.png.*decompression bomb"):
        load_image(p, 32)
    with pytest.raises(CorruptImageError, match="DecompressionBombError"):
        open_rgb(p, "big.png")


# --------------------------------------------------------------------------------------
# 4. miou_positive only for signed maps
# --------------------------------------------------------------------------------------


def test_miou_positive_is_defined_for_signed_maps_only():
    regions = np.zeros((3, 8, 8), bool)
    regions[:, 2:5, 2:5] = True
    on = np.where(regions[0], 1.0, -1.0)  # signed, positive exactly on the region
    off = np.roll(on, 4, axis=1)  # signed, positive elsewhere
    nonneg = np.random.default_rng(0).random((8, 8)) + 0.1  # positive everywhere
    v = np.asarray(iou.positive_iou(np.stack([on, off, nonneg]), regions))
    assert v[0] == 1.0 and v[1] == 0.0 and np.isnan(v[2])  # discriminates; n/a without negative values
    # the metric: pairs without a value are left out; a method without signed maps is NaN (n/a)
    metric = metrics.get("miou")
    classes, dif = np.asarray([0, 1, 1]), np.zeros(3, bool)
    batch = metrics.PairBatch(maps=np.stack([on, off, nonneg]), regions=regions, classes=classes, dif=dif)
    row = metric.summarize(metric(batch), classes, dif, 2)
    assert row["miou_positive"] == pytest.approx(0.5)  # class 0: 1.0; class 1: 0.0 (the non-negative map left out)
    unsigned = metrics.PairBatch(maps=np.stack([nonneg] * 3), regions=regions, classes=classes, dif=dif)
    row = metric.summarize(metric(unsigned), classes, dif, 2)
    assert np.isnan(row["miou_positive"]) and 0.0 < row["miou_mean"] < 1.0
    # before: the positive part of a positive map is the whole image, its IoU the area fraction
    assert float(iou.iou(iou.binarize(nonneg[None], "positive"), regions[:1])[0]) == pytest.approx(9 / 64)
    assert "signed maps only" in iou.MIOU_LEGEND["miou_positive"] and "n/a" in iou.MIOU_LEGEND["miou_positive"]
