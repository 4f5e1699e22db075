"""One-call loading and porting of weights for zoo architectures.

* :func:`load_torch_weights` — a torchvision or TorchRay ``.pth``/``.pt``/``.pth.tar`` file ->
  ``(model, variables)``, read without torch and without running pickle code.
* :func:`load` — any supported file (the above, or a native ``.safetensors``/``.msgpack``
  written by :func:`port`) -> ``(model, variables)``.
* :func:`port` — convert a torch checkpoint once and save it natively, with the
  architecture and model configuration in the file's metadata.

Supported sources: torchvision ImageNet state dicts for every zoo architecture (a
1000-class Inception-v3 gets ``transform_input=True``, as torchvision builds it for its
pretrained weights; pass ``transform_input=False`` to override), any
state dict with torchvision's names (fine-tuned heads with another class count), and
TorchRay's Caffe-converted VOC/COCO models:

* VGG16 (``vgg16_{voc,coco}-*.pth.tar``): classifier layers stored as ``classifier.0/2/4``,
  first convolution in BGR order; built with ``ceil_mode=True`` pooling.
* ResNet50 (``resnet50_{voc,coco}-*.pth.tar``): each BatchNorm stored as a Caffe
  BatchNorm + Scale pair (``...bnK.0.running_mean``, ``...bnK.1.weight``,
  ``...downsample.1.{0,1}.*``), folded back to torchvision's names as TorchRay does; stem
  ``conv1`` in BGR order and with a bias. The model is built with ``stride_in_1x1=True``,
  ``stem_bias=True`` and ``caffe_stem_pool=True`` (see :class:`xaijax.models.resnet.ResNet`);
  BatchNorm keeps torchvision's eps 1e-5, as TorchRay's loader does.

Hugging Face BERT checkpoints (``pytorch_model.bin`` read by the safe reader, or
``model.safetensors`` with torch names) go to :func:`xaijax.checkpoints.bert_mapping.load_bert`
when ``arch`` is ``"bert"``, a BERT configuration name (``"bert-base-uncased"``), or ``None`` and
the file has BERT's key names; the model configuration comes from the tensors and the
``config.json`` next to the file. A ``.safetensors`` file without ``arch`` metadata whose keys are
torch names (dots, no ``/``) is read as a torch state dict, not as a native file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from xaijax.checkpoints.errors import CheckpointMismatchError
from xaijax.checkpoints.mapping import arch_hint, from_torch_state_dict, guess_family
from xaijax.checkpoints.native import load_variables, save_variables
from xaijax.checkpoints.state_dicts import read_torch_state_dict
from xaijax.checkpoints import bert_mapping, vit_mapping
from xaijax.models import preprocess, registry

__all__ = ["load_torch_weights", "load", "port", "detect_source", "num_classes_of", "TORCH_SUFFIXES", "NATIVE_SUFFIXES"]

TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
NATIVE_SUFFIXES = (".safetensors", ".msgpack")

_HEADS = {
    "vgg": "classifier.6.weight",
    "resnet": "fc.weight",
    "densenet": "classifier.weight",
    "inception": "fc.weight",
    "vit": "heads.head.weight",
    "deit": "head.weight",
}


def detect_source(state_dict: Mapping[str, Any]) -> str:
    """``"torchray"`` for TorchRay's Caffe-converted VOC/COCO models, else ``"torchvision"``."""
    keys = set(state_dict)
    if "classifier.4.weight" in keys and "classifier.6.weight" not in keys and "features.0.weight" in keys:
        return "torchray"
    if any(".bn1.0." in k or k.startswith("bn1.0.") for k in keys):
        return "torchray"
    return "torchvision"


def num_classes_of(family: str, state_dict: Mapping[str, Any]) -> int | None:
    """Class count read off the classifier head of a torchvision-named state dict."""
    key = _HEADS.get(family)
    if key and key in state_dict:
        return int(np.shape(state_dict[key])[0])
    return None


