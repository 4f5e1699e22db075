"""Layer-wise relevance propagation and its contrastive variants (CLRP, SGLRP).

All methods run the model's own forward pass with relevance rules attached as custom VJPs
(:mod:`xaijax.propagation`) and are called as ``method(model, variables, x, target) ->
(N, H, W)``. Pure: ``jax.jit`` (model static) and
``jax.vmap`` apply; samples are independent.

LRP (:class:`LRP`). The output relevance is ``seed * logits`` — the target logit for an int
target, or any output-shaped float seed weighting the logits (``output="seed"``: the seed
itself, which is what the contrastive variants propagate) — propagated to the input with
a composite (:mod:`xaijax.propagation.composites`) and summed over channels:

====================================  ====================================================
``lrp-epsilon``                       epsilon on every convolution and dense layer
``lrp-epsilon-plus``                  z+ (alpha1-beta0) on convolutions, epsilon on dense
``lrp-epsilon-plus-flat``             as above, flat rule on the first layer
``lrp-epsilon-gamma-box``             z^B on the first layer, gamma on convolutions,
                                      epsilon on dense layers
``lrp-alpha1-beta0``                  alpha1-beta0 (z+) on every convolution/dense layer
``lrp-alpha2-beta1``                  alpha2-beta1 on every convolution/dense layer
``lrp-zplus-nobias-samplebox``        the LRP baseline of the RAP / RSP authors' code: z+
                                      with biases ignored on every convolution/dense layer,
                                      z^B with each image's own min/max on the first,
                                      BatchNorm passes relevance (not folded); the input
                                      total is the target logit
``attnlrp``                           AttnLRP (Achtibat et al. 2024) for vision
                                      transformers: LayerNorm normaliser held constant,
                                      AttnLRP's softmax rule, q.k / attention.v split half
                                      and half, GELU identity, gamma on convolutions (0.25)
                                      and dense layers (0.05); ``conv_gamma=None`` /
                                      ``dense_gamma=None``: epsilon there
``cp-lrp``                            CP-LRP (Ali et al. 2022): as ``attnlrp`` but the
                                      attention is a constant: attention.v sends all
                                      relevance to v, none to the softmax / q.k path
====================================  ====================================================

``attnlrp`` and ``cp-lrp`` are composites like the others: on a network without transformer
layers they are LRP with gamma (or epsilon) on its convolutions and dense layers. Every other
``lrp-*`` method also runs on the zoo's ViT/DeiT, with AttnLRP's rules on the transformer
layers (see :mod:`xaijax.propagation.composites`).

Hyperparameters: ``eps`` (1e-6), ``gamma`` (0.25), ``alpha``/``beta``, ``low``/``high`` (z^B
bounds; default: the ImageNet-normalised range of RGB values in [0, 1]) and ``composite``,
which replaces the whole rule set (a :class:`~xaijax.propagation.Composite` or a built-in
composite name). Residual sums split relevance in proportion to their inputs, concatenations
split by channel, max pooling is winner-take-all, average pooling proportional, and
BatchNorm is folded into the preceding convolution (see the composites module; not in
``lrp-zplus-nobias-samplebox``, whose rules follow its reference code).

Contrastive LRP (:class:`CLRP`, Gu, Yang & Tresp, ACCV 2018). Two propagations with a
deep-Taylor rule set, by default :func:`~xaijax.propagation.composites.zplus_box` (z^B on the
input layer with the per-channel ImageNet range as bounds, z+ elsewhere counting the positive
bias in its denominators, as zennit does). That is *not* exactly the reference code's: the
CLRP authors' z+ ignores biases and their z^B uses scalar bounds (-2.1179, 2.64); their rule
set is ``composite=composites.zplus_box(-2.1179, 2.64, bias=False)`` (registry:
``get("clrp", low=-2.1179, high=2.64, bias=False)``), and ``composite="zplus-nobias-samplebox"``
gives the RAP / RSP authors' LRP (per-image bounds). One propagation runs from
the target, ``R_t`` (output relevance ``|z_t|`` at the target), one from the *dual* concept,
``R_d``; the map is ``R_t - R_d * sum(R_t) / sum(R_d)`` per sample, i.e. the dual is scaled
to the target's total before it is subtracted (the reference normalises both to unit sum and
subtracts, which is the same map divided by ``sum(R_t)``). The dual (``dual=``):

* ``"uniform"`` (default): all other classes with equal weight (CLRP1 as in the SGLRP
  authors' implementation);
* ``"logits"``: all other classes weighted by ``|z_i|`` (the CLRP authors' code);
* ``"negated"``: the target with negated classifier weights (CLRP2).

The positive part is what the references display; xaijax returns the signed map.

SGLRP (Iwana, Kuroki & Uchida, ICCVW 2019). Seeds from the softmax gradient: target
``y_t (1 - y_t)`` (plus 1e-8), others ``y_t y_i``; map ``R_target - R_others * sum(R_target)
/ sum(R_others)`` (``scaling=True``, as in the authors' code; ``scaling=False`` gives LRP of
the signed softmax gradient itself). Rule set as for CLRP (the same ``composite`` and
``low``/``high``/``bias`` options). Where ``sum(R_others)`` is exactly zero the authors' code
divides by it and its map becomes NaN; xaijax deliberately drops the dual term there (the map
is ``R_target``), as for CLRP.

Both are the :func:`~xaijax.methods.combinators.contrast` combinator over seed-propagating
LRP (``LRP(composite, output="seed")``): CLRP with ``weights="abs-logit"`` and
``scale="total"`` (the ``"negated"`` dual: ``dual="target"`` with a ``dual_method`` whose
classifier weights are flipped), SGLRP with the ``"softmax"`` dual and
``weights="softmax-gradient"``. :meth:`CLRP.as_contrast` / :meth:`SGLRP.as_contrast` return
that combinator. Both need class indices (``accepts_seed = False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax

from xaijax.methods._core import Method, as_seed, check_inputs, class_indices, reduce_channels
from xaijax.methods.combinators import Contrast
from xaijax.methods.registry import register
from xaijax.propagation import composites as C
from xaijax.propagation.composites import Composite
from xaijax.propagation.engine import plan, relevance
from xaijax.propagation.rules import Flipped

__all__ = ["LRP", "CLRP", "SGLRP", "flip_classifier"]

_OUTPUTS = ("logits", "seed")


def flip_classifier(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, composite: Composite) -> Composite:
    """``composite`` with the classifier (last convolution/dense layer) rule applied to negated weights."""
    p = plan(model, variables, x, composite)
    last = [e for e in p.layers if e.kind in ("conv", "dense")][-1]
    return composite.replace(names=((last.name, Flipped(last.rule)),) + tuple(composite.names))


@dataclasses.dataclass(frozen=True)
class LRP(Method):
    """LRP with a composite: output relevance ``seed * logits`` (or the seed), channels reduced.

    Attributes:
      composite: layer -> rule map (a Composite or a built-in composite name).
      reduce: channel reduction of the input relevance (``"sum"``: relevance per pixel).
      output: ``"logits"`` (output relevance ``seed * logits``) or ``"seed"`` (the seed itself).
      flip_classifier: apply the classifier's rule to its negated weights (CLRP2's dual).
    """

    composite: Composite | str = "epsilon"
    reduce: str = "sum"
    output: str = "logits"
    flip_classifier: bool = False

    def __post_init__(self) -> None:
        if self.output not in _OUTPUTS:
            raise ValueError(f"LRP output must be one of {_OUTPUTS}, got {self.output!r}")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) relevance map for ``x`` (N, H, W, C)."""
        check_inputs(x)
        composite = C.resolve(self.composite)
        if self.flip_classifier:
            composite = flip_classifier(model, variables, x, composite)
        n, k = plan(model, variables, x, composite).logits_shape
        seed = as_seed(target, k, n, x.dtype)
        if self.output == "seed":
            r = relevance(model, variables, x, lambda out: seed.astype(out.dtype), composite)
        else:
            r = relevance(model, variables, x, lambda out: seed.astype(out.dtype) * out, composite)
        return reduce_channels(r, self.reduce)


