"""``experiments/bench_gpu.py``: the GPU benchmark's ``--quick`` run on the CPU (the JSON's
structure and values, never wall-clock thresholds), its time budget, the FLOP-limit arithmetic
and the choice of rule methods."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from xaijax import cli, models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_gpu.py"
ARCHS = ("vgg16", "resnet50")


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


bench_gpu = _load()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One ``--quick`` run in a fresh process (two compile threads, a given peak of 1 TFLOP/s so
    that the FLOP limit is computed on the CPU, a budget nothing is skipped for)."""
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    argv = ["--quick", "--out", str(out), "--compile-workers", "2", "--peak-tflops", "1", "--budget-s", "3000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def test_quick_run_records_the_machine_and_the_run(quick):
    assert quick["quick"] is True and quick["stopped"] is None and quick["skipped"] == []
    start = time.strptime(quick["started_at"], "%Y-%m-%dT%H:%M:%SZ")
    end = time.strptime(quick["ended_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert start <= end and _positive(quick["wall_s"])
    m = quick["machine"]
    assert m["backend"] == "cpu" and m["device_count"] >= 1 and isinstance(m["device_kind"], str)
    assert m["versions"]["jax"] == jax.__version__ and "jaxlib" in m["versions"]
    if sys.platform.startswith("linux"):
        assert isinstance(m["cpu_model"], str) and m["cpu_model"]
    assert m["peak_tflops"] is None  # no peak known for a CPU: only the given one is used
    assert quick["settings"]["peak_tflops_used"] == {"given": 1.0}
    assert quick["settings"]["jax_disable_most_optimizations"] is True
    # the CPU backend keeps no allocator statistics; a GPU reports a positive peak
    assert quick["peak_device_memory_bytes"] is None or quick["peak_device_memory_bytes"] > 0
    assert "_estimates" not in quick
    for table in ("| RISE |", "| UCAG(Grad-CAM) |", "| eval pointing |", "| lrp-epsilon |"):
        assert table in quick["markdown"]


def _padded_conv_macs(cin: int, cout: int, side: int) -> int:
    """Multiply-adds of a 3x3 stride-1 convolution with padding 1 on a side x side input,
    counting only taps that fall inside the image (XLA's count): (3 side - 2)^2 per channel pair."""
    return cin * cout * (3 * side - 2) ** 2


def test_quick_rise_rows(quick):
    rows = quick["rise"]
    assert [r["arch"] for r in rows] == list(ARCHS)
    for r in rows:
        assert "error" not in r, r
        assert (r["n"], r["chunk"], r["size"]) == (50, 25, 32)
        for key in ("rise_s_per_image", "forward_chunk_s", "throughput_ratio", "forward_gflop_per_image", "achieved_tflops"):
            assert _positive(r[key]), (key, r[key])
        assert r["rise_masks_per_s"] == pytest.approx(50 / r["rise_s_per_image"], rel=1e-2)
        flops = r["forward_gflop_per_image"] * 1e9
        assert r["achieved_tflops"] == pytest.approx(flops * 50 / r["rise_s_per_image"] / 1e12, rel=1e-2)
        # forward FLOPs x N / peak, with the given peak of 1 TFLOP/s
        assert r["flop_limit_s"] == {"given": pytest.approx(flops * 50 / 1e12, rel=1e-3)}
    # the FLOPs are those of ONE forward pass of the tiny VGG16 (not of a chunk, not of RISE):
    # 13 padded 3x3 convolutions at 32, 16, 8, 4, 2 px and three dense layers, plus XLA's
    # elementwise operations (bias, ReLU, pooling), a few percent
    ch = [(3, 4, 32), (4, 4, 32), (4, 8, 16), (8, 8, 16), (8, 16, 8), (16, 16, 8), (16, 16, 8),
          (16, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 2), (32, 32, 2), (32, 32, 2)]
    analytic = 2 * (sum(_padded_conv_macs(*c) for c in ch) + 32 * 16 + 16 * 16 + 16 * 10)
    assert 1.0 <= rows[0]["forward_gflop_per_image"] * 1e9 / analytic < 1.1


def test_quick_ucag_loop_equals_vmapped(quick):
    rows = quick["ucag"]
    assert [r["arch"] for r in rows] == list(ARCHS)
    for r in rows:
        assert "error" not in r, r
        assert (r["patches"], r["base_calls_looped"]) == (36, 37)
        assert _positive(r["vmapped_s"]) and _positive(r["loop_s"])
        assert r["vmapped_over_loop"] == pytest.approx(r["vmapped_s"] / r["loop_s"], rel=1e-2)
        # the 37 separate Grad-CAM calls and the vmapped call give the same UCAG map (float32)
        assert r["max_abs_diff"] < 1e-4


def test_quick_pointing_row(quick):
    (r,) = quick["pointing"]
    assert "error" not in r, r
    assert (r["weights"], r["method"], r["images"]) == ("synthetic_vgg16", "grad-cam", [2, 4])
    assert r["pairs"] >= 4 and 0.0 <= r["pointing_all"] <= 1.0
    assert _positive(r["images_per_s"]) and all(_positive(t) for t in r["seconds"])
    assert r["marginal_images_per_s"] is None or _positive(r["marginal_images_per_s"])


def test_quick_methods_rows(quick):
    rows = quick["methods"]
    assert [(r["arch"], r["batch"]) for r in rows] == [(a, b) for b in (1, 2) for a in ARCHS]
    by = {(r["arch"], r["batch"]): r for r in rows}
    for r in rows:
        assert "error" not in r, r
        g = r["gradient"]
        assert all(_positive(g[k]) for k in ("median_s", "lower_s", "compile_s", "gflop", "temp_bytes"))
        assert r["complete"] is True and list(r["methods"]) == list(bench_gpu.QUICK_METHODS)
        for name, m in r["methods"].items():
            assert "error" not in m, (name, m)
            for key in ("median_s", "ratio_to_gradient", "lower_s", "compile_s", "first_run_s", "gflop", "temp_bytes"):
                assert _positive(m[key]), (name, key, m[key])
            assert m["repeats"] == 2
        # LRP-epsilon's backward pass is the gradient's transposed convolutions applied to R / z
        assert 0.9 < r["methods"]["lrp-epsilon"]["flops_ratio_to_gradient"] < 1.2
    for a in ARCHS:  # the rows' batch is the batch that ran: twice the images, twice the FLOPs
        assert by[(a, 2)]["gradient"]["gflop"] == pytest.approx(2 * by[(a, 1)]["gradient"]["gflop"], rel=0.05)


def test_no_time_left_skips_every_item_and_restores_the_xla_setting(tmp_path):
    out = tmp_path / "none.json"
    payload = bench_gpu.main(["--quick", "--budget-s", "0", "--out", str(out)], hard_stop=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert payload["rise"] == payload["ucag"] == payload["pointing"] == payload["methods"] == []
    sections = [s["section"] for s in payload["skipped"]]
    assert sections == ["rise"] * 2 + ["ucag"] * 2 + ["pointing"] + ["methods"] * 4
    assert jax.config.read("jax_disable_most_optimizations") is False


def test_recorder_skips_what_its_estimate_says_will_not_fit(tmp_path):
    out = tmp_path / "r.json"
    rec = bench_gpu.Recorder(out, {"skipped": []}, budget_s=1e6, grace_s=1.0, hard_stop=False)
    assert not rec.skipped("rise", "first", None)  # nothing measured yet: it runs
    assert not rec.skipped("rise", "small", 10.0)
    assert rec.skipped("rise", "large", 1e7)
    (entry,) = json.loads(out.read_text())["skipped"]
    assert entry["item"] == "large" and entry["reason"].startswith("estimated 10000000 s")


def test_estimate_from_an_earlier_batch():
    hist = {
        "gradient": {"lower_s": 1.0, "compile_s": 4.0, "run_s": 0.1, "batch": 16},
        "rsp": {"lower_s": 2.0, "compile_s": 8.0, "run_s": 0.3, "batch": 16},
    }
    # trace + compile / workers + (repeats + 2) x (method call scaled to the batch + gradient call)
    assert bench_gpu._estimate(hist, "rsp", 64, 4, 5) == pytest.approx(2.0 + 8.0 / 4 + 7 * (0.3 * 4 + 0.1))
    assert bench_gpu._estimate(hist, "rsp", 1, 1, 5) == pytest.approx(2.0 + 8.0 + 7 * (0.3 + 0.1))
    assert bench_gpu._estimate(hist, "rap", 64, 4, 5) == 0.0  # unknown: no estimate


def test_peak_table_and_the_h100_flop_limit_of_rise():
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == {"tf32": 494.7, "fp32": 66.9}
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe")["tf32"] == 378.0
    assert bench_gpu.peak_tflops("NVIDIA H200")["tf32"] == 494.7
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB")["fp32"] == 19.5
    assert bench_gpu.peak_tflops("cpu") is None
    # VGG16 at 224 px: XLA counts 30 GFLOP per forward pass (the padded convolutions' taps inside
    # the image, the dense layers, plus elementwise operations); 4000 of them at an H100's dense
    # TF32 peak take ~0.25 s (the figure). Shapes only: nothing is allocated or compiled.
    model = models.get("vgg16")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda xx: model.init(jax.random.key(0), xx), x)
    flops = bench_gpu._flops(jax.jit(model.apply).lower(variables, x))
    convs = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 256, 56),
             (256, 512, 28), (512, 512, 28), (512, 512, 28), (512, 512, 14), (512, 512, 14), (512, 512, 14)]
    analytic = 2 * (sum(_padded_conv_macs(*c) for c in convs) + 25088 * 4096 + 4096 * 4096 + 4096 * 1000)
    assert 1.0 <= flops / analytic < 1.01
    assert 0.24 < flops * 4000 / (bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3")["tf32"] * 1e12) < 0.26


def test_rule_methods_are_the_registry_propagation_methods():
    names = bench_gpu.rule_methods()
    assert len(names) == len(set(names)) and names[0] == "lrp-epsilon"
    expected = {
        "lrp-epsilon", "lrp-epsilon-plus", "lrp-epsilon-plus-flat", "lrp-epsilon-gamma-box", "lrp-alpha1-beta0",
        "lrp-alpha2-beta1", "clrp", "sglrp", "excitation-backprop", "contrastive-excitation-backprop", "rap", "rsp",
        "contrastive-rsp", "deeplift", "guided-backprop", "deconvnet",
    }
    assert expected <= set(names)
    for other in ("gradient", "grad-cam", "rise", "integrated-gradients", "attnlrp", "cp-lrp", "smoothgrad"):
        assert other not in names


def _cli_has_gpu_flag() -> bool:
    bench = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "bench")[1]
    return any("--gpu" in a.option_strings for a in bench._actions if isinstance(a, argparse.Action))


@pytest.mark.skipif(not _cli_has_gpu_flag(), reason="xaijax bench has no --gpu flag yet")
def test_cli_bench_gpu_runs_this_script(capsys):
    assert cli.main(["bench", "--gpu", "--", "--help"]) == 0
    assert "GPU benchmark in one process" in capsys.readouterr().out


def test_watchdog_writes_the_json_and_ends_the_process_past_the_budget(tmp_path):
    """Past budget + grace the watchdog thread writes what was recorded (``stopped`` set) and
    ends the process with status 3, even while the main thread is busy."""
    out = tmp_path / "w.json"
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('bench_gpu', {str(SCRIPT)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['bench_gpu'] = mod; spec.loader.exec_module(mod)\n"
        f"rec = mod.Recorder(mod.Path({str(out)!r}), {{'rise': [{{'arch': 'vgg16'}}], 'stopped': None}}, 0.0, 0.0, True)\n"
        "time.sleep(120)\n"
        "print('not stopped')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "not stopped" not in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["rise"] == [{"arch": "vgg16"}] and saved["stopped"].startswith("passed the 0 s budget")
    assert saved["ended_at"] and _positive(saved["wall_s"])
