"""Targets other than a logit (xaijax.methods.targets): layer/neuron, segmentation region,
detection box score, and the layer attributions linear-approx / layer-integrated-gradients.

Every check compares with an independent computation: the gradient of a layer channel's sum
taken with ``jax.grad`` through :func:`xaijax.models.taps.forward`; LRP-0 conservation on a
bias-free ReLU network (input relevance sums to the target channel's value); Captum's
``LayerGradientXActivation``, ``LayerIntegratedGradients`` and ``NeuronGradient`` recorded in
float64 (``experiments/make_captum_layer_references.py``); the masked sum and its gradient written
out directly; the detector score recomputed in NumPy from the host-side detections of
:func:`xaijax.models.detector.detect` (threshold + class-wise NMS) and a NumPy IoU.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models
from xaijax.checkpoints import from_torch_state_dict
from xaijax.methods.gradient import input_gradient
from xaijax.methods.lrp import LRP
from xaijax.methods.targets import (
    DetectionScore,
    LayerIntegratedGradients,
    LayerOutput,
    LinearApprox,
    SegmentationRegion,
    attach,
    greedy_nms,
)
from xaijax.models import detector as D
from xaijax.models import taps
from xaijax.propagation import composites as C

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "captum_layer_refs.npz")


@pytest.fixture(scope="module")
def vgg64():
    """Tiny bias-free VGG11 (zero biases from random_variables), float64 variables and input."""
    with jax.enable_x64(True):
        model = models.get("vgg11", num_classes=5, width=1 / 16, hidden=16, pool_size=1)
        v = models.random_variables(model, (1, 32, 32, 3), seed=0)
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)))
    return model, v, x


def _channel_grad_direct(model, v, x, layer, c):
    return jax.grad(lambda xx: taps.forward(model, v, xx, capture=[layer])[1][layer][..., c].sum())(x)


# ------------------------------------------------------------------------------ layer / neuron


def test_layer_output_values_names_and_variables(vgg64):
    model, v, x = vgg64
    with jax.enable_x64(True):
        w = LayerOutput(model, "features.8")

        @jax.jit
        def run(v_, x_):  # the original variables, unchanged
            a_ = taps.forward(model, v_, x_, capture=["features.8"])[1]["features.8"]
            return w.apply(v_, x_), a_, LayerOutput(model, "features.8", reduce="mean").apply(v_, x_)

        out, a, mean = run(v, x)
        np.testing.assert_allclose(np.asarray(out), np.asarray(a.sum((1, 2))), rtol=1e-13)
        np.testing.assert_allclose(np.asarray(mean), np.asarray(a.mean((1, 2))), rtol=1e-13)
        assert taps.layer_names(w, v, x) == taps.layer_names(model, v, x)  # names unchanged, no prefix
        assert w.cam_layer == model.cam_layer


def test_layer_channel_gradient_equals_direct(vgg64):
    model, v, x = vgg64
    layer, c = "features.8", 3
    with jax.enable_x64(True):
        w = LayerOutput(model, layer)
        g = jax.jit(input_gradient, static_argnums=0)(w, v, x, c)
        ref = jax.jit(_channel_grad_direct, static_argnums=(0, 3, 4))(model, v, x, layer, c)
        assert float(jnp.abs(ref).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-12, atol=1e-14)
        # a per-sample channel (int array target) and jit
        t = jnp.array([1, 4])
        gj = jax.jit(input_gradient, static_argnums=0)(w, v, x, t)
        onehot = jax.nn.one_hot(t, 16, dtype=x.dtype)[:, None, None, :]
        rt = jax.jit(jax.grad(lambda xx: (taps.forward(model, v, xx, capture=[layer])[1][layer] * onehot).sum()))(x)
        np.testing.assert_allclose(np.asarray(gj), np.asarray(rt), rtol=1e-12, atol=1e-14)


def test_neuron_gradient_equals_direct(vgg64):
    model, v, x = vgg64
    layer, unit = "features.8", (2, 1, 5)  # (i, j, c) of the NHWC output
    with jax.enable_x64(True):
        w = LayerOutput(model, layer, unit=unit)
        assert jax.eval_shape(w.apply, v, x).shape == (2, 1)

        @jax.jit
        def run(v_, x_):
            ref = jax.grad(lambda xx: taps.forward(model, v_, xx, capture=[layer])[1][layer][:, 2, 1, 5].sum())(x_)
            return input_gradient(w, v_, x_, 0), ref

        g, ref = run(v, x)
        assert float(jnp.abs(ref).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-12, atol=1e-14)


def test_lrp_conservation_and_cam_on_the_wrapper(vgg64):
    """LRP-0 on the bias-free ReLU VGG: the input relevance sums to the target's value (a channel
    total, one unit); the engine sees the wrapped model's layers. Grad-CAM at an earlier layer runs."""
    model, v, x = vgg64
    with jax.enable_x64(True):
        for w, t in ((LayerOutput(model, "features.8"), 3), (LayerOutput(model, "features.8", unit=(1, 2, 6)), 0)):

            @jax.jit
            def run(v_, x_):
                # LRP-0 == gradient x input on a bias-free ReLU network (the identity behind conservation)
                return LRP(C.epsilon(0.0))(w, v_, x_, t), w.apply(v_, x_)[:, t], (input_gradient(w, v_, x_, t) * x_).sum(-1)

            r, value, gxi = run(v, x)
            assert float(jnp.abs(value).min()) > 0
            np.testing.assert_allclose(np.asarray(r.sum((1, 2))), np.asarray(value), rtol=1e-10)
            np.testing.assert_allclose(np.asarray(r), np.asarray(gxi), rtol=1e-9, atol=1e-12)
        w = LayerOutput(model, "features.8")

        @jax.jit
        def others(v_, x_):
            return methods.get("lrp-epsilon")(w, v_, x_, 3), methods.get("grad-cam", layer="features.5")(w, v_, x_, 3)

        eps, cam = others(v, x)
        assert np.isfinite(np.asarray(eps)).all()
        assert cam.shape == (2, 32, 32) and cam.dtype == jnp.float64 and float(cam.max()) > 0


