"""Analytic cost model: FLOPs and bytes per token position, dense vs sparse, turned into seconds and $.

Why a model beside the measurement: a roofline says *where* the time goes (projections, main attention,
indexer, top-k, gather) and lets a report put DeepSeek's published curve (paper figure 3, H800 at 2 USD
per GPU-hour) beside ours. Everything here is arithmetic on a ``ModelConfig``; nothing is timed except
``calibrate_this_machine``.

The model, per generated or prefilled token at position ``p`` (``p`` earlier tokens, so ``n = p + 1``
visible keys including its own; a sparse query keeps ``min(k, n)`` of them, as in DeepSeek's
``min(index_topk, end_pos)``), summed over layers:

* ``linear``    -- 2 FLOPs per activated weight (attention projections, MLP or shared + routed experts,
  the LM head, and the indexer's three projections in sparse mode). Bytes: the weights one step touches,
  divided by the tokens of that step (``batch x query_tokens_per_step``). For MoE the routed experts
  touched by a step are the expected number of distinct experts when ``batch x q`` tokens each pick
  ``num_experts_per_tok`` of ``n_routed_experts`` uniformly: ``E (1 - (1 - K/E)^tokens)``.
* ``attention`` -- per (query, key) pair ``2 H (d_qk + d_v)`` FLOPs. MLA has two modes: MHA
  (per-head keys of 192 and values of 128: 81,920 FLOPs per pair for V3.2) and MQA / absorbed (all 128
  heads share the 576-d latent, value = its first 512 dims: 278,528). Dense prefill of an MLA model
  runs in MHA mode by default and then also re-projects the cached prefix latents to per-head K/V once per
  step; decode and all sparse attention run in MQA mode. Bytes: the cache rows of this sequence read once
  per step (shared by the step's ``q`` query tokens) plus the token's own row written.
* ``indexer``   -- ``2 H_I D_I`` FLOPs per (query, key) pair over all ``n`` keys (the head-weighted sum
  adds ``2 H_I``, under 1%, not counted), at the 8-bit rate when keys are fp8/int8. Bytes: every
  indexer key of the sequence read once per step (shared by the ``q`` query tokens, DeepGEMM's
  ``next_n``) plus the token's own key written.
* ``topk``      -- one comparison per candidate (``n`` per query per layer) and fp32 logits written by the
  indexer kernel and read back by the selection kernel (8 bytes per candidate).
* ``gather``    -- the ``min(k, n)`` selected cache rows, read per query token (no reuse across the
  step's queries assumed; an upper bound). No FLOPs. For MLA one 656-byte latent row feeds 128 heads
  (278,528 FLOPs), so sparse attention stays compute-bound; a GQA row feeds only its group, so a GQA
  sparse prefill is gather-bound under this bound -- one reason engines prefill short prompts densely.

Reuse: a dense step reads each cache row once for all ``q`` query tokens of the sequence. For MTP decode
that is what DeepGEMM / FlashMLA do; for a prefill chunk it assumes FlashAttention-style tiling keeps
rows on chip, which is optimistic, but prefill attention is compute-bound at any realistic tile size.

Time (``seconds_per_token``) is a roofline per kernel: ``max(FLOPs / (peak x efficiency), bytes /
(bandwidth x efficiency))``, with kernels run one after another (no overlap). The sparse attention
kernel reads its own selected rows (FlashMLA takes indices), so ``attention`` and ``gather`` form one
kernel. Efficiencies are *achieved* fractions of peak, taken from published kernel figures where they
exist (see ``DEVICES``). Seconds are device-seconds per token: the work is assumed to spread over any
number of devices without loss, so $ per token = price per device-second x device-seconds.

Not counted: norms, RoPE, softmax exponentials, activation traffic (a few x hidden x 2 bytes per layer),
embedding lookups, weight-quantisation scales, communication (all-to-all, all-reduce), scheduling
overhead, the MTP draft module's own ~1.5B activated parameters. These make real costs higher than the
model's absolute numbers, roughly equally on the dense and sparse sides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .bench.common import cpu_model
from .config import ModelConfig, SparseConfig, dtype_bytes
from .errors import ParcaError

COMPONENTS = ("linear", "attention", "indexer", "topk", "gather")
PHASES = ("prefill", "decode")
MODES = ("dense", "sparse")


# ---- per-token breakdown ----------------------------------------------------------------------
@dataclass
class Breakdown:
    """FLOPs and bytes moved for one token, by component.

    ``fp8_components`` names the components whose FLOPs run at the device's 8-bit tensor-core rate;
    ``phase`` / ``mode`` select per-kernel efficiencies (``Device.kernel_efficiency``).
    """

    linear_flops: float = 0.0
    attention_flops: float = 0.0
    indexer_flops: float = 0.0
    topk_flops: float = 0.0
    gather_flops: float = 0.0
    linear_bytes: float = 0.0
    attention_bytes: float = 0.0
    indexer_bytes: float = 0.0
    topk_bytes: float = 0.0
    gather_bytes: float = 0.0
    phase: str = ""
    mode: str = ""
    fp8_components: tuple[str, ...] = ()

    @property
    def total_flops(self) -> float:
        return sum(getattr(self, f"{c}_flops") for c in COMPONENTS)

    @property
    def total_bytes(self) -> float:
        return sum(getattr(self, f"{c}_bytes") for c in COMPONENTS)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fp8_components"] = list(self.fp8_components)
        d["total_flops"] = self.total_flops
        d["total_bytes"] = self.total_bytes
        return d

    def __add__(self, other: "Breakdown") -> "Breakdown":
        """Sum of two breakdowns (a request's cost is the sum of its tokens')."""
        vals = {f"{c}_{k}": getattr(self, f"{c}_{k}") + getattr(other, f"{c}_{k}")
                for c in COMPONENTS for k in ("flops", "bytes")}
        return Breakdown(**vals,
                         phase=self.phase if self.phase == other.phase else "mixed",
                         mode=self.mode if self.mode == other.mode else "mixed",
                         fp8_components=tuple(sorted(set(self.fp8_components) | set(other.fp8_components))))

    def scaled(self, factor: float) -> "Breakdown":
        vals = {f"{c}_{k}": getattr(self, f"{c}_{k}") * factor for c in COMPONENTS for k in ("flops", "bytes")}
        return Breakdown(**vals, phase=self.phase, mode=self.mode, fp8_components=self.fp8_components)


# ---- architecture geometry --------------------------------------------------------------------
def _x(cfg: ModelConfig, key: str, default: Any = None) -> Any:
    v = cfg.extra.get(key, default)
    return default if v is None else v


def is_mla(cfg: ModelConfig) -> bool:
    """MLA (DeepSeek V2/V3/V3.2): recognised by ``kv_lora_rank`` in ``cfg.extra`` (HF config.json name)."""
    return bool(_x(cfg, "kv_lora_rank", 0))


def _is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    if not int(_x(cfg, "n_routed_experts", 0)):
        return False
    return layer >= int(_x(cfg, "first_k_dense_replace", 0)) and layer % int(_x(cfg, "moe_layer_freq", 1)) == 0


def _attention_params(cfg: ModelConfig) -> int:
    """Matmul weights of one layer's attention (biases and norms ignored)."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    if is_mla(cfg):
        r_q, r_kv = int(_x(cfg, "q_lora_rank", 0)), int(_x(cfg, "kv_lora_rank"))
        dn, dr, dv = int(_x(cfg, "qk_nope_head_dim")), int(_x(cfg, "qk_rope_head_dim")), int(_x(cfg, "v_head_dim"))
        q = h * r_q + r_q * H * (dn + dr) if r_q else h * H * (dn + dr)
        return q + h * (r_kv + dr) + r_kv * H * (dn + dv) + H * dv * h
    D, Hkv = cfg.head_dim, cfg.num_key_value_heads
    return h * H * D + 2 * h * Hkv * D + H * D * h


