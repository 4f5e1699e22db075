"""Evaluation experiments: the tables of the research, resumable and data-parallel.

``run_experiment(EvalConfig(...))`` evaluates each method on a dataset, one results store per
method (:mod:`xaijax.evaluation.store`), maps computed with the method jitted once and
sharded over the local devices (:mod:`xaijax.evaluation.parallel`), and writes
``results.{md,csv,json}`` atomically at the end: one row per method of *every* results store
in the output folder with this configuration (earlier runs with other ``--methods`` included),
over this run's image selection, with the run(s) that computed each row (each stored image
row records its run's start time), and a legend of the columns.

Experiments
-----------
``pointing``
    Pointing game (TorchRay protocol) and mIoU — and every other registered *pair metric*
    (:func:`xaijax.metrics.names`) — over (image, class) pairs: every class present in the
    image (classes whose every instance is marked difficult are skipped, as in VOC), or with
    ``seeds="predicted"`` only those the model also predicts (sigmoid of the logit > 0.5, the
    multi-label heads of the VOC/COCO/synthetic models). The class region is the union of the
    class's instance masks (VOC: its boxes). DIF: pairs whose class's boxes cover less than a
    quarter of the image while another class is present.
``segmentation``
    Foreground/background mIoU (ImageNet-segmentation protocol: the map thresholded at its
    mean, IoU of foreground and of background with the ground truth, averaged).
``density``
    Positive and negative map density relative to the object region (UCAG; see
    :mod:`xaijax.metrics.density` for the definition xaijax uses).
``insdel``
    Deletion and insertion AUC (UCAG protocol, :mod:`xaijax.metrics.faithfulness`); all steps
    of one image in one batched forward pass. Writes ``curves.png`` (mean curves per method).
``region-insertion``
    MoRF region insertion 1..20 % of the pixels: top-1 accuracy per step and its AUC; writes
    ``curves.png``.
``sanity``
    Cascading randomisation (Adebayo et al. 2018) from the top layer down: Spearman rank
    correlation (signed and absolute) and SSIM between the trained model's map and each
    step's, per layer; writes ``sanity.png`` (per-layer curves), ``sanity-METHOD.png`` (the
    first image's maps as the layers are randomised) and a per-layer table ``sanity_layers.csv``.

The evaluation catalogue (Quantus' families; ``xaijax metrics`` lists every metric with its
protocol, ``--metrics`` picks some of an experiment's):

``localisation``
    Relevance mass and rank accuracy, top-k intersection, attribution localisation, ROC AUC of
    the map against the class region (pair metrics); focus (the method on mosaics of four
    synthetic-benchmark images, a method metric).
``complexity``
    Sparseness (Gini), complexity (entropy), effective complexity (pair metrics).
``faithfulness``
    Faithfulness correlation and estimate, monotonicity (and its correlation), pixel-flipping,
    region perturbation, selectivity, sensitivity-n, IROF, infidelity, ROAD, sufficiency,
    average drop and increase in confidence (model-based metrics: perturbed images through the
    classifier, batched). Sufficiency compares each pair with the other pairs of its batch of
    ``--batch`` images (its value depends on them by definition).
``robustness``, ``randomisation``, ``axioms``
    *Method metrics*, which run the explanation method again: on perturbed inputs
    (max/avg sensitivity, local Lipschitz, continuity, consistency, RIS/ROS/RRS), on a model
    with randomised parameters or another class (MPRT and its smooth/efficient variants,
    random logit), and the axioms (completeness, non-sensitivity, input invariance).

Targets (``seeds``): ``"labels"`` (L) explains every ground-truth class of an image against
its region; ``"predicted"`` (P) only those the model predicts (sigmoid > 0.5);
``"top1"`` explains the model's top-1 class against the union of all objects (one pair per
image: the single-label ImageNet protocols of the segmentation, deletion/insertion and
sanity experiments). ``imagenet-seg`` always uses ``"top1"`` (its masks carry no class).

Maps are computed data-parallel over the local devices; the model-based metrics
(deletion/insertion, region insertion) and the sanity check's randomised maps run jitted on
the default device.

With ``distributed=True`` (``xaijax eval --distributed``) the processes of a
:func:`jax.distributed.initialize` run share the work: maps on one mesh over all their
devices, each process evaluating its block of every step of ``batch x processes`` images,
process 0 writing the one results store per method and the tables
(:mod:`xaijax.evaluation.distributed`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import checkpoints, data, imageops, metrics
from xaijax import methods as methods_registry
from xaijax.atomic import atomic_bytes, atomic_text
from xaijax.checkpoints.input_size import model_input_size
from xaijax.evaluation import distributed as dist
from xaijax.evaluation.datasets import open_dataset
from xaijax.evaluation.parallel import DataParallel, make_mesh
from xaijax.evaluation.store import ResultsStore, StoreMismatchError, latest_rows, read_store
from xaijax.evaluation.tables import metric_descriptions, write_tables
from xaijax.methods import CLASSIFIER_KINDS
from xaijax.models import entry_points, preprocess
from xaijax.models.init import random_variables
from xaijax.models.preprocess import normalize

__all__ = ["EXPERIMENTS", "EvalConfig", "run_experiment", "experiment_metrics", "image_pairs", "map_batches", "check_classes"]

#: experiment -> (pair metrics, model-based metrics, method metrics); ``sanity`` is run on its own.
#: The catalogue experiments (``localisation`` ... ``axioms``) run every metric of their family;
#: ``EvalConfig.metrics`` (``--metrics``) picks a subset.
EXPERIMENT_METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "pointing": (("pointing-game", "miou", "energy-pointing"), (), ()),
    "segmentation": (("fgbg-miou",), (), ()),
    "density": (("map-density",), (), ()),
    "insdel": ((), ("deletion", "insertion"), ()),
    "region-insertion": ((), ("region-insertion",), ()),
    "sanity": ((), (), ()),
    "localisation": (
        ("relevance-mass-accuracy", "relevance-rank-accuracy", "top-k-intersection", "attribution-localisation", "auc"),
        (),
        ("focus",),
    ),
    "complexity": (("sparseness", "complexity", "effective-complexity"), (), ()),
    "faithfulness": (
        (),
        (
            "faithfulness-correlation", "faithfulness-estimate", "monotonicity", "monotonicity-correlation",
            "pixel-flipping", "region-perturbation", "selectivity", "sensitivity-n", "irof", "infidelity", "road",
            "sufficiency", "average-drop", "increase-in-confidence",
        ),
        (),
    ),
    "robustness": (
        (),
        (),
        ("max-sensitivity", "avg-sensitivity", "local-lipschitz", "continuity", "consistency", "ris", "ros", "rrs"),
    ),
    "randomisation": ((), (), ("mprt", "smooth-mprt", "efficient-mprt", "random-logit")),
    "axioms": ((), (), ("completeness", "non-sensitivity", "input-invariance")),
}
EXPERIMENTS = tuple(EXPERIMENT_METRICS)
SEEDS = ("labels", "predicted", "top1")


PICKS = ("first", "spread")


def pick_images(total: int, n: int | None, pick: str = "first") -> list[int]:
    """Dataset indices of the ``n`` images to evaluate out of ``total`` (all when ``n`` is None).

    ``"first"``: ``0 .. n-1``. ``"spread"``: ``floor(k * total / n)`` for ``k = 0 .. n-1``,
    evenly spaced and distinct, so a class-ordered split contributes from every part."""
    if n is None or n >= total:
        return list(range(total))
    if pick == "first":
        return list(range(n))
    if pick == "spread":
        return [k * total // n for k in range(n)]
    raise ValueError(f"pick must be one of {', '.join(PICKS)}; got {pick!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation run (see the module docstring for the experiments).

    ``images`` limits how many images are evaluated (default all); it is not part of the stored
    configuration, so a run can be extended later. ``pick`` says which: ``"first"`` (the first
    ``images`` of the split; extending the count evaluates only the new ones) or ``"spread"``
    (``images`` indices evenly spaced over the split, :func:`pick_images`): for splits stored in
    class order, such as an ImageNet validation folder (50 images per class, class by class),
    where the first 100 images are two classes.
    ``shard_index``/``shard_count`` evaluate every ``shard_count``-th image starting at
    ``shard_index`` (one process per host in multi-host runs without a coordinator, merged
    with ``xaijax eval-merge``). ``distributed`` splits the run over the processes of an
    initialised :func:`jax.distributed.initialize` run instead (see the module docstring;
    not part of the stored configuration: a distributed run and a single-process run write
    and resume the same stores). ``metrics`` runs only these of
    the experiment's metrics (:func:`experiment_metrics` lists them); ``metric_options`` sets a
    metric's fields (``{"max-sensitivity": {"n_samples": 10}}``). Both are part of the stored
    configuration.
    """

    experiment: str
    out: Path
    methods: tuple[str, ...]
    dataset: str = "synthetic"
    data_dir: str | None = None
    boxes_dir: str | None = None
    split: str | None = None
    size: int | None = None
    arch: str | None = None
    weights: str | None = None
    model: str | None = None  # the user's own model, package.module:factory (instead of weights)
    preprocess: str | None = None
    hparams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    seeds: str = "labels"
    pointing_smooth: bool = True
    batch: int = 16
    devices: int | None = None
    images: int | None = None
    pick: str = "first"
    shard_index: int = 0
    shard_count: int = 1
    distributed: bool = False
    crf: bool = False
    metrics: tuple[str, ...] | None = None  # a subset of the experiment's metrics (default: all of them)
    metric_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # metric -> settings


