"""The debiasing study: objectives against hand computations, the training pieces, and the study on
the bundled models (the biased model's gap is large, the compensatory model's small)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.data import nli_corpus as C
from xaijax.debias import objectives as O


# ----------------------------------------------------------------------------- JSD


def jsd_numpy(p, q):
    """Direct definition, float64: (KL(p||m) + KL(q||m)) / 2 with 0 log 0 = 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = (p + q) / 2

    def kl(a):
        return sum(ai * math.log(ai / mi) for ai, mi in zip(a, m) if ai > 0)

    return (kl(p) + kl(q)) / 2


def test_jsd_closed_forms(x64):
    p = jnp.array([1.0, 0.0])
    q = jnp.array([0.5, 0.5])
    # m = (3/4, 1/4): KL(p||m) = ln(4/3); KL(q||m) = (ln(2/3) + ln 2) / 2
    expected = 0.5 * (math.log(4 / 3) + 0.5 * (math.log(2 / 3) + math.log(2)))
    assert float(O.jsd_from_probs(p, q)) == pytest.approx(expected, abs=1e-14)
    assert float(O.jsd_from_probs(jnp.array([1.0, 0, 0]), jnp.array([0.0, 0, 1]))) == pytest.approx(math.log(2), abs=1e-14)
    assert float(O.jsd_from_probs(q, q)) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    got = np.asarray(O.jsd(jnp.asarray(a), jnp.asarray(b)))
    pa, pb = jax.nn.softmax(a, -1), jax.nn.softmax(b, -1)
    want = [jsd_numpy(x, y) for x, y in zip(np.asarray(pa), np.asarray(pb))]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got, np.asarray(O.jsd(jnp.asarray(b), jnp.asarray(a))), atol=1e-15)  # symmetric
    assert np.all(got <= math.log(2) + 1e-12) and np.all(got > 0)
    # large logits stay finite (log-space)
    assert np.isfinite(float(O.jsd(jnp.array([1e4, 0.0]), jnp.array([0.0, 1e4]))))
    assert float(O.jsd(jnp.array([1e4, 0.0]), jnp.array([0.0, 1e4]))) == pytest.approx(math.log(2), abs=1e-9)


def test_auto_debias_loss_closed_form(x64):
    lm = jnp.array([[0.0, 1.0, 2.0]])
    lf = jnp.array([[2.0, 1.0, 0.0]])
    cm, cf = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])  # cos = 0
    loss, parts = O.auto_debias_loss(lm, lf, cm, cf, embed_weight=0.1)
    want = jsd_numpy(jax.nn.softmax(lm[0]), jax.nn.softmax(lf[0]))
    assert float(parts["jsd"]) == pytest.approx(want, abs=1e-12)
    assert float(parts["embed"]) == pytest.approx(1.0, abs=1e-7)
    assert float(loss) == pytest.approx(want + 0.1, abs=1e-7)
    loss0, _ = O.auto_debias_loss(lm, lm)
    assert float(loss0) == 0.0


# ----------------------------------------------------------------------------- compensatory


def test_angle_distance_closed_form(x64):
    a, b = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])
    # cos = 0; ||a - b||^2 = 5; dims = 2 -> 1 + w * 5 / 2
    assert float(O.angle_distance(a, b, jnp.array([2.0]), distance_weight=0.5)[0]) == pytest.approx(1 + 0.5 * 2.5, abs=1e-7)
    assert float(O.angle_distance(a, 3 * a, jnp.array([2.0]), distance_weight=0.0)[0]) == pytest.approx(0.0, abs=1e-7)


def _states(rng, n, t, d, layers=2):
    return [jnp.asarray(rng.normal(size=(n, t, d))) for _ in range(layers)]


