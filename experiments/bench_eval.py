"""Images/s of the pointing-game experiment (``xaijax eval pointing``) on 1 vs 4 devices.

    python experiments/bench_eval.py --images 64 --out experiments/results/bench_eval.json

For each device count the benchmark runs in a fresh process (``XLA_FLAGS=
--xla_force_host_platform_device_count=4`` on CPU, so the 4 "devices" share the same cores:
this measures the sharding overhead of the single code path, not a speed-up; on a machine
with several accelerators use ``--devices`` values up to the real count). Each method first
evaluates ``--warmup`` images (compilation), then the timed images into a fresh results
folder; images/s counts every (image, class) map plus its metrics, the per-image store
writes included. Methods: Grad-CAM and RSP on both bundled synthetic classifiers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
import jax
from xaijax.evaluation import EvalConfig, run_experiment
from xaijax.demo import weights_dir
devices, images, warmup, batch = (int(a) for a in sys.argv[1:5])
rows = []
for wname in ("synthetic_vgg16", "synthetic_resnet18"):
    for method in ("grad-cam", "rsp"):
        w = str(weights_dir() / f"{wname}.safetensors")
        with tempfile.TemporaryDirectory() as d:
            run_experiment(EvalConfig("pointing", Path(d) / "warm", (method,), weights=w, images=warmup, batch=batch, devices=devices), progress=False)
            t0 = time.perf_counter()
            res = run_experiment(EvalConfig("pointing", Path(d) / "run", (method,), weights=w, images=images, batch=batch, devices=devices), progress=False)
            dt = time.perf_counter() - t0
        r = res["rows"][0]
        rows.append({"model": wname, "method": method, "devices": devices, "images": r["images"], "pairs": r["pairs"],
                     "seconds": round(dt, 3), "images_per_s": round(r["images"] / dt, 2), "pointing_all": r["pointing_all"]})
print("RESULT " + json.dumps({"local_devices": len(jax.local_devices()), "rows": rows}))
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--devices", default="1,4", help="comma-separated device counts")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/bench_eval.json"))
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    rows = []
    load = [os.getloadavg()[0]]
    for n in counts:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(counts)}"}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.images), str(args.warmup), str(args.batch)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
        rows += json.loads(line[7:])["rows"]
        load.append(os.getloadavg()[0])
    import jax

    from xaijax.atomic import atomic_text

    result = {
        "benchmark": "xaijax eval pointing, images/s",
        "jax": jax.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "forced_host_devices": max(counts),
        "load_average_1min": load,
        "note": "forced host devices share the same CPU cores: 4 devices measure the sharding overhead, not a speed-up",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(args.out, json.dumps(result, indent=2) + "\n")
    print("| model | method | devices | images | pairs | s | images/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['devices']} | {r['images']} | {r['pairs']} | {r['seconds']} | {r['images_per_s']} |")
    return result


if __name__ == "__main__":
    main()
