"""Where the time of a plain input gradient goes: XLA's CPU convolutions vs torch's (oneDNN).

    /work/peer-venv/bin/python experiments/profile_convs.py            # VGG16 + ResNet50 conv shapes, 224 px, batch 1
    /work/peer-venv/bin/python experiments/profile_convs.py --batch 16

For every distinct convolution of VGG16 and ResNet50 (in/out channels, kernel, stride,
input size; counted with its multiplicity in the network), times, in one process on the
same machine, the forward convolution and the input-gradient (transposed) convolution in
XLA (``jax.lax.conv_general_dilated``, NHWC/HWIO as the zoo models use, jitted) and in
torch (``F.conv2d`` in NCHW and ``torch.nn.grad.conv2d_input``, torch's own threads), each
the median of ``--repeats`` calls after a warm-up, and the network totals (time x
multiplicity). Also times each library's whole jitted / eager input gradient, so the
convolutions' share of it is visible. Needs torch (the peer environment of
``experiments/PEERS.md``, or any environment with torch). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import _median_time  # noqa: E402  (one timing protocol for both benches)

# (C_in, C_out, kernel, stride, padding, input side at 224 px) for each convolution
VGG16 = [
    (3, 64, 3, 1, 1, 224), (64, 64, 3, 1, 1, 224),
    (64, 128, 3, 1, 1, 112), (128, 128, 3, 1, 1, 112),
    (128, 256, 3, 1, 1, 56), (256, 256, 3, 1, 1, 56), (256, 256, 3, 1, 1, 56),
    (256, 512, 3, 1, 1, 28), (512, 512, 3, 1, 1, 28), (512, 512, 3, 1, 1, 28),
    (512, 512, 3, 1, 1, 14), (512, 512, 3, 1, 1, 14), (512, 512, 3, 1, 1, 14),
]


def resnet50() -> list[tuple[int, int, int, int, int, int]]:
    convs = [(3, 64, 7, 2, 3, 224)]
    side, cin = 56, 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for b in range(blocks):
            s = stride if b == 0 else 1
            convs.append((cin, width, 1, 1, 0, side))
            convs.append((width, width, 3, s, 1, side))  # torchvision: stride on the 3x3
            out_side = side // s
            convs.append((width, width * 4, 1, 1, 0, out_side))
            if b == 0:
                convs.append((cin, width * 4, 1, s, 0, side))
            cin, side = width * 4, out_side
    return convs


def _median(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after a warm-up call."""
    return _median_time(fn, repeats)[0]


def profile(convs, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    rows = []
    for (cin, cout, k, s, p, side), count in Counter(convs).items():
        x = rng.standard_normal((batch, side, side, cin)).astype(np.float32)
        w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)

        def fwd(x, w, s=s, p=p):
            return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

        xj, wj = jnp.asarray(x), jnp.asarray(w)
        y = fwd(xj, wj)
        gy = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
        jf = jax.jit(fwd)
        jb = jax.jit(lambda x, w, g: jax.vjp(lambda xx: fwd(xx, w), x)[1](g)[0])
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        gt = torch.from_numpy(np.ascontiguousarray(np.asarray(gy).transpose(0, 3, 1, 2)))
        with torch.no_grad():
            row = {
                "conv": f"{cin}->{cout} {k}x{k}/{s} @{side}",
                "count": count,
                "gflop": round(2 * np.prod(y.shape) * cin * k * k / 1e9, 3),
                "xla_fwd_s": _median(lambda: jax.block_until_ready(jf(xj, wj)), repeats),
                "torch_fwd_s": _median(lambda: F.conv2d(xt, wt, stride=s, padding=p), repeats),
                "xla_input_grad_s": _median(lambda: jax.block_until_ready(jb(xj, wj, gy)), repeats),
                "torch_input_grad_s": _median(
                    lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, stride=s, padding=p), repeats
                ),
            }
        rows.append(row)
        print(
            f"  {row['conv']:24s} x{count:<2d} fwd xla {row['xla_fwd_s'] * 1e3:7.2f} ms torch {row['torch_fwd_s'] * 1e3:7.2f} ms"
            f" | input-grad xla {row['xla_input_grad_s'] * 1e3:7.2f} ms torch {row['torch_input_grad_s'] * 1e3:7.2f} ms",
            flush=True,
        )
    totals = {key: round(sum(r[key] * r["count"] for r in rows), 4) for key in ("xla_fwd_s", "torch_fwd_s", "xla_input_grad_s", "torch_input_grad_s")}
    return {"rows": rows, "totals": totals}


def whole_gradient(arch: str, batch: int, repeats: int) -> dict:
    """Each library's full input gradient of the target logit (xaijax: the registered
    ``gradient``; torch: torchvision's model, ``autograd.grad`` w.r.t. the input only)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    from xaijax import methods, models

    model = models.get(arch)
    v = models.random_variables(model, (1, 224, 224, 3), seed=0)
    x = np.random.default_rng(1).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    t = np.arange(batch) % 1000
    fn = jax.jit(methods.get("gradient"), static_argnums=0)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    tm = getattr(torchvision.models, arch)().eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)

    def torch_grad():
        out = tm(xt)
        return torch.autograd.grad(out[torch.arange(batch), torch.as_tensor(t)].sum(), xt)[0]

    return {
        "xaijax_gradient_s": _median(lambda: jax.block_until_ready(fn(model, v, xj, tj)), repeats),
        "torch_gradient_s": _median(torch_grad, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/profile_convs.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result = {"batch": args.batch, "size": 224, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "loadavg_before": list(os.getloadavg())}
    for arch, convs in [("vgg16", VGG16), ("resnet50", resnet50())]:
        print(arch, flush=True)
        result[arch] = profile(convs, args.batch, args.repeats)
        result[arch].update(whole_gradient(arch, args.batch, args.repeats))
        tot = result[arch]["totals"]
        print(f"  totals (x multiplicity): fwd xla {tot['xla_fwd_s']:.3f} s torch {tot['torch_fwd_s']:.3f} s | input-grad "
              f"xla {tot['xla_input_grad_s']:.3f} s torch {tot['torch_input_grad_s']:.3f} s | whole gradient xaijax "
              f"{result[arch]['xaijax_gradient_s']:.3f} s torch {result[arch]['torch_gradient_s']:.3f} s", flush=True)
    result["loadavg_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
