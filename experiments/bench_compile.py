"""First-call cost of every method: tracing, lowering, XLA compilation, and the persistent cache.

    python experiments/bench_compile.py                      # VGG16 + ResNet50, 224 px, batch 1
    python experiments/bench_compile.py --methods rap,rsp,contrastive-rsp --archs vgg16
    python experiments/bench_compile.py --quick              # tiny models at 32 px (a test runs this)

What a user of ``xaijax explain`` on one image waits for is the method's first call:
trace (Python: the model's forward pass and the method's set-up, run abstractly) + lower
(to StableHLO) + compile (XLA) + the first execution; every later call on the same shapes
is the steady-state execution alone. For each architecture this runs two child processes
sharing one fresh persistent-compilation-cache folder (``jax_compilation_cache_dir``, every
compilation cached):

* **cold**: an empty cache (every compilation is real; each method is measured as in a
  fresh process: xaijax's shape caches and JAX's in-memory caches are cleared before it);
* **warm**: the same methods again in a new process, the cache now holding every program:
  its ``compile`` is the cache read, which is what a second ``xaijax explain`` process pays.

Each child first warms JAX up (a trivial jitted function and the model's jitted forward
pass, as ``xaijax explain`` predicts before explaining), then per method: ``jax.jit(method,
static_argnums=0).trace(...)``, ``.lower()``, ``.compile()``, the first execution and
``--repeats`` timed executions (steady state: their median). The ratio ``first call /
steady`` is the issue's measure (target <= 3). ``--cli`` (default on, off with ``--quick``)
also times whole ``xaijax explain`` processes (random weights saved to a temporary
``.safetensors``, one random PNG): the first with an empty cache folder, the second with
the cache the first wrote.

Writes JSON (``--out``, default ``experiments/results/bench_compile.json``) with the CPU
model, load averages and start/end times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, loadavg  # noqa: E402  (experiments/machine.py: one home for machine facts)
from quick_models import QUICK_MODELS  # noqa: E402  (experiments/quick_models.py: the --quick variants)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"

#: The CNN methods of the demo's default list whose one call is a few forward/backward passes.
#: Not measured by default (``--methods`` can add them): rise (4000 masks), score-cam (one
#: forward pass per channel), smoothgrad (50 noisy gradients), ucag-grad-cam (37 Grad-CAMs),
#: extremal-perturbation (runs its own loop of jitted steps): one call is many passes, so the
#: first call's compile is a small part of it.
METHODS = (
    "gradient", "gradient-x-input", "deconvnet", "guided-backprop", "integrated-gradients", "contrastive-gradient",
    "cam", "grad-cam", "grad-cam-plus-plus", "xgrad-cam", "layer-cam", "normgrad", "fullgrad", "cameras",
    "lrp-epsilon", "lrp-epsilon-plus", "lrp-epsilon-plus-flat", "lrp-epsilon-gamma-box", "lrp-alpha1-beta0",
    "lrp-alpha2-beta1", "lrp-zplus-nobias-samplebox", "clrp", "sglrp", "excitation-backprop",
    "contrastive-excitation-backprop", "rap", "rsp", "contrastive-rsp",
)
QUICK_METHODS = ("gradient", "grad-cam", "rsp")
CLI_METHODS = ("gradient", "rsp")
#: Methods whose rows stay in the JSON but not in the summary, and why.
NOT_SUMMARISED = {"center": "no model pass (a fixed centred Gaussian): its steady call is microseconds, its ratio meaningless"}
TARGET_RATIO = 3.0


# ------------------------------------------------------------------------------------ child
def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: every method on one architecture, with the persistent cache at ``args.cache``."""
    import jax

    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jax.numpy as jnp

    from xaijax import methods, models
    from xaijax.models import taps
    from xaijax.propagation import engine

    entries_before = _cache_entries(args.cache)
    t0 = time.perf_counter()
    model = models.get(args.arch, **(QUICK_MODELS[args.arch] if args.quick else {}))
    variables = models.random_variables(model, (1, args.size, args.size, 3))
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.ones(3)))
    logits = jax.block_until_ready(jax.jit(model.apply)(variables, x))
    warmup_s = time.perf_counter() - t0
    target = jnp.asarray(jnp.argmax(logits, -1), jnp.int32)
    rows = []
    for name in args.methods.split(","):
        taps._SUMMARIES.clear()  # as in a fresh process: no shape summary, no propagation plan,
        engine._cached_graph.cache_clear()  # no traced or compiled program in memory
        jax.clear_caches()
        fn = jax.jit(methods.get(name), static_argnums=0)
        row: dict[str, Any] = {"method": name}
        try:
            a = time.perf_counter()
            traced = fn.trace(model, variables, x, target)
            b = time.perf_counter()
            lowered = traced.lower()
            c = time.perf_counter()
            compiled = lowered.compile()
            d = time.perf_counter()
            jax.block_until_ready(compiled(variables, x, target))
            e = time.perf_counter()
            steady = []
            for _ in range(args.repeats):
                s = time.perf_counter()
                jax.block_until_ready(compiled(variables, x, target))
                steady.append(time.perf_counter() - s)
        except Exception as err:  # noqa: BLE001 - a method that cannot run here is a row, not a crash
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            print(f"  {args.arch} {args.mode} {name}: {row['error']}", flush=True)
            continue
        first = e - a
        st = statistics.median(steady)
        row.update(
            trace_s=round(b - a, 6), lower_s=round(c - b, 6), compile_s=round(d - c, 6),
            first_execution_s=round(e - d, 6), first_call_s=round(first, 6), steady_s=round(st, 6),
            steady_all_s=[round(v, 6) for v in steady], ratio=round(first / st, 2),
            stablehlo_chars=len(lowered.as_text()),
        )
        rows.append(row)
        print(f"  {args.arch} {args.mode} {name}: trace {b - a:.2f} lower {c - b:.2f} compile {d - c:.2f} "
              f"first exec {e - d:.2f} | first call {first:.2f} s, steady {st:.3f} s: {first / st:.1f}x", flush=True)
    return {"arch": args.arch, "mode": args.mode, "setup_s": round(setup_s, 3), "warmup_s": round(warmup_s, 3),
            "cache_entries_before": entries_before, "cache_entries_after": _cache_entries(args.cache), "rows": rows}


