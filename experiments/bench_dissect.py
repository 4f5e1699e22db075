"""Throughput and peak memory of ``xaijax.features.dissect`` on the synthetic benchmark.

Dissects the bundled VGG16 (``features.29``, 64 units, 26 concepts, masks 128x128, beam 5,
formulas up to length 3) on the first N test/train images, each N in a fresh subprocess so
that peak memory is measured per run: ``tracemalloc`` peak (Python + NumPy allocations;
XLA's own buffers are not traced) and ``ru_maxrss`` (whole process, includes JAX/XLA and
the compiled code). Streaming means both must stay flat as N grows. Writes
``experiments/results/bench_dissect.json``.

    python experiments/bench_dissect.py [--counts 1000 10000] [--split train]

The test split has 1,000 images, so counts above that use the train split (10,000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(n: int, split: str) -> dict:
    import tracemalloc

    import jax

    from xaijax import checkpoints
    from xaijax.data import SyntheticScenes
    from xaijax.data.concepts import SyntheticConcepts
    from xaijax.features.dissect import DissectConfig, dissect

    model, variables, _ = checkpoints.load(None, ROOT / "weights" / "synthetic_vgg16.safetensors")
    scenes = SyntheticScenes()
    cfg = DissectConfig()
    # warm-up (compilation) on a few images, not timed
    dissect(model, variables, "features.29", SyntheticConcepts(scenes, split=split, count=cfg.batch_size), config=cfg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = dissect(model, variables, "features.29", SyntheticConcepts(scenes, split=split, count=n), config=cfg)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    s = res.summary()
    return {
        "images": n,
        "split": split,
        "seconds": round(wall, 2),
        "process_cpu_seconds": round(cpu, 2),
        "images_per_s": round(n / wall, 2),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "maxrss_mib_after_warmup": round(rss0 / 1024, 1),
        "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "detectors": s["detectors"],
        "formula_above": s["formula_above"],
        "jax_backend": jax.default_backend(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--split", default=None, help="default: test for N <= 1000, else train")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_dissect.json"))
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.split)))
        return
    runs = []
    for n in args.counts:
        split = args.split or ("test" if n <= 1000 else "train")
        print(f"dissecting {n} {split} images ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--split", split],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "what": "xaijax dissect: bundled VGG16 features.29 (64 units), 26 synthetic concepts, masks 128x128, "
        "quantile 0.005, beam 5, formula length 3, batch 16; fresh process per count, after a warm-up run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": load},
        "runs": runs,
        "memory_ratio_tracemalloc": round(runs[-1]["tracemalloc_peak_mib"] / runs[0]["tracemalloc_peak_mib"], 3)
        if len(runs) > 1 else None,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
