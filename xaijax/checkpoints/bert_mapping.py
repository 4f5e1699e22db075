"""Hugging Face BERT checkpoints (``pytorch_model.bin``, ``model.safetensors``) <-> the zoo's Flax BERT.

The zoo's :class:`~xaijax.models.bert.BertForSequenceClassification` and
:class:`~xaijax.models.bert.BertForMaskedLM` carry Hugging Face's module names: the Flax
parameter tree is the state-dict key with dots as nesting, and torch's parameter roles renamed:

================================================  =================================================  ===============
torch key                                         Flax variable                                      transform
================================================  =================================================  ===============
``*.weight`` of a Linear                          ``params/.../kernel``                              (out,in) -> (in,out)
``*.weight`` of an Embedding                      ``params/.../embedding``                           --
``*.weight`` / ``*.gamma`` of a LayerNorm         ``params/.../scale``                               --
``*.bias`` / ``*.beta`` (LayerNorm)               ``params/.../bias``                                --
``cls.predictions.bias``                          ``params/cls/predictions/bias``                    --
``cls.predictions.decoder.weight``                tied: must equal ``bert.embeddings.word_embeddings.weight``
``cls.predictions.decoder.bias``                  tied: must equal ``cls.predictions.bias``
``bert.embeddings.position_ids`` / ``token_type_ids``  buffers, ignored
================================================  =================================================  ===============

(``bert.encoder.layer.3.attention.self.query.weight`` ->
``params["bert"]["encoder"]["layer"]["3"]["attention"]["self"]["query"]["kernel"]``, transposed.)

Rules:

* **Layouts read.** ``BertForSequenceClassification`` (``bert.*`` with the pooler, ``classifier``),
  ``BertForMaskedLM`` (``bert.*`` without a pooler, ``cls.predictions.*``) and
  ``BertForPreTraining`` (both ``cls.predictions.*`` and the next-sentence head
  ``cls.seq_relationship.*``: the original ``bert-base-uncased`` files). A bare ``BertModel``
  (keys without the ``bert.`` prefix) gets the prefix. Old checkpoints' LayerNorm
  ``gamma``/``beta`` are read as ``weight``/``bias``.
* **Tied decoder.** The masked-LM decoder is the transposed word embedding (the zoo's model
  has no decoder weight of its own). A checkpoint's ``cls.predictions.decoder.weight`` (and
  ``decoder.bias``), when present, must be *exactly* equal to the word embeddings (and to
  ``cls.predictions.bias``), as Hugging Face's tied weights are; an untied decoder is refused
  with a mismatch error. :func:`to_torch_state_dict` writes both tied copies, as
  ``state_dict()`` of a Hugging Face ``BertForMaskedLM`` does.
* **Ignored, reported.** The position-id buffers always; loaded into a masked-LM model, a
  pre-training checkpoint's pooler and next-sentence head (``bert.pooler.*``,
  ``cls.seq_relationship.*``) -- :func:`ignored_keys` lists them (``info["ignored_keys"]``).
* **Strict otherwise.** Every missing, unexpected or mis-shaped key is collected and raised in
  one :class:`CheckpointMismatchError`, with hints (the checkpoint's sizes, its head, its
  architecture when it is not BERT at all: a ViT, a ResNet, a RoBERTa, ...).
* **Configuration.** Vocabulary, hidden size, depth, MLP width, positions, token types and the
  label count are read off the state dict's shapes; the head count is not stored in a state
  dict: it comes from ``num_attention_heads=``, else the Hugging Face ``config.json`` next to the
  weights file, else the named configuration (``bert-base-uncased``: 12), else an error.
  ``config.json`` also gives ``layer_norm_eps`` and is checked: ``hidden_act`` must be
  ``"gelu"`` (exact erf GELU, the zoo's) and ``position_embedding_type`` ``"absolute"``.

This module imports :mod:`xaijax.models.bert` only inside :func:`build_model` (the model does
not import the checkpoints package).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.checkpoints.errors import CheckpointFormatError, CheckpointMismatchError
from xaijax.checkpoints.state_dicts import read_torch_state_dict
from xaijax.checkpoints.trees import flatten as _flat
from xaijax.checkpoints.trees import unflatten as _unflat
from xaijax.models import bert as _bert_models

__all__ = [
    "FAMILY",
    "TASKS",
    "is_bert",
    "is_bert_arch",
    "looks_like_bert",
    "describe_structure",
    "other_architecture",
    "normalise_state_dict",
    "read_config",
    "model_kwargs_from_state_dict",
    "build_model",
    "variable_template",
    "ignored_keys",
    "from_torch_state_dict",
    "to_torch_state_dict",
    "load_bert",
]

#: ``family`` of the zoo's BERT classes (and of BERT checkpoints' native metadata).
FAMILY = _bert_models.BertForSequenceClassification.family
#: Model kinds: ``"classification"`` (``BertForSequenceClassification``), ``"mlm"`` (``BertForMaskedLM``).
TASKS = _bert_models.TASKS

_WORD = "bert.embeddings.word_embeddings.weight"
_DECODER_W = "cls.predictions.decoder.weight"
_DECODER_B = "cls.predictions.decoder.bias"
_MLM_BIAS = "cls.predictions.bias"
_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")
_HF_TEXT = re.compile(r"^([A-Za-z_]+)\.embeddings\.word_embeddings\.weight$")
_BARE = ("embeddings.", "encoder.layer.", "pooler.")
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings", "type_vocab_size")


# --------------------------------------------------------------------------------------------
# recognising a BERT checkpoint


def is_bert(model: nn.Module) -> bool:
    """Whether ``model`` is one of the zoo's BERT models (``family == "bert"``)."""
    return getattr(type(model), "family", None) == FAMILY


