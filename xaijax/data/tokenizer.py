"""BERT WordPiece tokenisation from a ``vocab.txt``, through the ``tokenizers`` package.

* :class:`Tokenizer` -- ``Tokenizer.from_vocab("vocab.txt")`` builds the ``tokenizers``
  package's WordPiece model (``tokenizers.models.WordPiece``) with BERT's normaliser
  (``BertNormalizer``: control characters removed, CJK characters split, lower-casing and accent
  stripping when ``lowercase=True``), BERT's pre-tokeniser (whitespace and punctuation split,
  ``BertPreTokenizer``), the ``[CLS] A [SEP] B [SEP]`` template and the WordPiece decoder -- the
  pipeline of Hugging Face's ``BertTokenizerFast`` for an uncased model. No WordPiece code lives
  here.
* :meth:`Tokenizer.encode_pairs` -- premises (and optional hypotheses) -> :class:`TokenBatch`,
  padded to the longest sequence of the batch.
* :func:`write_vocab` -- a word list -> a ``vocab.txt`` with the special tokens first.

A ``vocab.txt`` is a UTF-8 text file with one wordpiece per line; the line number (from 0) is the
token id. Continuation pieces start with ``##`` (``play`` + ``##ing`` = "playing"). It must hold
``[PAD]``, ``[UNK]``, ``[CLS]`` and ``[SEP]`` (``[MASK]`` is needed only for masked-LM use), each
line at most once.

Unknown words: a word (after normalisation and pre-tokenisation) that cannot be split into
pieces of the vocabulary -- or that is longer than 100 characters -- becomes one ``[UNK]`` token,
as in BERT. Nothing is raised for it; :meth:`Tokenizer.unknown_words` lists such words so a
caller can check a corpus against the vocabulary. Special tokens written in the text
(``"the [MASK] works"``) are kept as one token, as Hugging Face's BERT tokenisers do.

Too long: a sequence with more than ``max_length`` tokens (specials included) is refused
(``truncation="error"``, a :class:`ValueError` naming each sentence's index and length), or
truncated ``"longest_first"`` (a token at a time from the end of the longer of the two texts,
the ``tokenizers`` package's strategy) with a :class:`UserWarning` naming the sentences
(``truncation="warn"``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xaijax.atomic import atomic_text

__all__ = ["SPECIAL_TOKENS", "TokenBatch", "Tokenizer", "write_vocab", "read_vocab"]

#: The special tokens in the order :func:`write_vocab` writes them: ``[PAD]`` = 0, ``[UNK]`` = 1,
#: ``[CLS]`` = 2, ``[SEP]`` = 3, ``[MASK]`` = 4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_REQUIRED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: longer words become [UNK]

_VOCAB_HELP = (
    "a BERT vocab.txt is a UTF-8 text file with one wordpiece per line (the line number from 0 is the "
    "token id, continuation pieces start with '##') holding [PAD], [UNK], [CLS] and [SEP]; "
    "xaijax.data.tokenizer.write_vocab(words, path) writes one"
)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenBatch:
    """A tokenised batch of N sentences (or sentence pairs), padded to the longest, T tokens.

    Attributes:
      input_ids: (N, T) int32 token ids; padding is ``[PAD]`` (id 0 in a vocabulary written by
        :func:`write_vocab`).
      token_type_ids: (N, T) int32 segment ids: 0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``, 0 on
        padding.
      attention_mask: (N, T) int32, 1 on real tokens, 0 on padding.
      tokens: per sentence the wordpiece strings of its real tokens, specials included:
        ``tokens[i] == ("[CLS]", "the", ..., "[SEP]")`` is ``input_ids[i, :lengths[i]]`` in words.

    The arrays are read-only (copy them to edit). Equality is identity (``eq=False``: arrays
    have no single truth value).
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("input_ids", "token_type_ids", "attention_mask"):
            a = np.array(getattr(self, name), dtype=np.int32, copy=True)
            if a.ndim != 2:
                raise ValueError(f"TokenBatch.{name} must be (N, T); got shape {a.shape}")
            a.setflags(write=False)
            arrays[name] = a
        shapes = {n: a.shape for n, a in arrays.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"TokenBatch arrays must share one (N, T) shape; got {shapes}")
        tokens = tuple(tuple(str(t) for t in s) for s in self.tokens)
        n = arrays["input_ids"].shape[0]
        if len(tokens) != n:
            raise ValueError(f"TokenBatch.tokens has {len(tokens)} sentences, the arrays {n}")
        lengths = arrays["attention_mask"].sum(axis=1)
        bad = [i for i in range(n) if len(tokens[i]) != lengths[i]]
        if bad:
            i = bad[0]
            raise ValueError(f"TokenBatch: sentence {i} has {len(tokens[i])} tokens but {lengths[i]} unmasked positions")
        for name, a in arrays.items():
            object.__setattr__(self, name, a)
        object.__setattr__(self, "tokens", tokens)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int32: real tokens per sentence (specials included)."""
        return self.attention_mask.sum(axis=1).astype(np.int32)

    def select(self, index: int | slice | Sequence[int]) -> TokenBatch:
        """The sub-batch of the given sentence(s), trimmed to its own longest sentence."""
        idx = np.atleast_1d(np.arange(len(self))[index])
        t = int(self.lengths[idx].max()) if idx.size else 0
        return TokenBatch(
            self.input_ids[idx, :t], self.token_type_ids[idx, :t], self.attention_mask[idx, :t], tuple(self.tokens[i] for i in idx)
        )


def read_vocab(path: str | os.PathLike) -> list[str]:
    """The wordpieces of a ``vocab.txt`` (or of the ``vocab.txt`` in a folder), in id order, checked.

    Raises:
      FileNotFoundError: no such file (the message says what a vocab.txt is).
      ValueError: the path is a folder, the file is not UTF-8 text or empty, a wordpiece appears
        twice, or a required special token is missing.
    """
    p = Path(path)
    if p.is_dir() and (p / "vocab.txt").is_file():  # a Hugging Face model folder
        p = p / "vocab.txt"
    elif p.is_dir():
        raise ValueError(f"vocabulary {p} is a folder without a vocab.txt; pass the vocabulary file ({_VOCAB_HELP})")
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {p} ({_VOCAB_HELP})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"vocabulary {p} is not UTF-8 text ({e.reason} at byte {e.start}); {_VOCAB_HELP}") from None
    words = [w.rstrip("\r") for w in text.split("\n")]
    if words and words[-1] == "":  # the final newline
        words.pop()
    if not words:
        raise ValueError(f"vocabulary {p} is empty; {_VOCAB_HELP}")
    seen: dict[str, int] = {}
    for i, w in enumerate(words):
        if w in seen:
            raise ValueError(f"vocabulary {p}: {w!r} is listed twice (lines {seen[w] + 1} and {i + 1}); each wordpiece once")
        seen[w] = i
    missing = [t for t in _REQUIRED if t not in seen]
    if missing:
        raise ValueError(f"vocabulary {p} lacks the special token(s) {', '.join(missing)}; {_VOCAB_HELP}")
    return words


def write_vocab(words: Iterable[str], path: str | os.PathLike) -> Path:
    """Write a BERT ``vocab.txt``: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0..4), then ``words``.

    Words are written as given (lower-case them for an uncased tokenizer), in order, duplicates
    and special tokens dropped; continuation pieces start with ``##``. The file is written
    atomically. Returns the path.

    Raises:
      TypeError: a word is not a string.
      ValueError: a word is empty or contains whitespace.
    """
    out: list[str] = list(SPECIAL_TOKENS)
    seen = set(out)
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"write_vocab: words must be strings; got {type(w).__name__} {w!r}")
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"write_vocab: a wordpiece is non-empty and has no whitespace; got {w!r}")
        if w not in seen:
            seen.add(w)
            out.append(w)
    path = Path(path)
    atomic_text(path, "\n".join(out) + "\n")
    return path


class Tokenizer:
    """BERT WordPiece tokenizer over the ``tokenizers`` package (see the module docstring).

    Build with :meth:`from_vocab`. ``max_length`` is the longest sequence (specials included)
    :meth:`encode_pairs` accepts by default: the model's ``max_position_embeddings`` (512 for
    BERT). Thread-safe for encoding (nothing is mutated after construction).
    """

    def __init__(self, backend: Any, vocab: Sequence[str], *, lowercase: bool, max_length: int, source: str = "") -> None:
        self._backend = backend
        self._vocab = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(self._vocab)}
        self.lowercase = bool(lowercase)
        self.max_length = int(max_length)
        self.source = source

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocab(cls, path: str | os.PathLike, lowercase: bool = True, max_length: int = 512) -> Tokenizer:
        """A tokenizer for the WordPiece vocabulary ``path`` (a ``vocab.txt``).

        Args:
          path: the vocabulary file (see :func:`read_vocab` for the format and its checks).
          lowercase: BERT "uncased" normalisation (lower-case, strip accents); ``False`` for cased
            vocabularies.
          max_length: default longest sequence for :meth:`encode_pairs` (specials included).
        """
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

        if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 ([CLS], one token, [SEP]); got {max_length!r}")
        words = read_vocab(path)
        if Path(path).is_dir():
            path = Path(path) / "vocab.txt"
        ids = {w: i for i, w in enumerate(words)}
        backend = _Backend(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=_MAX_WORD_CHARS))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=bool(lowercase)
        )  # strip_accents=None: stripped exactly when lower-casing, as BERT does
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        backend.add_special_tokens([t for t in SPECIAL_TOKENS if t in ids])  # kept whole in raw text
        if backend.get_vocab_size() != len(words):  # add_special_tokens must not have grown it
            raise AssertionError("special tokens were added to the vocabulary")
        return cls(backend, words, lowercase=lowercase, max_length=int(max_length), source=os.fspath(path))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, lowercase={self.lowercase}, max_length={self.max_length})"

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> tuple[str, ...]:
        """The wordpieces in id order."""
        return self._vocab

    def token_to_id(self, token: str) -> int:
        """Id of a wordpiece; ``ValueError`` if it is not in the vocabulary."""
        try:
            return self._ids[token]
        except KeyError:
            raise ValueError(f"{token!r} is not in the vocabulary {self.source}") from None

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._vocab[int(i)]

    @property
    def pad_id(self) -> int:
        return self._ids["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self._ids["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self._ids["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._ids["[SEP]"]

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]``; ``ValueError`` if the vocabulary has none."""
        return self.token_to_id("[MASK]")

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model`` (a zoo BERT) cannot take this tokenizer's output:
        more wordpieces than the model's ``vocab_size`` embedding rows, or a ``max_length`` above
        its ``max_position_embeddings``."""
        rows = getattr(model, "vocab_size", None)
        if rows is not None and self.vocab_size > rows:
            raise ValueError(
                f"the vocabulary {self.source} has {self.vocab_size} wordpieces but the model embeds only {rows} "
                "(vocab_size): they belong to different models"
            )
        positions = getattr(model, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(
                f"tokenizer max_length {self.max_length} exceeds the model's max_position_embeddings {positions}; "
                f"build it with Tokenizer.from_vocab(..., max_length={positions})"
            )

    # ------------------------------------------------------------------ text -> pieces
    def tokenize(self, text: str) -> list[str]:
        """The wordpieces of one text, without special tokens: ``"Playing"`` -> ``["play", "##ing"]``."""
        _check_text(text, "text")
        return list(self._backend.encode(text, add_special_tokens=False).tokens)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that become ``[UNK]`` (as written in ``text``, in order)."""
        _check_text(text, "text")
        enc = self._backend.encode(text, add_special_tokens=False)
        unk = self.unk_id
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk and text[a:b] != "[UNK]"]

    def encode_pairs(
        self,
        premises: str | Sequence[str],
        hypotheses: str | Sequence[str] | None = None,
        max_length: int | None = None,
        truncation: str = "error",
    ) -> TokenBatch:
        """Tokenise sentences (``[CLS] A [SEP]``) or pairs (``[CLS] A [SEP] B [SEP]``).

        Args:
          premises: N texts (a single string counts as one).
          hypotheses: None, or N second texts (token type 1).
          max_length: longest sequence allowed, specials included; default ``self.max_length``.
          truncation: ``"error"`` -- a longer sequence raises ``ValueError`` naming it;
            ``"warn"`` -- it is truncated longest-first to ``max_length`` with a ``UserWarning``.

        Returns:
          A :class:`TokenBatch` padded to its longest sequence.
        """
        prem = _texts(premises, "premises")
        hyp = None if hypotheses is None else _texts(hypotheses, "hypotheses")
        if hyp is not None and len(hyp) != len(prem):
            raise ValueError(f"hypotheses has {len(hyp)} texts but premises has {len(prem)}; pass one hypothesis per premise")
        if truncation not in ("error", "warn"):
            raise ValueError(f"truncation must be 'error' or 'warn'; got {truncation!r}")
        if max_length is None:
            max_length = self.max_length
        n_special = 2 if hyp is None else 3
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < n_special + 1:
            raise ValueError(f"max_length must be an int >= {n_special + 1} (the special tokens and one more); got {max_length!r}")
        max_length = int(max_length)
        inputs = prem if hyp is None else list(zip(prem, hyp))
        encs = self._backend.encode_batch(inputs)
        long = [(i, len(e.ids)) for i, e in enumerate(encs) if len(e.ids) > max_length]
        if long:
            shown = ", ".join(f"sentence {i} has {n} tokens" for i, n in long[:8]) + (f" ... ({len(long)} in all)" if len(long) > 8 else "")
            if truncation == "error":
                raise ValueError(
                    f"{shown}; max_length is {max_length} (by default the tokenizer's, the model's position limit). Shorten the text, "
                    "or pass truncation='warn' to cut it longest-first"
                )
            warnings.warn(f"truncated to max_length={max_length} tokens (longest first): {shown}", UserWarning, stacklevel=2)
            from tokenizers import Tokenizer as _Backend

            cutter = _Backend.from_str(self._backend.to_str())  # a copy: self stays unmodified
            cutter.enable_truncation(max_length, strategy="longest_first")
            for i, _ in long:
                encs[i] = cutter.encode(*((inputs[i],) if hyp is None else inputs[i]))
        t = max(len(e.ids) for e in encs)
        n = len(encs)
        ids = np.full((n, t), self.pad_id, np.int32)
        types = np.zeros((n, t), np.int32)
        mask = np.zeros((n, t), np.int32)
        for i, e in enumerate(encs):
            k = len(e.ids)
            ids[i, :k] = e.ids
            types[i, :k] = e.type_ids
            mask[i, :k] = 1
        return TokenBatch(ids, types, mask, tuple(tuple(e.tokens) for e in encs))

    # ------------------------------------------------------------------ ids -> text
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str | list[str]:
        """Text of token ids: a 1-D sequence -> a string, a 2-D array -> one string per row.

        Pieces are joined (``play ##ing`` -> ``playing``), spaces before punctuation removed;
        with ``skip_special_tokens`` (default) ``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]`` and
        ``[UNK]`` are dropped (as Hugging Face's ``decode`` does). An uncased tokenizer gives
        lower-cased text without accents.
        """
        arr = np.asarray(ids)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer) and arr.size:
            raise ValueError(f"decode takes a 1-D or 2-D array of int token ids; got shape {arr.shape}, dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}; got {arr.min()}..{arr.max()}")
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        return self._backend.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)


def _check_text(text: Any, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string; got {type(text).__name__}")


def _texts(x: Any, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, np.ndarray) and x.ndim == 1:
        x = x.tolist()
    if isinstance(x, (bytes, np.ndarray)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a string or a sequence of strings; got {type(x).__name__}")
    out = list(x)
    if not out:
        raise ValueError(f"{name} is empty; pass at least one text")
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}] must be a string; got {type(s).__name__}")
    return out
