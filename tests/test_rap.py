"""RAP (Relative Attributing Propagation): hand-computed rule outputs, an independent numpy
transcription of the reference code's arithmetic on tiny networks, conservation layer by
layer on tiny VGG/ResNet, jit/vmap/batch independence and readable errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_helpers import as_f64 as _f64, conv_matrix

from xaijax import models
from xaijax.methods import rap as rap_module
from xaijax.methods import registry
from xaijax.models import layers
from xaijax.propagation import Composite, relevance, relevance_trace
from xaijax.propagation.rap_rules import AbsoluteInfluence, Relative, RelativeBox, rap_composite

RAP = rap_module.RAP


# -------------------------------------------------------------- hand-computed numbers


class OneDense(nn.Module):
    features: int = 1
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        return layers.dense(self.features, bias=self.bias, name="fc")(x)


def test_classifier_rule_hand_numbers_with_negative_inputs(x64):
    """x = (2, -1, 1), w = (1, 3, -2), b = 0.5, seed 1. Worked out on paper:

    x+W+ = 2, x+W- = -2, x-W+ = -3, x-W- = 0 -> Pos = 2, Neg = -5; the bias splits into
    bp = 0.5 * 2 / -3 = -1/3 (to the x+W+ term) and bn = 0.5 * -5 / -3 = 5/6 (to x+W-);
    C = (2 - 1/3, -3, -2 + 5/6) = (5/3, -3, -7/6), sum = z = -2.5, sum |C| = 35/6;
    R = |C| * -2.5 / (35/6) = (-5/7, -9/7, -1/2).
    """
    v = {"params": {"fc": {"kernel": jnp.array([[1.0], [3.0], [-2.0]]), "bias": jnp.array([0.5])}}}
    x = jnp.array([[2.0, -1.0, 1.0]])
    r = relevance(OneDense(), v, x, lambda out: jnp.ones_like(out), Composite(dense=AbsoluteInfluence()))
    np.testing.assert_allclose(np.asarray(r)[0], [-5 / 7, -9 / 7, -1 / 2], rtol=1e-12)


def test_relative_rule_hand_numbers_dense_and_conv_variants(x64):
    """x = (1, 2), W = [[1, -2], [3, 1]] (rows: inputs), R = (1, -0.5), no bias.

    A = x W+ = (7, 2), B = x |W-| = (0, 2), R / A = (1/7, -1/4), R / (A + B) = (1/7, -1/8).
    dense: C = x * (W+ R/A + |W-| R/(A+B)) = (-3/28, 10/28); sum 1/4, shift by (1/4 - 1/2) / 2
      -> (1/56, 27/56).
    conv: R+ = (1, 0), R- = (0, -1/2); s+ = R+/A = (1/7, 0), s- = R-/B + R/(A+B) = (1/7, -3/8)
      -> C = (1/7 - 3/4, 6/7) = (-17/28, 24/28); shifted -> (-27/56, 55/56).
    """
    v = {"params": {"fc": {"kernel": jnp.array([[1.0, -2.0], [3.0, 1.0]])}}}
    x = jnp.array([[1.0, 2.0]])
    R = jnp.array([[1.0, -0.5]])
    model = OneDense(2, bias=False)
    dense = relevance(model, v, x, lambda out: R, Composite(dense=Relative("dense")))
    conv = relevance(model, v, x, lambda out: R, Composite(dense=Relative("conv")))
    np.testing.assert_allclose(np.asarray(dense)[0], [1 / 56, 27 / 56], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(conv)[0], [-27 / 56, 55 / 56], rtol=1e-12)
    # "auto" picks the dense arithmetic on a dense layer
    auto = relevance(model, v, x, lambda out: R, Composite(dense=Relative()))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(dense), rtol=1e-12)


def test_input_box_rule_hand_numbers(x64):
    """x = (2, -1, 1): per-sample bounds l = -1, h = 2; w = (1, 3, -2) ->
    c_i = x_i w_i - l w+_i - h w-_i = (2 + 1, -3 + 3, -2 + 4) = (3, 0, 2), z = 5 -> R = c / 5."""
    v = {"params": {"fc": {"kernel": jnp.array([[1.0], [3.0], [-2.0]]), "bias": jnp.array([0.5])}}}
    x = jnp.array([[2.0, -1.0, 1.0]])
    r = relevance(OneDense(), v, x, lambda out: jnp.full_like(out, 0.7), Composite(dense=RelativeBox()))
    np.testing.assert_allclose(np.asarray(r)[0], np.array([3.0, 0.0, 2.0]) / 5 * 0.7, rtol=1e-12)


def test_rap_and_rsp_input_rules_are_one_rule():
    """RAP's ``RelativeBox`` and RSP's ``RSPInput`` are the same z^B with per-sample bounds
    (agreement was checked in float64 on tiny VGG16/ResNet18 before one was removed: max
    difference 2e-17 at a map scale of 5e-2): both names are the one rule now."""
    from xaijax.propagation.rsp_rules import RSPInput
    from xaijax.propagation.rules import PerSampleZBox

    assert RelativeBox is PerSampleZBox and RSPInput is PerSampleZBox
    assert RelativeBox() == RSPInput() == PerSampleZBox(0.0)


# ------------------------------------- the reference code's arithmetic, transcribed in numpy
#
# Literal transcriptions of RAP_relprop in wjNam/Relative_Attributing_Propagation
# (modules/layers.py) on flattened arrays: x (N, I), W (I, J) (a convolution is its (in, out)
# matrix), relevance (N, J). The gradient of Z = x @ W with cotangent S is S @ W.T.


def sdiv(a, b):
    """The reference's safe_divide: a / b where b != 0, else 0."""
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def ref_classifier(x, W, b, pd):
    pw, nw, px, nx = np.maximum(W, 0), np.minimum(W, 0), np.maximum(x, 0), np.minimum(x, 0)
    Z1, Z2, Z3, Z4 = px @ pw, px @ nw, nx @ pw, nx @ nw
    Rpp, Rpn, Rnp, Rnn = Z1 * pd, Z2 * pd, Z3 * pd, Z4 * pd
    Pos = (Rpp + Rnn).sum(-1, keepdims=True)
    Neg = (Rpn + Rnp).sum(-1, keepdims=True)
    C1 = px * (sdiv(Rpp, Z1) @ pw.T)
    C2 = px * (sdiv(Rpn, Z2) @ nw.T)
    C3 = nx * (sdiv(Rnp, Z3) @ pw.T)
    C4 = nx * (sdiv(Rnn, Z4) @ nw.T)
    bp = b * pd * sdiv(Pos, Pos + Neg)
    bn = b * pd * sdiv(Neg, Pos + Neg)
    Cb1 = px * (sdiv(bp, Z1) @ pw.T)
    Cb2 = px * (sdiv(bn, Z2) @ nw.T)
    R = C1 + C4 + Cb1 + C2 + C3 + Cb2
    Rp, Rn = np.maximum(R, 0), np.minimum(R, 0)
    tot = (Rp - Rn).sum(-1, keepdims=True)
    s = (Rp + Rn).sum(-1, keepdims=True)
    return sdiv(Rp, tot) * s - sdiv(Rn, tot) * s


