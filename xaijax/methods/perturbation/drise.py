"""D-RISE: black-box saliency for object detectors (Petsiuk et al., CVPR 2021).

D-RISE explains one *target detection* ``d_t = (L_t, P_t)`` — a box ``L_t`` and a class
vector ``P_t`` (one-hot of the detected class, or the detector's class probabilities) — of
an image ``x``. It probes the detector with the RISE masks ``M_i``
(:mod:`xaijax.methods.perturbation`: binary ``s x s`` grids with keep-probability ``p``,
bilinearly upsampled with a random shift; the same masks as ``rise`` for a seed) and weights
each mask by how well the detections on the masked image ``x * M_i`` still match the
target:

    w_i = max_j  IoU(L_t, L_j) * cos(P_t, P_j) * O_j,
    map = sum_i w_i M_i / N,

over the proposals ``j`` of the masked image (box ``L_j``, class probabilities ``P_j``,
objectness ``O_j``). The paper's saliency is the plain sum ``sum_i w_i M_i``; xaijax divides
by ``N`` so that maps for different ``N`` are comparable (RISE also divides by ``p``; the
D-RISE paper does not, and neither do we). Defaults from the paper: ``N = 5000`` masks,
``16 x 16`` grids, ``p = 0.5``.

The detector interface: any function ``detector_fn(images) -> proposals`` with images
``(M, H, W, C)`` float and proposals, *padded* to a fixed count ``P``, given as a mapping
``{"boxes": (M, P, 4), "class_probs": (M, P, K), "objectness": (M, P)}`` or a tuple in that
order. Boxes are ``[x1, y1, x2, y2]`` in pixels (``x2 >= x1``, ``y2 >= y1``); padding
proposals must have objectness 0 (their weight is then 0). It must be traceable (pure
``jax.numpy``: it is called inside ``lax.scan``). :func:`detector_function` adapts the
bundled :class:`~xaijax.models.detector.TinyDetector` (``proposals(model, variables, x)``);
the masked image is ``x * M`` in the detector's input space (for the TinyDetector: RGB in
[0, 1], masked pixels black, as in the paper).

Call signature (D-RISE is a *detection* method, ``kind = "detection"``; it does not take
``(model, variables, x, target)``)::

    DRise(...)(detector_fn, x, target_detection, key=None) -> (N, H, W), the dtype of x

``target_detection``: a mapping with ``"box"`` ((4,) or (N, 4)) and either ``"label"`` (int
or (N,) ints: one-hot class vectors) or ``"class_probs"`` ((K,) or (N, K) floats); or a
tuple ``(box, label_or_class_probs)``. ``key``: a JAX PRNG key or an int seed for the masks
(default ``jax.random.key(self.seed)``). Masks are generated inside the jitted scan from
``fold_in(key, i)`` in chunks of ``chunk``, exactly as RISE does, so a map depends only on
the key, the image size and the hyperparameters, never on ``chunk``, the batch or jit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import safe_divide
from xaijax.methods._core import Method, check_inputs
from xaijax.methods.perturbation.rise import rise_masks
from xaijax.methods.registry import register

__all__ = ["DRise", "box_iou", "detector_function", "detection_similarity", "normalize_proposals", "as_target_detection"]

DetectorFn = Callable[[jax.Array], Any]
_KEYS = ("boxes", "class_probs", "objectness")


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of boxes ``a`` (..., 4) and ``b`` (..., 4) ``[x1, y1, x2, y2]``, broadcast -> (...).

    Areas are ``(x2 - x1) * (y2 - y1)``; degenerate boxes have area 0 and a zero union gives 0.
    """
    iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_a = jnp.maximum(a[..., 2] - a[..., 0], 0.0) * jnp.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)
    union = area_a + area_b - inter
    return safe_divide(inter, union)  # union >= 0: a zero union gives 0


def detection_similarity(
    target_box: jax.Array, target_probs: jax.Array, boxes: jax.Array, probs: jax.Array, objectness: jax.Array
) -> jax.Array:
    """D-RISE weight ``max_j IoU x cosine x objectness`` of proposals against one target.

    Args: target box (4,), target class vector (K,), boxes (P, 4), class probabilities
    (P, K), objectness (P,). Returns a scalar, at least 0 (0 if there are no proposals; a
    zero class vector has cosine 0).
    """
    iou = box_iou(target_box[None, :], boxes)
    dot = probs @ target_probs
    norms = jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(target_probs)
    cos = safe_divide(dot, norms)  # norms >= 0: a zero class vector gives 0
    return jnp.max(iou * cos * objectness, initial=0.0)


