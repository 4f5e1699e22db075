"""Attention-based methods for vision transformers against direct formulas (float64).

The references are independent of the library: an explicitly written ViT/DeiT forward pass
(jnp, from the parameter dict) gives the attention probabilities and, through ``jax.grad``,
their gradients; the combination formulas are NumPy loops over samples, blocks and heads;
attention flow is checked against a linear program (scipy's HiGHS).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import imageops
from xaijax import methods as M
from xaijax.methods import attention as att
from xaijax.models import taps, vit
from xaijax.models import transformer_layers as T
from xaijax.models import layers as LL
from xaijax.propagation.composites import KINDS, Composite
from xaijax.propagation.rules import Epsilon, Vjp

NUM_CLASSES = 5


def _model(kind: str, layers: int = 2):
    cfg = dict(image_size=16, patch_size=4, num_layers=layers, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=NUM_CLASSES)
    if kind == "vit":
        return vit.VisionTransformer(**cfg)
    return vit.DeiT(**cfg, distilled=(kind == "deit_distilled"))


def _variables(model, seed=0, dtype=jnp.float64):
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    rng = np.random.default_rng(seed)

    def leaf(path, l):
        last = str(path[-1].key)
        if last == "scale":  # LayerNorm
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=l.shape), dtype)
        return jnp.asarray(0.6 * rng.normal(size=l.shape), dtype)

    return jax.tree_util.tree_map_with_path(leaf, tmpl)


def _images(n=2, seed=1, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 16, 16, 3)), dtype)


# ----------------------------------------------------------------- explicit reference


def _ln(h, p, eps=1e-6):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _reference(model, variables, x, deltas=None):
    """Forward pass written from the parameters: ``(logits, [A_l (N, heads, T, T)], final tokens)``.

    ``deltas[l]`` is added to block ``l``'s attention probabilities (for their gradients).
    """
    p = variables["params"]
    tv = isinstance(model, vit.VisionTransformer)
    n, h, w, c = x.shape
    ps, d, heads = model.patch_size, model.hidden_dim, model.num_heads
    g = h // ps
    conv = p["conv_proj"] if tv else p["patch_embed"]["proj"]
    patches = x.reshape(n, g, ps, g, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, ps * ps * c)
    tok = patches @ conv["kernel"].reshape(ps * ps * c, d) + conv["bias"]
    if tv:
        prefix = [p["class_token"]]
        pos = p["encoder"]["pos_embedding"]
    else:
        prefix = [p["cls_token"]] + ([p["dist_token"]] if model.distilled else [])
        pos = p["pos_embed"]
    z = jnp.concatenate([jnp.broadcast_to(t, (n, 1, d)) for t in prefix] + [tok], axis=1) + pos
    atts = []
    hd = d // heads
    for l in range(model.num_layers):
        if tv:
            b = p["encoder"]["layers"][f"encoder_layer_{l}"]
            n1, n2, qkv, proj = b["ln_1"], b["ln_2"], b["self_attention"]["in_proj"], b["self_attention"]["out_proj"]
            f1, f2 = b["mlp"]["0"], b["mlp"]["3"]
        else:
            b = p["blocks"][str(l)]
            n1, n2, qkv, proj = b["norm1"], b["norm2"], b["attn"]["qkv"], b["attn"]["proj"]
            f1, f2 = b["mlp"]["fc1"], b["mlp"]["fc2"]
        y = _ln(z, n1) @ qkv["kernel"] + qkv["bias"]
        t = y.shape[1]
        q, k, v = (y[..., i * d : (i + 1) * d].reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
        a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), axis=-1)
        if deltas is not None:
            a = a + deltas[l]
        atts.append(a)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        z = z + o @ proj["kernel"] + proj["bias"]
        m = _ln(z, n2) @ f1["kernel"] + f1["bias"]
        m = 0.5 * m * (1.0 + jax.scipy.special.erf(m / math.sqrt(2.0)))
        z = z + m @ f2["kernel"] + f2["bias"]
    z = _ln(z, p["encoder"]["ln"] if tv else p["norm"])
    if tv:
        logits = z[:, 0] @ p["heads"]["head"]["kernel"] + p["heads"]["head"]["bias"]
    else:
        logits = z[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]
        if model.distilled:
            logits = 0.5 * (logits + z[:, 1] @ p["head_dist"]["kernel"] + p["head_dist"]["bias"])
    return logits, atts, z


@functools.partial(jax.jit, static_argnums=0)
def _ref_attention_grads_jit(model, variables, x, target):
    _, atts, _ = _reference(model, variables, x)
    zeros = [jnp.zeros_like(a) for a in atts]

    def score(ds):
        logits = _reference(model, variables, x, ds)[0]
        return logits[jnp.arange(x.shape[0]), target].sum()

    return atts, jax.grad(score)(zeros)


def _ref_attention_grads(model, variables, x, target):
    """Attention probabilities (NumPy) and d(target logit)/dA through the explicit reference."""
    atts, grads = _ref_attention_grads_jit(model, variables, x, jnp.asarray(target))
    return [np.asarray(a) for a in atts], [np.asarray(gr) for gr in grads]


def _layer_map(method, model, variables, x, target):
    """``method.layer_map`` jitted (the model static): one compilation instead of op-by-op dispatch."""
    return jax.jit(method.layer_map, static_argnums=0)(model, variables, x, jnp.asarray(target))


def _mean_heads(a):
    """(heads, T, T) -> (T, T) by an explicit loop."""
    out = np.zeros(a.shape[1:])
    for h in range(a.shape[0]):
        out += a[h]
    return out / a.shape[0]


def _grid(row, model):
    g = model.grid_size
    return row[model.num_prefix_tokens :].reshape(g, g)


def _accumulate(abars):
    r = np.eye(abars[0].shape[0])
    for ab in abars:
        r = r + ab @ r
    return r


KINDS_ = ["vit", "deit_distilled"]  # torchvision and timm layouts; 1 and 2 prefix tokens


@pytest.fixture(scope="module")
def setups():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    out = {}
    for kind in KINDS_:
        model = _model(kind)
        out[kind] = (model, _variables(model, seed=len(kind)), _images())
    small = _model("deit_distilled", layers=1)  # for the jit/vmap contracts: less to compile
    out["small"] = (small, _variables(small, seed=3), _images())
    yield out
    jax.config.update("jax_enable_x64", prev)


def test_reference_matches_model(setups, x64):
    """The explicit reference is the zoo model: same logits and attention probabilities."""
    for kind, (model, variables, x) in setups.items():
        logits, atts, _ = _reference(model, variables, x)
        out, acts = taps.forward(model, variables, x, capture=model.attention_layers)
        np.testing.assert_allclose(logits, out, rtol=1e-10, atol=1e-10)
        for a, name in zip(atts, model.attention_layers):
            np.testing.assert_allclose(a, acts[name], rtol=1e-10, atol=1e-12)
        # not a degenerate (uniform) attention: the methods' tests would be weak
        assert float(np.std(np.asarray(atts[-1]))) > 0.05


# ------------------------------------------------------------------ the five methods


@pytest.mark.parametrize("kind", KINDS_)
def test_raw_attention(setups, kind, x64):
    model, variables, x = setups[kind]
    atts, _ = _ref_attention_grads(model, variables, x, jnp.zeros(2, int))
    got = _layer_map(M.get("raw-attention"), model, variables, x, 0)
    assert got.shape == (2, model.grid_size, model.grid_size) and got.dtype == jnp.float64
    for i in range(2):
        want = _grid(_mean_heads(atts[-1][i])[0], model)
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-13)
    # another block, max fusion
    got0 = _layer_map(M.get("raw-attention", block=0, head_fusion="max"), model, variables, x, 0)
    np.testing.assert_allclose(got0[1], _grid(atts[0][1].max(0)[0], model), rtol=1e-10)
    # distilled DeiT: both prefix tokens dropped, so the map is not the class row from token 1
    if kind == "deit_distilled":
        assert model.num_prefix_tokens == 2
        shifted = _mean_heads(atts[-1][0])[0][1:-1].reshape(model.grid_size, model.grid_size)
        assert not np.allclose(got[0], shifted)


@pytest.mark.parametrize("kind", KINDS_)
@pytest.mark.parametrize("fusion,residual,start", [("mean", 0.5, 0), ("max", 0.3, 0), ("min", 0.5, 1)])
def test_attention_rollout(setups, kind, fusion, residual, start, x64):
    model, variables, x = setups[kind]
    atts, _ = _ref_attention_grads(model, variables, x, jnp.zeros(2, int))
    got = _layer_map(M.get("attention-rollout", head_fusion=fusion, residual=residual, start_layer=start), model, variables, x, 1)
    reduce = {"mean": _mean_heads, "max": lambda a: a.max(0), "min": lambda a: a.min(0)}[fusion]
    t = atts[0].shape[-1]
    for i in range(2):
        joint = np.eye(t)
        for l in range(start, model.num_layers):
            ab = (1 - residual) * reduce(atts[l][i]) + residual * np.eye(t)
            ab = ab / ab.sum(1, keepdims=True)
            joint = ab @ joint
        np.testing.assert_allclose(joint.sum(1), 1.0, rtol=1e-12)  # rows sum to 1 before selecting
        np.testing.assert_allclose(got[i], _grid(joint[0], model), rtol=1e-10, atol=1e-13)


def test_rollout_rows_sum_to_one(setups, x64):
    model, variables, x = setups["deit_distilled"]
    probs = att.attention_probabilities(model, variables, x)
    t = 2 + model.grid_size**2
    for fusion in att.HEAD_FUSIONS:
        r = att.rollout(probs, fusion, 0.2)
        assert r.shape == (2, t, t)
        np.testing.assert_allclose(np.asarray(r).sum(-1), 1.0, rtol=1e-12)
        assert float(r.min()) > 0


@pytest.mark.parametrize("kind", KINDS_)
def test_generic_attention(setups, kind, x64):
    model, variables, x = setups[kind]
    target = jnp.array([3, 1])
    atts, grads = _ref_attention_grads(model, variables, x, target)
    got = _layer_map(M.get("generic-attention"), model, variables, x, target)
    for i in range(2):
        abars = [_mean_heads(np.maximum(grads[l][i] * atts[l][i], 0)) for l in range(model.num_layers)]
        want = _grid(_accumulate(abars)[0], model)
        assert np.abs(want).max() > 1e-6  # not trivially zero
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-13)
    # start_layer=1 uses the last block only
    got1 = _layer_map(M.get("generic-attention", start_layer=1), model, variables, x, target)
    want1 = _grid(_accumulate([_mean_heads(np.maximum(grads[1][0] * atts[1][0], 0))])[0], model)
    np.testing.assert_allclose(got1[0], want1, rtol=1e-9, atol=1e-13)
    # a seed target: the same as class indices given as one-hot rows
    seed = jax.nn.one_hot(target, NUM_CLASSES, dtype=jnp.float64)
    np.testing.assert_allclose(_layer_map(M.get("generic-attention"), model, variables, x, seed), got, rtol=1e-12)


def _lp_max_flow(cap, source, sink):
    """Max flow of a layered graph by linear programming (independent of the library's algorithm)."""
    from scipy.optimize import linprog

    nl, t, _ = cap.shape
    ne = nl * t * t  # edge (l, i, j): (l, j) -> (l+1, i), variable index l*t*t + i*t + j
    idx = lambda l, i, j: (l * t + i) * t + j  # noqa: E731
    rows = []
    for l in range(1, nl):  # conservation at intermediate layers
        for v in range(t):
            row = np.zeros(ne)
            for j in range(t):
                row[idx(l - 1, v, j)] += 1.0  # in
            for i in range(t):
                row[idx(l, i, v)] -= 1.0  # out
            rows.append(row)
    cons = []
    for i in range(t):  # only the source sends at layer 0; only the sink receives at the top
        for j in range(t):
            if j != source:
                cons.append(idx(0, i, j))
            if i != sink:
                cons.append(idx(nl - 1, i, j))
    bounds = [(0.0, float(c)) for c in cap.reshape(-1)]
    for k in cons:
        bounds[k] = (0.0, 0.0)
    obj = np.zeros(ne)
    for j in range(t):
        obj[idx(nl - 1, sink, j)] = -1.0
    res = linprog(obj, A_eq=np.array(rows), b_eq=np.zeros(len(rows)), bounds=bounds, method="highs")
    assert res.status == 0
    return -res.fun


def test_layered_max_flow_matches_linear_program(x64):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    for trial in range(4):
        nl, t = 3, 5
        cap = rng.uniform(size=(nl, t, t)) * (rng.uniform(size=(nl, t, t)) < 0.5)
        flows = jax.jit(jax.vmap(lambda s: att.layered_max_flow(jnp.asarray(cap), s, 1)))(jnp.arange(t))
        for s in range(t):
            np.testing.assert_allclose(float(flows[s]), _lp_max_flow(cap, s, 1), rtol=1e-9, atol=1e-12)
    # a graph whose max flow needs a back edge (reverse residual): the greedy path is wrong
    cap = np.zeros((3, 3, 3))
    cap[0, 1, 0] = cap[0, 2, 0] = 1.0  # s=(0,0) -> (1,1), (1,2)
    cap[1, 1, 1] = 1.0  # (1,1) -> (2,1)
    cap[1, 2, 1] = 1.0  # (1,1) -> (2,2)
    cap[1, 1, 2] = 1.0  # (1,2) -> (2,1)
    cap[2, 0, 2] = 1.0  # (2,2) -> sink (3,0)
    cap[2, 0, 1] = 1.0  # (2,1) -> sink
    assert float(att.layered_max_flow(jnp.asarray(cap), 0, 0)) == pytest.approx(2.0, abs=1e-12)
    assert _lp_max_flow(cap, 0, 0) == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize("kind", KINDS_)
def test_attention_flow(setups, kind, x64):
    pytest.importorskip("scipy")
    model, variables, x = setups[kind]
    atts, _ = _ref_attention_grads(model, variables, x, jnp.zeros(2, int))
    got = _layer_map(M.get("attention-flow", chunk=5), model, variables, x, 0)
    t = atts[0].shape[-1]
    p = model.num_prefix_tokens
    for i in range(1):
        cap = []
        for l in range(model.num_layers):
            ab = 0.5 * _mean_heads(atts[l][i]) + 0.5 * np.eye(t)
            cap.append(ab / ab.sum(1, keepdims=True))
        cap = np.stack(cap)
        want = np.array([_lp_max_flow(cap, j, 0) for j in range(p, t)]).reshape(model.grid_size, model.grid_size)
        np.testing.assert_allclose(got[i], want, rtol=1e-8, atol=1e-10)
        # flow differs from rollout (it is not rollout in disguise)
        roll = _layer_map(M.get("attention-rollout"), model, variables, x, 0)
        assert not np.allclose(got[i], roll[i], rtol=1e-3)


def _vjp_composite():
    """Every layer passes relevance by its plain VJP: relevance at a layer is then dS/d(layer)."""
    tl = [getattr(T, n) for n in T.__all__]
    return Composite(conv=Vjp(), dense=Vjp(), kinds={k: Vjp() for k in KINDS}, types={t: Vjp() for t in tl})


@functools.partial(jax.jit, static_argnums=0)
def _ref_tokens(model, variables, x):
    return _reference(model, variables, x)[2]


@functools.partial(jax.jit, static_argnums=0)
def _ref_tokens_vjp(model, variables, x, cot):
    """The cotangent of each block's attention probabilities for the cotangent ``cot`` of the final tokens."""
    zeros = [jnp.zeros_like(a) for a in _reference(model, variables, x)[1]]
    _, pull = jax.vjp(lambda ds: _reference(model, variables, x, ds)[2], zeros)
    return pull(cot)[0]


def _chefer_ref(model, variables, x, target, cotangent):
    """Chefer et al.'s accumulation with R_A = vjp of (A -> final tokens) at ``cotangent(final tokens)``."""
    atts, grads = _ref_attention_grads(model, variables, x, target)
    z = _ref_tokens(model, variables, x)
    rel = _ref_tokens_vjp(model, variables, x, cotangent(z))
    maps = []
    for i in range(x.shape[0]):
        abars = [_mean_heads(np.maximum(grads[l][i] * np.asarray(rel[l][i]), 0)) for l in range(model.num_layers)]
        maps.append(_grid(_accumulate(abars)[0], model))
    return np.stack(maps)


def test_chefer_lrp_combination_formula(setups, x64):
    """chefer-lrp with relevance functions computed independently: (a) every rule the plain VJP
    (R_A = dS/dA), (b) the z-rule on the classifier (R at its input = h * W (seed / logits))."""
    model, variables, x = setups["vit"]
    target = jnp.array([2, 4])
    seed = np.asarray(jax.nn.one_hot(target, NUM_CLASSES, dtype=jnp.float64))
    w = np.asarray(variables["params"]["heads"]["head"]["kernel"])

    def grad_cot(z):
        c = np.zeros(z.shape)
        c[:, 0] = seed @ w.T
        return jnp.asarray(c)

    got = _layer_map(M.get("chefer-lrp", composite=_vjp_composite()), model, variables, x, target)
    np.testing.assert_allclose(got, _chefer_ref(model, variables, x, target, grad_cot), rtol=1e-9, atol=1e-13)

    logits = np.asarray(_reference(model, variables, x)[0])

    def z_cot(z):
        c = np.zeros(z.shape)
        c[:, 0] = np.asarray(z[:, 0]) * ((seed / logits) @ w.T)
        return jnp.asarray(c)

    comp = _vjp_composite().replace(names={"heads.head": Epsilon(0.0)})
    got_z = _layer_map(M.get("chefer-lrp", composite=comp), model, variables, x, target)
    want_z = _chefer_ref(model, variables, x, target, z_cot)
    np.testing.assert_allclose(got_z, want_z, rtol=1e-8, atol=1e-13)
    assert not np.allclose(got_z, got, rtol=1e-3)  # the relevance, not the gradient, is used


def test_chefer_lrp_default_composite_on_vit(setups, x64):
    """The default composite on a ViT: R_A read from one relevance pass equals the relevance
    the engine returns at each attention layer on its own (``read_at``), combined by the formula."""
    model, variables, x = setups["vit"]
    from xaijax import propagation as P

    try:
        P.plan(model, variables, x, "alpha1-beta0")
    except ValueError as e:
        pytest.skip(f"the propagation engine has no rules for the ViT's transformer layers ({str(e)[:160]}...)")
    target = jnp.array([0, 3])
    seed = jax.nn.one_hot(target, NUM_CLASSES, dtype=jnp.float64)
    got = _layer_map(M.get("chefer-lrp"), model, variables, x, target)
    atts, grads = _ref_attention_grads(model, variables, x, target)
    rel = [
        np.asarray(jax.jit(lambda v, xx, sd, n=n: P.relevance(model, v, xx, sd, "alpha1-beta0", read_at=n))(variables, x, seed))
        for n in model.attention_layers
    ]
    for i in range(2):
        abars = [_mean_heads(np.maximum(grads[l][i] * rel[l][i], 0)) for l in range(model.num_layers)]
        want = _grid(_accumulate(abars)[0], model)
        assert np.abs(want).max() > 1e-6
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-13)


