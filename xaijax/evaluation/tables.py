"""Result tables written atomically: ``results.json`` (everything), ``results.csv`` and ``results.md``.

Each file is written to a temporary file in the same folder and renamed into place, so an
interrupted run leaves either the previous complete file or none, never half a table.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from xaijax.atomic import atomic_text

__all__ = ["write_tables", "markdown_table"]


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.3g}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of a table with the union of the rows' keys as columns."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]


def write_tables(
    out: Path, rows: Sequence[dict[str, Any]], header: Sequence[str], result: dict[str, Any], footer: Sequence[str] = ()
) -> None:
    """Write ``out/results.json`` (``result``), ``results.csv`` (``rows``) and ``results.md``
    (``header`` lines, the table, ``footer`` lines), each atomically."""
    atomic_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows))
    w.writeheader()
    w.writerows(rows)
    atomic_text(out / "results.csv", buf.getvalue())
    atomic_text(out / "results.md", "\n".join([*header, "", *markdown_table(rows), *footer]) + "\n")
