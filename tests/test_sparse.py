"""The model-agnostic DSA core: every fast path against its oracle, plus the memory promise.

Oracles: ``reference`` (dense scores masked to the selected set), ``index_scores`` + ``torch.topk``
over the whole row, and a loop-by-loop hand computation of the indexer score with RoPE.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from parca.sparse import (
    LightningIndexer,
    apply_rope_half,
    attention_recall,
    dense,
    gather_rows,
    head_summed_probs,
    index_scores,
    indexer_kl,
    reference,
    select_topk,
    sparse,
)

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _qpos(b: int, t: int, starts: list[int]) -> torch.Tensor:
    """(B, T) absolute positions: row i is starts[i] .. starts[i] + t - 1."""
    return torch.tensor(starts).view(b, 1) + torch.arange(t).view(1, t)


def _indexer_inputs(g: torch.Generator, b: int, t: int, s: int, h_i: int = 3, d_i: int = 8):
    q_idx = torch.randn(b, t, h_i, d_i, generator=g)
    w = torch.randn(b, t, h_i, generator=g)
    k_idx = torch.randn(b, s, d_i, generator=g)
    return q_idx, w, k_idx


def _attn_inputs(g: torch.Generator, b: int, t: int, s: int, h: int, h_kv: int, d: int, dv: int):
    q = torch.randn(b, t, h, d, generator=g)
    k = torch.randn(b, s, h_kv, d, generator=g)
    v = torch.randn(b, s, h_kv, dv, generator=g)
    return q, k, v


def _visible_idx(q_pos: torch.Tensor, s: int, window: int | None = None) -> torch.Tensor:
    """(B, T, S) indices of exactly the visible keys, -1 elsewhere (the 'select everything' set)."""
    keys = torch.arange(s).view(1, 1, s)
    pos = q_pos.unsqueeze(-1)
    ok = keys <= pos
    if window is not None:
        ok &= keys > pos - window
    return torch.where(ok, keys, -1)


# ---------------------------------------------------------------- sparse vs reference


@HYP
@given(
    b=st.integers(1, 2),
    h_kv=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([4, 8]),
    dv=st.sampled_from([4, 6]),
    s=st.integers(1, 40),
    data=st.data(),
)
def test_sparse_matches_reference(b, h_kv, ratio, d, dv, s, data):
    t = data.draw(st.integers(1, s), label="t")
    topk = data.draw(st.integers(1, 48), label="topk")
    window = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="window")
    # row 0 is a chunk on top of a cached prefix ending at S-1; row 1 may start anywhere (its own prefix)
    starts = [s - t] + [data.draw(st.integers(0, s - t), label="start1") for _ in range(b - 1)]
    chunk_bytes = data.draw(st.sampled_from([1, 300, 64 * 2**20]), label="max_chunk_bytes")
    track_grad = data.draw(st.booleans(), label="track_grad")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    q_pos = _qpos(b, t, starts)
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, topk, window=window, max_chunk_bytes=chunk_bytes)
    q, k, v = _attn_inputs(g, b, t, s, h_kv * ratio, h_kv, d, dv)
    q.requires_grad_(track_grad)  # exercises both the autograd path and the workspace path
    scale = d**-0.5
    out = sparse(q, k, v, idx, scale, max_chunk_bytes=chunk_bytes)
    assert out.shape == (b, t, h_kv * ratio, dv) and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, k, v, idx, scale, q_pos), atol=1e-5, rtol=1e-5)


def test_sparse_edge_shapes_hit():
    """Deterministic corners next to the property test: T < k, context < k, decode with T = 1."""
    g = torch.Generator().manual_seed(1)
    for b, t, s, topk, h, h_kv in [(2, 3, 5, 8, 4, 1), (2, 1, 9, 4, 4, 2), (1, 6, 6, 2, 2, 2), (2, 4, 30, 16, 4, 4)]:
        q_pos = _qpos(b, t, [s - t] * b)
        idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, topk, max_chunk_bytes=64)
        q, k, v = _attn_inputs(g, b, t, s, h, h_kv, 8, 8)
        torch.testing.assert_close(sparse(q, k, v, idx, 0.3, max_chunk_bytes=1), reference(q, k, v, idx, 0.3, q_pos),
                                   atol=1e-5, rtol=1e-5)


def test_sparse_gradients_match_reference():
    g = torch.Generator().manual_seed(2)
    b, t, s, h, h_kv = 2, 5, 12, 4, 2
    q_pos = _qpos(b, t, [s - t, 3])
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, 4)
    q, k, v = _attn_inputs(g, b, t, s, h, h_kv, 8, 6)
    grads = []
    for fn in (lambda *a: sparse(*a, max_chunk_bytes=1), lambda *a: reference(*a, q_pos)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*leaves, idx, 0.35).square().sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_index_set_shared_by_all_heads():
    """idx carries no head dim; every query head attends to exactly the same rows (its own kv head's)."""
    g = torch.Generator().manual_seed(3)
    b, t, s, h, h_kv, d = 2, 4, 16, 8, 2, 8
    q_pos = _qpos(b, t, [s - t] * b)
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, 5)
    assert idx.shape == (b, t, 5) and idx.dtype == torch.int64
    q, k, v = _attn_inputs(g, b, t, s, h, h_kv, d, d)
    out = sparse(q, k, v, idx, 0.2)
    for head in range(h):
        kv = head // (h // h_kv)
        for bi in range(b):
            for ti in range(t):
                rows = idx[bi, ti][idx[bi, ti] >= 0]
                p = torch.softmax(k[bi, rows, kv] @ q[bi, ti, head] * 0.2, dim=0)
                torch.testing.assert_close(out[bi, ti, head], p @ v[bi, rows, kv], atol=1e-5, rtol=1e-5)


