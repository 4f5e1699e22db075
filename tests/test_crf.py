"""Dense-CRF refinement: a blurry map snaps to a sharp object boundary."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf")

from xaijax.metrics.crf import DenseCRF  # noqa: E402
from xaijax.metrics.iou import threshold_maps  # noqa: E402


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _scene(size: int = 64, radius: float = 14.0):
    """A sharp bright disk on a dark textured background, and a map that is a blurred, shifted,
    too-large blob around it (what a CAM at stride 16 looks like once upsampled)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - 30) ** 2 + (xx - 34) ** 2 <= radius**2
    image = np.where(disk[..., None], [220, 60, 40], [30, 90, 160]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    blob = np.exp(-((yy - 33) ** 2 + (xx - 31) ** 2) / (2 * (radius * 1.05) ** 2))
    return image, disk, blob


def test_crf_snaps_a_blurry_map_to_the_object_boundary():
    image, disk, blob = _scene()
    coarse = np.asarray(threshold_maps(blob[None], "mean"))[0]
    refined = DenseCRF()(image, coarse)
    before, after = _iou(coarse, disk), _iou(refined, disk)
    assert before < 0.8  # the thresholded blob misses the boundary
    assert after > 0.95 and after > before + 0.15
    # the CRF corrects the map's mistakes and leaves its right labels alone
    changed = refined != coarse
    wrong_before = coarse != disk
    assert changed.sum() > 50 and (changed & wrong_before).sum() >= 0.95 * changed.sum()


def test_crf_keeps_a_mask_that_already_follows_the_image():
    image, disk, _ = _scene()
    np.testing.assert_array_equal(DenseCRF()(image, disk), disk)
    # float images in [0, 1] are the same image
    np.testing.assert_array_equal(DenseCRF()(image / 255.0, disk), disk)
    batch = DenseCRF().refine_batch(np.stack([image, image]), np.stack([disk, disk]))
    assert batch.shape == (2, 64, 64) and (batch == disk).all()


def test_crf_validates():
    image, disk, _ = _scene()
    with pytest.raises(ValueError, match="gt_prob"):
        DenseCRF(gt_prob=1.0)
    with pytest.raises(ValueError, match="iterations"):
        DenseCRF(iterations=0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        DenseCRF()(image[..., 0], disk)
    with pytest.raises(ValueError, match="same"):
        DenseCRF()(image, disk[:10])
