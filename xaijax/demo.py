"""``xaijax demo``: every registered method x every registered metric x the bundled
classifiers (a small VGG16, ResNet-18 and ViT), on the held-out split of the synthetic
benchmark, offline on a CPU.

For each test image and each class present in it (classes whose every instance is marked
difficult are skipped, as in VOC), the method explains that class; the map is scored
against the class's ground-truth region (union of its visible instance masks). Pointing
game pairs whose class's boxes cover < 1/4 of the image while another class is present form
the DIF subset. Results go to ``OUT/results.{md,csv,json}`` and ``OUT/figure.png`` (image with
ground truth, then each method's map, for a few images and both models), each written
atomically: an interrupted run leaves no half-written file.

The demo is a client of :mod:`xaijax.evaluation`: the (image, class) pairs come from
:func:`~xaijax.evaluation.image_pairs`, the maps from the runner's padded-batch loop
(:func:`~xaijax.evaluation.map_batches`), the tables from its writer. It runs the methods
that explain a classifier's decision (kinds ``"attribution"`` and ``"cam"``); a method that
raises :class:`~xaijax.methods.NotApplicable` for a model (CAM on VGG's fully connected
head, ...) gets a row saying "not defined for this model" (``n/a`` in the tables); any other
error is a failure and propagates. Every model is fed the benchmark's images at their own
size, which must be the model's input size (:func:`~xaijax.checkpoints.input_size.model_input_size`;
the bundled ViT was built for it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import checkpoints, data, metrics
from xaijax import methods as methods_registry
from xaijax.checkpoints import weights_dir  # re-exported: the bundled weights' folder
from xaijax.checkpoints.input_size import model_input_size
from xaijax.evaluation import image_pairs, map_batches, write_tables
from xaijax.evaluation.tables import metric_descriptions
from xaijax.methods import CLASSIFIER_KINDS, NotApplicable
from xaijax.models import preprocess
from xaijax.models.preprocess import normalize
from xaijax.viz import ROBUST_PERCENTILE

__all__ = ["BUNDLED_CLASSIFIERS", "weights_dir", "build_pairs", "run_demo"]

BUNDLED_CLASSIFIERS = ("synthetic_vgg16.safetensors", "synthetic_resnet18.safetensors", "synthetic_vit.safetensors")

#: Hyperparameters the demo uses instead of the defaults, to keep a CPU run to minutes.
#: They are written into the results (column ``hparams``) so the table says what ran.
DEMO_HPARAMS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n": 8},
    "integrated-gradients": {"steps": 16},
    "rise": {"n": 150},
    "ucag-grad-cam": {"n": 4},
    "extremal-perturbation": {"max_iter": 20},
    "cameras": {"scales": (1.0, 1.5, 2.0, 2.5)},
    # exact max flow (Edmonds-Karp) over the bundled ViT's last 2 of 6 blocks: 16 maps took 12 s with
    # start_layer 4 and over 4 minutes with start_layer 2 (2-core CPU); not applicable to the CNNs
    "attention-flow": {"start_layer": 4},
}

#: The methods of a default run: the research's methods and those it compares against (the
#: catalogue before the peers' methods of issue 22). Every other registered method runs by
#: name (``--methods occlusion,kernel-shap``) or with ``--methods all``: the peers' perturbation
#: and Shapley methods cost hundreds of forward passes per map, which would take a default CPU
#: run from minutes to hours.
DEFAULT_METHODS = (
    "attention-flow", "attention-rollout", "attnlrp", "cam", "cameras", "center", "chefer-lrp", "clrp",
    "contrastive-excitation-backprop", "contrastive-gradient", "contrastive-rsp", "cp-lrp", "deconvnet",
    "excitation-backprop", "extremal-perturbation", "fullgrad", "generic-attention", "grad-cam", "grad-cam-plus-plus",
    "gradient", "gradient-x-input", "guided-backprop", "integrated-gradients", "layer-cam", "lrp-alpha1-beta0",
    "lrp-alpha2-beta1", "lrp-epsilon", "lrp-epsilon-gamma-box", "lrp-epsilon-plus", "lrp-epsilon-plus-flat",
    "lrp-zplus-nobias-samplebox", "normgrad", "rap", "raw-attention", "rise", "rsp", "score-cam", "sglrp", "smoothgrad",
    "ucag-grad-cam", "xgrad-cam",
)

#: The metrics of a default run: every registered pair metric (cheap: one pass over the maps)
#: and these model-based ones (tens of forward passes per pair). Any other registered metric
#: (``xaijax metrics``: the faithfulness, robustness, randomisation and axiom families) runs by
#: name with ``--metrics``.
DEFAULT_MODEL_METRICS = ("deletion", "insertion", "region-insertion")

#: Settings the demo gives the catalogue's expensive metrics when they are asked for with
#: ``--metrics`` (their defaults are the papers' and Quantus': one forward pass per pixel for
#: pixel-flipping and its relatives, 200 explanations per image for the robustness metrics);
#: written into the results (``metric_options``).
DEMO_METRIC_OPTIONS: dict[str, dict[str, Any]] = {
    "pixel-flipping": {"features_in_step": 128},
    "faithfulness-estimate": {"features_in_step": 128},
    "monotonicity": {"features_in_step": 128},
    "monotonicity-correlation": {"features_in_step": 128, "nr_samples": 10},
    "faithfulness-correlation": {"nr_runs": 20},
    "sensitivity-n": {"nr_subsets": 20},
    "region-perturbation": {"regions_evaluation": 32},
    "max-sensitivity": {"n_samples": 10},
    "avg-sensitivity": {"n_samples": 10},
    "local-lipschitz": {"n_samples": 10},
    "ris": {"n_samples": 10},
    "ros": {"n_samples": 10},
    "rrs": {"n_samples": 10},
    "continuity": {"n_steps": 8},
    "smooth-mprt": {"n_samples": 5},
}

#: Held-out images of a default ``xaijax demo`` run (20 images: 31 (image, class) pairs,
#: two batches of 16 per method; ``--images`` scales up).
DEFAULT_IMAGES = 20

#: Pairs scored by the model-based metrics (deletion, insertion, region insertion: about 55
#: forward passes per pair) in a default run; the localisation metrics score every pair.
DEFAULT_MODEL_METRIC_PAIRS = 8

#: ``--quick``: one model, few images, one representative method per family and cheaper
#: settings (a minute or two of CPU, most of it compilation); the default runs every method.
QUICK_MODELS = ("synthetic_resnet18",)
QUICK_METHODS = ("center", "gradient", "integrated-gradients", "grad-cam", "lrp-epsilon-plus", "rsp", "rise", "ucag-grad-cam")
QUICK_IMAGES = 8
QUICK_MODEL_METRIC_PAIRS = 8
QUICK_HPARAMS: dict[str, dict[str, Any]] = {
    **DEMO_HPARAMS,
    "smoothgrad": {"n": 4},
    "integrated-gradients": {"steps": 8},
    "rise": {"n": 100},
    "ucag-grad-cam": {"n": 3},
    "extremal-perturbation": {"max_iter": 10},
}


@dataclass(frozen=True)
class Pairs:
    """(image, class) pairs of a list of records: indices, classes, regions, DIF flags."""

    image_index: np.ndarray  # (P,) int
    classes: np.ndarray  # (P,) int
    regions: np.ndarray  # (P, H, W) bool
    dif: np.ndarray  # (P,) bool


def build_pairs(records: Sequence[data.Record]) -> Pairs:
    """Every (image, present class) pair, skipping classes whose instances are all difficult
    (:func:`xaijax.evaluation.image_pairs` of each record)."""
    idx, cls, regions, dif = [], [], [], []
    for i, r in enumerate(records):
        for c, region, d in image_pairs(r):
            idx.append(i)
            cls.append(c)
            regions.append(region)
            dif.append(d)
    h, w = records[0].image.shape[:2]
    return Pairs(
        np.asarray(idx, np.int64),
        np.asarray(cls, np.int64),
        np.stack(regions) if regions else np.zeros((0, h, w), bool),
        np.asarray(dif, bool),
    )


def _explain_fn(method: Callable[..., jax.Array], model: Any) -> Callable[..., jax.Array]:
    return jax.jit(lambda v, x, t: method(model, v, x, t))


def _run_method(
    explain, variables, x_all, pairs: Pairs, batch: int, on_batch: Callable[[], None]
) -> tuple[np.ndarray, float, float]:
    """Maps for every pair through the runner's padded-batch loop (:func:`map_batches`: fixed
    batch shapes, so the method compiles once).

    ``explain`` is a ``jax.jit``-ed function: it is compiled ahead of time for the batch shape
    (timed on its own), then every batch runs the compiled executable.

    Returns ``(maps, compile_seconds, seconds_per_map)``: the tracing + XLA compilation (a
    persistent-cache hit makes it short), and the steady-state time per computed map (each
    batch's run time over its ``batch`` maps, padding included; no compilation).
    """
    p = len(pairs.classes)
    if not p:
        return np.zeros((0,) + tuple(x_all.shape[1:3]), np.float32), 0.0, 0.0
    run_seconds: list[float] = []
    compiled: list[Any] = []
    compile_s = [0.0]

    def one_batch(_, ii: np.ndarray, cc: np.ndarray) -> dict[str, jax.Array]:
        xb, cb = x_all[ii], jnp.asarray(cc)
        if not compiled:
            t0 = time.perf_counter()
            compiled.append(explain.lower(variables, xb, cb).compile())
            compile_s[0] = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = jax.block_until_ready(compiled[0](variables, xb, cb))
        run_seconds.append(time.perf_counter() - t0)
        on_batch()
        return {"maps": m}

    maps = map_batches(one_batch, batch, pairs.image_index, pairs.classes)["maps"]
    return maps, compile_s[0], sum(run_seconds) / (len(run_seconds) * batch)


def run_demo(
    out: Path,
    images: int = DEFAULT_IMAGES,
    *,
    method_names: Sequence[str] | None = None,
    batch: int = 16,
    figure_images: int = 4,
    weights: Path | None = None,
    progress: bool = True,
    models: Sequence[str] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    model_metric_pairs: int = DEFAULT_MODEL_METRIC_PAIRS,
    metric_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the results dict that is also written to ``out/results.json``.

    Args:
      out: output folder (created).
      images: number of held-out test images (the first ``images`` of the split).
      method_names: methods to run (default: :data:`DEFAULT_METHODS`; ``["all"]``: every
        registered method); methods of kinds other than ``"attribution"`` and ``"cam"``, e.g.
        BiLRP or D-RISE, are listed in the results as skipped.
      batch: maps computed per jitted call.
      figure_images: images shown in the figure (per model).
      weights: folder with the bundled weights (default :func:`weights_dir`).
      models: bundled classifiers to use, by file stem (default: all of
        :data:`BUNDLED_CLASSIFIERS`).
      hparams: per-method hyperparameter overrides (default :data:`DEMO_HPARAMS`).
      model_metric_pairs: the model-based metrics (deletion, insertion, region insertion:
        tens of forward passes per map) and the method metrics score the first this many pairs;
        the pair metrics (localisation, complexity) score all pairs.
      metric_names: metrics to score (default: every registered pair metric and
        :data:`DEFAULT_MODEL_METRICS`): names of pair, model-based or method metrics
        (``xaijax metrics``).
    """
    from tqdm import tqdm

    if images < 1:
        raise ValueError(f"--images must be at least 1; got {images}")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1; got {batch}")
    if model_metric_pairs < 0:
        raise ValueError(f"--model-metric-pairs must be >= 0; got {model_metric_pairs}")
    stems = [Path(f).stem for f in BUNDLED_CLASSIFIERS]
    chosen = list(models) if models else stems
    unknown = [m for m in chosen if m not in stems]
    if unknown:
        raise ValueError(f"unknown bundled model {unknown[0]!r}; choose from {', '.join(stems)}")
    paths = [checkpoints.bundled_weights(f"{m}.safetensors", weights) for m in chosen]
    hparams = DEMO_HPARAMS if hparams is None else hparams
    if method_names and list(method_names) == ["all"]:
        candidates = methods_registry.names()
    elif method_names:
        candidates = list(method_names)
    else:
        candidates = [n for n in DEFAULT_METHODS if n in methods_registry.names()]
    kinds = {n: methods_registry.kind(n) for n in candidates}  # declared by each method
    if method_names and all(k not in CLASSIFIER_KINDS for k in kinds.values()):
        # nothing the demo can score (``xaijax demo`` refuses any such name up front; here a
        # mixed list runs its classifier methods and lists the others as not run)
        bad = candidates[0]
        raise ValueError(
            f"--methods {bad}: kind {kinds[bad]!r}, not a classifier attribution; the demo scores one map per "
            f"(image, class) pair and runs only methods of kind {' or '.join(CLASSIFIER_KINDS)}"
        )
    pair_metric_names, model_metric_names, method_metric_names = _chosen_metrics(metric_names)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output directory {out} is not writable")

    names = [n for n in candidates if kinds[n] in CLASSIFIER_KINDS]
    skipped = {n: f"kind {k!r}: not a per-image classifier attribution" for n, k in kinds.items() if k not in CLASSIFIER_KINDS}
    chosen_metrics = set(pair_metric_names) | set(model_metric_names) | set(method_metric_names)
    metric_options = {k: v for k, v in DEMO_METRIC_OPTIONS.items() if k in chosen_metrics}
    scenes = data.SyntheticScenes()
    records = [scenes.record("test", i) for i in range(images)]
    pairs = build_pairs(records)
    imgs = np.stack([r.image for r in records])
    num_classes = len(scenes.class_names)

    loaded = []
    for p in paths:
        model, variables, info = checkpoints.load(None, p)
        size = model_input_size(model, info, fallback=scenes.size)
        if size != scenes.size:  # the regions are the benchmark's: no resizing of images or maps here
            raise ValueError(
                f"{p.name}: the model takes {size}x{size} px inputs but the synthetic benchmark's images are "
                f"{scenes.size}x{scenes.size}; the demo runs models made for the benchmark's size"
            )
        loaded.append((p.stem, model, variables, preprocess.convention(info)))

    steps = len(loaded) * len(names) * max(1, -(-len(pairs.classes) // batch))
    bar = tqdm(total=steps, desc="demo", unit="batch", disable=not progress)
    rows: list[dict[str, Any]] = []
    sources: dict[str, str] = {}  # table column -> the metric that wrote it (the legend)
    figure_maps: dict[tuple[str, str], np.ndarray] = {}
    fig_pairs = _figure_pairs(pairs, figure_images)
    try:
        for model_name, model, variables, convention in loaded:
            x_all = normalize(jnp.asarray(imgs), convention)
            model_fn = metrics.classifier_fn(model, variables)
            for name in names:
                bar.set_postfix_str(f"{model_name}: {name}")
                hp = hparams.get(name, {})
                row: dict[str, Any] = {"model": model_name, "method": name, "hparams": _hp_str(hp)}
                t_method = time.perf_counter()
                try:
                    explain = _explain_fn(methods_registry.get(name, **hp), model)
                    maps, t_compile, per_map = _run_method(explain, variables, x_all, pairs, batch, lambda: bar.update(1))
                    row["compile_s"] = round(t_compile, 3)
                    row["ms_per_map"] = round(1000 * per_map, 3)
                    row["method_s"] = round(time.perf_counter() - t_method, 2)
                except NotApplicable as e:
                    # the method is not defined for this architecture (CAM on VGG's fully
                    # connected head, ...): the row records the reason and the demo goes on;
                    # any other error is a bug and propagates
                    # (the whole message: the JSON keeps it, the Markdown table shortens it keeping its advice)
                    row["error"] = f"not defined for this model: {' '.join(str(e).split()) or type(e).__name__}"
                    bar.update(max(1, -(-len(pairs.classes) // batch)))
                    rows.append(row)
                    continue
                pb = metrics.PairBatch(maps=maps, regions=pairs.regions, classes=pairs.classes, dif=pairs.dif)
                for mname in pair_metric_names:
                    metric = metrics.get(mname, **metric_options.get(mname, {}))
                    _record(row, sources, mname, metric.summarize(metric(pb), pairs.classes, pairs.dif, num_classes))
                k = min(model_metric_pairs, len(pairs.classes))
                t_metrics = time.perf_counter()
                if k:
                    sel = pairs.image_index[:k]
                    t_k = jnp.asarray(pairs.classes[:k], jnp.int32)
                    for mname in model_metric_names:
                        metric = metrics.get_model_metric(mname, **metric_options.get(mname, {}))
                        _record(row, sources, mname, metric.summarize(metric(model_fn, x_all[sel], maps[:k], t_k)))
                    for mname in method_metric_names:  # they run the method again (perturbed inputs, randomised weights)
                        focus = {"convention": convention} if mname == "focus" else {}  # tiles normalised as the model's inputs
                        metric = metrics.get_method_metric(mname, **focus, **metric_options.get(mname, {}))
                        method = methods_registry.get(name, **hp)
                        try:
                            _record(row, sources, mname, metric.summarize(metric(model, variables, method, x_all[sel], t_k, maps=maps[:k])))
                        except NotApplicable as e:  # e.g. input invariance of a model whose first layer has no bias
                            _record(row, sources, mname, {f"{mname}_error": f"not defined for this model: {' '.join(str(e).split())}"})
                row["model_metrics_s"] = round(time.perf_counter() - t_metrics, 2)
                figure_maps[(model_name, name)] = maps[fig_pairs]
                rows.append(row)
    finally:
        bar.close()

    result = {
        "dataset": {"name": "synthetic", "split": "test", "images": images, "pairs": int(len(pairs.classes)),
                    "dif_pairs": int(pairs.dif.sum()), "seed": scenes.seed},
        "models": [m[0] for m in loaded],
        "methods": names,
        "skipped_methods": skipped,
        "metrics": pair_metric_names,
        "model_metrics": model_metric_names,
        "method_metrics": method_metric_names,
        "metric_options": metric_options,
        "column_metrics": sources,
        "model_metric_pairs": min(model_metric_pairs, int(len(pairs.classes))),
        "rows": rows,
    }
    _write_tables(out, result)
    _write_figure(out / "figure.png", imgs, records, pairs, fig_pairs, figure_maps, [m[0] for m in loaded], names, scenes.class_names)
    return result


def _record(row: dict[str, Any], sources: dict[str, str], metric: str, summary: dict[str, Any]) -> None:
    """``row.update(summary)``, noting that ``metric`` wrote those columns (the table's legend)."""
    row.update(summary)
    sources.update(dict.fromkeys(summary, metric))


def _chosen_metrics(names: Sequence[str] | None) -> tuple[list[str], list[str], list[str]]:
    """(pair, model-based, method) metric names of a run: ``names`` split by registry (a readable
    error for an unknown one), or the defaults (see :data:`DEFAULT_MODEL_METRICS`)."""
    first = ["pointing-game", "miou", "energy-pointing"]  # the research's headline numbers lead the table
    if names is None:
        pair = [m for m in first if m in metrics.names()] + [m for m in metrics.names() if m not in first]
        return pair, [m for m in DEFAULT_MODEL_METRICS if m in metrics.model_metric_names()], []
    known = (metrics.names(), metrics.model_metric_names(), metrics.method_metric_names())
    unknown = [n for n in names if not any(n in k for k in known)]
    if unknown or not names:
        raise ValueError(
            f"--metrics {','.join(unknown) if unknown else '(empty)'}: not a registered metric; "
            f"registered: {', '.join(sorted(set().union(*known)))} (see `xaijax metrics`)"
        )
    return [n for n in names if n in known[0]], [n for n in names if n in known[1]], [n for n in names if n in known[2]]


def _hp_str(hp: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(hp.items()))


def _figure_pairs(pairs: Pairs, n: int) -> np.ndarray:
    """The first pair of each of the first ``n`` images."""
    firsts = []
    seen: set[int] = set()
    for k, i in enumerate(pairs.image_index):
        if int(i) not in seen:
            seen.add(int(i))
            firsts.append(k)
        if len(firsts) == n:
            break
    return np.asarray(firsts, np.int64)


def _write_tables(out: Path, result: dict[str, Any]) -> None:
    d = result["dataset"]
    header = [
        "# xaijax demo — synthetic benchmark",
        "",
        f"Split `{d['split']}`, {d['images']} images, {d['pairs']} (image, class) pairs ({d['dif_pairs']} in DIF), "
        f"data seed {d['seed']}. The pair metrics (localisation, complexity) score every pair; the model-based and "
        f"method metrics ({', '.join(result['model_metrics'] + result.get('method_metrics', [])) or 'none'}) "
        f"the first {result['model_metric_pairs']} pairs. What each column measures: the legend under the table.",
    ]
    footer: list[str] = []
    if result.get("skipped_methods"):
        footer += ["", "Not run (they explain something other than one classifier decision per image):"]
        footer += [f"- `{n}`: {why}" for n, why in result["skipped_methods"].items()]
    footer += ["", "Figure: `figure.png`: each method's maps over the images, one colour map per row (diverging and "
               "centred at zero when any map of the row is signed, sequential otherwise), limits at the "
               f"{ROBUST_PERCENTILE:g}th percentile of the values of the row's images of one model, with a colour bar "
               "after each model's columns; n/a: the method is not defined for that model."]
    write_tables(out, result["rows"], header, result, footer, descriptions=metric_descriptions(result.get("column_metrics", {})))


def _write_figure(path, imgs, records, pairs, fig_pairs, figure_maps, model_names, method_names, class_names) -> None:
    """One row per method (the first row: images with the explained class's region outlined),
    one column per (model, image): each map over its image (per-pixel opacity growing with the
    value's magnitude) in the row's one colour map (:class:`xaijax.viz.MapScale`: diverging and
    centred at zero with symmetric limits when any map of the row is signed, sequential
    otherwise), limits shared by the row's images of one model (attribution scales differ
    between models) with a colour bar after each model's columns; "n/a" where the method is
    not defined for the column's model."""
    from xaijax.viz import save_figure

    fig = _figure(imgs, pairs, fig_pairs, figure_maps, model_names, method_names, class_names)
    save_figure(path, fig, dpi=90)


def _figure(imgs, pairs, fig_pairs, figure_maps, model_names, method_names, class_names):
    """The demo figure (see :func:`_write_figure`) as a matplotlib ``Figure``."""
    from xaijax.viz import map_grid_figure

    columns = [(mi, pi) for mi in range(len(model_names)) for pi in range(len(fig_pairs))]
    images, regions, titles = [], [], []
    for mi, pi in columns:
        k = fig_pairs[pi]
        images.append(imgs[int(pairs.image_index[k])])
        regions.append(pairs.regions[k])
        titles.append(f"{model_names[mi].replace('synthetic_', '')}\n{class_names[int(pairs.classes[k])]}")
    rows = []
    for name in method_names:
        cells = []
        for mi, pi in columns:
            m = figure_maps.get((model_names[mi], name))
            cells.append(None if m is None else m[pi])
        rows.append((name, cells))
    groups = [model_names[mi] for mi, _ in columns]  # limits shared within each model's columns
    return map_grid_figure(images, rows, column_titles=titles, regions=regions, groups=groups, header="image + GT region")
