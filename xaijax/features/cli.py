"""The ``xaijax visualize`` subcommand: natural pre-images of units, channels and classes.

::

    xaijax visualize --weights W --layer L --units 0:16 --out DIR
                     [--arch A] [--kind channel|unit] [--position I,J] [--invert IMAGE]
                     [--steps N] [--size PX] [--seed S] [--batch B] [--lr LR] [--C C]
                     [--alpha A] [--beta B] [--lambda-alpha W] [--lambda-tv W] [--jitter T]
                     [--preprocess torchvision|caffe|none]

``--layer logits`` (or ``output``) is the model output: ``--units`` are then classes.
With ``--invert IMAGE`` the representation of the image at ``--layer`` is inverted instead
(``--units`` then optionally restricts the channels entering the loss).

Writes to DIR: ``<tag>.png`` (a grid with one tile per unit, each de-normalised and
contrast-stretched to its 1st..99th percentile; for inversion the original image first),
``<tag>_labelled.png`` (the same tiles, each labelled with the unit, channel or class it
shows and its final activation, under a title naming the model, layer and settings),
``<tag>.npy`` (the raw pre-images, (K, H, W, 3) float32 in the model's normalised input
space), ``<tag>.json`` (units, final activations / errors, settings). Bad input raises
``ValueError`` with a one-line message; ``xaijax.cli.main`` prints it and exits with 2.

The lead wires this in with ``add_visualize_parser(sub)`` inside ``xaijax.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from xaijax.atomic import atomic_npy, atomic_text

__all__ = ["add_visualize_parser", "parse_units", "tile_grid", "stretch", "cmd_visualize"]


def parse_units(spec: str) -> list[int]:
    """``"0:16"`` (a Python slice, ``start:stop[:step]``), ``"3,5,9"``, ``"7"`` or a mix ``"0:4,9"``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            m = re.fullmatch(r"(\d+)?:(\d+)(?::(\d+))?", part)
            if not m:
                raise ValueError(f"--units: cannot read {part!r}; use start:stop[:step], e.g. 0:16")
            start, stop, step = int(m.group(1) or 0), int(m.group(2)), int(m.group(3) or 1)
            if step < 1 or stop <= start:
                raise ValueError(f"--units: {part!r} selects no units")
            out.extend(range(start, stop, step))
        else:
            if not re.fullmatch(r"-?\d+", part):
                raise ValueError(f"--units: cannot read {part!r}; give integers like 0:16 or 3,5,9")
            out.append(int(part))
    if not out:
        raise ValueError(f"--units {spec!r} selects no units")
    return out


