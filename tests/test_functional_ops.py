"""Relevance rules for functional operations (xaijax.propagation.functional) through the engine.

A model written the Flax way -- ``nn.relu``, ``nn.max_pool``, ``jnp.mean`` and residual ``+``
inside ``__call__`` -- must get exactly the relevance of the same network written with the
zoo's layer modules (same weights, float64), for every composite.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.models import layers as L
from xaijax.propagation import Composite, engine, functional, relevance
from xaijax.propagation.rules import Epsilon, Pass, Vjp

F64 = jnp.float64


def _conv(**kw):
    return functools.partial(nn.Conv, use_bias=False, dtype=F64, param_dtype=F64, **kw)


def _norm(**kw):
    return functools.partial(nn.BatchNorm, use_running_average=True, dtype=F64, param_dtype=F64, **kw)


class FlaxBlock(nn.Module):
    """A ResNet block as Flax's ImageNet example writes it (functional activation and sum)."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = _conv()(self.filters, (3, 3), self.strides, name="conv1")(x)
        y = nn.relu(_norm()(name="bn1")(y))
        y = _norm()(name="bn2")(_conv()(self.filters, (3, 3), name="conv2")(y))
        if residual.shape != y.shape:
            residual = _norm()(name="norm_proj")(_conv()(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
        return nn.relu(residual + y)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv_init", param_dtype=F64)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = FlaxBlock(8, name="b0")(x)
        x = FlaxBlock(16, 2, name="b1")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(5, name="fc", param_dtype=F64)(x)


class ZooBlock(nn.Module):
    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = _conv()(self.filters, (3, 3), self.strides, name="conv1")(x)
        y = L.ReLU(name="relu1")(_norm()(name="bn1")(y))
        y = _norm()(name="bn2")(_conv()(self.filters, (3, 3), name="conv2")(y))
        if residual.shape != y.shape:
            residual = _norm()(name="norm_proj")(_conv()(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
        return L.ReLU(name="relu2")(L.Add(name="add")(residual, y))


class ZooNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = L.ReLU(name="relu")(nn.Conv(8, (3, 3), name="conv_init", param_dtype=F64)(x))
        x = L.MaxPool2d(2, name="pool")(x)
        x = ZooBlock(8, name="b0")(x)
        x = ZooBlock(16, 2, name="b1")(x)
        x = L.Flatten(name="flat")(L.AdaptiveAvgPool2d(1, name="gap")(x))
        return nn.Dense(5, name="fc", param_dtype=F64)(x)


@pytest.fixture
def twins(x64):
    """Variables of FlaxNet (= ZooNet's) with non-trivial BatchNorm statistics and biases, and inputs; float64."""
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), F64)
    v = FlaxNet().init(jax.random.key(0), x)
    leaves, tree = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [a + 0.2 * jax.random.uniform(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves), x


def _target_times_logits(out):
    return jax.nn.one_hot(jnp.argmax(out, 1), out.shape[1], dtype=out.dtype) * out


@pytest.mark.parametrize("composite", ["zero", "epsilon-plus", "alpha1-beta0", "epsilon-gamma-box", "epsilon-plus-flat"])
def test_flax_example_resnet_equals_its_zoo_twin(twins, composite):
    v, x = twins
    np.testing.assert_array_equal(np.asarray(FlaxNet().apply(v, x)), np.asarray(ZooNet().apply(v, x)))
    r_fn = relevance(FlaxNet(), v, x, _target_times_logits, composite)
    r_zoo = relevance(ZooNet(), v, x, _target_times_logits, composite)
    assert r_fn.dtype == F64
    scale = float(jnp.abs(r_zoo).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(r_fn), np.asarray(r_zoo), rtol=0, atol=1e-10 * scale)


def test_the_plan_lists_every_functional_operation_with_its_rule(twins):
    v, x = twins
    p = engine.plan(FlaxNet(), v, x, "epsilon-plus")
    ops = {o.name: o for o in p.functional}
    assert [o.kind for o in p.functional] == ["relu", "maxpool", "relu", "add", "relu", "relu", "add", "relu", "avgpool", "scale"]
    assert ops["b0:add"].rule == Epsilon(0.0) and ops["b0:add"].in_shapes == ((2, 8, 8, 8), (2, 8, 8, 8))
    assert ops[":reduce_window_max"].rule == Vjp()
    assert ops["b1:relu#1"].rule == Pass() and ops[":div"].rule == Pass()
    text = p.describe()
    assert "b1:add: add -> Epsilon(eps=0.0)" in text and ":reduce_sum: avgpool -> Epsilon(eps=0.0)" in text


def test_functional_rules_follow_the_composite(twins):
    v, x = twins
    comp = Composite(kinds={"add": Vjp(), "avgpool": Vjp()})
    ops = {o.name: o.rule for o in engine.plan(FlaxNet(), v, x, comp).functional}
    assert ops["b0:add"] == Vjp() and ops[":reduce_sum"] == Vjp()
    # a name pattern reaches functional operations too
    named = Composite(names={"b1:add": Vjp()})
    assert {o.name: o.rule for o in engine.plan(FlaxNet(), v, x, named).functional}["b1:add"] == Vjp()


class BiasFree(nn.Module):
    """Bias-free ReLU network with an in-model normalisation, average pooling and a global sum."""

    @nn.compact
    def __call__(self, x):
        x = (x - jnp.array([0.4, 0.5, 0.6], F64)) / jnp.array([0.2, 0.3, 0.25], F64)
        h = nn.relu(nn.Conv(6, (3, 3), use_bias=False, param_dtype=F64, name="c1")(x))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = nn.relu(nn.Conv(6, (3, 3), use_bias=False, param_dtype=F64, name="c2")(h)) * 0.5
        return nn.Dense(4, use_bias=False, param_dtype=F64, name="fc")(jnp.sum(h, axis=(1, 2)))


def test_relevance_is_conserved_through_functional_operations(x64):
    x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3), F64)
    model = BiasFree()
    v = model.init(jax.random.key(4), x)
    out = model.apply(v, x)
    r = relevance(model, v, x, _target_times_logits, "zero")
    # the z-rule conserves relevance through normalisation (scale), pooling and sums
    np.testing.assert_allclose(np.asarray(r.sum((1, 2, 3))), np.asarray(out.max(1)), rtol=1e-10)
    # LRP-0 of a bias-free ReLU network is gradient x input -- of the *normalised* input, whose
    # relevance the normalisation passes back unchanged
    mean, std = jnp.array([0.4, 0.5, 0.6], F64), jnp.array([0.2, 0.3, 0.25], F64)
    xn = (x - mean) / std
    target = jnp.argmax(out, 1)[:, None]

    def score(z):
        return jnp.take_along_axis(model.apply(v, z * std + mean), target, 1).sum()

    np.testing.assert_allclose(np.asarray(r), np.asarray(jax.grad(score)(xn) * xn), rtol=1e-9, atol=1e-12)


class MyDense(nn.Module):
    """A weighted operation written with a bare parameter (no layer module the engine knows)."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 4))


class WithCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="fc1")(x)
        h = nn.relu(MyDense(name="mine")(h))
        h = jnp.cumsum(h, axis=-1)
        return nn.Dense(2, name="fc2")(h)


def test_operations_without_a_rule_are_listed_before_any_computation():
    model = WithCustom()
    x = jnp.ones((2, 3))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"no propagation rule for operation\(s\) mine: dot_general, <root>: cumsum\..*Composite\(types=\{MyLayer"):
        engine.plan(model, v, x, "zero")
    # giving the module a rule removes it from the list; the cumulative sum still has none
    with pytest.raises(ValueError, match=r"operation\(s\) <root>: cumsum\."):
        engine.plan(model, v, x, Composite(types={MyDense: Epsilon(0.0)}))


# ----------------------------------------------------------------- transformers, the Flax way


class FlaxEncoderBlock(nn.Module):
    """A pre-norm ViT block from flax.linen's standard layers, activations and sums written as functions."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(1e-6, param_dtype=F64, name="ln_1")(x)
        h = nn.MultiHeadDotProductAttention(self.heads, param_dtype=F64, deterministic=True, name="attn")(h)
        x = x + h
        h = nn.Dense(self.mlp, param_dtype=F64, name="fc1")(nn.LayerNorm(1e-6, param_dtype=F64, name="ln_2")(x))
        h = nn.Dense(x.shape[-1], param_dtype=F64, name="fc2")(nn.gelu(h, approximate=False))
        return x + h


class FlaxViT(nn.Module):
    """torchvision's ViT layout written the Flax way (the position embedding an ``nn.Embed`` of the
    token positions added with a plain ``+``)."""

    width: int = 8
    heads: int = 2
    mlp: int = 16
    patch: int = 8
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (self.patch, self.patch), self.patch, padding="VALID", param_dtype=F64, name="patches")(x)
        x = x.reshape(x.shape[0], -1, self.width)
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, self.width), F64)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        x = x + nn.Embed(x.shape[1], self.width, embedding_init=nn.initializers.normal(0.5), param_dtype=F64, name="pos")(jnp.arange(x.shape[1]))
        x = FlaxEncoderBlock(self.heads, self.mlp, name="block")(x)
        x = nn.LayerNorm(1e-6, param_dtype=F64, name="ln")(x)
        return nn.Dense(self.classes, param_dtype=F64, name="head")(x[:, 0])