def _configs() -> Mapping[str, Any]:
    return _bert_models.CONFIGS


def is_bert_arch(arch: str | None) -> bool:
    """Whether ``arch`` names a BERT: ``"bert"`` (everything from the checkpoint), a name of
    :data:`xaijax.models.bert.CONFIGS` (``"bert-base-uncased"``) or a registered ``bert`` family."""
    if arch is None:
        return False
    if arch == FAMILY or arch in _configs():
        return True
    from xaijax.models import registry

    try:
        return registry.spec(arch).family == FAMILY
    except ValueError:
        return False


def looks_like_bert(keys: Any) -> bool:
    """Whether state-dict keys have Hugging Face BERT names (with or without the ``bert.`` prefix)."""
    keys = set(keys)
    if _WORD in keys or any(_LAYER.match(k) for k in keys):
        return True
    return "embeddings.word_embeddings.weight" in keys and any(k.startswith("encoder.layer.") for k in keys)


def other_architecture(state_dict: Mapping[str, Any]) -> str | None:
    """What a non-BERT state dict looks like, in words (``"a torchvision ResNet"``), or ``None``
    when it looks like BERT or like nothing known."""
    keys = list(state_dict)
    if looks_like_bert(keys):
        return None
    for k in keys:
        m = _HF_TEXT.match(k)
        if m:
            return f"a Hugging Face {m.group(1)} model ({m.group(1)}.embeddings.*), not BERT"
    if any(k.startswith("distilbert.") for k in keys) or any(".attention.q_lin." in k for k in keys):
        return "a Hugging Face DistilBERT model, not BERT"
    if any(re.match(r"^(transformer\.)?h\.\d+\.attn\.c_attn\.", k) for k in keys):
        return "a Hugging Face GPT-2 model, not BERT"
    from xaijax.checkpoints import vit_mapping
    from xaijax.checkpoints.mapping import guess_family

    layout = vit_mapping.guess_layout(keys)
    if layout is not None:
        return "a torchvision ViT" if layout == "vit" else "a timm DeiT/ViT"
    fam = guess_family(keys)
    if fam is not None:
        return {"vgg": "a torchvision VGG", "resnet": "a torchvision ResNet", "densenet": "a torchvision DenseNet",
                "inception": "a torchvision Inception-v3"}[fam]  # fmt: skip
    return None


