"""Evaluation experiments: results store, resume after a kill, sharding, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xaijax import checkpoints, cli, data, methods, metrics
from xaijax.evaluation import EvalConfig, ResultsStore, StoreMismatchError, run_experiment
from xaijax.evaluation.runner import image_pairs

REPO = Path(__file__).resolve().parent.parent


# --- results store ---------------------------------------------------------------------


def test_store_round_trip_dedup_and_mismatch(tmp_path):
    p = tmp_path / "s.jsonl"
    s = ResultsStore(p, {"a": 1, "b": [1, 2]})
    s.append([{"index": 3, "v": 0.5}, {"index": 1, "v": 0.25}])
    s.append([{"index": 3, "v": 99.0}])  # already stored: ignored, never counted twice
    s.close()
    s2 = ResultsStore(p, {"b": [1, 2], "a": 1})  # same config, other key order
    assert s2.done() == {1, 3}
    assert [r["v"] for r in s2.rows()] == [0.25, 0.5]
    s2.close()
    with pytest.raises(StoreMismatchError, match=r"different configuration \(a: stored 1, now 2\)"):
        ResultsStore(p, {"a": 2, "b": [1, 2]})
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(StoreMismatchError, match="not an xaijax results store"):
        ResultsStore(tmp_path / "junk.jsonl", {})


def test_store_replaces_a_skipped_row_by_an_evaluated_one(tmp_path):
    p = tmp_path / "s.jsonl"
    s = ResultsStore(p, {"k": 0})
    s.append([{"index": 0, "v": 1.0}, {"index": 1, "skipped": "OSError: truncated"}])
    assert s.skipped() == {1} and s.done() == {0, 1}
    s.append([{"index": 1, "skipped": "OSError: again"}])  # still unreadable: nothing new written
    s.close()
    assert len(p.read_text().splitlines()) == 3
    s = ResultsStore(p, {"k": 0})
    assert s.skipped() == {1}
    s.append([{"index": 1, "v": 2.0}, {"index": 0, "v": 9.0}])  # the retry succeeds; 0 stays as it was
    assert s.skipped() == set() and [r["v"] for r in s.rows()] == [1.0, 2.0]
    s.close()
    assert len(p.read_text().splitlines()) == 4  # appended, never rewritten
    s = ResultsStore(p, {"k": 0})  # on reload the evaluated row wins over the earlier skipped line
    assert s.skipped() == set() and [r["v"] for r in s.rows()] == [1.0, 2.0]
    s.close()


def test_store_refuses_a_damaged_middle_line_and_a_second_writer(tmp_path):
    p = tmp_path / "s.jsonl"
    s = ResultsStore(p, {"k": 0})
    s.append([{"index": 0, "v": 1.0}, {"index": 1, "v": 2.0}])
    with pytest.raises(StoreMismatchError, match="another process"):
        ResultsStore(p, {"k": 0})
    s.close()
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0], '{"oops": 1}', *lines[1:]]) + "\n")
    with pytest.raises(StoreMismatchError, match="damaged at line 2"):
        ResultsStore(p, {"k": 0})
    assert len(p.read_text().splitlines()) == 4  # nothing was cut


def test_store_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "s.jsonl"
    s = ResultsStore(p, {"k": 0})
    s.append([{"index": 0, "v": 1.0}])
    s.close()
    with open(p, "a") as f:
        f.write('{"index": 1, "v": 2.')  # the process died mid-write
    s = ResultsStore(p, {"k": 0})
    assert s.done() == {0}
    s.append([{"index": 1, "v": 2.5}])
    lines = p.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2]) == {"index": 1, "v": 2.5}


# --- pointing experiment -----------------------------------------------------------------


def test_pointing_experiment_matches_a_direct_computation(tiny_weights, tmp_path):
    cfg = EvalConfig("pointing", tmp_path / "ev", ("center", "gradient"), weights=str(tiny_weights), images=5, batch=2)
    res = run_experiment(cfg, progress=False)
    assert [r["method"] for r in res["rows"]] == ["center", "gradient"]
    assert sorted(p.name for p in (tmp_path / "ev").iterdir() if not p.name.endswith(".lock")) == [
        "pointing-center.jsonl", "pointing-gradient.jsonl", "results.csv", "results.json", "results.md"
    ]
    # independent recomputation for the centre baseline
    recs = data.SyntheticScenes().records("test", 0, 5)
    pairs = [(c, reg, d) for r in recs for c, reg, d in image_pairs(r)]
    classes = np.asarray([c for c, _, _ in pairs])
    regions = np.stack([reg for _, reg, _ in pairs])
    dif = np.asarray([d for _, _, d in pairs])
    maps = np.asarray(methods.get("center")(None, None, np.zeros((len(pairs), 128, 128, 3), np.float32), 0))
    pg = metrics.PointingGame(12)
    pg.update(classes, metrics.pointing_hits(maps, regions), dif)
    row = res["rows"][0]
    assert row["pairs"] == len(pairs) and row["images"] == 5 and row["skipped_images"] == 0
    assert row["pointing_all"] == pytest.approx(pg.result()["all"])
    assert row["pointing_dif"] == pytest.approx(pg.result()["dif"])
    # every class present in each image (non-difficult) is one pair
    expected = sum(len(data.present_classes(r, include_difficult=False)) for r in recs)
    assert row["pairs"] == expected
    # a rerun resumes: nothing recomputed, same table
    res2 = run_experiment(cfg, progress=False)
    _same_rows(res2["rows"], res["rows"], rel=0)
    # extending the image count evaluates only the new images
    res3 = run_experiment(EvalConfig("pointing", tmp_path / "ev", ("center",), weights=str(tiny_weights), images=7, batch=2), progress=False)
    assert res3["rows"][0]["images"] == 7
    # another configuration in the same folder is refused
    with pytest.raises(StoreMismatchError, match="refusing to mix"):
        run_experiment(EvalConfig("pointing", tmp_path / "ev", ("center",), weights=str(tiny_weights), images=5, seeds="predicted"), progress=False)


def test_predicted_seeds_keep_only_predicted_classes(tiny_weights, tmp_path):
    res_l = run_experiment(EvalConfig("pointing", tmp_path / "l", ("center",), weights=str(tiny_weights), images=4), progress=False)
    res_p = run_experiment(EvalConfig("pointing", tmp_path / "p", ("center",), weights=str(tiny_weights), images=4, seeds="predicted"), progress=False)
    model, v, _ = checkpoints.load(None, tiny_weights)
    from xaijax.models.preprocess import normalize

    recs = data.SyntheticScenes().records("test", 0, 4)
    logits = np.asarray(model.apply(v, normalize(np.stack([r.image for r in recs]), "torchvision")))
    expected = sum(1 for k, r in enumerate(recs) for c in data.present_classes(r, include_difficult=False) if logits[k, c] > 0)
    assert res_p["rows"][0]["pairs"] == expected <= res_l["rows"][0]["pairs"]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from xaijax.evaluation import store
    calls = {"n": 0}
    orig = store.ResultsStore.append
    def append(self, rows):
        rows = list(rows)
        if calls["n"] == 2:  # third batch: half a line reaches the disk, then the process dies
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


def _eval_args(weights: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "pointing", "--methods", "gradient", "--weights", str(weights), "--images", "9", "--batch", "2",
            "--no-progress", "--out", str(out), *extra]


def test_killed_run_resumes_to_the_uninterrupted_table(tiny_weights, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *_eval_args(tiny_weights, out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == -9, proc.stderr
    assert not (out / "results.json").exists()
    assert ResultsStore(out / "pointing-gradient.jsonl", json.loads((out / "pointing-gradient.jsonl").read_text().splitlines()[0])["config"]).done() == {0, 1, 2, 3}
    assert cli.main(_eval_args(tiny_weights, out)) == 0
    assert cli.main(_eval_args(tiny_weights, tmp_path / "clean")) == 0
    killed = json.loads((out / "results.json").read_text())
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    _same_rows(killed["rows"], clean["rows"], rel=0)
    assert len((out / "pointing-gradient.jsonl").read_text().splitlines()) == 1 + 9


SHARD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    assert len(jax.local_devices()) == 4, jax.local_devices()
    from xaijax import cli
    for d, out in (("4", sys.argv[2]), ("1", sys.argv[3])):
        assert cli.main(["eval", "pointing", "--methods", "gradient,rsp", "--weights", sys.argv[1], "--images", "5",
                         "--batch", "3", "--devices", d, "--no-progress", "--out", out]) == 0
    """
)


