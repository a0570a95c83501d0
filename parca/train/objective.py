"""The indexer's training objective and its held-out metrics, computed layer by layer inside the forward.

Both of DeepSeek's stages (reference/dsa.md section 3) compare a layer's lightning indexer with that layer's
main attention. Target for query t: the main attention probabilities of every head, summed over heads and
L1-normalised over the visible keys (``head_summed_probs``). Loss: ``KL(p[t, :] || softmax(I[t, :]))``
(dense warm-up) or the same KL restricted to the selected set ``S_t`` (sparse stage), averaged over query
tokens and layers.

How it stays frugal:

* The model runs its normal forward (dense, or sparse with its own top-k) with an observer
  (``ForwardContext.observer``). The observer sees one layer of one batch row at a time, computes that
  layer's loss and its gradient w.r.t. the indexer parameters on the spot (``torch.autograd.grad``) and keeps
  only the gradient: memory is one layer's activations, never all layers'.
* Within a layer the target and the indexer scores are built one query chunk at a time (``chunk_rows``):
  never more than a chunk of the (T, T) attention in memory. Each chunk's KL is back-propagated into detached
  leaves of the indexer queries / head weights / keys; one backward per layer carries those leaf gradients to
  the parameters.
* The indexer reads the layer input detached: the indexer learns only from its KL (DeepSeek's sparse stage
  rule; in the warm-up the base is frozen anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import sparse as dsa
from ..models.base import ForwardContext, Layerview

__all__ = ["chunk_rows", "indexer_projections", "TrainObserver", "EvalObserver", "evaluate_indexers",
           "indexer_parameters"]

DEFAULT_CHUNK_BYTES = 64 * 2**20


def chunk_rows(t: int, s: int, n_heads: int, n_kv_heads: int, index_heads: int, budget: int) -> int:
    """Query rows per chunk so the float32 intermediates of one chunk stay under ``budget`` bytes.

    Per (query, key) pair a chunk holds the per-kv-head softmax group (G) and running head sum of the target,
    the per-head ReLU block of the indexer scores (H_I) and its gradient, scores, mask and KL terms.
    """
    g = max(1, n_heads // max(1, n_kv_heads))
    per_pair = 4 * (2 * g + 3 * index_heads + 12)
    return max(1, min(t, budget // max(1, s * per_pair)))


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every indexer parameter of ``model``, in ``named_parameters`` order (the optimizer's order)."""
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def indexer_projections(view: Layerview) -> tuple[Tensor, Tensor, Tensor]:
    """The layer indexer's queries (1,T,H_I,D_I), head weights (1,T,H_I) and keys (1,T,D_I) from the layer input.

    The input is detached: gradients reach the indexer parameters only (and only under ``enable_grad``).
    """
    ind = view.indexer
    x = view.x.detach()
    q_in = x if view.q_in is None else view.q_in.detach()
    cos, sin = view.index_cos, view.index_sin
    return ind.queries(q_in, cos, sin), ind.head_weights(x), ind.keys(x, cos, sin)


def _chunks(view: Layerview, budget: int):
    t = view.q.shape[1]
    s = view.k.shape[1]
    rows = chunk_rows(t, s, view.q.shape[2], view.k.shape[2], view.indexer.n_heads, budget)
    for t0 in range(0, t, rows):
        t1 = min(t, t0 + rows)
        # causal: no query of the chunk sees a key past its last position, so score only that key prefix
        s1 = min(s, int(view.q_pos[:, t0:t1].max()) + 1)
        yield t0, t1, s1


def _target(view: Layerview, t0: int, t1: int, s1: int) -> Tensor:
    """(1, Tc, s1) dense head-summed target of query rows t0..t1-1 (no gradient)."""
    with torch.no_grad():
        return dsa.head_summed_probs(view.q[:, t0:t1].detach(), view.k[:, :s1].detach(), view.q_pos[:, t0:t1],
                                     view.scale, window=view.window)


@dataclass
class TrainObserver:
    """Observer that adds each layer's indexer loss gradient into ``grads`` (one tensor per indexer parameter).

    Args:
        n_layers: layers of the model (the loss is a mean over layers).
        n_rows: sequences the loss averages over (the whole local batch, across micro-batches).
        sparse: restrict the KL to the model's selection ``view.idx`` (sparse stage).
        chunk_bytes: budget of one query chunk's float32 intermediates.
    """

    n_layers: int
    n_rows: int
    sparse: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    grads: dict[nn.Parameter, Tensor] = field(default_factory=dict)
    kl_sum: float = 0.0  # the loss value: sum of this observer's contributions to the mean

    def __call__(self, view: Layerview) -> None:
        if view.indexer is None:
            raise ValueError("retrofit: the model has no indexers (add_indexers / init_indexers first)")
        params = [p for p in view.indexer.parameters() if p.requires_grad]
        t = view.q.shape[1]
        weight = 1.0 / (t * self.n_layers * self.n_rows)
        with torch.enable_grad():
            outs = indexer_projections(view)  # qi (1,T,H_I,D_I), w (1,T,H_I), ki (1,T,D_I)
            leaves = [o.detach().requires_grad_() for o in outs]
            qi, w, ki = leaves
            for t0, t1, s1 in _chunks(view, self.chunk_bytes):
                target = _target(view, t0, t1, s1)  # (1, Tc, s1)
                scores = dsa.index_scores(qi[:, t0:t1], w[:, t0:t1], ki[:, :s1], view.q_pos[:, t0:t1],
                                          window=view.window)  # (1, Tc, s1), -inf where invisible
                sel = view.idx[:, t0:t1] if (self.sparse and view.idx is not None) else None
                # indexer_kl is a mean over the chunk's rows: scale to this chunk's share of the global mean
                part = dsa.indexer_kl(scores, target, sel) * ((t1 - t0) * weight)
                part.backward()
                self.kl_sum += float(part.detach())
            if not params:
                return
            g = torch.autograd.grad(outs, params, grad_outputs=[leaf.grad for leaf in leaves], allow_unused=True)
        for p, gp in zip(params, g):
            if gp is None:
                continue
            if p in self.grads:
                self.grads[p].add_(gp)
            else:
                self.grads[p] = gp.detach().clone()