def _cache_entries(folder: str) -> int:
    """Programs in the persistent cache folder (a warm run that adds none read every program from it)."""
    p = Path(folder)
    return sum(1 for f in p.iterdir() if f.name.endswith("-cache")) if p.is_dir() else 0


# ----------------------------------------------------------------------------------- parent
def _run_child(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", "--child-out", out, *argv], env=env,
                              stdout=None, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return {"error": f"child exited with {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _cli_runs(arch: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> list[dict[str, Any]]:
    """Wall time of ``xaijax explain`` processes: empty cache folder, then the folder it wrote."""
    import numpy as np
    from PIL import Image

    from xaijax import checkpoints, models

    kwargs = QUICK_MODELS[arch] if args.quick else {}
    model = models.get(arch, **kwargs)
    weights = work / f"{arch}.safetensors"
    checkpoints.save_variables(weights, models.random_variables(model, (1, args.size, args.size, 3)),
                               {"arch": arch, "model_kwargs": json.dumps(kwargs)})
    image = work / "image.png"
    Image.fromarray((np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)).save(image)
    out = []
    extra = ["--size", str(args.size)]
    for method in args.cli_methods.split(","):
        cache = work / f"cli-cache-{arch}-{method}"
        row: dict[str, Any] = {"arch": arch, "method": method}
        for mode in ("cold", "warm"):
            cmd = [sys.executable, "-m", "xaijax.cli", "explain", "--weights", str(weights), "--arch", arch,
                   "--method", method, "--out", str(work / "out"), *extra, str(image)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env={**env, "XAIJAX_JAX_CACHE": str(cache)}, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                row[f"{mode}_error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                break
            row[f"{mode}_process_s"] = round(wall, 3)
        print(f"  xaijax explain {arch} {method}: {row}", flush=True)
        out.append(row)
    weights.unlink(missing_ok=True)
    return out


def _import_process_s(env: dict[str, str]) -> float:
    """Wall time of a process that only imports xaijax's CLI (the floor under every CLI run)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import xaijax.cli"], env=env, check=True)
    return round(time.perf_counter() - t0, 3)


def summarise(payload: dict[str, Any]) -> dict[str, Any]:
    """Per architecture and mode: methods meeting the target, the worst ratio, the medians."""
    out: dict[str, Any] = {}
    for run in payload["runs"]:
        rows = [r for r in run.get("rows", []) if "ratio" in r and r["method"] not in NOT_SUMMARISED]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["ratio"])
        out[f"{run['arch']}/{run['mode']}"] = {
            "methods": len(rows),
            "meet_target": sum(r["ratio"] <= payload["target_ratio"] for r in rows),
            "median_ratio": round(statistics.median(r["ratio"] for r in rows), 2),
            "worst": {"method": worst["method"], "ratio": worst["ratio"]},
            "median_first_call_s": round(statistics.median(r["first_call_s"] for r in rows), 3),
            "median_compile_s": round(statistics.median(r["compile_s"] for r in rows), 3),
            "median_trace_s": round(statistics.median(r["trace_s"] for r in rows), 3),
            "trace_share_of_first_call": round(sum(r["trace_s"] for r in rows) / sum(r["first_call_s"] for r in rows), 3),
            "compile_share_of_first_call": round(sum(r["compile_s"] for r in rows) / sum(r["first_call_s"] for r in rows), 3),
        }
    excluded = sorted({r["method"] for run in payload["runs"] for r in run.get("rows", []) if r["method"] in NOT_SUMMARISED})
    if excluded:
        out["not_summarised"] = {m: NOT_SUMMARISED[m] for m in excluded}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="vgg16,resnet50")
    p.add_argument("--methods", default=None, help=f"comma-separated (default: {len(METHODS)} methods, see METHODS)")
    p.add_argument("--size", type=int, default=None, help="input side (default 224; 32 with --quick)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="steady-state calls per method (default 3; 2 with --quick)")
    p.add_argument("--cli", dest="cli", action="store_true", default=None, help="also time `xaijax explain` processes (default unless --quick)")
    p.add_argument("--no-cli", dest="cli", action="store_false")
    p.add_argument("--cli-methods", default=",".join(CLI_METHODS))
    p.add_argument("--quick", action="store_true", help="tiny models at 32 px, 3 methods, no CLI runs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resummarise", type=Path, default=None, metavar="JSON",
                   help="recompute the summary of an existing result file in place (no measurement)")
    # internal: one child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.quick else 224)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.methods = args.methods or ",".join(QUICK_METHODS if args.quick else METHODS)
    if args.child:
        Path(args.child_out).write_text(json.dumps(_child(args)))
        return None
    if args.resummarise is not None:
        from xaijax.atomic import atomic_text

        payload = json.loads(args.resummarise.read_text())
        payload["summary"] = summarise(payload)
        atomic_text(args.resummarise, json.dumps(payload, indent=1) + "\n")
        print(json.dumps(payload["summary"], indent=1))
        return payload
    if args.cli is None:
        args.cli = not args.quick
    out_path = args.out or RESULTS / ("bench_compile_quick.json" if args.quick else "bench_compile.json")

    import jax

    from xaijax.atomic import atomic_text

    env = {k: v for k, v in os.environ.items() if k != "XAIJAX_JAX_CACHE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    payload: dict[str, Any] = {
        "what": "first call (trace + lower + compile + first execution) vs steady-state call per method, cold and "
                "with a warm persistent compilation cache; `xaijax explain` process wall times",
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick, "size": args.size, "batch": args.batch, "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": loadavg(), "runs": [],
    }
    payload["import_xaijax_cli_process_s"] = _import_process_s(env)
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as tmp:
        work = Path(tmp)
        for arch in args.archs.split(","):
            cache = work / f"cache-{arch}"
            for mode in ("cold", "warm"):
                print(f"{arch}: {mode} ({'empty cache' if mode == 'cold' else 'the cache the cold run wrote'})", flush=True)
                load_before = loadavg()
                child = _run_child(["--arch", arch, "--mode", mode, "--cache", str(cache), "--methods", args.methods,
                                    "--size", str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats),
                                    *(["--quick"] if args.quick else [])], env)
                child.setdefault("arch", arch)
                child.setdefault("mode", mode)
                child["loadavg_before"], child["loadavg_after"] = load_before, loadavg()
                payload["runs"].append(child)
            if args.cli:
                payload.setdefault("cli", []).extend(_cli_runs(arch, args, env, work))
    payload["summary"] = summarise(payload)
    payload["loadavg_end"] = loadavg()
    payload["ended_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out_path, json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["summary"], indent=1))
    print(f"wrote {out_path}")
    return payload


if __name__ == "__main__":
    main()
