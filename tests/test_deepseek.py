"""DeepSeek-V3.2 (MLA + MoE + DSA) against transformers' deepseek_v32 (the oracle, which always applies its
top-k mask), against itself (latent-cache paths), the hub's fp8 checkpoint format, the config's byte counts, and
the fp8 indexer precision helpers of parca.sparse.quant."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tokenizer
from parca import cost
from parca import sparse as dsa
from parca.checkpoint import load_model, write_json_atomic, write_safetensors_atomic
from parca.config import config_from_hf_dict
from parca.engine import Engine, SamplingParams
from parca.errors import ConfigError
from parca.models.base import ForwardContext
from parca.models.deepseek import (DeepseekV32ForCausalLM, dequantize_block_fp8, latent_sparse_attention, rope_pairs,
                                   softmax_scale)
from parca.sparse import quant

TOPK = 8
LAYERS = 3  # layer 0 dense MLP (first_k_dense_replace=1), layers 1-2 MoE


def hf_deepseek(seed: int = 0, **over):
    """A tiny random transformers DeepseekV32ForCausalLM (float32) with weights of a reasonable scale."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
              routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24,
              qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
              index_topk=TOPK, index_head_dim=32, index_n_heads=8, max_position_embeddings=512, bos_token_id=0,
              eos_token_id=1, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                               "mscale_all_dim": 1.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                               "beta_slow": 1})
    kw.update(over)
    model = tf.DeepseekV32ForCausalLM(tf.DeepseekV32Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                # indexer projections larger: few keys whose every head's q.k is <= 0 (exact-zero score ties)
                p.normal_(0, 0.2 if ".indexer." in name else 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.05)  # the bias must steer the choice for the test to see it
    return model


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """(saved dir, transformers model, parca model)."""
    hf = hf_deepseek()
    path = tmp_path_factory.mktemp("ds") / "tiny-v32"
    hf.save_pretrained(str(path), max_shard_size="150KB")  # sharded, like the hub checkpoints
    make_tokenizer(path)
    return path, hf, load_model(path)


def ctx(starts, mode="sparse", topk=TOPK, observer=None):
    n = len(starts)
    return ForwardContext(slots=list(range(n)), starts=list(starts), modes=[mode] * n, topks=[topk] * n,
                          observer=observer)


def ids_of(b, t, seed=1):
    return torch.randint(0, 300, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- against transformers -----------------------------------------------------------------------
@pytest.mark.parametrize("T", [6, 40])
def test_logits_match_transformers(ds, T):
    path, hf, model = ds
    assert (path / "model.safetensors.index.json").is_file()
    assert isinstance(model, DeepseekV32ForCausalLM)
    ids = ids_of(2, T)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)  # no ctx: sparse with the checkpoint's top-k, as transformers runs it
    assert (out - ref).abs().max().item() <= 1e-4


def test_sparse_differs_from_dense_past_topk(ds):
    """Else the T=40 comparison above would not prove the selection is right."""
    _, _, model = ds
    ids = ids_of(1, 40)
    with torch.no_grad():
        assert (model(ids, None, ctx([0], "dense")) - model(ids, None, ctx([0], "sparse"))).abs().max() > 1e-3
        short = ids[:, :TOPK]  # context <= k: sparse is dense
        assert (model(short, None, ctx([0], "dense")) - model(short, None, ctx([0], "sparse"))).abs().max() <= 1e-5


def test_selection_matches_transformers_indexer(ds):
    """Feed transformers' indexer inputs to parca's indexer + select_topk: same sets (or, at ties, the same
    sorted score values); and the model's own indexer inputs (observer) equal transformers'."""
    _, hf, model = ds
    T = 40
    ids = ids_of(1, T, seed=4)
    captured: dict[int, tuple] = {}
    hooks = [layer.self_attn.indexer.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, (args[0], args[1], args[2], out)))
        for i, layer in enumerate(hf.model.layers)]
    views = {}
    try:
        with torch.no_grad():
            hf(ids)
            model(ids, None, ctx([0], observer=lambda v: views.__setitem__(v.layer, v)))
    finally:
        for h in hooks:
            h.remove()
    q_pos = torch.arange(T)[None]
    for i in range(LAYERS):
        hs, q_resid, (cos, sin), hf_idx = captured[i]
        # the model feeds its indexer the same query latent and hidden state as transformers
        assert (views[i].q_in - q_resid).abs().max() <= 1e-5
        assert (views[i].x - hs).abs().max() <= 1e-5
        ix = model.model.layers[i].self_attn.indexer
        with torch.no_grad():
            qi, w, k = ix.queries(q_resid, cos, sin), ix.head_weights(hs), ix.keys(hs, cos, sin)
            idx = dsa.select_topk(qi, w, k, q_pos, TOPK)
            scores = dsa.index_scores(qi, w, k, q_pos)[0]  # (T,T)
        hf_idx = hf_idx[0].long()
        exact = 0
        for t in range(T):
            mine = idx[0, t][idx[0, t] >= 0]
            theirs = hf_idx[t][hf_idx[t] <= t]  # transformers picks masked (future) slots when t+1 < k
            assert len(mine) == len(theirs) == min(TOPK, t + 1)
            if set(mine.tolist()) == set(theirs.tolist()):
                exact += 1
            else:
                assert torch.allclose(scores[t, mine].sort().values, scores[t, theirs].sort().values, atol=1e-6)
        assert exact >= T - 2  # ties are rare with these weights
        # the model's own selection is the one checked here
        assert torch.equal(views[i].idx, idx)


