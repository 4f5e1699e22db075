"""Token attributions of a tiny BERT (xaijax.methods.text.explain_tokens), float64.

Checked against independent computations: integrated gradients' completeness (a 64-node
Gauss-Legendre rule; f(x) and f(baseline) from the model's own forward pass), gradient x input
against a direct ``jax.grad`` of the logits w.r.t. the word embeddings, CP-LRP / AttnLRP
conservation on a bias-free BERT (AttnLRP: up to the closed-form deficit of its softmax rule,
read layer by layer from the engine's trace), attention rollout's row-stochastic [CLS] row, and
the batched (padded, vmapped) result against each sentence explained alone without padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods
from xaijax.data.tokenizer import TokenBatch, Tokenizer, write_vocab
from xaijax.methods import NotApplicable
from xaijax.methods._core import token_grid
from xaijax.methods.text import TEXT_METHODS, explain_tokens, ig_baseline, text_method, token_relevance, word_embeddings
from xaijax.models import bert
from xaijax.propagation import composites as C
from xaijax.propagation.engine import relevance_trace

WORDS = "a nurse works in medical center of california . he she the doctor is good at job man woman".split()
PREMISES = ["A nurse works in medical center of california .", "The doctor is good .", "A man works ."]
HYPOTHESES = ["He works in california .", "She is good at the job .", "The woman works in the medical center of california at the job ."]
_BIAS_LIKE = ("bias", "position_embeddings", "token_type_embeddings")


@pytest.fixture(scope="module", autouse=True)
def _x64(x64_module):
    """float64 for every test of this module (conftest's x64_module)."""


def _variables(model, ids, zero_bias=False, seed=3):
    v = model.init(jax.random.PRNGKey(0), jnp.asarray(ids))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if zero_bias and name in ("bias", "embedding") and any(getattr(p, "key", "") in _BIAS_LIKE for p in path):
            return jnp.zeros(a.shape, jnp.float64)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape))
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[0]))
        if name == "embedding":
            return jnp.asarray(rng.standard_normal(a.shape))
        return jnp.asarray(0.3 * rng.standard_normal(a.shape))

    return jax.tree_util.tree_map_with_path(fill, v)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_vocab(WORDS, tmp_path_factory.mktemp("vocab") / "vocab.txt")
    tok = Tokenizer.from_vocab(path)
    batch = tok.encode_pairs(PREMISES, HYPOTHESES)
    assert len(set(batch.lengths.tolist())) == 3 and (batch.attention_mask == 0).any()  # three lengths, padded
    model = bert.build("test-tiny", num_labels=3)
    v = _variables(model, batch.input_ids)
    return model, v, batch, tok


def _with_text(v, batch, rows=slice(None)):
    return {**v, "text": {"token_type_ids": jnp.asarray(batch.token_type_ids[rows]), "attention_mask": jnp.asarray(batch.attention_mask[rows])}}


def _logits(model, v, batch):
    return model.apply(v, jnp.asarray(batch.input_ids), token_type_ids=batch.token_type_ids, attention_mask=batch.attention_mask)


def test_token_grid_of_a_sequence_model_keeps_every_token(setup):
    model, *_ = setup
    a = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    g = token_grid(model, a, "bert.encoder.layer.0.output.LayerNorm")
    assert g.shape == (2, 5, 1, 3)
    np.testing.assert_array_equal(g[:, :, 0], a)


