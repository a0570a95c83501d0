"""`parca bench serve`: load an OpenAI-compatible server (``parca serve``) and measure it like `vllm bench serve`.

    parca bench serve --url http://127.0.0.1:8000 [--num-prompts 50] [--request-rate inf|R] [--max-concurrency C]
                      [--input-len 256] [--output-len 64] [--docs DIR] [--api-key K] [--attention dense|sparse]
                      [--seed 0] [--goodput ttft:MS,tpot:MS] [--timeout 600] [--out FILE] [--json]

Streams every request from /v1/completions with an httpx async client (``ignore_eos`` fixes the output
length). Metric definitions (docs/cost.md section 3, vLLM's): TTFT = first chunk with text - send time;
ITL = gaps between successive text chunks, pooled over requests; E2EL = last chunk - send time;
TPOT = (E2EL - TTFT) / (output tokens - 1) for requests with more than one output token; throughputs over the
benchmark duration; goodput = requests meeting every SLO / duration. Token counts come from the response's
usage, and so do the summed parca cost and its dense counterfactual (``usage.parca``).

Prompts: random words (seeded) cut to exactly --input-len tokens through the server's /tokenize and sent as
token ids; against a server without /tokenize, --input-len words of text. With --docs, each prompt is a
document (cycled), cut to --input-len tokens when --input-len is given.

Bounded: at most --num-prompts requests, --timeout seconds in all (unfinished requests count as failed), and
loopback servers only (127.0.0.0/8, ::1, localhost). Output: a readable table, then the results JSON (vLLM's
field names) as ONE line last on stdout; --out writes the same document plus per-request lists (input_lens,
output_lens, ttfts, itls, e2els, errors). No torch import.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..errors import ParcaError

MAX_PROMPTS = 100_000
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education cost price token cache attention"
).split()
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    dense_cost_usd: float = 0.0
    metered: bool = False

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ---- inputs ----------------------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """The URL without a trailing slash; refuses anything but a loopback server."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ParcaError(f"--url {url!r}: expected http://HOST:PORT (e.g. http://127.0.0.1:8000)")
    host = parts.hostname
    try:
        loop = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = host == "localhost"
    if not loop:
        raise ParcaError(f"--url {url!r}: parca bench serve only loads servers on this machine (127.0.0.1, ::1, "
                         f"localhost); run it next to the server")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def parse_rate(text: str | float) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ParcaError(f"--request-rate {text!r}: a number of requests per second, or inf") from None
    if not rate > 0:
        raise ParcaError(f"--request-rate must be > 0 (or inf), got {text}")
    return rate


def parse_goodput(text: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50' (or space separated, vLLM style) -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    if not text:
        return {}
    out = {}
    for item in text.replace(",", " ").split():
        key, _, val = item.partition(":")
        key = key.strip().lower()
        try:
            ms = float(val)
        except ValueError:
            ms = -1.0
        if key not in SLO_KEYS or ms < 0:
            raise ParcaError(f"--goodput {text!r}: expected KEY:MS items with KEY in {', '.join(SLO_KEYS)}, "
                             f"e.g. ttft:500,tpot:50")
        out[key] = ms
    return out


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def _tokenize(client: Any, base: str, text: str, headers: dict[str, str]) -> list[int] | None:
    """Token ids from the server's /tokenize, or None when it has none."""
    try:
        r = await client.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=headers)
    except Exception:  # noqa: BLE001 - an older server without /tokenize: fall back to words
        return None
    if r.status_code != 200:
        return None
    try:
        return [int(t) for t in r.json()["tokens"]]
    except (ValueError, KeyError, TypeError):
        return None


