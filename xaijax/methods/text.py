"""Token attributions of text transformers (BERT): one relevance value per token.

A text model in xaijax (:mod:`xaijax.models.bert`) has an *explanation view*: besides token
ids (N, T) it takes word embeddings (N, T, 1, D) — a token sequence is an NHWC image one
pixel wide with D channels — and adds position and token-type embeddings inside. Every
classifier method of xaijax therefore runs on text unchanged and returns an (N, T, 1) map:
one value per token. :func:`explain_tokens` does the text-specific part:

1. the word embeddings of the ids, ``model.apply(variables, ids, method="embed_words")``;
2. one sentence at a time under ``jax.vmap``: each sentence's (1, T) ``attention_mask`` and
   ``token_type_ids`` go into the variables' ``"text"`` collection, which the model reads
   when it is called with embeddings only (so a method that just passes ``x`` — and its own
   inner batches: integrated-gradients steps, SmoothGrad samples — explains that sentence
   with its own mask);
3. the (N, T) result in the embeddings' dtype (float64 parameters give float64 relevance),
   with every padding position (attention mask 0) set to exactly 0.

The model must declare ``sequence_model = True`` (token grids (N, T, D) -> (N, T, 1, D),
:func:`xaijax.methods._core.token_grid`) and, for the attention methods, ``attention_layers``.

Methods (:data:`TEXT_METHODS`, registry names; tested in ``tests/test_token_attribution.py``):

* ``gradient``: the gradient of the target logit w.r.t. the word embedding, reduced over the
  embedding dimensions with the **L2 norm** (:data:`TEXT_DEFAULTS`; the usual per-token
  "gradient norm" saliency of NLP; the image default ``abs-max`` is kept for images). Non-negative.
* ``gradient-x-input``: ``sum_d grad_d * e_d`` (signed).
* ``integrated-gradients`` (Sundararajan et al. 2017): ``sum_d (e - e')_d * integral grad_d``
  with the baseline ``e'`` chosen by ``baseline``:

  - ``"pad"`` (default): the ``[PAD]`` token's word embedding at every token position except
    the special tokens ``[CLS]`` and ``[SEP]``, which keep their own embedding (so their
    attribution is exactly 0) — the reference of Captum's BERT tutorial
    (``[CLS] [PAD] ... [PAD] [SEP] [PAD] ... [SEP]``). Position and token-type embeddings are
    the same in input and baseline (they are added inside the model), so the attributions sum
    to ``f(input) - f(baseline)`` (completeness) where ``f(baseline)`` is the logit of that
    "empty" sentence of the same shape.
  - ``"zero"``: all-zero word embeddings at every position (special tokens included).
  - an array broadcastable to (N, T, 1, D) (or (N, T, D)): your own baseline in the word
    embedding space.

  Default 32 steps, right Riemann rule (:class:`~xaijax.methods.gradient.IntegratedGradients`);
  pass ``params={"steps": 50, "rule": "gauss-legendre"}`` etc. ``baseline`` is given to an
  :class:`~xaijax.methods.gradient.IntegratedGradients` method itself (by name or as a value);
  inside a combinator (``smooth:integrated-gradients``) the IG keeps its own ``baseline``
  field (default 0: the ``"zero"`` baseline).
* ``smoothgrad`` (and the ``smooth:<method>`` combinator over any text method): noise with a
  standard deviation of ``noise`` times the range of the sentence's word embeddings (over its
  T x D values, padding positions' ``[PAD]`` embeddings included — a padded sentence's noise
  therefore differs from the unpadded one's; the result is deterministic for a seed); L2
  reduction as ``gradient``.
* ``attnlrp`` (Achtibat et al. 2024), ``cp-lrp`` (Ali et al. 2022): relevance propagation with
  the transformer rules of :mod:`xaijax.propagation.composites`, summed over the embedding
  dimensions. The input relevance is what reaches the *word* embeddings: the relevance the
  residual z-rule of the embedding sum sends to the position and token-type embeddings is
  absorbed there (as relevance reaching a bias), as is what the layers' biases, the gamma
  rule's stabilisation and the softmax rule (which does not conserve) take or add.
* ``attention-rollout``, ``raw-attention``, ``generic-attention``, ``chefer-lrp``
  (:mod:`xaijax.methods.attention`): the [CLS] row over all T tokens, [CLS] itself included.
  Rollout's row is a probability vector: it sums to 1 over the sentence's real tokens
  (padding gets exactly 0).

Other registered methods are refused by name with a :class:`~xaijax.methods.NotApplicable`
naming the method and listing :data:`TEXT_METHODS` (CAMs of image layers, perturbations of
pixels, segment-based methods; the ReLU-network propagation methods RAP, RSP, Excitation
Backprop are refused by the methods themselves on a transformer). A :class:`Method` value is
run as given; if it is not defined for the model, its ``NotApplicable`` is re-raised with the
same list.

Pure and jittable: :func:`token_relevance` is the array-level core (``jax.jit`` with the method
and the model static); :func:`explain_tokens` checks its inputs, builds the baseline and calls
a jitted :func:`token_relevance`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.methods import registry
from xaijax.methods._core import CLASSIFIER_KINDS, Method, NotApplicable, class_indices
from xaijax.methods.gradient import IntegratedGradients

__all__ = [
    "TEXT_METHODS",
    "TEXT_DEFAULTS",
    "BASELINES",
    "SPECIAL_TOKENS",
    "text_method",
    "word_embeddings",
    "ig_baseline",
    "token_relevance",
    "explain_tokens",
]

#: Registered methods that make sense on word embeddings (see the module docstring); the
#: ``smooth:`` prefix may wrap any of them.
TEXT_METHODS: tuple[str, ...] = (
    "gradient",
    "gradient-x-input",
    "integrated-gradients",
    "smoothgrad",
    "attnlrp",
    "cp-lrp",
    "attention-rollout",
    "raw-attention",
    "generic-attention",
    "chefer-lrp",
)

#: Hyperparameters that differ from the registry's (image) defaults on text.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gradient": {"reduce": "l2"},
    "smoothgrad": {"reduce": "l2"},
}

#: Named integrated-gradients baselines (an array is also accepted).
BASELINES: tuple[str, ...] = ("pad", "zero")

#: Tokens that keep their own embedding in the ``"pad"`` baseline.
SPECIAL_TOKENS: tuple[str, ...] = ("[CLS]", "[SEP]")

_TEXT_PREFIXES = ("smooth",)
_METHOD_CACHE: dict[Any, Method] = {}


def _text_list() -> str:
    return ", ".join(TEXT_METHODS) + " (and smooth:<one of them>)"


def text_method(name: str, **hparams: Any) -> Method:
    """The registered method ``name`` with the text defaults (:data:`TEXT_DEFAULTS`) under
    ``hparams``; the same value for the same arguments (cached: a jitted call is not retraced).

    Raises:
      NotApplicable: ``name`` is not a text method (the message lists :data:`TEXT_METHODS`).
      ValueError: an unknown name or bad hyperparameters (from the registry).
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a registered name or a Method value; got {name!r}")
    base = name.split(":", 1)[1] if ":" in name else name
    prefix = name.split(":", 1)[0] if ":" in name else None
    if base not in TEXT_METHODS or (prefix is not None and prefix not in _TEXT_PREFIXES):
        registry.get(name)  # an unknown name gets the registry's error (with suggestions)
        raise NotApplicable(
            f"method {name!r} does not apply to text (token attributions of word embeddings); text methods: "
            f"{_text_list()}. To try another method anyway, pass a Method value (xaijax.methods.get({name!r}))"
        )
    merged = {**TEXT_DEFAULTS.get(base, {}), **hparams}
    try:
        key = (name, tuple(sorted(merged.items())))
        hash(key)
    except TypeError:  # an array hyperparameter: no cache
        return registry.get(name, **merged)
    if key not in _METHOD_CACHE:
        _METHOD_CACHE[key] = registry.get(name, **merged)
    return _METHOD_CACHE[key]


