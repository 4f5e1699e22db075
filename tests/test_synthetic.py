"""The record format and the bundled synthetic benchmark generator."""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
import pytest

from xaijax.data import records as R
from xaijax.data import synthetic as S

CFG = S.SyntheticScenes()
N_SAMPLE = 500


@pytest.fixture(scope="module")
def sample() -> list[S.Scene]:
    """500 validation scenes (records plus full masks), generated once for the module."""
    return [CFG.scene("val", i) for i in range(N_SAMPLE)]


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ------------------------------------------------------------------ determinism


def _assert_records_identical(a: R.Record, b: R.Record) -> None:
    for name in ("image", "labels", "boxes", "masks", "difficult"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert a.image_id == b.image_id


def test_record_is_a_pure_function_of_seed_split_index(sample):
    # regenerated out of order, from a fresh but equal config, bit for bit
    again = S.SyntheticScenes().record("val", 7)
    _assert_records_identical(sample[7].record, again)
    _assert_records_identical(sample[3].record, CFG.record("val", 3))
    assert sample[7].record.image_id == "synthetic-s0-val-000007"


def test_splits_indices_and_seeds_give_different_scenes(sample):
    base = sample[11].record.image
    for other in (
        CFG.record("train", 11),
        CFG.record("test", 11),
        CFG.record("val", 12),
        S.SyntheticScenes(seed=1).record("val", 11),
    ):
        assert other.image.shape == base.shape
        assert np.abs(other.image - base).mean() > 0.02
    # no two records of the sample share an image
    digests = {s.record.image.tobytes() for s in sample[:100]}
    assert len(digests) == 100


# ------------------------------------------------------------------ ground truth


def test_images_are_float32_rgb_in_unit_range(sample):
    for s in sample[:100]:
        img = s.record.image
        assert img.dtype == np.float32 and img.shape == (128, 128, 3)
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert img.std() > 0.05  # textured, not a flat canvas


def test_masks_are_nonempty_disjoint_and_match_boxes_exactly(sample):
    for s in sample:
        r = s.record
        assert r.masks.dtype == bool and r.masks.shape == (r.num_objects, 128, 128)
        assert r.num_objects >= 1
        assert r.masks.sum(axis=0).max() <= 1  # visible masks are exclusive
        for mask, box in zip(r.masks, r.boxes):
            assert mask.any()
            assert box.tolist() == _tight_box(mask)
            inside = R.boxes_to_mask(box[None], 128, 128)
            assert not np.any(mask & ~inside)


def test_visible_mask_is_full_mask_minus_later_objects(sample):
    for s in sample[:200]:
        full, vis = s.full_masks, s.record.masks
        k = full.shape[0]
        for i in range(k):
            later = full[i + 1 :].any(axis=0) if i + 1 < k else np.zeros_like(full[i])
            np.testing.assert_array_equal(vis[i], full[i] & ~later)
            # placement never leaves an object less visible than the configured minimum
            assert vis[i].sum() >= CFG.min_visible_fraction * full[i].sum()
            assert vis[i].sum() >= CFG.min_visible_pixels


def test_difficult_flags_follow_the_documented_rule(sample):
    n_small = n_occluded = n_easy = 0
    for s in sample:
        r = s.record
        a_vis = r.masks.reshape(r.num_objects, -1).sum(1)
        a_full = s.full_masks.reshape(r.num_objects, -1).sum(1)
        small = a_vis < 0.01 * 128 * 128
        occluded = a_vis < 0.4 * a_full
        np.testing.assert_array_equal(r.difficult, small | occluded)
        n_small += int(small.sum())
        n_occluded += int((occluded & ~small).sum())
        n_easy += int((~r.difficult).sum())
    # both branches of the rule occur, and most objects are not difficult
    assert n_small > 0 and n_occluded > 0
    assert n_easy > 0.6 * (n_small + n_occluded + n_easy)


def test_labels_in_range_every_class_appears_roughly_uniformly(sample):
    labels = np.concatenate([s.record.labels for s in sample])
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < CFG.num_classes
    counts = np.bincount(labels, minlength=CFG.num_classes)
    assert counts.min() > 0.6 * counts.mean()
    # 1..4 objects per image all occur; a class may repeat within an image
    ks = np.array([s.record.num_objects for s in sample])
    assert set(ks.tolist()) == {1, 2, 3, 4}
    assert any(len(set(s.record.labels.tolist())) < s.record.num_objects for s in sample)


def test_objects_span_the_scale_range_and_keep_their_class_colour(sample):
    radii = np.array([o.radius for s in sample for o in s.objects]) * 2 / 128
    assert radii.min() >= 0.10 - 1e-9 and radii.max() <= 0.45 + 1e-9
    assert radii.min() < 0.15 and radii.max() > 0.40
    for s in sample[:100]:
        for o in s.objects:
            hue, sat, _ = colorsys.rgb_to_hsv(*o.rgb)
            band = S.CLASS_STYLES[o.label].hue
            diff = (hue * 360 - band + 180) % 360 - 180
            assert abs(diff) <= 8.0 + 1e-3 and sat >= 0.6 - 1e-6
            assert o.texture == S.CLASS_STYLES[o.label].texture


def test_class_table_forces_shape_to_matter():
    assert len(S.CLASS_NAMES) >= 10 and len(set(S.CLASS_NAMES)) == len(S.CLASS_NAMES)
    look = {}
    for st in S.CLASS_STYLES:
        look.setdefault((st.hue, st.texture), []).append(st.name)
    same_look = [names for names in look.values() if len(names) > 1]
    assert len(same_look) >= 4  # pairs separable only by shape
    assert {st.texture for st in S.CLASS_STYLES} == {"solid", "stripes", "checker", "dots"}


def test_shape_sdf_matches_independent_geometry():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-1.2, 1.2, (2, 50, 60)).astype(np.float32)
    # square: circumradius 1 -> half side 1/sqrt(2); exact box SDF
    h = 1 / np.sqrt(2)
    q = np.stack([np.abs(u) - h, np.abs(v) - h])
    box = np.linalg.norm(np.maximum(q, 0), axis=0) + np.minimum(q.max(0), 0)
    np.testing.assert_allclose(S._shape_sdf("square", u, v), box, atol=1e-5)
    np.testing.assert_allclose(S._shape_sdf("disc", u, v), np.hypot(u, v) - 1, atol=1e-6)
    ring = S._shape_sdf("ring", u, v) < 0
    np.testing.assert_array_equal(ring, (np.hypot(u, v) < 1) & (np.hypot(u, v) > 0.5))
    # non-convex polygon (star): inside test against matplotlib's point-in-polygon
    path = pytest.importorskip("matplotlib.path")
    verts = S._POLYGONS["star"]
    inside = path.Path(verts).contains_points(np.stack([u.ravel(), v.ravel()], 1)).reshape(u.shape)
    sdf = S._shape_sdf("star", u, v)
    far = np.abs(sdf) > 1e-4
    np.testing.assert_array_equal((sdf < 0)[far], inside[far])


