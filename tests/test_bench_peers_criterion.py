"""The agreement rule of experiments/bench_peers.py (issue 26): :func:`judge`, :func:`mask_stats`
and the markdown header's single-run / merged-runs statement. Pure functions, no torch."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench_peers.py")
_spec = importlib.util.spec_from_file_location("bench_peers_under_test", _PATH)
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


def test_float64_exact_row_judged_on_xaijax_f64_only():
    # float32 errors far above 1e-4 do not matter; the float64 error decides at 1e-6
    ok, dec, basis = bp.judge("exact", "float64", err32=5e-2, err64=5e-2, x64err=4.7e-8)
    assert ok is True and dec == 4.7e-8 and "f64 vs peer f64" in basis
    ok, dec, _ = bp.judge("raw terms", "float64", err32=1e-9, err64=1e-9, x64err=2e-6)
    assert ok is False and dec == 2e-6
    assert bp.judge("exact", "float64", err32=1e-9, err64=1e-9, x64err=1e-6)[0] is True  # <= is inclusive


def test_float64_without_x64err_is_not_judged_never_float32():
    ok, dec, basis = bp.judge("exact", "float64", err32=1e-9, err64=1e-9, x64err=None)
    assert ok is None and dec is None and basis.startswith("not judged")


def test_float32_rule_is_the_old_one():
    assert bp.judge("exact", "float32", err32=1e-2, err64=5e-5, x64err=None)[:2] == (True, 5e-5)
    assert bp.judge("exact", "float32", err32=1e-2, err64=2e-4, x64err=1e-12)[0] is False  # x64 ignored
    assert bp.judge("exact", "float32", err32=5e-5, err64=None, x64err=None)[:2] == (True, 5e-5)  # no f64 peer
    assert bp.judge("exact", "float32", err32=1e-3, err64=None, x64err=None, agree_f32=1e-2)[0] is True


def test_optimisation_energies():
    # float64 energies first (threshold --agree), the float32 ones (threshold --agree-energy) without them
    assert bp.judge("optimisation", "float64", err32=0.3, err64=0.3, x64err=None,
                    energy_it0=3e-6, energy_it0_x64=1e-12)[:2] == (True, 1e-12)
    assert bp.judge("optimisation", "float64", err32=0.3, err64=0.3, x64err=None,
                    energy_it0=3e-6, energy_it0_x64=2e-6)[0] is False
    ok, dec, basis = bp.judge("optimisation", "float64", err32=0.3, err64=0.3, x64err=None, energy_it0=3e-6)
    assert (ok, dec) == (True, 3e-6) and "f32" in basis
    assert bp.judge("optimisation", "float64", err32=0.3, err64=0.3, x64err=None, energy_it0=3e-5)[0] is False
    assert bp.judge("optimisation", "float64", err32=0.0, err64=0.0, x64err=None)[0] is None
    # masks that never moved never agree; the float32 rule compares the masks
    assert bp.judge("optimisation", "float64", err32=0, err64=0, x64err=None, energy_it0_x64=0.0,
                    vacuous=True)[0] is False
    assert bp.judge("optimisation", "float32", err32=0.3, err64=0.3, x64err=None, energy_it0_x64=0.0)[0] is False


def test_judge_rejects_unknown_names():
    with pytest.raises(ValueError, match="criterion"):
        bp.judge("exact", "float16", err32=0, err64=0, x64err=0)
    with pytest.raises(ValueError, match="kind"):
        bp.judge("masks", "float64", err32=0, err64=0, x64err=0)


def test_mask_stats():
    m = np.zeros((2, 1, 4, 4))
    m[0, 0, :2] = 1.0  # half the pixels at 1
    m[1, 0] = 0.5  # all at exactly 0.5 (counted)
    st = bp.mask_stats(m)
    np.testing.assert_allclose(st["mean"], [[0.5], [0.5]])
    np.testing.assert_allclose(st["frac05"], [[0.5], [1.0]])


def _row(**kw):
    r = {"model": "vgg16", "batch": 1, "method": "gradient", "peer": "captum", "peer_s": 1.0, "xaijax_s": 0.5,
         "ratio": 2.0, "comparison": "exact", "err_peer_f32": 1e-2, "err_peer_f64": 1e-2, "peer_f32_vs_f64": 1e-2,
         "xaijax_f64_vs_peer_f64": None, "agrees": None, "win": False, "note": "", "criterion": "float64"}
    r.update(kw)
    return r


def _meta(**kw):
    m = {"machine": "2 CPU cores", "load_min": 0.1, "load_max": 1.0, "size": 112, "repeats": 2, "torch_threads": 2,
         "criterion": "float64", "agree_threshold": 1e-6, "agree_f64": 1e-6, "agree_f32": 1e-4, "agree_energy": 1e-5,
         "started": "2026-12-08 01:00:00 UTC", "finished": "2026-12-08 02:30:00 UTC", "duration_s": 5400,
         "argv": ["--quick"], "batches": [1], "notes": ""}
    m.update(kw)
    return m


def test_markdown_single_run_and_merged(tmp_path):
    bp.write([_row(), _row(method="grad-cam", agrees=True, win=True, xaijax_f64_vs_peer_f64=3e-9)], _meta(),
             str(tmp_path))
    md = (tmp_path / "bench_peers.md").read_text()
    assert "One run from 2026-12-08 01:00:00 UTC to 2026-12-08 02:30:00 UTC (90 min)" in md
    assert "NOT from one run" not in md and "<= 1e-06" in md and "xaijax f64 vs peer f64 |" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| vgg16")]
    assert "| 1.0e-02 | n/a | n/a | no |" in lines[0]  # not judged
    assert "| 3.0e-09 | yes | yes |" in lines[1]
    assert json.loads((tmp_path / "bench_peers.json").read_text())["meta"]["criterion"] == "float64"

    runs = [_meta(criterion=None), _meta()]
    runs[0].pop("criterion")
    bp.write([_row(run=0, criterion="float32", agrees=True), _row(run=1)], _meta(runs=runs), str(tmp_path))
    md = (tmp_path / "bench_peers.md").read_text()
    assert "**This table is NOT from one run**: rows from 2 runs" in md and "One run from" not in md
    assert "judged under the float32 criterion" in md


def test_update_refuses_to_mix_criteria(tmp_path):
    path = tmp_path / "bench_peers.json"
    path.write_text(json.dumps({"meta": _meta(criterion=None) | {"criterion": "float32"}, "rows": [_row()]}))
    with pytest.raises(SystemExit, match="float32 criterion"):
        bp.merge_runs(str(path), [_row()], _meta(), ["gradient"])
    old = _meta()
    old.pop("criterion")  # a file from before issue 26: the float32 rule
    path.write_text(json.dumps({"meta": old, "rows": [_row()]}))
    with pytest.raises(SystemExit, match="float32 criterion"):
        bp.merge_runs(str(path), [_row()], _meta(), ["gradient"])
    rows, meta = bp.merge_runs(str(path), [_row(method="grad-cam")], _meta(criterion="float32"),
                               ["gradient", "grad-cam"])
    assert [r["run"] for r in rows] == [0, 1] and len(meta["runs"]) == 2