async def build_prompts(client: Any, base: str, headers: dict[str, str], *, num_prompts: int,
                        input_len: int | None, seed: int, docs: str | None = None
                        ) -> tuple[list[str | list[int]], list[str]]:
    """The prompts (text or token ids) and notes about how they were made."""
    rng = random.Random(seed)
    notes: list[str] = []
    if docs is not None:
        from .docs import read_documents

        found, skipped = read_documents(docs)
        if not found:
            raise ParcaError(f"--docs {docs}: no usable documents ({len(skipped)} skipped)")
        if skipped:
            notes.append(f"{len(skipped)} input(s) skipped in {docs}")
        texts = [found[i % len(found)].text for i in range(num_prompts)]
        if input_len is None:
            return list(texts), notes + [f"{len(found)} documents from {docs}, whole"]
        cut: list[str | list[int]] = []
        for t in texts:
            ids = await _tokenize(client, base, t, headers)
            if ids is None:
                return [" ".join(t.split()[:input_len]) for t in texts], notes + [
                    f"{len(found)} documents, first {input_len} words (the server has no /tokenize)"]
            cut.append(ids[:input_len])
        return cut, notes + [f"{len(found)} documents from {docs}, first {input_len} tokens"]
    n = input_len or 256
    # one call for all prompts: random words tokenized together, cut into windows of exactly n tokens
    ids = await _tokenize(client, base, random_text(rng, int(n * num_prompts * 1.2) + 16), headers)
    if ids is not None and len(ids) >= n * num_prompts:
        return [ids[i * n:(i + 1) * n] for i in range(num_prompts)], notes + [
            f"random words, exactly {n} tokens each (via /tokenize)"]
    return [random_text(rng, n) for _ in range(num_prompts)], notes + [
        f"random words, {n} words each (the server has no /tokenize: token counts from usage)"]


# ---- one request -------------------------------------------------------------------------------------
async def send_one(client: Any, base: str, headers: dict[str, str], payload: dict[str, Any],
                   timeout: float | None = None) -> RequestResult:
    """Stream one completion; timings per cost.md section 3. ``timeout``: seconds (default: the client's)."""
    out = RequestResult()
    text_chunks = 0
    usage: dict[str, Any] | None = None
    st = time.perf_counter()
    last = st
    try:
        kw = {} if timeout is None else {"timeout": timeout}
        async with client.stream("POST", f"{base}/v1/completions", json=payload, headers=headers, **kw) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                try:
                    body = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                out.error = f"HTTP {resp.status_code}: {str(body)[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    out.error = str(obj["error"].get("message", obj["error"]))[:300]
                    return out
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    if ch.get("text"):
                        now = time.perf_counter()
                        if text_chunks == 0:
                            out.ttft = now - st
                        else:
                            out.itl.append(now - last)
                        last = now
                        text_chunks += 1
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(e).__name__}: {e}"[:300]
        return out
    out.latency = last - st
    if usage:
        out.prompt_len = int(usage.get("prompt_tokens", 0))
        out.output_tokens = int(usage.get("completion_tokens", text_chunks))
        out.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        meter = usage.get("parca") or {}
        if meter:
            out.metered = True
            out.cost_usd = float(meter.get("cost_usd", 0.0))
            out.dense_cost_usd = float(meter.get("dense_cost_usd", 0.0))
    else:
        out.output_tokens = text_chunks
    out.success = text_chunks > 0 or out.output_tokens == 0
    if not out.success:
        out.error = "no text streamed"
    return out


