"""DeepSeek-V3.2: MLA attention over a 576-wide latent cache, MoE (shared + routed experts, sigmoid gating with
group-limited top-k), dense first layers, and DeepSeek Sparse Attention with the checkpoint's own indexers.
Module names equal Hugging Face's (and DeepSeek's hub checkpoints': ``mlp.experts.{e}.gate_proj``), so a state
dict loads 1:1; ``prepare_state`` dequantises the hub's fp8 block-scaled weights and drops the MTP layer.

Attention, in the absorbed (MQA) form for every call, prefill included::

    q_lat[h] = W_UK[h]^T q_nope[h]                       (H, r)   absorb the key up-projection into the query
    score[h, s] = (q_lat[h] . c[s] + q_pe[h] . k_pe[s]) * scale
    o[h] = W_UV[h] (sum_s p[h, s] c[s])                  (H, d_v) apply the value up-projection after attention

The cache holds one row per token shared by all heads: ``c`` (the kv_a_layernorm'd latent, kv_lora_rank wide)
in the cache's ``v`` and ``k_pe`` (RoPE'd, qk_rope_head_dim wide) in its ``k``. Why absorbed for prefill too:
it is exact (the same sums, reassociated), needs no per-head K/V expansion of a cached prefix for chunked
prefill, and gives dense, sparse, prefill and decode one code path. The price is ~3.4x the attention FLOPs of
the expanded MHA form per (query, key) pair at V3.2's sizes (278,528 vs 81,920), which DeepSeek pays only for
decode and sparse prefill; an MHA-form dense prefill is an optimisation left for later.

RoPE layouts: the MLA RoPE is DeepSeek's interleaved-pair rotation, computed (as transformers does) on the
even/odd slices and written out de-interleaved; queries and cached keys share that permutation, so every dot
product equals DeepSeek's. The indexer's RoPE is rotate-half on the first qk_rope_head_dim dims (dsa.md section 2).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import sparse as dsa
from ..cache import CacheSpec, KVCache
from ..config import ModelConfig, SparseConfig, mla_layer_is_moe
from ..errors import ConfigError
from ..sparse.quant import fake_quant_indexer
from .base import ForwardContext, Layerview
from .layers import MLP, Backbone, RMSNorm, Rotary

INDEX_PRECISIONS = ("full", "fp8")
FP8_BLOCK = 128  # DeepSeek's weight_block_size [128, 128]


def _x(cfg: ModelConfig, key: str, default=None):
    v = cfg.extra.get(key, default)
    return default if v is None else v


def softmax_scale(cfg: ModelConfig) -> float:
    """``(d_nope + d_rope)^-0.5``, times ``mscale(factor, mscale_all_dim)^2`` under a scaled RoPE (YaRN): the
    attention temperature correction lives in the softmax scale, since the RoPE tables carry only
    ``mscale / mscale_all_dim`` (1.0 for DeepSeek-V3)."""
    scale = (int(_x(cfg, "qk_nope_head_dim")) + int(_x(cfg, "qk_rope_head_dim"))) ** -0.5
    rs = cfg.rope_scaling or {}
    m_all = rs.get("mscale_all_dim") or 0
    if rs.get("rope_type", "default") != "default" and m_all:
        factor = float(rs["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(m_all) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """DeepSeek's interleaved RoPE: pair (x[2i], x[2i+1]) rotated by angle i, output de-interleaved
    (all first members, then all second members).

    Args:
        x: (B, T, H, d) with d = cos.shape[-1].
        cos, sin: (B, T, d) rotate-half tables (``cat(f, f)``); the first half holds one angle per pair.

    Returns:
        (B, T, H, d) in x's dtype.
    """
    half = cos.shape[-1] // 2
    c, s = cos[..., :half].unsqueeze(2).to(x.dtype), sin[..., :half].unsqueeze(2).to(x.dtype)  # (B,T,1,d/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def latent_sparse_attention(q_lat: Tensor, q_pe: Tensor, c: Tensor, k_pe: Tensor, idx: Tensor, scale: float, *,
                            max_chunk_bytes: int = 64 * 2**20) -> Tensor:
    """MLA in MQA form over the selected latent rows only: both halves of the key (``c``, ``k_pe``) are gathered
    by index straight from their cache views, never concatenated for the whole context.

    Args:
        q_lat: (B, T, H, r) absorbed queries.
        q_pe: (B, T, H, d_r) RoPE'd query parts.
        c: (B, S, r) latent rows (also the values).
        k_pe: (B, S, d_r) RoPE'd key rows.
        idx: (B, T, k) selected positions, ``-1`` = unused slot.
        scale: softmax scale.
        max_chunk_bytes: budget for one query chunk's gathered rows and float32 scores, per batch row.

    Returns:
        (B, T, H, r) in q_lat's dtype (rows with no valid slot give 0).
    """
    b, t, h, r = q_lat.shape
    dr, n = q_pe.shape[-1], idx.shape[-1]
    out = q_lat.new_empty(b, t, h, r)
    if t == 0:
        return out
    row_bytes = n * (r + dr) * c.element_size() + 2 * 4 * h * n
    chunk = min(t, max(1, max_chunk_bytes // max(row_bytes, 1)))
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        tc = t1 - t0
        ic = idx[:, t0:t1]  # (B, Tc, n)
        cs = dsa.gather_rows(c, ic).reshape(b * tc, n, r)
        ks = dsa.gather_rows(k_pe, ic).reshape(b * tc, n, dr)
        scores = torch.bmm(q_lat[:, t0:t1].reshape(b * tc, h, r), cs.transpose(1, 2)).float()
        scores += torch.bmm(q_pe[:, t0:t1].reshape(b * tc, h, dr), ks.transpose(1, 2)).float()  # (B*Tc, H, n)
        valid = (ic >= 0).reshape(b * tc, 1, n)
        probs = torch.softmax(scores.mul_(scale).masked_fill_(~valid, float("-inf")), dim=-1)
        probs = probs.masked_fill_(~valid.any(-1, keepdim=True), 0.0)  # all -inf rows are NaN: make them 0
        out[:, t0:t1] = torch.bmm(probs.to(cs.dtype), cs).view(b, tc, h, r)
    return out


class MLAttention(nn.Module):
    """Multi-head latent attention with the DSA indexer fed by the query latent (``q_resid``)."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype | None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        h, H = cfg.hidden_size, cfg.num_attention_heads
        self.layer, self.H = layer, H
        self.rq, self.r = int(_x(cfg, "q_lora_rank")), int(_x(cfg, "kv_lora_rank"))
        self.dn, self.dr, self.dv = (int(_x(cfg, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        bias = cfg.attention_bias
        self.q_a_proj = nn.Linear(h, self.rq, bias=bias, **kw)
        self.q_a_layernorm = RMSNorm(self.rq, 1e-6, **kw)  # DeepSeek's latent norms use eps 1e-6, not rms_norm_eps
        self.q_b_proj = nn.Linear(self.rq, H * (self.dn + self.dr), bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.r + self.dr, bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.r, 1e-6, **kw)
        self.kv_b_proj = nn.Linear(self.r, H * (self.dn + self.dv), bias=False, **kw)
        self.o_proj = nn.Linear(H * self.dv, h, bias=bias, **kw)
        self.scale = softmax_scale(cfg)
        self.indexer: dsa.LightningIndexer | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], index_rope: tuple[Tensor, Tensor] | None,
                cache: KVCache, ctx: ForwardContext, default_topk: int | None, fp8_index: bool) -> Tensor:
        """x (B,T,hidden) normed hidden states -> (B,T,hidden)."""
        B, T, _ = x.shape
        H, r, dn, dr, dv = self.H, self.r, self.dn, self.dr, self.dv
        q_resid = self.q_a_layernorm(self.q_a_proj(x))  # (B,T,rq): the query latent, also the indexer's query source
        q = self.q_b_proj(q_resid).view(B, T, H, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
        c = self.kv_a_layernorm(c)  # (B,T,r)
        cos, sin = rope
        q_pe = rope_pairs(q_pe, cos, sin)  # (B,T,H,dr)
        k_pe = rope_pairs(k_pe.unsqueeze(2), cos, sin)  # (B,T,1,dr)
        w_kv = self.kv_b_proj.weight.view(H, dn + dv, r)
        w_uk, w_uv = w_kv[:, :dn], w_kv[:, dn:]  # (H,dn,r), (H,dv,r)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # (B,T,H,r) absorbed queries
        ik = None
        if self.indexer is not None:
            # keys are cached whatever this row's mode: a later sparse step (or a reused prefix) needs them
            ik = self.indexer.keys(x, *index_rope)  # (B,T,D_I)
            if fp8_index:
                ik = fake_quant_indexer(ik)  # cached as the fp8 kernel would store them (rotated + quantised)

        outs = []
        for b in range(B):
            slot, start = ctx.slots[b], ctx.starts[b]
            end = start + T
            cache.write(self.layer, slot, start, k_pe[b], c[b].unsqueeze(1), None if ik is None else ik[b])
            kpe_c, c_c, ikc = cache.view(self.layer, slot, end)  # (1,S,1,dr), (1,S,1,r), (1,S,D_I)
            q_pos = torch.arange(start, end, device=x.device)[None]  # (1,T)
            idx = None
            if ctx.modes[b] == "sparse":
                if self.indexer is None:
                    raise ConfigError("sparse attention needs indexers: this DeepSeek config has no index_* fields")
                topk = ctx.topks[b] or default_topk
                # context <= k: the selection keeps every key, so skip scoring and attend densely
                if end > topk:
                    icos, isin = index_rope[0][b : b + 1], index_rope[1][b : b + 1]
                    qi = self.indexer.queries(q_resid[b : b + 1], icos, isin)  # (1,T,H_I,D_I)
                    if fp8_index:
                        qi = fake_quant_indexer(qi)
                    w = self.indexer.head_weights(x[b : b + 1])  # (1,T,H_I) float32
                    idx = dsa.select_topk(qi, w, ikc, q_pos, topk, max_chunk_bytes=ctx.max_chunk_bytes)
            ql, qp = q_lat[b : b + 1], q_pe[b : b + 1]
            k_full = None
            if idx is None:
                # dense: one 576-wide key per row, the latent doubling as the value (MQA: H_kv = 1)
                k_full = torch.cat([c_c, kpe_c], dim=-1)  # (1,S,1,r+dr)
                o = dsa.dense(torch.cat([ql, qp], dim=-1), k_full, c_c, q_pos, self.scale,
                              max_chunk_bytes=ctx.max_chunk_bytes)
            else:
                o = latent_sparse_attention(ql, qp, c_c[:, :, 0], kpe_c[:, :, 0], idx, self.scale,
                                            max_chunk_bytes=ctx.max_chunk_bytes)
            if ctx.observer is not None:
                # q/k in the absorbed form: softmax(q . k * scale) over these IS the layer's attention, so
                # head_summed_probs / recall work unchanged; k is built here only for the observer in sparse rows
                ctx.observer(Layerview(
                    layer=self.layer, row=b, q=torch.cat([ql, qp], dim=-1),
                    k=k_full if k_full is not None else torch.cat([c_c, kpe_c], dim=-1),
                    q_pos=q_pos, scale=self.scale, x=x[b : b + 1], q_in=q_resid[b : b + 1], indexer=self.indexer,
                    index_cos=None if index_rope is None else index_rope[0][b : b + 1],
                    index_sin=None if index_rope is None else index_rope[1][b : b + 1],
                    index_keys=ikc, idx=idx, window=None,
                ))
            outs.append(o)
        o = torch.cat(outs, 0) if B > 1 else outs[0]  # (B,T,H,r)
        o = torch.einsum("bthr,hvr->bthv", o, w_uv)  # (B,T,H,dv): value up-projection after attention
        return self.o_proj(o.reshape(B, T, H * dv))


class Router(nn.Module):
    """Sigmoid gate with DeepSeek's bias-corrected, group-limited top-k (``noaux_tc``), in float32.

    Experts are chosen on ``sigmoid(logits) + e_score_correction_bias`` within the ``topk_group`` groups whose
    two best experts score highest; the chosen experts are weighted by the plain sigmoid scores (the bias
    only steers the choice), normalised when ``norm_topk_prob``, then times ``routed_scaling_factor``."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None) -> None:
        super().__init__()
        self.n_experts = int(_x(cfg, "n_routed_experts"))
        self.top_k = int(_x(cfg, "num_experts_per_tok"))
        self.n_group, self.topk_group = int(_x(cfg, "n_group", 1)), int(_x(cfg, "topk_group", 1))
        self.norm = bool(_x(cfg, "norm_topk_prob", True))
        self.scaling = float(_x(cfg, "routed_scaling_factor", 1.0))
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=dtype, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, hidden) -> weights (N, K) float32, expert ids (N, K) int64."""
        n = x.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N,E)
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            per = self.n_experts // self.n_group
            group_scores = choice.view(n, self.n_group, per).topk(2, dim=-1).values.sum(-1)  # (N,G)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~gmask.repeat_interleave(per, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (N,K)
        w = scores.gather(1, ids)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, ids


class MoE(nn.Module):
    """Shared experts (always on) + routed experts (top-k per token)."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None) -> None:
        super().__init__()
        h, im, act = cfg.hidden_size, int(_x(cfg, "moe_intermediate_size")), cfg.hidden_act
        self.gate = Router(cfg, dtype, device)
        self.experts = nn.ModuleList(MLP(h, im, act, dtype=dtype, device=device) for _ in range(self.gate.n_experts))
        n_shared = int(_x(cfg, "n_shared_experts", 0))
        self.shared_experts = MLP(h, im * n_shared, act, dtype=dtype, device=device) if n_shared else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B,T,hidden) -> (B,T,hidden)."""
        xf = x.reshape(-1, x.shape[-1])  # (N,h)
        w, ids = self.gate(xf)
        k = ids.shape[1]
        flat = ids.reshape(-1)  # (N*K,) entry j belongs to token j // K
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host sync per layer
        wf = w.reshape(-1)
        out = torch.zeros_like(xf)
        pos = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            sel = order[pos : pos + cnt]
            pos += cnt
            tok = sel // k
            y = self.experts[e](xf[tok]) * wf[sel, None]
            out.index_add_(0, tok, y.to(out.dtype))
        out = out.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, device=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = MLAttention(cfg, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        if mla_layer_is_moe(cfg, layer):
            self.mlp: nn.Module = MoE(cfg, dtype, device)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, dtype=dtype,
                           device=device)

    def forward(self, h: Tensor, rope, index_rope, cache: KVCache, ctx: ForwardContext, default_topk: int | None,
                fp8_index: bool) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, index_rope, cache, ctx, default_topk, fp8_index)
        return h + self.mlp(self.post_attention_layernorm(h))