def test_engine_greedy_matches_transformers_generate(ds):
    path, hf, model = ds
    prompt = ids_of(1, 21, seed=7)[0].tolist()  # 21 > top-k 8: the selection matters from the start
    n_new = 10
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0, len(prompt):].tolist()
    if 1 in ref:
        ref = ref[: ref.index(1)]  # parca does not return the EOS token itself
    eng = Engine(model, max_slots=2, prefill_chunk=6)  # chunked prefill on top of the cached prefix
    out = eng.generate([prompt], SamplingParams(max_new_tokens=n_new, attention="sparse"))[0]
    assert out.token_ids == ref


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_full_equals_prefill_decode_and_chunked(ds, mode):
    _, _, model = ds
    T = 40
    ids = ids_of(1, T, seed=2)
    with torch.no_grad():
        full = model(ids, None, ctx([0], mode))
        for chunks in ([20], [5, 11, 16]):
            cache = model.make_cache(1, T)
            outs, pos = [], 0
            for c in chunks + [1] * (T - sum(chunks)):
                outs.append(model(ids[:, pos : pos + c], cache, ctx([pos], mode)))
                pos += c
            assert (full - torch.cat(outs, 1)).abs().max().item() <= 1e-4


def test_batched_decode_rows_of_different_lengths_and_modes(ds):
    _, _, model = ds
    a, b = ids_of(1, 30, seed=5), ids_of(1, 17, seed=6)
    with torch.no_grad():
        ref_a = model(a, None, ctx([0], "sparse"))[0, -1]
        ref_b = model(b, None, ctx([0], "dense"))[0, -1]
        cache = model.make_cache(2, 32)
        model(a[:, :-1], cache, ForwardContext(slots=[0], starts=[0], modes=["sparse"], topks=[TOPK]))
        model(b[:, :-1], cache, ForwardContext(slots=[1], starts=[0], modes=["dense"], topks=[TOPK]))
        step = model(torch.cat([a[:, -1:], b[:, -1:]]), cache,
                     ForwardContext(slots=[0, 1], starts=[29, 16], modes=["sparse", "dense"], topks=[TOPK, TOPK]))
    assert (step[0, -1] - ref_a).abs().max() <= 1e-4
    assert (step[1, -1] - ref_b).abs().max() <= 1e-4