def test_sparse_bfloat16_close_to_float32():
    g = torch.Generator().manual_seed(4)
    b, t, s = 1, 6, 20
    q_pos = _qpos(b, t, [s - t])
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, 8)
    q, k, v = _attn_inputs(g, b, t, s, 4, 2, 8, 8)
    out = sparse(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, 0.3, max_chunk_bytes=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, idx, 0.3, q_pos), atol=3e-2, rtol=3e-2)


def test_sparse_noncontiguous_cache_view():
    """A cache slice of a bigger preallocated buffer (not flattenable) gathers the same rows."""
    g = torch.Generator().manual_seed(5)
    b, t, s = 2, 3, 10
    big_k = torch.randn(b, 32, 2, 8, generator=g)
    big_v = torch.randn(b, 32, 2, 8, generator=g)
    k, v = big_k[:, :s], big_v[:, :s]
    assert not k.is_contiguous()
    q_pos = _qpos(b, t, [s - t] * b)
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, 4)
    q = torch.randn(b, t, 4, 8, generator=g)
    torch.testing.assert_close(gather_rows(k, idx), gather_rows(k.contiguous(), idx))
    torch.testing.assert_close(sparse(q, k, v, idx, 0.3, max_chunk_bytes=1), reference(q, k, v, idx, 0.3, q_pos),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- select_topk


@HYP
@given(b=st.integers(1, 2), s=st.integers(1, 48), data=st.data())
def test_select_topk_matches_full_topk(b, s, data):
    t = data.draw(st.integers(1, s), label="t")
    topk = data.draw(st.integers(1, 56), label="topk")
    window = data.draw(st.one_of(st.none(), st.integers(1, 20)), label="window")
    starts = [s - t] + [data.draw(st.integers(0, s - t), label="start1") for _ in range(b - 1)]
    h_i = data.draw(st.integers(1, 4), label="h_i")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    q_idx, w, k_idx = _indexer_inputs(g, b, t, s, h_i=h_i)
    q_pos = _qpos(b, t, starts)

    full = index_scores(q_idx, w, k_idx, q_pos, window=window)  # (B, T, S)
    idx = select_topk(q_idx, w, k_idx, q_pos, topk, window=window)
    tiny = select_topk(q_idx, w, k_idx, q_pos, topk, window=window, max_chunk_bytes=1)  # one query per chunk
    assert idx.shape == (b, t, topk) and idx.dtype == torch.int64

    n_visible = torch.isfinite(full).sum(-1)  # (B, T)
    for sel in (idx, tiny):
        valid = sel >= 0
        assert torch.equal(valid.sum(-1), n_visible.clamp(max=topk))
        # valid entries form a prefix, in descending score order, without duplicates
        assert torch.equal(valid, valid.cummin(-1).values)
        for bi in range(b):
            for ti in range(t):
                rows = sel[bi, ti][valid[bi, ti]]
                assert len(set(rows.tolist())) == len(rows)
                pos = int(q_pos[bi, ti])
                assert bool((rows <= pos).all())
                if window is not None:
                    assert bool((rows > pos - window).all())
                got = full[bi, ti, rows]
                assert bool((got[:-1] >= got[1:]).all())
                want = full[bi, ti].topk(min(topk, s)).values
                want = want[torch.isfinite(want)]
                # compare sorted score VALUES: ties at exactly 0 (ReLU) may pick different keys
                torch.testing.assert_close(got.sort(descending=True).values, want, atol=1e-5, rtol=1e-5)
    # chunked == unchunked, index for index: ties are broken by key position, not by topk's whim
    assert torch.equal(idx, tiny)


def test_select_topk_chunked_equals_unchunked_exactly_without_ties():
    """With all scores positive (no ReLU zeros) the chosen index sets must be identical."""
    g = torch.Generator().manual_seed(6)
    b, t, s, topk = 2, 37, 53, 9
    q_idx, w, k_idx = _indexer_inputs(g, b, t, s)
    q_idx, k_idx, w = q_idx.abs(), k_idx.abs(), w.abs() + 0.1  # q.k > 0 everywhere
    q_pos = _qpos(b, t, [s - t, 5])
    for window in (None, 7):
        a = select_topk(q_idx, w, k_idx, q_pos, topk, window=window)
        for chunk_bytes in (1, 4 * s * 3 * 5, 10_000):
            c = select_topk(q_idx, w, k_idx, q_pos, topk, window=window, max_chunk_bytes=chunk_bytes)
            assert torch.equal(a.sort(-1).values, c.sort(-1).values)


def test_select_topk_ties_go_to_later_keys_whatever_the_chunking():
    """Few indexer heads -> many scores exactly 0 (all ReLUs off, +0.0 or -0.0). The selection must
    not depend on how queries are chunked, or full prefill, chunked prefill and decode would disagree."""
    g = torch.Generator().manual_seed(22)
    b, t, s, topk = 1, 40, 40, 6
    q_idx, w, k_idx = _indexer_inputs(g, b, t, s, h_i=1)
    q_pos = _qpos(b, t, [0])
    full = select_topk(q_idx, w, k_idx, q_pos, topk)
    assert (index_scores(q_idx, w, k_idx, q_pos) == 0).sum() > t  # the case is really full of ties
    for t0 in range(t):  # query by query with only the keys cached so far, like decode
        one = select_topk(q_idx[:, t0 : t0 + 1], w[:, t0 : t0 + 1], k_idx[:, : t0 + 1], q_pos[:, t0 : t0 + 1], topk)
        assert torch.equal(one, full[:, t0 : t0 + 1])
    # all scores 0 (with negative weights: -0.0 and +0.0 alike): the latest keys win, latest first
    zero = select_topk(q_idx, -w.abs(), torch.zeros_like(k_idx), q_pos, topk)
    assert zero[0, 20].tolist() == [20, 19, 18, 17, 16, 15]
    assert zero[0, 2].tolist() == [2, 1, 0, -1, -1, -1]


def test_select_topk_first_token_and_no_visible_keys():
    g = torch.Generator().manual_seed(7)
    q_idx, w, k_idx = _indexer_inputs(g, 1, 3, 6)
    q_pos = torch.tensor([[0, 1, -1]])  # -1: a padding query that sees nothing
    idx = select_topk(q_idx, w, k_idx, q_pos, 4)
    assert idx[0, 0].tolist() == [0, -1, -1, -1]
    assert sorted(idx[0, 1, :2].tolist()) == [0, 1] and idx[0, 1, 2:].tolist() == [-1, -1]
    assert idx[0, 2].tolist() == [-1] * 4


def test_index_scores_is_differentiable_and_masked():
    g = torch.Generator().manual_seed(8)
    q_idx, w, k_idx = (x.requires_grad_() for x in _indexer_inputs(g, 2, 4, 9))
    q_pos = _qpos(2, 4, [5, 2])
    sc = index_scores(q_idx, w, k_idx, q_pos, window=3)
    assert sc.dtype == torch.float32 and sc.shape == (2, 4, 9)
    keys = torch.arange(9)
    expect_visible = (keys <= q_pos.unsqueeze(-1)) & (keys > q_pos.unsqueeze(-1) - 3)
    assert torch.equal(torch.isfinite(sc), expect_visible)
    sc[torch.isfinite(sc)].sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q_idx, w, k_idx))