def _indexer_params(cfg: ModelConfig, sc: SparseConfig) -> int:
    """One layer's indexer projections: wq_b (from the MLA query latent, else the hidden state), wk,
    weights_proj. 13.96M for DeepSeek-V3.2 (dsa.md: about 14.0M)."""
    h = cfg.hidden_size
    q_in = int(_x(cfg, "q_lora_rank", 0)) if is_mla(cfg) else 0
    q_in = q_in or h
    return q_in * sc.index_n_heads * sc.index_head_dim + h * sc.index_head_dim + h * sc.index_n_heads


def _mlp_params(cfg: ModelConfig, layer: int, tokens: float | None) -> tuple[float, float]:
    """(activated params per token, params a step of ``tokens`` tokens reads) of one layer's MLP.

    ``tokens=None`` means "as many as needed to touch every expert"."""
    h = cfg.hidden_size
    if not _is_moe_layer(cfg, layer):
        p = 3 * h * cfg.intermediate_size
        return p, p
    e_size = 3 * h * int(_x(cfg, "moe_intermediate_size"))
    E, K = int(_x(cfg, "n_routed_experts")), int(_x(cfg, "num_experts_per_tok"))
    shared = int(_x(cfg, "n_shared_experts", 0)) * e_size + h * E  # shared experts + router
    touched = E if tokens is None else E * (1.0 - (1.0 - K / E) ** tokens)
    return shared + K * e_size, shared + touched * e_size


def activated_parameters(cfg: ModelConfig, sparse: SparseConfig | None = None) -> int:
    """Matmul weights one token multiplies (LM head included, embedding lookup not). DeepSeek-V3: ~36.6B."""
    total = cfg.vocab_size * cfg.hidden_size
    for layer in range(cfg.num_hidden_layers):
        total += _attention_params(cfg) + int(_mlp_params(cfg, layer, 1)[0])
        if sparse is not None:
            total += _indexer_params(cfg, sparse)
    return total


def _weight_dtype(cfg: ModelConfig, weight_dtype: str | None) -> str:
    if weight_dtype is not None:
        return weight_dtype
    q = cfg.extra.get("quantization_config") or {}
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        return "float8_e4m3fn"  # DeepSeek's checkpoints: fp8 e4m3 weights with 128x128 block scales
    return cfg.torch_dtype


