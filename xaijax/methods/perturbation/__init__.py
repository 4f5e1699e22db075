"""The perturbation family: explanations from the model's response to masked inputs.

* ``rise`` (:class:`RISE`) — random masks weighted by the target's score;
* ``extremal-perturbation`` (:class:`ExtremalPerturbation`) — masks of fixed area optimised
  to preserve (or delete) the target's score;
* ``d-rise`` (:class:`DRise`) — RISE masks scored by detection similarity (detectors);
* ``occlusion``, ``feature-ablation``, ``feature-permutation`` (:mod:`.occlusion`) — the target
  logit's drop when windows / features are replaced by a baseline or permuted across the batch;
  feature masks (grid, SLIC, given) in :mod:`.features`;
* ``shapley-sampling``, ``kernel-shap`` (:mod:`.shapley`) — Shapley values of the features by
  (antithetic) permutation sampling and by the Shapley-kernel weighted least squares;
* ``lime`` (:mod:`.lime`) — LIME's weighted linear surrogate over the features;
* ``sobol`` (:mod:`.sobol`) — total-order Sobol indices of grid cells under quasi-MC masks.
"""

from xaijax.methods.perturbation.drise import DRise, detector_function
from xaijax.methods.perturbation.extremal import ExtremalPerturbation, ExtremalResult
from xaijax.methods.perturbation.features import grid_feature_mask, slic_feature_mask, validate_feature_mask
from xaijax.methods.perturbation.occlusion import FeatureAblation, FeaturePermutation, Occlusion
from xaijax.methods.perturbation.lime import Lime
from xaijax.methods.perturbation.sobol import Sobol
from xaijax.methods.perturbation.shapley import KernelSHAP, ShapleySampling
from xaijax.methods.perturbation.xrai import XRAI
from xaijax.methods.perturbation.rise import RISE, rise_cell_size, rise_grid_and_shift, rise_masks, rise_upsample_matrix

__all__ = [
    "RISE",
    "rise_cell_size",
    "rise_grid_and_shift",
    "rise_masks",
    "rise_upsample_matrix",
    "ExtremalPerturbation",
    "ExtremalResult",
    "DRise",
    "detector_function",
    "Occlusion",
    "FeatureAblation",
    "FeaturePermutation",
    "grid_feature_mask",
    "slic_feature_mask",
    "validate_feature_mask",
    "ShapleySampling",
    "KernelSHAP",
    "Lime",
    "Sobol",
    "XRAI",
]