# ---- the run -------------------------------------------------------------------------------------------
def _stats(values_s: Sequence[float], name: str) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(values_s, dtype=float) * 1000.0 if len(values_s) else np.zeros(1)
    d = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
         f"std_{name}_ms": float(ms.std())}
    for p in (50, 90, 99):
        d[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return d


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float]) -> dict[str, Any]:
    """vLLM's result fields from the per-request results."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration, 1e-9)
    d: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    if goodput:
        good = 0
        for r in ok:
            vals = {"ttft": r.ttft * 1000, "tpot": (r.tpot or 0.0) * 1000, "e2el": r.latency * 1000}
            good += all(vals[k] <= v for k, v in goodput.items())
        d["request_goodput"] = good / dur
    d.update(_stats([r.ttft for r in ok], "ttft"))
    d.update(_stats([r.tpot for r in ok if r.tpot is not None], "tpot"))
    d.update(_stats([x for r in ok for x in r.itl], "itl"))
    d.update(_stats([r.latency for r in ok], "e2el"))
    cost = sum(r.cost_usd for r in ok)
    dense = sum(r.dense_cost_usd for r in ok)
    d.update({
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "metered": all(r.metered for r in ok) if ok else False,
        "cost_usd": cost, "dense_cost_usd": dense, "savings": (1 - cost / dense) if dense > 0 else None,
        "cost_usd_per_m_output_tokens": cost / total_out * 1e6 if total_out else None,
    })
    return d


async def run_bench(url: str, *, num_prompts: int = 50, request_rate: float = math.inf,
                    max_concurrency: int | None = None, input_len: int | None = None, output_len: int = 64,
                    docs: str | None = None, api_key: str | None = None, attention: str | None = None,
                    seed: int = 0, goodput: dict[str, float] | None = None, model: str | None = None,
                    timeout: float = 600.0, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns the results document (summary + per-request lists under "requests")."""
    import httpx

    base = check_loopback(url)
    if not 1 <= num_prompts <= MAX_PROMPTS:
        raise ParcaError(f"--num-prompts must be in 1..{MAX_PROMPTS}, got {num_prompts}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ParcaError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    if input_len is not None and input_len < 1:
        raise ParcaError(f"--input-len must be >= 1, got {input_len}")
    if output_len < 1:
        raise ParcaError(f"--output-len must be >= 1, got {output_len}")
    if timeout <= 0:
        raise ParcaError(f"--timeout must be > 0, got {timeout}")
    goodput = goodput or {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(max_concurrency or num_prompts, 1) + 4, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits,
                                 trust_env=False) as client:
        try:
            r = await client.get(f"{base}/v1/models", headers=headers)
        except httpx.HTTPError as e:
            raise ParcaError(f"cannot reach {base} ({type(e).__name__}: {e}); is `parca serve` running?") from None
        if r.status_code == 401:
            raise ParcaError(f"{base}: 401 unauthorized; pass --api-key")
        if r.status_code != 200:
            raise ParcaError(f"{base}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
        served = [m.get("id") for m in r.json().get("data", [])]
        model = model or (served[0] if served else None)
        prompts, notes = await build_prompts(client, base, headers, num_prompts=num_prompts, input_len=input_len,
                                             seed=seed, docs=docs)

        def payload(prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
            p: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                 "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            if attention:
                p["attention"] = attention
            return p

        # one untimed request first: fail fast on a misconfigured server, warm it up
        # (reversed: a prompt no timed request starts with, so the prefix cache does not flatter the first one)
        first = prompts[0]
        warm = list(reversed(first)) if isinstance(first, list) else " ".join(reversed(first.split()))
        test = await send_one(client, base, headers, payload(warm, min(output_len, 2)), timeout=max(timeout, 120))
        if not test.success:
            raise ParcaError(f"the test request failed: {test.error}")

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed + 1)
        results: list[RequestResult | None] = [None] * num_prompts
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            if sem is None:
                results[i] = await send_one(client, base, headers, payload(prompts[i], output_len))
            else:
                async with sem:
                    results[i] = await send_one(client, base, headers, payload(prompts[i], output_len))
            done += 1
            if progress:
                print(f"\r{done}/{num_prompts} requests", end="", file=sys.stderr, flush=True)

        tasks: list[asyncio.Task] = []

        async def launch() -> None:
            for i in range(num_prompts):
                tasks.append(asyncio.create_task(one(i)))
                if request_rate != math.inf and i + 1 < num_prompts:
                    await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            await asyncio.gather(*tasks)

        t0 = time.perf_counter()
        timed_out = False
        main = asyncio.create_task(launch())
        try:
            await asyncio.wait_for(asyncio.shield(main), timeout)
        except asyncio.TimeoutError:
            timed_out = True
            main.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(main, *tasks, return_exceptions=True)
        duration = time.perf_counter() - t0
        if progress:
            print(file=sys.stderr)
    final = [r if r is not None else RequestResult(error=f"not finished within --timeout {timeout:g} s")
             for r in results]
    doc: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "parca", "endpoint": "/v1/completions",
        "base_url": base, "model_id": model, "num_prompts": num_prompts,
        "request_rate": "inf" if request_rate == math.inf else request_rate, "burstiness": 1.0,
        "max_concurrency": max_concurrency, "input_len": input_len if (docs or input_len) else 256,
        "output_len": output_len, "attention": attention or "server default", "seed": seed,
        "goodput_slo_ms": goodput or None, "timed_out": timed_out, "prompts": notes,
    }
    doc.update(summarize(final, duration, goodput))
    doc["errors_sample"] = sorted({r.error for r in final if r.error})[:5]
    doc["requests"] = {
        "input_lens": [r.prompt_len for r in final], "output_lens": [r.output_tokens for r in final],
        "ttfts": [r.ttft for r in final], "itls": [r.itl for r in final], "e2els": [r.latency for r in final],
        "cost_usd": [r.cost_usd for r in final], "errors": [r.error for r in final],
    }
    return doc


# ---- output ----------------------------------------------------------------------------------------------
def card(doc: dict[str, Any]) -> str:
    """vLLM's result table, plus parca's cost lines."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value: Any, fmt: str = "{:<10.2f}") -> None:
        v = fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        lines.append(f"{label:<40}{v}")

    row("Successful requests:", doc["completed"], "{:<10}")
    if doc["failed"]:
        row("Failed requests:", doc["failed"], "{:<10}")
    row("Request rate (req/s):", doc["request_rate"], "{:<10}")
    row("Max concurrency:", doc["max_concurrency"] or "-", "{:<10}")
    row("Benchmark duration (s):", doc["duration"])
    row("Total input tokens:", doc["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", doc["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", doc["request_throughput"])
    if "request_goodput" in doc:
        row("Request goodput (req/s):", doc["request_goodput"])
    row("Output token throughput (tok/s):", doc["output_throughput"])
    row("Total token throughput (tok/s):", doc["total_token_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        name = key.upper()
        row(f"Mean {name} (ms):", doc[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", doc[f"median_{key}_ms"])
        row(f"Std {name} (ms):", doc[f"std_{key}_ms"])
        for p in (50, 90, 99):
            row(f"P{p} {name} (ms):", doc[f"p{p}_{key}_ms"])
    lines.append("{s:{c}^{n}}".format(s="Cost (parca meter, usage.parca)", n=w, c="-"))
    if doc["metered"]:
        row("Cost (USD):", doc["cost_usd"], "{:<10.4g}")
        row("Dense counterfactual (USD):", doc["dense_cost_usd"], "{:<10.4g}")
        row("Savings vs dense:", "-" if doc["savings"] is None else f"{doc['savings'] * 100:.1f}%")
        if doc["cost_usd_per_m_output_tokens"] is not None:
            row("USD per M output tokens:", doc["cost_usd_per_m_output_tokens"], "{:<10.4g}")
    else:
        lines.append("(the server reported no usage.parca meter)")
    row("Cached prompt tokens:", doc["total_cached_tokens"], "{:<10}")
    if doc["errors_sample"]:
        lines.append("errors: " + "; ".join(doc["errors_sample"]))
    lines.append("=" * w)
    return "\n".join(lines)


def register_serve(bench_subparsers: Any) -> None:
    """Add the `serve` action to `parca bench`'s action parsers."""
    q = bench_subparsers.add_parser(
        "serve", help="load a running `parca serve` (OpenAI API): TTFT, TPOT, ITL, E2EL, throughput, goodput, cost",
        description="Send --num-prompts streaming completions to a server on this machine, all at once or with "
                    "Poisson arrivals, and report vLLM's serving metrics plus the summed parca cost.")
    q.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    q.add_argument("--model", default=None, help="model id to request (default: the first of /v1/models)")
    q.add_argument("--num-prompts", type=int, default=50, help="requests to send (default 50)")
    q.add_argument("--request-rate", default="inf",
                   help="requests per second, Poisson arrivals; inf = all at once (default inf)")
    q.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    q.add_argument("--input-len", type=int, default=None,
                   help="prompt tokens (default 256 for random prompts; whole documents with --docs)")
    q.add_argument("--output-len", type=int, default=64, help="generated tokens per request, EOS ignored (default 64)")
    q.add_argument("--docs", default=None, help="folder of .txt / .md / .jsonl documents to use as prompts")
    q.add_argument("--api-key", default=None, help="the server's API key")
    q.add_argument("--attention", default=None, choices=["dense", "sparse"],
                   help="attention mode to request (default: the server's)")
    q.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default 0)")
    q.add_argument("--goodput", default=None, help="SLOs in ms for goodput, e.g. ttft:500,tpot:50 (keys ttft, tpot, "
                                                   "e2el)")
    q.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default 600)")
    q.add_argument("--out", default=None, help="write the results JSON (with per-request lists) to this file")
    q.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    q.add_argument("--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)")
    q.set_defaults(func=cmd_serve_bench)


def cmd_serve_bench(args: argparse.Namespace) -> int:
    doc = asyncio.run(run_bench(
        args.url, num_prompts=args.num_prompts, request_rate=parse_rate(args.request_rate),
        max_concurrency=args.max_concurrency, input_len=args.input_len, output_len=args.output_len, docs=args.docs,
        api_key=args.api_key, attention=args.attention, seed=args.seed, goodput=parse_goodput(args.goodput),
        model=args.model, timeout=args.timeout, progress=not args.no_progress and sys.stderr.isatty()))
    requests = doc.pop("requests")
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**doc, **requests}, indent=1))
        doc["out"] = str(path)
    print(card(doc), file=sys.stderr if args.json else sys.stdout)
    print(json.dumps(doc))
    return 0
