"""Training for the debiasing study: masked-LM pre-training, the two debiasing runs, NLI fine-tuning.

The pipeline (:func:`train_all`), every stage a jitted optax step over fixed-shape batches:

1. **Masked-LM pre-training** (:func:`pretrain_mlm`) of a tiny :class:`~xaijax.models.bert.BertForMaskedLM`
   on :func:`~xaijax.data.nli_corpus.mlm_pairs` (stereotyped co-occurrence): 15% of the real
   tokens (never ``[CLS]``/``[SEP]``) are chosen, 80% of them replaced by ``[MASK]``, 10% by a
   random word, 10% kept (Devlin et al., 2019); cross-entropy at the chosen positions.
2. **Debiasing of the pre-trained encoder** (the paper's setting: debiasing acts on the
   pre-trained language model, which is fine-tuned on the downstream task afterwards):

   * ``"auto-debias"`` (:func:`auto_debias`): prompts found by the beam search of
     :func:`~xaijax.debias.objectives.beam_search_prompts`, then the masked-LM is fine-tuned on
     them with :func:`~xaijax.debias.objectives.auto_debias_loss`;
   * ``"ours"`` (:func:`compensatory_debias`): the masked-LM is fine-tuned with
     :func:`~xaijax.debias.objectives.compensatory_loss` on
     :func:`~xaijax.data.nli_corpus.debias_sentences` (stereotype pairs together; non-stereotype
     sentences in agreement with the frozen pre-trained model);
   * ``"bert"``: no debiasing.

3. **NLI fine-tuning** (:func:`finetune_nli`), identical for the three: a
   :class:`~xaijax.models.bert.BertForSequenceClassification` whose ``bert`` subtree is the
   (debiased) encoder and whose pooler and classifier are new (same seed for the three), trained
   with cross-entropy on the ``"train"`` split of :func:`~xaijax.data.nli_corpus.nli_pairs` (the
   planted bias).

Everything random is drawn from NumPy generators seeded with ``(seed, stage, step)``; a run is a
pure function of its :class:`StudyConfig` on the same software.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from xaijax.data import nli_corpus
from xaijax.debias import objectives
from xaijax.training import make_optimizer

__all__ = [
    "MODEL_NAMES",
    "StudyConfig",
    "auto_debias",
    "classifier",
    "compensatory_debias",
    "encode",
    "finetune_nli",
    "masked_lm",
    "predict_probs",
    "pretrain_mlm",
    "train_all",
]

#: The three models of the study, in table order.
MODEL_NAMES: tuple[str, ...] = ("bert", "auto-debias", "ours")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Every setting of a training run (the bundled models: the defaults).

    Model: a tiny BERT (``hidden``, ``layers``, ``heads``, ``intermediate``), sequences padded to
    ``max_length`` tokens. Data sizes, steps, batch sizes and peak learning rates per stage;
    ``bias_rate`` (planted bias of the NLI training split) and ``stereotype_rate`` (co-occurrence
    in the pre-training text). Auto-Debias: prompt ``prompt_length`` rounds of beam ``prompt_beam``.
    Compensatory: ``distance_weight`` (distance next to angle) and ``keep_weight`` (agreement
    with the original on non-stereotype sentences).
    """

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    max_length: int = 24
    # data
    mlm_sentences: int = 8000
    nli_train: int = 12000
    nli_eval: int = 1500
    debias_pairs: int = 2000
    debias_plain: int = 2000
    bias_rate: float = 0.9
    stereotype_rate: float = 0.9
    # masked-LM pre-training
    mlm_steps: int = 3000
    mlm_batch: int = 64
    mlm_lr: float = 3e-3
    # Auto-Debias
    prompt_length: int = 3
    prompt_beam: int = 20
    auto_steps: int = 300
    auto_batch: int = 32
    auto_lr: float = 5e-4
    auto_embed_weight: float = 0.1
    # compensatory
    ours_steps: int = 300
    ours_batch: int = 32
    ours_lr: float = 5e-4
    distance_weight: float = 1.0
    keep_weight: float = 1.0
    # NLI fine-tuning
    nli_steps: int = 3000
    nli_batch: int = 32
    nli_lr: float = 2e-3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyConfig:
        return cls(**json.loads(text))