def normalise_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face BERT key variants -> one spelling: a bare ``BertModel``'s keys get the
    ``bert.`` prefix, LayerNorm ``gamma``/``beta`` become ``weight``/``bias``. Values as numpy."""
    keys = list(state_dict)
    bare = not any(k.startswith("bert.") for k in keys) and any(k.startswith(_BARE[:2]) for k in keys)
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        name = f"bert.{k}" if bare and k.startswith(_BARE) else k
        if name.endswith(".gamma") and "LayerNorm" in name:
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta") and "LayerNorm" in name:
            name = name[: -len("beta")] + "bias"
        if name in out:
            raise CheckpointMismatchError(f"checkpoint has two spellings of {name!r} (e.g. LayerNorm weight and gamma)")
        out[name] = np.asarray(v)
    return out


def describe_structure(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a (normalised) BERT state dict's keys and shapes say: the sizes of :data:`_SIZES`,
    ``num_labels`` (classifier rows, if any), ``heads`` (which of ``"pooler"``, ``"classifier"``,
    ``"mlm"``, ``"nsp"`` it has) and ``layout`` (``"classification"``, ``"mlm"``,
    ``"pretraining"`` or ``"encoder"``); ``None`` if it has no BERT names."""
    sd = normalise_state_dict(state_dict)
    if not looks_like_bert(sd):
        return None
    out: dict[str, Any] = {}

    def rows(key: str, axis: int = 0) -> int | None:
        return int(np.shape(sd[key])[axis]) if key in sd and np.ndim(sd[key]) > axis else None

    out["vocab_size"] = rows(_WORD)
    out["hidden_size"] = rows(_WORD, 1)
    out["max_position_embeddings"] = rows("bert.embeddings.position_embeddings.weight")
    out["type_vocab_size"] = rows("bert.embeddings.token_type_embeddings.weight")
    layers = {int(m.group(1)) for k in sd for m in [_LAYER.match(k)] if m}
    out["num_hidden_layers"] = max(layers) + 1 if layers else 0
    out["intermediate_size"] = rows("bert.encoder.layer.0.intermediate.dense.weight")
    heads = []
    if any(k.startswith("bert.pooler.") for k in sd):
        heads.append("pooler")
    if "classifier.weight" in sd:
        heads.append("classifier")
        out["num_labels"] = rows("classifier.weight")
    if any(k.startswith("cls.predictions.") for k in sd):
        heads.append("mlm")
    if any(k.startswith("cls.seq_relationship.") for k in sd):
        heads.append("nsp")
    out["heads"] = tuple(heads)
    if "classifier" in heads:
        out["layout"] = "classification"
    elif "mlm" in heads:
        out["layout"] = "pretraining" if "nsp" in heads else "mlm"
    else:
        out["layout"] = "encoder"
    return out


# --------------------------------------------------------------------------------------------
# files


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """A Hugging Face ``config.json`` as a dict: ``path`` itself if it is a JSON file, else the
    ``config.json`` in ``path`` (a folder) or next to it (a weights file); ``None`` if there is none.

    Raises:
      CheckpointFormatError: the file exists but is not a JSON object.
    """
    p = Path(path)
    cfg = p if p.suffix == ".json" else (p / "config.json" if p.is_dir() else p.parent / "config.json")
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"cannot read {cfg}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"cannot read {cfg}: expected a JSON object, found {type(data).__name__}")
    data.setdefault("_path", os.fspath(cfg))
    return data


# --------------------------------------------------------------------------------------------
# configuration


