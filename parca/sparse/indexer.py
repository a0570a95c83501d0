"""The lightning indexer: DeepSeek's cheap per-token scorer that decides which keys each query attends to.

Score of key s for query t (DeepSeek-V3.2, paper section 2.1)::

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])

The module only produces the three ingredients (queries, one shared key per token, per-head weights);
``parca.sparse.select`` turns them into scores and top-k indices, one query chunk at a time, so the
module never sees the key cache and the model decides where indexer keys are stored.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import FusedLinear

__all__ = ["apply_rope_half", "LightningIndexer"]


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half (NeoX, non-interleaved) RoPE on the first ``r = cos.shape[-1]`` dims of ``x``.

    The indexer uses this layout even in DeepSeek, whose main MLA RoPE is interleaved; using the
    wrong layout here silently degrades long-context retrieval (see reference/dsa.md section 2).

    Args:
        x: (B, T, D) or (B, T, H, D). Only ``x[..., :r]`` is rotated; ``x[..., r:]`` passes through.
        cos: (B, T, r), rotate-half layout (``cat(c, c)`` over the r dims); ``r`` may be 0 (no RoPE).
            Any shape broadcastable to (B, T, r) works, e.g. (1, T, r).
        sin: same shape as ``cos``.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    r = cos.shape[-1]
    if r == 0:
        return x
    if r % 2 or r > x.shape[-1]:
        raise ValueError(
            f"apply_rope_half: cos/sin last dim r={r} must be even and <= x's last dim {x.shape[-1]}; "
            "pass the cos/sin built for the indexer's rope_dim"
        )
    if x.dim() == 4:
        # one angle per token, shared by every head
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    # same precision policy as transformers: rotate in x's dtype so parca and HF logits match
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = r // 2
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, x_pass), dim=-1)


class _Float32Linear(nn.Linear):
    """``nn.Linear`` whose floating-point tensors stay float32 through ``module.to(dtype)``/``.half()``.

    DeepSeek keeps ``weights_proj`` in fp32 because the head weights are signed and multiply ReLU
    outputs that can be large: bf16 weights would shift which keys win the top-k. Overriding
    ``_apply`` (rather than casting back afterwards) keeps the float32 values exact: a
    float32 -> bf16 -> float32 round trip would lose the low mantissa bits for good.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:  # type: ignore[override]
        def keep_float32(t: Tensor) -> Tensor:
            moved = fn(t)
            if t.is_floating_point() and moved.dtype != torch.float32:
                # honour the device part of the conversion, drop the dtype part
                return t.to(device=moved.device, dtype=torch.float32)
            return moved

        return super()._apply(keep_float32, recurse)


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2 lightning indexer parameters and the three per-token projections.

    Parameter names follow DeepSeek's checkpoints (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``)
    so weights map 1:1. ``weights_proj`` is float32 whatever dtype the rest of the module has.

    Args:
        q_in_dim: width of the query source (DeepSeek: the MLA query latent, q_lora_rank).
        k_in_dim: width of the key / weight source (DeepSeek: the hidden state).
        n_heads: indexer heads H_I.
        head_dim: indexer head dim D_I.
        rope_dim: leading dims of each query/key that get rotate-half RoPE (0 = none).
    """

    def __init__(
        self,
        q_in_dim: int,
        k_in_dim: int,
        n_heads: int,
        head_dim: int,
        rope_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rope_dim <= head_dim or rope_dim % 2:
            raise ValueError(f"LightningIndexer: rope_dim={rope_dim} must be even and in [0, head_dim={head_dim}]")
        self.q_in_dim = q_in_dim
        self.k_in_dim = k_in_dim
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.wq_b = nn.Linear(q_in_dim, n_heads * head_dim, bias=False, **kw)
        self.wk = nn.Linear(k_in_dim, head_dim, bias=False, **kw)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6, **kw)
        self.weights_proj = _Float32Linear(k_in_dim, n_heads, bias=False, dtype=torch.float32, device=device)
        # DeepSeek applies H_I**-0.5 to the weights and D_I**-0.5 (softmax scale) to q.k; because
        # ReLU(a*x) = a*ReLU(x) for a > 0, both fold into the weights: one scale on (B,T,H_I), not on (B,T,H_I,S).
        self.weight_scale = n_heads**-0.5 * head_dim**-0.5
        self._qw: FusedLinear | None = None  # wq_b + weights_proj as one matmul (queries_and_weights)

    def _check_rope(self, cos: Tensor) -> None:
        # a model's own RoPE tables (e.g. head_dim 128 for Llama) have different frequencies from
        # tables built for rope_dim; passing them would rotate with the wrong angles and no error
        if cos.shape[-1] != self.rope_dim:
            raise ValueError(
                f"LightningIndexer: cos/sin last dim is {cos.shape[-1]} but rope_dim is {self.rope_dim}; "
                "build cos/sin for the indexer's rope_dim (rotate-half layout)"
            )

    def queries(self, q_in: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Indexer queries, one per head.

        Args:
            q_in: (B, T, q_in_dim) query source.
            cos: (B, T, rope_dim) rotate-half RoPE table at the query positions.
            sin: (B, T, rope_dim).

        Returns:
            (B, T, H_I, D_I) in the module's dtype, RoPE on the first ``rope_dim`` dims.
        """
        self._check_rope(cos)
        b, t, _ = q_in.shape
        q = self.wq_b(q_in).view(b, t, self.n_heads, self.head_dim)  # (B, T, H_I, D_I)
        return apply_rope_half(q, cos, sin)

    def keys(self, k_in: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Indexer keys: one per token, shared by all indexer heads (MQA style).

        Args:
            k_in: (B, T, k_in_dim) key source.
            cos: (B, T, rope_dim) rotate-half RoPE table at the key positions.
            sin: (B, T, rope_dim).

        Returns:
            (B, T, D_I) = rope(k_norm(wk(k_in))).
        """
        self._check_rope(cos)
        return apply_rope_half(self.k_norm(self.wk(k_in)), cos, sin)

    def finish_keys(self, k_proj: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``keys`` from an already computed ``wk(k_in)`` (B, T, D_I): a model that runs ``wk`` inside one
        matmul with its own projections finishes the keys here."""
        self._check_rope(cos)
        return apply_rope_half(self.k_norm(k_proj), cos, sin)

    def queries_and_weights(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """``(queries(x, cos, sin), head_weights(x))`` for a model whose query source is the key source (a
        retrofitted GQA model): one matmul for both projections when they share a dtype (a float32 model; in a
        bf16 model ``weights_proj`` stays float32 and the two run apart). Same shapes and dtypes as the two calls."""
        self._check_rope(cos)
        q, w = self.unrotated_queries_and_weights(x)
        return apply_rope_half(q, cos, sin), w

    def unrotated_queries_and_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``queries_and_weights`` before the queries' RoPE ((B, T, H_I, D_I), (B, T, H_I) float32): for a caller
        that rotates inside a fused kernel (``parca.sparse.sparse_decode``)."""
        b, t, _ = x.shape
        if self.wq_b.weight.dtype != torch.float32 or x.dtype != torch.float32:
            return self.wq_b(x).view(b, t, self.n_heads, self.head_dim), self.head_weights(x)
        if self._qw is None:
            self._qw = FusedLinear([self.wq_b, self.weights_proj])
        q, w = self._qw(x)
        return q.view(b, t, self.n_heads, self.head_dim), w * self.weight_scale

    def head_weights(self, x: Tensor) -> Tensor:
        """Per-token, per-head weights (may be negative), computed in float32.

        Args:
            x: (B, T, k_in_dim) the key source at the query positions.

        Returns:
            (B, T, H_I) float32, ``weights_proj(x.float()) * H_I**-0.5 * D_I**-0.5``.
        """
        # .float() on the weight too: a caller who assigned bf16 data directly still gets fp32 math
        return F.linear(x.float(), self.weights_proj.weight.float()) * self.weight_scale
