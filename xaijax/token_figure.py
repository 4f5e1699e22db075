"""The token figure: sentences with every token's background coloured by its relevance.

The research's figure ("Mitigating bias of language model", ICASSP 2023) shows, for each
model, the NLI pair ``[CLS] A nurse works in medical center of california . [SEP] He works in
california . [SEP]`` with each token on a diverging colour (blue negative, white zero, red
positive), a marker with the class the model predicts, and a legend of the classes
(``Not entailment``, ``Neutral``, ``Entailment``). :func:`token_figure` draws that figure from
rows of tokens and relevance, as a PNG (matplotlib, no pyplot state; long rows wrap onto
further lines) and as a standalone HTML page (inline styles only, every token HTML-escaped).

Conventions:

* Colour map :data:`TOKEN_CMAP` (matplotlib's ``bwr``: pure blue at ``-vmax``, pure white at
  0, pure red at ``+vmax``; white rather than RdBu's off-white so that a zero token has no
  tint). The scale is symmetric: ``vmax = max |relevance|`` of each row (``scale="row"``,
  default: each row uses the whole colour range, rows compare by pattern) or of all rows
  (``scale="shared"``: colours compare across rows, e.g. three models on one sentence).
  A row of zeros is all white. Text is black on light and white on dark backgrounds.
* WordPiece continuation pieces (``"##ing"``) are drawn without their ``##`` and attached to
  the previous piece (no gap; a line never breaks inside a word). Each piece keeps its own
  colour.
* Predicted classes get fixed marker colours: ``entailment`` green, ``neutral`` grey,
  ``not entailment`` / ``contradiction`` purple (none of them blue or red, the relevance
  colours); other class names take further colours in order of appearance.

Rows: :class:`TokenRow` (``tokens``, ``relevance``, ``label`` — e.g. the model — and
``predicted`` — the predicted class name), or a mapping / tuple with those fields in that order.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from xaijax.atomic import atomic_bytes, atomic_text

__all__ = ["TOKEN_CMAP", "SCALES", "TokenRow", "as_rows", "row_limits", "token_colors", "class_colors", "display_pieces", "token_figure"]

#: Diverging colour map of relevance (blue negative, white zero, red positive).
TOKEN_CMAP = "bwr"
#: ``scale`` options: one symmetric limit per row, or one for all rows.
SCALES = ("row", "shared")

_CLASS_COLORS = {
    "entailment": "#2ca02c",
    "neutral": "#8c8c8c",
    "not entailment": "#9467bd",
    "non entailment": "#9467bd",
    "contradiction": "#9467bd",
}
_MORE_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#c7a000")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenRow:
    """One sentence of the figure.

    Attributes:
      tokens: the wordpieces, e.g. ``("[CLS]", "a", "nurse", ..., "[SEP]")``.
      relevance: one finite value per token.
      label: the row's name (e.g. the model: ``"BERT"``), shown on the left; may be empty.
      predicted: the predicted class name (shown with its marker colour), or None.
    """

    tokens: tuple[str, ...]
    relevance: np.ndarray
    label: str = ""
    predicted: str | None = None

    def __post_init__(self) -> None:
        toks = self.tokens
        if isinstance(toks, str) or not isinstance(toks, Sequence) or not all(isinstance(t, str) for t in toks):
            raise TypeError(f"TokenRow.tokens must be a sequence of strings (wordpieces); got {toks!r:.80}")
        if not toks:
            raise ValueError("TokenRow.tokens is empty; a row needs at least one token")
        r = np.asarray(self.relevance, dtype=np.float64)
        if r.ndim != 1 or r.shape[0] != len(toks):
            raise ValueError(
                f"TokenRow {self.label!r}: relevance must have one value per token ({len(toks)} tokens); got shape {r.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(r))
        if bad.size:
            raise ValueError(
                f"TokenRow {self.label!r}: relevance is not finite at token {int(bad[0])} ({toks[int(bad[0])]!r}: {r[bad[0]]})"
            )
        if not isinstance(self.label, str) or not (self.predicted is None or isinstance(self.predicted, str)):
            raise TypeError("TokenRow.label must be a string and predicted a string or None")
        object.__setattr__(self, "tokens", tuple(toks))
        object.__setattr__(self, "relevance", r)


def as_rows(rows: Any) -> list[TokenRow]:
    """``rows`` as a list of :class:`TokenRow` (each a TokenRow, a mapping with the field
    names, or a tuple ``(tokens, relevance[, label[, predicted]])``)."""
    if isinstance(rows, (TokenRow, Mapping)) or not isinstance(rows, Sequence) or isinstance(rows, str):
        raise TypeError("rows must be a list of rows (TokenRow, mapping or (tokens, relevance, label, predicted) tuple)")
    if not rows:
        raise ValueError("rows is empty; pass at least one row")
    out = []
    for i, r in enumerate(rows):
        try:
            if isinstance(r, TokenRow):
                out.append(r)
            elif isinstance(r, Mapping):
                out.append(TokenRow(**r))
            elif isinstance(r, Sequence) and 2 <= len(r) <= 4:
                out.append(TokenRow(*r))
            else:
                raise TypeError(f"expected a TokenRow, a mapping or a (tokens, relevance, label, predicted) tuple; got {type(r).__name__}")
        except (TypeError, ValueError) as e:
            raise type(e)(f"row {i}: {e}") from None
    return out


def row_limits(rows: Sequence[TokenRow], scale: str = "row") -> list[float]:
    """The symmetric colour limit ``vmax`` of each row (``max |relevance|``, per row or shared; 1 where all are 0)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    per = [float(np.abs(r.relevance).max()) for r in rows]
    if scale == "shared":
        per = [max(per)] * len(per)
    return [v if v > 0 else 1.0 for v in per]


