"""Train a small zoo classifier on the synthetic scenes benchmark and bundle it in ``weights/``.

The bundled files were made with (see their model cards for results and timings)::

    python experiments/train_classifier.py --arch vgg16 --steps 1200 --batch 32 --seed 0 --cache \
        --train-bn --out weights/synthetic_vgg16.safetensors
    python experiments/train_classifier.py --arch resnet18 --steps 1200 --batch 32 --seed 0 --cache \
        --out weights/synthetic_resnet18.safetensors
    python experiments/train_classifier.py --arch vit --steps 1200 --batch 32 --seed 0 --cache \
        --out weights/synthetic_vit.safetensors

Multi-label sigmoid BCE, AdamW with linear warm-up (5%) and cosine decay, He-normal init
(ViT: truncated normal, see below), random horizontal flips; inputs normalised with the "torchvision" convention (ImageNet mean
and std), which is how native checkpoints are read by ``xaijax.checkpoints.load`` and the
CLI. Batch ``s`` holds the training records ``s * B .. s * B + B - 1`` (mod 10,000), generated
on the fly in a background thread (``--cache`` keeps them in memory, about 2 GB, so later
epochs cost nothing), so a run is a pure function of its arguments: the same command on the
same software reproduces the weights bit for bit and the same metadata (it holds no timings
and no output path; only the order of the metadata entries in the safetensors header varies). Validation mAP (first ``--val-images`` of the val split) is printed every
``--eval-every`` steps; at the end the model is evaluated on the whole test split, saved
atomically with its metadata, and a model card (``--card``, default: the output path with
``.md``) is written with the per-class AP table, chance level, timings and sha256.

Architectures (the zoo's own VGG16 / ResNet-18 code at small widths):

* ``vgg16``: 13 conv layers, width 1/8 (8..64 channels), global average pool
  (``pool_size=1``), hidden 128, no dropout. With ``--train-bn`` the ``vgg16_bn`` variant is
  trained and its BatchNorm folded into the convolutions afterwards, so the saved model is
  a plain VGG16 without BatchNorm (exact in eval mode). Without it, plain VGG16 is trained
  directly with He init plus a data-dependent init, which learns far more slowly.
* ``resnet18``: BasicBlocks (2, 2, 2, 2), width 16 (16..128 channels).
* ``vit``: the zoo's torchvision-style :class:`~xaijax.models.vit.VisionTransformer`
  (registry name ``vit_b_16``, its knobs overridden: ``image_size`` = the benchmark's 128 px,
  smaller patches, depth and widths; ``--width`` sets ``hidden_dim``), initialised as ViTs
  are (:func:`vit_init`: truncated-normal kernels and position embedding, zero biases and
  class token) instead of He-normal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xaijax import checkpoints, models, training
from xaijax.data import SyntheticScenes
from xaijax.data.synthetic import CLASS_NAMES

#: Per-architecture defaults: model kwargs, output layer (for the init), peak learning rate;
#: ``registry``: the zoo name the model is built with (and recorded as ``arch``), default the key.
CONFIGS: dict[str, dict] = {
    "vgg16": {
        "model_kwargs": {"num_classes": 12, "width": 0.125, "hidden": 128, "pool_size": 1, "dropout": 0.0},
        "output_layers": ("classifier/6",),
        "init": "data",
        "lr": 2e-3,
    },
    "resnet18": {
        "model_kwargs": {"num_classes": 12, "width": 16},
        "output_layers": ("fc",),
        "init": "kaiming",
        "lr": 3e-3,
    },
    "vit": {
        "registry": "vit_b_16",
        "model_kwargs": {
            "num_classes": 12, "image_size": 128, "patch_size": 16, "num_layers": 6, "num_heads": 4,
            "hidden_dim": 128, "mlp_dim": 256,
        },
        "output_layers": ("heads/head",),
        "init": "vit",
        "lr": 1e-3,
    },
}

CONVENTION = "torchvision"

INIT_TEXT = {
    "kaiming": "He-normal init (`xaijax.training.kaiming_init`, NumPy draws from the seed)",
    "data": "He-normal init followed by the data-dependent init "
    "(`xaijax.training.data_dependent_init` on train records 0-63)",
    "vit": f"ViT init (`vit_init` of the script: kernels, patch embedding and position embedding "
    f"truncated normal, std {0.02:g} cut at 2 std; biases and class token 0; LayerNorm scale 1; NumPy draws from the seed)",
}

#: Standard deviation of :func:`vit_init` (timm's and torchvision's ViTs use 0.02).
VIT_INIT_STD = 0.02


def registry_name(arch: str) -> str:
    """The zoo name a config key builds (``"vit"`` -> ``"vit_b_16"`` with overridden knobs)."""
    return CONFIGS[arch].get("registry", arch)


def vit_init(params, seed: int, std: float = VIT_INIT_STD) -> dict:
    """Initialise a ViT ``params`` tree (arrays or ``jax.ShapeDtypeStruct``) from its leaves' shapes.

    ``kernel`` (conv patch embedding and every Linear, the head included) and
    ``pos_embedding``: ``std`` times a standard normal truncated to [-2, 2] (redrawn outside);
    ``bias``: 0; ``scale`` (LayerNorm): 1; ``class_token``: 0. Draws come from
    ``np.random.default_rng([seed, i])`` with ``i`` the leaf's index in sorted path order, as
    :func:`xaijax.training.kaiming_init` does (no XLA compilation, portable).

    Raises:
      ValueError: a parameter name other than those.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for i, path in enumerate(sorted(flat)):
        shape, dtype = tuple(flat[path].shape), np.dtype(flat[path].dtype)
        name = path[-1]
        if name in ("kernel", "pos_embedding"):
            rng = np.random.default_rng([int(seed), i])
            z = rng.standard_normal(shape)
            bad = np.abs(z) > 2.0
            while bad.any():
                z[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(z) > 2.0
            out[path] = (std * z).astype(dtype)
        elif name in ("bias", "class_token"):
            out[path] = np.zeros(shape, dtype)
        elif name == "scale":
            out[path] = np.ones(shape, dtype)
        else:
            raise ValueError(f"vit_init: do not know how to initialise parameter {'/'.join(path)!r}")
    return flax.traverse_util.unflatten_dict(out)

#: Why the bundled VGG16 is trained with BatchNorm and then folded (numbers from the
#: exploration runs made while choosing the recipe, on this machine, same data and schedule family).
TRAIN_NOTES = {
    "vgg16_bn": """
**Trained as `vgg16_bn`, shipped as plain `vgg16`.** The network was trained with a
BatchNorm after each of the 13 convolutions (`models.get("vgg16_bn", **model_kwargs)`,
He-normal init), and after training every BatchNorm was folded into the convolution before
it (`xaijax.training.fold_vgg_batchnorm`: kernel * gamma / sqrt(var + eps), bias likewise),
which is exact in eval mode (max |logit difference| {fold_error:.1e} on the val images
checked by the script). The file therefore holds a plain VGG16 -- 13 conv layers with
biases, ReLU, max-pooling, no BatchNorm -- as used in the attribution literature; the
BatchNorm layers exist only during training. Why: plain VGG16 learnt too slowly for the
CPU budget. In exploration runs (batch 32, lr 2e-3, cosine schedules over 900 and 750
steps; not reproduced by the command above) plain VGG16 with He init plus the
data-dependent init reached val mAP 0.41 / 0.46 / 0.52 / 0.54 after 150 / 300 / 450 / 600
steps (with He init alone: 0.30 after 100 and 0.37 after 200 steps), the BatchNorm variant
0.55 / 0.70 / 0.77 / 0.82 at the same steps.
""",
}
#: A note after the parameter count in the model card (formatted with the model kwargs).
ARCH_NOTES = {
    "vgg16": "; 13 conv layers without BatchNorm, as in the original VGG16",
    "vit": "; {num_layers} pre-norm encoder blocks, {num_heads} heads, width {hidden_dim}, MLP {mlp_dim}, "
    "{patch_size}x{patch_size} patches ({image_size}/{patch_size} = grid of patches per side) plus a class token",
}

#: Training images (records 0..63 of the train split) used by the data-dependent init.
INIT_IMAGES = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, required=True, help="optimisation steps")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of init, flips and dropout")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors (or .msgpack)")
    p.add_argument("--card", type=Path, default=None, help="model card path (default: OUT with .md)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per arch)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up length as a fraction of --steps")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--width", type=float, default=None, help="override the model width")
    p.add_argument("--data-seed", type=int, default=0, help="SyntheticScenes seed")
    p.add_argument("--eval-every", type=int, default=0, help="val mAP every N steps (0: 4 times per run)")
    p.add_argument("--val-images", type=int, default=300)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--cache", action="store_true", help="keep generated training images in memory")
    p.add_argument(
        "--train-bn",
        action="store_true",
        help="vgg only: train the _bn variant and fold its BatchNorm into the convolutions (saved as plain vgg)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if args.train_bn and not args.arch.startswith("vgg"):
        p.error("--train-bn applies to vgg architectures only")
    if args.out.suffix not in (".safetensors", ".msgpack"):
        p.error("--out must end in .safetensors or .msgpack")
    return args


def model_kwargs_of(args: argparse.Namespace) -> dict:
    kwargs = dict(CONFIGS[args.arch]["model_kwargs"])
    if args.width is not None:
        if args.arch == "vit":
            kwargs["hidden_dim"] = int(args.width)
        else:
            kwargs["width"] = int(args.width) if args.arch.startswith("resnet") else float(args.width)
    return kwargs


def command_line(args: argparse.Namespace, with_out: bool = True) -> str:
    """The command that reproduces this run (every argument that affects the weights).

    The metadata stores it without ``--out`` so that the file's bytes do not depend on
    where it was written.
    """
    parts = [
        "python experiments/train_classifier.py",
        f"--arch {args.arch}",
        f"--steps {args.steps}",
        f"--batch {args.batch}",
        f"--seed {args.seed}",
    ]
    if args.lr is not None:
        parts.append(f"--lr {args.lr:g}")
    if args.warmup != 0.05:
        parts.append(f"--warmup {args.warmup:g}")
    if args.weight_decay != 1e-2:
        parts.append(f"--weight-decay {args.weight_decay:g}")
    if args.width is not None:
        parts.append(f"--width {args.width:g}")
    if args.data_seed != 0:
        parts.append(f"--data-seed {args.data_seed}")
    if args.cache:
        parts.append("--cache")
    if args.train_bn:
        parts.append("--train-bn")
    if with_out:
        parts.append(f"--out {args.out.as_posix()}")
    return " ".join(parts)


def sha256_of(path: Path, skip_header: bool = False) -> str:
    """sha256 of a file; with ``skip_header``, of a safetensors file's data after its JSON header."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if skip_header:
            fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(path: Path, args: argparse.Namespace, info: dict) -> None:
    """Write the Markdown model card (atomically)."""
    ap_rows = "\n".join(
        f"| {i} | {name} | {info['test_pos'][i]} | {info['test_ap'][i]:.4f} |" for i, name in enumerate(CLASS_NAMES[: len(info["test_ap"])])
    )
    kwargs = json.dumps(info["model_kwargs"])
    text = f"""# `{args.out.name}` -- {info['arch']} trained on the synthetic scenes benchmark

Bundled so that attribution methods and evaluation protocols (pointing game, mIoU,
deletion/insertion, ...) can run offline on a *trained* model. Load it with

```python
from xaijax import checkpoints
model, variables, info = checkpoints.load(None, "{args.out.as_posix()}")
# inputs: NHWC float32 RGB in [0, 1], normalised with
# xaijax.models.preprocess.normalize(x, "{CONVENTION}"); outputs: 12 logits (sigmoid = P(class present))
```

## Model

- Architecture: `models.get("{info['arch']}", **model_kwargs)` -- the zoo's own {info['arch']} code
  (same module names as torchvision; CAM layer `{info['cam_layer']}`), at a small width.
- `model_kwargs`: `{kwargs}`
- Parameters: {info['num_params']:,} (float32){info['arch_note']}
- Input convention: `"{CONVENTION}"` (ImageNet mean/std on RGB in [0, 1]); 128x128 images.
- Output: 12 independent logits (multi-label; sigmoid gives the probability that the class is present).

## Data

`xaijax.data.SyntheticScenes(seed={args.data_seed})` (defaults: 128x128 RGB, 12 classes,
1-4 objects per image, up to 3 distractors); splits train (10,000 images), val (1,000),
test (1,000); every image is a pure function of (seed, split, index). Targets: multi-hot
over all objects of an image (difficult ones included). Training used the train split
only (batch `s` = records `s*B .. s*B+B-1` mod 10,000, i.e. {info['images_seen']:,} images
seen, {info['images_seen'] / 10000:.2f} epochs), with random horizontal flips; model selection
used nothing (the final step is saved); val mAP was only monitored.

## Training

```
{info['command']}
```

reproduces the weights exactly on the same software (jax {jax.__version__}, CPU): the same
tensors, bit for bit, and the same metadata (it holds no timings and no output path). The
tensor data section of the file is then byte-identical (sha256 below); the sha256 of the
whole file can still differ, because the safetensors writer emits the metadata entries of
the header in an order that varies from run to run. Multi-label sigmoid BCE; AdamW (peak lr {info['lr']:g}, weight
decay {args.weight_decay:g} on {info['decayed']}, gradient clipping at global norm 1), linear
warm-up over {info['warmup_steps']} steps then cosine decay to 0; {info['init_text']};
{args.steps} steps of batch {args.batch}; seed {args.seed} (init and flips).
{info['train_note']}
Time on this machine ({info['cpu_count']} CPU cores, {platform.machine()}):

| | wall clock | process CPU time |
|---|---:|---:|
| training loop (incl. data generation, val evaluations) | {info['train_seconds'] / 60:.1f} min | {info['train_cpu_seconds'] / 60:.1f} min |
| whole run (incl. start-up and the test evaluation) | {info['total_seconds'] / 60:.1f} min | {info['total_cpu_seconds'] / 60:.1f} min |

The machine was shared with other jobs during the run (1-minute load average
{info['load_mean']:.1f} on average and up to {info['load_max']:.1f} during training, on 2
cores), so the wall clock overstates the cost. On a dedicated 2-core machine the wall time
is at most the process CPU time (the run always keeps at least one core busy) and about
0.7 times it: XLA runs parts of each step on both cores (about 1.4 CPU-seconds per
wall-second were measured on the quiet machine).

## Held-out results (test split, {info['test_images']} images)

- **test mAP: {info['test_map']:.4f}** (VOC-style all-point interpolated AP per class,
  `xaijax.training.average_precision`, mean over the 12 classes)
- chance level: {info['chance_map']:.4f} (mean class frequency on the test split = mAP of a
  constant predictor)
- val mAP (first {args.val_images} val images) at the end: {info['val_map']:.4f}

| id | class | test images with the class | AP |
|---:|---|---:|---:|
{ap_rows}

## File

- `{args.out.name}`: {info['file_size']:,} bytes, float32 tensors; sha256 of the file
  `{info['sha256']}`; sha256 of its tensor data section (everything after the header)
  `{info['data_sha256']}`
- metadata keys: {', '.join(f'`{k}`' for k in sorted(info['metadata_keys']))}
"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    c_start = time.process_time()
    loads = [os.getloadavg()[0]]  # 1-minute load average, sampled every 10 steps
    cfg = CONFIGS[args.arch]
    kwargs = model_kwargs_of(args)
    lr = args.lr if args.lr is not None else cfg["lr"]
    warmup_steps = int(round(args.warmup * args.steps))
    ds = SyntheticScenes(seed=args.data_seed)
    arch = registry_name(args.arch)  # the zoo name, recorded as the file's "arch"
    model = models.get(arch, **kwargs)  # the model that is saved
    if int(getattr(model, "image_size", ds.size)) != ds.size:
        raise ValueError(f"model_kwargs image_size {model.image_size} differs from the benchmark's image size {ds.size}")
    train_arch = arch + "_bn" if args.train_bn else arch
    train_model = models.get(train_arch, **kwargs)  # the model that is trained
    init = "kaiming" if args.train_bn else cfg["init"]
    tx = training.make_optimizer(lr, args.steps, warmup_steps, weight_decay=args.weight_decay)
    init_images = ds.batch("train", 0, INIT_IMAGES)["images"] if init == "data" else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, ds.size, ds.size, 3), jnp.float32))
    if init == "vit":  # not an initialiser of create_train_state: build the state here, the same way
        params = jax.tree.map(jnp.asarray, vit_init(shapes["params"], args.seed))
        state = training.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=jax.jit(tx.init)(params),
            rng=jax.random.key(int(args.seed)),
        )
    else:
        state = training.create_train_state(
            train_model, tx, args.seed, (ds.size, ds.size, 3), init=init, output_layers=cfg["output_layers"],
            init_images=init_images, convention=CONVENTION,
        )
    step_fn = training.make_train_step(train_model, tx, convention=CONVENTION)
    predict_fn = training.make_predict_fn(train_model, CONVENTION)
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(shapes["params"])))
    print(f"{train_arch} {json.dumps(kwargs)}: {num_params:,} parameters; lr {lr:g}, warm-up {warmup_steps} steps", flush=True)

    val = ds.batch("val", 0, args.val_images)
    eval_every = args.eval_every or max(1, args.steps // 4)
    stream = training.TrainStream(ds, args.batch, cache=args.cache, hflip_seed=args.seed)

    def val_map() -> float:
        return training.evaluate(train_model, state.variables(), val["images"], val["multi_hot"], 100, CONVENTION, predict_fn)["map"]

    t_train = time.perf_counter()
    c_train = time.process_time()
    losses: list[float] = []
    bar = tqdm(stream.iterate(0, args.steps), total=args.steps, desc=f"train {args.arch}", unit="step", mininterval=5.0)
    last_val = float("nan")
    for step, (images, targets) in enumerate(bar, start=1):
        state, metrics = step_fn(state, images, targets)
        if step % 10 == 0 or step == args.steps:
            losses.append(float(metrics["loss"]))
            loads.append(os.getloadavg()[0])
            bar.set_postfix(loss=f"{losses[-1]:.4f}", val_map=f"{last_val:.3f}")
        if step % eval_every == 0 or step == args.steps:
            last_val = val_map()
            tqdm.write(f"step {step}: loss {float(metrics['loss']):.4f}, val mAP {last_val:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - c_train

    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), state.variables())
    fold_error = None
    if args.train_bn:  # BatchNorm folded into the convolutions: a plain VGG with the same eval function
        variables = training.fold_vgg_batchnorm(variables, model.cfg)
        logits_bn = training.predict(train_model, state.variables(), val["images"], 100, CONVENTION, predict_fn)
        logits_plain = training.predict(model, variables, val["images"], 100, CONVENTION)
        fold_error = float(np.max(np.abs(logits_bn - logits_plain)))
        print(f"folded BatchNorm: max |logit difference| on {args.val_images} val images {fold_error:.2e}", flush=True)
        if not fold_error < 1e-3:
            raise RuntimeError(f"folding BatchNorm changed the logits by up to {fold_error}")
    test = ds.batch("test", 0, args.test_images)
    res = training.evaluate(model, variables, test["images"], test["multi_hot"], 100, CONVENTION)
    chance = training.chance_map(test["multi_hot"])
    map_100, _ = training.mean_average_precision(res["logits"][:100], test["multi_hot"][:100])
    metadata = {
        "arch": arch,
        "model_kwargs": json.dumps(kwargs, sort_keys=True),
        "source": "xaijax-synthetic",
        "preprocess": CONVENTION,
        "dataset": json.dumps({"name": "SyntheticScenes", "seed": args.data_seed, "size": ds.size, "num_classes": ds.num_classes}),
        "class_names": json.dumps(list(ds.class_names)),
        "train": json.dumps(
            {"steps": args.steps, "batch": args.batch, "seed": args.seed, "lr": lr, "warmup_steps": warmup_steps,
             "weight_decay": args.weight_decay, "init": init, "trained_as": train_arch, "augment": "hflip", "loss": "sigmoid_bce"},
            sort_keys=True,
        ),
        "command": command_line(args, with_out=False),
        "test_images": str(args.test_images),
        "test_map": f"{res['map']:.6f}",
        "test_map_100": f"{map_100:.6f}",
        "test_ap": json.dumps([round(float(a), 6) for a in res["ap"]]),
        "chance_map": f"{chance:.6f}",
        "val_map": f"{last_val:.6f}",
        "jax_version": jax.__version__,
    }
    checkpoints.save_variables(args.out, variables, metadata=metadata)
    total_seconds = time.perf_counter() - t_start
    info = {
        "arch": arch,
        "model_kwargs": kwargs,
        "cam_layer": model.cam_layer,
        "arch_note": ARCH_NOTES.get(args.arch, "").format(**kwargs),
        "num_params": num_params,
        "images_seen": args.steps * args.batch,
        "command": command_line(args),
        "lr": lr,
        "warmup_steps": warmup_steps,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "total_cpu_seconds": time.process_time() - c_start,
        "load_mean": float(np.mean(loads)),
        "load_max": float(np.max(loads)),
        "init_text": INIT_TEXT[init],
        # training.make_optimizer decays every parameter with >= 2 dims
        "decayed": "kernels, position embedding and class token (parameters with >= 2 dims)" if init == "vit" else "kernels only",
        "train_note": TRAIN_NOTES.get(train_arch, "").format(fold_error=fold_error or 0.0),
        "total_seconds": total_seconds,
        "cpu_count": os.cpu_count(),
        "test_images": args.test_images,
        "test_map": res["map"],
        "test_ap": [float(a) for a in res["ap"]],
        "test_pos": [int(v) for v in test["multi_hot"].sum(0)],
        "chance_map": chance,
        "val_map": last_val,
        "file_size": args.out.stat().st_size,
        "sha256": sha256_of(args.out),
        "data_sha256": sha256_of(args.out, skip_header=args.out.suffix == ".safetensors"),
        "metadata_keys": list(metadata),
        "losses": losses,
        "train_arch": train_arch,
        "fold_error": fold_error,
    }
    card = args.card or args.out.with_suffix(".md")
    write_card(card, args, info)
    summary = {k: info[k] for k in ("arch", "num_params", "test_map", "chance_map", "val_map", "train_seconds", "train_cpu_seconds", "total_seconds", "file_size", "sha256", "data_sha256")}
    print(json.dumps(summary, indent=1), flush=True)
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