def test_layer_output_errors(vgg64):
    model, v, x = vgg64
    with jax.enable_x64(True):
        shape = lambda w: jax.eval_shape(w.apply, v, x)
        with pytest.raises(ValueError, match="did you mean 'features.8'"):
            shape(LayerOutput(model, "features.88"))
        with pytest.raises(ValueError, match="out of range"):
            shape(LayerOutput(model, "features.8", unit=(0, 0, 999)))
        with pytest.raises(ValueError, match="3 int"):
            shape(LayerOutput(model, "features.8", unit=(0, 0)))
        with pytest.raises(ValueError, match="reduce"):
            shape(LayerOutput(model, "features.8", reduce="max"))


# ------------------------------------------------------------------------------ layer attribution


def test_linear_approx_is_layer_gradient_times_activation(vgg64):
    model, v, x = vgg64
    layer, t = "features.8", jnp.array([1, 3])
    with jax.enable_x64(True):
        m = LinearApprox(layer=layer)

        @jax.jit
        def run(v_, x_, t_):
            acts, grads, _ = methods.layer_gradients(model, v_, x_, t_, [layer])
            return (
                acts[layer],
                grads[layer],
                m.attribution(model, v_, x_, t_),
                m.layer_map(model, v_, x_, t_),
                m(model, v_, x_, t_),
                LinearApprox(layer=layer).attribution(LayerOutput(model, layer), v_, x_, t_),
                LinearApprox()(model, v_, x_, t_),
                LinearApprox(layer=model.cam_layer)(model, v_, x_, t_),
            )

        a, g, att, lm, full, att_t, by_default, by_name = run(v, x, t)
        np.testing.assert_allclose(np.asarray(att), np.asarray(a * g), rtol=1e-13)
        np.testing.assert_allclose(np.asarray(lm), np.asarray((a * g).sum(-1)), rtol=1e-12, atol=1e-15)
        assert full.shape == (2, 32, 32) and full.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(full), np.asarray(methods.upsample_bilinear(lm, (32, 32))), rtol=1e-13)
        # at the target layer itself the gradient of channel c's total is one-hot in c: the
        # wrapper's capture sees the layer output after taps' probe (it is the outermost interceptor)
        np.testing.assert_allclose(np.asarray(att_t), np.asarray(a * jax.nn.one_hot(t, a.shape[-1])[:, None, None]), rtol=1e-13)
        # default layer: the model's cam_layer
        np.testing.assert_allclose(np.asarray(by_default), np.asarray(by_name), rtol=1e-13)


def test_layer_ig_completeness(vgg64):
    """sum of the layer attribution == S(x) - S(x') (Gauss-Legendre, many nodes)."""
    model, v, x = vgg64
    with jax.enable_x64(True):
        m = LayerIntegratedGradients(layer="features.8", steps=64, rule="gauss-legendre")
        att = jax.jit(m.attribution, static_argnums=0)(model, v, x, 2)
        s = model.apply(v, x)[:, 2] - model.apply(v, jnp.zeros_like(x))[:, 2]
        np.testing.assert_allclose(np.asarray(att.sum((1, 2, 3))), np.asarray(s), rtol=2e-3)


