"""End to end: torch saves a full-size ResNet-50 / VGG-16, ``xaijax port`` converts it,
``xaijax predict`` prints the same top-5 as torch; bad input gets one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from xaijax import cli
from xaijax.models.preprocess import load_image, normalize

torch = pytest.importorskip("torch")
from torch_ref_vgg_resnet import TorchBottleneck, TorchResNet, TorchVGG, randomize_  # noqa: E402

from xaijax.models.vgg import CFGS  # noqa: E402

SIZE = 64  # full architectures, small images: keeps the test fast on 2 CPU cores


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        arr = (rng.random((SIZE + 10, SIZE + 20, 3)) * 255).astype(np.uint8)
        p = d / f"im{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _torch_top5(model, paths) -> list[list[int]]:
    x = np.stack([np.asarray(normalize(load_image(p, SIZE)[None]))[0] for p in paths])
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return [list(np.argsort(-row)[:5]) for row in logits]


def _parse_predict(out: str) -> list[list[int]]:
    tops, cur = [], None
    for line in out.splitlines():
        if line.startswith("#") or line.split()[:1] == ["index"]:  # the settings line, the column header
            continue
        if not line.startswith("  "):
            cur = []
            tops.append(cur)
        else:
            cur.append(int(line.split()[0]))
    return tops


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
def test_port_and_predict_match_torch_top5(arch, images, tmp_path, capsys):
    if arch == "resnet50":
        tm = TorchResNet(TorchBottleneck, [3, 4, 6, 3])
    else:
        tm = TorchVGG(CFGS["D"])
    randomize_(tm, seed=3)
    src = tmp_path / f"{arch}.pth"
    torch.save(tm.state_dict(), src)
    expected = _torch_top5(tm, images)
    del tm

    dst = tmp_path / f"{arch}.safetensors"
    assert cli.main(["port", "--arch", arch, str(src), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    # native file: no --arch needed, it is recorded in the metadata
    assert cli.main(["predict", "--weights", str(dst), "--size", str(SIZE), *map(str, images)]) == 0
    assert _parse_predict(capsys.readouterr().out) == expected
    # the torch file directly
    assert cli.main(["predict", "--arch", arch, "--weights", str(src), "--size", str(SIZE), str(images[0])]) == 0
    assert _parse_predict(capsys.readouterr().out) == expected[:1]


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, images, capsys):
    tm = randomize_(TorchResNet(TorchBottleneck, [1, 1, 1, 1], num_classes=7, width=8))
    src = tmp_path / "tiny.pth"
    torch.save(tm.state_dict(), src)

    def err(argv):
        assert cli.main(argv) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("xaijax: error:") and "Traceback" not in e
        return e

    # wrong architecture for the checkpoint
    out = tmp_path / "x.safetensors"
    e = err(["port", "--arch", "vgg16", str(src), str(out)])
    assert "looks like a resnet checkpoint" in e and not out.exists()
    # right family, wrong depth: keys listed by name
    e = err(["port", "--arch", "resnet18", str(src), str(out)])
    assert re.search(r"missing keys \(\d+\): .*layer1\.0\.conv1\.weight", e) or "mis-shaped" in e
    assert not out.exists()
    # corrupt checkpoint
    bad = tmp_path / "bad.pth"
    bad.write_bytes(src.read_bytes()[:200])
    err(["port", "--arch", "resnet50", str(bad), str(out)])
    assert not out.exists()
    # wrong output extension, missing weights, non-image input
    assert "must end in" in err(["port", "--arch", "resnet50", str(src), str(tmp_path / "x.npz")])
    assert "not found" in err(["predict", "--arch", "resnet50", "--weights", str(tmp_path / "nope.pth"), str(images[0])])
    # a native file built from a tiny configuration, then a non-image input
    import json

    from xaijax import checkpoints, models

    kw = {"num_classes": 7, "width": 8, "layers": [1, 1, 1, 1]}
    model = models.get("resnet50", **kw)
    variables = models.random_variables(model, (1, 32, 32, 3))
    ok = tmp_path / "ok.safetensors"
    checkpoints.save_variables(ok, variables, metadata={"arch": "resnet50", "model_kwargs": json.dumps(kw)})
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert "cannot read" in err(["predict", "--weights", str(ok), "--size", "32", str(txt)])
    assert "holds weights for 'resnet50', not 'vgg16'" in err(["predict", "--arch", "vgg16", "--weights", str(ok), str(txt)])
    assert cli.main(["predict", "--weights", str(ok), "--size", "32", str(images[0])]) == 0
    assert "class " in capsys.readouterr().out  # 7 classes: generic class names


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "xaijax.cli", "models"], capture_output=True, text=True, check=True)
    assert re.search(r"^vgg16\s+vgg\s+features\.29", r.stdout, re.M)
    assert re.search(r"^resnet50\s+resnet\s+layer4", r.stdout, re.M)


def test_explain_cli_writes_maps_and_overlays(tmp_path, images, capsys):
    import json

    from xaijax import checkpoints, models

    kw = {"num_classes": 4, "width": 8, "layers": [1, 1, 1, 1]}
    model = models.get("resnet18", **kw)
    w = tmp_path / "r.safetensors"
    checkpoints.save_variables(w, models.random_variables(model, (1, 32, 32, 3)), metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    out = tmp_path / "out"
    argv = ["explain", "--weights", str(w), "--size", str(SIZE), "--method", "gradient", "--param", 'reduce="sum"',
            "--target", "2", "--out", str(out), str(images[0])]
    assert cli.main(argv) == 0
    m = np.load(out / "im0.gradient.npy")
    assert m.shape == (SIZE, SIZE) and (out / "im0.gradient.png").is_file()
    # the saved map is the method's output for the same preprocessed image and target
    from xaijax import methods

    x = normalize(load_image(images[0], SIZE)[None])
    want = np.asarray(methods.get("gradient", reduce="sum")(model, checkpoints.load(None, w)[1], x, np.array([2])))[0]
    np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-7)
    assert "class 2" in capsys.readouterr().out
    assert cli.main(argv[:-1] + ["--target", "9", str(images[0])]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["explain", "--weights", str(w), "--method", "gradient", "--param", "nonsense", str(images[0])]) == 2
    assert "key=value" in capsys.readouterr().err
    # extremal perturbation runs its own loop of jitted steps (not jitted whole) and shows its bar
    ep = ["--param", "max_iter=3", "--param", "step=4", "--param", "sigma=5.0", "--param", "max_blur=4.0"]
    assert cli.main(["explain", "--weights", str(w), "--size", str(SIZE), "--method", "extremal-perturbation", *ep,
                     "--target", "1", "--out", str(out), str(images[0])]) == 0
    assert "extremal perturbation" in capsys.readouterr().err
    got = np.load(out / "im0.extremal-perturbation.npy")
    hp = {"max_iter": 3, "step": 4, "sigma": 5.0, "max_blur": 4.0}
    want = np.asarray(methods.get("extremal-perturbation", **hp)(model, checkpoints.load(None, w)[1], x, np.array([1])))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
