"""Relevance propagation: rules as custom VJPs of an ordinary jitted Flax forward pass.

* :mod:`~xaijax.propagation.rules` — frozen, hashable rules (epsilon, gamma, alpha-beta,
  z+, z^B, z^B with per-sample bounds, flat, w^2, excitation, pass, the plain VJP, flipped,
  flip-contrast);
* :mod:`~xaijax.propagation.rap_rules` / :mod:`~xaijax.propagation.rsp_rules` — the rules
  of Relative Attributing Propagation and Relative Sectional Propagation;
* :mod:`~xaijax.propagation.transformer_rules` — transformer layers (AttnLRP, CP-LRP):
  LayerNorm with its normaliser held constant, AttnLRP's softmax rule, the uniform rule of
  bilinear products (``q.k^T``, ``attention.v``), CP-LRP's constant attention, stop;
* :mod:`~xaijax.propagation.composites` — layer -> rule maps (by name, position, type,
  kind) and the named composites (epsilon-plus, epsilon-gamma-box, attnlrp, cp-lrp, ...);
* :mod:`~xaijax.propagation.canonizers` — BatchNorm folding;
* :mod:`~xaijax.propagation.engine` — the interception/custom-VJP machinery:
  :func:`relevance`, :func:`pullback`, :func:`relevance_trace`, :func:`plan`.

Example::

    from xaijax import propagation as P
    R = P.relevance(model, variables, x, lambda out: one_hot * out, P.composites.epsilon_plus())
"""

from xaijax.propagation import canonizers, composites, engine, rules, transformer_rules
from xaijax.propagation.composites import Composite
from xaijax.propagation.engine import (
    LayerPlan,
    LayerRelevance,
    Plan,
    layer_kind,
    plan,
    pullback,
    relevance,
    relevance_trace,
)
from xaijax.propagation.rules import (
    AlphaBeta,
    Epsilon,
    Excitation,
    Flat,
    FlipContrast,
    Flipped,
    Gamma,
    LayerView,
    Pass,
    PerSampleZBox,
    Rule,
    Vjp,
    WSquare,
    ZBox,
    ZPlus,
)
from xaijax.propagation.transformer_rules import BilinearUniform, ConstantFactor, LayerNormRule, SoftmaxRule, Stop

__all__ = [
    "canonizers",
    "composites",
    "engine",
    "rules",
    "transformer_rules",
    "Composite",
    "LayerPlan",
    "LayerRelevance",
    "Plan",
    "layer_kind",
    "plan",
    "pullback",
    "relevance",
    "relevance_trace",
    "AlphaBeta",
    "Epsilon",
    "Excitation",
    "Flat",
    "FlipContrast",
    "Flipped",
    "Gamma",
    "LayerView",
    "Pass",
    "PerSampleZBox",
    "Rule",
    "Vjp",
    "WSquare",
    "ZBox",
    "ZPlus",
    "LayerNormRule",
    "SoftmaxRule",
    "BilinearUniform",
    "ConstantFactor",
    "Stop",
]


def __getattr__(name: str):
    """``Gradient`` / ``Contrast``: the rules' old names (see :mod:`~xaijax.propagation.rules`)."""
    if name in rules._DEPRECATED:
        return getattr(rules, name)  # warns there
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