class _Captum:
    def __init__(self):
        with np.load(FIXTURE) as z:
            self.a = {k: z[k] for k in z.files}
        self.meta = json.loads(str(self.a["meta"]))
        spec = self.meta["xaijax_constructor"]
        self.model = models.get(spec["arch"], **spec["kwargs"])
        size = self.meta["input_size"]
        sd = {k[3:]: np.asarray(v, np.float64) for k, v in self.a.items() if k.startswith("sd/") and v.dtype.kind == "f"}
        sd.update({k[3:]: v for k, v in self.a.items() if k.startswith("sd/") and v.dtype.kind != "f"})
        self.variables = from_torch_state_dict(self.model, sd, input_shape=(1, size, size, 3))
        self.x = self.a["x"]
        self.t = self.a["target"].astype(np.int32)


@pytest.fixture(scope="module")
def captum():
    return _Captum()


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def test_captum_layer_references(captum):
    """xaijax in float64 vs Captum 0.9 in float64 on the same tiny VGG16 (ported weights), at
    ``features.20``: LinearApprox.attribution == LayerGradientXActivation, LayerIntegratedGradients
    (16 Gauss-Legendre nodes, zero baseline) == Captum's with ``method="gausslegendre"``, and the
    input gradient of LayerOutput's unit (i, j, c) == NeuronGradient of (c, i, j). Layouts: Captum's
    NCHW is compared with xaijax's NHWC transposed. Measured: 7e-16 (gradient x activation),
    1e-16 (neuron gradient), 1e-9 (layer IG: Captum casts its quadrature weights to float32,
    ``torch.tensor(step_sizes).float()``, a relative rounding of ~6e-8 per weight)."""
    meta = captum.meta
    assert meta["captum"] == "0.9.0" and meta["layer"] == "features.20"
    layer = meta["layer"]
    with jax.enable_x64(True):
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, captum.variables)
        x, t, model = jnp.asarray(captum.x, jnp.float64), jnp.asarray(captum.t), captum.model
        c, i, j = meta["neuron_torch_chw"]

        @jax.jit
        def run(v_, x_, t_):
            return (
                LinearApprox(layer=layer).attribution(model, v_, x_, t_),
                LayerIntegratedGradients(layer=layer, steps=meta["ig_steps"], rule="gauss-legendre").attribution(model, v_, x_, t_),
                input_gradient(LayerOutput(model, layer, unit=(i, j, c)), v_, x_, 0),
            )

        gxa, ig, ng = run(v, x, t)
    for ours, key in ((gxa, "layer_gxa"), (ig, "layer_ig"), (ng, "neuron_gradient")):
        ref = captum.a[f"out/{key}"]
        assert float(np.abs(ref).max()) > 0, key
        err = float(np.abs(_nchw(ours) - ref).max())
        assert err <= 1e-6 * max(1.0, float(np.abs(ref).max())), f"{key}: max |diff| {err:.3g}"


# ------------------------------------------------------------------------------ segmentation


