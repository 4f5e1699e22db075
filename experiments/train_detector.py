"""Train the bundled TinyDetector on the synthetic benchmark and evaluate mAP@0.5 on its test split.

    python experiments/train_detector.py --steps 800 --batch 32 --seed 0 \\
        --out weights/synthetic_detector.safetensors

What it does (deterministic given the arguments, up to floating-point reduction order):

1. Generates the first ``--train-images`` records of the synthetic ``train`` split
   (``SyntheticScenes(seed=--data-seed)``, 128x128, 12 classes) with ``--workers`` processes
   and keeps them in memory as float16 (scene generation costs ~10 ms per image, more than
   a training step per image, so a pool of scenes is drawn from rather than regenerating
   every batch). Every step draws ``--batch`` images without replacement (epoch-wise
   permutations from ``np.random.default_rng([--seed, 1])``) and applies a random symmetry of
   the square (flips and transposition; boxes follow exactly) to each.
2. Assigns targets on the stride-8 grid (:func:`xaijax.models.detector.assign_targets`:
   centre cell plus centre sampling within 1.5 cells, smaller box wins) and minimises
   :func:`xaijax.models.detector.detection_loss` (focal objectness, softmax class CE, GIoU +
   L1 box) with optax AdamW (linear warm-up, cosine decay, global-norm clipping) in a jitted
   step; BatchNorm uses batch statistics.
3. Evaluates VOC-style mAP@0.5 (all-point AP, difficult objects ignored) on the first
   ``--eval-images`` images of the ``test`` split with
   :func:`xaijax.models.detector.detect` (score >= 0.01, class-wise NMS 0.5, 100 per image).
4. Saves the variables with metadata ``arch=tiny_detector``, ``model_kwargs`` (JSON),
   ``train_config`` (JSON) and ``test_map50``; with ``--summary PATH`` also writes a JSON
   summary (per-class AP, loss history, timings, the weights file's size and sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from xaijax.data.synthetic import CLASS_NAMES, SyntheticScenes  # noqa: E402
from xaijax.metrics.detection import evaluate_detections  # noqa: E402
from xaijax.checkpoints import save_detector  # noqa: E402
from xaijax.models import detector as D  # noqa: E402

#: Detection settings used for every reported mAP (also used by tests/test_detector.py).
EVAL_SCORE_THRESHOLD = 0.01
EVAL_NMS_IOU = 0.5
EVAL_MAX_DETECTIONS = 100


# ----------------------------------------------------------------------------- data


def _generate(args: tuple[int, str, int, int]) -> tuple[np.ndarray, list, list, list]:
    seed, split, start, n = args
    ds = SyntheticScenes(seed=seed)
    recs = ds.records(split, start, n)
    return (
        np.stack([r.image for r in recs]).astype(np.float16),
        [r.boxes for r in recs],
        [r.labels for r in recs],
        [r.difficult for r in recs],
    )


def generate_split(seed: int, split: str, n: int, workers: int, desc: str) -> dict:
    """First ``n`` records of ``split``: images (n, H, W, 3) float16 plus per-image box/label/difficult lists."""
    chunk = 50
    jobs = [(seed, split, s, min(chunk, n - s)) for s in range(0, n, chunk)]
    images, boxes, labels, difficult = [], [], [], []
    with tqdm(total=n, desc=desc, unit="img") as bar:
        if workers > 1:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers) as pool:
                for out in pool.imap(_generate, jobs):
                    images.append(out[0]); boxes += out[1]; labels += out[2]; difficult += out[3]  # noqa: E702
                    bar.update(len(out[1]))
        else:
            for job in jobs:
                out = _generate(job)
                images.append(out[0]); boxes += out[1]; labels += out[2]; difficult += out[3]  # noqa: E702
                bar.update(len(out[1]))
    return {"images": np.concatenate(images), "boxes": boxes, "labels": labels, "difficult": difficult}


def dihedral(image: np.ndarray, boxes: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply symmetry ``code`` in 0..7 of the square (bit 0: flip x, bit 1: flip y, bit 2: transpose).

    ``image`` (S, S, 3); ``boxes`` (K, 4) ``[x0, y0, x1, y1)``; returns transformed copies.
    """
    size = image.shape[1]
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if code & 1:
        image = image[:, ::-1]
        b[:, [0, 2]] = size - b[:, [2, 0]]
    if code & 2:
        image = image[::-1]
        b[:, [1, 3]] = size - b[:, [3, 1]]
    if code & 4:
        image = image.transpose(1, 0, 2)
        b = b[:, [1, 0, 3, 2]]
    return image, b


class Sampler:
    """Deterministic batches from an in-memory pool: epoch permutations + random symmetries."""

    def __init__(self, pool: dict, batch: int, seed: int):
        self.pool = pool
        self.batch = batch
        self.rng = np.random.default_rng([seed, 1])
        self.order = np.zeros((0,), np.int64)

    def next(self) -> tuple[np.ndarray, list, list]:
        n = self.pool["images"].shape[0]
        while self.order.size < self.batch:
            self.order = np.concatenate([self.order, self.rng.permutation(n)])
        idx, self.order = self.order[: self.batch], self.order[self.batch :]
        codes = self.rng.integers(0, 8, self.batch)
        images, boxes, labels = [], [], []
        for i, c in zip(idx, codes):
            im, b = dihedral(self.pool["images"][i], self.pool["boxes"][i], int(c))
            images.append(im)
            boxes.append(b)
            labels.append(self.pool["labels"][i])
        return np.stack(images).astype(np.float32), boxes, labels


# ----------------------------------------------------------------------------- evaluation


