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


class Tanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(x)


class WithTanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="fc1")(x)
        h = Tanh(name="squash")(h)
        h = h * h  # a product of two activations
        return nn.Dense(2, name="fc2")(h)


def test_operations_without_a_rule_are_listed_before_any_computation():
    model = WithTanh()
    x = jnp.ones((2, 3))
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"no propagation rule for operation\(s\) squash: tanh, <root>: mul\..*Composite\(types=\{MyLayer"):
        engine.plan(model, v, x, "zero")
    # giving the module a rule removes it from the list; the product still has none
    with pytest.raises(ValueError, match=r"operation\(s\) <root>: mul\."):
        engine.plan(model, v, x, Composite(types={Tanh: Vjp()}))


def test_zoo_models_need_no_functional_pass():
    from xaijax import models

    model = models.get("resnet18", num_classes=3, width=4)
    x = jnp.zeros((1, 32, 32, 3))
    v = models.random_variables(model, x.shape)
    assert engine.plan(model, v, x, "epsilon-plus").functional == ()


def test_classes_of_primitives():
    assert set(functional.CLASSES) == {"relu", "maxpool", "avgpool", "add", "scale"}