def test_compensatory_loss_zero_iff_equal_and_gradients(x64):
    rng = np.random.default_rng(1)
    n, t, d = 3, 5, 4
    mask = jnp.asarray((np.arange(t)[None] < np.array([[5], [3], [4]])).astype(np.int32))
    male = _states(rng, n, t, d)
    plain = _states(rng, n, t, d)
    loss, parts = O.compensatory_loss(male, male, mask, plain, plain, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    female = _states(rng, n, t, d)
    loss, parts = O.compensatory_loss(male, female, mask, plain, plain, mask)
    assert float(parts["stereotype"]) > 0.1 and float(parts["keep"]) == pytest.approx(0.0, abs=1e-7)
    # padded positions do not count: changing them changes nothing
    junk = [f.at[1, 4].set(100.0) for f in female]
    assert float(O.compensatory_loss(male, junk, mask, plain, plain, mask)[0]) == pytest.approx(float(loss), abs=1e-12)
    # hand computation of one layer's term for sentence 0 (all 5 tokens real)
    a, b = np.asarray(male[0][0]).ravel(), np.asarray(female[0][0]).ravel()
    term = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) + np.sum((a - b) ** 2) / (5 * d)
    got = O.angle_distance(O.flatten_tokens(male[0], mask), O.flatten_tokens(female[0], mask), jnp.sum(mask, -1) * d)
    assert float(got[0]) == pytest.approx(term, rel=1e-7)
    # the frozen original gets no gradient; the model's states do
    other = _states(rng, n, t, d)

    def f(orig, cur):
        return O.compensatory_loss(male, female, mask, cur, orig, mask, keep_weight=2.0)[0]

    g_orig, g_cur = jax.grad(f, argnums=(0, 1))(other, plain)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in g_orig)
    assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in g_cur)
    loss_k, parts_k = O.compensatory_loss(male, female, mask, plain, other, mask, keep_weight=2.0)
    assert float(loss_k) == pytest.approx(float(parts_k["stereotype"]) + 2 * float(parts_k["keep"]), rel=1e-12)


def test_beam_search_prompts():
    words = ["a", "b", "c"]

    def score(prompts):  # prefers many "b", then "c"
        return np.array([p.count("b") * 10 + p.count("c") for p in prompts], float)

    kept = O.beam_search_prompts(score, words, length=3, beam=2)
    assert [p for p, _ in kept[:2]] == ["b", "c"]
    assert [p for p, _ in kept[2:4]] == ["b b", "b c"]
    assert [p for p, _ in kept[4:]] == ["b b b", "b b c"]
    assert [s for _, s in kept[4:]] == [30.0, 21.0]
    with pytest.raises(ValueError):
        O.beam_search_prompts(score, [], 2, 2)


# ----------------------------------------------------------------------------- training pieces


def test_mask_tokens_never_masks_specials():
    from xaijax.debias.train import mask_tokens

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 60, size=(400, 20))
    ids[:, 0], ids[:, 10], ids[:, 19] = 2, 3, 3
    mask = np.ones_like(ids)
    mask[:, 15:] = 0
    ids[:, 15:] = 0
    out, w = mask_tokens(ids, mask, rng, 60, 4, 5, [0, 1, 2, 3, 4])
    assert not w[:, [0, 10]].any() and not w[:, 15:].any()
    chosen = w > 0
    frac = chosen.sum() / (mask.sum() - 2 * 400)
    assert abs(frac - 0.15) < 0.01
    assert abs(np.mean(out[chosen] == 4) - 0.8) < 0.03
    assert np.array_equal(out[~chosen], ids[~chosen])


# ----------------------------------------------------------------------------- the study


