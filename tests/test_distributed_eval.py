"""``xaijax eval --distributed``: real multi-process runs on JAX's distributed runtime.

Two processes on the loopback address (gloo CPU collectives), each with two forced host
devices, so the global mesh has four devices over two processes. A run whose writer
(process 0) is killed mid-write is resumed by the same command, and the resumed store and
table equal a single-process run's: every image once, the same values.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xaijax import cli, data
from xaijax.evaluation import distributed
from xaijax.evaluation.parallel import DataParallel, make_mesh
from xaijax.evaluation.runner import image_pairs
from xaijax.evaluation.store import read_store

REPO = Path(__file__).resolve().parent.parent
IMAGES, BATCH = 9, 2
TIMEOUT = 240  # seconds per launch: a hung collective fails the test instead of the suite

# process 0 dies (SIGKILL) at its second append, half a line on disk: the step in flight is lost
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from xaijax.evaluation import store
    calls = {"n": 0}
    orig = store.ResultsStore.append
    def append(self, rows):
        rows = list(rows)
        if calls["n"] == 1:
            with open(self.path, "a") as f:
                f.write('{"index": ' + str(rows[0]["index"]) + ', "pa')
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        orig(self, rows)
    store.ResultsStore.append = append
    from xaijax import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)
RUN_SCRIPT = "import sys\nfrom xaijax import cli\nsys.exit(cli.main(sys.argv[1:]))\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(weights: Path, out: Path) -> list[str]:
    return ["eval", "pointing", "--methods", "gradient", "--weights", str(weights), "--images", str(IMAGES),
            "--batch", str(BATCH), "--no-progress", "--out", str(out)]


def _launch(weights: Path, out: Path, cache: Path, scripts: tuple[str, str],
            weights_of: tuple[Path, Path] | None = None) -> list[subprocess.CompletedProcess]:
    """Both processes of one distributed run (process ``i`` runs ``scripts[i]``, with
    ``weights_of[i]`` where given); waits for both."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "XAIJAX_JAX_CACHE": str(cache)}
    dist = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen([sys.executable, "-c", scripts[i], *_args(weights_of[i] if weights_of else weights, out), *dist,
                          "--process-id", str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for i in range(2)
    ]
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _rows(path: Path) -> list[dict]:
    return read_store(path)[1]


def test_two_processes_killed_and_resumed_equal_one_process(tiny_weights, tmp_path):
    out, cache = tmp_path / "dist", tmp_path / "jax-cache"
    # the images' pair counts differ between the processes' blocks (3 vs 1 pairs in the first
    # step, and a step where process 1 has no image), so the lockstep padding calls are exercised
    pairs = [len(image_pairs(r)) for r in data.SyntheticScenes().records("test", 0, IMAGES)]
    blocks = [[pairs[j] for j in distributed.process_block(range(s, min(s + 2 * BATCH, IMAGES)), BATCH, p)]
              for s in range(0, IMAGES, 2 * BATCH) for p in range(2)]
    calls = [-(-sum(b) // BATCH) for b in blocks]
    assert calls[0] != calls[1] and blocks[-1] == []

    killed = _launch(tiny_weights, out, cache, (KILL_SCRIPT, RUN_SCRIPT))
    assert killed[0].returncode == -9, killed[0].stderr[-3000:]
    assert killed[1].returncode != 0  # the coordinator (process 0) is gone: process 1 stops too
    store = out / "pointing-gradient.jsonl"
    assert not (out / "results.json").exists()
    assert store.read_text().endswith(', "pa')  # the torn write of the step in flight
    assert sorted(r["index"] for r in _rows(store)) == [0, 1, 2, 3]  # one step (2 processes x 2 images) stored

    resumed = _launch(tiny_weights, out, cache, (RUN_SCRIPT, RUN_SCRIPT))
    for r in resumed:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "process 1 done" in resumed[1].stdout and "results.md" in resumed[0].stdout
    assert sorted(f.name for f in out.iterdir() if not f.name.endswith(".lock")) == [
        "pointing-gradient.jsonl", "results.csv", "results.json", "results.md"]  # one store, one table
    dist_rows = _rows(store)
    assert sorted(r["index"] for r in dist_rows) == list(range(IMAGES))  # every image once: no double counting
    assert len(store.read_text().splitlines()) == 1 + IMAGES  # the torn line was cut, nothing appended twice
    assert len({r["run"] for r in dist_rows}) == 2  # rows of both runs

    single = tmp_path / "single"
    assert cli.main(_args(tiny_weights, single)) == 0
    single_store = single / "pointing-gradient.jsonl"
    # the same store configuration: a distributed run and a single-process run resume each other's stores
    assert read_store(store)[0] == read_store(single_store)[0]
    for x, y in zip(dist_rows, _rows(single_store), strict=True):
        assert x["index"] == y["index"] and x["image_id"] == y["image_id"]
        assert [p["class"] for p in x["pairs"]] == [p["class"] for p in y["pairs"]]
        for p, q in zip(x["pairs"], y["pairs"]):
            assert sorted(p) == sorted(q) and p["hit"] == q["hit"]
            for k in p:
                assert p[k] == pytest.approx(q[k], abs=1e-6, nan_ok=True), k
    a = json.loads((out / "results.json").read_text())["rows"]
    b = json.loads((single / "results.json").read_text())["rows"]
    assert a[0]["images"] == b[0]["images"] == IMAGES and a[0]["pairs"] == b[0]["pairs"] == sum(pairs)
    for key in b[0]:
        if key in ("run",):
            continue
        if isinstance(b[0][key], float):
            assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-7, nan_ok=True), key
        else:
            assert a[0][key] == b[0][key], key


def test_a_failing_process_stops_the_others_at_once(tiny_weights, tmp_path):
    """Process 1 cannot read its weights: it says so, and process 0 stops at the same point with
    a one-line error naming it, instead of waiting for JAX's heartbeat/shutdown timeouts (minutes)."""
    res = _launch(tiny_weights, tmp_path / "o", tmp_path / "c", (RUN_SCRIPT, RUN_SCRIPT),
                  weights_of=(tiny_weights, tmp_path / "missing.safetensors"))
    assert res[1].returncode == 2 and "missing.safetensors" in res[1].stderr, res[1].stderr[-2000:]
    assert res[0].returncode == 2, res[0].stderr[-2000:]
    assert "xaijax: error: process 1 of the distributed run failed while setting up" in res[0].stderr
    assert not list((tmp_path / "o").glob("*.jsonl"))


def test_processes_with_other_weights_are_refused(tiny_weights, tmp_path):
    """Process 1's weights file holds other values (another seed): both processes refuse to
    start, so one table never mixes two models."""
    import json as _json

    from xaijax import checkpoints, models

    kw = {"num_classes": 12, "width": 8}
    other = tmp_path / "other.safetensors"
    v = models.random_variables(models.get("resnet18", **kw), (1, 128, 128, 3), seed=4)
    checkpoints.save_variables(other, v, metadata={"arch": "resnet18", "model_kwargs": _json.dumps(kw)})
    res = _launch(tiny_weights, tmp_path / "o", tmp_path / "c", (RUN_SCRIPT, RUN_SCRIPT), weights_of=(tiny_weights, other))
    for r in res:
        assert r.returncode == 2, r.stderr[-2000:]
        assert "process 1 sees other weights, dataset or images" in r.stderr
    assert not list((tmp_path / "o").glob("*.jsonl"))


def test_process_blocks_cover_each_step_once():
    todo = [4, 9, 10, 11, 15, 20, 21]
    for nproc in (1, 2, 3):
        for batch in (1, 2, 3):
            got = []
            for s in range(0, len(todo), batch * nproc):
                step = todo[s : s + batch * nproc]
                blocks = [distributed.process_block(step, batch, p) for p in range(nproc)]
                assert all(len(b) <= batch for b in blocks)
                got += [i for b in blocks for i in b]
            assert got == todo  # in order, each once


def test_catch_up_makes_the_missing_calls():
    def fn(v, x, t):
        return x * v

    dp = DataParallel(fn, make_mesh(1))
    assert not dp.multiprocess and dp.calls == 0
    x = np.ones((3, 2), np.float32)
    np.testing.assert_array_equal(dp(np.float32(2.0), x, np.zeros(3, np.int32)), 2 * x)
    dp.catch_up(4, np.float32(2.0), x, np.zeros(3, np.int32))
    assert dp.calls == 4
    dp.catch_up(2, np.float32(2.0), x, np.zeros(3, np.int32))  # never backwards
    assert dp.calls == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--coordinator", "127.0.0.1:1234"], "belong to --distributed"),
        (["--distributed", "--shard-index", "1", "--shard-count", "2"], "drop --shard-index"),
        (["--distributed", "--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], r"--process-id must be in 0 \.\. 1"),
        (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "0", "--process-id", "0"], "at least 1"),
    ],
)
def test_bad_distributed_arguments_fail_before_joining(tiny_weights, tmp_path, capsys, extra, message):
    import re

    assert cli.main([*_args(tiny_weights, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not distributed.is_initialized() and not (tmp_path / "o").exists()


def test_environment_settings_are_read(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        distributed.initialize("127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ValueError, match=r"--process-id must be in 0 \.\. 1"):
        distributed.initialize("127.0.0.1:1")
    assert not distributed.is_initialized()
