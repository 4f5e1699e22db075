"""Result tables written atomically: ``results.json`` (everything), ``results.csv`` and ``results.md``.

Each file is written to a temporary file in the same folder and renamed into place, so an
interrupted run leaves either the previous complete file or none, never half a table.

``results.json`` and ``results.csv`` keep every value whole (error messages included); the
Markdown table shortens long text cells (:func:`shorten`: cut at a word boundary, the last
sentence — usually the advice — kept), shows undefined (NaN) numbers as ``n/a``, and is
followed by a legend saying what each of its columns measures (:data:`COLUMN_LEGEND`,
:func:`legend`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from xaijax.atomic import atomic_text
from xaijax.metrics.iou import MIOU_LEGEND

__all__ = ["write_tables", "markdown_table", "shorten", "legend", "metric_descriptions", "COLUMN_LEGEND", "MARKDOWN_TEXT_LIMIT"]

#: Longest text cell of a Markdown table (characters); longer ones are :func:`shorten`-ed.
MARKDOWN_TEXT_LIMIT = 300

#: What each column of the demo and ``xaijax eval`` tables measures (the legend under a table).
COLUMN_LEGEND: dict[str, str] = {
    "model": "the classifier whose decisions the maps explain",
    "method": "the attribution method (`xaijax methods`)",
    "hparams": "hyperparameters set for this table (the method's defaults otherwise)",
    "run": "start time of the run(s) that computed the row's images (several: the images came from several runs, "
    "e.g. a resumed or extended one)",
    "images": "images evaluated",
    "skipped_images": "images that could not be read (listed in the results store; retried by the next run)",
    "pairs": "(image, class) pairs scored",
    "compile_s": "seconds to trace and compile the jitted method for one batch (its first call; short when the "
    "persistent compilation cache already holds the program)",
    "ms_per_map": "steady-state milliseconds per map, compilation excluded (a batch's run time / batch size, "
    "padding of the last batch included)",
    "method_s": "wall-clock seconds for all the method's maps, compilation included",
    "model_metrics_s": "seconds spent on the model-based and method metrics (by default deletion, insertion and region insertion)",
    "error": "why the row has no numbers (the full message is in results.json)",
    "pointing_all": "pointing game (TorchRay protocol): hit when the map's maximum lies within 15 px of the class "
    "region; accuracy per class, mean over classes; all pairs (higher is better)",
    "pointing_dif": "the pointing game on the difficult pairs (DIF: the class's boxes cover < 1/4 of the image "
    "and another class is present)",
    **MIOU_LEGEND,  # miou_positive (signed maps only) and miou_mean, as xaijax.metrics.iou defines them
    "energy_pointing_all": "energy pointing game: share of the map's positive part that lies in the class region; "
    "mean per class, mean over classes; all pairs (higher is better)",
    "energy_pointing_dif": "the energy pointing game on the difficult pairs (DIF)",
    "fgbg_miou": "foreground/background mIoU (ImageNet-segmentation protocol): the map thresholded at its mean, "
    "mean of the foreground and background IoU, averaged over images",
    "fgbg_miou_pixels": "the same from intersections and unions summed over the whole dataset",
    "density_pos": "positive map density: mean of the part above the map's mean inside the region / its mean over "
    "the image (1: spread evenly; higher is better; xaijax's definition, `xaijax.metrics.density`)",
    "density_neg": "negative map density: the same for the part below the map's mean (lower is better)",
    "deletion_auc": "deletion: area under the target's softmax probability as the most relevant pixels are "
    "replaced by the dataset mean, 8 rows of pixels per step (UCAG protocol; lower is better)",
    "insertion_auc": "insertion: area under the target's softmax probability as the most relevant pixels are "
    "revealed over a blurred copy (UCAG protocol; higher is better)",
    "region_insertion_auc": "MoRF region insertion: top-1 accuracy with only the 1 %, 2 %, ..., 20 % most relevant "
    "pixels kept (the rest the dataset mean), area in accuracy x percentage points (at most 19)",
    "region_insertion_auc_norm": "region insertion's area divided by 19, in [0, 1]",
    "spearman_top_layer": "cascading randomisation: Spearman rank correlation of the map with the trained model's "
    "after randomising the top layer (near 0: the map depends on the weights)",
    "spearman_all_layers": "the same after randomising every layer",
    "spearman_abs_top_layer": "as spearman_top_layer on the maps' absolute values",
    "spearman_abs_all_layers": "as spearman_all_layers on the maps' absolute values",
    "ssim_top_layer": "SSIM of the min-max normalised map with the trained model's after randomising the top layer",
    "ssim_all_layers": "the same after randomising every layer",
}


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _cut_words(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters at a word boundary (no half words)."""
    if len(text) <= n:
        return text
    cut = text[: n + 1]
    space = cut.rfind(" ")
    cut = cut[:space] if space > 0 else text[:n]
    return cut.rstrip(" ,;:(-")


