"""Targets other than a classifier logit, as model wrappers every method can explain.

A method explains ``score = sum(seed * model(x))`` of an (N, K) output. To explain something
else — a layer's activation, one unit of it, a detection, a region of a segmentation map — wrap
the model in a module whose output *is* that quantity, shaped (N, K), and pass the wrapper
where the model goes::

    from xaijax import methods
    from xaijax.methods.targets import LayerOutput

    wrapped = LayerOutput(model, "layer3")                 # (N, C): channel totals of layer3
    g = methods.get("gradient")(wrapped, variables, x, 7)  # explains channel 7 of layer3
    r = methods.get("lrp-epsilon")(wrapped, variables, x, 7)
    c = methods.get("grad-cam", layer="layer2")(wrapped, variables, x, 7)

No method is copied: every method (gradient family, integrated gradients, the CAM family at a
layer *before* the target, RISE and other perturbation methods, the rule-based propagation of
LRP/EB/RAP/RSP) runs unchanged on the wrapper.

How the wrappers stay transparent (all three share :class:`TargetWrapper`):

* **Same variables, same layer names.** The wrapper shares the wrapped model's scope
  (``flax.linen.share_scope``): it takes the model's *original* variables unchanged (no
  ``{"params": {"model": ...}}`` nesting) and every layer keeps its dotted name (``layer3``,
  ``features.29``), so ``layer=`` arguments, taps and composites' name patterns address the
  wrapped model exactly as the bare one. The wrapped model itself is not a separate layer (it
  has the root's empty name).
* **Declared facts are forwarded**: ``cam_layer``, ``excitation_layer``, ``num_prefix_tokens``,
  ``grid_size``, ``image_size`` and ``attention_layers`` read the wrapped model's attributes, so
  default CAM layers and ViT token grids resolve as before. A CAM layer *after* the target layer
  (the default ``cam_layer`` when the target is an earlier layer) has a zero gradient: pass
  ``layer=`` below the target.
* **Propagation.** The engine (:mod:`xaijax.propagation.engine`) sees the wrapped model's
  layers and gives them their rules; the wrapper's own operations (a spatial sum, indexing,
  multiplication by a mask) are functional operations with rules (sum: z-rule; re-arrangements:
  their derivative; scaling by a constant: relevance passes), so relevance is conserved from the
  wrapper's output down to the target layer. Layers the model calls *after* the target layer
  are dead code (their outputs reach nothing), and XLA drops them under ``jit``; composites that
  single out the model's *last* dense layer (contrastive Excitation Backprop) still see the
  classifier as that layer.

Methods that score with a softmax over the outputs (RISE's default ``score="prob"``, Score-CAM)
treat the wrapper's K outputs as classes: for channel totals or region sums that softmax has no
meaning (and large totals give probabilities ~0). Use raw scores (``rise`` with
``score="logit"``).

Data a target needs per image (a segmentation region's mask, a detection's boxes and labels)
are arrays, not module fields (a module must stay hashable: it is a static argument of
``jax.jit``): they travel in the variables, in the collection :data:`TARGET_COLLECTION`, added
by :func:`attach` (``variables`` stays otherwise unchanged). Per-image data, with a leading
batch axis ``N``, must meet forward passes of batch ``N``: that holds for the gradient family,
integrated gradients, the CAM family and propagation methods; methods that stack several
perturbed copies of the batch into one forward pass (RISE, Score-CAM) need shared data (no batch
axis) or one image per call. A mismatch raises a ``ValueError``.

Layer attribution (attributions *at* a layer rather than at the input) are methods of their
own, registered here: ``linear-approx`` (TorchRay's ``linear_approx``; Captum's
``LayerGradientXActivation``) and ``layer-integrated-gradients`` (Captum's
``LayerIntegratedGradients``). Both are ``kind = "cam"`` methods (``layer_map`` at the layer's
resolution, ``__call__`` upsampled to the input, *no* ReLU) with an ``attribution`` method that
returns the per-channel attribution of the layer's output shape, as the peers do.
:class:`LayerAttribution` (not registered: it takes a method) runs *any* classifier method with a
layer's activation as the input (gradient x activation, IG from a zero activation, LRP relevance
arriving at the layer as Captum's ``LayerLRP``); see its docstring for what it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import Method, check_inputs, layer_gradients, target_score, token_grid, validate_positive_int
from xaijax.methods.cam import default_cam_layer, upsample_bilinear
from xaijax.methods.gradient import quadrature
from xaijax.methods.registry import register
from xaijax.models import taps

__all__ = [
    "TARGET_COLLECTION",
    "attach",
    "TargetWrapper",
    "LayerOutput",
    "SegmentationRegion",
    "DetectionScore",
    "greedy_nms",
    "LinearApprox",
    "LayerIntegratedGradients",
    "LayerAttribution",
]

#: The variable collection that carries a target's per-image data (see :func:`attach`).
TARGET_COLLECTION = "xaijax_target"

#: Attributes a model declares for methods (default layers, token grids, input size), forwarded
#: by every wrapper.
_FORWARDED = ("cam_layer", "excitation_layer", "num_prefix_tokens", "grid_size", "image_size", "attention_layers")


def attach(variables: Mapping[str, Any], **data: Any) -> dict[str, Any]:
    """``variables`` plus the target data ``data`` in the collection :data:`TARGET_COLLECTION`.

    ``SegmentationRegion`` reads ``mask``; ``DetectionScore`` reads ``boxes`` and ``labels``.
    The other collections are passed through unchanged (a copy of the top-level dict).
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping of collections (params, batch_stats, ...); got {type(variables).__name__}")
    if not data:
        raise ValueError("attach: give the target's data as keywords, e.g. attach(variables, mask=mask)")
    out = dict(variables)
    previous = dict(out.get(TARGET_COLLECTION, {}))
    previous.update({k: jnp.asarray(v) for k, v in data.items()})
    out[TARGET_COLLECTION] = previous
    return out


