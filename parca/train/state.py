"""Training checkpoints: one safetensors file, replaced whole (temp file + rename), never unpickled.

``ADIR/checkpoint/state.safetensors`` holds the trained weights (``param.<name>``), the AdamW state
(``optim.<i>.<key>``), the RNG states (``rng.torch``, ``rng.cuda.<d>``) and, in its string metadata, a JSON
record: step, data cursor, run identity, optimizer param groups, Python RNG state, wall time, tokens seen,
the first evaluation. One file means a kill at any moment leaves either the previous checkpoint or the new
one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import ADAPTER_CONFIG, INDEXER_FILE, read_safetensors, write_safetensors_atomic
from ..errors import CheckpointError, ParcaError

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FILE", "RUN_FILE", "METRICS_FILE", "run_id", "save_checkpoint",
           "load_checkpoint", "check_output_dir"]

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
RUN_FILE = "training.json"
METRICS_FILE = "metrics.jsonl"
_META_KEY = "parca_retrofit"
_RUN_MARKERS = (INDEXER_FILE, ADAPTER_CONFIG, RUN_FILE, METRICS_FILE, CHECKPOINT_DIR, "model.safetensors")


def run_id(identity: dict[str, Any]) -> str:
    """A short stable hash of what defines a run (base model, data, shapes, seed, schedule)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR / CHECKPOINT_FILE


def check_output_dir(out: Path, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Refuse to clobber another run; on ``resume`` return the checkpoint's record (after checking it is this run).

    Raises ParcaError: ``resume`` without a checkpoint, a checkpoint of a different run, or (without ``resume``)
    a directory that already holds a run or an adapter.
    """
    out = Path(out)
    ckpt = checkpoint_path(out)
    if resume:
        if not ckpt.is_file():
            raise ParcaError(f"--resume: no checkpoint at {ckpt}; nothing to resume (start without --resume, and use "
                             "--save-every N to write checkpoints)")
        record = read_record(ckpt)
        theirs = record.get("identity", {})
        if theirs != identity:
            diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
            shown = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {identity.get(k)!r}" for k in diff[:4])
            raise ParcaError(f"--resume: {out} holds a different run ({shown}); resume with the same settings, or "
                             "choose another --out")
        return record
    if out.exists():
        if not out.is_dir():
            raise ParcaError(f"--out {out}: exists and is not a directory")
        found = [name for name in _RUN_MARKERS if (out / name).exists()]
        if found:
            what = "a run" if (out / RUN_FILE).exists() or (out / CHECKPOINT_DIR).exists() else "an adapter"
            fix = ("pass --resume to continue that run (same settings), or choose a new --out" if ckpt.is_file()
                   else "choose a new --out, or delete the directory first")
            raise ParcaError(f"--out {out}: already holds {what} ({', '.join(found)}); refusing to overwrite it: {fix}")
    return None


def read_record(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({e}); delete it to start over") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: not a parca retrofit checkpoint (no '{_META_KEY}' metadata)")
    return json.loads(meta[_META_KEY])


def _json_safe(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, (list, dict, str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Tensor):
        return v.item()
    return str(v)


def save_checkpoint(out: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer,
                    record: dict[str, Any]) -> Path:
    """Write ``ADIR/checkpoint/state.safetensors`` atomically (weights, optimizer, RNG states, ``record``)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {f"param.{k}": v for k, v in params.items()}
    for i, state in sd["state"].items():
        for key, val in state.items():
            t = val if isinstance(val, Tensor) else torch.tensor(val)
            tensors[f"optim.{i}.{key}"] = t
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = s
    groups = [{k: _json_safe(v) for k, v in g.items()} for g in sd["param_groups"]]
    full = {**record, "param_groups": groups, "python_rng": _json_safe(random.getstate())}
    path = checkpoint_path(out)
    write_safetensors_atomic(tensors, path, {_META_KEY: json.dumps(full), "format": "pt"})
    return path


def load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from ``ADIR/checkpoint``; returns the JSON record."""
    path = checkpoint_path(out)
    record = read_record(path)
    tensors = read_safetensors([path])
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    own = model.state_dict()
    missing = [k for k in params if k not in own]
    if missing:
        raise CheckpointError(f"{path}: tensor(s) {', '.join(missing[:3])} do not belong to this model")
    with torch.no_grad():
        for k, v in params.items():
            own[k].copy_(v)
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    groups = record["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"rng.cuda.{d}"] for d in range(torch.cuda.device_count()) if f"rng.cuda.{d}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    py = record.get("python_rng")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    return record
