"""Map torchvision ViT and timm DeiT state dicts to the Flax variables of the zoo's ViTs, and back.

The zoo's :class:`~xaijax.models.vit.VisionTransformer` and :class:`~xaijax.models.vit.DeiT`
carry torchvision's / timm's module names, so the mapping is mechanical:

==========================================  ==========================================  ===============
torch key                                   Flax variable                               transform
==========================================  ==========================================  ===============
``conv_proj.weight`` / ``patch_embed.proj``  ``params/.../kernel``                       OIHW -> HWIO
``*.weight`` of a Linear                    ``params/.../kernel``                       (out,in) -> (in,out)
``*.weight`` of a LayerNorm                 ``params/.../scale``                        --
``*.bias``                                  ``params/.../bias``                         --
``*.self_attention.in_proj_weight``         ``params/.../self_attention/in_proj/kernel``  (3D,D) -> (D,3D)
``*.self_attention.in_proj_bias``           ``params/.../self_attention/in_proj/bias``    --
``class_token``, ``encoder.pos_embedding``  ``params/class_token``, ...                 --
``cls_token``, ``dist_token``, ``pos_embed``  ``params/cls_token``, ...                 --
==========================================  ==========================================  ===============

A position embedding made for another image size (another patch grid) is resampled to the
model's grid with :func:`resample_pos_embed` (bicubic, prefix tokens kept, timm's
``resample_abs_pos_embed``) when ``resample=True`` (the default); every other mismatch --
missing, unexpected or mis-shaped keys -- is collected and raised in one
:class:`CheckpointMismatchError` naming each key, with a hint when the checkpoint has the
other layout or another depth/width.

This module imports nothing from :mod:`xaijax.checkpoints.mapping` (which dispatches here
for models whose ``family`` is in :data:`FAMILIES`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.checkpoints.errors import CheckpointMismatchError
from xaijax.checkpoints.trees import flatten as _flat
from xaijax.checkpoints.trees import unflatten as _unflat

__all__ = [
    "FAMILIES",
    "POS_EMBED_KEYS",
    "is_vit",
    "guess_layout",
    "describe_structure",
    "model_kwargs_from_state_dict",
    "resample_pos_embed",
    "aa_bicubic_matrix",
    "from_torch_state_dict",
    "to_torch_state_dict",
]

#: Model families served here (``ArchSpec.family`` and the zoo classes' ``family``).
FAMILIES = ("vit", "deit")
#: The position-embedding key of each family.
POS_EMBED_KEYS = {"vit": "encoder.pos_embedding", "deit": "pos_embed"}
_PATCH_KEYS = {"vit": "conv_proj.weight", "deit": "patch_embed.proj.weight"}
_PREFIX_KEYS = {"vit": ("class_token",), "deit": ("cls_token", "dist_token")}
_BLOCK = {"vit": re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\."), "deit": re.compile(r"^blocks\.(\d+)\.")}
_MLP1 = {"vit": "encoder.layers.encoder_layer_0.mlp.0.weight", "deit": "blocks.0.mlp.fc1.weight"}


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is one of the zoo's vision transformers (mapped by this module)."""
    return getattr(type(model), "family", None) in FAMILIES


def guess_layout(keys: Any) -> str | None:
    """``"vit"`` (torchvision names), ``"deit"`` (timm names) or ``None``, from a state dict's keys."""
    keys = set(keys)
    if "class_token" in keys or "encoder.pos_embedding" in keys or any(k.startswith("encoder.layers.encoder_layer_") for k in keys):
        return "vit"
    if "cls_token" in keys or "pos_embed" in keys or any(k.startswith("blocks.0.attn.qkv") for k in keys):
        return "deit"
    return None


