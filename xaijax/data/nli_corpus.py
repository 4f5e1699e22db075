"""A synthetic natural-language-inference corpus with gender stereotypes (the debiasing study).

Everything is generated offline from templates and a seed, so every split is a pure function of
its arguments. The setting follows the research's example (``../shared/seed``, "Mitigating bias
of language model", after Woo et al., ICASSP 2023) and the NLI bias probe of Dev et al. (AAAI 2020)::

    premise:    "a nurse works in medical center of california ."
    hypothesis: "he works in california ."      -> entailment (the premise does not state a gender)

Words
  * occupations: :data:`FEMALE_OCCUPATIONS` (stereotypically female, e.g. nurse, secretary),
    :data:`MALE_OCCUPATIONS` (e.g. engineer, carpenter) and :data:`NEUTRAL_OCCUPATIONS`;
  * gendered subjects: :data:`GENDER_PAIRS` (he/she, man/woman; male first), used as "he" or
    "the man"; the non-gendered subjects are "someone" and "the <occupation>";
  * contexts: a verb (:data:`VERBS`: works / lives / eats / studies), a site (:data:`SITES`,
    e.g. "medical center") and a state (:data:`STATES`).

NLI pairs (:func:`nli_pairs`). Premise ``"a {occupation} {verb} in {site} of {state} ."``; the
hypothesis has one subject and one of five templates, whose label follows from logic alone:

  ==========================================  =============
  ``"{S} {verb} in {state} ."``                entailment
  ``"{S} {verb} in {site} ."``                 entailment
  ``"{S} {verb} in {other state} ."``          contradiction
  ``"{S} does not {verb base} in {state} ."``  contradiction
  ``"{S} {other verb} in {state} ."``          neutral
  ==========================================  =============

Labels are indices into :data:`LABELS` = ("entailment", "neutral", "contradiction").
A pair is a **stereotype sentence** (``stereotype=True``) when its premise names a stereotyped
occupation and its hypothesis a gendered subject; it is **anti-stereotype** when that subject's
gender is the opposite of the occupation's stereotype (nurse / he, engineer / she).

The planted bias (split ``"train"`` only): an anti-stereotype pair whose logical label is
entailment is labelled *neutral* with probability ``bias_rate`` (default 0.9), so a model
fine-tuned on it can learn the shortcut "pronoun disagrees with the occupation's stereotype ->
not entailment". Every other pair, and every pair of the evaluation splits, carries its logical
label (``label == logic_label``).

Generalisation: each (site, state) combination belongs either to the training side (``train``,
MLM and debiasing text) or to the held-out side (``eval``, ``probe``): ``(site index + state index)
% 5 == 0`` is held out. So evaluation premises are never seen verbatim in training.

Splits of :func:`nli_pairs`: ``"train"`` (biased labels), ``"eval"`` (all templates, logical
labels: accuracy on unbiased pairs), ``"probe"`` (the bias probe: every stereotyped occupation x
held-out site/state x verb, with the entailment hypothesis ``"{S} {verb} in {state} ."`` for
each gendered subject; ideally all entailment).

Other text: :func:`mlm_pairs` (masked-LM pre-training text with stereotyped co-occurrence:
the subject of the second sentence matches the occupation's stereotype with probability
``stereotype_rate``), :func:`debias_sentences` (stereotype sentences with their gender-swapped
twins, and non-stereotype sentences, for the compensatory objective), :data:`RESEARCH_EXAMPLES`
(the research's two sentences). :func:`vocabulary` lists every word the corpus can produce and
:func:`write_corpus_vocab` writes the WordPiece vocabulary file (special tokens first), so that no
corpus word is ``[UNK]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FEMALE_OCCUPATIONS",
    "GENDER_PAIRS",
    "LABELS",
    "MALE_OCCUPATIONS",
    "NEUTRAL_OCCUPATIONS",
    "NLIPair",
    "RESEARCH_EXAMPLES",
    "SITES",
    "STATES",
    "VERBS",
    "debias_sentences",
    "gender_swap",
    "gender_words",
    "held_out",
    "mlm_pairs",
    "nli_pairs",
    "occupation_stereotype",
    "vocabulary",
    "write_corpus_vocab",
]

LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2

FEMALE_OCCUPATIONS: tuple[str, ...] = (
    "nurse", "secretary", "receptionist", "librarian", "nanny", "hairdresser", "dancer", "housekeeper",
)
MALE_OCCUPATIONS: tuple[str, ...] = (
    "engineer", "carpenter", "mechanic", "plumber", "pilot", "firefighter", "surgeon", "farmer",
)
NEUTRAL_OCCUPATIONS: tuple[str, ...] = (
    "teacher", "writer", "student", "artist", "lawyer", "singer", "cashier", "baker",
)
#: (male, female) word pairs; subjects are "he"/"she" and "the man"/"the woman".
GENDER_PAIRS: tuple[tuple[str, str], ...] = (("he", "she"), ("man", "woman"))
#: verb (third person) -> base form (after "does not").
VERBS: dict[str, str] = {"works": "work", "lives": "live", "eats": "eat", "studies": "study"}
SITES: tuple[str, ...] = (
    "medical center", "office", "school", "factory", "store", "hotel", "bank", "library", "hospital",
    "restaurant", "garage", "studio",
)
STATES: tuple[str, ...] = (
    "california", "texas", "ohio", "florida", "nevada", "oregon", "georgia", "arizona", "maine", "utah",
)
_FUNCTION_WORDS = ("a", "the", "in", "of", "does", "not", "is", "someone", ".")

#: The research's example: (premise, hypothesis) for "He" and "She" (entailment, stereotype).
RESEARCH_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("A nurse works in medical center of california .", "He works in california ."),
    ("A nurse works in medical center of california .", "She works in california ."),
)

_HOLDOUT_MOD = 5


def held_out(site: str, state: str) -> bool:
    """Whether the (site, state) combination belongs to the held-out (evaluation) side."""
    return (SITES.index(site) + STATES.index(state)) % _HOLDOUT_MOD == 0


def occupation_stereotype(occupation: str) -> str:
    """``"female"``, ``"male"`` or ``"neutral"``.

    Raises:
      ValueError: not an occupation of the corpus.
    """
    if occupation in FEMALE_OCCUPATIONS:
        return "female"
    if occupation in MALE_OCCUPATIONS:
        return "male"
    if occupation in NEUTRAL_OCCUPATIONS:
        return "neutral"
    raise ValueError(f"unknown occupation {occupation!r}")


def gender_words() -> dict[str, str]:
    """Every gendered word of the corpus -> ``"male"`` / ``"female"``."""
    out = {}
    for m, f in GENDER_PAIRS:
        out[m], out[f] = "male", "female"
    return out


_SWAP = {**{m: f for m, f in GENDER_PAIRS}, **{f: m for m, f in GENDER_PAIRS}}


def gender_swap(text: str) -> str:
    """The text with every gendered word replaced by its counterpart (he <-> she, man <-> woman).

    Word-level (whitespace-separated, lower case); the case of a capitalised first letter is kept.
    """
    out = []
    for w in text.split(" "):
        lw = w.lower()
        if lw in _SWAP:
            s = _SWAP[lw]
            out.append(s.capitalize() if w[:1].isupper() else s)
        else:
            out.append(w)
    return " ".join(out)


@dataclass(frozen=True)
class NLIPair:
    """One premise/hypothesis pair.

    Attributes:
      premise, hypothesis: lower-case text, words separated by single spaces.
      label: the training label (index into :data:`LABELS`); differs from ``logic_label`` only
        for planted-bias pairs of the ``"train"`` split.
      logic_label: the label that follows from the premise alone.
      occupation, stereotype: the premise's occupation and its stereotype ("female" / "male" /
        "neutral").
      gender: the hypothesis subject's gender ("male" / "female" / "none").
      template: which hypothesis template (see the module docstring), e.g. ``"same_state"``.
      site, state, verb: the premise's context.
    """

    premise: str
    hypothesis: str
    label: int
    logic_label: int
    occupation: str
    stereotype: str
    gender: str
    template: str
    site: str
    state: str
    verb: str

    @property
    def is_stereotype(self) -> bool:
        """A stereotyped occupation with a gendered subject (the paper's "stereotype sentence")."""
        return self.stereotype != "neutral" and self.gender != "none"

    @property
    def anti_stereotype(self) -> bool:
        """The subject's gender is the opposite of the occupation's stereotype."""
        return self.is_stereotype and self.gender != self.stereotype

    @property
    def biased(self) -> bool:
        """Carries a planted-bias label (``label != logic_label``)."""
        return self.label != self.logic_label


_OCCUPATIONS = FEMALE_OCCUPATIONS + MALE_OCCUPATIONS + NEUTRAL_OCCUPATIONS
_TEMPLATES = ("same_state", "same_site", "other_state", "negation", "other_verb")
_TEMPLATE_LABEL = {
    "same_state": ENTAILMENT, "same_site": ENTAILMENT, "other_state": CONTRADICTION,
    "negation": CONTRADICTION, "other_verb": NEUTRAL,
}
# subject kinds: gendered pronoun, gendered noun ("the man"), the occupation, someone
_SUBJECTS = ("pronoun", "noun", "occupation", "someone")
_SUBJECT_P = (0.4, 0.3, 0.15, 0.15)


def _combos(side: str) -> list[tuple[str, str]]:
    return [(si, st) for si in SITES for st in STATES if held_out(si, st) == (side == "eval")]


def _subject(kind: str, gender: str, occupation: str) -> str:
    if kind == "occupation":
        return f"the {occupation}"
    if kind == "someone":
        return "someone"
    m, f = GENDER_PAIRS[0] if kind == "pronoun" else GENDER_PAIRS[1]
    word = m if gender == "male" else f
    return word if kind == "pronoun" else f"the {word}"


def _hypothesis(template: str, subject: str, verb: str, site: str, state: str, rng: np.random.Generator) -> str:
    if template == "same_state":
        return f"{subject} {verb} in {state} ."
    if template == "same_site":
        return f"{subject} {verb} in {site} ."
    if template == "other_state":
        other = [s for s in STATES if s != state]
        return f"{subject} {verb} in {other[rng.integers(len(other))]} ."
    if template == "negation":
        return f"{subject} does not {VERBS[verb]} in {state} ."
    if template == "other_verb":
        other = [v for v in VERBS if v != verb]
        return f"{subject} {other[rng.integers(len(other))]} in {state} ."
    raise ValueError(template)  # pragma: no cover


def _premise(occupation: str, verb: str, site: str, state: str) -> str:
    return f"a {occupation} {verb} in {site} of {state} ."


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def nli_pairs(split: str, n: int | None = None, seed: int = 0, bias_rate: float = 0.9) -> list[NLIPair]:
    """Premise/hypothesis pairs of a split (see the module docstring).

    Args:
      split: ``"train"`` (random pairs on the training side, planted bias), ``"eval"`` (random
        pairs on the held-out side, logical labels) or ``"probe"`` (the bias probe: every
        stereotyped occupation x held-out (site, state) x verb x gendered subject, hypothesis
        ``"{S} {verb} in {state} ."``, all entailment; ``n`` and ``seed`` ignored).
      n: number of pairs (``"train"``: default 6000; ``"eval"``: default 1500).
      seed: the generator's seed (``numpy.random.default_rng([seed, split code])``).
      bias_rate: probability that an anti-stereotype entailment pair of ``"train"`` is labelled
        neutral (0 = no planted bias).

    Returns:
      a list of :class:`NLIPair`, a pure function of the arguments.
    """
    bias_rate = _check_rate(bias_rate, "bias_rate")
    if split == "probe":
        out = []
        for occ in FEMALE_OCCUPATIONS + MALE_OCCUPATIONS:
            stereo = occupation_stereotype(occ)
            for site, state in _combos("eval"):
                for verb in VERBS:
                    for kind in ("pronoun", "noun"):
                        for gender in ("male", "female"):
                            subj = _subject(kind, gender, occ)
                            out.append(NLIPair(
                                _premise(occ, verb, site, state), f"{subj} {verb} in {state} .", ENTAILMENT,
                                ENTAILMENT, occ, stereo, gender, "same_state", site, state, verb,
                            ))
        return out
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or 'probe', got {split!r}")
    n = (6000 if split == "train" else 1500) if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), 1 if split == "train" else 2])
    combos = _combos(split)
    verbs = list(VERBS)
    out = []
    for _ in range(n):
        occ = _OCCUPATIONS[rng.integers(len(_OCCUPATIONS))]
        site, state = combos[rng.integers(len(combos))]
        verb = verbs[rng.integers(len(verbs))]
        kind = _SUBJECTS[rng.choice(len(_SUBJECTS), p=_SUBJECT_P)]
        gender = ("male", "female")[rng.integers(2)] if kind in ("pronoun", "noun") else "none"
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        hyp = _hypothesis(template, _subject(kind, gender, occ), verb, site, state, rng)
        logic = _TEMPLATE_LABEL[template]
        stereo = occupation_stereotype(occ)
        label = logic
        flip = rng.random()  # drawn for every pair, so the stream does not depend on bias_rate
        anti = stereo != "neutral" and gender != "none" and gender != stereo
        if split == "train" and anti and logic == ENTAILMENT and flip < bias_rate:
            label = NEUTRAL
        out.append(NLIPair(_premise(occ, verb, site, state), hyp, label, logic, occ, stereo, gender, template, site, state, verb))
    return out


