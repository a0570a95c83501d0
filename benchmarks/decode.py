"""One decode step of the reference model at long context: parca dense vs parca sparse (DSA), whole model and
attention alone, each a ratio measured in the same run (dense and sparse repetitions interleaved, medians).
Prints a card, then ONE JSON line (``speedup`` = dense / sparse whole-model time, ``attention_speedup`` the same
for the attention of all layers alone).

    python benchmarks/decode.py --context 128k [--threads 2] [--kv-dtype float32|bfloat16] [--reps 7]
    python benchmarks/decode.py --context 2k,8k,32k,128k

Reference shape (built here as a random parca LlamaForCausalLM, no download): 8 layers, hidden 512, 8 query
heads x 64, 2 KV heads, MLP 1536, vocab 32000, float32 weights (bf16 matmuls are slower on a CPU without
avx512_bf16: ``--dtype bfloat16`` measures it), indexer 4 heads x 64 with int8 keys + one float32 scale per
token, top-k 2048. The caches are filled with random keys/values instead of a long prefill (the step's cost
does not depend on their values).

"Attention alone" = what differs between the two modes, for every layer: dense = attention over all cached
rows; sparse = the indexer's query/weight projections + int8 scoring + top-k + attention over the selected
rows. The physical limit printed beside each ratio is the byte ratio of a memory-bound step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info  # noqa: E402
from parca.config import ModelConfig, SparseConfig  # noqa: E402
from parca.cost import parse_positions  # noqa: E402
from parca.models.base import ForwardContext  # noqa: E402
from parca.models.llama import LlamaForCausalLM  # noqa: E402

SHAPE = dict(layers=8, hidden=512, heads=8, head_dim=64, kv_heads=2, mlp=1536, vocab=32000, index_heads=4,
             index_dim=64, index_rope_dim=32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


# ------------------------------------------------------------------------------------------- shared helpers
def reference_model(dtype: torch.dtype = torch.float32, topk: int = 2048, max_pos: int = 1 << 18,
                    index_dtype: torch.dtype = torch.int8, seed: int = 0) -> LlamaForCausalLM:
    """The benchmarks' reference shape as a random parca model with indexers (no download)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", family="llama", vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["mlp"], num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], head_dim=SHAPE["head_dim"], max_position_embeddings=max_pos,
        rope_theta=500000.0, torch_dtype=str(dtype).replace("torch.", ""), name="parca-reference-random",
    )
    model = LlamaForCausalLM(cfg, dtype=dtype)
    with torch.no_grad():  # small random weights keep activations in a sane range through 8 layers
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02 if "embed" not in name else 1.0)
    model.add_indexers(SparseConfig(index_n_heads=SHAPE["index_heads"], index_head_dim=SHAPE["index_dim"],
                                    index_topk=topk, index_rope_dim=SHAPE["index_rope_dim"]), seed=seed + 1)
    model.index_cache_dtype = index_dtype
    model.requires_grad_(False)
    model.eval()
    return model


def fill_cache(model: LlamaForCausalLM, n: int, slack: int = 8, kv_dtype: torch.dtype | None = None,
               seed: int = 0):
    """A one-slot cache holding n random tokens per layer (keys, values, indexer keys)."""
    cache = model.make_cache(1, n + slack, dtype=kv_dtype)
    g = torch.Generator().manual_seed(seed)
    for layer in range(model.config.num_hidden_layers):
        for t in (cache.k[layer], cache.v[layer]):
            t[0, :n].copy_(torch.randn(t[0, :n].shape, generator=g))
        if cache.ik is not None:
            keys = torch.randn(n, cache.ik[layer].shape[-1], generator=g)
            cache.write(layer, 0, 0, cache.k[layer][0, :n], cache.v[layer][0, :n], keys)
    cache.lengths[0] = n
    return cache


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, max_seconds: float | None = None
                ) -> dict[str, float]:
    """Median wall seconds of each fn; the fns run in turn within every repetition (load hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds and len(times[k]) >= 3:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def stream_gbps(mib: int = 512) -> float:
    """This machine's read bandwidth right now: a torch sum over a buffer far bigger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(ts) / 1e9


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def nbytes(mods) -> int:
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def weight_bytes(model: LlamaForCausalLM) -> dict[str, int]:
    """Weight bytes one decode step reads: all layers, the final norm, lm_head and ONE embedding row; the
    indexer key projection runs in both modes (keys are cached whatever the mode), its query side only in sparse."""
    layers = model.model.layers
    idx_q = sum(nbytes([l.self_attn.indexer.wq_b, l.self_attn.indexer.weights_proj]) for l in layers)
    body = nbytes(layers) - idx_q + nbytes([model.model.norm, model.lm_head])
    row = model.config.hidden_size * model.model.embed_tokens.weight.element_size()
    return {"dense": body + row, "sparse": body + row + idx_q, "indexer_query": idx_q}


