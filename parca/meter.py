"""Per-request metering: tokens (cached and not), seconds, analytic FLOPs and bytes, cost in $, and the dense
counterfactual — what the same request would have cost with dense attention.

The counterfactual cannot be measured without running the request twice, so it is the measured time scaled
by the analytic model's dense/actual time ratio on this machine's calibrated roofline (``cost.get_device``):

    dense_seconds = measured_seconds * analytic_dense_seconds / analytic_actual_seconds

Analytic sums run over every token position of the request. Per-token FLOPs and bytes are linear in the
position on each side of the top-k (sparse attention costs O(p) below k and O(k) above), so the sum over a
position range is computed exactly from the two end positions of each linear piece.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import cost
from .config import ModelConfig, SparseConfig

DEFAULT_PRICE_PER_HOUR = 1.0  # USD per machine-hour; a placeholder price the user should set (--price-per-hour)


def _pieces(start: int, end: int, k: int | None) -> list[tuple[int, int, int]]:
    """Split positions [start, end) where per-token cost changes slope (position k - 1: from there a query
    sees more than k keys): (first position, last position, count) of each linear piece."""
    cuts = [start, end]
    if k is not None and start < k - 1 < end:
        cuts = [start, k - 1, end]
    return [(a, b - 1, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


def analytic_sum(cfg: ModelConfig, sc: SparseConfig | None, start: int, end: int, *, phase: str, mode: str,
                 chunk: int = 1, index_key_dtype: str = "float32") -> cost.Breakdown:
    """FLOPs/bytes of the tokens at positions [start, end) of one sequence (batch 1)."""
    total = None
    k = sc.index_topk if (sc is not None and mode == "sparse") else None
    q = max(1, min(chunk, end - start)) if phase == "prefill" else 1
    for first, last, n in _pieces(start, end, k):
        # a linear function summed over n consecutive positions = n x the mean of its two end values
        ends = [cost.per_token(cfg, p, phase=phase, mode=mode, sparse=sc, batch=1, query_tokens_per_step=q,
                               index_key_dtype=index_key_dtype) for p in (first, last)]
        b = (ends[0] + ends[1]).scaled(n / 2)
        total = b if total is None else total + b
    if total is None:
        total = cost.per_token(cfg, 0, phase=phase, mode="dense").scaled(0)
    return total


@dataclass
class RequestMeter:
    """The bill of one request. Costs are USD at ``price_per_hour``; seconds are measured, dense_* estimated."""

    attention: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float
    tpot_s: float
    e2e_s: float
    price_per_hour: float
    flops: float
    bytes: float
    dense_flops: float
    dense_bytes: float
    dense_prefill_s: float
    dense_decode_s: float
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def cost_usd(self) -> float:
        return self.seconds * self.price_per_hour / 3600

    @property
    def dense_cost_usd(self) -> float:
        return (self.dense_prefill_s + self.dense_decode_s) * self.price_per_hour / 3600

    @property
    def savings(self) -> float:
        """Share of the dense cost saved (negative when sparse costs more)."""
        d = self.dense_cost_usd
        return 0.0 if d <= 0 else 1 - self.cost_usd / d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_tokens=self.prompt_tokens + self.completion_tokens, seconds=self.seconds,
                 cost_usd=self.cost_usd, dense_cost_usd=self.dense_cost_usd, savings=self.savings)
        return d


class Metering:
    """Turns a finished request's counts and timings into a RequestMeter for one model."""

    def __init__(self, cfg: ModelConfig, sparse: SparseConfig | None, *, price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
                 device: str | cost.Device = "cpu", prefill_chunk: int = 2048) -> None:
        self.cfg, self.sparse, self.price_per_hour = cfg, sparse, price_per_hour
        self._device = device
        self.prefill_chunk = prefill_chunk

    @property
    def device(self) -> cost.Device:
        if not isinstance(self._device, cost.Device):
            self._device = cost.get_device(self._device)  # 'cpu' calibrates once per process
        return self._device

    def _seconds(self, b: cost.Breakdown, n: int) -> float:
        return cost.seconds_per_token(b.scaled(1 / n), self.device) * n if n else 0.0

    def measure(self, *, attention: str, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int,
                prefill_s: float, decode_s: float, ttft_s: float, e2e_s: float, index_topk: int | None = None
                ) -> RequestMeter:
        sc = self.sparse
        if sc is not None and index_topk is not None and index_topk != sc.index_topk:
            sc = SparseConfig(**{**sc.to_dict(), "index_topk": index_topk})
        mode = attention if sc is not None else "dense"
        start = cached_prompt_tokens  # cached tokens cost nothing to prefill
        pre = {m: analytic_sum(self.cfg, sc, start, prompt_tokens, phase="prefill", mode=m, chunk=self.prefill_chunk)
               for m in {mode, "dense"}}
        # decode step i runs at position prompt_tokens + i (the first generated token came from prefill)
        n_dec = max(completion_tokens - 1, 0)
        dec = {m: analytic_sum(self.cfg, sc, prompt_tokens, prompt_tokens + n_dec, phase="decode", mode=m)
               for m in {mode, "dense"}}

        def scale(measured: float, actual: cost.Breakdown, dense: cost.Breakdown, n: int) -> float:
            ta, td = self._seconds(actual, n), self._seconds(dense, n)
            return measured * (td / ta) if ta > 0 else measured

        n_pre = prompt_tokens - start
        tpot = (e2e_s - ttft_s) / (completion_tokens - 1) if completion_tokens > 1 else 0.0
        actual = pre[mode] + dec[mode]
        return RequestMeter(
            attention=mode, prompt_tokens=prompt_tokens, cached_prompt_tokens=cached_prompt_tokens,
            completion_tokens=completion_tokens, prefill_s=prefill_s, decode_s=decode_s, ttft_s=ttft_s, tpot_s=tpot,
            e2e_s=e2e_s, price_per_hour=self.price_per_hour,
            flops=actual.total_flops, bytes=actual.total_bytes,
            dense_flops=(pre["dense"] + dec["dense"]).total_flops, dense_bytes=(pre["dense"] + dec["dense"]).total_bytes,
            dense_prefill_s=scale(prefill_s, pre[mode], pre["dense"], n_pre),
            dense_decode_s=scale(decode_s, dec[mode], dec["dense"], n_dec),
            breakdown={f"{c}_flops": getattr(actual, f"{c}_flops") for c in cost.COMPONENTS},
        )
