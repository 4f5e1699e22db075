"""DeepLIFT (rescale rule) and DeepLIFT-SHAP as propagation rules.

Registered names:

* ``deeplift`` (Shrikumar, Greenside & Kundaje, ICML 2017; Captum's ``DeepLift`` with its
  default rescale rule): ``(x - x0) * m`` where the multiplier ``m`` is the backward pass of
  the engine (:mod:`xaijax.propagation.engine`) with DeepLIFT's rules
  (:mod:`xaijax.propagation.deeplift_rules`): ReLU and element-wise activations rescale the
  multiplier by ``(y - y0) / (x - x0)``, max pooling uses Captum's cross-maximum rule, and
  convolutions, dense layers, BatchNorm (eval), average pooling, residual sums, concatenation
  and flatten pass the ordinary gradient. The reference's activations come from a **paired
  batch**: the forward pass runs on ``[x; x0]`` and every rule splits its layer's input and
  output into the two halves (Captum does the same with its forward pre-hook). For a
  piecewise-linear network with the rescale rule, *summation-to-delta* holds:
  ``sum(attribution) == f(x) - f(x0)`` (exactly, up to rounding, away from the ``eps``
  fallback), ``f = sum(seed * model(.))``.
* ``deeplift-shap`` (Lundberg & Lee, NeurIPS 2017; Captum's ``DeepLiftShap``): DeepLIFT
  averaged over a set of references; ``sum(attribution) == f(x) - mean_b f(b)``.

Baselines: ``deeplift`` takes a scalar or an array broadcastable to ``x`` (default 0.0:
zeros in the model's normalised input space, Captum's default). ``deeplift-shap`` takes
``baselines`` (B, H, W, C) (shared) or (N, B, H, W, C) (per sample); Captum requires them
(B > 1); xaijax's default (``None``) is :func:`~xaijax.methods.path_attribution.reference_set`'s
five references (zeros, the blurred input, three uniform-noise images, drawn from ``seed``).

Maps are (N, H, W): the per-channel attribution (``attribution``, what Captum returns) reduced
with :func:`~xaijax.methods.reduce_channels`, ``sum`` by default (the relevance whose total is
the score difference).

Where xaijax differs from Captum (documented, not bugs):

* GELU gets the rescale rule (Captum lets ``nn.GELU``, which is not in its list of supported
  nonlinearities, fall back to its gradient); sigmoid, tanh, ELU, softplus get it in both.
* Transformers (LayerNorm, softmax, attention products) are refused with
  :class:`~xaijax.methods.NotApplicable`: DeepLIFT's rescale rule is defined for element-wise
  nonlinearities, and Captum's fallback to gradients for LayerNorm and the attention products
  (and its softmax rule, which subtracts a mean over the whole paired batch) gives maps that no
  longer sum to the score difference. Use integrated gradients, GradientSHAP or AttnLRP there.
* Overlapping max-pooling windows (ResNet's stem): the cross-maximum contributions of windows
  that share a winner are added (the pooling's VJP), where torch's ``max_unpool2d`` keeps one;
  non-overlapping pools (VGG) agree with Captum exactly.
* Operations that a model computes with functions rather than layer modules get the engine's
  functional rules (:mod:`xaijax.propagation.functional`); those whose rule is not a gradient
  (scalings and multiplications by constants, products inside an activation, attention) are
  refused with :class:`NotApplicable` naming them. The zoo's models are made of modules only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.methods._core import Method, NotApplicable, as_seed, check_inputs, reduce_channels, validate_number, validate_positive_int
from xaijax.methods.path_attribution import as_baseline, reference_set
from xaijax.methods.registry import register
from xaijax.models.adapters import propagation_refusal
from xaijax.propagation import deeplift_rules, engine

__all__ = ["deeplift_multipliers", "DeepLift", "DeepLiftShap"]

#: functional-operation classes whose engine rule is the gradient (or DeepLIFT's own rule)
_FUNCTIONAL_OK = ("relu", "maxpool", "avgpool", "add", "bias", "activation")


def _check_model(model: nn.Module, variables: Mapping[str, Any], xx: jax.Array, composite: Any) -> None:
    refusal = propagation_refusal(model)
    if refusal is not None:
        raise NotApplicable(f"DeepLIFT propagates multipliers layer by layer: {refusal}")
    the_plan = engine.plan(model, variables, xx, composite)
    bad = sorted({f"{e.type_name} ({e.name})" for e in the_plan.layers if e.kind in deeplift_rules.UNSUPPORTED_KINDS})
    if bad:
        raise NotApplicable(
            f"DeepLIFT's rescale rule is defined for element-wise nonlinearities and max pooling; {type(model).__name__} "
            f"calls transformer layers without a DeepLIFT rule: {', '.join(bad)} (Captum would silently use their "
            "gradients, and the map would no longer sum to f(x) - f(x0)). Use integrated-gradients, gradient-shap "
            "or attnlrp for transformers"
        )
    fbad = [op.name + f" ({op.kind})" for op in the_plan.functional if op.kind not in _FUNCTIONAL_OK]
    if fbad:
        raise NotApplicable(
            f"DeepLIFT needs the ordinary gradient through every linear operation; {type(model).__name__} computes "
            f"operations with functions whose propagation rule is not a gradient: {', '.join(fbad[:8])}. Put them in "
            "flax.linen layer modules (xaijax.models.layers) or use integrated-gradients / gradient-shap"
        )


def deeplift_multipliers(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, baseline: jax.Array, target: Any, eps: float = 1e-10
) -> jax.Array:
    """DeepLIFT's multipliers ``m`` (shape of ``x``): ``(x - baseline) * m`` is the attribution.

    Args:
      x: NHWC batch (N, H, W, C); baseline: the same shape (one reference per sample).
      target: int / int (N,) class indices or an (N, K) seed.

    Raises:
      NotApplicable: a model with transformer layers, functional operations without a
        gradient rule, or no interceptable layers.
    """
    n = x.shape[0]
    xx = jnp.concatenate([x, baseline.astype(x.dtype)], axis=0)
    composite = deeplift_rules.deeplift(eps)
    _check_model(model, variables, xx, composite)
    out, back = engine.pullback(model, variables, xx, composite)
    seed = as_seed(target, out.shape[-1], n, out.dtype)
    return back(jnp.concatenate([seed, seed], axis=0))[:n]


def _check_eps(owner: str, eps: Any) -> None:
    validate_number(owner, "eps", eps, low=0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class DeepLift(Method):
    """DeepLIFT with the rescale rule (see the module docstring).

    Attributes:
      baseline: the reference ``x0``: a scalar or an array broadcastable to ``x`` ((C,),
        (H, W, C) or (N, H, W, C)), in the model's input space; default 0.0 (Captum's).
      eps: below this ``|x - x0|`` a nonlinearity passes its ordinary gradient (Captum: 1e-10).
      reduce: channel reduction (default ``sum``).

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    baseline: Any = 0.0
    eps: float = 1e-10
    reduce: str = "sum"

    def __post_init__(self) -> None:
        _check_eps("deeplift", self.eps)
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel attribution ``(x - x0) * m``, shape of ``x`` (N, H, W, C) (Captum's output)."""
        check_inputs(x)
        base = as_baseline("deeplift", self.baseline, x)
        return (x - base) * deeplift_multipliers(model, variables, x, base, target, float(self.eps))

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target), self.reduce)


