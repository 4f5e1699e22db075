"""``xaijax bench``: runs the repository's benchmark scripts with the arguments after ``--``."""

from __future__ import annotations

import json

from xaijax import cli


def test_bench_runs_the_propagation_benchmark_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--", "--archs", "resnet18", "--batches", "1", "--size", "32", "--repeats", "1"]
    assert cli.main(argv + ["--methods", "lrp-epsilon", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert (row["arch"], row["batch"], row["size"]) == ("resnet18", 1, 32)
    assert list(row["methods"]) == ["lrp-epsilon"]
    assert row["gradient_median_s"] > 0 and row["methods"]["lrp-epsilon"]["ratio_to_gradient"] > 0


def test_bench_peers_names_the_missing_packages(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PEER_MODULES", ("json", "xaijax_no_such_peer_package"))
    assert cli.main(["bench", "--peers"]) == 2
    err = capsys.readouterr().err
    assert "missing: xaijax_no_such_peer_package" in err and "PEERS.md" in err


def test_bench_reports_the_scripts_own_argument_errors(capsys):
    assert cli.main(["bench", "--", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-option" in err
    assert "experiments/bench_propagation.py exited with status 2" in err


def test_bench_flops_counts_lrp_epsilon_like_the_gradient(tmp_path):
    """``--flops``: XLA's FLOP count; LRP-epsilon needs the gradient's convolutions (its
    backward pass is the transposed map applied to R / z), so the ratio is close to 1."""
    out = tmp_path / "flops.json"
    argv = ["bench", "--", "--flops", "--archs", "resnet18", "--batches", "1", "--size", "32"]
    assert cli.main(argv + ["--methods", "lrp-epsilon,rsp", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["gradient_gflop"] > 0
    assert 0.9 < row["methods"]["lrp-epsilon"]["flops_ratio_to_gradient"] < 1.2
    assert row["methods"]["rsp"]["flops_ratio_to_gradient"] > 2  # per-sample kernels: weight gradients, forward, transpose
