"""Training utilities (loss, AP, init, train step, data stream) and the bundled synthetic weights."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import checkpoints, models, training
from xaijax.data import SyntheticScenes

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
BUNDLED = ("synthetic_vgg16.safetensors", "synthetic_resnet18.safetensors")


# ----------------------------------------------------------------------------- average precision


def _ap_bruteforce(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC all-point AP for untied scores, written as loops: mean over positives of the best
    precision at that positive's rank or any later rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    y = [bool(labels[i]) for i in order]
    n_pos = sum(y)
    precision = []
    tp = 0
    for k, yk in enumerate(y):
        tp += yk
        precision.append(tp / (k + 1))
    total = 0.0
    for k, yk in enumerate(y):
        if yk:
            total += max(precision[k:])
    return total / n_pos


def test_ap_hand_computed_example():
    # ranks: + - + - +  -> precisions at the positives 1/1, 2/3, 3/5, already non-increasing
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    assert training.average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-12)


def test_ap_interpolates_precision_from_higher_recall():
    # ranks: - + +  -> raw precisions 1/2 and 2/3; interpolation lifts the first to 2/3,
    # so AP = 2/3 (the uninterpolated mean would be 7/12)
    ap = training.average_precision(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1]))[0]
    assert ap == pytest.approx(2 / 3, abs=1e-12)


def test_ap_ties_enter_together_and_order_of_ties_does_not_matter():
    # the positive ties with a negative: one threshold at 0.5 with TP=1, FP=2 -> AP = 1/3
    a = training.average_precision(np.array([0.9, 0.5, 0.5]), np.array([0, 1, 0]))[0]
    b = training.average_precision(np.array([0.9, 0.5, 0.5]), np.array([0, 0, 1]))[0]
    assert a == pytest.approx(1 / 3, abs=1e-12) and b == pytest.approx(1 / 3, abs=1e-12)
    # a constant predictor scores the class frequency (= the chance level)
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 0], [0, 0]], np.float32)
    ap = training.average_precision(np.zeros((5, 2)), y)
    np.testing.assert_allclose(ap, [2 / 5, 1 / 5], atol=1e-12)
    assert training.chance_map(y) == pytest.approx(0.3, abs=1e-12)


def test_ap_class_without_positives_is_nan_and_left_out_of_the_mean():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.1, 0.4, 0.9]])
    labels = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    m, ap = training.mean_average_precision(scores, labels)
    assert math.isnan(ap[1])
    np.testing.assert_allclose(ap[[0, 2]], [1.0, 1.0])
    assert m == 1.0
    m_none, _ = training.mean_average_precision(scores, np.zeros_like(labels))
    assert math.isnan(m_none)


def test_ap_matches_bruteforce_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 5))
    labels = (rng.random((60, 5)) < 0.3).astype(np.float32)
    labels[0] = 1  # every class has a positive
    ap = training.average_precision(scores, labels)
    want = [_ap_bruteforce(scores[:, c], labels[:, c]) for c in range(5)]
    np.testing.assert_allclose(ap, want, atol=1e-12)
    # invariant under a strictly increasing transform (logits vs sigmoid probabilities)
    np.testing.assert_allclose(training.average_precision(1 / (1 + np.exp(-scores)), labels), ap, atol=1e-12)


def test_ap_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        training.average_precision(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        training.average_precision(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        training.average_precision(np.array([0.1, 0.2]), np.array([2, 0]))


# ----------------------------------------------------------------------------- loss, init, optimiser


def test_multilabel_bce_matches_closed_form():
    z = np.array([[-3.0, 0.0, 2.5], [40.0, -40.0, 0.7]])
    t = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # log sigmoid(z) = -log(1 + e^-z), log(1 - sigmoid(z)) = -log(1 + e^z), in float64
    want = np.mean(t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z))
    assert want == pytest.approx((np.log1p(np.exp(-3.0)) + np.log(2) + np.log1p(np.exp(-2.5)) + 0 + 40 + np.log1p(np.exp(0.7))) / 6, rel=1e-9)
    got = float(training.multilabel_bce(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32)))
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        training.multilabel_bce(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_kaiming_init_variances():
    params = {
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32), "bias": jnp.ones((128,))},
        "fc": {"kernel": jnp.zeros((512, 256)), "bias": jnp.ones((256,))},
        "bn": {"scale": jnp.full((8,), 2.0), "bias": jnp.full((8,), 3.0)},
    }
    out = training.kaiming_init(params, 0, skip=("fc",))
    k = out["conv"]["kernel"]
    assert k.shape == (3, 3, 64, 128) and k.dtype == np.float32
    assert float(np.std(k)) == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.02)
    assert abs(float(np.mean(k))) < 0.05 * math.sqrt(2 / (9 * 64))
    assert float(np.std(out["fc"]["kernel"])) == pytest.approx(math.sqrt(1 / 512), rel=0.02)
    for leaf in (out["conv"]["bias"], out["fc"]["bias"], out["bn"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)
    np.testing.assert_array_equal(out["bn"]["scale"], 1.0)
    # a function of the seed only
    np.testing.assert_array_equal(training.kaiming_init(params, 0, skip=("fc",))["conv"]["kernel"], k)
    assert not np.array_equal(training.kaiming_init(params, 1, skip=("fc",))["conv"]["kernel"], k)
    with pytest.raises(ValueError, match="embedding"):
        training.kaiming_init({"emb": {"embedding": jnp.zeros((3, 4))}}, 0)


def test_optimizer_schedule_and_decay_mask():
    tx = training.make_optimizer(1e-2, steps=10, warmup_steps=2, weight_decay=0.5, clip_norm=None)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    # step 0 of the warm-up has learning rate 0: nothing moves
    upd, state = tx.update(zero, state, params)
    np.testing.assert_array_equal(upd["kernel"], 0.0)
    # step 1: lr = 1e-2 / 2; zero gradient -> only decoupled weight decay, and only on the kernel
    upd, state = tx.update(zero, state, params)
    np.testing.assert_allclose(upd["kernel"], -0.5e-2 * 0.5 * 1.0, rtol=1e-6)
    np.testing.assert_array_equal(upd["bias"], 0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.make_optimizer(1e-3, steps=10, warmup_steps=10)


# ----------------------------------------------------------------------------- reduced training runs

TINY_DS = SyntheticScenes(size=32, train_size=48, val_size=16, test_size=0)


@pytest.fixture(scope="module")
def tiny_vgg():
    """A 13-conv VGG16 at width 1/16 (4..32 channels) on 32x32 scenes, with its jitted step."""
    model = models.get("vgg16", num_classes=12, width=1 / 16, hidden=16, pool_size=1, dropout=0.0)
    tx = training.make_optimizer(3e-3, steps=40, warmup_steps=0, weight_decay=0.0)
    step = training.make_train_step(model, tx)
    return model, tx, step


def _run(model, tx, step, seed: int, n_steps: int, stream: training.TrainStream):
    state = training.create_train_state(
        model, tx, seed, (32, 32, 3), init="data", output_layers=("classifier/6",), init_images=stream.batch(0)[0]
    )
    losses = []
    for images, targets in stream.iterate(0, n_steps):
        state, m = step(state, images, targets)
        losses.append(float(m["loss"]))
    return state, losses


def test_tiny_vgg16_loss_decreases(tiny_vgg):
    model, tx, step = tiny_vgg
    stream_one = training.TrainStream(
        SyntheticScenes(size=32, train_size=16, val_size=0, test_size=0), batch_size=16, cache=True
    )
    # the same 16 images every step: the loss must drop well below its start
    state, losses = _run(model, tx, step, seed=0, n_steps=25, stream=stream_one)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert int(state.step) == 25


def test_training_is_deterministic_given_the_seed(tiny_vgg):
    model, tx, step = tiny_vgg
    stream = training.TrainStream(TINY_DS, batch_size=16)
    a, _ = _run(model, tx, step, seed=3, n_steps=3, stream=stream)
    b, _ = _run(model, tx, step, seed=3, n_steps=3, stream=stream)
    c, _ = _run(model, tx, step, seed=4, n_steps=3, stream=stream)
    leaves_a, leaves_b, leaves_c = (jax.tree.leaves(s.params) for s in (a, b, c))
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(z)) for x, z in zip(leaves_a, leaves_c))


def test_tiny_resnet_updates_batch_stats_and_learns():
    # the zoo's ResNet code with one BasicBlock per stage (a reduced ResNet-18), width 4
    model = models.ResNet(block=models.resnet.BasicBlock, layers=(1, 1, 1, 1), num_classes=12, width=4)
    tx = training.make_optimizer(1e-2, steps=20, warmup_steps=0, weight_decay=0.0)
    step = training.make_train_step(model, tx)
    stream = training.TrainStream(SyntheticScenes(size=32, train_size=16, val_size=0, test_size=0), 16, cache=True)
    state = training.create_train_state(model, tx, 0, (32, 32, 3), output_layers=("fc",))
    mean0 = np.asarray(state.batch_stats["bn1"]["mean"]).copy()
    np.testing.assert_array_equal(mean0, 0.0)
    losses = []
    for images, targets in stream.iterate(0, 20):
        state, m = step(state, images, targets)
        losses.append(float(m["loss"]))
    # running statistics moved towards the batch statistics (BN handled as mutable state)
    assert np.abs(np.asarray(state.batch_stats["bn1"]["mean"])).max() > 1e-3
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    # eval mode uses the running statistics: an image's logits do not depend on the others
    images, _ = stream.batch(0)
    full = training.predict(model, state.variables(), images, batch_size=16)
    other = images.copy()
    other[1:] = other[1:][::-1] * 0.5
    np.testing.assert_allclose(training.predict(model, state.variables(), other, batch_size=16)[0], full[0], rtol=1e-5, atol=1e-6)


def test_data_dependent_init_normalises_every_hidden_layer(tiny_vgg):
    model, tx, _ = tiny_vgg
    images = TINY_DS.batch("train", 0, 16)["images"]
    state = training.create_train_state(model, tx, 0, (32, 32, 3), output_layers=("classifier/6",))
    params = training.data_dependent_init(model, state.params, images, skip=("classifier/6",))
    names, stats_fn = training.layer_output_stats(model, params, images)
    assert names[0] == "features/0" and names[-1] == "classifier/6" and len(names) == 16  # 13 conv + 3 dense
    for name, (mean, std) in zip(names[:-1], stats_fn(params, images)):
        np.testing.assert_allclose(mean, 0.0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(std, 1.0, atol=1e-3, err_msg=name)
    # the skipped output layer keeps its weights; the input params were not modified in place
    np.testing.assert_array_equal(params["classifier"]["6"]["kernel"], state.params["classifier"]["6"]["kernel"])
    assert not np.allclose(params["features"]["0"]["kernel"], state.params["features"]["0"]["kernel"])
    with pytest.raises(ValueError, match="init_images"):
        training.create_train_state(model, tx, 0, (32, 32, 3), init="data")


def test_fold_vgg_batchnorm_gives_the_same_eval_function():
    kw = dict(num_classes=5, width=1 / 16, hidden=8, pool_size=1, dropout=0.0)
    bn_model, plain = models.get("vgg16_bn", **kw), models.get("vgg16", **kw)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(bn_model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    params = training.kaiming_init(shapes["params"], 0)
    stats = jax.tree.map(lambda s: rng.uniform(0.2, 2.0, s.shape).astype(np.float32), shapes["batch_stats"])
    for layer in params["features"].values():  # non-trivial BatchNorm affine parameters
        if "scale" in layer:
            layer["scale"] = rng.uniform(0.5, 1.5, layer["scale"].shape).astype(np.float32)
            layer["bias"] = rng.normal(0, 0.3, layer["bias"].shape).astype(np.float32)
    for layer in stats["features"].values():
        layer["mean"] = layer["mean"] - 1.0  # means in [-0.8, 1]
    variables = {"params": params, "batch_stats": stats}
    folded = training.fold_vgg_batchnorm(variables, plain.cfg)
    assert "batch_stats" not in folded
    # plain VGG16 layout: conv at 0, 2, 5, 7, ... (28), classifier copied
    assert sorted(folded["params"]["features"], key=int)[:4] == ["0", "2", "5", "7"]
    assert "28" in folded["params"]["features"] and "40" not in folded["params"]["features"]
    images = TINY_DS.batch("train", 0, 8)["images"]
    want = training.predict(bn_model, variables, images, batch_size=8)
    got = training.predict(plain, folded, images, batch_size=8)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_train_stream_is_a_function_of_the_step():
    ds = SyntheticScenes(size=32, train_size=10, val_size=0, test_size=0)
    stream = training.TrainStream(ds, batch_size=4, hflip_seed=7)
    np.testing.assert_array_equal(stream.indices(2), [8, 9, 0, 1])
    direct = ds.batch("train", 0, 10)
    got = list(stream.iterate(1, 4, prefetch=2))
    assert len(got) == 3
    n_flipped = 0
    for s, (images, targets) in zip(range(1, 4), got):
        idx, flip = stream.indices(s), stream.flips(s)
        np.testing.assert_array_equal(flip, np.random.default_rng([7, s]).random(4) < 0.5)
        want = np.where(flip[:, None, None, None], direct["images"][idx][:, :, ::-1], direct["images"][idx])
        np.testing.assert_array_equal(images, want)
        np.testing.assert_array_equal(targets, direct["multi_hot"][idx])
        n_flipped += int(flip.sum())
    assert 0 < n_flipped < 12  # both cases occur in these 12 draws
    # without a seed nothing is flipped
    images, _ = training.TrainStream(ds, batch_size=4).batch(1)
    np.testing.assert_array_equal(images, direct["images"][stream.indices(1)])


# ----------------------------------------------------------------------------- bundled weights


@pytest.fixture(scope="module")
def test_head():
    """The first 100 images of the synthetic test split (seed 0)."""
    return SyntheticScenes().batch("test", 0, 100)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_reach_their_recorded_map(name, test_head):
    path = WEIGHTS / name
    assert path.is_file(), f"bundled weights missing: {path}"
    model, variables, info = checkpoints.load(None, path)
    _, meta = checkpoints.load_variables(path)
    assert info["arch"] == meta["arch"] and meta["preprocess"] == "torchvision"
    assert json.loads(meta["dataset"])["seed"] == 0
    recorded_100 = float(meta["test_map_100"])
    recorded = float(meta["test_map"])
    chance = training.chance_map(test_head["multi_hot"])
    res = training.evaluate(model, variables, test_head["images"], test_head["multi_hot"], batch_size=50)
    # the same computation as at training time; a little slack for float differences across CPUs
    assert res["map"] >= recorded_100 - 0.01, (res["map"], recorded_100)
    assert abs(res["map"] - recorded_100) < 0.01
    # far above chance (about 0.2) on the 100 images, and a recorded held-out mAP that is useful
    assert res["map"] > chance + 0.5 and recorded >= 0.75
    if meta["arch"] == "vgg16":  # shipped as plain VGG16 (BatchNorm folded away after training)
        assert "batch_stats" not in variables and len(variables["params"]["features"]) == 13
    # the card describes this very file: its held-out mAP and its sha256
    card = path.with_suffix(".md").read_text()
    assert f"{recorded:.4f}" in card
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