def _pos_prop(R, x1, w1, sign1, w2, sign2, conv):
    """One input path, unshifted; Za1 = sign1 x1 w1, Za2 = sign2 x1 w2 (masked where R == 0)."""
    nz = (R != 0).astype(float)
    Za1, Za2 = sign1 * (x1 @ w1) * nz, sign2 * (x1 @ w2) * nz

    def g1(S):
        return sign1 * ((S * nz) @ w1.T)

    def g2(S):
        return sign2 * ((S * nz) @ w2.T)

    Rpos, Rneg = np.maximum(R, 0), np.minimum(R, 0)
    m = sdiv(Za1 + Za2, Za1 + Za2)
    C1 = x1 * g1(sdiv(Rpos * m, Za1))
    C1n = x1 * g2(sdiv(Rneg * m, Za2)) if conv else x1 * g1(sdiv(Rneg * m, Za1))
    C2 = x1 * g2(sdiv(Rpos * sdiv(Za2, Za1 + Za2), Za2))
    C2n = x1 * g2(sdiv(Rneg * sdiv(Za2, Za1 + Za2), Za2))
    return C1 + C2 + C2n + C1n


def _shift_rel(C, val):
    nzc = (C != 0).astype(float)
    return C - sdiv(val, nzc.sum(-1, keepdims=True)) * nzc


