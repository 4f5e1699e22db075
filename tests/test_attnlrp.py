"""AttnLRP / CP-LRP: transformer rules against their closed forms, conservation on tiny ViT/DeiT."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods import registry
from xaijax.models import layers
from xaijax.models import transformer_layers as T
from xaijax.models import vit
from xaijax.models.taps import module_name
from xaijax.propagation import composites as C
from xaijax.propagation import engine, relevance, relevance_trace
from xaijax.propagation.rules import Epsilon, Gamma, LayerView, Pass, Vjp
from xaijax.propagation.transformer_rules import BilinearUniform, ConstantFactor, LayerNormRule, SoftmaxRule, Stop


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------- single layers


def test_layernorm_rule_closed_form(x64):
    """R_i = x_i sum_j (delta_ij - 1/D) r scale_j R_j / z_j; linearized view == the layer."""
    rng = _rng(0)
    d = 6
    x = jnp.asarray(rng.standard_normal((2, 3, d)))
    scale, bias = rng.uniform(0.5, 2.0, d), rng.standard_normal(d)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    view = engine._view_builder(T.LayerNorm(1e-6), "layernorm", {}, "ln", False)(params)
    out = view.fn(x)
    np.testing.assert_allclose(view.linearized(x), out, rtol=1e-14, atol=1e-14)
    R = jnp.asarray(rng.standard_normal(out.shape))
    got = np.asarray(LayerNormRule(0.0).backward(view, (x,), out, R)[0])
    xn, Rn, zn = np.asarray(x), np.asarray(R), np.asarray(out)
    want = np.zeros_like(xn)
    for idx in np.ndindex(*xn.shape[:-1]):
        row = xn[idx]
        r = 1.0 / np.sqrt(np.mean((row - row.mean()) ** 2) + 1e-6)
        for i in range(d):
            want[idx + (i,)] = row[i] * sum(((i == j) - 1.0 / d) * r * scale[j] * Rn[idx + (j,)] / zn[idx + (j,)] for j in range(d))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # zero bias: conserving per row
    params0 = {"params": {"scale": jnp.asarray(scale), "bias": jnp.zeros(d)}}
    view0 = engine._view_builder(T.LayerNorm(1e-6), "layernorm", {}, "ln", False)(params0)
    out0 = view0.fn(x)
    r0 = LayerNormRule(0.0).backward(view0, (x,), out0, R)[0]
    np.testing.assert_allclose(r0.sum(-1), R.sum(-1), rtol=1e-10, atol=1e-12)
    # the full derivative (plain epsilon rule) is not conserving: the rule differs from it
    plain = Epsilon(0.0).backward(view0, (x,), out0, R)[0]
    assert float(jnp.abs(plain.sum(-1) - R.sum(-1)).max()) > 1e-3


def test_softmax_rule_closed_form(x64):
    """R_in = x (R - p sum R) over the softmax axis; -inf inputs count as 0."""
    rng = _rng(1)
    x = rng.standard_normal((2, 2, 4, 5))
    x[0, 0, 1, 3] = -np.inf
    x = jnp.asarray(x)
    for axis in (-1, 2):
        view = engine._view_builder(T.Softmax(axis=axis), "softmax", {}, "attn", False)({})
        p = view.fn(x)
        R = jnp.asarray(rng.standard_normal(p.shape))
        got = np.asarray(SoftmaxRule().backward(view, (x,), p, R)[0])
        xn, pn, Rn = np.where(np.isneginf(np.asarray(x)), 0.0, np.asarray(x)), np.asarray(p), np.asarray(R)
        want = xn * (Rn - pn * Rn.sum(axis, keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
        # deficit: sum R_in = sum x R - (sum x p) sum R (per softmax row)
        lhs = got.sum(axis)
        rhs = (xn * Rn).sum(axis) - (xn * pn).sum(axis) * Rn.sum(axis)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-12)
        assert np.isfinite(got).all()


def _matmul_view(scale, transpose_b):
    return engine._view_builder(T.MatMul(scale=scale, transpose_b=transpose_b), "matmul", {}, "qk", False)({})


def test_bilinear_uniform_closed_form(x64):
    """q.k^T * scale: R_q[i,j] = sum_k q_ij k_kj c R_ik / (2 z_ik), R_k likewise; sums to R."""
    rng = _rng(2)
    q, k = jnp.asarray(rng.standard_normal((1, 2, 3, 4))), jnp.asarray(rng.standard_normal((1, 2, 5, 4)))
    c = 0.5
    view = _matmul_view(c, True)
    z = view.fn(q, k)
    R = jnp.asarray(rng.standard_normal(z.shape))
    rq, rk = BilinearUniform(0.0).backward(view, (q, k), z, R)
    qn, kn, zn, Rn = map(np.asarray, (q, k, z, R))
    wq = np.einsum("hij,hkj,hik->hij", qn[0], kn[0], c * Rn[0] / (2 * zn[0]))
    wk = np.einsum("hij,hkj,hik->hkj", qn[0], kn[0], c * Rn[0] / (2 * zn[0]))
    np.testing.assert_allclose(np.asarray(rq)[0], wq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(rk)[0], wk, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(rq.sum() + rk.sum()), float(R.sum()), rtol=1e-10)
    # each factor gets exactly half of the epsilon rule's (doubled) total
    ra, rb = Epsilon(0.0).backward(view, (q, k), z, R)
    np.testing.assert_allclose(np.asarray(rq), np.asarray(ra) / 2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(ra.sum() + rb.sum()), 2 * float(R.sum()), rtol=1e-10)


def test_constant_factor_closed_form(x64):
    """CP-LRP attention.v: R_attn = 0, R_v[j,d] = sum_i A_ij v_jd R_id / z_id (conserving)."""
    rng = _rng(3)
    a = jax.nn.softmax(jnp.asarray(rng.standard_normal((1, 2, 4, 4))), -1)
    v = jnp.asarray(rng.standard_normal((1, 2, 4, 3)))
    view = _matmul_view(1.0, False)
    z = view.fn(a, v)
    R = jnp.asarray(rng.standard_normal(z.shape))
    ra, rv = ConstantFactor(0, 0.0).backward(view, (a, v), z, R)
    assert float(jnp.abs(ra).max()) == 0.0
    want = np.einsum("hij,hjd,hid->hjd", np.asarray(a)[0], np.asarray(v)[0], np.asarray(R)[0] / np.asarray(z)[0])
    np.testing.assert_allclose(np.asarray(rv)[0], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(rv.sum()), float(R.sum()), rtol=1e-10)
    rs = Stop().backward(view, (a, v), z, R)
    assert all(float(jnp.abs(r).max()) == 0.0 and r.shape == x.shape for r, x in zip(rs, (a, v)))


# ------------------------------------------------------------------ tiny transformers

CFG = dict(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5)
MODELS = ["vit", "deit", "deit_distilled"]

_BIAS_LIKE = ("bias", "pos_embedding", "pos_embed", "class_token", "cls_token", "dist_token")


def _model(kind, num_layers=CFG["num_layers"]):
    cfg = dict(CFG, num_layers=num_layers)
    if kind == "vit":
        return vit.VisionTransformer(**cfg)
    return vit.DeiT(**cfg, distilled=kind == "deit_distilled")


def _variables(model, x, zero_bias):
    v = model.init(jax.random.PRNGKey(1), x)
    rng = _rng(7)

    def fill(path, a):
        name = path[-1].key
        if zero_bias and name in _BIAS_LIKE:
            return jnp.zeros_like(a)
        if name == "scale":  # LayerNorm scale: not all ones
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
        if name == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(fan_in), a.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(fill, v)


def _setup(kind, zero_bias=True):
    model = _model(kind)
    x = jnp.asarray(_rng(5).standard_normal((2, 16, 16, 3)))
    v = _variables(model, x, zero_bias)
    logits = model.apply(v, x)
    target = jnp.argmax(logits, -1)
    onehot = jax.nn.one_hot(target, CFG["num_classes"], dtype=x.dtype)
    return model, v, x, logits, onehot


def _seed(onehot):
    return lambda out: onehot * out


@pytest.mark.parametrize("kind", MODELS)
def test_cp_lrp_conserves_layer_by_layer_and_blocks_qk_path(x64, kind):
    """Bias-free (biases, position embedding, prefix tokens zero), eps 0, no gamma: every
    layer conserves, the input total is the target logit, and the q.k / softmax path gets 0."""
    model, v, x, logits, onehot = _setup(kind)
    rx, trace = relevance_trace(model, v, x, _seed(onehot), C.cp_lrp(0.0, None, None))
    target_logit = (onehot * logits).sum(-1)
    np.testing.assert_allclose(rx.sum((1, 2, 3)), target_logit, rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(target_logit).min()) > 1e-3
    for name, e in trace.items():
        tin, tout = e.totals()
        np.testing.assert_allclose(tin, tout, rtol=1e-9, atol=1e-11, err_msg=name)
    kinds = {e.kind for e in trace.values()}
    assert {"layernorm", "softmax", "matmul", "activation", "rearrange"} <= kinds
    blocks = model.block_layers
    attn = "self_attention" if kind == "vit" else "attn"
    for b in blocks:
        qk, sm, av, split = (trace[f"{b}.{attn}.{s}"] for s in ("qk", "attn", "av", "split"))
        for r in (*qk.inputs, qk.output, sm.output, *sm.inputs, av.inputs[0], split.output[0], split.output[1]):
            assert float(jnp.abs(r).max()) == 0.0
        assert float(jnp.abs(split.output[2]).max()) > 0  # all of it goes through v
    if kind == "deit_distilled":
        tin, tout = trace["head_mean"].totals()
        np.testing.assert_allclose(tout, target_logit, rtol=1e-12)


@pytest.mark.parametrize("kind", MODELS)
def test_attnlrp_conserves_except_softmax(x64, kind):
    """AttnLRP, eps 0, no gamma, bias-free: every layer but the softmax conserves; the input
    total is the target logit minus what the softmax layers absorb (their closed-form deficit)."""
    model, v, x, logits, onehot = _setup(kind)
    rx, trace = relevance_trace(model, v, x, _seed(onehot), C.attnlrp(0.0, None, None))
    deficit = jnp.zeros(x.shape[0])
    n_softmax = 0
    for name, e in trace.items():
        tin, tout = e.totals()
        if e.kind == "softmax":
            n_softmax += 1
            logits_in = _softmax_input(model, v, x, name)
            R, p = e.output, jax.nn.softmax(logits_in, -1)
            np.testing.assert_allclose(
                e.inputs[0], logits_in * (R - p * R.sum(-1, keepdims=True)), rtol=1e-9, atol=1e-12, err_msg=name
            )
            deficit = deficit + (tout - tin)
        else:
            np.testing.assert_allclose(tin, tout, rtol=1e-9, atol=1e-11, err_msg=name)
    assert n_softmax == CFG["num_layers"]
    target_logit = (onehot * logits).sum(-1)
    np.testing.assert_allclose(rx.sum((1, 2, 3)), target_logit - deficit, rtol=1e-9, atol=1e-11)
    # the q.k product is reached (unlike CP-LRP) and splits its relevance half and half
    b = model.block_layers[-1]
    qk = trace[f"{b}.{'self_attention' if kind == 'vit' else 'attn'}.qk"]
    assert float(jnp.abs(qk.output).max()) > 0
    np.testing.assert_allclose(float(qk.inputs[0].sum() + qk.inputs[1].sum()), float(qk.output.sum()), rtol=1e-9, atol=1e-12)


def _softmax_input(model, v, x, name):
    """The logits entering softmax layer ``name`` (captured with flax's intercept_methods)."""
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, T.Softmax):
            if module_name(context.module) == name:
                seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply(v, x)
    return seen["x"]


