"""Training and evaluation of multi-label image classifiers (the bundled synthetic models).

Reusable pieces, each a small pure function or a thin class around one:

* :func:`multilabel_bce` -- mean sigmoid binary cross-entropy over batch and classes.
* :func:`average_precision` / :func:`mean_average_precision` -- VOC-style all-point
  interpolated AP per class, and its mean over the classes that have positives.
* :func:`kaiming_init` -- He-normal re-initialisation of conv/dense kernels (what lets a
  13-layer VGG without BatchNorm train from scratch).
* :func:`make_optimizer` -- optax AdamW with linear warm-up and cosine decay, gradient
  clipping, and no weight decay on biases / BatchNorm scales.
* :class:`TrainState`, :func:`create_train_state`, :func:`make_train_step` -- a jitted
  train step that handles BatchNorm statistics (``batch_stats``) and dropout, with random
  horizontal flips drawn from ``fold_in(rng, step)``.
* :func:`predict` / :func:`evaluate` -- batched jitted logits and mAP on a split.
* :class:`TrainStream` -- deterministic training batches from a
  :class:`~xaijax.data.SyntheticScenes` split (batch ``s`` holds records
  ``(s * B + i) mod train_size``), generated in a background thread.

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

from xaijax.models.preprocess import normalize

__all__ = [
    "TrainState",
    "TrainStream",
    "average_precision",
    "create_train_state",
    "evaluate",
    "kaiming_init",
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


def kaiming_init(params: Any, key: jax.Array, skip: tuple[str, ...] = ()) -> Any:
    """He-normal re-initialisation of every conv/dense ``kernel``; biases set to zero.

    A kernel of shape (kh, kw, c_in, c_out) (HWIO) or (c_in, c_out) gets
    ``N(0, 2 / fan_in)`` with ``fan_in = kh * kw * c_in`` (resp. ``c_in``), the variance that
    keeps ReLU activations at a constant scale through depth. Kernels of layers whose
    ``/``-joined path (e.g. ``"classifier/6"``, ``"fc"``) is in ``skip`` get
    ``N(0, 1 / fan_in)`` instead (the output layer is not followed by a ReLU). BatchNorm
    scales and biases and any other leaves are left as they are.

    Args:
      params: the ``params`` collection (nested mapping).
      key: PRNG key; each kernel uses ``fold_in(key, index in sorted path order)``.
      skip: layer paths that get the gain-1 variance.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for i, path in enumerate(sorted(flat)):
        leaf = flat[path]
        name = path[-1]
        layer = "/".join(path[:-1])
        if name == "kernel" and leaf.ndim in (2, 4):
            fan_in = int(np.prod(leaf.shape[:-1]))
            gain = 1.0 if layer in skip else 2.0
            std = float(np.sqrt(gain / fan_in))
            out[path] = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
        elif name == "bias" and layer and not _is_norm_path(path, flat):
            out[path] = jnp.zeros_like(leaf)
        else:
            out[path] = leaf
    return flax.traverse_util.unflatten_dict(out)


def _is_norm_path(path: tuple[str, ...], flat: Mapping[tuple[str, ...], Any]) -> bool:
    """True when ``path`` is the bias of a normalisation layer (a sibling ``scale`` exists)."""
    return (*path[:-1], "scale") in flat


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
) -> optax.GradientTransformation:
    """AdamW with linear warm-up from 0 to ``learning_rate`` and cosine decay to ``end_fraction``.

    Args:
      learning_rate: peak learning rate (> 0).
      steps: total number of optimisation steps (>= 1).
      warmup_steps: linear warm-up length, in ``[0, steps)``.
      weight_decay: decoupled weight decay on kernels only (see :func:`_decay_mask`).
      clip_norm: clip the global gradient norm to this value first (None: no clipping).
      end_fraction: final learning rate as a fraction of the peak.
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
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


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
) -> TrainState:
    """Initialise a model and its optimiser state from ``seed``.

    Args:
      model: the (eval-mode) module; its variables are created with a (1, H, W, 3) input.
      tx: the optimiser.
      seed: integer seed; ``key(seed)`` is split into the init key and the training key.
      image_shape: (H, W, 3) of the training images.
      init: ``"kaiming"`` (:func:`kaiming_init`) or ``"default"`` (Flax's own initialisers).
      output_layers: layer paths that :func:`kaiming_init` treats as output layers.
    """
    if init not in ("kaiming", "default"):
        raise ValueError(f"init must be 'kaiming' or 'default', got {init!r}")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise ValueError(f"image_shape must be (H, W, 3), got {tuple(image_shape)}")
    k_init, k_kaiming, k_train = jax.random.split(jax.random.key(int(seed)), 3)
    variables = model.init(k_init, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    if init == "kaiming":
        params = kaiming_init(params, k_kaiming, skip=output_layers)
    params = jax.tree.map(jnp.asarray, flax.core.unfreeze(params))
    batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=k_train,
    )


def random_hflip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip each image of an NHWC batch left-right with probability 1/2 (per sample)."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    convention: str = "torchvision",
    hflip: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, images, targets) -> (state, {"loss", "grad_norm"})``.

    ``model`` is cloned with ``train=True`` (BatchNorm uses batch statistics and updates
    the running averages in ``batch_stats``; dropout is active with an rng derived from
    ``fold_in(state.rng, state.step)``). ``images`` (N, H, W, 3) float32 RGB in [0, 1],
    ``targets`` (N, C) multi-hot float32. The input ``state`` is donated.
    """
    train_model = model.clone(train=True) if hasattr(model, "train") else model

    def step(state: TrainState, images: jax.Array, targets: jax.Array):
        key = jax.random.fold_in(state.rng, state.step)
        k_flip, k_drop = jax.random.split(key)
        x = random_hflip(k_flip, images) if hflip else images
        x = normalize(x, convention)
        has_bn = bool(state.batch_stats)

        def loss_fn(params):
            variables = {"params": params}
            if has_bn:
                variables["batch_stats"] = state.batch_stats
                logits, updates = train_model.apply(
                    variables, x, mutable=["batch_stats"], rngs={"dropout": k_drop}
                )
                new_stats = updates["batch_stats"]
            else:
                logits = train_model.apply(variables, x, rngs={"dropout": k_drop})
                new_stats = state.batch_stats
            return multilabel_bce(logits, targets), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

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

    ``cache=True`` keeps every generated record (image and targets) in memory so that the
    second epoch is free (``split_size * H * W * 3 * 4`` bytes at most). :meth:`iterate`
    generates the next ``prefetch`` batches in a background thread while the caller trains.
    """

    def __init__(self, dataset: Any, batch_size: int, split: str = "train", cache: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.split = split
        self.size = int(dataset.split_size(split))
        if self.size < 1:
            raise ValueError(f"split {split!r} of the dataset is empty")
        self.cache = cache
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

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images (B, H, W, 3), targets (B, C))`` of batch ``step``."""
        items = [self._item(int(i)) for i in self.indices(step)]
        return np.stack([a for a, _ in items]), np.stack([b for _, b in items])

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