def _check_indices(model, variables, x, target, composite: Composite, method: str) -> None:
    """Readable errors for a float seed or an out-of-range class, before any propagation."""
    n, k = plan(model, variables, x, composite).logits_shape
    class_indices(target, n, k, method)


@dataclasses.dataclass(frozen=True)
class CLRP(Method):
    """Contrastive LRP (see the module docstring).

    Attributes:
      composite: rule set (default ``"zplus-box"``: z^B on the input layer, z+ with ``b+``
        elsewhere; see the module docstring for the reference codes' variants).
      dual: ``"uniform"``, ``"logits"`` or ``"negated"``.
      reduce: channel reduction.
    """

    composite: Composite | str = "zplus-box"
    dual: str = "uniform"
    reduce: str = "sum"

    accepts_seed = False

    def __post_init__(self) -> None:
        if self.dual not in ("uniform", "logits", "negated"):
            raise ValueError(f"CLRP dual must be 'uniform', 'logits' or 'negated', got {self.dual!r}")

    def as_contrast(self) -> Contrast:
        """The equivalent :class:`~xaijax.methods.combinators.Contrast` over seed-propagating LRP."""
        base = LRP(self.composite, self.reduce, output="seed")
        if self.dual == "negated":
            flipped = LRP(self.composite, self.reduce, output="seed", flip_classifier=True)
            return Contrast(base, "target", "total", weights="abs-logit", dual_method=flipped)
        return Contrast(base, self.dual, "total", weights="abs-logit")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) signed contrastive map for ``x`` (N, H, W, C) and class indices ``target``."""
        check_inputs(x)
        _check_indices(model, variables, x, target, C.resolve(self.composite), "clrp")
        return self.as_contrast()(model, variables, x, target)


@dataclasses.dataclass(frozen=True)
class SGLRP(Method):
    """Softmax-gradient LRP (see the module docstring).

    Attributes:
      composite: rule set (default ``"zplus-box"``, as for :class:`CLRP`).
      scaling: scale the others' relevance to the target's total before subtracting.
      reduce: channel reduction.
    """

    composite: Composite | str = "zplus-box"
    scaling: bool = True
    reduce: str = "sum"

    accepts_seed = False

    def as_contrast(self) -> Contrast:
        """The equivalent :class:`~xaijax.methods.combinators.Contrast` over seed-propagating LRP."""
        base = LRP(self.composite, self.reduce, output="seed")
        return Contrast(base, "softmax", "total" if self.scaling else "none", weights="softmax-gradient")

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) signed map for ``x`` (N, H, W, C) and class indices ``target``."""
        check_inputs(x)
        _check_indices(model, variables, x, target, C.resolve(self.composite), "sglrp")
        return self.as_contrast()(model, variables, x, target)


