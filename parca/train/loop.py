"""``retrofit``: DeepSeek's two-stage indexer training (reference/dsa.md section 3) on an existing dense model.

Stages (``stage``):

* ``warmup`` (default) — base model frozen, attention dense; the indexer learns
  ``KL(p[t, :] || softmax(I[t, :]))`` over all causal keys (AdamW, LR 1e-3 as DeepSeek).
* ``sparse`` — the model runs sparse (top-k of the indexer's own scores); the KL is restricted to the selected
  set ``S_t``; the indexer input is detached. With ``train_model`` the base model also trains, on the language
  modelling loss only (DeepSeek's second stage). With the base FROZEN this stage can only reorder keys that are
  already selected: the loss never sees a key outside ``S_t``, so nothing pulls a missed key in (the shared
  parameters move the selection only as a side effect). Measured on a tiny model with peaked attention, from a
  100-step warm-up adapter at recall@16 0.681: 100 frozen sparse steps -> 0.689, 100 more warm-up steps ->
  0.706. It helps a little, a third of what the same compute spent on warm-up gives: prefer the warm-up
  unless the base model trains too.
* ``both`` — ``warmup_steps`` warm-up steps, then sparse steps up to ``steps``.

Scale-out: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``; never otherwise) each rank takes
``batch_size / N`` sequences of the global batch and DistributedDataParallel averages the gradients (gloo on
CPU, nccl on CUDA); rank 0 evaluates and writes. The observer computes the indexer gradients inside the
forward, layer by layer (objective.py); a proxy ``sum(p * g)`` whose gradient is exactly ``g`` then hands them
to DDP's normal backward, so the reduction is DDP's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import (attach_adapter, base_identity, load_model, read_adapter_config, save_adapter, save_model,
                          write_json_atomic)
from ..config import ModelConfig, SparseConfig
from ..data import SYNTHETIC, batch_indices, load_packed
from ..errors import ConfigError, ContextError
from ..models.base import ForwardContext
from .init import (DEFAULT_INIT, INIT_METHODS, copy_tokenizer_files, default_sparse_config, derived_supported,
                   init_indexers)
from .objective import TrainObserver, evaluate_indexers
from .state import METRICS_FILE, RUN_FILE, check_output_dir, load_checkpoint, run_id, save_checkpoint

__all__ = ["RetrofitConfig", "retrofit", "STAGES"]

STAGES = ("warmup", "sparse", "both")
WARMUP_LR = 1e-3  # DeepSeek's dense warm-up LR
SPARSE_MODEL_LR = 7.3e-6  # DeepSeek's sparse-stage LR (all parameters)
MICRO_BATCH_TOKENS = 16384
SYNTHETIC_DOCS = 64


@dataclass
class RetrofitConfig:
    """Everything ``retrofit`` needs; the CLI flags map 1:1 (``--seq-len`` -> ``seq_len``)."""

    model: str
    data: list[str]
    out: str
    init: str | None = None  # random | derived | an adapter directory; None: DEFAULT_INIT where it applies, else random
    steps: int = 200
    seq_len: int | None = None  # default: min(4096, the model's context)
    batch_size: int = 8  # global: split across ranks
    micro_batch: int | None = None  # sequences per forward within a rank (memory only; the loss is the same);
    # default: as many as make MICRO_BATCH_TOKENS tokens, at least 1
    lr: float = WARMUP_LR
    model_lr: float = SPARSE_MODEL_LR
    index_topk: int | None = None  # default: min(2048, seq_len // 4)
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_rope_dim: int | None = None
    stage: str = "warmup"
    warmup_steps: int | None = None  # stage "both": default steps // 2
    train_model: bool = False
    seed: int = 0
    save_every: int = 100  # 0: only at the end
    resume: bool = False
    eval_every: int = 50  # 0: only before and after
    eval_seqs: int = 4
    device: str = "cpu"
    dtype: str | None = None
    chunk_mb: int = 64
    grad_clip: float = 1.0
    progress: bool = True


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _Trainee(nn.Module):
    """The module DDP wraps: one micro-batch forward with the objective observer, returning the loss to
    back-propagate (LM loss when the model trains, plus on the last micro-batch the indexer-gradient proxy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.observer: TrainObserver | None = None  # set per step (kept off the DDP input path)
        self.lm_loss = 0.0  # this step's LM loss so far (train_model), for the logs

    def forward(self, ids: Tensor, mode: str, topk: int, train_model: bool, lm_weight: float,
                finalize: bool, chunk_bytes: int) -> Tensor | None:
        obs = self.observer
        n = ids.shape[0]
        ctx = ForwardContext(slots=list(range(n)), starts=[0] * n, modes=[mode] * n, topks=[topk] * n,
                             observer=obs, max_chunk_bytes=chunk_bytes)
        loss = None
        with torch.set_grad_enabled(train_model):
            if train_model:
                logits = self.model(ids, None, ctx)  # (n, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) * lm_weight
                self.lm_loss += float(loss.detach())
            else:
                self.model(ids, None, ctx, last_only=True, return_hidden=True)
        if finalize:
            # d/dp sum(p * g) = g exactly: DDP's backward hooks then average the observer's gradients
            proxy = sum((p * g).sum() for p, g in obs.grads.items())
            loss = proxy if loss is None else loss + proxy
        return loss


# ---- setup helpers --------------------------------------------------------------------------------
def _resolve_sparse(cfg: RetrofitConfig, mc: ModelConfig, seq_len: int) -> tuple[SparseConfig, str, Path | None]:
    """(SparseConfig, init label, adapter dir or None) from the flags; shape conflicts are errors."""
    topk = cfg.index_topk if cfg.index_topk is not None else min(2048, max(1, seq_len // 4))
    if topk >= seq_len:
        raise ConfigError(f"--index-topk {topk} must be smaller than --seq-len {seq_len}: with k >= the context every "
                          "key is selected, so there is nothing to learn or measure")
    init = cfg.init
    if init is None:
        fits = all(v in (None, mc.head_dim) for v in (cfg.index_head_dim, cfg.index_rope_dim))
        init = DEFAULT_INIT if (DEFAULT_INIT == "random" or (derived_supported(mc) and fits)) else "random"
    if init in INIT_METHODS:
        sc = default_sparse_config(mc, init, n_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim,
                                   rope_dim=cfg.index_rope_dim, topk=topk)
        return sc, init, None
    adapter = Path(init)
    if not adapter.is_dir():
        raise ConfigError(f"--init {init!r}: not {' / '.join(INIT_METHODS)} and not an adapter directory")
    sc = SparseConfig.from_dict(read_adapter_config(adapter))
    if cfg.index_topk is None and sc.index_topk < seq_len:
        topk = sc.index_topk  # keep the adapter's k unless it cannot select anything at this --seq-len
    for flag, mine, theirs in (("--index-n-heads", cfg.index_n_heads, sc.index_n_heads),
                               ("--index-head-dim", cfg.index_head_dim, sc.index_head_dim),
                               ("--index-rope-dim", cfg.index_rope_dim, sc.index_rope_dim)):
        if mine is not None and mine != theirs:
            raise ConfigError(f"{flag} {mine} conflicts with the --init adapter {adapter} ({theirs}); drop the flag")
    sc.index_topk = topk
    return sc, f"adapter:{adapter.resolve()}", adapter


def _data_label(paths: list[str]) -> list[str]:
    return [p if p == SYNTHETIC else str(Path(p).resolve()) for p in paths]


def _line_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as after any checkpoint (dropped)."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


class _Metrics:
    """Appends one JSON object per line to ADIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            # lines written after the checkpoint we resume from describe steps that will be redone: drop them
            keep = [ln for ln in path.read_text().splitlines() if _line_step(ln) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def write(self, obj: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(obj) + "\n")


def _stage_at(cfg: RetrofitConfig, warmup_steps: int, step: int) -> str:
    if cfg.stage == "both":
        return "warmup" if step < warmup_steps else "sparse"
    return cfg.stage


# ---- the run --------------------------------------------------------------------------------------
def retrofit(cfg: RetrofitConfig) -> dict[str, Any]:
    """Train indexers onto ``cfg.model`` and write the adapter (or, with ``train_model``, a full checkpoint) to
    ``cfg.out`` with ``training.json``, ``metrics.jsonl`` and ``checkpoint/``. Returns the run summary (the
    final JSON line of ``parca retrofit``) on every rank; only rank 0 writes files."""
    t_start = time.perf_counter()
    if cfg.stage not in STAGES:
        raise ConfigError(f"--stage {cfg.stage!r}: expected one of {', '.join(STAGES)}")
    if cfg.train_model and cfg.stage == "warmup":
        raise ConfigError("--train-model trains the base model in the sparse stage: add --stage sparse or --stage both")
    for name in ("steps", "batch_size", "micro_batch", "eval_seqs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    dist_ = _dist_setup(cfg.device)
    try:
        return _run(cfg, dist_, t_start)
    finally:
        if dist_.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(cfg: RetrofitConfig, dd: _Dist, t_start: float) -> dict[str, Any]:
    from ..tokenizer import Tokenizer

    if cfg.batch_size % dd.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {dd.world} ranks; each rank takes "
                          "an equal share of the global batch")
    local_bs = cfg.batch_size // dd.world
    device = cfg.device
    if device.startswith("cuda") and dd.world > 1:
        device = f"cuda:{dd.local_rank}"
        torch.cuda.set_device(dd.local_rank)
    from ..config import load_config

    mcfg = load_config(cfg.model)
    seq_len = cfg.seq_len or min(4096, mcfg.max_position_embeddings)
    if seq_len > mcfg.max_position_embeddings:
        raise ContextError(f"--seq-len {seq_len} is beyond {cfg.model}'s context of {mcfg.max_position_embeddings} "
                           "tokens (max_position_embeddings); use a --seq-len at most that")
    micro = cfg.micro_batch or max(1, MICRO_BATCH_TOKENS // seq_len)
    micro = min(micro, local_bs)
    sc, init_label, adapter_dir = _resolve_sparse(cfg, mcfg, seq_len)
    warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 2) if cfg.stage == "both" else 0
    # data before weights: a bad file is reported without loading the model (synthetic size is fixed, not a
    # function of --steps, so a resumed run with more steps reads the same windows)
    data = load_packed(cfg.data, Tokenizer(cfg.model), seq_len, n_heldout=cfg.eval_seqs, seed=cfg.seed,
                       synthetic_docs=SYNTHETIC_DOCS)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype, context=seq_len)
    base_id = base_identity(model)
    identity = {
        "base_model": base_id, "data": _data_label(cfg.data), "seq_len": seq_len, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "stage": cfg.stage, "warmup_steps": warmup_steps, "init": init_label, "lr": cfg.lr,
        "model_lr": cfg.model_lr if cfg.train_model else None, "train_model": cfg.train_model,
        "sparse": sc.to_dict(), "grad_clip": cfg.grad_clip, "eval_seqs": cfg.eval_seqs,
    }
    rid = run_id(identity)
    out = Path(cfg.out)
    record = check_output_dir(out, identity, cfg.resume)  # every rank checks before anyone writes
    if dd.world > 1:
        import torch.distributed as dist

        dist.barrier()

    # ---- indexers, trainable parameters, optimizer
    if adapter_dir is not None:
        attach_adapter(model, adapter_dir, index_topk=sc.index_topk)
    else:
        init_indexers(model, sc, init_label, seed=cfg.seed, calibration=data.train[: min(2, data.train.shape[0])])
    sc = model.sparse_config
    ind_params = [p for n, p in model.named_parameters() if ".indexer." in n]
    base_params = [p for n, p in model.named_parameters() if ".indexer." not in n] if cfg.train_model else []
    for p in ind_params + base_params:
        p.requires_grad_(True)
    groups = [{"params": ind_params, "lr": cfg.lr}]
    if base_params:
        groups.append({"params": base_params, "lr": cfg.model_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    trainee: nn.Module = _Trainee(model)
    ddp = None
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [f"model.{n}" for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(trainee, frozen)  # no broadcast of the frozen base
        # stage "both" with --train-model: warm-up steps give the base no gradient
        ddp = DDP(trainee, broadcast_buffers=False, find_unused_parameters=cfg.train_model and cfg.stage == "both")
        trainee = ddp

    start_step, wall_before, before = 0, 0.0, None
    if record is not None:
        record = load_checkpoint(out, model, opt)
        start_step, wall_before, before = int(record["step"]), float(record["wall_s"]), record.get("before")
    metrics = _Metrics(out / METRICS_FILE, dd.main, start_step if cfg.resume else None)
    chunk_bytes = cfg.chunk_mb * 2**20
    heldout = data.heldout

    side_s = [0.0]  # time spent evaluating and writing inside the loop (excluded from the training rate)

    def evaluate(step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        ev = evaluate_indexers(model, heldout, sc.index_topk, micro_batch=micro, chunk_bytes=chunk_bytes)
        metrics.write({"step": step, "event": "eval", **ev})
        side_s[0] += time.perf_counter() - t0
        return ev

    if dd.main and before is None:
        before = evaluate(0)
    tokens_per_step = cfg.batch_size * seq_len
    bar = _progress(cfg, dd, start_step)
    last_eval = before
    t_loop = time.perf_counter()
    side_s[0] = 0.0  # the pre-training evaluation is not part of the loop
    step = start_step
    n_layers = model.config.num_hidden_layers

    def run_record(step: int, status: str, final: dict[str, Any] | None) -> dict[str, Any]:
        wall = wall_before + time.perf_counter() - t_loop
        return {
            "format": "parca-retrofit-record", "version": 1, "status": status, "run_id": rid,
            "model_dir": str(Path(cfg.model).resolve()), "base_model": base_id, "data": _data_label(cfg.data),
            "data_sources": data.sources, "data_tokens": data.tokens, "train_windows": int(data.train.shape[0]),
            "heldout_windows": int(heldout.shape[0]), "stage": cfg.stage, "warmup_steps": warmup_steps,
            "init": init_label, "train_model": cfg.train_model, "steps": step, "target_steps": cfg.steps,
            "seed": cfg.seed, "seq_len": seq_len, "batch_size": cfg.batch_size, "world_size": dd.world,
            "lr": cfg.lr, "model_lr": cfg.model_lr if cfg.train_model else None, "sparse": sc.to_dict(),
            "tokens_seen": step * tokens_per_step, "wall_s": wall,
            "metrics": {"before": before, "final": final if final is not None else last_eval},
            "identity": identity,
        }

    def write_outputs(step: int, status: str, final: dict[str, Any] | None) -> None:
        if not dd.main:
            return
        t0 = time.perf_counter()
        rec = run_record(step, status, final)
        if cfg.train_model:
            save_model(model, out)
            copy_tokenizer_files(Path(cfg.model), out)
        else:
            save_adapter(model, out, extra={"init": init_label, "trained_steps": step, "retrofit_run": rid,
                                            "stage": cfg.stage})
        params = {n: t for n, t in model.state_dict().items() if n in set(trainable)}
        save_checkpoint(out, params, opt, {"step": step, "data_cursor": step * cfg.batch_size, "identity": identity,
                                           "wall_s": rec["wall_s"], "tokens_seen": rec["tokens_seen"],
                                           "before": before})
        write_json_atomic(rec, out / RUN_FILE)
        side_s[0] += time.perf_counter() - t0

    for step in range(start_step, cfg.steps):
        stage = _stage_at(cfg, warmup_steps, step)
        idx = batch_indices(data.train.shape[0], step, cfg.batch_size, cfg.seed)
        ids = data.train[idx[dd.rank * local_bs : (dd.rank + 1) * local_bs]].to(model.model.embed_tokens.weight.device)
        kl, lm = _train_step(trainee, ddp, ids, stage, sc.index_topk, cfg, micro, n_layers, chunk_bytes)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ind_params, cfg.grad_clip)
            if base_params:
                torch.nn.utils.clip_grad_norm_(base_params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dd.world > 1:
            import torch.distributed as dist

            # on the model's device: nccl reduces CUDA tensors only
            both = torch.tensor([kl, lm], dtype=torch.float64, device=model.model.embed_tokens.weight.device)
            dist.all_reduce(both)
            kl, lm = (both / dd.world).tolist()
        done = step + 1
        line = {"step": done, "event": "train", "stage": stage, "kl": kl,
                "kl_over": "selected" if stage == "sparse" else "all",
                "tokens": done * tokens_per_step, "elapsed_s": wall_before + time.perf_counter() - t_loop}
        if cfg.train_model:
            line["lm_loss"] = lm
        metrics.write(line)
        if dd.main and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            last_eval = evaluate(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            write_outputs(done, "running", None)
        if bar is not None:
            bar.set_postfix(stage=stage, kl=f"{kl:.4f}",
                            recall=f"{last_eval['recall']:.3f}" if last_eval else "-", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    done = max(cfg.steps, start_step)
    final = evaluate(done) if dd.main else None
    write_outputs(done, "done", final)
    rec = run_record(done, "done", final)
    if dd.world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank returns once rank 0 has written the outputs
    session_s = time.perf_counter() - t_loop - side_s[0]
    session_steps = max(0, cfg.steps - start_step)
    session_tokens = session_steps * tokens_per_step
    return {
        "out": str(out), "kind": "checkpoint" if cfg.train_model else "adapter", "rank": dd.rank,
        "world_size": dd.world, "stage": cfg.stage, "init": init_label, "steps": done, "seq_len": seq_len,
        "batch_size": cfg.batch_size, "tokens_seen": rec["tokens_seen"], "wall_s": rec["wall_s"],
        "train_s_per_mtok": session_s / session_tokens * 1e6 if session_tokens else None,
        "total_s": time.perf_counter() - t_start, "sparse": sc.to_dict(), "before": before, "after": final,
        "run_id": rid, "model": str(cfg.model), "data_tokens": data.tokens, "train_windows": int(data.train.shape[0]),
    }


def _progress(cfg: RetrofitConfig, dd: _Dist, start: int):
    if not (cfg.progress and dd.main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="retrofit", unit="step", file=sys.stderr, dynamic_ncols=True)


def _train_step(trainee: nn.Module, ddp: Any, ids: Tensor, stage: str, topk: int, cfg: RetrofitConfig,
                micro: int, n_layers: int, chunk_bytes: int) -> tuple[float, float]:
    """One optimizer step's gradients for this rank's ``ids`` (n, T), in micro-batches. Returns (KL, LM loss)."""
    inner = trainee.module if ddp is not None else trainee
    obs = TrainObserver(n_layers, ids.shape[0], sparse=stage == "sparse", chunk_bytes=chunk_bytes)
    inner.observer = obs
    inner.lm_loss = 0.0
    mode = "sparse" if stage == "sparse" else "dense"
    train_model = cfg.train_model and stage == "sparse"
    starts = list(range(0, ids.shape[0], micro))
    for i, s in enumerate(starts):
        mb = ids[s : s + micro]
        last = i == len(starts) - 1
        # accumulate locally; only the last micro-batch's backward triggers DDP's all-reduce
        sync = contextlib.nullcontext() if (ddp is None or last) else ddp.no_sync()
        with sync:
            loss = trainee(mb, mode, topk, train_model, mb.shape[0] / ids.shape[0], last, chunk_bytes)
            if loss is not None:
                loss.backward()
    inner.observer = None
    return obs.kl_sum, inner.lm_loss
