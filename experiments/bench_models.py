"""Jit-compile and forward/gradient times of zoo models on this machine (writes JSON).

    python experiments/bench_models.py --archs vgg16,resnet50 --batch 1 --size 224

Measures, per architecture: compile time of the jitted forward pass and of the jitted input
gradient, then the median of ``--repeats`` timed calls (after one warm-up call) of each.
Weights are random (seeded); timings do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from xaijax import methods, models


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench(arch: str, batch: int, size: int, repeats: int) -> dict:
    model = models.get(arch)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    fwd = jax.jit(model.apply)
    grad = jax.jit(methods.get("gradient"), static_argnums=0)
    target = jnp.zeros((batch,), jnp.int32)
    compile_fwd, t_fwd = _time(fwd, variables, x, repeats=repeats)
    compile_grad, t_grad = _time(lambda v, xx: grad(model, v, xx, target), variables, x, repeats=repeats)
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "first_call_forward_s": round(compile_fwd, 3),
        "forward_median_s": round(t_fwd, 4),
        "first_call_gradient_s": round(compile_grad, 3),
        "gradient_median_s": round(t_grad, 4),
        "gradient_over_forward": round(t_grad / t_fwd, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="vgg16,resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="experiments/results/bench_models.json")
    a = p.parse_args()
    rows = []
    for arch in a.archs.split(","):
        r = bench(arch, a.batch, a.size, a.repeats)
        print(json.dumps(r))
        rows.append(r)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "note": "first_call_* = trace + XLA compile + one run; *_median_s after warm-up",
        "results": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
