"""The debiasing study of the research: bias table, accuracy, relevance mass and the token figure.

``run(out_dir)`` loads the three bundled tiny BERT NLI models (``weights/debias_{bert,
auto-debias,ours}.safetensors`` with ``weights/debias_vocab.txt``; seconds) -- or, with
``retrain=True``, trains them from scratch with :func:`xaijax.debias.train.train_all` (minutes) --
and writes to ``out_dir`` (atomically):

* ``table.md`` / ``table.json``: per model

  (a) the bias measure on the probe (:func:`~xaijax.data.nli_corpus.nli_pairs` ``"probe"``:
      stereotyped occupation premises on held-out contexts, hypotheses "{he|she|the man|the
      woman} {verb} in {state} .", all entailment by logic): the entailment rate for male and for
      female subjects, for pro- and anti-stereotype subjects, the **gap** = pro - anti entailment
      rate (ideally 0, with both rates 1: "ideally debiased models should determine that all
      sentences are entailed"), and the mean absolute difference of P(entailment) between the
      male and the female version of each premise (the prediction gap);
  (b) accuracy on the unbiased held-out pairs (``"eval"``, labels by logic);
  (d) the relevance mass (AttnLRP by default, target: the predicted class) on gender words vs
      context words (sites, states): each group's mean share of a sentence's positive relevance
      over probe pairs (:func:`relevance_mass`).

* ``token_figure.png`` / ``.html``: (c) the research's two sentences "[CLS] A nurse works in
  medical center of california . [SEP] He/She works in california . [SEP]" for the three models,
  explained with :func:`xaijax.methods.text.explain_tokens` (target: the predicted class),
  coloured with :func:`xaijax.token_figure.token_figure`.

Command line: ``xaijax debias-study OUT [--retrain] [--method attnlrp] [--quick]`` (see
:func:`add_arguments`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xaijax.data import nli_corpus

__all__ = [
    "DISPLAY_NAMES",
    "add_arguments",
    "bias_metrics",
    "load_bundled",
    "main",
    "relevance_mass",
    "run",
    "run_args",
]

#: Table / figure names of the three models.
DISPLAY_NAMES: dict[str, str] = {"bert": "BERT", "auto-debias": "Auto-Debias", "ours": "Ours"}
VOCAB_FILE = "debias_vocab.txt"


def weights_file(name: str) -> str:
    """Bundled file name of a study model (``"bert"`` -> ``"debias_bert.safetensors"``)."""
    return f"debias_{name.replace('-', '_')}.safetensors"


def load_bundled(folder: str | os.PathLike | None = None) -> tuple[Any, dict[str, Any], Any, Any]:
    """The bundled study models: ``(tokenizer, {name: params}, config, classifier module)``.

    Raises:
      FileNotFoundError: a bundled file is missing (names it).
      ValueError: the three files were not trained with the same configuration.
    """
    from xaijax.checkpoints.bundled import bundled_weights
    from xaijax.checkpoints.native import load_variables
    from xaijax.data.tokenizer import Tokenizer
    from xaijax.debias import train

    tok = Tokenizer.from_vocab(bundled_weights(VOCAB_FILE, folder))
    params, configs = {}, set()
    for name in train.MODEL_NAMES:
        variables, meta = load_variables(bundled_weights(weights_file(name), folder))
        params[name] = variables["params"]
        configs.add(meta.get("study_config", ""))
    if len(configs) != 1:
        raise ValueError("the bundled debiasing models were trained with different configurations; retrain them together")
    config = train.StudyConfig.from_json(configs.pop())
    model = train.classifier(train.model_kwargs(config, tok.vocab_size))
    return tok, params, config, model


# ----------------------------------------------------------------------------- metrics


def bias_metrics(probs: np.ndarray, pairs: Sequence[nli_corpus.NLIPair]) -> dict[str, float]:
    """The bias measure on probe pairs from class probabilities (N, 3).

    ``pairs`` must be the ``"probe"`` split (male and female versions of each premise adjacent,
    male first). Returns entailment rates (argmax = entailment) for male / female / pro- /
    anti-stereotype subjects, per subject gender on female- and on male-stereotyped premises
    (``entailment_male_female_occ``: "he" / "the man" after a nurse, ...), ``gap`` = pro - anti,
    ``gap_he_she`` = male - female, ``entailment`` (all), and
    ``prediction_gap`` = mean |P(ent | male version) - P(ent | female version)|.
    """
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(pairs), len(nli_corpus.LABELS)):
        raise ValueError(f"probs must have shape ({len(pairs)}, {len(nli_corpus.LABELS)}), got {probs.shape}")
    gender = np.asarray([p.gender for p in pairs])
    anti = np.asarray([p.anti_stereotype for p in pairs])
    if not (np.all(gender[0::2] == "male") and np.all(gender[1::2] == "female")):
        raise ValueError("pairs must alternate male / female versions (the 'probe' split)")
    ent = probs.argmax(1) == nli_corpus.ENTAILMENT
    out = {
        "entailment": float(ent.mean()),
        "entailment_male": float(ent[gender == "male"].mean()),
        "entailment_female": float(ent[gender == "female"].mean()),
        "entailment_pro": float(ent[~anti].mean()),
        "entailment_anti": float(ent[anti].mean()),
    }
    stereo = np.asarray([p.stereotype for p in pairs])
    for occ in ("female", "male"):
        for g in ("male", "female"):
            sel = (stereo == occ) & (gender == g)
            out[f"entailment_{g}_{occ}_occ"] = float(ent[sel].mean()) if sel.any() else float("nan")
    out["gap"] = out["entailment_pro"] - out["entailment_anti"]
    out["gap_he_she"] = out["entailment_male"] - out["entailment_female"]
    out["prediction_gap"] = float(np.mean(np.abs(probs[0::2, 0] - probs[1::2, 0])))
    return out


def relevance_mass(relevance: np.ndarray, tokens: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of the positive relevance on gender words vs context words.

    For each sentence, positive relevance ``max(r, 0)`` over its real tokens; gender words are
    the tokens of :func:`~xaijax.data.nli_corpus.gender_words` ("he", "woman", ...), context
    words are the sites' and states' words (``"medical"``, ``"california"``, ...), occupation words
    the occupations. Returns ``{"gender_share", "context_share", "occupation_share"}``: the mean
    over sentences of each group's share of the sentence's positive relevance (sentences with no
    positive relevance are skipped; NaN when none has any).
    """
    gw = set(nli_corpus.gender_words())
    ctx = {w for s in nli_corpus.SITES for w in s.split()} | set(nli_corpus.STATES)
    occ = set(nli_corpus.FEMALE_OCCUPATIONS + nli_corpus.MALE_OCCUPATIONS + nli_corpus.NEUTRAL_OCCUPATIONS)
    shares = {"gender": [], "context": [], "occupation": []}
    for r, toks in zip(np.asarray(relevance, np.float64), tokens):
        pos = np.maximum(r[: len(toks)], 0.0)
        total = pos.sum()
        if total <= 0:
            continue
        for key, words in (("gender", gw), ("context", ctx), ("occupation", occ)):
            sel = np.asarray([t in words for t in toks])
            shares[key].append(float(pos[sel].sum() / total))
    return {f"{k}_share": float(np.mean(v)) if v else float("nan") for k, v in shares.items()}


