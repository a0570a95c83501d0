"""What two session-5 changes to the sparse decode step buy, each measured in one run: the attention of every
layer of the reference model at long context (``benchmarks/decode.py``'s "attention alone"), interleaved:

* dense attention and sparse attention over a KV cache in 4 KiB pages (``PARCA_HUGEPAGES=0``) and over one in
  transparent huge pages (the default now: ``parca.cache`` madvises its tensors before the first touch);
* ``parca.sparse.sparse_decode`` as ONE C call (``dsa_decode_step``: scores, top-k and attention in one OpenMP
  region, threads meeting at spin barriers) or as the previous TWO calls (``dsa_select_i8`` then
  ``dsa_attend``: two regions, the sleeping worker woken twice).

Prints a card and ONE JSON line: ``speedup`` = before (4 KiB pages, two calls) / after (huge pages, one call)
for the sparse attention, ``attention_speedup`` = dense / sparse after (both on huge pages), and
``attention_speedup_before`` = the same ratio before (both on 4 KiB pages).

    python benchmarks/decode_region.py --context 32k,128k [--threads 2] [--reps 21]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as decode.py: see its note

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import attention_fns, fill_cache, load_avg, reference_model  # noqa: E402

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info  # noqa: E402
from parca.cost import parse_positions  # noqa: E402


def flushed(fns: dict, reps: int, flush_mib: int = 256) -> dict[str, float]:
    """Median wall seconds of each fn, run in turn every repetition, each after an untimed read of ``flush_mib``
    MiB (far more than the L3): no variant inherits the rows or indexer keys the previous one left in cache.
    (Without it, the variant timed right after another sparse variant over the same cache ran ~10% faster.)"""
    import statistics
    import time

    buf = torch.ones(flush_mib * 2**20 // 4)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):  # the first round warms up
        for k, fn in fns.items():
            buf.sum()
            t0 = time.perf_counter()
            fn()
            if rep:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def anon_huge_kib() -> int | None:
    """This process's memory in transparent huge pages (KiB), from /proc (None where unreadable)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="32k,128k")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    if not dsa.kernels.available():
        raise SystemExit(f"the C kernels are unavailable ({dsa.kernels.build_error()}): nothing to compare")
    torch.set_num_threads(args.threads)
    contexts = parse_positions(args.context)
    model = reference_model(torch.float32, args.topk, max_pos=max(contexts) + 64)
    rows = []
    for n in contexts:
        print(f"  context {n} ...", file=sys.stderr, flush=True)
        caches = {}
        for huge in (False, True):
            os.environ["PARCA_HUGEPAGES"] = "1" if huge else "0"
            caches[huge] = fill_cache(model, n + 1)
            caches[huge].lengths[0] = n
        os.environ.pop("PARCA_HUGEPAGES")
        huge_kib = anon_huge_kib()

        def mode(one: bool, fn):
            def run():
                old = dsa.kernels.ONE_REGION_DECODE
                dsa.kernels.ONE_REGION_DECODE = one
                try:
                    fn()
                finally:
                    dsa.kernels.ONE_REGION_DECODE = old
            return run

        with torch.inference_mode():
            a4, ah = (attention_fns(model, caches[h], n, args.topk) for h in (False, True))
            t = flushed({"dense_4k": a4["dense"], "dense_huge": ah["dense"],
                         "two_calls_4k": mode(False, a4["sparse"]), "one_region_4k": mode(True, a4["sparse"]),
                         "two_calls_huge": mode(False, ah["sparse"]), "one_region_huge": mode(True, ah["sparse"])},
                        args.reps)
        row = {"context": n, "anon_huge_pages_kib": huge_kib}
        row.update({f"{k}_ms": 1e3 * v for k, v in t.items()})
        row.update({"speedup": t["two_calls_4k"] / t["one_region_huge"],
                    "one_region_gain_4k": t["two_calls_4k"] / t["one_region_4k"],
                    "one_region_gain_huge": t["two_calls_huge"] / t["one_region_huge"],
                    "huge_page_gain": t["one_region_4k"] / t["one_region_huge"],
                    "attention_speedup": t["dense_huge"] / t["one_region_huge"],
                    "attention_speedup_before": t["dense_4k"] / t["two_calls_4k"]})
        rows.append(row)
        del caches
    info = machine_info()
    la = load_avg()
    print(f"\nsparse decode attention, all {model.config.num_hidden_layers} layers of the reference model, top-k "
          f"{args.topk}; {info['cpu']}, {info['threads']} threads, load avg {la}")
    print("ms for all layers (medians); 4k = 4 KiB pages, huge = transparent huge pages")
    print(f"{'context':>8s} {'dense 4k':>9s} {'dense huge':>10s} {'2 calls 4k':>10s} {'1 call 4k':>9s} "
          f"{'2 calls huge':>12s} {'1 call huge':>11s} {'before':>7s} {'after':>7s} {'gain':>6s}")
    for r in rows:
        print(f"{r['context']:>8d} {r['dense_4k_ms']:9.2f} {r['dense_huge_ms']:10.2f} {r['two_calls_4k_ms']:10.3f} "
              f"{r['one_region_4k_ms']:9.3f} {r['two_calls_huge_ms']:12.3f} {r['one_region_huge_ms']:11.3f} "
              f"{r['attention_speedup_before']:6.2f}x {r['attention_speedup']:6.2f}x {r['speedup']:5.2f}x")
    print("before = dense / sparse on 4 KiB pages with two calls; after = dense / sparse on huge pages with one call;"
          " gain = sparse before / after")
    r0 = rows[-1]
    print(json.dumps({"benchmark": "decode_region", "machine": info, "load_avg": la,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "topk": args.topk, "reps": args.reps,
                      "speedup": r0["speedup"], "attention_speedup": r0["attention_speedup"],
                      "attention_speedup_before": r0["attention_speedup_before"], "context": r0["context"],
                      "rows": rows}))


if __name__ == "__main__":
    main()
