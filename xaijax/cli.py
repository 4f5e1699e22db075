"""The ``xaijax`` command line.

Subcommands::

    xaijax models                      list architectures
    xaijax methods                     list attribution methods
    xaijax port [--arch A] IN OUT     torch / Hugging Face BERT checkpoint -> .safetensors / .msgpack
    xaijax predict --arch A --weights W IMAGE...     top-5 classes
    xaijax explain --weights W --method M IMAGE...  maps (.npy) and overlays (PNG)
    xaijax demo [--quick] [--images N] every method x metric on the synthetic benchmark
    xaijax eval EXPERIMENT --methods M,...   the research's tables (resumable, data-parallel)
    xaijax eval ... --distributed --coordinator H:P --num-processes N --process-id I   one run over several processes/hosts
    xaijax eval-merge --out DIR SHARD_DIR...  merge a sharded eval's results folders
    xaijax visualize --weights W --layer L --units 0:16 --out DIR   natural pre-images (PNG grid + .npy + .json)
    xaijax dissect --dataset synthetic|broden --layer L --out DIR   neuron-concept labels and formulas
    xaijax example --out DIR           end-to-end example (model, weights, predict, explain, PNG)
    xaijax explain-text --weights W --vocab V --premise P --hypothesis H   token relevance (+ PNG/HTML figure)
    xaijax debias-study [OUT] [--retrain]   the research's debiasing study (bias table, token figure)
    xaijax bench [--peers|--gpu] [-- ARGS]   experiments/bench_propagation.py, bench_peers.py or bench_gpu.py (source checkout)

Errors that are the user's (bad file, bad argument) print one line ``xaijax: error: ...``
and exit with status 2; nothing is written. Set ``XAIJAX_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from xaijax.options import parse_key_values

__all__ = ["main"]


class UserError(Exception):
    """An error to report in one line without a traceback."""


def _cmd_models(args: argparse.Namespace) -> None:
    from xaijax.models import registry

    print(f"{'name':16s} {'family':10s} {'cam layer':14s} input")
    for n in registry.names():
        s = registry.spec(n)
        print(f"{n:16s} {s.family:10s} {s.cam_layer:14s} {s.input_size}")


def _cmd_methods(args: argparse.Namespace) -> None:
    from xaijax import methods

    for n in methods.names():
        print(f"{n:28s} {methods.describe(n)}")
    print()
    for p in methods.prefixes():
        print(f"{p + ':<method>':28s} {methods.registry.describe_prefix(p)} (options {p}_...)")


def _cmd_metrics(args: argparse.Namespace) -> None:
    from xaijax import metrics
    from xaijax.evaluation import EXPERIMENTS, experiment_metrics

    for exp in EXPERIMENTS:
        names = experiment_metrics(exp)
        if exp == "sanity":
            print("sanity (xaijax eval sanity)\n  cascading randomisation: Spearman and SSIM per randomised layer (Adebayo et al. 2018)\n")
            continue
        print(f"{exp} (xaijax eval {exp})")
        for n in names:
            print(f"  {n:28s} {metrics.describe(n)}")
        print()


def _cmd_port(args: argparse.Namespace) -> None:
    from xaijax import checkpoints

    dst = Path(args.output)
    if dst.exists() and not args.force:
        raise UserError(f"{dst} exists; pass --force to overwrite")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    from xaijax.checkpoints import bert_mapping

    if (args.heads is not None or args.task is not None) and args.arch is not None and not bert_mapping.is_bert_arch(args.arch):
        raise UserError("--heads and --task apply to BERT checkpoints only")
    if args.heads is not None:
        kwargs["num_attention_heads"] = args.heads
    if args.task is not None:
        kwargs["task"] = args.task
    info = checkpoints.port(args.arch, args.input, dst, **kwargs)
    if info.get("family") == "bert":
        kw = info["model_kwargs"]
        head = f"{kw['num_labels']} labels" if kw["task"] == "classification" else "masked-LM head"
        ign = f"; ignored {', '.join(info['ignored_keys'])}" if info["ignored_keys"] else ""
        print(
            f"wrote {dst} (BERT: {kw['num_hidden_layers']} layers, hidden {kw['hidden_size']}, {kw['num_attention_heads']} heads, "
            f"vocabulary {kw['vocab_size']}, {head}; Hugging Face weights{ign})"
        )
        return
    extra = f"; ignored {len(info['ignored_keys'])} training-only keys" if info["ignored_keys"] else ""
    print(f"wrote {dst} ({args.arch}, {info['source']} weights, {info['model_kwargs'].get('num_classes')} classes{extra})")


def _class_names(n: int, labels: str | None, recorded: Sequence[str] | None = None) -> list[str]:
    """``--labels`` (one name a line), else the names the checkpoint records, else ImageNet's
    for 1000 classes, else ``class 0 .. class n-1``."""
    from xaijax.models.preprocess import imagenet_classes

    if labels:
        names = Path(labels).read_text().splitlines()
        if len(names) != n:
            raise UserError(f"--labels has {len(names)} lines but the model has {n} classes")
        return names
    if recorded is not None and len(recorded) == n:
        return list(recorded)
    return imagenet_classes() if n == 1000 else [f"class {i}" for i in range(n)]


def _checkpoint_inputs(args: argparse.Namespace):
    """Load ``--weights`` and decide what ``predict``/``explain`` feed it and how they read it:
    input size, whole image or torchvision's crop, normalisation, output activation and class
    names — what the checkpoint records (:func:`xaijax.models.preprocess.recorded`) unless a
    flag says otherwise."""
    from xaijax.checkpoints.input_size import model_input_size
    from xaijax.models import preprocess

    if args.size is not None and args.size < 1:
        raise UserError(f"--size must be a positive number of pixels; got {args.size}")
    for p in args.images:  # every image checked before any work (a typo in the 10th file fails now)
        if Path(p).is_dir():
            raise UserError(f"image {p} is a directory, not an image file; pass the image files (e.g. {p}/*.jpg)")
        if not Path(p).is_file():
            raise UserError(f"image not found: {p}")
    model, variables, info = _load_model(args)
    rec = preprocess.recorded(info)
    if args.model and args.size is None and rec.input_size is None:
        raise UserError(f"--model {args.model}: the factory gives no input_size; pass --size")
    try:  # --size, else the model's fixed image_size (ViT), else the recorded size, else the arch's
        size = model_input_size(model, info, args.size)
    except ValueError as e:
        raise UserError(str(e)) from None
    resize = size if rec.whole_image else None
    convention = preprocess.convention(info, args.preprocess)
    activation = args.activation or rec.output
    return model, variables, info, rec, size, resize, convention, activation


def _load_model(args: argparse.Namespace):
    """``(model, variables, info)`` from ``--model package.module:factory`` (the user's own model,
    :mod:`xaijax.models.entry_points`) or from ``--weights`` (exactly one of them)."""
    from xaijax import checkpoints

    if (args.model is None) == (args.weights is None):
        raise UserError("pass exactly one of --weights (a checkpoint) and --model (package.module:factory)")
    if args.model is None:
        return checkpoints.load(args.arch, args.weights)
    from xaijax.models import entry_points

    try:
        return entry_points.load(args.model)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def _model_label(args: argparse.Namespace, info) -> str:
    return args.model if args.model else f"{info['arch']} ({Path(args.weights).name})"


def _probabilities(logits, activation: str):
    import jax
    import numpy as np

    if activation == "sigmoid":
        return np.asarray(jax.nn.sigmoid(logits))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


#: Column title of the probability in ``predict``/``explain`` output, by output activation.
PROB_COLUMN = {"softmax": "softmax", "sigmoid": "sigmoid"}


def _cmd_predict(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    from xaijax.models.preprocess import load_image, normalize

    if args.top < 1:
        raise UserError(f"--top must be at least 1; got {args.top}")
    model, variables, info, rec, size, resize, convention, activation = _checkpoint_inputs(args)
    imgs = np.stack([load_image(p, size, resize) for p in args.images])
    logits = np.asarray(jax.jit(model.apply)(variables, normalize(imgs, convention)))
    names = _class_names(logits.shape[-1], args.labels, rec.class_names)
    probs = _probabilities(logits, activation)
    what = "P(class present), independent per class" if activation == "sigmoid" else "probability over the classes"
    print(f"# {info['arch']}, {size}x{size} px, {convention} normalisation; {activation} = {what}")
    for path, lg, pr in zip(args.images, logits, probs):
        print(path)
        print(f"  {'index':>5s}  {PROB_COLUMN[activation]:>7s}  {'logit':>9s}  class")
        for i in np.argsort(-lg)[: args.top]:
            print(f"  {i:5d}  {pr[i]:7.4f}  {lg[i]:9.4f}  {names[i]}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from xaijax.demo import run_demo

    from xaijax import demo

    images = args.images if args.images is not None else (demo.QUICK_IMAGES if args.quick else demo.DEFAULT_IMAGES)
    chosen = [m.strip() for m in args.models.split(",")] if args.models else (list(demo.QUICK_MODELS) if args.quick else None)
    names = [m.strip() for m in args.methods.split(",")] if args.methods else (list(demo.QUICK_METHODS) if args.quick else None)
    if names and names != ["all"]:
        from xaijax import methods

        for n in names:
            m = methods.get(n)  # readable error for unknown names before any work
            if not m.explains_classifier:  # (bilrp, d-rise: the demo's tables have no row for them)
                how = NOT_FOR_EXPLAIN.get(m.kind, f"is of kind {m.kind!r}").format(name=n).split(", so ")[0]
                raise UserError(f"--methods {n}: {how}; the demo scores one classifier attribution per (image, class) pair, "
                                f"so it runs only methods of kind {' or '.join(methods.CLASSIFIER_KINDS)}")
    hp = demo.QUICK_HPARAMS if args.quick else demo.DEMO_HPARAMS
    mm_pairs = args.model_metric_pairs
    if mm_pairs is None:
        mm_pairs = demo.QUICK_MODEL_METRIC_PAIRS if args.quick else demo.DEFAULT_MODEL_METRIC_PAIRS
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = run_demo(args.out, images, method_names=names, batch=args.batch, models=chosen, hparams=hp,
                      model_metric_pairs=mm_pairs, metric_names=metric_names)
    d = result["dataset"]
    print(f"{d['images']} images, {d['pairs']} pairs; wrote {args.out}/results.md, results.csv, results.json, figure.png")
    print((args.out / "results.md").read_text())


#: How to run the registered methods that ``xaijax explain`` cannot run, by kind.
NOT_FOR_EXPLAIN = {
    "similarity": (
        "explains the similarity of a pair of images (kind 'similarity'), not one classifier decision per image, "
        "so `xaijax explain` cannot run it; from Python: res = xaijax.methods.get({name!r})(model, variables, x, x_prime) "
        "with two NHWC batches, then xaijax.methods.plot_bilrp(...) draws the pair"
    ),
    "detection": (
        "explains a detection of an object detector (kind 'detection'), not a classifier, so `xaijax explain` cannot "
        "run it; from Python: model, variables, _ = xaijax.checkpoints.load_detector('weights/synthetic_detector.safetensors'), "
        "then xaijax.methods.get({name!r})(xaijax.methods.detector_function(model, variables), x, "
        "{{'box': box, 'label': label}})"
    ),
}


def _check_explain_method(name: str, method) -> None:
    if not method.explains_classifier:
        how = NOT_FOR_EXPLAIN.get(method.kind)
        detail = how.format(name=name) if how else f"is of kind {method.kind!r}; explain runs classifier attributions"
        raise UserError(f"--method {name}: {detail}")


def _cmd_explain(args: argparse.Namespace) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from xaijax import methods, viz
    from xaijax.atomic import atomic_npy
    from xaijax.models.preprocess import load_image, normalize

    params = parse_key_values(args.param)
    method = methods.get(args.method, **params)
    _check_explain_method(args.method, method)
    model, variables, info, rec, size, resize, convention, activation = _checkpoint_inputs(args)
    # every image decoded and the target checked before anything is written
    imgs = [load_image(p, size, resize) for p in args.images]
    k = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1]
    if args.target is not None and not 0 <= args.target < k:
        raise UserError(f"--target {args.target} is out of range for a model with {k} classes (valid: 0..{k - 1})")
    names = _class_names(k, args.labels, rec.class_names)
    if method.runs_own_loop:  # (extremal perturbation) it jits its own step; show its bar
        if method.has_progress and "progress" not in params:
            method = dataclasses.replace(method, progress=True)
        explain = method
    else:
        explain = jax.jit(method, static_argnums=0)
    predict = jax.jit(model.apply)
    out = args.out
    for path, img in zip(args.images, imgs):
        x = normalize(img[None], convention)
        logits = np.asarray(predict(variables, x))[0]
        target = int(np.argmax(logits)) if args.target is None else args.target
        prob = float(_probabilities(logits[None], activation)[0, target])
        class_name = names[target]
        m = np.asarray(explain(model, variables, x, jnp.array([target])))[0]
        name = f"{Path(path).stem}.{args.method.replace(':', '_')}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_npy(out / f"{name}.npy", m)
        viz.save_explanation(out / f"{name}.png", img, m, method=args.method, model=_model_label(args, info),
                             target=target, class_name=class_name, score=prob, score_name=activation, logit=float(logits[target]))
        print(f"{path}: {class_name} (class {target}, logit {logits[target]:.3f}, {activation} {prob:.3f}) -> {out}/{name}.png")


def _cmd_eval(args: argparse.Namespace) -> None:
    process = 0
    if args.distributed:  # before anything else uses JAX in this process
        from xaijax.evaluation import distributed

        if args.shard_index != 0 or args.shard_count != 1:
            raise UserError("--distributed splits the images by process itself; drop --shard-index/--shard-count")
        process, count = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        print(f"xaijax eval: process {process} of {count}", file=sys.stderr)
    elif args.coordinator is not None or args.num_processes is not None or args.process_id is not None:
        raise UserError("--coordinator, --num-processes and --process-id belong to --distributed")
    from xaijax.evaluation import EvalConfig, run_experiment

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    hparams: dict[str, dict] = {}
    for item in args.param:
        lhs, eq, val = item.partition("=")
        method, sep, key = lhs.rpartition(":")  # METHOD may itself hold a colon (ucag:..., contrast:...)
        kv = f"{key}={val}"
        if not eq or not sep or method not in names:
            raise UserError(f"--param expects METHOD:key=value with METHOD one of --methods ({', '.join(names)}); got {item!r}")
        hparams.setdefault(method, {}).update(parse_key_values([kv]))
    metric_options: dict[str, dict] = {}
    for item in args.metric_param:
        lhs, eq, val = item.partition("=")
        metric, sep, key = lhs.rpartition(":")
        if not eq or not sep or not metric:
            raise UserError(f"--metric-param expects METRIC:key=value (e.g. max-sensitivity:n_samples=10); got {item!r}")
        metric_options.setdefault(metric, {}).update(parse_key_values([f"{key}={val}"]))
    out = args.out or Path("results") / "eval" / f"{args.experiment}-{args.dataset}"
    cfg = EvalConfig(
        experiment=args.experiment, out=Path(out), methods=tuple(names), dataset=args.dataset, data_dir=args.data_dir,
        boxes_dir=args.boxes_dir,
        split=args.split, size=args.size, arch=args.arch, weights=args.weights, model=args.model, preprocess=args.preprocess,
        hparams=hparams, seeds=args.seeds, batch=args.batch, devices=args.devices, images=args.images, pick=args.pick,
        shard_index=args.shard_index, shard_count=args.shard_count, distributed=args.distributed, crf=args.crf,
        metrics=None if args.metrics is None else tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        metric_options=metric_options,
    )
    from xaijax.evaluation.distributed import ProcessFailed

    try:
        run_experiment(cfg, progress=not args.no_progress)
    except ProcessFailed as e:  # distributed: another process failed (its own output says why)
        raise UserError(str(e)) from None
    if process != 0:  # distributed: process 0 writes the stores and the tables
        print(f"xaijax eval: process {process} done; process 0 wrote the results")
        return
    print(f"wrote {out}/results.md, results.csv, results.json")
    print((Path(out) / "results.md").read_text())


def _cmd_eval_merge(args: argparse.Namespace) -> None:
    from xaijax.evaluation import merge_shards

    merged = merge_shards(args.shards, args.out)
    for name, n in merged.items():
        print(f"{args.out}/{name}: {n} images")
    print(f"now run the same `xaijax eval` command without --shard-index/--shard-count and with --out {args.out}: "
          "it finds every image done and writes the tables")


def _cmd_example(args: argparse.Namespace) -> None:
    from xaijax.example import run_example

    run_example(Path(args.out))


#: Python modules the peer benchmark imports (pip names: torch, torchvision, zennit, captum, grad-cam, torchray).
PEER_MODULES = ("torch", "torchvision", "zennit", "captum", "pytorch_grad_cam", "torchray")


def _cmd_bench(args: argparse.Namespace) -> None:
    """Run ``experiments/bench_propagation.py`` (with ``--peers``: ``bench_peers.py``; with ``--gpu``:
    ``bench_gpu.py``) of a source checkout in this process, with the arguments after ``--``."""
    import importlib.util
    import runpy

    name = "bench_peers.py" if args.peers else "bench_gpu.py" if args.gpu else "bench_propagation.py"
    script = Path(__file__).resolve().parent.parent / "experiments" / name
    if not script.is_file():
        raise UserError(
            f"xaijax bench runs experiments/{name} of a source checkout (git clone, then pip install -e .); "
            f"this installation ({Path(__file__).resolve().parent}) has no experiments/ folder next to the package"
        )
    if args.peers:
        missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(
                f"the peer benchmark needs {', '.join(PEER_MODULES)} in this environment (missing: {', '.join(missing)}); "
                "experiments/PEERS.md shows how to create it (a separate virtualenv; never a dependency of xaijax)"
            )
    rest = list(args.script_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    saved = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own argparse (--help, bad arguments)
        if e.code not in (None, 0):
            raise UserError(f"experiments/{name} exited with status {e.code}") from None
    finally:
        sys.argv = saved


def _cmd_explain_text(args: argparse.Namespace) -> None:
    """``xaijax explain-text`` (:mod:`xaijax.explain_text`)."""
    from xaijax import explain_text

    explain_text.run(args)


def _cmd_debias_study(args: argparse.Namespace) -> None:
    """``xaijax debias-study`` (:mod:`xaijax.debias.study`)."""
    from xaijax.debias import study

    study.run_args(args)


def _writable_dir(p: str) -> Path:
    """An output folder argument: checked here, created only by the command when it first writes
    (a command that fails on bad input leaves no empty folder behind)."""
    import os

    path = Path(p)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"output directory {p} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"output directory {p} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create output directory {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create output directory {p}: {parent} is not writable")
    return path


#: ``--model`` of explain and eval (the user's own model, :mod:`xaijax.models.entry_points`).
MODEL_HELP = (
    "your own model instead of --weights: package.module:factory (or file.py:factory), a function returning "
    "(model, variables), an NNX/Equinox module, or a dict with 'model' and optional 'variables', 'wrap', "
    "'input_size', 'preprocess', 'class_names' (see docs/your_model.md)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xaijax", description="Explainable AI for JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list architectures")
    s.set_defaults(func=_cmd_models)
    s = sub.add_parser("methods", help="list attribution methods")
    s.set_defaults(func=_cmd_methods)

    s = sub.add_parser("metrics", help="list evaluation metrics by experiment (family)")
    s.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("port", help="convert a PyTorch checkpoint to .safetensors/.msgpack")
    s.add_argument(
        "--arch",
        default=None,
        help="architecture, e.g. resnet50 (see `xaijax models`); optional for a Hugging Face BERT checkpoint "
        "(pytorch_model.bin / model.safetensors with its config.json beside it; or 'bert', or a configuration such as "
        "bert-base-uncased)",
    )
    s.add_argument("--num-classes", type=int, default=None, help="default: read from the checkpoint")
    s.add_argument("--task", choices=("classification", "mlm"), default=None, help="BERT: the head to load (default: the checkpoint's)")
    s.add_argument("--heads", type=int, default=None, help="BERT: attention heads, when no config.json is beside the checkpoint")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("input", help="torch .pth/.pt/.bin file (never executed) or a Hugging Face model.safetensors")
    s.add_argument("output", help="output .safetensors or .msgpack")
    s.set_defaults(func=_cmd_port)

    s = sub.add_parser("predict", help="print the top classes for images")
    s.add_argument("--arch", default=None, help="architecture (optional for native files, which record it)")
    s.add_argument("--weights", default=None, help=".pth/.pt, .safetensors or .msgpack (or use --model)")
    s.add_argument("--model", default=None, metavar="MODULE:FACTORY", help=MODEL_HELP)
    s.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's fixed image_size (ViT), else recorded in the checkpoint, else the architecture's)")
    s.add_argument("--preprocess", choices=["torchvision", "caffe", "none"], default=None,
                   help="input normalisation (default: recorded in the checkpoint)")
    s.add_argument("--activation", choices=["softmax", "sigmoid"], default=None,
                   help="how logits become probabilities (default: recorded in the checkpoint, e.g. sigmoid for multi-label models; else softmax)")
    s.add_argument("--labels", default=None, help="text file with one class name per line (default: recorded in the checkpoint)")
    s.add_argument("--top", type=int, default=5)
    s.add_argument("images", nargs="+")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("explain", help="attribution maps for images (.npy + overlay PNG per image)")
    s.add_argument("--arch", default=None, help="architecture (optional for native files, which record it)")
    s.add_argument("--weights", default=None, help=".pth/.pt, .safetensors or .msgpack (or use --model)")
    s.add_argument("--model", default=None, metavar="MODULE:FACTORY", help=MODEL_HELP)
    s.add_argument("--method", required=True, help="a registered method (see `xaijax methods`)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    s.add_argument("--target", type=int, default=None, help="class index to explain (default: the top class)")
    s.add_argument("--size", type=int, default=None, help="input side in pixels (default: the model's fixed image_size (ViT), else recorded in the checkpoint, else the architecture's)")
    s.add_argument("--preprocess", choices=["torchvision", "caffe", "none"], default=None,
                   help="input normalisation (default: recorded in the checkpoint)")
    s.add_argument("--activation", choices=["softmax", "sigmoid"], default=None,
                   help="how the printed probability is computed (default: recorded in the checkpoint; else softmax)")
    s.add_argument("--labels", default=None, help="text file with one class name per line (default: recorded in the checkpoint)")
    s.add_argument("--out", type=_writable_dir, default="results/explain")
    s.add_argument("images", nargs="+")
    s.set_defaults(func=_cmd_explain)

    s = sub.add_parser("demo", help="all methods x all metrics on the synthetic benchmark with the bundled models")
    s.add_argument("--images", type=int, default=None, help="held-out images to use (default 20; 8 with --quick)")
    s.add_argument("--quick", action="store_true", help="a fast run: one model, 8 images, one method per family, cheaper sampling settings (a minute or two)")
    s.add_argument("--models", default=None, help="comma-separated bundled models (default: synthetic_vgg16,synthetic_resnet18,synthetic_vit; synthetic_resnet18 with --quick)")
    s.add_argument("--methods", default=None, help="comma-separated method names, or 'all' (default: the research's methods and those it compares against, demo.DEFAULT_METHODS)")
    s.add_argument("--metrics", default=None, help="comma-separated metric names (default: every pair metric, deletion, insertion, region insertion; see `xaijax metrics`)")
    s.add_argument("--batch", type=int, default=16, help="maps computed per jitted call")
    s.add_argument("--model-metric-pairs", type=int, default=None,
                   help="(image, class) pairs scored by deletion / insertion / region insertion (default 8; all pairs get the localisation metrics)")
    s.add_argument("--out", type=_writable_dir, default="results/demo")
    s.set_defaults(func=_cmd_demo)

    from xaijax.evaluation import DATASETS, EXPERIMENTS

    s = sub.add_parser("eval", help="evaluation experiments (the research's tables); resumable, data-parallel")
    s.add_argument("experiment", choices=EXPERIMENTS)
    s.add_argument("--dataset", choices=DATASETS, default="synthetic")
    s.add_argument("--data-dir", default=None, help="dataset folder (not needed for synthetic)")
    s.add_argument("--boxes-dir", default=None, help="imagenet-val: folder of ILSVRC2012 validation bounding-box XMLs")
    s.add_argument("--split", default=None, help="dataset split (default: test)")
    s.add_argument("--size", type=int, default=None, help="square image side (default: the model's fixed image_size (ViT), else the size recorded in the checkpoint, else 128 synthetic / 224 otherwise)")
    s.add_argument("--arch", default=None, help="architecture (needed for .pth weights)")
    s.add_argument("--weights", default=None, help="weights file (default for synthetic: the bundled VGG16-style model)")
    s.add_argument("--model", default=None, metavar="MODULE:FACTORY", help=MODEL_HELP)
    s.add_argument("--preprocess", choices=["torchvision", "caffe", "none"], default=None)
    s.add_argument("--methods", required=True, help="comma-separated method names")
    s.add_argument("--metrics", default=None, help="comma-separated subset of the experiment's metrics (default: all; see `xaijax metrics`)")
    s.add_argument("--metric-param", action="append", default=[], metavar="METRIC:key=value",
                   help="a metric's setting, e.g. max-sensitivity:n_samples=10 (repeatable)")
    s.add_argument("--param", action="append", default=[], help="METHOD:key=value hyperparameter override (repeatable)")
    s.add_argument("--seeds", choices=["labels", "predicted", "top1"], default="labels",
                   help="L: all GT classes; P: GT classes the model predicts; top1: the predicted class vs all objects")
    s.add_argument("--batch", type=int, default=16, help="images (and maps) per jitted call")
    s.add_argument("--devices", type=int, default=None, help="local devices to shard over (default: all)")
    s.add_argument("--images", type=int, default=None, help="evaluate only N images (see --pick)")
    s.add_argument("--pick", choices=["first", "spread"], default="first",
                   help="with --images N: the first N images of the split, or N evenly spaced over it "
                        "(use spread for class-ordered splits such as imagenet-val)")
    s.add_argument("--shard-index", type=int, default=0, help="multi-host: this process's slice")
    s.add_argument("--shard-count", type=int, default=1, help="multi-host: number of processes")
    s.add_argument("--distributed", action="store_true",
                   help="one run over several processes/hosts on JAX's distributed runtime: one mesh over all their devices, "
                        "images split by process, process 0 writes one store per method and the table (docs/distributed.md)")
    s.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="--distributed: process 0's address and a free port (default: $JAX_COORDINATOR_ADDRESS, else cluster auto-detection)")
    s.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="--distributed: number of processes (default: $JAX_NUM_PROCESSES, else auto-detection)")
    s.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="--distributed: this process's id, 0..N-1 (default: $JAX_PROCESS_ID, else auto-detection)")
    s.add_argument("--crf", action="store_true",
                   help="segmentation: refine each thresholded map with a dense CRF on its image (the '+ CRF' rows; "
                        "needs the crf extra; use its own --out)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", default=None, help="output folder (default results/eval/EXPERIMENT-DATASET); rerun to resume")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("eval-merge", help="merge the results folders of a sharded eval (one per --shard-index)")
    s.add_argument("shards", nargs="+", help="the shard processes' --out folders")
    s.add_argument("--out", required=True, type=_writable_dir, help="folder of the merged stores (then rerun eval there)")
    s.set_defaults(func=_cmd_eval_merge)

    from xaijax.features.cli import add_visualize_parser
    from xaijax.features.dissect_cli import add_dissect_parser

    add_visualize_parser(sub)
    add_dissect_parser(sub)

    from xaijax import explain_text
    from xaijax.debias import study as debias_study

    s = sub.add_parser(
        "explain-text",
        help="token attributions of a BERT sentence(-pair) classifier: printed, token figure (PNG + HTML), .npy/.json",
        description=explain_text.__doc__.split("\n\n")[0].split(": ", 1)[-1],
    )
    explain_text.add_arguments(s)
    s.set_defaults(func=_cmd_explain_text)

    s = sub.add_parser(
        "debias-study",
        help="the research's debiasing study: bias table and token figure of three tiny BERT NLI models "
        "(bundled weights in seconds, or --retrain in about 3 minutes)",
    )
    debias_study.add_arguments(s)
    s.set_defaults(func=_cmd_debias_study)

    s = sub.add_parser(
        "bench",
        help="benchmarks of a source checkout: propagation methods vs the plain gradient, the PyTorch peers (--peers), "
        "the GPU benchmark (--gpu)",
        description="Runs experiments/bench_propagation.py, with --peers experiments/bench_peers.py (needs the peer "
        "environment of experiments/PEERS.md), with --gpu experiments/bench_gpu.py (one GPU, at most 8 minutes). "
        "Arguments after -- go to the script, e.g. `xaijax bench -- --quick`, `xaijax bench --peers -- --size 64 "
        "--batches 1`, `xaijax bench --gpu -- --quick`, `xaijax bench -- --help`.",
    )
    which = s.add_mutually_exclusive_group()
    which.add_argument("--peers", action="store_true", help="xaijax vs zennit / Captum / TorchRay / pytorch-grad-cam")
    which.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU benchmark: RISE 4000 masks, rule methods / gradient at batch 64/16/1, UCAG, eval pointing; one "
        "process within an 8-minute budget (docs/gpu_benchmark.md; `-- --quick`: tiny models, runs on a CPU)",
    )
    s.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the script's own arguments")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("example", help="end-to-end example: model, weights, predict, explain, PNG")
    s.add_argument("--out", type=_writable_dir, default="results/example")
    s.set_defaults(func=_cmd_example)
    return p


def _enable_compilation_cache() -> None:
    """Persist XLA compilations between runs (``XAIJAX_JAX_CACHE``: a folder, or ``0`` to disable;
    default ``~/.cache/xaijax/jax``): a second ``explain``/``demo``/``eval`` process skips the
    compile time (``experiments/bench_compile.py`` measures it)."""
    import os

    where = os.environ.get("XAIJAX_JAX_CACHE", str(Path.home() / ".cache" / "xaijax" / "jax"))
    if where in ("", "0"):
        return
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        import jax

        jax.config.update("jax_compilation_cache_dir", where)
        # every program: a cache read costs milliseconds, a VGG16 / ResNet50 forward pass compiles
        # in ~0.5 s. No size bound: JAX's LRU eviction (jax_compilation_cache_max_size) needs the
        # filelock package and fails on a folder written without it; the demo's full run writes ~60 MB.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except (OSError, AttributeError, ValueError):
        pass  # an unwritable cache folder only costs compile time


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    if args.func in (_cmd_demo, _cmd_eval, _cmd_explain, _cmd_explain_text, _cmd_debias_study):
        _enable_compilation_cache()

    try:
        args.func(args)
    except (UserError, OSError, NotImplementedError, ValueError, TypeError, ImportError) as e:
        if os.environ.get("XAIJAX_DEBUG"):
            raise
        msg = str(e).strip() or type(e).__name__
        print(f"xaijax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xaijax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
