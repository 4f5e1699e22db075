"""Training and evaluation of multi-label image classifiers (the bundled synthetic models).

Reusable pieces, each a small pure function or a thin class around one:

* :func:`multilabel_bce` -- mean sigmoid binary cross-entropy over batch and classes.
* :func:`average_precision` / :func:`mean_average_precision` -- VOC-style all-point
  interpolated AP per class, and its mean over the classes that have positives.
* :func:`kaiming_init` -- He-normal initialisation of conv/dense kernels (NumPy, from a seed),
  and :func:`data_dependent_init` -- per-channel centring and scaling of every layer's
  pre-activations on a data batch, which shortens the initial plateau of a 13-layer VGG
  without BatchNorm.
* :func:`fold_vgg_batchnorm` -- train ``vgg*_bn``, ship plain ``vgg*``: folds each
  BatchNorm into the convolution before it (exact in eval mode). The bundled VGG16 is
  trained this way because plain VGG16 learns too slowly for a CPU budget.
* :func:`make_optimizer` -- optax AdamW with linear warm-up and cosine decay, gradient
  clipping, and no weight decay on biases / BatchNorm scales.
* :class:`TrainState`, :func:`create_train_state`, :func:`make_train_step` -- a jitted
  train step that handles BatchNorm statistics (``batch_stats``) and dropout.
* :func:`predict` / :func:`evaluate` -- batched jitted logits and mAP on a split.
* :class:`TrainStream` -- deterministic training batches from a
  :class:`~xaijax.data.SyntheticScenes` split (batch ``s`` holds records
  ``(s * B + i) mod train_size``, randomly flipped left-right from ``(seed, s)``), generated
  in a background thread.

Conventions: images are NHWC float32 RGB in [0, 1]; they are normalised inside the jitted
functions with :func:`xaijax.models.preprocess.normalize` (default ``"torchvision"``, the
convention native checkpoints are read with). Targets are multi-hot (N, C) float32.
Everything that is random is a function of ``(seed, step)``, so a run is reproducible
bit-for-bit on the same machine and software (XLA's CPU kernels are deterministic).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xaijax.models import taps
from xaijax.models.preprocess import normalize

__all__ = [
    "TrainState",
    "TrainStream",
    "average_precision",
    "chance_map",
    "create_train_state",
    "data_dependent_init",
    "evaluate",
    "fold_vgg_batchnorm",
    "kaiming_init",
    "layer_output_stats",
    "make_optimizer",
    "make_train_step",
    "mean_average_precision",
    "multilabel_bce",
    "predict",
]


# ----------------------------------------------------------------------------- loss and AP


def multilabel_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy of ``logits`` (N, C) against ``targets`` (N, C) in [0, 1].

    Computed from the logits in the numerically stable form
    ``max(z, 0) - z * t + log1p(exp(-|z|))``; averaged over all N * C entries.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must have the same shape (N, C)")
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)))


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both have shape (N, C) (or (N,) for one class); "
            f"got {np.shape(scores)} and {np.shape(labels)}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0/1 (or bool) multi-hot values")
    return scores, labels.astype(bool)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class VOC-style all-point interpolated average precision.

    Args:
      scores: (N, C) (or (N,)) real-valued scores; higher means "more likely present".
        Logits and sigmoid probabilities give the same AP (the ranking is what counts).
      labels: (N, C) (or (N,)) 0/1 ground truth.

    Returns:
      (C,) float64 AP per class (for 1-D inputs a (1,) array).

    Definition (PASCAL VOC 2010+ "all points"): rank the N samples by decreasing score;
    for every threshold take recall ``r = TP / P`` and precision ``p = TP / (TP + FP)``;
    replace each precision by the largest precision at equal or higher recall
    (``p_interp(r) = max_{r' >= r} p(r')``); AP is the area under this step curve,
    ``sum_k (r_k - r_{k-1}) * p_interp(r_k)`` with ``r_0 = 0``.

    Ties: samples with equal scores enter the ranking together -- precision and recall are
    evaluated only at distinct score values (after the last sample of each tie group), so
    the result does not depend on the order of tied samples. E.g. scores (0.9, 0.5, 0.5)
    with labels (0, 1, 0) give AP = 1/3, whichever of the tied samples is listed first.

    Classes without positives (P = 0): AP is undefined and returned as NaN;
    :func:`mean_average_precision` leaves them out of the mean.
    """
    scores, labels = _check_scores_labels(scores, labels)
    n, c = scores.shape
    out = np.full((c,), np.nan)
    for k in range(c):  # loop over classes (few); all per-sample work is vectorised
        y = labels[:, k]
        npos = int(y.sum())
        if npos == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        s, y = scores[order, k], y[order]
        tp = np.cumsum(y)
        fp = np.cumsum(~y)
        last_of_tie = np.r_[s[1:] != s[:-1], True]
        tp, fp = tp[last_of_tie], fp[last_of_tie]
        recall = tp / npos
        precision = tp / (tp + fp)
        p_interp = np.maximum.accumulate(precision[::-1])[::-1]
        d_recall = np.diff(np.r_[0.0, recall])
        out[k] = float(np.sum(d_recall * p_interp))
    return out


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mAP, per-class AP)``: mean of :func:`average_precision` over classes with positives.

    Classes with no positive sample (AP = NaN) are excluded from the mean; if no class has
    a positive, mAP is NaN.
    """
    ap = average_precision(scores, labels)
    valid = ~np.isnan(ap)
    return (float(np.mean(ap[valid])) if valid.any() else float("nan")), ap


# ----------------------------------------------------------------------------- init and optimiser


def kaiming_init(params: Any, seed: int, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """He-normal initialisation of a ``params`` tree, built from its leaves' shapes with NumPy.

    Every leaf is created anew from its shape and dtype (``params`` may hold arrays or
    ``jax.ShapeDtypeStruct`` from ``jax.eval_shape(model.init, ...)``):

    * ``kernel`` (kh, kw, c_in, c_out) (HWIO) or (c_in, c_out): ``N(0, 2 / fan_in)`` with
      ``fan_in = kh * kw * c_in`` (resp. ``c_in``), the variance that keeps ReLU activations
      at a constant scale through depth; kernels of layers whose ``/``-joined path (e.g.
      ``"classifier/6"``, ``"fc"``) is in ``skip`` get ``N(0, 1 / fan_in)`` (output layers
      are not followed by a ReLU);
    * ``bias``: 0; ``scale`` (BatchNorm): 1.

    The draws come from ``np.random.default_rng([seed, i])`` with ``i`` the leaf's index in
    sorted path order: portable across platforms, and no XLA compilation (initialising a
    VGG16 through ``jax.random`` compiles one threefry kernel per layer, which takes
    minutes on a small CPU).

    Returns:
      a nested dict of float arrays (numpy).

    Raises:
      ValueError: a leaf name other than kernel / bias / scale.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for i, path in enumerate(sorted(flat)):
        leaf = flat[path]
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        name = path[-1]
        layer = "/".join(path[:-1])
        if name == "kernel":
            if len(shape) < 2:
                raise ValueError(f"kaiming_init: kernel {'/'.join(path)} has shape {shape}; expected >= 2 dims")
            fan_in = int(np.prod(shape[:-1]))
            gain = 1.0 if layer in skip else 2.0
            std = np.sqrt(gain / fan_in)
            out[path] = (std * np.random.default_rng([int(seed), i]).standard_normal(shape)).astype(dtype)
        elif name == "bias":
            out[path] = np.zeros(shape, dtype)
        elif name == "scale":
            out[path] = np.ones(shape, dtype)
        else:
            raise ValueError(f"kaiming_init: do not know how to initialise parameter {'/'.join(path)!r}")
    return flax.traverse_util.unflatten_dict(out)


