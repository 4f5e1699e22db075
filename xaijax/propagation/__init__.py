"""Relevance propagation: rules as custom VJPs of an ordinary jitted Flax forward pass.

* :mod:`~xaijax.propagation.rules` — frozen, hashable rules (epsilon, gamma, alpha-beta,
  z+, z^B, z^B with per-sample bounds, flat, w^2, excitation, pass, the plain VJP, flipped,
  flip-contrast);
* :mod:`~xaijax.propagation.rap_rules` / :mod:`~xaijax.propagation.rsp_rules` — the rules
  of Relative Attributing Propagation and Relative Sectional Propagation;
* :mod:`~xaijax.propagation.composites` — layer -> rule maps (by name, position, type,
  kind) and the named composites (epsilon-plus, epsilon-gamma-box, ...);
* :mod:`~xaijax.propagation.canonizers` — BatchNorm folding;
* :mod:`~xaijax.propagation.engine` — the interception/custom-VJP machinery:
  :func:`relevance`, :func:`pullback`, :func:`relevance_trace`, :func:`plan`.

Example::

    from xaijax import propagation as P
    R = P.relevance(model, variables, x, lambda out: one_hot * out, P.composites.epsilon_plus())
"""

from xaijax.propagation import canonizers, composites, engine, rules
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

__all__ = [
    "canonizers",
    "composites",
    "engine",
    "rules",
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
]


def __getattr__(name: str):
    """``Gradient`` / ``Contrast``: the rules' old names (see :mod:`~xaijax.propagation.rules`)."""
    if name in rules._DEPRECATED:
        return getattr(rules, name)  # warns there
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
