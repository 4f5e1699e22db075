"""A tiny single-stage detector built from the zoo's ResNet blocks (for D-RISE demos).

Architecture (module paths; ``W`` = ``width``)::

    conv1 (7x7/2, pad 3, no bias, W), bn1, relu, maxpool (3x3/2, pad 1)       stride 4
    layer1  ResLayer(BasicBlock, W,   layers[0], stride 1)                       stride 4
    layer2  ResLayer(BasicBlock, 2W,  layers[1], stride 2)                       stride 8
    layer3  ResLayer(BasicBlock, 4W,  layers[2], stride 2)                       stride 16
    up      nearest 2x upsampling of layer3 (:class:`Upsample`)                  stride 8
    concat  Concat(layer2, up)                                                   6W channels
    head    conv (3x3, head_width, no bias), bn, relu,
            objectness (1x1, 1), cls (1x1, num_classes), box (1x1, 4),
            out = Concat(objectness, cls, box)  -> (N, H/8, W/8, 5 + num_classes)

The blocks are :mod:`xaijax.models.resnet`'s ``ResLayer``/``BasicBlock``; every
operation is a named module, so taps, CAM layers and propagation rules address the detector
exactly like a classifier (``layer3``, ``head.relu``, ...).

Output layout of ``model.apply(variables, x)`` (the *raw map*): channel 0 is the objectness
logit, channels ``1 .. C`` the class logits, channels ``C+1 .. C+4`` the box code
``(tx, ty, tw, th)`` of the cell (see :func:`encode_boxes`). Inputs are NHWC float32 RGB
in [0, 1] **without** mean/std normalisation (preprocessing convention ``"none"``; the
first BatchNorm absorbs the offset); H and W must be multiples of 16.

Every grid cell is one proposal, so an image of ``H x W`` pixels always gives
``P = (H/8) * (W/8)`` proposals (256 at 128x128): :func:`proposals` returns them
"padded" to this fixed ``P`` as D-RISE expects (box, class probabilities, objectness).
:func:`detect` turns proposals into final detections (score threshold + class-wise NMS).
Files: :func:`xaijax.checkpoints.save_detector` / :func:`xaijax.checkpoints.load_detector`
(the configuration travels as :meth:`TinyDetector.model_kwargs` in the file's metadata).

Box convention: ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive
(:mod:`xaijax.data.records`). Cell ``(i, j)`` (row, column) has its centre at
``((j + 0.5) * s, (i + 0.5) * s)`` with stride ``s = 8``; a box with centre ``(cx, cy)``
and size ``(w, h)`` is coded as ``tx = (cx - cell_x) / s``, ``ty = (cy - cell_y) / s``,
``tw = log(w / s)``, ``th = log(h / s)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.metrics.detection import batched_nms
from xaijax.models import layers as L
from xaijax.models.resnet import BasicBlock, ResLayer

__all__ = [
    "ARCH_NAME",
    "STRIDE",
    "TinyDetector",
    "DetectionHead",
    "Upsample",
    "cell_centres",
    "encode_boxes",
    "decode_boxes",
    "decode",
    "proposals",
    "init_variables",
    "assign_targets",
    "giou",
    "detection_loss",
    "detect",
]

#: ``arch`` value in the metadata of saved detector checkpoints (saved and loaded by
#: :func:`xaijax.checkpoints.save_detector` / :func:`xaijax.checkpoints.load_detector`).
ARCH_NAME = "tiny_detector"
#: Output stride of the detector's grid (pixels per cell).
STRIDE = 8
#: Box size codes are clipped to this range before ``exp`` (sizes 8*e^-6 .. 8*e^6 px).
_LOG_SIZE_CLIP = 6.0


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by an integer ``factor``: (N, H, W, C) -> (N, fH, fW, C)."""

    factor: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = int(self.factor)
        n, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, f, w, f, c))
        return x.reshape(n, h * f, w * f, c)


class DetectionHead(nn.Module):
    """Shared 3x3 conv + BN + ReLU, then 1x1 predictors ``objectness`` (1), ``cls`` (C), ``box`` (4).

    Input (N, h, w, C_in) -> raw map (N, h, w, 5 + num_classes) (layout in the module docstring).
    """

    num_classes: int
    head_width: int
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = L.conv(self.head_width, 3, 1, 1, bias=False, name="conv")(x)
        x = L.batch_norm(self.train, name="bn")(x)
        x = L.ReLU(name="relu")(x)
        obj = L.conv(1, 1, name="objectness")(x)
        cls = L.conv(self.num_classes, 1, name="cls")(x)
        box = L.conv(4, 1, name="box")(x)
        return L.Concat(name="out")(obj, cls, box)


