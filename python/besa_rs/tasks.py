"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness (``lm-eval``): the paper's
second table (PIQA, BoolQ, HellaSwag, WinoGrande, ARC-e, ARC-c).

The model is a transformers model object, a Hugging Face directory (plain or pruned), or a
packed checkpoint (decoded through :func:`besa_rs.from_packed`). Tasks are lm-eval task names:
its built-in ones (their datasets come from the dataset hub, so they need hub access) or tasks
in lm-eval's own YAML format found under ``include_path`` (a task can read a local JSON / JSONL /
CSV file with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``, no hub needed).
The scores are exactly lm-eval's: the model is wrapped in lm-eval's ``HFLM`` and evaluated by
its ``simple_evaluate``; this module only resolves the model, checks the inputs and flattens
the result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, MissingFileError, ModelError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: the zero-shot tasks of the BESA paper (lm-eval names)
PAPER_TASKS: tuple[str, ...] = (
    "piqa",
    "boolq",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"piqa,boolq"`` or ``["piqa", "boolq"]`` -> ``["piqa", "boolq"]`` (``paper`` expands
    to :data:`PAPER_TASKS`)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for t in items:
        t = str(t).strip()
        if not t:
            continue
        out.extend(PAPER_TASKS if t == "paper" else [t])
    if not out:
        raise ConfigError("no task given: pass task names such as piqa,boolq")
    return list(dict.fromkeys(out))


def _include_paths(include_path: Any) -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = []
    for p in items:
        path = Path(p)
        if not path.exists():
            raise MissingFileError(f"task include path {path} does not exist")
        paths.append(path)
    return paths


def _load_model(model: Any, tokenizer: Any, dtype: str, device: str | None) -> tuple[Any, Any, str]:
    """Resolves a path (plain, pruned or packed) or a model object; returns (model, tokenizer,
    description)."""
    from .models import check_model_files, load_resolved_model, load_tokenizer, resolve_model

    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        path = resolve_model(name)
        # load_model validates every file with besa-rs's reader and decodes packed checkpoints
        packed = check_model_files(path)
        source = "packed" if packed else "huggingface"
        m = load_resolved_model(path, packed, dtype=dtype, device=device or "cpu")
        try:
            tok = tokenizer if tokenizer is not None else load_tokenizer(path)
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise ModelError(f"{path}: cannot load its tokenizer: {first}") from e
        return m, tok, f"{name} ({source})"
    if not hasattr(model, "config") or not callable(model):
        raise ConfigError(
            "evaluate_tasks() takes a model directory, a packed checkpoint or a transformers model"
        )
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to evaluate a model object on tasks")
    if device is not None:
        model = model.to(device)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return model, tokenizer, str(name)


def _flatten(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": "N/A"}`` -> ``{"acc": x, "acc_stderr":
    None}`` (a filter other than ``none`` stays in the key: ``exact_match,strict-match``)."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if key in ("alias", "name"):
            continue
        if key == "sample_len":
            out["samples"] = value
            continue
        metric, _, filt = key.partition(",")
        k = metric if filt in ("", "none") else f"{metric},{filt}"
        out[k] = None if value == "N/A" else value
    return out


def evaluate_tasks(
    model: str | os.PathLike[str] | PreTrainedModel,
    tasks: str | Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    bootstrap_iters: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` on lm-eval ``tasks`` (names, or a comma-separated string;
    ``"paper"`` = :data:`PAPER_TASKS`), with lm-eval's own ``HFLM`` wrapper and
    ``simple_evaluate`` (seeded with ``seed``; ``limit`` examples per task for a quick look).

    ``model``: a transformers model (``tokenizer`` required), a Hugging Face directory or
    built-in name, or a packed checkpoint. ``include_path``: directories (or YAML files) of
    extra task configs in lm-eval's format. Returns ``{"model", "tasks": {task: {"acc",
    "acc_stderr", "acc_norm", ..., "samples", "num_fewshot", "version"}}, "groups", "settings",
    "lm_eval_version"}``.
    """
    names = parse_tasks(tasks)
    paths = _include_paths(include_path)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not (limit > 0):
        raise ConfigError(f"limit must be > 0, got {limit}")

    if not progress:
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    from importlib.metadata import version

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval's own index of thousands of task files takes seconds to build: only when a task
    # is not among the local ones
    inc = [str(p) for p in paths] or None
    manager = TaskManager(include_path=inc, include_defaults=False) if inc else None
    if manager is None or not all(n in manager.all_tasks for n in names):
        manager = TaskManager(include_path=inc)
    known = set(manager.all_tasks)
    for n in names:
        if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file()):
            where = f" or under {', '.join(map(str, paths))}" if paths else ""
            raise ConfigError(
                f"unknown task {n!r}: not an lm-eval task{where} (local tasks: --include-path DIR)"
            )

    m, tok, desc = _load_model(model, tokenizer, dtype, device)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    lm = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, FileNotFoundError) as e:  # datasets: hub unreachable, missing file
        first = first_line(e)
        raise DataError(
            f"a task's dataset could not be loaded ({first}); without hub access use local "
            f"task files (--include-path, docs: README 'Zero-shot')"
        ) from e
    if res is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise DataError("lm-eval returned no results")
    results = res["results"]
    out_tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    group_names = set(res.get("groups", {})) | set(res.get("group_subtasks", {}))
    for name, r in results.items():
        entry = _flatten(r)
        entry["num_fewshot"] = res.get("n-shot", {}).get(name)
        entry["version"] = res.get("versions", {}).get(name)
        n = res.get("n-samples", {}).get(name)
        if isinstance(n, dict):
            entry["samples"] = n.get("effective", entry.get("samples"))
        (groups if name in group_names and res["group_subtasks"].get(name) else out_tasks)[name] = (
            entry
        )
    return {
        "model": desc,
        "tasks": out_tasks,
        "groups": groups,
        "settings": {
            "tasks": names,
            "include_path": [str(p) for p in paths],
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "bootstrap_iters": bootstrap_iters,
        },
        "lm_eval_version": version("lm-eval"),
    }


def format_results(result: dict[str, Any]) -> str:
    """A table of every task's metrics (``acc``, ``acc_norm``... with their standard errors)."""
    from ._table import format_table

    rows = []
    for kind in ("tasks", "groups"):
        for task, r in result[kind].items():
            for k, v in r.items():
                if k.endswith("_stderr") or "_stderr," in k or not isinstance(v, (int, float)):
                    continue
                if k in ("samples", "num_fewshot", "version"):
                    continue
                err = r.get(k.replace(",", "_stderr,", 1) if "," in k else f"{k}_stderr")
                rows.append([task, k, f"{v:.4f}", f"{err:.4f}" if isinstance(err, float) else "-"])
    return format_table(["task", "metric", "value", "stderr"], rows)
