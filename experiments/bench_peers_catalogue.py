"""xaijax vs Captum and pytorch-grad-cam on the peers' catalogue (issue 22): time, peak memory, agreement.

The methods xaijax took over from the peers — occlusion, feature ablation, Shapley value
sampling, KernelSHAP, LIME, DeepLIFT, DeepLIFT-SHAP, GradientSHAP (Captum) and HiResCAM,
element-wise Grad-CAM, Ablation-CAM, Eigen-CAM, EigenGrad-CAM (pytorch-grad-cam) — on VGG16 and
ResNet50 with the same seeded random weights on both sides (the models and weights of
``bench_peers.py``: torchvision's classes, every ReLU its own non-inplace module; ResNet's
Bottleneck reuses one ReLU module three times, which Captum's DeepLIFT cannot tell apart, so
the torch ResNet gets three ReLU modules per block here — the same function), the same images
and targets (each image's predicted class), batch 1 and 16.

Per row: median wall time of ``--repeats`` calls after a warm-up (xaijax: the jit compile;
torch: first-call allocations); **peak memory** (``--memory``): each side run alone in a fresh
subprocess, its peak resident set (``VmHWM``) during the warm-up call and one timed call minus
its resident set before them (model, weights and inputs already loaded), in MB — the same
measure for both sides (XLA's CPU buffers and torch's tensors are both in the resident set;
xaijax's includes compiling the program); and the agreement

    err = max|xaijax - peer| / max|peer|

for the deterministic methods (``exact``: occlusion, feature ablation, DeepLIFT, DeepLIFT-SHAP
with the same baselines, the CAMs after pytorch-grad-cam's min-max normalisation), in float32
(``err32``, both sides as timed) and in float64 (``err64``: xaijax with ``jax_enable_x64`` on a
float64 copy of the weights and input, the peer on a float64 copy of the torch model with torch's
default dtype float64; the team's criterion for "the same function" is err64 <= 1e-6;
pytorch-grad-cam resizes with OpenCV in float32, which bounds its CAM rows' err64 near 1e-7). The
sampling methods (Shapley sampling, KernelSHAP, LIME, GradientSHAP) draw their perturbations
from different generators: they are timed at the same number of model evaluations and their
agreement is not defined (``sampled``). Both sides run with their defaults, as people run them;
Captum's perturbation methods are timed twice: with its default ``perturbations_per_eval=1`` (one
perturbed copy of the batch per forward pass) and with ``perturbations_per_eval`` = xaijax's
default ``chunk`` (64 perturbed copies per forward pass: the same memory budget). Features are
16-px grid cells numbered row-major on both sides.

Environment: the peer virtualenv (``experiments/PEERS.md``), one process for both sides::

    /work/peer-venv/bin/python experiments/bench_peers_catalogue.py --quick   # 64 px, batch 1
    /work/peer-venv/bin/python experiments/bench_peers_catalogue.py           # 112 px, batches 1 16

Writes ``experiments/results/bench_peers_catalogue.json`` and ``.md`` (atomically); each
finished row is appended to ``bench_peers_catalogue.partial.jsonl`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import make_peer_references as R  # noqa: E402
from bench_peers import _in_x64  # noqa: E402
from reference_helpers import minmax  # noqa: E402

PARTIAL = "bench_peers_catalogue.partial.jsonl"
CELL = 16  # feature-mask grid cell (px)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak resident-set growth of a warm-up call and one more call of ``fn`` in MB (VmHWM reset
    first; Linux). Meaningful in a fresh process only (an allocator keeps what earlier work freed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    fn()
    fn()
    return max(0.0, (_status_kb("VmHWM") - before) / 1024.0)


def memory_in_subprocess(family: str, size: int, batch: int, index: int, side: str, args) -> float:
    """:func:`peak_mb` of one side of row ``index`` of :func:`rows_for`, in a fresh interpreter (``--_memory``)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", family, str(size), str(batch), str(index), side]
    if args.quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    print(f"memory run failed for {family} {batch} row {index} {side}: {res.stderr[-2000:]}", file=sys.stderr)
    return float("nan")


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.abs(theirs).max()
    return float(np.abs(ours - theirs).max() / scale) if scale > 0 else float("nan")


