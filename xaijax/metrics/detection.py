"""Detection metrics: box IoU, greedy non-maximum suppression, VOC-style AP and mAP.

Conventions (the same as :mod:`xaijax.data.records`): boxes are ``[x0, y0, x1, y1]`` in
pixels with ``x1``/``y1`` exclusive, so a box's area is ``(x1 - x0) * (y1 - y0)`` (no
"+1" as in the VOC devkit, whose boxes are inclusive). Everything here is NumPy on the
host (float64 arithmetic): evaluation runs once per image, after the jitted model.

Average precision follows the PASCAL VOC 2010+ devkit ("all-point" interpolation):

1. Per class, the detections of all images are ranked by score (descending; ties keep
   their input order: a stable sort).
2. Each detection is matched to the ground-truth box of the same class in the same image
   with the largest IoU (difficult boxes included). If that IoU is ``> iou_threshold``
   (strictly, as the devkit): a difficult box makes the detection *ignored* (neither TP
   nor FP); an unmatched non-difficult box makes it a TP (the box is then used up); an
   already matched box makes it an FP (duplicate). Otherwise it is an FP.
3. ``recall = cumTP / npos`` (``npos`` = non-difficult boxes of the class),
   ``precision = cumTP / (cumTP + cumFP)``; AP is the area under the precision envelope
   (precision made monotonically non-increasing from the right), summed over the points
   where recall changes.

A class without non-difficult ground truth has AP ``nan`` and is left out of the mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xaijax.imageops import safe_divide

__all__ = [
    "box_iou",
    "nms",
    "batched_nms",
    "average_precision",
    "class_average_precision",
    "DetectionEval",
    "evaluate_detections",
]


def _boxes(name: str, b: Any) -> np.ndarray:
    arr = np.asarray(b, np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (N, 4) [x0, y0, x1, y1], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: boxes contain NaN or inf")
    return arr


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) -> (N, M) float64.

    Boxes are ``[x0, y0, x1, y1)`` (exclusive ends, area ``(x1-x0)*(y1-y0)``). Degenerate
    boxes have zero area; a pair with zero union has IoU 0.
    """
    a = _boxes("a", a)
    b = _boxes("b", b)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return safe_divide(inter, union)  # union >= 0 (finite boxes); a pair with zero union has IoU 0