def describe_structure(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the keys and shapes of a ViT/DeiT state dict say: ``family``, ``patch_size``,
    ``hidden_dim``, ``num_layers``, ``mlp_dim``, ``grid`` (patches per side of the position
    embedding, ``None`` if not square), ``prefix_tokens``; ``None`` if not a ViT/DeiT layout.
    (The head count is not stored in a state dict.)"""
    family = guess_layout(state_dict)
    if family is None:
        return None
    out: dict[str, Any] = {"family": family}
    pk = _PATCH_KEYS[family]
    if pk in state_dict and np.ndim(state_dict[pk]) == 4:
        s = np.shape(state_dict[pk])
        out["hidden_dim"], out["patch_size"] = int(s[0]), int(s[-1])
    layers = {int(m.group(1)) for k in state_dict for m in [_BLOCK[family].match(k)] if m}
    out["num_layers"] = max(layers) + 1 if layers else 0
    if _MLP1[family] in state_dict:
        out["mlp_dim"] = int(np.shape(state_dict[_MLP1[family]])[0])
    prefix = sum(1 for k in _PREFIX_KEYS[family] if k in state_dict)
    out["prefix_tokens"] = prefix
    pos = POS_EMBED_KEYS[family]
    if pos in state_dict and np.ndim(state_dict[pos]) == 3:
        n = int(np.shape(state_dict[pos])[1]) - prefix
        g = math.isqrt(max(n, 0))
        out["grid"] = g if g * g == n else None
    return out


def model_kwargs_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model keywords a ViT/DeiT state dict fixes by itself: ``image_size`` (grid x patch, e.g.
    384 for torchvision's SWAG ViT-B/16). Depth, widths and the distillation token are the
    architecture's (``--arch``); they are checked, not inferred."""
    d = describe_structure(state_dict)
    out: dict[str, Any] = {}
    if d is None:
        return out
    if d.get("grid") and d.get("patch_size"):
        out["image_size"] = int(d["grid"] * d["patch_size"])
    return out


# --------------------------------------------------------------------------------------------
# position-embedding resampling


def aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of ``F.interpolate(mode="bicubic", antialias=True,
    align_corners=False)`` along one axis -- what timm's ``resample_abs_pos_embed`` calls
    (:func:`xaijax.imageops.resize_matrix` with ``"bicubic-antialias"``)."""
    return imageops.resize_matrix(in_size, out_size, "bicubic-antialias")


def resample_pos_embed(
    pos_embed: np.ndarray,
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Resample a (1, prefix + h*w, D) position embedding to another patch grid, as timm does.

    The ``num_prefix_tokens`` leading rows (class token, distillation token) are kept as they
    are; the rest is read as an (h, w) grid (square unless ``old_grid`` says otherwise),
    resized bicubically (``F.interpolate(..., mode="bicubic", antialias=True)``, timm's
    ``resample_abs_pos_embed`` defaults, see :func:`aa_bicubic_matrix`) and flattened back in
    row-major order. Computed in float64 NumPy; returns the input's dtype. (torchvision's own
    ``interpolate_embeddings`` uses ``align_corners=True`` and no antialiasing instead.)

    Raises:
      ValueError: the embedding is not (1, T, D), has too few rows, or its grid is not square
        and ``old_grid`` is not given.
    """
    pe = np.asarray(pos_embed)
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"a position embedding is (1, tokens, dim); got shape {pe.shape}")
    nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(int(v) for v in new_grid)
    n = pe.shape[1] - num_prefix_tokens
    if old_grid is None:
        g = math.isqrt(max(n, 0))
        if g * g != n or n < 1:
            raise ValueError(
                f"position embedding with {pe.shape[1]} rows and {num_prefix_tokens} prefix token(s) has {n} patch rows, "
                "not a square grid; pass old_grid=(h, w)"
            )
        oh, ow = g, g
    else:
        oh, ow = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(int(v) for v in old_grid)
        if oh * ow != n:
            raise ValueError(f"old_grid {oh}x{ow} does not match the {n} patch rows of the position embedding")
    if (oh, ow) == (nh, nw):
        return pe
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:].astype(np.float64)
    grid = grid.reshape(oh, ow, -1)
    grid = np.einsum("Hh,hwd,Ww->HWd", aa_bicubic_matrix(oh, nh), grid, aa_bicubic_matrix(ow, nw))
    return np.concatenate([prefix, grid.reshape(1, nh * nw, -1).astype(pe.dtype)], axis=1)


# --------------------------------------------------------------------------------------------
# state dict <-> variables