class _FCN(nn.Module):
    """A tiny fully-convolutional segmenter without biases: (N, H, W, 3) -> (N, H, W, 3)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), padding="SAME", use_bias=False, name="conv1")(x)
        x = nn.relu(x)
        return nn.Conv(3, (1, 1), use_bias=False, name="score")(x)


@pytest.fixture(scope="module")
def fcn64():
    with jax.enable_x64(True):
        model = _FCN()
        x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12, 12, 3)))
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), jax.jit(model.init)(jax.random.key(0), x[:1]))
        mask = jnp.asarray(np.random.default_rng(4).random((2, 12, 12)) > 0.5, jnp.float64)
    return model, v, x, mask


def test_segmentation_region_value_and_gradient(fcn64):
    model, v, x, mask = fcn64
    with jax.enable_x64(True):
        w = SegmentationRegion(model)
        vm = attach(v, mask=mask)

        @jax.jit
        def run(vm_, v_, x_):
            grads = [input_gradient(w, vm_, x_, c) for c in range(3)]
            refs = [jax.grad(lambda xx: (mask * model.apply(v_, xx)[..., c]).sum())(x_) for c in range(3)]
            # per-image data under vmap: the mask is mapped together with the image
            per_sample = jax.vmap(lambda xi, mi: input_gradient(w, attach(v_, mask=mi[None]), xi[None], 1)[0])(x_, mask)
            return w.apply(vm_, x_), model.apply(v_, x_), grads, refs, LRP(C.epsilon(0.0))(w, vm_, x_, 1), per_sample

        out, logits, grads, refs, r, per_sample = run(vm, v, x)
        np.testing.assert_allclose(np.asarray(per_sample), np.asarray(grads[1]), rtol=1e-12, atol=1e-14)
        logits = np.asarray(logits)
        direct = np.einsum("nhw,nhwk->nk", np.asarray(mask), logits)
        np.testing.assert_allclose(np.asarray(out), direct, rtol=1e-13)
        for g, ref in zip(grads, refs):
            assert float(jnp.abs(ref).max()) > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-12, atol=1e-14)
        # a shared (H, W) mask and the region mean
        out_shared = SegmentationRegion(model, reduce="mean").apply(attach(v, mask=mask[0]), x)
        np.testing.assert_allclose(
            np.asarray(out_shared), np.einsum("hw,nhwk->nk", np.asarray(mask[0]), logits) / float(mask[0].sum()), rtol=1e-13
        )
        # LRP-0 through the functional sum: input relevance sums to the region's score
        np.testing.assert_allclose(np.asarray(r.sum((1, 2))), np.asarray(out[:, 1]), rtol=1e-10)


def test_segmentation_region_errors(fcn64):
    model, v, x, mask = fcn64
    w = SegmentationRegion(model)
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="attach"):
            jax.eval_shape(w.apply, v, x)
        with pytest.raises(ValueError, match="does not match"):
            jax.eval_shape(w.apply, attach(v, mask=mask[:, :6]), x)
        with pytest.raises(ValueError, match="batch of 1"):
            jax.eval_shape(w.apply, attach(v, mask=mask), x[:1])


# ------------------------------------------------------------------------------ detection


@pytest.fixture(scope="module")
def det():
    model = D.TinyDetector(num_classes=3, width=4, layers=(1, 1, 1), head_width=8)
    v = D.init_variables(model, seed=0, image_size=(32, 32))
    rng = np.random.default_rng(5)
    # random predictor weights large enough that scores spread (untrained: objectness ~ 0.01)
    head = v["params"]["head"]
    for k in ("objectness", "cls", "box"):
        head[k]["kernel"] = (0.3 * rng.standard_normal(head[k]["kernel"].shape)).astype(np.float32)
    head["objectness"]["bias"] = np.zeros_like(head["objectness"]["bias"])
    x = jnp.asarray(rng.random((2, 32, 32, 3)), jnp.float32)
    return model, v, x


def _np_iou(a, b):
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    area = lambda z: np.maximum(z[..., 2] - z[..., 0], 0) * np.maximum(z[..., 3] - z[..., 1], 0)
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _np_box_score(dets, boxes, labels, thr):
    """pytorch-grad-cam's FasterRCNNBoxScoreTarget on host detections, the match searched among
    the target class's detections (see DetectionScore)."""
    total = 0.0
    for b, c in zip(boxes, labels):
        sel = dets["labels"] == c
        if c < 0 or not sel.any():
            continue
        ious = _np_iou(b[None], dets["boxes"][sel].astype(np.float64))
        j = int(np.argmax(ious))
        if ious[j] > thr:
            total += ious[j] + float(dets["scores"][sel][j])
    return total


def test_detection_score_matches_numpy(det):
    model, v, x = det
    props = D.proposals(model, v, x)
    dets = D.detect(props, score_threshold=0.05, iou_threshold=0.5, max_detections=10_000)
    assert all(len(d["boxes"]) > 2 for d in dets)
    # targets: jittered copies of detections (label kept, and one with another label), a miss, padding
    boxes, labels = [], []
    for d in dets:
        b0, b1 = d["boxes"][0], d["boxes"][1]
        boxes.append([b0 + 1.0, b1 - 0.5, [0.0, 0.0, 1.0, 1.0], b0])
        labels.append([d["labels"][0], d["labels"][1], d["labels"][0], -1])
    boxes, labels = np.asarray(boxes, np.float32), np.asarray(labels, np.int32)
    w = DetectionScore(model)
    vt = attach(v, boxes=boxes, labels=labels)

    @jax.jit
    def run(vt_, x_):
        return (
            w.apply(vt_, x_),
            input_gradient(w, vt_, x_, 0),
            methods.get("grad-cam", layer="layer3")(w, vt_, x_, 0),
            methods.get("linear-approx")(w, vt_, x_, 0),  # default layer: head.relu
        )

    out, g, cam, lin = (np.asarray(a) for a in run(vt, x))
    assert out.shape == (2, 1)
    ref = np.array([_np_box_score(d, b, l, 0.5) for d, b, l in zip(dets, boxes, labels)])
    assert (ref > 1.0).all()  # at least one match per image
    np.testing.assert_allclose(out[:, 0], ref, rtol=1e-5)
    # gradient (through the matched boxes' IoU and scores): finite, non-zero; Grad-CAM runs
    assert np.isfinite(g).all() and float(np.abs(g).max()) > 0
    assert cam.shape == (2, 32, 32) and np.isfinite(cam).all()
    assert np.isfinite(lin).all() and float(np.abs(lin).max()) > 0