def nms(boxes: Any, scores: Any, iou_threshold: float = 0.5, max_output: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression.

    Repeatedly keeps the highest-scoring remaining box and removes every remaining box whose
    IoU with it is ``> iou_threshold``. Ties in score keep the input order.

    Args:
      boxes: (N, 4) ``[x0, y0, x1, y1)``.
      scores: (N,) scores.
      iou_threshold: suppression threshold in [0, 1].
      max_output: keep at most this many boxes (``None``: no limit).

    Returns:
      int64 indices into ``boxes`` of the kept boxes, by decreasing score.
    """
    boxes = _boxes("boxes", boxes)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores: expected shape ({boxes.shape[0]},) to match boxes, got {scores.shape}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold!r}")
    if max_output is not None and max_output < 0:
        raise ValueError(f"max_output: expected a non-negative integer or None, got {max_output!r}")
    order = np.argsort(-scores, kind="stable")
    if order.size == 0:
        return order.astype(np.int64)
    iou = box_iou(boxes[order], boxes[order])
    limit = order.size if max_output is None else int(max_output)
    alive = np.ones(order.size, bool)
    keep: list[int] = []
    for i in range(order.size):  # loop over kept boxes (few after suppression), not pixels
        if len(keep) >= limit:
            break
        if not alive[i]:
            continue
        keep.append(i)
        alive &= ~(iou[i] > iou_threshold)
    return order[np.asarray(keep, np.int64)].astype(np.int64)


def batched_nms(
    boxes: Any, scores: Any, labels: Any, iou_threshold: float = 0.5, max_output: int | None = None
) -> np.ndarray:
    """Class-wise NMS: boxes of different ``labels`` never suppress each other.

    Returns int64 indices of the kept boxes by decreasing score (at most ``max_output``).
    """
    boxes = _boxes("boxes", boxes)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not (scores.shape[0] == labels.shape[0] == boxes.shape[0]):
        raise ValueError(
            f"boxes, scores, labels: expected the same length, got {boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}"
        )
    kept = [np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_threshold)] for c in np.unique(labels)]
    if not kept:
        return np.zeros((0,), np.int64)
    idx = np.concatenate(kept)
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return (idx if max_output is None else idx[: int(max_output)]).astype(np.int64)


def average_precision(recall: Any, precision: Any) -> float:
    """VOC 2010+ all-point AP from a ranked list's recall and precision curves.

    ``recall`` and ``precision`` (D,) are the cumulative values after each ranked detection
    (``recall`` non-decreasing). The curve is padded with (0, 0) and (1, 0), precision is
    replaced by its running maximum from the right, and AP = sum over steps of
    ``(r[i+1] - r[i]) * p[i+1]``.
    """
    r = np.concatenate([[0.0], np.asarray(recall, np.float64).reshape(-1), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, np.float64).reshape(-1), [0.0]])
    if r.shape != p.shape:
        raise ValueError(f"recall, precision: expected equal lengths, got {r.size - 2} and {p.size - 2}")
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise ValueError(f"expected a mapping with key {name!r}, got keys {sorted(obj)}")
        return obj[name]
    if hasattr(obj, name):
        return getattr(obj, name)
    raise ValueError(f"expected a mapping or record with a {name!r} field, got {type(obj).__name__}")


def _gt(g: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = _boxes(f"ground_truth[{i}].boxes", _field(g, "boxes"))
    labels = np.asarray(_field(g, "labels")).reshape(-1).astype(np.int64)
    diff = g.get("difficult") if isinstance(g, Mapping) else getattr(g, "difficult", None)
    diff = np.zeros(labels.shape, bool) if diff is None else np.asarray(diff, bool).reshape(-1)
    if not (boxes.shape[0] == labels.shape[0] == diff.shape[0]):
        raise ValueError(
            f"ground_truth[{i}]: boxes, labels, difficult must have the same length, got "
            f"{boxes.shape[0]}, {labels.shape[0]}, {diff.shape[0]}"
        )
    return boxes, labels, diff


def _det(d: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = _boxes(f"detections[{i}].boxes", _field(d, "boxes"))
    scores = np.asarray(_field(d, "scores"), np.float64).reshape(-1)
    labels = np.asarray(_field(d, "labels")).reshape(-1).astype(np.int64)
    if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
        raise ValueError(
            f"detections[{i}]: boxes, scores, labels must have the same length, got "
            f"{boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}"
        )
    return boxes, scores, labels


def class_average_precision(
    detections: Sequence[Any], ground_truth: Sequence[Any], c: int, iou_threshold: float = 0.5
) -> tuple[float, int]:
    """VOC AP of class ``c`` over a set of images (see the module docstring).

    Args:
      detections: per image, a mapping (or object) with ``boxes`` (D, 4), ``scores`` (D,),
        ``labels`` (D,) int.
      ground_truth: per image (same order), a mapping or :class:`~xaijax.data.Record` with
        ``boxes`` (K, 4), ``labels`` (K,) and optionally ``difficult`` (K,) bool.
      c: class index.
      iou_threshold: a detection matches a box when their IoU is ``> iou_threshold``.

    Returns:
      ``(ap, npos)``: AP (``nan`` when ``npos == 0``) and the number of non-difficult boxes.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(
            f"detections and ground_truth: expected one entry per image each, got {len(detections)} and {len(ground_truth)}"
        )
    gts = [_gt(g, i) for i, g in enumerate(ground_truth)]
    dets = [_det(d, i) for i, d in enumerate(detections)]
    return _class_ap(dets, gts, int(c), float(iou_threshold))


def _class_ap(dets, gts, c: int, thr: float) -> tuple[float, int]:
    gt_boxes, gt_diff, used = [], [], []
    npos = 0
    for boxes, labels, diff in gts:
        sel = labels == c
        gt_boxes.append(boxes[sel])
        gt_diff.append(diff[sel])
        used.append(np.zeros(int(sel.sum()), bool))
        npos += int((~diff[sel]).sum())
    img_idx, scores, boxes = [], [], []
    for i, (b, s, lab) in enumerate(dets):
        sel = lab == c
        img_idx.append(np.full(int(sel.sum()), i, np.int64))
        scores.append(s[sel])
        boxes.append(b[sel])
    img_idx = np.concatenate(img_idx) if img_idx else np.zeros((0,), np.int64)
    scores = np.concatenate(scores) if scores else np.zeros((0,))
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    if npos == 0:
        return float("nan"), 0
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(order.size)
    fp = np.zeros(order.size)
    for k, d in enumerate(order):  # ranked detections of one class; inherently sequential
        i = img_idx[d]
        if gt_boxes[i].shape[0] == 0:
            fp[k] = 1.0
            continue
        iou = box_iou(boxes[d : d + 1], gt_boxes[i])[0]
        j = int(np.argmax(iou))
        if iou[j] > thr:
            if gt_diff[i][j]:
                continue  # ignored: neither TP nor FP
            if not used[i][j]:
                tp[k] = 1.0
                used[i][j] = True
            else:
                fp[k] = 1.0
        else:
            fp[k] = 1.0
    keep = (tp + fp) > 0  # drop ignored detections from the ranking
    ctp, cfp = np.cumsum(tp[keep]), np.cumsum(fp[keep])
    recall = ctp / npos
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return average_precision(recall, precision), npos


@dataclasses.dataclass(frozen=True)
class DetectionEval:
    """Result of :func:`evaluate_detections`.

    ``ap`` (C,) per-class AP (``nan`` for classes without non-difficult ground truth),
    ``npos`` (C,) non-difficult ground-truth boxes per class, ``map`` the mean of the
    finite entries of ``ap``, ``iou_threshold`` the matching threshold.
    """

    ap: np.ndarray
    npos: np.ndarray
    map: float
    iou_threshold: float


def evaluate_detections(
    detections: Sequence[Any], ground_truth: Sequence[Any], num_classes: int, iou_threshold: float = 0.5
) -> DetectionEval:
    """VOC-style per-class AP and mAP@``iou_threshold`` over a set of images.

    ``detections`` and ``ground_truth`` as in :func:`class_average_precision` (records from
    :mod:`xaijax.data` can be passed directly as ground truth). Difficult objects are neither
    TP nor FP and do not count in recall.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold!r}")
    if len(detections) != len(ground_truth):
        raise ValueError(
            f"detections and ground_truth: expected one entry per image each, got {len(detections)} and {len(ground_truth)}"
        )
    gts = [_gt(g, i) for i, g in enumerate(ground_truth)]
    dets = [_det(d, i) for i, d in enumerate(detections)]
    for i, (_, lab, _) in enumerate(gts):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"ground_truth[{i}].labels: expected values in [0, {num_classes}), got {lab.tolist()}")
    res = [_class_ap(dets, gts, c, float(iou_threshold)) for c in range(int(num_classes))]
    ap = np.array([r[0] for r in res], np.float64)
    npos = np.array([r[1] for r in res], np.int64)
    finite = np.isfinite(ap)
    m = float(np.mean(ap[finite])) if finite.any() else float("nan")
    return DetectionEval(ap=ap, npos=npos, map=m, iou_threshold=float(iou_threshold))
