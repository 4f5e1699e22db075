"""The token figure (xaijax.token_figure): colours, escaping, word pieces, PNG layout, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from xaijax.token_figure import TokenRow, class_colors, display_pieces, row_limits, token_colors, token_figure

SPAN = re.compile(r'<span title="([^"]*)" style="background-color:(#[0-9a-f]{6});color:(#[0-9a-f]{6});padding:2px 2px 2px (0|3px);[^"]*">([^<]*)</span>')


def _spans(text: str) -> list[tuple[str, str, str, str, str]]:
    return SPAN.findall(text)


def test_colors_are_exact_bwr_on_a_symmetric_scale():
    c = token_colors(np.array([2.0, -2.0, 0.0, 1.0, -1.0, 5.0]), 2.0)
    np.testing.assert_array_equal(c[0], [1, 0, 0])  # +vmax: the red end
    np.testing.assert_array_equal(c[1], [0, 0, 1])  # -vmax: the blue end
    np.testing.assert_array_equal(c[2], [1, 1, 1])  # 0: white
    np.testing.assert_array_equal(c[3], [1, 0.5, 0.5])
    np.testing.assert_array_equal(c[4], [0.5, 0.5, 1])
    np.testing.assert_array_equal(c[5], [1, 0, 0])  # clipped
    rows = [TokenRow(("a", "b"), [1.0, -0.5]), TokenRow(("c",), [0.25]), TokenRow(("d",), [0.0])]
    assert row_limits(rows, "row") == [1.0, 0.25, 1.0]  # an all-zero row: white, no division by zero
    assert row_limits(rows, "shared") == [1.0, 1.0, 1.0]


def test_html_escapes_each_token_once_with_its_colour(tmp_path):
    toks = ("[CLS]", "a", "<b>", "&", "play", "##ing", "\"x\"", "[SEP]")
    rel = np.array([0.0, 0.5, 2.0, -2.0, 1.0, -1.0, 0.25, 0.0])
    out = token_figure([TokenRow(toks, rel, "BERT <1>", "Entailment")], path_html=tmp_path / "t.html")
    assert set(out) == {"html"}
    text = (tmp_path / "t.html").read_text()
    spans = _spans(text)
    shown = [s[4] for s in spans]
    assert shown == ["[CLS]", "a", "&lt;b&gt;", "&amp;", "play", "ing", "&quot;x&quot;", "[SEP]"]
    assert "<b>" not in text and "BERT &lt;1&gt;" in text and "##ing" not in text
    colours = {s[4]: s[1] for s in spans}
    assert colours["&lt;b&gt;"] == "#ff0000" and colours["&amp;"] == "#0000ff" and colours["[CLS]"] == "#ffffff"
    assert colours["play"] == "#ff8080" and colours["ing"] == "#8080ff"
    assert [s[0] for s in spans][2] == "2"  # the value in the tooltip
    assert {s[4]: s[2] for s in spans}["&amp;"] == "#ffffff"  # white text on the dark blue end
    assert {s[4]: s[3] for s in spans}["ing"] == "0"  # a continuation piece: no left padding ...
    assert re.search(r'white-space:nowrap;margin-right:5px"><span[^>]*>play</span><span[^>]*>ing</span></span>', text)  # ... in its word
    assert "Entailment" in text and class_colors(["Entailment"])["Entailment"] in text


def test_shared_scale_across_rows(tmp_path):
    rows = [TokenRow(("x", "y"), [1.0, -1.0], "m1"), TokenRow(("z",), [0.5], "m2")]
    token_figure(rows, path_html=tmp_path / "row.html")
    token_figure(rows, path_html=tmp_path / "shared.html", scale="shared")
    assert dict((s[4], s[1]) for s in _spans((tmp_path / "row.html").read_text()))["z"] == "#ff0000"
    assert dict((s[4], s[1]) for s in _spans((tmp_path / "shared.html").read_text()))["z"] == "#ff8080"


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_png_size_token_pixels_and_wrapping(tmp_path):
    toks = ("[CLS]", "nurse", "works", "[SEP]")
    token_figure([TokenRow(toks, [0.0, 1.0, -1.0, 0.0], "BERT", "Neutral")], tmp_path / "a.png", width=6, dpi=100)
    token_figure([TokenRow(toks, [0.0, 0.0, 0.0, 0.0], "BERT", "Neutral")], tmp_path / "zero.png", width=6, dpi=100)
    token_figure([TokenRow(toks * 12, np.zeros(48), "BERT", "Neutral")], tmp_path / "long.png", width=6, dpi=100)
    a, z, long = _png(tmp_path / "a.png"), _png(tmp_path / "zero.png"), _png(tmp_path / "long.png")
    assert a.shape[1] == z.shape[1] == long.shape[1] == 600 and a.shape == z.shape
    assert long.shape[0] > a.shape[0] + 30  # the long row wrapped onto more lines

    def count(img, rgb):
        return int((img == np.array(rgb)).all(-1).sum())

    # the red token box and the blue one: pure red / blue pixels beyond the colour bar's own
    assert count(a, (255, 0, 0)) - count(z, (255, 0, 0)) > 100
    assert count(a, (0, 0, 255)) - count(z, (0, 0, 255)) > 100
    # rows of pure red pixels lie above the colour bar (in the token line)
    red_rows = np.flatnonzero((a == (255, 0, 0)).all(-1).any(1))
    bar_rows = np.flatnonzero((z == (255, 0, 0)).all(-1).any(1))
    assert red_rows.min() < bar_rows.min()
    assert (a != 255).any(-1).mean() < 0.5  # mostly white background


def test_display_pieces():
    assert display_pieces(["[CLS]", "play", "##ing", "##", "##s"]) == [("[CLS]", False), ("play", False), ("ing", True), ("##", False), ("s", True)]
    assert display_pieces(["##ing"]) == [("##ing", False)]  # nothing to attach to


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one value per token"):
        token_figure([(("a", "b"), [1.0])], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"row 1: .*not finite at token 1 \('b'"):
        token_figure([(("a",), [1.0]), (("a", "b"), [1.0, np.nan], "m")], tmp_path / "x.png")
    with pytest.raises(ValueError, match="rows is empty"):
        token_figure([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale must be one of"):
        token_figure([(("a",), [1.0])], tmp_path / "x.png", scale="global")
    with pytest.raises(ValueError, match="path_png and/or path_html"):
        token_figure([(("a",), [1.0])])
    with pytest.raises(TypeError, match="sequence of strings"):
        token_figure([("a b", [1.0, 2.0])], tmp_path / "x.png")
    with pytest.raises(ValueError, match="tokens is empty"):
        token_figure([((), [])], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