def test_attnlrp_with_gamma_conserves_on_bias_free_linear_layers(x64):
    """The default composite (gamma 0.25 / 0.05, stabilizer 1e-9, eps 1e-6): linear layers of a
    bias-free ViT still conserve up to the stabilizers."""
    model, v, x, logits, onehot = _setup("vit")
    _, trace = relevance_trace(model, v, x, _seed(onehot), "attnlrp")
    checked = 0
    for name, e in trace.items():
        if e.kind in ("dense", "conv"):
            assert isinstance(e.rule, Gamma)
            tin, tout = e.totals()
            np.testing.assert_allclose(tin, tout, rtol=1e-5, atol=1e-8, err_msg=name)
            checked += 1
    assert checked == 1 + 4 * CFG["num_layers"] + 1


@pytest.mark.parametrize("name", sorted(C.names()))
def test_every_composite_runs_on_a_vit(name):
    """Every built-in composite plans and propagates on a ViT (finite, input-shaped)."""
    model = _model("vit", num_layers=1)
    x = jnp.asarray(_rng(5).standard_normal((2, 16, 16, 3)), jnp.float32)
    v = _variables(model, x, zero_bias=False)
    r = relevance(model, v, x, lambda out: jax.nn.one_hot(jnp.argmax(out, -1), 5) * out, name)
    assert r.shape == x.shape and bool(jnp.isfinite(r).all())


