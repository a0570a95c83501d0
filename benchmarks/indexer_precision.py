"""How much low-precision indexer scoring changes the selected sets: top-k overlap against full precision.

    python benchmarks/indexer_precision.py [--lengths 4k,8k,16k] [--topk 2048] [--queries 32] [--threads 2]

DeepSeek-V3.2 scores its lightning indexer with fp8 e4m3 queries and keys (Hadamard-rotated, one power-of-two
scale per 128 values). On random inputs of DeepSeek's indexer shape (64 heads x 128, one shared key per token,
signed per-head weights) this measures, for the last ``--queries`` positions of a context of each length,
``|S_full & S_low| / |S_full|`` where S is the top-k set, for:

* fp8        Hadamard + fp8 blocks on q and k (DeepSeek's scheme, ``parca.sparse.quant.fake_quant_indexer``)
* fp8-norot  fp8 blocks without the rotation
* int8-rows  per-row int8 (one scale per query head / per key), the CPU storage format

over two input families: ``gaussian`` (iid, like LayerNorm'd keys) and ``outliers`` (4 of 128 channels 20x
larger, shared by q and k, as activation outliers are). Prints a card, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info  # noqa: E402
from parca.cost import parse_positions  # noqa: E402
from parca.sparse import quant  # noqa: E402

VARIANTS = {
    "fp8": quant.fake_quant_indexer,
    "fp8-norot": lambda x: quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(x)),
    "int8-rows": lambda x: quant.dequantize_int8_rows(*quant.quantize_int8_rows(x)),
}


def inputs(S: int, Q: int, H: int, D: int, family: str, seed: int):
    """q (1,Q,H,D), w (1,Q,H) float32, k (1,S,D), q_pos (1,Q) = the last Q positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Q, H, D, generator=g)
    k = torch.randn(1, S, D, generator=g)
    if family == "outliers":
        ch = torch.randperm(D, generator=g)[:4]
        q[..., ch] *= 20
        k[..., ch] *= 20
    w = torch.randn(1, Q, H, generator=g) * H**-0.5 * D**-0.5  # signed, DeepSeek's scaling
    return q, w, k, torch.arange(S - Q, S)[None]


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per query: |a & b| / |a| over valid (>= 0) entries. a, b (1,Q,k) -> (Q,)"""
    out = []
    for ra, rb in zip(a[0], b[0]):
        sa, sb = set(ra[ra >= 0].tolist()), set(rb[rb >= 0].tolist())
        out.append(len(sa & sb) / max(len(sa), 1))
    return torch.tensor(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4k,8k,16k", help="context lengths (k = 1024)")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=32, help="query positions scored per length (the last ones)")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = parse_positions(args.lengths)
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for family in ("gaussian", "outliers"):
            for S in lengths:
                q, w, k, q_pos = inputs(S, args.queries, args.heads, args.dim, family, args.seed)
                full = dsa.select_topk(q, w, k, q_pos, args.topk)
                row = {"family": family, "length": S, "topk": args.topk, "queries": args.queries}
                for name, fq in VARIANTS.items():
                    sel = dsa.select_topk(fq(q), w, fq(k), q_pos, args.topk)
                    ov = overlap(full, sel)
                    row[name] = {"mean": round(ov.mean().item(), 4), "min": round(ov.min().item(), 4)}
                rows.append(row)
    elapsed = time.perf_counter() - t0

    print(f"indexer precision: top-{args.topk} overlap with full-precision selection "
          f"({args.heads} heads x {args.dim}, last {args.queries} queries per length, random inputs)")
    hdr = f"{'inputs':>9} {'length':>7} | " + " | ".join(f"{n:>16}" for n in VARIANTS)
    print(hdr)
    print(" " * 18 + "| " + " | ".join(f"{'mean':>7} {'min':>8}" for _ in VARIANTS))
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['family']:>9} {r['length']:>7,} | "
              + " | ".join(f"{r[n]['mean']:>7.4f} {r[n]['min']:>8.4f}" for n in VARIANTS))
    print(f"({elapsed:.1f} s)")
    print(json.dumps({"benchmark": "indexer_precision", "rows": rows, "heads": args.heads, "dim": args.dim,
                      "seed": args.seed, "seconds": round(elapsed, 2), "machine": machine_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
