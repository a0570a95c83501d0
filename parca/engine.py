"""The engine: requests in, tokens out. It owns the cache (made by the model's factory), prefills prompts in
chunks, batches decode steps across requests of different lengths, samples, stops, and meters.

Scheduling is continuous (``step``): every step runs one batched decode forward over all decoding requests,
then prefill chunks of admitted requests up to ``max_batch_tokens``, so long prompts never stall decoders.
Whenever a slot frees up the next queued request is admitted. Each row may attend densely or sparsely:
one loaded model serves both side by side.

Prefix reuse: the token ids of every cache slot are hashed in blocks (chained, salted by attention mode and
top-k, since sparse layers produce different keys than dense ones). A new request whose prompt starts with
blocks some slot already holds reuses those rows: it takes that slot if the slot is free, or copies the rows
into its own slot if another request is still using them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .errors import ContextError, ParcaError, QueueFullError
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
    pos: int = 0  # prompt tokens already in the cache (prefill progress)
    cancelled: bool = False

    @property
    def salt(self) -> tuple:
        return (self.params.attention, self.topk)


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


class PrefixIndex:
    """Which cache slots hold which token-id blocks (chained hashes), for prefix reuse."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.slot_hashes: dict[int, list[int]] = {}
        self.where: dict[int, set[int]] = {}

    def chain(self, tokens: Sequence[int], salt: tuple) -> list[int]:
        out, h = [], hash(salt)
        for i in range(0, len(tokens) - self.block + 1, self.block):
            h = hash((h, tuple(tokens[i : i + self.block])))
            out.append(h)
        return out

    def set(self, slot: int, hashes: list[int]) -> None:
        for h in self.slot_hashes.pop(slot, []):
            self.where.get(h, set()).discard(slot)
        self.slot_hashes[slot] = list(hashes)
        for h in hashes:
            self.where.setdefault(h, set()).add(slot)

    def holds(self, slot: int) -> bool:
        return bool(self.slot_hashes.get(slot))

    def match(self, hashes: list[int]) -> tuple[int | None, int]:
        """(slot, blocks) of the longest held prefix of ``hashes``."""
        best: tuple[int | None, int] = (None, 0)
        cands: set[int] | None = None
        for i, h in enumerate(hashes):
            here = self.where.get(h, set())
            cands = set(here) if cands is None else cands & here
            if not cands:
                break
            best = (min(cands), i + 1)
        return best


