"""Bad input at every public entry (issue 19): every ``xaijax`` subcommand and every registered
method, each with the inputs a user gets wrong. Each must fail with one line that names the
argument and what was expected (never a traceback from inside JAX, Flax or PIL), and a command
that fails must leave nothing behind (no output file, no empty output folder).

Everything runs in-process (``xaijax.cli.main``) on tiny random-weight models; the bundled
synthetic weights are used where a subcommand needs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from xaijax import checkpoints, cli, methods, models

NUM_CLASSES = 3
SIZE = 32


# --------------------------------------------------------------------------------------
# shared fixtures: tiny classifiers and image files, written once per module
# --------------------------------------------------------------------------------------


def _save_classifier(path: Path, num_classes: int, **meta: str) -> Path:
    kw = {"num_classes": num_classes, "width": 8, "layers": [1, 1, 1, 1]}
    model = models.get("resnet18", **kw)
    variables = models.random_variables(model, (1, SIZE, SIZE, 3), seed=0)
    checkpoints.save_variables(path, variables, metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw), **meta})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weights and images outside the folder whose contents the tests watch."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    out = {
        "w3": _save_classifier(d / "w3.safetensors", NUM_CLASSES),
        "w10": _save_classifier(d / "w10.safetensors", 10),
        "w1000": _save_classifier(d / "w1000.safetensors", 1000),
        "png": d / "rgb.png",
        "int32_tif": d / "int32.tif",
        "float_tif": d / "float_out_of_range.tif",
        "folder": d / "a_folder",
        "text": d / "notes.txt",
    }
    Image.fromarray(rng.integers(0, 256, (SIZE + 4, SIZE + 8, 3), dtype=np.uint8)).save(out["png"])
    Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 100_000).astype(np.int32)).save(out["int32_tif"])
    Image.fromarray(np.linspace(0, 255, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)).save(out["float_tif"])
    out["folder"].mkdir()
    out["text"].write_text("not an image")
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The folder every command writes into (and the working directory, for relative defaults)."""
    w = tmp_path / "work"
    w.mkdir()
    monkeypatch.chdir(w)
    monkeypatch.setenv("XAIJAX_JAX_CACHE", "0")  # no compilation-cache folder
    return w


