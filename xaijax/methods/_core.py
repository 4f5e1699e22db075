"""The method core: the interface every attribution method implements, and the one path
target -> seed -> score that they all share.

Convention: ``method(model, variables, x, target) -> maps`` where

* ``model`` is a Flax module (a zoo model or any module with that call signature) and
  ``variables`` its variables;
* ``x`` is an NHWC float batch, already normalised for the model (N, H, W, C);
* ``target`` is either class indices — an int or an int array of shape (N,) — or an
  explicit *seed*: a float array shaped like the model output (N, K) that weights the
  logits (contrastive methods are built from seeds, and users may compose their own);
* ``maps`` is a float array of shape (N, H, W) (the input's dtype: a float64 run stays
  float64): one relevance/saliency value per pixel.

Methods are pure: wrap them in ``jax.jit`` (the model is a static, hashable argument) or
``jax.vmap``; samples in a batch are independent.

A method is a frozen dataclass that subclasses :class:`Method` and declares what callers
need to know as class attributes (never probed with ``getattr``):

* ``kind`` — what it explains and how it is called (:data:`KINDS`): ``"attribution"`` and
  ``"cam"`` maps of image classifiers (``"cam"``: computed at a layer and upsampled, which
  is what UCAG's CAM post-processing is for), ``"similarity"`` (BiLRP: a pair of inputs)
  and ``"detection"`` (D-RISE: a detector and a target detection);
* ``accepts_seed`` — whether ``target`` may be an (N, K) float seed (``False`` for methods
  that are contrastive already and need class indices);
* ``runs_own_loop`` — the method jits its own steps and runs them from a Python loop when
  its inputs are concrete (call it unjitted); ``has_progress`` — it has a ``progress`` field
  (a progress bar over that loop);
* ``has_layer_map`` — :meth:`Method.layer_map` gives the map before its final ReLU and before
  upsampling to the input (the CAM family), which is what UCAG's conquer step resizes.

A method that is not defined for a model (CAM on a head that is not global pooling + one
linear layer, a ReLU rule on a model without ReLU modules, ...) raises
:class:`NotApplicable`, a ``ValueError`` that tables record as "not defined for this model".
:func:`require_piecewise_linear` is that refusal for the methods defined on ReLU networks only
(FullGrad, RAP, RSP, Excitation Backprop, BiLRP's default rules) when a model calls
transformer layers (LayerNorm, softmax, GELU, attention products).

Vision transformers: a layer whose output is tokens (N, T, D) becomes an NHWC grid with
:func:`token_grid`, from facts the model declares (``num_prefix_tokens``, ``grid_size``); the
caller never passes a reshape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.models import taps
from xaijax.models import transformer_layers as _tl

__all__ = [
    "KINDS",
    "CLASSIFIER_KINDS",
    "Method",
    "FunctionMethod",
    "Wrapper",
    "as_method",
    "NotApplicable",
    "check_inputs",
    "declared_layer",
    "class_indices",
    "as_seed",
    "target_scores",
    "target_score",
    "layer_gradients",
    "token_grid",
    "non_piecewise_linear_layers",
    "require_piecewise_linear",
    "reduce_channels",
    "validate_positive_int",
    "validate_number",
]

#: What a method explains (see the module docstring).
KINDS = ("attribution", "cam", "similarity", "detection")
#: Kinds called as ``method(model, variables, x, target) -> (N, H, W)`` on a classifier.
CLASSIFIER_KINDS = ("attribution", "cam")


class NotApplicable(ValueError):
    """The method is not defined for this model (e.g. CAM on a head without global pooling).

    Evaluation tables record such a pair as "not defined for this model"; any other error is
    a real failure.
    """


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _guard_out_of_range(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a classifier method's ``__call__``/``layer_map`` with the target-range contract of
    :func:`class_indices`: a *concrete* integer target outside the model's outputs raises before
    any work (whether or not the method itself reads the target); under tracing each sample
    whose class is out of range gets an all-NaN map.

    The NaN seed of :func:`as_seed` already propagates through most methods, but not through
    every operation (XLA's max-reductions may turn NaN into -inf; contrastive methods build
    their own one-hot): this guard makes the contract hold for every method. It costs one
    abstract evaluation of the model (``jax.eval_shape``: no computation) per call or trace and
    one ``where`` on the map.
    """

    @functools.wraps(fn)
    def guarded(self: Method, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 4 or self.kind not in CLASSIFIER_KINDS:  # not called as (model, variables, x, target)
            return fn(self, *args, **kwargs)
        model, variables, x, target = args[:4]
        k = _num_classes_for_target(self, model, variables, x, target)
        if k is not None and _is_concrete(target):
            class_indices(target, np.shape(x)[0], k)  # raises, naming the class and the range
        out = fn(self, *args, **kwargs)
        if k is None or _is_concrete(target):
            return out
        return _nan_where_out_of_range(target, k, out)

    guarded._xaijax_target_guard = True  # type: ignore[attr-defined]
    return guarded


def _num_classes_for_target(method: Method, model: Any, variables: Any, x: Any, target: Any) -> int | None:
    """The model's number of outputs when ``target`` holds class indices of a classifier method
    and ``x`` is a batch the model takes; ``None`` otherwise (the method's own checks report a
    bad ``x``, a float seed needs no range)."""
    if method.kind not in CLASSIFIER_KINDS or not hasattr(target, "dtype") and not isinstance(target, (int, np.integer)):
        return None
    if isinstance(target, bool) or not jnp.issubdtype(jnp.result_type(target), jnp.integer) or np.ndim(target) > 1:
        return None
    shape = np.shape(x)
    if len(shape) != 4 or shape[0] == 0:
        return None
    return _output_classes(model, variables, x)


def _output_classes(model: Any, variables: Any, x: Any) -> int | None:
    """The model's number of outputs K for the batch ``x`` (None if it is not an (N, K) classifier).

    From :func:`xaijax.models.taps.summary` (one abstract evaluation of the model per model and
    shapes, shared with the methods' other set-up questions and cached)."""
    try:
        logits = taps.summary(model, variables, x).output
    except Exception:  # not a plain classifier forward pass (or a bad x, which the method reports)
        return None
    ok = hasattr(logits, "shape") and len(logits.shape) == 2 and logits.shape[0] == np.shape(x)[0]
    return int(logits.shape[-1]) if ok else None


def _nan_where_out_of_range(target: Any, k: int, out: Any) -> Any:
    if not hasattr(out, "ndim") or out.ndim < 1 or not jnp.issubdtype(out.dtype, jnp.inexact):
        return out
    n = out.shape[0]
    t = jnp.asarray(target)
    if t.ndim == 1 and t.shape[0] != n:
        return out
    t = jnp.broadcast_to(t, (n,))
    valid = (t >= 0) & (t < k)
    return jnp.where(valid.reshape((n,) + (1,) * (out.ndim - 1)), out, jnp.asarray(jnp.nan, out.dtype))


class Method:
    """Base of every attribution method: declared capabilities and the call signature.

    Subclasses are frozen dataclasses whose fields are the hyperparameters and which
    implement ``__call__(model, variables, x, target)``.
    """

    kind: ClassVar[str] = "attribution"
    accepts_seed: ClassVar[bool] = True
    runs_own_loop: ClassVar[bool] = False
    has_progress: ClassVar[bool] = False
    has_layer_map: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The traced out-of-range contract (see class_indices): every classifier method's
        # ``__call__`` and ``layer_map`` are wrapped once, where the subclass defines them.
        super().__init_subclass__(**kwargs)
        if isinstance(cls.__dict__.get("kind", cls.kind), str) and cls.kind not in CLASSIFIER_KINDS:
            return  # BiLRP, D-RISE: other call signatures, no class target
        for name in ("__call__", "layer_map"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_xaijax_target_guard", False):
                setattr(cls, name, _guard_out_of_range(fn))

    @property
    def explains_classifier(self) -> bool:
        """True for methods called as ``method(model, variables, x, target) -> (N, H, W)``."""
        return self.kind in CLASSIFIER_KINDS

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, h, w) map at the resolution where it is computed, before the final ReLU and the
        upsampling to the input size (only where ``has_layer_map``)."""
        raise NotImplementedError(f"{type(self).__name__} has no layer map (has_layer_map is False)")


@dataclasses.dataclass(frozen=True)
class FunctionMethod(Method):
    """A plain function ``fn(model, variables, x, target) -> (N, H, W)`` with declared capabilities.

    Attributes:
      fn: the function.
      declared_kind: its kind (one of :data:`KINDS`).
      declared_accepts_seed: whether it accepts float seeds as target.
    """

    fn: Callable[..., jax.Array]
    declared_kind: str = "attribution"
    declared_accepts_seed: bool = True

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"expected an attribution method (a callable (model, variables, x, target) -> maps), got {self.fn!r}")
        if self.declared_kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.declared_kind!r}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.declared_kind

    @property
    def accepts_seed(self) -> bool:  # type: ignore[override]
        return self.declared_accepts_seed

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        return self.fn(model, variables, x, target)


def as_method(fn: Any, kind: str = "attribution", accepts_seed: bool = True) -> Method:
    """``fn`` itself if it is a :class:`Method`, else a :class:`FunctionMethod` declaring ``kind``."""
    if isinstance(fn, Method):
        return fn
    return FunctionMethod(fn, kind, accepts_seed)


class Wrapper(Method):
    """Base of the combinators: a method built around another one, its ``method`` field.

    Its ``kind`` and ``accepts_seed`` are the wrapped method's (a smoothed Grad-CAM is still a
    CAM); subclasses call :meth:`_adopt_method` first in ``__post_init__``.
    """

    method: Method

    @property
    def kind(self) -> str:  # type: ignore[override]
        """The wrapped method's kind."""
        return self.method.kind

    @property
    def accepts_seed(self) -> bool:  # type: ignore[override]
        """Seeds pass through to the wrapped method."""
        return self.method.accepts_seed

    def _adopt_method(self, owner: str) -> None:
        """Turn a plain function into a :class:`FunctionMethod`; refuse a non-classifier kind."""
        object.__setattr__(self, "method", as_method(self.method))
        if not self.method.explains_classifier:
            raise ValueError(
                f"{owner} applies to classifier attribution methods; {type(self.method).__name__} is a {self.method.kind!r} method"
            )