def _zoo_twin(v):
    """The zoo's ViT with FlaxViT's weights (q/k/v kernels fused into in_proj, heads merged)."""
    from xaijax import models

    p = v["params"]
    a = p["block"]["attn"]
    d = p["cls"].shape[-1]
    fuse = lambda key: jnp.concatenate([a[n][key].reshape(a[n][key].shape[0] if key == "kernel" else 1, -1) if key == "kernel" else a[n][key].reshape(-1) for n in ("query", "key", "value")], axis=-1)  # noqa: E731
    zoo = {
        "class_token": p["cls"],
        "conv_proj": p["patches"],
        "encoder": {
            "pos_embedding": p["pos"]["embedding"][None],
            "ln": p["ln"],
            "layers": {
                "encoder_layer_0": {
                    "ln_1": p["block"]["ln_1"],
                    "ln_2": p["block"]["ln_2"],
                    "mlp": {"0": p["block"]["fc1"], "3": p["block"]["fc2"]},
                    "self_attention": {
                        "in_proj": {"kernel": fuse("kernel"), "bias": fuse("bias")},
                        "out_proj": {"kernel": a["out"]["kernel"].reshape(d, d), "bias": a["out"]["bias"]},
                    },
                }
            },
        },
        "heads": {"head": p["head"]},
    }
    model = models.get("vit_b_16", image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=d, mlp_dim=16, num_classes=3)
    return model, {"params": zoo}