def experiment_metrics(experiment: str) -> tuple[str, ...]:
    """Every metric an experiment scores (pair, model-based and method metrics, in that order)."""
    if experiment not in EXPERIMENT_METRICS:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    pair, model, method = EXPERIMENT_METRICS[experiment]
    return pair + model + method


def _selected_metrics(cfg: EvalConfig) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The experiment's (pair, model, method) metric names, restricted to ``cfg.metrics``."""
    groups = EXPERIMENT_METRICS[cfg.experiment]
    if cfg.metrics is None:
        return groups
    wanted = set(cfg.metrics)
    return tuple(tuple(n for n in g if n in wanted) for g in groups)  # type: ignore[return-value]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_pairs(record: data.Record, predicted: np.ndarray | None = None, top1: int | None = None) -> list[tuple[int, np.ndarray, bool]]:
    """(class, region, dif) for every pair of one image (see the module docstring).

    ``predicted``: (K,) bool, keep only predicted classes; ``top1``: one pair, that class
    against the union of all objects.
    """
    if top1 is not None:
        region = record.masks.any(0) if len(record.masks) else np.zeros(record.image.shape[:2], bool)
        return [(int(top1), region, False)]
    present = data.present_classes(record, include_difficult=False)
    n_present = len(data.present_classes(record, include_difficult=True))
    out = []
    for c in present:
        if predicted is not None and not predicted[int(c)]:
            continue
        region = data.class_mask(record, int(c), include_difficult=True)
        box_area = data.class_box_mask(record, int(c), include_difficult=True).mean()  # the DIF rule is about boxes
        out.append((int(c), region, bool(metrics.is_difficult_pair(box_area, n_present))))
    return out


