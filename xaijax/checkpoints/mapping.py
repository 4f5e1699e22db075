"""Map PyTorch (torchvision / TorchRay) state dicts to Flax variables of zoo models, and back.

Zoo models carry torchvision's module names, so the mapping is mostly mechanical:

=====================  ============================================  ==================
torch key              Flax variable                                  transform
=====================  ============================================  ==================
``a.b.weight`` (4-D)   ``params/a/b/kernel``                          OIHW -> HWIO
``a.b.weight`` (2-D)   ``params/a/b/kernel``                          (out,in) -> (in,out)
``a.b.weight`` (BN)    ``params/a/b/scale``                           --
``a.b.bias``           ``params/a/b/bias``                            --
``a.b.running_mean``   ``batch_stats/a/b/mean``                       --
``a.b.running_var``    ``batch_stats/a/b/var``                        --
``num_batches_tracked``  dropped                                      --
=====================  ============================================  ==================

Two architecture-specific facts:

* **VGG's first classifier layer.** torch flattens the pooled N,C,H,W feature map in
  C,H,W order, xaijax flattens N,H,W,C. The (4096, C*H*W) weight is therefore permuted to
  (H*W*C, 4096). A fully-convolutional checkpoint (TorchRay's VOC/COCO models store
  ``classifier.0.weight`` as a (4096, C, 7, 7) and later classifier layers as 1x1
  convolutions) maps onto the same Dense layers: a conv over the whole 7x7 map is the
  dense layer with that permutation built in.
* **Inception-v3's auxiliary classifier** (``AuxLogits.*``) only acts in training mode;
  the zoo's eval-mode model has no such layer and the keys are ignored (reported).

Every problem is collected and raised in one :class:`CheckpointMismatchError` that lists
missing, unexpected and mis-shaped keys by name, with a hint when the class count or the
architecture looks wrong.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.checkpoints.errors import CheckpointMismatchError
from xaijax.checkpoints.trees import flatten as _flat
from xaijax.checkpoints.trees import unflatten as _unflat
from xaijax.checkpoints import vit_mapping

__all__ = ["from_torch_state_dict", "to_torch_state_dict", "guess_family", "guess_arch", "describe_structure", "variable_template"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = {"inception": ("AuxLogits.",)}


def variable_template(model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3)) -> dict:
    """Shapes/dtypes of ``model``'s variables (``jax.ShapeDtypeStruct`` leaves), via eval_shape."""
    if vit_mapping.is_vit(model):  # a ViT takes exactly its image_size
        input_shape = (input_shape[0], model.image_size, model.image_size, input_shape[-1])
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def guess_family(keys: Any) -> str | None:
    """Guess the architecture family of a torch state dict from its key names."""
    keys = list(keys)
    if any(k.startswith("features.denseblock") for k in keys):
        return "densenet"
    if any(k.startswith("Mixed_") for k in keys):
        return "inception"
    if any(k.startswith("layer1.") for k in keys):
        return "resnet"
    if any(k.startswith("features.") for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "vgg"
    return None


_RESNET_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")
_VGG_CONV = re.compile(r"^features\.(\d+)\.weight$")
_DENSE_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")


def describe_structure(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The depth structure of a torchvision-named state dict, read from its keys and shapes:
    ``{"family": "resnet", "block": "BasicBlock" | "Bottleneck", "layers": (2, 2, 2, 2), "width": 64}``,
    ``{"family": "vgg", "convs": 13, "batch_norm": False}``,
    ``{"family": "densenet", "block_config": (6, 12, 24, 16), "growth_rate": 32}``,
    ``{"family": "inception"}``; ``None`` when the family is not recognised."""
    keys = list(state_dict)
    family = guess_family(keys)
    if family == "resnet":
        counts: dict[int, int] = {}
        for k in keys:
            m = _RESNET_BLOCK.match(k)
            if m:
                counts[int(m.group(1))] = max(counts.get(int(m.group(1)), 0), int(m.group(2)) + 1)
        block = "Bottleneck" if any(re.match(r"^layer\d\.\d+\.conv3\.weight$", k) for k in keys) else "BasicBlock"
        width = int(np.shape(state_dict["conv1.weight"])[0]) if "conv1.weight" in state_dict else None
        return {"family": "resnet", "block": block, "layers": tuple(counts.get(i, 0) for i in range(1, 5)), "width": width}
    if family == "vgg":
        convs = [k for k in keys if _VGG_CONV.match(k) and np.ndim(state_dict[k]) == 4]
        bn = any(k.startswith("features.") and k.endswith(".running_mean") for k in keys)
        return {"family": "vgg", "convs": len(convs), "batch_norm": bn}
    if family == "densenet":
        blocks: dict[int, int] = {}
        for k in keys:
            m = _DENSE_LAYER.match(k)
            if m:
                blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)))
        g_key = "features.denseblock1.denselayer1.conv2.weight"
        growth = int(np.shape(state_dict[g_key])[0]) if g_key in state_dict else None
        return {"family": "densenet", "block_config": tuple(blocks[i] for i in sorted(blocks)), "growth_rate": growth}
    if family == "inception":
        return {"family": "inception"}
    return None


def _model_structure(model: nn.Module) -> dict[str, Any] | None:
    """:func:`describe_structure`'s fields for a zoo model (without its widths)."""
    family = _family_of(model)
    if family == "resnet":
        return {"family": "resnet", "block": getattr(model.block, "__name__", str(model.block)), "layers": tuple(model.layers)}
    if family == "vgg":
        return {"family": "vgg", "convs": sum(1 for v in model.cfg if v != "M"), "batch_norm": bool(model.batch_norm)}
    if family == "densenet":
        return {"family": "densenet", "block_config": tuple(model.block_config), "growth_rate": int(model.growth_rate)}
    if family == "inception":
        return {"family": "inception"}
    return None


def _same_depth(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return False
    return all(a.get(k) == b.get(k) for k in b if k != "width") and a.get("family") == b.get("family")


def guess_arch(state_dict: Mapping[str, Any]) -> str | None:
    """The registered architecture whose depth structure the state dict has (``"resnet34"``:
    BasicBlocks in stages of 3, 4, 6, 3), or ``None``. Widths are not compared (tiny variants
    of an architecture keep its name)."""
    from xaijax.models import registry

    found = describe_structure(state_dict)
    if found is None:
        return None
    for name in registry.names():
        spec = registry.spec(name)
        if spec.family != found["family"]:
            continue
        try:
            model = spec.build()
        except Exception:  # an architecture that cannot be built with its defaults
            continue
        if _same_depth(_model_structure(model), found):
            return name
    return None


def structure_text(d: Mapping[str, Any]) -> str:
    """``describe_structure``'s dict in words, e.g. ``"BasicBlock stages of (3, 4, 6, 3) blocks"``."""
    if d["family"] == "resnet":
        return f"{d['block']} stages of {d['layers']} blocks"
    if d["family"] == "vgg":
        return f"{d['convs']} convolutions{' with BatchNorm' if d['batch_norm'] else ''}"
    if d["family"] == "densenet":
        return f"dense blocks of {d['block_config']} layers, growth rate {d['growth_rate']}"
    return d["family"]


def arch_hint(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> str | None:
    """A hint naming the architecture a state dict has, when it is not ``model``'s (or always,
    without a model): ``"the checkpoint has BasicBlock stages of (3, 4, 6, 3) blocks, as resnet34 has:
    use --arch resnet34"``."""
    found = describe_structure(state_dict)
    if found is None or found["family"] == "inception":
        return None
    if model is not None and _same_depth(_model_structure(model), found):
        return None
    name = guess_arch(state_dict)
    if name is not None:
        extra = ""
        if found.get("family") == "resnet" and found.get("width") not in (None, 64):
            extra = f" (its stem has {found['width']} channels, not 64: build it with width={found['width']})"
        return f"the checkpoint has {structure_text(found)}, as {name} has: use --arch {name}{extra}"
    mine = f"; the model has {structure_text(_model_structure(model))}" if model is not None and _model_structure(model) else ""
    return f"the checkpoint has {structure_text(found)}, which no registered architecture has with its defaults{mine}"


def _family_of(model: nn.Module) -> str | None:
    name = type(model).__name__.lower()
    for fam in ("vgg", "resnet", "densenet", "inception"):
        if fam in name:
            return fam
    return None


def _vgg_first_dense_from_torch(w: np.ndarray, model: nn.Module, target_in: int) -> np.ndarray:
    """(out, C*p*p) or (out, C, p, p) torch weight -> (p*p*C, out) NHWC-flatten kernel."""
    out = w.shape[0]
    if w.ndim == 4:
        c, p1, p2 = w.shape[1:]
    else:
        p = int(getattr(model, "pool_size", 7))
        p1 = p2 = p
        if w.shape[1] % (p * p):
            raise CheckpointMismatchError(
                f"classifier.0.weight has {w.shape[1]} inputs, not a multiple of pool_size^2 = {p * p}"
            )
        c = w.shape[1] // (p * p)
        w = w.reshape(out, c, p1, p2)
    if c * p1 * p2 != target_in:
        return w.reshape(out, -1).T  # shape error reported by the caller
    return np.transpose(w, (2, 3, 1, 0)).reshape(p1 * p2 * c, out)


def _vgg_first_dense_to_torch(k: np.ndarray, model: nn.Module) -> np.ndarray:
    p = int(getattr(model, "pool_size", 7))
    n_in, out = k.shape
    c = n_in // (p * p)
    return np.transpose(k.reshape(p, p, c, out), (3, 2, 0, 1)).reshape(out, c * p * p)


def from_torch_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    input_shape: tuple[int, ...] = (1, 224, 224, 3),
    strict: bool = True,
) -> dict:
    """Convert a torchvision-named state dict to the Flax variables of ``model``.

    Args:
      model: a zoo model built with the checkpoint's configuration (e.g. ``num_classes``).
      state_dict: ``{torch key: array}`` (numpy arrays or anything ``np.asarray`` accepts),
        e.g. from :func:`xaijax.checkpoints.load_state_dict`.
      input_shape: NHWC shape used to trace the model's variable shapes (no compute).
      strict: raise on unexpected keys (missing and mis-shaped keys always raise).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only for BN models), with
      arrays of the model's parameter dtype (float32).

    Raises:
      CheckpointMismatchError: one error listing every missing / unexpected / mis-shaped key.
    """
    if vit_mapping.is_vit(model):  # ViT / DeiT: xaijax.checkpoints.vit_mapping
        return vit_mapping.from_torch_state_dict(model, state_dict, strict=strict)
    template = _flat(variable_template(model, input_shape))
    family = _family_of(model)
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    seen_bad: set[tuple[str, ...]] = set()
    ignored_prefixes = _IGNORED_PREFIXES.get(family or "", ())

    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(ignored_prefixes):
            continue
        arr = np.asarray(value)
        *mod, leaf = key.split(".")
        mod = tuple(mod)
        if leaf == "weight":
            if ("params", *mod, "kernel") in template:
                dest = ("params", *mod, "kernel")
                tgt = template[dest].shape
                if family == "vgg" and mod == ("classifier", "0") and arr.ndim in (2, 4) and len(tgt) == 2:
                    try:
                        arr = _vgg_first_dense_from_torch(arr, model, tgt[0])
                    except CheckpointMismatchError as e:
                        hint = arch_hint(state_dict, model)
                        raise CheckpointMismatchError(f"{e}" + (f"; hint: {hint}" if hint else "")) from None
                elif arr.ndim == 4 and len(tgt) == 2:
                    # fully convolutional classifier (1x1 conv) onto a Dense layer
                    if arr.shape[2:] != (1, 1):
                        misshaped.append(f"{key}: checkpoint {arr.shape}, expected a 1x1 conv or {tgt[::-1]}")
                        continue
                    arr = arr[:, :, 0, 0].T
                elif arr.ndim == 4:
                    arr = np.transpose(arr, (2, 3, 1, 0))
                elif arr.ndim == 2:
                    arr = arr.T
            elif ("params", *mod, "scale") in template:
                dest = ("params", *mod, "scale")
            else:
                unexpected.append(key)
                continue
        elif leaf == "bias":
            dest = ("params", *mod, "bias")
        elif leaf == "running_mean":
            dest = ("batch_stats", *mod, "mean")
        elif leaf == "running_var":
            dest = ("batch_stats", *mod, "var")
        else:
            unexpected.append(key)
            continue
        if dest not in template:
            unexpected.append(key)
            continue
        want = tuple(template[dest].shape)
        if tuple(arr.shape) != want:
            seen_bad.add(dest)
            misshaped.append(f"{key}: checkpoint {tuple(np.asarray(value).shape)} -> {tuple(arr.shape)}, model expects {want}")
            continue
        filled[dest] = arr.astype(template[dest].dtype)

    missing = [".".join(p[1:-1]) + "." + _torch_leaf(p) for p in template if p not in filled and p not in seen_bad]
    if missing or misshaped or (strict and unexpected):
        raise CheckpointMismatchError(_mismatch_message(model, family, state_dict, missing, unexpected, misshaped))
    return jax.tree_util.tree_map(jnp.asarray, _unflat(filled))


def _torch_leaf(path: tuple[str, ...]) -> str:
    return {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}.get(
        path[-1], path[-1]
    )


def _mismatch_message(model, family, state_dict, missing, unexpected, misshaped) -> str:
    lines = [f"checkpoint does not match {type(model).__name__}:"]

    def show(title: str, items: list[str]) -> None:
        if items:
            shown = items[:12]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)

    show("missing keys", missing)
    show("unexpected keys", unexpected)
    show("mis-shaped keys", misshaped)
    guessed = guess_family(state_dict.keys())
    if guessed and family and guessed != family:
        lines.append(f"  hint: the checkpoint looks like a {guessed} model, not a {family} model")
    hint = arch_hint(state_dict, model)
    if hint:
        lines.append(f"  hint: {hint}")
    have = getattr(model, "num_classes", None)
    for head in ("fc.weight", "classifier.weight", "classifier.6.weight", "classifier.6.bias", "fc.bias"):
        if head in state_dict and any(m.startswith(head) for m in misshaped):
            n = np.asarray(state_dict[head]).shape[0]
            if n != have:  # (a head mis-shaped by another width is the architecture's hint above)
                lines.append(f"  hint: the checkpoint has {n} classes; build the model with num_classes={n}")
            break
    return "\n".join(lines)


def to_torch_state_dict(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch_state_dict`: Flax variables -> torchvision-named arrays.

    BatchNorm layers get ``num_batches_tracked = 0`` (int64) as torch expects. VGG's first
    classifier weight is written in torch's (out, C*H*W) layout.
    """
    if vit_mapping.is_vit(model):
        return vit_mapping.to_torch_state_dict(model, variables)
    family = _family_of(model)
    out: dict[str, np.ndarray] = {}
    for path, v in _flat(variables).items():
        coll, *mod, leaf = path
        arr = np.asarray(v)
        name = ".".join(mod)
        if coll == "params":
            if leaf == "kernel":
                if family == "vgg" and tuple(mod) == ("classifier", "0"):
                    arr = _vgg_first_dense_to_torch(arr, model)
                elif arr.ndim == 4:
                    arr = np.transpose(arr, (3, 2, 0, 1))
                else:
                    arr = arr.T
                out[f"{name}.weight"] = np.ascontiguousarray(arr)
            elif leaf == "scale":
                out[f"{name}.weight"] = arr
            else:
                out[f"{name}.{leaf}"] = arr
        elif coll == "batch_stats":
            out[f"{name}.{_torch_leaf(tuple(path))}"] = arr
            out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    return out