def kv_bytes_per_token_per_layer(cfg: ModelConfig, kv_dtype_bytes: int | None = None) -> int:
    """Bytes one token's cache row takes in one layer.

    GQA: ``2 H_kv D b``. MLA: the latent plus its rope key, ``(kv_lora_rank + qk_rope_head_dim) b``
    (1152 in bf16); in DeepSeek's fp8 layout (``kv_dtype_bytes=1``) 512 fp8 + one fp32 scale per 128
    values (16 B) + 64 bf16 rope dims (128 B) = 656.
    """
    b = dtype_bytes(cfg.torch_dtype) if kv_dtype_bytes is None else int(kv_dtype_bytes)
    if b not in (1, 2, 4):
        raise ParcaError(f"kv_dtype_bytes must be 1 (fp8/int8), 2 (bf16/fp16) or 4 (fp32), got {kv_dtype_bytes!r}")
    if is_mla(cfg):
        r_kv, dr = int(_x(cfg, "kv_lora_rank")), int(_x(cfg, "qk_rope_head_dim"))
        if b == 1:
            return r_kv + 4 * math.ceil(r_kv / 128) + 2 * dr
        return (r_kv + dr) * b
    return 2 * cfg.num_key_value_heads * cfg.head_dim * b


_INDEX_KEY_DTYPES = ("fp8", "int8", "bfloat16", "float16", "float32")


def indexer_bytes_per_token_per_layer(sparse: SparseConfig, key_dtype: str = "fp8") -> int:
    """Bytes of one token's indexer key in one layer: 8-bit keys carry one fp32 scale per 128 values
    (132 for D_I = 128); bfloat16/float16 ``2 D_I``; float32 ``4 D_I``."""
    d = sparse.index_head_dim
    if key_dtype in ("fp8", "int8"):
        return d + 4 * math.ceil(d / 128)
    if key_dtype in ("bfloat16", "float16"):
        return 2 * d
    if key_dtype == "float32":
        return 4 * d
    raise ParcaError(f"indexer key dtype {key_dtype!r} is not known; expected one of {', '.join(_INDEX_KEY_DTYPES)}")