@dataclasses.dataclass(frozen=True, eq=False)
class DeepLiftShap(Method):
    """DeepLIFT averaged over a set of references (see the module docstring).

    Attributes:
      baselines: None (the default five references), (B, H, W, C) shared by all samples or
        (N, B, H, W, C) per sample.
      eps: as :class:`DeepLift`.
      seed: PRNG seed of the default references' noise.
      chunk: references per vmapped DeepLIFT call (``None``: all B at once).
      reduce: channel reduction (default ``sum``).

    Identity-hashed (``eq=False``) so that array baselines are allowed.
    """

    baselines: Any = None
    eps: float = 1e-10
    seed: int = 0
    chunk: int | None = None
    reduce: str = "sum"

    def __post_init__(self) -> None:
        _check_eps("deeplift-shap", self.eps)
        validate_positive_int("deeplift-shap", "chunk", self.chunk, optional=True)
        reduce_channels(jnp.zeros((1, 1, 1, 1)), self.reduce)

    def attribution(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """Per-channel attribution, shape of ``x`` (N, H, W, C): the mean over the references."""
        check_inputs(x)
        refs = reference_set("deeplift-shap", x, self.baselines, self.seed)  # (B, N, H, W, C)
        _check_model(model, variables, jnp.concatenate([x, x]), deeplift_rules.deeplift(float(self.eps)))
        eps = float(self.eps)

        def one(b: jax.Array) -> jax.Array:
            return (x - b) * deeplift_multipliers(model, variables, x, b, target, eps)

        count = refs.shape[0]
        if self.chunk is None or self.chunk >= count:
            attr = jax.vmap(one)(refs)
        else:
            attr = jax.lax.map(one, refs, batch_size=self.chunk)
        return attr.mean(axis=0)

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        return reduce_channels(self.attribution(model, variables, x, target), self.reduce)


register("deeplift", DeepLift, "DeepLIFT (Shrikumar et al. 2017): rescale-rule multipliers against a reference, as Captum")
register(
    "deeplift-shap",
    DeepLiftShap,
    "DeepLIFT-SHAP (Lundberg & Lee 2017): DeepLIFT averaged over a distribution of references, as Captum's DeepLiftShap",
)
