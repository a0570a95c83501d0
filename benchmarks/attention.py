"""One attention layer, dense vs sparse (DSA) vs the masked reference: a decode step and a prefill chunk on top
of a cached prefix, at several context lengths. Prints a card, then ONE JSON line.

    python benchmarks/attention.py --contexts 4k,8k,16k,32k,64k [--topk 2048] [--chunk 512] [--threads 2]

Shape (the reference shape of benchmarks/): 8 query heads x 64, 2 KV heads, indexer 4 heads x 64, float32 caches,
int8 indexer keys with per-token scales (``--index-dtype float32`` for the float path). The sparse time includes
the indexer scoring and top-k selection, not only the attention over selected rows. One layer alone: its caches
can sit in the last-level cache, which a whole model's do not (benchmarks/decode.py and prefill.py measure that).
Peak memory is measured per operation in a child process (ru_maxrss growth over the inputs).
"""

from __future__ import annotations

import argparse
import os
import json
import resource
import subprocess
import sys
from pathlib import Path

# Threads that wait PASSIVELY (sleep) instead of spinning: on a 2-core machine shared with other work, spinning
# OpenMP threads fight every other process for the cores and each parallel region then waits for a preempted
# thread (measured, 2 threads, load 5: a 32K decode step 380 ms spinning vs 88 ms passive). Must be set before
# torch loads libgomp; set OMP_WAIT_POLICY yourself to override (the JSON records it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info, median_time  # noqa: E402
from parca.cost import parse_positions  # noqa: E402

H, HKV, D, HI, DI = 8, 2, 64, 4, 64
INDEX_DTYPE = "int8"


def inputs(S: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(1, T, H, D), r(1, S, HKV, D), r(1, S, HKV, D)
    qi, ik, w = r(1, T, HI, DI), r(1, S, DI), r(1, T, HI)
    kw = {"order": "position"}
    if INDEX_DTYPE == "int8":
        ik, ks = dsa.quantize_int8_rows(ik)
        kw["k_scale"] = ks.squeeze(-1)
    q_pos = torch.arange(S - T, S)[None]
    return q, k, v, qi, ik, w, q_pos, kw


def op(mode: str, S: int, T: int, topk: int):
    q, k, v, qi, ik, w, q_pos, kw = inputs(S, T)
    scale = D**-0.5
    if mode == "dense":
        return lambda: dsa.dense(q, k, v, q_pos, scale)
    idx = dsa.select_topk(qi, w, ik, q_pos, topk, **kw)
    if mode == "sparse":
        return lambda: dsa.sparse(q, k, v, dsa.select_topk(qi, w, ik, q_pos, topk, **kw), scale)
    if mode == "select":
        return lambda: dsa.select_topk(qi, w, ik, q_pos, topk, **kw)
    if mode == "reference":
        return lambda: dsa.reference(q, k, v, idx, scale, q_pos)
    raise ValueError(mode)


def child(mode: str, S: int, T: int, topk: int) -> None:
    fn = op(mode, S, T, topk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def peak_mib(mode: str, S: int, T: int, topk: int, threads: int) -> float | None:
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(S), str(T), str(topk), "--threads", str(threads),
                        "--index-dtype", INDEX_DTYPE],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4k,8k,16k,32k,64k")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512, help="queries in the prefill chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference-max", default="16k", help="skip the O(T*S) reference above this context")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-operation peak-memory children")
    ap.add_argument("--index-dtype", default="int8", choices=["int8", "float32"], help="indexer keys")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global INDEX_DTYPE
    INDEX_DTYPE = args.index_dtype
    torch.set_num_threads(args.threads)
    if args.child:
        mode, S, T, topk = args.child
        child(mode, int(S), int(T), int(topk))
        return
    contexts = parse_positions(args.contexts)
    ref_max = parse_positions(args.reference_max)[0]
    rows = []
    for S in contexts:
        for phase, T in (("decode", 1), ("prefill", args.chunk)):
            row = {"context": S, "phase": phase, "queries": T}
            for mode in ("dense", "sparse", "select", "reference"):
                if mode == "reference" and S * T > ref_max * args.chunk and phase == "prefill":
                    continue
                fn = op(mode, S, T, args.topk)
                with torch.inference_mode():
                    row[f"{mode}_ms"] = 1e3 * median_time(fn, warmup=1, reps=args.reps, max_seconds=20)
                if not args.no_memory and mode != "select":
                    row[f"{mode}_peak_mib"] = peak_mib(mode, S, T, args.topk, args.threads)
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            rows.append(row)
            print(f"  {phase:7s} S={S:>6d}: dense {row['dense_ms']:8.2f} ms  sparse {row['sparse_ms']:8.2f} ms "
                  f"(select {row['select_ms']:.2f})  -> {row['speedup']:.2f}x", file=sys.stderr, flush=True)
    info = machine_info()
    print(f"\nattention layer: {H} heads x {D}, {HKV} kv heads, indexer {HI}x{DI} ({args.index_dtype} keys), top-k "
          f"{args.topk}, prefill chunk {args.chunk}; {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"C kernels {'on' if dsa.kernels.available() else 'off'}")
    hdr = (f"{'phase':8s}{'context':>9s}{'dense ms':>11s}{'sparse ms':>11s}{'select ms':>11s}{'ref ms':>10s}"
           f"{'speedup':>9s}{'peak MiB d/s/ref':>20s}")
    print(hdr)
    for r in rows:
        ref = f"{r['reference_ms']:10.2f}" if "reference_ms" in r else f"{'-':>10s}"
        mem = "/".join("-" if r.get(f"{m}_peak_mib") is None else f"{r[f'{m}_peak_mib']:.0f}"
                       for m in ("dense", "sparse", "reference"))
        print(f"{r['phase']:8s}{r['context']:>9d}{r['dense_ms']:11.2f}{r['sparse_ms']:11.2f}{r['select_ms']:11.2f}"
              f"{ref}{r['speedup']:8.2f}x{mem:>20s}")
    print(json.dumps({"benchmark": "attention", "machine": info, "topk": args.topk, "chunk": args.chunk,
                      "index_dtype": args.index_dtype, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "kernels": dsa.kernels.available(),
                      "shape": {"heads": H, "kv_heads": HKV, "head_dim": D, "index_heads": HI, "index_dim": DI},
                      "rows": rows}))


if __name__ == "__main__":
    main()
