"""`parca <subcommand>`: each subcommand is a thin call into the library.

Heavy imports (torch, the models) happen inside the handlers, so `parca --help` and `parca info` stay quick,
and transformers is never imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import ParcaError


def _add_model_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                       help="weight/compute dtype (default: the checkpoint's torch_dtype)")


def _add_sparse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default=None, choices=["dense", "sparse"],
                   help="attention mode (default: sparse for checkpoints that carry indexers, e.g. DeepSeek-V3.2; "
                        "else dense)")
    p.add_argument("--indexer", default=None, help="indexer adapter directory (from `parca indexer init` / `parca retrofit`)")
    p.add_argument("--index-topk", type=int, default=None, help="tokens each query selects (overrides the adapter's k)")


# ---- info -------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import estimate_memory, fmt_bytes
    from .config import load_config

    cfg = load_config(args.model)
    context = args.context or cfg.max_position_embeddings
    est = estimate_memory(cfg, context)
    info = {
        "model": str(args.model),
        "architecture": cfg.architecture,
        "family": cfg.family,
        "parameters": cfg.parameter_count(),
        "dtype": cfg.torch_dtype,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_context": cfg.max_position_embeddings,
        "rope": {"theta": cfg.rope_theta, "scaling": cfg.rope_scaling},
        "sliding_window": cfg.sliding_window,
        "kv_bytes_per_token_per_layer": cfg.kv_bytes_per_token_per_layer,
        "kv_bytes_per_token": cfg.kv_bytes_per_token,
        "sparse": cfg.sparse.to_dict() if cfg.sparse else None,
        "context": context,
        "memory": {"weights": est.weights, "cache": est.cache, "total": est.total,
                   "available": est.available, "fits": est.fits},
    }
    if cfg.sparse:
        info["index_bytes_per_token_per_layer"] = cfg.sparse.index_head_dim * 4
    deployed = None
    if "kv_lora_rank" in cfg.extra:  # MLA: also DeepSeek's deployed (fp8) layout, as the cost presets use it
        from . import cost

        deployed = {"kv_bytes_per_token_per_layer": cost.kv_bytes_per_token_per_layer(cfg, 1)}
        if cfg.sparse:
            deployed["index_bytes_per_token_per_layer"] = cost.indexer_bytes_per_token_per_layer(cfg.sparse, "fp8")
        info["fp8_layout"] = deployed
    if args.json:
        print(json.dumps(info))
        return 0
    lines = [
        f"model          {args.model}",
        f"architecture   {cfg.architecture} ({cfg.family})",
        f"parameters     {cfg.parameter_count() / 1e6:,.2f} M  ({cfg.torch_dtype})",
        f"layers         {cfg.num_hidden_layers}   hidden {cfg.hidden_size}   heads {cfg.num_attention_heads} "
        f"(kv {cfg.num_key_value_heads}) x {cfg.head_dim}",
        f"max context    {cfg.max_position_embeddings:,} tokens   rope theta {cfg.rope_theta:g}"
        + (f"  scaling {cfg.rope_scaling.get('rope_type')}" if cfg.rope_scaling else "")
        + (f"   sliding window {cfg.sliding_window}" if cfg.sliding_window else ""),
        f"KV cache       {cfg.kv_bytes_per_token_per_layer:,} B/token/layer   {cfg.kv_bytes_per_token:,} B/token (all layers)",
    ]
    if cfg.sparse:
        s = cfg.sparse
        lines.append(f"indexer        {s.index_n_heads} heads x {s.index_head_dim}, top-k {s.index_topk}, "
                     f"keys {s.index_head_dim * 4} B/token/layer (float32)")
    if deployed:
        lines.append(f"fp8 layout     latent {deployed['kv_bytes_per_token_per_layer']} B/token/layer (512 fp8 + 4 fp32 "
                     f"scales + 64 bf16 rope)" + (f" + indexer {deployed['index_bytes_per_token_per_layer']} B "
                                                  f"(128 fp8 + fp32 scale)" if cfg.sparse else ""))
    verdict = "fits" if est.fits else "does NOT fit"
    lines.append(f"memory @ {context:,} tokens: weights {fmt_bytes(est.weights)} + cache {fmt_bytes(est.cache)} = "
                 f"{fmt_bytes(est.total)}; available {fmt_bytes(est.available)} -> {verdict}")
    print("\n".join(lines))
    return 0


# ---- generate ---------------------------------------------------------------------------------
def _load(args: argparse.Namespace, context: int | None = None):
    from .checkpoint import attach_adapter, load_model
    from .tokenizer import Tokenizer

    model = load_model(args.model, device=args.device, dtype=args.dtype, context=context)
    if getattr(args, "indexer", None):
        attach_adapter(model, args.indexer, index_topk=args.index_topk)
    elif getattr(args, "index_topk", None) and model.sparse_config is not None:
        model.sparse_config.index_topk = args.index_topk
    tok = Tokenizer(args.model)
    return model, tok


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine, SamplingParams

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ParcaError(f"--prompt-file {path}: not found")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ParcaError(f"--prompt-file {path}: not UTF-8 text") from None
    else:
        prompt = args.prompt
    t_load = time.perf_counter()
    model, tok = _load(args)
    load_s = time.perf_counter() - t_load
    engine = Engine(model, tok, max_slots=1, price_per_hour=args.price_per_hour)
    ids = engine.encode_prompt(prompt, chat=args.chat)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [], index_topk=args.index_topk,
        attention=args.attention or ("sparse" if model.config.sparse is not None else "dense"),
    )
    result = None
    for ev in engine.stream(ids, params):
        if ev.result is not None:
            result = ev.result
        if not args.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    assert result is not None
    if args.json:
        out = {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "attention": result.attention, "usage": result.usage,
               "timings": {"load_s": load_s, **result.timings},
               "meter": result.meter.to_dict() if result.meter else None}
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        t = result.timings
        print(f"[{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens, {result.attention}; "
              f"prefill {t['prefill_s']:.2f}s, decode {t['decode_s']:.2f}s, finish: {result.finish_reason}]",
              file=sys.stderr)
        if result.meter is not None:
            m = result.meter
            print(f"[cost ${m.cost_usd:.3g} at ${m.price_per_hour:g}/h; dense would cost ${m.dense_cost_usd:.3g} "
                  f"(estimated); {m.flops / 1e9:.3g} GFLOP]", file=sys.stderr)
    return 0


# ---- indexer ----------------------------------------------------------------------------------
def cmd_indexer_init(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_adapter
    from .train import default_sparse_config, init_indexers, synthetic_calibration
    from .train.init import derived_supported

    model = load_model(args.model, device="cpu")
    method = args.init
    if method == "auto":  # derived where the model's shapes allow it (it measured better), else random
        hd = model.config.head_dim
        fits = (args.index_head_dim in (None, hd)) and (args.index_rope_dim in (None, hd))
        method = "derived" if fits and derived_supported(model.config) else "random"
    sc = default_sparse_config(model.config, method, n_heads=args.index_n_heads, head_dim=args.index_head_dim,
                               rope_dim=args.index_rope_dim, topk=args.index_topk)
    calib = synthetic_calibration(args.model) if method == "derived" else None
    init_indexers(model, sc, method, args.seed, calibration=calib)
    save_adapter(model, args.out, extra={"init": method, "seed": args.seed})
    n = sum(t.numel() for t in model.indexer_state_dict().values())
    print(f"wrote {args.out}: {model.config.num_hidden_layers} layers x {sc.index_n_heads} heads x {sc.index_head_dim}, "
          f"top-k {sc.index_topk}, {n:,} parameters ({method} init, seed {args.seed})")
    return 0


def cmd_indexer_merge(args: argparse.Namespace) -> int:
    from .train import merge_adapter

    out = merge_adapter(args.model, args.indexer, args.out)
    print(f"wrote {out}: {args.model} with the indexers of {args.indexer} (DeepSeek tensor names, index_* in config.json)")
    return 0


# ---- cost -------------------------------------------------------------------------------------
def cmd_cost(args: argparse.Namespace) -> int:
    from . import cost

    positions = cost.parse_positions(args.positions)
    if (args.model is None) == (args.preset is None):
        raise ParcaError("give exactly one of --model DIR or --preset NAME")
    assumptions = None
    if args.preset:
        cfg, sc, assumptions = cost.preset(args.preset)
    else:
        from .checkpoint import read_adapter_config
        from .config import SparseConfig, load_config

        cfg = load_config(args.model)
        sc = cfg.sparse
        if args.indexer:
            sc = SparseConfig.from_dict(read_adapter_config(args.indexer))
    if args.index_topk is not None:
        if sc is None:
            raise ParcaError("--index-topk needs a model with indexers (--indexer ADIR or a DSA checkpoint)")
        sc.index_topk = args.index_topk
    device = cost.get_device(args.hardware)
    print(cost.cost_report(cfg, sc, positions, device, args.price_per_hour, assumptions=assumptions,
                           as_json=args.json, paper=bool(args.preset)))
    return 0


# ---- demo -------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .cost import parse_positions
    from .demo import run_demo

    run_demo(args.model, args.indexer, context=parse_positions(args.context)[0] if args.context else None,
             quick=args.quick, positions=parse_positions(args.positions) if args.positions else None,
             price_per_hour=args.price_per_hour, out=args.out, seed=args.seed, progress=not args.no_progress)
    return 0


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parca", description="Frugal long-context inference with DeepSeek Sparse Attention.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="architecture, sizes, KV-cache bytes and memory fit, from config.json alone")
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    p.add_argument("--context", type=int, default=None, help="tokens to size the cache for (default: max context)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the whole story on the shipped model: facts in a long document asked dense "
                                    "and sparse, cost per token position, a report")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--indexer", default=None, help="indexer adapter (default: the shipped one)")
    p.add_argument("--context", default=None, help="document length, e.g. 8k (default 8k; 2k with --quick)")
    p.add_argument("--positions", default=None, help="cost-curve positions (default 1k,4k,16k,64k)")
    p.add_argument("--quick", action="store_true", help="short documents and a short curve (about a minute)")
    p.add_argument("--price-per-hour", type=float, default=1.0, help="USD per machine-hour (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="parca-demo", help="report directory (default parca-demo)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="complete a prompt (streams to the terminal)")
    _add_model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, usage, timings, meter")
    p.add_argument("--price-per-hour", type=float, default=1.0, help="USD per machine-hour for the meter (default 1.0)")
    _add_sparse_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("indexer", help="indexer adapters")
    isub = p.add_subparsers(dest="indexer_command", metavar="ACTION", required=True)
    q = isub.add_parser("init", help="a fresh indexer set for a model (untrained), saved as an adapter")
    q.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    q.add_argument("--out", required=True, help="adapter directory to write")
    q.add_argument("--init", default="auto", choices=["auto", "derived", "random"],
                   help="derived: from the model's own q/k projections (needs index head dim = model head dim; "
                        "measured better); random: nn.Linear init; auto (default): derived where possible")
    q.add_argument("--index-n-heads", type=int, default=None, help="default 4")
    q.add_argument("--index-head-dim", type=int, default=None, help="default: the model's head dim for derived, else 64")
    q.add_argument("--index-rope-dim", type=int, default=None, help="leading dims with RoPE (derived: the head dim)")
    q.add_argument("--index-topk", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_indexer_init)
    q = isub.add_parser("merge", help="a full checkpoint with an adapter's indexers built in (DeepSeek tensor names)")
    q.add_argument("--model", default=None, help="Hugging Face model directory (default: the shipped model)")
    q.add_argument("--indexer", required=True, help="adapter directory")
    q.add_argument("--out", required=True, help="new (or empty) directory to write")
    q.set_defaults(func=cmd_indexer_merge)

    p = sub.add_parser("cost", help="analytic cost per token position, dense vs sparse ($ per M tokens)")
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default=None, help="deepseek-v3.2 or deepseek-v3.1-terminus")
    p.add_argument("--indexer", default=None)
    p.add_argument("--index-topk", type=int, default=None)
    p.add_argument("--hardware", default="h800", help="h800, h100, h200, a100, or cpu (this machine, calibrated)")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="USD per device-hour (default 2.0)")
    p.add_argument("--positions", default="1k,8k,32k,64k,128k")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)

    # Subcommands that live beside their library code register themselves (their modules import no torch
    # at import time): each has ``register(subparsers)``.
    import importlib

    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


SUBCOMMAND_MODULES: list[str] = ["parca.evals.cli", "parca.bench.cli", "parca.train_cli", "parca.server_cli"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"parca {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .assets import apply_defaults

        apply_defaults(args)
        return int(args.func(args) or 0)
    except ParcaError as e:
        print(f"parca: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parca: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