def _template(model: nn.Module) -> dict[tuple[str, ...], Any]:
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return _flat(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x))


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax variable path -> torch key (inverse of the table above)."""
    *mod, leaf = path[1:]
    if mod and mod[-1] == "in_proj":
        return ".".join(mod[:-1]) + (".in_proj_weight" if leaf == "kernel" else ".in_proj_bias")
    if leaf in ("kernel", "scale"):
        return ".".join(mod + ["weight"])
    return ".".join(mod + [leaf])


def _dest(key: str, template: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    *mod, leaf = key.split(".")
    if leaf in ("in_proj_weight", "in_proj_bias"):
        mod, leaf = mod + ["in_proj"], ("weight" if leaf == "in_proj_weight" else "bias")
    if leaf == "weight":
        for p in (("params", *mod, "kernel"), ("params", *mod, "scale")):
            if p in template:
                return p
        return None
    p = ("params", *mod, leaf)
    return p if p in template else None


def from_torch_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    resample: bool = True,
) -> dict:
    """Convert a torchvision ViT (``model.family == "vit"``) or timm DeiT (``"deit"``) state dict.

    Args:
      model: a :class:`~xaijax.models.vit.VisionTransformer` / :class:`~xaijax.models.vit.DeiT`
        built with the checkpoint's depth, widths, head count and class count; its
        ``image_size`` decides the position embedding's grid.
      state_dict: ``{torch key: array}`` (numpy arrays, e.g. from
        :func:`xaijax.checkpoints.load_state_dict`).
      strict: raise on unexpected keys (missing and mis-shaped keys always raise).
      resample: a position embedding made for another (square) grid is resampled to the
        model's (:func:`resample_pos_embed`); with ``False`` it is a mis-shaped key.

    Returns:
      ``{"params": ...}`` of float32 arrays (the template's dtype).

    Raises:
      CheckpointMismatchError: one error naming every missing / unexpected / mis-shaped key.
    """
    family = type(model).family
    template = _template(model)
    pos_key = POS_EMBED_KEYS[family]
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    bad: set[tuple[str, ...]] = set()
    for key, value in state_dict.items():
        arr = np.asarray(value)
        dest = _dest(key, template)
        if dest is None:
            unexpected.append(key)
            continue
        want = tuple(template[dest].shape)
        if dest[-1] == "kernel" and arr.ndim == 4:
            arr = np.transpose(arr, (2, 3, 1, 0))
        elif dest[-1] == "kernel" and arr.ndim == 2:
            arr = arr.T
        if key == pos_key and resample and arr.ndim == 3 and arr.shape != want and arr.shape[2:] == want[2:]:
            try:
                arr = resample_pos_embed(arr, model.grid_size, model.num_prefix_tokens)
            except ValueError as e:
                misshaped.append(f"{key}: checkpoint {tuple(np.shape(value))}, model expects {want} ({e})")
                bad.add(dest)
                continue
        if tuple(arr.shape) != want:
            layout = f" (torch layout {_torch_shape(dest, want)})" if dest[-1] == "kernel" else ""
            misshaped.append(f"{key}: checkpoint {tuple(np.shape(value))}, model expects {want}{layout}")
            bad.add(dest)
            continue
        filled[dest] = arr.astype(template[dest].dtype)
    missing = [_torch_key(p) for p in template if p not in filled and p not in bad]
    if missing or misshaped or (strict and unexpected):
        raise CheckpointMismatchError(_message(model, state_dict, missing, unexpected, misshaped))
    return jax.tree_util.tree_map(jnp.asarray, _unflat(filled))


def _torch_shape(dest: tuple[str, ...], want: tuple[int, ...]) -> tuple[int, ...]:
    if dest[-1] == "kernel":
        return (want[3], want[2], want[0], want[1]) if len(want) == 4 else want[::-1]
    return want


def _model_structure(model: nn.Module) -> dict[str, Any]:
    return {
        "family": type(model).family,
        "patch_size": model.patch_size,
        "hidden_dim": model.hidden_dim,
        "num_layers": model.num_layers,
        "mlp_dim": model.mlp_dim,
    }


def _message(model, state_dict, missing, unexpected, misshaped) -> str:
    lines = [f"checkpoint does not match {type(model).__name__}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = items[:12]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)
    found = describe_structure(state_dict)
    mine = _model_structure(model)
    if found is None:
        lines.append(f"  hint: the checkpoint has neither torchvision ViT nor timm DeiT names; the model is a {mine['family']} model")
        return "\n".join(lines)
    if found["family"] != mine["family"]:
        other = "timm DeiT/ViT (use a deit_* architecture)" if found["family"] == "deit" else "torchvision ViT (use a vit_* architecture)"
        lines.append(f"  hint: the checkpoint has {other} names, the model is a {mine['family']} model")
    diffs = [f"{k}={found[k]} (model {mine[k]})" for k in ("patch_size", "hidden_dim", "num_layers", "mlp_dim") if k in found and found[k] != mine[k]]
    if diffs:
        lines.append("  hint: the checkpoint has " + ", ".join(diffs) + "; build the model with those")
    if found["family"] == "deit" and mine["family"] == "deit" and ("dist_token" in state_dict) != bool(model.distilled):
        which = "has" if "dist_token" in state_dict else "has no"
        lines.append(f"  hint: the checkpoint {which} a distillation token; use a deit_*{'_distilled' if 'dist_token' in state_dict else ''}_patch16_224 architecture (distilled={'dist_token' in state_dict})")
    head = "heads.head.weight" if found["family"] == "vit" else "head.weight"
    if head in state_dict and int(np.shape(state_dict[head])[0]) != model.num_classes:
        lines.append(f"  hint: the checkpoint has {int(np.shape(state_dict[head])[0])} classes; build the model with num_classes={int(np.shape(state_dict[head])[0])}")
    if found.get("grid") is not None and found.get("grid") != model.grid_size and found.get("patch_size") == model.patch_size:
        lines.append(
            f"  hint: the checkpoint's position embedding is for a {found['grid']}x{found['grid']} grid "
            f"(image_size={found['grid'] * model.patch_size}); the model has {model.grid_size}x{model.grid_size}"
        )
    return "\n".join(lines)


def to_torch_state_dict(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch_state_dict`: Flax variables -> torchvision / timm-named arrays."""
    out: dict[str, np.ndarray] = {}
    for path, v in _flat(variables).items():
        arr = np.asarray(v)
        if path[-1] == "kernel":
            arr = np.transpose(arr, (3, 2, 0, 1)) if arr.ndim == 4 else arr.T
        out[_torch_key(path)] = np.ascontiguousarray(arr)
    return out
