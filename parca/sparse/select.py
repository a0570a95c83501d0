"""Causal top-k key selection from lightning-indexer scores, computed one query chunk at a time.

A full (T, S) float32 score matrix is 64 GiB at 128K tokens, so ``select_topk`` scores a chunk of
queries, keeps its top-k and drops the chunk before the next one (the DeepGEMM-logits -> top-k split
production engines use). ``index_scores`` is the same computation for one chunk, differentiable, for
tests and indexer training.

Two key formats: float keys (scored with one float32 bmm per chunk) and int8 keys with one float32 scale per
token (``k_scale``; 68 B/token at D_I = 64 instead of 256). With int8 keys the queries are quantised per
(token, head) too, the dots are exact integers (AVX-512 VNNI in ``kernels``) and the epilogue is a fixed float
sequence, so a query's scores are bit-identical whatever the chunking: ``index_scores_int8`` is their oracle.
The top-k of every row then runs in ``kernels.topk_rows`` (sample-then-filter radix selection in C, or its
torch twin), which keeps the tie-break to the later key exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .quant import quantize_int8_rows

__all__ = ["index_scores", "index_scores_int8", "select_topk", "gather_rows", "visibility_mask"]


def visibility_mask(q_pos: Tensor, s_lo: int, s_hi: int, window: int | None) -> Tensor:
    """Which keys each query may see: causal by absolute position, optionally a sliding window.

    Args:
        q_pos: (B, T) int64 absolute query positions.
        s_lo: first key position covered by the mask.
        s_hi: one past the last key position covered.
        window: if set, key s is visible only when ``q_pos - window < s <= q_pos``.

    Returns:
        (B, T, s_hi - s_lo) bool, True where visible.
    """
    s = torch.arange(s_lo, s_hi, device=q_pos.device)  # (S',)
    pos = q_pos.unsqueeze(-1)  # (B, T, 1)
    visible = s <= pos
    if window is not None:
        visible &= s > pos - window
    return visible


def _key_span(pos_lo: list[int], pos_hi: list[int], t0: int, t1: int, s: int, window: int | None) -> tuple[int, int]:
    """Key range [lo, hi) that any query of rows t0..t1-1 (any batch row) can see, clipped to [0, s).

    ``pos_lo`` / ``pos_hi`` are the per-query-row min / max of q_pos over the batch; hi <= lo means
    no query of the chunk sees any key.
    """
    hi = min(s, max(pos_hi[t0:t1]) + 1)
    lo = 0 if window is None else max(0, min(pos_lo[t0:t1]) - window + 1)
    return lo, hi


def _check_window(window: int | None) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (or None for full causal attention)")


def _scores_block(q_idx: Tensor, w: Tensor, k_idx: Tensor) -> Tensor:
    """Unmasked indexer scores of a query chunk against a key span, float32.

    Args:
        q_idx: (B, T, H_I, D_I).
        w: (B, T, H_I).
        k_idx: (B, S, D_I).

    Returns:
        (B, T, S) float32.
    """
    b, t, h, d = q_idx.shape
    s = k_idx.shape[1]
    # one bmm for all heads: (B, T*H_I, D_I) @ (B, D_I, S) -> (B, T*H_I, S)
    qk = torch.bmm(q_idx.float().reshape(b, t * h, d), k_idx.float().transpose(1, 2))
    qk = torch.relu(qk).view(b * t, h, s)  # (B*T, H_I, S)
    # weighted head sum as a second bmm: (B*T, 1, H_I) @ (B*T, H_I, S) -> (B*T, 1, S)
    return torch.bmm(w.float().reshape(b * t, 1, h), qk).view(b, t, s)


def index_scores(q_idx: Tensor, w: Tensor, k_idx: Tensor, q_pos: Tensor, *, window: int | None = None) -> Tensor:
    """Masked lightning-indexer scores ``I[b,t,s] = sum_j w[b,t,j] * relu(q[b,t,j] . k[b,s])``.

    Builds the whole (B, T, S) block: call it per query chunk. Differentiable w.r.t. ``q_idx``, ``w``
    and ``k_idx`` (indexer training).

    Args:
        q_idx: (B, T, H_I, D_I) indexer queries.
        w: (B, T, H_I) float32 head weights.
        k_idx: (B, S, D_I) indexer keys of positions 0..S-1.
        q_pos: (B, T) int64 absolute positions of the queries.
        window: if set, keys at ``s <= q_pos - window`` are masked too.

    Returns:
        (B, T, S) float32, ``-inf`` where ``s > q_pos`` (causal) or outside the window.
    """
    _check_window(window)
    scores = _scores_block(q_idx, w, k_idx)
    visible = visibility_mask(q_pos, 0, k_idx.shape[1], window)
    return scores.masked_fill(~visible, float("-inf"))


def _quantize_queries(q_idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 queries, one scale per (token, head), folded into the head weights.

    Returns:
        q8: (B, T, H_I, D_I) int8; qw: (B, T, H_I) float32 = w * query scale.
    """
    q8, qs = quantize_int8_rows(q_idx)  # (B, T, H_I, D_I), (B, T, H_I, 1)
    return q8, w.float() * qs.squeeze(-1)