@pytest.mark.parametrize("baseline", ["pad", "zero"])
def test_integrated_gradients_completeness(setup, baseline):
    """sum over tokens = f(x) - f(baseline) per sentence, f the target logit with the sentence's
    mask and token types (64 Gauss-Legendre nodes: quadrature error far below 1e-8)."""
    model, v, batch, tok = setup
    target = np.array([0, 1, 2])
    r = explain_tokens("integrated-gradients", model, v, batch, target, baseline=baseline,
                       params={"steps": 64, "rule": "gauss-legendre"})
    assert r.dtype == jnp.float64 and r.shape == batch.input_ids.shape
    base = ig_baseline(model, v, batch, baseline)
    emb = word_embeddings(model, v, jnp.asarray(batch.input_ids))
    vt = _with_text(v, batch)
    fx = model.apply(vt, emb)[np.arange(3), target]
    fb = model.apply(vt, base)[np.arange(3), target]
    assert float(jnp.abs(fx - fb).min()) > 5e-3
    np.testing.assert_allclose(r.sum(1), fx - fb, rtol=1e-9, atol=1e-10)
    if baseline == "pad":  # [CLS] / [SEP] keep their embedding in the baseline: exactly 0
        special = np.isin(batch.input_ids, [tok.cls_id, tok.sep_id]) & (batch.attention_mask == 1)
        assert special.sum() == 3 * 3 and float(jnp.abs(r[special]).max()) == 0.0
        pad = word_embeddings(model, v, jnp.zeros((1, 1), jnp.int32))[0, 0, 0]
        np.testing.assert_array_equal(base[0, 1, 0], pad)
    else:
        same = explain_tokens("integrated-gradients", model, v, batch, target, baseline=np.zeros(16),
                              params={"steps": 64, "rule": "gauss-legendre"})
        np.testing.assert_allclose(same, r, rtol=0, atol=1e-13)


def test_gradient_x_input_and_gradient_equal_a_direct_grad(setup):
    model, v, batch, _ = setup
    emb = word_embeddings(model, v, jnp.asarray(batch.input_ids))
    target = jnp.array([2, 0, 1])

    def score(e):
        out = model.apply(v, e, token_type_ids=batch.token_type_ids, attention_mask=batch.attention_mask)
        return out[jnp.arange(3), target].sum()

    g = jax.grad(score)(emb)[:, :, 0, :]
    pad = batch.attention_mask == 0
    assert float(jnp.abs(g[pad]).max()) == 0.0  # the model itself: padded tokens have exactly zero gradient
    gxi = explain_tokens("gradient-x-input", model, v, batch, target)
    np.testing.assert_allclose(gxi, (g * emb[:, :, 0, :]).sum(-1), rtol=1e-12, atol=1e-14)
    grad = explain_tokens("gradient", model, v, batch, target)  # text default: L2 norm over the embedding
    np.testing.assert_allclose(grad, jnp.sqrt((g * g).sum(-1)), rtol=1e-12, atol=1e-14)
    # an (N, K) float seed weighting the logits: the gradient of sum_k seed_k z_k
    seed = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)))
    gs = jax.grad(lambda e: (seed * model.apply(v, e, token_type_ids=batch.token_type_ids, attention_mask=batch.attention_mask)).sum())(emb)
    np.testing.assert_allclose(explain_tokens("gradient-x-input", model, v, batch, seed), (gs * emb).sum((2, 3)), rtol=1e-12, atol=1e-14)
    # "predicted": each sentence's top class (the same compiled program as class indices)
    pred = jnp.argmax(_logits(model, v, batch), -1)
    np.testing.assert_array_equal(explain_tokens("gradient-x-input", model, v, batch), explain_tokens("gradient-x-input", model, v, batch, pred))


#: methods compared padded-and-vmapped vs one sentence alone (SmoothGrad's noise scale and
#: pattern depend on the padded shape: it is only checked for exact zeros on padding); two
#: compilations each, so the ones whose code paths the others cover are marked slow
DETERMINISTIC = tuple(m for m in TEXT_METHODS if m != "smoothgrad")
_SLOW = ("gradient", "cp-lrp", "raw-attention", "chefer-lrp")


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in _SLOW else m for m in DETERMINISTIC])
def test_padded_batch_equals_each_sentence_alone(setup, name):
    """vmap over sentences of different lengths (padded) = each sentence explained alone,
    unpadded, to 1e-10; padding exactly 0."""
    model, v, batch, _ = setup
    target = np.array([1, 2, 0])
    params = {"steps": 8} if name == "integrated-gradients" else None
    r = np.asarray(explain_tokens(name, model, v, batch, target, params=params))
    assert np.isfinite(r).all()
    assert (r[batch.attention_mask == 0] == 0.0).all()
    i = int(np.argmin(batch.lengths))  # the shortest sentence: the most padding
    alone = batch.select([i])
    assert alone.input_ids.shape[1] < batch.input_ids.shape[1]
    ri = np.asarray(explain_tokens(name, model, v, alone, target[i : i + 1], params=params))[0]
    np.testing.assert_allclose(r[i, : alone.input_ids.shape[1]], ri, rtol=1e-10, atol=1e-12)
    assert np.abs(ri).max() > 0