# ---------------------------------------------------------------- dense


@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (8, 2)])
def test_dense_matches_reference_all_visible(h, h_kv):
    g = torch.Generator().manual_seed(9)
    b, t, s = 2, 7, 19
    q_pos = _qpos(b, t, [s - t, 4])
    q, k, v = _attn_inputs(g, b, t, s, h, h_kv, 8, 6)
    want = reference(q, k, v, _visible_idx(q_pos, s), 0.3, q_pos)
    torch.testing.assert_close(dense(q, k, v, q_pos, 0.3), want, atol=1e-5, rtol=1e-5)
    # chunked == unchunked
    torch.testing.assert_close(dense(q, k, v, q_pos, 0.3, max_chunk_bytes=1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense(q, k, v, q_pos, 0.3, max_chunk_bytes=4 * s * 3), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8, 50])
def test_dense_window_matches_windowed_reference(window):
    g = torch.Generator().manual_seed(10)
    b, t, s = 2, 9, 21
    q_pos = _qpos(b, t, [s - t, 0])
    q, k, v = _attn_inputs(g, b, t, s, 4, 2, 8, 8)
    want = reference(q, k, v, _visible_idx(q_pos, s, window), 0.3, q_pos)
    for chunk_bytes in (1, 64 * 2**20):
        got = dense(q, k, v, q_pos, 0.3, window=window, max_chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_decode_fast_path():
    g = torch.Generator().manual_seed(11)
    b, s = 2, 17
    q_pos = torch.full((b, 1), s - 1)
    q, k, v = _attn_inputs(g, b, 1, s, 8, 2, 8, 8)
    want = reference(q, k, v, _visible_idx(q_pos, s), 0.3, q_pos)
    torch.testing.assert_close(dense(q, k, v, q_pos, 0.3), want, atol=1e-5, rtol=1e-5)
    # a decode row that does NOT see the whole cache must take the masked path
    q_pos2 = torch.tensor([[s - 1], [s - 5]])
    want2 = reference(q, k, v, _visible_idx(q_pos2, s), 0.3, q_pos2)
    torch.testing.assert_close(dense(q, k, v, q_pos2, 0.3), want2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h_kv", [1, 4])
def test_dense_fresh_prefill_from_position_zero(h_kv):
    """Queries 0..T-1 on an empty prefix take the is_causal path for their first chunk."""
    g = torch.Generator().manual_seed(21)
    b, s = 2, 23
    q, k, v = _attn_inputs(g, b, s, s, 4, h_kv, 8, 8)
    q_pos = _qpos(b, s, [0, 0])
    want = reference(q, k, v, _visible_idx(q_pos, s), 0.3, q_pos)
    for chunk_bytes in (1, 4 * s * 5, 64 * 2**20):  # 1 row, 5 rows, everything per chunk
        torch.testing.assert_close(dense(q, k, v, q_pos, 0.3, max_chunk_bytes=chunk_bytes), want, atol=1e-5, rtol=1e-5)
    # fewer queries than keys, still from 0 (keys beyond the last query are invisible)
    want_short = reference(q[:, :7], k, v, _visible_idx(q_pos[:, :7], s), 0.3, q_pos[:, :7])
    torch.testing.assert_close(dense(q[:, :7], k, v, q_pos[:, :7], 0.3), want_short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h_kv", [1, 2])
def test_topk_at_least_context_sparse_equals_dense(h_kv):
    g = torch.Generator().manual_seed(12)
    b, t, s = 2, 8, 14
    q_pos = _qpos(b, t, [s - t, 2])
    idx = select_topk(*_indexer_inputs(g, b, t, s), q_pos, s)
    q, k, v = _attn_inputs(g, b, t, s, 4, h_kv, 8, 8)
    torch.testing.assert_close(sparse(q, k, v, idx, 0.3), dense(q, k, v, q_pos, 0.3), atol=1e-5, rtol=1e-5)
    target = head_summed_probs(q, k, q_pos, 0.3)
    torch.testing.assert_close(attention_recall(target, idx), torch.ones(b, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- head_summed_probs and losses


def test_head_summed_probs_is_normalised_mean_of_head_softmaxes():
    g = torch.Generator().manual_seed(13)
    b, t, s, h, h_kv = 2, 5, 11, 4, 2
    q_pos = _qpos(b, t, [s - t, 1])
    q, k, _ = _attn_inputs(g, b, t, s, h, h_kv, 8, 8)
    p = head_summed_probs(q, k, q_pos, 0.4, window=4)
    assert p.shape == (b, t, s) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(b, t))
    keys = torch.arange(s)
    vis = (keys <= q_pos.unsqueeze(-1)) & (keys > q_pos.unsqueeze(-1) - 4)
    kf = k.repeat_interleave(h // h_kv, dim=2)
    sc = torch.einsum("bthd,bshd->bths", q, kf) * 0.4
    want = torch.softmax(sc.masked_fill(~vis.unsqueeze(2), -math.inf), -1).mean(2)
    torch.testing.assert_close(p, want, atol=1e-6, rtol=1e-5)


def test_indexer_kl_zero_at_optimum_and_positive_otherwise():
    g = torch.Generator().manual_seed(14)
    b, t, s = 2, 6, 10
    q_pos = _qpos(b, t, [s - t, 0])
    scores = index_scores(*_indexer_inputs(g, b, t, s), q_pos)
    target = torch.softmax(scores, -1)
    assert abs(float(indexer_kl(scores, target))) < 1e-6
    sel = select_topk(*_indexer_inputs(g, b, t, s), q_pos, 3)
    assert abs(float(indexer_kl(scores, target, sel))) < 1e-6  # renormalised target == restricted softmax
    other = torch.softmax(scores * 0.5, -1)
    kl = indexer_kl(scores, other)
    want = (other * (other.clamp_min(1e-30).log() - torch.log_softmax(scores, -1).clamp_min(-1e30))).where(
        other > 0, torch.zeros(())).sum(-1).mean()
    assert float(kl) > 0
    torch.testing.assert_close(kl, want)


def test_indexer_kl_trains_every_indexer_parameter():
    torch.manual_seed(15)
    b, t, s, rope = 2, 6, 6, 4
    ix = LightningIndexer(q_in_dim=12, k_in_dim=16, n_heads=3, head_dim=8, rope_dim=rope)
    with torch.no_grad():  # non-trivial LayerNorm affine, so its grads are not special
        ix.k_norm.weight.normal_(1.0, 0.2)
        ix.k_norm.bias.normal_(0.0, 0.2)
    q_in, x = torch.randn(b, t, 12), torch.randn(b, t, 16)
    cos, sin = _rope_tables(torch.arange(t).expand(b, t), rope)
    q_pos = _qpos(b, t, [0, 0])
    scores = index_scores(ix.queries(q_in, cos, sin), ix.head_weights(x), ix.keys(x, cos, sin), q_pos)
    qa, ka, _ = _attn_inputs(torch.Generator().manual_seed(16), b, t, s, 4, 2, 8, 8)
    target = head_summed_probs(qa, ka, q_pos, 0.5).detach()
    sel = select_topk(ix.queries(q_in, cos, sin), ix.head_weights(x), ix.keys(x, cos, sin), q_pos, 3)
    for selected in (None, sel):
        ix.zero_grad()
        loss = indexer_kl(scores, target, selected)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward(retain_graph=True)
        for name, p in ix.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_indexer_kl_safe_with_minus_inf_and_zero_targets():
    scores = torch.tensor([[[1.0, -math.inf, 0.5], [2.0, 0.0, -math.inf]]], requires_grad=True)
    target = torch.tensor([[[0.7, 0.0, 0.3], [1.0, 0.0, 0.0]]])
    loss = indexer_kl(scores, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    sel = torch.tensor([[[0, 2, -1], [1, -1, -1]]])  # second row: target has no mass on its selection
    scores.grad = None
    loss = indexer_kl(scores, target, sel)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


def test_attention_recall_partial():
    target = torch.tensor([[[0.5, 0.3, 0.2, 0.0]]])
    assert attention_recall(target, torch.tensor([[[0, 2, -1]]])).tolist() == [[pytest.approx(0.7)]]
    assert attention_recall(target, torch.tensor([[[-1, -1, -1]]])).tolist() == [[0.0]]


# ---------------------------------------------------------------- LightningIndexer


def _rope_tables(pos: torch.Tensor, r: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, r) rotate-half cos/sin: cat(c, c)."""
    inv = base ** (-torch.arange(0, r, 2).float() / r)  # (r/2,)
    ang = pos.float().unsqueeze(-1) * inv  # (B, T, r/2)
    return torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()


def test_lightning_indexer_matches_naive_loops():
    torch.manual_seed(17)
    q_dim, k_dim, h_i, d_i, r = 10, 12, 3, 8, 4
    ix = LightningIndexer(q_dim, k_dim, h_i, d_i, r)
    with torch.no_grad():
        ix.k_norm.weight.normal_(1.0, 0.3)
        ix.k_norm.bias.normal_(0.0, 0.3)
    t = 5
    pos = torch.arange(3, 3 + t).view(1, t)  # not starting at 0, so RoPE angles matter
    q_in, x = torch.randn(1, t, q_dim), torch.randn(1, t, k_dim)
    cos, sin = _rope_tables(pos, r)
    got = index_scores(ix.queries(q_in, cos, sin), ix.head_weights(x), ix.keys(x, cos, sin), pos - 3)  # causal in key slots 0..t-1

    wq, wk, wp = (p.detach().double() for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight))
    gam, bet = ix.k_norm.weight.detach().double(), ix.k_norm.bias.detach().double()

    def rope(vec, p):  # pair i with i + r/2 (rotate-half); dims >= r untouched
        out = vec.clone()
        for i in range(r // 2):
            theta = p * 10000.0 ** (-2 * i / r)
            a, b = vec[i], vec[i + r // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + r // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    want = _naive_scores(rope, wq, wk, wp, gam, bet, q_in, x, pos, h_i, d_i)
    torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-5)


def _naive_scores(rope, wq, wk, wp, gam, bet, q_in, x, pos, h_i, d_i):
    """I[t, s] one scalar at a time, float64, straight from the paper's formula."""
    t = x.shape[1]
    keys = []
    for si in range(t):
        kk = wk @ x[0, si].double()
        kk = (kk - kk.mean()) / torch.sqrt(kk.var(unbiased=False) + 1e-6) * gam + bet
        keys.append(rope(kk, int(pos[0, si])))
    want = torch.full((1, t, t), -math.inf, dtype=torch.float64)
    for ti in range(t):
        qq = (wq @ q_in[0, ti].double()).view(h_i, d_i)
        wt = (wp @ x[0, ti].double()) * h_i**-0.5 * d_i**-0.5
        for si in range(t):
            if si > ti:
                continue
            want[0, ti, si] = sum(wt[j] * max(0.0, float(rope(qq[j], int(pos[0, ti])) @ keys[si])) for j in range(h_i))
    return want


def test_apply_rope_half_rotates_only_first_r_dims():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2, 5, 3, 10, generator=g)
    cos, sin = _rope_tables(torch.arange(5).expand(2, 5) + 7, 6)
    y = apply_rope_half(x, cos, sin)
    assert torch.equal(y[..., 6:], x[..., 6:])
    assert not torch.allclose(y[..., :6], x[..., :6])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms
    x3 = x[:, :, 0]
    torch.testing.assert_close(apply_rope_half(x3, cos, sin), y[:, :, 0])  # (B,T,D) == one head of (B,T,H,D)
    empty = torch.zeros(2, 5, 0)
    assert torch.equal(apply_rope_half(x, empty, empty), x)  # r = 0: no RoPE


def test_weights_proj_stays_float32_through_module_casts():
    torch.manual_seed(19)
    ix = LightningIndexer(8, 12, 4, 8, 4)
    before = ix.weights_proj.weight.detach().clone()
    assert before.dtype == torch.float32
    ix.to(torch.bfloat16)
    assert ix.weights_proj.weight.dtype == torch.float32
    assert torch.equal(ix.weights_proj.weight, before)  # no lossy bf16 round trip
    assert ix.wq_b.weight.dtype == ix.wk.weight.dtype == ix.k_norm.weight.dtype == torch.bfloat16
    ix.half()
    assert ix.weights_proj.weight.dtype == torch.float32 and ix.wk.weight.dtype == torch.float16
    nested = torch.nn.Sequential(LightningIndexer(8, 12, 4, 8, 4, dtype=torch.bfloat16)).to(dtype=torch.float16)
    assert nested[0].weights_proj.weight.dtype == torch.float32 and nested[0].wq_b.weight.dtype == torch.float16
    # bf16 activations in, float32 weights out
    ix.to(torch.bfloat16)
    x = torch.randn(1, 3, 12, dtype=torch.bfloat16)
    w = ix.head_weights(x)
    assert w.dtype == torch.float32 and w.shape == (1, 3, 4)
    cos, sin = _rope_tables(torch.arange(3).view(1, 3), 4)
    assert ix.queries(torch.randn(1, 3, 8, dtype=torch.bfloat16), cos, sin).shape == (1, 3, 4, 8)
    assert ix.keys(x, cos, sin).shape == (1, 3, 8)
    assert set(ix.state_dict()) == {"wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"}


def test_indexer_rejects_rope_tables_of_wrong_width():
    ix = LightningIndexer(8, 12, 4, 8, 4)
    cos, sin = _rope_tables(torch.arange(3).view(1, 3), 8)
    with pytest.raises(ValueError, match="rope_dim"):
        ix.keys(torch.randn(1, 3, 12), cos, sin)


# ---------------------------------------------------------------- memory


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_select_sparse_dense_never_build_t_by_s():
    g = torch.Generator().manual_seed(20)
    b, t, s, topk = 1, 4096, 4096, 64
    q_pos = _qpos(b, t, [0])
    q_idx, w, k_idx = _indexer_inputs(g, b, t, s, h_i=2, d_i=8)
    q, k, v = _attn_inputs(g, b, t, s, 2, 1, 8, 8)
    budget = 2**20  # chunks of tens of rows: the biggest block is ~T*S/64
    with _MaxNumel() as m:
        idx = select_topk(q_idx, w, k_idx, q_pos, topk, max_chunk_bytes=budget)
        out = sparse(q, k, v, idx, 0.3, max_chunk_bytes=budget)
        out_d = dense(q, k, v, q_pos, 0.3, max_chunk_bytes=budget)
    assert m.max_numel < t * s // 16, m.max_numel
    assert out.shape == out_d.shape == (b, t, 2, 8)
    # spot-check the first rows (context < topk there, so sparse == dense)
    torch.testing.assert_close(out[:, :topk], out_d[:, :topk], atol=1e-5, rtol=1e-5)