def index_scores_int8(q_idx: Tensor, w: Tensor, k8: Tensor, k_scale: Tensor, q_pos: Tensor, *,
                      window: int | None = None) -> Tensor:
    """Masked indexer scores exactly as ``select_topk`` computes them from int8 keys (the oracle of that path).

    The queries are quantised per (token, head) like the keys (``quant.quantize_int8_rows``), then
    ``I[b,t,s] = k_scale[b,s] * sum_j relu(q8[b,t,j] . k8[b,s]) * (w[b,t,j] * q_scale[b,t,j])``: the integer dot
    is exact and the head sum runs in float32 in ascending head order. Builds (B, T, S): pass a query chunk.

    Args:
        q_idx: (B, T, H_I, D_I) float indexer queries.
        w: (B, T, H_I) float32 head weights.
        k8: (B, S, D_I) int8 keys.
        k_scale: (B, S) (or (B, S, 1)) float32 per-token key scales.
        q_pos: (B, T) int64 absolute query positions.
        window: optional sliding window.

    Returns:
        (B, T, S) float32, ``-inf`` where not visible.
    """
    _check_window(window)
    q8, qw = _quantize_queries(q_idx, w)
    b, t = q8.shape[:2]
    s = k8.shape[1]
    ks = k_scale.reshape(b, s).float()
    scores = torch.stack([kernels.index_scores_i8_torch(q8[i], qw[i], k8[i], ks[i]) for i in range(b)])
    visible = visibility_mask(q_pos, 0, s, window)
    return scores.view(b, t, s).masked_fill(~visible, float("-inf"))


_INVISIBLE = torch.iinfo(torch.int64).min  # sort key of a masked key: below every real one


def _tiebreak_keys(scores: Tensor, positions: Tensor, out: Tensor) -> Tensor:
    """Exact int64 sort keys ordering by (score, key position), so top-k never sees a tie.

    With few indexer heads many scores are exactly 0 (every ReLU off), and ``torch.topk`` breaks
    ties differently for different row lengths: the same query would pick different keys in a full
    prefill and in a chunked prefill or decode. Packing the score's order-preserving int32 image
    above the key position makes the choice unique: equal scores go to the LATER key.

    Args:
        scores: (B, Tc, S') float32, finite; overwritten (its bits are reused as scratch).
        positions: (S',) int64 absolute key positions (< 2**32).
        out: (B, Tc, S') int64 workspace.

    Returns:
        ``out``, filled with ``(ordered_bits(score) << 32) + position``.
    """
    scores.add_(0.0)  # -0.0 (a negative weight times ReLU 0) -> +0.0, so all zeros tie
    bits = scores.view(torch.int32)
    # IEEE floats order like sign-magnitude ints: flipping the 31 magnitude bits of negatives makes
    # the int32 order match the float order (arithmetic >> 31 is all ones exactly for negatives)
    bits ^= (bits >> 31) & 0x7FFFFFFF
    out.copy_(bits)
    out.bitwise_left_shift_(32)
    return out.add_(positions)


