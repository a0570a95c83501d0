"""Analytic cost model: hand-computed FLOPs/bytes, DeepSeek's published ratios, devices, report shapes."""

from __future__ import annotations

import json

import pytest

from parca import cost
from parca.config import ModelConfig, SparseConfig
from parca.errors import ParcaError


def _gqa_a() -> ModelConfig:
    # hidden 64, MLP 128, 2 layers, 4 query heads, 2 KV heads of 16, vocab 100, bf16
    return ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=100, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512, torch_dtype="bfloat16")


def _gqa_b() -> ModelConfig:
    # hidden 32, MLP 64, 3 layers, 2 heads = 2 KV heads of 16 (MHA), vocab 50, tied, float32
    return ModelConfig(architecture="Qwen2ForCausalLM", family="qwen2", vocab_size=50, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, torch_dtype="float32")


def _check(b: cost.Breakdown, **want: float) -> None:
    for k, v in want.items():
        assert getattr(b, k) == pytest.approx(v), k
    names = [f"{c}_{x}" for c in cost.COMPONENTS for x in ("flops", "bytes")]
    for k in names:
        if k not in want:
            assert getattr(b, k) == 0, k


# ---- hand-computed GQA values -----------------------------------------------------------------
def test_gqa_a_dense_decode():
    b = cost.per_token(_gqa_a(), 10, phase="decode", mode="dense")
    # weights per layer: q 64*4*16 = 4096, k+v 2*64*2*16 = 4096, o 4*16*64 = 4096, MLP 3*64*128 = 24576
    #   -> 36864; 2 layers 73728; LM head 100*64 = 6400 -> 80128 params, 2 FLOPs each, 2 bytes each (bf16)
    # attention: position 10 -> 11 keys (own included); per pair QK 2*4*16 + PV 2*4*16 = 256 FLOPs
    #   -> 2 layers * 256 * 11 = 5632; KV row 2*2*16*2 = 128 B: read 11 rows + write 1, per layer
    _check(b, linear_flops=2 * 80128, linear_bytes=80128 * 2,
           attention_flops=2 * 256 * 11, attention_bytes=2 * (11 * 128 + 128))
    assert b.total_flops == 160256 + 5632 and b.total_bytes == 160256 + 3072


def test_gqa_a_sparse_decode():
    sc = SparseConfig(index_n_heads=2, index_head_dim=8, index_topk=4, index_rope_dim=4)
    b = cost.per_token(_gqa_a(), 10, phase="decode", mode="sparse", sparse=sc)
    # indexer projections per layer: wq_b 64*2*8 = 1024, wk 64*8 = 512, weights_proj 64*2 = 128 -> 1664
    linear = 80128 + 2 * 1664
    # indexer: 2*H_I*D_I = 32 FLOPs per pair, 11 keys; fp8 key 8 + 4 (scale) = 12 B: read 11 + write 1
    # top-k: 11 comparisons, 8 B (fp32 logit written + read) per candidate
    # attention: min(4, 11) = 4 pairs * 256; own row written (128 B); gather 4 rows * 128 B
    _check(b, linear_flops=2 * linear, linear_bytes=linear * 2,
           indexer_flops=2 * 32 * 11, indexer_bytes=2 * (11 * 12 + 12),
           topk_flops=2 * 11, topk_bytes=2 * 8 * 11,
           attention_flops=2 * 256 * 4, attention_bytes=2 * 128, gather_bytes=2 * 4 * 128)
    assert b.fp8_components == ("indexer",)


def test_gqa_a_prefill_chunk_and_batch_share_reads():
    sc = SparseConfig(index_n_heads=2, index_head_dim=8, index_topk=4, index_rope_dim=4)
    # 2 sequences per step, chunks of 4 tokens: weights read once for 8 tokens, cache rows once per 4
    d = cost.per_token(_gqa_a(), 10, phase="prefill", mode="dense", batch=2, query_tokens_per_step=4)
    _check(d, linear_flops=2 * 80128, linear_bytes=80128 * 2 / 8,
           attention_flops=2 * 256 * 11, attention_bytes=2 * (11 * 128 / 4 + 128))
    s = cost.per_token(_gqa_a(), 10, phase="prefill", mode="sparse", sparse=sc, batch=2, query_tokens_per_step=4)
    linear = 80128 + 2 * 1664
    _check(s, linear_flops=2 * linear, linear_bytes=linear * 2 / 8,
           indexer_flops=2 * 32 * 11, indexer_bytes=2 * (11 * 12 / 4 + 12),
           topk_flops=2 * 11, topk_bytes=2 * 8 * 11,
           attention_flops=2 * 256 * 4, attention_bytes=2 * 128, gather_bytes=2 * 4 * 128)