def declared_layer(model: nn.Module, attribute: str, what: str) -> str:
    """The default layer a model declares as the string attribute ``attribute`` (``cam_layer``,
    ``excitation_layer``): the model protocol for default layers, one source per architecture.

    Raises:
      NotApplicable: the model declares none (``what`` names the layer in the message).
    """
    layer = getattr(model, attribute, None)
    if isinstance(layer, str):
        return layer
    raise NotApplicable(
        f"no default {what} for a {type(model).__name__}; pass layer='<dotted layer name>' "
        f"(see xaijax.models.taps.layer_names) or give the module the string attribute {attribute}"
    )


def validate_positive_int(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        what = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")


def validate_number(
    owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None, strict_low: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number (a Python or NumPy scalar,
    not a bool) with ``low <= value <= high`` (``low < value`` when ``strict_low``); ``None``
    bounds are open. Infinite and NaN values are refused: they would give NaN maps silently."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if strict_low else float(value) >= low
    if ok and high is not None:
        ok = float(value) <= high
    if not ok:
        if low is not None and high is not None:
            what = f"a number in {'(' if strict_low else '['}{low:g}, {high:g}]"
        elif low is not None:
            what = ("a positive number" if strict_low else "a non-negative number") if low == 0 else f"a number {'>' if strict_low else '>='} {low:g}"
        elif high is not None:
            what = f"a number <= {high:g}"
        else:
            what = "a finite number"
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")


def check_inputs(x: jax.Array) -> None:
    """Raise a readable error unless ``x`` is a non-empty floating NHWC batch (N, H, W, C).

    A batch that looks like NCHW — 1 or 3 on axis 1, neither on axis 3, and at least 8 on axes
    2 and 3 (image-sized), e.g. a PyTorch-style ``(N, 3, 224, 224)`` — is refused with a message
    that says so, instead of a shape error from deep inside the model.
    """
    shape = tuple(np.shape(x))
    if len(shape) != 4:
        raise ValueError(f"x must be an NHWC batch of shape (N, H, W, C); got shape {shape}")
    dtype = np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
        if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 & co. sit outside NumPy's type hierarchy
            raise TypeError(f"x has dtype {dtype}, which the methods do not take: cast it with x.astype(jnp.float32)")
        raise TypeError(f"x must be floating point (normalised float32 images); got dtype {dtype}")
    if shape[0] == 0:
        raise ValueError("x is an empty batch (N = 0); pass at least one image")
    if shape[1] in (1, 3) and shape[3] not in (1, 3) and min(shape[2], shape[3]) >= 8:
        raise ValueError(
            f"x looks like an NCHW batch (N, C, H, W) = {shape}; xaijax takes NHWC images: "
            "transpose to NHWC with x.transpose(0, 2, 3, 1)"
        )


def class_indices(target: Any, batch: int, num_outputs: int | None, method: str | None = None) -> jax.Array:
    """Class indices (batch,) from an int or an int array (batch,), range-checked when concrete.

    Out-of-range classes. A *concrete* index outside ``[0, num_outputs)`` raises
    ``ValueError`` naming it. A *traced* index (the target is an argument of a ``jax.jit``-ed,
    ``vmap``-ed or sharded function) cannot raise; it is returned as is and the contract is a
    NaN map: :func:`as_seed` turns the row of an out-of-range traced index into NaN, so every
    method that builds its seed, score or one-hot through :func:`as_seed` /
    :func:`target_scores` gives an all-NaN map for that sample (the other samples of the batch
    are unaffected). Code that builds its own one-hot from these indices must do the same
    (``jax.nn.one_hot`` of an out-of-range index is all zeros: a silent all-zero map).

    Args:
      num_outputs: the model's number of classes (``None``: not range-checked here).
      method: the name of a method that needs class indices, for the error message when a
        float seed is given.
    """
    t = jnp.asarray(target)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        who = f"{method} needs" if method else "expected"
        raise ValueError(f"{who} class indices as target (an int or an int array of shape ({batch},)); got a {t.dtype} array")
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"target must be an int or an int array of shape ({batch},); got shape {t.shape}")
    if num_outputs is not None and _is_concrete(t):
        tn = np.asarray(t)
        bad = tn[(tn < 0) | (tn >= num_outputs)]
        if bad.size:
            raise ValueError(
                f"target class {int(bad[0])} is out of range for a model with {num_outputs} outputs "
                f"(valid classes: 0..{num_outputs - 1})"
            )
    return t


def as_seed(target: int | jax.Array | np.ndarray, num_outputs: int, batch: int, dtype: Any = jnp.float32) -> jax.Array:
    """Turn a target into an output-shaped seed of shape (batch, num_outputs).

    Args:
      target: an int (same class for every sample), int array (batch,), or float array
        (batch, num_outputs) used as is.
      num_outputs: size of the model's output (number of classes).
      batch: batch size N.

    Returns:
      the one-hot rows of the class indices, or the float seed. Under tracing (``jax.jit``,
      ``vmap``, sharding), the row of a class index outside ``[0, num_outputs)`` is all NaN:
      the sample's score and map are NaN instead of a silent all-zero map (see
      :func:`class_indices`).

    Raises:
      ValueError: wrong shape, or (for concrete values) a class index out of range.
    """
    t = jnp.asarray(target)
    if jnp.issubdtype(t.dtype, jnp.integer):
        idx = class_indices(t, batch, num_outputs)
        seed = jax.nn.one_hot(idx, num_outputs, dtype=dtype)
        if not _is_concrete(idx) and jnp.issubdtype(seed.dtype, jnp.inexact):
            valid = (idx >= 0) & (idx < num_outputs)
            seed = jnp.where(valid[:, None], seed, jnp.asarray(jnp.nan, seed.dtype))
        return seed
    if t.shape != (batch, num_outputs):
        raise ValueError(
            f"a float target is a seed and must have the output's shape ({batch}, {num_outputs}); got {t.shape}"
        )
    return t.astype(dtype)


def target_scores(out: jax.Array, target: Any) -> jax.Array:
    """Per-sample scores ``sum_k seed_k out_k`` (N,) of model outputs ``out`` (N, K)."""
    seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
    return (out * seed).sum(-1)


def target_score(out: jax.Array, target: Any) -> jax.Array:
    """The scalar ``sum(seed * out)`` that gradient methods differentiate (the batch's target logits summed)."""
    return target_scores(out, target).sum()


def layer_gradients(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    target: Any,
    layers: Sequence[str],
    forward: Callable[..., Any] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """Activations of ``layers``, the gradients of the target score w.r.t. them, and the output.

    One forward and one backward pass: a zero array added to each layer's output is
    differentiated (no hooks).

    Args:
      x: NHWC input batch (N, H, W, C).
      target: int / int (N,) class indices or an (N, K) seed; score = sum(seed * output).
      layers: dotted layer names.

    Returns:
      ``(acts, grads, out)``: dicts layer -> activation and layer -> ``dS/dA`` (the layer
      output's shape), and the model output (N, K).

    Raises:
      ValueError: unknown layer (with suggestions).
    """
    check_inputs(x)
    names = list(layers)
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be distinct; got {names}")
    shapes = layer_output_shapes(model, variables, x, names)

    def score(deltas: dict[str, jax.Array]):
        out, acts = taps.forward(model, variables, x, capture=names, add=deltas)
        return target_score(out, target), (acts, out)

    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    grads, (acts, out) = jax.grad(score, has_aux=True)(zeros)
    return acts, grads, out


def layer_output_shapes(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, names: Sequence[str]) -> dict[str, Any]:
    """``{layer: ShapeDtypeStruct}`` of the outputs :func:`taps.forward` captures for ``names``:
    from the cached :func:`taps.summary` when each is a layer called once with an array output,
    else from an abstract ``taps.forward`` (which raises its readable error: unknown layer,
    a layer called twice)."""
    try:
        info = taps.summary(model, variables, x)
    except Exception:
        info = None
    calls = [info.layer(n) for n in names] if info is not None else [None]
    if all(c is not None and c.calls == 1 and isinstance(c.output, jax.ShapeDtypeStruct) for c in calls):
        return {c.name: c.output for c in calls}
    return jax.eval_shape(lambda xx: taps.forward(model, variables, xx, capture=names), x)[1]


def token_grid(model: nn.Module, a: jax.Array, layer: str) -> jax.Array:
    """A layer's output as an NHWC grid: (N, h, w, C) maps unchanged; vision-transformer tokens
    (N, T, D) without their prefix tokens, reshaped to the patch grid (N, gh, gw, D); tokens of a
    *sequence model* (text: a model that declares ``sequence_model = True``, as
    :class:`xaijax.models.bert.BertForSequenceClassification`) as a one-pixel-wide grid
    (N, T, 1, D), every token kept in order (nothing dropped: a text model's [CLS] token is a
    token of the sentence, shown like the others).

    For vision transformers the grid comes from the model, never from the caller: it must
    declare the int attribute ``num_prefix_tokens`` (tokens in front of the patch tokens: 1
    for the class token, 2 with DeiT's distillation token) and ``grid_size`` (patches per
    side, an int or ``(rows, cols)``), as :class:`xaijax.models.vit.VisionTransformer` and
    ``DeiT`` do. Patch tokens are in row-major order (the order of the patch embedding's
    flatten). Apply it to a layer's activation *and* to its gradient (same shapes).

    Raises:
      ValueError: an output that is neither (N, h, w, C) nor (N, T, D); tokens on a model that
        does not declare ``num_prefix_tokens`` and ``grid_size`` (the message says which is
        missing); a token count that is not ``num_prefix_tokens + rows * cols``.
    """
    shape = tuple(a.shape)
    if len(shape) == 4:
        return a
    if len(shape) != 3:
        raise ValueError(
            f"layer {layer!r} outputs an array of shape {shape}; a map method needs an NHWC feature map "
            "(N, h, w, C) or vision-transformer tokens (N, T, D)"
        )
    if getattr(model, "sequence_model", False) is True:
        return a[:, :, None, :]
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(model, "grid_size", None)
    missing = []
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or prefix < 0:
        missing.append("num_prefix_tokens (an int: class/distillation tokens before the patch tokens)")
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (int(grid), int(grid))
    elif not (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, (int, np.integer)) for g in grid)):
        missing.append("grid_size (an int, patches per side, or (rows, cols))")
    if missing:
        raise ValueError(
            f"layer {layer!r} outputs tokens (N, T, D) = {shape}; turning them into a patch grid needs the model "
            f"to declare {' and '.join(missing)}; {type(model).__name__} does not. Give the module these "
            "attributes (as xaijax.models.vit.VisionTransformer does) or pick a layer with an NHWC output"
        )
    rows, cols = int(grid[0]), int(grid[1])
    if shape[1] != int(prefix) + rows * cols:
        raise ValueError(
            f"layer {layer!r} outputs {shape[1]} tokens, but {type(model).__name__} declares {int(prefix)} prefix "
            f"token(s) and a {rows}x{cols} patch grid ({int(prefix) + rows * cols} tokens)"
        )
    return a[:, int(prefix) :].reshape(shape[0], rows, cols, shape[2])