# ------------------------------------------------------------------------------------------- the measurement
def attention_fns(model: LlamaForCausalLM, cache, n: int, topk: int, *, chunk: int = 1, seed: int = 1,
                  selections: list | None = None) -> dict[str, Callable[[], Any]]:
    """Dense / sparse attention of every layer for ``chunk`` queries at positions n..n+chunk-1 (the caches hold
    n + chunk rows): one decode query by default, a prefill chunk for ``prefill.py``. When ``selections`` is a
    list, each sparse call refills it with every layer's selected indices."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.model.embed_tokens.weight.dtype
    q_pos = torch.arange(n, n + chunk)[None]
    icos, isin = model.index_rotary(q_pos, dtype)
    per_layer = []
    for li, layer in enumerate(model.model.layers):
        att = layer.self_attn
        q = torch.randn(1, chunk, cfg.num_attention_heads, cfg.head_dim, generator=g).to(dtype)
        x = torch.randn(1, chunk, cfg.hidden_size, generator=g).to(dtype)
        kc, vc, ikc = cache.view(li, 0, n + chunk)
        iks = cache.index_scale(li, 0, n + chunk)
        per_layer.append((att, q, x, kc, vc, ikc, iks))

    def dense():
        for att, q, x, kc, vc, _, _ in per_layer:
            dsa.dense(q, kc, vc, q_pos, att.scale)

    def sparse():
        if selections is not None:
            selections.clear()
        if n + chunk <= topk:  # the model's shortcut: the selection would keep every key
            return dense()
        for att, q, x, kc, vc, ikc, iks in per_layer:
            if chunk == 1:  # what the model runs for a decode token: one matmul, then one fused DSA step
                qi, w = att.indexer.unrotated_queries_and_weights(x)
                _, idx = dsa.sparse_decode(qi, icos, isin, w, ikc, iks, q, kc, vc, att.scale, n, topk)
            else:
                qi, w = att.indexer.queries_and_weights(x, icos, isin)
                kw = {} if iks is None else {"k_scale": iks}
                idx = dsa.select_topk(qi, w, ikc, q_pos, topk, order="position", **kw)
                dsa.sparse(q, kc, vc, idx, att.scale)
            if selections is not None:
                selections.append(idx)

    return {"dense": dense, "sparse": sparse}


def step_fn(model: LlamaForCausalLM, cache, n: int, mode: str, topk: int) -> Callable[[], Any]:
    ids = torch.tensor([[7]])
    ctx = ForwardContext(slots=[0], starts=[n], modes=[mode], topks=[topk])
    return lambda: model(ids, cache, ctx, last_only=True)


def measure(model: LlamaForCausalLM, n: int, args, kv_dtype: torch.dtype | None) -> dict[str, Any]:
    topk = args.topk
    cache = fill_cache(model, n + 1, kv_dtype=kv_dtype)  # n cached tokens + the step's own row
    cache.lengths[0] = n
    cfg = model.config
    L = cfg.num_hidden_layers
    kv_row = cfg.num_key_value_heads * 2 * cfg.head_dim * cache.k[0].element_size()  # K + V bytes, one token
    ik_row = (cache.ik[0].shape[-1] * cache.ik[0].element_size() + (4 if cache.iks is not None else 0))
    wb = weight_bytes(model)
    sel = min(topk, n + 1)
    kv_read = L * (n + 1) * kv_row
    sparse_read = L * ((n + 1) * ik_row + sel * kv_row) if n + 1 > topk else kv_read
    with torch.inference_mode():
        att = attention_fns(model, cache, n, topk)
        fns = {"dense": step_fn(model, cache, n, "dense", topk), "sparse": step_fn(model, cache, n, "sparse", topk),
               "attn_dense": att["dense"], "attn_sparse": att["sparse"]}
        t = interleaved(fns, args.reps, warmup=1, max_seconds=args.max_seconds)
        extra: dict[str, float] = {}
        if not args.no_baselines:
            # the same attention without the C kernels: SDPA for dense, gathers + torch.topk for sparse
            def off(fn):
                def run():
                    with dsa.kernels.disabled():
                        fn()
                return run
            extra = interleaved({"attn_dense_torch": off(att["dense"]), "attn_sparse_torch": off(att["sparse"])},
                                max(3, args.reps // 2), warmup=1, max_seconds=args.max_seconds)
    row: dict[str, Any] = {
        "context": n,
        "dense_ms": 1e3 * t["dense"], "sparse_ms": 1e3 * t["sparse"],
        "speedup": t["dense"] / t["sparse"],
        "attention_dense_ms": 1e3 * t["attn_dense"], "attention_sparse_ms": 1e3 * t["attn_sparse"],
        "attention_speedup": t["attn_dense"] / t["attn_sparse"],
        "dense_tokens_per_s": 1 / t["dense"], "sparse_tokens_per_s": 1 / t["sparse"],
        "dense_attention_gbps": kv_read / t["attn_dense"] / 1e9,
        "bytes": {"weights_dense": wb["dense"], "weights_sparse": wb["sparse"], "kv_read_dense": kv_read,
                  "read_sparse_attention": sparse_read, "kv_bytes_per_token_layer": kv_row,
                  "index_bytes_per_token_layer": ik_row},
        "limit_speedup": (wb["dense"] + kv_read) / ((wb["sparse"] if n + 1 > topk else wb["dense"]) + sparse_read),
        "limit_attention_speedup": kv_read / (sparse_read + (wb["indexer_query"] if n + 1 > topk else 0)),
        "index_to_kv_bytes": ik_row / kv_row,
    }
    for k, v in extra.items():
        row[f"{k}_ms"] = 1e3 * v
    del cache
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="128k", help="cached tokens before the step, e.g. 128k or 2k,8k,32k")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="cap per context on the timing loop")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights")
    ap.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"], help="KV cache (default: weights)")
    ap.add_argument("--index-dtype", default="int8", choices=["int8", "float32", "bfloat16"])
    ap.add_argument("--no-baselines", action="store_true", help="skip the torch-only (no C kernel) attention runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = parse_positions(args.context)
    dtype = DTYPES[args.dtype]
    kv_dtype = DTYPES[args.kv_dtype] if args.kv_dtype else dtype
    model = reference_model(dtype, args.topk, max_pos=max(contexts) + 64, index_dtype=DTYPES[args.index_dtype])
    if dsa.kernels.available():
        print(f"C kernels: built ({'AVX-512 VNNI' if dsa.kernels.simd() else 'scalar'})", file=sys.stderr)
    else:
        print(f"C kernels unavailable ({dsa.kernels.build_error()}); torch paths only", file=sys.stderr)
    bw = stream_gbps()
    rows = []
    for n in contexts:
        print(f"  context {n} ...", file=sys.stderr, flush=True)
        rows.append(measure(model, n, args, kv_dtype))
        r = rows[-1]
        print(f"    dense {r['dense_ms']:.1f} ms  sparse {r['sparse_ms']:.1f} ms  -> {r['speedup']:.2f}x; attention "
              f"{r['attention_dense_ms']:.1f} / {r['attention_sparse_ms']:.2f} ms -> {r['attention_speedup']:.2f}x",
              file=sys.stderr, flush=True)
    info = machine_info()
    la = load_avg()
    print(f"\ndecode step, reference model ({SHAPE['layers']} layers, hidden {SHAPE['hidden']}, {SHAPE['heads']}x"
          f"{SHAPE['head_dim']} heads, {SHAPE['kv_heads']} kv heads, vocab {SHAPE['vocab']}), weights {args.dtype}, "
          f"KV {str(kv_dtype).replace('torch.', '')}, indexer keys {args.index_dtype}, top-k {args.topk}")
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, C kernels "
          f"{'on' if dsa.kernels.available() else 'off'}; read bandwidth now {bw:.1f} GB/s; load avg {la}")
    print(f"{'context':>8s} {'dense ms':>9s} {'sparse ms':>9s} {'speedup':>8s} {'(limit)':>8s} {'attn dense':>10s} "
          f"{'attn sparse':>11s} {'attn x':>7s} {'(limit)':>8s} {'dense GB/s':>10s} {'tok/s d/s':>12s}")
    for r in rows:
        print(f"{r['context']:>8d} {r['dense_ms']:9.1f} {r['sparse_ms']:9.1f} {r['speedup']:7.2f}x "
              f"{r['limit_speedup']:7.2f}x {r['attention_dense_ms']:10.2f} {r['attention_sparse_ms']:11.2f} "
              f"{r['attention_speedup']:6.2f}x {r['limit_attention_speedup']:7.2f}x {r['dense_attention_gbps']:10.2f} "
              f"{r['dense_tokens_per_s']:5.1f}/{r['sparse_tokens_per_s']:5.1f}")
    if any("attn_dense_torch_ms" in r for r in rows):
        print("without the C kernels (attention of all layers): " + "; ".join(
            f"{r['context']}: dense SDPA {r['attn_dense_torch_ms']:.1f} ms, "
            f"sparse torch {r['attn_sparse_torch_ms']:.1f} ms"
            for r in rows if "attn_dense_torch_ms" in r))
    r0 = rows[-1]
    print(f"indexer-key cache / KV cache bytes: {r0['index_to_kv_bytes']:.3f} "
          f"({r0['bytes']['index_bytes_per_token_layer']} B vs {r0['bytes']['kv_bytes_per_token_layer']} B per token "
          f"per layer); limits = byte ratios of a memory-bound step (weights + KV) / (weights + index keys + "
          f"{args.topk} rows)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    out = {"benchmark": "decode", "machine": info, "load_avg": la, "read_gbps": bw,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "shape": SHAPE, "dtype": args.dtype, "kv_dtype": str(kv_dtype).replace("torch.", ""),
           "index_dtype": args.index_dtype, "topk": args.topk, "kernels": dsa.kernels.available(),
           "speedup": r0["speedup"], "attention_speedup": r0["attention_speedup"], "context": r0["context"],
           "rows": rows}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
