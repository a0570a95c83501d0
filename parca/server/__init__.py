"""OpenAI-compatible HTTP server over the engine: thin routes, one engine thread.

    app = create_app(engine, "my-model", api_key="sk-...")      # FastAPI app
    serve(engine, "my-model", host="127.0.0.1", port=8000)       # blocking; Ctrl-C stops
    with ServerThread(app) as srv: ... srv.url ...              # in the background (tests, notebooks)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming, stream_options
include_usage), POST /tokenize and /detokenize (vLLM shapes), GET /metrics (Prometheus text), GET /health.

Extra request fields (the openai client's ``extra_body``): ``attention`` ("dense" | "sparse"), ``index_topk``,
``top_k``, ``ignore_eos``, ``stop_token_ids`` (added to the EOS ids), ``return_token_ids`` (choices carry
``token_ids``, the response ``prompt_token_ids``, as vLLM does).

Where the meter is: ``usage["parca"]`` -- cost_usd, dense_cost_usd (the dense counterfactual), savings,
attention, seconds, prefill_s, decode_s, ttft_s, e2e_s, flops, dense_flops, bytes, dense_bytes,
price_per_hour. Usage also carries DeepSeek's ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``.

Threading: the engine is not thread-safe, so ONE thread (``EngineRunner``) loops ``engine.step()`` while there
is work and sleeps on an Event otherwise; handlers submit/cancel (safe from any thread) and receive their
events through per-request asyncio queues (``loop.call_soon_threadsafe``). Every other model forward -- the
log-probability passes -- runs as a job on that same thread, between steps: never two forwards at once.

Log-probabilities (the engine does not return them): after generation the server runs one chunked forward over
prompt + completion in the request's attention mode with a temporary cache (``score_tokens``) and reads the
log-softmax at every position. That is exact for greedy decoding and reports the model's raw (temperature-free)
distribution for sampled tokens; echo + logprobs + max_tokens=0 scores a prompt without generating
(lm-eval-harness's loglikelihood requests). Streaming responses do not carry logprobs (400).
"""

from __future__ import annotations

from .app import create_app
from .metrics import ServerMetrics
from .run import ServerThread, serve
from .runner import EngineRunner, score_tokens
from .schemas import APIError

__all__ = ["APIError", "EngineRunner", "ServerMetrics", "ServerThread", "create_app", "score_tokens", "serve"]