def test_gqa_b_dense_and_sparse_with_mtp_batch():
    cfg = _gqa_b()
    # weights per layer: q 32*32 = 1024, k+v 2*32*32 = 2048, o 1024, MLP 3*32*64 = 6144 -> 10240;
    #   3 layers 30720; LM head (tied, still multiplied) 50*32 = 1600 -> 32320 params, 4 B each (fp32)
    # batch 4 x 2 query tokens per step: weights shared by 8 tokens, cache rows by the 2 of one sequence
    # attention: position 7 -> 8 keys; per pair 4*2*16 = 128 FLOPs; KV row 2*2*16*4 = 256 B
    for phase in ("decode", "prefill"):  # GQA attention is the same kernel shape in both phases
        b = cost.per_token(cfg, 7, phase=phase, mode="dense", batch=4, query_tokens_per_step=2)
        _check(b, linear_flops=2 * 32320, linear_bytes=32320 * 4 / 8,
               attention_flops=3 * 128 * 8, attention_bytes=3 * (8 * 256 / 2 + 256))
    sc = SparseConfig(index_n_heads=1, index_head_dim=16, index_topk=16, index_rope_dim=0)
    for phase in ("decode", "prefill"):
        b = cost.per_token(cfg, 7, phase=phase, mode="sparse", sparse=sc, batch=4, query_tokens_per_step=2,
                           index_key_dtype="float32")
        # indexer projections per layer: 32*1*16 + 32*16 + 32*1 = 1056 -> 3 layers 3168
        linear = 32320 + 3 * 1056
        # float32 keys: 16 * 4 = 64 B; top-k 16 > 8 keys, so all 8 are kept
        _check(b, linear_flops=2 * linear, linear_bytes=linear * 4 / 8,
               indexer_flops=3 * 2 * 16 * 8, indexer_bytes=3 * (8 * 64 / 2 + 64),
               topk_flops=3 * 8, topk_bytes=3 * 8 * 8,
               attention_flops=3 * 128 * 8, attention_bytes=3 * 256, gather_bytes=3 * 8 * 256)
        assert b.fp8_components == ()


def test_position_zero_sees_only_itself():
    b = cost.per_token(_gqa_b(), 0, phase="decode", mode="dense")
    assert b.attention_flops == 3 * 128 * 1