def model_size(cfg: EvalConfig, model: Any, info: dict[str, Any]) -> int:
    """Side of the square model input (:func:`xaijax.checkpoints.input_size.model_input_size`):
    ``cfg.size`` (which must agree with a ViT's fixed ``image_size``), else the model's fixed
    ``image_size``, else the size the checkpoint records, else 128 (synthetic) or 224."""
    return model_input_size(model, info, cfg.size, 128 if cfg.dataset == "synthetic" else 224)


def _check(cfg: EvalConfig) -> None:
    if cfg.size is not None and cfg.size < 1:
        raise ValueError(f"--size must be a positive number of pixels; got {cfg.size}")
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {cfg.experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    if cfg.metrics is not None:
        offered = experiment_metrics(cfg.experiment)
        bad = [m for m in cfg.metrics if m not in offered]
        if not cfg.metrics or bad:
            raise ValueError(
                f"--metrics {','.join(bad) if bad else '(empty)'}: the {cfg.experiment!r} experiment scores "
                f"{', '.join(offered) if offered else 'no selectable metrics'}"
            )
    if "focus" in _selected_metrics(cfg)[2] and cfg.dataset != "synthetic":
        raise ValueError(
            "focus builds its mosaics from the synthetic benchmark's images and classes, so it scores models of the "
            f"synthetic benchmark's classes; with --dataset {cfg.dataset} pick --metrics without focus"
        )
    unused = sorted(set(cfg.metric_options) - set(n for g in _selected_metrics(cfg) for n in g))
    if unused:
        raise ValueError(
            f"--metric-param {unused[0]}: not a metric this run scores ({', '.join(n for g in _selected_metrics(cfg) for n in g)})"
        )
    if cfg.crf and cfg.experiment != "segmentation":
        raise ValueError(f"--crf refines the segmentation experiment's thresholded maps; it does not apply to {cfg.experiment!r}")
    if cfg.crf:
        from xaijax.metrics.crf import require_densecrf

        require_densecrf()  # a missing extra fails before anything is read or written
    if cfg.seeds not in SEEDS:
        raise ValueError(f"seeds must be 'labels' (all ground-truth classes, L), 'predicted' (P) or 'top1'; got {cfg.seeds!r}")
    if cfg.batch < 1:
        raise ValueError(f"--batch must be at least 1; got {cfg.batch}")
    if cfg.images is not None and cfg.images < 1:
        raise ValueError(f"--images must be at least 1; got {cfg.images}")
    if cfg.pick not in PICKS:
        raise ValueError(f"--pick must be one of {', '.join(PICKS)}; got {cfg.pick!r}")
    if not cfg.methods:
        raise ValueError("no methods given")
    if cfg.dataset == "imagenet-val" and cfg.boxes_dir is None and cfg.experiment in ("pointing", "segmentation", "density"):
        raise ValueError(
            f"the {cfg.experiment} experiment scores maps against object regions: imagenet-val needs --boxes-dir "
            "(the ILSVRC2012 validation box XMLs); without it each image's object is the whole image"
        )
    if not 0 <= cfg.shard_index < cfg.shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count); got {cfg.shard_index} of {cfg.shard_count}")
    if cfg.distributed and cfg.shard_count != 1:
        raise ValueError("--distributed splits the images by process itself; drop --shard-index/--shard-count")
    if cfg.distributed and cfg.devices is not None:
        raise ValueError("--distributed uses every device of every process; drop --devices")
    for m in cfg.methods:
        k = methods_registry.kind(m)  # (a readable error for unknown names)
        if k not in CLASSIFIER_KINDS:
            raise ValueError(f"method {m!r} is of kind {k!r}; the {cfg.experiment} experiment evaluates image attributions")


def _load_model(cfg: EvalConfig):
    if cfg.model is not None:  # the user's own model (xaijax.models.entry_points); its weights' digest is the variables'
        if cfg.weights is not None:
            raise ValueError("pass either --weights or --model, not both")
        model, variables, info = entry_points.load(cfg.model)
        return None, model, variables, preprocess.convention(info, cfg.preprocess), info
    if cfg.weights is None:
        if cfg.dataset != "synthetic":
            raise ValueError("--weights is required (the bundled weights only fit the synthetic dataset)")
        path = checkpoints.bundled_weights("synthetic_vgg16.safetensors")
    else:
        path = Path(cfg.weights)
    model, variables, info = checkpoints.load(cfg.arch, path)
    return path, model, variables, preprocess.convention(info, cfg.preprocess), info


