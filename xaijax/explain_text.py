"""``xaijax explain-text``: token attributions of a BERT sentence(-pair) classifier, printed and drawn.

::

    xaijax explain-text --weights model.safetensors --vocab vocab.txt \\
        --premise "A nurse works in medical center of california ." \\
        --hypothesis "He works in california ." --hypothesis "She works in california ." \\
        [--method attnlrp] [--param KEY=VALUE] [--target predicted|INDEX] [--baseline pad|zero] \\
        [--labels "entailment,neutral,contradiction"] [--scale row|shared] [--truncate] [--out DIR]

For every premise/hypothesis pair (one premise and several hypotheses, several of each in equal
number, or premises alone) it prints the predicted class with its softmax probability and every
token with its relevance, and writes into ``--out`` (default ``results/explain-text``):

* ``<name>.png`` and ``<name>.html`` — the token figure (:func:`xaijax.token_figure.token_figure`:
  one row per pair, diverging colours, the predicted class per row, a colour bar);
* ``<name>.npy`` — the relevance (N, T) (float32, padding 0) and ``<name>.json`` — tokens,
  relevance per token, logits, probabilities, predicted and explained classes and the settings.

``<name>`` is ``--name`` or the method (``:`` replaced by ``_``).

Weights: ``--weights`` — any file :func:`xaijax.checkpoints.load` reads as a BERT sequence
classifier (a Hugging Face ``pytorch_model.bin`` / ``model.safetensors`` with its
``config.json``, or a native file written by ``xaijax port`` / ``save_variables``); or
``--bundled NAME`` — ``weights/NAME.safetensors`` of a source checkout (``XAIJAX_WEIGHTS``
overrides the folder; e.g. the debiasing study's ``debias_bert``, ``debias_auto_debias``,
``debias_ours``) with ``weights/NAME.vocab.txt``, else the shared ``weights/<first part of
NAME>_vocab.txt`` (``debias_vocab.txt``), as the default ``--vocab``.

Too long: a pair longer than the model's ``max_position_embeddings`` tokens (specials
included) is refused with an error naming it (default), or, with ``--truncate``, cut
longest-first to that length with a warning. Unknown words (wordpieces not in the vocabulary,
which become ``[UNK]``) are listed in a warning on stderr; the pair is still explained.
Class names: ``--labels`` (comma-separated, or a file with one name a line), else the names the
checkpoint records (a Hugging Face ``config.json``'s ``id2label``, or the native file's
``class_names`` or ``labels``), else ``class 0`` ... .

:func:`add_arguments` declares the options on a parser; :func:`run` executes them and returns
the exit status (0). Bad input raises ``ValueError`` / ``FileNotFoundError`` with a one-line
message (the ``xaijax`` command prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "DEFAULT_METHOD", "DEFAULT_OUT"]

#: The method of ``--method`` when none is given (AttnLRP, the transformer rule set).
DEFAULT_METHOD = "attnlrp"
#: The output folder when ``--out`` is not given.
DEFAULT_OUT = "results/explain-text"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the ``explain-text`` options on ``parser`` (a sub-command's parser); returns it."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", default=None, help="a BERT sequence classifier: HF pytorch_model.bin / model.safetensors (with config.json) or a native .safetensors/.msgpack")
    src.add_argument("--bundled", default=None, metavar="NAME", help="bundled weights weights/NAME.safetensors, e.g. debias_bert (vocabulary: weights/NAME.vocab.txt or the shared weights/debias_vocab.txt)")
    parser.add_argument("--vocab", default=None, help="the model's WordPiece vocab.txt (default with --bundled: weights/NAME.vocab.txt)")
    parser.add_argument("--premise", action="append", required=True, help="first text (repeatable)")
    parser.add_argument("--hypothesis", action="append", default=None,
                        help="second text (repeatable: one per --premise, or several for one premise)")
    parser.add_argument("--method", default=DEFAULT_METHOD, help=f"a text method (default {DEFAULT_METHOD}; see xaijax.methods.text.TEXT_METHODS)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter (repeatable), e.g. steps=50")
    parser.add_argument("--target", default="predicted", help="'predicted' (default: each pair's top class) or a class index")
    parser.add_argument("--baseline", choices=["pad", "zero"], default="pad", help="integrated gradients' baseline (default pad: [PAD] embeddings, [CLS]/[SEP] kept)")
    parser.add_argument("--labels", default=None, help="class names: comma-separated, or a file with one name a line")
    parser.add_argument("--scale", choices=["row", "shared"], default="row", help="colour scale: each row's own max |R| (default) or one for all rows")
    parser.add_argument("--truncate", action="store_true", help="cut pairs longer than the model's maximum length (with a warning) instead of refusing them")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: the method)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return parser


def _pairs(premises: list[str], hypotheses: list[str] | None) -> tuple[list[str], list[str] | None]:
    for t in premises + (hypotheses or []):
        if not t.strip():
            raise ValueError("--premise / --hypothesis must not be empty")
    if hypotheses is None:
        return premises, None
    if len(premises) == 1 and len(hypotheses) > 1:
        return premises * len(hypotheses), hypotheses
    if len(premises) != len(hypotheses):
        raise ValueError(f"{len(premises)} --premise and {len(hypotheses)} --hypothesis: pass one hypothesis per premise, or one premise")
    return premises, hypotheses


def _sources(args: argparse.Namespace) -> tuple[Path, Path]:
    from xaijax.checkpoints import weights_dir

    if args.bundled is not None:
        folder = weights_dir()
        weights = folder / f"{args.bundled}.safetensors"
        if not weights.is_file():
            have = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            raise FileNotFoundError(f"no bundled model {args.bundled!r}: {weights} does not exist (bundled: {', '.join(have) or 'none'})")
        if args.vocab:
            vocab = Path(args.vocab)
        else:  # NAME.vocab.txt, else the family's shared one (debias_bert -> debias_vocab.txt)
            tried = [folder / f"{args.bundled}.vocab.txt", folder / f"{args.bundled.split('_')[0]}_vocab.txt"]
            vocab = next((p for p in tried if p.is_file()), None)
            if vocab is None:
                raise FileNotFoundError(f"vocabulary file not found: {' or '.join(str(p) for p in tried)} (pass --vocab)")
    else:
        weights = Path(args.weights)
        if args.vocab is None:
            raise ValueError("--vocab is required with --weights (the model's WordPiece vocab.txt)")
        vocab = Path(args.vocab)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if not vocab.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {vocab} (a BERT vocab.txt, one wordpiece a line)")
    return weights, vocab


def _class_names(k: int, labels: str | None, info: dict[str, Any]) -> list[str]:
    if labels:
        p = Path(labels)
        names = [n.strip() for n in (p.read_text().splitlines() if p.is_file() else labels.split(","))]
        names = [n for n in names if n]
        if len(names) != k:
            raise ValueError(f"--labels names {len(names)} classes but the model has {k}")
        return names
    recorded = info.get("class_names")
    labels_meta = (info.get("metadata") or {}).get("labels")
    if recorded is None and labels_meta:  # the bundled study models record their labels under "labels"
        try:
            recorded = json.loads(labels_meta)
        except (TypeError, json.JSONDecodeError):
            recorded = None
    if recorded is None:
        try:
            from xaijax.models.preprocess import recorded as _recorded

            recorded = _recorded(info).class_names
        except ValueError:
            recorded = None
    if recorded is not None and len(recorded) == k:
        return [str(n) for n in recorded]
    return [f"class {i}" for i in range(k)]


def run(args: argparse.Namespace) -> int:
    """Execute ``explain-text`` (see the module docstring); returns 0. Raises ``ValueError`` /
    ``FileNotFoundError`` for bad input, before anything is written."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xaijax import checkpoints
    from xaijax.atomic import atomic_npy, atomic_text
    from xaijax.options import parse_key_values
    from xaijax.data.tokenizer import Tokenizer
    from xaijax.methods.text import explain_tokens, text_method
    from xaijax.token_figure import TokenRow, token_figure

    params = parse_key_values(args.param)
    method = text_method(args.method, **params) if params else text_method(args.method)  # refuses non-text methods now
    premises, hypotheses = _pairs(list(args.premise), args.hypothesis)
    weights, vocab = _sources(args)
    model, variables, info = checkpoints.load(None, weights)
    if getattr(model, "sequence_model", False) is not True or not hasattr(model, "num_labels"):
        raise ValueError(f"{weights} holds a {type(model).__name__}, not a BERT sequence classifier (explain-text explains sentence(-pair) classes)")
    tok = Tokenizer.from_vocab(vocab, max_length=int(model.max_position_embeddings))
    tok.check_model(model)
    if tok.vocab_size != model.vocab_size:
        print(f"xaijax: warning: {vocab} has {tok.vocab_size} wordpieces, the model's embedding {model.vocab_size} rows: "
              "is it the model's vocabulary?", file=sys.stderr)
    unknown = []
    for t in premises + (hypotheses or []):
        unknown += [w for w in tok.unknown_words(t) if w not in unknown]
    if unknown:
        print(f"xaijax: warning: not in the vocabulary (become [UNK]): {', '.join(repr(w) for w in unknown)}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            batch = tok.encode_pairs(premises, hypotheses, truncation="warn" if args.truncate else "error")
        except ValueError as e:
            if "max_length" not in str(e):
                raise
            raise ValueError(f"{str(e).split(' (by default')[0]} (the model's position limit); shorten the text or pass --truncate") from None
    for w in caught:
        print(f"xaijax: warning: {w.message}", file=sys.stderr)
    n = len(batch)
    ids = jnp.asarray(batch.input_ids)
    logits = np.asarray(model.apply(variables, ids, token_type_ids=batch.token_type_ids, attention_mask=batch.attention_mask))
    k = logits.shape[1]
    names = _class_names(k, args.labels, info)
    pred = logits.argmax(1)
    if args.target == "predicted":
        target = pred.astype(np.int32)
    else:
        try:
            t = int(args.target)
        except ValueError:
            raise ValueError(f"--target must be 'predicted' or a class index; got {args.target!r}") from None
        if not 0 <= t < k:
            raise ValueError(f"--target {t} is out of range for a model with {k} classes (valid: 0..{k - 1})")
        target = np.full(n, t, np.int32)
    rel = np.asarray(explain_tokens(method, model, variables, batch, target, baseline=args.baseline))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    stem = args.name or args.method.replace(":", "_")
    model_label = args.bundled or weights.stem
    rows, records = [], []
    for i in range(n):
        toks = batch.tokens[i]
        r = rel[i, : len(toks)]
        p = int(pred[i])
        label = f"{i}: {names[int(target[i])]}" if int(target[i]) != p else f"{i}"
        rows.append(TokenRow(toks, r, label, names[p]))
        records.append({
            "premise": premises[i], "hypothesis": None if hypotheses is None else hypotheses[i], "tokens": list(toks),
            "relevance": [float(v) for v in r], "logits": [float(v) for v in logits[i]], "probabilities": [float(v) for v in probs[i]],
            "predicted": names[p], "predicted_index": p, "explained": names[int(target[i])], "explained_index": int(target[i]),
        })
        print(f"[{i}] predicted {names[p]} (class {p}, p={probs[i, p]:.3f}); {args.method} relevance for {names[int(target[i])]}:")
        w = max(len(s) for s in toks)
        for s, v in zip(toks, r):
            print(f"    {s:<{w}s} {v:+.4g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.method} on {model_label}" + ("" if args.target == "predicted" else f" (explaining class {names[int(target[0])]})")
    written = token_figure(rows, out / f"{stem}.png", out / f"{stem}.html", scale=args.scale, title=title)
    atomic_npy(out / f"{stem}.npy", rel.astype(np.float32))
    summary = {
        "method": args.method, "params": params, "model": str(weights), "vocab": str(vocab), "class_names": names,
        "target": args.target, "baseline": args.baseline, "scale": args.scale, "unknown_words": unknown, "pairs": records,
    }
    atomic_text(out / f"{stem}.json", json.dumps(summary, indent=1) + "\n")
    print(f"wrote {written['png']}, {written['html']}, {out / f'{stem}.npy'}, {out / f'{stem}.json'}")
    return 0
