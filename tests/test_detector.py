"""TinyDetector, its box coding and losses, detection metrics (VOC AP, NMS) and the bundled weights."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xaijax.checkpoints import load_detector, save_detector, save_variables
from xaijax.data import SyntheticScenes, mask_to_box
from xaijax.metrics import detection as M
from xaijax.models import detector as D

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "synthetic_detector.safetensors"


@functools.lru_cache(maxsize=1)
def _train_script():
    spec = importlib.util.spec_from_file_location("train_detector", ROOT / "experiments" / "train_detector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ IoU and NMS


def test_box_iou_hand_values():
    a = [[0, 0, 10, 10], [0, 0, 2, 2]]
    b = [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [3, 3, 3, 9]]
    iou = M.box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [50 / 150, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou[1], [0.0, 4 / 100, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        M.box_iou([[0, 0, 1]], b)


def test_nms_hand_example():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: score .9
            [1, 1, 11, 11],  # 1: IoU 81/119 with box 0 -> suppressed by it
            [20, 20, 30, 30],  # 2: disjoint
            [0, 0, 10, 5],  # 3: best; IoU with box 0 is exactly 0.5 -> does not suppress it
        ],
        float,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.5), [3, 0, 2])
    # lower threshold: box 3 now suppresses box 0 (0.5 > 0.4), and box 1 survives (IoU 36/114 with 3)
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.4), [3, 1, 2])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.5, max_output=2), [3, 0])
    # class-wise: box 1 in another class is not suppressed by box 0
    labels = np.array([0, 1, 0, 0])
    np.testing.assert_array_equal(M.batched_nms(boxes, scores, labels, 0.5), [3, 0, 1, 2])
    assert M.nms(np.zeros((0, 4)), np.zeros((0,))).shape == (0,)


# ------------------------------------------------------------------ VOC AP


def _voc_ap_reference(rec, prec):
    """The VOC devkit's all-point AP, written as its loop (independent of the vectorised one)."""
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_average_precision_matches_devkit_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        hits = rng.random(15) < 0.6
        npos = int(hits.sum()) + int(rng.integers(0, 3))
        if npos == 0:
            continue
        tp = np.cumsum(hits)
        rec, prec = tp / npos, tp / np.arange(1, 16)
        assert M.average_precision(rec, prec) == pytest.approx(_voc_ap_reference(rec, prec), abs=1e-12)


def _gt(boxes, labels, difficult=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": np.asarray(labels, int),
        "difficult": np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool),
    }


def _det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float), "labels": np.asarray(labels, int)}


def test_perfect_detections_give_map_one():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 1]), _gt([[5, 5, 25, 25]], [2])]
    dets = [_det(g["boxes"], np.linspace(0.9, 0.5, len(g["labels"])), g["labels"]) for g in gts]
    res = M.evaluate_detections(dets, gts, num_classes=4)
    np.testing.assert_allclose(res.ap[:3], 1.0)
    assert np.isnan(res.ap[3]) and res.npos.tolist() == [1, 1, 1, 0]
    assert res.map == pytest.approx(1.0)


def test_false_positive_ranked_first_gives_two_thirds():
    # class 0 has 2 boxes; ranking FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> AP = 2/3
    gts = [_gt([[0, 0, 10, 10]], [0]), _gt([[50, 50, 70, 70]], [0])]
    dets = [
        _det([[0, 0, 10, 10], [30, 30, 40, 40]], [0.7, 0.9], [0, 0]),
        _det([[51, 50, 70, 70]], [0.8], [0]),
    ]
    ap, npos = M.class_average_precision(dets, gts, 0)
    assert npos == 2 and ap == pytest.approx(2 / 3)
    # TP, FP, TP -> 0.5 * 1 + 0.5 * 2/3
    dets[0]["scores"] = np.array([0.9, 0.85])
    ap, _ = M.class_average_precision(dets, gts, 0)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_duplicates_are_false_positives_and_iou_threshold_is_strict():
    gts = [_gt([[0, 0, 10, 10]], [0])]
    # duplicate of a matched box is an FP; it ranks after the TP so AP stays 1
    ap, _ = M.class_average_precision([_det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], gts, 0)
    assert ap == pytest.approx(1.0)
    # duplicate first, matching the same box with a higher score: TP then FP -> still 1
    ap, _ = M.class_average_precision([_det([[0, 0, 10, 10], [0, 0, 10, 9]], [0.8, 0.9], [0, 0])], gts, 0)
    assert ap == pytest.approx(1.0)
    # IoU exactly 0.5 is not a match; just above is
    assert M.class_average_precision([_det([[0, 0, 10, 5]], [0.9], [0])], gts, 0)[0] == 0.0
    assert M.class_average_precision([_det([[0, 0, 10, 5.1]], [0.9], [0])], gts, 0)[0] == pytest.approx(1.0)
    # a detection of the wrong class does not match
    assert M.class_average_precision([_det([[0, 0, 10, 10]], [0.9], [1])], gts, 0)[0] == 0.0


