"""`parca retrofit`: train a lightning indexer onto an existing dense model (DeepSeek's two-stage recipe).

Registers itself with parca/cli.py (``register(subparsers)``); imports no torch until the handler runs.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from .errors import ParcaError

RETROFIT_HELP = """\
Train a lightning indexer (DeepSeek Sparse Attention) onto an existing dense model.

Stages (reference/dsa.md section 3):
  warmup  (default) base frozen, attention dense; the indexer learns KL(p || softmax(I)) where p is the
          main attention summed over heads and L1-normalised over the causal keys. LR 1e-3 (DeepSeek).
  sparse  the model runs sparse on the indexer's own top-k; KL restricted to the selected set; indexer input
          detached. With --train-model the base model also trains on the LM loss (DeepSeek's stage 2) and the
          output is a full checkpoint. With the base FROZEN the KL over the selected set can only reorder
          tokens that are already selected: it never sees a missed key, so nothing brings one in. Measured on
          a tiny model: +0.008 recall@16 per 100 frozen sparse steps vs +0.025 for 100 more warm-up steps;
          spend frozen-base compute on the warm-up.
  both    --warmup-steps of warm-up (default half of --steps), then sparse.

Writes ADIR/indexer.safetensors + indexer_config.json (use with --indexer ADIR), ADIR/training.json,
ADIR/metrics.jsonl and ADIR/checkpoint/ (resume with --resume). Under torchrun --nproc-per-node N the
global --batch-size is split across the ranks.
"""


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _nonneg(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v

    return parse


def register(sub: Any) -> None:
    """Add ``retrofit`` to the ``parca`` subcommands."""
    p = sub.add_parser("retrofit", help="train a lightning indexer onto a dense model (warm-up / sparse stage)",
                       description=RETROFIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="text files, directories (*.txt/*.md/*.text/*.jsonl, recursive), JSONL with a 'text' (or "
                        "'context') field, or 'synthetic' (generated long-range retrieval text)")
    p.add_argument("--out", required=True, metavar="ADIR", help="output directory (adapter + training record)")
    p.add_argument("--init", default=None, metavar="random|derived|ADIR",
                   help="starting indexer: 'derived' (copies the model's own query/key heads; needs index head "
                        "dim = rope dim = head_dim), 'random', or an adapter directory to continue from (e.g. a "
                        "warm-up adapter for --stage sparse). Default: derived where it applies, else random")
    p.add_argument("--steps", type=_positive("--steps"), default=200, help="optimizer steps (default 200)")
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=None,
                   help="tokens per packed sequence (default: min(4096, model context))")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=8,
                   help="global sequences per step, split across torchrun ranks (default 8)")
    p.add_argument("--micro-batch", type=_positive("--micro-batch"), default=None,
                   help="sequences per forward within a rank (memory only; default: 16K tokens' worth)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="indexer learning rate, AdamW (default 1e-3, DeepSeek's warm-up)")
    p.add_argument("--model-lr", type=float, default=7.3e-6,
                   help="base model learning rate with --train-model (default 7.3e-6, DeepSeek's sparse stage)")
    p.add_argument("--index-topk", type=_positive("--index-topk"), default=None,
                   help="k selected per query; sparse-stage selection and recall@k (default min(2048, seq-len/4))")
    p.add_argument("--index-n-heads", type=_positive("--index-n-heads"), default=None, help="indexer heads (default 4)")
    p.add_argument("--index-head-dim", type=_positive("--index-head-dim"), default=None,
                   help="indexer head dim (default: model head_dim for derived, 64 for random)")
    p.add_argument("--index-rope-dim", type=_nonneg("--index-rope-dim"), default=None,
                   help="leading indexer dims with RoPE (default: head dim for derived, min(32, head dim) for random)")
    p.add_argument("--stage", choices=["warmup", "sparse", "both"], default="warmup",
                   help="warmup (dense KL, default), sparse (KL on the selected set; see above), or both")
    p.add_argument("--warmup-steps", type=_nonneg("--warmup-steps"), default=None,
                   help="--stage both: warm-up steps before the sparse stage (default: half of --steps)")
    p.add_argument("--train-model", action="store_true",
                   help="sparse stage: also train the base model on the LM loss; writes a full checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=_nonneg("--save-every"), default=100,
                   help="checkpoint every N steps into ADIR/checkpoint (0: only at the end; default 100)")
    p.add_argument("--resume", action="store_true", help="continue from ADIR/checkpoint (same settings)")
    p.add_argument("--eval-every", type=_nonneg("--eval-every"), default=50,
                   help="held-out KL and recall@k every N steps (0: only before and after; default 50)")
    p.add_argument("--eval-seqs", type=_positive("--eval-seqs"), default=4,
                   help="packed sequences held out for evaluation (default 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="model dtype (default: checkpoint's)")
    p.add_argument("--chunk-mb", type=_positive("--chunk-mb"), default=64,
                   help="memory budget of one query chunk of targets/scores, MiB (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_retrofit)


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_card(r: dict[str, Any]) -> str:
    """The human-readable end-of-run card (the JSON line follows it)."""
    sc, b, a = r["sparse"], r.get("before") or {}, r.get("after") or {}
    k = sc["index_topk"]
    lines = [
        f"parca retrofit: {r['kind']} written to {r['out']}",
        f"  model        {r['model']}",
        f"  indexer      {sc['index_n_heads']} heads x {sc['index_head_dim']} (rope {sc['index_rope_dim']}), "
        f"top-k {k}, init {r['init']}",
        f"  training     stage {r['stage']}, {r['steps']} steps x {r['batch_size']} seqs x {r['seq_len']} tokens = "
        f"{r['tokens_seen']:,} tokens on {r['world_size']} rank(s), {r['wall_s']:.1f} s"
        + (f" ({r['train_s_per_mtok']:.0f} s per M tokens)" if r.get("train_s_per_mtok") else ""),
        f"  held-out KL  {_fmt(b.get('kl'))} -> {_fmt(a.get('kl'))}",
        f"  recall@{k:<5d}{_fmt(b.get('recall'))} -> {_fmt(a.get('recall'))}   "
        f"(last-{k} window: {_fmt(a.get('recall_recent') or b.get('recall_recent'))})",
    ]
    if a.get("recall_per_layer"):
        lines.append("  per layer    " + " ".join(_fmt(x, ".3f") for x in a["recall_per_layer"]))
    return "\n".join(lines)


def cmd_retrofit(args: argparse.Namespace) -> int:
    from .train import RetrofitConfig, retrofit

    if args.train_model and args.stage == "warmup":
        raise ParcaError("--train-model trains the base model in the sparse stage: add --stage sparse or --stage both")
    cfg = RetrofitConfig(
        model=args.model, data=list(args.data), out=args.out, init=args.init, steps=args.steps,
        seq_len=args.seq_len, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
        model_lr=args.model_lr, index_topk=args.index_topk, index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim, index_rope_dim=args.index_rope_dim, stage=args.stage,
        warmup_steps=args.warmup_steps, train_model=args.train_model, seed=args.seed, save_every=args.save_every,
        resume=args.resume, eval_every=args.eval_every, eval_seqs=args.eval_seqs, device=args.device,
        dtype=args.dtype, chunk_mb=args.chunk_mb, progress=not args.no_progress,
    )
    result = retrofit(cfg)
    if result["rank"] == 0:
        print(summary_card(result))
        print(json.dumps(result))
    return 0
