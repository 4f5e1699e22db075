"""``xaijax demo`` end to end on tiny random-weight classifiers (fast), plus its error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xaijax import checkpoints, cli, data, demo, methods, metrics, models

KW = {
    "synthetic_vgg16": ("vgg16", {"num_classes": 12, "width": 1 / 16, "hidden": 16, "pool_size": 1}),
    "synthetic_resnet18": ("resnet18", {"num_classes": 12, "width": 8}),
    "synthetic_vit": ("vit_b_16", {"num_classes": 12, "image_size": 128, "patch_size": 32, "num_layers": 1, "num_heads": 2,
                                   "hidden_dim": 8, "mlp_dim": 8}),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    for name, (arch, kw) in KW.items():
        m = models.get(arch, **kw)
        v = models.random_variables(m, (1, 128, 128, 3), seed=1)
        checkpoints.save_variables(d / f"{name}.safetensors", v, metadata={"arch": arch, "model_kwargs": json.dumps(kw)})
    return d


def test_pairs_follow_the_protocol():
    recs = data.SyntheticScenes().records("test", 0, 20)
    pairs = demo.build_pairs(recs)
    expected = [(i, int(c)) for i, r in enumerate(recs) for c in data.present_classes(r, include_difficult=False)]
    assert list(zip(pairs.image_index.tolist(), pairs.classes.tolist())) == expected
    for k, (i, c) in enumerate(expected):
        region = data.class_mask(recs[i], c, include_difficult=True)
        np.testing.assert_array_equal(pairs.regions[k], region)
        n_present = len(data.present_classes(recs[i], include_difficult=True))
        box_area = data.class_box_mask(recs[i], c, include_difficult=True).mean()
        assert pairs.dif[k] == (box_area < 0.25 and n_present > 1)


def test_demo_writes_tables_and_figure(weights, tmp_path):
    out = tmp_path / "demo"
    res = demo.run_demo(out, 3, method_names=["center", "gradient"], batch=4, weights=weights, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "results.csv", "results.json", "results.md"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert [(r["model"], r["method"]) for r in res["rows"]] == [
        (m, n) for m in ("synthetic_vgg16", "synthetic_resnet18", "synthetic_vit") for n in ("center", "gradient")
    ]
    assert res["models"] == [f.split(".")[0] for f in demo.BUNDLED_CLASSIFIERS] == list(KW)
    # the centre baseline's numbers, recomputed independently of the demo
    recs = data.SyntheticScenes().records("test", 0, 3)
    pairs = demo.build_pairs(recs)
    c = np.asarray(methods.get("center")(None, None, np.zeros((len(pairs.classes), 128, 128, 3), np.float32), 0))
    pg = metrics.PointingGame(12)
    pg.update(pairs.classes, metrics.pointing_hits(c, pairs.regions), pairs.dif)
    row = res["rows"][0]
    assert row["pointing_all"] == pytest.approx(pg.result()["all"])
    assert row["pointing_dif"] == pytest.approx(pg.result()["dif"])
    assert res["dataset"]["pairs"] == len(pairs.classes)
    # model-based metrics on the first pairs, recomputed directly for the centre baseline
    k = res["model_metric_pairs"]
    assert k == min(demo.DEFAULT_MODEL_METRIC_PAIRS, len(pairs.classes))
    model, v, _ = checkpoints.load(None, weights / "synthetic_vgg16.safetensors")
    from xaijax.models.preprocess import normalize

    x = np.asarray(normalize(np.stack([r.image for r in recs]), "torchvision"))[pairs.image_index[:k]]
    fn = metrics.classifier_fn(model, v)
    for name, col in (("deletion", "deletion_auc"), ("insertion", "insertion_auc"), ("region-insertion", "region_insertion_auc")):
        direct = metrics.get_model_metric(name)(fn, x, c[:k], pairs.classes[:k].astype(np.int32))["auc"]
        assert row[col] == pytest.approx(float(np.mean(direct)), rel=1e-5), col
    md = (out / "results.md").read_text()
    assert "| synthetic_resnet18 | gradient |" in md
    from PIL import Image

    w, h = Image.open(out / "figure.png").size
    assert w > 200 and h > 200


def test_interrupted_demo_leaves_no_result_files(weights, tmp_path, monkeypatch):
    out = tmp_path / "demo"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_figure", boom)  # after the tables: they must be whole
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, 2, method_names=["center"], weights=weights, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temp files left behind
    for n in names:
        if n.endswith(".json"):
            json.loads((out / n).read_text())  # complete, parseable
    monkeypatch.setattr(demo, "_write_tables", boom)
    out2 = tmp_path / "demo2"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out2, 2, method_names=["center"], weights=weights, progress=False)
    assert list(out2.iterdir()) == []


def test_demo_cli_errors(weights, tmp_path, capsys, monkeypatch):
    def err(argv):
        code = cli.main(argv)
        e = capsys.readouterr().err.strip()
        assert code == 2 and e.startswith("xaijax: error:") and "\n" not in e, e
        return e

    monkeypatch.setenv("XAIJAX_WEIGHTS", str(weights))
    assert "--images must be at least 1" in err(["demo", "--images", "0", "--out", str(tmp_path / "a")])
    assert "unknown method 'gradiant'" in err(["demo", "--methods", "gradiant", "--out", str(tmp_path / "b")])
    monkeypatch.setenv("XAIJAX_WEIGHTS", str(tmp_path / "nowhere"))
    assert "bundled weights file missing" in err(["demo", "--out", str(tmp_path / "c")])
    assert "unknown bundled model 'vgg'" in err(["demo", "--models", "vgg", "--out", str(tmp_path / "d")])
    assert "--batch must be at least 1" in err(["demo", "--batch", "0", "--out", str(tmp_path / "e")])
    assert "--model-metric-pairs must be >= 0; got -1" in err(["demo", "--model-metric-pairs", "-1", "--out", str(tmp_path / "f")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:  # argparse: usage + one error line, exit 2
        cli.main(["demo", "--out", str(blocker / "sub")])
    assert e.value.code == 2 and "cannot create output directory" in capsys.readouterr().err


def test_demo_model_subset_and_hparams(weights, tmp_path):
    res = demo.run_demo(
        tmp_path / "q", 2, method_names=["integrated-gradients"], batch=2, weights=weights, progress=False,
        models=["synthetic_resnet18"], hparams={"integrated-gradients": {"steps": 3}},
    )
    assert [(r["model"], r["method"], r["hparams"]) for r in res["rows"]] == [("synthetic_resnet18", "integrated-gradients", "steps=3")]
    assert res["models"] == ["synthetic_resnet18"]


def test_demo_skips_methods_of_other_kinds(weights, tmp_path, monkeypatch):
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class PairwiseThing:
        kind: ClassVar[str] = "similarity"

    monkeypatch.setitem(methods.registry._REGISTRY, "pairwise-thing", (PairwiseThing, "test only"))
    assert methods.kind("pairwise-thing") == "similarity" and methods.kind("gradient") == "attribution"
    res = demo.run_demo(tmp_path / "k", 1, method_names=["center", "pairwise-thing"], weights=weights, progress=False,
                        models=["synthetic_vgg16"])
    assert [r["method"] for r in res["rows"]] == ["center"]
    assert "pairwise-thing" in res["skipped_methods"]
    assert "`pairwise-thing`: kind 'similarity'" in (tmp_path / "k" / "results.md").read_text()


def test_demo_records_methods_undefined_for_a_model(weights, tmp_path):
    # CAM needs a global-average-pool + linear head: defined for ResNet, not for VGG's FC head
    res = demo.run_demo(tmp_path / "cam", 1, method_names=["cam"], weights=weights, progress=False)
    by_model = {r["model"]: r for r in res["rows"]}
    assert "not defined for this model" in by_model["synthetic_vgg16"]["error"] and "CAM" in by_model["synthetic_vgg16"]["error"]
    assert "error" not in by_model["synthetic_resnet18"] and "pointing_all" in by_model["synthetic_resnet18"]


def test_demo_refuses_a_model_made_for_another_size(weights, tmp_path):
    import shutil

    d = tmp_path / "w"
    shutil.copytree(weights, d)
    arch, kw = KW["synthetic_vit"]
    kw = {**kw, "image_size": 64}
    m = models.get(arch, **kw)
    checkpoints.save_variables(d / "synthetic_vit.safetensors", models.random_variables(m, (1, 64, 64, 3), seed=1),
                               metadata={"arch": arch, "model_kwargs": json.dumps(kw)})
    with pytest.raises(ValueError, match="synthetic_vit.safetensors: the model takes 64x64 px inputs.*128x128"):
        demo.run_demo(tmp_path / "o", 1, method_names=["center"], weights=d, progress=False)
    assert not (tmp_path / "o" / "results.json").exists()
