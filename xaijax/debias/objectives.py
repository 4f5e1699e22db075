"""The debiasing objectives of the study: the compensatory loss (Woo et al., ICASSP 2023) and
Auto-Debias (Guo, Yang & Abbasi, ACL 2022): its Jensen-Shannon divergence and prompt beam search.

All losses are pure JAX functions of arrays (jit/grad/vmap-able); nothing here knows about a
model. The training loops that feed them live in :mod:`xaijax.debias.train`.

Compensatory debiasing (:func:`compensatory_loss`). Two kinds of sentences:

* **stereotype sentences** (a stereotyped occupation with a gendered word), each in its male
  and its female version: their representations are pulled together in *angle* and in
  *distance* -- ``(1 - cos(h_m, h_f)) + distance_weight * ||h_m - h_f||^2 / d``;
* **non-stereotype sentences**: the debiased model's representation is kept in agreement with
  the frozen original model's -- the same angle + distance terms between ``h(x)`` and
  ``h_orig(x)``, weighted by ``keep_weight`` -- so the linguistic knowledge the original model
  has is kept ("compensates" for what the first term removes).

A representation here is, per layer, the hidden states of all real (non-padding) tokens of the
sentence, flattened to one vector (the two versions of a pair have the same tokens but the
gendered ones, so positions correspond); the loss averages over the chosen layers. The paper
states the objective on the model's sentence representations without fixing this detail for a
tiny model; token-level states of every layer are the strictest reading ("small angles and
distances" for every position) and are what the study uses.

Auto-Debias (:func:`jsd`, :func:`beam_search_prompts`, :func:`auto_debias_loss`). Prompts
``"{target word} {prompt} [MASK] ."`` are scored by the Jensen-Shannon divergence between the
masked-LM's predictions at ``[MASK]`` (restricted to the stereotyped attribute words: the
occupations) for the male and the female target word, averaged over the target pairs; a beam
search keeps the ``beam`` best prompts of each length and extends each by every candidate word.
Debiasing then minimises the JSD of the full-vocabulary ``[MASK]`` predictions between the two
versions of every (target pair, prompt), plus ``0.1 * (1 - cos)`` between the two versions'
sentence embeddings (the authors' code uses BERT's pooler output; the masked-LM here has no
pooler, so the ``[CLS]`` hidden state of the last layer is used).

JSD convention: the textbook ``JSD(P, Q) = (KL(P || M) + KL(Q || M)) / 2`` with ``M = (P + Q)
/ 2``, natural logarithm (so ``0 <= JSD <= ln 2``). The authors' released code computes
``(KL(M || P) + KL(M || Q)) / 2`` (the arguments of ``torch.nn.functional.kl_div`` reversed);
both are 0 exactly when P = Q, the textbook form is bounded and symmetric, and it is used here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "angle_distance",
    "auto_debias_loss",
    "beam_search_prompts",
    "compensatory_loss",
    "flatten_tokens",
    "jsd",
    "jsd_from_probs",
]


def jsd_from_probs(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
    """Jensen-Shannon divergence (natural log) between distributions ``p`` and ``q`` along ``axis``.

    ``0 * log 0`` is taken as 0, so distributions with disjoint supports give exactly ``ln 2``.
    Returns the divergence with ``axis`` reduced.
    """
    m = 0.5 * (p + q)

    def kl(a: jax.Array) -> jax.Array:
        safe_a = jnp.where(a > 0, a, 1.0)
        safe_m = jnp.where(a > 0, m, 1.0)
        return jnp.sum(jnp.where(a > 0, a * (jnp.log(safe_a) - jnp.log(safe_m)), 0.0), axis=axis)

    return 0.5 * (kl(p) + kl(q))


def jsd(logits_p: jax.Array, logits_q: jax.Array, axis: int = -1) -> jax.Array:
    """Jensen-Shannon divergence between ``softmax(logits_p)`` and ``softmax(logits_q)`` along ``axis``.

    Computed from log-probabilities (stable for large logits): with ``lp, lq`` the
    log-softmaxes and ``lm = logaddexp(lp, lq) - ln 2``,
    ``JSD = (sum p (lp - lm) + sum q (lq - lm)) / 2``.
    """
    lp = jax.nn.log_softmax(logits_p, axis=axis)
    lq = jax.nn.log_softmax(logits_q, axis=axis)
    lm = jnp.logaddexp(lp, lq) - jnp.log(2.0)
    return 0.5 * (jnp.sum(jnp.exp(lp) * (lp - lm), axis=axis) + jnp.sum(jnp.exp(lq) * (lq - lm), axis=axis))


def flatten_tokens(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """(N, T, D) hidden states and an (N, T) 0/1 mask -> (N, T * D) with padded positions zeroed."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (N, T, D) and mask (N, T); got {hidden.shape} and {mask.shape}")
    h = hidden * mask[..., None].astype(hidden.dtype)
    return h.reshape(h.shape[0], -1)


def angle_distance(a: jax.Array, b: jax.Array, dims: jax.Array, distance_weight: float = 1.0, eps: float = 1e-8) -> jax.Array:
    """Per-row ``(1 - cos(a, b)) + distance_weight * ||a - b||^2 / dims`` for (N, F) arrays.

    ``dims`` (N,) is the number of real entries of each row (tokens x width), so the distance
    term is a mean squared difference per real entry, comparable across sentence lengths.
    """
    dot = jnp.sum(a * b, -1)
    na = jnp.sqrt(jnp.sum(a * a, -1) + eps)
    nb = jnp.sqrt(jnp.sum(b * b, -1) + eps)
    cos = dot / (na * nb)
    dist = jnp.sum((a - b) ** 2, -1) / jnp.maximum(dims, 1.0)
    return (1.0 - cos) + distance_weight * dist


