"""Pointing game and mIoU against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from xaijax import methods, metrics
from xaijax.metrics import iou


def _point_map(h, w, y, x):
    m = np.zeros((h, w), np.float32)
    m[y, x] = 1.0
    return m


def test_pointing_tolerance_is_strict_at_15_px():
    region = np.zeros((40, 60), bool)
    region[10, 40] = True  # a single ground-truth pixel
    maps = np.stack([_point_map(40, 60, 10, 25), _point_map(40, 60, 10, 26), _point_map(40, 60, 19, 28)])
    # distance 15 (miss: strict), 14 (hit), sqrt(81 + 144) = 15 (miss)
    hits = metrics.pointing_hits(maps, np.broadcast_to(region, maps.shape))
    assert hits.tolist() == [False, True, False]
    assert metrics.pointing_hits(maps[:1], region[None], tolerance=15.01).tolist() == [True]


def test_pointing_first_maximum_and_shape_check():
    m = np.zeros((1, 10, 10))
    m[0, 2, 2] = m[0, 9, 9] = 1.0  # tie: the first in row-major order is the point
    r = np.zeros((1, 10, 10), bool)
    r[0, 2, 2] = True
    assert metrics.pointing_hits(m, r, tolerance=1).tolist() == [True]
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pointing_hits(m[0], r[0])


def test_pointing_game_per_class_mean_and_dif():
    pg = metrics.PointingGame(num_classes=3)
    # class 0: 3 hits of 4; class 1: 0 of 1; class 2: no pairs (left out of the mean)
    pg.update(np.array([0, 0, 0, 0, 1]), np.array([1, 1, 1, 0, 0], bool), np.array([0, 1, 1, 0, 1], bool))
    r = pg.result()
    np.testing.assert_equal(r["per_class_all"], [0.75, 0.0, np.nan])
    assert r["all"] == pytest.approx(0.375)
    np.testing.assert_equal(r["per_class_dif"], [1.0, 0.0, np.nan])
    assert r["dif"] == pytest.approx(0.5)
    assert np.isnan(metrics.PointingGame(num_classes=2).result()["all"])
    assert (r["pairs_all"], r["pairs_dif"]) == (5, 3)
    with pytest.raises(ValueError, match="out of range"):
        pg.update(np.array([3]), np.array([True]))


def test_dif_rule():
    assert metrics.is_difficult_pair(0.2, 2) and not metrics.is_difficult_pair(0.25, 2)
    assert not metrics.is_difficult_pair(0.1, 1)


def test_iou_binarisations_by_hand():
    m = np.array([[[-1.0, 0.5], [2.0, 0.1]]])  # mean 0.4
    r = np.array([[[False, True], [True, False]]])
    np.testing.assert_array_equal(iou.binarize(m, "positive"), [[[False, True], [True, True]]])
    np.testing.assert_array_equal(iou.binarize(m, "mean"), [[[False, True], [True, False]]])
    assert float(iou.iou(iou.binarize(m, "positive"), r)[0]) == pytest.approx(2 / 3)
    assert float(iou.iou(iou.binarize(m, "mean"), r)[0]) == pytest.approx(1.0)
    assert float(iou.iou(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), bool))[0]) == 0.0
    assert iou.class_mean(np.array([1.0, 0.0, 0.5]), np.array([0, 0, 2]), 4) == pytest.approx(0.5)


def test_registry_pairs_and_center_baseline():
    assert {"miou", "pointing-game", "energy-pointing", "map-density", "fgbg-miou"} <= set(metrics.names())
    x = np.zeros((2, 31, 41, 3), np.float32)
    c = np.asarray(methods.get("center")(None, None, x, 0))
    assert c.shape == (2, 31, 41) and np.unravel_index(c[0].argmax(), c[0].shape) == (15, 20)
    regions = np.zeros((2, 31, 41), bool)
    regions[0, 15, 30] = True  # 10 px from the centre: hit
    regions[1, 0, 0] = True  # far: miss
    batch = metrics.PairBatch(maps=c, regions=regions, classes=np.array([0, 1]), dif=np.array([False, True]))
    pg = metrics.get("pointing-game")
    s = pg.summarize(pg(batch), batch.classes, batch.dif, num_classes=2)
    assert s == {"pointing_all": 0.5, "pointing_dif": 0.0}
    with pytest.raises(ValueError, match="Did you mean pointing-game"):
        metrics.get("pointing")
