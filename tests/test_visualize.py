"""Natural pre-images (xaijax.features): closed-form optima, inversion, vmap equivalence,
regulariser values, errors and the ``visualize`` command."""

from __future__ import annotations

import argparse
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.features import visualize as V
from xaijax.features.cli import add_visualize_parser, parse_units, tile_grid
from xaijax.features.visualize import PreImage, invert, maximize, project_pixel_norm

# jitted once per (exponent, scale): eager evaluation would compile every small op separately
total_variation = jax.jit(V.total_variation, static_argnums=(1, 2))
alpha_norm = jax.jit(V.alpha_norm, static_argnums=(1, 2))

# ----------------------------------------------------------------------------- tiny models


class LinearHead(nn.Module):
    """logits = <W_c, x> + b_c over the flattened image: a linear unit per class."""

    classes: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes, name="fc")(x.reshape(x.shape[0], -1))


class Mixer(nn.Module):
    """An injective map: a 1x1 convolution with an invertible 3x3 kernel, then a head."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (1, 1), name="mix")(x)
        return nn.Dense(2, name="head")(h.mean((1, 2)))


class TinyConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        h = nn.Conv(5, (3, 3), strides=(2, 2), name="conv2")(h)
        h = nn.relu(h)
        return nn.Dense(3, name="fc")(h.mean((1, 2)))


def _cos(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    h = w = 6
    kernel = rng.standard_normal((h * w * 3, 3)).astype(np.float32)
    # make pixel norms of the weights very unequal, so that the bounded optimum
    # (per-pixel normalised weights) differs from the weights' own direction
    scale = np.linspace(0.2, 3.0, h * w, dtype=np.float32).repeat(3)[:, None]
    variables = {"params": {"fc": {"kernel": jnp.asarray(kernel * scale), "bias": jnp.zeros(3)}}}
    return LinearHead(), variables, (h, w)


@pytest.fixture(scope="module")
def tiny():
    from xaijax.models import random_variables

    model = TinyConvNet()
    return model, random_variables(model, (1, 12, 12, 3), seed=1)


# ----------------------------------------------------------------------------- regularisers


def test_total_variation_hand_computed():
    x = jnp.asarray([[1.0, 2.0], [4.0, 8.0]])[None, :, :, None]  # (1, 2, 2, 1)
    # dx (last column replicated -> 0): [[1, 0], [4, 0]]; dy: [[3, 6], [0, 0]]
    # beta=2: (1 + 9) + (0 + 36) + (16 + 0) + 0 = 62, divided by H W V^beta = 4 * 0.5^2
    np.testing.assert_allclose(total_variation(x, 2.0, 0.5), [62.0 / (4 * 0.25)], rtol=1e-6)
    # beta=1: sqrt(10) + 6 + 4 + 0, divided by H W V = 4 * 2
    np.testing.assert_allclose(total_variation(x, 1.0, 2.0), [(math.sqrt(10) + 10) / 8], rtol=1e-6)
    # beta=3 on two channels: channels add
    x2 = jnp.concatenate([x, 2 * x], axis=-1)
    per = np.array([10**1.5, 6**3, 4**3, 0.0]).sum()
    np.testing.assert_allclose(total_variation(x2, 3.0, 1.0), [per * (1 + 8) / 4], rtol=1e-6)
    # beta < 2 has a kink at zero difference: the gradient stays finite (0 there)
    g = jax.grad(lambda z: total_variation(z, 1.0, 1.0)[0])(jnp.zeros((1, 3, 3, 3)))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) == 0.0


def test_alpha_norm_hand_computed():
    x = jnp.asarray([[[3.0, 4.0], [6.0, 8.0]]])[None]  # (1, 1, 2, 2): pixel norms 5 and 10
    np.testing.assert_allclose(alpha_norm(x, 6.0, 2.0), [(5.0**6 + 10.0**6) / (2 * 2.0**6)], rtol=1e-6)
    np.testing.assert_allclose(alpha_norm(x, 1.0, 1.0), [(5.0 + 10.0) / 2], rtol=1e-6)
    # gradient of sum ||x||^alpha / (HW B^alpha) is alpha ||x||^(alpha-2) x / (HW B^alpha)
    g = jax.grad(lambda z: alpha_norm(z, 6.0, 2.0)[0])(x)
    want = 6 * np.array([5.0**4 * np.array([3, 4]), 10.0**4 * np.array([6, 8])]) / (2 * 64)
    np.testing.assert_allclose(np.asarray(g)[0, 0], want, rtol=1e-5)


def test_project_pixel_norm_and_paper_constants():
    x = jnp.asarray([[[[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]]]])
    np.testing.assert_allclose(project_pixel_norm(x, 2.5), [[[[1.5, 2.0, 0.0], [0.3, 0.4, 0.0]]]], rtol=1e-6)
    cfg = PreImage()
    assert cfg.alpha == 6 and cfg.beta == 2
    np.testing.assert_allclose(cfg.B, 80 / (255 * (0.229 + 0.224 + 0.225) / 3), rtol=1e-9)
    np.testing.assert_allclose([cfg.V, cfg.bound], [cfg.B / 6.5, 2 * cfg.B])
    assert V.paper_B("caffe") == 80.0 and V.paper_B("none") == pytest.approx(80 / 255)
    lo, hi = V.valid_box("torchvision")
    np.testing.assert_allclose(lo, [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(hi, [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6)


# ----------------------------------------------------------------------------- closed forms


def test_linear_unit_under_pixel_bound_reaches_the_known_maximiser(linear):
    model, variables, (h, w) = linear
    cfg = PreImage(steps=150, lambda_alpha=0.0, lambda_tv=0.0, B=1.0, B_plus=1.5, jitter=0, scale=1.0)
    res = maximize(model, variables, [0, 2], size=(h, w), key=3, config=cfg)
    kernel = np.asarray(variables["params"]["fc"]["kernel"])
    for k, c in enumerate([0, 2]):
        wc = kernel[:, c].reshape(h, w, 3)
        best = 1.5 * wc / np.linalg.norm(wc, axis=-1, keepdims=True)  # max <w, x> s.t. ||x(u,v)|| <= B+
        assert _cos(wc, best) < 0.9  # the bound changes the optimum: the test can tell them apart
        assert _cos(res.images[k], best) > 0.99
        np.testing.assert_allclose(res.objective[k], float((wc * best).sum()), rtol=1e-2)


def test_linear_unit_with_alpha_norm_reaches_the_closed_form(linear):
    model, variables, (h, w) = linear
    B, alpha, C = 1.0, 6.0, 2.0
    cfg = PreImage(steps=300, C=C, lambda_alpha=1.0, lambda_tv=0.0, alpha=alpha, B=B, B_plus=math.inf, jitter=0, scale=1.0)
    res = maximize(model, variables, 1, size=(h, w), key=0, config=cfg)
    wc = np.asarray(variables["params"]["fc"]["kernel"])[:, 1].reshape(h, w, 3)
    # stationarity of -C<w,x> + sum ||x(v)||^alpha/(HW B^alpha): x(v) = r(v) w(v)/||w(v)|| with
    # r^(alpha-1) = C ||w(v)|| H W B^alpha / alpha
    n = np.linalg.norm(wc, axis=-1, keepdims=True)
    best = (C * n * h * w * B**alpha / alpha) ** (1 / (alpha - 1)) * wc / n
    assert _cos(res.images[0], best) > 0.99
    np.testing.assert_allclose(np.linalg.norm(res.images[0]), np.linalg.norm(best), rtol=0.02)


def test_inversion_of_an_injective_layer_recovers_the_input():
    model = Mixer()
    rng = np.random.default_rng(1)
    a = np.eye(3, dtype=np.float32) + 0.3 * rng.standard_normal((3, 3)).astype(np.float32)
    variables = {
        "params": {
            "mix": {"kernel": jnp.asarray(a)[None, None], "bias": jnp.asarray([0.1, -0.2, 0.3])},
            "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        }
    }
    x0 = jnp.asarray(rng.standard_normal((2, 8, 8, 3)).astype(np.float32))
    cfg = PreImage(steps=300, lambda_alpha=0.0, lambda_tv=0.0, B_plus=math.inf, jitter=0)
    res = invert(model, variables, x0, layer="mix", key=0, config=cfg)
    d = np.asarray(res.images) - np.asarray(x0)
    rel = np.sqrt((d**2).sum((1, 2, 3)) / (np.asarray(x0) ** 2).sum((1, 2, 3)))
    assert (rel < 1e-2).all(), rel
    assert (np.asarray(res.objective) < 1e-4).all()
    assert res.energy.shape == (2, 300) and float(res.energy[0, -1]) < 1e-3 * float(res.energy[0, 0])


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("kind", ["channel", "unit"])
def test_vmapped_units_equal_single_runs(tiny, kind):
    model, variables = tiny
    cfg = PreImage(steps=15, jitter=2, learning_rate=0.1, scale=1.0)
    units = [4, 0, 2]
    batch = maximize(model, variables, units, layer="conv2", kind=kind, size=12, key=7, config=cfg)
    assert batch.images.shape == (3, 12, 12, 3) and batch.energy.shape == (3, 15)
    for k, u in enumerate(units):
        one = maximize(model, variables, [u], layer="conv2", kind=kind, size=12, key=7, config=cfg)
        np.testing.assert_allclose(one.images[0], batch.images[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(one.objective[0], batch.objective[k], rtol=1e-4, atol=1e-5)
    # different units give different pictures; a different key gives another start
    assert float(jnp.abs(batch.images[0] - batch.images[1]).max()) > 1e-2
    other = maximize(model, variables, [4], layer="conv2", kind=kind, size=12, key=8, config=cfg)
    assert float(jnp.abs(other.images[0] - batch.images[0]).max()) > 1e-2


def test_class_maximisation_is_selective_and_feasible(tiny):
    model, variables = tiny
    box = V.valid_box()
    cfg = PreImage(steps=40, box=box)
    res = maximize(model, variables, [0, 1, 2], layer=None, size=12, key=0, config=cfg)  # class logits
    # each pre-image excites its own class more than the other classes' pre-images do
    logits = np.asarray(model.apply(variables, res.images))  # (image k, class c)
    np.testing.assert_allclose(np.diag(logits), res.objective, rtol=1e-4, atol=1e-5)
    for c in range(3):
        assert logits[c, c] > np.delete(logits[:, c], c).max()
    # the energy went down, and the result is feasible: pixel norm <= B+ and inside the box
    e = np.asarray(res.energy)
    assert (e[:, -1] < e[:, 0]).all()
    imgs = np.asarray(res.images)
    assert np.linalg.norm(imgs, axis=-1).max() <= cfg.bound * (1 + 1e-5)
    assert (imgs >= np.asarray(box[0]) - 1e-6).all() and (imgs <= np.asarray(box[1]) + 1e-6).all()
    assert res.scale > 0  # Z from the initial noise image


# ----------------------------------------------------------------------------- errors


def test_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"unknown layer 'conv3'.*did you mean.*valid layers: conv1, conv2, fc"):
        maximize(model, variables, [0], layer="conv3", size=12)
    with pytest.raises(ValueError, match=r"channel 5 is out of range: the layer has 5 channels \(0..4\)"):
        maximize(model, variables, [0, 5], layer="conv2", size=12)
    with pytest.raises(ValueError, match="channel -1 is out of range"):
        maximize(model, variables, -1, layer=None, size=12)
    with pytest.raises(ValueError, match=r"unit position \(6, 0\) is out of range: the layer's map is 6x6"):
        maximize(model, variables, [[1, 6, 0]], layer="conv2", kind="unit", size=12)
    with pytest.raises(ValueError, match="channel 9 is out of range"):
        invert(model, variables, jnp.zeros((1, 12, 12, 3)), layer="conv1", channels=[9])
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        invert(model, variables, jnp.zeros((1, 12, 12, 3)), layer="nope")
    for field in ("lambda_alpha", "lambda_tv", "C"):
        with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0; got -1"):
            PreImage(**{field: -1.0})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PreImage(steps=0)
    with pytest.raises(ValueError, match="box must be"):
        PreImage(box=((0, 0, 0), (1, -1, 1)))
    with pytest.raises(ValueError, match="unknown kind"):
        maximize(model, variables, [0], layer="conv2", kind="pixel", size=12)
    with pytest.raises(ValueError, match="--units: cannot read"):
        parse_units("a:b")
    assert parse_units("0:4,9") == [0, 1, 2, 3, 9] and parse_units("2:8:3") == [2, 5]


# ----------------------------------------------------------------------------- command line


def test_visualize_command(tmp_path, tiny):
    from xaijax import models
    from xaijax.checkpoints import save_variables

    model = models.get("vgg11", width=1 / 16, num_classes=5, hidden=8, pool_size=1)
    variables = models.random_variables(model, (1, 32, 32, 3), seed=0)
    weights = tmp_path / "tiny.safetensors"
    save_variables(weights, variables, {"arch": "vgg11", "model_kwargs": json.dumps(
        {"width": 1 / 16, "num_classes": 5, "hidden": 8, "pool_size": 1})})
    p = argparse.ArgumentParser(prog="xaijax")
    add_visualize_parser(p.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    argv = ["visualize", "--weights", str(weights), "--layer", "features.18", "--units", "0:3",
            "--steps", "3", "--size", "32", "--batch", "2", "--out", str(out)]
    args = p.parse_args(argv)
    args.func(args)
    imgs = np.load(out / "features.18_channel.npy")
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.float32
    from PIL import Image

    png = np.asarray(Image.open(out / "features.18_channel.png"))
    assert png.shape == (2 * 32 + 2, 2 * 32 + 2, 3)  # 3 tiles on a 2x2 grid with a 2 px gap
    rec = json.loads((out / "features.18_channel.json").read_text())
    assert rec["units"] == [0, 1, 2] and len(rec["activation"]) == 3
    # inversion of an image file's representation: the grid shows the original, then the result
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "im.png")
    args = p.parse_args(argv[:5] + ["--invert", str(tmp_path / "im.png"), "--steps", "2", "--size", "32", "--out", str(out)])
    args.func(args)
    assert np.load(out / "invert_im_features.18.npy").shape == (1, 32, 32, 3)
    assert np.asarray(Image.open(out / "invert_im_features.18.png")).shape == (32, 2 * 32 + 2, 3)
    rec = json.loads((out / "invert_im_features.18.json").read_text())
    assert rec["normalized_error"] > 0 and rec["config"]["C"] == 20.0
    bad = p.parse_args(argv[:4] + ["features.99"] + argv[5:])
    with pytest.raises(ValueError, match="unknown layer 'features.99'.*valid layers: features, features.0"):
        bad.func(bad)
    bad = p.parse_args(argv[:6] + ["30:40"] + argv[7:])
    with pytest.raises(ValueError, match=r"channel 32 is out of range: the layer has 32 channels \(0..31\)"):
        bad.func(bad)
    bad = p.parse_args(argv + ["--lambda-tv", "-2"])
    with pytest.raises(ValueError, match="lambda_tv must be a finite number >= 0; got -2"):
        bad.func(bad)


def test_tile_grid_layout():
    tiles = np.zeros((5, 2, 3, 3))
    for k in range(5):
        tiles[k] = k / 4
    g = tile_grid(tiles, gap=1)
    assert g.shape == (2 * 3 - 1, 3 * 4 - 1, 3)  # 3 columns, 2 rows, 1 px gaps
    assert g[0, 0, 0] == 0 and g[0, 4, 0] == 0.25 and g[3, 4, 0] == 1.0 and g[3, 8, 0] == 1.0  # last cell empty


def test_visualize_is_wired_into_the_cli(tmp_path, capsys):
    from xaijax import cli

    code = cli.main(["visualize", "--weights", str(tmp_path / "missing.safetensors"), "--layer", "features.0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("xaijax: error:") and "missing.safetensors" in err and "\n" not in err