def normalize_proposals(props: Any, m: int | None = None, k: int | None = None) -> dict[str, jax.Array]:
    """Check the detector output and return ``{"boxes", "class_probs", "objectness"}``.

    ``props``: a mapping with those keys or a 3-tuple in that order. ``m`` (number of images)
    and ``k`` (number of classes) are checked when given. Shapes only: works on tracers.

    Raises:
      ValueError: a missing key or a shape other than boxes (M, P, 4), class_probs (M, P, K),
        objectness (M, P).
    """
    if isinstance(props, Mapping):
        missing = [key for key in _KEYS if key not in props]
        if missing:
            raise ValueError(
                f"d-rise: detector output is missing {missing}; expected a mapping with keys {list(_KEYS)} "
                "(boxes (M, P, 4), class_probs (M, P, K), objectness (M, P))"
            )
        boxes, probs, obj = (props[key] for key in _KEYS)
    elif isinstance(props, (tuple, list)) and len(props) == 3:
        boxes, probs, obj = props
    else:
        raise ValueError(
            "d-rise: detector output must be a mapping {'boxes', 'class_probs', 'objectness'} or a tuple "
            f"(boxes, class_probs, objectness); got {type(props).__name__}"
        )
    boxes, probs, obj = jnp.asarray(boxes), jnp.asarray(probs), jnp.asarray(obj)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"d-rise: proposal boxes must have shape (M, P, 4) [x1, y1, x2, y2]; got {boxes.shape}")
    mm, p = boxes.shape[:2]
    if probs.ndim != 3 or probs.shape[:2] != (mm, p):
        raise ValueError(f"d-rise: class_probs must have shape (M, P, K) = ({mm}, {p}, K) like the boxes; got {probs.shape}")
    if obj.shape != (mm, p):
        raise ValueError(f"d-rise: objectness must have shape (M, P) = ({mm}, {p}); got {obj.shape}")
    if m is not None and mm != m:
        raise ValueError(f"d-rise: the detector returned proposals for {mm} images, expected {m} (one per input image)")
    if k is not None and probs.shape[-1] != k:
        raise ValueError(f"d-rise: class_probs have {probs.shape[-1]} classes, the target class vector has {k}")
    for name, v in zip(_KEYS, (boxes, probs, obj)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"d-rise: proposal {name} must be floating point, got dtype {v.dtype}")
    return {"boxes": boxes, "class_probs": probs, "objectness": obj}


def _check_box_values(boxes: np.ndarray, what: str) -> None:
    """Concrete boxes (..., 4): finite and ``x2 >= x1``, ``y2 >= y1``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"d-rise: {what} contain non-finite values")
    bad = np.nonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))[0]
    if bad.size:
        raise ValueError(
            f"d-rise: {what} must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1; box {int(bad[0])} is "
            f"{b[bad[0]].tolist()} (is it [x, y, w, h] or [y1, x1, y2, x2]?)"
        )


def as_target_detection(target: Any, n: int) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``(boxes (N, 4), labels (N,) or None, class_probs (N, K) or None)`` from a target detection."""
    if isinstance(target, Mapping):
        if "box" not in target:
            raise ValueError("d-rise: target_detection needs a 'box' [x1, y1, x2, y2]")
        has_label, has_probs = "label" in target, "class_probs" in target
        if has_label == has_probs:
            raise ValueError("d-rise: target_detection needs exactly one of 'label' (class index) or 'class_probs' (K,)")
        box = target["box"]
        cls = target["label"] if has_label else target["class_probs"]
        is_label = has_label
    elif isinstance(target, (tuple, list)) and len(target) == 2:
        box, cls = target
        is_label = jnp.issubdtype(jnp.asarray(cls).dtype, jnp.integer)
    else:
        raise ValueError(
            "d-rise: target_detection must be {'box': (4,), 'label': int} / {'box', 'class_probs': (K,)} "
            f"or a tuple (box, label_or_class_probs); got {type(target).__name__}"
        )
    box = jnp.asarray(box)
    if box.shape == (4,):
        box = jnp.broadcast_to(box, (n, 4))
    if box.shape != (n, 4):
        raise ValueError(f"d-rise: target box must have shape (4,) or ({n}, 4) [x1, y1, x2, y2]; got {box.shape}")
    if not isinstance(box, jax.core.Tracer):
        _check_box_values(box, "target boxes")
    if not jnp.issubdtype(box.dtype, jnp.floating):  # int pixel boxes; float boxes keep their precision
        box = box.astype(jnp.float32)
    cls = jnp.asarray(cls)
    if is_label:
        if not jnp.issubdtype(cls.dtype, jnp.integer):
            raise ValueError(f"d-rise: target 'label' must be an int class index, got dtype {cls.dtype}")
        if cls.ndim == 0:
            cls = jnp.broadcast_to(cls, (n,))
        if cls.shape != (n,):
            raise ValueError(f"d-rise: target label must be an int or ({n},) ints; got shape {cls.shape}")
        return box, cls, None
    if not jnp.issubdtype(cls.dtype, jnp.floating):
        raise ValueError(f"d-rise: target class_probs must be floating point, got dtype {cls.dtype}")
    if cls.ndim == 1:
        cls = jnp.broadcast_to(cls, (n, cls.shape[0]))
    if cls.ndim != 2 or cls.shape[0] != n:
        raise ValueError(f"d-rise: target class_probs must have shape (K,) or ({n}, K); got {cls.shape}")
    return box, None, cls


def detector_function(model: Any, variables: Mapping[str, Any]) -> DetectorFn:
    """``images -> proposals`` of the bundled TinyDetector (:func:`xaijax.models.detector.proposals`)."""
    from xaijax.models.detector import proposals

    return functools.partial(proposals, model, variables)


