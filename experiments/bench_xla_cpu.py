"""Which XLA:CPU backend settings (``XLA_FLAGS``) make xaijax faster on this CPU, and stay exact?

    python experiments/bench_xla_cpu.py                      # core settings, VGG16 + ResNet50, 224 px, batch 1 and 16
    python experiments/bench_xla_cpu.py --settings all       # every setting of SETTINGS
    python experiments/bench_xla_cpu.py --quick              # tiny models, 32 px, 3 settings (< 1 min)
    python experiments/bench_xla_cpu.py --list               # the settings, their flags and what they do

jaxlib ships oneDNN, XNNPACK and YNNPACK paths and a handful of code-generation switches behind
``XLA_FLAGS``, which XLA reads once, when the CPU backend initialises. So every setting runs in its
own child process (this file with ``--child``, ``XLA_FLAGS`` set in its environment; the caller's
own ``XLA_FLAGS`` are not inherited unless ``--keep-env-flags``). A setting XLA refuses (the child
dies with "Unknown flag in XLA_FLAGS", a rejected enum value, or any other crash) is recorded as
refused with the last line of its stderr; the run goes on.

Each child, in one process, for VGG16 and ResNet50 (``xaijax.models.get``, random variables with a
fixed seed) at ``--size`` and each ``--batch``: the forward pass (``jax.jit(model.apply)``), the
input gradient (``methods.get("gradient")``) and one rule method (``--rule``, default ``rsp``), each
jitted once; the first call is the warm-up, its wall time recorded as the compile time (trace +
compile + one run), then the median wall time of ``--repeats`` calls (``block_until_ready``). float32 always; float64 (``jax_enable_x64``, variables and
input cast) at batch 1 for the agreement check (timed too, as information only).

Each child stores its outputs in an npz in a folder the parent gives; the parent compares every
setting's outputs with the default setting's: max abs error and relative error = max abs error /
max |default output| per array, float32 and float64 separately.

Decision (thresholds in the JSON): a setting *wins* if its median speed-up over the float32
(arch, batch, what) rows (speed-up = default time / setting time) is >= ``WIN_SPEEDUP`` (1.10)
AND its float64 outputs agree with the default's to ``F64_RTOL`` (1e-10) relative AND its float32
outputs to ``F32_RTOL`` (1e-4). The best winner is the one with the largest median speed-up; if
none wins, the JSON gives each setting's geometric-mean speed-up and its worst row.

Writes ``experiments/results/bench_xla_cpu.json`` (``--out``) and a markdown table next to it
(``.md``), atomically. See ``docs/xla_cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import cpu_model, loadavg  # noqa: E402  (one home for the machine facts)
from quick_models import QUICK_MODELS  # noqa: E402  (experiments/quick_models.py: the --quick variants)

ARCHS = ("vgg16", "resnet50")
WHATS = ("forward", "gradient", "rule")
WIN_SPEEDUP = 1.10  # median speed-up over the float32 rows a setting needs to win
F64_RTOL = 1e-10  # float64 agreement with the default path a winner needs (relative, see module doc)
F32_RTOL = 1e-4  # float32 agreement with the default path a winner needs
REFUSED_MARKERS = ("Unknown flag in XLA_FLAGS", "Illegal value", "Failed to parse", "Unknown enum")


@dataclass(frozen=True)
class Setting:
    name: str
    flags: str  # the XLA_FLAGS value ("" = XLA's defaults)
    what: str  # one line: what it changes
    core: bool = False  # part of the default (time-bounded) run


_ONEDNN = "--xla_cpu_use_onednn=true"
# One list of every candidate. Values come from XLA's flag definitions (xla/debug_options_flags.cc,
# xla/xla.proto) and were checked against this jaxlib: the fusion-type flags take a comma list of
# dot, eltwise, reduce, individual_dot, individual_convolution (LibraryFusionType without its
# LIBRARY_FUSION_TYPE_ prefix); an unknown value is refused like an unknown flag.
SETTINGS: tuple[Setting, ...] = (
    Setting("default", "", "XLA's own defaults (Eigen convolutions, XNNPACK on where XLA chooses)", core=True),
    Setting("onednn", _ONEDNN, "oneDNN thunks for matmul / convolution fusions (no fusion types: the library rewriter stays off)"),
    Setting("onednn_dot", f"{_ONEDNN} --xla_cpu_experimental_onednn_fusion_type=dot",
            "oneDNN library fusions around dots"),
    Setting("onednn_dot_eltwise_reduce", f"{_ONEDNN} --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
            "oneDNN library fusions: dots plus element-wise and reduce ops"),
    Setting("onednn_custom_call", "--xla_cpu_experimental_onednn_custom_call=true",
            "oneDNN custom calls for matmul / convolution (the older oneDNN rewriter)", core=True),
    Setting("onednn_custom_call_dot", f"--xla_cpu_experimental_onednn_custom_call=true {_ONEDNN} "
            "--xla_cpu_experimental_onednn_fusion_type=dot", "oneDNN custom calls with oneDNN-graph dot fusions"),
    Setting("no_xnnpack", "--xla_cpu_use_xnnpack=false", "XNNPACK off: every dot / convolution through Eigen"),
    Setting("xnn_dot", "--xla_cpu_experimental_xnn_fusion_type=dot", "XNNPACK library fusions around dots"),
    Setting("xnn_dot_eltwise_reduce", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
            "XNNPACK library fusions: dots, element-wise and reduce ops"),
    Setting("xnn_graph_greedy", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
            "XnnGraphFusion pass: greedy XNNPACK subgraphs from the roots", core=True),
    Setting("xnn_dot_graph_greedy", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce "
            "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
            "XNNPACK library fusions plus the greedy graph fusion pass"),
    Setting("ynn_conv", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
            "YNNPACK for individual convolutions", core=True),
    Setting("ynn_dot_conv", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",
            "YNNPACK for individual dots and convolutions"),
    Setting("ynn_all", "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,dot,eltwise,reduce",
            "YNNPACK for individual dots / convolutions and dot, element-wise, reduce fusions"),
    Setting("thunk_runtime_off", "--xla_cpu_use_thunk_runtime=false",
            "the pre-thunk runtime (deprecated in this jaxlib: XLA warns and ignores it)"),
    Setting("single_thread_eigen", "--xla_cpu_multi_thread_eigen=false", "Eigen calls single-threaded"),
    Setting("fast_math", "--xla_cpu_enable_fast_math=true", "LLVM fast-math (reassociation, approximate functions)", core=True),
    Setting("vector_width_512", "--xla_cpu_prefer_vector_width=512", "LLVM codegen prefers 512-bit vectors (default 256)"),
    Setting("isa_avx2", "--xla_cpu_max_isa=AVX2", "LLVM codegen limited to AVX2 (no AVX-512 / AMX)"),
    Setting("strict_dot_conv_math", "--xla_cpu_strict_dot_conv_math=true",
            "fp16 dots / convolutions stay fp16 instead of running in fp32: no effect on float32/float64 (a control)"),
    Setting("opt_level_1", "--xla_backend_optimization_level=1", "LLVM backend at -O1 (default 3): faster compiles"),
    Setting("made_up_flag", "--xla_cpu_no_such_flag_for_bench=true", "a flag XLA does not know: must be recorded as refused"),
    Setting("ynn_bad_value", "--xla_cpu_experimental_ynn_fusion_type=convolution",
            "a fusion kind XLA does not know (it is individual_convolution): refused when XLA parses its flags"),
)
REFUSAL_PROBES = ("made_up_flag", "ynn_bad_value")  # cheap (~2 s): part of every default run
QUICK_SETTINGS = ("default", "onednn_dot", "made_up_flag")


def setting_by_name() -> dict[str, Setting]:
    return {s.name: s for s in SETTINGS}


def _utc(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if t is None else t, _dt.timezone.utc).isoformat(timespec="seconds")


def _key(arch: str, batch: int, what: str, dtype: str) -> str:
    return f"{arch}|{batch}|{what}|{dtype}"


# ------------------------------------------------------------------------------ child
def run_child(args: argparse.Namespace) -> None:
    """Time every (arch, batch, what) row under this process's XLA_FLAGS; outputs -> npz, times -> JSON."""
    import jax
    import jax.numpy as jnp

    from xaijax import methods, models
    from xaijax.atomic import atomic_text

    jax.config.update("jax_platforms", "cpu")
    started = time.time()
    device = str(jax.devices()[0])  # backend initialisation: an unknown flag kills the process here
    rows: list[dict[str, Any]] = []
    outputs: dict[str, np.ndarray] = {}
    method_names = {"gradient": "gradient", "rule": args.rule}

    def timed(fn, *call_args) -> tuple[float, float, Any]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*call_args))  # the warm-up call: trace + compile + first run
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*call_args))
            times.append(time.perf_counter() - t0)
        return compile_s, statistics.median(times), out

    def run(dtype: str, batches: list[int]) -> None:
        for arch in ARCHS:
            kwargs = QUICK_MODELS[arch] if args.quick else {}
            model = models.get(arch, **kwargs)
            classes = int(kwargs.get("num_classes", 1000))
            variables = models.random_variables(model, (1, args.size, args.size, 3), seed=0)
            if dtype == "float64":
                variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
            fns = {"forward": jax.jit(model.apply)}
            for what, name in method_names.items():
                fns[what] = jax.jit(methods.get(name), static_argnums=0)
            for batch in batches:
                x = np.random.default_rng(1).standard_normal((batch, args.size, args.size, 3))
                x = jnp.asarray(x, jnp.float64 if dtype == "float64" else jnp.float32)
                target = jnp.asarray(np.arange(batch) % classes, jnp.int32)
                for what in WHATS:
                    call = (variables, x) if what == "forward" else (model, variables, x, target)
                    compile_s, median_s, out = timed(fns[what], *call)
                    out = np.asarray(out)
                    if out.dtype != np.dtype(dtype):
                        raise TypeError(f"{arch} {what} {dtype}: output came back as {out.dtype}")
                    outputs[_key(arch, batch, what, dtype)] = out
                    rows.append(dict(arch=arch, batch=batch, what=what, method="apply" if what == "forward" else method_names[what],
                                     dtype=dtype, compile_s=round(compile_s, 4), median_s=median_s))
                    print(f"  [{args.setting}] {arch} b{batch} {what} {dtype}: {median_s * 1e3:.1f} ms (compile {compile_s:.1f} s)",
                          file=sys.stderr, flush=True)

    run("float32", args.batch)
    jax.config.update("jax_enable_x64", True)
    run("float64", [1])
    np.savez(Path(args.child_dir) / f"{args.setting}.npz", **outputs)
    atomic_text(Path(args.child_dir) / f"{args.setting}.json", json.dumps(dict(
        setting=args.setting, xla_flags=os.environ.get("XLA_FLAGS", ""), device=device, rows=rows,
        wall_s=round(time.time() - started, 2)), indent=1))