def word_embeddings(model: nn.Module, variables: Mapping[str, Any], input_ids: jax.Array) -> jax.Array:
    """The explanation view of token ids: ``model.apply(variables, ids, method="embed_words")``, (N, T, 1, D)."""
    e = model.apply(variables, input_ids, method="embed_words")
    n, t = np.shape(input_ids)
    if e.ndim != 4 or e.shape[:3] != (n, t, 1):
        raise ValueError(
            f"{type(model).__name__}.embed_words must return word embeddings (N, T, 1, D) = ({n}, {t}, 1, D); got {e.shape}"
        )
    return e


def _with_text(variables: Mapping[str, Any], token_type_ids: jax.Array, attention_mask: jax.Array) -> dict[str, Any]:
    v = dict(variables)
    v["text"] = {"token_type_ids": token_type_ids, "attention_mask": attention_mask}
    return v


def token_relevance(
    method: Method,
    model: nn.Module,
    variables: Mapping[str, Any],
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    attention_mask: jax.Array,
    target: jax.Array,
    baseline: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """The array-level core of :func:`explain_tokens`: relevance (N, T) of each token.

    Pure: ``jax.jit(token_relevance, static_argnums=(0, 1), static_argnames="chunk")``. No
    input checks (see :func:`explain_tokens`).

    Args:
      method: a classifier :class:`~xaijax.methods.Method` (already resolved).
      input_ids, token_type_ids, attention_mask: (N, T) int arrays.
      target: class indices (N,) int, or an (N, K) float seed.
      baseline: (N, T, 1, D) word-embedding baseline, used by integrated gradients (passed as
        its ``baseline``); ``None``: the method's own.
      chunk: sentences explained together (``vmap`` within a chunk, ``lax.map`` over chunks);
        ``None``: all N in one ``vmap``. The results are the same; on a CPU a small chunk keeps
        the working set in cache (see ``experiments/bench_text.py``), on an accelerator the
        whole batch in one ``vmap`` uses it best.

    Returns:
      (N, T) in the word embeddings' dtype; exactly 0 where ``attention_mask`` is 0.
    """
    emb = word_embeddings(model, variables, input_ids)
    mask = jnp.asarray(attention_mask)
    use_baseline = baseline is not None and isinstance(method, IntegratedGradients)

    def one(x, tt, am, t, b):
        v = _with_text(variables, tt[None], am[None])
        if use_baseline:
            out = method(model, v, x[None], t[None], baseline=b[None])
        else:
            out = method(model, v, x[None], t[None])
        return out[0, :, 0]

    b = baseline if use_baseline else jnp.zeros((emb.shape[0],), emb.dtype)
    args = (emb, jnp.asarray(token_type_ids), mask, jnp.asarray(target), b)
    if chunk is None or chunk >= emb.shape[0]:
        r = jax.vmap(one)(*args)
    else:
        r = jax.lax.map(lambda a: one(*a), args, batch_size=int(chunk))
    return jnp.where(mask != 0, r, jnp.zeros((), r.dtype)).astype(emb.dtype)


_jitted_relevance = jax.jit(token_relevance, static_argnums=(0, 1), static_argnames="chunk")


def _apply_ids(model: nn.Module, variables: Mapping[str, Any], ids: jax.Array, tt: jax.Array, am: jax.Array) -> jax.Array:
    return model.apply(variables, ids, token_type_ids=tt, attention_mask=am)


_jitted_apply = jax.jit(_apply_ids, static_argnums=0)


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(name)
    return getattr(batch, name, None)


def _batch_arrays(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    ids = _field(batch, "input_ids")
    if ids is None:
        raise TypeError(
            "batch must be a xaijax.data.tokenizer.TokenBatch (or a mapping) with input_ids, token_type_ids and "
            f"attention_mask; got {type(batch).__name__}"
        )
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"batch.input_ids must be a non-empty int array (N, T); got {ids.dtype} {ids.shape}")
    tt = _field(batch, "token_type_ids")
    am = _field(batch, "attention_mask")
    tt = np.zeros_like(ids) if tt is None else np.asarray(tt)
    am = np.ones_like(ids) if am is None else np.asarray(am)
    for name, a in (("token_type_ids", tt), ("attention_mask", am)):
        if a.shape != ids.shape or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"batch.{name} must be an int array of the ids' shape {ids.shape}; got {a.dtype} {a.shape}")
    if not np.isin(am, (0, 1)).all():
        raise ValueError("batch.attention_mask must hold 0 (padding) and 1 (real token) only")
    if not am[:, 0].all():
        raise ValueError("batch.attention_mask: every sentence needs a real first token ([CLS]); some row starts with padding")
    if (np.diff(am.astype(np.int8), axis=1) > 0).any():
        row = int(np.nonzero((np.diff(am.astype(np.int8), axis=1) > 0).any(axis=1))[0][0])
        raise ValueError(
            f"batch.attention_mask row {row} has a real token after padding; sentences must be padded on the right "
            "(the tokenizer's layout: real tokens first, then [PAD])"
        )
    return ids.astype(np.int32), tt.astype(np.int32), am.astype(np.int32), _field(batch, "tokens")


