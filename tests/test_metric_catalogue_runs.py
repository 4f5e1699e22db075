"""The metric catalogue inside ``xaijax eval``, the demo and ``xaijax metrics``: the catalogue's
experiments give the numbers of direct metric calls, method metrics re-run the method, a subset
and settings are chosen by flags, and a metric not defined for a model is a row note, not a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xaijax import checkpoints, cli, data, demo, methods, metrics
from xaijax.evaluation import EXPERIMENTS, EvalConfig, experiment_metrics, run_experiment
from xaijax.evaluation.runner import image_pairs
from xaijax.models.preprocess import normalize


def _direct(tiny_weights, n_images):
    model, v, _ = checkpoints.load(None, tiny_weights)
    recs = data.SyntheticScenes().records("test", 0, n_images)
    x = np.asarray(normalize(np.stack([r.image for r in recs]), "torchvision"))
    pairs = [(k, c, region) for k, r in enumerate(recs) for c, region, _ in image_pairs(r)]
    xs = x[[k for k, _, _ in pairs]]
    cls = np.asarray([c for _, c, _ in pairs], np.int32)
    regions = np.stack([reg for _, _, reg in pairs])
    return model, v, xs, cls, regions


def test_every_experiment_metric_is_registered():
    registered = set(metrics.names()) | set(metrics.model_metric_names()) | set(metrics.method_metric_names())
    for exp in EXPERIMENTS:
        missing = [n for n in experiment_metrics(exp) if n not in registered]
        assert not missing, f"experiment {exp!r} names unregistered metrics {missing}"
    catalogue = [n for e in ("localisation", "complexity", "faithfulness", "robustness", "randomisation", "axioms")
                 for n in experiment_metrics(e)]
    issue_23 = """faithfulness-correlation faithfulness-estimate monotonicity monotonicity-correlation pixel-flipping
        region-perturbation selectivity sensitivity-n irof infidelity road sufficiency average-drop increase-in-confidence
        max-sensitivity avg-sensitivity local-lipschitz continuity consistency ris ros rrs relevance-mass-accuracy
        relevance-rank-accuracy top-k-intersection attribution-localisation auc focus sparseness complexity
        effective-complexity mprt smooth-mprt efficient-mprt random-logit completeness non-sensitivity input-invariance"""
    assert sorted(catalogue) == sorted(issue_23.split())  # each of the issue's names in exactly one experiment


def test_catalogue_experiments_match_direct_metric_calls(tiny_weights, tmp_path):
    model, v, xs, cls, regions = _direct(tiny_weights, 2)
    grad = methods.get("gradient")
    maps = np.asarray(grad(model, v, xs, cls))
    # a pair metric (complexity) and a method metric with a setting (robustness), both through --metrics
    res = run_experiment(EvalConfig("complexity", tmp_path / "c", ("gradient",), weights=str(tiny_weights), images=2,
                                    metrics=("sparseness",)), progress=False)
    sp = metrics.get("sparseness")
    want = sp.summarize(sp(metrics.PairBatch(maps, regions, cls.astype(np.int64), np.zeros(len(cls), bool))),
                        cls.astype(np.int64), np.zeros(len(cls), bool), 12)
    row = res["rows"][0]
    assert set(want) <= set(row) and all(row[k] == pytest.approx(want[k], rel=1e-5) for k in want)
    assert not any(k.startswith("complexity") for k in row)  # the subset: sparseness only
    opts = {"max-sensitivity": {"n_samples": 3}}
    res = run_experiment(EvalConfig("robustness", tmp_path / "r", ("gradient",), weights=str(tiny_weights), images=2,
                                    metrics=("max-sensitivity",), metric_options=opts), progress=False)
    ms = metrics.get_method_metric("max-sensitivity", n_samples=3)
    direct = ms.summarize(ms(model, v, grad, xs, cls, maps=maps))
    row = res["rows"][0]
    assert direct and all(row[k] == pytest.approx(direct[k], rel=1e-4) for k in direct)
    stored = json.loads((tmp_path / "r" / "robustness-gradient.jsonl").read_text().splitlines()[0])
    assert stored["config"]["metric_options"] == opts and stored["config"]["metrics"] == ["max-sensitivity"]
    assert "no description" not in (tmp_path / "r" / "results.md").read_text()  # the legend covers the new columns


def test_metric_not_defined_for_the_model_is_a_row_note(tiny_weights, tmp_path):
    # input invariance needs a bias on the first layer; ResNet's stem convolution has none
    res = run_experiment(EvalConfig("axioms", tmp_path / "a", ("gradient",), weights=str(tiny_weights), images=1,
                                    metrics=("input-invariance", "completeness")), progress=False)
    row = res["rows"][0]
    assert row["input-invariance_error"].startswith("not defined for this model")
    assert any(k.startswith("completeness") for k in row)


def test_eval_metric_flags_errors(tiny_weights, tmp_path, capsys):
    def err(argv):
        code = cli.main(argv)
        e = capsys.readouterr().err.strip()
        assert code == 2 and e.startswith("xaijax: error:"), e
        return e

    base = ["eval", "complexity", "--weights", str(tiny_weights), "--out", str(tmp_path / "e"), "--no-progress", "--methods", "center"]
    assert "the 'complexity' experiment scores sparseness, complexity, effective-complexity" in err([*base, "--metrics", "pointing-game"])
    assert "--metric-param expects METRIC:key=value" in err([*base, "--metric-param", "n_samples=3"])
    assert "--metric-param max-sensitivity: not a metric this run scores" in err([*base, "--metric-param", "max-sensitivity:n_samples=3"])
    assert "bad options for metric 'sparseness'" in err([*base, "--metric-param", "sparseness:nope=1"])


def test_metrics_command_lists_every_family(capsys):
    assert cli.main(["metrics"]) == 0
    out = capsys.readouterr().out
    for exp in ("localisation", "complexity", "faithfulness", "robustness", "randomisation", "axioms"):
        assert f"{exp} (xaijax eval {exp})" in out
    assert "(not registered)" not in out
    assert "pixel-flipping" in out and "Bach et al." in out


def test_demo_runs_catalogue_metrics_by_name(tmp_path):
    res = demo.run_demo(tmp_path / "d", 1, method_names=["gradient"], models=["synthetic_resnet18"], progress=False,
                        metric_names=["sparseness", "pixel-flipping", "max-sensitivity"], model_metric_pairs=1)
    row = res["rows"][0]
    assert res["metrics"] == ["sparseness"] and res["model_metrics"] == ["pixel-flipping"]
    assert res["method_metrics"] == ["max-sensitivity"]
    assert res["metric_options"] == {"pixel-flipping": demo.DEMO_METRIC_OPTIONS["pixel-flipping"],
                                     "max-sensitivity": demo.DEMO_METRIC_OPTIONS["max-sensitivity"]}
    assert any(k.startswith("sparseness") for k in row) and any(k.startswith("max_sensitivity") for k in row)
    assert not any(k.startswith("pointing") for k in row)
    md = (tmp_path / "d" / "results.md").read_text()
    assert "no description" not in md and "`sparseness`: Sparseness (Chalasani et al. 2020)" in md  # the legend
    with pytest.raises(ValueError, match="not a registered metric"):
        demo.run_demo(tmp_path / "x", 1, method_names=["gradient"], models=["synthetic_resnet18"], progress=False,
                      metric_names=["pixel-flopping"])


def test_demo_default_methods_and_all():
    assert set(demo.DEFAULT_METHODS) <= set(methods.names())
    assert "occlusion" not in demo.DEFAULT_METHODS and "kernel-shap" not in demo.DEFAULT_METHODS