def _parse_position(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", spec)
    if not m:
        raise ValueError(f"--position expects ROW,COL (e.g. 3,4); got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def stretch(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Contrast-stretch an (H, W, 3) image: its ``lo_pct``..``hi_pct`` percentiles -> [0, 1]."""
    img = np.asarray(img, np.float64)
    lo, hi = np.percentile(img, lo_pct), np.percentile(img, hi_pct)
    return np.clip((img - lo) / ((hi - lo) or 1.0), 0.0, 1.0)


def tile_grid(tiles: np.ndarray, cols: int | None = None, gap: int = 2) -> np.ndarray:
    """Arrange (K, H, W, 3) images in [0, 1] row-major on a white grid -> (rows*(H+gap)-gap, ...)."""
    tiles = np.asarray(tiles)
    k, h, w = tiles.shape[:3]
    cols = cols or int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    grid = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, 3))
    for n, t in enumerate(tiles):
        r, c = divmod(n, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = t
    return grid


def _out_dir(p: str) -> Path:
    path = Path(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {p}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"output directory {p} is not writable")
    return path


def _size_and_convention(args: argparse.Namespace, model: Any, info: dict[str, Any]) -> tuple[int, str]:
    """Input side (``--size``, else the model's fixed ``image_size``, else the recorded size, else
    the architecture's: :func:`xaijax.checkpoints.input_size.model_input_size`) and normalisation."""
    from xaijax.checkpoints.input_size import model_input_size
    from xaijax.models import preprocess

    return model_input_size(model, info, args.size), preprocess.convention(info, args.preprocess)


def _class_names(info: dict[str, Any], n: int) -> list[str] | None:
    raw = (info.get("metadata") or {}).get("class_names")
    try:
        names = json.loads(raw) if raw else None
    except ValueError:
        return None
    return names if isinstance(names, list) and len(names) == n else None


def cmd_visualize(args: argparse.Namespace) -> None:
    """Handler of ``xaijax visualize`` (see the module docstring)."""

    from xaijax import checkpoints, viz
    from xaijax.features import visualize as V
    from xaijax.models.preprocess import denormalize, load_image, normalize

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1; got {args.batch}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be >= 1; got {args.size}")
    model, variables, info = checkpoints.load(args.arch, args.weights)
    out = _out_dir(args.out)  # after the weights are read: a bad --weights leaves no folder behind
    size, convention = _size_and_convention(args, model, info)
    layer = None if args.layer in ("logits", "output") else args.layer
    cfg = V.PreImage(
        steps=args.steps,
        learning_rate=args.lr,
        C=args.C if args.C is not None else (20.0 if args.invert else 1.0),
        alpha=args.alpha,
        beta=args.beta,
        lambda_alpha=args.lambda_alpha,
        lambda_tv=args.lambda_tv,
        B=V.paper_B(convention),
        jitter=args.jitter,
    )
    layer_tag = (layer or "logits").replace("/", "_")
    units = parse_units(args.units) if args.units is not None else None
    t0 = time.perf_counter()
    if args.invert:
        img = load_image(args.invert, size)
        x0 = normalize(img[None], convention)
        print(f"visualize: inverting {args.invert} at {layer or 'the model output'} ({size}x{size} px, {args.steps} steps)...", flush=True)
        res = V.invert(model, variables, x0, layer=layer, channels=units, key=args.seed, config=cfg)
        images = np.asarray(res.images)
        tiles = [img, *[stretch(np.asarray(denormalize(t, convention))) for t in images]]
        tag = f"invert_{Path(args.invert).stem}_{layer_tag}"
        labels = ["original", f"inverted at {layer or 'output'}\nerror {float(res.objective[0]):.3g}"]
        title = f"{info['arch']}: inversion of {Path(args.invert).name} at {layer or 'the model output'}" + (
            f" (channels {args.units})" if units is not None else "")
        record: dict[str, Any] = {"image": str(args.invert), "channels": units, "normalized_error": float(res.objective[0])}
        summary = f"normalised error ||phi-phi0||^2/||phi0||^2 = {float(res.objective[0]):.4f}"
    else:
        units = units if units is not None else list(range(16))
        position = _parse_position(args.position)
        # validate everything (layer, units, position) before any heavy work
        shape, _ = V._layer_info(model, variables, layer, (size, size))
        V._units_array(np.asarray(units), args.kind, shape, position)
        k = len(units)
        nb = -(-k // args.batch)
        bsz = min(args.batch, k)
        print(
            f"visualize: {k} {'classes' if layer is None else args.kind + 's'} of {layer or 'the model output'} "
            f"(output {tuple(shape[1:])}), {size}x{size} px, {args.steps} steps, {nb} jitted batch(es) of {bsz}...",
            flush=True,
        )
        imgs, objs, scale = [], [], None
        for b in range(nb):
            chunk = units[b * bsz : (b + 1) * bsz]
            padded = chunk + [chunk[-1]] * (bsz - len(chunk))  # same shape -> no recompilation
            res = V.maximize(model, variables, np.asarray(padded), layer=layer, kind=args.kind, position=position,
                             size=size, key=args.seed, config=cfg)
            scale = res.scale  # Z depends on the key and layer only: the same for every batch
            imgs.append(np.asarray(res.images)[: len(chunk)])
            objs.append(np.asarray(res.objective)[: len(chunk)])
            print(f"  batch {b + 1}/{nb} done ({time.perf_counter() - t0:.1f} s)", flush=True)
        images = np.concatenate(imgs)
        obj = np.concatenate(objs)
        tiles = [stretch(np.asarray(denormalize(t, convention))) for t in images]
        tag = f"{layer_tag}_{args.kind if layer is not None else 'class'}"
        names = _class_names(info, shape[-1]) if layer is None else None
        value = "logit" if layer is None else "activation"
        labels = [f"{_unit_label(u, layer, args.kind, position, names)}\n{value} {v:.3g}" for u, v in zip(units, obj)]
        title = (f"{info['arch']} {layer or 'output'}: {k} {'classes' if layer is None else args.kind + 's'}, "
                 f"natural pre-images ({args.steps} steps, {size} px)")
        record = {
            "units": units,
            "position": position,
            "activation": [float(v) for v in obj],
            "scale_Z": scale,
            **({"class_names": [names[u] for u in units]} if names else {}),
        }
        summary = f"final activations {', '.join(f'{v:.3g}' for v in obj[:8])}{' ...' if k > 8 else ''}"
    grid = tile_grid(np.stack(tiles))
    viz.save_png(out / f"{tag}.png", grid)  # the tiles alone, pixel for pixel
    viz.save_figure(out / f"{tag}_labelled.png", viz.labelled_grid_figure(tiles, labels, title=title))
    record["labels"] = [lab.replace("\n", " ") for lab in labels]
    atomic_npy(out / f"{tag}.npy", images.astype(np.float32))
    record.update(
        arch=info["arch"], weights=str(args.weights), layer=layer, kind=args.kind, size=size, preprocess=convention,
        seed=args.seed, config={k: v for k, v in cfg.__dict__.items()}, seconds=round(time.perf_counter() - t0, 2),
    )
    atomic_text(out / f"{tag}.json", json.dumps(record, indent=1) + "\n")
    print(f"{summary}\nwrote {out / (tag + '_labelled.png')} (each tile labelled), {tag}.png (tiles only), {tag}.npy, "
          f"{tag}.json ({time.perf_counter() - t0:.1f} s)")


def _unit_label(u: int, layer: str | None, kind: str, position: tuple[int, int] | None, names: list[str] | None) -> str:
    """What a tile shows: ``class 3 (disc)``, ``channel 7`` or ``unit 7 at (3, 4)``."""
    if layer is None:
        return f"class {u}" + (f" ({names[u]})" if names else "")
    if kind == "unit":
        return f"unit {u}" + (f" at {position}" if position is not None else " (centre)")
    return f"channel {u}"


def add_visualize_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``visualize`` subcommand to an ``argparse`` subparsers object; returns it."""
    s = sub.add_parser(
        "visualize",
        help="feature visualisation: activation maximisation / representation inversion (natural pre-images)",
        description="Natural pre-images (Mahendran & Vedaldi, IJCV 2016) of channels, units or classes.",
    )
    s.add_argument("--arch", default=None, help="architecture (optional for native files, which record it)")
    s.add_argument("--weights", required=True, help=".pth/.pt, .safetensors or .msgpack")
    s.add_argument("--layer", required=True, help="layer name (e.g. features.28), or 'logits' for the model output")
    s.add_argument("--units", default=None, help="channels/classes: start:stop[:step] or a comma list (default 0:16)")
    s.add_argument("--kind", choices=["channel", "unit"], default="channel",
                   help="maximise a channel's spatial mean, or one unit (at --position, default the centre)")
    s.add_argument("--position", default=None, metavar="ROW,COL", help="unit position on the layer's map (--kind unit)")
    s.add_argument("--invert", default=None, metavar="IMAGE", help="invert this image's representation at --layer")
    s.add_argument("--steps", type=int, default=200, help="optimisation steps (paper: 300)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's training size)")
    s.add_argument("--seed", type=int, default=0, help="PRNG seed (initial noise and jitter, shared by all units)")
    s.add_argument("--batch", type=int, default=16, help="units optimised per jitted, vmapped call")
    s.add_argument("--lr", type=float, default=0.05, help="initial step, in units of the image norm B*sqrt(HW)")
    s.add_argument("--C", type=float, default=None, help="data-term weight (default 1; 20 for --invert)")
    s.add_argument("--alpha", type=float, default=6.0, help="alpha-norm exponent (paper: 6)")
    s.add_argument("--beta", type=float, default=2.0, help="TV exponent (paper: 2)")
    s.add_argument("--lambda-alpha", type=float, default=1.0, help="alpha-norm weight (paper normalisation: 1)")
    s.add_argument("--lambda-tv", type=float, default=1.0, help="TV weight (paper normalisation: 1)")
    s.add_argument("--jitter", type=int, default=None, help="largest random shift in px (default: paper's stride/4 rule)")
    s.add_argument("--preprocess", choices=["torchvision", "caffe", "none"], default=None)
    s.add_argument("--out", default="results/visualize", help="output directory")
    s.set_defaults(func=cmd_visualize)
    return s
