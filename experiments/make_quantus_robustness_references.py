"""Record Quantus 0.6.0 references for xaijax's robustness / randomisation / axiom metrics (issue 23).

Writes ``tests/fixtures/quantus_robustness_refs.npz``, read by
``tests/test_robustness_randomisation.py`` with numpy + xaijax only (no torch, no Quantus).

Setup: a tiny torch CNN with seeded weights (conv 3x3 3->4 without padding, ReLU, conv 3x3
4->6 without padding, ReLU, global mean, linear 6->3; default torch init, fc weights x 5 so
the softmax is decisive), four 16 x 16 RGB images (standard normal, "normalised"), targets =
the model's predictions. Everything runs in **float64**: ``torch.set_default_dtype(float64)``
makes Quantus' ``torch.Tensor(x)`` casts (model wrapper and Captum explain) float64 too.

Explanation: Quantus' own ``quantus.explain`` with ``method="Saliency"`` (Captum ``Saliency``,
``abs=True``, summed over the channel axis): xaijax's ``gradient`` with ``reduce="abs-sum"``.

Alignment:

* Random perturbations: every noise-based metric is handed one fixed perturbation set through
  its ``perturb_func`` (``arr + noise[step]``), stored as ``noise`` (S, N, C, H, W); the
  xaijax side gets ``perturbed = x + noise`` (NHWC) — the sampler is not compared, the metric is.
* Map normalisation: Quantus' ``normalise_by_max`` reduces over the whole batch unless given
  axes; it is called with ``normalise_func_kwargs={"normalise_axes": [1, 2, 3]}`` (per image,
  xaijax's convention) wherever a metric normalises.
* MPRT / eMPRT: the randomised weights are the values Quantus' ``get_random_layer_generator``
  gives (``torch.manual_seed(seed + 1)`` then ``reset_parameters()`` per module; each module's
  values depend on its shape only), stored as ``fresh/<key>`` and passed as ``fresh=``.
* Smooth MPRT: ``nr_samples=1, noise_magnitude=0`` (Quantus draws unseeded noise): the
  denoising machinery with a deterministic outcome (== MPRT bottom-up).
* Random logit: the other classes Quantus draws with ``np.random.seed(42)`` are replicated and
  stored (``random_logit_off``) and passed as ``off_targets=``.
* Completeness is not recorded: Quantus returns only ``sum(a) == f(x) - f(x0)`` as exact float
  equality (and replaces one channel only); the closed-form tests cover it.

Run (about a minute)::

    /work/peer-venv/bin/python experiments/make_quantus_robustness_references.py
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "quantus_robustness_refs.npz")
N, SIZE, CLASSES, S = 4, 16, 3, 6
PER_IMAGE = {"normalise_axes": [1, 2, 3]}


def torch_model():
    import torch

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3)
            self.conv2 = torch.nn.Conv2d(4, 6, 3)
            self.fc = torch.nn.Linear(6, CLASSES)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean(dim=(2, 3)))

    m = Tiny()
    with torch.no_grad():
        m.fc.weight.mul_(5.0)
    return m.eval()


def main() -> None:
    import torch

    torch.set_default_dtype(torch.float64)
    import quantus

    warnings.filterwarnings("ignore")
    model = torch_model().double()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 3, SIZE, SIZE))
    with torch.no_grad():
        y = model(torch.as_tensor(x)).argmax(1).numpy()
    noise = rng.uniform(-0.1, 0.1, size=(S, N, 3, SIZE, SIZE))
    explain = quantus.explain
    ekw = {"method": "Saliency"}
    out: dict[str, np.ndarray] = {"x": x, "y": y, "noise": noise}
    out["saliency"] = np.asarray(explain(model, x, y, **ekw))

    def fixed():
        step = {"i": 0}

        def perturb(arr, indices=None, **kw):
            i = step["i"]
            step["i"] += 1
            return arr + noise[i].reshape(arr.shape)

        return perturb

    common = dict(disable_warnings=True, display_progressbar=False)
    call = dict(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain, explain_func_kwargs=ekw, batch_size=N)
    settings = {}

    for name, cls, kw in (
        ("max_sensitivity", quantus.MaxSensitivity, {}),
        ("avg_sensitivity", quantus.AvgSensitivity, {}),
        ("local_lipschitz", quantus.LocalLipschitzEstimate, {"normalise_func_kwargs": PER_IMAGE}),
        ("ris", quantus.RelativeInputStability, {}),
        ("ros", quantus.RelativeOutputStability, {}),
        ("rrs", quantus.RelativeRepresentationStability, {"layer_names": ["conv2"]}),
    ):
        metric = cls(nr_samples=S, perturb_func=fixed(), **kw, **common)
        out[name] = np.asarray(metric(**call), np.float64)
        settings[name] = {"nr_samples": S, "perturb_func": "x + noise[step]", **{k: str(v) for k, v in kw.items()}}

    out["continuity"] = np.asarray(
        quantus.Continuity(nr_steps=4, normalise_func_kwargs=PER_IMAGE, **common)(**call), np.float64)
    out["consistency"] = np.asarray(
        quantus.Consistency(normalise_func_kwargs=PER_IMAGE, **common)(**call), np.float64)
    settings["continuity"] = {"nr_steps": 4, "normalise": "per image"}
    settings["consistency"] = {"discretise_func": "top_n_sign (n=5)", "normalise": "per image", "batch": "one batch of N"}

    # randomised weights exactly as Quantus' generator makes them
    fresh = copy.deepcopy(model)
    for name, module in list(fresh.named_modules())[::-1]:
        if hasattr(module, "reset_parameters"):
            torch.manual_seed(42 + 1)
            module.reset_parameters()
    for k, v in fresh.state_dict().items():
        out[f"fresh/{k}"] = v.detach().numpy()

    for order in ("top_down", "independent"):
        r = quantus.MPRT(layer_order=order, seed=42, normalise_func_kwargs=PER_IMAGE, **common)(**call)
        out[f"mprt_{order}_layers"] = np.array(list(r.keys()))
        out[f"mprt_{order}"] = np.array([r[k] for k in r], np.float64)  # (1 + L, N): original, then layers
    r = quantus.SmoothMPRT(nr_samples=1, noise_magnitude=0.0, seed=42, normalise_func_kwargs=PER_IMAGE, **common)(**call)
    out["smooth_mprt_layers"] = np.array(list(r.keys()))
    out["smooth_mprt"] = np.array([r[k] for k in r], np.float64)
    out["emprt"] = np.asarray(quantus.EfficientMPRT(seed=42, **common)(**call), np.float64)

    # random logit: replicate Quantus' draw of the other classes (np.random.seed(seed), one batch)
    np.random.seed(42)
    classes = np.stack([np.arange(CLASSES) for _ in range(N)])
    mask = np.ones_like(classes)
    mask[np.arange(N)[None, :], y] = 0
    idx = np.random.randint(0, CLASSES - 1, N)
    out["random_logit_off"] = classes[mask.astype(bool)].reshape(N, -1)[np.arange(N)[None, :], idx].flatten()
    out["random_logit"] = np.asarray(
        quantus.RandomLogit(num_classes=CLASSES, seed=42, normalise_func_kwargs=PER_IMAGE, **common)(**call), np.float64)

    out["non_sensitivity"] = np.asarray(
        quantus.NonSensitivity(normalise_func_kwargs=PER_IMAGE, **common)(**call), np.float64)
    out["input_invariance_saliency"] = np.asarray(quantus.InputInvariance(**common)(**call), np.float64)
    call_ixg = dict(call, explain_func_kwargs={"method": "InputXGradient"})
    out["input_invariance_ixg"] = np.asarray(quantus.InputInvariance(**common)(**call_ixg), np.float64)

    for k, v in model.state_dict().items():
        out[f"sd/{k}"] = v.detach().numpy()
    import captum

    meta = {
        "quantus": quantus.__version__, "torch": torch.__version__, "captum": captum.__version__,
        "dtype": "float64 (torch.set_default_dtype)", "explain": "quantus.explain method=Saliency (abs, channel sum)",
        "n": N, "size": SIZE, "samples": S, "settings": settings,
    }
    out["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp.npz"
    np.savez_compressed(tmp, **out)
    os.replace(tmp, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")
    for k in ("max_sensitivity", "avg_sensitivity", "local_lipschitz", "ris", "ros", "rrs", "continuity", "consistency",
              "emprt", "random_logit", "non_sensitivity", "input_invariance_saliency", "input_invariance_ixg"):
        print(k, out[k])
    print("mprt", out["mprt_top_down_layers"], out["mprt_top_down"])


if __name__ == "__main__":
    main()