def check_classes(dataset: str, class_names: Any, model: Any, variables: Any, info: dict[str, Any], size: int, seeds: str) -> None:
    """Refuse a model whose outputs are not the dataset's classes, before the first image.

    With ``seeds`` ``"labels"``/``"predicted"`` the dataset's class indices select the model's
    outputs, so the model must have exactly one output per dataset class and, where the checkpoint
    records class names, the same names in the same order. (``"top1"`` explains the model's own top
    class against all objects: no dataset class indexes the model, nothing to compare.)

    Raises:
      ValueError: naming both counts (or the first differing class name) and what to do.
    """
    if seeds == "top1":
        return
    names = tuple(class_names)
    k = int(jax.eval_shape(lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1])
    if k != len(names):
        raise ValueError(
            f"--weights: the model has {k} outputs but the {dataset} dataset has {len(names)} classes, so its labels "
            f"cannot select the model's outputs; evaluate a model trained on the {dataset} classes, "
            "or pass --seeds top1 to explain the model's own top class against all objects"
        )
    recorded = preprocess.recorded(info).class_names
    if recorded is not None and tuple(recorded) != names:
        i = next(j for j, (a, b) in enumerate(zip(recorded, names)) if a != b)
        raise ValueError(
            f"--weights: the checkpoint's class names are not the {dataset} dataset's: class {i} is {recorded[i]!r} in "
            f"the checkpoint but {names[i]!r} in the dataset; evaluate a model trained on the {dataset} classes in their order"
        )


def run_experiment(cfg: EvalConfig, progress: bool = True) -> dict[str, Any] | None:
    """Run (or resume) ``cfg``; returns the table that is also written to ``cfg.out``.

    With ``cfg.distributed`` every process of the run calls this with the same ``cfg`` (after
    :func:`xaijax.evaluation.distributed.initialize`); process 0 writes the stores and the
    tables and returns the table, the others return None."""
    from tqdm import tqdm

    _check(cfg)
    if cfg.distributed:
        dist.initialize()  # no-op where already initialised; else from the environment (JAX_COORDINATOR_ADDRESS, ...)
        mesh = dist.global_mesh()
    else:
        mesh = make_mesh(cfg.devices)  # a bad --devices fails before anything is read or written
    nproc, me = (jax.process_count(), jax.process_index()) if cfg.distributed else (1, 0)
    writer = me == 0  # the one process that opens the results stores and writes the tables
    with dist.all_or_none(cfg.distributed, "setting up"):  # a process that fails here stops the others too
        ds = open_dataset(cfg.dataset, cfg.data_dir, cfg.split, None, cfg.boxes_dir)  # native sizes
        wpath, model, variables, convention, info = _load_model(cfg)
        wname, wdigest = (wpath.name, _file_digest(wpath)) if wpath is not None else (cfg.model, entry_points.digest(variables))
        seeds = "top1" if cfg.dataset == "imagenet-seg" else cfg.seeds
        size = model_size(cfg, model, info)  # a --size a ViT cannot take fails here, before anything is written
        check_classes(cfg.dataset, ds.class_names, model, variables, info, size, seeds)  # before the first image
        out = Path(cfg.out)
        if writer:
            out.mkdir(parents=True, exist_ok=True)
        num_classes = len(ds.class_names)
        indices = pick_images(len(ds), cfg.images, cfg.pick)[cfg.shard_index :: cfg.shard_count]
        pair_names, model_names, method_names = _selected_metrics(cfg)
        opts = cfg.metric_options
        pair_metrics = {
            n: metrics.get(n, crf=True, **opts.get(n, {})) if (cfg.crf and n == "fgbg-miou") else metrics.get(n, **opts.get(n, {}))
            for n in pair_names
        }
        model_metrics = {n: metrics.get_model_metric(n, **opts.get(n, {})) for n in model_names}
        # focus tiles its mosaics from benchmark images, normalised as the model's inputs are
        method_metrics = {
            n: metrics.get_method_metric(n, **({"convention": convention} if n == "focus" else {}), **opts.get(n, {}))
            for n in method_names
        }
        base_config = {
            "experiment": cfg.experiment,
            "dataset": cfg.dataset,
            "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
            "boxes_dir": str(Path(cfg.boxes_dir).resolve()) if cfg.boxes_dir else None,
            "split": cfg.split or ("test" if cfg.dataset in ("synthetic", "voc07", "voc07-tfds") else None),
            "size": size,
            "arch": type(model).__name__,
            "weights_sha256": wdigest,
            "preprocess": convention,
            "seeds": seeds,
            "metrics": sorted(pair_metrics) + sorted(model_metrics) + sorted(method_metrics),
            "shard": [cfg.shard_index, cfg.shard_count],
            **({"crf": "DenseCRF()"} if cfg.crf else {}),  # absent without --crf: earlier stores stay valid
            **({"metric_options": {k: dict(sorted(v.items())) for k, v in sorted(opts.items())}} if opts else {}),
        }
        forward = functools.partial(metrics.robustness.model_logits, model)  # jitted once per model, across runs
        model_fn = metrics.faithfulness.classifier_fn(model, variables)
        # the sanity experiment's re-initialisation: one draw for the run (it depends on the layer shapes only)
        fresh = random_variables(model, (1, size, size, 3), seed=0) if cfg.experiment == "sanity" else None
        ctx = _Context(size, model, variables, convention, forward, model_fn, pair_metrics, model_metrics, seeds, cfg, fresh, method_metrics,
                       writes_files=writer)
        if cfg.distributed:  # lockstep padding calls: one real call's shapes and dtypes
            x_example = np.asarray(normalize(jnp.zeros((cfg.batch, size, size, 3), jnp.float32), convention))
            t_example = np.zeros((cfg.batch,), np.int32)
    if cfg.distributed:  # the same weights, dataset and image list in every process, or no run
        same = {k: v for k, v in base_config.items() if k not in ("data_dir", "boxes_dir")}  # (paths may differ by host)
        dist.check_same([same, len(ds), [_image_id(ds, i) for i in indices]],
                        "weights, dataset or images (configuration, dataset length, image ids)")
    rows = []
    extras: dict[str, Any] = {}
    sources: dict[str, str] = {}  # table column -> the metric that wrote it (the legend)
    run_id = time.strftime("%Y-%m-%d %H:%M:%S")  # stored with each image's row: the tables say which run made a row
    runs: list[list[str]] = []
    finished: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []  # (method, hparams, stored rows); tables after the loop
    for name in cfg.methods:
        hp = cfg.hparams.get(name, {})
        store, todo = None, None
        with dist.all_or_none(cfg.distributed, "opening the results store"):
            method = methods_registry.get(name, **hp)
            if writer:
                store = ResultsStore(
                    out / f"{cfg.experiment}-{name.replace(':', '_')}.jsonl",
                    {**base_config, "method": name, "hparams": hp, "pointing_smooth": _pointing_smooth(cfg, name)},
                )
                done = store.done()
                _check_image_ids(store, ds, done)
                retry = store.skipped()  # images that could not be read last time: tried again
                todo = [i for i in indices if i not in done or i in retry]
        if cfg.distributed:
            todo = dist.broadcast_indices(todo)  # process 0's store decides what is left, for every process
        explain = DataParallel(lambda v, x, t, method=method: method(model, v, x, t), mesh)
        bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=f"{cfg.experiment} {name}", unit="img",
                   disable=not (progress and writer))
        step = cfg.batch * nproc  # each step: process p evaluates block p of `batch` images
        new: list[dict[str, Any]] = []  # the last step's rows (all processes'), stored at the start of the next
        try:
            for s in range(0, len(todo) + step, step):  # one more round after the last step: its rows are stored
                chunk = todo[s : s + step][me * cfg.batch : (me + 1) * cfg.batch]
                # distributed: a failure in one process (here, or process 0's append) stops every process
                with dist.all_or_none(cfg.distributed, f"evaluating {name}"):
                    if writer and new:
                        store.append({**r, "run": run_id} for r in new)
                        bar.update(len({r["index"] for r in new}))
                    if s >= len(todo):
                        break
                    new = _evaluate_chunk(ds, chunk, explain, method, ctx, name) if chunk else []
                if cfg.distributed:
                    dist.lockstep(explain, variables, x_example, t_example)
                    new = dist.gather_rows(new)
        finally:
            bar.close()
            if store is not None:
                finished.append((name, hp, list(store.rows())))
                store.close()
    if not writer:  # distributed: process 0 writes the tables
        return None
    for name, hp, stored in finished:
        row, extra = _summarize(name, hp, stored, set(indices), pair_metrics, {**model_metrics, **method_metrics}, num_classes, sources)
        rows.append(row)
        extras[name] = extra
        runs.append(_runs_of(stored, set(indices)))
    # the table covers every method the folder's stores hold for this configuration, not only this run's
    others, notes = _other_stores(out, cfg.experiment, base_config, cfg.methods)
    for name, hp, stored in others:
        row, extra = _summarize(name, hp, stored, set(indices), pair_metrics, {**model_metrics, **method_metrics}, num_classes, sources)
        rows.append(row)
        extras[name] = extra
        runs.append(_runs_of(stored, set(indices)))
    result = {
        "experiment": cfg.experiment,
        "dataset": {"name": cfg.dataset, "split": base_config["split"], "size": size, "images": len(indices)},
        "model": {"arch": base_config["arch"], "weights": str(wpath) if wpath is not None else cfg.model, "weights_sha256": base_config["weights_sha256"]},
        "seeds": seeds,
        "rows": rows,
        "runs": {"this_run": run_id, "rows": {r["method"]: ran for r, ran in zip(rows, runs)}},
        "curves": {n: e for n, e in extras.items() if e},
    }
    header = [
        f"# xaijax eval {cfg.experiment} — {cfg.dataset}",
        "",
        f"Model {base_config['arch']} (`{wname}`, sha256 {base_config['weights_sha256'][:12]}), preprocessing "
        f"{convention}; {len(indices)} images; seeds {seeds}; metrics {', '.join(base_config['metrics']) or 'cascading randomisation'}.",
    ]
    footer = _coverage_notes(rows, len(indices), cfg.methods, notes) + _figures(out, cfg.experiment, result["curves"])
    run_cells = [", ".join(f"{r} (this run)" if r == run_id else r for r in ran) for ran in runs]
    write_tables(out, result["rows"], header, result, footer, extra_columns={"run": run_cells},
                 descriptions=metric_descriptions(sources))
    return result