def _init_batch_stats(stats: Any) -> dict[str, Any]:
    """BatchNorm running statistics from their shapes: ``mean`` 0, ``var`` 1 (as Flax and torch)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
    out = {}
    for path, leaf in flat.items():
        if path[-1] not in ("mean", "var"):
            raise ValueError(f"unknown batch statistic {'/'.join(path)!r}")
        out[path] = (np.zeros if path[-1] == "mean" else np.ones)(tuple(leaf.shape), np.dtype(leaf.dtype))
    return flax.traverse_util.unflatten_dict(out)


def _intercept_linear_layers(record: Callable[[str, jax.Array], None]):
    """A context calling ``record(path, output)`` for every ``nn.Conv`` / ``nn.Dense`` call (``/``-joined path)."""

    def on_call(name, module, call_next, args, kwargs):
        out = call_next(*args, **kwargs)
        if isinstance(module, (nn.Conv, nn.Dense)):
            record("/".join(module.path), out)
        return out

    return taps.intercept_calls(on_call)


def layer_output_stats(
    model: nn.Module, params: Any, images: jax.Array, convention: str = "torchvision"
) -> tuple[list[str], Callable[[Any, jax.Array], list[tuple[jax.Array, jax.Array]]]]:
    """Conv/dense layers of ``model`` in call order, and a jitted function of their output statistics.

    Returns ``(names, fn)``: ``names`` are the ``/``-joined paths (``"features/0"``) of every
    ``nn.Conv`` / ``nn.Dense`` in the order the forward pass calls them, and
    ``fn(params, images)`` returns, in the same order, the per-output-channel
    ``(mean (C,), std (C,))`` of each layer's output (its pre-activation) over all samples and
    positions of ``images`` (N, H, W, 3) in [0, 1]. Eval mode, ``params`` only (no BatchNorm).
    """
    names: list[str] = []

    def trace(p, x):
        with _intercept_linear_layers(lambda name, out: names.append(name)):
            return model.apply({"params": p}, normalize(x, convention))

    jax.eval_shape(trace, params, images[:1])

    def fn(p, x):
        stats: list[tuple[jax.Array, jax.Array]] = []

        def record(name: str, out: jax.Array) -> None:
            axes = tuple(range(out.ndim - 1))
            stats.append((jnp.mean(out, axes), jnp.std(out, axes)))

        with _intercept_linear_layers(record):
            model.apply({"params": p}, normalize(x, convention))
        return stats

    return names, jax.jit(fn)


def data_dependent_init(
    model: nn.Module,
    params: Any,
    images: np.ndarray,
    skip: tuple[str, ...] = (),
    convention: str = "torchvision",
    eps: float = 1e-6,
) -> Any:
    """Normalise each layer's pre-activations on a data batch (for plain nets without BatchNorm).

    Layer by layer in forward order, every conv/dense layer not in ``skip`` is rescaled so
    that each of its output channels has mean 0 and standard deviation 1 over ``images``:
    ``kernel <- kernel / std`` and ``bias <- (bias - mean) / std`` (the data-dependent
    initialisation of Kraehenbuehl et al., 2016, and Salimans & Kingma, 2016; LSUV with
    centring). This is what BatchNorm does at step 0, folded into the weights: in a deep
    ReLU net without it, the features of different images become almost identical with
    depth and training starts on a long plateau. The architecture is unchanged.

    Args:
      model: the module (no ``batch_stats``).
      params: its ``params`` (e.g. after :func:`kaiming_init`).
      images: (N, H, W, 3) float32 RGB in [0, 1]; a few dozen training images suffice.
      skip: ``/``-joined layer paths left as they are (the output layer).
      convention: input normalisation (see :func:`xaijax.models.preprocess.normalize`).
      eps: floor of the standard deviation (a channel that is constant on the batch).

    Returns:
      the new ``params`` (plain nested dicts). One jitted forward pass per layer.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    params = jax.tree.map(jnp.asarray, flax.core.unfreeze(params))  # fresh containers: no aliasing
    order, stats_fn = layer_output_stats(model, params, images, convention)
    if len(set(order)) != len(order):
        raise ValueError("data_dependent_init: a layer is called more than once per forward pass")
    for i, layer in enumerate(order):
        if layer in skip:
            continue
        mean, std = stats_fn(params, images)[i]
        node = params
        for part in layer.split("/"):
            node = node[part]
        scale = 1.0 / jnp.maximum(std, eps)
        node["kernel"] = node["kernel"] * scale
        if "bias" in node:
            node["bias"] = (node["bias"] - mean) * scale
    return params


