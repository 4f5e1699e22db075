"""A small end-to-end run of the whole pipeline, offline, in seconds on a CPU.

Build a zoo model (a narrow ResNet-18 with 10 classes), write its (seeded, untrained)
weights through the native checkpoint format and load them back, predict on a procedural
test image, explain the top class with plain gradient saliency, and write the image, the
map (``.npy``) and an overlay PNG. It exercises the same code paths as a real model; the
weights are untrained, so the explanation shows mechanics, not meaning.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xaijax import checkpoints, methods, models, viz
from xaijax.atomic import atomic_npy
from xaijax.models.preprocess import normalize

__all__ = ["run_example", "test_image"]


def test_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """A procedural RGB image in [0, 1]: a red disc and a blue square on a grey gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.4 + 0.2 * xx, 0.4 + 0.2 * yy, 0.45 * np.ones_like(xx)], -1)
    disc = (xx - 0.3) ** 2 + (yy - 0.35) ** 2 < 0.15**2
    img[disc] = (0.9, 0.15, 0.1)
    img[int(0.55 * size) : int(0.85 * size), int(0.5 * size) : int(0.8 * size)] = (0.1, 0.2, 0.85)
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def run_example(out: Path, size: int = 96) -> dict[str, Path]:
    """Run the example and write ``image.png``, ``gradient.npy``, ``gradient.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    arch, kwargs = "resnet18", {"num_classes": 10, "width": 16}
    model = models.get(arch, **kwargs)
    image = test_image(size)
    x = normalize(image[None])
    variables = models.random_variables(model, x.shape, seed=0)  # He-normal, no compiled initialisers

    weights = out / "resnet18_w16.safetensors"
    checkpoints.save_variables(weights, variables, metadata={"arch": arch, "model_kwargs": _json(kwargs)})
    model, variables, _ = checkpoints.load(None, weights)
    print(f"model: {arch} {kwargs}, weights round-tripped through {weights}")

    logits = jax.jit(model.apply)(variables, x)[0]
    top = int(jnp.argmax(logits))
    print("top-3 classes:", ", ".join(f"{int(i)} ({float(logits[i]):.3f})" for i in jnp.argsort(-logits)[:3]))

    explain = jax.jit(methods.get("gradient"), static_argnums=0)
    saliency = np.asarray(explain(model, variables, x, jnp.array([top]))[0])
    files = {
        "image": viz.save_png(out / "image.png", image),
        "map": out / "gradient.npy",
        "overlay": viz.save_png(out / "gradient.png", viz.overlay(image, saliency)),
    }
    atomic_npy(files["map"], saliency)
    print(f"explained class {top} with plain gradient: wrote {files['overlay']} and {files['map']}")
    return files


def _json(d: dict) -> str:
    import json

    return json.dumps(d)
