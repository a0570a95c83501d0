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

import asyncio
import concurrent.futures
import json
import logging
import secrets
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationResult, SamplingParams, StreamEvent
from .errors import ContextError, ParcaError, QueueFullError

log = logging.getLogger("parca.server")

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
METER_FIELDS = ("cost_usd", "dense_cost_usd", "seconds", "prefill_s", "decode_s", "dense_prefill_s",
                "dense_decode_s", "flops", "dense_flops", "bytes", "dense_bytes")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, ContextError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ParcaError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


# ---- metrics -------------------------------------------------------------------------------------
class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


def _labels(**kw: str) -> str:
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kw.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(v: float) -> str:
    return repr(float(v)) if v != float("inf") else "+Inf"


class ServerMetrics:
    """Latency histograms and counters (observed on the engine thread), rendered as Prometheus text."""

    PREFIX = "parca:"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.lock = threading.Lock()
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.e2e = _Histogram(E2E_BUCKETS)
        self.finished: dict[str, int] = {}
        self.cost_usd = 0.0
        self.dense_cost_usd = 0.0
        self.scored_prompt_tokens = 0  # echo-only scoring passes (no engine request)

    def render(self, engine: Engine) -> str:
        p, lab = self.PREFIX, _labels(model_name=self.model_name)
        st = dict(engine.stats)
        out: list[str] = []

        def metric(name: str, kind: str, help: str, value: float) -> None:
            out.extend([f"# HELP {p}{name} {help}", f"# TYPE {p}{name} {kind}", f"{p}{name}{lab} {_num(value)}"])

        with self.lock:
            metric("num_requests_running", "gauge", "Number of requests in the engine's cache slots.", engine.running)
            metric("num_requests_waiting", "gauge", "Number of requests waiting for a cache slot.", engine.queue_length)
            metric("cache_usage_perc", "gauge", "Share of KV-cache slots in use (1 = 100 percent).",
                   engine.cache_usage())
            metric("prompt_tokens_total", "counter", "Prompt tokens processed (incl. echo scoring).",
                   st.get("prompt_tokens", 0) + self.scored_prompt_tokens)
            metric("generation_tokens_total", "counter", "Generated tokens.", st.get("generation_tokens", 0))
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   st.get("prefix_queried_tokens", 0))
            metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                   st.get("prefix_hit_tokens", 0))
            metric("num_requests_cancelled_total", "counter", "Requests cancelled (client gone, shutdown).",
                   st.get("cancelled", 0))
            metric("cost_usd_total", "counter", "Metered cost of finished requests, USD.", self.cost_usd)
            metric("dense_cost_usd_total", "counter", "Dense-attention counterfactual cost of finished requests, USD.",
                   self.dense_cost_usd)
            out += [f"# HELP {p}request_success_total Finished requests by finish reason.",
                    f"# TYPE {p}request_success_total counter"]
            for reason in sorted(set(self.finished) | {"stop", "length"}):
                out.append(f"{p}request_success_total{_labels(model_name=self.model_name, finished_reason=reason)} "
                           f"{self.finished.get(reason, 0)}")
            for name, h, help in (("time_to_first_token_seconds", self.ttft, "Histogram of time to first token."),
                                  ("inter_token_latency_seconds", self.itl, "Histogram of inter-token latency."),
                                  ("e2e_request_latency_seconds", self.e2e, "Histogram of end-to-end request latency.")):
                out += [f"# HELP {p}{name} {help} In seconds.", f"# TYPE {p}{name} histogram"]
                for b, c in zip(h.buckets + (float("inf"),), h.counts + [h.count]):
                    out.append(f"{p}{name}_bucket{_labels(model_name=self.model_name, le=_num(b))} {c}")
                out += [f"{p}{name}_sum{lab} {_num(h.sum)}", f"{p}{name}_count{lab} {h.count}"]
        return "\n".join(out) + "\n"


# ---- the engine thread ---------------------------------------------------------------------------------
@dataclass
class _Sub:
    sink: Callable[[Any], None]  # gets StreamEvents, or an APIError when the request fails server-side
    submitted: float
    last: float | None = None