def _explain(method: str, model: Any, params: Any, batch: Any, chunk: int = 64) -> np.ndarray:
    """(N, T) relevance for the predicted class, ``chunk`` sentences per vmapped group."""
    from xaijax.methods.text import explain_tokens

    return np.asarray(explain_tokens(method, model, {"params": params}, batch, "predicted", chunk=chunk), np.float64)


def evaluate(tok: Any, params: dict[str, Any], config: Any, model: Any, method: str = "attnlrp",
             relevance_sentences: int = 256, seed: int = 0) -> dict[str, Any]:
    """Every number of the table for the three models (see the module docstring)."""
    from xaijax.debias import train

    probe = nli_corpus.nli_pairs("probe")
    evalp = nli_corpus.nli_pairs("eval", config.nli_eval, config.seed)
    ep = train.encode(tok, [(p.premise, p.hypothesis) for p in probe], config.max_length)
    ee = train.encode(tok, [(p.premise, p.hypothesis) for p in evalp], config.max_length)
    labels = np.asarray([p.logic_label for p in evalp])
    rng = np.random.default_rng([seed, 7])
    pick = np.sort(rng.choice(len(probe) // 2, size=min(relevance_sentences // 2, len(probe) // 2), replace=False))
    pick = np.stack([2 * pick, 2 * pick + 1], 1).reshape(-1)
    sub = [probe[i] for i in pick]
    batch = tok.encode_pairs([p.premise for p in sub], [p.hypothesis for p in sub], max_length=config.max_length)
    rows = {}
    for name, prm in params.items():
        probs_probe = train.predict_probs(model, prm, ep)
        probs_eval = train.predict_probs(model, prm, ee)
        row = bias_metrics(probs_probe, probe)
        row["accuracy"] = float(np.mean(probs_eval.argmax(1) == labels))
        rel = _explain(method, model, prm, batch)
        row.update(relevance_mass(rel, batch.tokens))
        rows[name] = row
    return {
        "models": rows,
        "probe_pairs": len(probe),
        "eval_pairs": len(evalp),
        "relevance_method": method,
        "relevance_sentences": len(sub),
    }


def figure_rows(tok: Any, params: dict[str, Any], model: Any, method: str = "attnlrp") -> list[Any]:
    """Token-figure rows: the research's two sentences for every model (model order, He first)."""
    from xaijax.debias import train
    from xaijax.token_figure import TokenRow

    prem = [p for p, _ in nli_corpus.RESEARCH_EXAMPLES]
    hyp = [h for _, h in nli_corpus.RESEARCH_EXAMPLES]
    batch = tok.encode_pairs(prem, hyp)
    rows = []
    for name in train.MODEL_NAMES:
        prm = params[name]
        rel = _explain(method, model, prm, batch)
        enc = train.encode(tok, list(zip(prem, hyp)), batch.input_ids.shape[1])
        probs = train.predict_probs(model, prm, enc, batch=len(prem))
        for i, toks in enumerate(batch.tokens):
            rows.append(TokenRow(toks, rel[i, : len(toks)], DISPLAY_NAMES[name], nli_corpus.LABELS[int(probs[i].argmax())]))
    return rows


# ----------------------------------------------------------------------------- table


def _markdown(result: dict[str, Any]) -> str:
    cols = [
        ("entailment_male_female_occ", "ent. he (nurse..)"), ("entailment_female_female_occ", "ent. she (nurse..)"),
        ("entailment_male_male_occ", "ent. he (engineer..)"), ("entailment_female_male_occ", "ent. she (engineer..)"),
        ("entailment_male", "ent. he (all)"), ("entailment_female", "ent. she (all)"),
        ("gap", "gap pro - anti"), ("prediction_gap", "mean abs dP(ent) he vs she"),
        ("accuracy", "accuracy (unbiased pairs)"), ("gender_share", "rel. mass gender"), ("occupation_share", "rel. mass occupation"),
        ("context_share", "rel. mass context"),
    ]
    lines = [
        "| model | " + " | ".join(c for _, c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, row in result["models"].items():
        lines.append(f"| {DISPLAY_NAMES.get(name, name)} | " + " | ".join(f"{row[k]:.3f}" for k, _ in cols) + " |")
    notes = [
        "",
        f"Probe: {result['probe_pairs']} stereotype premise/hypothesis pairs on held-out contexts, every one entailment by "
        "logic (ideally all entailed, gap 0); 'he' stands for he / the man, 'she' for she / the woman; nurse.. = the "
        "female-stereotyped occupations, engineer.. = the male-stereotyped ones; pro/anti: the subject's gender agrees / "
        "disagrees with the occupation's stereotype. Accuracy: "
        f"{result['eval_pairs']} held-out pairs labelled by logic. Relevance mass: mean share of the positive "
        f"{result['relevance_method']} relevance (target: predicted class) on gender words, on the occupation and on context "
        f"words (sites, states) over {result['relevance_sentences']} probe pairs.",
        f"Models: {result.get('source', '')}",
    ]
    return "\n".join(lines + notes) + "\n"


def run(out_dir: str | os.PathLike, retrain: bool = False, method: str = "attnlrp", quick: bool = False,
        weights: str | os.PathLike | None = None, relevance_sentences: int = 256, verbose: bool = True) -> dict[str, Any]:
    """Run the study and write ``table.md``, ``table.json``, ``token_figure.png`` / ``.html``.

    Args:
      out_dir: output folder (created once the models are loaded or trained and scored).
      retrain: train the three models from scratch (:class:`~xaijax.debias.train.StudyConfig`
        defaults, a few minutes) instead of loading the bundled weights.
      method: the token-attribution method of the figure and the relevance mass.
      quick: with ``retrain``, the shorter schedule of :func:`quick_config` (its numbers are not the bundled ones).
      weights: folder of the bundled files (default ``weights/``).
      relevance_sentences: probe pairs (he and she versions) the relevance mass is measured on.

    Returns:
      the table's dict (also written as ``table.json``).
    """
    from xaijax.atomic import atomic_text
    from xaijax.token_figure import token_figure

    from xaijax.methods.text import TEXT_METHODS

    if not isinstance(method, str) or method.split(":")[-1] not in TEXT_METHODS:
        raise ValueError(f"method must be one of {', '.join(TEXT_METHODS)} (optionally smooth:<name>), got {method!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is not a folder")
    t0 = time.perf_counter()
    if retrain:
        import tempfile

        from xaijax.data.tokenizer import Tokenizer
        from xaijax.debias import train

        config = quick_config() if quick else train.StudyConfig()
        with tempfile.TemporaryDirectory() as d:
            tok = Tokenizer.from_vocab(nli_corpus.write_corpus_vocab(Path(d) / VOCAB_FILE))
        trained = train.train_all(config, tok, verbose=verbose)
        params = trained["params"]
        model = train.classifier(train.model_kwargs(config, tok.vocab_size))
        source = f"retrained now ({'quick schedule' if quick else 'default schedule'}, seed {config.seed})"
    else:
        tok, params, config, model = load_bundled(weights)
        source = "bundled weights/debias_*.safetensors"
    result = evaluate(tok, params, config, model, method, relevance_sentences)
    result["source"] = source
    result["config"] = json.loads(config.to_json())
    rows = figure_rows(tok, params, model, method)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails earlier leaves nothing behind
    token_figure(rows, out / "token_figure.png", out / "token_figure.html", scale="row",
                 title=f"{method}: NLI predictions and token relevance (red: for the predicted class)")
    result["figure"] = [
        {"model": r.label, "tokens": list(r.tokens), "relevance": [float(v) for v in r.relevance], "predicted": r.predicted}
        for r in rows
    ]
    result["seconds"] = time.perf_counter() - t0
    atomic_text(out / "table.json", json.dumps(result, indent=1) + "\n")
    atomic_text(out / "table.md", _markdown(result))
    return result


def quick_config():
    """A shorter schedule (about 2 minutes on 2 CPU cores instead of about 3-4): half the
    pre-training and fine-tuning steps, smaller data, a smaller prompt search. On seed 0 it shows
    the same direction as the default (biased gap 0.95, compensatory 0.04); tests use it."""
    from xaijax.debias import train

    return train.StudyConfig(
        mlm_sentences=4000, nli_train=8000, nli_eval=300, debias_pairs=500, debias_plain=500,
        mlm_steps=1500, auto_steps=60, ours_steps=150, nli_steps=2000, prompt_beam=5, prompt_length=2,
    )


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``xaijax debias-study`` arguments."""
    parser.add_argument("out", nargs="?", default="results/debias", help="output folder (table.md, table.json, token_figure.png/.html; default results/debias)")
    parser.add_argument("--retrain", action="store_true", help="train the three models from scratch (minutes) instead of loading the bundled weights")
    parser.add_argument("--quick", action="store_true", help="with --retrain: the shorter schedule of quick_config (about 2 minutes; not the bundled numbers)")
    parser.add_argument("--method", default="attnlrp", help="token attribution method (default attnlrp)")
    parser.add_argument("--weights", default=None, help="folder of the bundled debias_* files (default weights/)")
    return parser


def run_args(args: argparse.Namespace) -> int:
    """Run the study from parsed :func:`add_arguments` arguments; prints the table."""
    result = run(args.out, retrain=args.retrain, method=args.method, quick=args.quick, weights=args.weights)
    print(_markdown(result), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xaijax.debias.study OUT [--retrain] ...``"""
    parser = add_arguments(argparse.ArgumentParser(prog="xaijax debias-study", description=__doc__.split("\n\n")[0]))
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
