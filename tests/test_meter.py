"""The per-request meter: counts add up, cost = time x price, the analytic sums are exact, dense == itself."""

from __future__ import annotations

import math

import pytest

from parca import cost
from parca.checkpoint import load_model
from parca.config import SparseConfig
from parca.engine import Engine, SamplingParams
from parca.meter import analytic_sum


def test_analytic_sum_equals_per_position_sum(hf_dirs):
    cfg = load_model(hf_dirs["llama"][0]).config
    sc = SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=20, index_rope_dim=8)
    for phase, mode, (a, b) in [("decode", "sparse", (5, 60)), ("decode", "dense", (0, 33)),
                                ("prefill", "sparse", (0, 47))]:
        fast = analytic_sum(cfg, sc, a, b, phase=phase, mode=mode, chunk=1)
        slow = sum((cost.per_token(cfg, p, phase=phase, mode=mode, sparse=sc, index_key_dtype="float32")
                    for p in range(a, b)), start=cost.per_token(cfg, 0, phase=phase, mode=mode, sparse=sc).scaled(0))
        assert math.isclose(fast.total_flops, slow.total_flops, rel_tol=1e-9)
        assert math.isclose(fast.total_bytes, slow.total_bytes, rel_tol=1e-9)


@pytest.fixture(scope="module")
def engine(hf_dirs):
    m = load_model(hf_dirs["llama"][0])
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=16, index_rope_dim=8), seed=0)
    return Engine(m, None, max_slots=2, price_per_hour=3.6, meter_device="h800")


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_meter_fields_consistent(engine, attention):
    res = engine.generate([list(range(3, 100))], SamplingParams(max_new_tokens=5, attention=attention, ignore_eos=True))[0]
    m = res.meter
    assert m.prompt_tokens == 97 and m.completion_tokens == 5 == len(res.token_ids)
    assert m.to_dict()["total_tokens"] == res.usage["total_tokens"] == 102
    assert m.cached_prompt_tokens == 0
    assert m.seconds == pytest.approx(m.prefill_s + m.decode_s)
    assert m.cost_usd == pytest.approx(m.seconds * 3.6 / 3600)  # cost = time x price
    assert m.ttft_s <= m.e2e_s and m.tpot_s >= 0
    assert m.flops > 0 and m.bytes > 0
    if attention == "dense":
        assert m.dense_cost_usd == pytest.approx(m.cost_usd) and m.dense_flops == m.flops
    else:
        # past k=16 a query's main attention shrinks from p to k keys; the indexer adds its own O(p) cost
        assert m.flops != m.dense_flops and m.dense_cost_usd > 0