class TinyDetector(nn.Module):
    """Single-stage, one-prediction-per-cell detector on a stride-8 grid.

    Attributes:
      num_classes: number of object classes ``C`` (no background class: objectness plays
        that role).
      width: channels of the stem and ``layer1``; ``layer2``/``layer3`` have 2x/4x.
      layers: number of BasicBlocks in ``layer1`` .. ``layer3``.
      head_width: channels of the head's shared 3x3 convolution.
      train: BatchNorm uses batch statistics (``mutable=["batch_stats"]``).

    ``__call__(x)``: x (N, H, W, 3) float RGB in [0, 1], H and W multiples of 16 ->
    raw map (N, H/8, W/8, 5 + C).
    """

    stride: ClassVar[int] = STRIDE

    num_classes: int = 12
    width: int = 16
    layers: tuple[int, ...] = (1, 1, 1)
    head_width: int = 64
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.layers) != 3 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"TinyDetector layers must be 3 positive block counts, got {tuple(self.layers)}")
        if self.width < 1 or self.head_width < 1 or self.num_classes < 1:
            raise ValueError(
                f"TinyDetector width, head_width and num_classes must be >= 1, got "
                f"{self.width}, {self.head_width}, {self.num_classes}"
            )
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"TinyDetector expects an NHWC RGB batch (N, H, W, 3), got shape {x.shape}")
        if x.shape[1] % 16 or x.shape[2] % 16 or x.shape[1] < 16 or x.shape[2] < 16:
            raise ValueError(f"TinyDetector needs H and W to be positive multiples of 16, got {x.shape[1]}x{x.shape[2]}")
        x = L.conv(self.width, 7, 2, 3, bias=False, name="conv1")(x)
        x = L.batch_norm(self.train, name="bn1")(x)
        x = L.ReLU(name="relu")(x)
        x = L.MaxPool2d(3, 2, 1, name="maxpool")(x)
        feats = []
        for i, n in enumerate(self.layers):
            x = ResLayer(
                BasicBlock, self.width * 2**i, int(n), stride=1 if i == 0 else 2, train=self.train, name=f"layer{i + 1}"
            )(x)
            feats.append(x)
        up = Upsample(2, name="up")(feats[2])
        x = L.Concat(name="concat")(feats[1], up)
        return DetectionHead(self.num_classes, self.head_width, self.train, name="head")(x)

    def model_kwargs(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (saved in checkpoint metadata)."""
        return {
            "num_classes": int(self.num_classes),
            "width": int(self.width),
            "layers": [int(n) for n in self.layers],
            "head_width": int(self.head_width),
        }


# ----------------------------------------------------------------------------- box coding


def cell_centres(grid_h: int, grid_w: int, stride: int = STRIDE) -> jax.Array:
    """(grid_h * grid_w, 2) float32 pixel centres ``(x, y)`` of the cells, row-major."""
    ys, xs = jnp.meshgrid(jnp.arange(grid_h, dtype=jnp.float32), jnp.arange(grid_w, dtype=jnp.float32), indexing="ij")
    return jnp.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], axis=-1)


def encode_boxes(boxes: jax.Array, centres: jax.Array, stride: int = STRIDE) -> jax.Array:
    """Box codes ``(tx, ty, tw, th)`` (..., 4) of boxes (..., 4) relative to cell centres (..., 2).

    Inverse of :func:`decode_boxes` for boxes with positive width and height.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = 0.5 * (boxes[..., 0] + boxes[..., 2])
    cy = 0.5 * (boxes[..., 1] + boxes[..., 3])
    return jnp.stack(
        [
            (cx - centres[..., 0]) / stride,
            (cy - centres[..., 1]) / stride,
            jnp.log(jnp.maximum(w, 1e-6) / stride),
            jnp.log(jnp.maximum(h, 1e-6) / stride),
        ],
        axis=-1,
    )


def decode_boxes(codes: jax.Array, centres: jax.Array, stride: int = STRIDE) -> jax.Array:
    """Boxes ``[x0, y0, x1, y1]`` (..., 4) in pixels from codes (..., 4) and cell centres (..., 2).

    ``tw``/``th`` are clipped to [-6, 6] before ``exp`` so untrained outputs stay finite.
    """
    codes = jnp.asarray(codes)
    cx = centres[..., 0] + codes[..., 0] * stride
    cy = centres[..., 1] + codes[..., 1] * stride
    w = stride * jnp.exp(jnp.clip(codes[..., 2], -_LOG_SIZE_CLIP, _LOG_SIZE_CLIP))
    h = stride * jnp.exp(jnp.clip(codes[..., 3], -_LOG_SIZE_CLIP, _LOG_SIZE_CLIP))
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def decode(raw: jax.Array, num_classes: int, stride: int = STRIDE) -> dict[str, jax.Array]:
    """Raw map (N, h, w, 5 + C) -> padded proposals (``P = h * w``, row-major cells).

    Returns ``{"boxes": (N, P, 4) [x0, y0, x1, y1] px, "class_probs": (N, P, C) softmax,
    "objectness": (N, P) sigmoid, "class_logits": (N, P, C), "objectness_logits": (N, P),
    "box_codes": (N, P, 4)}``.
    """
    if raw.ndim != 4 or raw.shape[-1] != 5 + num_classes:
        raise ValueError(f"raw: expected shape (N, h, w, {5 + num_classes}), got {raw.shape}")
    n, gh, gw, _ = raw.shape
    flat = raw.reshape(n, gh * gw, 5 + num_classes)
    obj_logit = flat[..., 0]
    cls_logit = flat[..., 1 : 1 + num_classes]
    codes = flat[..., 1 + num_classes :]
    centres = cell_centres(gh, gw, stride).astype(raw.dtype)
    return {
        "boxes": decode_boxes(codes, centres, stride),
        "class_probs": jax.nn.softmax(cls_logit, axis=-1),
        "objectness": jax.nn.sigmoid(obj_logit),
        "class_logits": cls_logit,
        "objectness_logits": obj_logit,
        "box_codes": codes,
    }


def proposals(model: TinyDetector, variables: Mapping[str, Any], x: jax.Array) -> dict[str, jax.Array]:
    """The detector as D-RISE sees it: images -> fixed-size ("padded") proposals.

    Args:
      model: a :class:`TinyDetector` (``train=False``).
      variables: its ``params`` and ``batch_stats``.
      x: (N, H, W, 3) float32 RGB in [0, 1]; H, W multiples of 16.

    Returns:
      ``{"boxes": (N, P, 4) [x0, y0, x1, y1] pixels, "class_probs": (N, P, C) softmax,
      "objectness": (N, P) sigmoid}`` with ``P = (H/8) * (W/8)`` (one proposal per cell,
      row-major). Pure and traceable: ``jax.jit(functools.partial(proposals, model))`` and
      ``jax.vmap`` over images both work.
    """
    raw = model.apply(variables, x)
    out = decode(raw, model.num_classes, model.stride)
    return {k: out[k] for k in ("boxes", "class_probs", "objectness")}


def detect(
    props: Mapping[str, Any],
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    image_size: tuple[int, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Final detections from proposals: per-class scores, threshold, class-wise NMS (host side).

    The score of proposal ``p`` for class ``c`` is ``objectness[p] * class_probs[p, c]``;
    every (proposal, class) pair above ``score_threshold`` is a candidate (so a proposal
    may yield detections in several classes, as in VOC evaluations); NMS runs per class and
    the ``max_detections`` best survivors are kept.

    Args:
      props: the output of :func:`proposals` (batched: boxes (N, P, 4), ...).
      score_threshold: minimum score of a candidate.
      iou_threshold: NMS threshold.
      max_detections: per image.
      image_size: ``(H, W)``; when given, boxes are clipped to the image.

    Returns:
      per image ``{"boxes": (D, 4) float32, "scores": (D,) float32, "labels": (D,) int32}``
      sorted by decreasing score.
    """
    boxes = np.asarray(props["boxes"], np.float32)
    probs = np.asarray(props["class_probs"], np.float32)
    obj = np.asarray(props["objectness"], np.float32)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or probs.ndim != 3 or obj.shape != boxes.shape[:2]:
        raise ValueError(
            "props: expected boxes (N, P, 4), class_probs (N, P, C), objectness (N, P); got "
            f"{boxes.shape}, {probs.shape}, {obj.shape}"
        )
    if image_size is not None:
        h, w = image_size
        boxes = np.stack(
            [np.clip(boxes[..., 0], 0, w), np.clip(boxes[..., 1], 0, h), np.clip(boxes[..., 2], 0, w), np.clip(boxes[..., 3], 0, h)],
            -1,
        )
    out = []
    for b, p, o in zip(boxes, probs, obj):
        scores = o[:, None] * p  # (P, C)
        pi, ci = np.nonzero(scores > score_threshold)
        s = scores[pi, ci]
        keep = batched_nms(b[pi], s, ci, iou_threshold, max_detections)
        out.append(
            {"boxes": b[pi[keep]].astype(np.float32), "scores": s[keep].astype(np.float32), "labels": ci[keep].astype(np.int32)}
        )
    return out


# ----------------------------------------------------------------------------- training


#: Bias of the objectness predictor at initialisation: prior probability 0.01 (RetinaNet).
OBJECTNESS_PRIOR_BIAS = float(np.log(0.01 / 0.99))


def init_variables(model: TinyDetector, seed: int = 0, image_size: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    """Initial ``params``/``batch_stats`` drawn on the host from ``np.random.default_rng(seed)``.

    torchvision-like: convolution kernels He-normal with fan-out (std ``sqrt(2 / (kh*kw*out))``),
    the head's 1x1 predictors normal with std 0.01, biases 0 except the objectness bias
    (prior probability 0.01, RetinaNet-style), BatchNorm scale 1 / bias 0, running mean 0 /
    variance 1. Shapes come from ``jax.eval_shape`` (nothing is compiled: initialising with
    ``model.init``'s jitted random initialisers costs seconds of XLA compile time on CPU).
    Returns nested dicts of float32 NumPy arrays.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32))
    rng = np.random.default_rng(int(seed))
    predictors = {"objectness", "cls", "box"}

    def make(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        leaf = path[-1]
        if path[0] == "batch_stats":
            return (np.zeros if leaf == "mean" else np.ones)(shape, np.float32)
        if leaf == "kernel":
            if path[-2] in predictors:
                return rng.normal(0.0, 0.01, shape).astype(np.float32)
            fan_out = int(np.prod(shape[:-2])) * shape[-1]
            return rng.normal(0.0, np.sqrt(2.0 / fan_out), shape).astype(np.float32)
        if leaf == "scale":
            return np.ones(shape, np.float32)
        if leaf == "bias" and path[-2] == "objectness":
            return np.full(shape, OBJECTNESS_PRIOR_BIAS, np.float32)
        return np.zeros(shape, np.float32)

    def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = {}
        for k in sorted(tree):  # sorted: the draw order does not depend on dict order
            v = tree[k]
            out[k] = walk(v, path + (k,)) if isinstance(v, Mapping) else make(path + (k,), tuple(v.shape))
        return out

    return walk(shapes, ())


def assign_targets(
    boxes: list[np.ndarray],
    labels: list[np.ndarray],
    image_size: tuple[int, int],
    stride: int = STRIDE,
    radius: float = 1.5,
) -> dict[str, np.ndarray]:
    """Training targets on the stride-``stride`` grid (host side, NumPy).

    A cell is *positive* for an object when it is the cell containing the box centre, or
    when its centre lies inside the box and within ``radius * stride`` pixels of the box
    centre along both axes (centre sampling: up to 3x3 cells at ``radius=1.5``). Where
    objects compete for a cell the smaller box wins (boxes are written largest first).

    Args:
      boxes: per image (K_i, 4) ``[x0, y0, x1, y1)`` pixels.
      labels: per image (K_i,) class indices.
      image_size: ``(H, W)``.

    Returns:
      ``{"pos": (N, P) float32 0/1, "cls": (N, P) int32, "boxes": (N, P, 4) float32}``
      (class and box are meaningful where ``pos == 1``; elsewhere 0 and a dummy unit box).
    """
    if len(boxes) != len(labels):
        raise ValueError(f"boxes, labels: expected one entry per image each, got {len(boxes)} and {len(labels)}")
    h, w = image_size
    gh, gw = h // stride, w // stride
    p = gh * gw
    n = len(boxes)
    centres = np.asarray(cell_centres(gh, gw, stride))
    pos = np.zeros((n, p), np.float32)
    cls = np.zeros((n, p), np.int32)
    tbox = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (n, p, 1))
    for i, (b, lab) in enumerate(zip(boxes, labels)):  # images x objects (a handful), host side
        b = np.asarray(b, np.float32).reshape(-1, 4)
        lab = np.asarray(lab).reshape(-1)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        for k in np.argsort(-area, kind="stable"):
            x0, y0, x1, y1 = b[k]
            cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
            m = (
                (np.abs(centres[:, 0] - cx) < radius * stride)
                & (np.abs(centres[:, 1] - cy) < radius * stride)
                & (centres[:, 0] >= x0)
                & (centres[:, 0] < x1)
                & (centres[:, 1] >= y0)
                & (centres[:, 1] < y1)
            )
            ci = min(max(int(cx // stride), 0), gw - 1)
            ri = min(max(int(cy // stride), 0), gh - 1)
            m[ri * gw + ci] = True
            pos[i, m] = 1.0
            cls[i, m] = int(lab[k])
            tbox[i, m] = b[k]
    return {"pos": pos, "cls": cls, "boxes": tbox}


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Generalised IoU of matching boxes a, b (..., 4) ``[x0, y0, x1, y1)`` -> (...)."""
    area_a = jnp.maximum(a[..., 2] - a[..., 0], 0) * jnp.maximum(a[..., 3] - a[..., 1], 0)
    area_b = jnp.maximum(b[..., 2] - b[..., 0], 0) * jnp.maximum(b[..., 3] - b[..., 1], 0)
    iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
    ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / jnp.maximum(union, 1e-6)
    cw = jnp.maximum(a[..., 2], b[..., 2]) - jnp.minimum(a[..., 0], b[..., 0])
    ch = jnp.maximum(a[..., 3], b[..., 3]) - jnp.minimum(a[..., 1], b[..., 1])
    enclose = jnp.maximum(cw * ch, 1e-6)
    return iou - (enclose - union) / enclose


def detection_loss(
    raw: jax.Array,
    targets: Mapping[str, jax.Array],
    num_classes: int,
    stride: int = STRIDE,
    focal_gamma: float = 2.0,
    focal_alpha: float = 0.25,
    box_weight: float = 2.0,
    l1_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss of a raw map (N, h, w, 5 + C) against :func:`assign_targets` output.

    ``loss = focal(objectness) + CE(class) + box_weight * (1 - GIoU) + l1_weight * L1(codes)``:
    sigmoid focal loss on every cell, softmax cross-entropy, GIoU and L1 on the box code at
    positive cells; every term is summed and divided by the number of positives in the
    batch (at least 1). Returns ``(loss, {"obj", "cls", "giou", "l1"})``.
    """
    d = decode(raw, num_classes, stride)
    pos = targets["pos"].astype(raw.dtype)
    npos = jnp.maximum(jnp.sum(pos), 1.0)
    z = d["objectness_logits"]
    p = jax.nn.sigmoid(z)
    ce = jnp.maximum(z, 0) - z * pos + jnp.log1p(jnp.exp(-jnp.abs(z)))
    p_t = p * pos + (1 - p) * (1 - pos)
    a_t = focal_alpha * pos + (1 - focal_alpha) * (1 - pos)
    obj = jnp.sum(a_t * (1 - p_t) ** focal_gamma * ce) / npos
    logp = jax.nn.log_softmax(d["class_logits"], axis=-1)
    cls_nll = -jnp.take_along_axis(logp, targets["cls"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    cls = jnp.sum(cls_nll * pos) / npos
    g = jnp.sum((1.0 - giou(d["boxes"], targets["boxes"])) * pos) / npos
    gh, gw = raw.shape[1], raw.shape[2]
    t_codes = encode_boxes(targets["boxes"], cell_centres(gh, gw, stride), stride)
    l1 = jnp.sum(jnp.abs(d["box_codes"] - t_codes).sum(-1) * pos) / npos
    loss = obj + cls + box_weight * g + l1_weight * l1
    return loss, {"obj": obj, "cls": cls, "giou": g, "l1": l1}