def test_sharded_run_equals_single_device(tiny_weights, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    a, b = tmp_path / "four", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, str(tiny_weights), str(a), str(b)], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # RSP's per-sample weight-gradient convolutions were mis-partitioned by a plain sharded jit
    for name in ("pointing-gradient.jsonl", "pointing-rsp.jsonl"):
        ra = [json.loads(x) for x in (a / name).read_text().splitlines()[1:]]
        rb = [json.loads(x) for x in (b / name).read_text().splitlines()[1:]]
        assert [r["index"] for r in ra] == [r["index"] for r in rb] == list(range(5))
        for x, y in zip(ra, rb):
            for p, q in zip(x["pairs"], y["pairs"]):
                assert p["class"] == q["class"] and p["hit"] == q["hit"]
                assert p["iou_mean"] == pytest.approx(q["iou_mean"], abs=1e-6)
    _same_rows(json.loads((a / "results.json").read_text())["rows"], json.loads((b / "results.json").read_text())["rows"])


def test_eval_merge_joins_shard_folders_into_the_unsharded_table(tiny_weights, tmp_path, capsys):
    from xaijax.evaluation import StoreMismatchError, merge_shards

    def args(out, *extra):
        return ["eval", "pointing", "--methods", "center,gradient", "--weights", str(tiny_weights), "--images", "5",
                "--batch", "2", "--no-progress", "--out", str(out), *extra]

    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, d in enumerate(shards):
        assert cli.main(args(d, "--shard-index", str(i), "--shard-count", "2")) == 0
    assert cli.main(["eval-merge", "--out", str(tmp_path / "merged"), *map(str, shards)]) == 0
    assert "pointing-gradient.jsonl: 5 images" in capsys.readouterr().out
    # the rerun there finds every image done: it computes nothing (appends nothing) and writes the table
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").glob("*.jsonl")}
    assert cli.main(args(tmp_path / "merged")) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").glob("*.jsonl")} == before
    assert cli.main(args(tmp_path / "single")) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())["rows"]
    single = json.loads((tmp_path / "single" / "results.json").read_text())["rows"]
    _same_rows(merged, single)
    # merging again adds nothing; a missing shard and a different configuration are refused
    assert merge_shards(shards, tmp_path / "merged") == {"pointing-center.jsonl": 5, "pointing-gradient.jsonl": 5}
    with pytest.raises(StoreMismatchError, match=r"shards \[1\] are missing"):
        merge_shards(shards[:1], tmp_path / "m2")
    other = tmp_path / "other"
    assert cli.main(args(other, "--shard-index", "1", "--shard-count", "2", "--seeds", "predicted")) == 0
    with pytest.raises(StoreMismatchError, match="differ in seeds"):
        merge_shards([shards[0], other], tmp_path / "m3")