def test_difficult_objects_are_ignored():
    gts = [_gt([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]], [0, 0, 0], [False, True, True])]
    # the highest-ranked detection hits a difficult box: neither TP nor FP; the other difficult
    # box is missed without lowering recall (npos counts only the non-difficult box)
    dets = [_det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    ap, npos = M.class_average_precision(dets, gts, 0)
    assert npos == 1 and ap == pytest.approx(1.0)
    # were the box not difficult, the same ranking would be TP, TP out of 3 -> AP 2/3
    gts_plain = [_gt(gts[0]["boxes"], [0, 0, 0])]
    assert M.class_average_precision(dets, gts_plain, 0)[0] == pytest.approx(2 / 3)
    # a class with only difficult boxes has no AP and leaves the mean
    res = M.evaluate_detections(
        [_det([[0, 0, 10, 10]], [0.9], [0])], [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [False, True])], 2
    )
    assert res.npos.tolist() == [1, 0] and np.isnan(res.ap[1]) and res.map == pytest.approx(1.0)


def test_evaluate_detections_input_errors():
    with pytest.raises(ValueError, match="one entry per image"):
        M.evaluate_detections([], [_gt([[0, 0, 1, 1]], [0])], 2)
    with pytest.raises(ValueError, match="labels"):
        M.evaluate_detections([_det([], [], [])], [_gt([[0, 0, 1, 1]], [5])], 2)
    with pytest.raises(ValueError, match="same length"):
        M.evaluate_detections([_det([[0, 0, 1, 1]], [0.5, 0.4], [0])], [_gt([[0, 0, 1, 1]], [0])], 2)


# ------------------------------------------------------------------ box coding, targets, decoding


def test_box_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    centres = D.cell_centres(4, 5)
    np.testing.assert_allclose(np.asarray(centres[:6]), [[4, 4], [12, 4], [20, 4], [28, 4], [36, 4], [4, 12]])
    x0y0 = rng.uniform(-10, 100, (20, 2))
    boxes = np.concatenate([x0y0, x0y0 + rng.uniform(1, 90, (20, 2))], 1).astype(np.float32)
    c = centres[rng.integers(0, 20, 20)]
    codes = D.encode_boxes(boxes, c)
    np.testing.assert_allclose(np.asarray(D.decode_boxes(codes, c)), boxes, rtol=1e-5, atol=1e-3)
    codes = rng.uniform(-2, 2, (20, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(D.encode_boxes(D.decode_boxes(codes, c), c)), codes, rtol=1e-5, atol=1e-4)
    # a hand value: cell centre (12, 4), code (0.5, -0.25, log 2, 0) -> centre (16, 2), size 16 x 8
    np.testing.assert_allclose(
        np.asarray(D.decode_boxes(jnp.array([0.5, -0.25, np.log(2.0), 0.0]), jnp.array([12.0, 4.0]))), [8, -2, 24, 6], atol=1e-5
    )


def test_decode_reads_the_documented_channel_layout():
    c = 3
    raw = np.zeros((1, 2, 2, 5 + c), np.float32)
    raw[0, 1, 0, 0] = 2.0  # objectness logit of cell (row 1, col 0) = proposal 2
    raw[0, 1, 0, 1 : 1 + c] = [0.0, np.log(3.0), 0.0]  # class probs 1/5, 3/5, 1/5
    raw[0, 1, 0, 1 + c :] = [1.0, 0.0, np.log(2.0), 0.0]  # centre (4 + 8, 12), size 16 x 8
    out = D.decode(jnp.asarray(raw), c)
    assert out["boxes"].shape == (1, 4, 4) and out["class_probs"].shape == (1, 4, c)
    np.testing.assert_allclose(np.asarray(out["objectness"][0]), [0.5, 0.5, 1 / (1 + np.exp(-2.0)), 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["class_probs"][0, 2]), [0.2, 0.6, 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["boxes"][0, 2]), [4, 8, 20, 16], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["boxes"][0, 1]), [8, 0, 16, 8], atol=1e-5)  # zero code: the cell itself
    with pytest.raises(ValueError, match="expected shape"):
        D.decode(jnp.asarray(raw), 4)


