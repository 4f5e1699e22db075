"""Attribution methods and their registry (``get``, ``names``).

Every method is a :class:`Method` — a frozen dataclass of hyperparameters that declares its
``kind`` and capabilities — called as ``method(model, variables, x, target) -> (N, H, W)``
maps; see :mod:`xaijax.methods._core` for the conventions on inputs, targets and seeds.
Importing this package registers every method; ``names()`` lists them and ``prefixes()``
the combinators (``contrast:``, ``smooth:``, ``ucag:``) that apply to any of them.

Layout, one family per module: :mod:`~xaijax.methods.gradient` (gradient, gradient x input,
DeconvNet, Guided Backprop, Integrated Gradients, SmoothGrad, FullGrad),
:mod:`~xaijax.methods.path_attribution` (GradientSHAP, Blur IG, Guided IG, VarGrad),
:mod:`~xaijax.methods.deeplift` (DeepLIFT, DeepLIFT-SHAP),
:mod:`~xaijax.methods.cam` (CAM, Grad-CAM, Grad-CAM++, HiResCAM, element-wise Grad-CAM,
Guided Grad-CAM, XGrad-CAM, Layer-CAM, Score-CAM, NormGrad, CAMERAS; the ``aug_smooth`` and
``eigen_smooth`` options of every CAM), :mod:`~xaijax.methods.cam_ablation` (Ablation-CAM,
Recipro-CAM), :mod:`~xaijax.methods.cam_factorization` (Eigen-CAM, EigenGrad-CAM, Deep Feature
Factorization), :mod:`~xaijax.methods.excitation`, :mod:`~xaijax.methods.lrp` (LRP,
CLRP, SGLRP), :mod:`~xaijax.methods.rap`, :mod:`~xaijax.methods.rsp`,
:mod:`~xaijax.methods.bilrp`, :mod:`~xaijax.methods.attention` (vision transformers),
:mod:`~xaijax.methods.perturbation` (RISE, Extremal Perturbation, D-RISE, occlusion, feature
ablation and permutation, Shapley value sampling, KernelSHAP, LIME, Sobol),
:mod:`~xaijax.methods.targets` (a layer, unit, detection or segmentation region as the
explained output; layer attributions), :mod:`~xaijax.methods.baselines` and
:mod:`~xaijax.methods.combinators` (smooth, contrast, ucag).
"""

import sys as _sys

from xaijax.methods import (  # noqa: F401  (importing registers the methods)
    _core,
    attention,
    baselines,
    bilrp,
    cam,
    cam_ablation,
    cam_factorization,
    combinators,
    deeplift,
    excitation,
    gradient,
    lrp,
    path_attribution,
    perturbation,
    rap,
    registry,
    rsp,
    targets,
)
from xaijax.methods._core import (
    CLASSIFIER_KINDS,
    KINDS,
    FunctionMethod,
    Method,
    NotApplicable,
    Wrapper,
    as_method,
    as_seed,
    check_inputs,
    class_indices,
    layer_gradients,
    reduce_channels,
    require_piecewise_linear,
    target_score,
    target_scores,
    token_grid,
)
from xaijax.methods.attention import AttentionFlow, AttentionRollout, CheferLRP, GenericAttention, RawAttention
from xaijax.methods.baselines import Center
from xaijax.methods.bilrp import BiLRP, BiLRPResult, bilrp_composite, plot_bilrp
from xaijax.methods.cam import (
    CAM,
    CAMERAS,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    NormGrad,
    ScoreCAM,
    XGradCAM,
    activation_and_gradient,
    augmented_maps,
    default_cam_layer,
    eigen_projection,
    upsample_bilinear,
)
from xaijax.methods.cam_ablation import AblationCAM, ReciproCAM
from xaijax.methods.cam_factorization import DeepFeatureFactorization, EigenCAM, EigenGradCAM
from xaijax.methods.deeplift import DeepLift, DeepLiftShap
from xaijax.methods.path_attribution import BlurIG, GradientShap, GuidedIG
from xaijax.methods.combinators import Contrast, Smooth, Ucag, contrast, get_contrast, get_smooth, get_ucag, smooth, ucag
from xaijax.methods.excitation import ExcitationBackprop, default_excitation_layer
from xaijax.methods.gradient import (
    FullGrad,
    Gradient,
    IntegratedGradients,
    ModifiedGradient,
    input_gradient,
    quadrature,
    relu_rule_interceptor,
)
from xaijax.methods.lrp import CLRP, LRP, SGLRP
from xaijax.methods.perturbation import (
    RISE,
    DRise,
    ExtremalPerturbation,
    ExtremalResult,
    FeatureAblation,
    FeaturePermutation,
    KernelSHAP,
    Lime,
    Occlusion,
    ShapleySampling,
    Sobol,
    detector_function,
)
from xaijax.methods.rap import RAP
from xaijax.methods.registry import describe, get, kind, names, prefixes, register, register_prefix
from xaijax.methods.rsp import RSP, ContrastiveRSP
from xaijax.methods.targets import (
    DetectionScore,
    LayerAttribution,
    LayerIntegratedGradients,
    LayerOutput,
    LinearApprox,
    SegmentationRegion,
    attach,
)