def compensatory_loss(
    male: Sequence[jax.Array],
    female: Sequence[jax.Array],
    pair_mask: jax.Array,
    plain: Sequence[jax.Array],
    plain_original: Sequence[jax.Array],
    plain_mask: jax.Array,
    distance_weight: float = 1.0,
    keep_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The compensatory debiasing loss and its two parts.

    Args:
      male, female: per layer, the (N, T, D) hidden states of the male / female versions of N
        stereotype sentences (same tokens but the gendered ones; same ``pair_mask``).
      pair_mask: (N, T) 0/1 real-token mask of the pairs.
      plain: per layer, the (M, T, D) hidden states of M non-stereotype sentences under the
        model being debiased.
      plain_original: the same under the frozen original model (gradients are stopped here, so
        the original model is never changed by this loss).
      plain_mask: (M, T) mask.
      distance_weight: weight of the squared distance next to the angle term.
      keep_weight: weight of the agreement (knowledge-keeping) term.

    Returns:
      ``(loss, {"stereotype": ..., "keep": ...})``: scalar loss = stereotype term + keep_weight *
      keep term, each the mean over layers and sentences of :func:`angle_distance`.
    """
    if len(male) != len(female) or len(plain) != len(plain_original) or not male or not plain:
        raise ValueError("male/female and plain/plain_original must be non-empty lists of the same length")
    width = male[0].shape[-1]
    pair_dims = jnp.sum(pair_mask, -1).astype(male[0].dtype) * width
    plain_dims = jnp.sum(plain_mask, -1).astype(plain[0].dtype) * width
    stereo = jnp.mean(jnp.stack([
        jnp.mean(angle_distance(flatten_tokens(m, pair_mask), flatten_tokens(f, pair_mask), pair_dims, distance_weight))
        for m, f in zip(male, female)
    ]))
    keep = jnp.mean(jnp.stack([
        jnp.mean(angle_distance(
            flatten_tokens(p, plain_mask), jax.lax.stop_gradient(flatten_tokens(o, plain_mask)), plain_dims, distance_weight
        ))
        for p, o in zip(plain, plain_original)
    ]))
    return stereo + keep_weight * keep, {"stereotype": stereo, "keep": keep}


def auto_debias_loss(
    mask_logits_male: jax.Array,
    mask_logits_female: jax.Array,
    cls_male: jax.Array | None = None,
    cls_female: jax.Array | None = None,
    embed_weight: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Auto-Debias's distribution-alignment loss.

    Args:
      mask_logits_male, mask_logits_female: (N, V) masked-LM logits at ``[MASK]`` for the male
        and the female version of N (target pair, prompt) inputs.
      cls_male, cls_female: optional (N, D) sentence embeddings of the two versions; with them,
        ``embed_weight * mean(1 - cos)`` is added (the authors' auxiliary term).

    Returns:
      ``(loss, {"jsd": mean JSD, "embed": mean (1 - cos) or 0})``.
    """
    j = jnp.mean(jsd(mask_logits_male, mask_logits_female))
    embed = jnp.zeros((), j.dtype)
    if cls_male is not None and cls_female is not None:
        dot = jnp.sum(cls_male * cls_female, -1)
        cos = dot / jnp.sqrt((jnp.sum(cls_male**2, -1) + 1e-8) * (jnp.sum(cls_female**2, -1) + 1e-8))
        embed = jnp.mean(1.0 - cos)
    return j + embed_weight * embed, {"jsd": j, "embed": embed}


def beam_search_prompts(
    score: Callable[[list[str]], np.ndarray],
    candidates: Sequence[str],
    length: int = 2,
    beam: int = 10,
) -> list[tuple[str, float]]:
    """Auto-Debias's beam search for biased prompts.

    Starting from the single words of ``candidates``, each round scores every prompt with
    ``score(prompts) -> (len(prompts),)`` (higher = more biased: the mean JSD between the
    male and female completions), keeps the ``beam`` best, and extends each kept prompt by every
    candidate word; ``length`` rounds in all (the authors: 5 rounds, beam 100, over 5,000
    frequent Wikipedia words).

    Returns:
      every kept prompt of every round with its score, ``(prompt, score)``, in the order found
      (round by round, best first within a round): the prompts used for debiasing.
    """
    if length < 1 or beam < 1:
        raise ValueError(f"length and beam must be >= 1, got {length} and {beam}")
    words = list(dict.fromkeys(candidates))
    if not words:
        raise ValueError("candidates is empty")
    current = list(words)
    kept: list[tuple[str, float]] = []
    for r in range(length):
        s = np.asarray(score(current), np.float64)
        if s.shape != (len(current),):
            raise ValueError(f"score returned shape {s.shape}, expected ({len(current)},)")
        order = np.argsort(-s, kind="stable")[:beam]
        top = [current[i] for i in order]
        kept.extend((current[i], float(s[i])) for i in order)
        if r + 1 < length:
            current = [f"{p} {w}" for p in top for w in words]
    return kept