class EngineRunner:
    """Owns the one thread that steps the engine and runs every model forward.

    ``submit``/``cancel``/``call`` are safe from any thread. ``pause``/``resume`` hold the loop between steps
    (requests queue up meanwhile; tests use it to fill the queue deterministically).
    """

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._subs: dict[int, _Sub] = {}
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._stop = False
        self._draining = False
        self._drained = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set if the loop itself died

    # -- control
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="parca-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight are cancelled and their handlers get a 503."""
        self._stop = True
        self._go.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            subs, self._subs = self._subs, {}
            jobs, self._jobs = list(self._jobs), deque()
        err = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for rid, sub in subs.items():
            self.engine.cancel(rid)
            sub.sink(err)
        for _, fut in jobs:
            fut.set_exception(err)

    def drain(self) -> None:
        """Shutting down: in-flight requests end at once with a 503 (streams close cleanly), new ones get a 503.

        Signal-handler safe: it only sets a flag (no locks); the engine thread acts on it within 0.5 s.
        """
        self._draining = True

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests
    def submit(self, ids: list[int], params: SamplingParams, sink: Callable[[Any], None]) -> int:
        if self._draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        # the lock spans submit + subscribe so the engine thread cannot dispatch an event nobody listens to
        with self._lock:
            rid = self.engine.submit(ids, params)
            self._subs[rid] = _Sub(sink, time.perf_counter())
        self._wake.set()
        return rid

    def cancel(self, rid: int) -> None:
        with self._lock:
            self._subs.pop(rid, None)
        self.engine.cancel(rid)
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread (between steps); returns a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._jobs.append((fn, fut))
        self._wake.set()
        return fut

    # -- the loop
    def _loop(self) -> None:
        if self.engine.metering:
            try:
                self.engine.metering_for().device  # calibrates the CPU roofline once, before the first request
            except Exception:  # metering is a report, never a reason not to serve
                log.exception("meter calibration failed")
        try:
            while not self._stop:
                if self._draining and not self._drained:
                    self._drained = True
                    self._fail_all(APIError(503, "the server is shutting down", type="server_error",
                                            code="shutting_down"))
                if not self._go.is_set():
                    self._go.wait(0.1)
                    continue
                self._wake.clear()
                job = None
                with self._lock:
                    if self._jobs:
                        job = self._jobs.popleft()
                if job is not None:
                    fn, fut = job
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - handed to the waiting handler
                            fut.set_exception(e)
                if self.engine.has_work:
                    try:
                        events = self.engine.step()
                    except Exception as e:  # a bug or an engine error: fail those requests, keep serving
                        log.error("engine step failed:\n%s", traceback.format_exc())
                        self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}",
                                                type="server_error"))
                        continue
                    self._dispatch(events)
                elif job is None:
                    self._wake.wait(0.5)
        except BaseException:
            self.error = traceback.format_exc()
            log.error("engine thread died:\n%s", self.error)
            raise

    def _dispatch(self, events: list[StreamEvent]) -> None:
        now = time.perf_counter()
        m = self.metrics
        with self._lock:
            for ev in events:
                sub = self._subs.get(ev.request_id)
                if sub is None:
                    continue
                if m is not None:
                    with m.lock:
                        if ev.token_id is not None:
                            if sub.last is None:
                                m.ttft.observe(now - sub.submitted)
                            else:
                                m.itl.observe(now - sub.last)
                        if ev.result is not None:
                            m.e2e.observe(now - sub.submitted)
                            reason = ev.result.finish_reason
                            m.finished[reason] = m.finished.get(reason, 0) + 1
                            if ev.result.meter is not None:
                                m.cost_usd += ev.result.meter.cost_usd
                                m.dense_cost_usd += ev.result.meter.dense_cost_usd
                if ev.token_id is not None:
                    sub.last = now
                if ev.result is not None:
                    del self._subs[ev.request_id]
                sub.sink(ev)

    def _fail_all(self, err: APIError) -> None:
        with self._lock:
            subs, self._subs = self._subs, {}
        for rid, sub in subs.items():
            self.engine.cancel(rid)
            sub.sink(err)