def token_colors(relevance: np.ndarray, vmax: float) -> np.ndarray:
    """(T, 3) RGB in [0, 1] of ``relevance`` on :data:`TOKEN_CMAP` over ``[-vmax, vmax]`` (clipped).

    ``bwr``'s definition evaluated exactly (not through matplotlib's 256-entry table, whose
    middle entry is not pure white): ``u = clip(r / vmax, -1, 1)``; ``(1, 1 - u, 1 - u)`` for
    ``u >= 0`` (white to red), ``(1 + u, 1 + u, 1)`` for ``u < 0`` (white to blue).
    """
    r = np.asarray(relevance, np.float64)
    u = np.clip(r / float(vmax), -1.0, 1.0)
    pos = np.clip(u, 0.0, 1.0)
    neg = np.clip(-u, 0.0, 1.0)
    return np.stack([1.0 - neg, 1.0 - pos - neg, 1.0 - pos], axis=-1)


def class_colors(names: Sequence[str | None]) -> dict[str, str]:
    """Marker colour (hex) of each class name (see the module docstring)."""
    out: dict[str, str] = {}
    extra = iter(_MORE_COLORS * (1 + len(names) // len(_MORE_COLORS)))
    for n in names:
        if n is None or n in out:
            continue
        out[n] = _CLASS_COLORS.get(" ".join(n.lower().replace("_", " ").replace("-", " ").split())) or next(extra)
    return out


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb[:3])


def _text_color(rgb: Sequence[float]) -> str:
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#ffffff" if lum < 0.45 else "#000000"


def display_pieces(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """``(text shown, attached to the previous piece)`` per token: ``"##ing"`` -> ``("ing", True)``."""
    out = []
    for i, t in enumerate(tokens):
        cont = i > 0 and t.startswith("##") and len(t) > 2
        out.append((t[2:] if cont else t, cont))
    return out


def _words(pieces: list[tuple[str, bool]]) -> list[list[int]]:
    """Token indices grouped into words (a piece and its attached continuations)."""
    words: list[list[int]] = []
    for i, (_, cont) in enumerate(pieces):
        if cont and words:
            words[-1].append(i)
        else:
            words.append([i])
    return words


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# ------------------------------------------------------------------------------ HTML


def _html(rows: list[TokenRow], limits: list[float], scale: str, title: str | None, classes: dict[str, str]) -> str:
    from matplotlib import colormaps

    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>' + esc(title or "token relevance") + "</title></head>",
        '<body style="font-family:Helvetica,Arial,sans-serif;font-size:15px;line-height:2.0;margin:16px;color:#000;background:#fff">',
    ]
    if title:
        out.append(f'<div style="font-weight:bold;font-size:16px;margin-bottom:6px">{esc(title)}</div>')
    if classes:
        items = "".join(
            f'<span style="margin-right:14px;white-space:nowrap"><span style="display:inline-block;width:11px;height:11px;'
            f'background:{c};border-radius:2px;margin-right:4px;vertical-align:-1px"></span>{esc(n)}</span>'
            for n, c in classes.items()
        )
        out.append(f'<div style="margin-bottom:8px">Predicted class: {items}</div>')
    for row, vmax in zip(rows, limits):
        colors = token_colors(row.relevance, vmax)
        pieces = display_pieces(row.tokens)
        parts = ['<div style="margin:4px 0 10px 0">']
        if row.label:
            parts.append(f'<span style="display:inline-block;min-width:110px;font-weight:bold;margin-right:6px">{esc(row.label)}</span>')
        for word in _words(pieces):
            spans = []
            for i in word:
                text, cont = pieces[i]
                bg = _hex(colors[i])
                spans.append(
                    f'<span title="{_fmt(row.relevance[i])}" style="background-color:{bg};color:{_text_color(colors[i])};'
                    f'padding:2px 2px 2px {"0" if cont else "3px"};'
                    f'border-radius:2px">{esc(text)}</span>'
                )
            parts.append(f'<span style="white-space:nowrap;margin-right:5px">{"".join(spans)}</span>')
        if row.predicted is not None:
            c = classes[row.predicted]
            parts.append(
                f'<span style="white-space:nowrap;margin-left:8px"><span style="display:inline-block;width:11px;height:11px;'
                f'background:{c};border-radius:2px;margin-right:4px;vertical-align:-1px"></span>'
                f'<i>{esc(row.predicted)}</i></span>'
            )
        parts.append("</div>")
        out.append("".join(parts))
    stops = ", ".join(_hex(colormaps[TOKEN_CMAP](u)[:3]) + f" {u * 100:.0f}%" for u in np.linspace(0, 1, 11))
    lo, hi = ("-max|R|", "+max|R|") if scale == "row" else (_fmt(-limits[0]), _fmt(limits[0]))
    note = " (each row on its own scale)" if scale == "row" else " (one scale for all rows)"
    out.append(
        '<div style="margin-top:10px;font-size:12px">relevance' + esc(note) + "<br>"
        f'<span style="display:inline-block;width:240px;height:12px;background:linear-gradient(to right, {stops});'
        'border:1px solid #999;vertical-align:middle"></span><br>'
        f'<span style="display:inline-block;width:80px">{esc(lo)}</span><span style="display:inline-block;width:80px;'
        f'text-align:center">0</span><span style="display:inline-block;width:80px;text-align:right">{esc(hi)}</span></div>'
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- PNG


def _png(rows: list[TokenRow], limits: list[float], scale: str, title: str | None, classes: dict[str, str],
         width: float, dpi: float, fontsize: float) -> bytes:
    import io

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Rectangle

    px = dpi / 72.0  # pixels per point
    W = int(round(width * dpi))
    font = FontProperties(size=fontsize)
    bold = FontProperties(size=fontsize, weight="bold")
    meas = RendererAgg(W, 100, dpi)

    def tw(s: str, prop=font) -> float:
        w, _, _ = meas.get_text_width_height_descent(s, prop, ismath=False)
        return float(w)

    _, th, _ = meas.get_text_width_height_descent("Ag[]", font, ismath=False)
    pad_x, pad_y = 2.0 * px, 2.5 * px
    gap = tw(" ") + 2 * pad_x
    line_h = th + 2 * pad_y + 3.0 * px
    margin = 8.0 * px
    label_w = max((tw(r.label, bold) for r in rows if r.label), default=0.0)
    label_w = label_w + 10.0 * px if label_w else 0.0
    x0 = margin + label_w
    x_max = W - margin
    # --- layout in pixels from the top: (x, y, w, text, colour, row) boxes
    items: list[tuple[str, Any]] = []
    y = margin
    if title:
        items.append(("title", (margin, y, title)))
        y += line_h
    if classes:
        x = margin
        items.append(("text", (x, y, "Predicted class:", font)))
        x += tw("Predicted class:") + gap
        for n, c in classes.items():
            items.append(("swatch", (x, y, c)))
            x += th + 4 * px
            items.append(("text", (x, y, n, font)))
            x += tw(n) + 2 * gap
        y += line_h * 1.3
    for row, vmax in zip(rows, limits):
        colors = token_colors(row.relevance, vmax)
        pieces = display_pieces(row.tokens)
        if row.label:
            items.append(("text", (margin, y, row.label, bold)))
        x = x0
        for word in _words(pieces):
            widths = [tw(pieces[i][0]) + (pad_x if not pieces[i][1] else 0.0) + pad_x for i in word]
            if x > x0 and x + sum(widths) > x_max:
                x, y = x0, y + line_h
            for i, w in zip(word, widths):
                items.append(("token", (x, y, w, pieces[i][0], colors[i], pieces[i][1])))
                x += w
            x += gap - 2 * pad_x
        if row.predicted is not None:
            need = th + 4 * px + tw(row.predicted) + gap
            if x + need > x_max:
                x, y = x0, y + line_h
            items.append(("swatch", (x + gap, y, classes[row.predicted])))
            items.append(("text", (x + gap + th + 4 * px, y, row.predicted, FontProperties(size=fontsize, style="italic"))))
        y += line_h * 1.45
    bar_y = y + 2 * px
    bar_h = th * 0.9
    H = int(math.ceil(bar_y + bar_h + th * 3.2 + margin))
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)

    def fx(xp: float) -> float:
        return xp / W

    def fy(yp: float) -> float:  # top-down pixels -> figure fraction (bottom-up)
        return 1.0 - yp / H

    base = pad_y + th * 0.78  # baseline offset from a line's top
    for kind, it in items:
        if kind == "title":
            xx, yy, s = it
            fig.text(fx(xx), fy(yy + base), s, fontproperties=FontProperties(size=fontsize * 1.1, weight="bold"), va="baseline")
        elif kind == "text":
            xx, yy, s, prop = it
            fig.text(fx(xx), fy(yy + base), s, fontproperties=prop, va="baseline")
        elif kind == "swatch":
            xx, yy, c = it
            fig.patches.append(Rectangle((fx(xx), fy(yy + pad_y + th)), th / W, th / H, transform=fig.transFigure,
                                         facecolor=c, edgecolor="none"))
        else:
            xx, yy, w, s, rgb, cont = it
            fig.patches.append(Rectangle((fx(xx), fy(yy + th + 2 * pad_y)), w / W, (th + 2 * pad_y) / H,
                                         transform=fig.transFigure, facecolor=tuple(rgb), edgecolor="none"))
            fig.text(fx(xx + (0.0 if cont else pad_x)), fy(yy + base), s, fontproperties=font, va="baseline",
                     color=_text_color(rgb))
    small = FontProperties(size=fontsize * 0.8)
    bar_x = max(x0, margin + tw("-max|R|", small) / 2 + 4 * px)
    bar_w = min(x_max - bar_x - tw("+max|R|", small) / 2, 300 * px)
    cax = fig.add_axes((fx(bar_x), fy(bar_y + bar_h), bar_w / W, bar_h / H))
    vmax = limits[0] if scale == "shared" else 1.0
    cb = ColorbarBase(cax, cmap=colormaps[TOKEN_CMAP], norm=Normalize(-vmax, vmax), orientation="horizontal")
    cb.set_ticks([-vmax, 0.0, vmax])
    if scale == "shared":
        cb.set_ticklabels([_fmt(-vmax), "0", _fmt(vmax)])
        cb.set_label("relevance (one scale for all rows)", fontsize=fontsize * 0.8)
    else:
        cb.set_ticklabels(["-max|R|", "0", "+max|R|"])
        cb.set_label("relevance (each row on its own scale)", fontsize=fontsize * 0.8)
    cb.ax.tick_params(labelsize=fontsize * 0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def token_figure(
    rows: Sequence[TokenRow | Mapping[str, Any] | tuple],
    path_png: str | os.PathLike | None = None,
    path_html: str | os.PathLike | None = None,
    *,
    scale: str = "row",
    title: str | None = None,
    width: float = 10.0,
    dpi: float = 150.0,
    fontsize: float = 10.0,
) -> dict[str, Path]:
    """Write the token figure of ``rows`` as PNG and/or HTML (atomically).

    Args:
      rows: :class:`TokenRow` values (or mappings / tuples, see :func:`as_rows`).
      path_png, path_html: where to write each (None: not written; at least one is needed).
      scale: ``"row"`` (each row's own ``max |relevance|``) or ``"shared"`` (one for all rows).
      title: an optional heading.
      width: PNG width in inches (rows wrap to fit); dpi: its resolution; fontsize: in points.

    Returns:
      ``{"png": path, "html": path}`` for the files written.

    Raises:
      ValueError / TypeError: no rows, a row whose relevance length differs from its tokens or
        holds NaN/inf (naming the row and token), an unknown ``scale``, no output path.
    """
    if path_png is None and path_html is None:
        raise ValueError("token_figure: pass path_png and/or path_html")
    rs = as_rows(rows)
    limits = row_limits(rs, scale)
    if not (float(width) > 1 and float(dpi) > 10 and float(fontsize) > 2):
        raise ValueError(f"token_figure: width (> 1 inch), dpi (> 10) and fontsize (> 2 pt) out of range: {width}, {dpi}, {fontsize}")
    classes = class_colors([r.predicted for r in rs])
    written: dict[str, Path] = {}
    if path_png is not None:
        p = Path(path_png)
        atomic_bytes(p, _png(rs, limits, scale, title, classes, float(width), float(dpi), float(fontsize)))
        written["png"] = p
    if path_html is not None:
        p = Path(path_html)
        atomic_text(p, _html(rs, limits, scale, title, classes))
        written["html"] = p
    return written
