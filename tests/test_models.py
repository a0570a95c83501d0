"""parca's models against transformers (the oracle) and against themselves (cache paths)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, hf_model, save_hf
from parca.checkpoint import load_model
from parca.config import load_config
from parca.models.base import ForwardContext


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_dirs, arch):
    path, hf = hf_dirs[arch]
    model = load_model(path)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-4


def test_mistral_window_matters(hf_dirs):
    """The sliding window must change the result past the window (else the test above proves nothing)."""
    path, hf = hf_dirs["mistral"]
    model = load_model(path)
    model.model.layers[0].self_attn.window = None
    model.model.layers[1].self_attn.window = None
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() > 1e-3


def test_sharded_checkpoint(tmp_path):
    hf = hf_model("qwen2", seed=3)
    path = save_hf(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_bfloat16_load(hf_dirs):
    path, hf = hf_dirs["llama"]
    model = load_model(path, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        out = model(ids).float()
        ref = hf(ids).logits
    assert (out - ref).abs().max().item() < 0.2  # bf16 rounding, same math


def test_config_dialects(tmp_path, hf_dirs):
    """transformers 5 writes rope_parameters; Hub checkpoints carry rope_theta / rope_scaling: same config."""
    path, _ = hf_dirs["llama3_rope"]
    raw = json.loads((path / "config.json").read_text())
    v5 = load_config(path)
    old = dict(raw)
    rp = old.pop("rope_parameters")
    old["rope_theta"] = rp["rope_theta"]
    old["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(old))
    v4 = load_config(d)
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling
    assert v5.rope_scaling["rope_type"] == "llama3"


def _decode_all(model, ids, chunks):
    """Prefill ids in the given chunk sizes, then decode the rest token by token through one cache."""
    cache = model.make_cache(1, ids.shape[1])
    outs, pos = [], 0
    for c in chunks:
        ctx = ForwardContext(slots=[0], starts=[pos])
        outs.append(model(ids[:, pos : pos + c], cache, ctx))
        pos += c
    while pos < ids.shape[1]:
        ctx = ForwardContext(slots=[0], starts=[pos])
        outs.append(model(ids[:, pos : pos + 1], cache, ctx))
        pos += 1
    return torch.cat(outs, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_full_equals_prefill_decode_and_chunked(hf_dirs, arch):
    model = load_model(hf_dirs[arch][0])
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        pd = _decode_all(model, ids, [20])
        chunked = _decode_all(model, ids, [7, 13, 9, 19])
    assert (full - pd).abs().max().item() <= 1e-4
    assert (full - chunked).abs().max().item() <= 1e-4


def test_batched_rows_in_one_forward(hf_dirs):
    """Rows of a batch at different positions (decode of several requests) == each row alone."""
    model = load_model(hf_dirs["qwen2"][0])
    a = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.make_cache(2, 64)
        model(a[:, :-1], cache, ForwardContext([0], [0]))
        model(b[:, :-1], cache, ForwardContext([1], [0]))
        step = model(torch.cat([a[:, -1:], b[:, -1:]], 0), cache, ForwardContext([0, 1], [29, 11]))
        ra, rb = model(a)[:, -1], model(b)[:, -1]
    assert (step[0, -1] - ra[0]).abs().max().item() <= 1e-4
    assert (step[1, -1] - rb[0]).abs().max().item() <= 1e-4