@contextlib.contextmanager
def _outermost(interceptor: Any) -> Iterator[None]:
    """Register a ``flax.linen`` method interceptor as the *outermost* one (called first).

    ``nn.intercept_methods`` makes a newly registered interceptor the innermost: it would see a
    layer's output before the interceptors already active outside the wrapper (the propagation
    engine, which replaces leaf-layer calls by rule-carrying custom VJPs without calling the
    inner interceptors, and :func:`xaijax.models.taps.forward`'s ``add``, which adds its probe
    after them). Capturing the target layer must see the output that the rest of the model sees,
    so the capture goes first in Flax's interceptor stack (``flax.linen.module``'s thread-local
    ``_global_interceptor_stack``, whose first element is the outermost interceptor). It only
    observes: it returns every output unchanged.
    """
    from flax.linen import module as flax_module

    storage = getattr(getattr(flax_module, "_global_interceptor_stack", None), "_storage", None)
    if not isinstance(storage, list):  # pragma: no cover - a Flax version without that stack
        raise RuntimeError(
            "xaijax.methods.targets needs flax.linen.module._global_interceptor_stack (Flax 0.8 - 0.12); "
            "this Flax version has none"
        )
    storage.insert(0, interceptor)
    try:
        yield
    finally:
        for i, f in enumerate(storage):
            if f is interceptor:
                del storage[i]
                break


def _forwarded(name: str) -> property:
    """A read-only attribute of a wrapper that is the wrapped model's ``name`` (None if it has none)."""
    return property(lambda self: getattr(self.model, name, None), doc=f"The wrapped model's ``{name}``.")


class TargetWrapper(nn.Module):
    """Base of the target wrappers: shares the wrapped ``model``'s scope (original variables and
    layer names) and forwards the attributes models declare for methods (see the module docstring).

    Subclasses implement ``__call__(x) -> (N, K)``, calling ``self.model`` once.
    """

    model: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    # forwarded declarations (None where the wrapped model declares none)
    cam_layer = _forwarded("cam_layer")
    excitation_layer = _forwarded("excitation_layer")
    num_prefix_tokens = _forwarded("num_prefix_tokens")
    grid_size = _forwarded("grid_size")
    image_size = _forwarded("image_size")
    attention_layers = _forwarded("attention_layers")

    def _data(self, name: str, owner: str) -> jax.Array:
        """The target datum ``name`` from the variables' :data:`TARGET_COLLECTION`."""
        if not self.has_variable(TARGET_COLLECTION, name):
            raise ValueError(
                f"{owner} needs its {name!r} in the variables: pass "
                f"xaijax.methods.targets.attach(variables, {name}=...) instead of the model's variables"
            )
        return jnp.asarray(self.get_variable(TARGET_COLLECTION, name))