@pytest.fixture
def vit_twins(x64):
    x = jax.random.normal(jax.random.key(5), (2, 16, 16, 3), F64)
    model = FlaxViT()
    v = model.init(jax.random.key(6), x)
    zoo, zv = _zoo_twin(v)
    return model, v, zoo, zv, x


def test_the_plan_of_a_flax_transformer_lists_its_attention_and_activation(vit_twins):
    model, v, _, _, x = vit_twins
    p = engine.plan(model, v, x, "attnlrp")
    kinds = {o.name: o.kind for o in p.functional}
    assert kinds["block.attn:dot_general"] == "matmul" and kinds["block.attn:dot_general#1"] == "matmul"
    assert kinds["block.attn:softmax"] == "softmax"
    assert kinds["block:add"] == "add" and kinds["block:add#1"] == "add"
    assert kinds[":add"] == "bias"  # the position embedding, a constant added to an activation: the z-rule
    assert {o.kind for o in p.functional if o.name.startswith("block:") and o.kind not in ("add",)} <= {"activation", "merge", "scale"}
    layers = {e.name: e.kind for e in p.layers}
    assert layers["block.ln_1"] == "layernorm" and layers["block.attn.query"] == "dense" and layers["block.attn.out"] == "dense"


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp", "epsilon"])
def test_a_flax_transformer_equals_the_zoo_vit(vit_twins, composite):
    model, v, zoo, zv, x = vit_twins
    np.testing.assert_allclose(np.asarray(model.apply(v, x)), np.asarray(zoo.apply(zv, x)), rtol=1e-12, atol=1e-12)
    r_fn = relevance(model, v, x, _target_times_logits, composite)
    r_zoo = relevance(zoo, zv, x, _target_times_logits, composite)
    scale = float(jnp.abs(r_zoo).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(r_fn), np.asarray(r_zoo), rtol=0, atol=1e-10 * scale)