def test_smoothgrad_padding_is_exactly_zero_and_deterministic(setup):
    model, v, batch, _ = setup
    r1 = explain_tokens("smoothgrad", model, v, batch, 0, params={"n": 4})
    assert float(jnp.abs(r1[batch.attention_mask == 0]).max()) == 0.0 and bool(jnp.isfinite(r1).all())
    assert float(r1[batch.attention_mask == 1].min()) > 0.0  # L2 norms of gradients
    np.testing.assert_array_equal(r1, explain_tokens("smoothgrad", model, v, batch, 0, params={"n": 4}))
    assert text_method("smooth:gradient-x-input", smooth_n=4).n == 4  # the smooth: prefix over a text method


def _bias_free(model, batch):
    return _variables(model, batch.input_ids, zero_bias=True)


def test_cp_lrp_conserves_the_logit_on_a_bias_free_bert(setup):
    """CP-LRP, eps 0, no gamma; biases, position and token-type embeddings zero: the token
    relevances sum to the target logit (nothing absorbed)."""
    model, _, batch, _ = setup
    v = _bias_free(model, batch)
    target = np.array([0, 1, 2])
    r = explain_tokens("cp-lrp", model, v, batch, target, params={"eps": 0.0, "conv_gamma": None, "dense_gamma": None})
    logit = _logits(model, v, batch)[np.arange(3), target]
    assert float(jnp.abs(logit).min()) > 1e-2
    np.testing.assert_allclose(r.sum(1), logit, rtol=1e-9, atol=1e-12)


def test_attnlrp_conserves_except_softmax_on_a_bias_free_bert(setup):
    """AttnLRP, eps 0, no gamma, bias-free: every layer but the softmax conserves and the
    tokens' total is the logit minus the softmax layers' deficit; explain_tokens gives the
    engine's input relevance summed over the embedding."""
    model, _, batch, _ = setup
    v = _bias_free(model, batch)
    target = np.array([2, 2, 1])
    vt = _with_text(v, batch)
    emb = word_embeddings(model, v, jnp.asarray(batch.input_ids))
    onehot = jax.nn.one_hot(target, 3, dtype=jnp.float64)
    rx, trace = relevance_trace(model, vt, emb, lambda out: onehot * out, C.attnlrp(0.0, None, None))
    deficit = jnp.zeros(3)
    kinds = set()
    for name, e in trace.items():
        tin, tout = e.totals()
        kinds.add(e.kind)
        if e.kind == "softmax":
            deficit = deficit + (tout - tin)
        else:
            np.testing.assert_allclose(tin, tout, rtol=1e-8, atol=1e-10, err_msg=name)
    assert {"softmax", "layernorm", "matmul", "dense", "add"} <= kinds
    logit = (onehot * _logits(model, v, batch)).sum(-1)
    np.testing.assert_allclose(rx.sum((1, 2, 3)), logit - deficit, rtol=1e-8, atol=1e-10)
    r = explain_tokens("attnlrp", model, v, batch, target, params={"eps": 0.0, "conv_gamma": None, "dense_gamma": None})
    np.testing.assert_allclose(r, rx[:, :, 0, :].sum(-1), rtol=1e-10, atol=1e-12)


def test_attention_rows_of_the_cls_token(setup):
    """Rollout's and raw attention's [CLS] rows are probability vectors over the real tokens
    ([CLS] included, padding exactly 0); generic attention's [CLS] entry includes the identity."""
    model, v, batch, _ = setup
    real = batch.attention_mask == 1
    for name in ("attention-rollout", "raw-attention"):
        r = np.asarray(explain_tokens(name, model, v, batch, 0))
        np.testing.assert_allclose((r * real).sum(1), 1.0, rtol=1e-12)
        assert (r[~real] == 0).all() and (r[real] > 0).all()
    g = np.asarray(explain_tokens("generic-attention", model, v, batch, 0))
    assert (g[:, 0] >= 1.0).all()
    # the method itself on the explanation view: (N, T, 1), no upsampling
    emb = word_embeddings(model, v, jnp.asarray(batch.input_ids))
    m = methods.get("attention-rollout")
    vt = _with_text(v, batch)
    np.testing.assert_array_equal(m.layer_map(model, vt, emb, 0), m(model, vt, emb, jnp.zeros(3, jnp.int32)))
    assert m(model, vt, emb, 0).shape == emb.shape[:3]


