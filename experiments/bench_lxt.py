"""Time lxt (the AttnLRP authors' efficient mode) against xaijax on ViT-B/16, 224 px, batch 1.

Run in the peer venv (``experiments/PEERS.md``, "lxt (AttnLRP)"), one process, CPU::

    /work/peer-venv/bin/python experiments/bench_lxt.py

Same random weights on both sides (torchvision ``vit_b_16`` with every parameter redrawn from
a seeded normal, ported with ``xaijax.checkpoints.vit_mapping.from_torch_state_dict``),
float32, one random image, target = the top class. Rows (median of 5 timed calls after 2
warm-up calls; torch: forward + backward + ``x * x.grad``; xaijax: the jitted method,
``block_until_ready``):

* ``lxt cp_LRP + zennit gamma``: ``monkey_patch(vision_transformer)``, ``monkey_patch_zennit()``,
  ``LayerMapComposite([(Conv2d, Gamma(0.25)), (Linear, Gamma(0.05))])`` (lxt's ViT example);
* ``xaijax lxt recipe``: the same rules (``tests/test_lxt_reference.py``: ``cp_lrp(0, None,
  None)`` with ``Gamma(0.25, 1e-6)`` / ``Gamma(0.05, 1e-6)``, attention projections on the
  z-rule), with its agreement to lxt's heatmap;
* ``xaijax attnlrp`` and ``xaijax cp-lrp``: the registered methods with their defaults (other
  rules: timing only);
* ``torch gradient`` (unpatched forward + backward) for scale.

Writes ``experiments/results/bench_lxt_vit.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "bench_lxt_vit.json")
SEED, WARMUP, REPS = 0, 2, 5


def timed(fn):
    for _ in range(WARMUP):
        fn()
    ts = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def main():
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import torchvision
    from torchvision.models import vision_transformer

    from xaijax import methods, models
    from xaijax import propagation as P
    from xaijax.checkpoints import vit_mapping
    from xaijax.propagation import composites as C

    load_start = os.getloadavg()
    torch.manual_seed(SEED)
    tm = vision_transformer.vit_b_16(weights=None).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "encoder.ln.weight":
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim == 1 or name in ("class_token", "encoder.pos_embedding"):
                p.copy_(0.02 * r)
            else:
                p.copy_(r * (1.0 / p[0].numel()) ** 0.5)
    x = torch.randn((1, 3, 224, 224), generator=g)
    results = {}

    def grad_only():
        xx = x.clone().requires_grad_(True)
        y = tm(xx)
        y[0, int(y.argmax())].backward()
        return (xx * xx.grad).sum(1)

    with torch.no_grad():
        target = int(tm(x).argmax())
    results["torch gradient"] = timed(grad_only)

    jm = models.get("vit_b_16", num_classes=1000)
    v = vit_mapping.from_torch_state_dict(jm, {k: t.detach().numpy() for k, t in tm.state_dict().items()})
    jx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    jt = jnp.asarray([target])

    from lxt.efficient import monkey_patch, monkey_patch_zennit
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite

    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    comp = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(0.25)), (torch.nn.Linear, z_rules.Gamma(0.05))])
    comp.register(tm)

    def lxt_run():
        xx = x.clone().requires_grad_(True)
        y = tm(xx)
        y[0, target].backward()
        return (xx * xx.grad).sum(1)

    results["lxt cp_LRP + zennit gamma"] = timed(lxt_run)
    theirs = lxt_run().detach().numpy()
    comp.remove()

    attn = {"*.self_attention.in_proj": P.Epsilon(0.0), "*.self_attention.out_proj": P.Epsilon(0.0)}
    recipe = C.cp_lrp(0.0, None, None).replace(conv=P.Gamma(0.25, 1e-6), dense=P.Gamma(0.05, 1e-6), names=attn)
    rows = {
        "xaijax lxt recipe": methods.get("cp-lrp", composite=recipe),
        "xaijax attnlrp": methods.get("attnlrp"),
        "xaijax cp-lrp": methods.get("cp-lrp"),
    }
    agreement = {}
    for name, m in rows.items():
        f = jax.jit(lambda vv, xx, tt, m=m: m(jm, vv, xx, tt))
        results[name] = timed(lambda f=f: f(v, jx, jt).block_until_ready())
        ours = np.asarray(f(v, jx, jt))
        agreement[name] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())

    base = results["lxt cp_LRP + zennit gamma"][0]
    out = dict(
        model="vit_b_16 (torchvision), random weights, 224 px, batch 1, float32, CPU",
        timing=f"median of {REPS} after {WARMUP} warm-up calls, seconds",
        rows={k: dict(median_s=round(t, 4), runs_s=[round(s, 4) for s in ts], speedup_vs_lxt=round(base / t, 2))
              for k, (t, ts) in results.items()},
        agreement_vs_lxt=dict(
            measure="max|xaijax - lxt| / max|lxt| (channel-summed heatmap)", **{k: f"{e:.2e}" for k, e in agreement.items()}
        ),
        versions={"lxt": md.version("lxt"), "zennit": md.version("zennit"), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "jax": jax.__version__, "python": sys.version.split()[0]},
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     loadavg_1_5_15_start=[round(a, 2) for a in load_start],
                     loadavg_1_5_15_end=[round(a, 2) for a in os.getloadavg()],
                     note="shared CPU: other processes ran alongside, so absolute times are noisy"),
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