@dataclasses.dataclass(frozen=True)
class DRise(Method):
    """D-RISE saliency for one target detection per image (see the module docstring).

    Attributes:
      n: number of masks N (>= 1); the paper uses 5000.
      s: grid cells per side (>= 2); the paper uses 16.
      p: keep-probability of a cell, in (0, 1) (0.5).
      seed: PRNG seed of the masks when ``key`` is not passed.
      chunk: masks generated and applied per ``lax.scan`` step (the detector sees
        ``chunk x N`` images at once).
      check_proposals: run the detector once on the unmasked images (when they are concrete,
        i.e. outside ``jit``) to check box values ([x1, y1, x2, y2], finite) and the class
        count with a readable error; shapes are always checked.
    """

    kind: ClassVar[str] = "detection"

    n: int = 5000
    s: int = 16
    p: float = 0.5
    seed: int = 0
    chunk: int = 50
    check_proposals: bool = True

    def __post_init__(self) -> None:
        for name in ("n", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"d-rise: {name} must be a positive int (number of masks), got {v!r}")
        if isinstance(self.s, bool) or not isinstance(self.s, (int, np.integer)) or self.s < 2:
            raise ValueError(f"d-rise: s (grid cells per side) must be an int >= 2, got {self.s!r}")
        p = float(self.p)
        if not 0.0 < p < 1.0:
            raise ValueError(
                f"d-rise: p (keep probability of a grid cell) must be in (0, 1), got {self.p!r}"
                " (p = 1 keeps every pixel: all masks are ones and the map is constant)"
            )

    def __call__(self, detector_fn: DetectorFn, x: jax.Array, target_detection: Any, key: Any = None) -> jax.Array:
        """(N, H, W) D-RISE maps of ``x`` (N, H, W, C) for one target detection per image (``x``'s dtype)."""
        if not callable(detector_fn):
            raise TypeError(f"d-rise: detector_fn must be a function images -> proposals, got {detector_fn!r}")
        check_inputs(x)
        b, h, w, c = x.shape
        t_box, t_label, t_probs = as_target_detection(target_detection, b)
        shapes = jax.eval_shape(lambda xx: normalize_proposals(detector_fn(xx), m=xx.shape[0]), x)
        k = shapes["class_probs"].shape[-1]
        if t_label is not None:
            if not isinstance(t_label, jax.core.Tracer):
                lab = np.asarray(t_label)
                if np.any((lab < 0) | (lab >= k)):
                    raise ValueError(f"d-rise: target label {int(lab[(lab < 0) | (lab >= k)][0])} out of range for {k} classes")
            t_probs = jax.nn.one_hot(t_label, k, dtype=jnp.float32)
        elif t_probs.shape[-1] != k:
            raise ValueError(f"d-rise: target class_probs have {t_probs.shape[-1]} classes, the detector has {k}")
        if self.check_proposals and not isinstance(x, jax.core.Tracer):
            props = normalize_proposals(detector_fn(x), m=b, k=k)
            _check_box_values(props["boxes"], "proposal boxes returned by the detector")
        if key is None:
            key = jax.random.key(self.seed)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            key = jax.random.key(int(key))
        return _drise(detector_fn, x, t_box, t_probs, key, int(self.n), int(self.s), float(self.p), int(self.chunk))


def _drise(detector_fn, x, t_box, t_probs, key, n: int, s: int, p: float, chunk: int) -> jax.Array:
    b, h, w, c = x.shape
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    sim = jax.vmap(jax.vmap(detection_similarity, in_axes=(0, 0, 0, 0, 0)), in_axes=(None, None, 0, 0, 0))

    dt = x.dtype  # a float64 run stays float64
    t_box, t_probs = t_box.astype(dt), t_probs.astype(dt)

    def step(acc, ci):
        idx = ci * chunk + jnp.arange(chunk)
        masks = rise_masks(key, idx, (h, w), s, p).astype(dt)  # (m, H, W)
        xm = (x[None] * masks[:, None, :, :, None]).reshape((chunk * b, h, w, c))
        props = normalize_proposals(detector_fn(xm), m=chunk * b)
        boxes = props["boxes"].astype(dt).reshape((chunk, b) + props["boxes"].shape[1:])
        probs = props["class_probs"].astype(dt).reshape((chunk, b) + props["class_probs"].shape[1:])
        obj = props["objectness"].astype(dt).reshape((chunk, b, -1))
        wts = sim(t_box, t_probs, boxes, probs, obj)  # (m, B)
        wts = jnp.where((idx < n)[:, None], wts, 0.0)
        return acc + jnp.einsum("mb,mhw->bhw", wts, masks, precision=jax.lax.Precision.HIGHEST), None

    acc0 = jnp.zeros((b, h, w), dt)
    sal, _ = jax.lax.scan(step, acc0, jnp.arange(n_chunks))
    return sal / n


register(
    "d-rise",
    DRise,
    "D-RISE (Petsiuk et al. 2021): RISE masks weighted by detection similarity (detector explanations; kind='detection')",
)
