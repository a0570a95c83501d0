"""Marginal prefill cost of the reference model: a chunk of queries on top of a cached prefix, parca dense vs
parca sparse (DSA), whole model and attention alone, dense and sparse repetitions interleaved (medians).
Prints a card, then ONE JSON line (``speedup`` = dense / sparse whole-model time of the chunk,
``attention_speedup`` the same for the attention of all layers).

    python benchmarks/prefill.py --context 64k [--chunk 512] [--threads 2] [--reps 3]
    python benchmarks/prefill.py --context 64k,128k
    python benchmarks/prefill.py --context 128k --full-prefill     # + peak memory of a whole 128K prefill

Same reference model as benchmarks/decode.py (random weights, float32, int8 indexer keys, top-k 2048); the
prefix is random cached keys/values rather than a prefill of its own. Marginal cost per token = chunk time /
chunk size, as in DeepSeek's cost-per-position figure (reference/cost.md section 1).

``--full-prefill`` runs, in a child process, a whole sparse prefill of ``--context`` tokens through the engine
(prefill chunks of ``--engine-chunk`` tokens) and reports its peak RSS beside the bound: weights + cache +
the per-chunk workspaces (``max_chunk_bytes``-bounded; nothing scales with T x T).
"""

from __future__ import annotations

import argparse
import os
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Threads that wait PASSIVELY (sleep) instead of spinning: on a 2-core machine shared with other work, spinning
# OpenMP threads fight every other process for the cores and each parallel region then waits for a preempted
# thread (measured, 2 threads, load 5: a 32K decode step 380 ms spinning vs 88 ms passive). Must be set before
# torch loads libgomp; set OMP_WAIT_POLICY yourself to override (the JSON records it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import DTYPES, SHAPE, fill_cache, interleaved, load_avg, reference_model  # noqa: E402
from decode import attention_fns as decode_attention_fns  # noqa: E402

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info  # noqa: E402
from parca.cost import parse_positions  # noqa: E402
from parca.models.base import ForwardContext  # noqa: E402


def attention_fns(model, cache, n: int, chunk: int, topk: int) -> tuple[dict[str, Callable[[], Any]], list]:
    """Dense / sparse attention of every layer for a chunk of queries on n cached rows (``decode.attention_fns``),
    and the list the sparse calls fill with their selections (for the neighbour-overlap figure)."""
    selections: list = []
    return decode_attention_fns(model, cache, n, topk, chunk=chunk, seed=2, selections=selections), selections


def overlap(idx: torch.Tensor, block: int = 16) -> float:
    """Mean fraction of a query's selection shared with its neighbours: |union of a block| / (block * k)."""
    sel = idx[0]
    t = sel.shape[0]
    fr = []
    for t0 in range(0, t - block + 1, block):
        rows = sel[t0 : t0 + block]
        rows = rows[rows >= 0]
        fr.append(rows.unique().numel() / max(1, rows.numel()))
    return 1.0 - sum(fr) / max(1, len(fr))


def measure(model, n: int, args, kv_dtype) -> dict[str, Any]:
    chunk, topk = args.chunk, args.topk
    cache = fill_cache(model, n + chunk, kv_dtype=kv_dtype)
    cache.lengths[0] = n
    ids = torch.randint(5, model.config.vocab_size, (1, chunk), generator=torch.Generator().manual_seed(3))

    def step(mode: str):
        ctx = ForwardContext(slots=[0], starts=[n], modes=[mode], topks=[topk])
        return lambda: model(ids, cache, ctx, last_only=True)

    with torch.inference_mode():
        att, selections = attention_fns(model, cache, n, chunk, topk)
        t = interleaved({"dense": step("dense"), "sparse": step("sparse"), "attn_dense": att["dense"],
                         "attn_sparse": att["sparse"]}, args.reps, warmup=args.warmup, max_seconds=args.max_seconds)
        ov = overlap(selections[0]) if selections else 0.0
    row = {
        "context": n, "chunk": chunk,
        "dense_ms": 1e3 * t["dense"], "sparse_ms": 1e3 * t["sparse"], "speedup": t["dense"] / t["sparse"],
        "attention_dense_ms": 1e3 * t["attn_dense"], "attention_sparse_ms": 1e3 * t["attn_sparse"],
        "attention_speedup": t["attn_dense"] / t["attn_sparse"],
        "dense_ms_per_token": 1e3 * t["dense"] / chunk, "sparse_ms_per_token": 1e3 * t["sparse"] / chunk,
        "selection_overlap_16": ov,
    }
    del cache
    return row


