"""Record Captum's layer and neuron attributions on a tiny VGG16 in float64 (issue 22).

Writes ``tests/fixtures/captum_layer_refs.npz``, reloaded by ``tests/test_targets.py`` with numpy
only (no torch): it ports the weights with :func:`xaijax.checkpoints.from_torch_state_dict` and
compares :class:`xaijax.methods.targets.LinearApprox`,
:class:`~xaijax.methods.targets.LayerIntegratedGradients` and gradients of
:class:`~xaijax.methods.targets.LayerOutput` units with them.

Model: the tiny torchvision-class VGG16 of ``experiments/make_peer_references.py`` (width 1/16,
hidden 32, pool 1, 5 classes, seeded random weights and biases), run in float64
(``model.double()``) on two standard-normal 48 px images.

Recorded (Captum's own layouts, NCHW, float64):

* ``out/layer_gxa``: ``LayerGradientXActivation(model, features.20).attribute(x, target=t)``
  (N, C, h, w) — per-channel activation x gradient of the target logit;
* ``out/layer_ig``: ``LayerIntegratedGradients(model, features.20).attribute(x, baselines=0,
  target=t, n_steps=IG_STEPS, method="gausslegendre")`` (N, C, h, w);
* ``out/neuron_gradient``: ``NeuronGradient(model, features.20).attribute(x,
  neuron_selector=NEURON)`` (N, 3, H, W) — the input gradient of one unit (c, i, j) of the layer.

Run: ``/work/peer-venv/bin/python experiments/make_captum_layer_references.py`` (seconds).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

LAYER = "features.20"
SIZE = 48
TARGETS = np.array([1, 3], np.int64)
IG_STEPS = 16
NEURON = (0, 2, 3)  # torch (c, i, j) of the layer's (C, h, w) output (active on both images); xaijax unit (i, j, c) = (2, 3, 0)
SEED = 7


def main() -> None:
    import captum
    import torch
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients, NeuronGradient

    from make_peer_references import TINY, load_torch, make_weights, torch_model, xaijax_model

    spec = TINY["vgg"]
    model_x = xaijax_model("vgg")
    sd = make_weights("vgg", model_x, SIZE, SEED)
    kw = spec["kwargs"]
    tm = load_torch(torch_model("vgg", kw["num_classes"], kw["width"], kw["hidden"], kw["pool_size"]), sd).double()
    layer = tm
    for p in LAYER.split("."):
        layer = getattr(layer, p)

    x_nhwc = np.random.default_rng(SEED).standard_normal((2, SIZE, SIZE, 3))
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()).double()
    t = torch.from_numpy(TARGETS)

    gxa = LayerGradientXActivation(tm, layer).attribute(x, target=t)
    ig = LayerIntegratedGradients(tm, layer).attribute(
        x, baselines=torch.zeros_like(x), target=t, n_steps=IG_STEPS, method="gausslegendre"
    )
    ng = NeuronGradient(tm, layer).attribute(x, neuron_selector=NEURON)

    meta = {
        "what": "Captum layer/neuron attributions on a tiny torchvision VGG16, float64",
        "captum": captum.__version__,
        "torch": torch.__version__,
        "xaijax_constructor": {"arch": spec["arch"], "kwargs": spec["kwargs"]},
        "input_size": SIZE,
        "layer": LAYER,
        "ig_steps": IG_STEPS,
        "ig_method": "gausslegendre",
        "ig_baseline": "zeros (input space)",
        "neuron_torch_chw": list(NEURON),
        "weights_seed": SEED,
        "layouts": "out/* are NCHW as Captum returns them; x is NHWC",
        "script": "experiments/make_captum_layer_references.py",
    }
    arrays = {
        "meta": np.array(json.dumps(meta)),
        "x": x_nhwc,
        "target": TARGETS,
        "out/layer_gxa": gxa.detach().numpy(),
        "out/layer_ig": ig.detach().numpy(),
        "out/neuron_gradient": ng.detach().numpy(),
    }
    arrays.update({f"sd/{k}": np.asarray(v) for k, v in sd.items()})
    path = os.path.join(ROOT, "tests", "fixtures", "captum_layer_refs.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes); captum {captum.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
