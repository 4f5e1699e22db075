"""Evaluation experiments: the tables of the research, resumable and data-parallel.

``run_experiment(EvalConfig(...))`` evaluates each method on a dataset, one results store per
method (:mod:`xaijax.evaluation.store`), maps computed with the method jitted once and
sharded over the local devices (:mod:`xaijax.evaluation.parallel`), and writes
``results.{md,csv,json}`` (one row per method) atomically at the end.

Experiments
-----------
``pointing``
    Pointing game (TorchRay protocol) and mIoU — and every other registered *pair metric*
    (:func:`xaijax.metrics.names`) — over (image, class) pairs: every class present in the
    image (classes whose every instance is marked difficult are skipped, as in VOC), or with
    ``seeds="predicted"`` only those the model also predicts (sigmoid of the logit > 0.5, the
    multi-label heads of the VOC/COCO/synthetic models). The class region is the union of the
    class's instance masks (VOC: its boxes). DIF: pairs whose class covers less than a quarter
    of the image while another class is present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import checkpoints, data, metrics
from xaijax import methods as methods_registry
from xaijax.evaluation.datasets import open_dataset
from xaijax.evaluation.parallel import DataParallel, make_mesh
from xaijax.evaluation.store import ResultsStore
from xaijax.evaluation.tables import write_tables
from xaijax.models.preprocess import normalize

__all__ = ["EXPERIMENTS", "EvalConfig", "run_experiment", "image_pairs"]

EXPERIMENTS = ("pointing",)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation run (see the module docstring for the experiments).

    ``images`` limits how many images are evaluated (the first ones of the split, default all);
    it is not part of the stored configuration, so a run can be extended later.
    ``shard_index``/``shard_count`` evaluate every ``shard_count``-th image starting at
    ``shard_index`` (one process per host in multi-host runs).
    """

    experiment: str
    out: Path
    methods: tuple[str, ...]
    dataset: str = "synthetic"
    data_dir: str | None = None
    split: str | None = None
    size: int | None = None
    arch: str | None = None
    weights: str | None = None
    preprocess: str | None = None
    hparams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    seeds: str = "labels"
    batch: int = 16
    devices: int | None = None
    images: int | None = None
    shard_index: int = 0
    shard_count: int = 1


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_pairs(record: data.Record, predicted: np.ndarray | None = None) -> list[tuple[int, np.ndarray, bool]]:
    """(class, region, dif) for every pair of one image (see the module docstring)."""
    present = data.present_classes(record, include_difficult=False)
    n_present = len(data.present_classes(record, include_difficult=True))
    out = []
    for c in present:
        if predicted is not None and not predicted[int(c)]:
            continue
        region = data.class_mask(record, int(c), include_difficult=True)
        out.append((int(c), region, bool(metrics.is_difficult_pair(region.mean(), n_present))))
    return out


def _check(cfg: EvalConfig) -> None:
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {cfg.experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    if cfg.seeds not in ("labels", "predicted"):
        raise ValueError(f"seeds must be 'labels' (all ground-truth classes, L) or 'predicted' (P); got {cfg.seeds!r}")
    if cfg.batch < 1:
        raise ValueError(f"--batch must be at least 1; got {cfg.batch}")
    if cfg.images is not None and cfg.images < 1:
        raise ValueError(f"--images must be at least 1; got {cfg.images}")
    if not cfg.methods:
        raise ValueError("no methods given")
    if not 0 <= cfg.shard_index < cfg.shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count); got {cfg.shard_index} of {cfg.shard_count}")
    for m in cfg.methods:
        methods_registry.get(m)  # readable error for unknown names
        k = methods_registry.kind(m)
        if k != "attribution":
            raise ValueError(f"method {m!r} is of kind {k!r}; the {cfg.experiment} experiment evaluates image attributions")


def _load_model(cfg: EvalConfig):
    if cfg.weights is None:
        if cfg.dataset != "synthetic":
            raise ValueError("--weights is required (the bundled weights only fit the synthetic dataset)")
        from xaijax.demo import weights_dir

        path = weights_dir() / "synthetic_vgg16.safetensors"
    else:
        path = Path(cfg.weights)
    model, variables, info = checkpoints.load(cfg.arch, path)
    convention = cfg.preprocess or info.get("metadata", {}).get("preprocess") or "torchvision"
    return path, model, variables, convention


