"""Attention over a per-sequence KV cache: dense (SDPA), sparse (gathers only the selected rows), and
the masked-dense ``reference`` every fast path is tested against.

Shapes: q (B, T, H, D); k (B, S, H_kv, D); v (B, S, H_kv, D_v); H % H_kv == 0 and query head h uses
kv head ``h // (H // H_kv)`` (GQA; MQA is H_kv = 1, e.g. DeepSeek's MLA latent). Keys are addressed by
absolute position 0..S-1 and queries carry their absolute positions ``q_pos`` (B, T), so a chunk of
queries on top of a cached prefix needs no special case.

Inference fast paths (no autograd, CPU, float32/bf16, see ``kernels.attend_supported``): ``sparse`` reads the
selected rows in place from the cache view (no gather copy; rows prefetched ahead; blocks of neighbouring
prefill queries share one scan of the union of their rows), and a dense decode step runs the same kernel over
all rows, split over threads and merged by log-sum-exp: for one query SDPA's CPU flash kernel (built for query
blocks) measured 7x slower at 128K keys on one thread, ~4x on two (benchmarks/decode.py prints both). A prefill
chunk on a cached prefix runs the flash kernel unmasked over the prefix (``_dense_prefix_split``). All keep
``reference`` as their oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .select import gather_rows, visibility_mask

__all__ = ["dense", "sparse", "reference", "head_summed_probs"]

# SDPA grew ``enable_gqa`` in torch 2.5; older versions (pyproject allows >= 2.4) get repeated kv heads
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """SDPA on (B, H, T, D) / (B, H_kv, S, D) views, GQA without copying kv heads where torch allows."""
    kw = {"attn_mask": mask, "scale": scale, "is_causal": causal}
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), **kw)


def _groups(q: Tensor, k: Tensor) -> int:
    h, h_kv = q.shape[2], k.shape[2]
    if h_kv < 1 or h % h_kv:
        raise ValueError(f"attention: query heads H={h} must be a multiple of kv heads H_kv={h_kv}")
    return h // h_kv


def _use_kernel(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The C attention kernel applies: inference only (no autograd), supported dtypes and shapes."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and kernels.attend_supported(q, k, v)


def _split(rows: int, items: int) -> int:
    """Rows per work item so that one query's (rows x kv heads) fills every thread twice over (0: no split)."""
    want = 2 * torch.get_num_threads()
    if items >= want or rows <= 1024:
        return 0
    per = -(-want // items)  # splits per kv head
    return max(512, -(-rows // per))


_FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _dense_prefix_split(q: Tensor, k_bhsd: Tensor, v_bhsd: Tensor, q_pos: Tensor, scale: float,
                        max_chunk_bytes: int) -> Tensor | None:
    """Dense attention of a query chunk on top of a cached prefix, without a mask over the prefix.

    Every query of row b sees all keys before ``p0 = min(q_pos[b])``: that part runs the CPU flash kernel
    unmasked, one kv head at a time as a single head of ``G * T`` query rows (GQA without copying kv heads);
    the few keys from p0 on run with the causal mask; the two halves merge by their log-sum-exp. Measured on
    512 queries over a 128K prefix (1 thread): 3.74 s with 128-query masked chunks, 2.49 s for one unmasked
    GQA SDPA call, 1.76 s this way (K/V read once per kv head, not once per query head). Returns None when it
    does not apply (the caller's chunked, masked path runs).

    Args: as ``dense`` (k, v as (B, H_kv, S, D) views). Returns (B, T, H, D_v) in q's dtype.
    """
    b, t, h, d = q.shape
    h_kv, s, dv = k_bhsd.shape[1], k_bhsd.shape[2], v_bhsd.shape[-1]
    g = h // h_kv
    lo_all, hi_all = q_pos.amin(1).tolist(), q_pos.amax(1).tolist()
    if dv != d:
        return None  # the flash kernel wants one head size for keys and values
    if any(hi - lo + 1 > 4 * t for lo, hi in zip(lo_all, hi_all)):
        return None  # scattered positions: not a chunk on a prefix
    if any(hi >= s or lo < 0 for lo, hi in zip(lo_all, hi_all)):
        return None
    if 4 * h * t * (max(hi_all) - min(lo_all) + 1) > max_chunk_bytes:
        return None
    out = q.new_empty(b, t, h, dv)
    for i in range(b):
        p0, p1 = lo_all[i], hi_all[i] + 1
        qi = q[i].float()  # (T, H, D)
        # masked tail [p0, p1): explicit float32 math, T x (p1 - p0) per head
        kt = k_bhsd[i, :, p0:p1].float().repeat_interleave(g, dim=0)  # (H, S', D)
        vt = v_bhsd[i, :, p0:p1].float().repeat_interleave(g, dim=0)
        sc = torch.einsum("thd,hsd->hts", qi, kt) * scale  # (H, T, S')
        vis = torch.arange(p0, p1).view(1, 1, -1) <= q_pos[i].view(1, t, 1)
        sc = sc.masked_fill(~vis, float("-inf"))
        l2 = torch.logsumexp(sc, dim=-1)  # (H, T); -inf where nothing visible in the tail
        o2 = torch.einsum("hts,hsd->htd", torch.softmax(sc, dim=-1).nan_to_num(0.0), vt)  # (H, T, D_v)
        if p0 > 0:
            o1 = torch.empty(h, t, dv)
            l1 = torch.empty(h, t)
            for j in range(h_kv):
                # the group's G query heads as one head of G*T rows: every row sees the whole prefix
                qg = qi[:, j * g : (j + 1) * g].transpose(0, 1).reshape(1, 1, g * t, d)
                kj = k_bhsd[i : i + 1, j : j + 1, :p0].to(qg.dtype)
                vj = v_bhsd[i : i + 1, j : j + 1, :p0].to(qg.dtype)
                oj, lj = _FLASH_LSE(qg, kj, vj, 0.0, False, scale=scale)
                o1[j * g : (j + 1) * g] = oj.view(g, t, dv)
                l1[j * g : (j + 1) * g] = lj.view(g, t)
            m = torch.maximum(l1, l2)
            w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)  # l1 is finite: the prefix is never empty here
            o = (o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / (w1 + w2).unsqueeze(-1)
        else:
            o = o2
        out[i] = o.transpose(0, 1).to(q.dtype)
    return out


def dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    scale: float,
    *,
    window: int | None = None,
    max_chunk_bytes: int = 64 * 2**20,
) -> Tensor:
    """Causal dense attention by absolute position, chunked over queries.

    Key s is visible to query t iff ``s <= q_pos[b, t]`` (and ``s > q_pos[b, t] - window`` when a
    window is set). Each chunk only reads the key span its queries can see, and its float32
    [chunk, S] score block per (batch, query head) stays under ``max_chunk_bytes``. Decode (T == 1)
    with all of [0, S) visible runs SDPA without a mask. Rows with no visible key give 0.

    Args:
        q: (B, T, H, D).
        k: (B, S, H_kv, D).
        v: (B, S, H_kv, D_v).
        q_pos: (B, T) int64 absolute query positions.
        scale: softmax scale.
        window: optional sliding window length.
        max_chunk_bytes: budget for one chunk's float32 scores per (batch, head).

    Returns:
        (B, T, H, D_v) in q's dtype.
    """
    b, t, h, _ = q.shape
    s = k.shape[1]
    _groups(q, k)
    if window is not None and window < 1:
        raise ValueError(f"dense: window={window} must be >= 1 (or None)")
    # (B, H, T, D) views; SDPA takes strided inputs, so no copy of the cache here
    k_bhsd, v_bhsd = k.transpose(1, 2), v.transpose(1, 2)
    if t == 1 and (window is None or window >= s) and bool((q_pos == s - 1).all()):
        # decode fast path: every cached key is visible, so no mask
        if _use_kernel(q, k, v):
            out = q.new_empty(b, 1, h, v.shape[-1])
            hi = torch.full((1,), s, dtype=torch.int64)
            for i in range(b):
                kernels.attend(q[i], k[i], v[i], scale, range_hi=hi, split=_split(s, k.shape[2]), out=out[i])
            return out
        if k.dtype != q.dtype:  # e.g. a bf16 cache under float32 weights: SDPA wants one dtype
            k_bhsd, v_bhsd = k_bhsd.to(q.dtype), v_bhsd.to(q.dtype)
        out = _sdpa(q.transpose(1, 2), k_bhsd, v_bhsd, None, scale)
        return out.transpose(1, 2).to(q.dtype)
    if k.dtype != q.dtype:  # one conversion of the cache span per call, then float32 SDPA
        hi_all = min(s, int(q_pos.max()) + 1)
        k_bhsd, v_bhsd = k_bhsd[:, :, :hi_all].to(q.dtype), v_bhsd[:, :, :hi_all].to(q.dtype)
    if window is None and t > 1 and _FLASH_LSE is not None and not (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        out = _dense_prefix_split(q, k_bhsd, v_bhsd, q_pos, scale, max_chunk_bytes)
        if out is not None:
            return out
    out = q.new_empty(b, t, h, v.shape[-1])
    pos_lo = q_pos.amin(0).tolist()  # one host sync for the whole call
    pos_hi = q_pos.amax(0).tolist()
    # A prompt prefilled from position 0 can run its first chunk with is_causal instead of a mask:
    # the CPU flash kernel then skips the masked blocks (measured ~4x faster than the same mask).
    # is_causal is top-left aligned, so it only fits a chunk whose queries are exactly 0..Tc-1.
    fresh = window is None and pos_lo[:1] == [0] and pos_lo == pos_hi and pos_hi == list(range(t))
    chunk = max(1, max_chunk_bytes // (4 * max(s, 1)))
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        hi = min(s, max(pos_hi[t0:t1]) + 1)
        lo = 0 if window is None else max(0, min(pos_lo[t0:t1]) - window + 1)
        if hi <= lo:
            out[:, t0:t1] = 0  # nothing visible (SDPA's convention for fully masked rows)
            continue
        qc = q[:, t0:t1].transpose(1, 2)  # (B, H, Tc, D)
        if fresh and t0 == 0:
            o = _sdpa(qc, k_bhsd[:, :, :t1], v_bhsd[:, :, :t1], None, scale, causal=True)  # (B, H, Tc, D_v)
        else:
            mask = visibility_mask(q_pos[:, t0:t1], lo, hi, window).unsqueeze(1)  # (B, 1, Tc, S')
            o = _sdpa(qc, k_bhsd[:, :, lo:hi], v_bhsd[:, :, lo:hi], mask, scale)  # (B, H, Tc, D_v)
        out[:, t0:t1] = o.transpose(1, 2)
    return out


def sparse(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, *, max_chunk_bytes: int = 64 * 2**20) -> Tensor:
    """Attention over the selected keys only: one index set per query, shared by every head.

    Only the selected rows of k and v are gathered (H_kv heads, never repeated to H), ``-1`` slots
    are masked, softmax runs over the selected set in float32. Chunked over queries so the gathered
    rows plus scores of one chunk stay under ``max_chunk_bytes`` per batch row. Duplicate indices
    would be counted twice (select_topk never produces them). Causality is NOT re-checked: ``idx``
    must only name visible keys, as ``select_topk`` guarantees. Rows with no valid slot give 0.

    Args:
        q: (B, T, H, D).
        k: (B, S, H_kv, D).
        v: (B, S, H_kv, D_v).
        idx: (B, T, k) int64 key positions from ``select_topk``; ``-1`` = unused slot.
        scale: softmax scale.
        max_chunk_bytes: budget for one chunk's gathered rows and scores, per batch row.

    Returns:
        (B, T, H, D_v) in q's dtype.
    """
    b, t, h, d = q.shape
    h_kv, dv = k.shape[2], v.shape[-1]
    g = _groups(q, k)
    n = idx.shape[-1]
    out = q.new_empty(b, t, h, dv)
    if t == 0:
        return out
    if _use_kernel(q, k, v) and idx.dtype == torch.int64:
        # rows read in place from the cache; per call a float32 partial of (rows, H, D_v): chunk the rows
        rows = max(1, max_chunk_bytes // (h * dv * 4 * 2))
        split = _split(n, t * h_kv) if t == 1 else 0
        for i in range(b):
            for t0 in range(0, t, rows):
                t1 = min(t, t0 + rows)
                kernels.attend(q[i, t0:t1], k[i], v[i], scale, idx=idx[i, t0:t1], split=split, out=out[i, t0:t1])
        return out
    # per query row: gathered k and v rows, plus float32 scores and probabilities for every head
    row_bytes = n * h_kv * (d * k.element_size() + dv * v.element_size()) + 2 * 4 * h * n
    chunk = min(t, max(1, max_chunk_bytes // max(row_bytes, 1)))
    track_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    mixed = k.dtype != q.dtype or v.dtype != q.dtype  # e.g. a bf16 cache under float32 weights
    # workspaces pay off only when several chunks reuse them (one chunk: same allocations either way)
    ws = None if track_grad or mixed or chunk == t else _SparseWorkspace(q, k, v, b * chunk, n)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        tc = t1 - t0
        ic = idx[:, t0:t1]  # (B, Tc, n)
        qc = q[:, t0:t1].reshape(b * tc, h_kv, g, d)  # query heads grouped by their kv head
        valid = (ic >= 0).reshape(1, b * tc, 1, n)
        if ws is None:
            o = _sparse_chunk_autograd(qc, gather_rows(k, ic).to(q.dtype), gather_rows(v, ic).to(q.dtype), valid,
                                       scale)
        else:
            o = ws.run(qc, k, v, ic, valid, scale)
        # (H_kv, B*Tc, G, D_v) -> (B, Tc, H_kv, G, D_v) -> (B, Tc, H, D_v); head h = j*G + g
        out[:, t0:t1] = o.view(h_kv, b, tc, g, dv).permute(1, 2, 0, 3, 4).reshape(b, tc, h, dv)
    return out


def _sparse_chunk_autograd(qc: Tensor, kc: Tensor, vc: Tensor, valid: Tensor, scale: float) -> Tensor:
    """One query chunk of ``sparse`` with out-of-place ops only (training: autograd-safe).

    Args:
        qc: (N, H_kv, G, D) with N = B*Tc query rows.
        kc: (B, Tc, n, H_kv, D) gathered keys.
        vc: (B, Tc, n, H_kv, D_v) gathered values.
        valid: (1, N, 1, n) bool, False at ``-1`` slots.
        scale: softmax scale.

    Returns:
        (H_kv, N, G, D_v) in q's dtype.
    """
    nrows, h_kv, _, d = qc.shape
    n, dv = kc.shape[2], vc.shape[-1]
    kc = kc.reshape(nrows, n, h_kv, d)
    vc = vc.reshape(nrows, n, h_kv, dv)
    # one bmm per kv head on strided views of the gathered rows: a single batched matmul over
    # (N, H_kv) would first copy the gathered keys into head-major order (measured 5-8x slower)
    scores = torch.stack([torch.bmm(qc[:, j], kc[:, :, j].transpose(1, 2)) for j in range(h_kv)])  # (H_kv, N, G, n)
    scores = (scores.float() * scale).masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # float32 softmax whatever the input dtype
    # a row with no valid slot is all -inf -> NaN; make it 0 like SDPA does for fully masked rows
    probs = probs.masked_fill(~valid.any(-1, keepdim=True), 0.0).to(vc.dtype)
    return torch.stack([torch.bmm(probs[j], vc[:, :, j]) for j in range(h_kv)]).to(qc.dtype)  # (H_kv, N, G, D_v)


class _SparseWorkspace:
    """Buffers for inference-mode ``sparse``, allocated once per call and reused by every chunk.

    Gathering into a fresh tensor per chunk page-faults the allocation every time; on CPU that
    measured 4-7x slower than ``index_select(..., out=)`` into a reused buffer.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, max_rows: int, n: int) -> None:
        h_kv, d, dv = k.shape[2], k.shape[3], v.shape[3]
        g = q.shape[2] // h_kv
        self.k_ws = k.new_empty(max_rows * n * h_kv * d)
        self.v_ws = v.new_empty(max_rows * n * h_kv * dv)
        self.qk_ws = q.new_empty(h_kv * max_rows * g * n)
        self.p_ws = torch.empty(h_kv * max_rows * g * n, dtype=torch.float32, device=q.device)
        self.o_ws = q.new_empty(h_kv * max_rows * g * dv)

    def run(self, qc: Tensor, k: Tensor, v: Tensor, ic: Tensor, valid: Tensor, scale: float) -> Tensor:
        """Same contract as ``_sparse_chunk_autograd`` but gathering ``ic`` itself, in place.

        Args:
            qc: (N, H_kv, G, D).
            k: (B, S, H_kv, D) full cache.
            v: (B, S, H_kv, D_v) full cache.
            ic: (B, Tc, n) indices, N = B*Tc.
            valid: (1, N, 1, n) bool.
            scale: softmax scale.

        Returns:
            (H_kv, N, G, D_v) view into the workspace (valid until the next ``run``).
        """
        nrows, h_kv, g, d = qc.shape
        n, dv = ic.shape[-1], v.shape[-1]
        kc = gather_rows(k, ic, out=self.k_ws[: nrows * n * h_kv * d].view(*ic.shape, h_kv, d))
        vc = gather_rows(v, ic, out=self.v_ws[: nrows * n * h_kv * dv].view(*ic.shape, h_kv, dv))
        kc, vc = kc.view(nrows, n, h_kv, d), vc.view(nrows, n, h_kv, dv)
        qk = self.qk_ws[: h_kv * nrows * g * n].view(h_kv, nrows, g, n)
        for j in range(h_kv):  # per kv head on strided views, see _sparse_chunk_autograd
            torch.bmm(qc[:, j], kc[:, :, j].transpose(1, 2), out=qk[j])
        scores = qk.mul_(scale) if qk.dtype == torch.float32 else qk.float().mul_(scale)
        scores.masked_fill_(~valid, float("-inf"))
        probs = self.p_ws[: h_kv * nrows * g * n].view(h_kv, nrows, g, n)
        torch.softmax(scores, dim=-1, out=probs)
        probs.masked_fill_(~valid.any(-1, keepdim=True), 0.0)
        o = self.o_ws[: h_kv * nrows * g * dv].view(h_kv, nrows, g, dv)
        pv = probs if vc.dtype == torch.float32 else probs.to(vc.dtype)
        for j in range(h_kv):
            torch.bmm(pv[j], vc[:, :, j], out=o[j])
        return o


def reference(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, q_pos: Tensor) -> Tensor:
    """Obviously-correct oracle: dense float32 scores, ``-inf`` outside the selected set and the causal mask.

    Builds full (B, H, T, S) tensors: tests only.

    Args:
        q: (B, T, H, D).
        k: (B, S, H_kv, D).
        v: (B, S, H_kv, D_v).
        idx: (B, T, k) int64 selected key positions, ``-1`` = unused.
        scale: softmax scale.
        q_pos: (B, T) int64 absolute query positions.

    Returns:
        (B, T, H, D_v) in q's dtype; rows with nothing selected and visible give 0.
    """
    b, t, h, _ = q.shape
    s = k.shape[1]
    g = _groups(q, k)
    kf = k.float().repeat_interleave(g, dim=2)  # (B, S, H, D)
    vf = v.float().repeat_interleave(g, dim=2)  # (B, S, H, D_v)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale  # (B, H, T, S)
    # -1 goes to an extra column S that is dropped, so it can never clear a real selection
    chosen = torch.zeros(b, t, s + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(idx < 0, s, idx), True)
    allowed = chosen[..., :s] & visibility_mask(q_pos, 0, s, None)  # (B, T, S)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshe->bthe", probs, vf).to(q.dtype)


def head_summed_probs(q: Tensor, k: Tensor, q_pos: Tensor, scale: float, *, window: int | None = None) -> Tensor:
    """Causal attention probabilities of every head, summed over heads, L1-normalised over keys.

    The indexer's training target in DeepSeek's dense warm-up and the weight of the recall metric.
    Builds (B, G, T, S) float32 per kv head: pass a query chunk.

    Args:
        q: (B, T, H, D).
        k: (B, S, H_kv, D).
        q_pos: (B, T) int64 absolute query positions.
        scale: softmax scale.
        window: optional sliding window, as in ``dense``.

    Returns:
        (B, T, S) float32; each row sums to 1 over its visible keys (0 if none), 0 elsewhere.
    """
    b, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    g = _groups(q, k)
    visible = visibility_mask(q_pos, 0, s, window).unsqueeze(1)  # (B, 1, T, S)
    qg = q.float().reshape(b, t, h_kv, g, d)
    kf = k.float()
    total = torch.zeros(b, t, s, dtype=torch.float32, device=q.device)
    for j in range(h_kv):  # one kv head's group at a time: (B, G, T, S) instead of (B, H, T, S)
        scores = torch.einsum("btgd,bsd->bgts", qg[:, :, j], kf[:, :, j]) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        total = total + torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(1)
    return total / total.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
