"""`parca bench ACTION`: measured benchmarks.

    parca bench curve --model DIR [--indexer ADIR | --random-indexer] [--positions 1k,4k,16k] [--chunk 256] ...
    parca bench docs  --docs DIR --model DIR --indexer ADIR [--question TEXT] [--max-new-tokens N] ...

Registered by parca/cli.py (``SUBCOMMAND_MODULES``). Imports no torch at import time: the handlers do.
Output: a readable card, then ONE JSON line last; with ``--json`` stdout holds only the JSON line and the
card goes to stderr. Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ParcaError

DEFAULT_PRICE_PER_HOUR = 1.0  # same placeholder as parca.meter: set the real price with --price-per-hour


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    p.add_argument("--indexer", default=None, help="indexer adapter directory (from `parca indexer init` / "
                                                   "`parca retrofit`); not needed for a checkpoint with indexers")
    p.add_argument("--random-indexer", action="store_true",
                   help="attach a fresh random indexer (4 heads x 64; cost does not depend on its weights, "
                        "answer quality does)")
    p.add_argument("--index-topk", type=int, default=None, help="tokens each query selects (default: the indexer's)")
    p.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE_PER_HOUR,
                   help=f"USD per machine-hour (default {DEFAULT_PRICE_PER_HOUR:g}, a placeholder)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weight/compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                                                              "recorded in the JSON either way")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="stdout: only the JSON line (the card goes to stderr)")


def register(subparsers: Any) -> None:
    """Add `bench` and its actions to parca's subcommand parsers."""
    p = subparsers.add_parser("bench", help="measured benchmarks: cost curve by token position, your documents")
    sub = p.add_subparsers(dest="bench_command", metavar="ACTION", required=True)

    q = sub.add_parser("curve", help="measured $ per M tokens by token position, prefill and decode, dense vs sparse",
                       description="Measure the marginal prefill cost (a chunk on top of a cached prefix of length "
                                   "p) and the decode-step cost at p, dense and sparse in the same run; writes "
                                   "curve.png, report.md and results.json.")
    _common(q)
    q.add_argument("--positions", default="1k,2k,4k,8k,16k", help="token positions (default 1k,2k,4k,8k,16k)")
    q.add_argument("--chunk", type=int, default=256, help="prefill chunk measured on top of the prefix (default 256)")
    q.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1)")
    q.add_argument("--reps", type=int, default=3, help="timed repetitions per point, median kept (default 3)")
    q.add_argument("--warmup", type=int, default=1, help="untimed calls before each point (default 1)")
    q.add_argument("--no-analytic", action="store_true", help="leave out the analytic model's dashed curves")
    q.add_argument("--out", default="parca-bench/curve", help="output directory (default parca-bench/curve)")
    q.set_defaults(func=cmd_curve)

    q = sub.add_parser("docs", help="your documents, dense vs sparse: billed tokens, cost, latency, agreement",
                       description="Send every document of a folder (.txt, .md, .jsonl with a 'text' or 'context' "
                                   "field) dense and sparse; writes report.md, PNGs and results.json.")
    q.add_argument("--docs", required=True, help="folder of .txt / .md / .jsonl documents")
    _common(q)
    q.add_argument("--question", default=None, help="asked after every document (default: none, the model "
                                                    "continues the text)")
    q.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    q.add_argument("--max-new-tokens", type=int, default=32, help="answer budget per request (default 32)")
    q.add_argument("--fixed-length", action="store_true", help="ignore EOS: every answer is --max-new-tokens long")
    q.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward (default 2048)")
    q.add_argument("--out", default="parca-bench/docs", help="output directory (default parca-bench/docs)")
    q.set_defaults(func=cmd_docs)

    from .serve import register_serve

    register_serve(sub)


# ---- shared -------------------------------------------------------------------------------------
def _load(args: argparse.Namespace, context: int | None = None) -> tuple[Any, str | None]:
    """The model with its indexer (adapter, random, or its own); returns (model, note about the indexer)."""
    import torch

    from ..checkpoint import attach_adapter, load_model
    from ..config import SparseConfig

    if args.model is None:
        raise ParcaError("--model DIR is required")
    if args.threads is not None:
        if args.threads < 1:
            raise ParcaError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.indexer and args.random_indexer:
        raise ParcaError("give --indexer ADIR or --random-indexer, not both")
    model = load_model(args.model, device=args.device, dtype=args.dtype, context=context)
    note = None
    if args.indexer:
        attach_adapter(model, args.indexer, index_topk=args.index_topk)
    elif args.random_indexer:
        if model.sparse_config is not None:
            raise ParcaError(f"--random-indexer: {args.model} already carries indexers; drop the flag")
        model.add_indexers(SparseConfig(index_topk=args.index_topk or 2048),
                           device=model.model.embed_tokens.weight.device, seed=0)
        note = ("random indexer (--random-indexer): costs are real, the selection is arbitrary, so sparse "
                "answers say nothing about a trained indexer's quality")
    if args.index_topk is not None and args.index_topk < 1:
        raise ParcaError(f"--index-topk must be >= 1, got {args.index_topk}")
    return model, note


def _emit(args: argparse.Namespace, card: str, line: dict[str, Any]) -> None:
    print(card, file=sys.stderr if args.json else sys.stdout)
    print(json.dumps(line))


# ---- curve ----------------------------------------------------------------------------------------
def cmd_curve(args: argparse.Namespace) -> int:
    from ..cost import parse_positions
    from .curve import curve_card, measure_curve, write_curve_report

    positions = parse_positions(args.positions)
    model, note = _load(args, context=max(positions) + args.chunk if positions else None)
    doc = measure_curve(model, positions, chunk=args.chunk, reps=args.reps, warmup=args.warmup, batch=args.batch,
                        index_topk=args.index_topk, price_per_hour=args.price_per_hour,
                        analytic=not args.no_analytic, progress=not args.no_progress)
    if note:
        doc["indexer_note"] = note
    paths = write_curve_report(doc, args.out)
    _emit(args, curve_card(doc, paths), doc)
    return 0


# ---- docs -------------------------------------------------------------------------------------------
def cmd_docs(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer
    from .docs import docs_card, run_docs, write_docs_report

    model, note = _load(args)
    doc = run_docs(model, Tokenizer(args.model), args.docs, question=args.question,
                   max_new_tokens=args.max_new_tokens, index_topk=args.index_topk,
                   price_per_hour=args.price_per_hour, prefill_chunk=args.prefill_chunk, chat=args.chat,
                   fixed_length=args.fixed_length, progress=not args.no_progress, indexer_note=note)
    paths = write_docs_report(doc, args.out)
    # the JSON line: the summary and where everything is (every request's meter is in results.json)
    line = {"kind": doc["kind"], "summary": doc["summary"], "skipped": doc["skipped"], "artefacts": paths,
            "model": doc["model"], "price_per_hour": doc["price_per_hour"], "machine": doc["machine"]}
    _emit(args, docs_card(doc, paths), line)
    return 0