def shorten(text: Any, limit: int = MARKDOWN_TEXT_LIMIT) -> str:
    """``text`` on one line, at most ``limit`` characters, never cut inside a word, keeping its
    last sentence (the advice of an error message: "... delete the file to start fresh").

    Whitespace runs become single spaces. Longer text keeps its beginning up to a word boundary,
    then `` ... `` and its last sentence (or, for a single sentence, its last ``;`` clause);
    when that ending alone is too long, the text is cut at a word boundary and ends with ``...``.
    """
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    parts = re.split(r"(?<=[.!?])\s+", text)
    if len(parts) < 2:
        parts = re.split(r"(?<=;)\s+", text)
    if len(parts) >= 2:
        last = parts[-1]
        head_budget = limit - len(last) - 5
        if head_budget >= min(60, limit // 4):
            head = _cut_words(text[: len(text) - len(last)].rstrip(), head_budget)
            return f"{head} ... {last}"
    return _cut_words(text, limit - 4) + " ..."


def _fmt(v: Any, limit: int = MARKDOWN_TEXT_LIMIT) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN: the value is not defined (e.g. miou_positive of a method without signed maps)
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.3g}"
    if v is None:
        return ""
    return shorten(v, limit).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], limit: int = MARKDOWN_TEXT_LIMIT) -> list[str]:
    """Markdown lines of a table with the union of the rows' keys as columns (text cells on one
    line, ``|`` escaped, longer than ``limit`` characters :func:`shorten`-ed)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(_fmt(r.get(c), limit) for c in cols) + " |" for r in rows]


def metric_descriptions(sources: Mapping[str, str]) -> dict[str, str]:
    """Legend entries for the summary columns of the metric catalogue: ``sources`` maps a column
    to the registered metric whose ``summarize`` wrote it; a column :data:`COLUMN_LEGEND` does not
    describe gets that metric's one-line description (``xaijax.metrics.describe``); ``<metric>_error``
    columns say why the metric has no value."""
    from xaijax.metrics.registry import describe

    out: dict[str, str] = {}
    for column, metric in sources.items():
        if column in COLUMN_LEGEND:
            continue
        if column == f"{metric}_error":
            out[column] = f"why `{metric}` has no value for this row (the metric is not defined for this model)"
        else:
            out[column] = f"`{metric}`: {describe(metric)} (`xaijax metrics`; mean over the pairs unless the metric says otherwise)"
    return out


def legend(columns: Sequence[str], descriptions: Mapping[str, str] | None = None) -> list[str]:
    """Markdown lines saying what each of ``columns`` measures (``descriptions`` first, then
    :data:`COLUMN_LEGEND`); a column without a description is listed as such."""
    known = {**COLUMN_LEGEND, **(descriptions or {})}
    lines = ["", "Columns:", ""]
    for c in columns:
        lines.append(f"- `{c}`: {known.get(c, 'no description')}")
    return lines


def write_tables(
    out: Path,
    rows: Sequence[dict[str, Any]],
    header: Sequence[str],
    result: dict[str, Any],
    footer: Sequence[str] = (),
    *,
    extra_columns: Mapping[str, Sequence[Any]] | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> None:
    """Write ``out/results.json`` (``result``), ``results.csv`` (``rows``) and ``results.md``
    (``header`` lines, the table, its :func:`legend`, ``footer`` lines), each atomically.

    ``extra_columns``: columns shown in the CSV and Markdown tables after the rows' own (one
    value per row), e.g. the run that made each row, kept out of ``result``'s rows.
    ``descriptions``: legend entries for columns :data:`COLUMN_LEGEND` does not describe.
    """
    table = [dict(r) for r in rows]
    for name, values in (extra_columns or {}).items():
        if len(values) != len(table):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(table)} rows")
        for r, v in zip(table, values):
            r[name] = v
    atomic_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(table))
    w.writeheader()
    w.writerows(table)
    atomic_text(out / "results.csv", buf.getvalue())
    atomic_text(
        out / "results.md",
        "\n".join([*header, "", *markdown_table(table), *legend(_columns(table), descriptions), *footer]) + "\n",
    )
