"""Token attributions per second for BERT shapes (issue 24's benchmark).

    python experiments/bench_text.py                      # bert-tiny sizes, T=128, batch 1 and 32, IG 50 steps
    python experiments/bench_text.py --config bert-base-uncased --batches 1,32   # the issue's shapes (GPU-sized)
    python experiments/bench_text.py --quick              # smoke test: test-tiny, T=16, batch 1 and 4, IG 8 steps

What is timed (one process, random float32 weights from ``model.init`` with a fixed key,
random token ids, every sentence padded to ``--seq-len`` with a different real length, after
one warm-up call per program, median over ``--repeats``):

* **IG vmapped vs loop**: integrated gradients (``--steps`` nodes, right Riemann rule, ``[PAD]``
  baseline) of a batch of B sentences as *one* jitted :func:`xaijax.methods.text.token_relevance`
  call (sentences vmapped, steps vmapped or chunked by ``--ig-chunk``), against a Python loop
  over the B sentences calling the same function jitted for one sentence. Reported as token
  attributions (sentences) per second and the speed-up. ``--sentence-chunk C`` adds the same
  single call with C sentences per vmapped group (``lax.map`` over the groups: the loop's
  working set inside one program).
* **AttnLRP / gradient**: ``attnlrp`` (default rules) and the plain ``gradient`` method on the
  same batch, both through the jitted core; the ratio is paired per repeat (each repeat times
  the gradient, then AttnLRP) and its median reported. Target <= 1.5x.

DESIGN.md section 6's rules: ratios measured side by side; the load average before and after is
recorded (a shared 2-core CPU makes absolute times noisy). The default sizes are chosen to
finish in a few minutes on such a CPU; BERT-base at T=128 with batch 32 and 50 IG steps is
1,600 forward-backward passes of BERT-base (hours on 2 cores): run it where there is an
accelerator. The JSON records the shapes used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.atomic import atomic_text
from xaijax.methods.text import ig_baseline, text_method, token_relevance
from xaijax.models import bert
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import loadavg as _loadavg  # noqa: E402  (experiments/machine.py: one home for machine facts)

OUT = Path(__file__).resolve().parent / "results" / "bench_text.json"




def _block(x):
    return jax.block_until_ready(x)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    _block(fn())
    return time.perf_counter() - t0


def _batch(rng: np.random.Generator, n: int, t: int, vocab: int):
    """Random ids with [CLS]=101-style specials at their places; real lengths from t/2 to t."""
    ids = np.zeros((n, t), np.int32)
    tt = np.zeros((n, t), np.int32)
    am = np.zeros((n, t), np.int32)
    cls, sep = min(101, vocab - 2), min(102, vocab - 1)
    lengths = np.linspace(max(4, t // 2), t, n).astype(int) if n > 1 else np.array([t])
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(5, vocab, k)
        mid = k // 2
        ids[i, 0], ids[i, mid], ids[i, k - 1] = cls, sep, sep
        tt[i, mid + 1 : k] = 1
        am[i, :k] = 1
    return ids, tt, am, (cls, sep)


def bench(config: str, seq_len: int, batches: list[int], steps: int, repeats: int, ig_chunk: int | None, loop: bool,
          sentence_chunk: int | None = None, with_ig: bool = True) -> dict:
    model = bert.build(config, num_labels=3)
    rng = np.random.default_rng(0)
    t_max = max(batches)
    ids, tt, am, specials = _batch(rng, t_max, seq_len, model.vocab_size)
    t0 = time.perf_counter()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(ids[:1]))
    init_s = time.perf_counter() - t0
    ig = text_method("integrated-gradients", steps=steps, chunk=ig_chunk)
    grad = text_method("gradient")
    lrp = text_method("attnlrp")
    core = jax.jit(token_relevance, static_argnums=(0, 1), static_argnames="chunk")
    results = []
    for b in batches:
        la0 = _loadavg()
        x = dict(input_ids=jnp.asarray(ids[:b]), token_type_ids=jnp.asarray(tt[:b]), attention_mask=jnp.asarray(am[:b]))
        target = jnp.zeros((b,), jnp.int32)
        base = ig_baseline(model, variables, x, "pad", special_ids=specials)
        row: dict = {"batch": b, "seq_len": seq_len, "real_lengths": am[:b].sum(1).tolist()}

        def ig_all():
            return core(ig, model, variables, x["input_ids"], x["token_type_ids"], x["attention_mask"], target, base)

        def ig_chunked():
            return core(ig, model, variables, x["input_ids"], x["token_type_ids"], x["attention_mask"], target, base,
                        chunk=sentence_chunk)

        def ig_one(i):
            s = slice(i, i + 1)
            return core(ig, model, variables, x["input_ids"][s], x["token_type_ids"][s], x["attention_mask"][s], target[s], base[s])

        def ig_loop():
            return [ig_one(i) for i in range(b)]

        def run(m):
            return lambda: core(m, model, variables, x["input_ids"], x["token_type_ids"], x["attention_mask"], target, None)

        first = {}
        chunked = ig_chunked if sentence_chunk is not None and sentence_chunk < b else None
        for name, fn in (("ig_vmapped", ig_all if with_ig else None), ("ig_loop", ig_loop if with_ig and loop and b > 1 else None),
                         ("ig_chunked", chunked if with_ig else None),
                         ("gradient", run(grad)), ("attnlrp", run(lrp))):
            if fn is not None:
                first[name] = _timed(fn)  # trace + compile + one run
        times: dict[str, list[float]] = {k: [] for k in first}
        ratios = []
        for _ in range(repeats):
            if "ig_vmapped" in times:
                times["ig_vmapped"].append(_timed(ig_all))
            if "ig_loop" in times:
                times["ig_loop"].append(_timed(ig_loop))
            if "ig_chunked" in times:
                times["ig_chunked"].append(_timed(ig_chunked))
            g = _timed(run(grad))
            a = _timed(run(lrp))
            times["gradient"].append(g)
            times["attnlrp"].append(a)
            ratios.append(a / g)
        med = {k: statistics.median(v) for k, v in times.items()}
        row.update(
            first_call_s={k: round(v, 4) for k, v in first.items()},
            median_s={k: round(v, 5) for k, v in med.items()},
            attnlrp_over_gradient=round(statistics.median(ratios), 3),
            attnlrp_attributions_per_s=round(b / med["attnlrp"], 3),
            gradient_attributions_per_s=round(b / med["gradient"], 3),
        )
        if "ig_vmapped" in med:
            row["ig_vmapped_attributions_per_s"] = round(b / med["ig_vmapped"], 3)
        if "ig_loop" in med:
            row["ig_loop_attributions_per_s"] = round(b / med["ig_loop"], 3)
            row["ig_vmapped_speedup_over_loop"] = round(med["ig_loop"] / med["ig_vmapped"], 3)
        if "ig_chunked" in med:
            row["sentence_chunk"] = sentence_chunk
            row["ig_chunked_attributions_per_s"] = round(b / med["ig_chunked"], 3)
            if "ig_loop" in med:
                row["ig_chunked_speedup_over_loop"] = round(med["ig_loop"] / med["ig_chunked"], 3)
        row["loadavg_before"], row["loadavg_after"] = la0, _loadavg()
        print(json.dumps(row))
        results.append(row)
    shapes = {k: getattr(model, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    return {"config": config, "model_shapes": shapes, "init_s": round(init_s, 3), "with_ig": with_ig, "ig_steps": steps, "ig_chunk": ig_chunk,
            "sentence_chunk": sentence_chunk, "rows": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bert-tiny", help="xaijax.models.bert.CONFIGS name (default bert-tiny; bert-base-uncased for the issue's shapes)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradients steps")
    p.add_argument("--ig-chunk", type=int, default=None, help="IG steps per vmapped chunk (default: all at once)")
    p.add_argument("--sentence-chunk", type=int, default=None,
                   help="also time IG with this many sentences per vmapped group (lax.map over groups) in one call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-ig", action="store_true", help="time only the gradient and AttnLRP (e.g. BERT-base at batch 32 on a CPU)")
    p.add_argument("--no-loop", action="store_true", help="skip the Python loop over sentences")
    p.add_argument("--quick", action="store_true", help="smoke test: test-tiny, T=16, batch 1 and 4, 8 steps, 2 repeats")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    if a.quick:
        a.config, a.seq_len, a.batches, a.steps, a.repeats = "test-tiny", 16, "1,4", 8, 2
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or a.seq_len < 4 or a.steps < 1 or a.repeats < 1:
        p.error("batches, --seq-len (>= 4), --steps and --repeats must be positive")
    res = bench(a.config, a.seq_len, batches, a.steps, a.repeats, a.ig_chunk, not a.no_loop, a.sentence_chunk, not a.no_ig)
    res.update(
        quick=bool(a.quick),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