def _torchray_vgg_to_torchvision(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    remap = {"classifier.0": "classifier.0", "classifier.2": "classifier.3", "classifier.4": "classifier.6"}
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        out[f"{remap.get(mod, mod)}.{leaf}"] = np.asarray(v)
    w = out["features.0.weight"]
    out["features.0.weight"] = np.ascontiguousarray(w[:, ::-1])  # Caffe BGR -> RGB input channels
    return out  # 4-D (fully convolutional) classifier weights are handled by the mapping


_CAFFE_BN = re.compile(r"(^|\.)(bn\d|downsample\.\d)\.[01]\.")


def _torchray_resnet_to_torchvision(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """TorchRay's Caffe ResNet50 keys -> torchvision's, stem ``conv1`` BGR -> RGB.

    ``layer1.0.bn2.0.running_var`` -> ``layer1.0.bn2.running_var`` and
    ``layer2.0.downsample.1.1.weight`` -> ``layer2.0.downsample.1.weight`` (the Caffe
    BatchNorm "0" and Scale "1" halves of one torch BatchNorm), as TorchRay's
    ``_load_caffe_resnet50`` renames them. No rescaling: the stored statistics are used as is.
    """
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        name = _CAFFE_BN.sub(r"\1\2.", k)
        if name in out and not name.endswith("num_batches_tracked"):  # a counter; dropped anyway
            raise CheckpointMismatchError(f"TorchRay ResNet checkpoint: {k!r} and another key both map to {name!r}")
        out[name] = np.asarray(v)
    if "conv1.weight" not in out:
        raise CheckpointMismatchError("TorchRay ResNet checkpoint has no stem 'conv1.weight'")
    w = out["conv1.weight"]
    out["conv1.weight"] = np.ascontiguousarray(w[:, ::-1])  # Caffe BGR -> RGB input channels
    return out


def _torch_named_safetensors(path: Path) -> bool:
    """Whether a ``.safetensors`` file holds a torch-named state dict (Hugging Face's
    ``model.safetensors``: dotted keys, no ``arch`` metadata) rather than native Flax variables."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta, keys = dict(f.metadata() or {}), list(f.keys())
    except Exception:  # unreadable: the native reader reports it
        return False
    return "arch" not in meta and bool(keys) and not any("/" in k for k in keys)


def load_torch_weights(
    arch: str,
    path: str | Path,
    *,
    num_classes: int | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Read a PyTorch checkpoint for architecture ``arch`` into Flax.

    Args:
      arch: registered architecture name (``"resnet50"``).
      path: a ``.pth``/``.pt`` file (zip or legacy format).
      num_classes: class count; default read from the checkpoint's classifier head.
      model_kwargs: further model configuration (widths for tiny variants).

    Returns:
      ``(model, variables, info)``; ``info`` has ``arch``, ``source``, ``model_kwargs``
      (everything needed to rebuild the model) and ``ignored_keys``.

    Raises:
      UnsafeCheckpointError: the file references code; nothing is executed.
      CheckpointFormatError: not a readable torch checkpoint.
      CheckpointMismatchError: keys or shapes do not fit ``arch``.
    """
    if bert_mapping.is_bert_arch(arch):
        return bert_mapping.load_bert(path, arch, num_classes=num_classes, **model_kwargs)
    spec = registry.spec(arch)
    sd = read_torch_state_dict(path)
    if bert_mapping.looks_like_bert(sd):
        raise CheckpointMismatchError(
            f"{path} looks like a Hugging Face BERT checkpoint, but --arch {arch} is a {spec.family} model; "
            "use --arch bert (sizes from the checkpoint and its config.json)"
        )
    source = detect_source(sd)
    kwargs = dict(model_kwargs)
    if source == "torchray":
        if "features.0.weight" in sd:
            sd = _torchray_vgg_to_torchvision(sd)
            kwargs.setdefault("ceil_mode", True)
        else:
            sd = _torchray_resnet_to_torchvision(sd)
            if spec.family == "resnet":
                for flag in ("stride_in_1x1", "stem_bias", "caffe_stem_pool"):
                    kwargs.setdefault(flag, True)
    guessed = guess_family(sd)
    if guessed is not None and guessed != spec.family:
        hint = arch_hint(sd)
        raise CheckpointMismatchError(
            f"{path} looks like a {guessed} checkpoint, but --arch {arch} is a {spec.family} model" + (f"; {hint}" if hint else "")
        )
    if spec.family in vit_mapping.FAMILIES:  # image_size (position-embedding grid), distilled
        kwargs = {**vit_mapping.model_kwargs_from_state_dict(sd), **kwargs}
    if num_classes is None:
        num_classes = num_classes_of(spec.family, sd)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if spec.family == "inception" and num_classes == 1000:
        # torchvision's ImageNet Inception-v3 weights expect its input re-normalisation
        kwargs.setdefault("transform_input", True)
    model = registry.get(arch, **kwargs)
    try:
        variables = from_torch_state_dict(model, sd)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None
    ignored = sorted(k for k in sd if k.startswith("AuxLogits.")) if spec.family == "inception" else []
    info = {"arch": arch, "source": source, "model_kwargs": kwargs, "ignored_keys": ignored}
    return model, variables, info


def load(arch: str | None, path: str | Path, **model_kwargs: Any) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Load weights from any supported file into a zoo model.

    Native files (``.safetensors``/``.msgpack`` written by :func:`port` or
    :func:`xaijax.checkpoints.save_variables` with ``arch`` metadata) rebuild the model from
    their metadata; ``arch`` may then be ``None`` and, if given, must agree (``info["metadata"]``
    holds the file's string metadata). Torch files need ``arch``. Returns ``(model, variables, info)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix in NATIVE_SUFFIXES and not _torch_named_safetensors(path):
        variables, meta = load_variables(path)
        file_arch = meta.get("arch")
        if arch is None and file_arch is None:
            raise ValueError(f"{path} does not record its architecture; pass arch")
        # a generic "bert" on either side matches any BERT configuration; two named configurations must agree
        same_bert = bert_mapping.is_bert_arch(arch) and bert_mapping.is_bert_arch(file_arch) and "bert" in (arch, file_arch)
        if arch is not None and file_arch is not None and arch != file_arch and not same_bert:
            raise CheckpointMismatchError(f"{path} holds weights for {file_arch!r}, not {arch!r}")
        arch = file_arch or arch
        kwargs = {k: _tuplify(v) for k, v in json.loads(meta.get("model_kwargs", "{}")).items()}
        kwargs.update(model_kwargs)
        if bert_mapping.is_bert_arch(arch):  # BERT: the recorded keywords rebuild it (task: from the head if not recorded)
            kwargs.setdefault("task", "mlm" if "cls" in variables.get("params", {}) else "classification")
            model = bert_mapping.build_model(kwargs, arch)
        else:
            model = registry.get(arch, **kwargs)
        _check_against_model(model, variables, path)
        info = {"arch": arch, "source": meta.get("source", "native"), "model_kwargs": kwargs, "metadata": dict(meta)}
        return model, variables, info
    if arch is None:  # only a BERT checkpoint says what it is by itself
        sd = read_torch_state_dict(path)
        if bert_mapping.looks_like_bert(sd):
            return bert_mapping.load_bert(path, None, state_dict=sd, **model_kwargs)
        what = bert_mapping.other_architecture(sd)
        raise ValueError(f"{path}: a torch checkpoint needs an architecture (--arch)" + (f"; it looks like {what}" if what else ""))
    return load_torch_weights(arch, path, **model_kwargs)


def _tuplify(v: Any) -> Any:
    """JSON lists -> tuples, so that rebuilt modules stay hashable (a static jit argument)."""
    return tuple(_tuplify(i) for i in v) if isinstance(v, list) else v


def _check_against_model(model: nn.Module, variables: Mapping[str, Any], path: Path) -> None:
    from xaijax.checkpoints.mapping import variable_template
    from xaijax.checkpoints.trees import flatten as _flat

    template = bert_mapping.variable_template(model) if bert_mapping.is_bert(model) else variable_template(model)
    want = {k: tuple(v.shape) for k, v in _flat(template).items()}
    have = {k: tuple(np.shape(v)) for k, v in _flat(variables).items()}
    missing = sorted("/".join(k) for k in want.keys() - have.keys())
    extra = sorted("/".join(k) for k in have.keys() - want.keys())
    shaped = sorted(f"{'/'.join(k)}: file {have[k]}, model {want[k]}" for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or extra or shaped:
        parts = [f"{path} does not fit {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        raise CheckpointMismatchError("\n".join(parts))


def port(arch: str | None, src: str | Path, dst: str | Path, **model_kwargs: Any) -> dict[str, Any]:
    """Convert a torch checkpoint to a native file (``.safetensors`` or ``.msgpack``).

    The destination is written atomically and only after the whole conversion succeeded. Its
    metadata records ``arch``, ``source``, ``model_kwargs``, ``ported_from`` and ``preprocess``
    (:func:`xaijax.models.preprocess.convention` of the source: ``"caffe"`` for TorchRay's
    models, else ``"torchvision"``). Returns the ``info`` dict of :func:`load_torch_weights`.

    A Hugging Face BERT checkpoint (``arch`` ``None``, ``"bert"`` or a BERT configuration name;
    ``pytorch_model.bin`` or ``model.safetensors``, with its ``config.json`` beside it) records
    ``arch``, ``family`` ``"bert"``, ``source`` ``"huggingface"``, ``model_kwargs`` (with
    ``task``), ``ported_from`` and, when the config names its labels, ``class_names`` (JSON); no
    image ``preprocess``. Other torch checkpoints need ``arch``.
    """
    dst = Path(dst)
    if dst.suffix not in NATIVE_SUFFIXES:
        raise ValueError(f"output must end in {' or '.join(NATIVE_SUFFIXES)}; got {dst.name!r}")
    if not dst.parent.exists():
        raise FileNotFoundError(f"output directory does not exist: {dst.parent}")
    if arch is None or bert_mapping.is_bert_arch(arch):
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"weights file not found: {src}")
        if arch is None:
            sd = read_torch_state_dict(src)
            if not bert_mapping.looks_like_bert(sd):
                what = bert_mapping.other_architecture(sd)
                raise ValueError(f"{src}: a torch checkpoint needs an architecture (--arch)" + (f"; it looks like {what}" if what else ""))
            _, variables, info = bert_mapping.load_bert(src, None, state_dict=sd, **model_kwargs)
        else:
            _, variables, info = bert_mapping.load_bert(src, arch, **model_kwargs)
        meta = {
            "arch": info["arch"],
            "family": bert_mapping.FAMILY,
            "source": info["source"],
            "model_kwargs": json.dumps(info["model_kwargs"]),
            "ported_from": src.name,
        }
        if info.get("class_names"):
            meta["class_names"] = json.dumps(info["class_names"])
        save_variables(dst, variables, metadata=meta)
        return info
    _, variables, info = load_torch_weights(arch, src, **model_kwargs)
    meta = {
        "arch": arch,
        "source": info["source"],
        "model_kwargs": json.dumps(info["model_kwargs"]),
        "ported_from": Path(src).name,
        "preprocess": preprocess.convention(info),  # the file says what input it expects
    }
    save_variables(dst, variables, metadata=meta)
    return info
