"""The gradient family: saliency from input gradients, modified gradients and bias gradients.

Registered names:

* ``gradient`` (Simonyan et al., 2014): ``d(seed . f(x)) / dx`` reduced over channels
  (default ``abs-max``, the paper's saliency map); ``gradient-x-input``: times the input,
  summed over channels.
* ``deconvnet`` (Zeiler & Fergus, 2014): the gradient with every ReLU's backward pass
  replaced by a ReLU *of the incoming gradient*: ``g_in = max(g_out, 0)`` (the forward mask
  is ignored).
* ``guided-backprop`` (Springenberg et al., 2015): both masks,
  ``g_in = g_out * [x > 0] * [g_out > 0]``.
* ``integrated-gradients`` (Sundararajan et al., 2017):
  ``(x - x') * integral_0^1 grad f(x' + a (x - x')) da`` by a quadrature ``rule``.
* ``smoothgrad`` (Smilkov et al., 2017): :func:`xaijax.methods.combinators.smooth` of the
  plain ``gradient`` method.
* ``contrastive-gradient``: :func:`xaijax.methods.combinators.contrast` of the gradient
  (``d(z_t - mean_{i != t} z_i)/dx`` summed over channels).
* ``fullgrad`` (Srinivas & Fleuret, NeurIPS 2019; reference ``idiap/fullgrad-saliency``).
  For a piecewise-linear network (ReLU, max/avg pooling, conv, dense, eval-mode BatchNorm,
  residual adds) the *full-gradient decomposition* is exact::

      S(x) = sum(dS/dx * x) + sum_l sum(dS/dz_l * b_l)

  where ``z_l`` is the output of every layer ``l`` with a bias ``b_l`` (broadcast over
  the output's channel axis). Biased layers are ``nn.Conv``/``nn.Dense`` with ``use_bias``
  and every ``nn.BatchNorm``, whose *effective* bias (as in the reference) is
  ``beta - running_mean * gamma / sqrt(running_var + eps)``: an eval-mode BatchNorm is
  ``y = a x + c`` per channel, and ``c`` is its bias. A bias of a convolution feeding a
  BatchNorm is counted at the convolution (its gradient already carries the BN scale), so
  the result is the same as the BN-folded network's. :func:`fullgrad_decompose` returns
  the raw terms. The saliency map follows the reference: each term ``t`` (the input term
  ``dS/dx * x`` and the bias term of every *spatial* layer; dense layers only enter the
  decomposition) is post-processed by ``psi(t) = |t| - min|t|`` divided by
  ``max(|t| - min|t|) + 1e-6`` (min and max over all of one sample's positions and
  channels), summed over channels, bilinearly resized to the input size with
  **align_corners=True** (as the reference does), and the maps are summed.

FullGrad is :class:`~xaijax.methods.NotApplicable` on models that are not piecewise linear
(:func:`~xaijax.methods._core.require_piecewise_linear`: vision transformers, whose
LayerNorm, softmax and GELU break the decomposition: on a tiny random ViT the input and bias
terms sum to 0.15 where the logit is -1.88).

DeconvNet and Guided Backprop change the backward pass of the zoo's ReLU modules
(:class:`xaijax.models.layers.ReLU`) only: the modules are intercepted with
``flax.linen.intercept_methods`` inside the differentiated function and computed by a
``jax.custom_vjp`` ReLU whose backward applies the rule. Max-pooling, convolutions and
dense layers keep their ordinary gradients (max-pool "switches" and transposed filters, as
in both papers). ReLUs written as plain functions (``nn.relu``) inside a user's module are
not seen; a model without any ``layers.ReLU`` module is refused with
:class:`~xaijax.methods.NotApplicable`. On a vision transformer (GELU, no ReLU) both rules
would reduce to the plain gradient; they are refused rather than returned as a copy of
``gradient`` under another name (a table would then show two methods that are one).

All maps are (N, H, W) at input resolution; channel reductions follow
:func:`xaijax.methods.reduce_channels` (``abs-max`` by default for the signed
gradient-like maps, as TorchRay and Simonyan et al. do; ``sum`` for Integrated Gradients,
whose channel sum is the relevance that satisfies completeness).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.methods._core import (
    Method,
    NotApplicable,
    check_inputs,
    non_piecewise_linear_layers,
    reduce_channels,
    require_piecewise_linear,
    target_score,
    validate_positive_int,
)
from xaijax.methods.combinators import contrast, smooth
from xaijax.methods.registry import register
from xaijax.models import layers, taps
from xaijax.models.adapters import propagation_refusal
from xaijax.propagation.canonizers import batchnorm_affine

__all__ = [
    "Gradient",
    "input_gradient",
    "RELU_RULES",
    "relu_rule_interceptor",
    "modified_gradient",
    "ModifiedGradient",
    "QUADRATURE_RULES",
    "quadrature",
    "IntegratedGradients",
    "fullgrad_decompose",
    "FullGrad",
]


# --------------------------------------------------------------------------------------
# Gradient
# --------------------------------------------------------------------------------------


def input_gradient(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
    """Gradient of ``sum(seed * model(x))`` w.r.t. ``x``; shape of ``x``."""
    check_inputs(x)
    return jax.grad(lambda xx: target_score(model.apply(variables, xx), target))(x)


@dataclasses.dataclass(frozen=True)
class Gradient(Method):
    """Gradient saliency; ``times_input=True`` gives gradient x input.

    Attributes:
      times_input: multiply the gradient by the input before reducing channels.
      reduce: channel reduction (see :func:`xaijax.methods.reduce_channels`).
    """

    times_input: bool = False
    reduce: str = "abs-max"

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        g = input_gradient(model, variables, x, target)
        if self.times_input:
            g = g * x
        return reduce_channels(g, self.reduce)


# --------------------------------------------------------------------------------------
# ReLU backward rules
# --------------------------------------------------------------------------------------


@jax.custom_vjp
def _deconv_relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def _deconv_fwd(x):
    return jax.nn.relu(x), None


def _deconv_bwd(_, g):
    return (jax.nn.relu(g),)


_deconv_relu.defvjp(_deconv_fwd, _deconv_bwd)


@jax.custom_vjp
def _guided_relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def _guided_fwd(x):
    return jax.nn.relu(x), x


def _guided_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_fwd, _guided_bwd)

#: ReLU replacements by rule name: same forward as ReLU, modified backward.
RELU_RULES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "deconvnet": _deconv_relu,
    "guided": _guided_relu,
}


def relu_rule_interceptor(rule: str, counter: list[str] | None = None) -> Callable[..., Any]:
    """A ``flax.linen`` method interceptor that computes every ``layers.ReLU`` call with ``rule``.

    Args:
      rule: a key of :data:`RELU_RULES` (``"deconvnet"`` or ``"guided"``).
      counter: if given, the dotted name of every replaced ReLU is appended (at trace time).

    Use it inside the function that is differentiated::

        with nn.intercept_methods(relu_rule_interceptor("guided")):
            out = model.apply(variables, x)

    Replaced ReLU calls do not reach interceptors registered inside this one.
    """
    try:
        fn = RELU_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown ReLU rule {rule!r}; use one of {sorted(RELU_RULES)}") from None

    def on_call(name, module, call_next, args, kwargs):
        if isinstance(module, layers.ReLU):
            if counter is not None:
                counter.append(name)
            return fn(*args, **kwargs)
        return call_next(*args, **kwargs)

    return taps.call_interceptor(on_call)


def modified_gradient(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, rule: str
) -> jax.Array:
    """Input gradient of ``sum(seed * model(x))`` with ReLU backward ``rule``; shape of ``x``.

    Raises:
      NotApplicable: the model has no ``xaijax.models.layers.ReLU`` module (the rule would
        silently reduce to the plain gradient).
    """
    check_inputs(x)
    seen: list[str] = []
    intercept = relu_rule_interceptor(rule, seen)

    def score(xx: jax.Array) -> jax.Array:
        with nn.intercept_methods(intercept):
            out = model.apply(variables, xx)
        return target_score(out, target)

    g = jax.grad(score)(x)
    if not seen:
        other = non_piecewise_linear_layers(model, variables, x)
        if other:
            raise NotApplicable(
                f"the {rule!r} rule is defined by the masks of ReLUs, and {type(model).__name__} has no ReLU: its "
                f"nonlinearities are {', '.join(other)} (a transformer). Without ReLUs the method is just the "
                "plain input gradient; use 'gradient' (or 'smoothgrad', 'integrated-gradients')"
            )
        raise NotApplicable(
            f"{type(model).__name__} has no xaijax.models.layers.ReLU modules, so the {rule!r} ReLU rule "
            "cannot be applied; build the model's ReLUs with layers.ReLU(name=...)"
        )
    return g


@dataclasses.dataclass(frozen=True)
class ModifiedGradient(Method):
    """Gradient with a modified ReLU backward pass (``deconvnet`` or ``guided``).

    Attributes:
      rule: ``"deconvnet"`` (``g_in = relu(g_out)``) or ``"guided"``
        (``g_in = g_out [x > 0] [g_out > 0]``).
      reduce: channel reduction (default ``abs-max``, TorchRay's saliency convention).
      times_input: multiply by the input before reducing (rarely used; default off).
    """

    rule: str = "guided"
    reduce: str = "abs-max"
    times_input: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RELU_RULES:
            raise ValueError(f"unknown ReLU rule {self.rule!r}; use one of {sorted(RELU_RULES)}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        g = modified_gradient(model, variables, x, target, self.rule)
        if self.times_input:
            g = g * x
        return reduce_channels(g, self.reduce)



# --------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------

QUADRATURE_RULES = ("riemann-left", "riemann-right", "riemann-middle", "trapezoid", "gauss-legendre")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of a quadrature on [0, 1].

    * ``riemann-left``: ``alpha_k = k / m``, ``k = 0..m-1``, weights ``1/m``;
    * ``riemann-right``: ``alpha_k = k / m``, ``k = 1..m``, weights ``1/m``;
    * ``riemann-middle``: ``alpha_k = (k + 1/2) / m``, weights ``1/m``;
    * ``trapezoid``: ``alpha_k = k / (m - 1)``, ``k = 0..m-1``, weights ``1/(m-1)`` halved at
      both ends (needs ``m >= 2``). Captum's ``riemann_trapezoid`` has these nodes but weights
      ``1/m`` halved at both ends, which sum to ``(m - 1)/m``: its integrated gradients are
      xaijax's times ``(m - 1)/m``;
    * ``gauss-legendre``: the ``m``-point Gauss-Legendre rule mapped to [0, 1] (exact for
      polynomial integrands of degree <= 2m - 1).

    Returns float64 numpy arrays of shape (m,).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"integrated gradients: steps must be a positive int, got {steps!r}")
    m = int(steps)
    if rule == "riemann-left":
        return np.arange(m) / m, np.full(m, 1.0 / m)
    if rule == "riemann-right":
        return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)
    if rule == "riemann-middle":
        return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        if m < 2:
            raise ValueError("integrated gradients: the trapezoid rule needs steps >= 2")
        w = np.full(m, 1.0 / (m - 1))
        w[0] = w[-1] = 0.5 / (m - 1)
        return np.linspace(0.0, 1.0, m), w
    if rule == "gauss-legendre":
        t, w = np.polynomial.legendre.leggauss(m)
        return (t + 1.0) / 2.0, w / 2.0
    raise ValueError(f"unknown quadrature rule {rule!r}; use one of {', '.join(QUADRATURE_RULES)}")


@dataclasses.dataclass(frozen=True, eq=False)
class IntegratedGradients(Method):
    """Integrated Gradients: ``(x - x') * sum_k w_k grad f(x' + alpha_k (x - x'))``.

    ``f = sum(seed * model(.))`` (the target logit for an int target). With the channel
    sum (``reduce="sum"``, default) the map satisfies *completeness*:
    ``map.sum() ~= f(x) - f(x')`` up to the quadrature error.

    Attributes:
      baseline: the reference input ``x'`` in the model's (normalised) input space: a
        scalar or an array broadcastable to ``x`` ((C,), (H, W, C) or (N, H, W, C)).
        Default ``0.0``: zeros in normalised space, i.e. the dataset's mean colour for the
        torchvision and Caffe conventions (Captum's default). For a black image pass
        ``preprocess.normalize(jnp.zeros(3))``. ``__call__`` also accepts a ``baseline``
        keyword that overrides this one (it may be a traced array).
      steps: number of quadrature nodes ``m`` (default 32).
      rule: quadrature rule, one of :data:`QUADRATURE_RULES` (see :func:`quadrature`);
        default ``riemann-right``.
      chunk: nodes per batched gradient call (``None``: all ``m`` in one vmapped call); the
        nodes are processed in ``lax.map`` chunks of this size to bound memory.
      reduce: channel reduction of the attribution (default ``sum``).

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    baseline: Any = 0.0
    steps: int = 32
    rule: str = "riemann-right"
    chunk: int | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        quadrature(self.rule, self.steps)  # validates rule and steps
        validate_positive_int("integrated gradients", "chunk", self.chunk, optional=True)

    def attribution(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, baseline: Any = None
    ) -> jax.Array:
        """Per-channel attribution, shape of ``x`` (N, H, W, C)."""
        check_inputs(x)
        base = self.baseline if baseline is None else baseline
        base = jnp.asarray(base, x.dtype)
        try:
            base = jnp.broadcast_to(base, x.shape)
        except ValueError:
            raise ValueError(
                f"integrated gradients: baseline of shape {base.shape} does not broadcast to the input shape {x.shape}"
            ) from None
        alphas, weights = quadrature(self.rule, self.steps)
        alphas = jnp.asarray(alphas, x.dtype)
        weights = jnp.asarray(weights, x.dtype)
        delta = x - base

        grad = jax.grad(lambda xx: target_score(model.apply(variables, xx), target))

        def at(aw: tuple[jax.Array, jax.Array]) -> jax.Array:
            a, w = aw
            return w * grad(base + a * delta)

        if self.chunk is None or self.chunk >= self.steps:
            grads = jax.vmap(at)((alphas, weights))  # (m, N, H, W, C)
        else:
            grads = jax.lax.map(at, (alphas, weights), batch_size=self.chunk)
        return delta * grads.sum(axis=0)

    def __call__(
        self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, *, baseline: Any = None
    ) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target, baseline), self.reduce)



# --------------------------------------------------------------------------------------
# FullGrad
# --------------------------------------------------------------------------------------

_BIASED = (nn.Conv, nn.Dense, nn.BatchNorm)


def _effective_bias(module: nn.Module, name: str, kwargs: Mapping[str, Any]) -> jax.Array | None:
    """Bias ``b`` of a conv/dense layer, or ``c`` of an eval BatchNorm ``y = a x + c``; None if none."""
    if isinstance(module, nn.BatchNorm):
        ura = kwargs.get("use_running_average", None)
        ura = module.use_running_average if ura is None else ura
        if not ura:
            raise ValueError(
                f"BatchNorm layer {name!r} is in training mode; FullGrad needs an eval-mode model "
                "(build it with train=False) so that BatchNorm is affine with an effective bias"
            )
        axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
        if axis not in (-1, (-1,)):
            raise ValueError(f"BatchNorm layer {name!r} normalises axis {axis}; only the channel axis is supported")
        _, c = batchnorm_affine(module, module.variables)
        return c
    if getattr(module, "use_bias", False):
        return module.variables["params"]["bias"]
    return None


def _forward_biased(model, variables, x, deltas: Mapping[str, jax.Array] | None):
    """Forward pass that records every biased layer's output shape and effective bias.

    If ``deltas`` is given, ``deltas[name]`` is added to that layer's output. Nested calls of
    the same module (a subclass calling ``super().__call__``, as xaijax's BatchNorm does)
    are counted once, at the outermost call.

    Returns:
      ``(out, {name: (output, bias)})`` in call order.
    """
    records: dict[str, tuple[jax.Array, jax.Array]] = {}

    def on_call(name, mod, call_next, args, kwargs):
        if not isinstance(mod, _BIASED):
            return call_next(*args, **kwargs)
        bias = _effective_bias(mod, name, kwargs)  # before the call: a train-mode BN fails here
        out = call_next(*args, **kwargs)
        if bias is None:
            return out
        if name in records:
            raise ValueError(f"layer {name!r} is called more than once; FullGrad cannot attribute its bias")
        if deltas is not None:
            out = out + deltas[name]
        records[name] = (out, bias)
        return out

    with taps.intercept_calls(on_call):
        out = model.apply(variables, x)
    return out, records


def fullgrad_decompose(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Full-gradient decomposition of the score ``S = sum(seed * model(x))`` (one backward pass).

    Args:
      x: NHWC batch (N, H, W, C).
      target: int / int (N,) class indices or an (N, K) seed.

    Returns:
      ``(input_term, bias_terms, out)``: ``input_term = dS/dx * x`` (N, H, W, C);
      ``bias_terms[name] = dS/dz * b`` with the layer output's shape (N, h, w, K) or (N, K),
      for every layer with a (effective) bias (a dict: JAX sorts its keys when it crosses
      ``jit``); ``out`` the model output
      (N, K). For piecewise-linear networks ``sum(input_term[n]) + sum_l sum(bias_terms[l][n])
      == S[n]`` (completeness).
    """
    check_inputs(x)
    _, shapes = jax.eval_shape(lambda xx: _forward_biased(model, variables, xx, None), x)
    zeros = {k: jnp.zeros(o.shape, o.dtype) for k, (o, _) in shapes.items()}

    def score(xx, deltas):
        out, rec = _forward_biased(model, variables, xx, deltas)
        return target_score(out, target), (out, {k: b for k, (_, b) in rec.items()})

    (gx, gz), (out, biases) = jax.grad(score, argnums=(0, 1), has_aux=True)(x, zeros)
    bias_terms = {k: gz[k] * biases[k].astype(gz[k].dtype) for k in shapes}
    return gx * x, bias_terms, out


def _fullgrad_postprocess(t: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``|t|`` shifted to min 0 and divided by (max + eps), per sample (the reference's ``_postProcess``)."""
    axes = tuple(range(1, t.ndim))
    t = jnp.abs(t)
    t = t - t.min(axis=axes, keepdims=True)
    return t / (t.max(axis=axes, keepdims=True) + eps)


@dataclasses.dataclass(frozen=True)
class FullGrad(Method):
    """FullGrad saliency (see the module docstring).

    Attributes:
      eps: added to the maximum in the per-term normalisation (reference: 1e-6).
    """

    eps: float = 1e-6

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C).

        Raises:
          NotApplicable: a model that is not piecewise linear (a transformer), where the
            decomposition is not complete.
        """
        check_inputs(x)
        refusal = propagation_refusal(model)
        if refusal is not None:  # the bias terms would be missing without a word
            raise NotApplicable(f"FullGrad sums the gradients of every layer's bias: {refusal}")
        require_piecewise_linear(
            model,
            variables,
            x,
            "FullGrad",
            "its decomposition S = x.dS/dx + sum_l b_l.dS/dz_l is exact only there (through LayerNorm, "
            "softmax and GELU it misses part of the score, and token layers' bias terms have no spatial map)",
        )
        input_term, bias_terms, _ = fullgrad_decompose(model, variables, x, target)
        size = x.shape[1:3]
        cam = _fullgrad_postprocess(input_term, self.eps).sum(-1)
        for t in bias_terms.values():
            if t.ndim == 4:
                cam = cam + imageops.resize(_fullgrad_postprocess(t, self.eps).sum(-1), size, "bilinear-align-corners")
        return cam


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def _smoothgrad(
    n: int = 50,
    noise: float = 0.15,
    squared: bool = False,
    seed: int = 0,
    chunk: int | None = None,
    reduce: str = "abs-max",
):
    return smooth(Gradient(False, reduce), n=n, noise=noise, squared=squared, seed=seed, chunk=chunk)


def _contrastive_gradient(reduce: str = "sum", dual: Any = "uniform", scale: str = "none", positive: bool = False):
    return contrast(Gradient(False, reduce), dual, scale, positive)


register("gradient", lambda reduce="abs-max": Gradient(False, reduce), "input gradient (Simonyan et al. 2014)")
register("gradient-x-input", lambda reduce="sum": Gradient(True, reduce), "gradient times input")
register(
    "deconvnet",
    lambda reduce="abs-max", times_input=False: ModifiedGradient("deconvnet", reduce, times_input),
    "DeconvNet (Zeiler & Fergus 2014): ReLU backward applied to the gradient only",
)
register(
    "guided-backprop",
    lambda reduce="abs-max", times_input=False: ModifiedGradient("guided", reduce, times_input),
    "Guided Backprop (Springenberg et al. 2015): forward and gradient ReLU masks",
)
register(
    "integrated-gradients",
    IntegratedGradients,
    "Integrated Gradients (Sundararajan et al. 2017): path integral of gradients from a baseline",
)
register(
    "smoothgrad",
    _smoothgrad,
    "SmoothGrad (Smilkov et al. 2017): gradient maps averaged over noisy copies of the input",
)
register(
    "contrastive-gradient",
    _contrastive_gradient,
    "contrast over the input gradient: d(z_t - mean_{i!=t} z_i)/dx summed over channels (uniform dual, no scaling)",
)
register("fullgrad", FullGrad, "FullGrad (Srinivas & Fleuret 2019): input-gradient x input plus all bias-gradients")