def ref_relative(x, W, R, conv, per_path):
    """``per_path=True``: the reference (each input path shifted to the incoming total);
    ``False``: xaijax (the sum of both paths shifted once)."""
    pw, nw, px, nx = np.maximum(W, 0), np.minimum(W, 0), np.maximum(x, 0), np.minimum(x, 0)
    Ca = _pos_prop(R, px, pw, 1.0, nw, -1.0, conv)
    Cb = _pos_prop(R, nx, pw, -1.0, nw, 1.0, conv)
    total = R.sum(-1, keepdims=True)
    if per_path:
        return _shift_rel(Ca, Ca.sum(-1, keepdims=True) - total) + _shift_rel(Cb, Cb.sum(-1, keepdims=True) - total)
    C = Ca + Cb
    return _shift_rel(C, C.sum(-1, keepdims=True) - total)


def ref_box(x, W, R):
    pw, nw = np.maximum(W, 0), np.minimum(W, 0)
    L = np.broadcast_to(x.min(-1, keepdims=True), x.shape)
    H = np.broadcast_to(x.max(-1, keepdims=True), x.shape)
    S = sdiv(R, x @ W - L @ pw - H @ nw)
    return x * (S @ W.T) - L * (S @ pw.T) - H * (S @ nw.T)


class TinyCNN(nn.Module):
    """(N, 6, 6, 3) -> conv 3x3 (4) -> ReLU -> conv 3x3/2 (3) -> ReLU -> flatten -> fc (3)."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="relu1")(layers.conv(4, 3, 1, 1, name="conv1")(x))
        h = layers.ReLU(name="relu2")(layers.conv(3, 3, 2, 1, name="conv2")(h))
        return layers.dense(3, name="fc")(layers.Flatten(name="flatten")(h))


def _with_biases(v, rng):
    def f(path, a):
        if getattr(path[-1], "key", None) == "bias":
            return jnp.asarray(rng.uniform(-0.3, 0.3, a.shape), a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(f, v)


def test_tiny_cnn_matches_numpy_transcription_of_the_reference(x64):
    """Input z^B (per-sample bounds), conv RAP rule + shift, classifier absolute influence:
    the whole method against the transcription, float64, biases everywhere."""
    model = TinyCNN()
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 3)))
    v = _with_biases(_f64(models.random_variables(model, x.shape, seed=5)), rng)
    target = np.array([0, 2, 1])
    r, maps = jax.jit(
        lambda v, x, t: (
            relevance(model, v, x, lambda out: jax.nn.one_hot(t, 3, dtype=out.dtype), rap_composite()),
            RAP()(model, v, x, t),
        )
    )(v, x, jnp.asarray(target))

    p = v["params"]
    M1 = conv_matrix(np.asarray(p["conv1"]["kernel"]), (6, 6), 1, 1)
    M2 = conv_matrix(np.asarray(p["conv2"]["kernel"]), (6, 6), 2, 1)
    xf = np.asarray(x).reshape(3, -1)
    h1 = np.maximum(xf @ M1 + np.tile(np.asarray(p["conv1"]["bias"]), 36), 0)
    h2 = np.maximum(h1 @ M2 + np.tile(np.asarray(p["conv2"]["bias"]), 9), 0)
    Wfc, bfc = np.asarray(p["fc"]["kernel"]), np.asarray(p["fc"]["bias"])
    onehot = np.eye(3)[target]
    R2 = ref_classifier(h2, Wfc, bfc, onehot)
    R1 = ref_relative(h1, M2, R2, conv=True, per_path=True)  # inputs >= 0: per-path == single shift
    R0 = ref_box(xf, M1, R1).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(r), R0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(maps), R0.sum(-1), rtol=1e-9, atol=1e-12)
    # the total is the target logit
    logits = h2 @ Wfc + bfc
    np.testing.assert_allclose(R0.reshape(3, -1).sum(1), logits[np.arange(3), target], rtol=1e-9)


class ThreeDense(nn.Module):
    """(N, 4) -> fc1 (5) -> fc2 (4) -> ReLU -> fc3 (3); fc2 sees inputs of both signs."""

    @nn.compact
    def __call__(self, x):
        h = layers.dense(5, name="fc1")(x)
        h = layers.ReLU(name="relu")(layers.dense(4, name="fc2")(h))
        return layers.dense(3, name="fc3")(h)


def test_three_dense_layers_with_negative_inputs_match_transcription(x64):
    """Dense RAP rule on inputs of both signs (first layer included, no z^B on a dense input
    layer, as in the reference). xaijax shifts both input paths together and conserves; the
    reference's per-path shift passes on twice the relevance there (documented difference)."""
    model = ThreeDense()
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((4, 4)))
    v = _with_biases(_f64(models.random_variables(model, x.shape, seed=9)), rng)
    target = np.array([0, 1, 2, 1])
    comp = rap_composite().replace(first=None)
    r = np.asarray(
        jax.jit(lambda v, x, t: relevance(model, v, x, lambda out: jax.nn.one_hot(t, 3, dtype=out.dtype), comp))(
            v, x, jnp.asarray(target)
        )
    )

    p = {k: (np.asarray(a["kernel"]), np.asarray(a["bias"])) for k, a in v["params"].items()}
    xf = np.asarray(x)
    h1 = xf @ p["fc1"][0] + p["fc1"][1]
    h2 = np.maximum(h1 @ p["fc2"][0] + p["fc2"][1], 0)
    logit = (h2 @ p["fc3"][0] + p["fc3"][1])[np.arange(4), target]
    R3 = ref_classifier(h2, *p["fc3"], np.eye(3)[target])
    R2 = ref_relative(h1, p["fc2"][0], R3, conv=False, per_path=False)
    R1 = ref_relative(xf, p["fc1"][0], R2, conv=False, per_path=False)
    assert (h1 < 0).any() and (h1 > 0).any() and (xf < 0).any()
    np.testing.assert_allclose(r, R1, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.sum(1), logit, rtol=1e-9)
    # the reference's per-path shift doubles the total where both paths are non-empty
    R2_ref = ref_relative(h1, p["fc2"][0], R3, conv=False, per_path=True)
    np.testing.assert_allclose(R2_ref.sum(1), 2 * logit, rtol=1e-9)


