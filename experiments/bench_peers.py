"""xaijax vs the PyTorch peers (zennit, Captum, TorchRay, pytorch-grad-cam): speed and agreement.

VGG16 and ResNet50 (torchvision classes on the torch side, the xaijax zoo models on the
other) with the *same* seeded random weights (He-normal kernels, random biases and BN
statistics; ported with :func:`xaijax.checkpoints.to_torch_state_dict`) and the same
images. For every method both sides have, each side is run after a warm-up call (xaijax:
the jit compile; torch: first-call allocations), ``--repeats`` times, and the median wall
time is reported together with the agreement of the two maps:

    err = max|xaijax - peer| / max|peer|      (after the documented transformation)

A timing is only called a win (``ratio = peer / xaijax > 1``) when the maps agree
(``err < --agree``); stochastic methods (SmoothGrad) are compared by Pearson correlation and
never count as a win; methods whose definitions differ (pytorch-grad-cam's FullGrad
normalisation) are reported with their error and marked "different definition".
Transformations (the same as ``tests/test_peer_references.py``): min-max normalisation of
xaijax's maps for pytorch-grad-cam, ``p`` times xaijax's RISE for TorchRay (which was
given xaijax's masks and the model ``logit(softmax(f))``), z+ composites on the network
with conv-side biases zeroed (zennit's z+ drops biases), LRP output relevance = target
logit for zennit.

Environment: the peer virtualenv (``experiments/PEERS.md``), one process for both sides::

    /work/peer-venv/bin/python experiments/bench_peers.py --quick          # 112 px, batch 1
    /work/peer-venv/bin/python experiments/bench_peers.py                  # 224 px, batches 1 16
    /work/peer-venv/bin/python experiments/bench_peers.py --batches 1

Writes ``experiments/results/bench_peers.json`` and ``.md`` (atomically). torch uses
``torch.set_num_threads(os.cpu_count())``; JAX/XLA uses its default CPU thread pool. The
JSON records versions, thread settings, and the load average before and after each model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_peer_references as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (compile / allocation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _minmax(m: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    m = np.asarray(m, np.float64)
    axes = tuple(range(1, m.ndim))
    m = m - m.min(axis=axes, keepdims=True)
    return m / (eps + m.max(axis=axes, keepdims=True))


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.abs(theirs).max()
    return float(np.abs(ours - theirs).max() / scale) if scale > 0 else float("nan")


def xaijax_methods(cfg: dict[str, Any]) -> dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray], str]]:
    """``{name: (method, transform applied to xaijax's map, comparison kind)}``."""
    from xaijax.methods import get
    from xaijax.methods.cam import GradCAMPlusPlus
    from xaijax.methods.gradient_family import IntegratedGradients
    from xaijax.methods.lrp import ExcitationBackprop
    from xaijax.methods.perturbation import RISE

    ident = lambda m: m  # noqa: E731
    rise = cfg["rise"]
    out = {
        "gradient": (get("gradient"), ident, "exact"),
        "gradient-x-input": (get("gradient-x-input"), ident, "exact"),
        "guided-backprop": (get("guided-backprop"), ident, "exact"),
        "integrated-gradients": (IntegratedGradients(steps=cfg["ig_steps"], rule="gauss-legendre"), ident, "exact"),
        "smoothgrad": (get("smoothgrad", n=cfg["sg_n"], noise=0.15), ident, "stochastic"),
        "grad-cam": (get("grad-cam"), ident, "exact"),
        "grad-cam-plus-plus": (GradCAMPlusPlus(eps=1e-6), ident, "exact"),
        "fullgrad": (get("fullgrad"), _minmax, "different definition"),
        "lrp-epsilon": (get("lrp-epsilon"), ident, "exact"),
        "lrp-epsilon-plus": (get("lrp-epsilon-plus"), ident, "exact"),
        "lrp-epsilon-plus-flat": (get("lrp-epsilon-plus-flat"), ident, "exact"),
        "excitation-backprop": (ExcitationBackprop(resize=False), ident, "exact"),
        "contrastive-excitation-backprop": (ExcitationBackprop(contrastive=True, resize=False), ident, "exact"),
        "rise": (RISE(n=rise["n"], s=rise["s"], p=rise["p"], seed=rise["seed"], chunk=min(rise["n"], 16)),
                 lambda m: m * rise["p"], "exact"),
    }
    return out


PGC = "pytorch-grad-cam"


def bench_family(family: str, size: int, batches: list[int], cfg: dict[str, Any], args) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import torch

    from xaijax.checkpoints import from_torch_state_dict
    from xaijax.methods.perturbation import rise_masks

    arch = {"vgg": "vgg16", "resnet": "resnet50"}[family]
    from xaijax import models

    model = models.get(arch)
    sd = R.make_weights(family, model, size, seed=0)
    sd_nb = R.bias_free(sd)
    variables = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    variables_nb = from_torch_state_dict(model, sd_nb, input_shape=(1, size, size, 3))
    tmodel = {"vgg": lambda: R.torch_model("vgg", 1000), "resnet": lambda: R.torch_model("resnet", 1000, 64)}[family]
    torch_full = R.load_torch(tmodel(), sd)
    torch_nb = R.load_torch(tmodel(), sd_nb)
    xm = xaijax_methods(cfg)
    rows = []
    rng = np.random.default_rng(1)
    for b in batches:
        x = rng.standard_normal((b, size, size, 3)).astype(np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():  # explain the predicted class (random weights give near one-hot
            target = torch_full(xt).argmax(1).numpy().astype(np.int64)  # softmax: RISE needs p > 0)
        tt = torch.from_numpy(target)
        xj, tj = jnp.asarray(x), jnp.asarray(target.astype(np.int32))
        masks = np.asarray(rise_masks(cfg["rise"]["seed"], np.arange(cfg["rise"]["n"]), (size, size),
                                      cfg["rise"]["s"], cfg["rise"]["p"]), np.float32)
        peers = R.peer_methods(family, masks, ig_steps=cfg["ig_steps"], sg_n=cfg["sg_n"])
        for name, (method, transform, kind) in xm.items():
            if args.methods and name not in args.methods:
                continue
            if b > 1 and name in cfg["batch1_only"]:
                continue
            nobias = name in R.NOBIAS_METHODS
            v = variables_nb if nobias else variables
            fn = jax.jit(lambda vv, xx, t, _m=method: _m(model, vv, xx, t))
            load0 = os.getloadavg()
            tx, ours = _median_time(lambda: fn(v, xj, tj).block_until_ready(), cfg["repeats"])
            ours = transform(np.asarray(ours))
            for peer, pfn in peers.get(name, {}).items():
                if peer == "torchray" and name in ("gradient", "guided-backprop") and not args.all_peers:
                    continue  # same algorithm as Captum's; --all-peers times it too
                tm = torch_nb if nobias else torch_full
                if name in ("excitation-backprop", "contrastive-excitation-backprop", "lrp-epsilon",
                            "lrp-epsilon-plus", "lrp-epsilon-plus-flat"):
                    tm = R.load_torch(tmodel(), sd_nb if nobias else sd)  # these peers patch the model
                tp, theirs = _median_time(lambda: pfn(tm, xt, tt), cfg["repeats"])
                compare_ours = _minmax(ours) if peer == PGC and name != "fullgrad" else ours
                if kind == "stochastic":
                    agree_val = float(np.corrcoef(compare_ours.ravel(), theirs.ravel())[0, 1])
                    agrees = False
                else:
                    agree_val = rel_err(compare_ours, theirs)
                    agrees = kind == "exact" and agree_val < args.agree
                row = {
                    "model": arch, "batch": b, "size": size, "method": name, "peer": peer,
                    "peer_s": tp, "xaijax_s": tx, "ratio": tp / tx, "comparison": kind,
                    "err_or_corr": agree_val, "agrees": agrees, "win": agrees and tp > tx,
                    "load_before": load0, "load_after": os.getloadavg(),
                }
                rows.append(row)
                print(f"{arch} b={b} {name:32s} {peer:16s} peer {tp:8.3f}s xaijax {tx:8.3f}s "
                      f"ratio {tp / tx:6.2f} {kind} {agree_val:.2e} load {os.getloadavg()[0]:.1f}", flush=True)
            del fn
            jax.clear_caches()
    return rows


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "bench_peers.json")
    tmp = js + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, js)
    lines = [
        "# xaijax vs PyTorch peers",
        "",
        f"{meta['machine']}; load average during the run {meta['load_min']:.1f}-{meta['load_max']:.1f}; "
        f"{meta['size']} px; repeats {meta['repeats']} (median after warm-up); torch threads {meta['torch_threads']}.",
        "",
        "Agreement: max|xaijax - peer| / max|peer| after the documented transformation (Pearson r for "
        "stochastic methods). ratio = peer time / xaijax time (> 1: xaijax faster); a win needs agreement.",
        "",
        "| model | batch | method | peer | peer s | xaijax s | ratio | agreement | win |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        agree = f"{r['err_or_corr']:.1e}" if r["comparison"] != "stochastic" else f"r={r['err_or_corr']:.3f} (stochastic)"
        if r["comparison"] == "different definition":
            agree += " (different definition)"
        elif r["comparison"] == "exact" and not r["agrees"]:
            agree += " (DISAGREES)"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['peer']} | {r['peer_s']:.3f} | "
                     f"{r['xaijax_s']:.3f} | {r['ratio']:.2f} | {agree} | {'yes' if r['win'] else 'no'} |")
    md = os.path.join(out_dir, "bench_peers.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="xaijax vs zennit / Captum / TorchRay / pytorch-grad-cam")
    ap.add_argument("--quick", action="store_true", help="112 px, batch 1, cheap hyperparameters")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet"], choices=["vgg", "resnet"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--agree", type=float, default=1e-3, help="max relative error for 'agrees'")
    ap.add_argument("--all-peers", action="store_true", help="also time TorchRay's gradient / guided backprop")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "experiments", "results"))
    args = ap.parse_args(argv)

    import jax
    import torch

    ncores = os.cpu_count() or 1
    torch.set_num_threads(ncores)
    size = args.size or (112 if args.quick else 224)
    batches = args.batches or ([1] if args.quick else [1, 16])
    cfg = {
        "repeats": args.repeats or (2 if args.quick else 3),
        "ig_steps": 8 if args.quick else 16,
        "sg_n": 8 if args.quick else 16,
        "rise": {"n": 32 if args.quick else 128, "s": 7, "p": 0.5, "seed": 0},
        # batch 16 of these costs minutes per call on a shared 2-core machine
        "batch1_only": ("integrated-gradients", "smoothgrad", "rise"),
    }
    rows: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    for fam in args.models:
        rows += bench_family(fam, size, batches, cfg, args)
        loads.append(os.getloadavg()[0])
        loads += [r["load_before"][0] for r in rows] + [r["load_after"][0] for r in rows]
    meta = {
        "machine": f"{ncores} CPU cores (shared)",
        "size": size, "batches": batches, "repeats": cfg["repeats"], "config": cfg,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_devices": [str(d) for d in jax.devices()],
        "versions": R.versions(), "load_min": min(loads), "load_max": max(loads),
        "agree_threshold": args.agree,
        "notes": "TorchRay's RISE is given xaijax's masks (filter_masks), so its time excludes mask generation.",
    }
    write(rows, meta, args.out_dir)
    print(f"wrote {os.path.join(args.out_dir, 'bench_peers.json')} and .md")


if __name__ == "__main__":
    main()