def split_bottleneck_relus(model):
    """Give every torchvision Bottleneck three ReLU modules (it reuses one; Captum's DeepLIFT
    keys its hooks by module, so a reused module mixes the three activations): same function."""
    import torch.nn as tnn
    from torchvision.models.resnet import Bottleneck

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        out = self.relu_b(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_c(out + identity)

    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.relu_a, m.relu_b, m.relu_c = tnn.ReLU(), tnn.ReLU(), tnn.ReLU()
            m.forward = types.MethodType(forward, m)
    return model


def grid_mask(size: int) -> np.ndarray:
    """(H, W) int feature ids of 16-px cells, row-major (xaijax's grid and Captum's feature_mask)."""
    cell = np.arange(size) // CELL  # (rows and columns: square images)
    per_row = -(-size // CELL)
    return (cell[:, None] * per_row + cell[None, :]).astype(np.int64)


def rows_for(cfg: dict[str, Any], family: str, size: int, chunk: int, baselines: np.ndarray) -> list[tuple]:
    """(name, xaijax method, peer name, peer call (model, x, t) -> (N, H, W) numpy, kind, transform)."""
    import torch
    from captum import attr as ca
    import pytorch_grad_cam as pgc

    from xaijax import methods

    n = cfg["n_samples"]
    fm = torch.from_numpy(grid_mask(size))[None, None]
    bl_t = torch.from_numpy(np.ascontiguousarray(baselines.transpose(0, 3, 1, 2)))
    layer_name = R.cam_layer(family)

    def cap(cls, **kw):
        def run(m, x, t):
            out = cls(m).attribute(x, target=t, **kw)
            return out.detach().numpy().sum(1)
        return run

    def cap_feature(cls, **kw):  # Captum repeats a feature's value on every channel: one channel is the map
        def run(m, x, t):
            return cls(m).attribute(x, target=t, feature_mask=fm.expand(x.shape[0], 1, -1, -1), **kw).detach().numpy()[:, 0]
        return run

    def cap_occlusion(ppe):
        def run(m, x, t):
            out = ca.Occlusion(m).attribute(x, target=t, sliding_window_shapes=(3, cfg["window"], cfg["window"]),
                                            strides=(3, cfg["stride"], cfg["stride"]), baselines=0.0,
                                            perturbations_per_eval=ppe)
            return out.detach().numpy()[:, 0]
        return run

    def grad_cam_module(m):
        mod = m
        for part in layer_name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        return mod

    def pgc_cam(cls, **kw):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def run(m, x, t):
            with cls(model=m, target_layers=[grad_cam_module(m)], **kw) as cam:
                return np.asarray(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]), np.float32)
        return run

    grid = dict(segmentation="grid", cell=CELL)
    ident = lambda a: a  # noqa: E731
    tuned = f"captum ppe={chunk}"  # perturbations_per_eval = xaijax's chunk
    out = []
    for ppe, label in ((1, "captum"), (chunk, tuned)):
        out += [
            ("occlusion", methods.get("occlusion", window=cfg["window"], stride=cfg["stride"]), label, cap_occlusion(ppe),
             "exact", ident),
            ("feature-ablation", methods.get("feature-ablation", **grid), label,
             cap_feature(ca.FeatureAblation, perturbations_per_eval=ppe), "exact", ident),
            ("shapley-sampling", methods.get("shapley-sampling", n_samples=cfg["shapley_n"], **grid), label,
             cap_feature(ca.ShapleyValueSampling, n_samples=cfg["shapley_n"], perturbations_per_eval=ppe), "sampled", ident),
            ("kernel-shap", methods.get("kernel-shap", n_samples=n, **grid), label,
             cap_feature(ca.KernelShap, n_samples=n, perturbations_per_eval=ppe), "sampled", ident),
            ("lime", methods.get("lime", n_samples=n, **grid), label,
             cap_feature(ca.Lime, n_samples=n, perturbations_per_eval=ppe), "sampled", ident),
        ]
    out += [
        ("deeplift", methods.get("deeplift"), "captum", cap(ca.DeepLift), "exact", ident),
        ("deeplift-shap", methods.get("deeplift-shap", baselines=baselines), "captum",
         lambda m, x, t: ca.DeepLiftShap(m).attribute(x, baselines=bl_t, target=t).detach().numpy().sum(1), "exact", ident),
        ("gradient-shap", methods.get("gradient-shap", baselines=baselines, n_samples=cfg["gs_n"]), "captum",
         lambda m, x, t: ca.GradientShap(m).attribute(x, baselines=bl_t, target=t, n_samples=cfg["gs_n"]).detach().numpy().sum(1),
         "sampled", ident),
        ("hirescam", methods.get("hirescam"), "pytorch-grad-cam", pgc_cam(pgc.HiResCAM), "exact", minmax),
        ("grad-cam-elementwise", methods.get("grad-cam-elementwise"), "pytorch-grad-cam", pgc_cam(pgc.GradCAMElementWise),
         "exact", minmax),
        ("ablation-cam", methods.get("ablation-cam"), "pytorch-grad-cam", pgc_cam(pgc.AblationCAM, batch_size=cfg["ablation_batch"]),
         "exact", minmax),
        ("eigen-cam", methods.get("eigen-cam"), "pytorch-grad-cam", pgc_cam(pgc.EigenCAM), "exact", minmax),
        ("eigengrad-cam", methods.get("eigengrad-cam"), "pytorch-grad-cam", pgc_cam(pgc.EigenGradCAM), "exact", minmax),
    ]
    return out