def _named_config(arch: str | None) -> dict[str, Any]:
    if arch is None or arch == FAMILY:
        return {}
    cfg = _configs().get(arch)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def model_kwargs_from_state_dict(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    num_attention_heads: int | None = None,
    task: str | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments that rebuild the checkpoint's model (see :func:`build_model`).

    Args:
      state_dict: Hugging Face BERT names (``bert.*``, ``classifier.*``, ``cls.*``).
      config: the checkpoint's ``config.json`` (:func:`read_config`), if any.
      num_attention_heads: the head count; default ``config["num_attention_heads"]``, else the
        named configuration ``arch``'s.
      task: ``"classification"`` or ``"mlm"``; default from the heads the checkpoint has
        (``classifier`` -> classification, ``cls.predictions`` -> mlm).
      arch: ``"bert"``, ``None`` or a named configuration (:data:`xaijax.models.bert.CONFIGS`)
        whose sizes the checkpoint must have.

    Returns:
      ``{"task", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps"}``
      plus ``"num_labels"`` for classification.

    Raises:
      CheckpointMismatchError: not a BERT state dict, no head for the task, sizes that contradict
        ``config.json`` or the named configuration, an unsupported activation, no head count.
    """
    found = describe_structure(state_dict)
    if found is None:
        what = other_architecture(state_dict)
        raise CheckpointMismatchError(
            "checkpoint is not a Hugging Face BERT state dict (no bert.embeddings.word_embeddings.weight)"
            + (f": it looks like {what}" if what else "")
        )
    cfg = dict(config or {})
    where = cfg.get("_path", "config.json")
    named = _named_config(arch)
    if task is None:
        task = {"classification": "classification", "mlm": "mlm", "pretraining": "mlm"}.get(found["layout"])
        if task is None:
            raise CheckpointMismatchError(
                "checkpoint is a bare BERT encoder (no classifier, no cls.predictions head); pass task='classification' "
                "(with a classifier you add) or task='mlm'"
            )
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    out: dict[str, Any] = {"task": task}
    missing = [k for k in _SIZES if found.get(k) is None]
    if missing:
        raise CheckpointMismatchError(
            f"BERT checkpoint lacks the tensors that fix {', '.join(missing)} (e.g. bert.embeddings.*, "
            "bert.encoder.layer.0.intermediate.dense.weight)"
        )
    for k in _SIZES:
        out[k] = int(found[k])
    if task == "classification" and found.get("num_labels") is not None:
        out["num_labels"] = int(found["num_labels"])
    # the configuration file and the named configuration must agree with the tensors
    for source, values in ((where, cfg), (f"the {arch} configuration", named)):
        diffs = [f"{k}={values[k]} (checkpoint {out[k]})" for k in _SIZES if k in values and int(values[k]) != out[k]]
        if diffs:
            fix = "it belongs to another model" if source == where else "use arch='bert' to take the sizes from the checkpoint"
            raise CheckpointMismatchError(f"{source} says " + ", ".join(diffs) + f"; {fix}")
    if cfg.get("model_type", "bert") != "bert":
        raise CheckpointMismatchError(f"{where} says model_type {cfg['model_type']!r}; only BERT ('bert') is read here")
    act = cfg.get("hidden_act", named.get("hidden_act", "gelu"))
    if act != "gelu":
        raise CheckpointMismatchError(f"{where}: hidden_act {act!r} is not supported; the zoo's BERT uses exact (erf) 'gelu'")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise CheckpointMismatchError(f"{where}: position_embedding_type {pos!r} is not supported; the zoo's BERT has absolute positions")
    heads = num_attention_heads if num_attention_heads is not None else cfg.get("num_attention_heads", named.get("num_attention_heads"))
    if heads is None:
        raise CheckpointMismatchError(
            "the attention head count is not stored in a state dict: put the model's Hugging Face config.json next to the "
            "weights file, pass num_attention_heads=..., or name a configuration (e.g. arch='bert-base-uncased')"
        )
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1 or out["hidden_size"] % int(heads):
        raise CheckpointMismatchError(f"num_attention_heads={heads!r} does not divide hidden_size={out['hidden_size']}")
    out["num_attention_heads"] = int(heads)
    out["layer_norm_eps"] = float(cfg.get("layer_norm_eps", named.get("layer_norm_eps", 1e-12)))
    return out


def build_model(model_kwargs: Mapping[str, Any], arch: str | None = None) -> nn.Module:
    """The zoo model of :func:`model_kwargs_from_state_dict`'s keywords (``task`` picks the class,
    default ``"classification"``). With a named configuration ``arch`` (``"bert-tiny"``) its
    sizes are the defaults that ``model_kwargs`` override."""
    kw = {**_named_config(arch), **dict(model_kwargs)}
    task = kw.pop("task", "classification")
    if task == "classification":
        return _bert_models.BertForSequenceClassification(**kw)
    if task == "mlm":
        kw.pop("num_labels", None)
        return _bert_models.BertForMaskedLM(**kw)
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def model_task(model: nn.Module) -> str:
    """``"mlm"`` for a masked-LM model (no ``num_labels``), else ``"classification"``."""
    return "classification" if hasattr(model, "num_labels") else "mlm"


# --------------------------------------------------------------------------------------------
# state dict <-> variables


def variable_template(model: nn.Module) -> dict:
    """Shapes/dtypes of ``model``'s ``params`` (``jax.ShapeDtypeStruct`` leaves), via eval_shape on
    a (1, 2) id batch; ``{"params": ...}``."""
    t = min(2, int(getattr(model, "max_position_embeddings", 2)))
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), ids)
    return {"params": shapes["params"]}


def _torch_key(path: tuple[str, ...]) -> str:
    *mod, leaf = path[1:]
    return ".".join(mod + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def _dest(key: str, template: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    *mod, leaf = key.split(".")
    if leaf == "weight":
        for role in ("kernel", "embedding", "scale"):
            if ("params", *mod, role) in template:
                return ("params", *mod, role)
        return None
    p = ("params", *mod, leaf)
    return p if p in template else None


def ignored_keys(model: nn.Module, state_dict: Mapping[str, Any], *, _template: Mapping | None = None) -> list[str]:
    """Keys :func:`from_torch_state_dict` drops on purpose: the position-id buffers, and for a
    masked-LM model a pre-training checkpoint's pooler and next-sentence head. (The tied decoder
    copies are checked, not ignored.)"""
    sd = normalise_state_dict(state_dict)
    mlm = model_task(model) == "mlm"
    template = _flat(variable_template(model)) if _template is None else _template
    has_pooler = any(p[:3] == ("params", "bert", "pooler") for p in template)
    out = []
    for k in sd:
        if k in _BUFFERS or (mlm and k.startswith("cls.seq_relationship.")) or (k.startswith("bert.pooler.") and not has_pooler):
            out.append(k)
    return out


def from_torch_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> dict:
    """Convert a Hugging Face BERT state dict to ``model``'s Flax variables.

    Args:
      model: a zoo BERT built with the checkpoint's sizes (:func:`build_model`).
      state_dict: ``{torch key: array}`` (from :func:`xaijax.checkpoints.state_dicts.read_torch_state_dict`), any of the spellings of
        :func:`normalise_state_dict`.
      strict: raise on unexpected keys (missing and mis-shaped keys, and an untied decoder,
        always raise).

    Returns:
      ``{"params": ...}`` with the template's dtype (float32).

    Raises:
      CheckpointMismatchError: one error naming every missing / unexpected / mis-shaped key.
    """
    sd = normalise_state_dict(state_dict)
    template = _flat(variable_template(model))
    skip = set(ignored_keys(model, sd, _template=template))
    mlm = model_task(model) == "mlm"
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    untied: list[str] = []
    bad: set[tuple[str, ...]] = set()
    for key, arr in sd.items():
        if key in skip:
            continue
        if mlm and key in (_DECODER_W, _DECODER_B):
            ref = _WORD if key == _DECODER_W else _MLM_BIAS
            if ref in sd and not (np.shape(sd[ref]) == np.shape(arr) and np.array_equal(sd[ref], arr)):
                diff = (
                    f"max |difference| {float(np.max(np.abs(np.asarray(sd[ref], np.float64) - np.asarray(arr, np.float64)))):.3g}"
                    if np.shape(sd[ref]) == np.shape(arr)
                    else f"shape {tuple(np.shape(arr))} vs {tuple(np.shape(sd[ref]))}"
                )
                untied.append(f"{key} differs from {ref} ({diff})")
            continue
        dest = _dest(key, template)
        if dest is None:
            unexpected.append(key)
            continue
        want = tuple(template[dest].shape)
        if dest[-1] == "kernel" and arr.ndim == 2:
            arr = arr.T
        if tuple(arr.shape) != want:
            layout = f" (torch layout {want[::-1]})" if dest[-1] == "kernel" else ""
            misshaped.append(f"{key}: checkpoint {tuple(np.shape(sd[key]))}, model expects {want}{layout}")
            bad.add(dest)
            continue
        filled[dest] = np.asarray(arr, dtype=template[dest].dtype)
    missing = [_torch_key(p) for p in template if p not in filled and p not in bad]
    if missing or misshaped or untied or (strict and unexpected):
        raise CheckpointMismatchError(_message(model, sd, missing, unexpected, misshaped, untied))
    return jax.tree_util.tree_map(jnp.asarray, _unflat(filled))


def _model_sizes(model: nn.Module) -> dict[str, Any]:
    out = {k: getattr(model, k, None) for k in _SIZES}
    if model_task(model) == "classification":
        out["num_labels"] = getattr(model, "num_labels", None)
    return out


def _message(model, sd, missing, unexpected, misshaped, untied) -> str:
    lines = [f"checkpoint does not match {type(model).__name__}:"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
        ("untied masked-LM decoder (the model ties it to the word embeddings)", untied),
    ):
        if items:
            shown = items[:12]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)
    found = describe_structure(sd)
    if found is None:
        what = other_architecture(sd)
        lines.append("  hint: the checkpoint is not a Hugging Face BERT" + (f"; it looks like {what}" if what else ""))
        return "\n".join(lines)
    mine = _model_sizes(model)
    diffs = [f"{k}={found[k]} (model {mine[k]})" for k in (*_SIZES, "num_labels") if found.get(k) is not None and mine.get(k) is not None and found[k] != mine[k]]
    if diffs:
        lines.append("  hint: the checkpoint has " + ", ".join(diffs) + "; build the model with those")
    task = model_task(model)
    if task == "classification" and found["layout"] in ("mlm", "pretraining"):
        lines.append(
            "  hint: the checkpoint is a masked-LM / pre-training checkpoint (cls.predictions.*, no classifier); load it with "
            "task='mlm' (its 'bert' parameters drop into a classifier's)"
        )
    elif task == "mlm" and found["layout"] == "classification":
        lines.append("  hint: the checkpoint is a sequence classifier (classifier.*); load it with task='classification'")
    return "\n".join(lines)


def to_torch_state_dict(model: nn.Module, variables: Mapping[str, Any], *, tied: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch_state_dict`: Flax variables -> Hugging Face-named arrays.

    With ``tied`` (default) a masked-LM model also gets ``cls.predictions.decoder.weight`` (the
    word embeddings) and ``cls.predictions.decoder.bias`` (``cls.predictions.bias``), as a
    Hugging Face ``BertForMaskedLM.state_dict()`` lists them. No position-id buffer is written.
    """
    out: dict[str, np.ndarray] = {}
    for path, v in _flat({"params": variables["params"]}).items():
        arr = np.asarray(v)
        if path[-1] == "kernel":
            arr = arr.T
        out[_torch_key(path)] = np.ascontiguousarray(arr)
    if tied and model_task(model) == "mlm" and _WORD in out and _MLM_BIAS in out:
        out[_DECODER_W] = out[_WORD].copy()
        out[_DECODER_B] = out[_MLM_BIAS].copy()
    return out