def _special_positions(ids: np.ndarray, am: np.ndarray, tokens: Any, special_ids: Sequence[int] | None) -> np.ndarray:
    """(N, T) bool: the positions of [CLS]/[SEP] (from the wordpieces, else from ``special_ids``)."""
    if special_ids is not None:
        return np.isin(ids, np.asarray(list(special_ids), dtype=ids.dtype)) & (am != 0)
    if tokens is None:
        raise ValueError(
            "baseline='pad' keeps [CLS]/[SEP] as they are and needs to know where they are: pass a TokenBatch "
            "(with its tokens) or special_ids=(cls_id, sep_id)"
        )
    if len(tokens) != ids.shape[0]:
        raise ValueError(f"batch.tokens has {len(tokens)} sentences, input_ids {ids.shape[0]}")
    out = np.zeros(ids.shape, bool)
    for i, toks in enumerate(tokens):
        n_real = int(am[i].sum())
        if len(toks) != n_real:
            raise ValueError(f"batch.tokens[{i}] has {len(toks)} wordpieces but the attention mask marks {n_real} real tokens")
        out[i, : len(toks)] = [t in SPECIAL_TOKENS for t in toks]
    return out


def ig_baseline(
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: Any,
    baseline: Any = "pad",
    *,
    pad_id: int = 0,
    special_ids: Sequence[int] | None = None,
) -> jax.Array:
    """The (N, T, 1, D) integrated-gradients baseline in word-embedding space (see the module docstring).

    Args:
      batch: a TokenBatch (or mapping with ``input_ids``, ``attention_mask`` and, for
        ``"pad"`` without ``special_ids``, ``tokens``).
      baseline: ``"pad"``, ``"zero"`` or an array broadcastable to (N, T, 1, D) or shaped (N, T, D).
      pad_id: the id of ``[PAD]`` (0 in BERT's vocabularies and :func:`xaijax.data.tokenizer.write_vocab`'s).
      special_ids: ids kept as they are in the ``"pad"`` baseline (default: the positions of the
        wordpieces ``[CLS]``/``[SEP]`` in ``batch.tokens``).
    """
    ids, _, am, tokens = _batch_arrays(batch)
    emb = word_embeddings(model, variables, jnp.asarray(ids))
    if isinstance(baseline, str):
        if baseline == "zero":
            return jnp.zeros_like(emb)
        if baseline == "pad":
            if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
                raise ValueError(f"pad_id must be a non-negative int (the id of [PAD]); got {pad_id!r}")
            pad = word_embeddings(model, variables, jnp.full(ids.shape, int(pad_id), jnp.int32))
            keep = _special_positions(ids, am, tokens, special_ids)
            return jnp.where(jnp.asarray(keep)[:, :, None, None], emb, pad)
        raise ValueError(f"baseline must be one of {BASELINES} or an array; got {baseline!r}")
    b = jnp.asarray(baseline)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"a baseline array must be floating point (word embeddings); got {b.dtype}")
    if b.ndim == 3 and b.shape == (emb.shape[0], emb.shape[1], emb.shape[3]):
        b = b[:, :, None, :]
    try:
        b = jnp.broadcast_to(b, emb.shape)
    except ValueError:
        raise ValueError(f"baseline of shape {b.shape} does not broadcast to the word embeddings' shape {emb.shape} (N, T, 1, D)") from None
    if not bool(jnp.isfinite(b).all()):
        raise ValueError("baseline has non-finite values")
    return b.astype(emb.dtype)


