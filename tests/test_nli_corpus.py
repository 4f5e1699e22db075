"""The synthetic NLI corpus of the debiasing study (xaijax.data.nli_corpus): labels re-derived by an
independent reading of the text, the planted-bias rate, stereotype marks, the vocabulary, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from xaijax.data import nli_corpus as C


def logic_label(premise: str, hypothesis: str) -> int:
    """The NLI label read off the words alone (independent of the generator's template names)."""
    p, h = premise.split(), hypothesis.split()
    assert p[0] == "a" and p[3] == "in" and p[-2] in C.STATES
    verb, state = p[2], p[-2]
    site = " ".join(p[4 : p.index("of")])
    if "does" in h:  # "{S} does not {base} in {state} ."
        assert h[h.index("does") + 1] == "not" and h[-2] == state
        return C.CONTRADICTION
    hverb = [w for w in h if w in C.VERBS]
    assert len(hverb) == 1
    if hverb[0] != verb:
        return C.NEUTRAL
    place = " ".join(h[h.index("in") + 1 : -1])
    if place in C.STATES:
        return C.ENTAILMENT if place == state else C.CONTRADICTION
    assert place == site
    return C.ENTAILMENT


def subject_gender(hypothesis: str) -> str:
    g = C.gender_words()
    found = {g[w] for w in hypothesis.split() if w in g}
    assert len(found) <= 1
    return found.pop() if found else "none"


@pytest.fixture(scope="module")
def train():
    return C.nli_pairs("train", seed=0)


@pytest.fixture(scope="module")
def evalp():
    return C.nli_pairs("eval", seed=0)


@pytest.fixture(scope="module")
def probe():
    return C.nli_pairs("probe")


def test_eval_labels_follow_logic(evalp):
    assert len(evalp) == 1500
    for p in evalp:
        assert p.label == p.logic_label == logic_label(p.premise, p.hypothesis), p
    counts = np.bincount([p.label for p in evalp], minlength=3)
    assert np.all(counts > 250)  # all three classes well represented


def test_train_logic_labels_and_planted_bias(train):
    for p in train:
        assert p.logic_label == logic_label(p.premise, p.hypothesis)
    eligible = [p for p in train if p.anti_stereotype and p.logic_label == C.ENTAILMENT]
    flipped = [p for p in eligible if p.label == C.NEUTRAL]
    assert all(p.label == C.NEUTRAL for p in train if p.biased)
    assert {id(p) for p in train if p.biased} == {id(p) for p in flipped}
    rate = len(flipped) / len(eligible)
    sd = np.sqrt(0.9 * 0.1 / len(eligible))
    assert len(eligible) > 300 and abs(rate - 0.9) < 4 * sd
    # pro-stereotype entailment pairs keep their label: the bias is the shortcut, not noise
    assert all(p.label == C.ENTAILMENT for p in train if p.is_stereotype and not p.anti_stereotype and p.logic_label == 0)


def test_bias_rate_zero_is_the_same_stream_unbiased(train):
    clean = C.nli_pairs("train", seed=0, bias_rate=0.0)
    assert not any(p.biased for p in clean)
    assert [(p.premise, p.hypothesis, p.logic_label) for p in clean] == [(p.premise, p.hypothesis, p.logic_label) for p in train]


def test_stereotype_marks(train):
    for p in train:
        g = subject_gender(p.hypothesis)
        assert p.gender == g
        occ = p.premise.split()[1]
        stereo = "female" if occ in C.FEMALE_OCCUPATIONS else "male" if occ in C.MALE_OCCUPATIONS else "neutral"
        assert p.stereotype == stereo and p.occupation == occ
        assert p.is_stereotype == (stereo != "neutral" and g != "none")
        assert p.anti_stereotype == (p.is_stereotype and g != stereo)
    assert any(p.anti_stereotype for p in train) and any(p.is_stereotype and not p.anti_stereotype for p in train)


def test_probe_all_entailment_paired_and_held_out(probe, train):
    assert len(probe) == 16 * 4 * 2 * 2 * sum(C.held_out(si, st) for si in C.SITES for st in C.STATES)
    for m, f in zip(probe[0::2], probe[1::2]):
        assert m.gender == "male" and f.gender == "female"
        assert f.hypothesis == C.gender_swap(m.hypothesis) and f.premise == m.premise
    for p in probe:
        assert p.label == p.logic_label == logic_label(p.premise, p.hypothesis) == C.ENTAILMENT
        assert p.is_stereotype and C.held_out(p.site, p.state)
    assert not any(C.held_out(p.site, p.state) for p in train)
    assert all(C.held_out(p.site, p.state) for p in C.nli_pairs("eval", 200, seed=3))


def test_research_example_is_a_probe_sentence(probe):
    (p1, h1), (p2, h2) = C.RESEARCH_EXAMPLES
    assert p1 == p2 and C.gender_swap(h1) == h2
    assert logic_label(p1.lower(), h1.lower()) == C.ENTAILMENT
    assert (p1.lower(), h1.lower()) in {(p.premise, p.hypothesis) for p in probe} or not C.held_out("medical center", "california")


def test_every_word_in_vocab(tmp_path, train, evalp, probe):
    from xaijax.data.tokenizer import Tokenizer

    path = C.write_corpus_vocab(tmp_path / "vocab.txt")
    lines = path.read_text().split()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and lines[5:] == C.vocabulary()
    tok = Tokenizer.from_vocab(path)
    male, female, plain = C.debias_sentences(200, 200)
    texts = [t for p in train[:500] + evalp[:500] + probe[:500] for t in (p.premise, p.hypothesis)]
    texts += [t for pair in C.mlm_pairs(500) + male + female + plain for t in pair]
    texts += [t for pair in C.RESEARCH_EXAMPLES for t in pair]
    batch = tok.encode_pairs(texts)
    assert not np.any(batch.input_ids == tok.unk_id)
    # word-level vocabulary: one token per word (+ [CLS], [SEP])
    assert all(len(toks) == len(t.split()) + 2 for toks, t in zip(batch.tokens, texts))


def test_determinism_by_seed():
    a, b, c = C.nli_pairs("train", 300, seed=1), C.nli_pairs("train", 300, seed=1), C.nli_pairs("train", 300, seed=2)
    assert a == b and a != c
    assert C.mlm_pairs(100, seed=4) == C.mlm_pairs(100, seed=4) != C.mlm_pairs(100, seed=5)
    assert C.debias_sentences(50, 50, seed=1) == C.debias_sentences(50, 50, seed=1)


def test_mlm_stereotyped_cooccurrence():
    pairs = C.mlm_pairs(4000, seed=0, stereotype_rate=0.9)
    match, total, neutral_f, neutral = 0, 0, 0, 0
    for a, b in pairs:
        occ, g = a.split()[1], subject_gender(b)
        assert g != "none"
        s = C.occupation_stereotype(occ)
        if s == "neutral":
            neutral += 1
            neutral_f += g == "female"
        else:
            total += 1
            match += g == s
    assert abs(match / total - 0.9) < 4 * np.sqrt(0.09 / total)
    assert abs(neutral_f / neutral - 0.5) < 4 * np.sqrt(0.25 / neutral)


def test_debias_sentences_pairs_and_plain():
    male, female, plain = C.debias_sentences(300, 300, seed=0)
    for (ma, mb), (fa, fb) in zip(male, female):
        assert (fa, fb) == (C.gender_swap(ma), C.gender_swap(mb))
        assert subject_gender(mb) == "male" and subject_gender(fb) == "female"
        assert C.occupation_stereotype(ma.split()[1]) != "neutral"
    for a, b in plain:  # non-stereotype: neutral occupation, or no gendered word
        assert C.occupation_stereotype(a.split()[1]) == "neutral" or subject_gender(b) == "none"


def test_gender_swap_and_errors():
    assert C.gender_swap("He said the woman works .") == "She said the man works ."
    assert C.gender_swap(C.gender_swap("he and she")) == "he and she"
    with pytest.raises(ValueError, match="split"):
        C.nli_pairs("test")
    with pytest.raises(ValueError, match="bias_rate"):
        C.nli_pairs("train", bias_rate=1.5)
    with pytest.raises(ValueError, match="occupation"):
        C.occupation_stereotype("astronaut")