def test_greedy_nms_matches_host_nms():
    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 40, (60, 2))
    wh = rng.uniform(4, 20, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.random(60).astype(np.float32)
    cand = scores > 0.2
    keep = np.asarray(greedy_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(cand), 0.4))
    from xaijax.metrics.detection import batched_nms

    idx = np.flatnonzero(cand)
    ref = np.zeros(60, bool)
    ref[idx[batched_nms(boxes[idx], scores[idx], np.zeros(len(idx), int), 0.4)]] = True
    np.testing.assert_array_equal(keep, ref)
    assert 0 < keep.sum() < cand.sum()


def test_layer_output_on_a_vit_token_layer():
    """Tokens (N, T, D) reduce to (N, D); the forwarded ``num_prefix_tokens``/``grid_size`` let
    Grad-CAM at an earlier block build its token grid; the gradient equals the direct one; RISE
    and AttnLRP run on the wrapper."""
    model = models.get("vit_b_16", num_classes=5, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    v = models.random_variables(model, (1, 32, 32, 3), seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    layer = "encoder.layers.encoder_layer_1"
    w = LayerOutput(model, layer)
    assert w.num_prefix_tokens == model.num_prefix_tokens and w.grid_size == model.grid_size
    assert w.attention_layers == model.attention_layers and w.image_size == model.image_size

    @jax.jit
    def run(v_, x_):
        ref = jax.grad(lambda xx: taps.forward(model, v_, xx, capture=[layer])[1][layer][..., 4].sum())(x_)
        return (
            input_gradient(w, v_, x_, 4),
            ref,
            methods.get("grad-cam", layer="encoder.layers.encoder_layer_0.ln_1")(w, v_, x_, 4),
            methods.get("rise", n=8, chunk=4, score="logit")(w, v_, x_, 4),
            methods.get("attnlrp")(w, v_, x_, 4),
        )

    g, ref, cam, rise, alrp = run(v, x)
    assert float(jnp.abs(ref).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    for name, m in (("grad-cam", cam), ("rise", rise), ("attnlrp", alrp)):
        assert m.shape == (2, 32, 32) and np.isfinite(np.asarray(m)).all() and float(jnp.abs(m).max()) > 0, name


def test_layer_attribution_of_any_method(vgg64):
    """LayerAttribution runs a method on the layer's activation: gradient x input there is
    linear-approx; LRP-0 there equals it too on the bias-free ReLU network and conserves the
    target logit (all biases are zero); the map is upsampled like linear-approx's."""
    from xaijax.methods.gradient import Gradient
    from xaijax.methods.targets import LayerAttribution

    model, v, x = vgg64
    layer, t = "features.8", jnp.array([1, 3])
    with jax.enable_x64(True):

        @jax.jit
        def run(v_, x_, t_):
            return (
                LinearApprox(layer=layer).layer_map(model, v_, x_, t_),
                LayerAttribution(Gradient(times_input=True, reduce="sum"), layer).layer_map(model, v_, x_, t_),
                LayerAttribution(LRP(C.epsilon(0.0)), layer).layer_map(model, v_, x_, t_),
                model.apply(v_, x_)[jnp.arange(2), t_],
                LayerAttribution("gradient", layer)(model, v_, x_, t_),
            )

        lin, gxa, lrp0, logit, full = run(v, x, t)
    assert float(np.abs(np.asarray(lin)).max()) > 0
    np.testing.assert_allclose(np.asarray(gxa), np.asarray(lin), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(lrp0), np.asarray(lin), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lrp0).sum((1, 2)), np.asarray(logit), rtol=1e-10)
    assert full.shape == (2, 32, 32) and full.dtype == jnp.float64
    with pytest.raises(ValueError, match="classifier attribution method"):
        LayerAttribution("d-rise", layer)
