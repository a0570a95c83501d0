"""One decode query's whole DSA step: indexer RoPE -> int8 scores -> exact top-k -> attention over those rows.

The reference is the composition of the public steps (``apply_rope_half``, ``select_topk`` with
``order="position"``, ``sparse``). On a CPU with the C kernels the same step is one C call (one parallel region)
with no torch op in it: per layer and token that removes the dozen small torch ops of the indexer queries' RoPE and the
selection / attention wrappers, which on a 2-core machine cost about as much as the kernels' own work at 32K keys.
The selection is bit-identical to the reference (same RoPE ops in float32, same quantisation, same tie-break).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .attention import _split, sparse
from .indexer import apply_rope_half
from .select import select_topk

__all__ = ["sparse_decode"]


def sparse_decode(qi: Tensor, cos: Tensor, sin: Tensor, w: Tensor, k_idx: Tensor, k_scale: Tensor | None,
                  q: Tensor, k: Tensor, v: Tensor, scale: float, pos: int, topk: int, *,
                  window: int | None = None) -> tuple[Tensor, Tensor]:
    """Sparse attention of ONE query (one sequence, one new token) over its cache.

    Args:
        qi: (1, 1, H_I, D_I) indexer queries BEFORE RoPE (``LightningIndexer.queries`` without the rotation).
        cos, sin: (1, 1, r) rotate-half RoPE tables of the indexer at ``pos`` (r = the indexer's rope_dim).
        w: (1, 1, H_I) float32 head weights.
        k_idx: (1, S, D_I) indexer keys of positions 0..S-1 (S = pos + 1): int8 with ``k_scale`` (1, S), or float.
        q: (1, 1, H, D) main query after RoPE; k, v: (1, S, H_kv, D) / (1, S, H_kv, D_v) cache views.
        scale: softmax scale; pos: the query's position; topk: keys to keep; window: optional sliding window.

    Returns:
        (out (1, 1, H, D_v) in q's dtype, idx (1, 1, topk) int64: the selected positions ascending, -1 padded).
    """
    if (k_scale is not None and not torch.is_grad_enabled() and kernels.available() and k_idx.shape[1] == pos + 1
            and kernels.decode_sparse_supported(qi, cos, sin, w, k_idx, k_scale, q, k, v)):
        return kernels.decode_sparse(qi, cos, sin, w, k_idx, k_scale, pos, topk, window, q, k, v, scale,
                                     _split(topk, k.shape[2]))
    q_pos = torch.tensor([[pos]], device=q.device)
    kw = {} if k_scale is None else {"k_scale": k_scale}
    idx = select_topk(apply_rope_half(qi, cos, sin), w, k_idx, q_pos, topk, window=window, order="position", **kw)
    return sparse(q, k, v, idx, scale), idx