FULL_SCRIPT = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r}); sys.path.insert(0, {root!r})
from decode import reference_model, DTYPES
from parca.engine import Engine, SamplingParams
torch.set_num_threads({threads})
n = {n}
model = reference_model(DTYPES[{dtype!r}], {topk}, max_pos=n + 64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
eng = Engine(model, None, max_slots=1, max_len=n + 8, prefill_chunk={engine_chunk}, max_chunk_bytes={mcb})
ids = torch.randint(5, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
t0 = time.perf_counter()
eng.generate([ids], SamplingParams(max_new_tokens=1, attention="sparse", ignore_eos=True))
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({{"seconds": sec, "rss_before_mib": base / 1024, "peak_rss_mib": peak / 1024,
                  "cache_mib": eng.cache.nbytes() / 2**20, "index_cache_mib": eng.cache.index_nbytes() / 2**20,
                  "weights_mib": weights / 2**20}}))
"""


def full_prefill(n: int, args) -> dict[str, Any] | None:
    here = Path(__file__).resolve()
    script = FULL_SCRIPT.format(bench=str(here.parent), root=str(here.parents[1]), threads=args.threads, n=n,
                                dtype=args.dtype, topk=args.topk,
                                engine_chunk=args.engine_chunk, mcb=args.max_chunk_mib * 2**20)
    print(f"  full sparse prefill of {n} tokens in a child process (minutes) ...", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # what may legitimately grow with the prompt: weights, cache; per chunk: activations of engine_chunk tokens,
    # score / selection workspaces (max_chunk_bytes each), the chunk's (T, k) selection; no T x T term
    c, k = args.engine_chunk, args.topk
    act = c * (SHAPE["hidden"] * 8 + SHAPE["mlp"] * 3 + SHAPE["vocab"]) * 4  # rough activations, float32
    res["bound_mib"] = res["rss_before_mib"] + res["cache_mib"] + (act + 4 * args.max_chunk_mib * 2**20
                                                                   + c * k * 8 * 2) / 2**20
    res["tokens"] = n
    res["t_by_t_float32_mib"] = n * n * 4 / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="64k", help="cached prefix before the chunk, e.g. 64k or 64k,128k")
    ap.add_argument("--chunk", type=int, default=512, help="queries in the prefill chunk")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights")
    ap.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"], help="KV cache (default: weights)")
    ap.add_argument("--index-dtype", default="int8", choices=["int8", "float32", "bfloat16"])
    ap.add_argument("--full-prefill", action="store_true", help="also run a whole sparse prefill of the largest "
                    "--context through the engine and report its peak memory")
    ap.add_argument("--engine-chunk", type=int, default=2048, help="engine prefill chunk for --full-prefill")
    ap.add_argument("--max-chunk-mib", type=int, default=64, help="engine max_chunk_bytes for --full-prefill")
    ap.add_argument("--full-only", action="store_true", help="only the --full-prefill memory run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = parse_positions(args.context)
    dtype = DTYPES[args.dtype]
    kv_dtype = DTYPES[args.kv_dtype] if args.kv_dtype else dtype
    model = reference_model(dtype, args.topk, max_pos=max(contexts) + args.chunk + 64,
                            index_dtype=DTYPES[args.index_dtype])
    if not dsa.kernels.available():
        print(f"C kernels unavailable ({dsa.kernels.build_error()}); torch paths only", file=sys.stderr)
    rows = []
    if args.full_only:
        full = full_prefill(max(contexts), args)
        print(json.dumps({"benchmark": "prefill_memory", "machine": machine_info(), "load_avg": load_avg(),
                          "threads": args.threads, "full_prefill": full}))
        return
    for n in contexts:
        print(f"  prefix {n}, chunk {args.chunk} ...", file=sys.stderr, flush=True)
        rows.append(measure(model, n, args, kv_dtype))
        r = rows[-1]
        print(f"    dense {r['dense_ms']:.0f} ms  sparse {r['sparse_ms']:.0f} ms -> {r['speedup']:.2f}x; attention "
              f"{r['attention_dense_ms']:.0f} / {r['attention_sparse_ms']:.0f} ms -> {r['attention_speedup']:.2f}x",
              file=sys.stderr, flush=True)
    full = full_prefill(max(contexts), args) if args.full_prefill else None
    info = machine_info()
    la = load_avg()
    print(f"\nmarginal prefill: {args.chunk} queries on a cached prefix, reference model ({SHAPE['layers']} layers, "
          f"hidden {SHAPE['hidden']}, {SHAPE['heads']}x{SHAPE['head_dim']} heads, {SHAPE['kv_heads']} kv heads), "
          f"weights {args.dtype}, KV {str(kv_dtype).replace('torch.', '')}, indexer keys {args.index_dtype}, "
          f"top-k {args.topk}")
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, C kernels "
          f"{'on' if dsa.kernels.available() else 'off'}; load avg {la}")
    print(f"{'prefix':>8s} {'dense ms':>9s} {'sparse ms':>9s} {'speedup':>8s} {'ms/token d/s':>14s} "
          f"{'attn dense':>10s} {'attn sparse':>11s} {'attn x':>7s} {'sel. overlap':>12s}")
    for r in rows:
        print(f"{r['context']:>8d} {r['dense_ms']:9.0f} {r['sparse_ms']:9.0f} {r['speedup']:7.2f}x "
              f"{r['dense_ms_per_token']:6.2f}/{r['sparse_ms_per_token']:5.2f}  {r['attention_dense_ms']:10.0f} "
              f"{r['attention_sparse_ms']:11.0f} {r['attention_speedup']:6.2f}x {r['selection_overlap_16']:11.2f}")
    print("sel. overlap: share of a query's selected keys also selected by one of its 15 neighbours (random model)")
    if full:
        print(f"whole sparse prefill of {full['tokens']} tokens: {full['seconds']:.0f} s, peak RSS "
              f"{full['peak_rss_mib']:.0f} MiB (bound {full['bound_mib']:.0f} MiB: weights and runtime "
              f"{full['rss_before_mib']:.0f} + cache {full['cache_mib']:.0f} "
              f"(index keys {full['index_cache_mib']:.0f}) "
              f"+ chunk workspaces); a single [T, T] float32 tensor would be {full['t_by_t_float32_mib']:.0f} MiB")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    r0 = rows[-1]
    out = {"benchmark": "prefill", "machine": info, "load_avg": la, "shape": SHAPE, "dtype": args.dtype,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "kv_dtype": str(kv_dtype).replace("torch.", ""), "index_dtype": args.index_dtype, "topk": args.topk,
           "chunk": args.chunk, "kernels": dsa.kernels.available(), "speedup": r0["speedup"],
           "attention_speedup": r0["attention_speedup"], "context": r0["context"], "rows": rows,
           "full_prefill": full}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
