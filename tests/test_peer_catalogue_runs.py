"""The peers' catalogue (issue 22) runs wherever a method runs: under ``ucag:``, in ``xaijax eval``,
in the demo and in ``xaijax explain``. The methods' values are tested in their own files; here each
entry point gives every new method finite maps of the right shape (or a table row with numbers)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import cli, demo, methods, models
from xaijax.evaluation import EvalConfig, run_experiment

#: the methods issue 22 added, with settings that keep a CPU run short (their defaults cost
#: hundreds to thousands of forward passes per map)
CATALOGUE: dict[str, dict] = {
    "occlusion": dict(window=32, stride=32),
    "feature-ablation": dict(cell=32),
    "feature-permutation": dict(cell=32),
    "shapley-sampling": dict(cell=32, n_samples=2),
    "kernel-shap": dict(cell=32, n_samples=16),
    "lime": dict(cell=32, n_samples=16),
    "sobol": dict(grid_size=4, n_designs=4),
    "xrai": dict(steps=2),
    "deeplift": {},
    "deeplift-shap": {},
    "gradient-shap": dict(n_samples=2),
    "guided-ig": dict(steps=8),
    "blur-ig": dict(steps=8),
    "vargrad": dict(n=2),
    "hirescam": {},
    "grad-cam-elementwise": {},
    "ablation-cam": {},
    "eigen-cam": {},
    "eigengrad-cam": {},
    "deep-feature-factorization": dict(iterations=20),
    "recipro-cam": {},
    "guided-grad-cam": {},
    "linear-approx": {},
    "layer-integrated-gradients": dict(steps=4),
}


def test_catalogue_is_registered():
    assert set(CATALOGUE) <= set(methods.names())


@pytest.mark.slow
def test_catalogue_under_ucag():
    model = models.get("resnet18", num_classes=5, width=8, layers=(1, 1, 1, 1))
    v = models.random_variables(model, (1, 64, 64, 3), seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    for name, hp in CATALOGUE.items():
        m = methods.get(f"ucag:{name}", ucag_n=2, **hp)
        maps = np.asarray(m(model, v, x, jnp.asarray([1, 3])))
        assert maps.shape == (2, 64, 64) and np.isfinite(maps).all(), name


@pytest.mark.slow
def test_catalogue_in_eval_and_demo(tiny_weights, tmp_path):
    names = tuple(CATALOGUE)
    res = run_experiment(EvalConfig("pointing", tmp_path / "e", names, weights=str(tiny_weights), images=1, hparams=CATALOGUE),
                         progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(names)
    for name, r in rows.items():
        assert r["pairs"] > 0 and 0.0 <= r["pointing_all"] <= 1.0, (name, r)
    res = demo.run_demo(tmp_path / "d", 1, method_names=list(names), models=["synthetic_resnet18"], progress=False,
                        hparams=CATALOGUE, model_metric_pairs=1)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(names)
    for name, r in rows.items():
        assert "error" not in r and np.isfinite(r["deletion_auc"]), (name, r)


@pytest.mark.parametrize("name", ["occlusion", "deeplift", "hirescam"])
def test_catalogue_in_explain(tiny_weights, tmp_path, name, capsys):
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).uniform(size=(128, 128, 3)) * 255).astype(np.uint8)).save(img)
    params = [a for k, val in CATALOGUE[name].items() for a in ("--param", f"{k}={json.dumps(val)}")]
    code = cli.main(["explain", "--weights", str(tiny_weights), "--size", "128", "--method", name, *params, "--out", str(tmp_path / "o"), str(img)])
    assert code == 0, capsys.readouterr().err
    m = np.load(tmp_path / "o" / f"img.{name}.npy")
    assert m.shape == (128, 128) and np.isfinite(m).all()
