"""BERT in ``flax.linen`` with Hugging Face's module and parameter names.

Two models share the encoder subtree ``bert`` exactly (masked-LM pre-trained ``bert``
parameters drop into the classifier):

* :class:`BertForSequenceClassification` -- ``bert`` (embeddings, encoder, pooler) and
  ``classifier`` -> logits (N, num_labels) (natural-language inference: 3 labels);
* :class:`BertForMaskedLM` -- ``bert`` (no pooler) and ``cls.predictions`` -> logits
  (N, T, vocab_size); the decoder is tied to ``bert.embeddings.word_embeddings``.

Module tree (every step a named module of :mod:`xaijax.models.layers` /
:mod:`xaijax.models.transformer_layers`, so relevance rules and attention methods can address
it; names in parentheses are parameter-free modules that Hugging Face computes inline)::

    bert.embeddings           word_embeddings, position_embeddings, token_type_embeddings (nn.Embed),
                              (tokens: (N, T, 1, D) -> (N, T, D)), (add: words + positions + types,
                              one Add so the z-rule splits relevance among the three), LayerNorm
    bert.encoder.layer.N      attention.self: query, key, value (Dense), (query_heads, key_heads,
                              value_heads: (N, heads, T, D/heads)), (qk: q.k^T / sqrt(D/heads)),
                              (mask: padded keys -> most negative finite value), (attn: softmax,
                              the attention probabilities (N, heads, T, T)), (av: attention.v),
                              (merge: heads concatenated)
                              attention.output: dense, (add: residual), LayerNorm
                              intermediate: dense, (intermediate_act_fn: exact GELU)
                              output: dense, (add: residual), LayerNorm
    bert.pooler               (select: token 0), dense, (activation: Tanh)   [classifier only]
    classifier                Dense(num_labels)
    cls.predictions           transform.dense, (transform.transform_act_fn: GELU),
                              transform.LayerNorm, decoder = h @ word_embeddings^T + ``bias``

Post-norm blocks (BERT's): ``LayerNorm(x + attention(x))``, then ``LayerNorm(y + mlp(y))``.
LayerNorm eps 1e-12, GELU exact (erf), dropout left out (eval mode).

Parameter tree = the Hugging Face state-dict key with dots as nesting and torch's parameter
roles renamed: Linear ``weight`` (out, in) -> ``kernel`` (in, out) transposed, ``bias`` ->
``bias``; Embedding ``weight`` -> ``embedding``; LayerNorm ``weight`` -> ``scale``, ``bias`` ->
``bias``. E.g. ``bert.encoder.layer.3.attention.self.query.weight`` is
``params['bert']['encoder']['layer']['3']['attention']['self']['query']['kernel'].T`` and
``cls.predictions.bias`` is ``params['cls']['predictions']['bias']`` (the decoder's weight is
the word embedding; Hugging Face's ``cls.predictions.decoder.weight``/``.bias`` duplicate
``bert.embeddings.word_embeddings.weight`` and ``cls.predictions.bias``).

Call convention (both models): ``model.apply(variables, inputs, token_type_ids=None,
attention_mask=None)``

* ``inputs``: int token ids (N, T) -- ordinary use -- or float **word embeddings in the
  explanation view** (N, T, 1, D): a token sequence is an NHWC image one pixel wide with D
  channels, so every xaijax method's (N, H, W) map is one value per token, (N, T, 1).
  ``model.apply(variables, ids, method="embed_words")`` gives that view of the ids (the same
  values the ids path uses: the ids path *is* ``embed_words`` followed by the float path).
  Position and token-type embeddings and the embedding LayerNorm are added inside.
* ``token_type_ids`` / ``attention_mask``: (N, T) int or bool (mask: 1 = real token, 0 =
  padding). When None, they are read from the variables collection ``"text"``
  (``variables["text"]["token_type_ids"]`` / ``["attention_mask"]``, shape (1, T) or (N, T),
  broadcast over the batch) if present, else zeros / all ones. That is how a method that only
  passes ``x`` explains one sentence: a (1, T) mask in the ``"text"`` collection broadcasts over
  the method's own inner batches (integrated-gradient steps, SmoothGrad samples).
* Padding: attention logits of padded *keys* are replaced by the dtype's most negative finite
  value (:class:`~xaijax.models.transformer_layers.MaskKeys`), so their probabilities, and every
  gradient and relevance through them, are exactly 0. Padded tokens still get hidden states of
  their own (as queries), which nothing else reads: the classifier's logits do not depend on them
  at all (exactly zero gradient), the masked-LM logits at padded positions are meaningless.

Declared facts (as the ViTs): ``family = "bert"``, ``block_layers``, ``attention_layers``
(``bert.encoder.layer.{i}.attention.self.attn``, block 0 first), ``num_prefix_tokens = 0``
(the [CLS] token is an ordinary input token: attention methods read its row, token 0, over
*all* tokens), ``sequence_model = True`` (tokens (N, T, D) map to a (N, T, 1, D) grid, nothing
dropped) and ``cam_layer`` (see :attr:`BertForSequenceClassification.cam_layer`).

Named configurations (:data:`CONFIGS`, :func:`build`): ``bert-base-uncased``,
``bert-large-uncased`` and the small ones of Turc et al. (2019) (``bert-tiny``, ``bert-mini``,
``bert-small``, ``bert-medium``), plus ``test-tiny`` for unit tests.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax.models import layers as L
from xaijax.models import transformer_layers as T

__all__ = [
    "CONFIGS",
    "TASKS",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "BertEncoder",
    "BertModel",
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "build",
]

_INIT = nn.initializers.normal(0.02)  # Hugging Face's initializer_range

#: Named configurations: (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
#: intermediate_size) and the rest of Hugging Face's ``BertConfig`` where it differs from the defaults.
CONFIGS: dict[str, dict[str, int]] = {
    "bert-base-uncased": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "bert-large-uncased": dict(
        vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    # Turc et al. 2019, "Well-read students learn better" (google/bert_uncased_L-*_H-*_A-*)
    "bert-tiny": dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-medium": dict(vocab_size=30522, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    # unit tests
    "test-tiny": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=32),
}

#: ``build`` tasks and their model classes.
TASKS = ("classification", "mlm")


# ----------------------------------------------------------------------------- blocks


class BertEmbeddings(nn.Module):
    """``bert.embeddings``: word + position + token-type embeddings, summed, LayerNorm.

    ``embed_words(ids)``: int (N, T) -> word embeddings (N, T, 1, D) (the explanation view).
    ``__call__(x, token_type_ids)``: x (N, T, 1, D) float, token types (N or 1, T) int ->
    (N, T, D).
    """

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def setup(self) -> None:
        self.word_embeddings = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=_INIT)
        self.position_embeddings = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=_INIT)
        self.token_type_embeddings = nn.Embed(self.type_vocab_size, self.hidden_size, embedding_init=_INIT)
        self.tokens = T.PatchTokens()
        self.add = L.Add()
        self.LayerNorm = T.LayerNorm(self.layer_norm_eps)

    def embed_words(self, ids: jax.Array) -> jax.Array:
        return self.word_embeddings(ids)[:, :, None, :]

    def __call__(self, x: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        if self.is_initializing():  # create the word embedding even when initialised on the float view
            self.word_embeddings(jnp.zeros((1, 1), jnp.int32))
        words = self.tokens(x)
        t = words.shape[1]
        pos = self.position_embeddings(jnp.arange(t, dtype=jnp.int32)[None])
        types = self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(self.add(words, pos, types))


class BertSelfAttention(nn.Module):
    """``attention.self``: separate q/k/v projections, scaled dot product, key mask, softmax.

    ``x`` (N, T, D), ``keep`` (N or 1, 1, 1, T) float (1 real key, 0 padding) -> (N, T, D)
    (the heads concatenated, before ``attention.output.dense``).
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        d = x.shape[-1]
        hd = d // self.num_heads
        q = T.Heads(self.num_heads, name="query_heads")(nn.Dense(d, kernel_init=_INIT, name="query")(x))
        k = T.Heads(self.num_heads, name="key_heads")(nn.Dense(d, kernel_init=_INIT, name="key")(x))
        v = T.Heads(self.num_heads, name="value_heads")(nn.Dense(d, kernel_init=_INIT, name="value")(x))
        logits = T.MatMul(scale=float(hd) ** -0.5, transpose_b=True, name="qk")(q, k)
        logits = T.MaskKeys(name="mask")(logits, keep)
        attn = T.Softmax(name="attn")(logits)
        out = T.MatMul(name="av")(attn, v)
        return T.MergeHeads(name="merge")(out)