class Engine:
    """Owns the model's cache and runs requests through it.

    Args:
        model: a parca model (``make_cache``, ``cache_spec``, ``forward(input_ids, cache, ctx, last_only=...)``).
        tokenizer: needed for text prompts, stop strings and text output; token-id prompts work without.
        max_slots: requests decoded together (cache rows). With ``cache_memory`` the slot count follows the budget.
        max_len: tokens per cache row; None sizes the cache to the requests (re-made when it must grow, while idle).
        prefill_chunk: prompt tokens per prefill forward (bounds activation memory).
        max_batch_tokens: tokens per step (decode rows + prefill chunks); default prefill_chunk + max_slots.
        cache_memory: bytes for the KV + indexer-key cache; sets the number of slots of ``max_len`` tokens.
        max_queue: requests waiting for a slot before ``submit`` refuses (QueueFullError).
        prefix_block: tokens per hashed block for prefix reuse (0 turns prefix reuse off).
        price_per_hour, meter_device, metering: the per-request meter (see parca/meter.py).
    """

    def __init__(self, model, tokenizer: Tokenizer | None = None, *, max_slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 2048, max_chunk_bytes: int = 64 * 2**20, max_batch_tokens: int | None = None,
                 cache_memory: int | None = None, max_queue: int = 1024, prefix_block: int = 32,
                 price_per_hour: float = DEFAULT_PRICE_PER_HOUR, meter_device: str = "cpu",
                 metering: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.context_limit = cfg.max_position_embeddings
        self.fixed_len = max_len
        if cache_memory is not None:
            if max_len is None:
                max_len = self.context_limit
                self.fixed_len = max_len
            per_slot = model.cache_spec().bytes_per_token() * max_len
            max_slots = int(cache_memory // per_slot)
            if max_slots < 1:
                raise ParcaError(f"cache memory {cache_memory / 2**20:.1f} MiB holds no slot of {max_len} tokens "
                                 f"({per_slot / 2**20:.1f} MiB each); raise --cache-memory or lower the context")
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.max_chunk_bytes = max_chunk_bytes
        self.max_batch_tokens = max_batch_tokens or (prefill_chunk + max_slots)
        self.max_queue = max_queue
        self.prefix = PrefixIndex(prefix_block) if prefix_block else None
        self.cache: KVCache | None = None
        self._next_id = 0
        self.price_per_hour = price_per_hour
        self.metering = metering
        self._meter_device = meter_device
        self._meterings: dict[int | None, Metering] = {}
        eos = set(cfg.eos_token_id)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_ids = eos
        self.device = model.model.embed_tokens.weight.device
        self._lock = threading.Lock()
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._by_id: dict[int, _Request] = {}
        self._slot_used: dict[int, float] = {}
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "prompt_tokens": 0, "generation_tokens": 0,
                      "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}
        if self.fixed_len is not None:
            self.cache = model.make_cache(max_slots, self.fixed_len)

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
        for ev in self._drive(reqs):
            if ev.result is not None:
                results[ev.request_id] = ev.result
        return [results[r.rid] for r in reqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one event per generated token; the last event carries the GenerationResult."""
        yield from self._drive(self._make_requests([prompt], params))

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue one request (for a serving loop that calls ``step``); returns its id.

        Raises QueueFullError when ``max_queue`` requests already wait, ContextError when it cannot fit a slot.
        """
        r = self._make_requests([prompt], params)[0]
        self._check_fits(r)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max queue {self.max_queue}); "
                                     f"retry later")
            self._enqueue(r)
        return r.rid

    def cancel(self, rid: int) -> bool:
        """Stop a request; its slot is freed at the next step. False if it is unknown or already done."""
        with self._lock:
            r = self._by_id.get(rid)
            if r is None or r.finish is not None:
                return False
            r.cancelled = True
            return True

    @property
    def has_work(self) -> bool:
        return bool(self._queue or self._running)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def cache_usage(self) -> float:
        """Share of cache slots held by running requests."""
        if self.cache is None:
            return 0.0
        return len(self._running) / self.cache.n_slots

    def step(self) -> list[StreamEvent]:
        """One scheduling step: drop cancelled requests, admit, one batched decode, prefill chunks."""
        events: list[StreamEvent] = []
        self._reap_cancelled()
        self._admit()
        decoding = [r for r in self._running if r.pos >= len(r.prompt) and r.finish is None]
        if decoding:
            t0 = time.perf_counter()
            ids = torch.tensor([[r.out[-1]] for r in decoding], device=self.device)
            starts = [len(r.prompt) + len(r.out) - 1 for r in decoding]
            logits = self._forward(ids, decoding, starts, last_only=True)[:, -1]
            dt = (time.perf_counter() - t0) / len(decoding)  # each row had one token in this forward
            for i, r in enumerate(decoding):
                r.decode_s += dt
                ev = self._accept(r, sample(logits[i], r.params, r.generator))
                if ev is not None:
                    events.append(ev)
        budget = self.max_batch_tokens - len(decoding)
        for r in [r for r in self._running if r.pos < len(r.prompt) and r.finish is None]:
            if budget <= 0:
                break
            n = min(budget, self.prefill_chunk, len(r.prompt) - r.pos)
            t0 = time.perf_counter()
            logits = self._forward(torch.tensor([r.prompt[r.pos : r.pos + n]], device=self.device), [r], [r.pos],
                                   last_only=True)
            r.prefill_s += time.perf_counter() - t0
            r.pos += n
            budget -= n
            self._index_slot(r, r.prompt[: r.pos])
            if r.pos == len(r.prompt):
                r.ttft_s = time.perf_counter() - r.submitted
                ev = self._accept(r, sample(logits[0, -1], r.params, r.generator))
                if ev is not None:
                    events.append(ev)
        still = []
        for r in self._running:
            if r.finish is not None:
                events.append(self._retire(r))
            else:
                still.append(r)
        self._running = still
        return events

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
            r = _Request(-1, ids, p, topk, stop_ids, now)
            if p.seed is not None:
                r.generator = torch.Generator().manual_seed(p.seed)
            elif p.temperature > 0:
                r.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            if self.tokenizer is not None:
                r.decoder = IncrementalDecoder(self.tokenizer)
            reqs.append(r)
        return reqs

    def _check_fits(self, r: _Request) -> None:
        if self.fixed_len is not None and len(r.prompt) >= self.fixed_len:
            raise ContextError(f"prompt has {len(r.prompt)} tokens but each cache slot holds {self.fixed_len}; "
                               f"shorten the prompt or raise the engine's max_len")

    def _enqueue(self, r: _Request) -> None:
        r.rid = self._next_id
        self._next_id += 1
        r.submitted = time.perf_counter()
        self._by_id[r.rid] = r
        self._queue.append(r)
        self.stats["requests"] += 1

    def _drive(self, reqs: list[_Request]) -> Iterator[StreamEvent]:
        """Synchronous use: queue ``reqs`` and step until they are all done."""
        if not self.has_work:
            self._ensure_cache(reqs)
        for r in reqs:
            self._check_fits(r)
        with self._lock:
            for r in reqs:
                self._enqueue(r)
        mine = {r.rid for r in reqs}
        done = 0
        try:
            while done < len(reqs):
                for ev in self.step():
                    if ev.request_id in mine:
                        done += ev.result is not None
                        yield ev
        finally:
            # A consumer that stops iterating (cancel, disconnect) must not leak slots.
            for r in reqs:
                if r.finish is None:
                    self.cancel(r.rid)
            self._reap_cancelled()

    def _ensure_cache(self, reqs: list[_Request]) -> None:
        need = max(min(len(r.prompt) + r.params.max_new_tokens, self.context_limit) for r in reqs)
        if self.cache is not None and (self.cache.max_len >= need or self.fixed_len is not None):
            return
        size = min(self.context_limit, max(256, -(-need // 256) * 256))
        self.cache = None  # free the old cache before making the new one
        if self.prefix is not None:
            self.prefix = PrefixIndex(self.prefix.block)
        self.cache = self.model.make_cache(self.max_slots, size)

    def _reap_cancelled(self) -> None:
        with self._lock:
            for r in [r for r in self._queue if r.cancelled]:
                self._queue.remove(r)
                r.finish = "cancelled"
                self._by_id.pop(r.rid, None)
                self.stats["cancelled"] += 1
            for r in [r for r in self._running if r.cancelled and r.finish is None]:
                self._running.remove(r)
                r.finish = "cancelled"
                self.cache.free(r.slot)
                self._by_id.pop(r.rid, None)
                self.stats["cancelled"] += 1

    def _admit(self) -> None:
        cache = self.cache
        while True:
            with self._lock:
                if not self._queue or cache.free_slots == 0:
                    return
                r = self._queue.popleft()
            self._place(r)
            if r.params.max_new_tokens == 0:
                r.finish = "length"
            self._running.append(r)

    def _place(self, r: _Request) -> None:
        """Give ``r`` a slot, reusing cached rows of its longest known prefix."""
        cache = self.cache
        reuse, src = 0, None
        if self.prefix is not None:
            hashes = self.prefix.chain(r.prompt, r.salt)
            src, blocks = self.prefix.match(hashes)
            # at least the last prompt token is recomputed: its logits give the first output token
            reuse = min(blocks * self.prefix.block, len(r.prompt) - 1) if src is not None else 0
            self.stats["prefix_queried_tokens"] += len(r.prompt)
        free = cache.free_list()
        if src is not None and reuse > 0 and src in free:
            slot = cache.allocate(src)
        else:
            # prefer slots holding nothing reusable, then the least recently used
            holds = (lambda s: self.prefix.holds(s)) if self.prefix is not None else (lambda s: False)
            slot = cache.allocate(min(free, key=lambda s: (holds(s), self._slot_used.get(s, 0.0))))
            if src is not None and reuse > 0:
                cache.copy_prefix(src, slot, reuse)
        r.slot, r.pos, r.cached = slot, reuse, reuse
        cache.lengths[slot] = reuse
        self._slot_used[slot] = time.perf_counter()
        self.stats["prefix_hit_tokens"] += reuse
        self.stats["prompt_tokens"] += len(r.prompt)
        if self.prefix is not None:
            self._index_slot(r, r.prompt[:reuse])

    def _index_slot(self, r: _Request, tokens: Sequence[int]) -> None:
        if self.prefix is not None:
            self.prefix.set(r.slot, self.prefix.chain(tokens, r.salt))

    def _retire(self, r: _Request) -> StreamEvent:
        # rows of prompt + all but the last generated token are in the cache: keep them findable
        self._index_slot(r, r.prompt + r.out[:-1])
        self.cache.free(r.slot)
        self._slot_used[r.slot] = time.perf_counter()
        with self._lock:
            self._by_id.pop(r.rid, None)
        self.stats["finished"] += 1
        self.stats["generation_tokens"] += len(r.out)
        return self._final(r)

    def _forward(self, ids: Tensor, reqs: list[_Request], starts: list[int], last_only: bool) -> Tensor:
        ctx = ForwardContext(
            slots=[r.slot for r in reqs], starts=starts,
            modes=[r.params.attention for r in reqs], topks=[r.topk for r in reqs],
            max_chunk_bytes=self.max_chunk_bytes,
        )
        with torch.inference_mode():
            return self.model(ids, self.cache, ctx, last_only=last_only)

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
