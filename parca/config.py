"""Model and sparse-attention configuration, read from (and written to) Hugging Face ``config.json``.

Field names follow HF / DeepSeek checkpoints (``num_key_value_heads``, ``index_n_heads``, ...) so a
config round-trips without a translation table. Two HF dialects are read:

* Hub checkpoints (transformers 4): ``rope_theta`` + ``rope_scaling`` at the top level;
* transformers 5: ``rope_parameters`` = {"rope_type": ..., "rope_theta": ..., scaling fields}.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# HF architecture name -> parca family. The GQA family shares one decoder (models/llama.py).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "DeepseekV32ForCausalLM": "deepseek_v32",
}


def register_architecture(hf_name: str, family: str) -> None:
    """Add an architecture (used by model files that live outside the GQA family)."""
    SUPPORTED_ARCHITECTURES[hf_name] = family


@dataclass
class SparseConfig:
    """DeepSeek Sparse Attention settings (names as in DeepSeek-V3.2's config.json).

    ``index_rope_dim`` is the number of leading indexer dims that carry RoPE (rotate-half layout);
    DeepSeek uses 64 of 128.
    """

    index_n_heads: int = 4
    index_head_dim: int = 64
    index_topk: int = 2048
    index_rope_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"sparse config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.index_rope_dim <= self.index_head_dim or self.index_rope_dim % 2:
            raise ConfigError(
                f"sparse config: index_rope_dim must be even and <= index_head_dim ({self.index_head_dim}), "
                f"got {self.index_rope_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if k in d})


@dataclass
class ModelConfig:
    """Everything parca needs to build a decoder. GQA-family fields first, MLA/MoE fields optional."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama when attention_bias is set)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias covers it too; Qwen2 has none)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    sparse: SparseConfig | None = None  # set when the checkpoint itself carries indexers
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific fields (MLA / MoE), raw from config.json
    name: str = ""  # directory name or preset name, for messages and adapter matching

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Bytes the KV cache holds per token per layer at the model's dtype.

        MLA (DeepSeek, ``kv_lora_rank`` in ``extra``): one latent row shared by all heads, the normalised
        ``c_kv`` plus the RoPE key, ``(kv_lora_rank + qk_rope_head_dim) x dtype`` = 1152 B in bf16 for V3.2.
        """
        if self.extra.get("kv_lora_rank"):
            latent = int(self.extra["kv_lora_rank"]) + int(self.extra["qk_rope_head_dim"])
            return latent * dtype_bytes(self.torch_dtype)
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes(self.torch_dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_hidden_layers

    def parameter_count(self) -> int:
        """Parameter count computed from the config alone (no weights read)."""
        if self.extra.get("kv_lora_rank"):
            return self._mla_parameter_count()
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return emb + L * per_layer + h + head

    def _mla_parameter_count(self) -> int:
        """DeepSeek MLA + MoE (+ DSA indexers): every expert counted, MTP layers not (parca does not load them)."""
        x, h, H = self.extra, self.hidden_size, self.num_attention_heads
        rq, r = int(x.get("q_lora_rank") or 0), int(x["kv_lora_rank"])
        dn, dr, dv = int(x["qk_nope_head_dim"]), int(x["qk_rope_head_dim"]), int(x["v_head_dim"])
        b = self.attention_bias
        q = (h * rq + (rq if b else 0) + rq + rq * H * (dn + dr)) if rq else h * H * (dn + dr)
        attn = q + h * (r + dr) + ((r + dr) if b else 0) + r + r * H * (dn + dv) + H * dv * h + (h if b else 0)
        if self.sparse is not None:
            hi, di = self.sparse.index_n_heads, self.sparse.index_head_dim
            attn += (rq or h) * hi * di + h * di + 2 * di + h * hi  # wq_b, wk, k_norm (LayerNorm), weights_proj
        n_exp, im = int(x.get("n_routed_experts") or 0), int(x.get("moe_intermediate_size") or 0)
        moe = n_exp * 3 * h * im + int(x.get("n_shared_experts") or 0) * 3 * h * im + n_exp * h + n_exp
        dense = 3 * h * self.intermediate_size
        n_moe = sum(1 for layer in range(self.num_hidden_layers) if mla_layer_is_moe(self, layer))
        total = self.num_hidden_layers * (attn + 2 * h) + n_moe * moe + (self.num_hidden_layers - n_moe) * dense
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + total + h + head

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-4 style config.json (the dialect most checkpoints use)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
        }
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        if self.sparse is not None:
            d.update(self.sparse.to_dict())
        d.update(self.extra)
        return d


def mla_layer_is_moe(cfg: ModelConfig, layer: int) -> bool:
    """Whether DeepSeek layer ``layer`` has the MoE block (else a dense MLP): ``mlp_layer_types`` when the
    config lists it (transformers 5), else ``layer >= first_k_dense_replace`` and ``layer % moe_layer_freq == 0``."""
    x = cfg.extra
    types = x.get("mlp_layer_types")
    if types:
        return types[layer] == "sparse"
    if not int(x.get("n_routed_experts") or 0):
        return False
    return layer >= int(x.get("first_k_dense_replace") or 0) and layer % int(x.get("moe_layer_freq") or 1) == 0


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


def dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ConfigError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}") from None


def _rope_fields(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling) from either config dialect."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        # transformers 5 may nest per-layer-type parameters ({"full_attention": {...}}); take the full one.
        if "rope_type" not in params and "rope_theta" not in params:
            params = params.get("full_attention") or next(iter(params.values()))
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None
        if rope_type not in (None, "default"):
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            scaling["rope_type"] = rope_type
        return theta, scaling
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    else:
        scaling = None
    return theta, scaling


SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn", "linear")


def config_from_hf_dict(raw: dict[str, Any], name: str = "") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json, refusing what parca cannot run."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        shown = ", ".join(archs) if archs else f"model_type={raw.get('model_type')!r} (no 'architectures' field)"
        raise ConfigError(
            f"{name or 'config.json'}: unsupported architecture {shown}; "
            f"parca supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]

    def need(key: str) -> Any:
        if key not in raw or raw[key] is None:
            raise ConfigError(f"{name or 'config.json'}: required field {key!r} is missing")
        return raw[key]

    hidden = int(need("hidden_size"))
    n_heads = int(need("num_attention_heads"))
    theta, scaling = _rope_fields(raw)
    if scaling is not None and scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{name or 'config.json'}: rope scaling type {scaling['rope_type']!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    eos = raw.get("eos_token_id")
    eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        dtype = "float32"

    sliding = raw.get("sliding_window")
    if family == "qwen2" and not raw.get("use_sliding_window", False):
        sliding = None  # Qwen2 configs carry a window they do not use unless use_sliding_window is set
    if family in ("llama", "qwen3") and not raw.get("use_sliding_window", family == "llama"):
        sliding = None

    attention_bias = bool(raw.get("attention_bias", False))
    o_bias = attention_bias
    if family == "qwen2":
        attention_bias, o_bias = True, False

    head_dim = int(raw.get("head_dim") or hidden // n_heads)
    if family == "deepseek_v32":
        # MLA: the q.k width is nope + rope (192 for V3.2); HF writes head_dim = qk_rope_head_dim, which is not it
        head_dim = int(need("qk_nope_head_dim")) + int(need("qk_rope_head_dim"))

    sparse = None
    if "index_n_heads" in raw and "index_topk" in raw:
        sparse = SparseConfig(
            index_n_heads=int(raw["index_n_heads"]),
            index_head_dim=int(raw.get("index_head_dim", 128)),
            index_topk=int(raw["index_topk"]),
            index_rope_dim=int(raw.get("index_rope_dim", raw.get("qk_rope_head_dim", 64))),
        )
    known = {f.name for f in dataclasses.fields(ModelConfig)} | {
        "architectures", "model_type", "rope_parameters", "dtype", "use_sliding_window",
        "index_n_heads", "index_head_dim", "index_rope_dim",
    }
    extra = {k: v for k, v in raw.items() if k not in known}

    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size") or 0),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        hidden_act=str(raw.get("hidden_act", "silu")),
        torch_dtype=dtype,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_list,
        sparse=sparse,
        extra=extra,
        name=name,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``DIR/config.json``; every failure is a ConfigError naming the file."""
    d = Path(model_dir)
    if not d.exists():
        raise ConfigError(f"model directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise ConfigError(f"{str(d)!r} is not a directory; pass the folder that holds config.json")
    path = d / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a Hugging Face model directory needs config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return config_from_hf_dict(raw, name=str(d))
