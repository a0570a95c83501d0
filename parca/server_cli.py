"""`parca serve`: the OpenAI-compatible server (parca/server/) from the command line.

    parca serve --model DIR [--indexer ADIR] [--index-topk K] [--attention sparse|dense] [--host 127.0.0.1]
                [--port 8000] [--api-key KEY] [--price-per-hour X] [--max-queue N] [--max-batch-tokens N]
                [--cache-memory SIZE] [--max-model-len N] [--max-slots N] [--device cpu] [--dtype bfloat16]

Registered by parca/cli.py (``SUBCOMMAND_MODULES``). Imports neither torch nor fastapi at import time.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from .errors import ParcaError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '512MiB', '1.5G', '4096' (bytes). SI units are powers of 10, *iB of 2."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ParcaError(f"size {text!r}: expected a number with an optional unit, e.g. 2GiB, 512MiB, 1.5GB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ParcaError(f"size {text!r} must be positive")
    return n


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve a model over an OpenAI-compatible API. Binds 127.0.0.1 unless --host says otherwise; "
                    "every response's usage carries parca's meter in usage.parca (cost, dense counterfactual).")
    p.add_argument("--model", default=None, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send and /v1/models lists (default: the model directory's name)")
    p.add_argument("--indexer", default=None, help="indexer adapter directory (from `parca indexer init` / "
                                                   "`parca retrofit`); needed for sparse attention")
    p.add_argument("--index-topk", type=int, default=None, help="tokens each sparse query selects (default: the "
                                                               "indexer's)")
    p.add_argument("--attention", default=None, choices=["dense", "sparse"],
                   help="default attention of requests without an 'attention' field (default: sparse when "
                        "indexers are loaded, else dense)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("PARCA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PARCA_API_KEY, else no key)")
    p.add_argument("--price-per-hour", type=float, default=1.0,
                   help="USD per machine-hour for the per-request meter (default 1.0, a placeholder)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting for a slot before 429 (default 1024)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="tokens per engine step, decode rows + prefill chunks (default prefill chunk + slots)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward (default 2048)")
    p.add_argument("--cache-memory", default=None,
                   help="KV + indexer-key cache budget, e.g. 2GiB, 512MiB; sets the number of slots of "
                        "--max-model-len tokens (default: --max-slots slots)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together when --cache-memory is "
                                                             "not given (default 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: the model's context)")
    p.add_argument("--prefix-block", type=int, default=32, help="tokens per prefix-cache block (0 = off; default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weight/compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--meter-device", default=None,
                   help="roofline the meter's dense counterfactual uses: cpu (this machine, calibrated), h800, h100, "
                        "h200, a100 (default: cpu, or the preset matching the GPU's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info, with one access line per request)")
    p.set_defaults(func=cmd_serve)


def _check_cache_fits(model: Any, slots: int, max_len: int, device: str) -> None:
    from .checkpoint import available_memory_bytes, fmt_bytes

    need = model.cache_spec().bytes_per_token() * max_len * slots
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory_bytes()
    if need > free:
        raise ParcaError(f"{slots} cache slots of {max_len} tokens need {fmt_bytes(need)} but {fmt_bytes(free)} is "
                         f"free; lower --max-model-len or --max-slots, or set --cache-memory")


def _meter_device(args: argparse.Namespace) -> str:
    if args.meter_device:
        return args.meter_device
    if args.device == "cpu":
        return "cpu"
    import torch

    from . import cost

    gpu = torch.cuda.get_device_name(torch.device(args.device)).lower()
    name = next((n for n in cost.DEVICES if n in gpu), None)
    if name is None:
        raise ParcaError(f"no cost preset matches GPU {gpu!r}; pass --meter-device (one of "
                         f"{', '.join(sorted(cost.DEVICES))})")
    return name


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import attach_adapter, load_model
    from .config import load_config
    from .engine import Engine
    from .server import serve
    from .tokenizer import Tokenizer

    if args.model is None:
        raise ParcaError("--model DIR is required")
    for flag, v in (("--port", args.port), ("--max-queue", args.max_queue), ("--max-slots", args.max_slots)):
        if v is None or v < 0 or (flag != "--port" and v == 0):
            raise ParcaError(f"{flag} must be {'>= 0' if flag == '--port' else 'positive'}, got {v}")
    if args.index_topk is not None and args.index_topk < 1:
        raise ParcaError(f"--index-topk must be >= 1, got {args.index_topk}")
    cfg = load_config(args.model)
    max_len = args.max_model_len or cfg.max_position_embeddings
    if not 1 < max_len <= cfg.max_position_embeddings:
        raise ParcaError(f"--max-model-len must be in 2..{cfg.max_position_embeddings} (the model's context), "
                         f"got {max_len}")
    cache_memory = parse_size(args.cache_memory) if args.cache_memory else None
    model = load_model(args.model, device=args.device, dtype=args.dtype, context=max_len)
    if args.indexer:
        attach_adapter(model, args.indexer, index_topk=args.index_topk)
    elif args.index_topk is not None:
        if model.sparse_config is None:
            raise ParcaError("--index-topk needs indexers: pass --indexer ADIR or a checkpoint with indexers")
        model.sparse_config.index_topk = args.index_topk
    if cache_memory is None:
        _check_cache_fits(model, args.max_slots, max_len, args.device)
    engine = Engine(model, Tokenizer(args.model), max_slots=args.max_slots, max_len=max_len,
                    prefill_chunk=args.prefill_chunk, max_batch_tokens=args.max_batch_tokens,
                    cache_memory=cache_memory, max_queue=args.max_queue, prefix_block=args.prefix_block,
                    price_per_hour=args.price_per_hour, meter_device=_meter_device(args))
    name = args.served_model_name or Path(args.model).resolve().name
    serve(engine, name, host=args.host, port=args.port, api_key=args.api_key or None,
          default_attention=args.attention, aliases=[str(args.model)], log_level=args.log_level,
          print_fn=lambda s: print(s, flush=True))
    return 0