def test_jittable_core(setup):
    """The array-level core under a user's own jax.jit equals explain_tokens' result."""
    model, v, batch, _ = setup
    m = text_method("gradient-x-input")
    assert text_method("gradient-x-input") is m  # cached: a jitted call is not retraced
    args = (jnp.asarray(batch.input_ids), jnp.asarray(batch.token_type_ids), jnp.asarray(batch.attention_mask), jnp.array([0, 1, 2], jnp.int32))
    jitted = jax.jit(token_relevance, static_argnums=(0, 1))(m, model, v, *args)
    np.testing.assert_allclose(jitted, explain_tokens(m, model, v, batch, np.array([0, 1, 2])), rtol=1e-12, atol=1e-15)
    # sentences in chunks of 2 (lax.map over vmapped groups, the last one padded by lax.map): the same values
    np.testing.assert_allclose(explain_tokens(m, model, v, batch, np.array([0, 1, 2]), chunk=2), jitted, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="chunk must be None or a positive int"):
        explain_tokens(m, model, v, batch, 0, chunk=0)


def test_clear_errors(setup):
    model, v, batch, _ = setup
    with pytest.raises(NotApplicable, match=r"'rise' does not apply to text.*integrated-gradients.*attnlrp"):
        explain_tokens("rise", model, v, batch)
    with pytest.raises(NotApplicable, match=r"grad-cam.*text methods"):
        explain_tokens("grad-cam", model, v, batch)
    with pytest.raises(NotApplicable, match=r"RAP is not defined for BertForSequenceClassification.*piecewise.*Text methods: gradient"):
        explain_tokens(methods.get("rap"), model, v, batch)
    with pytest.raises(ValueError, match="unknown method 'atnlrp'.*attnlrp"):
        explain_tokens("atnlrp", model, v, batch)
    with pytest.raises(ValueError, match="target class 3 is out of range"):
        explain_tokens("gradient", model, v, batch, 3)
    with pytest.raises(ValueError, match="target must be 'predicted'"):
        explain_tokens("gradient", model, v, batch, "top")
    with pytest.raises(ValueError, match="does not broadcast to the word embeddings"):
        explain_tokens("integrated-gradients", model, v, batch, 0, baseline=np.zeros(5))
    with pytest.raises(ValueError, match="baseline must be one of"):
        explain_tokens("integrated-gradients", model, v, batch, 0, baseline="mask")
    with pytest.raises(TypeError, match="not a text model"):
        from xaijax.models import vit

        explain_tokens("gradient", vit.VisionTransformer(16, 8, 1, 2, 8, 16, 3), v, batch)
    with pytest.raises(TypeError, match="TokenBatch"):
        explain_tokens("gradient", model, v, batch.input_ids)
    with pytest.raises(ValueError, match="needs to know where they are"):
        explain_tokens("integrated-gradients", model, v, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, 0)
    bad = TokenBatch(batch.input_ids[:, ::-1], batch.token_type_ids, batch.attention_mask[:, ::-1], batch.tokens)
    with pytest.raises(ValueError, match="starts with padding"):
        explain_tokens("gradient", model, v, bad)
    # a real token after padding (left- or middle-padded rows): the pad baseline would misplace [CLS]/[SEP]
    holes = np.asarray(batch.attention_mask).copy()
    row = int(np.argmin(holes.sum(1)))  # the shortest sentence has padding at its end
    holes[row, 1], holes[row, -1] = 0, 1
    with pytest.raises(ValueError, match=f"row {row} has a real token after padding"):
        explain_tokens("gradient", model, v, TokenBatch(batch.input_ids, batch.token_type_ids, holes, batch.tokens))
    # ids or token types outside the model's tables (JAX's lookup would give NaN rows, no error)
    for ids, types, what in (
        (np.where(np.arange(batch.input_ids.shape[1]) == 1, model.vocab_size, batch.input_ids), batch.token_type_ids, "ids"),
        (batch.input_ids, np.full_like(batch.token_type_ids, model.type_vocab_size), "token_type_ids"),
    ):
        with pytest.raises(ValueError, match=f"{what} must lie in \\[0, "):
            explain_tokens("gradient", model, v, TokenBatch(ids, types, batch.attention_mask, batch.tokens))
        with pytest.raises(ValueError, match=f"{what} must lie in \\[0, "):
            model.apply(v, ids, token_type_ids=types, attention_mask=batch.attention_mask)


