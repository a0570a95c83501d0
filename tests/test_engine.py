"""The engine against a naive no-cache greedy loop, batching, sampling, stops and streaming."""

from __future__ import annotations

import pytest
import torch

from parca.checkpoint import load_model
from parca.engine import Engine, SamplingParams
from parca.errors import ContextError, ParcaError
from parca.tokenizer import Tokenizer


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def engine(hf_dirs):
    path = hf_dirs["llama"][0]
    return Engine(load_model(path), Tokenizer(path), max_slots=3, prefill_chunk=16)


def test_greedy_equals_naive_loop(engine):
    prompt = list(range(5, 45))
    res = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert res.token_ids == naive_greedy(engine.model, prompt, 12)
    assert res.finish_reason == "length" and res.usage["total_tokens"] == 52


def test_batched_equals_one_by_one(engine):
    prompts = [list(range(3, 3 + n)) for n in (5, 33, 17, 9)]  # 4 prompts, 3 slots: continuous admission
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert engine.cache.free_slots == engine.cache.n_slots


def test_seeded_sampling_reproducible(engine):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = engine.generate(["the cost of attention"], p)[0].token_ids
    b = engine.generate(["the cost of attention"], p)[0].token_ids
    c = engine.generate(["the cost of attention"], SamplingParams(**{**p.__dict__, "seed": 8}))[0].token_ids
    assert a == b and a != c


def test_stop_token_and_string(engine):
    prompt = list(range(5, 25))
    free = engine.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    # the first position whose token did not occur before it: generation must stop right there
    cut = next(i for i, t in enumerate(free.token_ids) if t not in free.token_ids[:i] and i > 0)
    stop_id = free.token_ids[cut]
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason == "stop"
    text = free.text
    if len(text) > 4:
        stop = text[2:4]
        r = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop=[stop], ignore_eos=True))[0]
        assert r.finish_reason == "stop" and stop not in r.text and text.startswith(r.text)


def test_stream_matches_generate(engine):
    p = SamplingParams(max_new_tokens=9, ignore_eos=True)
    events = list(engine.stream("model token cost", p))
    final = events[-1].result
    assert final is not None
    assert [e.token_id for e in events[:-1]] == final.token_ids
    assert "".join(e.text for e in events[:-1]) == final.text
    assert final.token_ids == engine.generate(["model token cost"], p)[0].token_ids


def test_stream_abandoned_frees_slot(engine):
    it = engine.stream("a b c", SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert engine.cache.free_slots == engine.cache.n_slots


def test_errors(engine):
    with pytest.raises(ContextError, match="context is 512"):
        engine.generate([list(range(600))])
    with pytest.raises(ParcaError, match="top_p"):
        engine.generate(["x"], SamplingParams(top_p=0))
    with pytest.raises(ParcaError, match="indexer"):
        engine.generate(["x"], SamplingParams(attention="sparse"))


def test_generate_matches_transformers_qwen3(hf_dirs):
    """`parca generate`'s engine gives the same greedy tokens as transformers' generate on a tiny Qwen3."""
    path, hf = hf_dirs["qwen3"]
    tok = Tokenizer(path)
    eng = Engine(load_model(path), tok, max_slots=1)
    ids = tok.encode("the contract clause on payment", add_special_tokens=True)
    res = eng.generate([ids], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                          pad_token_id=2)[0, len(ids):].tolist()
    assert res.token_ids == ref
    assert res.text == tok.decode(ref)


# ---- serving features: submit/step, prefix reuse, cancellation, admission --------------------------
def _run_all(eng):
    results = {}
    while eng.has_work:
        for ev in eng.step():
            if ev.result is not None:
                results[ev.request_id] = ev.result
    return results


def test_prefix_reuse_identical_output(hf_dirs):
    path = hf_dirs["llama"][0]
    eng = Engine(load_model(path), None, max_slots=2, max_len=256, prefill_chunk=16, prefix_block=8)
    prompt = list(range(5, 75))
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = eng.generate([prompt], p)[0]
    again = eng.generate([prompt], p)[0]
    assert again.token_ids == first.token_ids and first.cached_tokens == 0
    assert again.cached_tokens == 64 == again.usage["prompt_tokens_details"]["cached_tokens"]
    # a longer prompt sharing the prefix, while another request holds the matching slot (copy path)
    longer = prompt + list(range(80, 100))
    ref = Engine(load_model(path), None, max_slots=1, prefix_block=0).generate([longer], p)[0]
    busy = eng.submit(list(range(200, 230)), SamplingParams(max_new_tokens=30, ignore_eos=True))
    got = eng.generate([longer], p)[0]
    assert got.token_ids == ref.token_ids and got.cached_tokens == 64
    assert eng.stats["prefix_hit_tokens"] >= 128
    _run_all(eng)
    assert eng.cache.free_slots == 2


def test_prefix_not_shared_across_attention_modes(hf_dirs):
    from parca.config import SparseConfig

    m = load_model(hf_dirs["llama"][0])
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=8, index_rope_dim=8), seed=0)
    eng = Engine(m, None, max_slots=2, max_len=256, prefix_block=8)
    prompt = list(range(5, 60))
    eng.generate([prompt], SamplingParams(max_new_tokens=2, attention="dense"))
    sp = eng.generate([prompt], SamplingParams(max_new_tokens=2, attention="sparse"))[0]
    assert sp.cached_tokens == 0  # sparse layers make other keys than dense ones: no reuse across modes


def test_submit_step_interleaves_and_matches_one_by_one(hf_dirs):
    path = hf_dirs["qwen2"][0]
    p = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (90, 7, 40)]
    single = Engine(load_model(path), None, max_slots=1, prefix_block=0)
    ref = [single.generate([q], p)[0].token_ids for q in prompts]
    eng = Engine(load_model(path), None, max_slots=3, max_len=256, prefill_chunk=16, max_batch_tokens=20,
                 prefix_block=0)
    ids = [eng.submit(q, p) for q in prompts]
    res = _run_all(eng)
    assert [res[i].token_ids for i in ids] == ref


def test_cancel_frees_slot_and_queue_refuses(hf_dirs):
    from parca.errors import QueueFullError

    eng = Engine(load_model(hf_dirs["llama"][0]), None, max_slots=1, max_len=128, max_queue=1, prefix_block=0)
    p = SamplingParams(max_new_tokens=50, ignore_eos=True)
    a = eng.submit(list(range(5, 20)), p)
    eng.step()
    b = eng.submit(list(range(5, 25)), p)  # waits: the only slot is busy
    with pytest.raises(QueueFullError):
        eng.submit(list(range(5, 30)), p)
    assert eng.cancel(a) and eng.cancel(b) and not eng.cancel(12345)
    eng.step()
    assert not eng.has_work and eng.cache.free_slots == 1 and eng.stats["cancelled"] == 2


def test_cache_memory_sets_slots(hf_dirs):
    m = load_model(hf_dirs["llama"][0])
    per_token = m.cache_spec().bytes_per_token()
    eng = Engine(m, None, max_len=128, cache_memory=per_token * 128 * 3 + 10)
    assert eng.cache.n_slots == 3 and eng.cache.nbytes() <= per_token * 128 * 3
    with pytest.raises(ParcaError, match="holds no slot"):
        Engine(m, None, max_len=128, cache_memory=100)
    with pytest.raises(ContextError, match="each cache slot holds 128"):
        eng.submit(list(range(200)))