def test_zoo_models_need_no_functional_pass():
    from xaijax import models

    model = models.get("resnet18", num_classes=3, width=4)
    x = jnp.zeros((1, 32, 32, 3))
    v = models.random_variables(model, x.shape)
    assert engine.plan(model, v, x, "epsilon-plus").functional == ()


def test_element_wise_activations_pass_relevance(x64):
    """GELU, SiLU, tanh, sigmoid, and sums and products of functions of the same value: one
    element-wise activation of that value (AttnLRP's identity rule), so its relevance passes
    back unchanged and LRP-0 of this bias-free network has a closed form."""
    x = jax.random.normal(jax.random.key(7), (3, 5), F64)

    class Acts(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6, use_bias=False, param_dtype=F64, name="a")(x)
            h = nn.gelu(h) + nn.silu(h) * 0.5 + jnp.tanh(h) * jax.nn.sigmoid(h)
            return nn.Dense(2, use_bias=False, param_dtype=F64, name="b")(h)

    model = Acts()
    v = model.init(jax.random.key(8), x)
    kinds = {o.kind for o in engine.plan(model, v, x, "zero").functional}
    assert {"activation", "merge"} <= kinds and "add" not in kinds and "matmul" not in kinds
    r = relevance(model, v, x, _target_times_logits, "zero")
    out = np.asarray(model.apply(v, x))
    wa, wb = np.asarray(v["params"]["a"]["kernel"]), np.asarray(v["params"]["b"]["kernel"])
    h = np.asarray(x) @ wa
    g = np.asarray(nn.gelu(h) + nn.silu(h) * 0.5 + jnp.tanh(h) * jax.nn.sigmoid(h))
    target = np.eye(2)[out.argmax(1)]
    r_g = g * ((target * out / out) @ wb.T)  # z-rule of the output layer
    r_h = r_g  # the activation passes it unchanged
    r_x = np.asarray(x) * ((r_h / h) @ wa.T)  # z-rule of the first layer
    np.testing.assert_allclose(np.asarray(r), r_x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(r).sum(1), (target * out).sum(1), rtol=1e-9)


def test_every_class_takes_a_layer_kinds_rule():
    """Each functional class maps to a layer kind the composites know, and gets a rule from
    every built-in composite (fixed Pass / ToFirst for scale and merge)."""
    from xaijax.propagation import composites
    from xaijax.propagation.functional import ToFirst
    from xaijax.propagation.rules import Rule

    assert set(functional.CLASSES) == {"relu", "maxpool", "avgpool", "add", "bias", "scale", "activation", "merge", "matmul", "softmax"}
    for cls in functional.CLASSES:
        assert functional.composite_kind(cls) in composites.KINDS + ("scale",), cls
        for name in composites.names():
            assert isinstance(functional.rule_for(composites.get(name), "x:op", cls), Rule), (cls, name)
    assert functional.rule_for(composites.get("epsilon-plus"), "x:op", "scale") == Pass()
    assert functional.rule_for(composites.get("epsilon-plus"), "x:op", "merge") == ToFirst()
    assert functional.rule_for(Composite(kinds={"add": Vjp()}), "x:op", "bias") == Vjp()