# -------------------------------------------------------------------- shared contracts

ALL = ["raw-attention", "attention-rollout", "attention-flow", "generic-attention", "chefer-lrp"]


def _method(name):
    return M.get(name, composite=_vjp_composite()) if name == "chefer-lrp" else M.get(name)


@pytest.mark.parametrize("name", ALL)
def test_call_jit_and_vmap(setups, name, x64):
    """The map is the layer map upsampled, float64 in float64 out; jit and vmap give the same maps."""
    model, variables, x = setups["small"]
    m = _method(name)
    assert m.kind == "attribution" and m.has_layer_map and not m.runs_own_loop
    target = jnp.array([1, 3])
    # unjitted, except attention-flow (its while loops compile either way: one program less)
    grid = _layer_map(m, model, variables, x, target) if name == "attention-flow" else m.layer_map(model, variables, x, target)
    out = jax.jit(m, static_argnums=0)(model, variables, x, target)
    assert grid.shape == (2, 4, 4) and out.shape == (2, 16, 16) and out.dtype == jnp.float64
    np.testing.assert_allclose(out, imageops.resize(grid, (16, 16)), rtol=1e-10, atol=1e-14)
    vmapped = jax.jit(jax.vmap(lambda xi, ti: m(model, variables, xi[None], ti)[0]))(x, target)
    np.testing.assert_allclose(vmapped, out, rtol=1e-10, atol=1e-14)