def _runs_of(stored: list[dict[str, Any]], indices: set[int]) -> list[str]:
    """The runs (start times) that computed the stored rows of ``indices``, oldest first."""
    return sorted({str(r.get("run", "earlier run (not recorded)")) for r in stored if r["index"] in indices})


def _other_stores(out: Path, experiment: str, base_config: dict[str, Any], methods: tuple[str, ...]):
    """The folder's other results stores of ``experiment`` with this run's configuration (apart
    from the method and its settings): ``([(method, hparams, rows)], notes on stores left out)``."""
    mine = {f"{experiment}-{m.replace(':', '_')}.jsonl" for m in methods}
    base = json.loads(json.dumps(base_config, sort_keys=True))
    found, notes = [], []
    for path in sorted(out.glob(f"{experiment}-*.jsonl")):
        if path.name in mine:
            continue
        try:
            config, stored = read_store(path)
        except StoreMismatchError as e:
            notes.append(f"- `{path.name}`: not read ({e})")
            continue
        rest = {k: v for k, v in config.items() if k not in ("method", "hparams", "pointing_smooth")}
        if rest != base or "method" not in config:
            diff = sorted(k for k in set(rest) | set(base) if rest.get(k) != base.get(k))
            notes.append(f"- `{path.name}`: another configuration (differs in {', '.join(diff)})")
            continue
        found.append((config["method"], config.get("hparams") or {}, latest_rows(stored)))
    return found, notes


