"""Every evaluation experiment end to end on the real-format fixtures (VOC, COCO, ImageNet-seg,
ImageNet validation folders), with tiny random-weight models: the commands of the README's
reproduction section, at fixture scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_loaders import coco_files, seg_mat, voc_root  # noqa: F401  (fixtures in the real formats)
from xaijax import checkpoints, cli, models

pytest.importorskip("pycocotools")
pytest.importorskip("h5py")


def _weights(path: Path, classes: int) -> Path:
    kw = {"num_classes": classes, "width": 8}
    m = models.get("resnet18", **kw)
    v = models.random_variables(m, (1, 64, 64, 3), seed=0)
    checkpoints.save_variables(path, v, metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    return {k: _weights(d / f"w{k}.safetensors", k) for k in (20, 3, 1000, 2)}


def _run(argv: list[str], out: Path) -> dict:
    assert cli.main([*argv, "--size", "64", "--batch", "2", "--no-progress", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_pointing_on_a_vocdevkit_counts_the_corrupt_image(voc_root, weights, tmp_path):
    res = _run(["eval", "pointing", "--dataset", "voc07", "--data-dir", voc_root, "--weights", str(weights[20]),
                "--methods", "grad-cam,center"], tmp_path / "voc")
    for row in res["rows"]:
        # 000001: dog (its person is only "difficult": skipped); 000002: car, tvmonitor; 000003: corrupt
        assert row["images"] == 2 and row["skipped_images"] == 1 and row["pairs"] == 3
        assert 0.0 <= row["pointing_all"] <= 1.0
    # maps are scored at each image's native resolution: the centre baseline points at the
    # middle of the 60x40 and 50x30 originals, inside the dog's and the car's boxes
    lines = (tmp_path / "voc" / "pointing-center.jsonl").read_text().splitlines()[1:]
    rows = [json.loads(x) for x in lines]
    assert [r["image_id"] for r in rows] == ["000001", "000002", "000003"] and "skipped" in rows[2]
    hits = {r["image_id"]: [p["hit"] for p in r.get("pairs", [])] for r in rows}
    assert hits["000001"] == [True] and hits["000002"][0] is True


def test_resume_retries_images_that_could_not_be_read(voc_root, weights, tmp_path):
    import shutil

    from test_loaders import _VOC_OBJECTS

    root = tmp_path / "data"
    shutil.copytree(voc_root, root)
    argv = ["eval", "pointing", "--dataset", "voc07", "--data-dir", str(root), "--weights", str(weights[20]),
            "--methods", "center"]
    first = _run(argv, tmp_path / "out")["rows"][0]
    assert first["images"] == 2 and first["skipped_images"] == 1
    # the truncated 000003.jpg is replaced by a readable one; resuming evaluates it, and only it
    w, h, _ = _VOC_OBJECTS["000003"]
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000003.jpg")
    second = _run(argv, tmp_path / "out")["rows"][0]
    assert second["images"] == 3 and second["skipped_images"] == 0 and second["pairs"] > first["pairs"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "pointing-center.jsonl").read_text().splitlines()[1:]]
    assert [r["image_id"] for r in lines] == ["000001", "000002", "000003", "000003"]  # appended, never rewritten
    assert "skipped" in lines[2] and "skipped" not in lines[3]
    # a third run has nothing left to do and reads the evaluated row, not the skipped one
    third = _run(argv, tmp_path / "out")["rows"][0]
    assert third == second


def test_pointing_on_coco(coco_files, weights, tmp_path):
    ann, img_dir = coco_files
    root = Path(ann).parent.parent
    assert Path(img_dir) == root / "val2014"
    # the fixture's annotation file has 3 categories: a 3-class model (eval refuses another class count)
    res = _run(["eval", "pointing", "--dataset", "coco14", "--data-dir", str(root), "--weights", str(weights[3]),
                "--methods", "gradient"], tmp_path / "coco")
    row = res["rows"][0]
    assert row["skipped_images"] >= 1 and row["images"] >= 1 and "miou_mean" in row


def test_segmentation_on_imagenet_seg_uses_top1_targets(seg_mat, weights, tmp_path):
    res = _run(["eval", "segmentation", "--dataset", "imagenet-seg", "--data-dir", seg_mat, "--weights", str(weights[1000]),
                "--methods", "center"], tmp_path / "seg")
    assert res["seeds"] == "top1"
    row = res["rows"][0]
    assert row["pairs"] == row["images"] >= 1 and 0.0 <= row["fgbg_miou"] <= 1.0


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory):
    base = tmp_path_factory.mktemp("inval")
    boxes = base / "boxes"
    boxes.mkdir()
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (base / "val" / wnid).mkdir(parents=True)
        stem = f"ILSVRC2012_val_0000000{k + 1}"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(base / "val" / wnid / f"{stem}.JPEG")
        (boxes / f"{stem}.xml").write_text(
            f"<annotation><size><width>50</width><height>40</height></size><object><name>{wnid}</name>"
            "<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object></annotation>"
        )
    return base


def test_imagenet_val_loader_boxes(imagenet_val):
    from xaijax.data.imagenet_val import open_imagenet_val

    ds = open_imagenet_val(imagenet_val / "val", boxes_dir=imagenet_val / "boxes")
    assert len(ds) == 2 and ds.class_names == ("n01440764", "n01443537")
    r = ds[1]
    assert r.labels.tolist() == [1] and r.boxes.tolist() == [[10.0, 5.0, 30.0, 25.0]]
    assert r.masks.sum() == 20 * 20 and r.masks[0, 5, 10] and not r.masks[0, 4, 10]
    plain = open_imagenet_val(imagenet_val / "val", size=16)[0]
    assert plain.boxes.tolist() == [[0.0, 0.0, 16.0, 16.0]] and plain.masks.all()
    from xaijax.data._base import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="no class sub-folders"):
        open_imagenet_val(imagenet_val / "boxes")


def test_insdel_region_insertion_density_sanity_on_imagenet_val(imagenet_val, weights, tmp_path):
    base = ["--dataset", "imagenet-val", "--data-dir", str(imagenet_val / "val"), "--weights", str(weights[2])]
    res = _run(["eval", "insdel", *base, "--methods", "grad-cam", "--seeds", "top1"], tmp_path / "insdel")
    assert 0.0 <= res["rows"][0]["deletion_auc"] <= 1.0 and 0.0 <= res["rows"][0]["insertion_auc"] <= 1.0
    assert (tmp_path / "insdel" / "curves.png").is_file()
    res = _run(["eval", "region-insertion", *base, "--methods", "gradient"], tmp_path / "ri")
    assert 0.0 <= res["rows"][0]["region_insertion_auc"] <= 19.0
    res = _run(["eval", "density", *base, "--boxes-dir", str(imagenet_val / "boxes"), "--methods", "gradient"], tmp_path / "dens")
    assert res["rows"][0]["pairs"] == 2 and res["rows"][0]["density_pos"] > 0.0
    res = _run(["eval", "sanity", *base, "--methods", "gradient", "--images", "1"], tmp_path / "san")
    assert (tmp_path / "san" / "sanity.png").is_file() and res["rows"][0]["images"] == 1


def test_localisation_on_imagenet_val_needs_boxes(imagenet_val, weights, tmp_path, capsys):
    code = cli.main(["eval", "density", "--dataset", "imagenet-val", "--data-dir", str(imagenet_val / "val"),
                     "--weights", str(weights[2]), "--methods", "gradient", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs --boxes-dir" in err and "\n" not in err


def test_missing_dataset_layout_is_one_clear_error(tmp_path, weights, capsys):
    code = cli.main(["eval", "pointing", "--dataset", "voc07", "--data-dir", str(tmp_path), "--weights", str(weights[20]),
                     "--methods", "gradient", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("xaijax: error:") and "\n" not in err and "VOC" in err