# ------------------------------------------------------------------------------ profile child
PROFILE_FLAGS = "--xla_cpu_enable_xprof_traceme=true"  # XLA emits one trace event per HLO operation
OP_CLASSES = (  # (class, name prefixes of the operations XLA:CPU runs), first match wins
    ("convolution", ("ynn_fusion", "xnn_fusion", "onednn", "convolution", "conv_general_dilated")),
    ("dot (classifier)", ("dot",)),
    ("transpose / copy / reverse", ("transpose", "copy", "reverse", "wrapped_transpose", "wrapped_reverse", "wrapped_copy")),
    ("other fusions", ("",)),
)


def op_class(name: str) -> str:
    for cls, prefixes in OP_CLASSES:
        if any(name.startswith(p) for p in prefixes):
            return cls
    return "other fusions"


def run_profile_child(args: argparse.Namespace) -> None:
    """Trace ``--profile-calls`` input-gradient calls per arch (batch ``--profile-batch``) and sum the per-operation events.

    XLA:CPU with ``--xla_cpu_enable_xprof_traceme`` records an event per HLO operation on the thread
    that ran it; summing their durations over all threads gives CPU time per operation class (with
    2 threads, up to 2x the wall time). Convolutions run as YNNPACK fusions (``ynn_fusion``) in this
    jaxlib's default path.
    """
    from collections import Counter

    import jax
    import jax.numpy as jnp

    from xaijax import methods, models
    from xaijax.atomic import atomic_text

    jax.config.update("jax_platforms", "cpu")
    b = args.profile_batch
    result: dict[str, Any] = dict(xla_flags=os.environ.get("XLA_FLAGS", ""), size=args.size, batch=b, method="gradient",
                                  calls=args.profile_calls, archs={})
    for arch in ARCHS:
        kwargs = QUICK_MODELS[arch] if args.quick else {}
        model = models.get(arch, **kwargs)
        variables = models.random_variables(model, (1, args.size, args.size, 3), seed=0)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((b, args.size, args.size, 3)), jnp.float32)
        target = jnp.zeros((b,), jnp.int32)
        fn = jax.jit(methods.get("gradient"), static_argnums=0)
        jax.block_until_ready(fn(model, variables, x, target))
        trace_dir = Path(args.child_dir) / f"trace_{arch}"
        t0 = time.perf_counter()
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(args.profile_calls):
                jax.block_until_ready(fn(model, variables, x, target))
        wall = (time.perf_counter() - t0) / args.profile_calls
        per_op: Counter = Counter()
        for pb in trace_dir.rglob("*.xplane.pb"):
            for plane in jax.profiler.ProfileData.from_file(str(pb)).planes:
                for line in plane.lines:
                    if line.name == "python":
                        continue
                    for ev in line.events:
                        if not ev.name.startswith(("ThunkExecutor", "$")):
                            per_op[ev.name] += ev.duration_ns
        classes: Counter = Counter()
        for name, ns in per_op.items():
            classes[op_class(name)] += ns
        total = sum(classes.values()) or 1
        result["archs"][arch] = dict(
            wall_s_per_call=wall, op_cpu_s_per_call=total / 1e9 / args.profile_calls,
            share={cls: classes[cls] / total for cls, _ in OP_CLASSES},
            top_ops=[dict(op=n, cpu_s_per_call=ns / 1e9 / args.profile_calls) for n, ns in per_op.most_common(12)])
        print(f"  [profile] {arch}: " + ", ".join(f"{c} {v:.0%}" for c, v in result["archs"][arch]["share"].items()), file=sys.stderr, flush=True)
    atomic_text(Path(args.child_dir) / "profile.json", json.dumps(result, indent=1))