def _same_rows(xs: list[dict], ys: list[dict], rel: float = 1e-5) -> None:
    """Tables equal up to float32 summation order (NaN, e.g. an undefined density, equals NaN)."""
    assert [sorted(x) for x in xs] == [sorted(y) for y in ys]
    for x, y in zip(xs, ys):
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-7, nan_ok=True), k
            else:
                assert x[k] == y[k], k


def test_eval_param_for_a_prefixed_method(tiny_weights, tmp_path):
    assert cli.main(["eval", "pointing", "--methods", "ucag:gradient", "--param", "ucag:gradient:ucag_n=2", "--weights", str(tiny_weights),
                     "--images", "1", "--no-progress", "--out", str(tmp_path / "u")]) == 0
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    assert res["rows"][0]["method"] == "ucag:gradient" and res["rows"][0]["hparams"] == "ucag_n=2"
    assert (tmp_path / "u" / "pointing-ucag_gradient.jsonl").is_file()


def test_pick_images_first_and_spread(tiny_weights, tmp_path):
    from xaijax.evaluation import open_dataset, pick_images

    assert pick_images(10, None) == pick_images(10, 99, "spread") == list(range(10))
    assert pick_images(10, 3) == [0, 1, 2] and pick_images(100, 4, "spread") == [0, 25, 50, 75]
    # a class-ordered split (ImageNet val: 50 per class): 20 spread images cover all 10 classes, the first 20 one
    labels = np.repeat(np.arange(10), 50)
    assert len(set(labels[pick_images(500, 20, "spread")])) == 10 and len(set(labels[pick_images(500, 20)])) == 1
    spread = pick_images(1001, 333, "spread")
    assert len(set(spread)) == 333 and spread == sorted(spread) and spread[-1] < 1001
    with pytest.raises(ValueError, match="pick must be one of"):
        pick_images(10, 3, "random")
    # the runner evaluates exactly those indices, and sharding splits them
    n = len(open_dataset("synthetic", None, "test", None, None))
    out = tmp_path / "spread"
    assert cli.main(["eval", "pointing", "--methods", "center", "--weights", str(tiny_weights), "--images", "3",
                     "--pick", "spread", "--no-progress", "--out", str(out)]) == 0
    stored = [json.loads(x)["index"] for x in (out / "pointing-center.jsonl").read_text().splitlines()[1:]]
    assert stored == [0, n // 3, 2 * n // 3]
    cfg = EvalConfig("pointing", tmp_path / "shard", ("center",), weights=str(tiny_weights), images=3, pick="spread",
                     shard_index=1, shard_count=2)
    assert run_experiment(cfg, progress=False)["rows"][0]["images"] == 1
    stored = [json.loads(x)["index"] for x in (tmp_path / "shard" / "pointing-center.jsonl").read_text().splitlines()[1:]]
    assert stored == [n // 3]


def test_eval_cli_errors(tiny_weights, tmp_path, capsys):
    def err(argv):
        code = cli.main(argv)
        e = capsys.readouterr().err.strip()
        assert code == 2 and e.startswith("xaijax: error:") and "\n" not in e, e
        return e

    base = ["eval", "pointing", "--weights", str(tiny_weights), "--out", str(tmp_path / "e"), "--no-progress"]
    assert "unknown method 'gradiant'" in err([*base, "--methods", "gradiant"])
    assert "--param expects METHOD:key=value" in err([*base, "--methods", "gradient", "--param", "steps=3"])
    assert "--devices must be between 1 and" in err([*base, "--methods", "gradient", "--devices", "99"])
    assert "needs --data-dir" in err(["eval", "pointing", "--dataset", "voc07", "--methods", "gradient", "--weights", str(tiny_weights)])
    assert "--images must be at least 1" in err([*base, "--methods", "gradient", "--images", "0"])
    assert "--size must be a positive" in err([*base, "--methods", "gradient", "--size", "0"])


def test_model_metric_experiments_match_direct_computations(tiny_weights, tmp_path):
    model, v, _ = checkpoints.load(None, tiny_weights)
    from xaijax.models.preprocess import normalize

    recs = data.SyntheticScenes().records("test", 0, 3)
    x = np.asarray(normalize(np.stack([r.image for r in recs]), "torchvision"))
    pairs = [(k, c) for k, r in enumerate(recs) for c, _, _ in image_pairs(r)]
    xs = x[[k for k, _ in pairs]]
    cls = np.asarray([c for _, c in pairs], np.int32)
    maps = np.asarray(methods.get("center")(None, None, xs, 0))
    fn = metrics.classifier_fn(model, v)
    res = run_experiment(EvalConfig("insdel", tmp_path / "i", ("center",), weights=str(tiny_weights), images=3), progress=False)
    row = res["rows"][0]
    assert row["deletion_auc"] == pytest.approx(float(np.mean(metrics.get_model_metric("deletion")(fn, xs, maps, cls)["auc"])), rel=1e-5)
    assert row["insertion_auc"] == pytest.approx(float(np.mean(metrics.get_model_metric("insertion")(fn, xs, maps, cls)["auc"])), rel=1e-5)
    assert len(res["curves"]["center"]["deletion"]) == 128 * 128 // (8 * 128) + 1
    assert (tmp_path / "i" / "curves.png").stat().st_size > 1000
    res = run_experiment(EvalConfig("region-insertion", tmp_path / "r", ("center",), weights=str(tiny_weights), images=3), progress=False)
    direct = metrics.get_model_metric("region-insertion")(fn, xs, maps, cls)
    assert res["rows"][0]["region_insertion_auc"] == pytest.approx(float(np.mean(direct["auc"])))
    # segmentation with top-1 targets: one pair per image, the union of all objects as foreground
    res = run_experiment(EvalConfig("segmentation", tmp_path / "s", ("center",), weights=str(tiny_weights), images=3, seeds="top1"), progress=False)
    fg = np.stack([r.masks.any(0) for r in recs])
    cmaps = np.asarray(methods.get("center")(None, None, x, 0))
    seg = metrics.get("fgbg-miou")
    vals = seg(metrics.PairBatch(maps=cmaps, regions=fg, classes=np.zeros(3, np.int64), dif=np.zeros(3, bool)))
    assert res["rows"][0]["pairs"] == 3
    assert res["rows"][0]["fgbg_miou"] == pytest.approx(seg.summarize(vals, np.zeros(3, np.int64), np.zeros(3, bool), 12)["fgbg_miou"])
    # --crf: every thresholded map refined by the dense CRF on its image (the "+ CRF" rows)
    pytest.importorskip("pydensecrf.densecrf")
    res = run_experiment(EvalConfig("segmentation", tmp_path / "crf", ("center",), weights=str(tiny_weights), images=3,
                                    seeds="top1", crf=True), progress=False)
    seg_crf = metrics.get("fgbg-miou", crf=True)
    images = np.stack([r.image for r in recs])
    vals = seg_crf(metrics.PairBatch(maps=cmaps, regions=fg, classes=np.zeros(3, np.int64), dif=np.zeros(3, bool), images=images))
    want = seg_crf.summarize(vals, np.zeros(3, np.int64), np.zeros(3, bool), 12)["fgbg_miou"]
    assert res["rows"][0]["fgbg_miou"] == pytest.approx(want)
    assert want != pytest.approx(res_plain := seg.summarize(vals_plain := seg(metrics.PairBatch(
        maps=cmaps, regions=fg, classes=np.zeros(3, np.int64), dif=np.zeros(3, bool))), np.zeros(3, np.int64), np.zeros(3, bool), 12)["fgbg_miou"])
    assert np.isfinite(res_plain) and vals_plain["miou"].shape == vals["miou"].shape == (3,)  # the CRF changed the masks
    with pytest.raises(ValueError, match="--crf refines the segmentation"):
        run_experiment(EvalConfig("pointing", tmp_path / "p2", ("center",), weights=str(tiny_weights), images=1, crf=True), progress=False)


def test_sanity_experiment_of_a_model_independent_map_is_perfectly_stable(tiny_weights, tmp_path):
    # the centre baseline ignores the weights: every randomisation step leaves the map unchanged
    res = run_experiment(EvalConfig("sanity", tmp_path / "c", ("center", "gradient"), weights=str(tiny_weights), images=2), progress=False)
    c = res["curves"]["center"]
    assert c["layers"][0] == "fc" and len(c["layers"]) == len(c["ssim"]) > 5
    np.testing.assert_allclose(c["spearman"], 1.0, atol=1e-6)
    np.testing.assert_allclose(c["ssim"], 1.0, atol=1e-6)
    g = res["curves"]["gradient"]
    assert min(g["spearman_abs"]) < 0.9  # a gradient does depend on the weights
    lines = (tmp_path / "c" / "sanity_layers.csv").read_text().splitlines()
    assert lines[0] == "method,step,layer,spearman,spearman_abs,ssim" and len(lines) == 1 + 2 * len(c["layers"])
    assert (tmp_path / "c" / "sanity.png").stat().st_size > 1000
    assert (tmp_path / "c" / "sanity-gradient.png").stat().st_size > 1000


def test_native_resolution_maps_and_torchray_smoothing():
    from scipy import ndimage

    from xaijax.evaluation.runner import POINTING_SMOOTH, _gaussian_smooth, _to_native

    rng = np.random.default_rng(0)
    m = rng.normal(size=(2, 20, 30)).astype(np.float32)
    want = np.stack([ndimage.gaussian_filter(x.astype(np.float64), 2.5, mode="nearest", truncate=4.0) for x in m])
    np.testing.assert_allclose(_gaussian_smooth(m, 2.5), want, atol=1e-5)
    up = _to_native(np.ones((1, 8, 8), np.float32), (24, 16), 0.0)
    assert up.shape == (1, 24, 16) and np.allclose(up, 1.0)
    peak = np.zeros((1, 8, 8), np.float32)
    peak[0, 2, 6] = 1.0  # row 2, column 6 of 8 -> near row 7, column 12 of a 24 x 16 original
    r, c = np.unravel_index(_to_native(peak, (24, 16), 0.0)[0].argmax(), (24, 16))
    assert abs(r - 7.5) <= 1.5 and abs(c - 12.5) <= 1.5
    assert set(POINTING_SMOOTH) == {"gradient", "deconvnet", "guided-backprop"}