def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and the error text of ``xaijax ARGV`` (argparse prints its usage, then one error
    line, which is what is returned)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: "usage: ..." and one "xaijax CMD: error: argument ..." line
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith("usage:") and sum("error:" in ln for ln in lines) == 1, lines
        return int(e.code), lines[-1]
    return code, capsys.readouterr().err.strip()


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, (code, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("xaijax") and "error:" in err, err
    assert expected in err, f"{expected!r} not in {err!r}"


# --------------------------------------------------------------------------------------
# every subcommand
# --------------------------------------------------------------------------------------

W = "{w3}"
CASES: dict[str, list[tuple[str, list[str], str]]] = {
    # subcommand: [(case id, argv (with {placeholders} for files and {work}), expected text naming the argument)]
    "models": [("extra argument", ["models", "--bogus"], "unrecognized arguments: --bogus")],
    "methods": [("extra argument", ["methods", "gradient"], "unrecognized arguments: gradient")],
    "metrics": [("extra argument", ["metrics", "pixel-flipping"], "unrecognized arguments: pixel-flipping")],
    "port": [
        ("missing input", ["port", "--arch", "resnet18", "{work}/nope.pth", "{work}/o.safetensors"], "nope.pth"),
        ("unknown arch", ["port", "--arch", "resnet19", "{work}/nope.pth", "{work}/o.safetensors"], "unknown architecture 'resnet19'"),
        ("bad output suffix", ["port", "--arch", "resnet18", "{text}", "{work}/o.npz"], "output must end in"),
    ],
    "predict": [
        ("directory as image", ["predict", "--weights", W, "{folder}"], "is a directory, not an image file"),
        ("missing image", ["predict", "--weights", W, "{work}/nope.png"], "image not found"),
        ("not an image", ["predict", "--weights", W, "{text}"], "cannot read"),
        ("32-bit integer image", ["predict", "--weights", W, "{int32_tif}"], "32-bit integer image"),
        ("float image out of [0, 1]", ["predict", "--weights", W, "{float_tif}"], "32-bit float image with values in [0, 255]"),
        ("missing weights", ["predict", "--weights", "{work}/nope.safetensors", "{png}"], "weights file not found"),
        ("--top 0", ["predict", "--weights", W, "--top", "0", "{png}"], "--top must be at least 1"),
        ("--size 0", ["predict", "--weights", W, "--size", "0", "{png}"], "--size must be a positive number"),
        ("--activation", ["predict", "--weights", W, "--activation", "relu", "{png}"], "argument --activation: invalid choice"),
    ],
    "explain": [
        ("bilrp", ["explain", "--weights", W, "--method", "bilrp", "--out", "{work}/ex", "{png}"],
         "--method bilrp: explains the similarity of a pair of images"),
        ("d-rise", ["explain", "--weights", W, "--method", "d-rise", "--out", "{work}/ex", "{png}"],
         "--method d-rise: explains a detection of an object detector"),
        ("unknown method", ["explain", "--weights", W, "--method", "gradiant", "--out", "{work}/ex", "{png}"], "unknown method 'gradiant'"),
        ("--target out of range", ["explain", "--weights", W, "--method", "gradient", "--target", "7", "--out", "{work}/ex", "{png}"],
         "--target 7 is out of range for a model with 3 classes"),
        ("directory as image", ["explain", "--weights", W, "--method", "gradient", "--out", "{work}/ex", "{png}", "{folder}"],
         "is a directory"),
        ("--out is a file", ["explain", "--weights", W, "--method", "gradient", "--out", "{text}/sub", "{png}"],
         "argument --out: cannot create output directory"),
    ],
    "demo": [
        ("--methods bilrp", ["demo", "--methods", "bilrp", "--out", "{work}/demo"], "--methods bilrp: explains the similarity"),
        ("--methods with d-rise", ["demo", "--methods", "gradient,d-rise", "--out", "{work}/demo"], "--methods d-rise: explains a detection"),
        ("--images 0", ["demo", "--images", "0", "--out", "{work}/demo"], "--images must be at least 1"),
    ],
    "eval": [
        ("--devices 8", ["eval", "pointing", "--weights", "{w10}", "--methods", "center", "--devices", "8", "--out", "{work}/ev"],
         "--devices must be between 1 and"),
        ("10-class model on the 12-class benchmark", ["eval", "pointing", "--weights", "{w10}", "--methods", "center", "--out", "{work}/ev"],
         "--weights: the model has 10 outputs but the synthetic dataset has 12 classes"),
        ("1000-class model on the synthetic set", ["eval", "pointing", "--weights", "{w1000}", "--methods", "center", "--out", "{work}/ev"],
         "--weights: the model has 1000 outputs but the synthetic dataset has 12 classes"),
        ("--methods bilrp", ["eval", "pointing", "--methods", "bilrp", "--out", "{work}/ev"], "method 'bilrp' is of kind 'similarity'"),
        ("--batch 0", ["eval", "pointing", "--methods", "center", "--batch", "0", "--out", "{work}/ev"], "--batch must be at least 1"),
    ],
    "eval-merge": [("missing shard folder", ["eval-merge", "{work}/shard0", "--out", "{work}/merged"], "shard0 is not a folder")],
    "visualize": [
        ("--steps 0", ["visualize", "--weights", W, "--layer", "layer4", "--steps", "0", "--out", "{work}/vis"], "--steps must be >= 1"),
    ],
    "dissect": [("--images 0", ["dissect", "--weights", W, "--images", "0", "--out", "{work}/dis"], "--images must be >= 1")],
    "explain-text": [
        ("missing weights", ["explain-text", "--weights", "{work}/none.safetensors", "--vocab", "{work}/v.txt", "--premise", "a b ."],
         "weights file not found"),
    ],
    "debias-study": [
        ("an image method", ["debias-study", "{work}/debias", "--method", "rise"], "method must be one of gradient"),
        ("weights folder without the study's files", ["debias-study", "{work}/debias", "--weights", "{work}"], "bundled weights file missing"),
    ],
    "bench": [("--peers without the peer environment", ["bench", "--peers"], "the peer benchmark needs")],
    "example": [("--out is a file", ["example", "--out", "{text}/sub"], "argument --out: cannot create output directory")],
}

#: Known gaps in files outside this change (strict: the test says when they are fixed).
XFAIL: dict[tuple[str, str], str] = {}  # (subcommand, case) -> reason, for a known defect
CASES["visualize"].append(
    ("missing weights", ["visualize", "--weights", "{work}/nope.safetensors", "--layer", "layer4", "--out", "{work}/vis"], "weights file not found")
)
CASES["dissect"].append(("missing weights", ["dissect", "--weights", "{work}/nope.safetensors", "--out", "{work}/dis"], "weights file not found"))


def test_every_subcommand_has_bad_input_cases():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(CASES), "a subcommand without bad-input cases (add them to CASES)"


def _params():
    for cmd, cases in CASES.items():
        for case_id, argv, expected in cases:
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[(cmd, case_id)])] if (cmd, case_id) in XFAIL else []
            yield pytest.param(argv, expected, id=f"{cmd}: {case_id}", marks=marks)


@pytest.mark.parametrize("argv,expected", list(_params()))
def test_subcommand_bad_input_is_one_line_and_writes_nothing(argv, expected, files, work, capsys):
    names = {k: str(v) for k, v in files.items()} | {"work": str(work)}
    if argv[0] == "bench":
        import importlib.util

        if not (Path(cli.__file__).resolve().parent.parent / "experiments").is_dir():
            pytest.skip("xaijax bench needs a source checkout")
        if all(importlib.util.find_spec(m) is not None for m in cli.PEER_MODULES):
            pytest.skip("the peer environment is installed: bench --peers would run the benchmark")
    before = _snapshot(work)
    code, err = _run([a.format(**names) for a in argv], capsys)
    _assert_one_line_error(code, err, expected)
    assert _snapshot(work) == before, "a failed command left files or folders behind"