# Module paths of earlier releases, kept importable for now (``xaijax.methods.ucag`` etc.).
for _old, _new in (
    ("base", _core),
    ("contrast", combinators.contrastive),
    ("ucag", combinators.unfold_conquer),
    ("extremal", perturbation.extremal),
    ("drise", perturbation.drise),
):
    _sys.modules[f"{__name__}.{_old}"] = _new
del _old, _new

__all__ = [
    "KINDS",
    "CLASSIFIER_KINDS",
    "Method",
    "FunctionMethod",
    "Wrapper",
    "as_method",
    "NotApplicable",
    "as_seed",
    "check_inputs",
    "class_indices",
    "layer_gradients",
    "token_grid",
    "require_piecewise_linear",
    "reduce_channels",
    "target_score",
    "target_scores",
    "describe",
    "get",
    "kind",
    "names",
    "prefixes",
    "register",
    "register_prefix",
    "Center",
    "RawAttention",
    "AttentionRollout",
    "AttentionFlow",
    "GenericAttention",
    "CheferLRP",
    "Gradient",
    "ModifiedGradient",
    "IntegratedGradients",
    "FullGrad",
    "input_gradient",
    "quadrature",
    "relu_rule_interceptor",
    "CAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "NormGrad",
    "CAMERAS",
    "activation_and_gradient",
    "default_cam_layer",
    "upsample_bilinear",
    "HiResCAM",
    "GradCAMElementWise",
    "GuidedGradCAM",
    "augmented_maps",
    "eigen_projection",
    "AblationCAM",
    "ReciproCAM",
    "EigenCAM",
    "EigenGradCAM",
    "DeepFeatureFactorization",
    "DeepLift",
    "DeepLiftShap",
    "GradientShap",
    "BlurIG",
    "GuidedIG",
    "ExcitationBackprop",
    "default_excitation_layer",
    "LRP",
    "CLRP",
    "SGLRP",
    "RAP",
    "RSP",
    "ContrastiveRSP",
    "BiLRP",
    "BiLRPResult",
    "bilrp_composite",
    "plot_bilrp",
    "RISE",
    "ExtremalPerturbation",
    "ExtremalResult",
    "DRise",
    "detector_function",
    "Occlusion",
    "FeatureAblation",
    "FeaturePermutation",
    "ShapleySampling",
    "KernelSHAP",
    "Lime",
    "Sobol",
    "LayerOutput",
    "SegmentationRegion",
    "DetectionScore",
    "attach",
    "LinearApprox",
    "LayerIntegratedGradients",
    "LayerAttribution",
    "Contrast",
    "Smooth",
    "Ucag",
    "contrast",
    "smooth",
    "ucag",
    "get_contrast",
    "get_smooth",
    "get_ucag",
]