# ---- log-probabilities --------------------------------------------------------------------------------
def score_tokens(model: Any, ids: Sequence[int], *, mode: str = "dense", topk: int | None = None, top_n: int = 0,
                 chunk: int = 512, max_chunk_bytes: int = 64 * 2**20
                 ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Log-probability of every token given the ones before it, by one chunked forward (temporary cache).

    Args:
        ids: T token ids.
        mode, topk: attention mode of the forward (sparse uses ``topk`` selected keys; None = the indexer's k).
        top_n: how many most likely alternatives to return per position.
    Returns:
        (T,) logprobs, None at position 0 (nothing conditions it); (T,) lists of top_n (id, logprob), None at 0.
    """
    import torch

    from .models.base import ForwardContext

    n = len(ids)
    lps: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    if n < 2:
        return lps[:n], tops[:n]
    dev = model.model.embed_tokens.weight.device
    x = torch.tensor([list(ids)], device=dev)  # (1,T)
    cache = model.make_cache(1, n)
    with torch.inference_mode():
        for a in range(0, n - 1, chunk):
            b = min(a + chunk, n - 1)  # hidden states at a..b-1 predict ids[a+1..b]
            ctx = ForwardContext(slots=[0], starts=[a], modes=[mode], topks=[topk], max_chunk_bytes=max_chunk_bytes)
            h = model(x[:, a:b], cache, ctx, return_hidden=True)[0]  # (b-a, hidden)
            logp = torch.log_softmax(model.lm_head(h).float(), -1)  # (b-a, V)
            tgt = x[0, a + 1 : b + 1]
            lps += logp.gather(1, tgt[:, None])[:, 0].tolist()
            if top_n:
                v, i = logp.topk(min(top_n, logp.shape[-1]), -1)
                tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
            else:
                tops += [[] for _ in range(b - a)]
    return lps, tops


# ---- request bodies ---------------------------------------------------------------------------------
class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # parca / vLLM extras
    attention: Literal["dense", "sparse"] | None = None
    index_topk: int | None = Field(None, ge=1)
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False


class _CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_Part] | None = None


class _ChatRequest(_Common):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    response_format: Any = None


class _TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = None
    add_special_tokens: bool = True


class _DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


async def _parse(request: Any, cls: Any) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(422, f"malformed JSON in the request body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise APIError(400, f"{loc}: {err.get('msg')}", param=loc or None) from None


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
    from . import __version__

    return __version__


# ---- running it -------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> Any:
    import socket

    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ParcaError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """Run an app with uvicorn in a background thread on ``host:port`` (port 0 = any free port).

        with ServerThread(create_app(engine, "m")) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="-")...
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.app = app
        self.sock = _bind(host, port)
        self.url = _url(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="parca-http")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise ParcaError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        runner = getattr(getattr(self.app, "state", None), "runner", None)
        if runner is not None:
            runner.drain()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          default_attention: str | None = None, aliases: Sequence[str] = (), log_level: str = "info",
          print_fn: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C (SIGINT/SIGTERM: uvicorn stops accepting, in-flight requests get 5 s, then the engine
    thread stops and their slots are freed)."""
    import uvicorn

    app = create_app(engine, model_name, api_key, default_attention=default_attention, aliases=aliases)
    sock = _bind(host, port)
    url = _url(sock)
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGINT / SIGTERM
            app.state.runner.drain()  # end in-flight generations now, so connections close and shutdown is quick
            super().handle_exit(sig, frame)

    server = _Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))
    print_fn(f"parca: serving '{model_name}' at {url}/v1 (default attention {app.state.default_attention}, "
             f"max model len {app.state.max_model_len}, {engine.max_slots} slots"
             f"{', API key required' if api_key else ''}); Ctrl-C to stop")
    if not api_key and not _is_loopback(host):
        print_fn(f"parca: warning: listening on {host} without an API key: anyone who can reach this port can use "
                 f"the model (set --api-key)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down: that is the stop
        pass
    finally:
        sock.close()
    print_fn("parca: server stopped")