def _coverage_notes(rows: list[dict[str, Any]], selected: int, methods: tuple[str, ...], notes: list[str]) -> list[str]:
    """Markdown lines under the table: rows from earlier runs, rows with fewer images than this
    run selected, and stores of the folder that the table leaves out."""
    lines: list[str] = []
    earlier = [r["method"] for r in rows if r["method"] not in methods]
    if earlier:
        lines += ["", f"Rows of methods this run did not evaluate ({', '.join(f'`{m}`' for m in earlier)}) come from "
                  "the folder's results stores of the same configuration, over this run's image selection "
                  "(the `run` column says which run computed them)."]
    short = [r["method"] for r in rows if r.get("images", 0) + r.get("skipped_images", 0) < selected]
    if short:
        lines += ["", f"Rows with fewer than the {selected} selected images: {', '.join(f'`{m}`' for m in short)} "
                  "(run `xaijax eval` again with these --methods to evaluate the rest)."]
    if notes:
        lines += ["", "Results stores in this folder left out of the table:", *notes]
    return lines


@dataclasses.dataclass(frozen=True)
class _Context:
    size: int
    model: Any
    variables: Any
    convention: str
    forward: Callable[..., Any]
    model_fn: Any
    pair_metrics: dict[str, Any]
    model_metrics: dict[str, Any]
    seeds: str
    cfg: EvalConfig
    fresh: Any = None  # sanity experiment: the re-initialised variables
    method_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    writes_files: bool = True  # distributed runs: process 0 alone writes into the output folder


def _evaluate_chunk(ds, chunk, explain, method, ctx: _Context, name: str = "") -> list[dict[str, Any]]:
    cfg = ctx.cfg
    rows: list[dict[str, Any]] = []
    records = []
    for i in chunk:
        try:
            records.append((i, ds[i]))
        except (OSError, ValueError) as e:  # undecodable image: counted, never fatal
            rows.append({"index": i, "image_id": _image_id(ds, i), "skipped": f"{type(e).__name__}: {e}"})
    if not records:
        return rows
    x = np.asarray(normalize(jnp.asarray(np.stack([_model_input(r.image, ctx.size) for _, r in records])), ctx.convention))
    logits = np.asarray(ctx.forward(ctx.variables, x)) if ctx.seeds != "labels" else None
    per_image = []
    for k, (_, r) in enumerate(records):
        if ctx.seeds == "top1":
            per_image.append(image_pairs(r, top1=int(np.argmax(logits[k]))))
        else:
            per_image.append(image_pairs(r, None if logits is None else logits[k] > 0.0))
    img_of = np.asarray([k for k, ps in enumerate(per_image) for _ in ps], np.int64)
    classes = np.asarray([c for ps in per_image for c, _, _ in ps], np.int64)
    values: dict[str, np.ndarray] = {}
    if len(classes):
        xs = x[img_of]
        c32 = classes.astype(np.int32)
        if cfg.experiment == "sanity":
            grid = Path(cfg.out) / f"sanity-{name}.png" if records[0][0] == 0 and ctx.writes_files else None  # of the first pair batch
            values = map_batches(
                lambda s, xb, cb: _sanity_values(method, ctx, xb, cb, grid if s == 0 else None), cfg.batch, xs, c32
            )
        else:
            maps = map_batches(lambda _, xb, cb: {"maps": explain(ctx.variables, xb, cb)}, cfg.batch, xs, c32)["maps"]
            # localisation metrics at each image's native resolution (TorchRay resizes the map
            # back to the original image before pointing), one image at a time
            smooth = _pointing_smooth(cfg, name)
            parts: list[dict[str, np.ndarray]] = []
            for k, ps in enumerate(per_image):
                if not ps:
                    continue
                sel = np.flatnonzero(img_of == k)
                native = np.stack([reg for _, reg, _ in ps])
                m_native = _to_native(maps[sel], native.shape[1:], smooth)
                images = np.broadcast_to(records[k][1].image, (len(ps),) + records[k][1].image.shape) if cfg.crf else None
                batch = metrics.PairBatch(maps=m_native, regions=native, classes=classes[sel], dif=np.asarray([d for _, _, d in ps], bool),
                                          images=images)
                part: dict[str, np.ndarray] = {}
                for m in ctx.pair_metrics.values():
                    part.update({key: np.asarray(v) for key, v in m(batch).items()})
                parts.append(part)
            if parts:
                values.update({key: np.concatenate([q[key] for q in parts]) for key in parts[0]})
            for n, m in ctx.model_metrics.items():
                if getattr(type(m), "per_image", True):
                    out = map_batches(lambda _, xb, mb, cb, m=m: m(ctx.model_fn, xb, mb, cb), cfg.batch, xs, maps, c32)
                else:  # a metric over the pairs of a call (sufficiency): this batch's pairs, unpadded
                    out = m(ctx.model_fn, xs, maps, c32)
                values.update({f"{n}.{key}": v for key, v in out.items()})
            for n, m in ctx.method_metrics.items():  # re-run the method (perturbed inputs, randomised weights)
                try:
                    out = map_batches(
                        lambda _, xb, mb, cb, m=m: m(ctx.model, ctx.variables, method, xb, cb, maps=mb), cfg.batch, xs, maps, c32
                    )
                except methods_registry.NotApplicable as e:  # e.g. input invariance without a first-layer bias
                    out = {"not_defined": np.full(len(classes), " ".join(str(e).split()), dtype=object)}
                values.update({f"{n}.{key}": v for key, v in out.items()})
    for k, (i, r) in enumerate(records):
        sel = np.flatnonzero(img_of == k)
        pairs = [
            {"class": int(classes[p]), "dif": bool(per_image[k][j][2]), **{n: _py(v[p]) for n, v in values.items()}}
            for j, p in enumerate(sel)
        ]
        rows.append({"index": i, "image_id": r.image_id, "pairs": pairs})
    return rows


