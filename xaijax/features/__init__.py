"""Feature visualisation: natural pre-images (Mahendran & Vedaldi, IJCV 2016).

* :func:`maximize` — activation maximisation of class logits, channels or single units,
  many at once (one jitted, vmapped ``lax.scan``);
* :func:`invert` — reconstruct an image from its representation at a layer;
* :class:`PreImage` — the hyperparameters (regulariser weights, bounds, jitter, optimiser);
* :func:`alpha_norm`, :func:`total_variation`, :func:`project_pixel_norm` — the paper's
  natural-image regularisers and bounded-range projection.

Neuron-concept explanations (Network Dissection; Compositional Explanations of Neurons):
:func:`xaijax.features.dissect.dissect` with :class:`DissectConfig`, returning a
:class:`DissectResult`.

The ``visualize`` and ``dissect`` command lines live in :mod:`xaijax.features.cli` and
:mod:`xaijax.features.dissect_cli`.
"""

from xaijax.features.dissect import DissectConfig, DissectResult, StreamingQuantile  # run it: xaijax.features.dissect.dissect
from xaijax.features.visualize import (
    PreImage,
    PreImageResult,
    alpha_norm,
    invert,
    layer_shapes,
    maximize,
    paper_B,
    project_pixel_norm,
    total_variation,
    valid_box,
)

__all__ = [
    "DissectConfig",
    "DissectResult",
    "StreamingQuantile",
    "PreImage",
    "PreImageResult",
    "alpha_norm",
    "invert",
    "layer_shapes",
    "maximize",
    "paper_B",
    "project_pixel_norm",
    "total_variation",
    "valid_box",
]
