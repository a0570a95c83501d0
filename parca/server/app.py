"""The FastAPI app: routes over the engine runner (``create_app``)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, GenerationResult, SamplingParams, StreamEvent
from ..errors import ParcaError
from .metrics import METER_FIELDS, ServerMetrics
from .runner import EngineRunner, score_tokens
from .schemas import (APIError, _api_error, _ChatRequest, _CompletionRequest, _DetokenizeRequest, _parse,
                      _TokenizeRequest)

log = logging.getLogger("parca.server")


# ---- the app ------------------------------------------------------------------------------------------
class _Disconnected(Exception):
    pass


class _Batch:
    """The engine requests of one HTTP request (one per prompt) and the queue their events arrive on."""

    def __init__(self, runner: EngineRunner, request: Any) -> None:
        self.runner, self.request = runner, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: dict[int, int] = {}
        self.done: set[int] = set()
        self.checked = time.monotonic()

    def submit(self, index: int, ids: list[int], params: SamplingParams) -> None:
        put = self.queue.put_nowait
        self.rids[index] = self.runner.submit(
            ids, params, lambda ev: self.loop.call_soon_threadsafe(put, (index, ev)))

    async def next(self) -> tuple[int, StreamEvent]:
        while True:
            # look for a gone client every 0.25 s, whether or not events keep coming
            if time.monotonic() - self.checked > 0.25:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    raise _Disconnected()
            try:
                index, ev = await asyncio.wait_for(self.queue.get(), 0.25)
            except asyncio.TimeoutError:
                continue
            if isinstance(ev, Exception):
                raise ev
            if ev.result is not None:
                self.done.add(index)
            return index, ev

    def close(self) -> None:
        """Cancel whatever has not finished (client gone, error, shutdown): frees the cache slots."""
        for i, rid in self.rids.items():
            if i not in self.done:
                self.runner.cancel(rid)
        self.done.update(self.rids)


@dataclass
class _Prep:
    """A parsed request, ready for the engine."""

    prompts: list[list[int]]
    texts: list[str | None]  # the prompt text (for echo), None when token ids were given
    params: SamplingParams
    max_tokens: int


def _sum_meters(meters: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not meters:
        return None
    out: dict[str, Any] = {"attention": meters[0]["attention"] if len({m["attention"] for m in meters}) == 1
                           else "mixed", "price_per_hour": meters[0]["price_per_hour"]}
    for f in METER_FIELDS:
        out[f] = sum(m[f] for m in meters)
    out["dense_seconds"] = out.pop("dense_prefill_s") + out.pop("dense_decode_s")
    out["savings"] = 0.0 if out["dense_cost_usd"] <= 0 else 1 - out["cost_usd"] / out["dense_cost_usd"]
    out["ttft_s"] = max(m["ttft_s"] for m in meters)
    out["e2e_s"] = max(m["e2e_s"] for m in meters)
    return out


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, default_attention: str | None = None,
               max_model_len: int | None = None, aliases: Sequence[str] = (), default_max_tokens: int = 16) -> Any:
    """The FastAPI app over ``engine`` (its engine thread starts and stops with the app's lifespan).

    Args:
        engine: an Engine with a fixed ``max_len`` (its cache exists before the first request).
        model_name: the id /v1/models lists; requests naming another model (and not in ``aliases``) get 404.
        api_key: when set, /v1/* and /tokenize need ``Authorization: Bearer <key>`` (401 otherwise).
        default_attention: for requests without an ``attention`` field; default sparse when the model has indexers.
        max_model_len: prompt + max_tokens limit (default: the engine's slot length, within the model's context).
        default_max_tokens: completions' max_tokens when unset (OpenAI's 16); chat defaults to the context left.
    """
    if engine.cache is None or engine.fixed_len is None:
        raise ParcaError("serving needs an Engine with a fixed max_len (its cache is made up front): "
                         "Engine(model, tokenizer, max_len=N, ...)")
    has_indexers = getattr(engine.model, "sparse_config", None) is not None
    if default_attention is None:
        default_attention = "sparse" if has_indexers else "dense"
    if default_attention not in ("dense", "sparse"):
        raise ParcaError(f"default attention must be dense or sparse, got {default_attention!r}")
    if default_attention == "sparse" and not has_indexers:
        raise ParcaError("--attention sparse needs indexers: pass --indexer ADIR (an adapter from `parca indexer "
                         "init` / `parca retrofit`) or serve a checkpoint with indexers")
    limit = min(engine.fixed_len, engine.context_limit, max_model_len or engine.fixed_len)
    metrics = ServerMetrics(model_name)
    runner = EngineRunner(engine, metrics)
    tok = engine.tokenizer
    vocab = engine.model.config.vocab_size
    created = int(time.time())
    names = {model_name, *aliases}

    @asynccontextmanager
    async def lifespan(app: Any):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="parca", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.runner, app.state.metrics = engine, runner, metrics
    app.state.model_name, app.state.max_model_len = model_name, limit
    app.state.default_attention = default_attention

    def err(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _h_api(request: Request, e: APIError):
        return err(e)

    @app.exception_handler(ParcaError)
    async def _h_parca(request: Request, e: ParcaError):
        return err(_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _h_http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return err(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _h_valid(request: Request, e: RequestValidationError):
        return err(APIError(422, str(e.errors()[:1])))

    @app.exception_handler(_Disconnected)
    async def _h_gone(request: Request, e: _Disconnected):
        return JSONResponse({}, status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _h_any(request: Request, e: Exception):
        log.error("unhandled error:\n%s", traceback.format_exc())
        return err(_api_error(e))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(dependencies=[Depends(check_key)])

    # -- helpers
    def check_model(name: str | None) -> None:
        if name and name not in names:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def encode_text(text: str) -> list[int]:
        if tok is None:
            raise APIError(400, "this server has no tokenizer: send token ids as the prompt", param="prompt")
        return tok.encode(text, add_special_tokens=True)

    def encode_messages(messages: list[Any]) -> list[int]:
        if tok is None:
            raise APIError(400, "this server has no tokenizer, so no chat template", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                bad = [p.type for p in content if p.type != "text"]
                if bad:
                    raise APIError(400, f"messages.{i}.content: only text parts are supported, got {bad[0]!r}",
                                   param=f"messages.{i}.content")
                content = "".join(p.text or "" for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        return tok.encode_chat(msgs)

    def prepare(req: Any, prompts: list[list[int]], texts: list[str | None], max_tokens: int | None,
                param: str) -> _Prep:
        if req.n not in (None, 1):
            raise APIError(400, f"n must be 1 (parca returns one choice per prompt), got {req.n}", param="n")
        if getattr(req, "best_of", None) not in (None, 1):
            raise APIError(400, "best_of is not supported (must be 1)", param="best_of")
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(req, f):
                raise APIError(400, f"{f} is not supported (must be 0)", param=f)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if getattr(req, "suffix", None):
            raise APIError(400, "suffix is not supported", param="suffix")
        attention = req.attention or default_attention
        if attention == "sparse" and not has_indexers:
            raise APIError(400, "attention 'sparse' needs indexers, and this server has none (serve with "
                                "--indexer ADIR); use attention 'dense'", param="attention")
        for p in prompts:
            if not p:
                raise APIError(400, "empty prompt: nothing to condition on", param=param)
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)
        longest = max(len(p) for p in prompts)
        if max_tokens is None:  # completions: OpenAI's default, within the context that is left
            max_tokens = min(default_max_tokens, max(0, limit - longest))
        if longest + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the {param}, {max_tokens} for the "
                                f"completion). Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop_ids = None
        if req.stop_token_ids:
            stop_ids = sorted(engine.eos_ids | set(req.stop_token_ids))
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), seed=req.seed,
            stop=stop, stop_token_ids=stop_ids, ignore_eos=req.ignore_eos, attention=attention,
            index_topk=req.index_topk)
        try:
            params.validate()
        except ParcaError as e:
            raise APIError(400, str(e)) from None
        return _Prep(prompts, texts, params, max_tokens)

    def topk_of(params: SamplingParams) -> int | None:
        if params.attention != "sparse":
            return None
        return params.index_topk or engine.model.sparse_config.index_topk

    async def score(ids: list[int], params: SamplingParams, top_n: int) -> tuple[list, list, float]:
        def job():
            t0 = time.perf_counter()
            lp, top = score_tokens(engine.model, ids, mode=params.attention, topk=topk_of(params), top_n=top_n,
                                   chunk=engine.prefill_chunk, max_chunk_bytes=engine.max_chunk_bytes)
            return lp, top, time.perf_counter() - t0
        return await asyncio.wrap_future(runner.call(job))

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False) if tok is not None else ""

    def nothing(ids: list[int], params: SamplingParams) -> GenerationResult:
        """The result of a request with max_tokens 0 (never sent to the engine)."""
        return GenerationResult(request_id=-1, text="", token_ids=[], prompt_tokens=len(ids), finish_reason="length",
                                attention=params.attention)

    def top_dict(top: list[tuple[int, float]]) -> dict[str, float]:
        # tokens that decode alike (e.g. partial UTF-8 bytes, all "\ufffd") share a key: keep the likelier one
        d: dict[str, float] = {}
        for t, lp in top:
            d.setdefault(token_str(t), lp)
        return d

    async def run(request: Request, prep: _Prep) -> list[GenerationResult]:
        """Non-streaming: every prompt through the engine; cancels on disconnect."""
        batch = _Batch(runner, request)
        results: dict[int, GenerationResult] = {}
        try:
            for i, ids in enumerate(prep.prompts):
                batch.submit(i, ids, prep.params)
            while len(results) < len(prep.prompts):
                i, ev = await batch.next()
                if ev.result is not None:
                    results[i] = ev.result
        finally:
            batch.close()
        return [results[i] for i in range(len(prep.prompts))]

    def usage(prompt_tokens: int, completion_tokens: int, cached: int, meters: list[dict[str, Any]]) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
                "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached,
                "parca": _sum_meters(meters)}

    def usage_of(results: list[GenerationResult], extra_meters: Sequence[dict] = ()) -> dict:
        meters = [r.meter.to_dict() for r in results if r.meter is not None] + list(extra_meters)
        return usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
                     sum(r.cached_tokens for r in results), meters)

    def score_meter(params: SamplingParams, n: int, seconds: float) -> dict[str, Any] | None:
        if not engine.metering:
            return None
        return engine.metering_for().measure(
            attention=params.attention, prompt_tokens=n, cached_prompt_tokens=0, completion_tokens=0,
            prefill_s=seconds, decode_s=0.0, ttft_s=seconds, e2e_s=seconds, index_topk=topk_of(params)).to_dict()

    # -- streaming
    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(request: Request, prep: _Prep, *, chat: bool, include_usage: bool, echo: bool) -> Any:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion.chunk" if chat else "text_completion"
        now = int(time.time())
        batch = _Batch(runner, request)
        try:
            for i, ids in enumerate(prep.prompts):
                if prep.max_tokens > 0:
                    batch.submit(i, ids, prep.params)
        except BaseException:
            batch.close()
            raise

        def chunk(choices: list[dict], usage_: Any = "absent") -> str:
            c: dict[str, Any] = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices}
            if include_usage:
                c["usage"] = None if usage_ == "absent" else usage_
            return sse(c)

        def choice(i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text else {})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def gen():
            results: dict[int, GenerationResult] = {}
            try:
                for i in range(len(prep.prompts)):
                    if chat:
                        yield chunk([choice(i, None, role=True)])
                    elif echo:
                        text = prep.texts[i] if prep.texts[i] is not None else (tok.decode(prep.prompts[i])
                                                                                if tok else "")
                        yield chunk([choice(i, text)])
                    if prep.max_tokens == 0:  # nothing to generate: no engine request
                        results[i] = nothing(prep.prompts[i], prep.params)
                        yield chunk([choice(i, None if chat else "", "length")])
                while len(results) < len(prep.prompts):
                    i, ev = await batch.next()
                    if ev.result is None:
                        if ev.text:
                            yield chunk([choice(i, ev.text)])
                        continue
                    results[i] = ev.result
                    if chat:
                        if ev.text:
                            yield chunk([choice(i, ev.text)])
                        yield chunk([choice(i, None, ev.result.finish_reason)])
                    else:
                        yield chunk([choice(i, ev.text, ev.result.finish_reason)])
                if include_usage:
                    yield chunk([], usage_of([results[i] for i in sorted(results)]))
                yield "data: [DONE]\n\n"
            except _Disconnected:
                return
            except Exception as e:  # headers are out: report in the stream, OpenAI-style
                yield sse(_api_error(e).body())
                yield "data: [DONE]\n\n"
            finally:
                batch.close()

        class _Response(StreamingResponse):
            async def __call__(self, scope, receive, send):  # noqa: ANN001
                try:
                    await super().__call__(scope, receive, send)
                finally:  # also when the generator never started (client gone before the first chunk)
                    batch.close()

        return _Response(gen(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes
    @app.get("/health")
    async def health():
        if not runner.alive:
            return JSONResponse({"status": "error", "message": runner.error or "the engine thread is not running"},
                                status_code=503)
        return {"status": "ok", "model": model_name, "running": engine.running, "waiting": engine.queue_length}

    @app.get("/metrics")
    async def prom_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "parca",
                "root": getattr(engine.model, "source", model_name), "max_model_len": limit,
                "attention": default_attention, "indexers": has_indexers}

    @v1.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @v1.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, _CompletionRequest)
        check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            texts: list[str | None] = [p]
        elif p and isinstance(p[0], str):
            texts = list(p)
        else:
            texts = []
        if texts:
            prompts = [encode_text(t) for t in texts]
        else:
            prompts = [list(p)] if (not p or isinstance(p[0], int)) else [list(x) for x in p]
            texts = [None] * len(prompts)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        prep = prepare(req, prompts, texts, req.max_tokens, "prompt")
        want_lp = req.logprobs is not None
        if req.stream:
            if want_lp:
                raise APIError(400, "logprobs are not available with stream=true; send stream=false",
                               param="logprobs")
            return await stream(request, prep, chat=False, echo=bool(req.echo),
                                include_usage=bool(req.stream_options and req.stream_options.include_usage))
        if prep.max_tokens == 0:  # nothing to generate: no engine request (scoring only when asked)
            results = [nothing(ids, prep.params) for ids in prompts]
        else:
            results = await run(request, prep)
        choices, extra_meters = [], []
        for i, (ids, res) in enumerate(zip(prompts, results)):
            prompt_text = texts[i] if texts[i] is not None else (tok.decode(ids) if tok else "")
            text = (prompt_text + res.text) if req.echo else res.text
            logprobs = None
            if want_lp:
                seq = ids + res.token_ids
                lp, top, secs = await score(seq, prep.params, req.logprobs)
                if prep.max_tokens == 0:
                    extra_meters.append(score_meter(prep.params, len(ids), secs))
                    with metrics.lock:
                        metrics.scored_prompt_tokens += len(ids)
                first = 0 if req.echo else len(ids)
                toks = [token_str(t) for t in seq[first:]]
                offsets, off = [], 0
                for s in toks:
                    offsets.append(off)
                    off += len(s)
                logprobs = {
                    "tokens": toks, "token_logprobs": lp[first:],
                    "top_logprobs": [None if t is None else top_dict(t) for t in top[first:]],
                    "text_offset": offsets,
                }
            c: dict[str, Any] = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": res.finish_reason}
            if req.return_token_ids:
                c["token_ids"] = res.token_ids
                c["prompt_token_ids"] = ids
            choices.append(c)
        return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": usage_of(results, [m for m in extra_meters if m is not None])}

    @v1.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, _ChatRequest)
        check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if req.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format is not supported", param="response_format")
        ids = encode_messages(req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        want_lp = bool(req.logprobs)
        if req.top_logprobs is not None and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if max_tokens is None:  # chat: the context that is left (OpenAI / vLLM)
            max_tokens = max(0, limit - len(ids))
        prep = prepare(req, [ids], [None], max_tokens, "messages")
        if req.stream:
            if want_lp:
                raise APIError(400, "logprobs are not available with stream=true; send stream=false",
                               param="logprobs")
            return await stream(request, prep, chat=True, echo=False,
                                include_usage=bool(req.stream_options and req.stream_options.include_usage))
        res = (await run(request, prep))[0] if prep.max_tokens > 0 else nothing(ids, prep.params)
        logprobs = None
        if want_lp:
            lp, top, _ = await score(ids + res.token_ids, prep.params, req.top_logprobs or 0)
            content = []
            for j, t in enumerate(res.token_ids):
                k = len(ids) + j
                s = token_str(t)
                content.append({"token": s, "logprob": lp[k], "bytes": list(s.encode("utf-8")),
                                "top_logprobs": [{"token": token_str(a), "logprob": b,
                                                  "bytes": list(token_str(a).encode("utf-8"))} for a, b in top[k]]})
            logprobs = {"content": content}
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": res.text},
                                  "logprobs": logprobs, "finish_reason": res.finish_reason}
        out: dict[str, Any] = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
                               "created": int(time.time()), "model": model_name, "choices": [choice],
                               "usage": usage_of([res])}
        if req.return_token_ids:
            choice["token_ids"] = res.token_ids
            out["prompt_token_ids"] = ids
        return out

    @v1.post("/tokenize")
    async def tokenize(request: Request):
        req = await _parse(request, _TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = encode_messages(req.messages)
        else:
            if tok is None:
                raise APIError(400, "this server has no tokenizer", param="prompt")
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": limit, "tokens": ids}

    @v1.post("/detokenize")
    async def detokenize(request: Request):
        req = await _parse(request, _DetokenizeRequest)
        check_model(req.model)
        if tok is None:
            raise APIError(400, "this server has no tokenizer", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    app.include_router(v1)
    return app


def _version() -> str:
    from .. import __version__

    return __version__
