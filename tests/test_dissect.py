"""Neuron-concept dissection: streaming quantiles, IoU accumulation, planted units, beam
search, synthetic concept masks, the Broden reader and the ``dissect`` command."""

from __future__ import annotations

import argparse
import csv
import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from xaijax import imageops
from xaijax.data import SyntheticScenes
from xaijax.data.broden import BrodenDataset, decode_label_png
from xaijax.data.concepts import (
    SyntheticConcepts,
    color_name,
    concept_labels,
    concept_masks,
    labels_to_masks,
    synthetic_concepts,
)
from xaijax.data.synthetic import CLASS_STYLES
from xaijax.features import dissect as D

# ----------------------------------------------------------------------------- streaming quantile


def test_streaming_quantile_matches_numpy_within_bound():
    rng = np.random.default_rng(0)
    U = 5
    batches = []
    for b in range(12):  # the range grows upwards and downwards over the stream
        scale = 1.0 + 3 * b
        x = np.stack(
            [
                np.maximum(rng.normal(0, scale, 700), 0.0),  # ReLU: many exact zeros
                rng.lognormal(0, 1 + 0.1 * b, 700),  # heavy tail
                rng.normal(-2 * b, 1, 700),  # minimum moves down
                rng.uniform(-scale, scale, 700),
                np.full(700, 1.5),  # constant unit
            ],
            1,
        ).astype(np.float32)
        batches.append(x)
    sq = D.StreamingQuantile(U, bins=256)
    for x in batches:
        sq.update(x)
    allx = np.concatenate(batches).astype(np.float64)
    bound = sq.error_bound()
    span = allx.max(0) - allx.min(0)
    assert np.all(bound[:4] <= 2 * span[:4] / (256 - 2))  # the documented bound on w
    for q in (0.0, 0.005, 0.5, 0.9, 0.995, 1.0):
        est = sq.quantile(q)
        ref = np.quantile(allx, q, axis=0)
        assert np.all(np.abs(est - ref) <= bound + 1e-12), (q, est - ref, bound)
    assert sq.quantile(0.995)[4] == 1.5  # constant unit: exact
    # more bins -> tighter: the error shrinks with the bin width
    fine = D.StreamingQuantile(U, bins=4096)
    for x in batches:
        fine.update(x)
    assert np.all(fine.error_bound()[:4] < bound[:4] / 8)
    assert np.all(np.abs(fine.quantile(0.995) - np.quantile(allx, 0.995, axis=0)) <= fine.error_bound() + 1e-12)