@pytest.mark.parametrize("name", ["attnlrp", "cp-lrp", "lrp-epsilon"])
def test_methods_on_deit(name):
    model = _model("deit_distilled", num_layers=1)
    x = jnp.asarray(_rng(5).standard_normal((2, 16, 16, 3)), jnp.float32)
    v = _variables(model, x, zero_bias=False)
    method = registry.get(name)
    assert method.kind == "attribution"
    m = jax.jit(method, static_argnums=0)(model, v, x, jnp.array([1, 3]))
    assert m.shape == (2, 16, 16) and bool(jnp.isfinite(m).all())
    # samples are independent
    x2 = x.at[1].set(-x[1])
    m2 = jax.jit(method, static_argnums=0)(model, v, x2, jnp.array([1, 3]))
    np.testing.assert_allclose(m2[0], m[0], rtol=1e-5, atol=1e-6)


def test_plan_describes_transformer_kinds():
    model = _model("deit_distilled")
    x = jnp.zeros((1, 16, 16, 3))
    v = _variables(model, x, zero_bias=False)
    text = engine.plan(model, v, x, "attnlrp").describe()
    for line in (
        "blocks.0.norm1: layernorm -> LayerNormRule(eps=1e-06)",
        "blocks.0.attn.attn: softmax -> SoftmaxRule()",
        "blocks.0.attn.qk: matmul -> BilinearUniform(eps=1e-06)",
        "blocks.0.attn.split: rearrange -> Vjp()",
        "blocks.1.mlp.act: activation -> Pass()",
        "head_mean: average -> Epsilon(eps=0.0)",
        "blocks.0.mlp.fc1: dense -> Gamma(gamma=0.05, stabilizer=1e-09)",
        "patch_embed.proj: conv -> Gamma(gamma=0.25, stabilizer=1e-09)",
    ):
        assert line in text.splitlines(), line
    cp = engine.plan(model, v, x, "cp-lrp").describe()
    assert "blocks.1.attn.av: matmul -> ConstantFactor(index=0, eps=1e-06)" in cp
    assert "blocks.1.attn.attn: softmax -> Stop()" in cp