# ------------------------------------------------- conservation on tiny zoo models


@pytest.mark.parametrize(
    "name,kw,size",
    [
        ("vgg11", dict(num_classes=5, width=1 / 16, hidden=16, pool_size=1), 32),
        ("resnet18", dict(num_classes=5, width=8, layers=(1, 1, 1, 1)), 16),
    ],
    ids=["vgg11", "resnet18"],
)
def test_relevance_is_conserved_layer_by_layer_on_zoo_models(name, kw, size):
    """Every layer passes on exactly what it receives (uniform shift, z-rule pools/adds,
    BatchNorm pass, z^B input); the classifier turns the one-hot seed (total 1) into the
    target logit, which is the input total. Non-zero biases and BatchNorm statistics."""
    model = models.get(name, **kw)
    rng = np.random.default_rng(3)
    v = models.random_variables(model, (1, size, size, 3))

    def f(path, a):
        key = getattr(path[-1], "key", None)
        if key in ("bias", "mean"):
            return jnp.asarray(rng.uniform(-0.2, 0.2, a.shape), a.dtype)
        if key in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
        return a

    v = jax.tree_util.tree_map_with_path(f, v)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, size, size, 3), np.float32))
    seed = jnp.asarray(np.eye(5, dtype=np.float32)[[1, 3]])
    rx, trace, out = jax.jit(
        lambda v, x: relevance_trace(model, v, x, lambda o: seed, rap_composite()) + (model.apply(v, x),)
    )(v, x)
    logit = np.asarray((out * seed).sum(1))
    scale = float(np.abs(logit).max())
    kinds = set()
    for lr in trace.values():
        tin, tout = (np.asarray(t) for t in lr.totals())
        kinds.add((lr.kind, type(lr.rule).__name__))
        if isinstance(lr.rule, AbsoluteInfluence):
            np.testing.assert_allclose(tout, [1.0, 1.0], rtol=1e-6)
            np.testing.assert_allclose(tin, logit, atol=2e-6 * scale, err_msg=lr.name)
        else:
            np.testing.assert_allclose(tin, tout, atol=2e-5 * scale, err_msg=lr.name)
    np.testing.assert_allclose(np.asarray(rx.sum((1, 2, 3))), logit, atol=5e-5 * scale)
    assert {("conv", "Relative"), ("conv", "PerSampleZBox"), ("dense", "AbsoluteInfluence")} <= kinds
    if name == "vgg11":
        assert {("maxpool", "Epsilon"), ("dense", "Relative")} <= kinds
    else:
        assert {("add", "Epsilon"), ("batchnorm", "Pass")} <= kinds