# --------------------------------------------------------------------------------------------
# one call: file -> model


def load_bert(
    path: str | os.PathLike,
    arch: str | None = None,
    *,
    task: str | None = None,
    num_attention_heads: int | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    strict: bool = True,
    num_classes: int | None = None,
    state_dict: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Read a Hugging Face BERT checkpoint into a zoo model.

    Args:
      path: ``pytorch_model.bin`` (torch zip pickle, read by the safe reader) or
        ``model.safetensors`` (or any ``.bin``/``.pt``/``.pth``/``.safetensors`` with HF names).
      arch: ``None``/``"bert"`` or a named configuration (its sizes are checked, its head count used).
      task: ``"classification"``/``"mlm"``; default from the checkpoint's head.
      num_attention_heads: see :func:`model_kwargs_from_state_dict`.
      config: a ``config.json`` path or dict; default the ``config.json`` next to ``path``.
      strict: see :func:`from_torch_state_dict`.
      num_classes: the expected label count (an alias of ``num_labels=``; checked against the head).
      state_dict: the file's state dict when the caller has read it already (not read again).
      overrides: further model keywords (e.g. ``layer_norm_eps``); a size that contradicts the
        checkpoint fails as a mismatch.

    Returns:
      ``(model, variables, info)``: ``info`` has ``arch``, ``family`` ``"bert"``, ``source``
      ``"huggingface"``, ``model_kwargs`` (everything :func:`build_model` needs), ``ignored_keys``,
      ``config`` (the config.json used, or ``None``) and ``class_names`` (the config's ``id2label``
      in id order, or ``None``).
    """
    path = Path(path)
    sd = normalise_state_dict(read_torch_state_dict(path) if state_dict is None else state_dict)
    if not looks_like_bert(sd):
        what = other_architecture(sd)
        raise CheckpointMismatchError(
            f"{path} is not a Hugging Face BERT checkpoint (no bert.embeddings.word_embeddings.weight)"
            + (f"; it looks like {what}" if what else "")
        )
    cfg = read_config(path) if config is None else (read_config(config) if not isinstance(config, Mapping) else dict(config))
    try:
        kwargs = model_kwargs_from_state_dict(sd, cfg, num_attention_heads=num_attention_heads, task=task, arch=arch)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None
    if num_classes is not None:
        overrides.setdefault("num_labels", num_classes)
    if kwargs["task"] == "mlm" and "num_labels" in overrides:
        raise ValueError("a masked-LM model has no num_labels / num_classes")
    kwargs.update(overrides)
    model = build_model(kwargs)
    try:
        variables = from_torch_state_dict(model, sd, strict=strict)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None
    labels = None
    if cfg and isinstance(cfg.get("id2label"), Mapping) and kwargs["task"] == "classification":
        id2label = {int(k): str(v) for k, v in cfg["id2label"].items()}
        if sorted(id2label) == list(range(kwargs.get("num_labels", -1))):
            labels = [id2label[i] for i in range(len(id2label))]
    info = {
        "arch": arch or FAMILY,
        "family": FAMILY,
        "source": "huggingface",
        "model_kwargs": kwargs,
        "ignored_keys": ignored_keys(model, sd),
        "config": cfg.get("_path") if cfg else None,
        "class_names": labels,
    }
    return model, variables, info
