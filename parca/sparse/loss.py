"""Indexer training losses (DeepSeek-V3.2 paper, section 2) and the recall metric.

Dense warm-up: ``KL(p[t, :] || softmax(I[t, :]))`` with ``p`` the head-summed, L1-normalised dense
attention. Sparse stage: the same KL restricted to the selected set ``S_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["indexer_kl", "attention_recall"]


def _kl_rows(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row KL(target || softmax(logits)) over the last dim, safe for zeros and -inf.

    Args:
        logits: (..., N) float32, ``-inf`` at excluded entries.
        target: (..., N) probabilities, 0 at excluded entries.

    Returns:
        (...) float32.
    """
    logq = torch.log_softmax(logits, dim=-1)
    keep = target > 0
    # 0 * log 0 = 0 and 0 * (-inf) = 0: mask BOTH factors before multiplying so neither the value nor
    # the gradient sees a NaN (a torch.where over the product would still back-propagate 0 * inf)
    logq = logq.masked_fill(~keep, 0.0)
    logp = torch.log(torch.where(keep, target, torch.ones_like(target)))
    return (target * (logp - logq)).sum(-1)


def indexer_kl(scores: Tensor, target: Tensor, selected: Tensor | None = None) -> Tensor:
    """Mean over query rows of ``KL(target || softmax(scores))``, differentiable w.r.t. ``scores``.

    Args:
        scores: (B, T, S) float32 indexer scores, ``-inf`` at invisible keys (``index_scores``).
        target: (B, T, S) probabilities, rows sum to 1, 0 at invisible keys (``head_summed_probs``).
            Not differentiated through in practice: pass it detached.
        selected: optional (B, T, k) int64 selected key indices, ``-1`` padded. When given, both sides
            are restricted to the selected set: target renormalised over it, softmax over it only
            (DeepSeek's sparse training stage).

    Returns:
        Scalar float32. A target row with no mass (on the selected set) contributes 0.
    """
    scores = scores.float()
    target = target.float()
    if selected is not None:
        valid = selected >= 0
        safe = selected.clamp_min(0)
        scores = scores.gather(-1, safe).masked_fill(~valid, float("-inf"))  # (B, T, k)
        target = target.gather(-1, safe).masked_fill(~valid, 0.0)  # (B, T, k)
        target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return _kl_rows(scores, target).mean()


def attention_recall(target: Tensor, idx: Tensor) -> Tensor:
    """Share of the dense attention mass that falls on the selected keys.

    Args:
        target: (B, T, S) head-summed, L1-normalised dense probabilities (``head_summed_probs``).
        idx: (B, T, k) int64 selected key indices, ``-1`` padded (no duplicates).

    Returns:
        (B, T) float32 in [0, 1]; 1 means the selection keeps all of the attention mass.
    """
    picked = target.float().gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, 0.0)
    return picked.sum(-1)