# ------------------------------------------------------------------ batch / config


def test_batch_stacks_records_in_order():
    b = CFG.batch("test", 5, 3)
    assert b["images"].shape == (3, 128, 128, 3) and b["images"].dtype == np.float32
    assert b["multi_hot"].shape == (3, 12) and b["multi_hot"].dtype == np.float32
    for i in range(3):
        r = CFG.record("test", 5 + i)
        assert b["images"][i].tobytes() == r.image.tobytes()
        expected = np.zeros(12, np.float32)
        expected[r.labels] = 1
        np.testing.assert_array_equal(b["multi_hot"][i], expected)
        np.testing.assert_array_equal(b["labels"][i], r.labels)
        np.testing.assert_array_equal(b["boxes"][i], r.boxes)
        np.testing.assert_array_equal(b["masks"][i], r.masks)
        np.testing.assert_array_equal(b["difficult"][i], r.difficult)
        assert b["image_ids"][i] == r.image_id
    batches = list(CFG.iter_batches("test", 2, start=5, stop=8))
    assert [len(x["image_ids"]) for x in batches] == [2, 1]
    assert sum((x["image_ids"] for x in batches), []) == b["image_ids"]
    assert CFG.batch("test", 0, 0)["images"].shape == (0, 128, 128, 3)