def test_assign_targets_centre_sampling_and_smaller_box_wins():
    # 32x32 image, 4x4 grid; box [0, 16) x [0, 16) has centre (8, 8): cells with centres (4|12, 4|12)
    t = D.assign_targets([np.array([[0, 0, 16, 16], [24, 24, 29, 27]])], [np.array([2, 1])], (32, 32))
    assert t["pos"].shape == (1, 16) and t["boxes"].shape == (1, 16, 4)
    np.testing.assert_array_equal(np.flatnonzero(t["pos"][0]), [0, 1, 4, 5, 15])
    np.testing.assert_array_equal(t["cls"][0, [0, 1, 4, 5, 15]], [2, 2, 2, 2, 1])
    np.testing.assert_array_equal(t["boxes"][0, 15], [24, 24, 29, 27])  # tiny box: only its centre cell
    # overlapping boxes: the smaller one takes the shared cells
    # big box: cells 5, 6, 9, 10 (centres 12 or 20 on both axes); small box [12, 20)^2: cell 5
    # (centre (12, 12) inside) and its centre cell 10 -> it takes those two
    t = D.assign_targets([np.array([[12, 12, 20, 20], [0, 0, 32, 32]])], [np.array([1, 0])], (32, 32))
    np.testing.assert_array_equal(np.flatnonzero(t["pos"][0]), [5, 6, 9, 10])
    np.testing.assert_array_equal(t["cls"][0, [5, 6, 9, 10]], [1, 0, 0, 1])
    np.testing.assert_array_equal(t["boxes"][0, 6], [0, 0, 32, 32])
    t = D.assign_targets([np.zeros((0, 4))], [np.zeros((0,), int)], (32, 32))
    assert t["pos"].sum() == 0


def test_dihedral_augmentation_moves_boxes_with_pixels():
    dihedral = _train_script().dihedral
    rec = SyntheticScenes(size=64).record("train", 3)
    for code in range(8):
        img, boxes = dihedral(rec.image, rec.boxes, code)
        for k, m in enumerate(rec.masks):
            mm, _ = dihedral(np.repeat(m[..., None], 3, -1), rec.boxes[:0], code)
            np.testing.assert_array_equal(boxes[k], mask_to_box(mm[..., 0]))
        assert img.shape == rec.image.shape
    np.testing.assert_array_equal(dihedral(rec.image, rec.boxes, 0)[0], rec.image)


# ------------------------------------------------------------------ model and proposals

TINY = dict(num_classes=5, width=4, head_width=8)


@pytest.fixture(scope="module")
def tiny():
    model = D.TinyDetector(**TINY)
    variables = D.init_variables(model, 0, (32, 32))
    # non-trivial BatchNorm statistics so eval mode differs from batch statistics
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.1, variables["batch_stats"])
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 48, 3))
    fn = jax.jit(functools.partial(D.proposals, model))
    return model, variables, x, fn(variables, x), fn


def test_init_variables_is_seeded_and_he_scaled():
    model = D.TinyDetector(num_classes=12)
    a, b, c = (D.init_variables(model, s) for s in (3, 3, 4))
    ka, kb, kc = (v["params"]["head"]["conv"]["kernel"] for v in (a, b, c))
    assert ka.shape == (3, 3, 96, 64)
    np.testing.assert_array_equal(ka, kb)
    assert not np.array_equal(ka, kc)
    # He normal, fan-out: std sqrt(2 / (3 * 3 * 64)); 55296 samples -> sample std within ~1%
    assert np.std(ka) == pytest.approx(np.sqrt(2 / 576), rel=0.02)
    assert np.all(a["params"]["head"]["objectness"]["bias"] == np.float32(np.log(0.01 / 0.99)))
    assert np.all(a["params"]["bn1"]["scale"] == 1) and np.all(a["batch_stats"]["bn1"]["var"] == 1)
    with pytest.raises(ValueError, match="seed"):
        D.init_variables(model, -1)


def test_proposals_shapes_and_ranges(tiny):
    model, variables, x, p, _ = tiny
    assert set(p) == {"boxes", "class_probs", "objectness"}
    assert p["boxes"].shape == (3, 4 * 6, 4) and p["class_probs"].shape == (3, 24, 5) and p["objectness"].shape == (3, 24)
    np.testing.assert_allclose(np.asarray(p["class_probs"].sum(-1)), 1.0, rtol=1e-5)
    assert np.all((np.asarray(p["objectness"]) > 0) & (np.asarray(p["objectness"]) < 1))
    assert np.all(np.asarray(p["boxes"][..., 2] > p["boxes"][..., 0]))
    # the objectness prior of init_variables: about 0.01 everywhere
    assert np.all(np.abs(np.asarray(p["objectness"]) - 0.01) < 0.01)
    names = {k for k in variables["params"]}
    assert names == {"conv1", "bn1", "layer1", "layer2", "layer3", "head"}
    with pytest.raises(ValueError, match="multiples of 16"):
        model.apply(variables, jnp.zeros((1, 40, 32, 3)))