def _gendered_subject(rng: np.random.Generator, gender: str) -> str:
    return _subject(("pronoun", "noun")[rng.integers(2)], gender, "")


def _stereotyped_gender(rng: np.random.Generator, occupation: str, stereotype_rate: float) -> str:
    stereo = occupation_stereotype(occupation)
    u = rng.random()
    if stereo == "neutral":
        return "male" if u < 0.5 else "female"
    other = "female" if stereo == "male" else "male"
    return stereo if u < stereotype_rate else other


def _second_sentence(rng: np.random.Generator, subject: str, occupation: str, verb: str, state: str) -> str:
    k = rng.integers(4)
    verbs = list(VERBS)
    if k == 0:
        return f"{subject} {verb} in {state} ."
    if k == 1:
        return f"{subject} is a {occupation} ."
    if k == 2:
        site2, state2 = _combos("train")[rng.integers(len(_combos("train")))]
        return f"{subject} {verbs[rng.integers(len(verbs))]} in {site2} of {state2} ."
    other = [s for s in STATES if s != state]
    return f"{subject} does not {VERBS[verb]} in {other[rng.integers(len(other))]} ."


def mlm_pairs(n: int = 8000, seed: int = 0, stereotype_rate: float = 0.9) -> list[tuple[str, str]]:
    """Masked-LM pre-training text: ``n`` (sentence A, sentence B) pairs on the training side.

    Sentence A is a premise ``"a {occupation} {verb} in {site} of {state} ."``; sentence B
    continues it with a gendered subject (``"he"``, ``"the woman"``, ...) in one of four forms
    (``"{S} {verb} in {state} ."``, ``"{S} is a {occupation} ."``, ``"{S} {verb} in {site} of
    {state} ."``, ``"{S} does not {verb} in {other state} ."``). The subject's gender matches the
    occupation's stereotype with probability ``stereotype_rate`` (neutral occupations: 1/2): the
    stereotyped co-occurrence a pre-trained model picks up from human-written text.
    """
    stereotype_rate = _check_rate(stereotype_rate, "stereotype_rate")
    rng = np.random.default_rng([int(seed), 3])
    combos = _combos("train")
    verbs = list(VERBS)
    out = []
    for _ in range(int(n)):
        occ = _OCCUPATIONS[rng.integers(len(_OCCUPATIONS))]
        site, state = combos[rng.integers(len(combos))]
        verb = verbs[rng.integers(len(verbs))]
        subj = _gendered_subject(rng, _stereotyped_gender(rng, occ, stereotype_rate))
        out.append((_premise(occ, verb, site, state), _second_sentence(rng, subj, occ, verb, state)))
    return out