def test_bias_metrics_and_relevance_mass_by_hand():
    from xaijax.debias.study import bias_metrics, relevance_mass

    probe = C.nli_pairs("probe")[:8]  # 2 premises x (he, she, the man, the woman)
    probs = np.tile([0.1, 0.8, 0.1], (8, 1))
    probs[[0, 2, 4, 6], 0] = 0.9  # every male version entailed
    probs[[0, 2, 4, 6], 1] = 0.0
    m = bias_metrics(probs, probe)
    assert probe[0].stereotype == "female"  # nurse: the male versions are anti-stereotype
    assert m["entailment_male"] == 1.0 and m["entailment_female"] == 0.0
    assert m["entailment_anti"] == 1.0 and m["gap"] == -1.0
    assert m["prediction_gap"] == pytest.approx(0.8)
    toks = [("[CLS]", "a", "nurse", "works", "[SEP]", "he", "works", "in", "texas", "[SEP]")]
    rel = np.array([[0.0, 0.0, 1.0, 0.0, 0.0, 2.0, -5.0, 0.0, 1.0, 0.0]])
    r = relevance_mass(rel, toks)
    assert r["gender_share"] == pytest.approx(0.5) and r["context_share"] == pytest.approx(0.25)
    assert r["occupation_share"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def bundled():
    from xaijax.debias import study

    try:
        return study.load_bundled()
    except FileNotFoundError as e:  # pragma: no cover - a checkout without weights
        pytest.skip(str(e))


def test_bundled_models_bias_direction(bundled):
    """On the held-out probe the biased model's gap is large and the compensatory model's small."""
    from xaijax.debias import study, train

    tok, params, config, model = bundled
    probe = C.nli_pairs("probe")
    enc = train.encode(tok, [(p.premise, p.hypothesis) for p in probe], config.max_length)
    m = {name: study.bias_metrics(train.predict_probs(model, params[name], enc), probe) for name in train.MODEL_NAMES}
    assert m["bert"]["gap"] > 0.3
    assert abs(m["ours"]["gap"]) < 0.1
    assert m["ours"]["prediction_gap"] < m["bert"]["prediction_gap"] / 3
    assert m["bert"]["gap"] - abs(m["ours"]["gap"]) > 0.25


def test_run_on_bundled_writes_outputs(bundled, tmp_path):
    import json

    from xaijax.debias import study

    result = study.run(tmp_path, relevance_sentences=8, verbose=False)
    for f in ("table.md", "table.json", "token_figure.png", "token_figure.html"):
        assert (tmp_path / f).stat().st_size > 0
    saved = json.loads((tmp_path / "table.json").read_text())
    assert set(saved["models"]) == {"bert", "auto-debias", "ours"}
    assert len(saved["figure"]) == 6 and saved["figure"][0]["tokens"][:3] == ["[CLS]", "a", "nurse"]
    for row in result["figure"]:
        assert len(row["relevance"]) == len(row["tokens"]) and row["predicted"] in C.LABELS
    md = (tmp_path / "table.md").read_text()
    assert "| BERT |" in md and "| Ours |" in md


@pytest.mark.slow
def test_quick_retraining_keeps_the_direction():
    """The shorter schedule from scratch (seed 0, other data sizes and steps than the bundled
    models): the biased model learns the shortcut, the compensatory model does not (bounded: about
    2-3 minutes on 2 cores; measured: gaps 0.954 vs 0.039, prediction gaps 0.866 vs 0.085)."""
    import tempfile
    from pathlib import Path

    from xaijax.data.tokenizer import Tokenizer
    from xaijax.debias import study, train

    config = study.quick_config()
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.from_vocab(C.write_corpus_vocab(Path(d) / "v.txt"))
    out = train.train_all(config, tok, verbose=False)
    model = train.classifier(train.model_kwargs(config, tok.vocab_size))
    probe = C.nli_pairs("probe")
    enc = train.encode(tok, [(p.premise, p.hypothesis) for p in probe], config.max_length)
    m = {n: study.bias_metrics(train.predict_probs(model, out["params"][n], enc), probe) for n in ("bert", "ours")}
    assert m["bert"]["gap"] > 0.3 and abs(m["ours"]["gap"]) < 0.15
    assert m["ours"]["prediction_gap"] < m["bert"]["prediction_gap"] / 3


def test_bundled_files_load_through_checkpoints(bundled):
    """The bundled files are ordinary native BERT checkpoints: ``checkpoints.load`` rebuilds them."""
    from xaijax import checkpoints
    from xaijax.checkpoints.bundled import bundled_weights
    from xaijax.models.bert import BertForSequenceClassification

    model, variables, info = checkpoints.load(None, bundled_weights("debias_ours.safetensors"))
    assert isinstance(model, BertForSequenceClassification) and model.num_labels == 3
    tok, params, config, study_model = bundled
    assert model.vocab_size == tok.vocab_size == study_model.vocab_size
    np.testing.assert_array_equal(
        variables["params"]["classifier"]["kernel"], np.asarray(params["ours"]["classifier"]["kernel"])
    )


def test_bad_inputs(tmp_path):
    from xaijax.debias import study

    with pytest.raises(ValueError, match="method"):
        study.run(tmp_path, method="lime")
    with pytest.raises(ValueError, match="probs"):
        study.bias_metrics(np.zeros((3, 3)), C.nli_pairs("probe")[:4])
    with pytest.raises(ValueError, match="alternate"):
        study.bias_metrics(np.zeros((2, 3)), C.nli_pairs("probe")[1:3])
    with pytest.raises(ValueError, match="same length"):
        O.compensatory_loss([], [], jnp.ones((1, 2)), [], [], jnp.ones((1, 2)))
