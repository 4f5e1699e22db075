"""Fixtures shared by the test files."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(scope="module")
def x64_module():
    """Enable float64 for a whole test module (its module-scoped fixtures build float64 models)
    and restore the previous setting after it."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A native checkpoint of a tiny random ResNet-18 (12 classes, width 8, 128 px) for the
    evaluation, demo and CLI tests (a test module may define its own ``tiny_weights``)."""
    import json

    from xaijax import checkpoints, models

    kw = {"num_classes": 12, "width": 8}
    m = models.get("resnet18", **kw)
    v = models.random_variables(m, (1, 128, 128, 3), seed=3)
    path = tmp_path_factory.mktemp("w") / "tiny_resnet18.safetensors"
    checkpoints.save_variables(path, v, metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    return path

