"""D-RISE against a slow per-mask reference loop on a hand-written JAX detector, on the
bundled TinyDetector, and its input checks."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods.perturbation import drise as dr
from xaijax.methods.perturbation import rise as pt
from xaijax.methods import registry

H, W = 16, 16
BASE = np.array([[2, 2, 8, 8], [6, 4, 14, 12], [0, 0, 16, 16], [0, 0, 0, 0]], np.float32)  # last: padding
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "synthetic_detector.safetensors"


def _box_masks() -> np.ndarray:
    m = np.zeros((len(BASE), H, W), np.float32)
    for j, (x1, y1, x2, y2) in enumerate(BASE.astype(int)):
        m[j, y1:y2, x1:x2] = 1.0
    return m


BOX_MASKS = jnp.asarray(_box_masks())


def toy_detector(images: jax.Array) -> dict[str, jax.Array]:
    """4 proposals per image (the last is padding with objectness 0) whose boxes, classes and
    objectness all depend on the pixels inside fixed base boxes; K = 3 classes (one per channel)."""
    area = jnp.maximum(BOX_MASKS.sum((1, 2)), 1.0)
    r = jnp.einsum("phw,nhwc->npc", BOX_MASKS, images) / area[None, :, None]  # (M, P, 3)
    probs = jax.nn.softmax(4.0 * r, axis=-1)
    obj = jax.nn.sigmoid(3.0 * r.mean(-1) - 1.0) * jnp.asarray([1.0, 1.0, 1.0, 0.0])
    dx = 2.0 * jnp.tanh(r[..., 0])
    shift = jnp.stack([dx, 0.5 * dx, dx, 0.5 * dx], -1) * jnp.asarray([1.0, 1.0, 1.0, 0.0])[:, None]
    return {"boxes": jnp.asarray(BASE) + shift, "class_probs": probs, "objectness": obj}


def _iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).uniform(size=(2, H, W, 3)), jnp.float32)


def test_box_iou_hand_values():
    a = jnp.array([0.0, 0, 10, 10])
    b = jnp.array([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [3, 3, 3, 9], [0, 0, 0, 0]])
    np.testing.assert_allclose(dr.box_iou(a[None], b), [50 / 150, 1.0, 0.0, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("target_kind", ["label", "class_probs"])
def test_drise_matches_reference_loop(images, target_kind):
    n, s, p, seed = 13, 4, 0.4, 7
    t_boxes = np.array([[2, 2, 8, 8], [6, 4, 14, 12]], np.float32)
    if target_kind == "label":
        target = {"box": t_boxes, "label": jnp.array([1, 2])}
        t_vec = np.eye(3)[[1, 2]]
    else:
        t_vec = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
        target = {"box": t_boxes, "class_probs": jnp.asarray(t_vec, jnp.float32)}
    method = dr.DRise(n=n, s=s, p=p, seed=seed, chunk=5)  # 3 chunks, the last one padded
    got = np.asarray(jax.jit(method, static_argnums=0)(toy_detector, images, target))

    masks = np.asarray(pt.rise_masks(jax.random.key(seed), jnp.arange(n), (H, W), s, p), np.float64)
    ref = np.zeros((2, H, W))
    for i in range(n):  # slow reference: one mask, one image, one proposal at a time
        props = {k: np.asarray(v, np.float64) for k, v in toy_detector(images * masks[i][None, :, :, None]).items()}
        for b in range(2):
            ious = _iou_np(t_boxes[b].astype(np.float64), props["boxes"][b])
            best = 0.0
            for j in range(len(BASE)):
                pj = props["class_probs"][b, j]
                cos = pj @ t_vec[b] / (np.linalg.norm(pj) * np.linalg.norm(t_vec[b]))
                best = max(best, ious[j] * cos * props["objectness"][b, j])
            ref[b] += best * masks[i]
    ref /= n
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, H, W) and got.dtype == np.float32 and ref.max() > 0.05


def test_drise_batch_and_key_semantics(images):
    """(Chunking is covered by the reference-loop test: 13 masks in chunks of 5.)"""
    target = ([2.0, 2, 8, 8], 1)  # tuple form: (box, label), the same target for both images
    base = dict(n=10, s=3, p=0.5, chunk=4)
    ref = np.asarray(dr.DRise(seed=3, **base)(toy_detector, images, target))  # key=None: seed 3
    # an int key is the seed; a sample's map does not depend on the rest of its batch
    alone = np.asarray(dr.DRise(**base)(toy_detector, images[1:], target, key=3))
    np.testing.assert_allclose(alone[0], ref[1], rtol=1e-5, atol=1e-7)
    # another key gives other masks
    other = np.asarray(dr.DRise(**base)(toy_detector, images, target, key=jax.random.key(4)))
    assert np.abs(other - ref).max() > 1e-3
    # a detection that no proposal overlaps has weight 0 for every mask
    far = np.asarray(dr.DRise(**base)(toy_detector, images, ([40.0, 40, 50, 50], 0), key=3))
    np.testing.assert_array_equal(far, 0.0)


def test_float64_run_keeps_the_target_in_float64(x64):
    """A float64 run compares proposals with the target in float64: a target equal to the only
    proposal has IoU, cosine and objectness exactly 1 for every mask, so the map is the mean
    mask to rounding (the target was rounded to float32 before: IoU 1 - 4e-8)."""
    box = np.array([0.1, 0.2, 5.3, 6.7])
    probs = np.array([1.0 / 3.0, 2.0 / 3.0])

    def one_proposal(z):
        n = z.shape[0]
        return {"boxes": jnp.broadcast_to(jnp.asarray(box), (n, 1, 4)),
                "class_probs": jnp.broadcast_to(jnp.asarray(probs), (n, 1, 2)),
                "objectness": jnp.ones((n, 1), z.dtype)}

    x = jnp.ones((1, 8, 8, 3), jnp.float64)
    got = np.asarray(dr.DRise(n=4, s=2, p=0.5, chunk=4)(one_proposal, x, {"box": box, "class_probs": probs}))
    expected = np.asarray(pt.rise_masks(jax.random.key(0), jnp.arange(4), (8, 8), 2, 0.5), np.float64).mean(0)
    assert got.dtype == np.float64 and expected.max() > 0
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-15)


def test_bundled_detector_map_peaks_inside_the_explained_box():
    from xaijax.checkpoints import load_detector
    from xaijax.data import SyntheticScenes
    from xaijax.models import detector as D

    model, variables, _ = load_detector(WEIGHTS)
    rec = SyntheticScenes().record("test", 0)  # three objects: classes 0, 6, 11
    x = jnp.asarray(rec.image)[None]
    fn = dr.detector_function(model, variables)
    dets = D.detect(jax.jit(fn)(x), score_threshold=0.3, image_size=(128, 128))[0]
    assert len(dets["labels"]) >= 2
    boxes, labels = dets["boxes"][:2], dets["labels"][:2]
    # explain the two most confident detections of the same image in one batch
    sal = np.asarray(dr.DRise(n=400, chunk=50)(fn, jnp.concatenate([x, x]), {"box": boxes, "label": labels}))
    assert sal.shape == (2, 128, 128)
    for b in range(2):
        x1, y1, x2, y2 = boxes[b]
        iy, ix = np.unravel_index(sal[b].argmax(), sal[b].shape)
        assert x1 <= ix < x2 and y1 <= iy < y2, (b, (ix, iy), boxes[b])
        inside = np.zeros((128, 128), bool)
        inside[int(np.ceil(y1)) : int(y2), int(np.ceil(x1)) : int(x2)] = True
        assert sal[b][inside].mean() > sal[b][~inside].mean()


def test_validation_errors(images):
    good = {"box": [2.0, 2, 8, 8], "label": 1}
    with pytest.raises(ValueError, match="n must be a positive int"):
        dr.DRise(n=0)
    with pytest.raises(ValueError, match="chunk"):
        dr.DRise(chunk=0)
    for p in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"p \(keep probability"):
            dr.DRise(p=p)
    with pytest.raises(ValueError, match="s \\(grid cells"):
        dr.DRise(s=1)
    m = dr.DRise(n=4, s=3, chunk=2)

    def bad(**over):
        def fn(z):
            out = toy_detector(z)
            out.update(over)
            return out

        return fn

    with pytest.raises(ValueError, match=r"boxes must have shape \(M, P, 4\)"):
        m(bad(boxes=jnp.zeros((2, 4, 3))), images, good)
    with pytest.raises(ValueError, match=r"boxes must have shape \(M, P, 4\)"):
        m(bad(boxes=jnp.zeros((4, 4))), images, good)
    with pytest.raises(ValueError, match="class_probs must have shape"):
        m(lambda z: {**toy_detector(z), "class_probs": jnp.zeros((z.shape[0], 3))}, images, good)
    with pytest.raises(ValueError, match="objectness must have shape"):
        m(lambda z: {**toy_detector(z), "objectness": jnp.zeros((z.shape[0], 5))}, images, good)
    with pytest.raises(ValueError, match="missing"):
        m(lambda z: {"boxes": toy_detector(z)["boxes"]}, images, good)
    with pytest.raises(ValueError, match="for 1 images, expected"):
        m(lambda z: {k: v[:1] for k, v in toy_detector(z).items()}, images, good)
    # boxes as [x, y, w, h]: x2 < x1 somewhere -> caught on the unmasked images
    xywh = lambda z: {**toy_detector(z), "boxes": jnp.broadcast_to(jnp.array([6.0, 4, 3, 2]), (z.shape[0], 4, 4))}  # noqa: E731
    with pytest.raises(ValueError, match=r"\[x1, y1, x2, y2\]"):
        m(xywh, images, good)
    # the target detection
    with pytest.raises(ValueError, match=r"\[x1, y1, x2, y2\]"):
        m(toy_detector, images, {"box": [8.0, 2, 2, 8], "label": 1})
    with pytest.raises(ValueError, match="target box must have shape"):
        m(toy_detector, images, {"box": [2.0, 2, 8], "label": 1})
    with pytest.raises(ValueError, match="out of range"):
        m(toy_detector, images, {"box": [2.0, 2, 8, 8], "label": 3})
    with pytest.raises(ValueError, match="the detector has 3"):
        m(toy_detector, images, {"box": [2.0, 2, 8, 8], "class_probs": jnp.ones(4)})
    with pytest.raises(ValueError, match="exactly one"):
        m(toy_detector, images, {"box": [2.0, 2, 8, 8]})
    with pytest.raises(TypeError, match="detector_fn"):
        m("not a function", images, good)
    with pytest.raises(ValueError, match="NHWC"):
        m(toy_detector, images[0], good)


def test_registered_as_detection_method():
    m = registry.get("d-rise")
    assert isinstance(m, dr.DRise) and m.kind == "detection"
    assert (m.n, m.s, m.p) == (5000, 16, 0.5)  # the paper's settings
    assert registry.get("d-rise", n=8, chunk=4).n == 8
