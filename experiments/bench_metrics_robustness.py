"""xaijax vs Quantus 0.6.0: time per robustness / randomisation / axiom metric at 8 and 64 images.

Run in the peer virtualenv (torch + Quantus + xaijax)::

    /work/peer-venv/bin/python experiments/bench_metrics_robustness.py \\
        --out experiments/results/bench_metrics_robustness.json

Same weights on both sides: the tiny CNN of ``make_quantus_robustness_references.py`` (conv
3x3 3->4, ReLU, conv 3x3 4->6, ReLU, global mean, linear 6->3), on ``--size`` px RGB images
(standard normal), float32 on both sides (Quantus' default), explanation = gradient saliency
(Quantus: ``quantus.explain`` method ``Saliency``; xaijax: ``gradient`` with ``reduce="abs-sum"``).
Noise-based metrics use ``--samples`` perturbations per image on both sides (Quantus' default
is 200). Each xaijax metric is run once to compile (not timed), then timed as the median of
``--repeats`` calls; Quantus is timed the same way (its first call is also excluded).
Quantus processes a batch of up to 64 images per step (its ``batch_size``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _time(fn, repeats):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--metrics", nargs="*", default=None, help="subset of metric names (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import quantus
    import torch

    from make_quantus_robustness_references import torch_model
    from xaijax.methods import get
    from xaijax.metrics import get_method_metric

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tm = torch_model().float()
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}

    import flax.linen as nn

    class TinyCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv1")(x))
            x = nn.relu(nn.Conv(6, (3, 3), padding="VALID", name="conv2")(x))
            return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))

    params = {n: {"kernel": jnp.asarray(sd[f"{n}.weight"].transpose(2, 3, 1, 0)), "bias": jnp.asarray(sd[f"{n}.bias"])} for n in ("conv1", "conv2")}
    params["fc"] = {"kernel": jnp.asarray(sd["fc.weight"].T), "bias": jnp.asarray(sd["fc.bias"])}
    jm, jv = TinyCNN(), {"params": params}
    method = get("gradient", reduce="abs-sum")
    s = args.samples
    common = dict(disable_warnings=True, display_progressbar=False)
    per_image = {"normalise_axes": [1, 2, 3]}
    # name: (xaijax options, Quantus constructor)
    table = {
        "max-sensitivity": ({"n_samples": s}, lambda: quantus.MaxSensitivity(nr_samples=s, **common)),
        "avg-sensitivity": ({"n_samples": s}, lambda: quantus.AvgSensitivity(nr_samples=s, **common)),
        "local-lipschitz": ({"n_samples": s}, lambda: quantus.LocalLipschitzEstimate(nr_samples=s, normalise_func_kwargs=per_image, **common)),
        "ris": ({"n_samples": s}, lambda: quantus.RelativeInputStability(nr_samples=s, **common)),
        "ros": ({"n_samples": s}, lambda: quantus.RelativeOutputStability(nr_samples=s, **common)),
        "rrs": ({"n_samples": s, "layers": ("conv2",)}, lambda: quantus.RelativeRepresentationStability(nr_samples=s, layer_names=["conv2"], **common)),
        "continuity": ({}, lambda: quantus.Continuity(normalise_func_kwargs=per_image, **common)),
        "consistency": ({}, lambda: quantus.Consistency(normalise_func_kwargs=per_image, **common)),
        "mprt": ({}, lambda: quantus.MPRT(normalise_func_kwargs=per_image, **common)),
        "smooth-mprt": ({"n_samples": s}, lambda: quantus.SmoothMPRT(nr_samples=s, normalise_func_kwargs=per_image, **common)),
        "efficient-mprt": ({}, lambda: quantus.EfficientMPRT(**common)),
        "random-logit": ({}, lambda: quantus.RandomLogit(num_classes=3, normalise_func_kwargs=per_image, **common)),
        "completeness": ({}, lambda: quantus.Completeness(normalise=False, **common)),
        "non-sensitivity": ({"unit": "value"}, lambda: quantus.NonSensitivity(normalise_func_kwargs=per_image, **common)),
        "input-invariance": ({}, lambda: quantus.InputInvariance(**common)),
    }
    names = args.metrics or list(table)
    rows = []
    rng = np.random.default_rng(0)
    for n in args.images:
        x = rng.standard_normal((n, 3, args.size, args.size)).astype(np.float32)
        with torch.no_grad():
            y = tm(torch.as_tensor(x)).argmax(1).numpy()
        xj = jnp.asarray(x.transpose(0, 2, 3, 1))
        for name in names:
            opts, qmake = table[name]
            metric = get_method_metric(name, **opts)
            tx = _time(lambda: jax.block_until_ready(metric(jm, jv, method, xj, y)), args.repeats)
            qm = qmake()
            tq = _time(lambda: qm(model=tm, x_batch=x, y_batch=y, a_batch=None, explain_func=quantus.explain,
                                  explain_func_kwargs={"method": "Saliency"}, batch_size=64), args.repeats)
            row = {"metric": name, "images": n, "xaijax_s": tx, "quantus_s": tq, "speedup": tq / tx}
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {
        "what": "time per metric call, xaijax vs Quantus 0.6.0, same tiny CNN weights, float32, CPU",
        "size": args.size, "samples": s, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
                    "quantus": quantus.__version__, "device": str(jax.devices()[0])},
        "rows": rows,
    }
    if args.out:
        from xaijax.atomic import atomic_text

        atomic_text(args.out, json.dumps(res, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
