"""xaijax.data.tokenizer: BERT WordPiece through the `tokenizers` package, checked against a
hand-written greedy longest-match-first WordPiece (BERT's algorithm) on a small vocabulary."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from xaijax.data.tokenizer import SPECIAL_TOKENS, TokenBatch, Tokenizer, read_vocab, write_vocab

WORDS = [
    "a", "the", "nurse", "works", "in", "of", "medical", "center", "california", "he", "she", ".", ",", "'", "s",
    "play", "##ing", "##s", "un", "##play", "##able", "hello", "world", "cafe", "doctor", "is", "good",
]  # fmt: skip


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    return write_vocab(WORDS, tmp_path_factory.mktemp("tok") / "vocab.txt")


@pytest.fixture(scope="module")
def tok(vocab_path):
    return Tokenizer.from_vocab(vocab_path)


def _wordpiece(word: str, vocab: set[str]) -> list[str]:
    """BERT's greedy longest-match-first split of one (normalised) word, written out."""
    out, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                out.append(piece)
                break
            end -= 1
        else:
            return ["[UNK]"]
        start = end
    return out


def test_write_vocab_layout(vocab_path):
    lines = vocab_path.read_text().splitlines()
    assert tuple(lines[:5]) == SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert lines[5:] == WORDS
    assert read_vocab(vocab_path) == lines


@pytest.mark.parametrize("word", ["playing", "plays", "unplayable", "unplays", "play", "playingx", "xyz", "cafe", "california"])
def test_wordpiece_split_matches_hand_computation(tok, word):
    assert tok.tokenize(word) == _wordpiece(word, set(WORDS))


def test_hand_computed_splits(tok):
    assert tok.tokenize("Playing") == ["play", "##ing"]
    assert tok.tokenize("unplayable") == ["un", "##play", "##able"]
    assert tok.tokenize("playingx") == ["[UNK]"]  # one missing piece makes the whole word unknown
    # BERT normalisation: lower case, accents stripped, punctuation split off
    assert tok.tokenize("The nurse's CAFÉ, hello.") == ["the", "nurse", "'", "s", "cafe", ",", "hello", "."]


def test_pair_layout_and_token_types(tok):
    b = tok.encode_pairs(["A nurse works in medical center of California ."], ["He works in California ."])
    assert b.tokens[0] == (
        "[CLS]", "a", "nurse", "works", "in", "medical", "center", "of", "california", ".", "[SEP]",
        "he", "works", "in", "california", ".", "[SEP]",
    )  # fmt: skip
    ids = [tok.token_to_id(t) for t in b.tokens[0]]
    np.testing.assert_array_equal(b.input_ids[0], ids)
    assert b.input_ids[0, 0] == tok.cls_id == 2 and b.input_ids[0, 10] == b.input_ids[0, -1] == tok.sep_id == 3
    np.testing.assert_array_equal(b.token_type_ids[0], [0] * 11 + [1] * 6)
    np.testing.assert_array_equal(b.attention_mask, np.ones((1, 17)))
    for a in (b.input_ids, b.token_type_ids, b.attention_mask):
        assert a.dtype == np.int32 and not a.flags.writeable


def test_single_sentences_padding(tok):
    b = tok.encode_pairs(["the nurse works", "hello", ""])
    assert isinstance(b, TokenBatch) and len(b) == 3
    assert b.input_ids.shape == (3, 5)
    np.testing.assert_array_equal(b.lengths, [5, 3, 2])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b.input_ids[1], [2, tok.token_to_id("hello"), 3, 0, 0])
    assert np.all(b.input_ids[b.attention_mask == 0] == tok.pad_id)
    assert np.all(b.token_type_ids == 0)
    assert b.tokens[2] == ("[CLS]", "[SEP]")
    sub = b.select([1, 2])
    assert sub.input_ids.shape == (2, 3) and sub.tokens == b.tokens[1:]