def _per_image(a: jax.Array, batch: int, item_ndim: int, what: str, owner: str) -> jax.Array:
    """``a`` with a leading batch axis: shared data (``item_ndim`` dims) broadcast to ``batch``;
    per-image data must have exactly ``batch`` rows."""
    if a.ndim == item_ndim:
        return jnp.broadcast_to(a, (batch,) + a.shape)
    if a.ndim == item_ndim + 1:
        if a.shape[0] != batch:
            raise ValueError(
                f"{owner}: {what} has {a.shape[0]} rows (one per image) but the forward pass has a batch of {batch}; "
                "per-image target data need forward passes of the same batch (see xaijax.methods.targets): "
                "give shared data without the batch axis or explain one image per call"
            )
        return a
    raise ValueError(f"{owner}: {what} must have {item_ndim} dims (shared) or {item_ndim + 1} (per image); got shape {a.shape}")


# ------------------------------------------------------------------------------ layer / neuron


_REDUCTIONS = ("sum", "mean")


class LayerOutput(TargetWrapper):
    """A layer's activation (or one unit of it) as the model output: layer and neuron targets.

    Attributes:
      model: the model to wrap (its variables are used unchanged).
      layer: dotted name of the layer (``"layer3"``, ``"features.20"``, ``"layer4.1.relu"``;
        see :func:`xaijax.models.taps.layer_names`). It must be called exactly once.
      unit: ``None`` (default): the output is (N, K), one score per channel (last axis) of the
        layer output, reduced over every other axis (positions, tokens) by ``reduce``; explain
        channel ``c`` with ``target=c`` (Captum's ``LayerActivation`` summed per channel, the
        channel objective of feature visualisation). An int or a tuple of ints: one *unit*,
        the index into the layer output without its batch axis (``(i, j, c)`` for an NHWC map,
        ``(t, d)`` for tokens, ``d`` for a dense layer); the output is (N, 1) and the target
        is ``0`` (Captum's ``Neuron*`` methods with a tuple ``neuron_selector``).
      reduce: ``"sum"`` (default) or ``"mean"`` over positions (ignored for a unit).

    ``__call__(x) -> (N, K)`` or (N, 1) in the layer's dtype.

    Raises:
      ValueError: an unknown layer (with suggestions), a layer called more than once or
        returning a tuple, a unit of the wrong length or out of range, an unknown ``reduce``.
    """

    layer: str = ""
    unit: int | tuple[int, ...] | None = None
    reduce: str = "sum"

    def __call__(self, x: jax.Array) -> jax.Array:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"LayerOutput: layer must be a dotted layer name, got {self.layer!r}")
        if self.reduce not in _REDUCTIONS:
            raise ValueError(f"LayerOutput: reduce must be one of {_REDUCTIONS}, got {self.reduce!r}")
        seen: list[str] = []
        captured: list[Any] = []

        def on_call(name, module, call_next, args, kwargs):
            out = call_next(*args, **kwargs)
            if name:
                seen.append(name)
            if name == self.layer:
                captured.append(out)
            return out

        with _outermost(taps.call_interceptor(on_call)):
            self.model(x)
        if not captured:
            known = list(dict.fromkeys(seen))
            close = difflib.get_close_matches(self.layer, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"LayerOutput: unknown layer name {self.layer!r}{hint}; the model has {len(known)} named layers, e.g. "
                + ", ".join(repr(k) for k in known[:: max(1, len(known) // 8)][:8])
            )
        if len(captured) > 1:
            raise ValueError(f"LayerOutput: layer {self.layer!r} is called {len(captured)} times; pick a layer called once")
        a = captured[0]
        if not isinstance(a, jax.Array):
            raise ValueError(f"LayerOutput: layer {self.layer!r} returns {type(a).__name__}, not one array")
        if a.ndim < 2:
            raise ValueError(f"LayerOutput: layer {self.layer!r} outputs shape {a.shape}; expected (N, ..., C)")
        if self.unit is None:
            axes = tuple(range(1, a.ndim - 1))
            if not axes:
                return a
            return a.sum(axes) if self.reduce == "sum" else a.mean(axes)
        unit = (self.unit,) if isinstance(self.unit, (int, np.integer)) else tuple(self.unit)
        if len(unit) != a.ndim - 1 or any(isinstance(u, bool) or not isinstance(u, (int, np.integer)) for u in unit):
            raise ValueError(
                f"LayerOutput: unit must be {a.ndim - 1} int(s) indexing layer {self.layer!r}'s output "
                f"{a.shape[1:]} (without the batch axis); got {self.unit!r}"
            )
        if any(not 0 <= int(u) < s for u, s in zip(unit, a.shape[1:])):
            raise ValueError(f"LayerOutput: unit {unit} is out of range for layer {self.layer!r}'s output {a.shape[1:]}")
        return a[(slice(None),) + tuple(int(u) for u in unit)][:, None]


# ------------------------------------------------------------------------------ segmentation


class SegmentationRegion(TargetWrapper):
    """A segmentation model's class scores summed over a region: (N, H, W, K) -> (N, K).

    ``out[n, k] = sum_hw mask[n, h, w] * model(x)[n, h, w, k]`` (pytorch-grad-cam's
    ``SemanticSegmentationTarget``: the sum of a class's scores over the pixels of a mask; explain
    class ``k`` with ``target=k``). The mask comes from the variables:
    ``attach(variables, mask=mask)``, shape (H, W) (shared by the batch) or (N, H, W) (per image),
    with the *output's* spatial size; binary or float weights (a soft region). With
    ``reduce="mean"`` the sum is divided by the mask's total (the region's mean score; 0 for an
    empty mask).

    pytorch-grad-cam applies the target to whatever the model returns (raw logits in its
    tutorial, or softmax probabilities when the user adds one); here too the wrapped model's
    output is used as is: wrap a model that ends in a softmax for probabilities.

    Raises:
      ValueError: the model output is not (N, H, W, K), or the mask's shape does not match it.
    """

    reduce: str = "sum"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.reduce not in _REDUCTIONS:
            raise ValueError(f"SegmentationRegion: reduce must be one of {_REDUCTIONS}, got {self.reduce!r}")
        out = self.model(x)
        if not isinstance(out, jax.Array) or out.ndim != 4:
            shape = getattr(out, "shape", type(out).__name__)
            raise ValueError(f"SegmentationRegion: the model must return (N, H, W, K) class scores per pixel; got {shape}")
        mask = _per_image(self._data("mask", "SegmentationRegion"), out.shape[0], 2, "mask", "SegmentationRegion")
        if mask.shape[1:] != out.shape[1:3]:
            raise ValueError(
                f"SegmentationRegion: mask of spatial shape {mask.shape[1:]} does not match the model output's "
                f"{out.shape[1:3]} (resize the mask to the output size)"
            )
        mask = mask.astype(out.dtype)
        total = (mask[..., None] * out).sum((1, 2))
        if self.reduce == "mean":
            size = mask.sum((1, 2))[:, None]
            total = total / jnp.where(size == 0, 1.0, size)
        return total


# ------------------------------------------------------------------------------ detection


def greedy_nms(boxes: jax.Array, scores: jax.Array, candidates: jax.Array, iou_threshold: float) -> jax.Array:
    """Greedy non-maximum suppression, traceable: (P,) bool of the boxes kept.

    Candidates are visited by decreasing score (ties: lower index first, as a stable sort); a
    candidate is kept unless its IoU with an already kept box exceeds ``iou_threshold`` (the
    rule of ``torchvision.ops.nms`` and :func:`xaijax.metrics.detection.batched_nms`). The result
    is a selection: no gradient flows through it (``stop_gradient``).

    Args: boxes (P, 4) ``[x1, y1, x2, y2]``, scores (P,), candidates (P,) bool.
    """
    from xaijax.methods.perturbation.drise import box_iou

    boxes = jax.lax.stop_gradient(boxes)
    scores = jax.lax.stop_gradient(scores)
    p = boxes.shape[0]
    order = jnp.argsort(-scores, stable=True)
    b = boxes[order]
    cand = candidates[order]
    iou = box_iou(b[:, None, :], b[None, :, :])  # (P, P)

    def body(i, keep):
        suppressed = jnp.any(keep & (iou[i] > iou_threshold))
        return keep.at[i].set(cand[i] & ~suppressed)

    keep_sorted = jax.lax.fori_loop(0, p, body, jnp.zeros((p,), bool))
    return jnp.zeros((p,), bool).at[order].set(keep_sorted)


class DetectionScore(TargetWrapper):
    """A detection's box score as the model output (N, 1): pytorch-grad-cam's
    ``FasterRCNNBoxScoreTarget`` for the bundled :class:`~xaijax.models.detector.TinyDetector`.

    Target detections come from the variables: ``attach(variables, boxes=..., labels=...)``,
    boxes ``[x1, y1, x2, y2]`` in pixels, shape (T, 4) (shared) or (N, T, 4) (per image), and int
    labels (T,) or (N, T); a label ``-1`` marks padding (no target). For each image:

    * the detector's proposals (:func:`xaijax.models.detector.decode`: one box per cell, score
      ``objectness * class_prob[c]`` for class ``c``) become the detections of
      :func:`xaijax.models.detector.detect`: candidates with a score above
      ``score_threshold``, class-wise greedy NMS at ``nms_threshold`` (:func:`greedy_nms`; no
      ``max_detections`` cap, no clipping to the image);
    * for each target (box ``B_t``, label ``c_t``): the detection *of class* ``c_t`` with the
      largest IoU with ``B_t``; if that IoU exceeds ``iou_threshold`` it contributes
      ``IoU + score``, else 0;
    * the output is the sum over targets, (N, 1): explain it with ``target=0``.

    Differentiable: the matched detection's IoU (through its box regression, ``decode_boxes``)
    and its score (objectness and class softmax). Not differentiable (fixed from the forward
    pass, as in the peer, where torchvision's NMS and the argmax are not differentiated either):
    which proposals survive the threshold and NMS, which detection matches, and whether the IoU
    passes ``iou_threshold``.

    Where the peer differs: pytorch-grad-cam takes the best-overlapping detection of *any* class
    and scores it only if its label equals the target's; a TinyDetector proposal yields a
    detection in every class above the threshold, so here the match is searched among the target
    class's detections (the same result whenever the best-overlapping detection has the target's
    class).

    Attributes:
      model: a :class:`~xaijax.models.detector.TinyDetector` (eval mode) or any module returning
        its raw map layout (N, h, w, 5 + C) and declaring ``num_classes`` and ``stride``.
      iou_threshold: minimum IoU (strict) of a match (0.5, the peer's default).
      score_threshold: candidate score threshold (0.05, :func:`~xaijax.models.detector.detect`).
      nms_threshold: class-wise NMS IoU threshold (0.5, likewise).
    """

    iou_threshold: float = 0.5
    score_threshold: float = 0.05
    nms_threshold: float = 0.5

    @property
    def cam_layer(self) -> Any:
        """The wrapped detector's ``cam_layer`` if it declares one, else its head's ReLU
        (``head.relu``: the last feature map before the predictors)."""
        return getattr(self.model, "cam_layer", None) or "head.relu"

    def __call__(self, x: jax.Array) -> jax.Array:
        from xaijax.methods.perturbation.drise import box_iou
        from xaijax.models.detector import decode

        raw = self.model(x)
        k = getattr(self.model, "num_classes", None)
        stride = getattr(self.model, "stride", None)
        if not isinstance(k, (int, np.integer)) or not isinstance(stride, (int, np.integer)):
            raise ValueError(
                f"DetectionScore wraps a TinyDetector-like model declaring num_classes and stride; "
                f"{type(self.model).__name__} declares num_classes={k!r}, stride={stride!r}"
            )
        props = decode(raw, int(k), int(stride))
        boxes, probs, obj = props["boxes"], props["class_probs"], props["objectness"]
        n = raw.shape[0]
        t_boxes = _per_image(self._data("boxes", "DetectionScore"), n, 2, "boxes", "DetectionScore")
        labels = _per_image(self._data("labels", "DetectionScore"), n, 1, "labels", "DetectionScore")
        if t_boxes.shape[-1] != 4 or labels.shape != t_boxes.shape[:2]:
            raise ValueError(
                f"DetectionScore: boxes must be (T, 4) or (N, T, 4) and labels (T,) or (N, T) with the same T; "
                f"got {t_boxes.shape} and {labels.shape}"
            )
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"DetectionScore: labels must be int class indices (-1: padding); got dtype {labels.dtype}")
        t_boxes = t_boxes.astype(boxes.dtype)
        iou_thr, score_thr, nms_thr = float(self.iou_threshold), float(self.score_threshold), float(self.nms_threshold)

        def one_target(b, p, o, tb, tl):
            valid = (tl >= 0) & (tl < k)
            c = jnp.clip(tl, 0, k - 1)
            scores = o * p[:, c]  # (P,)
            keep = greedy_nms(b, scores, scores > score_thr, nms_thr)
            ious = box_iou(tb[None, :], b)  # (P,)
            j = jnp.argmax(jnp.where(keep, jax.lax.stop_gradient(ious), -1.0))
            matched = valid & keep[j] & (jax.lax.stop_gradient(ious[j]) > iou_thr)
            return jnp.where(matched, ious[j] + scores[j], jnp.zeros((), scores.dtype))

        per_target = jax.vmap(jax.vmap(one_target, in_axes=(None, None, None, 0, 0)))(boxes, probs, obj, t_boxes, labels)
        return per_target.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------ layer attribution


def _check_layer_output(layer: str, a: jax.Array) -> None:
    if not isinstance(a, jax.Array) or a.ndim < 2:
        raise ValueError(f"layer {layer!r} must output one array (N, ..., C); got {getattr(a, 'shape', type(a).__name__)}")


def _layer_map(model: nn.Module, layer: str, attribution: jax.Array) -> jax.Array:
    """Channel sum of a per-channel layer attribution as an (N, h, w) map (tokens: the patch grid)."""
    grid = token_grid(model, attribution, layer)
    if grid.ndim != 4:
        raise ValueError(f"layer {layer!r} outputs {attribution.shape}; a map needs an NHWC feature map or ViT tokens")
    return grid.sum(-1)


@dataclasses.dataclass(frozen=True)
class LinearApprox(Method):
    """Layer gradient x activation: ``A * dS/dA`` at a layer (TorchRay's ``linear_approx``,
    Captum's ``LayerGradientXActivation``; the first-order Taylor term of the score in the layer's
    activation, used as a saliency by Bach et al./Kindermans et al. and in TorchRay's benchmark).

    ``attribution(...)`` gives the per-channel attribution of the layer output's shape (Captum's
    result, NHWC); :meth:`layer_map` its channel sum (N, h, w) (TorchRay's ``linear_approx``
    saliency); ``__call__`` that map upsampled bilinearly to the input (``align_corners=False``,
    TorchRay's ``resize=True``). No ReLU (neither peer applies one). ``S = sum(seed * model(x))``.

    Attributes:
      layer: dotted layer name; ``None``: the model's ``cam_layer`` (TorchRay's examples use
        VGG16 ``features.29`` / ResNet50 ``layer4``; the peers have no default).
    """

    kind = "cam"
    has_layer_map = True

    layer: str | None = None

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel ``A * dS/dA``, the layer output's shape."""
        check_inputs(x)
        name = default_cam_layer(model) if self.layer is None else self.layer
        acts, grads, _ = layer_gradients(model, variables, x, target, [name])
        _check_layer_output(name, acts[name])
        return acts[name] * grads[name]

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w): the channel sum of :meth:`attribution` at the layer's resolution."""
        name = default_cam_layer(model) if self.layer is None else self.layer
        return _layer_map(model, name, self.attribution(model, variables, x, target))

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map: :meth:`layer_map` upsampled to the input size."""
        check_inputs(x)
        return upsample_bilinear(self.layer_map(model, variables, x, target), x.shape[1:3])


@dataclasses.dataclass(frozen=True, eq=False)
class LayerIntegratedGradients(Method):
    """Integrated gradients at a layer (Captum's ``LayerIntegratedGradients``).

    With ``a = A(x)`` and ``a' = A(x')`` the layer's activations for the input and the baseline
    input, ``attribution = (a - a') * sum_k w_k dS/dA (a' + alpha_k (a - a'))``: the path runs
    in the layer's activation space, the gradient is taken with the layer's output *replaced* by
    the path point (the layers above see it; the layers below still compute ``A(x)``), exactly
    as Captum's forward hook does. Completeness: the attribution sums to
    ``S(a) - S(a')`` up to the quadrature error.

    ``attribution(...)`` is per channel (the layer output's shape), :meth:`layer_map` its channel
    sum at the layer's resolution, ``__call__`` that map upsampled to the input; no ReLU.

    Attributes:
      layer: dotted layer name; ``None``: the model's ``cam_layer``.
      baseline: the baseline *input* ``x'`` (scalar or broadcastable to ``x``; default 0, as
        Captum and :class:`~xaijax.methods.gradient.IntegratedGradients`).
      steps, rule: quadrature (:func:`~xaijax.methods.gradient.quadrature`). Default 32 nodes,
        ``riemann-right``, as xaijax's ``integrated-gradients``; Captum's default is 50 nodes
        ``gausslegendre`` (pass ``steps=50, rule="gauss-legendre"`` to match it).
      chunk: nodes per vmapped gradient call (``None``: all at once; else ``lax.map`` chunks).

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    kind = "cam"
    has_layer_map = True

    layer: str | None = None
    baseline: Any = 0.0
    steps: int = 32
    rule: str = "riemann-right"
    chunk: int | None = None

    def __post_init__(self) -> None:
        quadrature(self.rule, self.steps)  # validates rule and steps
        validate_positive_int("layer-integrated-gradients", "chunk", self.chunk, optional=True)

    def attribution(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, baseline: Any = None
    ) -> jax.Array:
        """Per-channel layer attribution, the layer output's shape."""
        check_inputs(x)
        name = default_cam_layer(model) if self.layer is None else self.layer
        base = jnp.asarray(self.baseline if baseline is None else baseline, x.dtype)
        try:
            base = jnp.broadcast_to(base, x.shape)
        except ValueError:
            raise ValueError(
                f"layer-integrated-gradients: baseline of shape {base.shape} does not broadcast to the input shape {x.shape}"
            ) from None
        _, ax = taps.forward(model, variables, x, capture=[name])
        _, ab = taps.forward(model, variables, base, capture=[name])
        a, a0 = ax[name], ab[name]
        _check_layer_output(name, a)
        alphas, weights = quadrature(self.rule, self.steps)
        alphas = jnp.asarray(alphas, a.dtype)
        weights = jnp.asarray(weights, a.dtype)
        delta = a - a0

        def score(d: jax.Array) -> jax.Array:  # S with the layer's output a + d
            out, _ = taps.forward(model, variables, x, add={name: d})
            return target_score(out, target)

        grad = jax.grad(score)

        def at(aw: tuple[jax.Array, jax.Array]) -> jax.Array:
            al, w = aw
            return w * grad(a0 + al * delta - a)  # output replaced by a0 + alpha (a - a0)

        if self.chunk is None or self.chunk >= self.steps:
            grads = jax.vmap(at)((alphas, weights))
        else:
            grads = jax.lax.map(at, (alphas, weights), batch_size=self.chunk)
        return delta * grads.sum(0)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w): the channel sum of :meth:`attribution` at the layer's resolution."""
        name = default_cam_layer(model) if self.layer is None else self.layer
        return _layer_map(model, name, self.attribution(model, variables, x, target))

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map: :meth:`layer_map` upsampled to the input size."""
        check_inputs(x)
        return upsample_bilinear(self.layer_map(model, variables, x, target), x.shape[1:3])


class _FromLayer(TargetWrapper):
    """The model as a function of one layer's activation: ``__call__(a)`` runs the model on the
    real input (``layer_input`` in the target collection) with ``layer``'s output replaced by
    ``a`` (what the layers above see; the layers below still run on the real input)."""

    layer: str = ""

    def __call__(self, a: jax.Array) -> jax.Array:
        x = self._data("layer_input", "LayerAttribution")
        if a.shape[0] != x.shape[0]:
            raise ValueError(
                f"LayerAttribution: the method evaluated the model on a batch of {a.shape[0]} activations for "
                f"{x.shape[0]} input(s); layer attribution needs methods whose forward passes keep the batch "
                "(gradient family, integrated gradients, LRP; not RISE-style stacking of perturbed copies)"
            )
        replaced: list[Any] = []

        def on_call(name, module, call_next, args, kwargs):
            out = call_next(*args, **kwargs)
            if name != self.layer:
                return out
            if replaced:
                raise ValueError(f"LayerAttribution: layer {self.layer!r} is called more than once")
            if not isinstance(out, jax.Array) or out.shape != a.shape:
                raise ValueError(
                    f"LayerAttribution: layer {self.layer!r} outputs {getattr(out, 'shape', type(out).__name__)}, "
                    f"the activations given have shape {a.shape}"
                )
            replaced.append(True)
            return a.astype(out.dtype)

        with _outermost(taps.call_interceptor(on_call)):
            out = self.model(x)
        if not replaced:
            raise ValueError(f"LayerAttribution: layer {self.layer!r} is not called by {type(self.model).__name__}")
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class LayerAttribution(Method):
    """Any input-attribution method applied at a layer: the layer's activation ``A(x)`` is the
    "input" and the model above the layer the function explained (Captum's ``Layer*`` pattern).

    ``layer_map`` is the wrapped method's map over the layer's positions, (N, h, w), after its own
    channel reduction; ``__call__`` upsamples it to the input size (bilinear,
    ``align_corners=False``). Examples: ``Gradient(times_input=True, reduce="sum")`` gives
    gradient x activation (= ``linear-approx``); ``IntegratedGradients()`` integrates from a
    *zero activation* (Captum's ``LayerIntegratedGradients`` starts at the baseline input's
    activation: use ``layer-integrated-gradients`` for that); an LRP method gives the relevance
    arriving at the layer (Captum's ``LayerLRP``).

    What it needs: a layer with an NHWC output (N, h, w, C) called once; a method that calls the
    model on batches of the same size as ``x`` (gradient family, integrated gradients,
    SmoothGrad, LRP and the other propagation methods; not RISE or Score-CAM, which stack
    perturbed copies: a ``ValueError`` says so). Propagation composites that give the *first*
    convolution of the model a special rule (``epsilon-gamma-box``'s z^B, the ``flat`` input
    rules) still assign it to the model's first convolution, below the layer, not to the first
    layer above it: use composites without a first-layer rule here.

    Attributes:
      method: a classifier method (a :class:`Method` or a registered name).
      layer: dotted layer name; ``None``: the model's ``cam_layer``.

    Identity-hashed (``eq=False``), as the methods it may wrap.
    """

    kind = "cam"
    has_layer_map = True

    method: Any = "gradient"
    layer: str | None = None

    def __post_init__(self) -> None:
        from xaijax.methods.registry import get

        m = get(self.method) if isinstance(self.method, str) else self.method
        if not isinstance(m, Method) or not m.explains_classifier:
            raise ValueError(f"LayerAttribution: method must be a classifier attribution method or its name; got {self.method!r}")
        object.__setattr__(self, "method", m)

    @property
    def accepts_seed(self) -> bool:  # type: ignore[override]
        return self.method.accepts_seed

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w): the method's map over the layer's activation."""
        check_inputs(x)
        name = default_cam_layer(model) if self.layer is None else self.layer
        _, acts = taps.forward(model, variables, x, capture=[name])
        a = acts[name]
        if not isinstance(a, jax.Array) or a.ndim != 4:
            raise ValueError(
                f"LayerAttribution: layer {name!r} must output an NHWC feature map (N, h, w, C); its output has shape "
                f"{getattr(a, 'shape', type(a).__name__)}"
            )
        upper = _FromLayer(model, name)
        return self.method(upper, attach(variables, layer_input=x), a, target)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map: :meth:`layer_map` upsampled to the input size."""
        check_inputs(x)
        return upsample_bilinear(self.layer_map(model, variables, x, target), x.shape[1:3])


register(
    "linear-approx",
    LinearApprox,
    "layer gradient x activation summed over channels (TorchRay linear_approx; Captum LayerGradientXActivation), upsampled",
)
register(
    "layer-integrated-gradients",
    LayerIntegratedGradients,
    "integrated gradients in a layer's activation space (Sundararajan et al. 2017; Captum LayerIntegratedGradients), upsampled",
)
