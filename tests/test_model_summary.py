"""``taps.summary``: one abstract forward pass answers the methods' set-up questions.

Its answers are checked against the forward pass itself (output shape, every tapped layer's
shape, call order, call counts), it is cached per model and shapes (concrete and traced
arguments alike), and jitting a method traces the model no more often than the method
needs: the set-up questions (classes, layer kinds, tapped shapes, layer names) share one
trace. The trace counts are the regression guard for first-call time
(``experiments/bench_compile.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models
from xaijax.methods._core import layer_output_shapes, non_piecewise_linear_layers
from xaijax.models import taps
from xaijax.propagation import engine


@pytest.fixture(scope="module")
def resnet():
    m = models.get("resnet18", num_classes=7, width=8)
    v = models.random_variables(m, (1, 32, 32, 3), seed=1)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    return m, v, x


def _clear() -> None:
    taps._SUMMARIES.clear()
    engine._cached_graph.cache_clear()


def test_summary_matches_the_forward_pass(resnet):
    m, v, x = resnet
    _clear()
    s = taps.summary(m, v, x)
    out = m.apply(v, x)
    assert (s.output.shape, s.output.dtype) == (out.shape, out.dtype) == ((2, 7), jnp.float32)
    names = [c.name for c in s.layers if c.name]
    assert names == taps.layer_names(m, v, x)
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]  # call order, parents before children
    assert names.index("layer1") < names.index("layer1.0") < names.index("layer1.0.conv1")
    assert s.layers[0].name == "" and s.layers[0].module_type is type(m)
    _, acts = taps.forward(m, v, x, capture=["layer3", "layer4.1.conv2", "avgpool"])
    for name, a in acts.items():
        c = s.layer(name)
        assert c.calls == 1 and (c.output.shape, c.output.dtype) == (a.shape, a.dtype)
    assert s.layer("no.such.layer") is None


def test_summary_is_cached_for_concrete_and_traced_arguments(resnet):
    m, v, x = resnet
    _clear()
    first = taps.summary(m, v, x)
    assert taps.summary(m, v, x + 1.0) is first  # values do not matter, shapes do
    seen = []
    jax.jit(lambda vv, xx: seen.append(taps.summary(m, vv, xx)) or xx.sum())(v, x)
    assert seen[0] is first
    other = taps.summary(m, v, x[:1])
    assert other is not first and other.output.shape == (1, 7)


def test_called_twice_counted_and_shapes_fall_back_to_the_tap():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(3, name="d")
            return d(d(x))

    m = Twice()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.key(0), x)
    assert taps.summary(m, v, x).layer("d").calls == 2
    with pytest.raises(ValueError, match="called more than once"):
        layer_output_shapes(m, v, x, ["d"])  # the tap's own error, not a wrong shape
    with pytest.raises(ValueError, match="unknown layer"):
        layer_output_shapes(m, v, x, ["e"])


def test_failing_forward_pass_is_not_cached_and_raises():
    m = models.get("resnet18", num_classes=7, width=8)
    v = models.random_variables(m, (1, 32, 32, 3), seed=1)
    bad = jnp.ones((2, 32, 32, 4))  # 4 channels for a 3-channel first convolution
    n = len(taps._SUMMARIES)
    with pytest.raises(Exception):
        taps.summary(m, v, bad)
    assert len(taps._SUMMARIES) == n
    part = taps.summary(m, v, bad, partial=True)  # the layers called before the failure
    assert part.output is None and [c.name for c in part.layers] == ["", "conv1"]
    assert part.layer("conv1").output is None  # its call did not finish
    assert len(taps._SUMMARIES) == n


def test_transformer_kinds_come_from_the_summary():
    m = models.get("vit_b_16", image_size=32, patch_size=8, hidden_dim=16, mlp_dim=32, num_layers=1, num_heads=2, num_classes=5)
    v = models.random_variables(m, (1, 32, 32, 3))
    found = non_piecewise_linear_layers(m, v, jnp.ones((1, 32, 32, 3)))
    assert [f.split(" ")[0] for f in found] == ["GELU", "LayerNorm", "MatMul", "Softmax"]


def _root_traces(model, fn, *args) -> int:
    """How many times ``fn(*args)``'s trace calls ``model`` (its root ``__call__``)."""
    count = [0]

    def interceptor(next_fun, a, kw, context):
        if context.method_name == "__call__" and context.module.path == () and type(context.module) is type(model):
            count[0] += 1
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        fn.trace(*args)
    return count[0]


@pytest.mark.parametrize(
    "name, traces",
    [
        ("gradient", 2),  # the summary (number of classes) + the forward pass differentiated
        ("grad-cam", 2),  # the summary (classes, the CAM layer's shape) + the forward pass
        ("rsp", 4),  # + the propagation plan's trace + the propagation forward pass
    ],
)
def test_jitting_a_method_traces_the_model_only_as_often_as_it_needs(resnet, name, traces):
    m, v, x = resnet
    _clear()
    jax.clear_caches()
    fn = jax.jit(methods.get(name), static_argnums=0)
    assert _root_traces(m, fn, m, v, x, np.array([1, 2], np.int32)) == traces