def model_kwargs(config: StudyConfig, vocab_size: int) -> dict[str, int]:
    """The BERT fields of the study's models."""
    return dict(
        vocab_size=int(vocab_size), hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate,
        max_position_embeddings=config.max_length,
    )


def masked_lm(kwargs: dict[str, int]):
    from xaijax.models import bert

    return bert.BertForMaskedLM(**kwargs)


def classifier(kwargs: dict[str, int]):
    from xaijax.models import bert

    return bert.BertForSequenceClassification(num_labels=len(nli_corpus.LABELS), **kwargs)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Fixed-length (N, T) int32 ``ids``, ``types``, ``mask`` of a list of texts or text pairs."""

    ids: np.ndarray
    types: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.asarray(self.ids[idx]), jnp.asarray(self.types[idx]), jnp.asarray(self.mask[idx])


def encode(tokenizer: Any, pairs: Sequence[tuple[str, str]] | Sequence[str], max_length: int) -> Encoded:
    """Tokenise sentence pairs (or single sentences) and pad them to exactly ``max_length``.

    Raises:
      ValueError: a text is longer than ``max_length`` tokens (from the tokenizer).
    """
    if pairs and isinstance(pairs[0], tuple):
        batch = tokenizer.encode_pairs([a for a, _ in pairs], [b for _, b in pairs], max_length=max_length)
    else:
        batch = tokenizer.encode_pairs(list(pairs), max_length=max_length)
    n, t = batch.input_ids.shape
    pad = ((0, 0), (0, max_length - t))
    return Encoded(
        np.pad(batch.input_ids, pad, constant_values=tokenizer.pad_id),
        np.pad(batch.token_type_ids, pad),
        np.pad(batch.attention_mask, pad),
    )


def _batch_indices(n: int, batch: int, step: int, seed: int, stage: int) -> np.ndarray:
    """Batch ``step`` of a stage: a random sample (without replacement) of ``batch`` records."""
    return np.random.default_rng([int(seed), stage, int(step)]).choice(n, size=min(batch, n), replace=False)


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW (decay 0.01 on every parameter), 5 % linear warm-up, cosine decay to 0, clipping at 1."""
    return make_optimizer(lr, steps, max(1, steps // 20), weight_decay=0.01, decay_all=True)


def _hidden_states(model: Any, params: Any, ids: jax.Array, types: jax.Array, mask: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Model output and the outputs (N, T, D) of every encoder block (``model.block_layers``)."""
    from xaijax.models import taps

    layers = list(model.block_layers)
    out, acts = taps.forward(model, {"params": params}, ids, capture=layers, token_type_ids=types, attention_mask=mask)
    return out, [acts[k] for k in layers]


def _run(desc: str, steps: int, step_fn: Callable[[int], dict[str, float]], log: list[dict], verbose: bool) -> None:
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=2.0, disable=not verbose, leave=False)
    for s in bar:
        metrics = step_fn(s)
        if s % max(1, steps // 10) == 0 or s == steps - 1:
            m = {k: float(v) for k, v in metrics.items()}
            log.append({"stage": desc, "step": s, **m})
            bar.set_postfix({k: f"{v:.4f}" for k, v in m.items()})


# ----------------------------------------------------------------------------- stage 1: masked LM


def mask_tokens(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int,
                first_word: int, special: Sequence[int], rate: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: returns ``(masked ids, target weights)``; weights 1 at the chosen positions.

    Positions are chosen among real, non-special tokens with probability ``rate``; of them 80%
    become ``[MASK]``, 10% a random word (ids ``first_word .. vocab_size - 1``), 10% stay.
    """
    can = (mask > 0) & ~np.isin(ids, np.asarray(special))
    chosen = can & (rng.random(ids.shape) < rate)
    u = rng.random(ids.shape)
    out = ids.copy()
    out[chosen & (u < 0.8)] = mask_id
    rand = chosen & (u >= 0.8) & (u < 0.9)
    out[rand] = rng.integers(first_word, vocab_size, size=int(rand.sum()))
    return out, chosen.astype(np.float32)


def pretrain_mlm(config: StudyConfig, tokenizer: Any, log: list[dict], verbose: bool = True) -> dict:
    """Stage 1: masked-LM pre-training; returns the MLM ``params``."""
    kw = model_kwargs(config, tokenizer.vocab_size)
    model = masked_lm(kw)
    data = encode(tokenizer, nli_corpus.mlm_pairs(config.mlm_sentences, config.seed, config.stereotype_rate), config.max_length)
    params = model.init(jax.random.PRNGKey(config.seed), jnp.asarray(data.ids[:2]))["params"]
    tx = _optimizer(config.mlm_lr, config.mlm_steps)
    opt = tx.init(params)
    special = [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.unk_id]
    first_word = max(special) + 1

    @jax.jit
    def step(params, opt, ids, types, mask, targets, weights):
        def loss_fn(p):
            logits = model.apply({"params": p}, ids, token_type_ids=types, attention_mask=mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    state = {"params": params, "opt": opt}

    def one(s: int) -> dict[str, float]:
        idx = _batch_indices(len(data), config.mlm_batch, s, config.seed, 1)
        rng = np.random.default_rng([config.seed, 11, s])
        masked, weights = mask_tokens(data.ids[idx], data.mask[idx], rng, tokenizer.vocab_size, tokenizer.mask_id, first_word, special)
        state["params"], state["opt"], loss = step(
            state["params"], state["opt"], jnp.asarray(masked), jnp.asarray(data.types[idx]), jnp.asarray(data.mask[idx]),
            jnp.asarray(data.ids[idx]), jnp.asarray(weights),
        )
        return {"loss": loss}

    _run("mlm pre-training", config.mlm_steps, one, log, verbose)
    return state["params"]


# ----------------------------------------------------------------------------- stage 2a: Auto-Debias


def _prompt_inputs(tokenizer: Any, targets: Sequence[str], prompts: Sequence[str], max_length: int) -> tuple[Encoded, np.ndarray]:
    """``"{target} {prompt} [MASK] ."`` for every (prompt, target); returns the encoding and the
    (N,) position of ``[MASK]``."""
    texts = [f"{t} {p} [MASK] ." for p in prompts for t in targets]
    enc = encode(tokenizer, texts, max_length)
    pos = np.argmax(enc.ids == tokenizer.mask_id, axis=1)
    return enc, pos


def search_prompts(config: StudyConfig, tokenizer: Any, params: Any, batch: int = 512) -> list[tuple[str, float]]:
    """Auto-Debias's prompt search on the pre-trained masked-LM (see :func:`objectives.beam_search_prompts`).

    Targets: the gender pairs of :data:`~xaijax.data.nli_corpus.GENDER_PAIRS`; attribute words:
    the stereotyped occupations; candidate prompt words: every corpus word that is not a gender
    word, an occupation or ``"."``.
    """
    model = masked_lm(model_kwargs(config, tokenizer.vocab_size))
    males = [m for m, _ in nli_corpus.GENDER_PAIRS]
    females = [f for _, f in nli_corpus.GENDER_PAIRS]
    attrs = np.asarray([tokenizer.token_to_id(w) for w in nli_corpus.FEMALE_OCCUPATIONS + nli_corpus.MALE_OCCUPATIONS])
    excluded = set(nli_corpus.gender_words()) | set(nli_corpus.FEMALE_OCCUPATIONS + nli_corpus.MALE_OCCUPATIONS
                                                    + nli_corpus.NEUTRAL_OCCUPATIONS) | {"."}
    candidates = [w for w in nli_corpus.vocabulary() if w not in excluded]

    @jax.jit
    def mask_logits(ids, types, mask, pos):
        logits = model.apply({"params": params}, ids, token_type_ids=types, attention_mask=mask)
        return jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0, :]

    def logits_at_mask(enc: Encoded, pos: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(enc), batch):
            sl = slice(s, s + batch)
            n = len(enc.ids[sl])
            pad = batch - n
            ids, types, mask = (np.pad(a[sl], ((0, pad), (0, 0))) for a in (enc.ids, enc.types, enc.mask))
            p = np.pad(pos[sl], (0, pad))
            out.append(np.asarray(mask_logits(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask), jnp.asarray(p)))[:n])
        return np.concatenate(out)

    def score(prompts: list[str]) -> np.ndarray:
        em, pm = _prompt_inputs(tokenizer, males, prompts, config.max_length)
        ef, pf = _prompt_inputs(tokenizer, females, prompts, config.max_length)
        lm, lf = logits_at_mask(em, pm)[:, attrs], logits_at_mask(ef, pf)[:, attrs]
        j = np.asarray(objectives.jsd(jnp.asarray(lm), jnp.asarray(lf)))
        return j.reshape(len(prompts), len(males)).mean(1)

    return objectives.beam_search_prompts(score, candidates, config.prompt_length, config.prompt_beam)


def auto_debias(config: StudyConfig, tokenizer: Any, params: Any, log: list[dict], verbose: bool = True) -> tuple[dict, list[tuple[str, float]]]:
    """Stage 2, Auto-Debias: search prompts, then align the masked-LM's ``[MASK]`` predictions
    for male and female targets on them; returns ``(params, prompts)``."""
    prompts = search_prompts(config, tokenizer, params)
    model = masked_lm(model_kwargs(config, tokenizer.vocab_size))
    words = [p for p, _ in prompts]
    males = [m for m, _ in nli_corpus.GENDER_PAIRS]
    females = [f for _, f in nli_corpus.GENDER_PAIRS]
    em, pm = _prompt_inputs(tokenizer, males, words, config.max_length)
    ef, pf = _prompt_inputs(tokenizer, females, words, config.max_length)
    tx = _optimizer(config.auto_lr, config.auto_steps)
    opt = tx.init(params)
    last = model.block_layers[-1]

    def outputs(p, ids, types, mask, pos):
        from xaijax.models import taps

        logits, acts = taps.forward(model, {"params": p}, ids, capture=[last], token_type_ids=types, attention_mask=mask)
        return jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0, :], acts[last][:, 0, :]

    @jax.jit
    def step(params, opt, m, f):
        def loss_fn(p):
            lm, cm = outputs(p, *m)
            lf, cf = outputs(p, *f)
            return objectives.auto_debias_loss(lm, lf, cm, cf, config.auto_embed_weight)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, parts

    state = {"params": params, "opt": opt}

    def one(s: int) -> dict[str, float]:
        idx = _batch_indices(len(em), config.auto_batch, s, config.seed, 2)
        m = (*em.take(idx), jnp.asarray(pm[idx]))
        f = (*ef.take(idx), jnp.asarray(pf[idx]))
        state["params"], state["opt"], loss, parts = step(state["params"], state["opt"], m, f)
        return {"loss": loss, **parts}

    _run("auto-debias", config.auto_steps, one, log, verbose)
    return state["params"], prompts


# ----------------------------------------------------------------------------- stage 2b: compensatory


def compensatory_debias(config: StudyConfig, tokenizer: Any, params: Any, log: list[dict], verbose: bool = True) -> dict:
    """Stage 2, the compensatory objective on the pre-trained masked-LM's encoder; returns ``params``.

    Representations: the outputs of every encoder block (token level, see
    :func:`objectives.compensatory_loss`). The original model is the pre-trained ``params``,
    frozen (its representations are computed under ``stop_gradient`` and never updated).
    """
    model = masked_lm(model_kwargs(config, tokenizer.vocab_size))
    male, female, plain = nli_corpus.debias_sentences(config.debias_pairs, config.debias_plain, config.seed)
    em, ef, ep = (encode(tokenizer, x, config.max_length) for x in (male, female, plain))
    if not (np.array_equal(em.mask, ef.mask) and np.array_equal(em.types, ef.types)):
        raise AssertionError("the two versions of a stereotype sentence must tokenise to the same positions")
    original = jax.tree.map(jnp.asarray, params)
    tx = _optimizer(config.ours_lr, config.ours_steps)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, m, f, p):
        _, ho = _hidden_states(model, original, *p)

        def loss_fn(q):
            _, hm = _hidden_states(model, q, *m)
            _, hf = _hidden_states(model, q, *f)
            _, hp = _hidden_states(model, q, *p)
            return objectives.compensatory_loss(hm, hf, m[2], hp, ho, p[2], config.distance_weight, config.keep_weight)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, parts

    state = {"params": params, "opt": opt}

    def one(s: int) -> dict[str, float]:
        i = _batch_indices(len(em), config.ours_batch, s, config.seed, 3)
        j = _batch_indices(len(ep), config.ours_batch, s, config.seed, 4)
        state["params"], state["opt"], loss, parts = step(state["params"], state["opt"], em.take(i), ef.take(i), ep.take(j))
        return {"loss": loss, **parts}

    _run("compensatory debiasing", config.ours_steps, one, log, verbose)
    return state["params"]


