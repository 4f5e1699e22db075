"""Axiom metrics: completeness, non-sensitivity, input invariance.

Method-based metrics (see :mod:`xaijax.metrics.robustness` for the shared call and
conventions: ``metric(model, variables, method, images, targets, maps=None)`` -> per-image
float64 arrays; ``metric.summarize(values)`` -> dataset numbers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods._core import NotApplicable
from xaijax.metrics import sanity
from xaijax.metrics.registry import register_method_metric
from xaijax.metrics.robustness import (
    _call_method,
    _call_method_jit,
    _own_loop,
    check_method_metric_inputs,
    map_blocks,
    model_logits,
    postprocess_maps,
)
from xaijax.static_jit import bind_static

__all__ = ["baseline_values", "Completeness", "NonSensitivity", "InputInvariance", "shift_first_layer"]


def baseline_values(x: jax.Array, baseline: float | str) -> jax.Array:
    """(N,) baseline value per image: a number, ``"black"`` (the image's minimum, Quantus'
    "black"), ``"white"`` (its maximum) or ``"mean"``."""
    flat = x.reshape(x.shape[0], -1)
    if isinstance(baseline, str):
        if baseline == "black":
            return flat.min(1)
        if baseline == "white":
            return flat.max(1)
        if baseline == "mean":
            return flat.mean(1)
        raise ValueError(f"baseline must be a number, 'black', 'white' or 'mean'; got {baseline!r}")
    return jnp.full((x.shape[0],), baseline, x.dtype)


def _check_baseline(baseline: Any) -> None:
    if isinstance(baseline, bool) or not (isinstance(baseline, (int, float)) or baseline in ("black", "white", "mean")):
        raise ValueError(f"baseline must be a number, 'black', 'white' or 'mean'; got {baseline!r}")


def _maps(method, model, variables, x, t):
    if _own_loop(method):
        return method(model, variables, x, t)
    return bind_static(_call_method, _call_method_jit, method, model)(variables, x, t)


# ----------------------------------------------------------------------------- completeness


@dataclasses.dataclass(frozen=True)
class Completeness:
    """Completeness (Sundararajan et al. 2017's axiom; "summation to delta", Shrikumar et al. 2017).

    Protocol, per image: compare the sum of the map with the change of the target logit from
    the baseline input to the image, ``gap = sum(a) - (f_t(x) - f_t(x_0))``, where x_0 is the
    image with every value replaced by ``baseline``. ``complete`` is 1 where ``|gap| <= atol +
    rtol * |f_t(x) - f_t(x_0)|``. The map must be a relevance whose channel sum is the
    attribution (``integrated-gradients``, ``gradient-x-input`` and LRP with channel
    reduction ``"sum"``); maps are not post-processed.

    Defaults: xaijax's baseline is 0 (the all-zero input of the normalised space, Integrated
    Gradients' default baseline). Quantus 0.6.0 (``Completeness``): ``perturb_baseline="black"``
    (the image's minimum), map normalisation *on* by default (a normalised map cannot sum to
    the output difference) and *exact* float equality; it also replaces only the first H x W
    values of the channel-first flattened image (one channel) by the baseline, because it
    counts features on the single-channel map. Use ``baseline="black"`` for its baseline.

    Returns ``{"gap": (N,), "attribution_sum": (N,), "output_difference": (N,), "complete": (N,) 0/1}``.
    """

    baseline: float | str = 0.0
    rtol: float = 1e-3
    atol: float = 1e-6

    def __post_init__(self) -> None:
        _check_baseline(self.baseline)
        if self.rtol < 0 or self.atol < 0:
            raise ValueError(f"rtol and atol must be >= 0; got {self.rtol!r}, {self.atol!r}")

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        a = maps if maps is not None else _maps(method, model, variables, x, t)
        x0 = jnp.broadcast_to(baseline_values(x, self.baseline)[:, None, None, None], x.shape).astype(x.dtype)
        idx = np.arange(x.shape[0])
        f = np.asarray(model_logits(model, variables, jnp.concatenate([x, x0])), np.float64)
        tt = np.asarray(t)
        delta = f[idx, tt] - f[x.shape[0] + idx, tt]
        s = np.asarray(a, np.float64).reshape(x.shape[0], -1).sum(1)
        gap = s - delta
        ok = np.abs(gap) <= self.atol + self.rtol * np.abs(delta)
        return {"gap": gap, "attribution_sum": s, "output_difference": delta, "complete": ok.astype(np.float64)}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {
            "completeness": float(np.mean(values["complete"])),
            "completeness_abs_gap": float(np.mean(np.abs(values["gap"]))),
        }


# ----------------------------------------------------------------------------- non-sensitivity


@dataclasses.dataclass(frozen=True)
class NonSensitivity:
    """Non-sensitivity (Nguyen & Martinez 2020, "On quantitative aspects of model interpretability").

    Protocol, per image: every feature is replaced, one at a time, by ``baseline``; a feature
    is *insensitive* if the target output moves by less than ``eps``, and has *zero
    attribution* if its (post-processed) map value is below ``eps``. The value is the number of
    features where the two disagree (insensitive XOR zero attribution): 0 for a method that gives
    zero attribution exactly to the features the model ignores. Lower is better.

    Features (``unit``): ``"pixel"`` (all channels of a pixel replaced together; its map value)
    or ``"value"`` (each (pixel, channel) value on its own, the pixel's map value broadcast over
    channels: Quantus' convention, C x H x W features). Cost: one forward pass per feature and
    image (H x W or C x H x W), in blocks of ``batch_size`` inputs: too slow for large images in
    a default run.

    Defaults = Quantus 0.6.0 (``NonSensitivity``): eps 1e-5, ``"black"`` baseline (the image's
    minimum), output = softmax probability of the target (``output="softmax"``; its default
    ``softmax=True``), map normalisation (batch-wide there, per image here) and absolute value
    on, one feature per step (Quantus' ``features_in_step`` > 1 does not run there).

    Returns ``{"violations": (N,) count, "violation_fraction": (N,) count / features}``.
    """

    eps: float = 1e-5
    unit: str = "pixel"
    baseline: float | str = "black"
    output: str = "softmax"
    normalise: str = "max"
    abs_maps: bool = True
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_baseline(self.baseline)
        if self.unit not in ("pixel", "value"):
            raise ValueError(f"unit must be 'pixel' or 'value'; got {self.unit!r}")
        if self.output not in ("softmax", "logit"):
            raise ValueError(f"output must be 'softmax' or 'logit'; got {self.output!r}")
        if self.normalise not in ("max", "none"):
            raise ValueError(f"normalise must be 'max' or 'none'; got {self.normalise!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {self.batch_size!r}")

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        a = maps if maps is not None else _maps(method, model, variables, x, t)
        a = postprocess_maps(jnp.asarray(a, x.dtype), self.normalise, self.abs_maps)
        v = np.asarray(bind_static(_non_sensitivity, _non_sensitivity_jit, self, model)(variables, x, t, a), np.float64)
        nf = x.shape[1] * x.shape[2] * (x.shape[3] if self.unit == "value" else 1)
        return {"violations": v, "violation_fraction": v / nf}

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"non_sensitivity": float(np.mean(values["violations"])), "non_sensitivity_fraction": float(np.mean(values["violation_fraction"]))}


def _non_sensitivity(cfg, model, variables, x, t, a):
    n, h, w, c = x.shape
    base = baseline_values(x, cfg.baseline).astype(x.dtype)
    nf = h * w * (c if cfg.unit == "value" else 1)

    def score(xx, tt):
        z = model.apply(variables, xx)
        if cfg.output == "softmax":
            z = jax.nn.softmax(z, axis=-1)
        return jnp.take_along_axis(z, tt[:, None], axis=1)[:, 0]

    f0 = score(x, t)
    if cfg.unit == "value":
        mask_of = lambda f: (jnp.arange(h * w * c) == f).reshape(h, w, c)
        zero = jnp.broadcast_to(a[..., None], x.shape).reshape(n, -1) < cfg.eps
    else:
        mask_of = lambda f: jnp.broadcast_to((jnp.arange(h * w) == f).reshape(h, w, 1), (h, w, c))
        zero = a.reshape(n, -1) < cfg.eps

    # rows: (image i, feature f) pairs, image-major
    ii = jnp.repeat(jnp.arange(n), nf)
    ff = jnp.tile(jnp.arange(nf), n)

    def run(idx, _):
        i, f = idx[:, 0], idx[:, 1]
        m = jax.vmap(mask_of)(f)
        xp = jnp.where(m, base[i][:, None, None, None], x[i])
        return score(xp, t[i])

    fp = map_blocks(run, jnp.stack([ii, ff], 1), jnp.zeros(n * nf, jnp.int32), cfg.batch_size).reshape(n, nf)
    insensitive = jnp.abs(fp - f0[:, None]) < cfg.eps
    return (insensitive ^ zero).sum(1)


_non_sensitivity_jit = jax.jit(_non_sensitivity, static_argnums=(0, 1))


# ----------------------------------------------------------------------------- input invariance


def _get(tree: Mapping[str, Any], path: list[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Mapping[str, Any], path: list[str], value: Any) -> dict:
    new = dict(tree)
    new[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return new


def shift_first_layer(model: Any, variables: Mapping[str, Any], x: Any, shift: float) -> dict:
    """Variables whose first layer absorbs an input shift: ``bias - shift * sum(kernel)`` (sum over
    every kernel axis but the output one), so that ``model(x + shift)`` with these variables equals
    ``model(x)`` — exactly for a dense first layer or a convolution without padding; a zero-padded
    convolution differs at the border (the padding is not shifted), as in Quantus.

    The first layer is the first module with a ``kernel`` (:func:`~xaijax.metrics.sanity.randomizable_layers`);
    it must take the input directly and have a bias (else :class:`~xaijax.methods.NotApplicable`,
    e.g. torchvision ResNets, whose ``conv1`` has no bias).
    """
    layers = sanity.randomizable_layers(model, variables, x)
    if not layers:
        raise NotApplicable("input invariance: the model has no layer with a kernel to absorb the input shift")
    path = ["params"] + layers[0].split(".")
    node = _get(variables, path)
    if "bias" not in node:
        raise NotApplicable(f"input invariance: the first layer {layers[0]!r} has no bias to absorb the input shift")
    k = jnp.asarray(node["kernel"])
    new = dict(node)
    new["bias"] = jnp.asarray(node["bias"]) - shift * k.reshape(-1, k.shape[-1]).sum(0)
    return _set(variables, path, new)


@dataclasses.dataclass(frozen=True)
class InputInvariance:
    """Input invariance (Kindermans et al. 2017/2019, "The (un)reliability of saliency methods").

    Protocol, per image: a second model is the trained one with a constant ``shift`` added to
    every input value and compensated in the first layer's bias (:func:`shift_first_layer`):
    both models compute the same function of the image, and an input-invariant method gives
    the same map for x (first model) and x + shift (second). ``invariant`` is 1 where every map
    value agrees within ``np.isclose(a, a_shifted, atol=atol, rtol=rtol)``; ``max_abs_difference``
    reports the largest disagreement. Kindermans et al.: the gradient is invariant, gradient x
    input, Integrated Gradients with a zero baseline and deep Taylor / LRP variants are not.

    Defaults = Quantus 0.6.0 (``InputInvariance``): shift -1, ``atol`` 1e-4 (``rtol`` 1e-5 is
    ``np.isclose``'s default), no map normalisation or absolute value (Quantus refuses them).
    Quantus' bias is ``2 b - min(first_layer(shift))``: the same in the interior.

    ``model_difference`` is the largest logit difference between the two models (0 up to
    rounding when the shift is absorbed exactly; not 0 when the first layer is a zero-padded
    convolution — VGG — where the border pixels see unshifted padding, so the maps of even an
    invariant method can differ near the border there).

    Returns ``{"invariant": (N,) 0/1, "max_abs_difference": (N,), "model_difference": (N,)}``.
    """

    shift: float = -1.0
    atol: float = 1e-4
    rtol: float = 1e-5

    def __call__(self, model, variables, method, images, targets, maps=None) -> dict[str, np.ndarray]:
        x, t, maps = check_method_metric_inputs(model, variables, method, images, targets, maps)
        shifted = shift_first_layer(model, variables, x, self.shift)
        a = np.asarray(maps if maps is not None else _maps(method, model, variables, x, t), np.float64)
        b = np.asarray(_maps(method, model, shifted, x + jnp.asarray(self.shift, x.dtype), t), np.float64)
        close = np.abs(a - b) <= self.atol + self.rtol * np.abs(b)
        xs = x + jnp.asarray(self.shift, x.dtype)
        f0 = np.asarray(model_logits(model, variables, x), np.float64)
        f1 = np.asarray(model_logits(model, shifted, xs), np.float64)
        return {
            "invariant": close.reshape(x.shape[0], -1).all(1).astype(np.float64),
            "max_abs_difference": np.abs(a - b).reshape(x.shape[0], -1).max(1),
            "model_difference": np.abs(f1 - f0).max(1),
        }

    def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"input_invariance": float(np.mean(values["invariant"]))}


register_method_metric("completeness", Completeness)
register_method_metric("non-sensitivity", NonSensitivity)
register_method_metric("input-invariance", InputInvariance)
