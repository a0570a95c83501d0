"""Loading and saving weights: Hugging Face safetensors directories (single file or sharded), indexer adapters.

Safetensors only: parca never unpickles a file (no torch.load, no .bin checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .config import ModelConfig, SparseConfig, dtype_bytes, load_config
from .errors import CheckpointError, ConfigError, MemoryBudgetError

INDEXER_FILE = "indexer.safetensors"
ADAPTER_CONFIG = "indexer_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = (name or default).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported for weights; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---- reading safetensors ------------------------------------------------------------------------
def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    if single.is_file():
        return [single]
    pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = (f" (found {', '.join(pickles)}: parca never unpickles weight files; convert them to safetensors)"
            if pickles else "")
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def _check_header(path: Path) -> None:
    """Fail early, with the file named, on truncated or non-safetensors files."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes)")
            n = struct.unpack("<Q", head)[0]
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} exceeds file size {size})")
            meta = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: corrupt safetensors file (truncated: data ends at {8 + n + end}, file has {size} bytes)")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None


def read_safetensors(paths: Iterable[Path]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for p in paths:
        _check_header(p)
        try:
            out.update(load_file(str(p)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: cannot read safetensors file ({e})") from None
    return out


def _umask_mode() -> int:
    """0o666 under the process umask: what a plain open() would create (mkstemp makes 0o600 files)."""
    try:  # read it without os.umask(), which would briefly change it for every thread
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def write_safetensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write via a temp file in the same folder + rename: a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


# ---- memory check ---------------------------------------------------------------------------------
def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass
class MemoryEstimate:
    weights: int
    cache: int
    available: int

    @property
    def total(self) -> int:
        return self.weights + self.cache

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def estimate_memory(cfg: ModelConfig, context: int, dtype: str | None = None, batch: int = 1) -> MemoryEstimate:
    elt = dtype_bytes(dtype or cfg.torch_dtype)
    weights = cfg.parameter_count() * elt
    cache = cfg.num_hidden_layers * cfg.kv_bytes_per_token_per_layer * elt // dtype_bytes(cfg.torch_dtype) \
        * context * batch
    if cfg.sparse is not None:
        cache += cfg.num_hidden_layers * cfg.sparse.index_head_dim * 4 * context * batch
    return MemoryEstimate(weights, cache, available_memory_bytes())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_fits(cfg: ModelConfig, context: int, dtype: str | None = None, batch: int = 1) -> MemoryEstimate:
    est = estimate_memory(cfg, context, dtype, batch)
    if not est.fits:
        raise MemoryBudgetError(
            f"{cfg.name or 'model'} needs {fmt_bytes(est.total)} at {context} tokens "
            f"(weights {fmt_bytes(est.weights)} + cache {fmt_bytes(est.cache)}) but only "
            f"{fmt_bytes(est.available)} is available; use a shorter context, --dtype bfloat16, or a bigger machine"
        )
    return est


# ---- models ---------------------------------------------------------------------------------------
def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: str | None = None,
               indexer: str | Path | None = None, context: int | None = None):
    """Build the model of ``model_dir`` and load its weights (and optionally an indexer adapter).

    Returns the model in eval mode. Every user mistake is a ParcaError naming the file or tensor.
    """
    from .models import model_class

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    tdtype = torch_dtype(dtype or cfg.torch_dtype)
    check_fits(cfg, context or min(cfg.max_position_embeddings, 4096), str(tdtype).replace("torch.", ""))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    files = _weight_files(model_dir)
    state = read_safetensors(files)
    # A checkpoint that stores DeepSeek-named indexers but no index_* fields in config.json.
    if cfg.sparse is None and any(".self_attn.indexer." in k for k in state):
        raise CheckpointError(f"{model_dir}: weights hold indexer tensors but config.json has no index_* fields")
    cls = model_class(cfg)
    if hasattr(cls, "prepare_state"):  # family-specific conversion (e.g. DeepSeek fp8 block scales -> dequantised)
        state = cls.prepare_state(state, cfg)
    with torch.device("meta"):
        model = cls(cfg, dtype=tdtype)
    _load_state(model, state, str(model_dir), tdtype)
    model.to(device)
    model.rotary.to(device)
    model.eval()
    model.requires_grad_(False)
    model.source = str(model_dir)
    if indexer is not None:
        attach_adapter(model, indexer)
    return model


def _load_state(model: torch.nn.Module, state: dict[str, Tensor], where: str, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{where}: tensor(s) missing from the checkpoint: {shown}")
    new_state = {}
    for name, ref in expected.items():
        if tied and name == "lm_head.weight" and name not in state:
            continue
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} from config.json"
            )
        # The indexer's weights_proj and the MoE gate's score-correction bias stay float32 (DeepSeek and HF keep
        # them so: rounding the bias to bf16 can change which experts are picked); the rest takes the model dtype.
        keep32 = ref.dtype == torch.float32 and name.endswith(("weights_proj.weight", "e_score_correction_bias"))
        new_state[name] = t.to(torch.float32 if keep32 else dtype)
    model.load_state_dict(new_state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers made on the meta device (rotary tables) are rebuilt on the CPU
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            from .models.layers import rope_inv_freq

            inv, _ = rope_inv_freq(mod.dim, model.config.rope_theta, model.config.rope_scaling,
                                   model.config.max_position_embeddings)
            mod.inv_freq = inv


def save_model(model, out_dir: str | Path, *, max_shard_bytes: int | None = None, dtype: str | None = None) -> Path:
    """Save config.json + safetensors (sharded with an index when ``max_shard_bytes`` is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    state = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if dtype:
        td = torch_dtype(dtype)
        state = {k: (v if k.endswith("weights_proj.weight") else v.to(td)) for k, v in state.items()}
    hf = cfg.to_hf_dict()
    if model.sparse_config is not None:
        hf.update(model.sparse_config.to_dict())
    if dtype:
        hf["torch_dtype"] = dtype
    write_json_atomic(hf, out / "config.json")
    if max_shard_bytes is None:
        write_safetensors_atomic(state, out / "model.safetensors", {"format": "pt"})
        return out
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_atomic(shard, out / name, {"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, out / "model.safetensors.index.json")
    return out


# ---- indexer adapters ---------------------------------------------------------------------------
def base_identity(model) -> dict[str, Any]:
    """What an adapter records about the model it was made for; compared on load."""
    cfg: ModelConfig = model.config
    emb = model.model.embed_tokens.weight
    rows = emb[: min(64, emb.shape[0])].detach().to(torch.bfloat16).float().cpu().numpy().tobytes()
    return {
        "architecture": cfg.architecture,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "name": Path(cfg.name).name if cfg.name else "",
        "fingerprint": hashlib.sha256(rows).hexdigest()[:16],
    }


def save_adapter(model, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``indexer.safetensors`` + ``indexer_config.json`` (index_* fields + base model identity)."""
    if not model.has_indexers:
        raise ConfigError("this model carries no indexers to save")
    out = Path(out_dir)
    sd = model.indexer_state_dict()
    write_safetensors_atomic(sd, out / INDEXER_FILE, {"format": "pt"})
    meta = {"format": "parca-indexer-adapter", "version": 1, **model.sparse_config.to_dict(),
            "base_model": base_identity(model)}
    if extra:
        meta.update(extra)
    write_json_atomic(meta, out / ADAPTER_CONFIG)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    d = Path(adapter_dir)
    path = d / ADAPTER_CONFIG
    if not d.is_dir():
        raise ConfigError(f"indexer adapter {str(d)!r} does not exist or is not a directory")
    if not path.is_file():
        raise ConfigError(f"{path}: not found; an indexer adapter holds {ADAPTER_CONFIG} and {INDEXER_FILE}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return meta


def attach_adapter(model, adapter_dir: str | Path, *, index_topk: int | None = None) -> SparseConfig:
    """Load an indexer adapter into ``model``; refuse adapters made for another base model."""
    d = Path(adapter_dir)
    meta = read_adapter_config(d)
    base = meta.get("base_model", {})
    mine = base_identity(model)
    for key in ("architecture", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in base and base[key] != mine[key]:
            raise ConfigError(
                f"{d}: indexer adapter was made for a model with {key}={base[key]!r}, this model has {mine[key]!r}; "
                f"train or init an adapter for this model (parca indexer init / parca retrofit)"
            )
    if base.get("fingerprint") and base["fingerprint"] != mine["fingerprint"]:
        raise ConfigError(
            f"{d}: indexer adapter belongs to base model {base.get('name') or '?'} (weights fingerprint "
            f"{base['fingerprint']}), not to this model ({mine['fingerprint']}); use an adapter made for these weights"
        )
    sc = SparseConfig.from_dict(meta)
    state = read_safetensors([d / INDEXER_FILE]) if (d / INDEXER_FILE).is_file() else None
    if state is None:
        raise CheckpointError(f"{d / INDEXER_FILE}: not found")
    device = model.model.embed_tokens.weight.device
    model.add_indexers(sc, device=device)
    expected = model.indexer_state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{d / INDEXER_FILE}: tensor(s) missing: {', '.join(missing[:3])}")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{d / INDEXER_FILE}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=False)
    model.requires_grad_(False)
    if index_topk is not None:
        sc.index_topk = int(index_topk)
    return sc