def test_pairs_padding_token_types(tok):
    b = tok.encode_pairs(["the nurse works", "he"], ["she works", "the doctor is good"])
    np.testing.assert_array_equal(b.lengths, [8, 8])
    b = tok.encode_pairs(["the nurse works in california", "he"], ["she", "a"])
    # [CLS] the nurse works in california [SEP] she [SEP] = 9 tokens; [CLS] he [SEP] a [SEP] = 5
    np.testing.assert_array_equal(b.token_type_ids, [[0] * 7 + [1] * 2, [0, 0, 0, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask[1], [1] * 5 + [0] * 4)


def test_round_trip(tok):
    texts = ["The nurse works in medical center of California.", "She is playing, he is good.", "Hello world"]
    b = tok.encode_pairs(texts)
    assert tok.decode(b.input_ids) == [t.lower() for t in texts]
    assert tok.decode(b.input_ids[0, : b.lengths[0]], skip_special_tokens=False) == (
        "[CLS] the nurse works in medical center of california. [SEP]"
    )


def test_unknown_words(tok):
    text = "A surgeon works in Zürich, cafe"
    b = tok.encode_pairs(text)
    assert b.tokens[0] == ("[CLS]", "a", "[UNK]", "works", "in", "[UNK]", ",", "cafe", "[SEP]")
    assert b.input_ids[0, 2] == tok.unk_id == 1
    assert tok.unknown_words(text) == ["surgeon", "Zürich"]
    assert tok.unknown_words("the nurse") == []


def test_special_tokens_in_text_kept_whole(tok):
    assert tok.tokenize("the [MASK] works") == ["the", "[MASK]", "works"]
    assert tok.encode_pairs("the [MASK] works").input_ids[0, 2] == tok.mask_id == 4


def test_cased(vocab_path):
    cased = Tokenizer.from_vocab(vocab_path, lowercase=False)
    assert cased.tokenize("Hello hello") == ["[UNK]", "hello"]


def test_max_length_error_names_sentence(tok):
    with pytest.raises(ValueError, match=r"sentence 1 has 7 tokens.*max_length is 5"):
        tok.encode_pairs(["the nurse", "the nurse works in california"], max_length=5)
    short = Tokenizer.from_vocab(tok.source, max_length=4)
    with pytest.raises(ValueError, match=r"sentence 0 has 5 tokens"):
        short.encode_pairs("he works in")
    assert short.encode_pairs("he works").input_ids.shape == (1, 4)


def test_max_length_warn_truncates_longest_first(tok):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = tok.encode_pairs(["the nurse works in california", "he"], ["she works", "she"], max_length=8, truncation="warn")
    assert len(w) == 1 and "sentence 0 has 10 tokens" in str(w[0].message) and "max_length=8" in str(w[0].message)
    # 10 -> 8: two tokens cut from the end of the longer (first) text
    assert b.tokens[0] == ("[CLS]", "the", "nurse", "works", "[SEP]", "she", "works", "[SEP]")
    np.testing.assert_array_equal(b.token_type_ids[0], [0] * 5 + [1] * 3)
    assert b.tokens[1] == ("[CLS]", "he", "[SEP]", "she", "[SEP]")
    # the tokenizer itself is not left truncating
    assert tok.encode_pairs("the nurse works in california").input_ids.shape == (1, 7)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="hypotheses has 1 texts but premises has 2"):
        tok.encode_pairs(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="truncation must be"):
        tok.encode_pairs("a", truncation="cut")
    with pytest.raises(ValueError, match="premises is empty"):
        tok.encode_pairs([])
    with pytest.raises(TypeError, match=r"premises\[1\] must be a string"):
        tok.encode_pairs(["a", 3])
    with pytest.raises(ValueError, match="max_length must be an int >= 4"):
        tok.encode_pairs("a", "b", max_length=3)
    with pytest.raises(ValueError, match="outside|lie in"):
        tok.decode([0, 999])


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocabulary file not found: .*nope\.txt.*one wordpiece per line"):
        Tokenizer.from_vocab(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="is a folder without a vocab.txt"):
        Tokenizer.from_vocab(tmp_path)
    write_vocab(["word"], tmp_path / "vocab.txt")  # a Hugging Face model folder holds vocab.txt
    assert Tokenizer.from_vocab(tmp_path).tokenize("word") == ["word"]


def test_bad_vocab_files(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("the\nnurse\n[UNK]\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[PAD\], \[CLS\], \[SEP\]"):
        Tokenizer.from_vocab(p)
    p.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nthe\n")
    with pytest.raises(ValueError, match=r"'the' is listed twice \(lines 5 and 6\)"):
        Tokenizer.from_vocab(p)
    p.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        Tokenizer.from_vocab(p)
    p.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer.from_vocab(p)
    with pytest.raises(ValueError, match="whitespace"):
        write_vocab(["two words"], tmp_path / "v2.txt")


def test_token_batch_validation():
    z = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="share one"):
        TokenBatch(z, z[:, :2], z, ((), ()))
    with pytest.raises(ValueError, match="sentence 0 has 1 tokens but 0"):
        TokenBatch(z, z, z, (("a",), ()))


def test_check_model(tok):
    from xaijax.models import bert

    Tokenizer.from_vocab(tok.source, max_length=32).check_model(bert.build("test-tiny"))  # 64 rows >= 32 pieces
    with pytest.raises(ValueError, match="has 32 wordpieces but the model embeds only 16"):
        tok.check_model(bert.build("test-tiny", vocab_size=16))
    with pytest.raises(ValueError, match=r"max_length 512 exceeds the model's max_position_embeddings 32.*max_length=32"):
        tok.check_model(bert.build("test-tiny"))