def predict(model: D.TinyDetector, variables, images: np.ndarray, batch: int = 100) -> list[dict]:
    """Detections for images (n, H, W, 3) with the evaluation settings."""
    fn = jax.jit(lambda v, x: D.proposals(model, v, x))
    out = []
    for s in range(0, images.shape[0], batch):
        props = fn(variables, jnp.asarray(images[s : s + batch], jnp.float32))
        out += D.detect(
            props,
            score_threshold=EVAL_SCORE_THRESHOLD,
            iou_threshold=EVAL_NMS_IOU,
            max_detections=EVAL_MAX_DETECTIONS,
            image_size=images.shape[1:3],
        )
    return out


def evaluate(model: D.TinyDetector, variables, data: dict, batch: int = 100):
    """VOC mAP@0.5 of ``model`` on ``data`` (as returned by :func:`generate_split`)."""
    dets = predict(model, variables, data["images"], batch)
    gts = [{"boxes": b, "labels": l, "difficult": d} for b, l, d in zip(data["boxes"], data["labels"], data["difficult"])]
    return evaluate_detections(dets, gts, model.num_classes, 0.5)


# ----------------------------------------------------------------------------- training


def make_step(model: D.TinyDetector, tx: optax.GradientTransformation):
    tmodel = model.clone(train=True)

    def loss_fn(params, batch_stats, x, targets):
        raw, upd = tmodel.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
        loss, aux = D.detection_loss(raw, targets, model.num_classes)
        return loss, (aux, upd["batch_stats"])

    @jax.jit
    def step(params, batch_stats, opt_state, x, targets):
        (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, aux

    return step


def make_optimizer(steps: int, lr: float, warmup: int, weight_decay: float) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(5.0), optax.adamw(sched, weight_decay=weight_decay))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    ap.add_argument("--data-seed", type=int, default=0, help="SyntheticScenes seed (the benchmark uses 0)")
    ap.add_argument("--out", default="weights/synthetic_detector.safetensors")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--head-width", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs=3, default=(1, 1, 1))
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="processes generating scenes")
    ap.add_argument("--summary", default=None, help="optional JSON summary path")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "train_images", "width", "head_width", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.eval_images <= 1000:
        raise SystemExit(f"--eval-images must be in [0, 1000], got {args.eval_images}")

    t_start = time.perf_counter()
    ds = SyntheticScenes(seed=args.data_seed)
    size = ds.size
    train = generate_split(args.data_seed, "train", args.train_images, args.workers, "train scenes")
    test = generate_split(args.data_seed, "test", args.eval_images, args.workers, "test scenes") if args.eval_images else None
    t_data = time.perf_counter() - t_start

    model = D.TinyDetector(num_classes=ds.num_classes, width=args.width, layers=tuple(args.layers), head_width=args.head_width)
    variables = D.init_variables(model, args.seed, (size, size))
    params, batch_stats = variables["params"], variables["batch_stats"]
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    tx = make_optimizer(args.steps, args.lr, args.warmup, args.weight_decay)
    opt_state = tx.init(params)
    step = make_step(model, tx)
    sampler = Sampler(train, args.batch, args.seed)

    t_train = time.perf_counter()
    history = []
    ema = None
    with tqdm(range(args.steps), desc="train", unit="step") as bar:
        for i in bar:
            x, boxes, labels = sampler.next()
            t = D.assign_targets(boxes, labels, (size, size))
            params, batch_stats, opt_state, loss, aux = step(params, batch_stats, opt_state, jnp.asarray(x), t)
            if i % 10 == 0 or i == args.steps - 1:
                loss = float(loss)
                if not np.isfinite(loss):
                    raise SystemExit(f"loss became {loss} at step {i}")
                ema = loss if ema is None else 0.8 * ema + 0.2 * loss
                aux = {k: round(float(v), 4) for k, v in aux.items()}
                history.append({"step": i, "loss": round(loss, 4), **aux})
                bar.set_postfix(loss=f"{ema:.3f}", **{k: f"{v:.3f}" for k, v in aux.items()})
    jax.block_until_ready(params)
    t_train = time.perf_counter() - t_train
    variables = {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats)}

    result = None
    t_eval = time.perf_counter()
    if test is not None:
        result = evaluate(model, variables, test)
        print(f"test mAP@0.5 ({args.eval_images} images): {result.map:.4f}")
        for c, (name, a) in enumerate(zip(CLASS_NAMES, result.ap)):
            print(f"  {c:2d} {name:10s} AP {a:.4f}  (npos {int(result.npos[c])})")
    t_eval = time.perf_counter() - t_eval

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "train_config": json.dumps(config, sort_keys=True),
        "data": json.dumps({"dataset": "SyntheticScenes", "seed": args.data_seed, "size": size, "train": [0, args.train_images]}),
        "preprocess": "none",
    }
    if result is not None:
        meta["test_map50"] = f"{result.map:.6f}"
        meta["test_images"] = str(args.eval_images)
    save_detector(out, model, variables, **meta)
    wall = time.perf_counter() - t_start
    summary = {
        "command": "python experiments/train_detector.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config,
        "model_kwargs": model.model_kwargs(),
        "num_params": n_params,
        "test_images": args.eval_images,
        "test_map50": None if result is None else result.map,
        "test_ap50": None if result is None else {n: float(a) for n, a in zip(CLASS_NAMES, result.ap)},
        "test_npos": None if result is None else {n: int(p) for n, p in zip(CLASS_NAMES, result.npos)},
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1), "total": round(wall, 1)},
        "history": history,
        "weights": {"path": str(out), "bytes": out.stat().st_size, "sha256": _sha256(str(out))},
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
    }
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    print(f"saved {out} ({summary['weights']['bytes']} bytes, sha256 {summary['weights']['sha256']}); total {wall:.0f} s")
    return summary


if __name__ == "__main__":
    main()
