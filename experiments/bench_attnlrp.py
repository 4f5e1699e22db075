"""AttnLRP / CP-LRP on a vision transformer, timed against the plain jitted input gradient.

    python experiments/bench_attnlrp.py            # ViT-B/16, 224 px, batch 1, 5 repeats
    python experiments/bench_attnlrp.py --quick    # a 2-block ViT at 32 px (smoke test)
    python experiments/bench_attnlrp.py --batch 16 --repeats 3   # batch 16: bench_attnlrp_b16.json

DESIGN.md section 6: one process, random seeded weights (``models.random_variables``), the
same input; each method is compiled ahead of time (``jit(...).lower(...).compile()``, the
compile time and XLA's FLOP count recorded), run once to warm up, then timed round-robin
with the gradient: the reported ratio is the median over repeats of (method time / that
repeat's gradient time), so slow phases of a shared machine hit both alike. Writes
``experiments/results/bench_attnlrp.json`` (``bench_attnlrp_quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
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
from xaijax.models import vit
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import loadavg as _loadavg  # noqa: E402  (experiments/machine.py: one home for machine facts)

_EPS = {"conv_gamma": None, "dense_gamma": None}
#: label -> (registered method, hyperparameters): the defaults (gamma 0.25 on the patch
#: embedding, 0.05 on dense layers) and the paper's epsilon rule on every linear layer
VARIANTS: dict[str, tuple[str, dict]] = {
    "attnlrp": ("attnlrp", {}),
    "attnlrp-epsilon": ("attnlrp", _EPS),
    "cp-lrp": ("cp-lrp", {}),
    "cp-lrp-epsilon": ("cp-lrp", _EPS),
    "lrp-epsilon": ("lrp-epsilon", {}),
}
RESULTS = Path(__file__).resolve().parent / "results"




def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0]
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench(model, size: int, repeats: int, names: list[str], batch: int = 1) -> dict:
    variables = models.random_variables(model, (1, size, size, 3), seed=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, size, size, 3), np.float32))
    target = jnp.asarray([3 + i % 5 for i in range(batch)], jnp.int32)
    load_before = _loadavg()
    calls, compile_s, flops = {}, {}, {}
    for name in ["gradient"] + names:
        method, hparams = VARIANTS.get(name, (name, {}))
        fn = jax.jit(methods.get(method, **hparams), static_argnums=0)
        t0 = time.perf_counter()
        compiled = fn.lower(model, variables, x, target).compile()
        compile_s[name] = round(time.perf_counter() - t0, 2)
        flops[name] = _flops(compiled)
        calls[name] = lambda c=compiled: c(variables, x, target)
        _timed(calls[name])  # warm-up run
        print(f"  {name}: compiled in {compile_s[name]} s, {(flops[name] or 0) / 1e9:.3f} GFLOP", flush=True)
    times: dict[str, list[float]] = {n: [] for n in calls}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        tg = _timed(calls["gradient"])
        times["gradient"].append(tg)
        for n in names:
            t = _timed(calls[n])
            times[n].append(t)
            ratios[n].append(t / tg)
    return {
        "model": {k: getattr(model, k) for k in ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")},
        "batch": batch,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "gradient": {"median_s": round(statistics.median(times["gradient"]), 4), "compile_s": compile_s["gradient"],
                     "gflop": flops["gradient"] and round(flops["gradient"] / 1e9, 3)},
        "methods": {
            n: {
                "median_s": round(statistics.median(times[n]), 4),
                "ratio_to_gradient": round(statistics.median(ratios[n]), 3),
                "compile_s": compile_s[n],
                "gflop": flops[n] and round(flops[n] / 1e9, 3),
                "flops_ratio_to_gradient": flops[n] and flops["gradient"] and round(flops[n] / flops["gradient"], 3),
            }
            for n in names
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-block ViT at 32 px, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; 3 with --quick)")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} or registered methods")
    ap.add_argument("--batch", type=int, default=1, help="images per call (default 1; other sizes write bench_attnlrp_b<N>.json)")
    args = ap.parse_args()
    names = [n for n in args.methods.split(",") if n]
    if args.quick:
        model = vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
        size, repeats = 32, args.repeats or 3
    else:
        model, size, repeats = models.get("vit_b_16"), 224, args.repeats or 5
    if args.batch < 1:
        ap.error(f"--batch must be a positive integer, got {args.batch}")
    print(f"{type(model).__name__} {size} px, batch {args.batch}, {repeats} repeats on {jax.devices()[0].platform}", flush=True)
    result = bench(model, size, repeats, names, args.batch)
    payload = {
        "what": f"median over repeats of (method time / gradient time), ViT, batch {args.batch}, random weights",
        "variants": {k: {"method": m, "hparams": h} for k, (m, h) in VARIANTS.items() if k in names},
        "environment": {
            "jax": jax.__version__,
            "platform": platform.platform(),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
        },
        "result": result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.batch == 1 else f"_b{args.batch}"
    path = RESULTS / (f"bench_attnlrp{suffix}_quick.json" if args.quick else f"bench_attnlrp{suffix}.json")
    atomic_text(path, json.dumps(payload, indent=2) + "\n")
    for n, r in result["methods"].items():
        print(f"{n}: {r['ratio_to_gradient']:.2f}x gradient ({r['median_s']:.3f} s vs {result['gradient']['median_s']:.3f} s)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
