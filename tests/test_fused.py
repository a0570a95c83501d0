"""FusedLinear (parca/sparse/fused.py): several projections of one input as one matmul, against the members run
one by one (the reference); the members' storage is shared, never duplicated; replaced weights re-fuse; a
gradient still reaches every member; and a whole model's decode agrees fused and unfused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parca.checkpoint import load_model, save_model
from parca.config import SparseConfig
from parca.models.base import ForwardContext
from parca.sparse import FusedLinear
from parca.sparse import fused as fused_mod


def _linears(bias=(False, True, False), outs=(5, 3, 7), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(8, o, bias=b, dtype=dtype) for o, b in zip(outs, bias)]


def test_fused_equals_members_and_shares_storage():
    lins = _linears()
    f = FusedLinear(lins)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = [lin(x) for lin in lins]
        out = f(x)
        full = f.full(x)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(full, torch.cat(ref, -1))
    # members are views into the fused weight: nothing duplicated
    base = f.weight.untyped_storage().data_ptr()
    assert all(lin.weight.untyped_storage().data_ptr() == base for lin in lins)
    assert lins[1].bias.untyped_storage().data_ptr() == f.bias.untyped_storage().data_ptr()
    assert f.weight.numel() == sum(lin.weight.numel() for lin in lins)


@pytest.mark.parametrize("first", ["outer", "inner"])
def test_fusions_sharing_members_settle_without_copies(first):
    """Two fusions over shared members (the model's q/k/v/indexer matmul and the indexer's own query + weight
    matmul) must not take the storage from each other on every call: once the members lie back to back in one
    storage, the inner fusion is a view of it, and later calls move nothing."""
    lins = _linears(bias=(False, False, False, False), outs=(5, 3, 7, 2))
    outer, inner = FusedLinear(lins), FusedLinear(lins[2:])
    x = torch.randn(2, 8)
    order = [outer, inner] if first == "outer" else [inner, outer]
    with torch.no_grad():
        for f in order * 2:  # settle
            f(x)
        ptrs = [lin.weight.data_ptr() for lin in lins]
        storages = (outer.weight.untyped_storage().data_ptr(), inner.weight.untyped_storage().data_ptr())
        for _ in range(3):
            for f in order:
                out = f(x)
        assert [lin.weight.data_ptr() for lin in lins] == ptrs
        assert storages[0] == storages[1]  # the inner fusion views the outer one's storage
        assert (outer.weight.untyped_storage().data_ptr(), inner.weight.untyped_storage().data_ptr()) == storages
        for o, lin in zip(inner(x), lins[2:]):
            torch.testing.assert_close(o, lin(x))
        torch.testing.assert_close(outer.full(x), torch.cat([lin(x) for lin in lins], -1))
        assert out is not None


def test_in_place_updates_are_seen_and_replaced_weights_refuse():
    lins = _linears(bias=(False, False, False))
    f = FusedLinear(lins)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        f(x)
        lins[0].weight.mul_(2.0)  # in place (an optimizer step, load_state_dict's copy_)
        torch.testing.assert_close(f(x)[0], lins[0](x))
        lins[2].weight = nn.Parameter(torch.randn(7, 8))  # replaced (load_state_dict(assign=True))
        out = f(x)
        torch.testing.assert_close(out[2], lins[2](x))
        assert lins[2].weight.untyped_storage().data_ptr() == f.weight.untyped_storage().data_ptr()
        for lin in lins:
            lin.to(torch.float64)  # a dtype change replaces every tensor
        out = f(x.double())
        assert out[1].dtype == torch.float64
        torch.testing.assert_close(out[1], lins[1](x.double()))


def test_gradients_reach_every_member():
    lins = _linears()
    f = FusedLinear(lins)
    x = torch.randn(4, 8)
    sum(o.square().sum() for o in f(x)).backward()
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in lins)


def test_mixed_dtypes_run_apart():
    a, b = nn.Linear(8, 4), nn.Linear(8, 2, dtype=torch.float64)
    f = FusedLinear([a, b])
    assert not f.usable()
    with torch.no_grad():
        assert f._separate() and f.weight is None  # never fused: each member keeps its own tensor
    assert a.weight.untyped_storage().data_ptr() != b.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_model_decode_fused_equals_unfused(hf_dirs, arch, tmp_path):
    """Prefill + sparse decode with fused projections == the same with every projection run alone, and a model
    saved after fusing reloads with identical weights."""
    m = load_model(hf_dirs[arch][0])
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=6, index_rope_dim=8), seed=0)
    m.requires_grad_(False)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))

    def run():
        cache = m.make_cache(1, 32)
        outs = [m(ids[:, :20], cache, ForwardContext(slots=[0], starts=[0], modes=["sparse"], topks=[6]))]
        for t in range(20, 24):
            outs.append(m(ids[:, t : t + 1], cache, ForwardContext(slots=[0], starts=[t], modes=["sparse"], topks=[6])))
        return torch.cat(outs, 1)

    with torch.no_grad():
        with fused_mod.disabled():
            ref = run()
        got = run()
    att = m.model.layers[0].self_attn
    assert att._proj._fused
    # float32: the indexer's query and head-weight projections joined the q/k/v/indexer-key matmul
    assert att._proj.linears[-2:] == [att.indexer.wq_b, att.indexer.weights_proj]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    save_model(m, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_model_keeps_the_indexer_head_weights_apart(hf_dirs):
    """In a bf16 model ``weights_proj`` stays float32, so only q/k/v/indexer-key fuse (a mixed list would run
    unfused) and the indexer's queries and weights take their own matmuls."""
    m = load_model(hf_dirs["llama"][0])
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=6, index_rope_dim=8), seed=0)
    m.requires_grad_(False)
    m.to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = m.make_cache(1, 16)
        m(ids, cache, ForwardContext(slots=[0], starts=[0], modes=["sparse"], topks=[6]))
    att = m.model.layers[0].self_attn
    assert att._proj._fused and att._proj.linears == [att.q_proj, att.k_proj, att.v_proj, att.indexer.wk]


def test_dense_calls_skip_the_indexer_query_rows_and_share_storage_with_sparse(hf_dirs):
    """A float32 model with indexers: a dense-only forward fuses q/k/v/indexer-key alone (it does not pay for the
    indexer's query rows), a sparse one adds them, and both fusions view one storage: alternating moves nothing."""
    m = load_model(hf_dirs["llama"][0])
    m.add_indexers(SparseConfig(index_n_heads=2, index_head_dim=16, index_topk=6, index_rope_dim=8), seed=0)
    m.requires_grad_(False)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    att = m.model.layers[0].self_attn

    def run(mode):
        with torch.no_grad():
            m(ids, m.make_cache(1, 16), ForwardContext(slots=[0], starts=[0], modes=[mode], topks=[6]))

    run("dense")
    assert att._proj.linears == [att.q_proj, att.k_proj, att.v_proj, att.indexer.wk]
    run("sparse")
    assert att._proj.linears[-2:] == [att.indexer.wq_b, att.indexer.weights_proj]
    ptrs = [p.data_ptr() for p in (att.q_proj.weight, att.indexer.wk.weight, att.indexer.wq_b.weight)]
    for mode in ("dense", "sparse", "dense"):
        run(mode)
    assert [p.data_ptr() for p in (att.q_proj.weight, att.indexer.wk.weight, att.indexer.wq_b.weight)] == ptrs
    assert att._projs[4].weight.untyped_storage().data_ptr() == att._projs[6].weight.untyped_storage().data_ptr()
