"""Attribution methods and their registry (``get``, ``names``).

Every method is called as ``method(model, variables, x, target) -> (N, H, W) maps``; see
:mod:`xaijax.methods.base` for the conventions on inputs and targets. Importing this
package registers every method; ``names()`` lists them.
"""

from xaijax.methods import (  # noqa: F401  (registers methods)
    baselines,
    bilrp,
    cam,
    cam_extra,
    cam_variants,
    combinators,
    contrast,
    drise,
    extremal,
    gradient,
    gradient_family,
    lrp,
    perturbation,
    rap,
    rsp,
    ucag,
)
from xaijax.methods.base import as_seed, check_inputs, reduce_channels
from xaijax.methods.baselines import Center
from xaijax.methods.bilrp import BiLRP, BiLRPResult, bilrp_composite, plot_bilrp
from xaijax.methods.cam import GradCAM, GradCAMPlusPlus, activation_and_gradient, default_cam_layer, upsample_bilinear
from xaijax.methods.cam_variants import CAM, LayerCAM, ScoreCAM, XGradCAM
from xaijax.methods.combinators import Smooth, smooth
from xaijax.methods.contrast import Contrast, get_contrast  # the combinator itself: xaijax.methods.contrast.contrast
from xaijax.methods.drise import DRise, detector_function
from xaijax.methods.extremal import ExtremalPerturbation, ExtremalResult
from xaijax.methods.gradient import Gradient, input_gradient
from xaijax.methods.gradient_family import IntegratedGradients, ModifiedGradient, quadrature, relu_rule_interceptor
from xaijax.methods.lrp import CLRP, LRP, SGLRP, ExcitationBackprop
from xaijax.methods.perturbation import RISE
from xaijax.methods.rap import RAP
from xaijax.methods.rsp import RSP, ContrastiveRSP
from xaijax.methods.registry import describe, get, kind, names, register
from xaijax.methods.ucag import Ucag, get_ucag

__all__ = [
    "RAP",
    "Contrast",
    "ContrastiveRSP",
    "DRise",
    "ExtremalPerturbation",
    "ExtremalResult",
    "RSP",
    "detector_function",
    "get_contrast",
    "CAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
    "BiLRP",
    "BiLRPResult",
    "bilrp_composite",
    "plot_bilrp",
    "CLRP",
    "Center",
    "ExcitationBackprop",
    "LRP",
    "SGLRP",
    "GradCAM",
    "GradCAMPlusPlus",
    "Gradient",
    "IntegratedGradients",
    "ModifiedGradient",
    "RISE",
    "Smooth",
    "Ucag",
    "activation_and_gradient",
    "as_seed",
    "check_inputs",
    "default_cam_layer",
    "describe",
    "get",
    "get_ucag",
    "input_gradient",
    "kind",
    "names",
    "quadrature",
    "reduce_channels",
    "register",
    "relu_rule_interceptor",
    "smooth",
    "upsample_bilinear",
]