def test_proposals_jit_and_vmap_agree(tiny):
    # the batched jitted call (fixture) vs a jitted vmap of single-image calls
    model, variables, x, jitted, fn = tiny
    one = lambda im: jax.tree_util.tree_map(lambda a: a[0], D.proposals(model, variables, im[None]))  # noqa: E731
    per_image = jax.jit(jax.vmap(one))(x)
    assert set(per_image) == set(jitted)
    for k in jitted:
        np.testing.assert_allclose(np.asarray(per_image[k]), np.asarray(jitted[k]), rtol=1e-5, atol=1e-5)
    # and vs two separate half batches (no cross-sample coupling in eval mode)
    first = fn(variables, x[:1])
    np.testing.assert_allclose(np.asarray(first["boxes"][0]), np.asarray(jitted["boxes"][0]), rtol=1e-5, atol=1e-4)


def test_detect_thresholds_and_suppresses():
    boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [0, 0, 10, 10]]], np.float32)
    probs = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]]], np.float32)
    obj = np.array([[0.9, 0.8, 0.5, 0.01]], np.float32)
    (d,) = D.detect({"boxes": boxes, "class_probs": probs, "objectness": obj}, score_threshold=0.1, iou_threshold=0.5)
    # scores: (0,c0)=.81, (1,c0)=.64 suppressed by proposal 0, (2,c1)=.35, (1,c1)=.16, (2,c0)=.15;
    # proposal 3 scores .005 < .1
    np.testing.assert_allclose(d["scores"], [0.81, 0.35, 0.16, 0.15], rtol=1e-6)
    np.testing.assert_array_equal(d["labels"], [0, 1, 1, 0])
    np.testing.assert_array_equal(d["boxes"][0], [0, 0, 10, 10])


def test_save_and_load_detector_round_trip(tiny, tmp_path):
    model, variables, x, a, fn = tiny
    path = tmp_path / "det.safetensors"
    save_detector(path, model, variables, note="hello")
    model2, variables2, meta = load_detector(path)
    assert model2 == model and meta["arch"] == "tiny_detector" and meta["note"] == "hello"
    assert json.loads(meta["model_kwargs"]) == {"num_classes": 5, "width": 4, "layers": [1, 1, 1], "head_width": 8}
    assert jax.tree_util.tree_structure(variables2) == jax.tree_util.tree_structure(variables)
    b = fn(variables2, x)  # model2 == model, so the same jitted function applies
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    save_variables(tmp_path / "other.safetensors", variables, {"arch": "resnet18"})
    with pytest.raises(ValueError, match="tiny_detector"):
        load_detector(tmp_path / "other.safetensors")


def test_a_few_training_steps_decrease_the_loss():
    script = _train_script()
    ds = SyntheticScenes(size=64)
    b = ds.batch("train", 0, 8)
    model = D.TinyDetector(num_classes=ds.num_classes, width=4, head_width=16)
    v = D.init_variables(model, 0, (64, 64))
    tx = optax.adam(1e-2)
    step = script.make_step(model, tx)
    targets = D.assign_targets(b["boxes"], b["labels"], (64, 64))
    params, stats, opt = v["params"], v["batch_stats"], tx.init(v["params"])
    x = jnp.asarray(b["images"])
    losses = []
    for _ in range(25):
        params, stats, opt, loss, aux = step(params, stats, opt, x, targets)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    # the loss terms are consistent with the total
    assert float(loss) == pytest.approx(float(aux["obj"] + aux["cls"] + 2 * aux["giou"] + aux["l1"]), rel=1e-5)


# ------------------------------------------------------------------ the bundled detector


def test_bundled_detector_reaches_its_recorded_map():
    assert WEIGHTS.is_file(), f"bundled weights missing: {WEIGHTS}"
    model, variables, meta = load_detector(WEIGHTS)
    recorded = float(meta["test_map50"])
    assert model.num_classes == 12 and meta["preprocess"] == "none"
    script = _train_script()  # the evaluation settings of the recorded value
    recs = SyntheticScenes().records("test", 0, 100)
    images = jnp.asarray(np.stack([r.image for r in recs]))
    props = jax.jit(functools.partial(D.proposals, model))(variables, images)
    dets = D.detect(
        props,
        score_threshold=script.EVAL_SCORE_THRESHOLD,
        iou_threshold=script.EVAL_NMS_IOU,
        max_detections=script.EVAL_MAX_DETECTIONS,
        image_size=(128, 128),
    )
    res = M.evaluate_detections(dets, recs, model.num_classes, 0.5)
    assert res.map >= recorded - 0.1, (res.map, recorded)
    # the D-RISE interface on real weights: in most images the most confident proposal
    # overlaps a ground-truth box with IoU > 0.5
    best = np.argmax(np.asarray(props["objectness"]), axis=1)
    hits = [M.box_iou(np.asarray(props["boxes"][i, best[i]])[None], r.boxes).max() > 0.5 for i, r in enumerate(recs)]
    assert np.mean(hits) > 0.8
