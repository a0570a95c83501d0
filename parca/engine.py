"""The engine: requests in, tokens out. It owns the cache (made by the model's factory), prefills prompts in
chunks, batches decode steps across requests of different lengths, samples, and stops.

Scheduling is continuous: whenever a slot frees up, the next queued request is prefilled and joins the
decode batch. Each row of the batch may attend densely or sparsely (one loaded model serves both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .errors import ContextError, ParcaError
from .meter import DEFAULT_PRICE_PER_HOUR, Metering, RequestMeter
from .models.base import ATTENTION_MODES, ForwardContext
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's / tokenizer's EOS ids
    ignore_eos: bool = False
    attention: str = "dense"
    index_topk: int | None = None  # overrides the indexer config's k for this request

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ParcaError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ParcaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ParcaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParcaError(f"top_k must be >= 0, got {self.top_k}")
        if self.attention not in ATTENTION_MODES:
            raise ParcaError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.index_topk is not None and self.index_topk <= 0:
            raise ParcaError(f"index_topk must be positive, got {self.index_topk}")


@dataclass
class GenerationResult:
    request_id: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    attention: str
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    cached_tokens: int = 0
    meter: "RequestMeter | None" = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    @property
    def timings(self) -> dict[str, float]:
        tpot = (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1) if self.completion_tokens > 1 else 0.0
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "ttft_s": self.ttft_s,
                "tpot_s": tpot, "e2e_s": self.e2e_s}


@dataclass
class StreamEvent:
    request_id: int
    token_id: int | None
    text: str  # text delta (may be "" while a multi-byte character is incomplete)
    result: GenerationResult | None = None  # set on the last event of a request


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    topk: int | None
    stop_ids: set[int]
    submitted: float
    slot: int = -1
    out: list[int] = field(default_factory=list)
    decoder: IncrementalDecoder | None = None
    generator: torch.Generator | None = None
    finish: str | None = None
    text: str = ""  # text emitted so far
    stop_cut: bool = False  # text was cut at a stop string
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    cached: int = 0  # prompt tokens whose cache rows were reused, not recomputed


def sample(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits (V,) float -> next token id (greedy when temperature == 0)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = (sp.cumsum(-1) - sp) < p.top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Owns the model's cache and runs requests through it.

    Args:
        model: a parca model (``make_cache``, ``forward(input_ids, cache, ctx, last_only=...)``).
        tokenizer: needed for text prompts, stop strings and text output; token-id prompts work without.
        max_slots: requests decoded together (cache rows).
        max_len: tokens per cache row; None sizes the cache to the requests (re-made when it must grow).
        prefill_chunk: prompt tokens per prefill forward (bounds activation memory).
    """

    def __init__(self, model, tokenizer: Tokenizer | None = None, *, max_slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 2048, max_chunk_bytes: int = 64 * 2**20,
                 price_per_hour: float = DEFAULT_PRICE_PER_HOUR, meter_device: str = "cpu",
                 metering: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_slots = max_slots
        self.fixed_len = max_len
        self.prefill_chunk = prefill_chunk
        self.max_chunk_bytes = max_chunk_bytes
        self.cache: KVCache | None = None
        self._next_id = 0
        self.price_per_hour = price_per_hour
        self.metering = metering
        self._meter_device = meter_device
        self._meterings: dict[int | None, Metering] = {}
        cfg = model.config
        self.context_limit = cfg.max_position_embeddings
        eos = set(cfg.eos_token_id)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_ids = eos
        self.device = model.model.embed_tokens.weight.device
        if max_len is not None:
            self.cache = model.make_cache(max_slots, max_len)

    # ---- public API ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParcaError("a text prompt needs a tokenizer; pass token ids or load the model's tokenizer")
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
                 ) -> list[GenerationResult]:
        """Run a batch of prompts (text or token ids) to completion; results in input order."""
        results: dict[int, GenerationResult] = {}
        reqs = self._make_requests(prompts, params)
        for ev in self._run(reqs):
            if ev.result is not None:
                results[ev.request_id] = ev.result
        return [results[r.rid] for r in reqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one event per generated token; the last event carries the GenerationResult."""
        yield from self._run(self._make_requests([prompt], params))

    # ---- internals -----------------------------------------------------------------------------
    def _make_requests(self, prompts, params) -> list[_Request]:
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise ParcaError("generate() takes a list of prompts")
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ParcaError(f"got {len(prompts)} prompts but {len(plist)} sampling parameter sets")
        reqs = []
        now = time.perf_counter()
        for prompt, p in zip(prompts, plist):
            p.validate()
            ids = self.encode_prompt(prompt)
            if not ids:
                raise ParcaError("empty prompt: nothing to condition on")
            if len(ids) >= self.context_limit:
                raise ContextError(
                    f"prompt has {len(ids)} tokens but the model's context is {self.context_limit} "
                    f"(max_position_embeddings); shorten the prompt"
                )
            topk = None
            if p.attention == "sparse":
                sc = getattr(self.model, "sparse_config", None)
                if sc is None:
                    raise ParcaError("sparse attention needs indexers: pass --indexer ADIR (an adapter from "
                                     "`parca indexer init` or `parca retrofit`) or a checkpoint with indexers")
                topk = p.index_topk or sc.index_topk
            stop_ids = set() if p.ignore_eos else (set(p.stop_token_ids) if p.stop_token_ids is not None else self.eos_ids)
            r = _Request(self._next_id, ids, p, topk, stop_ids, now)
            self._next_id += 1
            if p.seed is not None:
                r.generator = torch.Generator().manual_seed(p.seed)
            elif p.temperature > 0:
                r.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            if self.tokenizer is not None:
                r.decoder = IncrementalDecoder(self.tokenizer)
            reqs.append(r)
        return reqs

    def _ensure_cache(self, reqs: list[_Request]) -> None:
        need = max(min(len(r.prompt) + r.params.max_new_tokens, self.context_limit) for r in reqs)
        if self.cache is not None and (self.cache.max_len >= need or self.fixed_len is not None):
            return
        size = min(self.context_limit, max(256, -(-need // 256) * 256))
        self.cache = None  # free the old cache before making the new one
        self.cache = self.model.make_cache(self.max_slots, size)

    def _forward(self, ids: Tensor, reqs: list[_Request], starts: list[int], last_only: bool) -> Tensor:
        ctx = ForwardContext(
            slots=[r.slot for r in reqs], starts=starts,
            modes=[r.params.attention for r in reqs], topks=[r.topk for r in reqs],
            max_chunk_bytes=self.max_chunk_bytes,
        )
        with torch.inference_mode():
            return self.model(ids, self.cache, ctx, last_only=last_only)

    def _prefill(self, r: _Request) -> Tensor:
        """Prefill the prompt in chunks; returns the last position's logits (V,)."""
        t0 = time.perf_counter()
        n = len(r.prompt)
        logits = None
        for s in range(0, n, self.prefill_chunk):
            chunk = r.prompt[s : s + self.prefill_chunk]
            ids = torch.tensor([chunk], device=self.device)
            logits = self._forward(ids, [r], [s], last_only=True)
        r.prefill_s = time.perf_counter() - t0
        return logits[0, -1]

    def _accept(self, r: _Request, tok: int) -> StreamEvent | None:
        """Record a sampled token; return its stream event and set r.finish when the request is done."""
        pos = len(r.prompt) + len(r.out)
        if tok in r.stop_ids:
            r.finish = "stop"
            return None
        r.out.append(tok)
        delta = r.decoder.push(tok) if r.decoder is not None else ""
        if r.decoder is not None and r.params.stop:
            text = r.decoder.text
            hits = [text.find(s) for s in r.params.stop if s and s in text]
            if hits:
                cut = min(hits)
                emitted = len(r.text)
                delta = text[emitted:cut] if cut > emitted else ""
                r.text = text[:cut]
                r.stop_cut = True
                r.finish = "stop"
                return StreamEvent(r.rid, tok, delta)
        r.text += delta
        if len(r.out) >= r.params.max_new_tokens or pos + 1 >= self.context_limit:
            r.finish = "length"
        return StreamEvent(r.rid, tok, delta)

    def _final(self, r: _Request) -> StreamEvent:
        """The last event of a request: any text held back (an incomplete character) plus the result."""
        rest = ""
        if r.decoder is not None and not r.stop_cut:
            full = self.tokenizer.decode(r.out)
            rest = full[len(r.text):] if full.startswith(r.text) else ""
            r.text = full
        return StreamEvent(r.rid, None, rest, self._result(r))

    def metering_for(self) -> Metering:
        sc = getattr(self.model, "sparse_config", None)
        key = None if sc is None else id(sc)
        if key not in self._meterings:
            self._meterings[key] = Metering(self.model.config, sc, price_per_hour=self.price_per_hour,
                                            device=self._meter_device, prefill_chunk=self.prefill_chunk)
        m = self._meterings[key]
        m.price_per_hour = self.price_per_hour
        return m

    def _result(self, r: _Request) -> GenerationResult:
        res = GenerationResult(
            request_id=r.rid, text=r.text, token_ids=list(r.out), prompt_tokens=len(r.prompt),
            finish_reason=r.finish or "length", attention=r.params.attention, prefill_s=r.prefill_s,
            decode_s=r.decode_s, ttft_s=r.ttft_s, e2e_s=time.perf_counter() - r.submitted,
            cached_tokens=r.cached,
        )
        if self.metering:
            res.meter = self.metering_for().measure(
                attention=r.params.attention, prompt_tokens=res.prompt_tokens, cached_prompt_tokens=r.cached,
                completion_tokens=res.completion_tokens, prefill_s=res.prefill_s, decode_s=res.decode_s,
                ttft_s=res.ttft_s, e2e_s=res.e2e_s, index_topk=r.topk,
            )
        return res

    def _run(self, reqs: list[_Request]) -> Iterator[StreamEvent]:
        self._ensure_cache(reqs)
        cache = self.cache
        queue = list(reqs)
        active: list[_Request] = []
        try:
            while queue or active:
                # Admit queued requests into free slots: prefill, sample the first token.
                while queue and cache.free_slots > 0:
                    r = queue.pop(0)
                    r.slot = cache.allocate()
                    if r.params.max_new_tokens == 0:
                        r.finish = "length"
                    else:
                        logits = self._prefill(r)
                        tok = sample(logits, r.params, r.generator)
                        r.ttft_s = time.perf_counter() - r.submitted
                        ev = self._accept(r, tok)
                        if ev is not None:
                            yield ev
                    if r.finish:
                        cache.free(r.slot)
                        yield self._final(r)
                    else:
                        active.append(r)
                if not active:
                    continue
                # One batched decode step over every active request.
                t0 = time.perf_counter()
                ids = torch.tensor([[r.out[-1]] for r in active], device=self.device)
                starts = [len(r.prompt) + len(r.out) - 1 for r in active]
                logits = self._forward(ids, active, starts, last_only=True)[:, -1]
                dt = (time.perf_counter() - t0) / len(active)
                still = []
                for i, r in enumerate(active):
                    r.decode_s += dt
                    ev = self._accept(r, sample(logits[i], r.params, r.generator))
                    if ev is not None:
                        yield ev
                    if r.finish:
                        cache.free(r.slot)
                        yield self._final(r)
                    else:
                        still.append(r)
                active = still
        finally:
            # A consumer that stops iterating (cancel, disconnect) must not leak slots.
            for r in reqs:
                if r.slot >= 0 and r.finish is None:
                    r.finish = "cancelled"
                    cache.free(r.slot)
