"""Figures and tables a reader can trust (issue 19): one colour map per row of the demo figure,
titled explain PNGs, labelled visualize grids, unclipped sanity titles, error text that keeps
its advice, compile and steady-state times apart, tables that cover every store of a
configuration with the run that made each row, a legend under each table, RISE's progress
bar, and ``bench --quick`` printing its table once."""

from __future__ import annotations

import json
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from xaijax import checkpoints, cli, data, demo, methods, models, viz
from xaijax.evaluation import EvalConfig, ResultsStore, run_experiment
from xaijax.evaluation import tables
from xaijax.methods.perturbation import rise as rise_mod


def _inside(fig, artists) -> None:
    """Every text artist lies wholly inside the figure (nothing clipped at its edges)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    fb = fig.bbox
    for t in artists:
        e = t.get_window_extent(r)
        assert fb.x0 - 0.5 <= e.x0 and e.x1 <= fb.x1 + 0.5 and fb.y0 - 0.5 <= e.y0 and e.y1 <= fb.y1 + 0.5, (t.get_text(), e, fb)


def _map_images(ax):
    """The map layers of a cell: images drawn with a colour map (the photo underneath has none)."""
    return [im for im in ax.get_images() if im.get_array().ndim == 2]


# --- the demo figure -------------------------------------------------------------------------


def test_map_scale_from_the_sign_of_all_the_maps():
    pos = [np.full((4, 4), 2.0), np.linspace(1, 3, 16).reshape(4, 4)]
    s = viz.MapScale.of(pos, percentile=100)
    assert not s.signed and s.cmap == viz.UNSIGNED_CMAP and (s.vmin, s.vmax) == (1.0, 3.0)
    one_negative = [pos[0], pos[1].copy()]
    one_negative[1][0, 0] = -0.5  # one negative value anywhere makes the whole set signed
    s = viz.MapScale.of(one_negative, percentile=100)
    assert s.signed and s.cmap == viz.SIGNED_CMAP and s.vmin == -s.vmax == -3.0
    assert viz.MapScale.of([None, pos[0]], percentile=100).vmax == 3.0  # None cells are skipped
    # the robust limit: one extreme pixel does not set the scale; it is marked as clipped
    spike = np.ones((20, 20))
    spike[0, 0] = 1000.0
    s = viz.MapScale.of([spike - 1.0 + 1e-3 * np.arange(400).reshape(20, 20)], percentile=99)
    assert s.vmax < 10 and s.clipped_high and s.extend in ("max", "both")
    # opacity grows with the magnitude: zero lets the image through
    s = viz.MapScale.of([np.array([[-2.0, 0.0, 2.0]])], percentile=100)
    np.testing.assert_allclose(s.alpha(np.array([[-2.0, 0.0, 2.0]]), 1.0), [[1.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def demo_inputs():
    recs = data.SyntheticScenes().records("test", 0, 6)
    pairs = demo.build_pairs(recs)
    imgs = np.stack([r.image for r in recs])
    fig_pairs = demo._figure_pairs(pairs, 2)
    assert len(fig_pairs) == 2  # two images per model
    rng = np.random.default_rng(0)
    maps = {}
    for mi, model in enumerate(("synthetic_vgg16", "synthetic_resnet18")):
        scale = 10.0 ** mi  # the models' maps differ in scale
        maps[(model, "positive")] = scale * rng.random((2, 128, 128))
        signed = scale * rng.random((2, 128, 128))
        if mi == 1:
            signed[1, 5, 5] = -1e-3  # a single negative pixel in one cell of one model
        maps[(model, "signed")] = signed
    maps[("synthetic_resnet18", "cam")] = rng.random((2, 128, 128))  # undefined for VGG: no entry
    return imgs, recs, pairs, fig_pairs, maps


def test_demo_figure_one_colour_map_per_row_and_na(demo_inputs):
    imgs, recs, pairs, fig_pairs, maps = demo_inputs
    names = ["positive", "signed", "cam"]
    fig = demo._figure(imgs, pairs, fig_pairs, maps, ["synthetic_vgg16", "synthetic_resnet18"], names,
                       data.SyntheticScenes().class_names)
    rows = dict(zip(["header", *names], fig.grid_axes))
    scales = dict(zip(["header", *names], fig.row_scales))
    assert scales["header"] is None and not any(_map_images(ax) for ax in rows["header"])
    for name, want_signed in (("positive", False), ("signed", True)):
        # every cell of the row: one colour map, from the sign of the whole row (both models)
        cmaps = {im.get_cmap().name for ax in rows[name] for im in _map_images(ax)}
        assert cmaps == {viz.SIGNED_CMAP if want_signed else viz.UNSIGNED_CMAP}, name
        # limits shared by each model's cells (two columns per model), symmetric for signed maps
        for g, cells in enumerate((rows[name][:2], rows[name][2:])):
            lims = {(im.norm.vmin, im.norm.vmax) for ax in cells for im in _map_images(ax)}
            assert lims == {(scales[name][g].vmin, scales[name][g].vmax)}
            if want_signed:
                assert scales[name][g].vmin == -scales[name][g].vmax
        assert len(fig.colorbars[names.index(name) + 1]) == 2  # a colour bar per row and model
    # the signed row's VGG half has no negative value of its own, but shares the row's colour map
    assert scales["signed"][0].signed
    # undefined cells say n/a and get no colour bar; defined ones show the map
    na = [ax for ax in rows["cam"] if any(t.get_text() == "n/a" for t in ax.texts)]
    assert na == rows["cam"][:2] and all(_map_images(ax) for ax in rows["cam"][2:])
    assert len(fig.colorbars[3]) == 1
    # row labels and column titles are inside the figure; the size stays reasonable
    _inside(fig, fig.row_labels + [ax.title for ax in rows["header"]])
    w, h = fig.get_size_inches()
    assert w < 10 and h < 6


def test_explain_figure_names_method_model_class_and_score(tmp_path):
    img = np.random.default_rng(0).random((32, 32, 3))
    m = np.random.default_rng(1).normal(size=(32, 32))
    fig = viz.explain_figure(img, m, method="lrp-epsilon", model="vgg16 (w.safetensors)", target=4, class_name="ring",
                             score=0.912, score_name="softmax", logit=3.07)
    title = fig.title_text
    for part in ("lrp-epsilon", "vgg16 (w.safetensors)", "class 4 'ring'", "softmax 0.912", "logit 3.070"):
        assert part in title, part
    assert fig.get_suptitle() == title
    (cb,) = fig.colorbars  # a colour bar, of the map's scale
    (im,) = [im for ax in fig.axes for im in _map_images(ax) if ax is not cb.ax]
    assert im.get_cmap().name == cb.mappable.get_cmap().name == viz.SIGNED_CMAP
    assert im.norm.vmin == -im.norm.vmax == cb.mappable.norm.vmin
    _inside(fig, [fig._suptitle])
    # unnamed classes are not named twice
    assert "'class 4'" not in viz.explain_figure(img, m, method="g", model="m", target=4, class_name="class 4").title_text
    p = viz.save_explanation(tmp_path / "e.png", img, np.abs(m), method="g", model="m")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory):
    kw = {"num_classes": 4, "width": 1 / 16, "hidden": 8, "pool_size": 1}
    m = models.get("vgg11", **kw)
    v = models.random_variables(m, (1, 32, 32, 3), seed=0)
    path = tmp_path_factory.mktemp("w") / "tiny_vgg.safetensors"
    checkpoints.save_variables(path, v, {"arch": "vgg11", "model_kwargs": json.dumps(kw),
                                         "class_names": json.dumps(["disc", "ring", "triangle", "cross"])})
    return path


def test_explain_cli_writes_the_titled_figure(tiny_vgg, tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "im.png")
    seen = {}
    real = viz.explain_figure

    def spy(*a, **k):
        fig = real(*a, **k)
        seen["title"] = fig.title_text
        return fig

    monkeypatch.setattr(viz, "explain_figure", spy)
    out = tmp_path / "out"
    assert cli.main(["explain", "--weights", str(tiny_vgg), "--method", "gradient", "--size", "32", "--target", "1",
                     "--out", str(out), str(tmp_path / "im.png")]) == 0
    assert (out / "im.gradient.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gradient on vgg11 (tiny_vgg.safetensors)" in seen["title"] and "class 1 'ring'" in seen["title"]


def test_visualize_writes_a_grid_labelled_with_the_units(tiny_vgg, tmp_path):
    out = tmp_path / "vis"
    assert cli.main(["visualize", "--weights", str(tiny_vgg), "--layer", "logits", "--units", "0:3", "--steps", "2",
                     "--size", "32", "--out", str(out)]) == 0
    rec = json.loads((out / "logits_class.json").read_text())
    assert [lab.split(" logit")[0] for lab in rec["labels"]] == ["class 0 (disc)", "class 1 (ring)", "class 2 (triangle)"]
    assert (out / "logits_class_labelled.png").is_file() and (out / "logits_class.png").is_file()
    fig = viz.labelled_grid_figure(np.zeros((3, 8, 8, 3)), ["channel 0", "channel 1", "channel 2"], title="features.3")
    assert [ax.get_title() for ax in fig.axes] == ["channel 0", "channel 1", "channel 2"]
    _inside(fig, [ax.title for ax in fig.axes] + [fig._suptitle])
    with pytest.raises(ValueError, match="3 tiles but 2 labels"):
        viz.labelled_grid_figure(np.zeros((3, 8, 8, 3)), ["a", "b"])


def test_sanity_grid_column_titles_are_not_clipped():
    from xaijax.metrics import sanity

    layers = tuple(f"layer{4 - i // 3}.{i % 2}.conv{i % 3 + 1}" for i in range(11))
    n = len(layers)
    res = sanity.CascadeResult(layers, np.random.default_rng(0).normal(size=(n + 1, 2, 16, 16)),
                               np.zeros((n, 2)), np.zeros((n, 2)), np.zeros((n, 2)))
    fig = sanity.plot_cascade_grid(res, None, images=(0, 1), max_columns=12)
    titles = fig.column_titles
    assert [t.get_text() for t in titles] == ["trained", *layers]
    _inside(fig, titles)  # checked on the figure as saved by the runner (no bbox_inches="tight")


# --- tables ------------------------------------------------------------------------------------


ADVICE = "Delete the file (or use another --out folder) to start fresh."


def test_shorten_cuts_at_a_word_boundary_and_keeps_the_advice():
    words = " ".join(f"word{i}" for i in range(120))
    text = f"results.jsonl holds results of a different configuration ({words}). {ADVICE}"
    short = tables.shorten(text, 300)
    assert len(short) <= 300 and short.endswith(ADVICE) and " ... " in short
    original = set(text.replace("(", " ").replace(")", " ").split())
    assert all(w in original or w == "..." for w in short.replace("(", " ").replace(")", " ").split())  # no half words
    # one long sentence: its last ';' clause is kept
    one = f"refusing to mix {words}; pass --force to overwrite"
    assert tables.shorten(one, 200).endswith("; pass --force to overwrite") or tables.shorten(one, 200).endswith("pass --force to overwrite")
    assert tables.shorten("short\nmessage") == "short message"
    # the Markdown cell: one line, pipes escaped
    (line,) = tables.markdown_table([{"error": "a | b\nc"}])[2:]
    assert line == "| a \\| b c |"
    assert tables.markdown_table([{"miou_positive": float("nan")}])[2] == "| n/a |"  # undefined, not "nan"


def test_demo_tables_full_error_in_json_advice_in_markdown_and_legend(tmp_path, monkeypatch):
    long_msg = "CAM is not defined here because " + " ".join(["the head is not a global pool"] * 20) + ". " + ADVICE

    class NA(methods.Method):
        def __call__(self, model, variables, x, target):
            raise methods.NotApplicable(long_msg)

    monkeypatch.setitem(methods.registry._REGISTRY, "na-method", (NA, "test only"))
    kw = {"num_classes": 12, "width": 4}
    m = models.get("resnet18", **kw)
    wdir = tmp_path / "w"
    wdir.mkdir()
    checkpoints.save_variables(wdir / "synthetic_resnet18.safetensors", models.random_variables(m, (1, 128, 128, 3), seed=1),
                               metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    res = demo.run_demo(tmp_path / "d", 2, method_names=["center", "na-method"], batch=2, weights=wdir, progress=False,
                        models=["synthetic_resnet18"], model_metric_pairs=0)
    row = {r["method"]: r for r in res["rows"]}
    assert row["na-method"]["error"] == "not defined for this model: " + long_msg  # whole, in results.json
    md = (tmp_path / "d" / "results.md").read_text()
    cell = [line for line in md.splitlines() if "| na-method |" in line][0]
    assert ADVICE in cell and len(long_msg) > 300 and "not defined for this model: CAM is not defined" in cell
    # times: compile and steady state, no first-batch column
    assert {"compile_s", "ms_per_map"} <= set(row["center"]) and "first_batch_s" not in row["center"]
    _legend_covers_every_column(md)


def _legend_covers_every_column(md: str) -> None:
    header = [line for line in md.splitlines() if line.startswith("| ")][0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    legend = {line.split("`")[1]: line for line in md.splitlines() if line.startswith("- `")}
    for c in cols:
        assert c in legend and "no description" not in legend[c], c
    if "miou_positive" in cols:
        assert "positive part" in legend["miou_positive"] and "signed maps only" in legend["miou_positive"]
        assert "above the map's own mean" in legend["miou_mean"]


def test_compile_time_is_reported_apart_from_the_steady_state():
    traced = []

    def slow_to_compile(v, x, t):
        time.sleep(0.4)  # runs while tracing, i.e. in the compile phase only
        traced.append(1)
        return x.sum(-1) * v

    pairs = demo.Pairs(np.arange(5) % 2, np.zeros(5, np.int64), np.zeros((5, 4, 4), bool), np.zeros(5, bool))
    maps, compile_s, per_map = demo._run_method(jax.jit(slow_to_compile), jnp.float32(2.0), jnp.ones((2, 4, 4, 3)),
                                                pairs, 2, lambda: None)
    assert maps.shape == (5, 4, 4) and np.allclose(maps, 6.0)
    assert len(traced) == 1 and compile_s >= 0.4 and per_map < 0.05


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    kw = {"num_classes": 12, "width": 4}
    m = models.get("resnet18", **kw)
    path = tmp_path_factory.mktemp("w") / "tiny_resnet18.safetensors"
    checkpoints.save_variables(path, models.random_variables(m, (1, 128, 128, 3), seed=3),
                               metadata={"arch": "resnet18", "model_kwargs": json.dumps(kw)})
    return path


def test_eval_table_covers_every_store_of_the_configuration(tiny_weights, tmp_path):
    out = tmp_path / "ev"
    first = run_experiment(EvalConfig("pointing", out, ("center",), weights=str(tiny_weights), images=3), progress=False)
    first_run = first["runs"]["this_run"]
    time.sleep(1.1)  # run ids have one-second resolution
    second = run_experiment(EvalConfig("pointing", out, ("gradient",), weights=str(tiny_weights), images=3), progress=False)
    assert [r["method"] for r in second["rows"]] == ["gradient", "center"]  # the earlier run's row stays
    assert second["rows"][1] == first["rows"][0]
    runs = second["runs"]
    assert runs["rows"] == {"gradient": [runs["this_run"]], "center": [first_run]} and runs["this_run"] != first_run
    md = (out / "results.md").read_text()
    assert "| gradient |" in md and "| center |" in md
    center_line = [line for line in md.splitlines() if line.startswith("| center |")][0]
    gradient_line = [line for line in md.splitlines() if line.startswith("| gradient |")][0]
    assert center_line.rstrip(" |").endswith(first_run) and gradient_line.rstrip(" |").endswith(f"{runs['this_run']} (this run)")
    assert "Rows of methods this run did not evaluate (`center`)" in md
    _legend_covers_every_column(md)
    # a store of another configuration in the folder is named, not mixed in
    config = json.loads((out / "pointing-center.jsonl").read_text().splitlines()[0])["config"]
    other = ResultsStore(out / "pointing-rsp.jsonl", {**config, "method": "rsp", "seeds": "predicted"})
    other.append([{"index": 0, "image_id": "x", "pairs": []}])
    other.close()
    third = run_experiment(EvalConfig("pointing", out, ("gradient",), weights=str(tiny_weights), images=3), progress=False)
    assert [r["method"] for r in third["rows"]] == ["gradient", "center"]
    md = (out / "results.md").read_text()
    assert "`pointing-rsp.jsonl`: another configuration (differs in seeds)" in md
    # fewer images in an earlier store than this run selects: said under the table
    fourth = run_experiment(EvalConfig("pointing", out, ("gradient",), weights=str(tiny_weights), images=4), progress=False)
    assert [r["images"] for r in fourth["rows"]] == [4, 3]
    assert "Rows with fewer than the 4 selected images: `center`" in (out / "results.md").read_text()


# --- progress and small CLI things -------------------------------------------------------------


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.mean((1, 2)))


def test_rise_progress_bar_on_concrete_inputs_same_map_as_jitted(capsys):
    model = _Tiny()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    v = model.init(jax.random.key(0), x)
    r = methods.get("rise", n=30, chunk=8, s=2)
    assert r.runs_own_loop and r.has_progress
    quiet = np.asarray(r(model, v, x, jnp.array([0, 2])))
    assert "rise" not in capsys.readouterr().err
    import dataclasses

    loud = dataclasses.replace(r, progress=True)
    assert loud == r and hash(loud) == hash(r)  # progress never causes a recompile
    shown = np.asarray(loud(model, v, x, jnp.array([0, 2])))
    err = capsys.readouterr().err
    assert "rise" in err and "30/30" in err
    jitted = np.asarray(jax.jit(lambda vv, xx: r(model, vv, xx, jnp.array([0, 2])))(v, x))
    np.testing.assert_allclose(shown, quiet, rtol=0, atol=0)
    np.testing.assert_allclose(quiet, jitted, rtol=1e-5, atol=1e-7)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        jax.jit(lambda vv, xx: loud(model, vv, xx, jnp.array([0, 2])))(v, x)
    assert any("progress=True has no effect under jit" in str(e.message) for e in w)
    vm = jax.vmap(lambda xx: r(model, v, xx[None], 0)[0])(x)  # vmap takes the scan path
    assert vm.shape == (2, 8, 8)
    assert rise_mod.RISE.has_progress


def test_bench_quick_prints_its_table_once(tmp_path, capsys):
    argv = ["bench", "--", "--archs", "resnet18", "--batches", "1", "--size", "32", "--repeats", "1",
            "--methods", "lrp-epsilon", "--out", str(tmp_path / "b.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("| method |") == 1, out
