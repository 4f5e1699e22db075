"""Record Quantus 0.6.0's localisation and complexity scores on fixed maps and regions.

Writes ``tests/fixtures/quantus_localisation_refs.npz``, read by
``tests/test_localisation_complexity.py`` with numpy + xaijax only.

These metrics read only the attribution maps (and the regions): Quantus still wants a model
and inputs, so a tiny seeded torch classifier and random inputs are passed and never matter
(no weights are stored: no score depends on them). Maps are given explicitly (``a_batch``),
regions as ``s_batch``; everything is float64.

Quantus normalises a whole call's maps by their largest absolute value before scoring
(``normalise_by_max`` over all axes, batch included) and then, for some metrics, takes
``abs``. Besides each metric's defaults, the script records the runs that xaijax's
per-map conventions reproduce exactly: the same metric with
``normalise_func_kwargs={"normalise_axes": (1, 2, 3)}`` (each map by its own maximum).

Run (a few seconds) in the peer virtualenv (see ``experiments/PEERS.md``)::

    /work/peer-venv/bin/python experiments/make_quantus_localisation_references.py

npz layout:

* ``meta``: JSON (versions, settings of every stored run, how xaijax aligns with it);
* ``maps``: (N, H, W) float64, ``regions``: (N, H, W) bool, ``x``: (N, 3, H, W) inputs, ``y``: (N,);
* ``quadrants``: (N, 4) bool, Focus' ``custom_batch`` (the maps stand for mosaics' maps);
* ``out/<run>``: (N,) float64 Quantus scores, one per run named in ``meta["runs"]``.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "quantus_localisation_refs.npz")

N, H, W = 8, 20, 20
PER_MAP = {"normalise_func_kwargs": {"normalise_axes": (1, 2, 3)}}


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Maps of several kinds (signed, ReLU'd, sparse, heavy-tailed, region-shaped) and regions
    of several sizes; continuous values, so that no ranking has ties."""
    rng = np.random.default_rng(20261207)
    maps = rng.normal(size=(N, H, W))
    regions = np.zeros((N, H, W), bool)
    boxes = [(2, 9, 3, 12), (0, 20, 0, 5), (5, 15, 5, 15), (1, 4, 1, 4), (10, 20, 2, 18), (3, 17, 8, 11), (0, 10, 0, 10), (6, 8, 0, 20)]
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        regions[i, y0:y1, x0:x1] = True
    maps[2] = np.maximum(maps[2], 0)  # half zeros
    sparse = np.zeros(H * W)
    sparse[rng.choice(H * W, 12, replace=False)] = rng.uniform(0.5, 2.0, 12)
    maps[3] = sparse.reshape(H, W)  # mostly zeros
    maps[4] = regions[4] + 0.3 * rng.normal(size=(H, W))  # about the region
    maps[5] = maps[5] ** 3  # heavy tails
    maps[6] = -np.abs(maps[6]) + 0.2  # mostly negative
    maps[7] = rng.uniform(size=(H, W)) * 1e-3  # small scale: Quantus' batch normalisation matters
    return maps, regions


def main() -> None:
    import quantus
    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    maps, regions = make_data()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 3, H, W))
    y = np.arange(N) % 3

    runs = {
        # name: (Quantus class, constructor settings, what xaijax call reproduces it)
        "relevance_mass_accuracy": ("RelevanceMassAccuracy", {}, "relevance_mass_accuracy(transform='signed')"),
        "relevance_rank_accuracy": ("RelevanceRankAccuracy", {}, "relevance_rank_accuracy"),
        "top_k_intersection_k40": ("TopKIntersection", {"k": 40}, "top_k_intersection(k=40)"),
        "top_k_intersection_k40_ci": ("TopKIntersection", {"k": 40, "concept_influence": True}, "top_k_intersection(k=40, concept_influence=True)"),
        "attribution_localisation": ("AttributionLocalisation", {}, "attribution_localisation(transform='abs')"),
        "attribution_localisation_positive": (
            "AttributionLocalisation",
            {"abs": False, "positive_attributions": True},
            "attribution_localisation(transform='positive')",
        ),
        "auc": ("AUC", {}, "roc_auc"),
        "sparseness": ("Sparseness", {}, "sparseness(offset=1e-7) up to the batch normalisation"),
        "sparseness_per_map": ("Sparseness", PER_MAP, "sparseness(offset=1e-7)"),
        "complexity": ("Complexity", {}, "complexity"),
        "effective_complexity": ("EffectiveComplexity", {}, "effective_complexity(maps / max|maps| over the batch, normalise=False)"),
        "effective_complexity_per_map": ("EffectiveComplexity", PER_MAP, "effective_complexity"),
        "effective_complexity_eps0.1": ("EffectiveComplexity", {"eps": 0.1}, "effective_complexity(batch-normalised maps, eps=0.1, normalise=False)"),
        "effective_complexity_eps0.1_per_map": ("EffectiveComplexity", {"eps": 0.1, **PER_MAP}, "effective_complexity(eps=0.1)"),
    }
    # focus: the maps play mosaics' maps; custom_batch holds each mosaic's target quadrants
    # (top-left, top-right, bottom-left, bottom-right), two per mosaic
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 3), (1, 2)]
    quadrants = np.zeros((N, 4), bool)
    for i, (a, b) in enumerate(pairs):
        quadrants[i, [a, b]] = True
    runs["focus"] = ("Focus", {}, "focus(maps, quadrants)")
    out = {}
    for name, (cls, settings, _) in runs.items():
        extra = {"custom_batch": [list(map(int, q)) for q in quadrants]} if cls == "Focus" else {}
        metric = getattr(quantus, cls)(disable_warnings=True, **settings)
        scores = metric(
            model=model,
            x_batch=x.astype(np.float32),
            y_batch=y,
            a_batch=maps.copy(),
            s_batch=regions[:, None].astype(np.float32),
            channel_first=True,
            device="cpu",
            **extra,
        )
        out[f"out/{name}"] = np.asarray(scores, np.float64)
        print(f"{name:40s}", np.round(out[f"out/{name}"], 6))
    meta = {
        "quantus": quantus.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "shape": [N, H, W],
        "runs": {k: {"quantus": c, "settings": {kk: (list(vv["normalise_axes"]) if kk == "normalise_func_kwargs" else vv) for kk, vv in s.items()}, "xaijax": r} for k, (c, s, r) in runs.items()},
        "notes": "maps float64, regions as s_batch (N, 1, H, W); the model and x are unused by these metrics",
    }
    np.savez_compressed(OUT, meta=json.dumps(meta), maps=maps, regions=regions, x=x.astype(np.float32), y=y, quadrants=quadrants, **out)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
