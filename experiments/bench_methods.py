"""Performance of RISE, UCAG and every attribution method, as ratios measured side by side.

    python experiments/bench_methods.py              # VGG16 + ResNet50, 224 px, batch 1 and 16, RISE N=4000
    python experiments/bench_methods.py --quick      # 64 px (UCAG 32 px), batch 1, N=100 (shared CPU)
    python experiments/bench_methods.py --sections rise,ucag --size 112 --rise-n 400

DESIGN.md section 6 (issue 6). Three sections, each timed in one process, after warm-up
(compile + one run), median of paired repeats; weights are random and seeded
(``models.random_variables``), inputs are seeded Gaussian noise in NHWC float32.

1. ``rise``: RISE throughput as a fraction of plain batched forward throughput (target
   >= 0.9). RISE makes, applies and scores its ``N`` masks in chunks of ``chunk`` masked
   images (``lax.scan``); the reference is the jitted forward pass of one batch of
   ``chunk`` already-masked images, i.e. ``N`` forward passes done batched at the batch
   size RISE itself uses (a single batch of all ``N`` = 4000 images at 224 px would need
   ~100 GB of activations). ``throughput_ratio = (N / t_rise) / (chunk / t_forward)``.
   The mask generation alone (``rise_masks`` of all ``N`` masks, jitted) is timed too:
   it is the only work RISE adds to the forward passes besides the (x * mask)
   products and the score-weighted mask sum.
2. ``ucag``: UCAG over Grad-CAM, vmapped (``Ucag(GradCAM())``: all 36 zoomed patches in
   one batched Grad-CAM call, plus the whole-image call) against a Python loop over the
   37 base-method calls (36 patches + whole image) of the jitted Grad-CAM, one at a time;
   patch extraction, confidence weights (one batched forward), placement and
   post-processing are the same jitted code in both. Target: vmapped faster (ratio < 1).
3. ``methods``: every registered method of kind ``"attribution"`` (``xaijax.methods.kind``)
   jitted, divided by the plain jitted input gradient (``methods.get("gradient")``) timed
   in the same repeat. Methods with heavy sampling run with the hyperparameters in
   ``HEAVY`` (recorded in the JSON); ``--full-heavy`` uses the registered defaults instead.
   A method whose warm call takes longer than ``--max-call-s`` is timed once (its
   ``repeats`` is recorded per row).

The machine this was developed on is shared (2 cores, load average 8-12 from other
jobs), so absolute times are noisy and slow; the ratios, measured in one process with
numerator and denominator interleaved, are what count. The load average before/after each
row is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import methods, models
from xaijax.atomic import atomic_text
from xaijax.methods.cam import GradCAM
from xaijax.methods.perturbation import RISE, rise_masks
from xaijax.methods.combinators import Ucag
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import loadavg as _loadavg  # noqa: E402  (experiments/machine.py: one home for machine facts)

# Modules that register methods but may not be wired into ``xaijax.methods`` yet.
OPTIONAL_MODULES = ("xaijax.methods.perturbation.extremal", "xaijax.methods.combinators.contrastive", "xaijax.methods.rap", "xaijax.methods.rsp")

# Hyperparameters of the sampling-heavy methods in section 3 (cost ~ linear in them).
HEAVY: dict[str, dict[str, Any]] = {
    "rise": {"n": 100, "chunk": 50},
    "smoothgrad": {"n": 8},
    "integrated-gradients": {"steps": 8},
    "extremal-perturbation": {"max_iter": 20},
    "score-cam": {},  # one forward pass per channel of the CAM layer (512 VGG16, 2048 ResNet50)
    "ucag-grad-cam": {},  # 36 zoomed patches (2.6x) + the whole image
    "contrastive-rsp": {},
}
HEAVY_PREFIXES = ("ucag",)




def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _setup(arch: str, batch: int, size: int, seed: int = 1):
    model = models.get(arch)
    variables = models.random_variables(model, (1, size, size, 3), seed=0)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32))
    target = jnp.asarray(np.arange(batch) % 1000, jnp.int32)
    return model, variables, x, target


# ------------------------------------------------------------------------------------- 1. RISE
def bench_rise(arch: str, size: int, n: int, chunk: int, repeats: int) -> dict:
    """RISE (batch 1, N masks) vs the jitted forward of one batch of ``chunk`` masked images."""
    model, variables, x, target = _setup(arch, 1, size)
    chunk = min(chunk, n)
    masks = rise_masks(0, jnp.arange(chunk), (size, size))
    xb = x * masks[:, :, :, None]  # (chunk, H, W, 3): masked images, as RISE forwards them
    fwd = jax.jit(model.apply)
    rise = jax.jit(RISE(n=n, chunk=chunk), static_argnums=0)
    gen = jax.jit(lambda idx: rise_masks(0, idx, (size, size)))
    idx = jnp.arange(n)
    calls = {
        "forward_chunk": lambda: fwd(variables, xb),
        "rise": lambda: rise(model, variables, x, target),
        "masks": lambda: gen(idx),
    }
    load_before = _loadavg()
    first = {k: round(_timed(c), 3) for k, c in calls.items()}
    for c in calls.values():
        _timed(c)
    times: dict[str, list[float]] = {k: [] for k in calls}
    ratios = []
    for _ in range(repeats):
        for k, c in calls.items():
            times[k].append(_timed(c))
        ratios.append((n / times["rise"][-1]) / (chunk / times["forward_chunk"][-1]))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_chunks = math.ceil(n / chunk)
    row = {
        "arch": arch,
        "size": size,
        "n": n,
        "chunk": chunk,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "first_call_s": first,
        "forward_chunk_median_s": round(med["forward_chunk"], 4),
        "forward_n_equivalent_s": round(med["forward_chunk"] * n / chunk, 3),
        "rise_median_s": round(med["rise"], 3),
        "mask_generation_median_s": round(med["masks"], 4),
        "mask_generation_fraction_of_rise": round(med["masks"] / med["rise"], 4),
        "forward_images_per_s": round(chunk / med["forward_chunk"], 2),
        "rise_masks_per_s": round(n / med["rise"], 2),
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_per_repeat": [round(r, 3) for r in ratios],
        "rise_chunks": n_chunks,
        "target": ">= 0.9",
    }
    row["meets_target"] = row["throughput_ratio"] >= 0.9
    return row


# ------------------------------------------------------------------------------------- 2. UCAG
@dataclasses.dataclass(frozen=True, eq=False)
class _Precomputed:
    """A stand-in base method that returns maps computed elsewhere (for the looped UCAG)."""

    patch_maps: jax.Array  # (B * n * n, S_h, S_w)
    global_map: jax.Array  # (B, H, W)

    def __call__(self, model, variables, x, target):
        return self.patch_maps if x.shape[0] == self.patch_maps.shape[0] else self.global_map


def bench_ucag(arch: str, size: int, repeats: int) -> dict:
    """UCAG(Grad-CAM) vmapped vs a Python loop over the 37 jitted Grad-CAM calls (batch 1)."""
    model, variables, x, target = _setup(arch, 1, size)
    u = Ucag(GradCAM())
    vmapped = jax.jit(u, static_argnums=0)
    base = jax.jit(GradCAM(), static_argnums=0)
    k = u.n * u.n
    patches_fn = jax.jit(lambda xx: u.patches(xx).reshape((k,) + u.patches(xx).shape[2:]))

    @jax.jit
    def combine(patch_maps, global_map, xx):
        # Same weights, placement and post-processing as ``u``, with the base maps given.
        return dataclasses.replace(u, method=_Precomputed(patch_maps, global_map), postprocess="cam")(
            model, variables, xx, target
        )

    def looped():
        p = patches_fn(x)  # (36, S, S, 3)
        maps = [base(model, variables, p[i : i + 1], target) for i in range(k)]
        g = base(model, variables, x, target)
        return combine(jnp.concatenate(maps, 0), g, x)

    calls = {"vmapped": lambda: vmapped(model, variables, x, target), "loop": looped}
    load_before = _loadavg()
    first = {name: round(_timed(c), 3) for name, c in calls.items()}
    for c in calls.values():
        _timed(c)
    a, b = np.asarray(calls["vmapped"]()), np.asarray(calls["loop"]())
    times: dict[str, list[float]] = {name: [] for name in calls}
    ratios = []
    for _ in range(repeats):
        for name, c in calls.items():
            times[name].append(_timed(c))
        ratios.append(times["vmapped"][-1] / times["loop"][-1])
    g = u.geometry((size, size))
    row = {
        "arch": arch,
        "size": size,
        "patches": k,
        "patch_px": list(g.patch),
        "zoom_px": list(g.zoom),
        "base_calls_looped": k + 1,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "first_call_s": first,
        "vmapped_median_s": round(statistics.median(times["vmapped"]), 3),
        "loop_median_s": round(statistics.median(times["loop"]), 3),
        "vmapped_over_loop": round(statistics.median(ratios), 3),
        "vmapped_over_loop_per_repeat": [round(r, 3) for r in ratios],
        "max_abs_diff_vmapped_vs_loop": float(np.abs(a - b).max()),
        "target": "< 1 (vmapped faster)",
    }
    row["meets_target"] = row["vmapped_over_loop"] < 1.0
    return row


# ---------------------------------------------------------------------------------- 3. methods
def attribution_methods() -> list[str]:
    return [n for n in methods.names() if methods.kind(n) == "attribution" and n != "gradient"]


def is_heavy(name: str) -> bool:
    return name in HEAVY or name.startswith(HEAVY_PREFIXES)


def method_hparams(name: str, full_heavy: bool) -> dict[str, Any]:
    return {} if full_heavy else dict(HEAVY.get(name, {}))


def bench_methods(
    arch: str, batch: int, size: int, repeats: int, names: list[str], full_heavy: bool, max_call_s: float
) -> dict:
    """Every method / jitted input gradient, paired per repeat."""
    model, variables, x, target = _setup(arch, batch, size)
    grad = jax.jit(methods.get("gradient"), static_argnums=0)
    grad_call = lambda: grad(model, variables, x, target)  # noqa: E731
    load_before = _loadavg()
    g_first = _timed(grad_call)
    _timed(grad_call)
    rows: dict[str, dict] = {}
    g_times: list[float] = []
    for name in names:
        hp = method_hparams(name, full_heavy)
        fn = jax.jit(methods.get(name, **hp), static_argnums=0)
        call = lambda fn=fn: fn(model, variables, x, target)  # noqa: E731
        try:
            first = _timed(call)
            warm = _timed(call)
        except Exception as e:  # noqa: BLE001 - a benchmark reports failures and goes on
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "hparams": hp}
            print(f"  {arch} b={batch} {size}px {name}: ERROR {rows[name]['error']}", flush=True)
            continue
        reps = 1 if warm > max_call_s else repeats
        ts, rs = [], []
        for _ in range(reps):
            tg = _timed(grad_call)
            g_times.append(tg)
            t = _timed(call)
            ts.append(t)
            rs.append(t / tg)
        rows[name] = {
            "median_s": round(statistics.median(ts), 4),
            "ratio_to_gradient": round(statistics.median(rs), 3),
            "first_call_s": round(first, 3),
            "repeats": reps,
            "heavy": is_heavy(name),
            "hparams": hp,
        }
        print(
            f"  {arch} b={batch} {size}px {name}: {rows[name]['median_s']:.3f} s, "
            f"{rows[name]['ratio_to_gradient']:.2f}x gradient ({reps} rep, first call {first:.1f} s)",
            flush=True,
        )
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "gradient_first_call_s": round(g_first, 3),
        "gradient_median_s": round(statistics.median(g_times), 4) if g_times else None,
        "gradient_timings": len(g_times),
        "methods": rows,
    }


# ------------------------------------------------------------------------------------ reports
def markdown(payload: dict) -> str:
    out = [f"jax {payload['jax']} ({payload['backend']}), {payload['cpu_count']} CPUs, "
           f"load average at start {payload['loadavg_start']} (shared machine: compare ratios, not seconds)"]
    if payload.get("rise"):
        out += ["", "**RISE throughput / batched forward throughput** (target >= 0.9)", "",
                "| model | px | N | chunk | forward s/chunk | RISE s | masks s | ratio | reps |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in payload["rise"]:
            out.append(f"| {r['arch']} | {r['size']} | {r['n']} | {r['chunk']} | {r['forward_chunk_median_s']:.3f} | "
                       f"{r['rise_median_s']:.2f} | {r['mask_generation_median_s']:.3f} | "
                       f"**{r['throughput_ratio']:.2f}** | {r['repeats']} |")
    if payload.get("ucag"):
        out += ["", "**UCAG(Grad-CAM): vmapped vs Python loop of 37 base calls** (target: ratio < 1)", "",
                "| model | px | vmapped s | loop s | vmapped/loop | reps |", "|---|---|---|---|---|---|"]
        for r in payload["ucag"]:
            out.append(f"| {r['arch']} | {r['size']} | {r['vmapped_median_s']:.2f} | {r['loop_median_s']:.2f} | "
                       f"**{r['vmapped_over_loop']:.2f}** | {r['repeats']} |")
    if payload.get("methods"):
        res = payload["methods"]
        cols = [f"{r['arch']} b{r['batch']} {r['size']}px" for r in res]
        out += ["", "**Attribution method time / jitted input gradient** (median of paired repeats; "
                "reps per cell in parentheses)", "",
                "| method | hyperparameters | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        out.append("| gradient (s) | | " + " | ".join(f"{r['gradient_median_s']:.3f}" for r in res) + " |")
        names = list(dict.fromkeys(n for r in res for n in r["methods"]))
        for name in names:
            cells = []
            hp = ""
            for r in res:
                m = r["methods"].get(name)
                if m is None:
                    cells.append("-")
                elif "error" in m:  # ValueError: the method refuses this model (e.g. CAM on VGG)
                    cells.append("n/a" if m["error"].startswith("ValueError") else "error")
                else:
                    cells.append(f"{m['ratio_to_gradient']:.2f}x ({m['repeats']})")
                    if m["heavy"]:
                        hp = ", ".join(f"{k}={v}" for k, v in m["hparams"].items()) or "defaults"
            out.append(f"| {name} | {hp} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(payload, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 px (UCAG 32 px), batch 1, RISE N=100, 2 repeats")
    ap.add_argument("--sections", default="rise,ucag,methods", help="comma-separated subset of rise,ucag,methods")
    ap.add_argument("--archs", default="vgg16,resnet50")
    ap.add_argument("--batches", default=None, help="section 3 batch sizes (default 1,16; --quick: 1)")
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (default 224; --quick: 64)")
    ap.add_argument("--ucag-size", type=int, default=None, help="input side for UCAG (default: --size)")
    ap.add_argument("--rise-n", type=int, default=None, help="RISE masks N (default 4000; --quick: 200)")
    ap.add_argument("--rise-chunk", type=int, default=None, help="RISE masks per scan step (default 100; --quick: 50)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick: 2)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the attribution methods")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out of section 3")
    ap.add_argument("--full-heavy", action="store_true", help="registered defaults for the heavy methods")
    ap.add_argument("--max-call-s", type=float, default=60.0, help="time a method once if a warm call exceeds this")
    ap.add_argument("--out", default="experiments/results/bench_methods.json")
    args = ap.parse_args()

    sections = set(args.sections.split(","))
    archs = args.archs.split(",")
    size = args.size or (64 if args.quick else 224)
    ucag_size = args.ucag_size or (32 if args.quick else size)
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,16")).split(",")]
    rise_n = args.rise_n or (100 if args.quick else 4000)
    rise_chunk = args.rise_chunk or (50 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 5)
    loaded = []
    for mod in OPTIONAL_MODULES:
        try:
            importlib.import_module(mod)
            loaded.append(mod)
        except ImportError:
            pass
    names = attribution_methods()
    if args.methods:
        wanted = args.methods.split(",")
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"not registered attribution methods: {unknown}; available: {names}")
        names = wanted
    names = [n for n in names if n not in set(args.skip.split(","))]

    payload: dict[str, Any] = {
        "what": "DESIGN.md section 6: RISE/forward throughput, UCAG vmapped/loop, methods/jitted gradient",
        "quick": args.quick,
        "argv": {k: v for k, v in vars(args).items()},
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
        "note": ("shared machine (other jobs running, see loadavg_*): absolute seconds are inflated and noisy; "
                 "ratios are measured side by side in one process with interleaved repeats and are what count"),
        "imported_modules": loaded,
        "heavy_hparams": {} if args.full_heavy else HEAVY,
        "rise": [],
        "ucag": [],
        "methods": [],
    }
    out = Path(args.out)
    if "rise" in sections:
        for arch in archs:
            r = bench_rise(arch, size, rise_n, rise_chunk, repeats)
            print(json.dumps(r), flush=True)
            payload["rise"].append(r)
            _write_json(out, payload)
    if "ucag" in sections:
        for arch in archs:
            r = bench_ucag(arch, ucag_size, repeats)
            print(json.dumps(r), flush=True)
            payload["ucag"].append(r)
            _write_json(out, payload)
    if "methods" in sections:
        for arch in archs:
            for batch in batches:
                payload["methods"].append(
                    bench_methods(arch, batch, size, repeats, names, args.full_heavy, args.max_call_s)
                )
                _write_json(out, payload)
    payload["loadavg_end"] = _loadavg()
    payload["markdown"] = markdown(payload)
    _write_json(out, payload)
    print(payload["markdown"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