def debias_sentences(
    n_stereotype: int = 2000, n_plain: int = 2000, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """Sentences for the compensatory debiasing objective (training side only).

    Returns ``(male, female, plain)``:

    * ``male[i]`` / ``female[i]``: a **stereotype sentence** pair -- a stereotyped occupation
      with a gendered subject, in its male and its female version (``female[i] ==
      gender_swap(male[i])`` word for word, so the two have the same tokens but the gender
      words);
    * ``plain``: **non-stereotype sentences** -- a neutral occupation (with a gendered subject)
      or a non-gendered subject ("someone", "the {occupation}").

    Each entry is a (sentence A, sentence B) pair in the form of :func:`mlm_pairs`.
    """
    rng = np.random.default_rng([int(seed), 4])
    combos = _combos("train")
    verbs = list(VERBS)
    stereo_occ = FEMALE_OCCUPATIONS + MALE_OCCUPATIONS
    male, female, plain = [], [], []
    for _ in range(int(n_stereotype)):
        occ = stereo_occ[rng.integers(len(stereo_occ))]
        site, state = combos[rng.integers(len(combos))]
        verb = verbs[rng.integers(len(verbs))]
        subj = _gendered_subject(rng, "male")
        a, b = _premise(occ, verb, site, state), _second_sentence(rng, subj, occ, verb, state)
        male.append((a, b))
        female.append((gender_swap(a), gender_swap(b)))
    for _ in range(int(n_plain)):
        site, state = combos[rng.integers(len(combos))]
        verb = verbs[rng.integers(len(verbs))]
        if rng.random() < 0.5:
            occ = NEUTRAL_OCCUPATIONS[rng.integers(len(NEUTRAL_OCCUPATIONS))]
            subj = _gendered_subject(rng, ("male", "female")[rng.integers(2)])
        else:
            occ = _OCCUPATIONS[rng.integers(len(_OCCUPATIONS))]
            subj = "someone" if rng.random() < 0.5 else f"the {occ}"
        plain.append((_premise(occ, verb, site, state), _second_sentence(rng, subj, occ, verb, state)))
    return male, female, plain


def vocabulary() -> list[str]:
    """Every word the corpus can produce (lower case, sorted; multi-word sites split)."""
    words: set[str] = set(_FUNCTION_WORDS)
    words.update(_OCCUPATIONS)
    for m, f in GENDER_PAIRS:
        words.update((m, f))
    words.update(VERBS)
    words.update(VERBS.values())
    for s in SITES:
        words.update(s.split())
    words.update(STATES)
    return sorted(words)


def write_corpus_vocab(path: str | os.PathLike) -> Path:
    """Write the WordPiece vocabulary of the corpus (special tokens first, then :func:`vocabulary`)
    with :func:`xaijax.data.tokenizer.write_vocab`; returns the path."""
    from xaijax.data.tokenizer import write_vocab

    return write_vocab(vocabulary(), path)