def setup(family: str, size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Models (xaijax and torch, same weights), reference baselines and the random source."""
    from xaijax import models
    from xaijax.checkpoints import from_torch_state_dict

    arch = {"vgg": "vgg16", "resnet": "resnet50"}[family]
    model = models.get(arch)
    sd = R.make_weights(family, model, size, seed=0)
    variables = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    tmodel = {"vgg": lambda: R.torch_model("vgg", 1000), "resnet": lambda: split_bottleneck_relus(R.torch_model("resnet", 1000, 64))}[family]
    rng = np.random.default_rng(1)
    baselines = rng.uniform(-1.0, 1.0, (cfg["n_baselines"], size, size, 3)).astype(np.float32)
    return dict(arch=arch, model=model, sd=sd, variables=variables, tmodel=tmodel, rng=rng, baselines=baselines)


def batch_inputs(env: dict[str, Any], b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch of ``b`` images (drawn in order from the setup's random source: batch 1 first)
    and their targets (the torch model's predicted classes)."""
    import torch

    x = env["rng"].standard_normal((b, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        target = R.load_torch(env["tmodel"](), env["sd"])(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return x, target.numpy().argmax(1).astype(np.int64)


def callers(env: dict[str, Any], method: Any, pfn: Callable, x: np.ndarray, target: np.ndarray, dtype: str = "float32"):
    """(xaijax call, peer call) on the batch, each returning the map; ``dtype="float64"``: both
    sides in float64 (call the xaijax side inside :func:`bench_peers._in_x64`)."""
    import jax
    import jax.numpy as jnp
    import torch

    model, variables = env["model"], env["variables"]
    tm = R.load_torch(env["tmodel"](), env["sd"])  # Captum and pytorch-grad-cam hook the model: a fresh one per method
    xt, tt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(target)
    if dtype == "float64":
        tm, xt = tm.double(), xt.double()

    def ours():
        v, xx = variables, jnp.asarray(x)
        if dtype == "float64":
            v, xx = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v), jnp.asarray(x, jnp.float64)
        tj = jnp.asarray(target.astype(np.int32))
        if method.runs_own_loop:
            return jax.block_until_ready(method(model, v, xx, tj))
        return jax.block_until_ready(_jitted(method, model)(v, xx, tj))

    def theirs():
        if dtype == "float64":
            with R.float64_defaults():
                return pfn(tm, xt, tt)
        return pfn(tm, xt, tt)

    return ours, theirs


_JIT: dict[Any, Any] = {}


def _jitted(method: Any, model: Any) -> Any:
    import jax

    key = (method, model)
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda vv, xx, t: method(model, vv, xx, t))
    return _JIT[key]


def bench_family(family: str, size: int, batches: list[int], cfg: dict[str, Any], args) -> list[dict[str, Any]]:
    env = setup(family, size, cfg)
    arch = env["arch"]
    rows = []
    ours_cache: dict[tuple[str, int], tuple[float, Any]] = {}
    mem_cache: dict[tuple[str, int], float] = {}
    for b in batches:
        x, target = batch_inputs(env, b, size)
        for index, (name, method, peer, pfn, kind, transform) in enumerate(
            rows_for(cfg, family, size, cfg["chunk"], env["baselines"])
        ):
            if args.methods and name not in args.methods:
                continue
            if b > 1 and name in cfg["batch1_only"]:
                continue
            load0 = os.getloadavg()[0]
            run_ours, run_peer = callers(env, method, pfn, x, target)
            if (name, b) not in ours_cache:  # the same xaijax call against two Captum settings: timed once
                ours_cache[name, b] = _median_time(run_ours, cfg["repeats"])
            tx, ours = ours_cache[name, b]
            tp, theirs = _median_time(run_peer, cfg["repeats"])
            err32 = err64 = None
            if kind == "exact":
                err32 = rel_err(transform(np.asarray(ours, np.float64)), theirs)
                o64, p64 = callers(env, method, pfn, x, target, "float64")
                err64 = rel_err(transform(np.asarray(_in_x64(o64), np.float64)), p64())
            mem_x = mem_p = None
            if args.memory:
                if (name, b) not in mem_cache:
                    mem_cache[name, b] = memory_in_subprocess(family, size, b, index, "xaijax", args)
                mem_x = mem_cache[name, b]
                mem_p = memory_in_subprocess(family, size, b, index, "peer", args)
            row = {
                "model": arch, "batch": b, "size": size, "method": name, "peer": peer, "kind": kind,
                "xaijax_s": round(tx, 4), "peer_s": round(tp, 4), "ratio": round(tp / tx, 2),
                "xaijax_peak_mb": None if mem_x is None else round(mem_x, 1),
                "peer_peak_mb": None if mem_p is None else round(mem_p, 1),
                "err32": err32, "err64": err64, "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            with open(os.path.join(args.out_dir, PARTIAL), "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return rows


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str) -> None:
    from xaijax.atomic import atomic_text

    atomic_text(os.path.join(out_dir, "bench_peers_catalogue.json"), json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# xaijax vs Captum / pytorch-grad-cam: the peers' catalogue",
        "",
        f"{meta['started']}; {meta['versions']}; {meta['cpus']} CPUs; {meta['size']} px; median of {meta['cfg']['repeats']} "
        "calls after a warm-up. ratio = peer time / xaijax time (> 1: xaijax faster). err = max|xaijax - peer| / max|peer| "
        "(exact methods; CAMs after pytorch-grad-cam's min-max), both sides float32 / both float64; sampled methods: "
        "different random draws, timed at the same number of model evaluations. Peak: resident-set growth of a warm-up "
        "and one call, each side alone in a fresh process (xaijax's includes compilation).",
        "",
        "| model | batch | method | peer | xaijax s | peer s | ratio | xaijax peak MB | peer peak MB | err f32 / f64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def mb(v):
        return "" if v is None or v != v else f"{v:.0f}"

    for r in rows:
        err = "sampled" if r["err32"] is None else f"{r['err32']:.1e} / {r['err64']:.1e}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['peer']} | {r['xaijax_s']:.3f} | {r['peer_s']:.3f} | "
                     f"{r['ratio']:.2f} | {mb(r['xaijax_peak_mb'])} | {mb(r['peer_peak_mb'])} | {err} |")
    notes = sorted({(r["method"], r["note"]) for r in rows if r.get("note")})
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{m}`: {n}" for m, n in notes]
    if meta.get("partial"):
        lines += ["", f"Partial run: {meta['partial']}."]
    atomic_text(os.path.join(out_dir, "bench_peers_catalogue.md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="xaijax vs Captum / pytorch-grad-cam on the peers' catalogue")
    ap.add_argument("--quick", action="store_true", help="64 px, batch 1, fewer samples")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet"], choices=["vgg", "resnet"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--memory", action="store_true", help="also measure each side's peak memory in a fresh subprocess")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "experiments", "results"))
    ap.add_argument("--_memory", nargs=5, default=None, help=argparse.SUPPRESS)  # family size batch row-index side
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    size = args.size or (64 if args.quick else 112)
    batches = args.batches or ([1] if args.quick else [1, 16])
    cfg = config(args)
    if args._memory:
        family, msize, mbatch, mindex, side = args._memory
        msize, mbatch, mindex = int(msize), int(mbatch), int(mindex)
        env = setup(family, msize, cfg)
        for b in sorted({1, mbatch}):  # draw the batches in the order the main run does
            x, target = batch_inputs(env, b, msize)
            if b == mbatch:
                break
        row = rows_for(cfg, family, msize, cfg["chunk"], env["baselines"])[mindex]
        ours, theirs = callers(env, row[1], row[3], x, target)
        print(f"PEAK_MB {peak_mb(ours if side == 'xaijax' else theirs):.1f}", flush=True)
        return
    os.makedirs(args.out_dir, exist_ok=True)
    open(os.path.join(args.out_dir, PARTIAL), "w").close()
    rows: list[dict[str, Any]] = []
    for family in args.models:
        rows += bench_family(family, size, batches, cfg, args)
    import captum
    import jax
    import pytorch_grad_cam

    meta = {
        "started": started, "size": size, "batches": batches, "cfg": cfg, "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg(),
        "versions": f"jax {jax.__version__}, torch {torch.__version__}, captum {captum.__version__}, "
                    f"grad-cam {getattr(pytorch_grad_cam, '__version__', '1.5.7')}",
    }
    write(rows, meta, args.out_dir)
    print(f"wrote {args.out_dir}/bench_peers_catalogue.json and .md")


def config(args) -> dict[str, Any]:
    """The run's settings (the same in the main process and the memory subprocesses)."""
    return {
        "repeats": args.repeats or (1 if args.quick else 3),
        "window": 16, "stride": 8,
        "chunk": 64,  # xaijax's default chunk of the perturbation methods; Captum's tuned perturbations_per_eval
        "n_samples": 50 if args.quick else 100,  # KernelSHAP / LIME model evaluations per image
        "shapley_n": 1 if args.quick else 2,  # Shapley sampling: permutations (x features evaluations)
        "gs_n": 8 if args.quick else 16,
        "n_baselines": 4,
        "ablation_batch": 32,
        "batch1_only": ("shapley-sampling", "kernel-shap", "lime"),  # Captum runs them one image at a time
    }


if __name__ == "__main__":
    main()
