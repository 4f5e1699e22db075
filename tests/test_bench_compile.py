"""``experiments/bench_compile.py --quick``: the first-call benchmark runs, its rows add up, and
the warm process reads every program from the persistent cache the cold one wrote (counted
in cache entries, not timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "bench_compile.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compile"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_compile") / "bench.json"
    return _load().main(["--quick", "--archs", "resnet50", "--methods", "gradient,rsp", "--no-cli", "--out", str(out)])


def test_rows_add_up(payload):
    runs = {r["mode"]: r for r in payload["runs"]}
    assert set(runs) == {"cold", "warm"}
    for run in runs.values():
        assert [r["method"] for r in run["rows"]] == ["gradient", "rsp"]
        for r in run["rows"]:
            assert "error" not in r, r
            parts = r["trace_s"] + r["lower_s"] + r["compile_s"] + r["first_execution_s"]
            assert r["first_call_s"] == pytest.approx(parts, abs=5e-6)
            assert r["ratio"] == pytest.approx(r["first_call_s"] / r["steady_s"], rel=0.02)
            assert len(r["steady_all_s"]) == payload["repeats"] == 2
            assert r["stablehlo_chars"] > 1000


def test_warm_process_reads_every_program_from_the_cache(payload):
    runs = {r["mode"]: r for r in payload["runs"]}
    assert runs["cold"]["cache_entries_before"] == 0
    assert runs["cold"]["cache_entries_after"] > 2  # the model, the two methods, JAX's helpers
    assert runs["warm"]["cache_entries_before"] == runs["warm"]["cache_entries_after"] == runs["cold"]["cache_entries_after"]
    # the same programs: the lowered StableHLO of each method is identical in size
    assert [r["stablehlo_chars"] for r in runs["cold"]["rows"]] == [r["stablehlo_chars"] for r in runs["warm"]["rows"]]


def test_summary_counts_methods_meeting_the_target(payload):
    s = payload["summary"]["resnet50/cold"]
    rows = payload["runs"][0]["rows"]
    assert s["methods"] == 2
    assert s["meet_target"] == sum(r["ratio"] <= payload["target_ratio"] for r in rows)
    assert s["worst"]["ratio"] == max(r["ratio"] for r in rows)
