"""The GQA decoder family: Llama (incl. llama3 / yarn RoPE scaling), Qwen2 (qkv bias), Qwen3 (q/k RMSNorm),
Mistral (sliding window). Module names equal Hugging Face's, so a checkpoint's state dict loads 1:1.

A thin file: projections, norms and RoPE here; attention, selection and the indexer come from ``parca.sparse``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import sparse as dsa
from ..cache import CacheSpec, KVCache
from ..config import ModelConfig, SparseConfig
from .base import ForwardContext, Layerview
from .layers import MLP, Backbone, FusedLinear, RMSNorm, Rotary, apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype | None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        h, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer, self.H, self.Hkv, self.D = layer, H, Hkv, D
        self.q_proj = nn.Linear(h, H * D, bias=cfg.attention_bias, **kw)
        self.k_proj = nn.Linear(h, Hkv * D, bias=cfg.attention_bias, **kw)
        self.v_proj = nn.Linear(h, Hkv * D, bias=cfg.attention_bias, **kw)
        self.o_proj = nn.Linear(H * D, h, bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.scale = D**-0.5
        self.window = cfg.sliding_window
        self.indexer: dsa.LightningIndexer | None = None
        self._proj: FusedLinear | None = None  # the fusion used last
        self._projs: dict[int, FusedLinear] = {}  # by member count: with or without the indexer's queries

    def _projections(self, x: Tensor, sparse: bool) -> Tensor:
        """q, k, v and (with an indexer) the indexer-key projection of ``x`` as one matmul: (B,T,(H+2Hkv)D[+D_I]);
        when a row will select (``sparse``), followed by the indexer's query and head-weight projections
        ([+H_I*D_I+H_I], see ``_folds_indexer``): a dense-only call does not pay for them. The two fusions share
        one weight storage (``FusedLinear`` views members that already lie back to back), nothing is copied."""
        members = [self.q_proj, self.k_proj, self.v_proj]
        if self.indexer is not None:
            members.append(self.indexer.wk)
            if sparse and self._folds_indexer():
                members += [self.indexer.wq_b, self.indexer.weights_proj]
        f = self._projs.get(len(members))
        if f is None or f.linears != members:  # indexers were added (or removed) since
            f = self._projs[len(members)] = FusedLinear(members)
        self._proj = f
        return f.full(x)

    def _folds_indexer(self) -> bool:
        """Whether the indexer's query and head-weight projections join the q/k/v matmul. A retrofitted indexer reads
        the same input as q/k/v, so they can: one GEMV fewer per layer and decode step (a wake-up of the worker
        threads and ~0.1-0.2 ms on a 2-core CPU). Only when every weight shares q_proj's dtype: ``weights_proj``
        stays float32, so in a bf16 model the two keep their own matmuls (a mixed fusion would run unfused)."""
        ix = self.indexer
        dt = self.q_proj.weight.dtype
        return (ix is not None and ix.wq_b.weight.dtype == dt and ix.weights_proj.weight.dtype == dt
                and ix.q_in_dim == ix.k_in_dim == self.q_proj.in_features)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], index_rope: tuple[Tensor, Tensor] | None,
                cache: KVCache, ctx: ForwardContext) -> Tensor:
        """x (B,T,hidden) normed hidden states -> (B,T,hidden)."""
        B, T, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        y = self._projections(x, any(m == "sparse" for m in ctx.modes))
        cos, sin = rope
        if self.q_norm is None:  # one RoPE call for the query and key heads together
            qk = apply_rope(y[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = self.q_norm(y[..., : H * D].view(B, T, H, D))
            k = self.k_norm(y[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = y[..., (H + Hkv) * D : (H + 2 * Hkv) * D].view(B, T, Hkv, D)
        # Indexer keys are computed and cached whenever the model carries indexers, whatever this row's mode:
        # a later sparse decode (or a sparse request reusing this prefix) needs them.
        ik = iq = iw = None
        if self.indexer is not None:
            ix = self.indexer
            o0 = (H + 2 * Hkv) * D
            ik = ix.finish_keys(y[..., o0 : o0 + ix.head_dim], *index_rope)  # (B,T,D_I)
            if y.shape[-1] > o0 + ix.head_dim:  # the indexer's queries and weights came with the same matmul
                o1 = o0 + ix.head_dim + ix.n_heads * ix.head_dim
                iq = y[..., o0 + ix.head_dim : o1].view(B, T, ix.n_heads, ix.head_dim)  # before RoPE
                iw = y[..., o1:] * ix.weight_scale  # (B,T,H_I) float32, as unrotated_queries_and_weights

        outs = []
        for b in range(B):
            slot, start = ctx.slots[b], ctx.starts[b]
            end = start + T
            cache.write(self.layer, slot, start, k[b], v[b], None if ik is None else ik[b])
            kc, vc, ikc = cache.view(self.layer, slot, end)
            q_pos = torch.arange(start, end, device=x.device)[None]  # (1,T)
            qb = q[b : b + 1]
            topk = ctx.topks[b]
            idx = o = None
            if ctx.modes[b] == "sparse":
                if self.indexer is None:
                    raise ValueError("sparse attention needs indexers: load an adapter (--indexer) or a DSA checkpoint")
                # Context <= k: the selection would keep every key, so skip scoring and run dense.
                if end > topk:
                    xb = x[b : b + 1]
                    icos, isin = index_rope[0][b : b + 1], index_rope[1][b : b + 1]
                    # int8 keys come with per-token scales; ascending positions suit the in-place row reads
                    iks = cache.index_scale(self.layer, slot, end)
                    if iq is not None:
                        qi, w = iq[b : b + 1], iw[b : b + 1]
                    else:
                        qi, w = self.indexer.unrotated_queries_and_weights(xb)
                    if T == 1:  # decode: RoPE, selection and attention in one call (C kernels when built)
                        o, idx = dsa.sparse_decode(qi, icos, isin, w, ikc, iks, qb, kc, vc, self.scale, start, topk,
                                                   window=self.window)
                    else:
                        qi = dsa.apply_rope_half(qi, icos, isin)
                        idx = dsa.select_topk(qi, w, ikc, q_pos, topk, window=self.window,
                                              max_chunk_bytes=ctx.max_chunk_bytes, order="position",
                                              **({} if iks is None else {"k_scale": iks}))
            if idx is None:
                o = dsa.dense(qb, kc, vc, q_pos, self.scale, window=self.window, max_chunk_bytes=ctx.max_chunk_bytes)
            elif o is None:
                o = dsa.sparse(qb, kc, vc, idx, self.scale, max_chunk_bytes=ctx.max_chunk_bytes)
            if ctx.observer is not None:
                ctx.observer(Layerview(
                    layer=self.layer, row=b, q=qb, k=kc, q_pos=q_pos, scale=self.scale, x=x[b : b + 1],
                    q_in=x[b : b + 1], indexer=self.indexer,
                    index_cos=None if index_rope is None else index_rope[0][b : b + 1],
                    index_sin=None if index_rope is None else index_rope[1][b : b + 1],
                    index_keys=ikc if ikc is None or ikc.is_floating_point() else
                    dsa.dequantize_int8_rows(ikc, cache.index_scale(self.layer, slot, end).unsqueeze(-1)),
                    idx=idx, window=self.window,
                ))
            outs.append(o)
        o = torch.cat(outs, 0) if B > 1 else outs[0]  # (B,T,H,D)
        return self.o_proj(o.reshape(B, T, self.H * self.D))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, device=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(cfg, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, dtype=dtype, device=device)

    def forward(self, h: Tensor, rope, index_rope, cache: KVCache, ctx: ForwardContext) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, index_rope, cache, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 / Mistral. ``forward`` runs any mix of prefill chunks and decode rows through the
    engine's cache; with ``cache=None`` it is a plain full forward (a temporary cache sized to the input)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, DecoderLayer, dtype, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.index_rotary: Rotary | None = None
        self.sparse_config: SparseConfig | None = None
        if cfg.sparse is not None:
            self.add_indexers(cfg.sparse, device=device)

    # ---- indexers ------------------------------------------------------------------------------
    def add_indexers(self, sc: SparseConfig, device=None, seed: int | None = None) -> None:
        """Give every layer a LightningIndexer fed by the layer's normed hidden state (query and key side)."""
        cfg = self.config
        dtype = self.model.embed_tokens.weight.dtype
        if seed is not None:
            torch.manual_seed(seed)
        for layer in self.model.layers:
            layer.self_attn.indexer = dsa.LightningIndexer(
                cfg.hidden_size, cfg.hidden_size, sc.index_n_heads, sc.index_head_dim, sc.index_rope_dim,
                dtype=dtype, device=device,
            )
        # The indexer's RoPE uses the model's base and scaling over its own (smaller) rotary width.
        self.index_rotary = Rotary(sc.index_rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.sparse_config = sc

    @property
    def has_indexers(self) -> bool:
        return self.sparse_config is not None

    def indexer_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if ".indexer." in k}

    # ---- cache factory -------------------------------------------------------------------------
    # Indexer-key storage: float32, or torch.int8 + one float32 scale per token (68 B instead of 256 B per token
    # and layer at D_I = 64; scored with exact integer dots, see parca.sparse.select).
    index_cache_dtype: torch.dtype = torch.int8

    def cache_spec(self, dtype: torch.dtype | None = None) -> CacheSpec:
        cfg = self.config
        return CacheSpec(
            n_layers=cfg.num_hidden_layers, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim, index_dim=self.sparse_config.index_head_dim if self.has_indexers else None,
            dtype=dtype or self.model.embed_tokens.weight.dtype, index_dtype=self.index_cache_dtype,
        )

    def make_cache(self, n_slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.cache_spec(dtype), n_slots, max_len, device=self.model.embed_tokens.weight.device)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, cache: KVCache | None = None, ctx: ForwardContext | None = None,
                *, last_only: bool = False, return_hidden: bool = False) -> Tensor:
        """input_ids (B,T) -> logits (B,T,V) (or (B,1,V) with ``last_only``).

        Rows write their keys to ``cache`` at ``ctx.starts[b]`` and attend over everything cached before them,
        so the same call serves full prefill, a prefill chunk on top of a cached prefix, and decode (T=1).
        """
        B, T = input_ids.shape
        if cache is None:
            cache = self.make_cache(B, T)
            if ctx is None:
                ctx = ForwardContext(slots=list(range(B)), starts=[0] * B)
        assert ctx is not None
        for b in range(B):
            cache.check_room(ctx.slots[b], ctx.starts[b], T)
        dev = input_ids.device
        positions = torch.tensor(ctx.starts, device=dev)[:, None] + torch.arange(T, device=dev)[None]  # (B,T)
        h = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, h.dtype)
        index_rope = self.index_rotary(positions, h.dtype) if self.index_rotary is not None else None
        for layer in self.model.layers:
            h = layer(h, rope, index_rope, cache, ctx)
        for b in range(B):
            cache.lengths[ctx.slots[b]] = max(cache.lengths[ctx.slots[b]], ctx.starts[b] + T)
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        if return_hidden:
            return h
        return self.lm_head(h)