class _DenseAddNorm(nn.Module):
    """``attention.output`` / ``output``: ``LayerNorm(dense(h) + residual)``."""

    features: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        h = nn.Dense(self.features, kernel_init=_INIT, name="dense")(h)
        h = L.Add(name="add")(h, residual)
        return T.LayerNorm(self.eps, name="LayerNorm")(h)


class _Attention(nn.Module):
    """``attention``: ``self`` then ``output`` (dense, residual add, LayerNorm)."""

    num_heads: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        h = BertSelfAttention(self.num_heads, name="self")(x, keep)
        return _DenseAddNorm(x.shape[-1], self.eps, name="output")(h, x)


class _Intermediate(nn.Module):
    """``intermediate``: dense (D -> intermediate_size), exact GELU (``intermediate_act_fn``)."""

    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, kernel_init=_INIT, name="dense")(x)
        return T.GELU(name="intermediate_act_fn")(h)


class BertLayer(nn.Module):
    """One post-norm encoder block ``bert.encoder.layer.N`` (N, T, D) -> (N, T, D)."""

    num_heads: int
    intermediate_size: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        a = _Attention(self.num_heads, self.eps, name="attention")(x, keep)
        h = _Intermediate(self.intermediate_size, name="intermediate")(a)
        return _DenseAddNorm(x.shape[-1], self.eps, name="output")(h, a)