def test_cache_is_the_latent(ds):
    _, _, model = ds
    spec = model.cache_spec()
    assert (spec.n_kv_heads, spec.head_dim, spec.v_head_dim, spec.index_dim) == (1, 16, 32, 32)
    assert model.has_indexers and model.sparse_config.index_topk == TOPK
    assert model.sparse_config.index_rope_dim == 16 and model.index_rotary is model.rotary
    sd = model.indexer_state_dict()
    assert {k.split(".indexer.")[1] for k in sd} == {"wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                                     "weights_proj.weight"}
    assert model.config.parameter_count() == sum(t.numel() for t in model.state_dict().values())


# ---- attention pieces ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [64 * 2**20, 2000])
def test_latent_sparse_attention_matches_reference(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    B, T, S, H, r, dr, k = 2, 7, 19, 3, 8, 4, 5
    q_lat, q_pe = torch.randn(B, T, H, r, generator=g), torch.randn(B, T, H, dr, generator=g)
    c, k_pe = torch.randn(B, S, r, generator=g), torch.randn(B, S, dr, generator=g)
    q_pos = torch.arange(S - T, S)[None].expand(B, T)
    qi, w = torch.randn(B, T, 2, 6, generator=g), torch.randn(B, T, 2, generator=g)
    ik = torch.randn(B, S, 6, generator=g)
    idx = dsa.select_topk(qi, w, ik, q_pos, k)
    idx[0, 0, 2:] = -1  # unused slots are masked
    out = latent_sparse_attention(q_lat, q_pe, c, k_pe, idx, 0.3, max_chunk_bytes=chunk_bytes)
    ref = dsa.reference(torch.cat([q_lat, q_pe], -1), torch.cat([c, k_pe], -1)[:, :, None], c[:, :, None], idx, 0.3,
                        q_pos)
    assert (out - ref).abs().max() <= 1e-5


def test_rope_pairs_is_interleaved_rotation():
    """Pair (x[2i], x[2i+1]) rotated by angle i (DeepSeek's complex-multiply RoPE), written de-interleaved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 8, generator=g)
    ang = torch.rand(1, 3, 4, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    z = torch.view_as_complex(x.view(1, 3, 2, 4, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, :, None]
    want = torch.view_as_real(z)  # (1,3,2,4,2) interleaved
    got = rope_pairs(x, cos, sin)
    assert torch.allclose(got[..., :4], want[..., 0], atol=1e-6)
    assert torch.allclose(got[..., 4:], want[..., 1], atol=1e-6)


# ---- fp8 checkpoints ----------------------------------------------------------------------------
def _fp8_quantise_weight(w: torch.Tensor, g: torch.Generator):
    """A hub-style fp8 weight: per 128x128 block, w ~ fp8 * scale_inv (scale_inv random, not a power of two)."""
    rows, cols = w.shape
    sb = (-(-rows // 128), -(-cols // 128))
    blocks = torch.zeros(sb)
    for i in range(sb[0]):
        for j in range(sb[1]):
            blocks[i, j] = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().max() / 448
    scale_inv = blocks * (1 + 0.3 * torch.rand(sb, generator=g))
    full = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale_inv


def test_fp8_checkpoint_dequantises_on_load(ds, tmp_path):
    if not quant.HAS_FP8:
        pytest.skip("torch build without float8_e4m3fn")
    path, _, _ = ds
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    g = torch.Generator().manual_seed(0)
    quantised, expected = {}, {}
    for name, t in state.items():
        # DeepSeek quantises linear weights (lm_head too here: 300 rows = 3 blocks, edge block truncated)
        if t.dim() == 2 and "embed_tokens" not in name and not name.endswith("mlp.gate.weight") \
                and "weights_proj" not in name:
            q, s = _fp8_quantise_weight(t, g)
            quantised[name], quantised[name + "_scale_inv"] = q, s
            expected[name] = dequantize_block_fp8(q, s)
        else:
            quantised[name] = expected[name] = t
    # an MTP layer (model.layers.{num_hidden_layers}) as the hub ships it: dropped on load
    quantised[f"model.layers.{LAYERS}.eh_proj.weight"] = torch.zeros(64, 128).to(torch.float8_e4m3fn)
    quantised[f"model.layers.{LAYERS}.eh_proj.weight_scale_inv"] = torch.ones(1, 1)
    out = tmp_path / "fp8"
    names = sorted(quantised)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        write_safetensors_atomic({k: quantised[k] for k in keys}, out / fname, {"format": "pt"})
    write_json_atomic({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}},
                      out / "model.safetensors.index.json")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    cfg["num_nextn_predict_layers"] = 1
    write_json_atomic(cfg, out / "config.json")
    model = load_model(out)
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for name, want in expected.items():
        assert torch.equal(sd[name], want.to(sd[name].dtype)), name
    assert not torch.equal(expected["lm_head.weight"], state["lm_head.weight"])  # quantisation did change them
    lm, lm_q = state["lm_head.weight"], expected["lm_head.weight"]
    assert (lm_q - lm).abs().max() < 0.1 * lm.abs().max()


def test_dequantize_block_fp8_edge_blocks():
    w = torch.randn(300, 200).to(torch.float8_e4m3fn) if quant.HAS_FP8 else torch.randn(300, 200)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = dequantize_block_fp8(w, s)
    wf = w.float()
    assert torch.equal(out[:128, :128], wf[:128, :128] * 1) and torch.equal(out[128:256, 128:], wf[128:256, 128:] * 4)
    assert torch.equal(out[256:, 128:], wf[256:, 128:] * 6)
    with pytest.raises(ConfigError, match="scale_inv has shape"):
        dequantize_block_fp8(w, s[:2])


def test_prepare_state_splits_fused_experts(ds):
    _, hf, model = ds
    sd = model.state_dict()
    base = "model.layers.1.mlp.experts."
    fused = {k: v for k, v in sd.items() if not k.startswith(base)}
    E = 8
    fused[base + "gate_up_proj"] = torch.stack([torch.cat([sd[f"{base}{e}.gate_proj.weight"],
                                                           sd[f"{base}{e}.up_proj.weight"]]) for e in range(E)])
    fused[base + "down_proj"] = torch.stack([sd[f"{base}{e}.down_proj.weight"] for e in range(E)])
    out = DeepseekV32ForCausalLM.prepare_state(fused, model.config)
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


# ---- config numbers -----------------------------------------------------------------------------
V32_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048, "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_v32_config_bytes_and_parameters():
    cfg = config_from_hf_dict(json.loads(json.dumps(V32_CONFIG)), name="DeepSeek-V3.2")
    assert (cfg.family, cfg.head_dim) == ("deepseek_v32", 192)
    assert cfg.sparse.index_rope_dim == 64 and cfg.sparse.index_topk == 2048
    # MLA latent: config.json alone and the cost model agree
    assert cfg.kv_bytes_per_token_per_layer == cost.kv_bytes_per_token_per_layer(cfg) == 1152
    assert cost.kv_bytes_per_token_per_layer(cfg, 1) == 656  # 512 fp8 + 4 fp32 scales + 64 bf16
    assert cost.indexer_bytes_per_token_per_layer(cfg.sparse, "fp8") == 132
    assert cfg.kv_bytes_per_token == 1152 * 61
    # 671.03B for V3 (main model, no MTP) + 61 x 13.96M indexers
    assert 671.8e9 < cfg.parameter_count() < 672.0e9
    # yarn: the softmax scale carries mscale(40, 1)^2
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


def test_gqa_config_numbers_unchanged(hf_dirs):
    from parca.config import load_config

    cfg = load_config(hf_dirs["llama"][0])
    assert cfg.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4


def test_index_precision_option(ds):
    _, _, model = ds
    assert model.index_precision == "full"
    with pytest.raises(ConfigError, match="index_precision"):
        model.index_precision = "int4"
    sets = {}
    for prec in ("full", "fp8"):
        model.index_precision = prec
        got = []
        with torch.no_grad():
            model(ids_of(1, 40, seed=3), None, ctx([0], observer=lambda v: got.append(v.idx)))
        sets[prec] = got
    model.index_precision = "full"
    inter = total = 0
    for a, b in zip(sets["full"], sets["fp8"]):
        for t in range(a.shape[1]):
            sa, sb = set(a[0, t].tolist()) - {-1}, set(b[0, t].tolist()) - {-1}
            inter += len(sa & sb)
            total += len(sa)
    assert inter / total > 0.9  # fp8 scoring moves a few picks, not the selection


# ---- quant.py -----------------------------------------------------------------------------------
def test_hadamard_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 256, generator=g, dtype=torch.float64), torch.randn(5, 256, generator=g, dtype=torch.float64)
    hx, hy = quant.hadamard(x), quant.hadamard(y)
    assert torch.allclose((hx * hy).sum(-1), (x * y).sum(-1), atol=1e-10)  # dot products (per 128-block too)
    assert torch.allclose(quant.hadamard(hx), x, atol=1e-12)  # symmetric + orthogonal: its own inverse
    h = quant.hadamard(torch.eye(128, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 128**-0.5))
    # blocks are independent: rotating one block leaves the other alone
    z = torch.zeros(1, 256, dtype=torch.float64)
    z[0, 3] = 1.0
    assert quant.hadamard(z)[0, 128:].abs().max() == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.sampled_from([32, 128, 256]))
def test_fp8_round_trip_bounds_and_pow2_scales(seed, mag, d):
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed)) * mag
    q, s = quant.quantize_fp8_blocks(x)
    blk = min(128, d)
    assert s.shape == (3, d // blk) and s.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    amax = x.view(3, d // blk, blk).abs().amax(-1)
    assert (amax / s <= 448).all() and (amax / s > 224).all()  # rounded UP, by less than a factor 2
    deq = quant.dequantize_fp8_blocks(q, s)
    sfull = s.repeat_interleave(blk, -1)
    # 3 mantissa bits: half an ulp is 2**-4 relative; below the smallest normal the grid is 2**-9 * scale
    assert ((deq - x).abs() <= torch.maximum(x.abs() * 2**-4, sfull * 2**-10) + 1e-12).all()


def test_fp8_simulation_matches_torch():
    if not quant.HAS_FP8:
        pytest.skip("torch build without float8_e4m3fn")
    x = torch.cat([torch.randn(5000) * 100, torch.randn(5000) * 0.01, torch.tensor([448.0, -448.0, 0.0, 2**-9])])
    assert torch.equal(quant._fp8_round_simulated(x.clamp(-448, 448)), quant.fp8_round(x))


def test_fake_quant_indexer_keeps_scores_close():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, 128, generator=g), torch.randn(50, 128, generator=g)
    exact = torch.einsum("thd,sd->ths", q, k)
    fq = torch.einsum("thd,sd->ths", quant.fake_quant_indexer(q), quant.fake_quant_indexer(k))
    assert (fq - exact).abs().max() < 0.1 * exact.abs().max()
    assert quant.fake_quant_indexer(q.bfloat16()).dtype == torch.bfloat16


def test_int8_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0
    q, s = quant.quantize_int8_rows(x)
    assert q.dtype == torch.int8 and s.shape == (6, 1) and q.abs().max() <= 127
    assert ((quant.dequantize_int8_rows(q, s) - x).abs() <= s / 2 + 1e-12).all()
    assert (q[2] == 0).all()