def test_densenet_and_inception_trace_and_transform_input_is_refused():
    """Other zoo families get the same layer rules (traced without compiling); Inception's
    transform_input (arithmetic outside the layers) is refused with a clear error."""
    for name, kw, size in [
        ("densenet121", dict(num_classes=5, growth_rate=4, block_config=(2, 2), num_init_features=8), 16),
        ("inception_v3", dict(num_classes=5, width=1 / 16), 75),
    ]:
        model = models.get(name, **kw)
        v = models.random_variables(model, (1, size, size, 3))
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        out = jax.eval_shape(lambda v, x: RAP()(model, v, x, jnp.array([1, 2])), v, x)
        assert out.shape == (2, size, size) and out.dtype == jnp.float32
    model = models.get("inception_v3", num_classes=5, width=1 / 16, transform_input=True)
    v = models.random_variables(model, (1, 75, 75, 3))
    with pytest.raises(ValueError, match="transform_input=False"):
        RAP()(model, v, jnp.zeros((1, 75, 75, 3)), 0)


# ------------------------------------------------------------ method-level behaviour


class Net(nn.Module):
    """Small CNN with the zoo's layer kinds: (N, 8, 8, 3) -> 3 logits."""

    @nn.compact
    def __call__(self, x):
        h = layers.conv(4, 3, 1, 1, name="conv1")(x)
        h = layers.batch_norm(False, name="bn1")(h)
        h = layers.ReLU(name="relu1")(h)
        a = layers.conv(4, 3, 1, 1, bias=False, name="conv2")(h)
        h = layers.ReLU(name="relu2")(layers.Add(name="add")(a, h))
        p = layers.MaxPool2d(2, name="pool")(h)
        c = layers.Concat(name="concat")(p, layers.AvgPool2d(3, 1, 1, name="avg")(p))
        c = layers.ReLU(name="relu3")(layers.conv(6, 1, name="conv3")(c))
        g = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="gap")(c))
        return layers.dense(3, name="fc")(g)


@pytest.fixture(scope="module")
def net():
    model = Net()
    v = _with_biases(models.random_variables(model, (1, 8, 8, 3), seed=11), np.random.default_rng(1))
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 8, 8, 3), np.float32))
    return model, v, x


def test_jit_vmap_and_batch_independence(net):
    model, v, x = net
    method = registry.get("rap")
    assert method == RAP()
    target = jnp.array([0, 2, 1])

    @jax.jit
    def run(v, x, target):
        batched = method(model, v, x, target)
        one_by_one = jax.vmap(lambda xi, ti: method(model, v, xi[None], ti)[0])(x, target)
        return batched, one_by_one, model.apply(v, x)

    maps, singles, out = run(v, x, target)
    other, _, _ = run(v, x.at[0].set(-2.0 * x[0]), target)
    assert maps.shape == (3, 8, 8) and maps.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(maps)))
    scale = float(jnp.abs(maps).max())
    np.testing.assert_allclose(np.asarray(singles), np.asarray(maps), atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(other[1:]), np.asarray(maps[1:]), atol=1e-6 * scale)
    assert not np.allclose(np.asarray(other[0]), np.asarray(maps[0]), atol=1e-3 * scale)
    # per-sample total is the target logit; an explicit one-hot seed gives the same maps
    logits = np.asarray(out)[np.arange(3), np.asarray(target)]
    np.testing.assert_allclose(np.asarray(maps.sum((1, 2))), logits, atol=1e-4 * np.abs(logits).max())
    seeded = jax.jit(method, static_argnums=0)(model, v, x, jax.nn.one_hot(target, 3))
    np.testing.assert_allclose(np.asarray(seeded), np.asarray(maps), atol=1e-6 * scale)


def test_readable_errors(net):
    model, v, x = net
    with pytest.raises(ValueError, match="out of range"):
        RAP()(model, v, x, 3)
    with pytest.raises(ValueError, match="out of range"):
        RAP()(model, v, x, jnp.array([0, -1, 2]))
    with pytest.raises(ValueError, match="shape"):
        RAP()(model, v, x, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="NHWC"):
        RAP()(model, v, x[0], 0)
    with pytest.raises(ValueError, match="variant"):
        Relative("both")

    class ConvHead(nn.Module):  # fully convolutional classifier: not defined for RAP
        @nn.compact
        def __call__(self, x):
            h = layers.ReLU(name="relu")(layers.conv(4, 3, 1, 1, name="conv1")(x))
            h = layers.conv(3, 1, name="classifier")(h)
            return layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="gap")(h))

    m = ConvHead()
    with pytest.raises(ValueError, match="dense classifier"):
        RAP()(m, models.random_variables(m, (1, 8, 8, 3)), x, 0)