def test_streaming_quantile_bad_input():
    sq = D.StreamingQuantile(2, bins=64)
    with pytest.raises(ValueError, match="no values"):
        sq.quantile(0.5)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        sq.update(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        sq.update(np.array([[np.nan, 0.0]]))


def test_upsampling_matrix_matches_pil_upsampling():
    # dissect upsamples with imageops.resize_matrix (torch bilinear) == PIL BILINEAR when enlarging
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    up = imageops.resize_matrix(5, 16).astype(np.float32) @ a @ imageops.resize_matrix(7, 20).astype(np.float32).T
    ref = np.asarray(Image.fromarray(a, mode="F").resize((20, 16), Image.BILINEAR))
    np.testing.assert_allclose(up, ref, atol=1e-5)
    np.testing.assert_array_equal(imageops.resize_matrix(6, 6), np.eye(6))


# ----------------------------------------------------------------------------- planted units

NAMES = ("red", "blue", "classA", "classB", "stripes", "dots")
CATS = ("color", "color", "object", "object", "texture", "texture")


class PlantedConcepts:
    """Random rectangles of 6 concepts in 3 independent layers; the image shows 3 of them.

    Image channels: 0 = red mask, 1 = classA mask, 2 = stripes mask (floats in {0, 1}).
    """

    concept_names = NAMES
    concept_categories = CATS
    num_layers = 3

    def __init__(self, n: int = 24, side: int = 12, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.side = side
        self.mask_shape = (side, side)
        self.labels = np.zeros((n, 3, side, side), np.int32)
        for i in range(n):
            for layer, pair in enumerate(((1, 2), (3, 4), (5, 6))):
                for value in pair:
                    if rng.uniform() < 0.8:
                        y0, x0 = rng.integers(0, side - 3, 2)
                        hh, ww = rng.integers(2, side // 2, 2)
                        self.labels[i, layer, y0 : y0 + hh, x0 : x0 + ww] = value

    def __len__(self) -> int:
        return len(self.labels)

    def image_id(self, i: int) -> str:
        return f"planted-{i}"

    def images(self, idx):
        lab = self.labels[np.asarray(idx, int)]
        return np.stack([lab[:, 0] == 1, lab[:, 1] == 3, lab[:, 2] == 5], -1).astype(np.float32)

    def load(self, idx):
        return self.images(idx), self.labels[np.asarray(idx, int)]


class Planted(nn.Module):
    """1x1 convolution with hand-set weights: unit 0 = red, unit 1 = classA - stripes,
    unit 2 = (red + classA) / 2, unit 3 = 0 (dead)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (1, 1), name="probe")(x)
        return y.mean((1, 2))


PLANTED_KERNEL = np.array(
    [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, -1.0, 0.0, 0.0]], np.float32
)[None, None]
PLANTED_VARS = {"params": {"probe": {"kernel": jnp.asarray(PLANTED_KERNEL), "bias": jnp.zeros(4)}}}


@pytest.fixture(scope="module")
def planted():
    ds = PlantedConcepts()
    cfg = D.DissectConfig(quantile=0.6, batch_size=5)  # concepts cover < 60 %: threshold ~ 0
    res = D.dissect(Planted(), PLANTED_VARS, "probe", ds, config=cfg, preprocess="none")
    return ds, res


def test_planted_units_are_labelled_exactly(planted):
    ds, res = planted
    assert res.units.tolist() == [0, 1, 2, 3]
    # unit 0 fires exactly on "red"
    assert res.concept_str(0) == "red" and res.best_iou[0] == pytest.approx(1.0, abs=1e-9)
    assert res.formula_str(0) == "red" and res.formula_iou[0] == pytest.approx(1.0, abs=1e-9)
    # unit 1 fires on "classA AND NOT stripes": no single concept explains it, the beam does
    assert res.concept_str(1) == "classA" and res.best_iou[1] < 0.95
    assert res.formula_str(1) == "classA AND NOT stripes"
    assert res.formula_iou[1] == pytest.approx(1.0, abs=1e-9)
    # unit 2 fires on "red OR classA"
    assert res.formula_str(2) in ("red OR classA", "classA OR red")
    assert res.formula_iou[2] == pytest.approx(1.0, abs=1e-9)
    # the dead unit never fires: no concept, no formula
    assert res.hits[3] == 0 and res.best_concept[3] == -1 and res.formulas[3] is None
    assert res.thresholds[3] == 0.0
    # thresholds are the 40th percentiles: 0 for these sparse units, within the bound
    acts = np.einsum("nhwc,co->nhwo", ds.images(range(len(ds))), PLANTED_KERNEL[0, 0])
    ref = np.quantile(acts.reshape(-1, 4).astype(np.float64), 0.4, axis=0)
    assert np.all(np.abs(res.thresholds - ref) <= res.threshold_error + 1e-12)


def _reference_counts(ds, act_fn, thresholds, units):
    """Independent per-image computation: PIL upsampling, dense masks, boolean counts."""
    n = len(ds)
    C = len(ds.concept_names)
    M, N = ds.mask_shape
    inter = np.zeros((len(units), C), np.int64)
    hits = np.zeros(len(units), np.int64)
    cpix = np.zeros(C, np.int64)
    smasks, cmasks = [], []
    for i in range(n):
        img, lab = ds.load([i])
        a = np.asarray(act_fn(img))[0][..., units]
        masks = labels_to_masks(lab[0], C)
        s = np.stack(
            [np.asarray(Image.fromarray(a[..., k], mode="F").resize((N, M), Image.BILINEAR)) > thresholds[k]
             for k in range(len(units))]
        )
        inter += np.einsum("umn,cmn->uc", s.astype(np.int64), masks.astype(np.int64))
        hits += s.reshape(len(units), -1).sum(1)
        cpix += masks.reshape(C, -1).sum(1)
        smasks.append(s)
        cmasks.append(masks)
    return inter, hits, cpix, np.stack(smasks, 1), np.stack(cmasks, 1)


def test_iou_accumulation_batched_equals_single_pass_and_reference():
    ds = PlantedConcepts(n=13, side=12, seed=3)
    w = np.abs(np.random.default_rng(5).normal(size=(3, 6))).astype(np.float32)

    def act_fn(x):  # a smooth half-resolution map: exercises the bilinear upsampling
        x = np.asarray(x)
        pooled = x.reshape(x.shape[0], 6, 2, 6, 2, 3).mean((2, 4))
        return np.maximum(pooled @ w, 0.0)

    units = [0, 2, 3, 5]
    cfg = D.DissectConfig(quantile=0.3, batch_size=4)
    many = D.dissect_activations(act_fn, ds, units=units, config=cfg)
    one = D.dissect_activations(act_fn, ds, units=units, config=D.DissectConfig(quantile=0.3, batch_size=13))
    pix = D.dissect_activations(act_fn, ds, units=units, config=D.DissectConfig(quantile=0.3, batch_size=4, max_atoms=0))
    for r in (one, pix):
        np.testing.assert_array_equal(r.thresholds, many.thresholds)
        np.testing.assert_array_equal(r.intersections, many.intersections)
        np.testing.assert_array_equal(r.hits, many.hits)
        np.testing.assert_array_equal(r.concept_pixels, many.concept_pixels)
        assert [D.formula_to_str(f, NAMES) for f in r.formulas] == [D.formula_to_str(f, NAMES) for f in many.formulas]
        np.testing.assert_allclose(r.formula_iou, many.formula_iou, rtol=0, atol=1e-12)
    inter, hits, cpix, smask, cmask = _reference_counts(ds, act_fn, many.thresholds, units)
    np.testing.assert_array_equal(many.intersections, inter)
    np.testing.assert_array_equal(many.hits, hits)
    np.testing.assert_array_equal(many.concept_pixels, cpix)
    assert many.hits.min() > 0
    # the reported formula IoUs are the IoUs of the formula masks over the whole dataset
    for k, f in enumerate(many.formulas):
        if f is None:
            continue
        fm = D.formula_masks(f, cmask)
        i = np.logical_and(fm, smask[k]).sum()
        u = np.logical_or(fm, smask[k]).sum()
        assert many.formula_iou[k] == pytest.approx(i / u, abs=1e-9)
        assert many.formula_iou[k] >= many.best_iou[k] - 1e-12  # the beam starts from the best concept


def test_beam_search_finds_best_formula_by_brute_force():
    """With a beam as wide as all formulas of length 2, the result is the exhaustive optimum."""
    ds = PlantedConcepts(n=10, side=12, seed=7)
    w = np.random.default_rng(2).normal(size=(3, 2)).astype(np.float32)
    act_fn = lambda x: np.asarray(x) @ w  # noqa: E731
    cfg = D.DissectConfig(quantile=0.2, batch_size=4, max_formula_length=2, beam_size=6)
    res = D.dissect_activations(act_fn, ds, config=cfg)
    _, _, _, smask, cmask = _reference_counts(ds, act_fn, res.thresholds, [0, 1])
    C = len(NAMES)
    for k in range(2):
        best = 0.0
        for a in range(C):
            cands = [(a, ())] + [(a, ((op, b),)) for b in range(C) for op in (D.OR, D.AND, D.AND_NOT)]
            for f in cands:
                fm = D.formula_masks(f, cmask)
                best = max(best, np.logical_and(fm, smask[k]).sum() / np.logical_or(fm, smask[k]).sum())
        assert res.formula_iou[k] == pytest.approx(best, abs=1e-9)


def test_formula_strings_and_masks():
    f = (0, ((D.OR, 1), (D.AND_NOT, 2)))
    assert D.formula_to_str(f, NAMES) == "(red OR blue) AND NOT classA"
    m = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(D.formula_masks(f, m), [True, True, False, False])


def test_beam_holds_distinct_masks(planted):
    """Formulas that coincide on the dataset take one beam slot: every beam holds distinct masks."""
    _, res = planted
    for beam in res.beams:
        fs = [D.formula_to_str(f, NAMES) for f, _ in beam]
        assert len(fs) == len(set(fs))
    ds = PlantedConcepts()
    cm = np.stack([labels_to_masks(l, 6) for l in ds.labels], 1)  # (C, n, h, w)
    for beam in res.beams:
        masks = [D.formula_masks(f, cm).tobytes() for f, _ in beam]
        assert len(masks) == len(set(masks))


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear(planted):
    ds, _ = planted
    with pytest.raises(ValueError, match=r"no layer 'prob'.*did you mean 'probe'.*valid layers: probe"):
        D.dissect(Planted(), PLANTED_VARS, "prob", ds, preprocess="none")
    with pytest.raises(ValueError, match=r"units: \[4, 9\] out of range for layer 'probe', which has 4 channels"):
        D.dissect(Planted(), PLANTED_VARS, "probe", ds, units=[0, 4, 9], preprocess="none")
    with pytest.raises(ValueError, match="has no per-pixel concept masks"):
        D.dissect(Planted(), PLANTED_VARS, "probe", SyntheticScenes(test_size=4), preprocess="none")
    with pytest.raises(ValueError, match="quantile"):
        D.DissectConfig(quantile=0.0)

    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(x.mean((1, 2)))

    v = {"params": {"head": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}}}
    with pytest.raises(ValueError, match="spatial"):
        D.dissect(Flat(), v, "head", ds, preprocess="none")


# ----------------------------------------------------------------------------- synthetic concepts


def test_synthetic_concept_masks_follow_the_scene():
    scenes = SyntheticScenes(test_size=12)
    names, cats = synthetic_concepts(scenes)
    assert len(names) == 26 and cats.count("object") == 12 and cats.count("color") == 8
    assert names[-2:] == ("distractor", "background") and cats.count("texture") == 4
    from xaijax.data.synthetic import SPLITS

    saw_distractor = 0
    for i in range(12):
        sc = scenes.scene("test", i)
        _, m = concept_masks(scenes, "test", i)
        obj = m[:12].any(0)
        # object / distractor / background partition the image
        np.testing.assert_array_equal(obj.astype(int) + m[-2] + m[-1], np.ones((128, 128), int))
        for c in range(12):  # class masks are the record's visible masks
            ref = np.zeros((128, 128), bool)
            for j in np.flatnonzero(sc.record.labels == c):
                ref |= sc.record.masks[j]
            np.testing.assert_array_equal(m[c], ref)
        for j, o in enumerate(sc.objects):  # colour and texture ride on the object's visible pixels
            vis = sc.record.masks[j]
            assert m[names.index(color_name(o.rgb))][vis].all() and m[names.index(o.texture)][vis].all()
            assert color_name(o.rgb) == D_COLOR[CLASS_STYLES[o.label].hue]
        assert not (m[-2] & sc.full_masks.any(0)).any()
        saw_distractor += int(m[-2].any())
        # the replayed distractors reproduce the image: background + distractors, before the
        # objects, equals the final image up to the noise (|noise| <= sigma*sqrt(3) <= 0.0607)
        rng = np.random.default_rng([scenes.seed, SPLITS["test"], i])
        img = scenes._background(rng)
        for _ in range(int(rng.integers(0, scenes.max_distractors + 1))):
            scenes._draw_distractor(rng, img)
        cover = np.zeros((128, 128), bool)
        for o in sc.objects:
            win, sdf, _, _ = scenes._object_geometry(CLASS_STYLES[o.label].name, *o.centre, o.radius, o.angle, o.aspect)
            cover[win] |= sdf < 0.5
        assert np.abs(img - sc.record.image).max(-1)[~cover].max() <= 0.0607
    assert saw_distractor >= 5
    # coarser masks sample pixel centres; the dataset object agrees with concept_labels
    _, m64 = concept_masks(scenes, "test", 3, mask_size=64)
    _, m128 = concept_masks(scenes, "test", 3)
    np.testing.assert_array_equal(m64, m128[:, 1::2, 1::2])
    ds = SyntheticConcepts(scenes, split="test", start=2, count=3, mask_size=64)
    imgs, labs = ds.load([0, 2])
    np.testing.assert_array_equal(labs[1], concept_labels(scenes, "test", 4)[:, 1::2, 1::2])
    np.testing.assert_array_equal(imgs[0], scenes.record("test", 2).image)
    with pytest.raises(ValueError, match="count"):
        SyntheticConcepts(scenes, count=13)


D_COLOR = {0.0: "red", 28.0: "orange", 55.0: "yellow", 120.0: "green", 185.0: "cyan", 225.0: "blue",
           270.0: "purple", 310.0: "magenta"}


# ----------------------------------------------------------------------------- Broden


def _png(path, numbers):
    numbers = np.asarray(numbers, np.int64)
    rgb = np.stack([numbers % 256, numbers // 256, np.zeros_like(numbers)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _write_broden(root):
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    labels = [(0, "-", ""), (1, "red", "color(2)"), (2, "dog", "object(2)"), (3, "kitchen", "scene(1)"),
              (300, "grass", "object(1);material(1)")]
    with open(root / "label.csv", "w") as f:
        f.write("number,name,category,frequency,coverage,syns\n")
        for num, name, cat in labels:
            f.write(f'{num},{name},"{cat}",1,0.5,\n')
    for cat, rows in {"color": [(1, 1, "red")], "object": [(1, 2, "dog"), (2, 300, "grass")],
                      "scene": [(1, 3, "kitchen")]}.items():
        with open(root / f"c_{cat}.csv", "w") as f:
            f.write("code,number,name,frequency,coverage\n0,0,-,0,0\n")
            for code, num, name in rows:
                f.write(f"{code},{num},{name},1,0.5\n")
    rng = np.random.default_rng(0)
    color0 = np.zeros((4, 4), int)
    color0[:2] = 1
    obj0 = np.zeros((4, 4), int)
    obj0[:, :2] = 2
    obj0[3, 3] = 300
    obj1 = np.full((4, 4), 300)
    obj1[0, 0] = 0
    _png(img_dir / "a_color.png", color0)
    _png(img_dir / "a_object.png", obj0)
    _png(img_dir / "b_object.png", obj1)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray((rng.uniform(0, 1, (8, 8, 3)) * 255).astype(np.uint8)).save(img_dir / name)
    with open(root / "index.csv", "w") as f:
        f.write("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n")
        f.write("a.png,train,8,8,4,4,a_color.png,a_object.png,,,3,\n")
        f.write("b.png,val,8,8,4,4,,b_object.png,,,,\n")
        f.write("c.png,train,8,8,4,4,,,,,3,\n")
    return color0, obj0, obj1


def test_broden_fixture_round_trip(tmp_path):
    color0, obj0, obj1 = _write_broden(tmp_path)
    np.testing.assert_array_equal(decode_label_png(tmp_path / "images" / "a_object.png"), obj0)  # 300 = 44 + 256
    ds = BrodenDataset(tmp_path)
    assert ds.categories == ("color", "object", "scene")  # columns with a c_*.csv file
    assert ds.concept_names == ("red", "dog", "grass", "kitchen")
    assert ds.concept_categories == ("color", "object", "object", "scene")
    assert len(ds) == 3 and ds.mask_shape == (4, 4) and ds.num_layers == 3
    imgs, labs = ds.load([0, 1, 2])
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.float32
    np.testing.assert_allclose(imgs[0], np.asarray(Image.open(tmp_path / "images" / "a.png"), np.float32) / 255)
    m = np.stack([labels_to_masks(l, 4) for l in labs])  # (3, C, 4, 4)
    np.testing.assert_array_equal(m[0, 0], color0 == 1)
    np.testing.assert_array_equal(m[0, 1], obj0 == 2)
    np.testing.assert_array_equal(m[0, 2], obj0 == 300)
    assert m[0, 3].all() and m[2, 3].all() and not m[1, 3].any()  # image-level scene label
    np.testing.assert_array_equal(m[1, 2], obj1 == 300)
    assert not m[2, :3].any()
    # split filter, resizing, resampled masks, category selection
    tr = BrodenDataset(tmp_path, split="train", categories=["object"], size=16, mask_size=8)
    assert len(tr) == 2 and tr.concept_names == ("dog", "grass") and tr.images([0]).shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(labels_to_masks(tr.labels(0), 2)[0], np.kron(obj0 == 2, np.ones((2, 2), bool)))
    # end to end: dissect a fixed "network" on the fixture
    res = D.dissect_activations(lambda x: np.asarray(x)[:, ::2, ::2, :], ds, config=D.DissectConfig(quantile=0.1, batch_size=2))
    assert res.iou.shape == (3, 4) and res.concept_pixels.tolist() == [8, 8 + 0, 1 + 15, 32]
    with pytest.raises(ValueError, match="unknown or unavailable"):
        BrodenDataset(tmp_path, categories=["part"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.csv").write_text("image,split\nx.png,train\n")
    with pytest.raises(FileNotFoundError, match="lacks column"):
        BrodenDataset(tmp_path / "bad")


# ----------------------------------------------------------------------------- outputs and CLI


def test_tables_and_figure(planted, tmp_path):
    ds, res = planted
    paths = D.write_tables(res, tmp_path, ds.image_id)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["formula"] for r in rows[:2]] == ["red", "classA AND NOT stripes"]
    assert float(rows[1]["formula_iou"]) == pytest.approx(1.0) and rows[3]["concept"] == "-"
    assert rows[0]["top_images"].startswith("planted-")
    md = paths["md"].read_text()
    assert "| 1 | classA | object |" in md and "IoU > 0.04: **3**" in md
    png = D.save_figure(res, ds, tmp_path / "fig.png")
    assert Image.open(png).size[0] > 200
    tile = D.overlay_tile(np.ones((12, 12, 3)), np.eye(12, dtype=np.float32), 0.5)
    assert tile[0, 0].tolist() == [1.0, 0.9, 0.0] and tile[0, 11].tolist() == [0.3, 0.3, 0.3]


def test_cli_on_bundled_vgg16(tmp_path, capsys):
    from xaijax.features.dissect_cli import add_dissect_parser

    p = argparse.ArgumentParser(prog="xaijax")
    add_dissect_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["dissect", "--images", "6", "--units", "0:3", "--batch", "3", "--mask-size", "32",
                         "--out", str(tmp_path), "--no-progress"])
    summary = args.func(args)
    assert summary["units"] == 3 and summary["images"] == 6 and summary["layer"] == "features.29"
    rec = json.loads((tmp_path / "dissect.json").read_text())
    assert rec["arch"] == "vgg16" and [r["unit"] for r in rec["units"]] == [0, 1, 2]
    assert (tmp_path / "dissect.png").is_file() and (tmp_path / "dissect.csv").is_file()
    assert "wrote" in capsys.readouterr().out
    args = p.parse_args(["dissect", "--images", "2", "--layer", "features.99", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="valid layers: features, features.0"):
        args.func(args)
    args = p.parse_args(["dissect", "--images", "2", "--units", "64", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="64 channels"):
        args.func(args)
    args = p.parse_args(["dissect", "--dataset", "broden", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--data-dir"):
        args.func(args)


def test_dissect_is_wired_into_the_cli(tmp_path, capsys):
    from xaijax import cli

    code = cli.main(["dissect", "--dataset", "broden", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("xaijax: error:") and "\n" not in err
