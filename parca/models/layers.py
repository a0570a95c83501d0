"""Building blocks shared by the model files: RMSNorm, RoPE tables (default / linear / llama3 / yarn), SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sparse.fused import FusedLinear


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (what HF Llama/Qwen do)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        if in_dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same math as below in one fused op (eight small ops cost ~8x the work on a decode token)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(in_dtype)


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int) -> tuple[Tensor, float]:
    """Inverse frequencies (dim/2,) and the attention factor that multiplies cos/sin.

    Types: default, linear (positions divided by factor), llama3 (band-wise frequency scaling), yarn (NTK-by-parts
    interpolation with the ``0.1 ln(s) + 1`` attention factor; DeepSeek's mscale/mscale_all_dim variant too).
    """
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not scaling:
        return inv.float(), 1.0
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv.float(), 1.0
    if kind == "linear":
        return (inv / float(scaling["factor"])).float(), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float(), 1.0
    if kind == "yarn":
        orig = float(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        factor = scaling.get("factor") or max_position_embeddings / orig
        factor = float(factor)

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)

        def corr_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extra = 1 - ramp  # 1 where we keep the original (high-frequency) band
        inv = inv.float()
        out = (inv / factor) * (1 - extra) + inv * extra
        return out, float(attn)
    raise ValueError(f"unsupported rope type {kind!r}")


class Rotary(nn.Module):
    """cos/sin tables in the rotate-half layout, computed on demand for absolute positions."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int) -> None:
        super().__init__()
        inv, self.attention_factor = rope_inv_freq(dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.dim = dim

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B,T) int64 -> cos, sin (B,T,dim) in ``dtype``."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # (B,T,dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B,T,H,D), cos/sin (B,T,D) -> rotated x (full head dim, rotate-half layout)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def activation(name: str):
    try:
        return _ACTS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}") from None


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act: str, bias: bool = False, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, **kw)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, **kw)
        self.act = activation(act)
        self._gate_up = FusedLinear([self.gate_proj, self.up_proj])  # one matmul for both (see FusedLinear)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self._gate_up(x)
        return self.down_proj(self.act(gate) * up)


class Backbone(nn.Module):
    """Embedding, ``num_hidden_layers`` decoder layers of ``layer_cls(cfg, index, dtype, device)``, final norm
    (HF's ``model.`` prefix, so checkpoint names map 1:1)."""

    def __init__(self, cfg, layer_cls: type, dtype, device=None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(layer_cls(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
