"""Prometheus metrics of the server (vLLM's histogram buckets) and the meter fields it sums."""

from __future__ import annotations

import threading
from typing import Sequence

from ..engine import Engine


# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
METER_FIELDS = ("cost_usd", "dense_cost_usd", "seconds", "prefill_s", "decode_s", "dense_prefill_s",
                "dense_decode_s", "flops", "dense_flops", "bytes", "dense_bytes")


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
