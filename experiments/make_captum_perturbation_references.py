"""Captum references for xaijax's perturbation catalogue (issue 22): occlusion, feature
ablation, Shapley value sampling (given permutations), exact Shapley values and LIME (given
samples), recorded in float64 on a tiny torchvision VGG16 with seeded random weights.

Run in the peer virtualenv (torch, torchvision, captum; xaijax installed editable)::

    /work/peer-venv/bin/python experiments/make_captum_perturbation_references.py

Writes ``tests/fixtures/captum_perturbation_refs.npz``:

* ``sd/<torch key>``: the state dict (float32 numpy; the model is run in float64 with
  ``.double()``), ``x`` (N, H, W, C) float64 images, ``target`` (N,);
* ``logits``: the torch model's float64 logits of ``x`` (the port is checked against them);
* ``out/<name>``: Captum's attribution (N, C, H, W) float64 (every channel carries the same value:
  the features span all channels);
* ``feature_mask`` (N, H, W) per-sample ids (ablation), ``grid_mask`` (H, W) (Shapley, LIME),
  ``permutations`` (P, F) given to ``ShapleyValueSampling`` through its
  ``permutation_generator``; ``lime_samples`` (S, F) given to ``Lime`` through ``perturb_func``;
* ``meta``: JSON provenance (versions, settings, how each peer was called).

Where Captum samples at random (ShapleyValueSampling, Lime) it was given the perturbations, so the
comparison is deterministic. Captum's KernelShap is not recorded: its end points are soft
constraints (weight 1e6) and its sampled coalitions all weigh 1, so it agrees with xaijax's exact
constraints only to ~1e-6 relative and only in distribution (see tests/test_shapley_lime.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

SIZE = 32
N = 2
TARGETS = np.array([1, 3], np.int64)
ARCH = {"arch": "vgg16", "kwargs": {"width": 1 / 16, "num_classes": 5, "hidden": 32, "pool_size": 1}}
OCCLUSION = [
    {"window": (8, 8), "stride": (4, 4), "baseline": 0.0},
    {"window": (7, 5), "stride": (3, 5), "baseline": 0.5},  # last windows cut at the border
]
GRID_CELL = 16  # 4 features (Shapley, exact Shapley, LIME)
N_PERMUTATIONS = 6
LIME = {"n_samples": 24, "alpha": 1.0, "kernel_width": 1.0, "distance": "cosine", "seed": 11}


def main() -> None:
    import captum
    import torch
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import FeatureAblation, Lime, Occlusion, ShapleyValues, ShapleyValueSampling
    from captum.attr._core.lime import get_exp_kernel_similarity_function
    from make_peer_references import load_torch, make_weights, torch_model

    from xaijax import models

    torch.manual_seed(0)
    model_x = models.get(ARCH["arch"], **ARCH["kwargs"])
    sd = make_weights("vgg", model_x, SIZE, seed=7)
    m = load_torch(torch_model("vgg", 5, width=1 / 16, hidden=32, pool_size=1), sd).double()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, SIZE, SIZE, 3))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tt = torch.from_numpy(TARGETS)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        logits = m(xt).numpy()

    def np_(a) -> np.ndarray:
        return a.detach().numpy().astype(np.float64)

    for i, o in enumerate(OCCLUSION):
        (h, w), (sh, sw) = o["window"], o["stride"]
        out[f"out/occlusion/{i}"] = np_(
            Occlusion(m).attribute(xt, target=tt, sliding_window_shapes=(3, h, w), strides=(3, sh, sw), baselines=o["baseline"])
        )

    # feature ablation: per-sample masks (sample 1 has fewer features), and a per-pixel baseline image
    cells = (np.arange(SIZE)[:, None] // 8) * 4 + np.arange(SIZE)[None] // 8  # 16 cells
    fm = np.stack([rng.permutation(16)[cells], (rng.permutation(16)[cells] % 11)]).astype(np.int64)
    fm[1] = np.unique(fm[1], return_inverse=True)[1].reshape(SIZE, SIZE)
    base_img = rng.normal(size=(SIZE, SIZE, 3)) * 0.3
    out["out/feature-ablation"] = np_(
        FeatureAblation(m).attribute(
            xt, target=tt, feature_mask=torch.from_numpy(fm[:, None]),
            baselines=torch.from_numpy(base_img.transpose(2, 0, 1)[None].copy()),
        )
    )

    # Shapley value sampling with given permutations; exact Shapley values (all permutations)
    grid = ((np.arange(SIZE)[:, None] // GRID_CELL) * 2 + np.arange(SIZE)[None] // GRID_CELL).astype(np.int64)
    perms = np.stack([rng.permutation(4) for _ in range(N_PERMUTATIONS)])
    svs = ShapleyValueSampling(m)
    svs.permutation_generator = lambda num_features, num_samples: iter([p.tolist() for p in perms])
    out["out/shapley-sampling"] = np_(
        svs.attribute(xt, target=tt, feature_mask=torch.from_numpy(grid[None, None]), n_samples=N_PERMUTATIONS)
    )
    out["out/shapley-exact"] = np_(ShapleyValues(m).attribute(xt, target=tt, feature_mask=torch.from_numpy(grid[None, None])))

    # LIME with given samples (Captum draws them in its perturb_func): one sample per call
    samples = (np.random.default_rng(LIME["seed"]).uniform(size=(LIME["n_samples"], 4)) < 0.5).astype(np.int64)
    lime_out = []
    for i in range(N):  # Captum's Lime explains one example per call
        it = iter(samples)
        lime = Lime(
            m,
            interpretable_model=SkLearnRidge(alpha=LIME["alpha"]),
            similarity_func=get_exp_kernel_similarity_function(LIME["distance"], LIME["kernel_width"]),
            perturb_func=lambda original_inp, **kw: torch.from_numpy(next(it)[None].copy()),
        )
        lime_out.append(
            np_(lime.attribute(xt[i : i + 1], target=int(TARGETS[i]), feature_mask=torch.from_numpy(grid[None, None]),
                               n_samples=LIME["n_samples"], perturbations_per_eval=1))
        )
    out["out/lime"] = np.concatenate(lime_out)

    import sklearn

    meta = {
        "versions": {"torch": torch.__version__, "captum": captum.__version__, "sklearn": sklearn.__version__,
                     "numpy": np.__version__},
        "xaijax_constructor": ARCH,
        "input_size": SIZE,
        "dtype": "float64 (torch model .double(); weights stored float32)",
        "occlusion": [{"window": list(o["window"]), "stride": list(o["stride"]), "baseline": o["baseline"],
                       "captum": f"Occlusion.attribute(sliding_window_shapes=(3, {o['window'][0]}, {o['window'][1]}), "
                                 f"strides=(3, {o['stride'][0]}, {o['stride'][1]}), baselines={o['baseline']})"}
                      for o in OCCLUSION],
        "feature-ablation": "FeatureAblation.attribute(feature_mask=(N, 1, H, W) per-sample ids, baselines=(1, C, H, W) image)",
        "shapley-sampling": "ShapleyValueSampling with permutation_generator yielding the stored permutations; "
                            "feature_mask (1, 1, H, W) grid of 16 px cells (4 features)",
        "shapley-exact": "ShapleyValues (all 4! permutations), same mask",
        "lime": {**LIME, "captum": "Lime(interpretable_model=SkLearnRidge(alpha), similarity_func="
                 "get_exp_kernel_similarity_function(distance, kernel_width), perturb_func=the stored samples in order); "
                 "one example per call"},
        "script": "experiments/make_captum_perturbation_references.py",
    }
    arrays = {f"sd/{k}": np.asarray(v) for k, v in sd.items()}
    arrays.update(out)
    arrays.update(x=x, target=TARGETS, logits=logits, feature_mask=fm.astype(np.int32), baseline_image=base_img,
                  grid_mask=grid.astype(np.int32), permutations=perms.astype(np.int32), lime_samples=samples.astype(np.int32),
                  meta=np.asarray(json.dumps(meta)))
    path = os.path.join(ROOT, "tests", "fixtures", "captum_perturbation_refs.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
