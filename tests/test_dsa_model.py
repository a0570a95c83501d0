"""DSA through a real model: sparse == dense when k covers the context, cache paths agree with DSA on,
decode scores only cached indexer keys, adapters round-trip, and a 32K prefill stays memory-bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from parca import sparse as dsa
from parca.checkpoint import load_model, save_adapter, save_model
from parca.config import SparseConfig
from parca.engine import Engine, SamplingParams
from parca.errors import ConfigError
from parca.models.base import ForwardContext
from parca.tokenizer import Tokenizer


def sparse_model(path, topk=8, seed=0):
    m = load_model(path)
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=topk, index_rope_dim=8), seed=seed)
    m.requires_grad_(False)
    return m


def ctx(starts, mode="sparse", topk=8, slots=None):
    slots = slots or list(range(len(starts)))
    return ForwardContext(slots=slots, starts=starts, modes=[mode] * len(starts), topks=[topk] * len(starts))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_topk_covering_context_equals_dense(hf_dirs, arch):
    m = sparse_model(hf_dirs[arch][0], topk=64)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = m(ids, None, ctx([0], "dense", 64))
        # k = 39 < 40 forces the selection path; with k >= t+1 for every row but the last it keeps everything,
        # so force full coverage with k = T and compare the selection path itself.
        sp = m(ids, None, ctx([0], "sparse", 40))
    assert (dense - sp).abs().max().item() <= 1e-4


def test_sparse_selection_path_equals_dense_when_k_is_context(hf_dirs):
    """k == T with a 1-token shortfall check: the path that scores and gathers (end > k) vs dense."""
    m = sparse_model(hf_dirs["llama"][0])
    ids = torch.randint(0, 300, (1, 33))
    with torch.no_grad():
        cache = m.make_cache(1, 33)
        m(ids[:, :32], cache, ctx([0], "sparse", 32))  # end == k: dense shortcut
        step = m(ids[:, 32:], cache, ctx([32], "sparse", 33))  # end == 33 == k: still shortcut
        dense = m(ids, None, ctx([0], "dense"))
    assert (step[0, -1] - dense[0, -1]).abs().max().item() <= 1e-4


def test_sparse_differs_when_k_small(hf_dirs):
    m = sparse_model(hf_dirs["llama"][0], topk=4)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert (m(ids, None, ctx([0], "dense", 4)) - m(ids, None, ctx([0], "sparse", 4))).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_full_equals_prefill_decode_and_chunked_with_dsa(hf_dirs, arch):
    m = sparse_model(hf_dirs[arch][0], topk=6)
    ids = torch.randint(0, 300, (1, 44), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids, None, ctx([0], "sparse", 6))
        for chunks in ([20], [5, 11, 16]):
            cache = m.make_cache(1, 44)
            outs, pos = [], 0
            for c in chunks + [1] * (44 - sum(chunks)):
                outs.append(m(ids[:, pos : pos + c], cache, ctx([pos], "sparse", 6)))
                pos += c
            assert (full - torch.cat(outs, 1)).abs().max().item() <= 1e-4


def test_decode_scores_only_cached_indexer_keys(hf_dirs, monkeypatch):
    """A decode step computes indexer keys for the new token only and scores the cached ones."""
    m = sparse_model(hf_dirs["llama"][0], topk=4)
    ids = torch.randint(0, 300, (1, 30))
    cache = m.make_cache(1, 64)
    with torch.no_grad():
        m(ids, cache, ctx([0], "sparse", 4))
    seen_keys, seen_scored = [], []
    orig_keys, orig_decode = dsa.LightningIndexer.finish_keys, dsa.sparse_decode

    def keys(self, k_proj, cos, sin):  # the model runs wk inside its fused projection, then finishes the keys
        seen_keys.append(k_proj.shape[1])
        return orig_keys(self, k_proj, cos, sin)

    def decode(qi, cos, sin, w, k_idx, *args, **kw):  # a decode step's whole selection + attention
        seen_scored.append((k_idx.shape[1], k_idx.data_ptr()))
        return orig_decode(qi, cos, sin, w, k_idx, *args, **kw)

    monkeypatch.setattr(dsa.LightningIndexer, "finish_keys", keys)
    monkeypatch.setattr(dsa, "sparse_decode", decode)
    with torch.no_grad():
        m(torch.tensor([[5]]), cache, ctx([30], "sparse", 4))
    assert seen_keys == [1, 1]  # one new key per layer
    assert [n for n, _ in seen_scored] == [31, 31]
    assert seen_scored[0][1] == cache.ik[0].data_ptr()  # a view of the cache, not a recomputation


def test_engine_sparse_greedy_matches_naive(hf_dirs):
    path = hf_dirs["qwen2"][0]
    m = sparse_model(path, topk=5)
    eng = Engine(m, Tokenizer(path), max_slots=2, prefill_chunk=7)
    prompt = list(range(10, 40))
    res = eng.generate([prompt, prompt[:12]], SamplingParams(max_new_tokens=6, attention="sparse", ignore_eos=True))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(m(torch.tensor([seq]), None, ctx([0], "sparse", 5))[0, -1].argmax()))
    assert res[0].token_ids == seq[30:]
    # one loaded model serves dense and sparse requests side by side
    mixed = eng.generate([prompt, prompt], [SamplingParams(max_new_tokens=6, attention="sparse", ignore_eos=True),
                                            SamplingParams(max_new_tokens=6, attention="dense", ignore_eos=True)])
    assert mixed[0].token_ids == res[0].token_ids
    assert mixed[1].token_ids == eng.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids


def test_adapter_round_trip_and_refusals(hf_dirs, tmp_path):
    m = sparse_model(hf_dirs["llama"][0], topk=7, seed=3)
    save_adapter(m, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "indexer_config.json").read_text())
    assert meta["index_topk"] == 7 and meta["base_model"]["architecture"] == "LlamaForCausalLM"
    m2 = load_model(hf_dirs["llama"][0], indexer=tmp_path / "ad")
    for k, v in m.indexer_state_dict().items():
        assert torch.equal(v, m2.indexer_state_dict()[k])
    with pytest.raises(ConfigError, match="hidden_size|architecture"):
        load_model(hf_dirs["qwen3"][0], indexer=tmp_path / "ad")  # other model, other hidden size / arch
    from conftest import hf_model, save_hf

    other = save_hf(hf_model("llama", seed=9), tmp_path / "other-llama")  # same shapes, other weights
    with pytest.raises(ConfigError, match="fingerprint"):
        load_model(other, indexer=tmp_path / "ad")


def test_full_checkpoint_with_deepseek_names(hf_dirs, tmp_path):
    m = sparse_model(hf_dirs["llama"][0], topk=6, seed=4)
    save_model(m, tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
        assert f"model.layers.0.self_attn.indexer.{n}" in names
    m2 = load_model(tmp_path / "merged")
    assert m2.sparse_config.index_topk == 6
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert torch.allclose(m(ids, None, ctx([0], "sparse", 6)), m2(ids, None, ctx([0], "sparse", 6)), atol=1e-5)


def test_cli_generate_sparse(capsys, hf_dirs, tmp_path):
    from parca.cli import main

    path = str(hf_dirs["llama"][0])
    assert main(["indexer", "init", "--model", path, "--out", str(tmp_path / "ad"), "--index-topk", "4",
                 "--index-n-heads", "2", "--index-head-dim", "16"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", path, "--prompt", "the contract clause " * 5, "--attention", "sparse",
                 "--indexer", str(tmp_path / "ad"), "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention"] == "sparse" and len(out["token_ids"]) <= 4


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, json, torch
    sys.path.insert(0, {tests!r})
    from conftest import hf_model, save_hf
    from parca.checkpoint import load_model
    from parca.config import SparseConfig
    from parca.engine import Engine, SamplingParams
    from pathlib import Path
    torch.set_num_threads(2)
    d = save_hf(hf_model("llama", num_hidden_layers=2, max_position_embeddings=40000), Path({tmp!r}))
    m = load_model(d, context=32768)
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=64, index_rope_dim=8), seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    eng = Engine(m, None, max_slots=1, prefill_chunk=4096, max_chunk_bytes=16 * 2**20)
    ids = torch.randint(5, 290, (32768,)).tolist()
    r = eng.generate([ids], SamplingParams(max_new_tokens=2, attention="sparse", ignore_eos=True))[0]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"before_kib": before, "after_kib": after, "cache_bytes": eng.cache.nbytes(), "n": len(r.token_ids)}}))
""")


