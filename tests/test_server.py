"""The OpenAI-compatible server, started on port 0 in this process and driven with real HTTP clients (the official
`openai` package and httpx), and `parca bench serve` against it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import hf_model, save_hf
from parca.checkpoint import load_model
from parca.config import SparseConfig
from parca.engine import Engine
from parca.server import ServerThread, create_app
from parca.tokenizer import Tokenizer

KEY = "sk-test"
SC = dict(index_n_heads=2, index_head_dim=16, index_topk=8, index_rope_dim=8)
WORDS = "the cost of attention memory cache index key value query needle haystack pass number magic".split()


def wait_for(cond, timeout: float = 20.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def make_engine(path: Path, **kw) -> Engine:
    model = load_model(path)
    model.add_indexers(SparseConfig(**SC), seed=0)  # random indexers: the server defaults to sparse
    args = dict(max_slots=4, max_len=256, prefill_chunk=32, prefix_block=8, max_queue=256)
    return Engine(model, Tokenizer(path), **{**args, **kw})


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """The tiny llama of conftest.hf_dirs, built alone (this file needs no other architecture)."""
    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("srv") / "llama")


@pytest.fixture(scope="module")
def srv(llama):
    eng = make_engine(llama)
    with ServerThread(create_app(eng, "tiny", api_key=KEY)) as s:
        s.engine = eng
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def idle(eng: Engine) -> bool:
    return eng.running == 0 and eng.queue_length == 0 and eng.cache.free_slots == eng.cache.n_slots


def test_models_health_metrics(srv, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    client.completions.create(model="tiny", prompt="the cost", max_tokens=3, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_sum", "prompt_tokens_total", "generation_tokens_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "cache_usage_perc",
                 "num_requests_running", "num_requests_waiting"):
        assert f"parca:{name}" in text, name
    assert "# TYPE parca:time_to_first_token_seconds histogram" in text
    assert 'parca:e2e_request_latency_seconds_bucket{model_name="tiny",le="+Inf"}' in text


def test_completion_and_chat(client):
    r = client.completions.create(model="tiny", prompt="the cost of attention", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    u = r.usage
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert u.completion_tokens == 6 and u.total_tokens == u.prompt_tokens + 6
    assert u.prompt_tokens_details.cached_tokens >= 0
    meter = u.model_extra["parca"]
    assert meter["attention"] == "sparse" and meter["cost_usd"] > 0 and meter["dense_cost_usd"] > 0
    assert {"savings", "seconds"} <= set(meter)
    dense = client.completions.create(model="tiny", prompt="the cost of attention", max_tokens=2, temperature=0,
                                      extra_body={"attention": "dense"})
    assert dense.usage.model_extra["parca"]["attention"] == "dense"

    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=5, temperature=0, seed=1, extra_body={"ignore_eos": True})
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.usage.completion_tokens == 5 and isinstance(c.choices[0].message.content, str)
    # stop strings cut the text
    free = c.choices[0].message.content
    if len(free) > 2:
        cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                             max_tokens=5, temperature=0, stop=[free[1:3]],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == free[: free.index(free[1:3])]
        assert cut.choices[0].finish_reason == "stop"


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "stream me"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6 and "parca" in last.usage.model_extra
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "stream me"}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    comp = list(client.completions.create(model="tiny", prompt="stream", max_tokens=3, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True}))
    assert comp[-1].choices[0].finish_reason == "length" and comp[-1].usage is None
    empty = list(client.completions.create(model="tiny", prompt="stream", max_tokens=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert empty[-1].usage.completion_tokens == 0 and empty[-2].choices[0].finish_reason == "length"


def test_batched_equals_one_by_one(srv):
    prompts = [" ".join(WORDS[i:] + WORDS[:i])[: 10 + 7 * i] for i in range(5)]
    body = lambda p: {"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True,  # noqa
                      "return_token_ids": True}
    hdr = {"Authorization": f"Bearer {KEY}"}

    async def together():
        async with httpx.AsyncClient(base_url=srv.url, headers=hdr, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body(p)) for p in prompts])

    batched = [r.json()["choices"][0] for r in asyncio.run(together())]
    single = [httpx.post(srv.url + "/v1/completions", json=body(p), headers=hdr, timeout=60).json()["choices"][0]
              for p in prompts]
    assert [c["token_ids"] for c in batched] == [c["token_ids"] for c in single]
    assert [c["text"] for c in batched] == [c["text"] for c in single]
    assert all(len(c["token_ids"]) == 8 for c in batched)


def test_prefix_cache_hit(client):
    prompt = " ".join(WORDS * 2)  # far longer than the 8-token prefix block
    kw = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert b.choices[0].text == a.choices[0].text
    assert b.usage.prompt_tokens_details.cached_tokens > 0
    assert b.usage.model_extra["prompt_cache_hit_tokens"] == b.usage.prompt_tokens_details.cached_tokens


def test_64_concurrent_streams_free_everything(srv):
    eng = srv.engine
    aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> int:
        s = await aclient.completions.create(model="tiny", prompt=f"{WORDS[i % len(WORDS)]} request {i}",
                                             max_tokens=3, temperature=0.7, seed=i, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"attention": "dense"})
        usage = None
        async for ch in s:
            usage = ch.usage or usage
        return usage.completion_tokens

    async def main():
        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await aclient.close()

    counts = asyncio.run(main())
    assert len(counts) == 64 and all(0 <= n <= 3 for n in counts)
    assert wait_for(lambda: idle(eng), 10)


def test_errors(srv, client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model="tiny", prompt=" ".join(WORDS * 30), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model="tiny", prompt="short", max_tokens=300)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"attention": "fast"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "x",', headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 422
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert idle(srv.engine)


def test_queue_full_429(llama):
    eng = make_engine(llama, max_slots=1, max_queue=1)
    app = create_app(eng, "tiny")
    with ServerThread(app) as s:
        app.state.runner.pause()  # nothing is admitted: the first request waits in the queue
        got = {}
        t = threading.Thread(target=lambda: got.update(r=httpx.post(
            s.url + "/v1/completions", json={"prompt": "first", "max_tokens": 2}, timeout=60)))
        t.start()
        assert wait_for(lambda: eng.queue_length == 1)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="second", max_tokens=2)
        assert e.value.status_code == 429
        app.state.runner.resume()
        t.join(30)
        assert got["r"].status_code == 200
        assert wait_for(lambda: idle(eng))


def test_disconnect_cancels(srv, monkeypatch):
    eng = srv.engine
    slow_step = eng.step

    def step():
        time.sleep(0.02)  # slow the engine so the client leaves mid-generation
        return slow_step()

    monkeypatch.setattr(eng, "step", step)
    hdr = {"Authorization": f"Bearer {KEY}"}
    before = eng.stats["cancelled"]
    body = {"model": "tiny", "prompt": "the cost of", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body, headers=hdr) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["choices"][0]["text"]:
                    break  # one token in: hang up
    assert wait_for(lambda: eng.stats["cancelled"] == before + 1 and idle(eng))
    # non-streaming: the client times out while its request runs
    body = {**body, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, headers=hdr, timeout=0.3)
    assert wait_for(lambda: eng.stats["cancelled"] == before + 2 and idle(eng))


def test_logprobs_echo(srv, client, llama):
    prompt = "the cost of attention memory"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                  extra_body={"attention": "dense"})
    ch = r.choices[0]
    ids = srv.engine.tokenizer.encode(prompt, add_special_tokens=True)
    lp = ch.logprobs
    assert ch.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref_model = load_model(llama)
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(torch.tensor([ids]))[0].float(), -1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    # logprobs of generated tokens (greedy: the chosen token is the top one)
    g = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, logprobs=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    glp = g.choices[0].logprobs
    assert len(glp.token_logprobs) == 4
    assert all(abs(max(top.values()) - t) < 1e-5 for t, top in zip(glp.token_logprobs, glp.top_logprobs))
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=1, stream=True)


def test_bench_serve(srv, capsys, tmp_path):
    from parca.bench.serve import register_serve

    p = argparse.ArgumentParser()
    register_serve(p.add_subparsers())
    out = tmp_path / "bench.json"
    args = p.parse_args(["serve", "--url", srv.url, "--num-prompts", "5", "--input-len", "12", "--output-len", "4",
                         "--api-key", KEY, "--max-concurrency", "3", "--request-rate", "50", "--seed", "1",
                         "--goodput", "ttft:60000,tpot:60000", "--attention", "dense", "--out", str(out)])
    assert args.func(args) == 0
    stdout = capsys.readouterr().out
    assert "Serving Benchmark Result" in stdout
    doc = json.loads(stdout.strip().splitlines()[-1])
    for f in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
              "p99_ttft_ms", "mean_tpot_ms", "p90_itl_ms", "std_e2el_ms", "completed", "total_input_tokens",
              "total_output_tokens", "duration", "request_goodput", "cost_usd", "dense_cost_usd"):
        assert f in doc, f
    assert doc["completed"] == 5 and doc["failed"] == 0
    assert doc["total_input_tokens"] == 5 * 12 and doc["total_output_tokens"] == 5 * 4
    assert doc["request_goodput"] == pytest.approx(doc["request_throughput"]) and doc["cost_usd"] > 0
    saved = json.loads(out.read_text())
    assert len(saved["ttfts"]) == 5 and saved["mean_ttft_ms"] == doc["mean_ttft_ms"]
    with pytest.raises(Exception, match="loopback|this machine"):
        p2 = p.parse_args(["serve", "--url", "http://example.com:8000"])
        p2.func(p2)


def test_cli_serve_subprocess_ctrl_c(llama):
    """`parca serve` binds 127.0.0.1, prints its URL, answers, and stops cleanly on Ctrl-C (SIGINT)."""
    code = "import sys, parca.server_cli; sys.exit(any(m in sys.modules for m in ('torch', 'fastapi')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "parca", "serve", "--model", str(llama), "--port", "0",
                             "--max-model-len", "128", "--max-slots", "2", "--log-level", "warning",
                             "--meter-device", "h100"],  # a preset: no CPU calibration in this test
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parents[1])
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" at ")[1].split()[0]
        r = httpx.post(url + "/completions", json={"prompt": "the cost", "max_tokens": 2, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