def _decay_mask(params: Any) -> Any:
    """Weight decay only on kernels (ndim >= 2): not on biases or BatchNorm scale/bias."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    learning_rate: float,
    steps: int,
    warmup_steps: int,
    weight_decay: float = 1e-2,
    clip_norm: float | None = 1.0,
    end_fraction: float = 0.0,
    decay_all: bool = False,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up from 0 to ``learning_rate`` and cosine decay to ``end_fraction``.

    Args:
      learning_rate: peak learning rate (> 0).
      steps: total number of optimisation steps (>= 1).
      warmup_steps: linear warm-up length, in ``[0, steps)``.
      weight_decay: decoupled weight decay on kernels only (see :func:`_decay_mask`).
      clip_norm: clip the global gradient norm to this value first (None: no clipping).
      end_fraction: final learning rate as a fraction of the peak.
      decay_all: weight decay on every parameter (torch's ``AdamW``, the debiasing study's
        BERTs) instead of kernels only.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must be in [0, steps={steps}), got {warmup_steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=steps,
        end_value=learning_rate * end_fraction,
    )
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=None if decay_all else _decay_mask))
    return optax.chain(*parts)


def fold_vgg_batchnorm(variables: Mapping[str, Any], cfg: tuple, eps: float = 1e-5) -> dict[str, Any]:
    """Variables of a ``vgg*_bn`` model -> variables of the plain ``vgg*`` with the same eval function.

    In eval mode, ``BN(conv(x)) = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is again
    a convolution, with kernel ``W * s`` and bias ``(b - mean) * s + beta`` where
    ``s = gamma / sqrt(var + eps)`` per output channel. The trunk's layer indices are renumbered
    from the BN layout (conv, bn, relu per entry) to the plain one (conv, relu); the classifier
    is copied. ``cfg`` is the trunk configuration (e.g. :data:`xaijax.models.vgg.CFGS` ``["D"]``),
    ``eps`` the BatchNorm epsilon (1e-5 in the zoo). Returns ``{"params": ...}`` (float32).
    """
    params = variables["params"]
    stats = variables["batch_stats"]
    feats_bn, stats_bn = params["features"], stats["features"]
    feats: dict[str, Any] = {}
    i_bn = i_plain = 0
    for v in cfg:
        if v == "M":
            i_bn += 1
            i_plain += 1
            continue
        conv, bn, st = feats_bn[str(i_bn)], feats_bn[str(i_bn + 1)], stats_bn[str(i_bn + 1)]
        scale = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(st["var"], np.float64) + eps)
        kernel = np.asarray(conv["kernel"], np.float64) * scale
        bias = (np.asarray(conv["bias"], np.float64) - np.asarray(st["mean"], np.float64)) * scale + np.asarray(
            bn["bias"], np.float64
        )
        feats[str(i_plain)] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
        i_bn += 3
        i_plain += 2
    classifier = jax.tree.map(lambda a: np.asarray(a, np.float32), flax.core.unfreeze(params["classifier"]))
    return {"params": {"features": feats, "classifier": classifier}}


# ----------------------------------------------------------------------------- train state and step


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; pass it through ``jit``).

    Attributes:
      step: int32 scalar, number of steps taken.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: the optax state.
      rng: PRNG key; step ``s`` uses ``fold_in(rng, s)`` for flips and dropout.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """The model variables ``{"params": ..., ["batch_stats": ...]}`` for ``model.apply``."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    image_shape: tuple[int, int, int],
    init: str = "kaiming",
    output_layers: tuple[str, ...] = (),
    init_images: np.ndarray | None = None,
    convention: str = "torchvision",
) -> TrainState:
    """Initialise a model and its optimiser state from ``seed``.

    Args:
      model: the (eval-mode) module; its variables are created with a (1, H, W, 3) input.
      tx: the optimiser.
      seed: integer seed of the initialisation (:func:`kaiming_init`, or ``key(seed)`` for
        ``"default"``); ``key(seed)`` is also the state's ``rng`` (dropout).
      image_shape: (H, W, 3) of the training images.
      init: ``"kaiming"`` (:func:`kaiming_init`), ``"data"`` (:func:`kaiming_init` followed
        by :func:`data_dependent_init` on ``init_images``; for nets without BatchNorm) or
        ``"default"`` (Flax's own initialisers).
      output_layers: layer paths treated as output layers by both initialisers.
      init_images: (N, H, W, 3) images in [0, 1] for ``init="data"``.
      convention: input normalisation used by ``init="data"``.
    """
    if init not in ("kaiming", "data", "default"):
        raise ValueError(f"init must be 'kaiming', 'data' or 'default', got {init!r}")
    if init == "data" and init_images is None:
        raise ValueError("init='data' needs init_images (N, H, W, 3)")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise ValueError(f"image_shape must be (H, W, 3), got {tuple(image_shape)}")
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    if init == "default":
        variables = jax.jit(model.init)(jax.random.key(int(seed)), dummy)
        params = variables["params"]
        batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
    else:
        shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)  # traces only: no compilation
        params = kaiming_init(shapes["params"], seed, skip=tuple(output_layers))
        batch_stats = _init_batch_stats(shapes.get("batch_stats", {}))
    if init == "data":
        if batch_stats:
            raise ValueError("init='data' is for models without BatchNorm (this one has batch_stats)")
        params = data_dependent_init(model, params, init_images, skip=output_layers, convention=convention)
    params = jax.tree.map(jnp.asarray, flax.core.unfreeze(params))
    batch_stats = jax.tree.map(jnp.asarray, batch_stats)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.jit(tx.init)(params),
        rng=jax.random.key(int(seed)),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    convention: str = "torchvision",
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, images, targets) -> (state, {"loss", "grad_norm"})``.

    ``model`` is cloned with ``train=True``: BatchNorm uses batch statistics and the running
    averages in ``batch_stats`` are updated (momentum 0.1 in torch's sense); dropout, if the
    model has any, draws from ``fold_in(state.rng, state.step)``. ``images`` (N, H, W, 3)
    float32 RGB in [0, 1] (augment them beforehand, e.g. with :class:`TrainStream`),
    ``targets`` (N, C) multi-hot float32. The loss is :func:`multilabel_bce`. The input
    ``state`` is donated.
    """
    train_model = model.clone(train=True) if hasattr(model, "train") else model
    uses_dropout = float(getattr(model, "dropout", 0.0) or 0.0) > 0.0

    def step(state: TrainState, images: jax.Array, targets: jax.Array):
        x = normalize(images, convention)
        has_bn = bool(state.batch_stats)
        # no PRNG work in the graph unless dropout needs it (threefry is slow to compile on CPU)
        rngs = {"dropout": jax.random.fold_in(state.rng, state.step)} if uses_dropout else {}

        def loss_fn(params):
            variables = {"params": params}
            if has_bn:
                variables["batch_stats"] = state.batch_stats
                logits, updates = train_model.apply(variables, x, mutable=["batch_stats"], rngs=rngs)
                new_stats = updates["batch_stats"]
            else:
                logits = train_model.apply(variables, x, rngs=rngs)
                new_stats = state.batch_stats
            return multilabel_bce(logits, targets), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------- evaluation


def make_predict_fn(model: nn.Module, convention: str = "torchvision") -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted ``fn(variables, images) -> logits`` (eval mode; images in [0, 1], NHWC)."""

    def fn(variables, images):
        return model.apply(variables, normalize(images, convention))

    return jax.jit(fn)


def predict(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    batch_size: int = 100,
    convention: str = "torchvision",
    predict_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Logits (N, C) float32 of ``images`` (N, H, W, 3) in [0, 1], in batches of ``batch_size``.

    The last batch is padded to ``batch_size`` so that only one shape is compiled.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn = predict_fn or make_predict_fn(model, convention)
    n = images.shape[0]
    out = []
    for s in range(0, n, batch_size):
        chunk = images[s : s + batch_size]
        m = chunk.shape[0]
        if m < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(variables, jnp.asarray(chunk)))[:m])
    return np.concatenate(out, 0) if out else np.zeros((0, 0), np.float32)