def _lrp_factory(make_composite):
    def factory(composite: Composite | str | None = None, reduce: str = "sum", **hparams: Any) -> LRP:
        if composite is not None:
            if hparams:
                raise TypeError(f"pass either composite= or rule hyperparameters {sorted(hparams)}, not both")
            return LRP(C.resolve(composite), reduce)
        return LRP(make_composite(**hparams), reduce)

    return factory


register(
    "lrp-epsilon",
    _lrp_factory(lambda eps=1e-6: C.epsilon(eps)),
    "LRP-epsilon on every layer (Bach et al. 2015)",
)
register(
    "lrp-epsilon-plus",
    _lrp_factory(lambda eps=1e-6: C.epsilon_plus(eps)),
    "LRP: z+ on convolutions, epsilon on dense layers",
)
register(
    "lrp-epsilon-plus-flat",
    _lrp_factory(lambda eps=1e-6: C.epsilon_plus_flat(eps)),
    "LRP: flat first layer, z+ on convolutions, epsilon on dense layers",
)
register(
    "lrp-epsilon-gamma-box",
    _lrp_factory(lambda eps=1e-6, gamma=0.25, low=None, high=None: C.epsilon_gamma_box(eps, gamma, low, high)),
    "LRP: z^B first layer, gamma on convolutions, epsilon on dense layers",
)
register(
    "lrp-alpha1-beta0",
    _lrp_factory(lambda alpha=1.0, beta=0.0: C.alpha_beta(alpha, beta)),
    "LRP-alpha1-beta0 (z+) on every layer",
)
register(
    "lrp-alpha2-beta1",
    _lrp_factory(lambda alpha=2.0, beta=1.0: C.alpha_beta(alpha, beta)),
    "LRP-alpha2-beta1 on every layer",
)
register(
    "lrp-zplus-nobias-samplebox",
    _lrp_factory(lambda input_stabilizer=1e-9: C.zplus_nobias_samplebox(input_stabilizer)),
    "LRP baseline of the RAP/RSP authors' code: z+ ignoring biases, z^B with per-image bounds, BatchNorm passes",
)
register(
    "attnlrp",
    _lrp_factory(
        lambda eps=1e-6, conv_gamma=C.VIT_CONV_GAMMA, dense_gamma=C.VIT_DENSE_GAMMA: C.attnlrp(eps, conv_gamma, dense_gamma)
    ),
    "AttnLRP for vision transformers (Achtibat et al. 2024): softmax and bilinear attention rules, gamma on linear layers",
)
register(
    "cp-lrp",
    _lrp_factory(
        lambda eps=1e-6, conv_gamma=C.VIT_CONV_GAMMA, dense_gamma=C.VIT_DENSE_GAMMA: C.cp_lrp(eps, conv_gamma, dense_gamma)
    ),
    "CP-LRP for vision transformers (Ali et al. 2022): attention held constant, relevance only through the values",
)


def _contrast_composite(composite: Composite | str | None, low, high, bias: bool) -> Composite:
    """The rule set of CLRP/SGLRP: ``composite`` (e.g. ``"zplus-nobias-samplebox"``, the RAP /
    RSP authors' LRP), else ``zplus_box(low, high, bias)`` (``bias=False``, ``low=-2.1179``,
    ``high=2.64``: the CLRP authors' rules)."""
    if composite is not None:
        if (low, high, bias) != (None, None, True):
            raise TypeError("pass either composite= or low=/high=/bias= (options of the default zplus-box), not both")
        return C.resolve(composite)
    return C.zplus_box(low, high, bias)


def _clrp(composite: Composite | str | None = None, dual: str = "uniform", reduce: str = "sum", low=None, high=None,
          bias: bool = True) -> CLRP:
    return CLRP(_contrast_composite(composite, low, high, bias), dual, reduce)


def _sglrp(composite: Composite | str | None = None, scaling: bool = True, reduce: str = "sum", low=None, high=None,
           bias: bool = True) -> SGLRP:
    return SGLRP(_contrast_composite(composite, low, high, bias), scaling, reduce)


register("clrp", _clrp, "contrastive LRP: target minus scaled dual relevance (Gu et al. 2018)")
register("sglrp", _sglrp, "softmax-gradient LRP (Iwana et al. 2019)")