@dataclass
class EvalObserver:
    """Observer that accumulates, per layer, the dense KL and the recall@k of the indexer's own top-k.

    Recall = share of the dense head-summed attention mass on the selected keys, over query positions
    ``t >= topk`` only (below that every visible key is selected and recall is 1 by construction).
    ``recent`` is the same mass for the last ``topk`` keys (a sliding window), for comparison.
    """

    n_layers: int
    topk: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    kl: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    recent: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # query rows counted in kl
    positions: list[int] = field(default_factory=list)  # query rows counted in recall (t >= topk)

    def __post_init__(self) -> None:
        for name in ("kl", "recall", "recent", "rows", "positions"):
            setattr(self, name, [0] * self.n_layers)

    @torch.no_grad()
    def __call__(self, view: Layerview) -> None:
        qi, w, ki = indexer_projections(view)
        idx = dsa.select_topk(qi, w, ki, view.q_pos, self.topk, window=view.window)  # (1, T, k)
        layer = view.layer
        for t0, t1, s1 in _chunks(view, self.chunk_bytes):
            target = _target(view, t0, t1, s1)  # (1, Tc, s1)
            pos = view.q_pos[:, t0:t1]  # (1, Tc)
            scores = dsa.index_scores(qi[:, t0:t1], w[:, t0:t1], ki[:, :s1], pos, window=view.window)
            self.kl[layer] += float(dsa.indexer_kl(scores, target)) * (t1 - t0)
            self.rows[layer] += t1 - t0
            counted = pos >= self.topk  # (1, Tc)
            if not bool(counted.any()):
                continue
            rec = dsa.attention_recall(target, idx[:, t0:t1])  # (1, Tc)
            csum = torch.nn.functional.pad(target.cumsum(-1), (1, 0))  # (1, Tc, s1+1): csum[j] = mass of keys < j
            hi = (pos + 1).clamp_max(s1).unsqueeze(-1)
            lo = (pos + 1 - self.topk).clamp_min(0).unsqueeze(-1)
            recent = (csum.gather(-1, hi) - csum.gather(-1, lo)).squeeze(-1)  # (1, Tc)
            self.recall[layer] += float(rec[counted].sum())
            self.recent[layer] += float(recent[counted].sum())
            self.positions[layer] += int(counted.sum())

    def summary(self) -> dict[str, Any]:
        kl = [k / max(1, n) for k, n in zip(self.kl, self.rows)]
        rec = [r / n if n else float("nan") for r, n in zip(self.recall, self.positions)]
        recent = [r / n if n else float("nan") for r, n in zip(self.recent, self.positions)]
        return {
            "kl": sum(kl) / len(kl),
            "recall": sum(rec) / len(rec),
            "recall_recent": sum(recent) / len(recent),
            "kl_per_layer": kl,
            "recall_per_layer": rec,
            "topk": self.topk,
            "positions": self.positions[0],
        }


@torch.no_grad()
def evaluate_indexers(model: nn.Module, ids: Tensor, topk: int | None = None, *, micro_batch: int = 1,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, Any]:
    """Held-out KL and recall@k of ``model``'s indexers against its dense attention.

    Args:
        model: a parca model with indexers.
        ids: (N, T) int64 sequences, each read from position 0 with dense attention.
        topk: keys selected per query (default: the model's ``sparse_config.index_topk``); must be < T.
        micro_batch: sequences per forward.

    Returns:
        ``{"kl", "recall", "recall_recent", "kl_per_layer", "recall_per_layer", "topk", "positions"}``:
        KL is averaged over all query rows, recall (and the last-k window's recall, ``recall_recent``) over
        query positions ``t >= topk``; both are means over layers.
    """
    if not model.has_indexers:
        raise ValueError("evaluate_indexers: the model has no indexers")
    k = int(topk or model.sparse_config.index_topk)
    if ids.shape[1] <= k:
        raise ValueError(f"evaluate_indexers: sequences of {ids.shape[1]} tokens need topk < T (got {k})")
    obs = EvalObserver(model.config.num_hidden_layers, k, chunk_bytes)
    dev = model.model.embed_tokens.weight.device
    for i in range(0, ids.shape[0], micro_batch):
        mb = ids[i : i + micro_batch].to(dev)
        n = mb.shape[0]
        model(mb, None, ForwardContext(slots=list(range(n)), starts=[0] * n, observer=obs, max_chunk_bytes=chunk_bytes),
              last_only=True, return_hidden=True)  # logits are not needed
    return obs.summary()
