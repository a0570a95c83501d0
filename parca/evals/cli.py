"""`parca eval`: the task runner (default action), `parca eval fidelity`, `parca eval ppl`.

Registered by ``parca.cli`` through ``register(subparsers)``. Imports no torch at import time: the handlers
import the library when they run.

    parca eval --model DIR [--indexer ADIR] [--tasks LIST|all] [--lengths 4k,8k] [--samples N] [--seed S]
               [--attention dense,sparse] [--index-topk K] [--depths 0,25,50,75,100] [--data FILE.jsonl] [--out DIR]
    parca eval run ...                       (the same runner, spelled out)
    parca eval fidelity --model DIR --indexer ADIR --text FILE|DIR [--lengths ...] [--index-topk K]
               [--decode-window N] [--dump-selection LAYER --out DIR] [--json]
    parca eval ppl --model DIR [--indexer ADIR] --text FILE|DIR --mode truncate|strided [--lengths ...]
               [--window W --stride S] [--attention dense,sparse] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from parca.errors import ParcaError


def _common(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    p.add_argument("--indexer", default=None, help="indexer adapter directory (needed for sparse attention)")
    p.add_argument("--index-topk", type=int, default=None, help="keys each sparse query selects (default: the adapter's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the checkpoint's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _run_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    _common(p, required=required)
    p.add_argument("--tasks", default=None,
                   help="comma list of task names, or 'all' (default: all, or none when --data is given)")
    p.add_argument("--lengths", default=None,
                   help="token budgets, prompt + answer, e.g. 4k,8k,16k (default: those within the model's context)")
    p.add_argument("--samples", type=int, default=None, help="samples per task x length (x depth); default 5; "
                                                             "user data: every record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default=None,
                   help="modes to run each prompt through (default: dense,sparse; dense when no indexer)")
    p.add_argument("--depths", default=None,
                   help="needle depths in %% for needle tasks, e.g. 0,25,50,75,100 (default: a seeded depth per sample)")
    p.add_argument("--data", default=None, help="your own JSONL (context, question, answers): task 'user'")
    p.add_argument("--out", default=None, help="directory for samples.jsonl (resume), results.json/.csv and plots")
    p.add_argument("--json", action="store_true", help="print results.json's content instead of the table")


def register(subparsers: Any) -> None:
    """Add ``eval`` (runner by default) with the actions ``run``, ``fidelity`` and ``ppl``."""
    p = subparsers.add_parser(
        "eval", help="long-context quality: RULER-style tasks dense vs sparse, fidelity, perplexity",
        description="Without an action: run the tasks (same as `parca eval run`). Actions: run, fidelity, ppl.")
    _run_args(p, required=False)  # --model checked in the handler, so `parca eval fidelity --model ...` parses
    p.set_defaults(func=cmd_eval_run)
    sub = p.add_subparsers(dest="eval_action", metavar="ACTION")

    q = sub.add_parser("run", help="the task runner (the default action)")
    _run_args(q, required=True)
    q.set_defaults(func=cmd_eval_run)

    q = sub.add_parser("fidelity", help="recall, KL, top-1 agreement, delta NLL of sparse vs dense (no task needed)")
    _common(q, required=True)
    q.add_argument("--text", required=True, help="a text file, a .jsonl with a 'text' field, or a directory of them")
    q.add_argument("--lengths", default=None, help="token counts, e.g. 4k,16k (default: min(4k, context))")
    q.add_argument("--decode-window", type=int, default=64, help="last N tokens decoded one at a time (default 64)")
    q.add_argument("--max-docs", type=int, default=None, help="documents per length (default: all long enough)")
    q.add_argument("--prefill-chunk", type=int, default=2048)
    q.add_argument("--dump-selection", type=int, default=None, metavar="LAYER",
                   help="save which keys each query selected at LAYER (npz) and a PNG beside the dense map")
    q.add_argument("--out", default=None, help="directory for fidelity.json and selection dumps")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the card")
    q.set_defaults(func=cmd_eval_fidelity)

    q = sub.add_parser("ppl", help="perplexity on long documents, dense and sparse (truncate or strided)")
    _common(q, required=True)
    q.add_argument("--text", required=True, help="a text file, a .jsonl with a 'text' field, or a directory of them")
    q.add_argument("--mode", default="truncate", choices=["truncate", "strided"])
    q.add_argument("--lengths", default=None, help="truncate: document lengths; strided: windows (default: min(4k, context))")
    q.add_argument("--window", type=int, default=None, help="strided: window size in tokens")
    q.add_argument("--stride", type=int, default=None, help="strided: tokens scored per window (default: window/2)")
    q.add_argument("--attention", default=None, help="default: dense,sparse (dense when no indexer)")
    q.add_argument("--max-tokens", type=int, default=None, help="strided: tokens of each document to score")
    q.add_argument("--max-docs", type=int, default=None)
    q.add_argument("--out", default=None, help="directory for perplexity.json")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval_ppl)


# ---- handlers -----------------------------------------------------------------------------------------
def _lengths_needed(args: argparse.Namespace, context: int) -> int:
    """The longest sequence this command will run: what the memory check at load time sizes the cache for."""
    from parca.evals.run import default_lengths, parse_lengths

    vals = []
    if getattr(args, "lengths", None):
        vals += parse_lengths(args.lengths)
    if getattr(args, "window", None):
        vals.append(int(args.window))
    if vals:
        return max(vals)
    if args.func is cmd_eval_run:
        return context if getattr(args, "data", None) else max(default_lengths(context))
    return min(4096, context)


def _load(args: argparse.Namespace):
    """Config-level checks first (cheap, clear), then the model, the adapter and the tokenizer."""
    if not args.model:
        raise ParcaError("parca eval needs --model DIR (a Hugging Face model directory)")
    from parca.checkpoint import attach_adapter, load_model
    from parca.config import load_config
    from parca.evals.run import check_lengths, parse_lengths
    from parca.tokenizer import Tokenizer

    cfg = load_config(args.model)
    context = cfg.max_position_embeddings
    need = _lengths_needed(args, context)
    if getattr(args, "lengths", None):
        check_lengths(parse_lengths(args.lengths), context)
    if getattr(args, "window", None):
        check_lengths([int(args.window)], context, flag="--window")
    if args.index_topk is not None and args.index_topk < 1:
        raise ParcaError(f"--index-topk must be a positive integer, got {args.index_topk}")
    model = load_model(args.model, device=args.device, dtype=args.dtype, context=need)
    if args.indexer:
        attach_adapter(model, args.indexer, index_topk=args.index_topk)
    return model, Tokenizer(args.model)


def _attentions(args: argparse.Namespace, model: Any) -> str:
    if args.attention:
        return args.attention
    if getattr(model, "sparse_config", None) is None:
        print("parca eval: no indexer (--indexer ADIR), so dense attention only", file=sys.stderr)
        return "dense"
    return "dense,sparse"


def cmd_eval_run(args: argparse.Namespace) -> int:
    from parca.evals.run import run_eval

    model, tok = _load(args)
    result = run_eval(
        model, tok, tasks=args.tasks, lengths=args.lengths, samples=args.samples, seed=args.seed,
        attentions=_attentions(args, model), index_topk=args.index_topk, depths=args.depths, data=args.data,
        out=args.out, progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    cfg = result.config
    print(f"model {args.model}" + (f"  indexer {args.indexer}" if args.indexer else "")
          + (f"  top-k {cfg['index_topk']}" if "sparse" in result.attentions else ""))
    print(f"seed {cfg['seed']}; {cfg['decoding']}; length = {cfg['length_means']}")
    print(f"tokens: {cfg['bos']}")
    print(f"generated {result.generated}, resumed {result.resumed} (sample x mode)")
    print()
    print(result.table())
    if result.files:
        print()
        for name, path in result.files.items():
            print(f"wrote {path}")
    return 0


def cmd_eval_fidelity(args: argparse.Namespace) -> int:
    from parca.evals.fidelity import fidelity, load_texts
    from parca.evals.report import format_fidelity

    if args.dump_selection is not None and not args.out:
        raise ParcaError("--dump-selection needs --out DIR (where the .npz and .png go)")
    texts = load_texts(args.text)  # before loading the model: a typo fails fast
    model, tok = _load(args)
    res = fidelity(model, tok, texts, args.lengths, index_topk=args.index_topk, decode_window=args.decode_window,
                   max_docs=args.max_docs, prefill_chunk=args.prefill_chunk, dump_selection=args.dump_selection,
                   out=args.out, progress=not args.no_progress)
    print(json.dumps(res) if args.json else format_fidelity(res))
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from parca.evals.fidelity import load_texts
    from parca.evals.perplexity import perplexity
    from parca.evals.report import format_perplexity

    texts = load_texts(args.text)
    model, tok = _load(args)
    res = perplexity(model, tok, texts, mode=args.mode, lengths=args.lengths, window=args.window, stride=args.stride,
                     attentions=_attentions(args, model), index_topk=args.index_topk, max_tokens=args.max_tokens,
                     max_docs=args.max_docs, progress=not args.no_progress, out=args.out)
    print(json.dumps(res) if args.json else format_perplexity(res))
    return 0


__all__ = ["register", "cmd_eval_run", "cmd_eval_fidelity", "cmd_eval_ppl"]