class _Layers(nn.Module):
    """``encoder.layer``: blocks named ``0`` .. ``L-1``."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = BertLayer(self.num_heads, self.intermediate_size, self.eps, name=str(i))(x, keep)
        return x


class BertEncoder(nn.Module):
    """``bert.encoder``: the stack ``layer``."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
        return _Layers(self.num_layers, self.num_heads, self.intermediate_size, self.eps, name="layer")(x, keep)


class _Pooler(nn.Module):
    """``bert.pooler``: token 0 ([CLS]), dense, tanh (``activation``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T.SelectToken(0, name="select")(x)
        h = nn.Dense(x.shape[-1], kernel_init=_INIT, name="dense")(h)
        return T.Tanh(name="activation")(h)


class BertModel(nn.Module):
    """``bert``: embeddings, encoder and (``add_pooling_layer``) the pooler.

    ``__call__(x, token_type_ids, keep)``: x (N, T, 1, D) float word embeddings ->
    ``(sequence output (N, T, D), pooled output (N, D) or None)``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, self.type_vocab_size, self.layer_norm_eps
        )
        self.encoder = BertEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size, self.layer_norm_eps)
        if self.add_pooling_layer:
            self.pooler = _Pooler()

    def embed_words(self, ids: jax.Array) -> jax.Array:
        return self.embeddings.embed_words(ids)

    def __call__(self, x: jax.Array, token_type_ids: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        h = self.embeddings(x, token_type_ids)
        h = self.encoder(h, keep)
        return h, (self.pooler(h) if self.add_pooling_layer else None)


# ------------------------------------------------------------------------------ heads


class _Transform(nn.Module):
    """``cls.predictions.transform``: dense, GELU (``transform_act_fn``), LayerNorm."""

    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(x.shape[-1], kernel_init=_INIT, name="dense")(x)
        h = T.GELU(name="transform_act_fn")(h)
        return T.LayerNorm(self.eps, name="LayerNorm")(h)


class _Predictions(nn.Module):
    """``cls.predictions``: transform, then the decoder tied to the word embeddings plus ``bias`` (vocab,)."""

    vocab_size: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        h = _Transform(self.eps, name="transform")(x)
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
        logits = jnp.einsum("ntd,vd->ntv", h, embedding.astype(h.dtype), precision=jax.lax.Precision.HIGHEST)
        return logits + bias.astype(logits.dtype)


class _Cls(nn.Module):
    """``cls``: holds ``predictions``."""

    vocab_size: int
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        return _Predictions(self.vocab_size, self.eps, name="predictions")(x, embedding)


# ------------------------------------------------------------------------ the models


def _check_range(cls: str, what: str, values: Any, size: int, attr: str) -> None:
    """Refuse concrete ids outside ``[0, size)``: an embedding lookup past the table gives NaN rows
    in JAX (no error), which would become NaN logits and NaN maps. Traced ids cannot be checked."""
    if isinstance(values, jax.core.Tracer):
        return
    v = np.asarray(values)
    if v.size and (v.min() < 0 or v.max() >= size):
        bad = v[(v < 0) | (v >= size)]
        raise ValueError(
            f"{cls}: {what} must lie in [0, {attr}={size}); got {int(bad.flat[0])} ({bad.size} value(s) out of range); "
            "the tokenizer's vocabulary must match the model (Tokenizer.check_model)"
        )


class _BertBase(nn.Module):
    """Fields, checks, the call convention and the declared facts shared by both heads."""

    family: ClassVar[str] = "bert"
    num_prefix_tokens: ClassVar[int] = 0
    sequence_model: ClassVar[bool] = True
    _pooled: ClassVar[bool] = True

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    # --- declared facts

    @property
    def block_layers(self) -> tuple[str, ...]:
        """Names of the encoder blocks (their outputs are the tokens, (N, T, D))."""
        return tuple(f"bert.encoder.layer.{i}" for i in range(self.num_hidden_layers))

    @property
    def attention_layers(self) -> tuple[str, ...]:
        """Names of the softmax modules: the attention probabilities (N, heads, T, T) of each block, block 0 first."""
        return tuple(f"{b}.attention.self.attn" for b in self.block_layers)

    @property
    def cam_layer(self) -> str:
        """Default CAM layer: the input of the last block's attention, tokens (N, T, D).

        That is the output of the previous block's last LayerNorm,
        ``bert.encoder.layer.{L-2}.output.LayerNorm`` (``bert.embeddings.LayerNorm`` for a
        one-block model). BERT is post-norm, so there is no ``ln_1`` inside the last block as in
        the ViT; the reason is the same. The classifier reads only token 0 ([CLS], through the
        pooler), and after the last attention every other step of a block (output dense,
        residual add, LayerNorm, intermediate, output) acts on each token separately: the
        gradient of every logit with respect to the *other* tokens is exactly zero at the last
        block's output and anywhere after its attention mixing (Grad-CAM there is zero on every
        token but [CLS]). At the input of the last attention every real token still reaches
        [CLS] as a key and a value, so its gradient is not zero (padded tokens: exactly zero,
        their keys are masked). For the masked-LM model (whose logits read every token) the same
        layer is declared for uniformity.
        """
        if self.num_hidden_layers >= 2:
            return f"bert.encoder.layer.{self.num_hidden_layers - 2}.output.LayerNorm"
        return "bert.embeddings.LayerNorm"

    # --- the call convention

    def _bert(self) -> BertModel:
        return BertModel(
            self.vocab_size,
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.max_position_embeddings,
            self.type_vocab_size,
            self.layer_norm_eps,
            add_pooling_layer=self._pooled,
            name="bert",
        )

    def _check_config(self) -> None:
        cls = type(self).__name__
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{cls} {k} must be an int >= 1, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{cls} hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    def _text(self, key: str, given: Any) -> Any:
        if given is not None:
            return given
        if self.has_variable("text", key):
            return self.get_variable("text", key)
        return None

    def _prepare(self, inputs: Any, token_type_ids: Any, attention_mask: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(word embeddings (N, T, 1, D), token types (N|1, T), keep (N|1, 1, 1, T))`` with checks."""
        self._check_config()
        cls = type(self).__name__
        x = jnp.asarray(inputs)
        if jnp.issubdtype(x.dtype, jnp.integer):
            if x.ndim != 2:
                raise ValueError(f"{cls}: token ids must have shape (N, T), got {tuple(x.shape)}")
            _check_range(cls, "token ids", inputs, self.vocab_size, "vocab_size")
            x = self.embed_words(x)
        elif jnp.issubdtype(x.dtype, jnp.floating):
            if x.ndim != 4 or x.shape[2] != 1 or x.shape[3] != self.hidden_size:
                raise ValueError(
                    f"{cls}: float inputs are word embeddings in the explanation view (N, T, 1, hidden_size="
                    f"{self.hidden_size}), got shape {tuple(x.shape)}; pass int token ids (N, T) or "
                    "model.apply(variables, ids, method='embed_words')"
                )
        else:
            raise TypeError(
                f"{cls}: inputs must be int token ids (N, T) or float word embeddings (N, T, 1, D), got dtype {x.dtype}"
            )
        n, t = x.shape[0], x.shape[1]
        if t > self.max_position_embeddings:
            raise ValueError(
                f"{cls}: sequence of {t} tokens is longer than max_position_embeddings={self.max_position_embeddings}; "
                "truncate the text (the tokenizer's max_length)"
            )
        types = self._aux("token_type_ids", self._text("token_type_ids", token_type_ids), n, t)
        mask = self._aux("attention_mask", self._text("attention_mask", attention_mask), n, t)
        if token_type_ids is not None:  # the argument as given (concrete unless traced by the caller)
            _check_range(cls, "token_type_ids", token_type_ids, self.type_vocab_size, "type_vocab_size")
        types = jnp.zeros((1, t), jnp.int32) if types is None else types.astype(jnp.int32)
        if mask is None:
            keep = jnp.ones((1, 1, 1, t), x.dtype)
        else:
            keep = (mask != 0).astype(x.dtype)[:, None, None, :]
        return x, types, keep

    @staticmethod
    def _aux(what: str, a: Any, n: int, t: int) -> jax.Array | None:
        if a is None:
            return None
        a = jnp.asarray(a)
        if not (jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_):
            raise TypeError(f"{what} must be an int or bool array (N, T), got dtype {a.dtype}")
        if a.ndim != 2 or a.shape[1] != t or a.shape[0] not in (1, n):
            raise ValueError(
                f"{what} must have shape ({n}, {t}) or (1, {t}) for inputs of {n} sequences of {t} tokens, got {tuple(a.shape)}"
            )
        return a


class BertForSequenceClassification(_BertBase):
    """BERT with Hugging Face's sequence-classification head (``bert`` + pooler, ``classifier``).

    Attributes: ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size`` (defaults: bert-base), ``max_position_embeddings`` (512),
    ``type_vocab_size`` (2), ``layer_norm_eps`` (1e-12), ``num_labels`` (3: NLI).

    ``__call__(inputs, token_type_ids=None, attention_mask=None)`` -> logits (N, num_labels); see
    the module docstring for the inputs. ``embed_words(ids)`` -> (N, T, 1, D).
    """

    num_labels: int = 3

    def setup(self) -> None:
        self.bert = self._bert()
        self.classifier = nn.Dense(self.num_labels, kernel_init=_INIT)

    def embed_words(self, ids: jax.Array) -> jax.Array:
        """Word embeddings of int ids (N, T) in the explanation view (N, T, 1, D)."""
        return self.bert.embed_words(ids)

    def __call__(
        self, inputs: jax.Array, token_type_ids: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, (int, np.integer)) or self.num_labels < 1:
            raise ValueError(f"BertForSequenceClassification num_labels must be an int >= 1, got {self.num_labels!r}")
        x, types, keep = self._prepare(inputs, token_type_ids, attention_mask)
        _, pooled = self.bert(x, types, keep)
        return self.classifier(pooled)


class BertForMaskedLM(_BertBase):
    """BERT with Hugging Face's masked-LM head (``bert`` without pooler, ``cls.predictions``).

    Attributes as :class:`BertForSequenceClassification` without ``num_labels``.
    ``__call__(inputs, token_type_ids=None, attention_mask=None)`` -> logits (N, T, vocab_size):
    ``transform(h) @ word_embeddings^T + cls.predictions.bias`` (decoder tied to the word
    embeddings, as Hugging Face's ``tie_word_embeddings=True``).
    """

    _pooled: ClassVar[bool] = False

    def setup(self) -> None:
        self.bert = self._bert()
        self.cls = _Cls(self.vocab_size, self.layer_norm_eps)

    def embed_words(self, ids: jax.Array) -> jax.Array:
        """Word embeddings of int ids (N, T) in the explanation view (N, T, 1, D)."""
        return self.bert.embed_words(ids)

    def __call__(
        self, inputs: jax.Array, token_type_ids: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        x, types, keep = self._prepare(inputs, token_type_ids, attention_mask)
        h, _ = self.bert(x, types, keep)
        return self.cls(h, self.bert.embeddings.word_embeddings.embedding)


_CLASSES = {"classification": BertForSequenceClassification, "mlm": BertForMaskedLM}


def build(name: str, task: str = "classification", **overrides: Any) -> BertForSequenceClassification | BertForMaskedLM:
    """The model of configuration ``name`` (:data:`CONFIGS`) for ``task`` (``"classification"``
    or ``"mlm"``); ``overrides`` replace fields (``num_labels``, ``vocab_size``, ...)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown BERT configuration {name!r}; known: {', '.join(CONFIGS)}")
    if task not in _CLASSES:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cls = _CLASSES[task]
    if task == "mlm" and "num_labels" in overrides:
        raise ValueError("num_labels applies to task='classification' only")
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown BERT field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
    return cls(**{**CONFIGS[name], **overrides})