def test_clear_errors_for_rules_that_do_not_fit():
    model = _model("vit", num_layers=1)
    x = jnp.zeros((1, 16, 16, 3))
    v = _variables(model, x, zero_bias=False)
    with pytest.raises(ValueError, match="needs a weighted layer.*'softmax' layer"):
        engine.plan(model, v, x, C.Composite(kinds={"softmax": Gamma()}))
    with pytest.raises(ValueError, match="needs a weighted layer.*'layernorm' layer"):
        engine.plan(model, v, x, C.attnlrp().replace(kinds={"layernorm": Gamma()}))
    with pytest.raises(ValueError, match="applies to LayerNorm layers.*'dense' layer"):
        engine.plan(model, v, x, C.Composite(dense=LayerNormRule()))
    with pytest.raises(ValueError, match="applies to softmax layers.*'layernorm'"):
        engine.plan(model, v, x, C.Composite(kinds={"layernorm": SoftmaxRule()}))
    with pytest.raises(ValueError, match="returns 3 arrays; rule Pass"):
        engine.plan(model, v, x, C.Composite(names={"*.split": Pass()}))
    with pytest.raises(ValueError, match="two factors.*has 1 inputs"):
        engine.plan(model, v, x, C.Composite(kinds={"activation": ConstantFactor()}))
    with pytest.raises(ValueError, match="ConstantFactor index must be 0 or 1"):
        ConstantFactor(2)
    with pytest.raises(ValueError, match="unknown layer kind 'attention'"):
        C.Composite(kinds={"attention": Vjp()})


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu")(layers.conv(4, 3, 1, 1, name="conv")(x))
        return layers.dense(3, name="fc")(layers.Flatten(name="flat")(h))


def test_attnlrp_on_a_cnn_is_epsilon_lrp(x64):
    """Without transformer layers, attnlrp with no gamma is LRP-epsilon, with gamma it is
    gamma on the convolutions and dense layers."""
    model = _CNN()
    x = jnp.asarray(_rng(9).standard_normal((2, 6, 6, 3)))
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(_rng(10).standard_normal(a.shape)), model.init(jax.random.PRNGKey(0), x))
    seed = lambda out: jax.nn.one_hot(jnp.array([0, 2]), 3, dtype=out.dtype) * out  # noqa: E731
    a = relevance(model, v, x, seed, C.attnlrp(1e-6, None, None))
    b = relevance(model, v, x, seed, C.epsilon(1e-6))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    g = relevance(model, v, x, seed, "attnlrp")
    h = relevance(model, v, x, seed, C.Composite(Gamma(0.25), Gamma(0.05)))
    np.testing.assert_allclose(g, h, rtol=1e-12, atol=1e-14)


