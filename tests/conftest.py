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