# Cap on the float32 score rows of one chunk on the C path (kept in a reused scratch buffer). Larger chunks
# amortise the per-chunk key transposition over more queries: 512 queries x 128K int8 keys, 1 thread, measured
# 344 / 281 / 274 / 269 ms with 2 / 8 / 32 / 64 MiB chunks; 32 MiB keeps most of that and less memory held.
_FAST_CHUNK_BYTES = 32 * 2**20


def _visible_ranges(q_pos: Tensor, s: int, window: int | None) -> tuple[Tensor, Tensor]:
    """(B, T) int64 [lo, hi) of the keys each query sees: causal, optionally windowed, clipped to [0, s)."""
    hi = (q_pos + 1).clamp(0, s)
    lo = torch.zeros_like(hi) if window is None else (q_pos - window + 1).clamp(0, s)
    return lo, torch.maximum(hi, lo)


def select_topk(
    q_idx: Tensor,
    w: Tensor,
    k_idx: Tensor,
    q_pos: Tensor,
    topk: int,
    *,
    window: int | None = None,
    max_chunk_bytes: int = 64 * 2**20,
    k_scale: Tensor | None = None,
    order: str = "score",
) -> Tensor:
    """Indices of the ``topk`` highest-scoring visible keys per query, chunked over queries.

    Per chunk of queries only the span of keys some query in the chunk can see is scored (in a causal
    prefill that halves the indexer work). The intermediates of a chunk stay under ``max_chunk_bytes`` per
    batch row; the (T, S) matrix is never built. No gradient.

    Ties are broken deterministically in favour of the later key, so a query selects the same keys
    whatever the chunking (full prefill == chunked prefill == decode), even where many scores are
    exactly 0 after the ReLU.

    Args:
        q_idx: (B, T, H_I, D_I) indexer queries.
        w: (B, T, H_I) float32 head weights.
        k_idx: (B, S, D_I) indexer keys of positions 0..S-1: float, or int8 with ``k_scale``.
        q_pos: (B, T) int64 absolute query positions.
        topk: keys to keep per query.
        window: optional sliding window, as in ``index_scores``.
        max_chunk_bytes: budget for the score intermediates of one chunk, per batch row.
        k_scale: (B, S) (or (B, S, 1)) float32 per-token scales of int8 ``k_idx``; the scores are then
            ``index_scores_int8``'s (queries quantised per token and head, exact integer dots).
        order: "score" (default): valid indices in descending score order (equal scores: later key first);
            "position": valid indices in ascending key position (what a gather from a contiguous cache
            wants; the set is the same).

    Returns:
        (B, T, topk) int64. Row t holds ``min(topk, visible keys)`` valid key indices FIRST (in ``order``),
        then ``-1`` padding.
    """
    _check_window(window)
    if topk < 1:
        raise ValueError(f"select_topk: topk={topk} must be >= 1")
    if order not in ("score", "position"):
        raise ValueError(f"select_topk: order must be 'score' or 'position', got {order!r}")
    quantized = k_idx.dtype == torch.int8
    if quantized and k_scale is None:
        raise ValueError("select_topk: int8 indexer keys need their per-token scales (k_scale=(B, S) float32)")
    if not quantized and k_scale is not None:
        raise ValueError(f"select_topk: k_scale is only for int8 keys, got {k_idx.dtype} keys")
    b, t, h, _ = q_idx.shape
    s = k_idx.shape[1]
    fast = q_idx.device.type == "cpu" and kernels.available()
    if quantized and fast and t > 0 and s > 0:
        # the C path builds no autograd graph: no no_grad context to enter (~20 us per call)
        return _select_i8_fast(q_idx, w, k_idx, k_scale, q_pos, topk, window, max_chunk_bytes, order)
    with torch.no_grad():
        return _select_torch(q_idx, w, k_idx, q_pos, topk, window, max_chunk_bytes, k_scale, order, fast)


