"""The one engine thread (``EngineRunner``) and the log-probability pass (``score_tokens``) it runs."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..engine import Engine, SamplingParams, StreamEvent
from .schemas import APIError
from .metrics import ServerMetrics

log = logging.getLogger("parca.server")


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

    from ..models.base import ForwardContext

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
