"""Benchmark: pre-images of 64 channels in one vmapped run vs 64 separate runs.

Runs activation maximisation (:func:`xaijax.features.maximize`) of the 64 channels of
``features.28`` (the last convolution) of the bundled synthetic VGG16, with few steps, and
times

* ``vmapped``: one call, the 64 channels as a vmapped batch inside one jitted ``lax.scan``;
* ``separate_jit``: 64 calls of the same jitted function with one channel each (compiled
  once, so this measures only the loss of batching);
* ``separate_api``: 64 calls of :func:`maximize` itself (what a Python loop over channels
  would cost, including per-call layer validation).

Compilation is excluded from the timings (each variant is warmed up first) and reported
separately. Results of the two paths are compared (the same key gives the same pre-image).
Writes ``experiments/results/bench_visualize.json``.

    python experiments/bench_visualize.py [--steps 5] [--size 128] [--units 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import checkpoints
from xaijax.features import visualize as V

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


class _Clock:
    """Wall clock and process CPU time (all threads) of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "synthetic_vgg16.safetensors"))
    ap.add_argument("--layer", default="features.28")
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_visualize.json"))
    args = ap.parse_args()

    load0 = round(os.getloadavg()[0], 2)
    model, variables, info = checkpoints.load(None, args.weights)
    cfg = V.PreImage(steps=args.steps)
    key = jax.random.key(0)
    hw = (args.size, args.size)
    shape, stride = V._layer_info(model, variables, args.layer, hw)
    if shape[-1] < args.units:
        raise SystemExit(f"{args.layer} has only {shape[-1]} channels")
    jitter = V._default_jitter(stride)
    scale = float(V._noise_scale_jit(model, variables, key, layer=args.layer, cfg=cfg, size=hw, jitter=jitter))
    all_units = jnp.asarray(V._units_array(np.arange(args.units), "channel", shape, None))

    def run(units):
        return V._maximize_jit(model, variables, units, jnp.float32(scale), key, layer=args.layer, kind="channel",
                               cfg=cfg, size=hw, jitter=jitter)

    print(f"{args.units} channels of {args.layer} {tuple(shape[1:])}, {args.size}px, {args.steps} steps, jitter {jitter}")
    _, compile_batched = _timed(lambda: run(all_units))
    with _Clock() as cb:
        batched = jax.block_until_ready(run(all_units))
    t_batched = cb.wall
    print(f"vmapped: compile+run {compile_batched:.2f} s, run {t_batched:.2f} s")

    _, compile_single = _timed(lambda: run(all_units[:1]))
    singles = []
    with _Clock() as cs:
        for k in range(args.units):
            singles.append(jax.block_until_ready(run(all_units[k : k + 1]))[0][0])
    t_separate = cs.wall
    print(f"separate (jitted core): compile+run {compile_single:.2f} s, {args.units} runs {t_separate:.2f} s")

    with _Clock() as ca:
        for k in range(args.units):
            jax.block_until_ready(V.maximize(model, variables, [k], layer=args.layer, size=hw, key=key, config=cfg).images)
    t_api = ca.wall
    print(f"separate (maximize() per channel): {t_api:.2f} s")

    diff = float(jnp.max(jnp.abs(jnp.stack(singles) - batched[0])))
    result = {
        "what": f"activation maximisation of {args.units} channels of {args.layer}, synthetic VGG16",
        "weights": os.path.relpath(args.weights, ROOT),
        "arch": info["arch"],
        "layer": args.layer,
        "layer_output": list(shape[1:]),
        "units": args.units,
        "steps": args.steps,
        "size": args.size,
        "jitter": jitter,
        "seconds": {
            "vmapped": round(t_batched, 3),
            "separate_jit": round(t_separate, 3),
            "separate_api": round(t_api, 3),
            "compile_vmapped": round(compile_batched - t_batched, 3),
            "compile_single": round(compile_single - t_separate / args.units, 3),
        },
        "cpu_seconds": {"vmapped": round(cb.cpu, 3), "separate_jit": round(cs.cpu, 3), "separate_api": round(ca.cpu, 3)},
        "speedup_vs_separate_jit": round(t_separate / t_batched, 2),
        "cpu_speedup_vs_separate_jit": round(cs.cpu / cb.cpu, 2),
        "speedup_vs_separate_api": round(t_api / t_batched, 2),
        "max_abs_diff_vmapped_vs_separate": diff,
        "machine": {
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "loadavg_1min_at_start": load0,
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "jax": jax.__version__,
        },
        "note": "wall-clock and process CPU seconds (all threads); compile times are estimates (first call minus a warm call); the machine may be shared, "
        "see loadavg; both variants run the same jitted function on the same machine, one after the other",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"speed-up {result['speedup_vs_separate_jit']}x (jitted core), {result['speedup_vs_separate_api']}x (API loop); "
          f"max |diff| {diff:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
