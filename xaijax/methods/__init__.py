"""Attribution methods and their registry (``get``, ``names``).

Every method is called as ``method(model, variables, x, target) -> (N, H, W) maps``; see
:mod:`xaijax.methods.base` for the conventions on inputs and targets.
"""

from xaijax.methods import baselines, gradient  # noqa: F401  (registers methods)
from xaijax.methods.base import as_seed, check_inputs, reduce_channels
from xaijax.methods.baselines import Center
from xaijax.methods.gradient import Gradient, input_gradient
from xaijax.methods.registry import describe, get, names, register

__all__ = ["Center", "as_seed", "check_inputs", "reduce_channels", "Gradient", "input_gradient", "describe", "get", "names", "register"]