# ------------------------------------------- independent end-to-end: modified gradient x input


def _vit_by_hand(p, x, heads, mode):
    """A tiny torchvision-layout ViT written out here (not the zoo's modules), with the
    modifications under which LRP with eps 0 and no gamma is gradient x input (the "efficient"
    form of AttnLRP / CP-LRP): LayerNorm's std and GELU's ratio gelu(x)/x held constant;
    ``mode="attnlrp"``: each bilinear product passes half its gradient to each factor;
    ``mode="cp"``: the attention probabilities are constants."""
    sg = jax.lax.stop_gradient
    p = jax.tree_util.tree_map(lambda a: a.astype(x.dtype), p)

    def ln(h, q):
        hc = h - h.mean(-1, keepdims=True)
        return hc * sg(jax.lax.rsqrt((hc * hc).mean(-1, keepdims=True) + 1e-6)) * q["scale"] + q["bias"]

    def bilinear(spec, a, b):
        if mode == "cp":
            return jnp.einsum(spec, a, b)
        return 0.5 * (jnp.einsum(spec, a, sg(b)) + jnp.einsum(spec, sg(a), b))

    n = x.shape[0]
    k = p["conv_proj"]["kernel"]
    h = jax.lax.conv_general_dilated(x, k, k.shape[:2], "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = (h + p["conv_proj"]["bias"]).reshape(n, -1, k.shape[-1])
    h = jnp.concatenate([jnp.broadcast_to(p["class_token"], (n, 1, h.shape[-1])), h], 1) + p["encoder"]["pos_embedding"]
    for blk in p["encoder"]["layers"].values():
        a = ln(h, blk["ln_1"])
        att = blk["self_attention"]
        qkv = a @ att["in_proj"]["kernel"] + att["in_proj"]["bias"]
        t, d = qkv.shape[1], qkv.shape[2] // 3
        q, kk, v = (qkv[..., i * d:(i + 1) * d].reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3) for i in range(3))
        logits = bilinear("...ij,...kj->...ik", q, kk) * (d // heads) ** -0.5
        probs = jax.nn.softmax(logits, -1)
        if mode == "cp":
            probs = sg(probs)
        o = bilinear("...ij,...jk->...ik", probs, v).transpose(0, 2, 1, 3).reshape(n, t, d)
        h = h + o @ att["out_proj"]["kernel"] + att["out_proj"]["bias"]
        m = ln(h, blk["ln_2"]) @ blk["mlp"]["0"]["kernel"] + blk["mlp"]["0"]["bias"]
        m = m * sg(jax.nn.gelu(m, approximate=False) / m)
        h = h + m @ blk["mlp"]["3"]["kernel"] + blk["mlp"]["3"]["bias"]
    h = ln(h, p["encoder"]["ln"])[:, 0]
    return h @ p["heads"]["head"]["kernel"] + p["heads"]["head"]["bias"]


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_lrp_equals_modified_gradient_times_input_on_a_biased_vit(x64, mode):
    """With biases, position embedding and class token all non-zero: AttnLRP / CP-LRP (eps 0,
    no gamma) == gradient x input of a hand-written ViT with the rules' modifications."""
    model, v, x, logits, onehot = _setup("vit", zero_bias=False)
    hand = _vit_by_hand(v["params"], x, CFG["num_heads"], mode)
    np.testing.assert_allclose(hand, logits, rtol=1e-12, atol=1e-12)  # the same network
    gxi = x * jax.grad(lambda xx: (onehot * _vit_by_hand(v["params"], xx, CFG["num_heads"], mode)).sum())(x)
    comp = C.attnlrp(0.0, None, None) if mode == "attnlrp" else C.cp_lrp(0.0, None, None)
    r = relevance(model, v, x, _seed(onehot), comp)
    np.testing.assert_allclose(r, gxi, rtol=1e-9, atol=1e-12)
    # and it is not the plain gradient x input of the unmodified network
    plain = x * jax.grad(lambda xx: (onehot * model.apply(v, xx)).sum())(x)
    assert float(jnp.abs(plain - r).max()) > 1e-3 * float(jnp.abs(r).max())
