"""``besa-rs eval MODEL``"""

from __future__ import annotations

import argparse

from . import add_common, emit_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a causal LM on a text",
        description="Perplexity in the standard protocol (non-overlapping windows of --seqlen tokens).",
    )
    p.add_argument("model", help="Hugging Face model directory, or a built-in name (smollm2-135m)")
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
    from ..data import check_model_calibration_overlap, load_text
    from ..evaluate import evaluate_perplexity
    from ..models import load_model, load_tokenizer

    source = args.text if args.text else args.dataset
    check_model_calibration_overlap(args.model, source, args.allow_calib_overlap, args.data_dir)
    text = load_text(source, data_dir=args.data_dir)
    tok = load_tokenizer(args.model)
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
    if args.json != "-":
        print(
            f"perplexity {res['perplexity']:.4f} on {res['text']} "
            f"({res['windows']} windows x {res['seqlen']} tokens = {res['tokens']} tokens)"
        )
    emit_json(args.json, res)
    return 0