class _TinyCNN(nn.Module):
    cam_layer: str = "act"

    @nn.compact
    def __call__(self, x):
        h = LL.ReLU(name="act")(LL.conv(4, 3, padding=1, name="conv")(x))
        return LL.dense(3, name="fc")(LL.Flatten(name="flatten")(h))


@pytest.mark.parametrize("name", ALL)
def test_not_applicable_on_a_cnn(name):
    model = _TinyCNN()
    x = jnp.ones((1, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(M.NotApplicable, match="needs a vision transformer.*attention_layers"):
        _method(name)(model, variables, x, 0)


def test_registration_and_bad_hyperparameters():
    for name, cls in zip(ALL, [att.RawAttention, att.AttentionRollout, att.AttentionFlow, att.GenericAttention, att.CheferLRP]):
        assert name in M.names()
        assert isinstance(M.get(name), cls)
        assert M.describe(name)
    with pytest.raises(ValueError, match="head_fusion"):
        M.get("attention-rollout", head_fusion="median")
    with pytest.raises(ValueError, match="residual"):
        M.get("attention-flow", residual=1.5)
    with pytest.raises(ValueError, match="start_layer"):
        M.get("generic-attention", start_layer=-1)
    with pytest.raises(ValueError, match="composite"):
        M.get("chefer-lrp", composite=3)


def test_start_layer_and_block_out_of_range(setups):
    model, variables, x = setups["vit"]
    with pytest.raises(ValueError, match="start_layer 2 is out of range"):
        M.get("attention-rollout", start_layer=2)(model, variables, x, 0)
    with pytest.raises(ValueError, match="block 5 is out of range"):
        M.get("raw-attention", block=5)(model, variables, x, 0)