# ----------------------------------------------------------------------------- stage 3: NLI


def finetune_nli(config: StudyConfig, tokenizer: Any, encoder: Any, log: list[dict], desc: str = "nli fine-tuning",
                 verbose: bool = True) -> dict:
    """Stage 3: NLI fine-tuning of a classifier whose ``bert`` encoder starts from ``encoder`` (the
    ``bert`` subtree of masked-LM params); pooler and classifier are initialised from the seed
    (the same for every model). Returns the classifier ``params``."""
    model = classifier(model_kwargs(config, tokenizer.vocab_size))
    pairs = nli_corpus.nli_pairs("train", config.nli_train, config.seed, config.bias_rate)
    data = encode(tokenizer, [(p.premise, p.hypothesis) for p in pairs], config.max_length)
    labels = np.asarray([p.label for p in pairs], np.int32)
    params = flax.core.unfreeze(model.init(jax.random.PRNGKey(config.seed + 1), jnp.asarray(data.ids[:2]))["params"])
    params = jax.tree.map(jnp.asarray, params)
    params["bert"] = {**params["bert"], **jax.tree.map(jnp.asarray, dict(encoder))}
    tx = _optimizer(config.nli_lr, config.nli_steps)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, ids, types, mask, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, ids, token_type_ids=types, attention_mask=mask)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    state = {"params": params, "opt": opt}

    def one(s: int) -> dict[str, float]:
        idx = _batch_indices(len(data), config.nli_batch, s, config.seed, 5)
        state["params"], state["opt"], loss = step(state["params"], state["opt"], *data.take(idx), jnp.asarray(labels[idx]))
        return {"loss": loss}

    _run(desc, config.nli_steps, one, log, verbose)
    return state["params"]


