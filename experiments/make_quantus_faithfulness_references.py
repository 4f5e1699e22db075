"""Record Quantus 0.6.0 references for xaijax's faithfulness catalogue (issue 23).

Writes ``tests/fixtures/quantus_faithfulness_refs.npz``, read by
``tests/test_faithfulness_catalogue.py`` with numpy + xaijax only (no torch, no Quantus).

Setup: a tiny torch CNN with seeded weights (conv 3x3 1->4, ReLU, conv 3x3 4->4, ReLU,
global mean, linear 4->3; fc weights x 20 and conv2 weights x 2 after torch's default init, so that the softmax is decisive); three **single-channel** 12 x 12 images (standard normal, already
"normalised") and maps (standard normal), targets (0, 1, 2). Single channel because Quantus
broadcasts a (N, 1, H, W) map over the channels and treats every channel-pixel as a
feature (ties between the channels broken by NumPy's unstable argsort), while xaijax's
features are pixels: with one channel both are the same features. Quantus runs its model in
float32 (``torch.Tensor(x)``), so the test compares with xaijax run in float64 at float32
tolerance.

Where Quantus draws random numbers, it is handed xaijax's draws:

* faithfulness-correlation: ``np.random.choice`` returns the subsets of
  :func:`xaijax.metrics.faithfulness_correlation.random_subsets` (seed 0);
* monotonicity-correlation: ``np.random.uniform`` returns the values of
  :func:`xaijax.metrics.faithfulness_correlation.uniform_draws` (seed 0, float64);
* ROAD: ``noise=0`` (the imputation is then deterministic); the imputed images of
  ``noisy_linear_imputation`` (scipy ``spsolve``, float64) are stored too.

Quantus 0.6.0's ``calculate_auc`` (IROF) calls ``np.trapz``, which NumPy 2.4 removed: the
script sets ``np.trapz = np.trapezoid`` (the same function) before running it.

IROF and ROAD are called one image at a time (Quantus' ROAD keeps only the first batch and
averages it over images; IROF's trapezoid runs over a batch's zero padding).

Run (under a minute)::

    /work/peer-venv/bin/python experiments/make_quantus_faithfulness_references.py
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "quantus_faithfulness_refs.npz")
N, SIZE, CLASSES = 3, 12, 3
TARGETS = np.array([0, 1, 2], np.int64)
ROAD_CHECK_PERCENTAGES = (9, 49, 91)  # imputed images stored for these


def torch_model(seed: int = 0):
    import torch

    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, CLASSES)

        def forward(self, x):
            h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(h.mean((2, 3)))

    m = Tiny().eval()
    with torch.no_grad():  # decisive outputs (default init gives a near-uniform softmax)
        m.fc.weight.mul_(20.0)
        m.conv2.weight.mul_(2.0)
    return m


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main() -> None:
    import jax
    import quantus
    import torch
    from quantus.functions.perturb_func import noisy_linear_imputation

    from xaijax.metrics.faithfulness_correlation import random_subsets, uniform_draws

    warnings.filterwarnings("ignore")
    if not hasattr(np, "trapz"):  # Quantus 0.6.0's calculate_auc calls np.trapz, removed in NumPy 2.4
        np.trapz = np.trapezoid
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 1, SIZE, SIZE)).astype(np.float32)
    a = rng.normal(size=(N, 1, SIZE, SIZE)).astype(np.float32)
    model = torch_model()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    y = TARGETS
    out: dict[str, np.ndarray] = {}
    settings: dict[str, dict] = {}
    kw = dict(disable_warnings=True, display_progressbar=False)

    def call(name, metric, xs=x, as_=a, ys=y, **extra):
        np.random.seed(0)
        r = metric(model=model, x_batch=xs, y_batch=ys, a_batch=as_, channel_first=True, device="cpu", **extra)
        return r

    # --- deterministic curve metrics
    for k in (1, 6):
        settings[f"pixel_flipping_k{k}"] = {"features_in_step": k}
        out[f"pixel_flipping_k{k}"] = np.asarray(call("pf", quantus.PixelFlipping(features_in_step=k, **kw)), np.float64)
    for p in (4, 8):
        for order in ("morf", "lerf"):
            settings[f"region_perturbation_p{p}_{order}"] = {"patch_size": p, "order": order}
            out[f"region_perturbation_p{p}_{order}"] = np.asarray(call("rp", quantus.RegionPerturbation(patch_size=p, order=order, **kw)), np.float64)
        settings[f"selectivity_p{p}"] = {"patch_size": p}
        out[f"selectivity_p{p}"] = np.asarray(call("sel", quantus.Selectivity(patch_size=p, **kw)), np.float64)
    for k in (1, 6):
        settings[f"faithfulness_estimate_k{k}"] = {"features_in_step": k}
        out[f"faithfulness_estimate_k{k}"] = np.asarray(call("fe", quantus.FaithfulnessEstimate(features_in_step=k, **kw)), np.float64)
    settings["monotonicity"] = {"features_in_step": 1, "note": "Quantus 0.6.0 replaces baseline by baseline: constant curve, always True"}
    out["monotonicity"] = np.asarray(call("mono", quantus.Monotonicity(**kw)), np.float64)
    settings["infidelity"] = {"perturb_patch_sizes": [4], "n_perturb_samples": 10}
    out["infidelity"] = np.asarray(call("inf", quantus.Infidelity(**kw)), np.float64)

    settings["sufficiency"] = {"threshold": 0.6, "batch": N}
    out["sufficiency"] = np.asarray(call("suf", quantus.Sufficiency(**kw)), np.float64)
    # two clusters of similar maps (3 + 3) on varied images: values between 0 and 1
    r6 = np.random.default_rng(6)
    xs6 = (2 * r6.normal(size=(6, 1, SIZE, SIZE))).astype(np.float32)
    base = r6.normal(size=(2, 1, 1, SIZE, SIZE))
    as6 = (base.repeat(3, 0).reshape(6, 1, SIZE, SIZE) + 0.3 * r6.normal(size=(6, 1, SIZE, SIZE))).astype(np.float32)
    out["sufficiency6_x"], out["sufficiency6_a"] = xs6, as6
    out["sufficiency6_pred"] = model(torch.as_tensor(xs6)).argmax(-1).numpy().astype(np.float64)
    out["sufficiency6"] = np.asarray(call("suf", quantus.Sufficiency(**kw), xs=xs6, as_=as6, ys=np.arange(6) % 3), np.float64)
    settings["sufficiency6"] = {"threshold": 0.6, "batch": 6, "inputs": "out/sufficiency6_x, out/sufficiency6_a, targets arange(6) % 3"}

    # --- IROF, one image per call (also the superpixels Quantus used)
    irof = []
    for i in range(N):
        irof.append(call("irof", quantus.IROF(return_aggregate=False, **kw), xs=x[i : i + 1], as_=a[i : i + 1], ys=y[i : i + 1])[0])
    out["irof"] = np.asarray(irof, np.float64)
    out["irof_segments"] = np.stack([quantus.helpers.utils.get_superpixel_segments(np.moveaxis(x[i], 0, -1).astype("double"), "slic") for i in range(N)]).astype(np.int32)
    settings["irof"] = {"segmentation_method": "slic", "perturb_baseline": "mean", "batch": 1}

    # --- ROAD (noise 0), one image per call; imputations of noisy_linear_imputation
    road = []
    for i in range(N):
        m = quantus.ROAD(noise=0.0, **kw)
        call("road", m, xs=x[i : i + 1], as_=a[i : i + 1], ys=y[i : i + 1])
        road.append([m.evaluation_scores[p] for p in m.percentages])
    out["road_correct"] = np.asarray(road, np.float64)
    settings["road"] = {"percentages": list(range(1, 100, 2)), "noise": 0.0, "batch": 1}
    imputed = np.zeros((len(ROAD_CHECK_PERCENTAGES), N, SIZE, SIZE))
    for j, p in enumerate(ROAD_CHECK_PERCENTAGES):
        for i in range(N):
            idx = np.argsort(-a[i].reshape(-1), kind="stable")[: int(SIZE * SIZE * p / 100)]
            imputed[j, i] = noisy_linear_imputation(arr=x[i].astype(np.float64), indices=idx, noise=0.0)[0]
    out["road_imputed"] = imputed
    out["road_imputed_percentages"] = np.asarray(ROAD_CHECK_PERCENTAGES, np.float64)

    # --- faithfulness correlation with xaijax's subsets
    runs, subset = 20, 30
    subsets = random_subsets(0, SIZE * SIZE, runs, subset)
    calls = {"n": 0}

    def choice(n, size, replace=True):
        r = subsets[calls["n"] // N]
        calls["n"] += 1
        assert n == SIZE * SIZE and size == subset and not replace
        return r.copy()

    with patched(np.random, "choice", choice):
        out["faithfulness_correlation"] = np.asarray(call("fc", quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=subset, return_aggregate=False, **kw)), np.float64)
    assert calls["n"] == runs * N
    settings["faithfulness_correlation"] = {"nr_runs": runs, "subset_size": subset, "seed": 0}

    # --- monotonicity correlation with xaijax's uniform draws
    samples, k = 3, 4
    steps = -(-SIZE * SIZE // k)
    with jax.enable_x64(True):
        draws = uniform_draws(0, steps * samples, 0.0, 1.0, dtype=np.float64)
    ucalls = {"n": 0}
    real_uniform = np.random.uniform

    def uniform(low=0.0, high=1.0, size=None):
        if size == N:  # the "uniform" baseline of get_baseline_dict: one value per image
            v = np.full(N, draws[ucalls["n"]])
            ucalls["n"] += 1
            return v
        return real_uniform(low, high, size)

    with patched(np.random, "uniform", uniform):
        out["monotonicity_correlation"] = np.asarray(call("mc", quantus.MonotonicityCorrelation(nr_samples=samples, features_in_step=k, **kw)), np.float64)
    assert ucalls["n"] == steps * samples, ucalls
    settings["monotonicity_correlation"] = {"nr_samples": samples, "features_in_step": k, "seed": 0}

    meta = {
        "quantus": quantus.__version__ if hasattr(quantus, "__version__") else "0.6.0",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "model": "conv3x3(1->4, pad 1) relu conv3x3(4->4, pad 1) relu mean(H,W) linear(4->3); torch.manual_seed(0) init",
        "inputs": "x, a ~ N(0,1) float32 from default_rng(0), NCHW (N, 1, 12, 12); targets 0, 1, 2",
        "settings": settings,
    }
    arrays = {"meta": np.asarray(json.dumps(meta)), "x": x, "a": a, "targets": y}
    arrays.update({f"sd/{k}": v for k, v in sd.items()})
    arrays.update({f"out/{k}": v for k, v in out.items()})
    tmp = OUT + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")
    for k, v in out.items():
        print(k, v.shape, np.round(v.reshape(-1)[:4], 4))


if __name__ == "__main__":
    main()
