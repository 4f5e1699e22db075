"""The ``xaijax dissect`` subcommand: Network Dissection + compositional explanations.

::

    xaijax dissect --dataset synthetic|broden [--data-dir D] [--arch A] [--weights W]
                   [--layer L] [--images N] [--units SPEC] --out DIR
                   [--split S] [--size PX] [--mask-size M] [--categories c1,c2]
                   [--quantile Q] [--beam-size B] [--max-formula-length K] [--top-k K]
                   [--batch B] [--figure-units N] [--preprocess torchvision|caffe|none]
                   [--no-progress]

Defaults for ``--dataset synthetic``: the bundled VGG16 (``weights/synthetic_vgg16.safetensors``),
the test split, masks at image resolution. ``--layer`` defaults to the architecture's CAM
layer (VGG16 ``features.29``, the ReLU of the last convolution). ``--arch`` is needed only
for torch files (native files record it).

Writes to DIR: ``dissect.csv`` (one row per unit: unit, concept, category, iou, formula,
formula_length, formula_iou, threshold, threshold_error, fire_rate, top_images),
``dissect.md`` (summary + table), ``dissect.json`` (settings, summary, per-unit rows and
beams), ``dissect.png`` (top-activating images per unit with the thresholded activation
overlaid). Bad input raises ``ValueError`` with a one-line message; ``xaijax.cli.main``
prints it and exits with 2.

The lead wires this in with ``add_dissect_parser(sub)`` inside ``xaijax.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from xaijax.atomic import atomic_text
from xaijax.features.cli import _out_dir, parse_units

__all__ = ["add_dissect_parser", "cmd_dissect"]


def _units(spec: str | None) -> list[int] | None:
    return None if spec is None else parse_units(spec)


def cmd_dissect(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``xaijax dissect`` (see the module docstring); returns the summary dict."""
    from xaijax import checkpoints
    from xaijax.features import dissect as D
    from xaijax.models import preprocess, registry

    for name in ("images", "batch", "beam_size", "max_formula_length", "top_k", "figure_units"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    cfg = D.DissectConfig(
        quantile=args.quantile, beam_size=args.beam_size, max_formula_length=args.max_formula_length,
        top_k=args.top_k, batch_size=args.batch,
    )
    units = _units(args.units)
    if args.dataset == "synthetic":
        from xaijax.data import SyntheticScenes
        from xaijax.data.concepts import SyntheticConcepts

        weights = args.weights or str(checkpoints.bundled_weights("synthetic_vgg16.safetensors"))
        scenes = SyntheticScenes(size=args.size or 128)
        split = args.split or "test"
        total = scenes.split_size(split)
        n = min(args.images, total) if args.images else total
        dataset = SyntheticConcepts(scenes, split=split, count=n, mask_size=args.mask_size)
    else:
        from xaijax.data.broden import BrodenDataset

        if not args.data_dir:
            raise ValueError("--dataset broden needs --data-dir (the folder holding index.csv)")
        if not args.weights:
            raise ValueError("--dataset broden needs --weights (and --arch for torch files)")
        weights = args.weights
        cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
        dataset = BrodenDataset(args.data_dir, categories=cats, split=args.split, size=args.size,
                                mask_size=args.mask_size, max_images=args.images)
    model, variables, info = checkpoints.load(args.arch, weights)
    out = _out_dir(args.out)  # after the weights are read: a bad --weights leaves no folder behind
    convention = preprocess.convention(info, args.preprocess)
    layer = args.layer or registry.spec(info["arch"]).cam_layer
    t0 = time.perf_counter()
    print(
        f"dissect: {info['arch']} {layer} on {len(dataset)} {args.dataset} images "
        f"({len(dataset.concept_names)} concepts, masks {dataset.mask_shape[0]}x{dataset.mask_shape[1]})...",
        flush=True,
    )
    res = D.dissect(model, variables, layer, dataset, units=units, config=cfg, preprocess=convention,
                    progress=not args.no_progress)
    paths = D.write_tables(res, out, dataset.image_id)
    D.save_figure(res, dataset, out / "dissect.png", max_units=args.figure_units)
    summary = res.summary()
    record = {
        "arch": info["arch"], "weights": str(weights), "layer": layer, "dataset": args.dataset,
        "split": getattr(dataset, "split", args.split), "preprocess": convention,
        "config": {k: v for k, v in cfg.__dict__.items()}, "summary": summary,
        "seconds": round(time.perf_counter() - t0, 2),
        "units": res.rows(dataset.image_id),
        "beams": [[{"formula": D.formula_to_str(f, res.concept_names), "iou": i} for f, i in b] for b in res.beams],
    }
    atomic_text(out / "dissect.json", json.dumps(record, indent=1) + "\n")
    print(paths["md"].read_text())
    print(f"wrote {out}/dissect.csv, dissect.md, dissect.json, dissect.png ({record['seconds']} s)")
    return summary


def add_dissect_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``dissect`` subcommand to an ``argparse`` subparsers object; returns it."""
    s = sub.add_parser(
        "dissect",
        help="neuron-concept explanations: Network Dissection + compositional formulas (beam search)",
        description="Label every unit of a layer with its best concept (Bau et al. 2017) and the best "
        "AND/OR/AND NOT formula of concepts (Mu & Andreas 2020), by IoU over a concept dataset.",
    )
    s.add_argument("--dataset", choices=["synthetic", "broden"], default="synthetic")
    s.add_argument("--data-dir", default=None, help="Broden folder (holding index.csv)")
    s.add_argument("--split", default=None, help="synthetic: train|val|test (default test); Broden: filter rows")
    s.add_argument("--arch", default=None, help="architecture (optional for native files, which record it)")
    s.add_argument("--weights", default=None, help="weights file (default for synthetic: the bundled VGG16)")
    s.add_argument("--layer", default=None, help="layer to dissect (default: the architecture's CAM layer)")
    s.add_argument("--images", type=int, default=None, help="use only the first N images")
    s.add_argument("--units", default=None, help="channels: start:stop[:step] or a comma list (default: all)")
    s.add_argument("--categories", default=None, help="Broden concept categories, comma-separated (default: all)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (synthetic default 128; Broden: native)")
    s.add_argument("--mask-size", type=int, default=None, help="concept-mask side (default: the dataset's)")
    s.add_argument("--quantile", type=float, default=0.005, help="top activation fraction per unit (NetDissect 0.005)")
    s.add_argument("--beam-size", type=int, default=5, help="beam width (compexp: 5)")
    s.add_argument("--max-formula-length", type=int, default=3, help="concepts per formula (compexp: 3; 1 = NetDissect only)")
    s.add_argument("--top-k", type=int, default=5, help="top-activating images per unit in the figure")
    s.add_argument("--batch", type=int, default=16, help="images per batch")
    s.add_argument("--figure-units", type=int, default=64, help="units shown in dissect.png")
    s.add_argument("--preprocess", choices=["torchvision", "caffe", "none"], default=None)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", default="results/dissect", help="output directory")
    s.set_defaults(func=cmd_dissect)
    return s