def _pair_flops(cfg: ModelConfig, attention_mode: str) -> int:
    """Main-attention FLOPs per (query, key) pair per layer: QK^T plus PV, ``2 H (d_qk + d_v)``."""
    H = cfg.num_attention_heads
    if not is_mla(cfg):
        return 4 * H * cfg.head_dim
    r_kv, dn, dr, dv = (int(_x(cfg, k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if attention_mode == "mha":
        return 2 * H * (dn + dr + dv)
    return 2 * H * (r_kv + dr + r_kv)


def per_token(
    cfg: ModelConfig,
    position: int,
    *,
    phase: str,
    mode: str,
    sparse: SparseConfig | None = None,
    batch: int = 1,
    query_tokens_per_step: int = 1,
    kv_dtype_bytes: int | None = None,
    weight_dtype: str | None = None,
    index_key_dtype: str = "fp8",
    dense_prefill_attention: str = "mha",
) -> Breakdown:
    """FLOPs and bytes for one token at ``position`` (= number of earlier tokens in its context).

    Args:
        phase: 'prefill' or 'decode'. Only MLA models differ by phase (dense prefill may use MHA mode).
        mode: 'dense' (every earlier token; no indexer) or 'sparse' (indexer + top-k + attention over k).
        sparse: the indexer; defaults to ``cfg.sparse``. Needed for mode 'sparse'.
        batch: sequences per step sharing one read of the weights.
        query_tokens_per_step: tokens of ONE sequence per step sharing one read of its cache rows and
            indexer keys: decode 1 (2 with DeepSeek's multi-token prediction), prefill the chunk size.
        kv_dtype_bytes: cache element size (default: the model dtype); 1 = fp8 (MLA: 656-byte rows).
        weight_dtype: dtype name of the matmul weights (default: fp8 when config.json says so, else
            the model dtype); 8-bit weights also run at the 8-bit FLOP rate.
        index_key_dtype: 'fp8' | 'int8' | 'bfloat16' | 'float16' | 'float32'.
        dense_prefill_attention: MLA only, 'mha' (DeepSeek's choice for dense prefill) or 'mqa'.
    """
    if phase not in PHASES:
        raise ParcaError(f"phase must be one of {PHASES}, got {phase!r}")
    if mode not in MODES:
        raise ParcaError(f"mode must be one of {MODES}, got {mode!r}")
    if dense_prefill_attention not in ("mha", "mqa"):
        raise ParcaError(f"dense_prefill_attention must be 'mha' or 'mqa', got {dense_prefill_attention!r}")
    if int(position) < 0 or int(batch) < 1 or int(query_tokens_per_step) < 1:
        raise ParcaError(f"need position >= 0, batch >= 1, query_tokens_per_step >= 1; got {position}, {batch}, "
                         f"{query_tokens_per_step}")
    sc = sparse if sparse is not None else cfg.sparse
    if mode == "sparse" and sc is None:
        raise ParcaError(f"mode 'sparse' needs a SparseConfig for {cfg.name or cfg.architecture}: pass sparse=... "
                         f"(or load indexers with --indexer)")
    L, n, q = cfg.num_hidden_layers, int(position) + 1, int(query_tokens_per_step)
    tokens_per_step = int(batch) * q
    wdt = _weight_dtype(cfg, weight_dtype)
    wb = dtype_bytes(wdt)
    row = kv_bytes_per_token_per_layer(cfg, kv_dtype_bytes)
    b = Breakdown(phase=phase, mode=mode)
    fp8: list[str] = ["linear"] if wb == 1 else []

    # linear: every layer's projections and MLP, the LM head; weights shared by the step's tokens
    act = read = cfg.vocab_size * cfg.hidden_size
    for layer in range(L):
        a_mlp, r_mlp = _mlp_params(cfg, layer, tokens_per_step)
        per_layer = _attention_params(cfg) + (_indexer_params(cfg, sc) if mode == "sparse" else 0)
        act += per_layer + a_mlp
        read += per_layer + r_mlp
    b.linear_flops = 2.0 * act
    b.linear_bytes = read * wb / tokens_per_step

    if mode == "dense":
        attn_mode = dense_prefill_attention if (phase == "prefill" and is_mla(cfg)) else "mqa"
        b.attention_flops = L * _pair_flops(cfg, attn_mode) * n
        b.attention_bytes = L * (n * row / q + row)
        if attn_mode == "mha" and is_mla(cfg):
            # MHA mode needs per-head K/V of the cached prefix: its latents are up-projected (kv_b) once
            # per step, written to a workspace (bf16) and read back by the attention kernel.
            H = cfg.num_attention_heads
            r_kv, dn, dr, dv = (int(_x(cfg, k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                           "v_head_dim"))
            b.attention_flops += L * 2 * r_kv * H * (dn + dv) * position / q
            b.attention_bytes += L * 2 * H * (dn + dr + dv) * 2 * position / q
    else:
        k_sel = min(sc.index_topk, n)
        key = indexer_bytes_per_token_per_layer(sc, index_key_dtype)
        b.indexer_flops = L * 2 * sc.index_n_heads * sc.index_head_dim * n
        b.indexer_bytes = L * (n * key / q + key)
        b.topk_flops = L * n
        b.topk_bytes = L * 8 * n
        b.attention_flops = L * _pair_flops(cfg, "mqa") * k_sel
        b.attention_bytes = L * row  # own row written; the selected rows are booked under gather
        b.gather_bytes = L * k_sel * row
        if index_key_dtype in ("fp8", "int8"):
            fp8.append("indexer")
    b.fp8_components = tuple(fp8)
    return b


# ---- devices ----------------------------------------------------------------------------------
@dataclass
class Device:
    """A device's peak rates and the fractions of them real kernels achieve.

    ``kernel_efficiency`` overrides ``flops_efficiency`` for one kernel, keyed ``component``,
    ``phase.component``, ``mode.component`` or ``phase.mode.component`` (most specific wins).
    """

    name: str
    peak_flops: float  # bf16 dense tensor-core FLOP/s (CPU: measured fp32 matmul)
    peak_flops_fp8: float | None  # fp8 dense FLOP/s, None when the device has no 8-bit rate
    mem_bw: float  # bytes/s
    flops_efficiency: float
    bw_efficiency: float
    description: str = ""
    kernel_efficiency: dict[str, float] = field(default_factory=dict)

    def efficiency(self, component: str, phase: str = "", mode: str = "") -> float:
        for key in (f"{phase}.{mode}.{component}", f"{phase}.{component}", f"{mode}.{component}", component):
            if key in self.kernel_efficiency:
                return self.kernel_efficiency[key]
        return self.flops_efficiency

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        fp8 = f", {self.peak_flops_fp8 / 1e12:,.0f} fp8" if self.peak_flops_fp8 else ", no fp8 rate"
        s = (f"{self.name}: peak {self.peak_flops / 1e12:,.3g} TFLOP/s bf16{fp8}, {self.mem_bw / 1e12:.3g} TB/s; "
             f"achieved efficiency: compute {self.flops_efficiency:.2f}, memory {self.bw_efficiency:.2f}")
        if self.kernel_efficiency:
            s += "; per kernel: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.kernel_efficiency.items()))
        return s


# Published kernel figures on H800 (FlashMLA, DeepGEMM; dsa.md / cost.md) give the Hopper efficiencies:
# sparse prefill 640 TFLOPS -> 0.65 of 989 (the default); dense decode 660 compute-bound -> 0.667 and
# 3000 of 3350 GB/s memory-bound -> 0.9; sparse decode 410 TFLOPS -> 0.415; fp8 indexer logits about
# 1 PFLOPS (third party) -> 0.505 of 1979. H100 and H200 run the same kernels, so share the factors.
_HOPPER_KERNELS = {
    "decode.dense.attention": 660 / 989,
    "decode.sparse.attention": 410 / 989,
    "indexer": 1000 / 1979,
}
DEVICES: dict[str, Device] = {
    "h800": Device("H800", 989e12, 1979e12, 3.35e12, 0.65, 0.9,
                   "NVIDIA H800 SXM (H100 compute, reduced NVLink); efficiencies from FlashMLA/DeepGEMM on H800",
                   dict(_HOPPER_KERNELS)),
    "h100": Device("H100", 989e12, 1979e12, 3.35e12, 0.65, 0.9,
                   "NVIDIA H100 SXM; same kernels and factors as H800", dict(_HOPPER_KERNELS)),
    "h200": Device("H200", 989e12, 1979e12, 4.8e12, 0.65, 0.9,
                   "NVIDIA H200 SXM (H100 compute, 141 GB HBM3e); same factors as H800", dict(_HOPPER_KERNELS)),
    "a100": Device("A100", 312e12, None, 2.039e12, 0.65, 0.85,
                   "NVIDIA A100 SXM 80GB; no fp8: 8-bit work runs at the bf16 rate; factors assumed "
                   "(FlashAttention-2 reaches ~70% of peak)"),
}

_CALIBRATED: dict[int, Device] = {}


def _best_rate(fn: Any, work: float, budget: float) -> float:
    """Highest work/second of ``fn`` over repetitions filling ``budget`` seconds (after one warm-up)."""
    fn()
    best, end = 0.0, time.perf_counter() + budget
    reps = 0
    while reps < 2 or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = max(best, work / max(dt, 1e-9))
        reps += 1
    return best


def calibrate_this_machine(seconds: float = 2.0, threads: int | None = None) -> Device:
    """Measure this machine: fp32 matmul throughput (1024^3) and read bandwidth (sum of 128 MiB).

    The numbers are achieved rates already, so both efficiencies are 1.0. The result is cached per
    thread count for the life of the process (the first call's duration wins).
    """
    import torch

    n = int(threads) if threads else torch.get_num_threads()
    if n in _CALIBRATED:
        return _CALIBRATED[n]
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        budget = max(float(seconds), 0.05) / 2
        a, c = torch.randn(1024, 1024), torch.randn(1024, 1024)
        flops = _best_rate(lambda: torch.mm(a, c), 2 * 1024**3, budget)
        del a, c
        x = torch.ones(32 * 1024 * 1024)  # 128 MiB: larger than any CPU cache
        bw = _best_rate(lambda: x.sum(), x.numel() * 4, budget)
        del x
    finally:
        torch.set_num_threads(old)
    dev = Device("cpu", flops, None, bw, 1.0, 1.0,
                 f"this machine: {cpu_model()}, {n} threads, measured {flops / 1e9:.1f} GFLOP/s fp32 matmul and "
                 f"{bw / 1e9:.1f} GB/s read bandwidth (achieved rates, so efficiencies are 1.0)")
    _CALIBRATED[n] = dev
    return dev


def get_device(name: str) -> Device:
    """A preset by name (case-insensitive), or 'cpu' / 'this-machine' for a calibrated measurement."""
    key = str(name).strip().lower().replace("_", "-")
    if key in ("cpu", "this-machine", "this machine"):
        return calibrate_this_machine()
    if key in DEVICES:
        return DEVICES[key]
    raise ParcaError(f"unknown device {name!r}; expected one of {', '.join(sorted(DEVICES))}, cpu (this machine)")


def _kernel_seconds(b: Breakdown, dev: Device) -> dict[str, float]:
    groups = {"linear": ("linear",), "attention": ("attention", "gather"), "indexer": ("indexer",),
              "topk": ("topk",)}
    out = {}
    for g, comps in groups.items():
        flops = sum(getattr(b, f"{c}_flops") for c in comps)
        nbytes = sum(getattr(b, f"{c}_bytes") for c in comps)
        peak = dev.peak_flops_fp8 if (g in b.fp8_components and dev.peak_flops_fp8) else dev.peak_flops
        t_compute = flops / (peak * dev.efficiency(g, b.phase, b.mode))
        t_memory = nbytes / (dev.mem_bw * dev.bw_efficiency)
        out[g] = max(t_compute, t_memory)
    return out


def time_breakdown(b: Breakdown, dev: Device) -> dict[str, float]:
    """Seconds per kernel (linear, attention incl. gather, indexer, topk), each a roofline max."""
    return _kernel_seconds(b, dev)


def seconds_per_token(b: Breakdown, dev: Device) -> float:
    """Device-seconds for the token: the sum over kernels of max(compute time, memory time)."""
    return sum(_kernel_seconds(b, dev).values())


def cost_per_million(seconds_per_token: float, price_per_hour: float, n_devices: int = 1) -> float:
    """$ per million tokens: ``n_devices x price_per_hour / 3600 x seconds_per_token x 1e6``."""
    if seconds_per_token < 0 or price_per_hour < 0 or n_devices < 1:
        raise ParcaError(f"need seconds_per_token >= 0, price_per_hour >= 0, n_devices >= 1; got "
                         f"{seconds_per_token}, {price_per_hour}, {n_devices}")
    return n_devices * price_per_hour / 3600.0 * seconds_per_token * 1e6


# ---- model presets ----------------------------------------------------------------------------
_DEEPSEEK_EXTRA: dict[str, Any] = {  # HF config.json of DeepSeek-V3.1-Terminus / V3.2-Exp
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

# DeepSeek's deployment (cost.md; paper figure 3), printed with every report. Under these choices and the
# H800 factors the model gives, at 128K: prefill sparse/dense 0.235 (paper 0.281), decode 0.099 (paper
# 0.115); dense prefill 0.63 $/M (paper 0.665), dense decode 1.91 (2.15). Why it lands there:
# * prefill is compute-bound: dense = 73 GFLOPs of fp8 projections + 61 x 81,920 x 128K = 655 GFLOPs of
#   MHA attention; sparse = the projections + 35 GFLOPs of MQA attention over 2048 rows + 131 GFLOPs of
#   fp8 indexer + 64 MB of top-k logits traffic;
# * decode attention in MQA mode is compute-bound too (278,528 FLOPs per 656-byte row, x2 with MTP):
#   dense = 2.2 TFLOPs per token at 128K; sparse is dominated by reading the indexer keys (1.06 GB per
#   step, halved per token by MTP) and the 410-TFLOPS sparse decode kernel.
# Counting dense prefill in MQA mode gives a prefill ratio of 0.075 instead; the 1K points sit below the
# paper's because communication and scheduling (not modelled) add a roughly constant cost per token.
DEEPSEEK_ASSUMPTIONS: dict[str, Any] = {
    "batch": 4608,
    "query_tokens_per_step": 2,
    "prefill_batch": 32,
    "prefill_chunk": 8192,
    "kv_dtype_bytes": 1,
    "weight_dtype": "float8_e4m3fn",
    "index_key_dtype": "fp8",
    "dense_prefill_attention": "mha",
    "notes": [
        "dense prefill in MLA's MHA mode (81,920 FLOPs per query-key pair), re-projecting cached prefix "
        "latents to per-head K/V once per chunk; sparse prefill and all decode in MQA/absorbed mode (278,528)",
        "decode with multi-token prediction: 2 query tokens per sequence per step (DeepGEMM next_n <= 2), "
        "drafts assumed accepted; one read of the latent cache and of the indexer keys serves both",
        "decode batch 4608 sequences share one read of the weights per step (EP144 over 18 H800 nodes x 32 "
        "sequences per GPU); any batch above ~2,000 leaves decode projections compute-bound",
        "prefill: 8192-token chunks, 32 per step (one per GPU of an EP32 unit)",
        "fp8 weights (1 byte, fp8 tensor-core rate), fp8 latent cache (656 B/token/layer), fp8 indexer keys "
        "(132 B); attention in bf16",
        "dense column = the same model with dense attention and no indexer (for deepseek-v3.2: V3.1-Terminus)",
    ],
}

_GQA_ASSUMPTIONS: dict[str, Any] = {
    "batch": 32,
    "query_tokens_per_step": 1,
    "prefill_batch": 1,
    "prefill_chunk": 2048,
    "kv_dtype_bytes": None,
    "weight_dtype": None,
    "index_key_dtype": "fp8",
    "dense_prefill_attention": "mha",
    "notes": [
        "decode batch 32 sequences share one read of the weights per step; 1 query token per step (no MTP)",
        "prefill: 2048-token chunks, one sequence per step",
        "weights and KV cache in the model dtype; indexer keys 8-bit (fp8 on GPU, int8 on CPU) with one fp32 "
        "scale per 128 values",
        "dense column = the same model without indexers",
    ],
}


def _deepseek(name: str, sparse: bool) -> ModelConfig:
    arch, family = ("DeepseekV32ForCausalLM", "deepseek_v32") if sparse else ("DeepseekV3ForCausalLM", "deepseek_v3")
    return ModelConfig(
        architecture=arch, family=family, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        head_dim=192,  # q.k width (nope 128 + rope 64); cost.py reads MLA sizes from `extra`
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        torch_dtype="bfloat16", bos_token_id=0, eos_token_id=[1],
        sparse=SparseConfig(index_n_heads=64, index_head_dim=128, index_topk=2048, index_rope_dim=64) if sparse
        else None,
        extra=json.loads(json.dumps(_DEEPSEEK_EXTRA)), name=name,
    )


def _gqa(name: str, arch: str, family: str, vocab: int, h: int, inter: int, layers: int, heads: int, kv: int,
         theta: float, tie: bool = False) -> ModelConfig:
    return ModelConfig(architecture=arch, family=family, vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=h // heads, max_position_embeddings=131072, rope_theta=theta,
                       tie_word_embeddings=tie, attention_bias=family == "qwen2", torch_dtype="bfloat16", name=name)


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3.2": {"build": lambda: _deepseek("deepseek-v3.2", True), "assumptions": DEEPSEEK_ASSUMPTIONS,
                      "about": "DeepSeek-V3.2-Exp: V3.1-Terminus + DSA (64 x 128 indexer, top-k 2048)"},
    "deepseek-v3.1-terminus": {"build": lambda: _deepseek("deepseek-v3.1-terminus", False),
                               "assumptions": DEEPSEEK_ASSUMPTIONS,
                               "about": "DeepSeek-V3.1-Terminus: dense MLA + MoE "
                                        "(sparse column: V3.2's indexer added)"},
    "llama-3.1-8b": {"build": lambda: _gqa("llama-3.1-8b", "LlamaForCausalLM", "llama", 128256, 4096, 14336, 32, 32,
                                           8, 500000.0), "assumptions": _GQA_ASSUMPTIONS,
                     "about": "Llama-3.1-8B with parca's default retrofit indexer"},
    "qwen2.5-7b": {"build": lambda: _gqa("qwen2.5-7b", "Qwen2ForCausalLM", "qwen2", 152064, 3584, 18944, 28, 28, 4,
                                         1000000.0), "assumptions": _GQA_ASSUMPTIONS,
                   "about": "Qwen2.5-7B with parca's default retrofit indexer"},
    "mistral-7b": {"build": lambda: _gqa("mistral-7b", "MistralForCausalLM", "mistral", 32768, 4096, 14336, 32, 32,
                                         8, 1000000.0), "assumptions": _GQA_ASSUMPTIONS,
                   "about": "Mistral-7B-v0.3 with parca's default retrofit indexer"},
}
_PRESET_ALIASES = {"deepseek-v3.2-exp": "deepseek-v3.2", "deepseek-v3.1": "deepseek-v3.1-terminus"}


def preset(name: str) -> tuple[ModelConfig, SparseConfig | None, dict[str, Any]]:
    """(config, indexer or None, deployment assumptions) of a named model; fresh objects on every call."""
    key = str(name).strip().lower()
    key = _PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ParcaError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[key]["build"]()
    return cfg, (SparseConfig.from_dict(cfg.sparse.to_dict()) if cfg.sparse else None), \
        json.loads(json.dumps(PRESETS[key]["assumptions"]))


def default_assumptions(cfg: ModelConfig) -> dict[str, Any]:
    """DeepSeek's deployment for MLA models, a small single-node setup for the GQA family."""
    return json.loads(json.dumps(DEEPSEEK_ASSUMPTIONS if is_mla(cfg) else _GQA_ASSUMPTIONS))


# ---- the paper's points -----------------------------------------------------------------------
# DeepSeek-V3.2-Exp paper, figure 3: $ per million tokens by token position, H800 at 2 USD per GPU-hour,
# read off the figure (+-0.01 prefill, +-0.03 decode); dsa.md section 4. "dense" is V3.1-Terminus.
PAPER_FIGURE3: dict[str, Any] = {
    "source": "DeepSeek-V3.2-Exp paper, figure 3 (read off the plot)",
    "device": "H800", "price_per_hour": 2.0,
    "rows": [
        dict(zip(("position", "prefill_dense", "prefill_sparse", "decode_dense", "decode_sparse"), v))
        for v in ((1024, 0.060, 0.069, 0.085, 0.121), (8192, 0.093, 0.104, 0.202, 0.157),
                  (32768, 0.208, 0.119, 0.589, 0.175), (65536, 0.360, 0.140, 1.119, 0.198),
                  (131072, 0.665, 0.187, 2.153, 0.247))
    ],
}
for _r in PAPER_FIGURE3["rows"]:
    _r["prefill_ratio"] = round(_r["prefill_sparse"] / _r["prefill_dense"], 4)
    _r["decode_ratio"] = round(_r["decode_sparse"] / _r["decode_dense"], 4)


def paper_point(position: int) -> dict[str, Any] | None:
    return next((dict(r) for r in PAPER_FIGURE3["rows"] if r["position"] == position), None)


# ---- rows and report --------------------------------------------------------------------------
def parse_positions(text: str) -> list[int]:
    """'1k,8k,32k,128k' -> [1024, 8192, 32768, 131072] (k = 1024, m = 1024^2; plain integers too)."""
    out = []
    for tok in str(text).split(","):
        t = tok.strip().lower()
        mult = 1024 if t.endswith("k") else 1024 * 1024 if t.endswith("m") else 1
        digits = t[:-1] if mult > 1 else t
        if not digits.isdigit():
            raise ParcaError(f"positions: cannot read {tok.strip()!r} in {text!r}; expected integers or "
                             f"1024-multiples like '8k', separated by commas")
        out.append(int(digits) * mult)
    return out


def _resolve(cfg: ModelConfig, sparse: SparseConfig | None, assumptions: dict | None) -> tuple[SparseConfig, dict]:
    """Defaults for the model family, updated by the caller's assumptions; a changed value is noted."""
    base = default_assumptions(cfg)
    a = dict(base)
    if assumptions:
        for k, v in assumptions.items():
            if k == "notes":
                continue
            if k in base and base[k] != v and k != "sparse":
                a.setdefault("overrides", {})[k] = v
            a[k] = v
        if assumptions.get("notes") is not None:
            a["notes"] = list(assumptions["notes"])
    for k, v in (a.get("overrides") or {}).items():
        line = f"caller override: {k} = {v!r} (family default {base.get(k)!r})"
        if line not in a["notes"]:
            a["notes"] = list(a["notes"]) + [line]
    sc = sparse or cfg.sparse
    if sc is None:
        if is_mla(cfg):
            sc = SparseConfig(index_n_heads=64, index_head_dim=128, index_topk=2048, index_rope_dim=64)
            a["sparse_source"] = "no indexer given: DeepSeek-V3.2's (64 x 128, top-k 2048) added as a what-if"
        else:
            sc = SparseConfig()
            a["sparse_source"] = "no indexer given: parca's default retrofit indexer as a what-if"
    a["sparse"] = sc.to_dict()
    if is_mla(cfg):
        a["attention_modes"] = {"prefill_dense": a.get("dense_prefill_attention", "mha"), "prefill_sparse": "mqa",
                                "decode_dense": "mqa", "decode_sparse": "mqa"}
    return sc, a


def _phase_kwargs(a: dict[str, Any], phase: str) -> dict[str, Any]:
    common = {"kv_dtype_bytes": a.get("kv_dtype_bytes"), "weight_dtype": a.get("weight_dtype"),
              "index_key_dtype": a.get("index_key_dtype", "fp8"),
              "dense_prefill_attention": a.get("dense_prefill_attention", "mha")}
    if phase == "prefill":
        return {**common, "batch": int(a.get("prefill_batch", 1)),
                "query_tokens_per_step": int(a.get("prefill_chunk", 1))}
    return {**common, "batch": int(a.get("batch", 1)), "query_tokens_per_step": int(a.get("query_tokens_per_step", 1))}


def cost_rows(cfg: ModelConfig, sparse: SparseConfig | None, positions: list[int], device: Device,
              price_per_hour: float, *, assumptions: dict | None = None) -> list[dict[str, Any]]:
    """One row per distinct position, ascending: $ per M tokens for prefill/decode x dense/sparse, the
    sparse/dense ratios, and the seconds per token behind them (``*_s``)."""
    sc, a = _resolve(cfg, sparse, assumptions)
    return _rows(cfg, sc, a, positions, device, price_per_hour)


def _rows(cfg: ModelConfig, sc: SparseConfig, a: dict[str, Any], positions: list[int], device: Device,
          price_per_hour: float) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(set(int(x) for x in positions)):
        row: dict[str, Any] = {"position": p}
        for phase in PHASES:
            kw = _phase_kwargs(a, phase)
            for mode in MODES:
                s = seconds_per_token(per_token(cfg, p, phase=phase, mode=mode, sparse=sc, **kw), device)
                row[f"{phase}_{mode}"] = cost_per_million(s, price_per_hour)
                row[f"{phase}_{mode}_s"] = s
            row[f"{phase}_ratio"] = row[f"{phase}_sparse"] / row[f"{phase}_dense"]
        rows.append(row)
    return rows


def _model_summary(cfg: ModelConfig, sc: SparseConfig) -> dict[str, Any]:
    return {"name": cfg.name or cfg.architecture, "family": cfg.family, "layers": cfg.num_hidden_layers,
            "attention": "MLA" if is_mla(cfg) else f"GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads",
            "activated_parameters": activated_parameters(cfg),
            "activated_parameters_sparse": activated_parameters(cfg, sc),
            "sparse": sc.to_dict()}


def cost_report(cfg: ModelConfig, sparse: SparseConfig | None, positions: list[int], device: Device,
                price_per_hour: float, *, assumptions: dict | None = None, as_json: bool = False,
                paper: bool = False) -> str:
    """The human table (assumptions first, then $ per M tokens and sparse/dense ratios per position, with
    the paper's figure-3 points beside the model for DeepSeek models or ``paper=True``), or one JSON object."""
    sc, a = _resolve(cfg, sparse, assumptions)
    rows = _rows(cfg, sc, a, positions, device, price_per_hour)
    show_paper = paper or cfg.family in ("deepseek_v32", "deepseek_v3")
    model = _model_summary(cfg, sc)
    if as_json:
        doc: dict[str, Any] = {"rows": rows, "device": device.to_dict(), "price_per_hour": price_per_hour,
                               "assumptions": a, "model": model}
        if show_paper:
            doc["paper"] = PAPER_FIGURE3
        return json.dumps(doc)
    kv = kv_bytes_per_token_per_layer(cfg, a.get("kv_dtype_bytes"))
    lines = [
        f"parca analytic cost model: {model['name']} ({model['attention']}, {cfg.num_hidden_layers} layers, "
        f"{model['activated_parameters'] / 1e9:.2f}B activated params/token) "
        f"on {device.name} at {price_per_hour:g} USD per device-hour",
        "assumptions:",
        f"  device    {device.summary()}",
        f"            {device.description}",
        f"  decode    batch {a['batch']}, {a['query_tokens_per_step']} query token(s)/sequence/step; "
        f"prefill: {a['prefill_batch']} x {a['prefill_chunk']}-token chunks per step",
        f"  dtypes    weights {_weight_dtype(cfg, a.get('weight_dtype'))}, cache {kv} B/token/layer, "
        f"indexer keys {a.get('index_key_dtype', 'fp8')} "
        f"({indexer_bytes_per_token_per_layer(sc, a.get('index_key_dtype', 'fp8'))} B/token/layer)",
        f"  sparse    {sc.index_n_heads} x {sc.index_head_dim} indexer, top-k {sc.index_topk}"
        + (f" ({a['sparse_source']})" if "sparse_source" in a else ""),
    ]
    lines += [f"  - {n}" for n in a.get("notes", [])]
    lines += ["  - roofline per kernel: max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)), kernels "
              "in sequence; sparse attention reads its selected rows itself; top-k writes and reads fp32 logits",
              "  - not counted: norms, RoPE, softmax, activation traffic, communication, scheduling, MTP draft module",
              "", "$ per million tokens (sparse/dense ratio)" + ("; paper = DeepSeek figure 3" if show_paper else "")]
    hdr = (f"{'position':>9} | {'prefill dense':>13} {'sparse':>8} {'ratio':>6} | "
           f"{'decode dense':>12} {'sparse':>8} {'ratio':>6}")
    if show_paper:
        hdr += f" || {'paper prefill d/s':>17} {'ratio':>6} | {'paper decode d/s':>16} {'ratio':>6}"
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        line = (f"{r['position']:>9,} | {r['prefill_dense']:>13.4f} {r['prefill_sparse']:>8.4f} "
                f"{r['prefill_ratio']:>6.3f}"
                f" | {r['decode_dense']:>12.4f} {r['decode_sparse']:>8.4f} {r['decode_ratio']:>6.3f}")
        if show_paper:
            pp = paper_point(r["position"])
            if pp:
                line += (f" || {pp['prefill_dense']:>8.3f} {pp['prefill_sparse']:>8.3f} {pp['prefill_ratio']:>6.3f}"
                         f" | {pp['decode_dense']:>7.3f} {pp['decode_sparse']:>8.3f} {pp['decode_ratio']:>6.3f}")
            else:
                line += " ||" + " " * 27 + "|"
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "Breakdown", "Device", "DEVICES", "PRESETS", "PAPER_FIGURE3", "DEEPSEEK_ASSUMPTIONS", "per_token",
    "activated_parameters", "kv_bytes_per_token_per_layer", "indexer_bytes_per_token_per_layer",
    "calibrate_this_machine", "get_device", "seconds_per_token", "time_breakdown", "cost_per_million", "preset",
    "default_assumptions", "paper_point", "parse_positions", "cost_rows", "cost_report", "is_mla",
]