# ------------------------------------------------------------------ the explain-text command


def _cli(argv):
    import argparse

    from xaijax import explain_text

    return explain_text.run(explain_text.add_arguments(argparse.ArgumentParser()).parse_args(argv))


@pytest.fixture(scope="module")
def cli_files(setup, tmp_path_factory):
    import json

    from xaijax.checkpoints import save_variables

    model, v, _, tok = setup
    d = tmp_path_factory.mktemp("cli")
    kw = dict(bert.CONFIGS["test-tiny"], num_labels=3, task="classification")
    meta = {"arch": "bert", "model_kwargs": json.dumps(kw), "class_names": json.dumps(["Entailment", "Neutral", "Not entailment"])}
    save_variables(d / "tiny.safetensors", v, metadata=meta)
    (d / "vocab.txt").write_text("\n".join(tok.vocab) + "\n")
    return d


def test_explain_text_command(setup, cli_files, capsys):
    import json

    model, v, _, tok = setup
    d = cli_files
    argv = ["--weights", str(d / "tiny.safetensors"), "--vocab", str(d / "vocab.txt"), "--premise", PREMISES[0],
            "--hypothesis", "He works in california .", "--hypothesis", "She works in Californie .", "--method", "gradient-x-input",
            "--out", str(d / "out")]
    assert _cli(argv) == 0
    cap = capsys.readouterr()
    assert "not in the vocabulary (become [UNK]): 'Californie'" in cap.err
    assert "predicted" in cap.out and "[CLS]" in cap.out
    for ext in ("png", "html", "npy", "json"):
        assert (d / "out" / f"gradient-x-input.{ext}").is_file()
    rec = json.loads((d / "out" / "gradient-x-input.json").read_text())
    assert rec["class_names"] == ["Entailment", "Neutral", "Not entailment"] and len(rec["pairs"]) == 2
    batch = tok.encode_pairs([PREMISES[0]] * 2, ["He works in california .", "She works in Californie ."])
    pred = np.asarray(_logits(model, v, batch)).argmax(1)
    expect = np.asarray(explain_tokens("gradient-x-input", model, v, batch, pred))
    for i, pair in enumerate(rec["pairs"]):
        assert pair["tokens"] == list(batch.tokens[i]) and pair["predicted_index"] == pred[i]
        np.testing.assert_allclose(pair["relevance"], expect[i, : len(batch.tokens[i])], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.load(d / "out" / "gradient-x-input.npy"), expect, rtol=1e-6, atol=1e-9)