def test_smaller_config_respects_its_limits():
    cfg = S.SyntheticScenes(
        size=64, num_classes=10, min_objects=2, max_objects=2, max_distractors=0, seed=3
    )
    labels = []
    for i in range(40):
        r = cfg.record("train", i)
        assert r.image.shape == (64, 64, 3) and r.masks.shape[1:] == (64, 64)
        assert r.num_objects == 2
        labels.append(r.labels)
    assert np.concatenate(labels).max() < 10
    assert cfg.class_names == S.CLASS_NAMES[:10]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 16}, "size"),
        ({"num_classes": 13}, "num_classes"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"scale_range": (0.5, 0.2)}, "scale_range"),
        ({"seed": -1}, "seed"),
        ({"difficult_visible": 1.5}, "difficult_visible"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.SyntheticScenes(**kwargs)


def test_bad_split_and_index_are_readable_errors():
    with pytest.raises(ValueError, match=r"split: expected one of \['test', 'train', 'val'\], got 'valid'"):
        CFG.record("valid", 0)
    with pytest.raises(ValueError, match=r"index: expected an integer in \[0, 1000\)"):
        CFG.record("test", 1000)
    with pytest.raises(ValueError, match="start=998, n=5"):
        CFG.batch("val", 998, 5)


# ------------------------------------------------------------------ Record and helpers


def _toy_record(**over) -> R.Record:
    """6x8 image; object 0 (class 2), object 1 (class 0, difficult), object 2 (class 2)."""
    masks = np.zeros((3, 6, 8), bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 4:6, 0:2] = True
    masks[2, 0:2, 6:8] = True
    fields = dict(
        image=np.full((6, 8, 3), 0.5, np.float32),
        labels=np.array([2, 0, 2]),
        boxes=np.array([[1, 1, 4, 3], [0, 4, 2, 6], [5.6, 0, 8, 2]], np.float32),
        masks=masks,
        difficult=np.array([False, True, False]),
        image_id="toy",
    )
    fields.update(over)
    return R.Record(**fields)


def test_record_helpers_closed_form():
    r = _toy_record()
    assert r.labels.dtype == np.int32  # int64 converted losslessly
    np.testing.assert_array_equal(R.multi_hot(r, 4), [1, 0, 1, 0])
    np.testing.assert_array_equal(R.multi_hot(r, 4, include_difficult=False), [0, 0, 1, 0])
    np.testing.assert_array_equal(R.present_classes(r), [0, 2])
    np.testing.assert_array_equal(R.present_classes(r, include_difficult=False), [2])
    np.testing.assert_array_equal(R.class_mask(r, 2), r.masks[0] | r.masks[2])
    assert not R.class_mask(r, 0, include_difficult=False).any()
    assert not R.class_mask(r, 3).any()
    # box [5.6, 0, 8, 2]: pixel-centre rule keeps columns 6, 7 (centres 6.5, 7.5), not 5 (5.5)
    expected = np.zeros((6, 8), bool)
    expected[1:3, 1:4] = True
    expected[0:2, 6:8] = True
    np.testing.assert_array_equal(R.class_box_mask(r, 2), expected)
    np.testing.assert_array_equal(R.mask_to_box(r.masks[0]), [1, 1, 4, 3])
    with pytest.raises(ValueError, match="label 2.*num_classes=2"):
        R.multi_hot(r, 2)
    with pytest.raises(ValueError, match="mask: is empty"):
        R.mask_to_box(np.zeros((3, 3), bool))


def test_record_with_no_objects():
    r = R.Record(
        image=np.zeros((4, 5, 3), np.float32),
        labels=np.zeros((0,), np.int64),
        boxes=np.zeros((0,)),
        masks=np.zeros((0,), bool),
        difficult=np.zeros((0,), bool),
        image_id="empty",
    )
    assert r.boxes.shape == (0, 4) and r.masks.shape == (0, 4, 5) and r.num_objects == 0
    np.testing.assert_array_equal(R.multi_hot(r, 3), [0, 0, 0])
    assert R.present_classes(r).size == 0 and not R.class_box_mask(r, 1).any()


@pytest.mark.parametrize(
    "over, match",
    [
        ({"image": np.zeros((6, 8), np.float32)}, r"Record.image: expected shape \(H, W, 3\)"),
        ({"image": np.full((6, 8, 3), 1.5, np.float32)}, r"Record.image: expected RGB values in \[0, 1\]"),
        ({"image": np.zeros((6, 8, 3), np.uint8)}, "Record.image: expected dtype float32"),
        ({"labels": np.array([2.0, 0.0, 2.0])}, "Record.labels: expected dtype int32"),
        ({"labels": np.array([2, -1, 2])}, "Record.labels: class indices must be >= 0"),
        ({"boxes": np.zeros((2, 4))}, r"Record.boxes: expected shape \(K, 4\) = \(3, 4\)"),
        ({"boxes": np.array([[4, 1, 1, 3], [0, 4, 2, 6], [6, 0, 8, 2]])}, "x0 <= x1.*object 0"),
        ({"masks": np.zeros((3, 6, 7), bool)}, r"Record.masks: expected shape \(K, H, W\) = \(3, 6, 8\)"),
        ({"masks": np.full((3, 6, 8), 0.5)}, "Record.masks: expected a bool array"),
        ({"difficult": np.array([False, True])}, r"Record.difficult: expected shape \(K,\) = \(3,\)"),
        ({"image_id": 7}, "Record.image_id: expected a str"),
    ],
)
def test_record_validation_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _toy_record(**over)


def test_record_is_frozen():
    r = _toy_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.image_id = "other"  # type: ignore[misc]
