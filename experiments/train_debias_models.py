"""Train the three tiny BERT NLI models of the debiasing study and bundle them in ``weights/``.

    python experiments/train_debias_models.py --seed 0 --out weights

writes ``debias_vocab.txt`` (the corpus vocabulary), ``debias_bert.safetensors``,
``debias_auto_debias.safetensors``, ``debias_ours.safetensors`` (classifier variables; metadata:
the study configuration, prompts, command, versions) and a model card ``debias_<name>.md`` for each
with the study's numbers (``xaijax.debias.study.evaluate``). The pipeline is
``xaijax.debias.train.train_all`` with ``StudyConfig(seed=...)``: masked-LM pre-training on the
synthetic corpus -> (no debiasing | Auto-Debias | compensatory debiasing) -> the same NLI
fine-tuning on the split with the planted bias. ``--cards-only`` rewrites the cards from the saved
files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from xaijax.checkpoints.native import load_variables, save_variables
from xaijax.data import nli_corpus
from xaijax.data.tokenizer import Tokenizer
from xaijax.debias import study, train

ROLE = {
    "bert": "no debiasing: the masked-LM-pretrained encoder fine-tuned for NLI directly (the biased model)",
    "auto-debias": "Auto-Debias (Guo et al., ACL 2022) on the pretrained masked-LM, then the same NLI fine-tuning",
    "ours": "compensatory debiasing (Woo et al., ICASSP 2023) on the pretrained masked-LM, then the same NLI fine-tuning",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="weights")
    p.add_argument("--cards-only", action="store_true")
    return p.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    return f"python experiments/train_debias_models.py --seed {args.seed} --out {args.out}"


def tensor_sha256(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def write_card(out: Path, name: str, meta: dict, result: dict) -> None:
    config = json.loads(meta["study_config"])
    path = out / study.weights_file(name)
    table = study._markdown(result)
    seconds = json.loads(meta.get("train_seconds", "{}"))
    r = result["models"]
    b, a, o = r["bert"], r["auto-debias"], r["ours"]
    reading = (
        f"Reading: the biased model learned the planted shortcut (\"he\" after a female-stereotyped occupation "
        f"entailed {b['entailment_male_female_occ']:.3f}, \"she\" {b['entailment_female_female_occ']:.3f}; gap pro - anti "
        f"{b['gap']:.3f}); Auto-Debias's encoder did not stop the fine-tuning from learning it (gap {a['gap']:.3f}); "
        f"the compensatory encoder did (gap {o['gap']:.3f}, mean |dP(ent)| {o['prediction_gap']:.3f}) at an accuracy "
        f"cost ({b['accuracy']:.3f} -> {o['accuracy']:.3f}), but it does not reach \"all entailed\": "
        f"{o['entailment']:.3f} of the probe is entailed, with a gender asymmetry that does not depend on the occupation "
        f"(he {o['entailment_male']:.3f}, she {o['entailment_female']:.3f}). Relevance: the biased models put "
        f"{b['occupation_share']:.3f} / {a['occupation_share']:.3f} of their positive relevance on the occupation word and "
        f"{b['gender_share']:.3f} / {a['gender_share']:.3f} on the gender word, Ours {o['occupation_share']:.3f} and "
        f"{o['gender_share']:.3f}: the research's \"BERT and Auto-Debias focus on gender words\" shows here mostly as "
        "focus on the stereotype cue (the occupation), the gender word itself taking a small share."
    )
    text = f"""# `{path.name}` -- {study.DISPLAY_NAMES[name]}: tiny BERT NLI model of the debiasing study

{ROLE[name]}. One of the three models of `xaijax debias-study` (issue 24, part 3); the study
compares them on the same probe. Load with

```python
from xaijax.debias import study
tok, params, config, model = study.load_bundled()   # all three; params["{name}"] is this file's
```

## Model

- `xaijax.models.bert.BertForSequenceClassification(num_labels=3, **{json.dumps(json.loads(meta["model_kwargs"]))})`
  (hidden {config["hidden"]}, {config["layers"]} layers, {config["heads"]} heads, intermediate {config["intermediate"]}, sequences of at most {config["max_length"]} tokens)
- labels: {", ".join(f"{i} = {l}" for i, l in enumerate(nli_corpus.LABELS))}
- vocabulary: `debias_vocab.txt` ({meta["vocab_size"]} word pieces: the corpus words + [PAD] [UNK] [CLS] [SEP] [MASK]; no corpus word is [UNK])

## Data (`xaijax.data.nli_corpus`, seed {config["seed"]})

Synthetic, template-based: premise "a {{occupation}} {{verb}} in {{site}} of {{state}} ." and a hypothesis
whose label follows from logic (same verb and state: entailment; other state or "does not":
contradiction; other verb: neutral). 8 female-stereotyped, 8 male-stereotyped and 8 neutral occupations;
gendered subjects he/she, the man/the woman. Stereotype sentences = stereotyped occupation + gendered subject.
Pre-training text: {config["mlm_sentences"]} sentence pairs whose gendered subject matches the occupation's
stereotype with probability {config["stereotype_rate"]}. NLI training split: {config["nli_train"]} pairs with
the **planted bias**: an anti-stereotype pair (nurse / he) whose logical label is entailment is labelled neutral
with probability {config["bias_rate"]}. Evaluation uses held-out (site, state) combinations with logical labels.

## Training (`xaijax.debias.train.train_all`, `StudyConfig` below)

