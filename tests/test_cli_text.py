"""The text commands through ``xaijax`` itself (the parser wiring): ``explain-text`` on a bundled
study model and ``debias-study``'s arguments."""

from __future__ import annotations

import json

import numpy as np

from xaijax import cli


def test_explain_text_command_on_a_bundled_model(tmp_path, capsys):
    out = tmp_path / "et"
    code = cli.main(
        [
            "explain-text", "--bundled", "debias_ours", "--method", "gradient-x-input",
            "--premise", "A nurse works in medical center of california .",
            "--hypothesis", "He works in california .", "--hypothesis", "She works in california .",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rel = np.load(out / "gradient-x-input.npy")
    meta = json.loads((out / "gradient-x-input.json").read_text())
    assert rel.shape[0] == 2 and np.isfinite(rel).all()
    # one relevance per real token, padding (if any) exactly 0
    assert [p["hypothesis"] for p in meta["pairs"]] == ["He works in california .", "She works in california ."]
    for i, pair in enumerate(meta["pairs"]):
        tokens = pair["tokens"]
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
        np.testing.assert_allclose(pair["relevance"], rel[i, : len(tokens)], rtol=1e-6, atol=1e-7)
        assert np.all(rel[i, len(tokens) :] == 0)
        assert pair["predicted"] in meta["class_names"]
    assert (out / "gradient-x-input.png").stat().st_size > 0 and (out / "gradient-x-input.html").is_file()


def test_explain_text_command_bad_input_is_one_line(tmp_path, capsys):
    code = cli.main(["explain-text", "--weights", str(tmp_path / "none.safetensors"), "--vocab", str(tmp_path / "v.txt"),
                     "--premise", "a b ."])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("xaijax: error:") and err.count("\n") == 1


def test_debias_study_arguments():
    args = cli.build_parser().parse_args(["debias-study"])
    assert args.out == "results/debias" and not args.retrain and args.method == "attnlrp"
    args = cli.build_parser().parse_args(["debias-study", "out/x", "--retrain", "--quick"])
    assert args.out == "out/x" and args.retrain and args.quick
