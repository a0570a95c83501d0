"""Decode tokens/s of the reference model at long context: parca dense, parca sparse (DSA) and llama.cpp, same
weights, same thread count, comparing on token ids. Prints a card, then ONE JSON line (``speedup`` = parca dense
/ parca sparse step time, ``sparse_vs_llamacpp`` = llama.cpp / parca sparse step time).

    pip install llama-cpp-python gguf          # optional, benchmark only (llama-cpp-python compiles llama.cpp)
    python benchmarks/vs_llamacpp.py --context 8k,32k [--threads 2]
    python benchmarks/vs_llamacpp.py --context 8k,32k,128k --allow-128k   # llama.cpp really prefills 128K: slow

The reference model (benchmarks/decode.py: 8 layers, hidden 512, 8 x 64 heads, 2 KV heads, vocab 32000, float32,
random weights) is written to a GGUF with the ``gguf`` package's writer (llama architecture, a dummy SPM vocabulary:
both sides run on token ids) and checked: llama.cpp's logits for a short prompt must match parca's dense logits.
llama.cpp prefills the whole context for real (its decode cost is measured on its own KV cache); parca fills its
cache with random keys/values (a decode step's cost does not depend on them). Decode steps of the three runners are
interleaved, medians reported.

Why llama.cpp is the bar: it is the standard CPU runtime, with hand-written SIMD kernels and a compact f16 KV
cache (``--llama-kv f16``, its default). Flash attention is on by default (faster prefill; ``--no-flash-attn``
for the other setting, whose decode is faster at long context here: report the better one). It has no sparse
attention, so its step time grows with the context like parca dense does; the crossover where parca sparse wins
and the ratio at each length are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402
# Threads that wait PASSIVELY (sleep) instead of spinning: on a 2-core machine shared with other work, spinning
# OpenMP threads fight every other process for the cores and each parallel region then waits for a preempted
# thread (measured, 2 threads, load 5: a 32K decode step 380 ms spinning vs 88 ms passive). Must be set before
# torch loads libgomp; set OMP_WAIT_POLICY yourself to override (the JSON records it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import DTYPES, SHAPE, fill_cache, load_avg, reference_model, step_fn  # noqa: E402

from parca import sparse as dsa  # noqa: E402
from parca.bench.common import machine_info  # noqa: E402
from parca.cost import parse_positions  # noqa: E402


def need_optional() -> tuple[Any, Any]:
    missing = []
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        missing.append("llama-cpp-python")
    try:
        import gguf  # noqa: F401
    except ImportError:
        missing.append("gguf")
    if missing:
        sys.exit(f"vs_llamacpp.py: missing optional package(s) {', '.join(missing)}; install them for this benchmark "
                 f"only: {sys.executable} -m pip install {' '.join(missing)}  (llama-cpp-python compiles llama.cpp: "
                 "minutes)")
    import gguf
    import llama_cpp

    return llama_cpp, gguf


# ------------------------------------------------------------------------------------------- GGUF export
def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF/parca rotate-half RoPE -> GGML's llama (interleaved-pair) layout: the permutation llama.cpp's own
    converter applies to q_proj / k_proj rows."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, 2, out_dim // n_head // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def write_gguf(model, path: Path, gguf, ftype: str = "f32") -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("parca-reference-random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    # a dummy SPM vocabulary: <unk> <s> </s>, the 256 byte tokens, then fillers (we compare on token ids)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_fill = cfg.vocab_size - len(toks)
    toks += [f"\u2581t{i}" for i in range(n_fill)]
    types += [gguf.TokenType.NORMAL] * n_fill
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(n_fill)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def add(name: str, t: torch.Tensor, permute_heads: int | None = None) -> None:
        a = t.detach().float().numpy()
        if permute_heads:
            a = _permute_qk(a, permute_heads)
        if ftype == "f16" and a.ndim == 2:
            a = a.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(a))

    m = model.model
    add("token_embd.weight", m.embed_tokens.weight)
    for i, layer in enumerate(m.layers):
        at, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.attn_q.weight", at.q_proj.weight, cfg.num_attention_heads)
        add(f"blk.{i}.attn_k.weight", at.k_proj.weight, cfg.num_key_value_heads)
        add(f"blk.{i}.attn_v.weight", at.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", at.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
    add("output_norm.weight", m.norm.weight)
    add("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------------- measurement
def open_llama(llama_cpp, path: Path, n_ctx: int, args) -> Any:
    kw: dict[str, Any] = dict(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=args.llama_batch, n_ubatch=args.llama_batch,
                              logits_all=False, verbose=False, seed=0, flash_attn=args.flash_attn)
    if args.llama_kv != "f16":
        types = {"f32": 0, "q8_0": 8}
        kw.update(type_k=types[args.llama_kv], type_v=types[args.llama_kv])
    return llama_cpp.Llama(**kw)


def check_same_model(model, llm) -> float:
    """Max |logit difference| between parca (dense, float32) and llama.cpp on a short prompt (the last token)."""
    ids = list(range(300, 340))
    with torch.inference_mode():
        want = model(torch.tensor([ids]), None, None, last_only=True)[0, -1].float().numpy()
    llm.reset()
    llm.eval(ids)  # one batch: llama.cpp keeps the logits of its last token
    got = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32).copy()
    llm.reset()
    return float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))


def measure(model, llm, n: int, args, kv_dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    prompt = torch.randint(300, model.config.vocab_size, (n,), generator=g).tolist()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)  # llama.cpp's real prefill of the whole context
    prefill_s = time.perf_counter() - t0
    cache = fill_cache(model, n + args.steps + 8, kv_dtype=kv_dtype)
    cache.lengths[0] = n
    times: dict[str, list[float]] = {"parca_dense": [], "parca_sparse": [], "llamacpp": []}
    tok = 777
    with torch.inference_mode():
        dense_fn = step_fn(model, cache, n, "dense", args.topk)
        sparse_fn = step_fn(model, cache, n, "sparse", args.topk)
        dense_fn(), sparse_fn()  # warm-up
        llm.eval([tok])
        for _ in range(args.steps):
            for name, fn in (("parca_dense", dense_fn), ("parca_sparse", sparse_fn),
                             ("llamacpp", lambda: llm.eval([tok]))):
                t1 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    del cache
    return {
        "context": n, "llamacpp_prefill_s": prefill_s, "llamacpp_prefill_tokens_per_s": n / prefill_s,
        **{f"{k}_ms": 1e3 * v for k, v in med.items()},
        **{f"{k}_tokens_per_s": 1 / v for k, v in med.items()},
        "speedup": med["parca_dense"] / med["parca_sparse"],
        "sparse_vs_llamacpp": med["llamacpp"] / med["parca_sparse"],
        "dense_vs_llamacpp": med["llamacpp"] / med["parca_dense"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="8k,32k")
    ap.add_argument("--allow-128k", action="store_true", help="permit contexts above 64K (llama.cpp prefills them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9, help="decode steps per runner (interleaved), median reported")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32"], help="parca weights (the GGUF is F32 too)")
    ap.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"], help="parca KV cache")
    ap.add_argument("--gguf-dtype", default="f32", choices=["f32", "f16"], help="llama.cpp weights")
    ap.add_argument("--llama-kv", default="f16", choices=["f16", "f32", "q8_0"], help="llama.cpp KV cache type")
    ap.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                    help="llama.cpp without flash attention (measured slower here: 8K decode 27.9 vs 31.0 tok/s, "
                         "prefill 211 vs 495 tok/s)")
    ap.add_argument("--llama-batch", type=int, default=512, help="llama.cpp n_batch / n_ubatch for the prefill")
    ap.add_argument("--gguf", default=None, help="reuse / keep the GGUF at this path")
    args = ap.parse_args()
    llama_cpp, gguf = need_optional()
    contexts = parse_positions(args.context)
    if max(contexts) > 65536 and not args.allow_128k:
        sys.exit("vs_llamacpp.py: contexts above 64K make llama.cpp prefill for many minutes; pass --allow-128k")
    torch.set_num_threads(args.threads)
    kv_dtype = DTYPES[args.kv_dtype] if args.kv_dtype else DTYPES[args.dtype]
    n_ctx = max(contexts) + args.steps + 64
    model = reference_model(DTYPES[args.dtype], args.topk, max_pos=max(n_ctx, 4096))
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.gguf) if args.gguf else Path(tmp.name) / "parca-reference.gguf"
    if not path.exists():
        write_gguf(model, path, gguf, args.gguf_dtype)
    llm = open_llama(llama_cpp, path, n_ctx, args)
    err = check_same_model(model, llm)
    print(f"  GGUF {path} ({path.stat().st_size / 2**20:.0f} MiB); llama.cpp vs parca logits: max rel diff {err:.2e}",
          file=sys.stderr, flush=True)
    if err > (1e-3 if args.gguf_dtype == "f32" and args.llama_kv == "f32" else 3e-2):
        sys.exit(f"vs_llamacpp.py: llama.cpp's logits differ from parca's (rel {err:.3g}): the GGUF is not the same "
                 "model; refusing to compare speeds")
    rows = []
    for n in contexts:
        print(f"  context {n}: llama.cpp prefill, then {args.steps} interleaved decode steps ...", file=sys.stderr,
              flush=True)
        rows.append(measure(model, llm, n, args, kv_dtype))
        r = rows[-1]
        print(f"    tok/s dense {r['parca_dense_tokens_per_s']:.1f}  sparse {r['parca_sparse_tokens_per_s']:.1f}  "
              f"llama.cpp {r['llamacpp_tokens_per_s']:.1f}", file=sys.stderr, flush=True)
    info = machine_info()
    la = load_avg()
    import llama_cpp as lc

    print(f"\ndecode tokens/s, reference model (random, {SHAPE['layers']} layers, hidden {SHAPE['hidden']}, "
          f"{SHAPE['heads']}x{SHAPE['head_dim']} heads, {SHAPE['kv_heads']} kv heads, vocab {SHAPE['vocab']}), "
          f"{args.threads} threads each")
    print(f"parca: weights float32, KV {str(kv_dtype).replace('torch.', '')}, indexer keys int8, top-k {args.topk}, "
          f"C kernels {'on' if dsa.kernels.available() else 'off'}; llama.cpp (llama-cpp-python {lc.__version__}): "
          f"GGUF {args.gguf_dtype}, KV {args.llama_kv}, flash-attn {'on' if args.flash_attn else 'off'}; "
          f"logits check rel {err:.1e}")
    print(f"{info['cpu']}, torch {info['torch']}; load avg {la}")
    print(f"{'context':>8s} {'parca dense':>12s} {'parca sparse':>13s} {'llama.cpp':>10s} {'sparse/llama':>13s} "
          f"{'dense/llama':>12s} {'llama prefill tok/s':>20s}")
    for r in rows:
        print(f"{r['context']:>8d} {r['parca_dense_tokens_per_s']:12.1f} {r['parca_sparse_tokens_per_s']:13.1f} "
              f"{r['llamacpp_tokens_per_s']:10.1f} {r['sparse_vs_llamacpp']:12.2f}x {r['dense_vs_llamacpp']:11.2f}x "
              f"{r['llamacpp_prefill_tokens_per_s']:20.0f}")
    r0 = rows[-1]
    out = {"benchmark": "vs_llamacpp", "machine": info, "load_avg": la, "shape": SHAPE, "threads": args.threads,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "kv_dtype": str(kv_dtype).replace("torch.", ""), "topk": args.topk, "gguf_dtype": args.gguf_dtype,
           "llamacpp_kv": args.llama_kv, "flash_attn": args.flash_attn, "llama_cpp_python": lc.__version__,
           "logits_rel_diff": err, "speedup": r0["speedup"], "sparse_vs_llamacpp": r0["sparse_vs_llamacpp"],
           "context": r0["context"], "rows": rows}
    print(json.dumps(out))
    del llm
    tmp.cleanup()


if __name__ == "__main__":
    main()