def test_tiny_mla_moe_by_hand():
    cfg = ModelConfig(architecture="DeepseekV3ForCausalLM", family="deepseek_v3", vocab_size=10, hidden_size=16,
                      intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=6, max_position_embeddings=64, torch_dtype="bfloat16",
                      extra={"q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2,
                             "v_head_dim": 4, "moe_intermediate_size": 6, "n_routed_experts": 4,
                             "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1})
    # attention weights per layer: q_a 16*8 + q_b 8*2*6 = 224, kv_a 16*10 = 160, kv_b 8*2*8 = 128, o 2*4*16 = 128
    # layer 0 dense MLP 3*16*32 = 1536; layer 1 MoE: expert 3*16*6 = 288, shared 288 + router 16*4,
    #   2 routed -> 928 activated; LM head 160.  Total 160 + 2*640 + 1536 + 928 = 3904
    assert cost.activated_parameters(cfg) == 3904
    # decode: MQA mode, per pair 2*2*(8+2) + 2*2*8 = 72; 6 keys; bf16 latent row (8+2)*2 = 20 B
    d = cost.per_token(cfg, 5, phase="decode", mode="dense")
    _check(d, linear_flops=2 * 3904, linear_bytes=3904 * 2,  # 1 token touches exactly its 2 experts
           attention_flops=2 * 72 * 6, attention_bytes=2 * (6 * 20 + 20))
    # prefill, chunk of 2: MHA mode, per pair 2*2*(4+2) + 2*2*4 = 40; the 5 cached prefix latents are
    # up-projected once per step (2*8*2*8 = 256 FLOPs each) and their per-head K/V (2*(4+2+4) values,
    # 2 B) written + read; 2 tokens touch 4*(1 - (1/2)^2) = 3 experts on average
    p = cost.per_token(cfg, 5, phase="prefill", mode="dense", query_tokens_per_step=2)
    _check(p, linear_flops=2 * 3904, linear_bytes=(3904 + 288) * 2 / 2,
           attention_flops=2 * (40 * 6 + 256 * 5 / 2),
           attention_bytes=2 * (6 * 20 / 2 + 20) + 2 * (2 * 2 * 10 * 2 * 5 / 2))
    assert cost.kv_bytes_per_token_per_layer(cfg, 1) == 8 + 4 + 2 * 2


def test_roofline_arithmetic():
    dev = cost.Device("t", 1e12, 4e12, 1e10, 0.5, 0.5, kernel_efficiency={"decode.sparse.attention": 0.25})
    b = cost.Breakdown(linear_flops=1e9, linear_bytes=1e6, attention_flops=1e8, gather_bytes=1e7,
                       indexer_flops=4e8, indexer_bytes=1e3, phase="decode", mode="sparse",
                       fp8_components=("indexer",))
    t = cost.time_breakdown(b, dev)
    assert t["linear"] == pytest.approx(max(1e9 / 0.5e12, 1e6 / 0.5e10))  # compute-bound: 2 ms
    assert t["attention"] == pytest.approx(max(1e8 / 0.25e12, 1e7 / 0.5e10))  # fused with gather: 2 ms memory
    assert t["indexer"] == pytest.approx(4e8 / 2e12)  # fp8 rate
    assert t["topk"] == 0
    assert cost.seconds_per_token(b, dev) == pytest.approx(sum(t.values()))


def test_cost_per_million():
    # 1 ms per token at 2 USD/h: 2/3600 USD/s * 1e-3 s * 1e6 tokens = 0.5556 USD
    assert cost.cost_per_million(1e-3, 2.0) == pytest.approx(2.0 / 3600 * 1e-3 * 1e6)
    assert cost.cost_per_million(1e-3, 2.0, n_devices=8) == pytest.approx(8 * 0.5555555)
    # cost.md's form: n * price / (tokens_per_second * 3600) * 1e6
    assert cost.cost_per_million(1 / 500, 3.0, 2) == pytest.approx(2 * 3.0 / (500 * 3600) * 1e6)
    with pytest.raises(ParcaError):
        cost.cost_per_million(-1, 2.0)


# ---- DeepSeek presets -------------------------------------------------------------------------
def test_deepseek_preset_sizes():
    cfg, sc, a = cost.preset("deepseek-v3.2")
    assert cfg.family == "deepseek_v32" and cfg.num_hidden_layers == 61 and sc.index_topk == 2048
    assert cost.kv_bytes_per_token_per_layer(cfg) == 1152
    assert cost.kv_bytes_per_token_per_layer(cfg, kv_dtype_bytes=2) == 1152
    assert cost.kv_bytes_per_token_per_layer(cfg, kv_dtype_bytes=1) == 656
    assert cost.indexer_bytes_per_token_per_layer(sc) == 132
    assert cost.indexer_bytes_per_token_per_layer(sc, "bfloat16") == 256
    assert cost.indexer_bytes_per_token_per_layer(sc, "float32") == 512
    assert cost.indexer_bytes_per_token_per_layer(sc, "int8") == 132
    # DeepSeek: 36.6B activated parameters (0.9B LM head included); indexer about 14.0M per layer
    assert cost.activated_parameters(cfg) == pytest.approx(36.6e9, rel=0.01)
    assert (cost.activated_parameters(cfg, sc) - cost.activated_parameters(cfg)) / 61 == pytest.approx(14.0e6, rel=0.01)
    # published per-pair FLOPs: MHA 81,920, MQA 278,528, indexer 16,384
    one = cost.per_token(cfg, 0, phase="prefill", mode="dense").attention_flops / 61
    assert one == 81920
    assert cost.per_token(cfg, 0, phase="decode", mode="dense").attention_flops / 61 == 278528
    assert cost.per_token(cfg, 0, phase="decode", mode="sparse", sparse=sc).indexer_flops / 61 == 16384
    assert a["query_tokens_per_step"] == 2 and a["kv_dtype_bytes"] == 1
    with pytest.raises(ParcaError):
        cost.indexer_bytes_per_token_per_layer(sc, "fp4")


def test_dense_column_of_v32_is_v31_terminus():
    v32, sc, a = cost.preset("deepseek-v3.2")
    v31, none, _ = cost.preset("deepseek-v3.1-terminus")
    assert none is None and v31.family == "deepseek_v3"
    for phase in ("prefill", "decode"):
        kw = dict(phase=phase, mode="dense", batch=a["batch"], query_tokens_per_step=2, kv_dtype_bytes=1)
        assert cost.per_token(v32, 65536, **kw) == cost.per_token(v31, 65536, **kw)


def _ratios_at(position: int) -> dict:
    v32, sc, a = cost.preset("deepseek-v3.2")
    v31, _, _ = cost.preset("deepseek-v3.1-terminus")
    h800 = cost.get_device("h800")
    sparse = cost.cost_rows(v32, sc, [position], h800, 2.0, assumptions=a)[0]
    dense = cost.cost_rows(v31, sc, [position], h800, 2.0, assumptions=a)[0]
    return {ph: sparse[f"{ph}_sparse"] / dense[f"{ph}_dense"] for ph in ("prefill", "decode")}


def test_paper_ratios_at_128k_within_35_percent():
    r = _ratios_at(131072)
    paper = cost.paper_point(131072)
    assert paper["prefill_ratio"] == pytest.approx(0.28, abs=0.01)
    assert paper["decode_ratio"] == pytest.approx(0.115, abs=0.001)
    assert r["prefill"] == pytest.approx(0.28, rel=0.35)
    assert r["decode"] == pytest.approx(0.115, rel=0.35)


def test_paper_ratio_needs_deepseeks_modes():
    # cost.md: counting dense prefill in MQA mode misses the paper's ratio by far more than 35%
    v32, sc, a = cost.preset("deepseek-v3.2")
    row = cost.cost_rows(v32, sc, [131072], cost.DEVICES["h800"], 2.0,
                         assumptions={**a, "dense_prefill_attention": "mqa"})[0]
    assert row["prefill_ratio"] < 0.28 * 0.65


@pytest.mark.parametrize("name", ["deepseek-v3.2", "deepseek-v3.1-terminus"])
def test_crossover(name):
    cfg, sc, a = cost.preset(name)
    rows = cost.cost_rows(cfg, sc, [1024, 131072], cost.DEVICES["h800"], 2.0, assumptions=a)
    short, long = rows
    for ph in ("prefill", "decode"):
        assert short[f"{ph}_sparse"] > short[f"{ph}_dense"], ph
        assert long[f"{ph}_sparse"] < long[f"{ph}_dense"], ph
        assert long[f"{ph}_ratio"] < short[f"{ph}_ratio"]


def test_rows_ordered_and_fields():
    cfg, sc, a = cost.preset("deepseek-v3.2")
    rows = cost.cost_rows(cfg, sc, [131072, 1024, 32768, 1024], cost.DEVICES["h200"], 2.0, assumptions=a)
    assert [r["position"] for r in rows] == [1024, 32768, 131072]
    for r in rows:
        for k in ("prefill_dense", "prefill_sparse", "decode_dense", "decode_sparse", "prefill_ratio",
                  "decode_ratio", "prefill_dense_s", "decode_sparse_s"):
            assert r[k] > 0, k
        assert r["decode_dense"] == pytest.approx(cost.cost_per_million(r["decode_dense_s"], 2.0))
        assert r["prefill_ratio"] == pytest.approx(r["prefill_sparse"] / r["prefill_dense"])
    # dense grows with position, and faster than sparse
    assert rows[0]["decode_dense"] < rows[1]["decode_dense"] < rows[2]["decode_dense"]


def test_report_text_and_json():
    cfg, sc, a = cost.preset("deepseek-v3.2")
    text = cost.cost_report(cfg, sc, [1024, 131072], cost.DEVICES["h800"], 2.0, assumptions=a)
    assert text.index("assumptions") < text.index("position")
    for needle in ("MHA mode", "multi-token prediction", "batch 4608", "compute 0.65", "memory 0.90",
                   "0.281", "0.665"):
        assert needle in text, needle
    doc = json.loads(cost.cost_report(cfg, sc, [1024, 131072], cost.DEVICES["h800"], 2.0, assumptions=a,
                                      as_json=True))
    for k in ("rows", "device", "price_per_hour", "assumptions", "model"):
        assert k in doc
    assert len(doc["rows"]) == 2 and doc["device"]["name"] == "H800" and doc["price_per_hour"] == 2.0
    assert doc["paper"]["rows"][-1]["position"] == 131072
    # a GQA model with no indexer: a what-if indexer is named, and no paper column
    g, gsc, _ = cost.preset("llama-3.1-8b")
    text = cost.cost_report(g, gsc, [1024], cost.DEVICES["a100"], 1.5)
    assert "what-if" in text and "paper" not in text


def test_override_is_noted():
    cfg, sc, a = cost.preset("deepseek-v3.2")
    doc = json.loads(cost.cost_report(cfg, sc, [1024], cost.DEVICES["h800"], 2.0,
                                      assumptions={**a, "batch": 64}, as_json=True))
    assert doc["assumptions"]["overrides"] == {"batch": 64}
    assert any("batch = 64" in n for n in doc["assumptions"]["notes"])


# ---- devices, presets, parsing ----------------------------------------------------------------
def test_devices_and_errors():
    assert {"h800", "h100", "h200", "a100"} <= set(cost.DEVICES)
    assert cost.get_device("H800") is cost.DEVICES["h800"]
    assert cost.DEVICES["h200"].mem_bw > cost.DEVICES["h800"].mem_bw
    assert cost.DEVICES["a100"].peak_flops_fp8 is None
    with pytest.raises(ParcaError, match="h800"):
        cost.get_device("tpu-v9")
    with pytest.raises(ParcaError, match="deepseek-v3.2"):
        cost.preset("gpt-5")
    with pytest.raises(ParcaError):
        cost.per_token(_gqa_a(), 4, phase="decode", mode="sparse")  # no indexer anywhere
    with pytest.raises(ParcaError):
        cost.per_token(_gqa_a(), 4, phase="train", mode="dense")


def test_calibrate_this_machine_is_cached():
    dev = cost.calibrate_this_machine(seconds=0.2)
    assert dev.name == "cpu" and dev.peak_flops > 1e8 and dev.mem_bw > 1e8
    assert dev.flops_efficiency == dev.bw_efficiency == 1.0 and dev.peak_flops_fp8 is None
    assert cost.get_device("this-machine") is dev
    b = cost.per_token(_gqa_a(), 100, phase="decode", mode="dense")
    assert cost.seconds_per_token(b, dev) > 0


def test_parse_positions():
    assert cost.parse_positions("1k,8k,32k,128k") == [1024, 8192, 32768, 131072]
    assert cost.parse_positions(" 100, 2K ,0") == [100, 2048, 0]
    for bad in ("1k,,8k", "8kb", "-5", "1.5k"):
        with pytest.raises(ParcaError, match="cannot read"):
            cost.parse_positions(bad)


def test_breakdown_add_and_dict():
    a = cost.per_token(_gqa_a(), 3, phase="decode", mode="dense")
    s = a + a
    assert s.total_flops == pytest.approx(2 * a.total_flops)
    assert s.scaled(0.5).total_bytes == pytest.approx(a.total_bytes)
    d = a.to_dict()
    assert d["total_flops"] == a.total_flops and d["phase"] == "decode"