def test_explain_text_bad_input(cli_files, capsys):
    d = cli_files
    base = ["--weights", str(d / "tiny.safetensors"), "--vocab", str(d / "vocab.txt"), "--out", str(d / "bad")]
    long = " ".join(["nurse"] * 40)
    with pytest.raises(ValueError, match=r"sentence 0 has 46 tokens; max_length is 32 \(the model's position limit\); shorten the text or pass --truncate"):
        _cli(base + ["--premise", long, "--hypothesis", "he works ."])
    with pytest.raises(NotApplicable, match="'rise' does not apply to text"):
        _cli(base + ["--premise", "a nurse", "--method", "rise"])
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        _cli(["--weights", str(d / "tiny.safetensors"), "--vocab", str(d / "nope.txt"), "--premise", "a"])
    with pytest.raises(ValueError, match="--target 5 is out of range for a model with 3 classes"):
        _cli(base + ["--premise", "a nurse", "--target", "5"])
    with pytest.raises(ValueError, match="2 --premise and 3 --hypothesis"):
        _cli(base + ["--premise", "a", "--premise", "b", "--hypothesis", "c", "--hypothesis", "d", "--hypothesis", "e"])
    with pytest.raises(FileNotFoundError, match="no bundled model 'nope'"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XAIJAX_WEIGHTS", str(d))
            _cli(["--bundled", "nope", "--premise", "a"])
    with pytest.raises(FileNotFoundError, match=r"vocabulary file not found: .*tiny\.vocab\.txt or .*tiny_vocab\.txt"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XAIJAX_WEIGHTS", str(d))
            _cli(["--bundled", "tiny", "--premise", "a"])
    assert not (d / "bad").exists()  # nothing written before the input is checked
    # --truncate: cut to the model's 32 positions with a warning, then explained
    assert _cli(base + ["--premise", long, "--hypothesis", "he works .", "--truncate", "--method", "gradient-x-input"]) == 0
    assert "truncated to max_length=32" in capsys.readouterr().err
    assert np.load(d / "bad" / "gradient-x-input.npy").shape == (1, 32)


# ------------------------------------------------------------------ Captum on a Hugging Face BERT


@pytest.fixture(scope="module")
def captum_refs():
    """``tests/fixtures/text_refs.npz`` (experiments/make_text_references.py): a float64 Hugging
    Face BertForSequenceClassification with seeded weights, three padded pairs, and Captum's
    attributions w.r.t. ``inputs_embeds`` (xaijax's explanation view: word embeddings, position
    and token-type embeddings added inside). The weights are ported by checkpoints.load_bert."""
    import json
    from pathlib import Path

    from xaijax import checkpoints

    f = np.load(Path(__file__).parent / "fixtures" / "text_refs.npz")
    meta = json.loads(str(f["meta"]))
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    model, v, _ = checkpoints.load_bert("text_refs.npz", config=meta["config"], state_dict=sd)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), v)  # exact: the weights are float32 values
    batch = {k: f[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    special = (meta["special_ids"]["cls"], meta["special_ids"]["sep"])
    logits = model.apply(v, jnp.asarray(batch["input_ids"]), token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"])
    np.testing.assert_allclose(logits, f["logits"], rtol=1e-10, atol=1e-12)  # the port itself
    return model, v, batch, special, f


def test_captum_integrated_gradients_and_input_x_gradient(captum_refs):
    """Captum IntegratedGradients (32 steps, riemann_right, [PAD] baseline except [CLS]/[SEP])
    and InputXGradient, summed over the embedding dimension: equal to 1e-9 (float64)."""
    model, v, batch, special, f = captum_refs
    target = f["target"]
    ig = explain_tokens("integrated-gradients", model, v, batch, target, baseline="pad", special_ids=special, params={"steps": 32})
    ref = f["out/ig_pad_riemann_right"].sum(-1)
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(ig, ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(explain_tokens("gradient-x-input", model, v, batch, target), f["out/input_x_gradient"].sum(-1), rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_captum_gauss_legendre_zero_baseline_and_saliency(captum_refs):
    """Captum IG with 24 Gauss-Legendre nodes from the zero baseline (summed over D), and
    Saliency (raw gradient; xaijax's text ``gradient`` is its L2 norm over D).

    Captum multiplies the gradients by ``torch.tensor(step_sizes).float()``: its quadrature
    weights are rounded to float32 (exact for riemann_right's 1/32, not for Gauss-Legendre's),
    hence 2e-7 relative here (measured 6e-9) instead of float64 agreement."""
    model, v, batch, special, f = captum_refs
    target = f["target"]
    ig = explain_tokens("integrated-gradients", model, v, batch, target, baseline="zero", params={"steps": 24, "rule": "gauss-legendre"})
    np.testing.assert_allclose(ig, f["out/ig_zero_gausslegendre"].sum(-1), rtol=2e-7, atol=1e-9)
    sal = f["out/saliency"]
    np.testing.assert_allclose(explain_tokens("gradient", model, v, batch, target), np.sqrt((sal * sal).sum(-1)), rtol=1e-9, atol=1e-11)