def test_32k_sparse_prefill_memory_bounded(tmp_path):
    """A [T, T] float32 tensor at 32K is 4 GiB; the whole run must stay far below that."""
    import os

    script = MEMORY_SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path / "m"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    grew_mib = (res["after_kib"] - res["before_kib"]) / 1024
    assert res["n"] == 2
    # cache ~ 2 layers x 32K x (2x2x16x4 + 16x4) B = 20 MiB; chunks capped at 16 MiB; allow generous slack
    assert grew_mib < 600, f"peak RSS grew by {grew_mib:.0f} MiB during a 32K sparse prefill"


def test_cache_huge_pages_are_asked_for_and_change_nothing(monkeypatch):
    """The KV / indexer-key caches madvise their CPU tensors for transparent huge pages before the first touch
    (default on, ``PARCA_HUGEPAGES=0`` or ``huge_pages=False`` turns it off); contents start at zero either way."""
    import sys
    from pathlib import Path

    from parca import cache as cache_mod
    from parca.cache import CacheSpec, KVCache

    spec = CacheSpec(n_layers=2, n_kv_heads=2, head_dim=64, v_head_dim=64, index_dim=64, dtype=torch.float32,
                     index_dtype=torch.int8)
    asked = []
    real = cache_mod._madvise_huge
    monkeypatch.setattr(cache_mod, "_madvise_huge", lambda t: asked.append(t.numel() * t.element_size()) or real(t))
    on = KVCache(spec, 1, 8192)  # k / v 4 MiB each per layer: asked; the 512 KiB indexer keys and scales: not
    assert sorted(asked) == [4 << 20] * 4
    monkeypatch.setenv("PARCA_HUGEPAGES", "0")
    off = KVCache(spec, 1, 8192)
    assert len(asked) == 4
    monkeypatch.delenv("PARCA_HUGEPAGES")
    for a, b in zip(on.k + on.v + on.ik + on.iks, off.k + off.v + off.ik + off.iks):
        assert a.shape == b.shape and a.dtype == b.dtype and not a.any() and not b.any()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform.startswith("linux") and thp.is_file() and "[never]" not in thp.read_text():
        assert real(torch.empty(8 << 20, dtype=torch.uint8))  # the kernel accepted the advice
    assert KVCache(spec, 1, 16, huge_pages=True).k[0].shape == (1, 16, 2, 64)  # small tensors: plain zeros
