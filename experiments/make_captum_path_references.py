"""Record Captum's DeepLift and DeepLiftShap on a tiny torch CNN (float64) for xaijax's tests.

Writes ``tests/fixtures/captum_path_refs.npz``; ``tests/test_deeplift.py`` reloads it with
numpy only, ports the weights into a Flax twin of the network (the same layer names, built
from ``xaijax.models.layers``) and compares.

The model (``torch.nn.Sequential`` named ``features`` / ``classifier``)::

    features:   0 conv 3->4 3x3 pad 1, 1 MaxPool2d(2), 2 BatchNorm2d, 3 ReLU,
                4 conv 4->8 3x3 pad 1, 5 MaxPool2d(2), 6 BatchNorm2d, 7 ReLU,
                8 conv 8->8 3x3 pad 1, 9 BatchNorm2d, 10 ReLU
    pool:       AdaptiveAvgPool2d(1), flatten
    classifier: 0 Linear 8->16, 1 ReLU, 2 Linear 16->5

Every ReLU is its own, non-inplace module instance (Captum's hooks need both). Float64
throughout (``model.double()``), random weights, biases and BatchNorm statistics (eval mode).

Why max pooling comes *before* BatchNorm and ReLU here: in Captum 0.9.0 two hooked
nonlinear modules that touch (``ReLU -> MaxPool2d``, VGG's order) give attributions whose
sum is not ``f(x) - f(x0)``. On a VGG-BN of the same size (conv, BN, ReLU, max pool blocks)
Captum's own convergence delta was 0.30 and -0.02 for two samples with zero baselines, and
3e-15 once the max pools were replaced by average pools. Our reading of the cause: both
modules register tensor hooks on the same tensor (``captum/_utils/common.py``,
``_register_backward_hook``), so the ReLU's rule records the gradient before the max pool's
hook replaces it with DeepLIFT's multipliers; and the max pool's fallback for ``|x - x0| <
eps`` takes ``grad_input[0]``, the first sample's gradient (captum issue #1276), which
all-zero windows after a ReLU reach often. With a convolution feeding each max pool, Captum's
``maxpool`` rule is applied as written and summation-to-delta holds (deltas ~1e-14), which is
what xaijax implements (xaijax's DeepLIFT sums to the delta on the VGG order too:
``tests/test_deeplift.py``).

Run (peer venv, a few seconds)::

    /work/peer-venv/bin/python experiments/make_captum_path_references.py

npz layout (float64 unless noted):

* ``meta``: JSON (versions, model, settings, what each output is);
* ``x``: inputs NHWC (N, H, W, 3); ``target``: int64 (N,);
* ``baseline``: DeepLift's reference NHWC (N, H, W, 3);
* ``baselines``: DeepLiftShap's reference set NHWC (B, H, W, 3);
* ``sd/<torch key>``: the state dict;
* ``out/deeplift``, ``out/deeplift_shap``: Captum's per-channel attributions, NHWC;
* ``out/deeplift_zero``: DeepLift with Captum's default baseline (zeros), NHWC;
* ``out/delta/*``: Captum's convergence deltas.
"""

from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "captum_path_refs.npz")
SIZE = 16
N_CLASSES = 5
HIDDEN = 16
TARGETS = np.array([1, 3], np.int64)