def run_experiment(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) ``cfg``; returns the table that is also written to ``cfg.out``."""
    from tqdm import tqdm

    _check(cfg)
    ds = open_dataset(cfg.dataset, cfg.data_dir, cfg.split, cfg.size)
    wpath, model, variables, convention = _load_model(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = len(ds.class_names)
    n_images = len(ds) if cfg.images is None else min(cfg.images, len(ds))
    indices = list(range(cfg.shard_index, n_images, cfg.shard_count))
    mesh = make_mesh(cfg.devices)
    pair_metrics = {n: metrics.get(n) for n in metrics.names()}
    base_config = {
        "experiment": cfg.experiment,
        "dataset": cfg.dataset,
        "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
        "split": cfg.split,
        "size": cfg.size,
        "arch": type(model).__name__,
        "weights_sha256": _file_digest(wpath),
        "preprocess": convention,
        "seeds": cfg.seeds,
        "metrics": sorted(pair_metrics),
        "shard": [cfg.shard_index, cfg.shard_count],
    }
    forward = jax.jit(lambda v, x: model.apply(v, x))
    rows = []
    for name in cfg.methods:
        hp = cfg.hparams.get(name, {})
        store = ResultsStore(out / f"{cfg.experiment}-{name}.jsonl", {**base_config, "method": name, "hparams": hp})
        todo = [i for i in indices if i not in store.done()]
        method = methods_registry.get(name, **hp)
        explain = DataParallel(lambda v, x, t, method=method: method(model, v, x, t), mesh)
        bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=f"{cfg.experiment} {name}", unit="img", disable=not progress)
        try:
            for s in range(0, len(todo), cfg.batch):
                chunk = todo[s : s + cfg.batch]
                store.append(_evaluate_chunk(ds, chunk, model, variables, convention, explain, forward, pair_metrics, cfg))
                bar.update(len(chunk))
        finally:
            bar.close()
        rows.append(_summarize(name, hp, store, pair_metrics, num_classes))
    result = {
        "experiment": cfg.experiment,
        "dataset": {"name": cfg.dataset, "split": cfg.split, "size": cfg.size, "images": len(indices)},
        "model": {"arch": base_config["arch"], "weights": str(wpath), "weights_sha256": base_config["weights_sha256"]},
        "seeds": cfg.seeds,
        "rows": rows,
    }
    header = [
        f"# xaijax eval {cfg.experiment} — {cfg.dataset}",
        "",
        f"Model {base_config['arch']} (`{wpath.name}`, sha256 {base_config['weights_sha256'][:12]}), preprocessing "
        f"{convention}; {len(indices)} images; seeds {cfg.seeds}; metrics {', '.join(sorted(pair_metrics))}.",
    ]
    write_tables(out, result["rows"], header, result)
    return result


def _evaluate_chunk(ds, chunk, model, variables, convention, explain, forward, pair_metrics, cfg) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    records = []
    for i in chunk:
        try:
            records.append((i, ds[i]))
        except (OSError, ValueError) as e:  # undecodable image: counted, never fatal
            rows.append({"index": i, "skipped": f"{type(e).__name__}: {e}"})
    if not records:
        return rows
    x = np.asarray(normalize(jnp.asarray(np.stack([r.image for _, r in records])), convention))
    predicted = None
    if cfg.seeds == "predicted":
        predicted = np.asarray(forward(variables, x)) > 0.0
    per_image = [image_pairs(r, None if predicted is None else predicted[k]) for k, (_, r) in enumerate(records)]
    img_of = np.asarray([k for k, ps in enumerate(per_image) for _ in ps], np.int64)
    classes = np.asarray([c for ps in per_image for c, _, _ in ps], np.int64)
    values: dict[str, np.ndarray] = {}
    if len(classes):
        maps = np.concatenate(
            [explain(variables, x[img_of[s : s + cfg.batch]], classes[s : s + cfg.batch].astype(np.int32)) for s in range(0, len(classes), cfg.batch)]
        )
        batch = metrics.PairBatch(
            maps=maps,
            regions=np.stack([reg for ps in per_image for _, reg, _ in ps]),
            classes=classes,
            dif=np.asarray([d for ps in per_image for _, _, d in ps], bool),
        )
        for m in pair_metrics.values():
            values.update({k: np.asarray(v) for k, v in m(batch).items()})
    for k, (i, r) in enumerate(records):
        sel = np.flatnonzero(img_of == k)
        pairs = [
            {"class": int(classes[p]), "dif": bool(per_image[k][j][2]), **{n: _py(v[p]) for n, v in values.items()}}
            for j, p in enumerate(sel)
        ]
        rows.append({"index": i, "image_id": r.image_id, "pairs": pairs})
    return rows


def _py(v: Any) -> Any:
    v = np.asarray(v)
    return bool(v) if v.dtype == bool else float(v)


def _summarize(name: str, hp: dict[str, Any], store: ResultsStore, pair_metrics, num_classes: int) -> dict[str, Any]:
    stored = list(store.rows())
    pairs = [p for r in stored for p in r.get("pairs", [])]
    row: dict[str, Any] = {
        "method": name,
        "hparams": ",".join(f"{k}={v}" for k, v in sorted(hp.items())),
        "images": sum(1 for r in stored if "skipped" not in r),
        "skipped_images": sum(1 for r in stored if "skipped" in r),
        "pairs": len(pairs),
    }
    if not pairs:
        return row
    classes = np.asarray([p["class"] for p in pairs], np.int64)
    dif = np.asarray([p["dif"] for p in pairs], bool)
    for m in pair_metrics.values():
        keys = [k for k in pairs[0] if k not in ("class", "dif")]
        vals = {k: np.asarray([p[k] for p in pairs]) for k in keys}
        row.update(m.summarize(vals, classes, dif, num_classes))
    return row