def test_decompression_bomb_is_a_one_line_error(files, work, capsys, monkeypatch):
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # the 36x40 test image is now a "bomb" (> 2x the limit)
    code, err = _run(["predict", "--weights", files["w3"], files["png"]], capsys)
    _assert_one_line_error(code, err, "could be decompression bomb")
    assert str(files["png"]) in err and "MAX_IMAGE_PIXELS" in err
    code, err = _run(["explain", "--weights", files["w3"], "--method", "gradient", "--out", work / "ex", files["png"]], capsys)
    _assert_one_line_error(code, err, "decompression bomb")
    assert _snapshot(work) == []


def test_port_names_the_architecture_of_the_checkpoint(work, capsys):
    torch = pytest.importorskip("torch")

    def save(arch: str) -> Path:
        m = models.get(arch, num_classes=1000, width=8)
        sd = checkpoints.to_torch_state_dict(m, models.random_variables(m, (1, SIZE, SIZE, 3)))
        p = work.parent / f"{arch}.pth"
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, p)
        return p

    r18, r34 = save("resnet18"), save("resnet34")
    before = _snapshot(work)
    # right family, wrong depth: the message lists the keys, then names the architecture; no
    # "num_classes=1000" hint, since the model has 1000 classes already
    code, err = _run(["port", "--arch", "resnet50", r18, work / "o.safetensors"], capsys)
    assert code == 2 and err.startswith("xaijax: error:") and str(r18) in err.splitlines()[0]
    assert "hint: the checkpoint has BasicBlock stages of (2, 2, 2, 2) blocks, as resnet18 has: use --arch resnet18" in err
    assert "num_classes=1000" not in err
    code, err = _run(["port", "--arch", "resnet18", r34, work / "o.safetensors"], capsys)
    assert code == 2 and "as resnet34 has: use --arch resnet34" in err
    # another family: one line, with the architecture
    code, err = _run(["port", "--arch", "vgg16", r34, work / "o.safetensors"], capsys)
    _assert_one_line_error(code, err, "looks like a resnet checkpoint, but --arch vgg16 is a vgg model")
    assert "use --arch resnet34" in err
    assert _snapshot(work) == before


# --------------------------------------------------------------------------------------
# every registered method
# --------------------------------------------------------------------------------------

#: Cheap settings: the errors come before any work, but a method is still built first.
CHEAP = {"rise": {"n": 8}, "d-rise": {"n": 8}, "smoothgrad": {"n": 2}, "integrated-gradients": {"steps": 2},
         "ucag-grad-cam": {"n": 2}, "extremal-perturbation": {"max_iter": 2}}
#: The registered names, plus one name per combinator prefix.
METHOD_NAMES = methods.names() + ["contrast:gradient", "smooth:gradient", "ucag:gradient"]


@pytest.fixture(scope="module")
def tiny():
    model = models.get("resnet18", num_classes=NUM_CLASSES, width=8, layers=(1, 1, 1, 1))
    variables = models.random_variables(model, (1, SIZE, SIZE, 3), seed=0)
    x = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
    return model, variables, x


def _fake_detector(x):
    m = x.shape[0]
    return {"boxes": jnp.zeros((m, 4, 4)), "class_probs": jnp.full((m, 4, NUM_CLASSES), 1.0 / NUM_CLASSES),
            "objectness": jnp.zeros((m, 4))}


def _call(method, tiny, x, target):
    model, variables, _ = tiny
    if method.kind == "similarity":
        return method(model, variables, x, x)
    if method.kind == "detection":
        return method(_fake_detector, x, {"box": jnp.asarray([0.0, 0.0, 4.0, 4.0]), "label": target})
    return method(model, variables, x, target)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_refuses_bad_inputs_with_a_message_naming_the_argument(name, tiny):
    method = methods.get(name, **CHEAP.get(name, {}))
    _, _, x = tiny
    good = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"^x is an empty batch \(N = 0\)"):
        _call(method, tiny, x[:0], good[:0])
    with pytest.raises(ValueError, match=r"^x looks like an NCHW batch .*transpose to NHWC"):
        _call(method, tiny, jnp.transpose(x, (0, 3, 1, 2)), good)
    with pytest.raises(ValueError, match=r"^x must be an NHWC batch"):
        _call(method, tiny, x[0], good)
    if method.kind != "similarity":  # (BiLRP has no target)
        with pytest.raises(ValueError, match=r"(target|label).*\b7\b.*out of range|out of range.*\b7\b"):
            _call(method, tiny, x, jnp.asarray([0, 7]))
