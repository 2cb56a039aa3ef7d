"""Zero-shot evaluation bridge to lm-evaluation-harness: a local multiple-choice task written by
the test (lm-eval YAML + a JSONL file), tiny random LLaMA models (plain, pruned, packed); the
bridge's scores are exactly those of lm-eval's own ``simple_evaluate`` with its ``HFLM``."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import save_tiny, single_thread, tiny_model, tiny_tokenizer, tiny_tokens  # noqa: E402, F401

import besa_rs  # noqa: E402
from besa_rs.cli import main as cli_main  # noqa: E402
from besa_rs.errors import ConfigError, DataError, MissingFileError  # noqa: E402
from besa_rs.models import check_model_files  # noqa: E402
from besa_rs.tasks import evaluate_tasks, parse_tasks  # noqa: E402

TASK = "besa_toy_mc"
WORDS = ["apple", "river", "stone", "cloud", "bread", "horse", "glass", "flame", "seed", "road"]


def write_task(root: Path, name: str = TASK, n: int = 40, data: Path | None = None) -> Path:
    """A 4-way multiple-choice task in lm-eval's YAML format over a local JSONL file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    data = data or root / f"{name}.jsonl"
    if not data.exists() and data.parent == root:
        with data.open("w") as f:
            for i in range(n):
                choices = rng.sample(WORDS, 4)
                f.write(
                    json.dumps(
                        {
                            "question": f"Which word comes after {WORDS[i % len(WORDS)]} #{i}?",
                            "choices": choices,
                            "label": rng.randrange(4),
                        }
                    )
                    + "\n"
                )
    (root / f"{name}.yaml").write_text(
        f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


def lm_eval_direct(model, tok, task_dir: Path) -> dict:
    """lm-eval itself, with its own defaults, on the same model object."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    res = simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=False,
    )
    return res["results"][TASK]


def _scores(r: dict) -> tuple:
    return r["acc"], r["acc_norm"], r["acc_stderr"], r["acc_norm_stderr"]


def test_bridge_gives_exactly_lm_eval_scores(task_dir):
    tok = tiny_tokenizer()
    seen = set()
    for seed in (0, 1, 2):
        model = tiny_model("llama", seed=seed)
        ours = evaluate_tasks(model, TASK, tokenizer=tok, include_path=task_dir, progress=False)
        r = ours["tasks"][TASK]
        direct = lm_eval_direct(model, tok, task_dir)
        assert r["acc"] == direct["acc,none"]
        assert r["acc_norm"] == direct["acc_norm,none"]
        assert r["acc_stderr"] == direct["acc_stderr,none"]
        assert r["acc_norm_stderr"] == direct["acc_norm_stderr,none"]
        assert r["samples"] == 40 and r["num_fewshot"] == 0
        assert 0.0 <= r["acc"] <= 1.0
        seen.add((r["acc"], r["acc_norm"]))
    assert len(seen) > 1  # the scores depend on the model: the bridge really evaluates it
    assert ours["settings"]["tasks"] == [TASK] and ours["lm_eval_version"]


def test_bridge_on_pruned_and_packed_checkpoints(tmp_path, task_dir):
    src = save_tiny(tmp_path / "dense")
    model = besa_rs.load_model(src)
    besa_rs.prune(model, tiny_tokens(), method="magnitude", sparsity=0.6, progress=False)
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    tiny_tokenizer().save_pretrained(pruned)
    packed = tmp_path / "packed"
    besa_rs.pack(pruned, packed, format="bitmask", min_sparsity=0.1)
    assert check_model_files(packed) and not check_model_files(pruned)

    in_memory = evaluate_tasks(
        model, TASK, tokenizer=tiny_tokenizer(), include_path=task_dir, progress=False
    )
    from_dir = evaluate_tasks(pruned, TASK, include_path=task_dir, progress=False)
    from_packed = evaluate_tasks(packed, TASK, include_path=task_dir, progress=False)
    assert from_packed["model"].endswith("(packed)")
    assert from_dir["model"].endswith("(huggingface)")
    for r in (from_dir, from_packed):
        assert _scores(r["tasks"][TASK]) == _scores(in_memory["tasks"][TASK])
    # perplexity (besa-rs eval without --tasks) reads a packed checkpoint too
    from _tiny import SAMPLE_TEXT

    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 4)
    ppl = {}
    for name, path in (("dir", pruned), ("packed", packed)):
        out = tmp_path / f"ppl-{name}.json"
        args = ["eval", str(path), "--text", str(text), "--seqlen", "64", "--json", str(out)]
        assert cli_main([*args, "-q"]) == 0
        ppl[name] = json.loads(out.read_text())["perplexity"]
    assert ppl["dir"] == ppl["packed"]
    direct = lm_eval_direct(besa_rs.from_packed(packed), tiny_tokenizer(), task_dir)
    assert from_packed["tasks"][TASK]["acc"] == direct["acc,none"]
    assert from_packed["tasks"][TASK]["acc_norm"] == direct["acc_norm,none"]


def test_cli_tasks_json(tmp_path, task_dir, capsys):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "res.json"
    rc = cli_main(
        ["eval", str(src), "--tasks", TASK, "--include-path", str(task_dir), "--json", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert TASK in printed and "acc_norm" in printed
    res = json.loads(out.read_text())
    api = evaluate_tasks(src, TASK, include_path=task_dir, progress=False)
    assert _scores(res["tasks"][TASK]) == _scores(api["tasks"][TASK])
    # --json - : only JSON on stdout
    rc = cli_main(
        ["eval", str(src), "--tasks", TASK, "--include-path", str(task_dir), "--json", "-", "-q"]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["tasks"][TASK]["acc"] == res["tasks"][TASK]["acc"]


def _cli_error(args, capsys) -> str:
    capsys.readouterr()
    rc = cli_main([*args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_errors(tmp_path, task_dir, capsys):
    src = save_tiny(tmp_path / "m")
    err = _cli_error(
        ["eval", str(src), "--tasks", "no_such_task", "--include-path", str(task_dir)], capsys
    )
    assert "unknown task 'no_such_task'" in err
    err = _cli_error(
        ["eval", str(src), "--tasks", TASK, "--include-path", str(tmp_path / "missing")], capsys
    )
    assert "does not exist" in err
    err = _cli_error(["eval", str(src), "--include-path", str(task_dir)], capsys)
    assert "--include-path needs --tasks" in err
    # a task whose data file is missing: one-line DataError
    broken = write_task(tmp_path / "broken", name="besa_broken", data=tmp_path / "nope.jsonl")
    err = _cli_error(
        ["eval", str(src), "--tasks", "besa_broken", "--include-path", str(broken)], capsys
    )
    assert "could not be loaded" in err
    with pytest.raises(ConfigError):
        parse_tasks(" , ")
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate_tasks(tiny_model(), TASK, include_path=task_dir)
    with pytest.raises(MissingFileError):
        evaluate_tasks(src, TASK, include_path=tmp_path / "missing")
    with pytest.raises(DataError):
        evaluate_tasks(src, "besa_broken", include_path=broken, progress=False)
    assert parse_tasks("paper")[:2] == ["piqa", "boolq"] and len(parse_tasks("paper")) == 6


def test_limit_and_public_api(task_dir):
    assert besa_rs.evaluate_tasks is evaluate_tasks
    r = evaluate_tasks(
        tiny_model(),
        TASK,
        tokenizer=tiny_tokenizer(),
        include_path=[task_dir],
        limit=8,
        progress=False,
    )
    assert r["tasks"][TASK]["samples"] == 8
    assert isinstance(torch.tensor(r["tasks"][TASK]["acc"]).item(), float)
