"""Checkpoints: safe PyTorch reading, torch -> Flax porting, native save/load.

* :func:`load` / :func:`port` — weights file -> ``(model, variables, info)`` / native file.
* :func:`load_bert` — a Hugging Face BERT ``pytorch_model.bin`` / ``model.safetensors`` (with its
  ``config.json``) -> ``(model, variables, info)`` (:mod:`xaijax.checkpoints.bert_mapping`;
  :func:`load` and :func:`port` route BERT files there).
* :func:`load_state_dict` — a ``.pth``/``.pt`` file -> ``{key: numpy array}``, without
  importing torch and without executing pickle code (allow-listed tensor globals only).
* :func:`from_torch_state_dict` / :func:`to_torch_state_dict` — the name/layout mapping.
* :func:`save_variables` / :func:`load_variables` — Flax variables in ``.safetensors`` or
  ``.msgpack`` with string metadata (architecture, model configuration).
* :func:`save_detector` / :func:`load_detector` — the tiny detector of
  :mod:`xaijax.models.detector` (its configuration in the metadata).
* :func:`weights_dir` / :func:`bundled_weights` — the synthetic-benchmark weights of a source
  checkout (``XAIJAX_WEIGHTS`` overrides the folder).
"""

from xaijax.checkpoints.bert_mapping import load_bert
from xaijax.checkpoints.bundled import bundled_weights, weights_dir
from xaijax.checkpoints.convert import detect_source, load, load_torch_weights, num_classes_of, port
from xaijax.checkpoints.detector import load_detector, save_detector
from xaijax.checkpoints.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
)
from xaijax.checkpoints.mapping import (
    from_torch_state_dict,
    guess_family,
    to_torch_state_dict,
    variable_template,
)
from xaijax.checkpoints.native import load_variables, save_variables
from xaijax.checkpoints.safetensors_io import flatten_variables, load_safetensors, save_safetensors, unflatten_variables
from xaijax.checkpoints.torch_pickle import load_state_dict, load_torch

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "bundled_weights",
    "detect_source",
    "flatten_variables",
    "from_torch_state_dict",
    "guess_family",
    "load",
    "load_bert",
    "load_detector",
    "load_safetensors",
    "load_state_dict",
    "load_torch",
    "load_torch_weights",
    "load_variables",
    "num_classes_of",
    "port",
    "save_detector",
    "save_safetensors",
    "save_variables",
    "to_torch_state_dict",
    "unflatten_variables",
    "variable_template",
    "weights_dir",
]