def _profile(args: argparse.Namespace, child_dir: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = PROFILE_FLAGS
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-child", "--child-dir", child_dir, "--size", str(args.size),
           "--profile-calls", str(args.profile_calls), "--profile-batch", str(args.profile_batch)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    result = Path(child_dir) / "profile.json"
    if proc.returncode != 0 or not result.exists():
        return dict(status="failed", reason=_last_line(proc.stderr))
    return dict(status="ok", **json.loads(result.read_text()))


# ------------------------------------------------------------------------------ parent
def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in REFUSED_MARKERS:  # XLA's own reason, where it gave one, over a trailing stack dump
        for ln in reversed(lines):
            if marker in ln:
                return ln
    return lines[-1] if lines else ""


def _spawn(setting: Setting, args: argparse.Namespace, child_dir: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {setting.flags}".strip() if args.keep_env_flags and env.get("XLA_FLAGS") else setting.flags
    if not env["XLA_FLAGS"]:
        env.pop("XLA_FLAGS")
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--setting", setting.name, "--child-dir", child_dir,
           "--size", str(args.size), "--batch", ",".join(map(str, args.batch)), "--repeats", str(args.repeats), "--rule", args.rule]
    if args.quick:
        cmd.append("--quick")
    rec: dict[str, Any] = dict(name=setting.name, flags=env.get("XLA_FLAGS", ""), what=setting.what,
                               loadavg_before=loadavg(), started_at=_utc())
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or "") + f"\ntimed out after {args.child_timeout} s"
    rec.update(wall_s=round(time.time() - t0, 2), loadavg_after=loadavg(), returncode=rc)
    result = Path(child_dir) / f"{setting.name}.json"
    if rc == 0 and result.exists():
        child = json.loads(result.read_text())
        rec.update(status="ok", device=child["device"], rows=child["rows"])
    else:
        rec.update(status="refused", reason=_last_line(stderr) or f"exit status {rc}")
    return rec