def _select_torch(q_idx: Tensor, w: Tensor, k_idx: Tensor, q_pos: Tensor, topk: int, window: int | None,
                  max_chunk_bytes: int, k_scale: Tensor | None, order: str, fast: bool) -> Tensor:
    """``select_topk`` with torch scoring (float keys, or the int8 twin) and C (``fast``) or torch top-k."""
    quantized = k_idx.dtype == torch.int8
    b, t, h, _ = q_idx.shape
    s = k_idx.shape[1]
    out = torch.full((b, t, topk), -1, dtype=torch.int64, device=q_idx.device)
    if t == 0 or s == 0:
        return out
    # one host sync for the whole call (not one per chunk): the key span of each chunk needs plain ints
    pos_lo = q_pos.amin(0).tolist()
    pos_hi = q_pos.amax(0).tolist()
    dev = q_idx.device
    if quantized:
        q8, qw = _quantize_queries(q_idx, w)
        ks = k_scale.reshape(b, s).float()
        # the per-head dots (4*H_I), the head sum and the tie-break key (4 + 8 + 17)
        per_key = 4 * h + 29
        budget = max_chunk_bytes
    else:
        # the per-head ReLU block (4*H_I), the head sum (4), the int32 sign mask (4) and int64 sort key (8) of
        # the tie-break, the bool visibility mask (1)
        per_key = 4 * h + 17
        budget = max_chunk_bytes
        q_f, w_f, k_f = q_idx.float(), w.float(), k_idx.float()  # convert once, not once per chunk
    chunk = min(t, max(1, budget // (s * per_key)))
    # Workspaces reused by every chunk: a fresh multi-MiB tensor per chunk costs page faults that
    # measured as much as the matmul itself on CPU. Chunk-local views are carved from the front.
    sc_ws = torch.empty(b * chunk * s, dtype=torch.float32, device=dev)
    if not quantized:
        qk_ws = torch.empty(b * chunk * h * s, dtype=torch.float32, device=dev)
    if not fast:
        key_ws = torch.empty(b * chunk * s, dtype=torch.int64, device=dev)
        positions = torch.arange(s, dtype=torch.int64, device=dev)
    else:
        vis_lo, vis_hi = _visible_ranges(q_pos, s, window)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        tc = t1 - t0
        lo, hi = _key_span(pos_lo, pos_hi, t0, t1, s, window)
        if hi <= lo:
            continue  # no query in this chunk sees any key: rows stay -1
        span = hi - lo
        scores = sc_ws[: b * tc * span].view(b, tc, span)
        if quantized:  # the torch twin of select_i8's scoring (no C kernels here)
            for bi in range(b):
                scores[bi] = kernels.index_scores_i8_torch(q8[bi, t0:t1], qw[bi, t0:t1], k_idx[bi, lo:hi],
                                                           ks[bi, lo:hi])
        else:
            # same math as _scores_block, written into the workspaces
            qk = qk_ws[: b * tc * h * span].view(b, tc * h, span)
            torch.bmm(q_f[:, t0:t1].reshape(b, tc * h, -1), k_f[:, lo:hi].transpose(1, 2), out=qk)
            qk.relu_()
            torch.bmm(w_f[:, t0:t1].reshape(b * tc, 1, h), qk.view(b * tc, h, span),
                      out=scores.view(b * tc, 1, span))
        if fast:
            for bi in range(b):
                vlo = (vis_lo[bi, t0:t1] - lo).clamp_(0, span)
                vhi = (vis_hi[bi, t0:t1] - lo).clamp_(0, span)
                kernels.topk_rows(scores[bi], vlo, vhi, topk, base=lo, order=order, out=out[bi, t0:t1])
            continue
        key = _tiebreak_keys(scores, positions[lo:hi], key_ws[: b * tc * span].view(b, tc, span))
        visible = visibility_mask(q_pos[:, t0:t1], lo, hi, window)
        key.masked_fill_(~visible, _INVISIBLE)
        k = min(topk, span)
        # sorted=True puts the invisible picks last, so the valid entries form a prefix
        vals, idx = torch.topk(key, k, dim=-1, sorted=True)
        idx = idx.add_(lo).masked_fill_(vals == _INVISIBLE, -1)
        if order == "position":
            big = torch.iinfo(torch.int64).max
            idx = torch.where(idx < 0, big, idx).sort(-1).values
            idx.masked_fill_(idx == big, -1)
        out[:, t0:t1, :k] = idx
    return out


def _select_i8_fast(q_idx: Tensor, w: Tensor, k8: Tensor, k_scale: Tensor, q_pos: Tensor, topk: int,
                    window: int | None, max_chunk_bytes: int, order: str) -> Tensor:
    """``select_topk`` for int8 keys with the C kernels: per (row, chunk) one ``dsa_select_i8`` call that
    quantises the queries, scores the chunk's key span and takes the exact top-k; no torch op per chunk, so a
    decode step's selection costs one ctypes call."""
    b, t = q_idx.shape[:2]
    s = k8.shape[1]
    chunk = min(t, max(1, min(max_chunk_bytes, _FAST_CHUNK_BYTES) // (s * 4)))
    if chunk == t and b * t <= 64:  # decode / small chunks: min and max in Python, no reduction ops
        rows = q_pos.tolist()
        pos_lo = [min(c) for c in zip(*rows)]
        pos_hi = [max(c) for c in zip(*rows)]
    else:
        pos_lo = q_pos.amin(0).tolist()
        pos_hi = q_pos.amax(0).tolist()
    spans = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        lo, hi = _key_span(pos_lo, pos_hi, t0, t1, s, window)
        if hi > lo:  # else no query in this chunk sees any key: rows -1
            spans.append((t0, t1, lo, hi))
    return kernels.select_i8_batch(q_idx, w, k8, k_scale.reshape(b, s), q_pos, topk, spans, window=window,
                                   order=order)


def gather_rows(cache: Tensor, idx: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Rows of a per-sequence cache picked by index, batched.

    Args:
        cache: (B, S, ...) e.g. keys (B, S, H_kv, D) or indexer keys (B, S, D_I).
        idx: (B, T, k) int64 row indices; ``-1`` (unused slot) reads row 0, callers mask it.
        out: optional contiguous (B, T, k, ...) tensor to write into (reusing a workspace avoids
            page-faulting a fresh allocation on every call); no autograd through ``out``.

    Returns:
        (B, T, k, ...) in cache's dtype (``out`` itself when given).
    """
    b, s = cache.shape[:2]
    rest = cache.shape[2:]
    safe = idx.clamp_min(0)
    if cache.is_contiguous():
        # flat index_select: one contiguous copy of only the selected rows
        offsets = torch.arange(b, device=idx.device).mul_(s).view(b, 1, 1)
        flat = cache.view(b * s, *rest)
        flat_idx = (safe + offsets).reshape(-1)
        if out is not None:
            torch.index_select(flat, 0, flat_idx, out=out.view(-1, *rest))
            return out
        return flat.index_select(0, flat_idx).view(*idx.shape, *rest)
    # a view into a bigger preallocated cache (e.g. cache[:, :S]) is not flattenable without copying
    # the whole cache; advanced indexing reads through the strides instead
    batch = torch.arange(b, device=idx.device).view(b, 1, 1)
    rows = cache[batch, safe]
    return rows if out is None else out.copy_(rows)