#: TorchRay's pointing-game benchmark smooths these methods' maps (a Gaussian with sigma =
#: 0.02 x the longer image side) before taking the maximum (``smooth=0.02`` in its
#: ``examples/attribution_benchmark.py``); ``EvalConfig.pointing_smooth=False`` turns it off.
POINTING_SMOOTH = {"gradient": 0.02, "deconvnet": 0.02, "guided-backprop": 0.02}


def _pointing_smooth(cfg: EvalConfig, name: str) -> float:
    """The Gaussian smoothing (sigma as a fraction of the longer side) of ``name``'s maps before
    they are scored: TorchRay's, for the pointing experiment only (the other experiments and the
    catalogue's metrics score the method's own maps)."""
    if cfg.experiment != "pointing" or not cfg.pointing_smooth:
        return 0.0
    return POINTING_SMOOTH.get(name, 0.0)


def _model_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) image in [0, 1] resized (bilinear) to the model's ``size`` x ``size`` input."""
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    chans = [np.asarray(Image.fromarray(image[..., c]).resize((size, size), Image.BILINEAR)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def _gaussian_smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (P, H, W) maps, truncated at 4 sigma, replicated borders."""
    r = max(1, int(np.ceil(4 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    out = m.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        out = sum(g[j] * np.take(padded, np.arange(j, j + out.shape[axis]), axis=axis) for j in range(2 * r + 1))
    return out.astype(np.float32)


def _to_native(maps: np.ndarray, hw: tuple[int, int], smooth: float) -> np.ndarray:
    """Maps (P, S, S) resized to the image's native ``hw`` like TorchRay (``F.interpolate``,
    bilinear, ``align_corners=False``, no antialiasing when shrinking), then optionally smoothed."""
    if maps.shape[1:] != tuple(hw):
        maps = np.asarray(imageops.resize(jnp.asarray(maps), hw))
    if smooth:
        maps = _gaussian_smooth(maps, smooth * max(hw))
    return maps


def _image_id(ds: Any, index: int) -> str | None:
    """The dataset's id of image ``index`` without decoding it, where the dataset can say."""
    if hasattr(ds, "image_id"):
        return ds.image_id(index)
    return None


def _check_image_ids(store: ResultsStore, ds: Any, done: set[int]) -> None:
    """Refuse to resume when stored rows name other images than the dataset now has at their index
    (a changed split list, an image folder that gained files, ...)."""
    for row in store.rows():
        if "image_id" not in row:
            continue
        i = int(row["index"])
        now = _image_id(ds, i) if i < len(ds) else None
        if now is not None and now != row["image_id"]:
            raise StoreMismatchError(
                f"{store.path}: image {i} was {row['image_id']!r} when stored but is {now!r} now (the dataset changed); "
                "delete the file (or use another --out folder) to start fresh"
            )


def map_batches(fn: Callable[..., dict[str, Any]], size: int, *arrays: Any) -> dict[str, np.ndarray]:
    """``fn(offset, *batch)`` over ``arrays`` in batches of ``size`` rows, the last one padded
    (fixed shapes: a jitted ``fn`` compiles once); each dict output cut back to the batch's
    real rows, then concatenated over the batches. The one padded-batch loop of the
    experiments and the demo.

    Raises:
      ValueError: no arrays, arrays of different lengths, no rows, or ``size < 1``.
    """
    if not arrays or len({len(a) for a in arrays}) != 1 or not len(arrays[0]):
        raise ValueError(f"map_batches needs arrays with the same, positive number of rows; got {[len(a) for a in arrays]}")
    if size < 1:
        raise ValueError(f"batch size must be at least 1; got {size}")
    parts = []
    for s in range(0, len(arrays[0]), size):
        batch = [a[s : s + size] for a in arrays]
        out = fn(s, *_pad(size, *batch))
        parts.append({key: np.asarray(v)[: len(batch[0])] for key, v in out.items()})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _pad(size: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array padded along axis 0 to ``size`` rows by repeating its last row."""
    n = len(arrays[0])
    if n >= size:
        return arrays
    return tuple(np.concatenate([a, np.repeat(a[-1:], size - n, 0)]) for a in arrays)


def _sanity_values(method, ctx: _Context, xs: np.ndarray, classes: np.ndarray, grid: Path | None) -> dict[str, np.ndarray]:
    res = metrics.sanity.cascading_randomization(method, ctx.model, ctx.variables, xs, classes, seed=0, fresh=ctx.fresh)
    if grid is not None:  # the map grid (trained model, then each cascade step) of the dataset's first image
        fig = metrics.sanity.plot_cascade_grid(res, None, images=(0,), max_columns=12)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        atomic_bytes(grid, buf.getvalue())
    return {
        "sanity.spearman": res.spearman.T,  # (pairs, layers)
        "sanity.spearman_abs": res.spearman_abs.T,
        "sanity.ssim": res.ssim.T,
        "sanity.layers": np.broadcast_to(np.asarray(res.layers, object), (len(classes), len(res.layers))),
    }


def _py(v: Any) -> Any:
    if isinstance(v, str):
        return v
    v = np.asarray(v)
    if v.ndim:
        return [_py(e) for e in v]
    if v.dtype.kind in "OUS":
        return str(v)
    return bool(v) if v.dtype == bool else float(v)


def _summarize(
    name, hp, rows, indices: set[int], pair_metrics, model_metrics, num_classes: int, sources: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One table row of method ``name`` and its curves; ``sources`` (filled): column -> metric."""
    sources = {} if sources is None else sources
    stored = [r for r in rows if r["index"] in indices]  # this run's images only
    pairs = [p for r in stored for p in r.get("pairs", [])]
    row: dict[str, Any] = {
        "method": name,
        "hparams": ",".join(f"{k}={v}" for k, v in sorted(hp.items())),
        "images": sum(1 for r in stored if "skipped" not in r),
        "skipped_images": sum(1 for r in stored if "skipped" in r),
        "pairs": len(pairs),
    }
    extra: dict[str, Any] = {}
    if not pairs:
        return row, extra
    classes = np.asarray([p["class"] for p in pairs], np.int64)
    dif = np.asarray([p["dif"] for p in pairs], bool)
    keys = [k for k in pairs[0] if k not in ("class", "dif")]
    plain = {k: np.asarray([p[k] for p in pairs]) for k in keys if "." not in k}
    for n, m in pair_metrics.items():
        summary = m.summarize(plain, classes, dif, num_classes)
        row.update(summary)
        sources.update(dict.fromkeys(summary, n))
    for n, m in model_metrics.items():
        if f"{n}.not_defined" in keys:  # a method metric not defined for this model
            row[f"{n}_error"] = f"not defined for this model: {pairs[0][n + '.not_defined']}"
            sources[f"{n}_error"] = n
            continue
        vals = {k.split(".", 1)[1]: np.asarray([p[k] for p in pairs], np.float64) for k in keys if k.startswith(n + ".")}
        summary = m.summarize(vals)
        row.update(summary)
        sources.update(dict.fromkeys(summary, n))
        for curve_key in ("curve", "correct"):
            if curve_key in vals:
                extra[n] = np.nanmean(vals[curve_key], 0).tolist()
    if "sanity.ssim" in keys:
        extra["layers"] = pairs[0]["sanity.layers"]
        for k in ("spearman", "spearman_abs", "ssim"):
            per_layer = np.nanmean(np.asarray([p[f"sanity.{k}"] for p in pairs], np.float64), 0)
            extra[k] = per_layer.tolist()
            row[f"{k}_top_layer"] = float(per_layer[0])
            row[f"{k}_all_layers"] = float(per_layer[-1])
    return row, extra


def _figures(out: Path, experiment: str, curves: dict[str, dict[str, Any]]) -> list[str]:
    """Curve figures of the experiments that have curves; returns Markdown lines naming them."""
    if not curves:
        return []
    from matplotlib.figure import Figure

    if experiment == "sanity":
        keys = [("spearman_abs", "Spearman (abs)"), ("spearman", "Spearman (signed)"), ("ssim", "SSIM")]
        fig = Figure(figsize=(13, 3.8))
        for j, (k, label) in enumerate(keys):
            ax = fig.add_subplot(1, 3, j + 1)
            for name, c in curves.items():
                ax.plot(range(len(c[k])), c[k], marker="o", ms=3, label=name)
                ticks = c["layers"]
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels(ticks, rotation=90, fontsize=6)
            ax.set_title(f"{label} vs trained map", fontsize=9)
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0, color="grey", lw=0.5)
        fig.axes[0].legend(fontsize=6)
        fig.suptitle("cascading randomisation, top layer first (cumulative)", fontsize=9)
        fig.tight_layout()
        name = "sanity.png"
        lines = ["method,step,layer,spearman,spearman_abs,ssim"]
        for mname, c in curves.items():
            for s, layer in enumerate(c["layers"]):
                lines.append(f"{mname},{s + 1},{layer},{c['spearman'][s]:.6g},{c['spearman_abs'][s]:.6g},{c['ssim'][s]:.6g}")
        atomic_text(out / "sanity_layers.csv", "\n".join(lines) + "\n")
    else:
        metric_names = sorted({m for c in curves.values() for m in c})
        fig = Figure(figsize=(4.2 * len(metric_names), 3.6))
        for j, m in enumerate(metric_names):
            ax = fig.add_subplot(1, len(metric_names), j + 1)
            for name, c in curves.items():
                if m in c:
                    y = np.asarray(c[m])
                    xs = np.arange(1, len(y) + 1) if m == "region-insertion" else np.linspace(0, 1, len(y))
                    ax.plot(xs, y, label=name)
            ax.set_xlabel("% of pixels inserted" if m == "region-insertion" else "fraction of pixels changed")
            ax.set_ylabel("top-1 accuracy" if m == "region-insertion" else "target probability")
            ax.set_title(m, fontsize=9)
            ax.legend(fontsize=6)
        fig.tight_layout()
        name = "curves.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_bytes(out / name, buf.getvalue())
    return ["", f"Figure: `{name}`."]