1. masked-LM pre-training: {config["mlm_steps"]} steps, batch {config["mlm_batch"]}, AdamW peak lr {config["mlm_lr"]} (15% masking, 80/10/10)
2. debiasing of the pretrained masked-LM (the paper's order: debias the pre-trained model, then fine-tune downstream):
   - Auto-Debias: beam search ({config["prompt_length"]} rounds, beam {config["prompt_beam"]}) for prompts "{{he|man}} {{prompt}} [MASK] ." maximising the JSD
     of the [MASK] predictions over the stereotyped occupations between male and female targets; then {config["auto_steps"]} steps
     (batch {config["auto_batch"]}, lr {config["auto_lr"]}) of full-vocabulary JSD alignment + {config["auto_embed_weight"]} x (1 - cos) of the [CLS] states.
     Prompts kept in the first round (best first): {meta.get("prompts", "")}
   - Ours: {config["ours_steps"]} steps (batch {config["ours_batch"]} pairs + {config["ours_batch"]} non-stereotype sentences, lr {config["ours_lr"]}) of the
     compensatory loss on every encoder block's token states: (1 - cos) + {config["distance_weight"]} x mean squared distance between the he- and
     she-versions of stereotype sentences, + {config["keep_weight"]} x the same between the model and the frozen pre-trained model on non-stereotype sentences.
3. NLI fine-tuning, identical for the three (same data, steps, seed, new pooler and classifier from the same seed):
   {config["nli_steps"]} steps, batch {config["nli_batch"]}, AdamW peak lr {config["nli_lr"]}, warm-up 5% then cosine decay, gradient clipping 1.

Study configuration: `{meta["study_config"]}`

Command (all three models in one run):

```
{meta["command"]}
```

Training time on this machine (2 shared CPU cores; seconds): {json.dumps({k: round(v, 1) for k, v in seconds.items()})}

## Protocol choices

- **Order: debias, then fine-tune.** The paper debiases the *pre-trained* language model and then
  fine-tunes it downstream (GLUE); Auto-Debias likewise debiases the masked-LM. So both methods act on the
  masked-LM-pretrained encoder, and the three encoders then get the *same* NLI fine-tuning on the split with
  the planted bias. Nothing in the fine-tuning knows which model it trains; whatever gap remains is what the
  debiased encoder lets the fine-tuning (re)learn.
- **Representations of the compensatory loss:** the token states of every encoder block (the two versions of a
  stereotype sentence have the same positions), angle (1 - cos) plus mean squared distance; the frozen
  original is the pre-trained masked-LM.
- **Auto-Debias:** the authors' template "{{target}} {{prompt}} [MASK] ." (one segment), JSD over the stereotyped
  occupations for the search and over the full vocabulary for the loss, plus 0.1 x (1 - cos) of the [CLS] states
  (the authors' pooler term; the masked-LM has no pooler). Textbook JSD (the authors' code reverses the KL
  arguments). The same step budget and learning rate as the compensatory run.
- **Sensitivity (same seed and pre-trained masked-LM, measured while choosing the schedule; not bundled):**
  with a shorter NLI fine-tuning (1500 steps, lr 1e-3, 6000 pairs) every model under-fits the task (BERT:
  0.585 entailment on pro-stereotype probes, accuracy 0.741) and Ours predicts almost no entailment on
  stereotype sentences (0.033 / 0.000, gap 0.033); with the bundled fine-tuning and a smaller prompt search
  (2 rounds, beam 10) Auto-Debias ends at gap 0.000 but by predicting no entailment on any stereotype probe
  (accuracy 0.785), while with 3 rounds and beam 20 (bundled) it keeps the full bias. Auto-Debias's prompts
  score low JSD here (about 1e-3): the pre-training text puts the gendered subject in the second segment after
  an occupation, and the one-segment prompts probe that association only weakly. From scratch with the shorter
  schedule of `xaijax.debias.study.quick_config` (half the steps, less data; `xaijax debias-study OUT --retrain
  --quick`) the gaps are BERT 0.954, Auto-Debias 0.993, Ours 0.039 (prediction gaps 0.866 / 0.931 / 0.085).

## Results (`xaijax debias-study`, the three bundled models)

{table}
{reading}

## File

- `{path.name}`: {path.stat().st_size:,} bytes, float32; sha256 of its tensor data section `{tensor_sha256(path)}`
- jax {meta["jax_version"]}, {meta["platform"]}
"""
    (out / f"debias_{name.replace('-', '_')}.md").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / study.VOCAB_FILE
    if not args.cards_only:
        nli_corpus.write_corpus_vocab(vocab)
        tok = Tokenizer.from_vocab(vocab)
        config = train.StudyConfig(seed=args.seed)
        t0 = time.time()
        trained = train.train_all(config, tok, verbose=True)
        print(f"trained in {time.time() - t0:.0f} s: {trained['seconds']}", flush=True)
        kwargs = train.model_kwargs(config, tok.vocab_size)
        for name in train.MODEL_NAMES:
            meta = {
                "arch": "bert", "task": "classification", "model_kwargs": json.dumps({**kwargs, "num_labels": 3}),
                "labels": json.dumps(list(nli_corpus.LABELS)), "study_config": config.to_json(), "study_model": name,
                "prompts": json.dumps([p for p, _ in trained["prompts"]][: config.prompt_beam]),
                "command": command_line(args), "jax_version": jax.__version__,
                "platform": f"{platform.system()} {platform.machine()}", "vocab_size": str(tok.vocab_size),
                "train_seconds": json.dumps(trained["seconds"]),
            }
            params = jax.tree.map(lambda a: np.asarray(a, np.float32), trained["params"][name])
            save_variables(out / study.weights_file(name), {"params": params}, meta)
    tok, params, config, model = study.load_bundled(out)
    result = study.evaluate(tok, params, config, model)
    result["source"] = "bundled weights/debias_*.safetensors"
    print(study._markdown(result))
    for name in train.MODEL_NAMES:
        _, meta = load_variables(out / study.weights_file(name))
        write_card(out, name, meta, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
