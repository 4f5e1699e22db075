"""experiments/bench_xla_cpu.py --quick: one real run (3 child processes), its JSON checked value by value.

The children run at once (``--parallel 3``: their compiles dominate and are mostly single-threaded), so
the run takes ~30 s on an idle 2-core machine, once per session; its times are only checked for being
finite and consistent, never compared.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_xla_cpu.py"
sys.path.insert(0, str(ROOT / "experiments"))
import bench_xla_cpu as bx  # noqa: E402


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_xla_cpu") / "quick.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--parallel", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").exists()
    return json.loads(out.read_text())  # strict: no NaN / Infinity tokens may appear


def _by_name(report: dict) -> dict:
    return {s["name"]: s for s in report["settings"]}


def test_settings_list_is_well_formed() -> None:
    names = [s.name for s in bx.SETTINGS]
    assert len(names) == len(set(names))
    assert bx.SETTINGS[0] == bx.Setting("default", "", bx.SETTINGS[0].what, core=True)
    for s in bx.SETTINGS[1:]:
        assert s.flags.startswith("--xla_") and s.what, s
    assert set(bx.QUICK_SETTINGS) <= set(names)


def test_structure_and_machine_facts(report: dict) -> None:
    assert [s["name"] for s in report["settings"]] == list(bx.QUICK_SETTINGS)
    m = report["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["versions"]["jax"] and m["versions"]["jaxlib"]
    assert report["thresholds"] == {**report["thresholds"], "win_speedup": 1.10, "f64_rtol": 1e-10, "f32_rtol": 1e-4}
    assert report["config"]["quick"] and report["config"]["size"] == 32 and report["config"]["batch"] == [1]
    assert report["config"]["parallel"] == 3
    for s in report["settings"]:
        assert len(s["loadavg_before"]) == 3 and len(s["loadavg_after"]) == 3 and s["wall_s"] > 0


def test_default_agrees_with_itself_exactly(report: dict) -> None:
    d = _by_name(report)["default"]
    assert d["status"] == "ok" and d["flags"] == ""
    rows = {(r["arch"], r["batch"], r["what"], r["dtype"]) for r in d["rows"]}
    assert rows == {(a, 1, w, t) for a in bx.ARCHS for w in bx.WHATS for t in ("float32", "float64")}
    for dtype in ("float32", "float64"):
        agr = d["agreement"][dtype]
        assert agr["max_abs"] == 0.0 and agr["max_rel"] == 0.0
        assert len(agr["per_output"]) == len(bx.ARCHS) * len(bx.WHATS)
    assert d["median_speedup"] == 1.0 and all(r["speedup"] == 1.0 for r in d["rows"])


def test_made_up_flag_is_refused_with_xlas_message(report: dict) -> None:
    s = _by_name(report)["made_up_flag"]
    assert s["status"] == "refused" and s["returncode"] != 0
    assert "Unknown flag in XLA_FLAGS" in s["reason"] and "xla_cpu_no_such_flag_for_bench" in s["reason"]
    assert "rows" not in s and "made_up_flag" not in report["decision"].get("losers", {})


def test_accepted_setting_has_finite_times_and_errors(report: dict) -> None:
    s = _by_name(report)["onednn_dot"]
    assert s["status"] == "ok" and "--xla_cpu_use_onednn=true" in s["flags"]
    assert len(s["rows"]) == 2 * len(bx.ARCHS) * len(bx.WHATS)
    for r in s["rows"]:
        assert 0 < r["median_s"] < 60 and r["compile_s"] > 0 and math.isfinite(r["speedup"])
    for dtype in ("float32", "float64"):
        agr = s["agreement"][dtype]
        assert 0 <= agr["max_rel"] < 1e-2 and math.isfinite(agr["max_abs"])  # a different kernel, same numbers
    # the speed-ups are recomputed from the two settings' row times
    base = {(r["arch"], r["what"]): r["median_s"] for r in _by_name(report)["default"]["rows"] if r["dtype"] == "float32"}
    ratios = [base[(r["arch"], r["what"])] / r["median_s"] for r in s["rows"] if r["dtype"] == "float32"]
    assert s["median_speedup"] == pytest.approx(statistics.median(ratios), rel=1e-12)
    assert s["geomean_speedup"] == pytest.approx(math.exp(statistics.fmean(map(math.log, ratios))), rel=1e-12)
    assert s["worst_row"]["speedup"] == pytest.approx(min(ratios), rel=1e-12)


def test_decision_follows_the_thresholds(report: dict) -> None:
    t = report["thresholds"]
    winners = [s for s in report["settings"] if s["name"] != "default" and s["status"] == "ok"
               and s["median_speedup"] >= t["win_speedup"] and s["agreement"]["float64"]["max_rel"] <= t["f64_rtol"]
               and s["agreement"]["float32"]["max_rel"] <= t["f32_rtol"]]
    d = report["decision"]
    if winners:
        best = max(winners, key=lambda s: s["median_speedup"])
        assert d["verdict"] == "wins" and d["best"] == best["name"] and d["flags"] == best["flags"]
    else:
        assert d["verdict"] == "none wins" and d["best"] is None
        assert set(d["losers"]) == {s["name"] for s in report["settings"] if s["name"] != "default" and s["status"] == "ok"}
        for name, lost in d["losers"].items():
            assert lost["geomean_speedup"] == _by_name(report)[name]["geomean_speedup"]


def test_decide_picks_the_fastest_exact_setting() -> None:
    """The decision rule on synthetic records: too slow, inexact and refused settings never win."""
    def rec(name, med, f32, f64, status="ok"):
        return dict(name=name, flags=f"--{name}", status=status, median_speedup=med, geomean_speedup=med, worst_row=None,
                    agreement=dict(float32=dict(max_rel=f32), float64=dict(max_rel=f64)))
    recs = [rec("default", 1.0, 0.0, 0.0), rec("slow", 1.09, 0, 0), rec("inexact64", 2.0, 0, 1e-9), rec("inexact32", 2.0, 2e-4, 0),
            rec("ok_a", 1.2, 1e-5, 1e-12), rec("ok_b", 1.5, 1e-4, 1e-10), dict(name="bad", status="refused", reason="x")]
    d = bx.decide(recs)
    assert d == dict(verdict="wins", best="ok_b", flags="--ok_b", median_speedup=1.5, winners=["ok_b", "ok_a"])
    d = bx.decide(recs[:4])
    assert d["verdict"] == "none wins" and set(d["losers"]) == {"slow", "inexact64", "inexact32"}


def test_refusal_reason_prefers_xlas_line() -> None:
    stderr = "W0 warning\nF1207 parse_flags_from_env.cc:234] Unknown flag in XLA_FLAGS: --xla_foo=1\n*** Check failure stack trace: ***\n    @ 0x1\n"
    assert bx._last_line(stderr).endswith("Unknown flag in XLA_FLAGS: --xla_foo=1")
    assert bx._last_line("a\nSegmentation fault\n") == "Segmentation fault"
    stderr = ("E1207 debug_options_flags.cc:145] Illegal value for --xla_cpu_experimental_ynn_fusion_type 'X'\n"
              "F1207 parse_flags_from_env.cc:220] Check failed: ... Flag parsing failed.\n\t--xla_dump_to=\"\"  string  usage\n")
    assert "Illegal value for --xla_cpu_experimental_ynn_fusion_type" in bx._last_line(stderr)
