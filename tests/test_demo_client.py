"""The demo as a client of the evaluation runner: its batch loop is the runner's
``map_batches``; only ``NotApplicable`` is recorded as "not defined for this model"; methods are
picked by their declared kind ("attribution" and "cam" run)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import checkpoints, demo, methods, models
from xaijax.evaluation import map_batches


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    kw = {"num_classes": 12, "width": 8}
    m = models.get("resnet18", **kw)
    v = models.random_variables(m, (1, 128, 128, 3), seed=1)
    checkpoints.save_variables(d / "synthetic_resnet18.safetensors", v, metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    return d


@dataclasses.dataclass(frozen=True)
class _Raises(methods.Method):
    error: type = ValueError

    def __call__(self, model, variables, x, target):
        raise self.error("a message from the method")


@dataclasses.dataclass(frozen=True)
class _CamLike(methods.Method):
    kind: ClassVar[str] = "cam"

    def __call__(self, model, variables, x, target):
        return jnp.ones(x.shape[:3], x.dtype)


def _run(weights, tmp_path, name):
    return demo.run_demo(tmp_path / "out", 1, method_names=[name], weights=weights, progress=False,
                         models=["synthetic_resnet18"], model_metric_pairs=0)


def test_only_not_applicable_is_recorded_as_not_defined(weights, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.registry._REGISTRY, "raises-na", (lambda: _Raises(methods.NotApplicable), "test only"))
    res = _run(weights, tmp_path, "raises-na")
    (row,) = res["rows"]
    assert row["error"] == "not defined for this model: a message from the method"
    # any other error is a bug: it propagates instead of being hidden as "not defined"
    for err in (ValueError, TypeError):
        monkeypatch.setitem(methods.registry._REGISTRY, "raises", (lambda err=err: _Raises(err), "test only"))
        with pytest.raises(err, match="a message from the method"):
            _run(weights, tmp_path, "raises")


def test_cam_kind_methods_run(weights, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.registry._REGISTRY, "cam-like", (_CamLike, "test only"))
    res = _run(weights, tmp_path, "cam-like")
    assert [r["method"] for r in res["rows"]] == ["cam-like"] and not res["skipped_methods"]
    assert "error" not in res["rows"][0] and "pointing_all" in res["rows"][0]


def test_map_batches_pads_the_last_batch_and_cuts_it_back():
    calls = []

    def fn(offset, a, b):
        calls.append((offset, a.shape, b.shape))
        return {"sum": a + b, "first": np.full(len(a), offset)}

    a, b = np.arange(7), np.arange(7) * 10
    out = map_batches(fn, 3, a, b)
    np.testing.assert_array_equal(out["sum"], a + b)
    np.testing.assert_array_equal(out["first"], [0, 0, 0, 3, 3, 3, 6])
    assert calls == [(0, (3,), (3,)), (3, (3,), (3,)), (6, (3,), (3,))]  # every call the same shape
    with pytest.raises(ValueError, match="same, positive number of rows"):
        map_batches(fn, 3, a, b[:5])
    with pytest.raises(ValueError, match="same, positive number of rows"):
        map_batches(fn, 3, a[:0], b[:0])
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        map_batches(fn, 0, a, b)


def test_the_bundled_weights_folder_has_one_home():
    assert demo.weights_dir is checkpoints.weights_dir
