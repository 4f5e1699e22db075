"""The Flax BERT (xaijax.models.bert): parity with a torch reference written here with Hugging
Face's module and parameter names, the call convention (ids / explanation view, token types
and attention mask as arguments or from the "text" collection), padding, the CAM layer's
gradients, and AttnLRP / CP-LRP on a tiny BERT (conservation layer by layer, and equality
with gradient x input of a hand-written BERT carrying the rules' modifications).

Everything runs in float64 (a module-scoped fixture enables x64 and restores it).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods
from xaijax.methods._core import layer_gradients
from xaijax.methods.attention import attention_probabilities
from xaijax.models import bert
from xaijax.models import transformer_layers as T
from xaijax.models.taps import module_name
from xaijax.propagation import composites as C
from xaijax.propagation import engine, relevance, relevance_trace
from xaijax.propagation.rules import Pass, Vjp

torch = pytest.importorskip("torch")
tnn = torch.nn

CFG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=16, type_vocab_size=2)
NUM_LABELS = 3
PAD = 0

# three pairs "[CLS] a b [SEP] c d [SEP]" of different lengths, padded to 9 tokens
IDS = np.array(
    [
        [2, 11, 12, 13, 3, 21, 22, 3, PAD],
        [2, 14, 3, 23, 24, 25, 3, PAD, PAD],
        [2, 15, 16, 17, 18, 3, 26, 27, 3],
    ]
)
TYPES = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
MASK = (np.arange(9)[None] < np.array([[8], [7], [9]])).astype(np.int64)


@pytest.fixture(scope="module")
def f64(x64_module):
    """float64 for the fixtures and tests that ask for it (conftest's x64_module)."""


# ------------------------------------------------------------- torch reference (HF names)


class TEmbeddings(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = tnn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = tnn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = tnn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = tnn.LayerNorm(c["hidden_size"], eps=1e-12)

    def forward(self, ids, types):
        pos = torch.arange(ids.shape[1])[None]
        e = self.word_embeddings(ids) + self.token_type_embeddings(types)
        return self.LayerNorm(e + self.position_embeddings(pos))


class TSelfAttention(tnn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.h = c["num_attention_heads"]
        self.query, self.key, self.value = tnn.Linear(d, d), tnn.Linear(d, d), tnn.Linear(d, d)

    def _heads(self, x):
        n, t, d = x.shape
        return x.view(n, t, self.h, d // self.h).permute(0, 2, 1, 3)

    def forward(self, x, ext_mask):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + ext_mask
        ctx = torch.softmax(scores, -1) @ v
        n, h, t, hd = ctx.shape
        return ctx.permute(0, 2, 1, 3).reshape(n, t, h * hd)


class TDenseAddNorm(tnn.Module):  # BertSelfOutput / BertOutput
    def __init__(self, d_in, d):
        super().__init__()
        self.dense = tnn.Linear(d_in, d)
        self.LayerNorm = tnn.LayerNorm(d, eps=1e-12)

    def forward(self, h, inp):
        return self.LayerNorm(self.dense(h) + inp)


class TAttention(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = TSelfAttention(c)
        self.output = TDenseAddNorm(c["hidden_size"], c["hidden_size"])

    def forward(self, x, ext_mask):
        return self.output(self.self(x, ext_mask), x)


class TIntermediate(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = tnn.Linear(c["hidden_size"], c["intermediate_size"])

    def forward(self, x):
        return tnn.functional.gelu(self.dense(x))


class TLayer(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = TAttention(c)
        self.intermediate = TIntermediate(c)
        self.output = TDenseAddNorm(c["intermediate_size"], c["hidden_size"])

    def forward(self, x, ext_mask):
        a = self.attention(x, ext_mask)
        return self.output(self.intermediate(a), a)


class TEncoder(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = tnn.ModuleList([TLayer(c) for _ in range(c["num_hidden_layers"])])

    def forward(self, x, ext_mask):
        for blk in self.layer:
            x = blk(x, ext_mask)
        return x


class TPooler(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = tnn.Linear(c["hidden_size"], c["hidden_size"])
        self.activation = tnn.Tanh()

    def forward(self, h):
        return self.activation(self.dense(h[:, 0]))


class TBert(tnn.Module):
    def __init__(self, c, pool=True):
        super().__init__()
        self.embeddings = TEmbeddings(c)
        self.encoder = TEncoder(c)
        self.pooler = TPooler(c) if pool else None

    def forward(self, ids, types, mask):
        dtype = self.embeddings.word_embeddings.weight.dtype
        ext = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # HF's extended attention mask
        h = self.encoder(self.embeddings(ids, types), ext)
        return h, (self.pooler(h) if self.pooler is not None else None)


class TForSequenceClassification(tnn.Module):
    def __init__(self, c, num_labels):
        super().__init__()
        self.bert = TBert(c)
        self.classifier = tnn.Linear(c["hidden_size"], num_labels)

    def forward(self, ids, types, mask):
        return self.classifier(self.bert(ids, types, mask)[1])


class TTransform(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = tnn.Linear(c["hidden_size"], c["hidden_size"])
        self.LayerNorm = tnn.LayerNorm(c["hidden_size"], eps=1e-12)

    def forward(self, h):
        return self.LayerNorm(tnn.functional.gelu(self.dense(h)))


class TPredictions(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.transform = TTransform(c)
        self.decoder = tnn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.bias = tnn.Parameter(torch.zeros(c["vocab_size"]))

    def forward(self, h):
        return self.decoder(self.transform(h)) + self.bias


class TCls(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.predictions = TPredictions(c)


class TForMaskedLM(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.bert = TBert(c, pool=False)
        self.cls = TCls(c)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def forward(self, ids, types, mask):
        return self.cls.predictions(self.bert(ids, types, mask)[0])


def _torch_model(kind, seed=0):
    torch.manual_seed(seed)
    m = TForSequenceClassification(CFG, NUM_LABELS) if kind == "classification" else TForMaskedLM(CFG)
    with torch.no_grad():  # larger than HF's 0.02 init, so that every path matters
        for name, p in m.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 2 and "embeddings" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return m.double().eval()


def _port(state_dict):
    """HF state dict -> flax params by the documented name mapping: dots nest, Linear weight ->
    kernel (transposed), Embedding weight -> embedding, LayerNorm weight -> scale; the tied
    decoder weight (== the word embedding) is not a parameter of its own."""
    params: dict = {}
    for key, t in state_dict.items():
        a = t.detach().numpy()
        parts = key.split(".")
        if parts[:3] == ["cls", "predictions", "decoder"]:
            np.testing.assert_array_equal(a, state_dict["bert.embeddings.word_embeddings.weight"].numpy())
            continue
        mod, role = parts[:-1], parts[-1]
        if role == "weight":
            if mod[-1] == "LayerNorm":
                role = "scale"
            elif mod[-1].endswith("_embeddings"):
                role = "embedding"
            else:
                role, a = "kernel", a.T
        node = params
        for p in mod:
            node = node.setdefault(p, {})
        node[role] = jnp.asarray(a)
    return {"params": params}


@pytest.fixture(scope="module")
def cls_setup(f64):
    tm = _torch_model("classification")
    model = bert.BertForSequenceClassification(**CFG, num_labels=NUM_LABELS)
    v = _port(tm.state_dict())
    return tm, model, v


@pytest.fixture(scope="module")
def mlm_setup(f64):
    tm = _torch_model("mlm", seed=1)
    model = bert.BertForMaskedLM(**CFG)
    v = _port(tm.state_dict())
    return tm, model, v


def _torch_out(tm, ids=IDS, types=TYPES, mask=MASK):
    with torch.no_grad():
        return tm(torch.as_tensor(ids), torch.as_tensor(types), torch.as_tensor(mask)).numpy()


# --------------------------------------------------------------------------- parity


def test_param_tree_is_hf_names_and_heads_share_bert(cls_setup, mlm_setup):
    """The ported tree has exactly the shapes model.init makes; both heads share ``bert``
    (the classifier adds only ``bert.pooler``)."""
    for _, model, v in (cls_setup, mlm_setup):
        init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(IDS))
        shapes = jax.tree_util.tree_map(lambda a: a.shape, init)
        assert shapes == jax.tree_util.tree_map(lambda a: a.shape, v)
    pc, pm = cls_setup[2]["params"], mlm_setup[2]["params"]
    assert set(pc) == {"bert", "classifier"} and set(pm) == {"bert", "cls"}
    shp = lambda t: jax.tree_util.tree_map(lambda a: a.shape, t)  # noqa: E731
    assert shp({k: s for k, s in pc["bert"].items() if k != "pooler"}) == shp(pm["bert"])
    assert set(pc["bert"]["pooler"]) == {"dense"}
    assert pc["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"].shape == (16, 16)
    assert set(pm["cls"]["predictions"]) == {"bias", "transform"}


def test_parity_classification(cls_setup):
    tm, model, v = cls_setup
    want = _torch_out(tm)
    got = np.asarray(model.apply(v, jnp.asarray(IDS), token_type_ids=jnp.asarray(TYPES), attention_mask=jnp.asarray(MASK)))
    assert got.dtype == np.float64 and got.shape == (3, NUM_LABELS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert np.abs(want).max() > 0.1  # not a degenerate network
    # the mask and the token types matter (so the comparison above checks them)
    assert np.abs(_torch_out(tm, mask=np.ones_like(MASK)) - want).max() > 1e-3
    assert np.abs(_torch_out(tm, types=np.zeros_like(TYPES)) - want).max() > 1e-3


def test_parity_masked_lm(mlm_setup):
    tm, model, v = mlm_setup
    want = _torch_out(tm)
    got = np.asarray(model.apply(v, jnp.asarray(IDS), jnp.asarray(TYPES), jnp.asarray(MASK)))
    assert got.shape == (3, 9, CFG["vocab_size"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert np.abs(want).max() > 0.1


# -------------------------------------------------------------------- call convention


def test_ids_path_equals_explanation_view(cls_setup, mlm_setup):
    for _, model, v in (cls_setup, mlm_setup):
        ids, types, mask = jnp.asarray(IDS), jnp.asarray(TYPES), jnp.asarray(MASK)
        x = model.apply(v, ids, method="embed_words")
        table = v["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
        assert x.shape == (3, 9, 1, CFG["hidden_size"]) and x.dtype == jnp.float64
        np.testing.assert_array_equal(x[:, :, 0], table[ids])
        np.testing.assert_array_equal(model.apply(v, x, types, mask), model.apply(v, ids, types, mask))


def test_text_collection_broadcasts_over_a_batch(cls_setup):
    """A (1, T) mask and token types in the "text" collection == the same rows passed as
    arguments for every sample; arguments take precedence over the collection."""
    _, model, v = cls_setup
    i = 1
    x1 = model.apply(v, jnp.asarray(IDS[i : i + 1]), method="embed_words")
    xs = x1 * jnp.linspace(0.2, 1.0, 4)[:, None, None, None]  # an inner batch (e.g. IG steps)
    mask, types = jnp.asarray(MASK[i : i + 1]), jnp.asarray(TYPES[i : i + 1])
    vt = {**v, "text": {"attention_mask": mask, "token_type_ids": types}}
    got = model.apply(vt, xs)
    want = model.apply(v, xs, token_type_ids=jnp.tile(types, (4, 1)), attention_mask=jnp.tile(mask, (4, 1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert float(jnp.abs(model.apply(v, xs) - want).max()) > 1e-4  # the collection was read
    np.testing.assert_allclose(
        model.apply(vt, xs, attention_mask=jnp.ones((4, 9), jnp.int32)),
        model.apply(v, xs, types, jnp.ones((1, 9), jnp.int32)),
        rtol=0,
        atol=1e-13,
    )


def test_padding_changes_nothing(cls_setup, mlm_setup):
    """A sentence padded with [PAD] tokens (masked) gives the unpadded sentence's logits; the
    ids at padded positions do not matter."""
    i, n = 1, 7
    for kind, (_, model, v) in (("cls", cls_setup), ("mlm", mlm_setup)):
        short = model.apply(v, jnp.asarray(IDS[i : i + 1, :n]), jnp.asarray(TYPES[i : i + 1, :n]))
        padded = model.apply(v, jnp.asarray(IDS[i : i + 1]), jnp.asarray(TYPES[i : i + 1]), jnp.asarray(MASK[i : i + 1]))
        other = IDS[i : i + 1].copy()
        other[0, n:] = [40, 41]
        padded2 = model.apply(v, jnp.asarray(other), jnp.asarray(TYPES[i : i + 1]), jnp.asarray(MASK[i : i + 1]))
        if kind == "mlm":
            padded, padded2 = padded[:, :n], padded2[:, :n]
        np.testing.assert_allclose(padded, short, rtol=0, atol=1e-12)
        np.testing.assert_allclose(padded2, padded, rtol=0, atol=1e-13)


def test_gradients_of_padded_tokens_are_exactly_zero_and_cam_layer_is_not(cls_setup):
    """d logit / d (padded word embeddings) == 0 exactly. At the declared cam_layer (the input of
    the last attention) every real token has a non-zero gradient and padded tokens exactly 0;
    at the last block's output only [CLS] has one (why the CAM layer is not the block output)."""
    _, model, v = cls_setup
    ids, types, mask = jnp.asarray(IDS), jnp.asarray(TYPES), jnp.asarray(MASK)
    x = model.apply(v, ids, method="embed_words")
    g = jax.grad(lambda xx: model.apply(v, xx, types, mask)[:, 1].sum())(x)
    pad = MASK == 0
    assert float(jnp.abs(g[pad]).max()) == 0.0
    assert float(jnp.abs(g).sum((2, 3))[~pad].min()) > 1e-6
    vt = {**v, "text": {"attention_mask": mask, "token_type_ids": types}}
    assert model.cam_layer == "bert.encoder.layer.0.output.LayerNorm"
    last = model.block_layers[-1]
    _, grads, _ = layer_gradients(model, vt, x, jnp.array([0, 1, 2]), [model.cam_layer, last])
    gc = np.abs(np.asarray(grads[model.cam_layer])).sum(-1)
    assert gc[pad].max() == 0.0 and gc[~pad].min() > 1e-6
    gl = np.abs(np.asarray(grads[last])).sum(-1)
    assert gl[:, 1:].max() == 0.0 and gl[:, 0].min() > 1e-6
    one = bert.BertForSequenceClassification(**{**CFG, "num_hidden_layers": 1})
    assert one.cam_layer == "bert.embeddings.LayerNorm"


def test_declared_facts_and_attention(cls_setup):
    _, model, v = cls_setup
    assert model.family == "bert" and model.num_prefix_tokens == 0 and model.sequence_model is True
    assert model.block_layers == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert model.attention_layers == tuple(f"bert.encoder.layer.{i}.attention.self.attn" for i in range(2))
    vt = {**v, "text": {"attention_mask": jnp.asarray(MASK), "token_type_ids": jnp.asarray(TYPES)}}
    x = model.apply(v, jnp.asarray(IDS), method="embed_words")
    att = attention_probabilities(model, vt, x)
    for a in att:
        assert a.shape == (3, 2, 9, 9)
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-13)
        assert float(jnp.abs(a * (1 - jnp.asarray(MASK))[:, None, None, :]).max()) == 0.0  # padded keys: exactly 0


def test_build_configs_and_bad_inputs(f64):
    m = bert.build("bert-base-uncased")
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size, m.num_labels) == (
        30522, 768, 12, 12, 3072, 3)
    lm = bert.build("bert-large-uncased", task="mlm")
    assert isinstance(lm, bert.BertForMaskedLM)
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads) == (1024, 24, 16)
    assert bert.build("bert-tiny", num_labels=2).num_labels == 2
    with pytest.raises(ValueError, match="unknown BERT configuration"):
        bert.build("bert-huge")
    with pytest.raises(ValueError, match="task must be one of"):
        bert.build("bert-tiny", task="ner")
    with pytest.raises(ValueError, match="unknown BERT field"):
        bert.build("bert-tiny", hidden=3)
    model = bert.build("test-tiny")
    ids = jnp.zeros((2, 5), jnp.int32)
    v = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(model.init, jax.random.PRNGKey(0), ids))
    with pytest.raises(ValueError, match="explanation view"):
        model.apply(v, jnp.zeros((2, 5, 16)))
    with pytest.raises(ValueError, match="token ids must have shape"):
        model.apply(v, jnp.zeros((2, 5, 1), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model.apply(v, ids, attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="token_type_ids must be an int or bool"):
        model.apply(v, ids, token_type_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="longer than max_position_embeddings=32"):
        model.apply(v, jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        jax.eval_shape(bert.build("test-tiny", num_attention_heads=3).init, jax.random.PRNGKey(0), ids)


# --------------------------------------------------------------------- propagation


_BIAS_LIKE = ("bias", "position_embeddings", "token_type_embeddings")


def _zero_bias(v):
    def f(path, a):
        keys = [getattr(p, "key", None) for p in path]
        return jnp.zeros_like(a) if any(k in _BIAS_LIKE for k in keys) else a

    return jax.tree_util.tree_map_with_path(f, v)


def _prop_setup(cls_setup, zero_bias):
    _, model, v = cls_setup
    if zero_bias:
        v = _zero_bias(v)
    vt = {**v, "text": {"attention_mask": jnp.asarray(MASK), "token_type_ids": jnp.asarray(TYPES)}}
    x = model.apply(v, jnp.asarray(IDS), method="embed_words")
    logits = model.apply(vt, x)
    onehot = jax.nn.one_hot(jnp.argmax(logits, -1), NUM_LABELS, dtype=x.dtype)
    return model, vt, x, logits, onehot


def _softmax_inputs(model, vt, x):
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, T.Softmax):
            seen[module_name(context.module)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply(vt, x)
    return seen


def test_plan_kinds_of_the_bert_layers(cls_setup):
    model, vt, x, _, _ = _prop_setup(cls_setup, False)
    p = engine.plan(model, vt, x, "attnlrp")
    kinds = {e.name: (e.kind, e.rule) for e in p.layers}
    b = "bert.encoder.layer.0.attention.self"
    assert kinds[f"{b}.mask"] == ("mask", Vjp())
    assert kinds[f"{b}.query_heads"] == ("rearrange", Vjp())
    assert kinds["bert.pooler.activation"] == ("activation", Pass())
    assert kinds["bert.embeddings.add"][0] == "add" and kinds["bert.embeddings.tokens"][0] == "rearrange"
    assert not p.functional  # every operation on the input's path is a named layer
    assert not any("word_embeddings" in e.name or "position" in e.name for e in p.layers)


def test_cp_lrp_conserves_on_a_bias_free_bert(cls_setup):
    """CP-LRP, eps 0, no gamma, every bias and the position / token-type embeddings zero: each
    layer conserves, the input total is the target logit, padded tokens get exactly 0 and the
    q.k / softmax / mask path gets nothing."""
    model, vt, x, logits, onehot = _prop_setup(cls_setup, True)
    rx, trace = relevance_trace(model, vt, x, lambda out: onehot * out, C.cp_lrp(0.0, None, None))
    target = (onehot * logits).sum(-1)
    assert float(jnp.abs(target).min()) > 1e-2
    np.testing.assert_allclose(rx.sum((1, 2, 3)), target, rtol=1e-10, atol=1e-12)
    for name, e in trace.items():
        tin, tout = e.totals()
        np.testing.assert_allclose(tin, tout, rtol=1e-9, atol=1e-11, err_msg=name)
    assert float(jnp.abs(rx[MASK == 0]).max()) == 0.0
    b = "bert.encoder.layer.1.attention.self"
    for r in (trace[f"{b}.mask"].output, trace[f"{b}.qk"].output, *trace[f"{b}.attn"].inputs):
        assert float(jnp.abs(r).max()) == 0.0


def test_attnlrp_conserves_except_softmax(cls_setup):
    """AttnLRP, eps 0, no gamma, bias-free: every layer but the softmax conserves (the mask
    layer included); the softmax relevance is x (R - p sum R) with the masked logits at the
    most negative finite value contributing exactly 0; the input total is the target logit minus
    the softmax layers' deficits; padded tokens get exactly 0."""
    model, vt, x, logits, onehot = _prop_setup(cls_setup, True)
    rx, trace = relevance_trace(model, vt, x, lambda out: onehot * out, C.attnlrp(0.0, None, None))
    ins = _softmax_inputs(model, vt, x)
    deficit = jnp.zeros(x.shape[0])
    for name, e in trace.items():
        tin, tout = e.totals()
        if e.kind == "softmax":
            z, R = ins[name], e.output
            p = jax.nn.softmax(z, -1)
            np.testing.assert_allclose(e.inputs[0], z * (R - p * R.sum(-1, keepdims=True)), rtol=1e-9, atol=1e-12)
            masked = jnp.broadcast_to((jnp.asarray(MASK) == 0)[:, None, None, :], R.shape)
            assert float(jnp.abs(jnp.where(masked, R, 0)).max()) == 0.0
            assert float(jnp.abs(jnp.where(masked, e.inputs[0], 0)).max()) == 0.0
            deficit = deficit + (tout - tin)
        else:
            np.testing.assert_allclose(tin, tout, rtol=1e-9, atol=1e-11, err_msg=name)
    assert "bert.encoder.layer.0.attention.self.mask" in trace
    target = (onehot * logits).sum(-1)
    np.testing.assert_allclose(rx.sum((1, 2, 3)), target - deficit, rtol=1e-9, atol=1e-11)
    assert float(jnp.abs(deficit).min()) > 0  # the softmax rule is not conserving
    assert float(jnp.abs(rx[MASK == 0]).max()) == 0.0
    qk = trace["bert.encoder.layer.1.attention.self.qk"]
    assert float(jnp.abs(qk.output).max()) > 0


def _bert_by_hand(p, x, types, mask, heads, mode):
    """A BERT classifier written out here with plain jnp (not the zoo's modules), with the
    modifications under which LRP (eps 0, no gamma) is gradient x input: LayerNorm's std,
    GELU's gelu(x)/x and tanh's tanh(x)/x held constant; ``attnlrp``: each bilinear product
    passes half its gradient to each factor (the softmax rule is its plain gradient times input);
    ``cp``: the attention probabilities are constants."""
    sg = jax.lax.stop_gradient

    def ln(h, q):
        hc = h - h.mean(-1, keepdims=True)
        return hc * sg(jax.lax.rsqrt((hc * hc).mean(-1, keepdims=True) + 1e-12)) * q["scale"] + q["bias"]

    def lin(h, q):
        return h @ q["kernel"] + q["bias"]

    def bilinear(spec, a, b):
        if mode == "cp":
            return jnp.einsum(spec, a, b)
        return 0.5 * (jnp.einsum(spec, a, sg(b)) + jnp.einsum(spec, sg(a), b))

    e = p["bert"]["embeddings"]
    n, t = x.shape[:2]
    h = x[:, :, 0] + e["position_embeddings"]["embedding"][:t] + e["token_type_embeddings"]["embedding"][types]
    h = ln(h, e["LayerNorm"])
    for blk in p["bert"]["encoder"]["layer"].values():
        s = blk["attention"]["self"]
        q, k, v = (lin(h, s[w]).reshape(n, t, heads, -1).transpose(0, 2, 1, 3) for w in ("query", "key", "value"))
        logits = bilinear("...ij,...kj->...ik", q, k) / math.sqrt(q.shape[-1])
        logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, -1)
        if mode == "cp":
            probs = sg(probs)
        ctx = bilinear("...ij,...jk->...ik", probs, v).transpose(0, 2, 1, 3).reshape(n, t, -1)
        a = ln(lin(ctx, blk["attention"]["output"]["dense"]) + h, blk["attention"]["output"]["LayerNorm"])
        m = lin(a, blk["intermediate"]["dense"])
        m = m * sg(jax.nn.gelu(m, approximate=False) / m)
        h = ln(lin(m, blk["output"]["dense"]) + a, blk["output"]["LayerNorm"])
    c = lin(h[:, 0], p["bert"]["pooler"]["dense"])
    c = c * sg(jnp.tanh(c) / c)
    return lin(c, p["classifier"])


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_lrp_equals_modified_gradient_times_input(cls_setup, mode):
    """With every bias and embedding non-zero and padding: AttnLRP / CP-LRP (eps 0, no gamma) ==
    gradient x input of the hand-written BERT with the rules' modifications (an independent
    end-to-end check of every BERT layer's rule, the mask and the Tanh included)."""
    model, vt, x, logits, onehot = _prop_setup(cls_setup, False)
    types, mask = jnp.asarray(TYPES), jnp.asarray(MASK)
    p = vt["params"]
    np.testing.assert_allclose(_bert_by_hand(p, x, types, mask, 2, mode), logits, rtol=1e-12, atol=1e-12)
    gxi = x * jax.grad(lambda xx: (onehot * _bert_by_hand(p, xx, types, mask, 2, mode)).sum())(x)
    comp = C.attnlrp(0.0, None, None) if mode == "attnlrp" else C.cp_lrp(0.0, None, None)
    r = relevance(model, vt, x, lambda out: onehot * out, comp)
    np.testing.assert_allclose(r, gxi, rtol=1e-9, atol=1e-12)
    assert float(jnp.abs(r).max()) > 1e-4


@pytest.mark.parametrize("name", ["attnlrp", "cp-lrp"])
def test_registered_methods_run_on_bert(cls_setup, name):
    """The registered methods (default gamma composites) on the explanation view: (N, T, 1)
    finite maps, exactly 0 on padding, float64 out."""
    model, vt, x, logits, _ = _prop_setup(cls_setup, False)
    target = jnp.argmax(logits, -1)
    m = jax.jit(methods.get(name), static_argnums=0)(model, vt, x, target)
    assert m.shape == (3, 9, 1) and m.dtype == jnp.float64 and bool(jnp.isfinite(m).all())
    assert float(jnp.abs(m[MASK == 0]).max()) == 0.0
    assert float(jnp.abs(m).max()) > 0


def test_tanh_counts_as_not_piecewise_linear():
    """A model whose only non-ReLU step is a Tanh (as BERT's pooler) is refused by the methods
    defined on piecewise-linear networks only (FullGrad, RAP, RSP, EB)."""
    import flax.linen as nn

    from xaijax.methods import NotApplicable, get
    from xaijax.methods._core import non_piecewise_linear_layers
    from xaijax.models import layers as L
    from xaijax.models import transformer_layers as T

    class TanhHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = L.ReLU(name="relu")(L.conv(4, 3, 1, 1, name="conv")(x)).mean((1, 2))
            return L.dense(3, name="fc")(T.Tanh(name="act")(h))

    model = TanhHead()
    x = jnp.ones((1, 8, 8, 3))
    v = model.init(jax.random.key(0), x)
    assert non_piecewise_linear_layers(model, v, x) == ("Tanh (act)",)
    for name in ("fullgrad", "rap"):
        with pytest.raises(NotApplicable, match="Tanh"):
            get(name)(model, v, x, 0)
