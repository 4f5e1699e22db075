"""Deletion / insertion curves in float64 against a NumPy float64 loop (issue: float64 stays float64)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.metrics import faithfulness as F


def _linear_model(w: np.ndarray):
    return lambda x: jnp.einsum("nhwc,hwck->nk", x, jnp.asarray(w, x.dtype))


def _reference(images, maps, targets, w, mode, step, blur):
    n, h, w_, c = images.shape
    out = []
    for i in range(n):
        order = np.argsort(maps[i].reshape(-1), kind="stable")[::-1]  # most salient first, ties: later pixel first
        sub = np.zeros_like(images[i]) if mode == "deletion" else blur[i]
        curve = []
        for s in range(F.num_steps(h, w_, step) + 1):
            top = np.zeros(h * w_, bool)
            top[order[: min(s * step, h * w_)]] = True
            top = top.reshape(h, w_)[..., None]
            x = np.where(top, images[i], sub) if mode == "insertion" else np.where(top, sub, images[i])
            z = np.einsum("hwc,hwck->k", x, w)
            p = np.exp(z - z.max())
            curve.append((p / p.sum())[targets[i]])
        out.append(curve)
    return np.asarray(out)


def test_deletion_and_insertion_curves_in_float64(x64):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 6, 3))
    maps = rng.normal(size=(2, 8, 6))
    w = rng.normal(size=(8, 6, 3, 4)) * 0.3
    targets = np.array([1, 3])
    blur = np.asarray(imageops.gaussian_blur(jnp.asarray(images), 5, 2.0))
    for mode in ("deletion", "insertion"):
        got = F.causal_curves(_linear_model(w), jnp.asarray(images), jnp.asarray(maps), targets, mode=mode,
                              step_pixels=7, kernel_size=5, sigma=2.0)
        ref = _reference(images, maps, targets, w, mode, 7, blur)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