#: Layer kinds that make a network not piecewise linear (transformer layers): the ReLU rules
#: (DeconvNet, Guided Backprop), FullGrad's decomposition and the ReLU-network propagation
#: methods (RAP, RSP, Excitation Backprop, BiLRP's default rules) are not defined through them.
_NOT_PIECEWISE_LINEAR: tuple[type, ...] = (_tl.LayerNorm, _tl.Softmax, _tl.GELU, _tl.Tanh, _tl.MatMul, nn.LayerNorm, nn.GroupNorm)


def non_piecewise_linear_layers(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> tuple[str, ...]:
    """The kinds of layers in ``model``'s forward pass that are not piecewise linear
    (LayerNorm, softmax, GELU, the bilinear attention products ``MatMul``), as sorted
    ``"Kind (first.layer.name)"`` strings; empty for a ReLU network.

    From :func:`xaijax.models.taps.summary` (one abstract evaluation, nothing computed, cached
    per model and shapes); works on traced arguments (inside ``jit``/``vmap``). A forward pass
    that fails (a bad input, a train-mode BatchNorm) is not reported here: the kinds seen before
    the failure are returned and the method's own checks raise their readable error.
    """
    first: dict[str, str] = {}
    for c in taps.summary(model, variables, x, partial=True).layers:  # (a failed pass: the layers before it)
        if issubclass(c.module_type, _NOT_PIECEWISE_LINEAR):
            first.setdefault(c.module_type.__name__, c.name)
    return tuple(f"{k} ({first[k]})" for k in sorted(first))


def require_piecewise_linear(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, method: str, why: str) -> None:
    """Raise :class:`NotApplicable` if ``model`` calls layers that are not piecewise linear
    (a transformer: LayerNorm, softmax, GELU, attention products).

    Args:
      method: the method's name for the message.
      why: what the method needs from a ReLU network (a sentence fragment for the message).
    """
    found = non_piecewise_linear_layers(model, variables, x)
    if found:
        raise NotApplicable(
            f"{method} is defined for piecewise-linear (ReLU) networks: {why}; {type(model).__name__} calls "
            f"layers that are not piecewise linear: {', '.join(found)} (a transformer). For transformers use the "
            "gradient family (gradient, gradient-x-input, integrated-gradients, smoothgrad), the CAM family "
            "(grad-cam etc.: token grids are handled), rise, extremal-perturbation, or LRP rules for transformers"
        )


def reduce_channels(a: jax.Array, how: str) -> jax.Array:
    """Reduce an (N, H, W, C) input attribution to an (N, H, W) map.

    ``"sum"`` (relevance, gradient x input), ``"abs-max"`` (max of |.| over channels,
    Simonyan et al. 2014), ``"abs-sum"``, ``"l2"`` (Euclidean norm over channels).
    """
    if how == "sum":
        return a.sum(-1)
    if how == "abs-max":
        return jnp.abs(a).max(-1)
    if how == "abs-sum":
        return jnp.abs(a).sum(-1)
    if how == "l2":
        return jnp.sqrt((a * a).sum(-1))
    raise ValueError(f"unknown channel reduction {how!r}; use 'sum', 'abs-max', 'abs-sum' or 'l2'")