def evaluate(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int = 100,
    convention: str = "torchvision",
    predict_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> dict[str, Any]:
    """mAP, per-class AP and mean BCE of a model on ``images`` (N, H, W, 3) / ``targets`` (N, C).

    Returns ``{"map": float, "ap": (C,) array (NaN for classes without positives),
    "loss": float, "logits": (N, C) array}``.
    """
    logits = predict(model, variables, images, batch_size, convention, predict_fn)
    targets = np.asarray(targets, np.float32)
    m, ap = mean_average_precision(logits, targets)
    loss = float(np.mean(np.asarray(optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))))
    return {"map": m, "ap": ap, "loss": loss, "logits": logits}


def chance_map(targets: np.ndarray) -> float:
    """mAP of a constant predictor: the mean over classes (with positives) of the class frequency.

    With all scores tied, :func:`average_precision` of class ``c`` is ``P_c / N``.
    """
    targets = np.asarray(targets, np.float64)
    freq = targets.mean(0)
    valid = targets.sum(0) > 0
    return float(freq[valid].mean()) if valid.any() else float("nan")


# ----------------------------------------------------------------------------- data


class TrainStream:
    """Deterministic training batches from a split of a :class:`~xaijax.data.SyntheticScenes`.

    Batch ``s`` holds the records ``(s * batch_size + i) mod split_size`` for
    ``i < batch_size``, so the data is a pure function of the step index (a run can be
    resumed or repeated exactly). Images are (B, H, W, 3) float32 in [0, 1], targets (B, C)
    float32 multi-hot (difficult objects included).

    Augmentation: with ``hflip_seed`` set, each image of batch ``s`` is flipped left-right
    with probability 1/2, drawn from ``np.random.default_rng([hflip_seed, s])`` (the flags
    are :meth:`flips`); boxes and masks are not needed for classification, so only images
    are returned.

    ``cache=True`` keeps every generated record (image and targets) in memory so that the
    second epoch is free (``split_size * H * W * 3 * 4`` bytes at most). :meth:`iterate`
    generates the next ``prefetch`` batches in a background thread while the caller trains.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        split: str = "train",
        cache: bool = False,
        hflip_seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.split = split
        self.size = int(dataset.split_size(split))
        if self.size < 1:
            raise ValueError(f"split {split!r} of the dataset is empty")
        self.cache = cache
        self.hflip_seed = hflip_seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def indices(self, step: int) -> np.ndarray:
        """Record indices (batch_size,) of batch ``step``."""
        return (int(step) * self.batch_size + np.arange(self.batch_size)) % self.size

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        from xaijax.data.records import multi_hot

        rec = self.dataset.record(self.split, int(index))
        item = (rec.image, multi_hot(rec, self.dataset.num_classes))
        if self.cache:
            self._cache[index] = item
        return item

    def flips(self, step: int) -> np.ndarray:
        """(batch_size,) bool: which images of batch ``step`` are flipped (all False without ``hflip_seed``)."""
        if self.hflip_seed is None:
            return np.zeros((self.batch_size,), bool)
        return np.random.default_rng([int(self.hflip_seed), int(step)]).random(self.batch_size) < 0.5

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images (B, H, W, 3), targets (B, C))`` of batch ``step`` (flipped per :meth:`flips`)."""
        items = [self._item(int(i)) for i in self.indices(step)]
        images = np.stack([a for a, _ in items])
        flip = self.flips(step)
        images[flip] = images[flip, :, ::-1, :]
        return images, np.stack([b for _, b in items])

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield batches ``start .. stop - 1``, generated ``prefetch`` ahead in a thread."""
        if prefetch < 1:
            for s in range(start, stop):
                yield self.batch(s)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop_flag = threading.Event()

        def work() -> None:
            try:
                for s in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put(("ok", self.batch(s)))
            except BaseException as e:  # surface generator errors in the consumer
                q.put(("error", e))

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            for _ in range(start, stop):
                kind, value = q.get()
                if kind == "error":
                    raise value
                yield value
        finally:
            stop_flag.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)