def build():
    import torch
    import torch.nn as tnn

    torch.manual_seed(0)
    bn = tnn.BatchNorm2d
    features = tnn.Sequential(
        tnn.Conv2d(3, 4, 3, padding=1), tnn.MaxPool2d(2), bn(4), tnn.ReLU(False),
        tnn.Conv2d(4, 8, 3, padding=1), tnn.MaxPool2d(2), bn(8), tnn.ReLU(False),
        tnn.Conv2d(8, 8, 3, padding=1), bn(8), tnn.ReLU(False),
    )
    classifier = tnn.Sequential(tnn.Linear(8, HIDDEN), tnn.ReLU(False), tnn.Linear(HIDDEN, N_CLASSES))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.features = features
            self.pool = tnn.AdaptiveAvgPool2d(1)
            self.classifier = classifier

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    m = Net()
    for mod in m.modules():
        if isinstance(mod, (tnn.Conv2d, tnn.Linear)):
            tnn.init.normal_(mod.weight, 0.0, 0.5)
    rng = np.random.default_rng(1)
    sd = {}
    for k, v in m.state_dict().items():
        a = v.detach().cpu().numpy()
        if k.endswith("num_batches_tracked"):
            sd[k] = a
        elif k.endswith("running_var") or (k.endswith("weight") and a.ndim == 1):
            sd[k] = rng.uniform(0.5, 1.5, a.shape)
        elif k.endswith("bias") or k.endswith("running_mean"):
            sd[k] = rng.normal(0.0, 0.1, a.shape)
        else:
            sd[k] = a.astype(np.float64)
    m = m.double()  # before loading: a float32 module would round the float64 values on load
    m.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    return m.eval(), sd


def main() -> None:
    import captum
    import torch
    from captum.attr import DeepLift, DeepLiftShap

    model, sd = build()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, SIZE, SIZE, 3))
    baseline = 0.3 * rng.normal(size=(2, SIZE, SIZE, 3))
    baselines = 0.5 * rng.normal(size=(4, SIZE, SIZE, 3))

    def t(a):
        return torch.tensor(np.transpose(a, (0, 3, 1, 2)), dtype=torch.float64, requires_grad=True)

    def nhwc(a):
        return np.transpose(a.detach().numpy(), (0, 2, 3, 1))

    target = torch.tensor(TARGETS)
    dl, d1 = DeepLift(model).attribute(t(x), baselines=t(baseline), target=target, return_convergence_delta=True)
    dz, d0 = DeepLift(model).attribute(t(x), target=target, return_convergence_delta=True)
    ds, d2 = DeepLiftShap(model).attribute(t(x), baselines=t(baselines), target=target, return_convergence_delta=True)
    meta = {
        "what": "Captum DeepLift / DeepLiftShap (rescale rule, eps 1e-10) on a tiny CNN (conv, max pool, BN, ReLU blocks), float64",
        "captum": captum.__version__,
        "torch": torch.__version__,
        "model": "features: conv3-4, maxpool2, bn, relu, conv4-8, maxpool2, bn, relu, conv8-8, bn, relu; global avg pool; "
        f"classifier: linear 8-{HIDDEN}, relu, linear {HIDDEN}-{N_CLASSES}; input {SIZE} px",
        "settings": {
            "deeplift": "DeepLift(model).attribute(x, baselines=baseline, target=target) (multiply_by_inputs=True)",
            "deeplift_zero": "DeepLift(model).attribute(x, target=target): baseline zeros",
            "deeplift_shap": "DeepLiftShap(model).attribute(x, baselines=baselines (4 references), target=target)",
        },
        "layout": "all arrays NHWC; attributions per channel (Captum's output transposed from NCHW)",
        "script": "experiments/make_captum_path_references.py",
    }
    arrays = {
        "meta": np.asarray(json.dumps(meta)),
        "x": x,
        "target": TARGETS,
        "baseline": baseline,
        "baselines": baselines,
        "out/deeplift": nhwc(dl),
        "out/deeplift_zero": nhwc(dz),
        "out/deeplift_shap": nhwc(ds),
        "out/delta/deeplift": d1.detach().numpy(),
        "out/delta/deeplift_zero": d0.detach().numpy(),
        "out/delta/deeplift_shap": d2.detach().numpy(),
    }
    arrays.update({f"sd/{k}": v for k, v in sd.items()})
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); deltas", [float(abs(d).max()) for d in (d1, d0, d2)])


if __name__ == "__main__":
    main()
