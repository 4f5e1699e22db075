"""Propagation methods (LRP, EB, RAP, RSP, ...) timed against the plain jitted input gradient.

    python experiments/bench_propagation.py                 # VGG16 + ResNet50, 224 px, batch 1 and 16
    python experiments/bench_propagation.py --quick         # VGG16, 64 px, batch 1 (smoke test)
    python experiments/bench_propagation.py --flops         # XLA's FLOP counts instead of times

DESIGN.md section 6: in one process, after warm-up, median of repeats, every propagation
method's time divided by the time of the jitted ``gradient`` method on the same model,
weights (random, seeded: ``models.random_variables``), input and batch. Target: <= 1.3x.

Timing is paired: each repeat times the gradient and then every method once, round-robin,
and the reported ratio is the median over repeats of (method time / that repeat's gradient
time), so slow phases of a shared machine hit numerator and denominator alike. The load
average (``os.getloadavg``) before and after each configuration is recorded in the JSON.
Methods that are not registered are skipped (``xaijax.methods.rap``/``rsp`` are imported
if they exist, since they may not be wired into ``xaijax.methods`` yet).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import methods, models
from xaijax.atomic import atomic_text
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import loadavg as _loadavg  # noqa: E402  (experiments/machine.py: one home for machine facts)

METHODS = [
    "lrp-epsilon",
    "lrp-epsilon-plus",
    "lrp-epsilon-plus-flat",
    "lrp-epsilon-gamma-box",
    "lrp-alpha1-beta0",
    "lrp-alpha2-beta1",
    "clrp",
    "sglrp",
    "excitation-backprop",
    "contrastive-excitation-backprop",
    "rap",
    "rsp",
    "contrastive-rsp",
]


def _import_optional() -> list[str]:
    loaded = []
    for mod in ("xaijax.methods.rap", "xaijax.methods.rsp"):
        try:
            importlib.import_module(mod)
            loaded.append(mod)
        except ImportError:
            pass
    return loaded




def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _jitted(arch: str, size: int, names: list[str]):
    """``(model, variables, {name: jitted method})`` for the gradient and ``names``."""
    model = models.get(arch)
    variables = models.random_variables(model, (1, size, size, 3), seed=0)
    return model, variables, {name: jax.jit(methods.get(name), static_argnums=0) for name in ["gradient"] + names}


def bench(arch: str, batch: int, size: int, repeats: int, names: list[str]) -> dict:
    model, variables, fns = _jitted(arch, size, names)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, size, size, 3), np.float32))
    target = jnp.asarray(np.arange(batch) % 1000, jnp.int32)
    load_before = _loadavg()

    calls = {name: (lambda fn=fn: fn(model, variables, x, target)) for name, fn in fns.items()}
    first_call = {}
    for name, call in calls.items():  # warm-up: compile + one run
        first_call[name] = round(_timed(call), 3)
        _timed(call)
        print(f"  {arch} b={batch} {size}px warm {name}: first call {first_call[name]} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in calls}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        t_grad = _timed(calls["gradient"])
        times["gradient"].append(t_grad)
        for name in names:
            t = _timed(calls[name])
            times[name].append(t)
            ratios[name].append(t / t_grad)
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "gradient_median_s": round(statistics.median(times["gradient"]), 4),
        "methods": {
            name: {
                "median_s": round(statistics.median(times[name]), 4),
                "ratio_to_gradient": round(statistics.median(ratios[name]), 3),
                "first_call_s": first_call[name],
            }
            for name in names
        },
    }


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0]
    return float(analysis["flops"])


def count_flops(arch: str, batch: int, size: int, names: list[str]) -> dict:
    """XLA's cost-analysis FLOPs of each method relative to the gradient's (compiled, not run).

    The arithmetic a rule needs, independent of machine load: a ratio near the measured time
    ratio means the time goes into that arithmetic, not into engine overhead.
    """
    model, variables, fns = _jitted(arch, size, names)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    target = jax.ShapeDtypeStruct((batch,), jnp.int32)
    flops = {}
    for name, fn in fns.items():
        flops[name] = _flops(fn.lower(model, variables, x, target).compile())
        print(f"  {arch} b={batch} {size}px {name}: {flops[name] / 1e9:.2f} GFLOP", flush=True)
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "gradient_gflop": round(flops["gradient"] / 1e9, 3),
        "methods": {
            name: {"gflop": round(flops[name] / 1e9, 3), "flops_ratio_to_gradient": round(flops[name] / flops["gradient"], 3)}
            for name in names
        },
    }


def markdown_flops(results: list[dict], names: list[str]) -> str:
    cols = [f"{r['arch']} b{r['batch']} {r['size']}px" for r in results]
    lines = ["| method (FLOPs / gradient FLOPs) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append("| gradient (GFLOP) | " + " | ".join(f"{r['gradient_gflop']:.1f}" for r in results) + " |")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['methods'][name]['flops_ratio_to_gradient']:.2f}x" for r in results) + " |")
    return "\n".join(lines)


def markdown(results: list[dict], names: list[str]) -> str:
    cols = [f"{r['arch']} b{r['batch']} {r['size']}px" for r in results]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines.append("| gradient (s) | " + " | ".join(f"{r['gradient_median_s']:.3f}" for r in results) + " |")
    for name in names:
        cells = [f"{r['methods'][name]['ratio_to_gradient']:.2f}x" for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_compare(results: list[dict], before: list[dict], names: list[str]) -> str:
    """Like :func:`markdown`, each cell ``before -> after`` where ``before`` has the configuration."""
    old = {(r["arch"], r["batch"], r["size"]): r for r in before}
    cols = [f"{r['arch']} b{r['batch']} {r['size']}px" for r in results]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(r: dict, name: str | None) -> str:
        o = old.get((r["arch"], r["batch"], r["size"]))
        if name is None:
            new = f"{r['gradient_median_s']:.3f}"
            return f"{o['gradient_median_s']:.3f} / {new}" if o else new
        new = f"{r['methods'][name]['ratio_to_gradient']:.2f}x"
        if o and name in o["methods"]:
            return f"{o['methods'][name]['ratio_to_gradient']:.2f}x -> {new}"
        return new

    lines.append("| gradient (s) | " + " | ".join(cell(r, None) for r in results) + " |")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(r, name) for r in results) + " |")
    return "\n".join(lines)


def _environment(loaded: list[str], skipped: list[str]) -> dict:
    """What every JSON this script writes records about the run's environment."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "imported_modules": loaded,
        "skipped": skipped,
    }


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(payload, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="VGG16 only, batch 1, 64 px, 3 repeats")
    ap.add_argument("--archs", default=None, help="comma-separated (default vgg16,resnet50)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (default 224)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the method list")
    ap.add_argument(
        "--flops",
        action="store_true",
        help="instead of timing: XLA cost-analysis FLOPs of each method / the gradient's (compile only; "
        "default output experiments/results/bench_propagation_flops.json)",
    )
    ap.add_argument("--out", default=None, help="JSON output (default experiments/results/bench_propagation.json; "
                    "with --quick results/bench_propagation_quick.json)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="a JSON written by this script for an earlier version of the code: its ratios are "
        "stored under 'baseline' and shown next to the new ones (before -> after)",
    )
    args = ap.parse_args()

    archs = (args.archs or ("vgg16" if args.quick else "vgg16,resnet50")).split(",")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,16")).split(",")]
    size = args.size or (64 if args.quick else 224)
    repeats = args.repeats or (3 if args.quick else 5)
    loaded = _import_optional()
    wanted = args.methods.split(",") if args.methods else METHODS
    registered = set(methods.names())
    names = [n for n in wanted if n in registered]
    skipped = [n for n in wanted if n not in registered]
    if skipped:
        print("skipping (not registered):", ", ".join(skipped))

    if args.flops:
        out = args.out or "experiments/results/bench_propagation_flops.json"
        counted = [count_flops(arch, batch, size, names) for arch in archs for batch in batches]
        table = markdown_flops(counted, names)
        payload = {
            "what": "XLA cost-analysis FLOPs of each propagation method / those of the jitted input gradient",
            **_environment(loaded, skipped),
            "results": counted,
            "markdown": table,
        }
        _write_json(Path(out), payload)
        print(table)
        print(f"wrote {out}")
        return

    results = []
    configs = [(arch, batch) for arch in archs for batch in batches]
    for k, (arch, batch) in enumerate(configs):
        results.append(bench(arch, batch, size, repeats, names))
        if k < len(configs) - 1:  # partial results while more configurations run; the full table once, below
            print(f"({k + 1} of {len(configs)} configurations)", flush=True)
            print(markdown(results[-1:], names), flush=True)
    table = markdown(results, names)
    baseline = None
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        table = markdown_compare(results, baseline["results"], names)
    payload = {
        "what": "propagation method time / jitted input-gradient time (median of paired repeats)",
        "quick": args.quick,
        **_environment(loaded, skipped),
        "results": results,
        "baseline": baseline,
        "markdown": table,
    }
    # a smoke test must not overwrite the committed results
    out = args.out or ("results/bench_propagation_quick.json" if args.quick else "experiments/results/bench_propagation.json")
    _write_json(Path(out), payload)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