def predict_probs(model: Any, params: Any, data: Encoded, batch: int = 512) -> np.ndarray:
    """Class probabilities (N, 3) of the classifier on encoded pairs (one compiled shape)."""

    @jax.jit
    def fn(ids, types, mask):
        return jax.nn.softmax(model.apply({"params": params}, ids, token_type_ids=types, attention_mask=mask), -1)

    out = []
    for s in range(0, len(data), batch):
        n = min(batch, len(data) - s)
        pad = batch - n
        arrays = (np.pad(a[s : s + n], ((0, pad), (0, 0))) for a in (data.ids, data.types, data.mask))
        out.append(np.asarray(fn(*map(jnp.asarray, arrays)))[:n])
    return np.concatenate(out) if out else np.zeros((0, len(nli_corpus.LABELS)), np.float32)


# ----------------------------------------------------------------------------- all


def train_all(config: StudyConfig, tokenizer: Any, verbose: bool = True) -> dict[str, Any]:
    """The whole pipeline; returns ``{"params": {name: classifier params}, "prompts": [...],
    "log": [...], "seconds": {stage: s}}`` for the three :data:`MODEL_NAMES`."""
    log: list[dict] = []
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    mlm = pretrain_mlm(config, tokenizer, log, verbose)
    seconds["mlm"] = time.perf_counter() - t
    t = time.perf_counter()
    auto, prompts = auto_debias(config, tokenizer, mlm, log, verbose)
    seconds["auto-debias"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = compensatory_debias(config, tokenizer, mlm, log, verbose)
    seconds["ours"] = time.perf_counter() - t
    out = {}
    for name, enc in (("bert", mlm), ("auto-debias", auto), ("ours", ours)):
        t = time.perf_counter()
        out[name] = finetune_nli(config, tokenizer, enc["bert"], log, f"nli {name}", verbose)
        seconds[f"nli {name}"] = time.perf_counter() - t
    return {"params": out, "prompts": prompts, "log": log, "seconds": seconds}