def _resolve(method: Any, params: Mapping[str, Any] | None) -> tuple[Method, str]:
    if isinstance(method, str):
        return text_method(method, **dict(params or {})), method
    if params:
        raise TypeError("params configure a method given by name; a Method value already has its hyperparameters")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a registered name or a xaijax Method value; got {method!r}")
    return method, type(method).__name__


def explain_tokens(
    method: str | Method,
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: Any,
    target: Any = "predicted",
    *,
    baseline: Any = "pad",
    params: Mapping[str, Any] | None = None,
    pad_id: int = 0,
    special_ids: Sequence[int] | None = None,
    chunk: int | None = None,
    jit: bool = True,
) -> jax.Array:
    """Relevance of every token of every sentence (N, T); padding exactly 0.

    Args:
      method: a name of :data:`TEXT_METHODS` (optionally ``smooth:<name>``), built with
        :data:`TEXT_DEFAULTS` and ``params``; or a :class:`~xaijax.methods.Method` value.
      model: a text classifier with the explanation view (``sequence_model = True``,
        ``embed_words``), e.g. :class:`xaijax.models.bert.BertForSequenceClassification`.
      variables: its variables (any ``"text"`` collection is replaced per sentence).
      batch: a :class:`xaijax.data.tokenizer.TokenBatch` (``input_ids``, ``token_type_ids``,
        ``attention_mask`` (N, T), ``tokens``), or a mapping with those keys.
      target: ``"predicted"`` / ``None`` (each sentence's top class), an int, int array (N,),
        or an (N, K) float seed weighting the logits.
      baseline: integrated gradients' baseline: ``"pad"`` (default), ``"zero"`` or an array
        (see the module docstring); ignored by the other methods.
      params: hyperparameters of a method given by name (e.g. ``{"steps": 50}``).
      pad_id, special_ids: see :func:`ig_baseline`.
      chunk: sentences per ``vmap`` group (``lax.map`` over groups; ``None``: all at once);
        see :func:`token_relevance`.
      jit: run the jitted core (default); ``False`` runs it eagerly (vmapped all the same).

    Returns:
      (N, T) relevance in the word embeddings' dtype.

    Raises:
      NotApplicable: a method that does not apply to text (the message lists the text methods).
      ValueError, TypeError: a malformed batch, target or baseline (naming it).
    """
    m, label = _resolve(method, params)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int (sentences per vmapped group); got {chunk!r}")
    if m.kind not in CLASSIFIER_KINDS:
        raise TypeError(f"{label} is a {m.kind!r} method; explain_tokens runs classifier attributions ({_text_list()})")
    if m.runs_own_loop:
        raise NotApplicable(f"{label} runs its own optimisation loop and cannot be vmapped over sentences; text methods: {_text_list()}")
    if not getattr(model, "sequence_model", False) is True:
        raise TypeError(
            f"{type(model).__name__} is not a text model: explain_tokens needs a model declaring sequence_model = True "
            "with the explanation view (model.apply(variables, ids, method='embed_words')), e.g. xaijax.models.bert"
        )
    ids, tt, am, _ = _batch_arrays(batch)
    for what, a, attr in (("input_ids", ids, "vocab_size"), ("token_type_ids", tt, "type_vocab_size")):
        size = getattr(model, attr, None)
        if isinstance(size, (int, np.integer)) and (a.min() < 0 or a.max() >= size):
            raise ValueError(
                f"batch.{what} must lie in [0, {attr}={size}) of {type(model).__name__}; got values from {a.min()} to "
                f"{a.max()} (a tokenizer whose vocabulary does not match the model? Tokenizer.check_model)"
            )
    n = ids.shape[0]
    logits = jax.eval_shape(lambda v: _apply_ids(model, v, ids, tt, am), variables)
    if len(logits.shape) != 2 or logits.shape[0] != n:
        raise ValueError(f"{type(model).__name__} must return logits (N, K) for token ids; got shape {logits.shape}")
    k = int(logits.shape[1])
    if target is None or (isinstance(target, str) and target == "predicted"):
        t = jnp.argmax(_jitted_apply(model, variables, ids, tt, am), axis=-1).astype(jnp.int32)
    elif isinstance(target, str):
        raise ValueError(f"target must be 'predicted', a class index, an int array ({n},) or an ({n}, {k}) seed; got {target!r}")
    else:
        t = jnp.asarray(target)
        if jnp.issubdtype(t.dtype, jnp.integer):
            t = class_indices(t, n, k).astype(jnp.int32)
        elif t.shape != (n, k):
            raise ValueError(f"a float target is a seed and must have the logits' shape ({n}, {k}); got {t.shape}")
        elif not m.accepts_seed:
            raise ValueError(f"{label} needs class indices as target, not a float seed")
    b = None
    if isinstance(m, IntegratedGradients):
        b = ig_baseline(model, variables, batch, baseline, pad_id=pad_id, special_ids=special_ids)
    fn = _jitted_relevance if jit else token_relevance
    try:
        return fn(m, model, variables, jnp.asarray(ids), jnp.asarray(tt), jnp.asarray(am), t, b, chunk=chunk)
    except NotApplicable as e:
        raise NotApplicable(f"{label} is not defined for {type(model).__name__}: {e}. Text methods: {_text_list()}") from None