def _check_config(cfg: ModelConfig) -> None:
    where = cfg.name or "config.json"
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not _x(cfg, key):
            raise ConfigError(f"{where}: DeepSeek-V3.2 needs {key!r} (MLA with a query latent); it is missing or 0")
    if int(_x(cfg, "n_routed_experts", 0)):
        for key in ("moe_intermediate_size", "num_experts_per_tok"):
            if not _x(cfg, key):
                raise ConfigError(f"{where}: a MoE config needs {key!r}")
        scoring = _x(cfg, "scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"{where}: scoring_func {scoring!r} is not supported; DeepSeek-V3.2 uses 'sigmoid'")
        n_exp, n_group = int(_x(cfg, "n_routed_experts")), int(_x(cfg, "n_group", 1))
        if n_exp % n_group or (n_group > 1 and n_exp // n_group < 2):
            raise ConfigError(f"{where}: n_routed_experts ({n_exp}) must be a multiple of n_group ({n_group}) "
                              f"with at least 2 experts per group (groups are ranked by their best two)")


class DeepseekV32ForCausalLM(nn.Module):
    """DeepSeek-V3.2(-Exp). ``forward`` runs any mix of prefill chunks and decode rows through the engine's latent
    cache; with ``cache=None`` it is a plain full forward that, without a ``ctx``, attends SPARSELY with the
    checkpoint's top-k (the model as trained and as transformers runs it; pass a ctx with mode 'dense' for full
    attention).

    Observers (``ctx.observer``) get one Layerview per layer and row with the ABSORBED attention: ``q`` (1,T,H,
    kv_lora_rank + qk_rope_head_dim) = [W_UK^T q_nope, q_pe], ``k`` (1,S,1,same) = [c_kv, k_pe] and the real
    softmax scale, so softmax(q k^T scale) is exactly the layer's attention (recall / indexer-training targets
    work unchanged); ``x`` is the normed hidden state (indexer keys and head weights), ``q_in`` the query latent
    (indexer queries), ``idx`` the selection (None when the row attended densely).

    ``index_precision``: "full" (float32 indexer scores) or "fp8" (indexer queries and keys Hadamard-rotated and
    fp8-block round-tripped before scoring, as DeepSeek's kernels see them). Set it before filling a cache: keys
    are stored in the precision that was active when they were written.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        _check_config(cfg)
        self.config = cfg
        self.model = Backbone(cfg, DecoderLayer, dtype, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(int(_x(cfg, "qk_rope_head_dim")), cfg.rope_theta, cfg.rope_scaling,
                             cfg.max_position_embeddings)
        self.index_rotary: Rotary | None = None
        self.sparse_config: SparseConfig | None = None
        self._index_precision = "full"
        if cfg.sparse is not None:
            self.add_indexers(cfg.sparse, device=device)

    @property
    def index_precision(self) -> str:
        return self._index_precision

    @index_precision.setter
    def index_precision(self, value: str) -> None:
        if value not in INDEX_PRECISIONS:
            raise ConfigError(f"index_precision must be one of {', '.join(INDEX_PRECISIONS)}, got {value!r}")
        self._index_precision = value

    # ---- checkpoint conversion -----------------------------------------------------------------
    @classmethod
    def prepare_state(cls, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
        """Hub layout -> parca's: drop the MTP layer(s) (``model.layers.{L}...`` for L >= num_hidden_layers),
        dequantise fp8 weights (``X.weight`` float8_e4m3fn + ``X.weight_scale_inv`` float32, one scale per
        128 x 128 block: ``w = fp8 * scale``), and split fused expert tensors (transformers' in-memory
        ``experts.gate_up_proj`` / ``experts.down_proj``) into per-expert linears. Dequantised weights come out in
        the config's dtype (float32 for float32 configs)."""
        n_layers = cfg.num_hidden_layers
        layer_re = re.compile(r"^model\.layers\.(\d+)\.")
        out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            cfg.torch_dtype, torch.float32)
        out: dict[str, Tensor] = {}
        for name, t in state.items():
            m = layer_re.match(name)
            if m and int(m.group(1)) >= n_layers:
                continue  # multi-token-prediction module: parca does not run it
            if name.endswith("_scale_inv"):
                continue
            scale = state.get(name + "_scale_inv")
            if scale is not None:
                t = dequantize_block_fp8(t, scale, name, out_dtype)
            out[name] = t
        for name in [k for k in out if k.endswith(".mlp.experts.gate_up_proj")]:
            base = name[: -len("gate_up_proj")]
            gate_up, down = out.pop(name), out.pop(base + "down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = gate_up[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = gate_up[e, inter:]
                out[f"{base}{e}.down_proj.weight"] = down[e]
        return out

    # ---- indexers ------------------------------------------------------------------------------
    def add_indexers(self, sc: SparseConfig, device=None, seed: int | None = None) -> None:
        """(Re)build every layer's LightningIndexer: queries from the query latent (q_lora_rank), keys and head
        weights from the normed hidden state; RoPE on the first ``index_rope_dim`` dims (DeepSeek: = qk_rope)."""
        cfg = self.config
        dtype = self.model.embed_tokens.weight.dtype
        if seed is not None:
            torch.manual_seed(seed)
        for layer in self.model.layers:
            layer.self_attn.indexer = dsa.LightningIndexer(
                int(_x(cfg, "q_lora_rank")), cfg.hidden_size, sc.index_n_heads, sc.index_head_dim, sc.index_rope_dim,
                dtype=dtype, device=device,
            )
        if sc.index_rope_dim == self.rotary.dim:
            self.index_rotary = self.rotary  # DeepSeek: the indexer reuses the MLA rope tables (YaRN included)
        else:
            self.index_rotary = Rotary(sc.index_rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.sparse_config = sc

    @property
    def has_indexers(self) -> bool:
        return self.sparse_config is not None

    def indexer_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if ".indexer." in k}

    # ---- cache factory -------------------------------------------------------------------------
    def cache_spec(self, dtype: torch.dtype | None = None) -> CacheSpec:
        """One latent row per token per layer, shared by all heads: ``k`` = k_pe (qk_rope_head_dim), ``v`` = c_kv
        (kv_lora_rank); plus the indexer key (index_head_dim)."""
        cfg = self.config
        return CacheSpec(
            n_layers=cfg.num_hidden_layers, n_kv_heads=1, head_dim=int(_x(cfg, "qk_rope_head_dim")),
            v_head_dim=int(_x(cfg, "kv_lora_rank")),
            index_dim=self.sparse_config.index_head_dim if self.has_indexers else None,
            dtype=dtype or self.model.embed_tokens.weight.dtype,
        )

    def make_cache(self, n_slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.cache_spec(dtype), n_slots, max_len, device=self.model.embed_tokens.weight.device)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, cache: KVCache | None = None, ctx: ForwardContext | None = None,
                *, last_only: bool = False, return_hidden: bool = False) -> Tensor:
        """input_ids (B,T) -> logits (B,T,V) (or (B,1,V) with ``last_only``).

        Rows write their latents to ``cache`` at ``ctx.starts[b]`` and attend over everything cached before them.
        A sparse row with ``ctx.topks[b] = None`` uses the checkpoint's ``index_topk``.
        """
        B, T = input_ids.shape
        if cache is None:
            cache = self.make_cache(B, T)
            if ctx is None:
                mode = "sparse" if self.has_indexers else "dense"
                ctx = ForwardContext(slots=list(range(B)), starts=[0] * B, modes=[mode] * B)
        assert ctx is not None, "a cache needs a ForwardContext saying which slot each row uses"
        for b in range(B):
            cache.check_room(ctx.slots[b], ctx.starts[b], T)
        dev = input_ids.device
        positions = torch.tensor(ctx.starts, device=dev)[:, None] + torch.arange(T, device=dev)[None]  # (B,T)
        h = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, h.dtype)
        index_rope = None
        if self.index_rotary is not None:
            index_rope = rope if self.index_rotary is self.rotary else self.index_rotary(positions, h.dtype)
        default_topk = self.sparse_config.index_topk if self.has_indexers else None
        fp8_index = self._index_precision == "fp8"
        for layer in self.model.layers:
            h = layer(h, rope, index_rope, cache, ctx, default_topk, fp8_index)
        for b in range(B):
            cache.lengths[ctx.slots[b]] = max(cache.lengths[ctx.slots[b]], ctx.starts[b] + T)
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        if return_hidden:
            return h
        return self.lm_head(h)


def dequantize_block_fp8(w: Tensor, scale_inv: Tensor, name: str = "weight", dtype: torch.dtype = torch.float32,
                         block: int = FP8_BLOCK) -> Tensor:
    """DeepSeek's fp8 weight format back to floats: ``w`` (out, in) float8_e4m3fn and ``scale_inv``
    (ceil(out/128), ceil(in/128)) float32, each scale covering one 128 x 128 block (edge blocks truncated)."""
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise ConfigError(f"{name}: fp8 block scales need a 2-D weight and a 2-D {name}_scale_inv, "
                          f"got {tuple(w.shape)} and {tuple(scale_inv.shape)}")
    rows, cols = w.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ConfigError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a "
                          f"{tuple(w.shape)} weight in {block}x{block} blocks")
    s = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w.float() * s).to(dtype)