def _errors(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        return math.inf, math.inf
    diff = float(np.abs(out - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


def agreement(ref_npz: Path, npz: Path) -> dict[str, dict[str, Any]]:
    """Per output and per dtype: max abs and relative error of ``npz`` against ``ref_npz``."""
    with np.load(ref_npz) as ref, np.load(npz) as got:
        per_key = {k: _errors(ref[k], got[k]) if k in got.files else (math.inf, math.inf) for k in ref.files}
    summary: dict[str, dict[str, Any]] = {}
    for dtype in ("float32", "float64"):
        keys = [k for k in per_key if k.endswith("|" + dtype)]
        summary[dtype] = dict(
            max_abs=max((per_key[k][0] for k in keys), default=math.nan),
            max_rel=max((per_key[k][1] for k in keys), default=math.nan),
            per_output={k.rsplit("|", 1)[0]: dict(max_abs=per_key[k][0], rel=per_key[k][1]) for k in keys})
    return summary


def speed(rec: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups (default time / setting time) per float32 row, their median and geometric mean, the worst row."""
    base = {(r["arch"], r["batch"], r["what"]): r["median_s"] for r in default["rows"] if r["dtype"] == "float32"}
    ratios = []
    for r in rec["rows"]:
        k = (r["arch"], r["batch"], r["what"])
        if r["dtype"] == "float32" and k in base:
            r["speedup"] = base[k] / r["median_s"]
            ratios.append((r["speedup"], k))
        elif r["dtype"] == "float64":
            b64 = next((d["median_s"] for d in default["rows"] if d["dtype"] == "float64" and (d["arch"], d["batch"], d["what"]) == k), None)
            r["speedup"] = b64 / r["median_s"] if b64 else None
    values = [v for v, _ in ratios]
    worst = min(ratios) if ratios else (math.nan, None)
    return dict(median_speedup=statistics.median(values) if values else math.nan,
                geomean_speedup=math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan,
                worst_row=dict(arch=worst[1][0], batch=worst[1][1], what=worst[1][2], speedup=worst[0]) if worst[1] else None)


def decide(settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The decision rule of the module docstring, from the settings' speed and agreement records."""
    candidates = []
    for s in settings:
        if s["name"] == "default" or s["status"] != "ok":
            continue
        fast = s["median_speedup"] >= WIN_SPEEDUP
        exact = s["agreement"]["float64"]["max_rel"] <= F64_RTOL and s["agreement"]["float32"]["max_rel"] <= F32_RTOL
        s["wins"] = bool(fast and exact)
        candidates.append(s)
    winners = sorted((s for s in candidates if s["wins"]), key=lambda s: -s["median_speedup"])
    if winners:
        best = winners[0]
        return dict(verdict="wins", best=best["name"], flags=best["flags"], median_speedup=best["median_speedup"],
                    winners=[s["name"] for s in winners])
    return dict(verdict="none wins", best=None, losers={
        s["name"]: dict(median_speedup=s["median_speedup"], geomean_speedup=s["geomean_speedup"], worst_row=s["worst_row"],
                        f32_max_rel=s["agreement"]["float32"]["max_rel"], f64_max_rel=s["agreement"]["float64"]["max_rel"])
        for s in candidates})


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("jax", "jaxlib", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    m, d = report["machine"], report["decision"]
    lines = [f"# XLA:CPU settings benchmark ({report['started_at']})", "",
             f"CPU: {m['cpu_model']}, {m['cpu_count']} cores; jax {m['versions']['jax']}, jaxlib {m['versions']['jaxlib']}; "
             f"size {report['config']['size']} px, batches {report['config']['batch']}, rule `{report['config']['rule']}`, "
             f"{report['config']['repeats']} repeats{' (quick)' if report['config']['quick'] else ''}"
             + (f"; {report['config']['parallel']} children at once: times NOT comparable" if report['config']['parallel'] > 1 else "") + ".", "",
             f"Thresholds: win = median speed-up >= {WIN_SPEEDUP} over the float32 rows, float64 rel. error <= {F64_RTOL:g}, "
             f"float32 rel. error <= {F32_RTOL:g} (vs the default setting).", "",
             "**Decision:** " + (f"`{d['best']}` wins (`{d['flags']}`, median speed-up {d['median_speedup']:.3f})" if d["best"]
                                 else "none wins"), "",
             "## Summary", "",
             "| setting | status | median speed-up | geo-mean | worst row | f32 max rel | f64 max rel | wins | child s | load before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["settings"]:
        load = f"{s.get('loadavg_before')} -> {s.get('loadavg_after')}"
        if s["status"] != "ok":
            lines.append(f"| {s['name']} | refused: {s['reason'][:160]} | | | | | | | {s['wall_s']} | {load} |")
            continue
        w = s.get("worst_row")
        worst = f"{w['arch']} b{w['batch']} {w['what']} {w['speedup']:.3f}" if w else "-"
        lines.append(f"| {s['name']} | ok | {_fmt(s['median_speedup'])} | {_fmt(s['geomean_speedup'])} | {worst} | "
                     f"{_fmt(s['agreement']['float32']['max_rel'])} | {_fmt(s['agreement']['float64']['max_rel'])} | "
                     f"{'yes' if s.get('wins') else '-'} | {s['wall_s']} | {load} |")
    prof = report.get("profile")
    if prof and prof.get("status") == "ok":
        lines += ["", f"## Where the default path's time goes (input gradient, batch {prof.get('batch', 1)}, {prof['size']} px, `{prof['xla_flags']}`)", "",
                  "CPU time of XLA's per-operation trace events, summed over threads, per class of operation.", "",
                  "| arch | wall s / call | op CPU s / call | " + " | ".join(c for c, _ in OP_CLASSES) + " | top operations |",
                  "|---|---|---|" + "---|" * len(OP_CLASSES) + "---|"]
        for arch, a in prof["archs"].items():
            top = ", ".join(f"{t['op']} {t['cpu_s_per_call'] * 1e3:.1f} ms" for t in a["top_ops"][:5])
            lines.append(f"| {arch} | {a['wall_s_per_call']:.3f} | {a['op_cpu_s_per_call']:.3f} | "
                         + " | ".join(f"{a['share'][c]:.0%}" for c, _ in OP_CLASSES) + f" | {top} |")
    elif prof:
        lines += ["", f"Profile of the default path failed: {prof.get('reason')}"]
    lines += ["", "## Flags", "", "| setting | XLA_FLAGS | what it does |", "|---|---|---|"]
    lines += [f"| {s['name']} | `{s['flags']}` | {s['what']} |" for s in report["settings"]]
    for s in report["settings"]:
        if s["status"] != "ok":
            continue
        lines += ["", f"## {s['name']}", "", "| arch | batch | what | dtype | median ms | compile s | speed-up | max abs err | rel err |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            err = s["agreement"][r["dtype"]]["per_output"].get(f"{r['arch']}|{r['batch']}|{r['what']}", {})
            lines.append(f"| {r['arch']} | {r['batch']} | {r['what']} | {r['dtype']} | {r['median_s'] * 1e3:.2f} | {r['compile_s']:.2f} | "
                         f"{_fmt(r.get('speedup'))} | {_fmt(err.get('max_abs'))} | {_fmt(err.get('rel'))} |")
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """JSON without NaN / Infinity (strict parsers refuse them): non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    from xaijax.atomic import atomic_text

    by_name = setting_by_name()
    if args.settings:
        names = list(args.settings)
    elif args.quick:
        names = list(QUICK_SETTINGS)
    else:
        names = [s.name for s in SETTINGS if s.core] + list(REFUSAL_PROBES)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--settings: unknown setting(s) {unknown}; see --list")
    if "default" in names:
        names.remove("default")
    names.insert(0, "default")  # the reference runs first
    started = time.time()
    machine = dict(cpu_model=cpu_model(), cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                   versions=_versions(), loadavg_start=loadavg(), caller_xla_flags=os.environ.get("XLA_FLAGS"),
                   keep_env_flags=args.keep_env_flags)
    with tempfile.TemporaryDirectory(prefix="bench_xla_cpu_") as child_dir:
        def one(i: int, name: str) -> dict[str, Any]:
            rec = _spawn(by_name[name], args, child_dir)
            msg = "ok" if rec["status"] == "ok" else f"REFUSED: {rec['reason'][:120]}"
            print(f"[{i + 1}/{len(names)}] {name}: {msg} ({rec['wall_s']:.1f} s, load {rec['loadavg_after']})", flush=True)
            return rec

        if args.parallel > 1:  # smoke tests only: children compete for the cores, so the times are not comparable
            with ThreadPoolExecutor(args.parallel) as pool:
                records = list(pool.map(one, range(len(names)), names))
        else:
            records = [one(i, name) for i, name in enumerate(names)]
        profile = _profile(args, child_dir) if args.profile else None
        if profile:
            print(f"profile of the default path: {profile['status']}", flush=True)
        default = records[0]
        if default["status"] != "ok":
            raise SystemExit(f"the default setting failed: {default.get('reason')}")
        ref = Path(child_dir) / "default.npz"
        for rec in records:
            if rec["status"] == "ok":
                rec["agreement"] = agreement(ref, Path(child_dir) / f"{rec['name']}.npz")
                rec.update(speed(rec, default))
    decision = decide(records)
    machine["loadavg_end"] = loadavg()
    report = dict(
        benchmark="bench_xla_cpu", started_at=_utc(started), ended_at=_utc(), wall_s=round(time.time() - started, 1),
        machine=machine,
        config=dict(size=args.size, batch=args.batch, repeats=args.repeats, rule=args.rule, quick=args.quick, parallel=args.parallel,
                    archs=list(ARCHS), whats=list(WHATS), quick_models=QUICK_MODELS if args.quick else None),
        thresholds=dict(win_speedup=WIN_SPEEDUP, f64_rtol=F64_RTOL, f32_rtol=F32_RTOL,
                        speedup="default median time / setting median time, float32 rows",
                        rel_error="max |setting - default| / max |default| per output array; the max over arrays"),
        settings=records, decision=decision, profile=profile)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out, json.dumps(_finite(report), indent=1) + "\n")
    atomic_text(out.with_suffix(".md"), markdown(report))
    print(f"decision: {decision['verdict']}" + (f" -> {decision['best']}" if decision["best"] else "") + f"; wrote {out}", flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=None, help="image side (default 224; 32 with --quick)")
    p.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=None, help="batch sizes, comma list (default 1,16; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row after the warm-up (default 3; 2 with --quick)")
    p.add_argument("--rule", default="rsp", help="the rule method timed next to the gradient (registry name)")
    p.add_argument("--settings", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="comma list of setting names, or 'all' (default: the core settings; --quick: " + ",".join(QUICK_SETTINGS) + ")")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--quick", action="store_true", help="tiny models, 32 px, batch 1, 2 repeats, 3 settings")
    p.add_argument("--keep-env-flags", action="store_true", help="prepend the caller's XLA_FLAGS to every setting's flags")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a child is killed (recorded as refused)")
    p.add_argument("--parallel", type=int, default=1,
                   help="children at once (default 1; > 1 only for smoke tests: the times are then not comparable)")
    p.add_argument("--out", default=str(HERE / "results" / "bench_xla_cpu.json"))
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="also trace the default path's input gradient per operation (default: on, off with --quick)")
    p.add_argument("--profile-calls", type=int, default=3, help="gradient calls traced per arch by --profile")
    p.add_argument("--profile-batch", type=int, default=1, help="batch size of the traced gradient calls (default 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.quick else 224)
    args.batch = args.batch or ([1] if args.quick else [1, 16])
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.profile = (not args.quick) if args.profile is None else args.profile
    if args.settings == ["all"]:
        args.settings = [s.name for s in SETTINGS]
    if min(args.batch) < 1 or args.size < 8 or args.repeats < 1 or args.parallel < 1:
        p.error("--batch entries, --repeats and --parallel must be >= 1, --size >= 8")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.list:
        for s in SETTINGS:
            print(f"{s.name:28s} {'core' if s.core else '    '}  {s.flags or '(none)'}\n{'':34s}{s.what}")
        return None
    if args.child:
        run_child(args)
        return None
    if args.profile_child:
        run_profile_child(args)
        return None
    return run_parent(args)


if __name__ == "__main__":
    main()
