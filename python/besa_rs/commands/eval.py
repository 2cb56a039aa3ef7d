"""``besa-rs eval MODEL``"""

from __future__ import annotations

import argparse

from . import add_common, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a causal LM on a text, or zero-shot accuracy on lm-eval tasks",
        description="Perplexity in the standard protocol (non-overlapping windows of --seqlen "
        "tokens); with --tasks, accuracy on lm-evaluation-harness tasks instead (built-in tasks "
        "need dataset hub access; local tasks in lm-eval's YAML format via --include-path).",
    )
    p.add_argument(
        "model",
        help="Hugging Face model directory (plain, pruned or packed), or a built-in name (smollm2-135m)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="PATH", help="a UTF-8 text file")
    src.add_argument(
        "--dataset",
        default="sotu-test",
        choices=["sotu-test", "sotu-val", "wikitext2", "ptb", "c4"],
        help="named test text (default: sotu-test)",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="where wikitext2/ptb/c4 files are (else $BESA_RS_DATA)"
    )
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument(
        "--max-windows", type=int, default=None, metavar="N", help="score only the first N windows"
    )
    p.add_argument("--batch-size", type=int, default=1)
    z = p.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
    z.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="lm-eval task names, comma-separated ('paper' = piqa,boolq,hellaswag,winogrande,"
        "arc_easy,arc_challenge); switches from perplexity to task accuracy",
    )
    z.add_argument(
        "--include-path",
        action="append",
        metavar="DIR",
        help="directory (or YAML file) of extra lm-eval task configs; repeatable",
    )
    z.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples")
    z.add_argument(
        "--limit", type=float, default=None, metavar="N", help="only the first N examples per task"
    )
    z.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument(
        "--allow-calib-overlap",
        action="store_true",
        help="score a pruned model even on text that overlaps its calibration text",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_file

    check_output_file(args.json, "--json")
    if args.tasks is not None or args.include_path:
        return run_tasks(args)
    from ..data import check_model_calibration_overlap, load_text
    from ..evaluate import evaluate_perplexity
    from ..models import load_model, load_tokenizer

    source = args.text if args.text else args.dataset
    check_model_calibration_overlap(args.model, source, args.allow_calib_overlap, args.data_dir)
    text = load_text(source, data_dir=args.data_dir)
    tok = load_tokenizer(args.model)
    # a packed checkpoint is validated and decoded by besa-rs (models.load_model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    res = evaluate_perplexity(
        model,
        tok,
        text,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    res = {"model": str(args.model), "text": args.text or args.dataset, **res}
    return emit(
        args,
        res,
        lambda: (
            f"perplexity {res['perplexity']:.4f} on {res['text']} "
            f"({res['windows']} windows x {res['seqlen']} tokens = {res['tokens']} tokens)"
        ),
    )


def run_tasks(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tasks import evaluate_tasks, format_results

    if args.tasks is None:
        raise ConfigError("--include-path needs --tasks (the task names to run)")
    if args.text:
        raise ConfigError("--text is for perplexity; with --tasks the data come from the tasks")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = evaluate_tasks(
        args.model,
        args.tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        progress=not args.quiet,
    )
    return emit(args, res, lambda: format_results(res))
