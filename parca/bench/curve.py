"""The measured cost curve: $ per million tokens by token position, prefill and decode, dense and sparse in
the same run -- DeepSeek's figure 3 (cost.md section 1) for any parca model on this machine.

* marginal prefill cost at position p: the time to prefill a chunk of D tokens on top of a cached prefix of
  length p, divided by D;
* decode cost at position p: the time of one decode step of ``batch`` sequences with p tokens cached each,
  divided by the batch;
* x the price per second, scaled to one million tokens.

The cached prefix is random values written straight into the cache (keys, values, indexer keys) instead of
a real prefill of p tokens: the time of a step does not depend on the values, and a 32K prefix costs no
32K-token prefill per point. Each (position, phase) is timed after a warm-up, ``reps`` times per mode, dense
and sparse taking turns (so a shared machine's changing load falls on both sides of a ratio alike), and the
median of each mode is kept; every repetition's seconds are in the JSON (``*_reps_s``).

What "dense" means here: the same loaded model with ``attention='dense'``. A model that carries indexers
computes and caches indexer keys in both modes (a later sparse request may need them), so the dense side
pays that small projection too; sparse pays the indexer scoring, the top-k and the gather on top.
Below top-k visible tokens the sparse path keeps every key and runs the dense computation.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from .. import cost
from ..errors import ContextError, MemoryBudgetError, ParcaError
from . import report
from .common import machine_info, median_time

PHASES = ("prefill", "decode")
MODES = ("dense", "sparse")


def model_summary(model: Any, index_topk: int | None = None) -> dict[str, Any]:
    """Name, architecture, sizes, dtype and the indexer of a loaded model (for every bench JSON)."""
    cfg = model.config
    sc = getattr(model, "sparse_config", None)
    w = model.model.embed_tokens.weight
    return {
        "path": getattr(model, "source", "") or cfg.name,
        "architecture": cfg.architecture, "family": cfg.family,
        "parameters": cfg.parameter_count(), "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_context": cfg.max_position_embeddings, "dtype": str(w.dtype).replace("torch.", ""),
        "device": str(w.device),
        "sparse": None if sc is None else {**sc.to_dict(), "index_topk": int(index_topk or sc.index_topk)},
    }


def _describe_model(m: dict[str, Any]) -> str:
    name = Path(str(m["path"])).name or m["architecture"]
    s = (f"{name} ({m['architecture']}, {m['parameters'] / 1e6:,.1f}M params, "
         f"{m['layers']} layers, {m['attention_heads']}/{m['kv_heads']} heads x {m['head_dim']}, {m['dtype']})")
    if m.get("sparse"):
        sp = m["sparse"]
        s += f" + indexer {sp['index_n_heads']}x{sp['index_head_dim']}, top-k {sp['index_topk']}"
    return s


def fill_cache_randomly(cache: Any, upto: int, seed: int = 0) -> None:
    """Stand-in for a long prefill: random keys, values and indexer keys in rows [0, upto) of every slot."""
    import torch

    g = torch.Generator(device=cache.device).manual_seed(seed)
    for name in ("k", "v", "ik"):
        for t in getattr(cache, name, None) or []:
            if t is None:
                continue
            part = t[:, :upto]
            if part.is_floating_point():
                part.normal_(0.0, 1.0, generator=g)
            else:  # quantised stores: any valid code will do
                part.random_(-100, 100, generator=g)
    for s in range(cache.n_slots):
        cache.lengths[s] = upto


def _check_positions(model: Any, positions: list[int], chunk: int, batch: int) -> None:
    cfg = model.config
    if not positions:
        raise ParcaError("--positions: give at least one position, e.g. 1k,4k,16k")
    if min(positions) < 0:
        raise ParcaError(f"--positions: positions must be >= 0, got {min(positions)}")
    if chunk < 1 or batch < 1:
        raise ParcaError(f"--chunk and --batch must be >= 1, got {chunk} and {batch}")
    need = max(positions) + chunk
    if need > cfg.max_position_embeddings:
        raise ContextError(
            f"--positions: the longest position {max(positions):,} plus a {chunk}-token prefill chunk needs "
            f"{need:,} positions but {getattr(model, 'source', '') or 'the model'} has a context of "
            f"{cfg.max_position_embeddings:,} (max_position_embeddings); use positions up to "
            f"{cfg.max_position_embeddings - chunk:,} or a smaller --chunk")


def _check_memory(model: Any, max_len: int, batch: int) -> None:
    from ..checkpoint import available_memory_bytes, fmt_bytes

    need = model.cache_spec().bytes_per_token() * max_len * batch
    if model.model.embed_tokens.weight.device.type == "cpu":
        avail = available_memory_bytes()
        if need > 0.8 * avail:
            raise MemoryBudgetError(
                f"a cache of {batch} x {max_len:,} tokens needs {fmt_bytes(need)} but {fmt_bytes(avail)} is "
                f"available; use shorter --positions or a smaller --batch")


def _analytic(model: Any, sc: Any, positions: list[int], chunk: int, batch: int, price_per_hour: float
              ) -> dict[str, Any] | None:
    """The analytic roofline (cost.py) for THIS setup on this machine: batch-``batch`` decode without MTP,
    one ``chunk``-token prefill chunk per step, the model's own weight/cache dtypes, float32 indexer keys."""
    import torch

    cache_spec = model.cache_spec()
    w_dtype = str(model.model.embed_tokens.weight.dtype).replace("torch.", "")
    assumptions = {
        "batch": batch, "query_tokens_per_step": 1, "prefill_batch": 1, "prefill_chunk": chunk,
        "kv_dtype_bytes": torch.empty((), dtype=cache_spec.dtype).element_size(), "weight_dtype": w_dtype,
        "index_key_dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
            cache_spec.index_dtype, "int8"),
    }
    wdev = model.model.embed_tokens.weight.device
    if wdev.type == "cpu":
        device = cost.get_device("cpu")
    else:  # a GPU: the matching preset, if parca has one
        gpu = torch.cuda.get_device_name(wdev).lower()
        name = next((n for n in cost.DEVICES if n in gpu), None)
        if name is None:
            return None
        device = cost.get_device(name)
    rows = cost.cost_rows(model.config, sc, positions, device, price_per_hour, assumptions=assumptions)
    return {"device": device.to_dict(), "assumptions": assumptions, "rows": rows}


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores make timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _interleaved(fns: dict[str, Any], *, warmup: int, reps: int, sync: Any) -> dict[str, list[float]]:
    """Seconds of every repetition of each function, the functions taking turns (dense, sparse, sparse,
    dense, ...) so that load on a shared machine falls on both sides of a ratio alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            times[n].append(median_time(fns[n], warmup=0, reps=1, sync=sync))
    return times


def measure_curve(model: Any, positions: Sequence[int], *, chunk: int = 256, reps: int = 3, warmup: int = 1,
                  batch: int = 1, index_topk: int | None = None, price_per_hour: float = 1.0,
                  analytic: bool = True, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Measure the curve; returns the results document (what results.json holds).

    Args:
        model: a parca model carrying indexers (``model.sparse_config``).
        positions: token positions p (cached prefix lengths); measured in ascending order.
        chunk: D, the prefill chunk measured on top of the prefix.
        reps / warmup: timed repetitions (median kept) after ``warmup`` untimed calls, per point.
        batch: sequences per decode step (decode cost per token = step time / batch).
        index_topk: k (default: the indexer's).
        analytic: add the analytic model's curve for this machine (calibrates it: ~2 s once per process).
    """
    import torch

    from ..models.base import ForwardContext

    sc = getattr(model, "sparse_config", None)
    if sc is None:
        raise ParcaError("the cost curve compares dense and sparse attention, so the model needs indexers: pass "
                         "--indexer ADIR (from `parca indexer init` / `parca retrofit`) or --random-indexer "
                         "(cost does not depend on the indexer's weights)")
    k = int(index_topk or sc.index_topk)
    if k < 1:
        raise ParcaError(f"--index-topk must be >= 1, got {k}")
    if reps < 1 or warmup < 0:
        raise ParcaError(f"--reps must be >= 1 and warm-up >= 0, got {reps} and {warmup}")
    pos = sorted(set(int(p) for p in positions))
    _check_positions(model, pos, chunk, batch)
    max_len = max(pos) + chunk
    _check_memory(model, max_len, batch)

    dev = model.model.embed_tokens.weight.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    cache = model.make_cache(batch, max_len)
    fill_cache_randomly(cache, max_len, seed)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    chunk_ids = torch.randint(0, vocab, (1, chunk), generator=g).to(dev)  # (1,D)
    step_ids = torch.randint(0, vocab, (batch, 1), generator=g).to(dev)  # (B,1)

    def call(phase: str, mode: str, p: int):
        if phase == "prefill":
            ctx = ForwardContext(slots=[0], starts=[p], modes=[mode], topks=[k])
            ids = chunk_ids
        else:
            ctx = ForwardContext(slots=list(range(batch)), starts=[p] * batch, modes=[mode] * batch,
                                 topks=[k] * batch)
            ids = step_ids

        def run() -> None:
            with torch.inference_mode():
                model(ids, cache, ctx, last_only=True)
        return run

    from tqdm import tqdm

    t_start = time.perf_counter()
    load_start = _load_average()
    call("decode", "sparse", pos[0])()  # first-call costs (allocator, thread pool) out of every timing
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(pos) * 4, desc="bench curve", unit="pt", disable=not progress, leave=False)
    try:
        for p in pos:
            row: dict[str, Any] = {"position": p}
            for phase in PHASES:
                per = chunk if phase == "prefill" else batch
                bar.set_postfix_str(f"{report.fmt_pos(p)} {phase}")
                fns = {mode: call(phase, mode, p) for mode in MODES}
                times = _interleaved(fns, warmup=warmup, reps=reps, sync=sync)
                for mode in MODES:
                    step = statistics.median(times[mode])
                    row[f"{phase}_{mode}_step_s"] = step
                    row[f"{phase}_{mode}_s"] = step / per
                    row[f"{phase}_{mode}"] = cost.cost_per_million(step / per, price_per_hour)
                    row[f"{phase}_{mode}_reps_s"] = times[mode]
                    bar.update(1)
                row[f"{phase}_ratio"] = row[f"{phase}_sparse"] / row[f"{phase}_dense"]
            # whether the sparse path selected (context > k) or kept every key (the dense computation)
            row["sparse_selects"] = {"prefill": p + chunk > k, "decode": p + 1 > k}
            rows.append(row)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start

    be = {ph: report.break_even([r["position"] for r in rows], [r[f"{ph}_dense"] for r in rows],
                                [r[f"{ph}_sparse"] for r in rows]) for ph in PHASES}
    last = rows[-1]
    doc: dict[str, Any] = {
        "kind": "parca.bench.curve",
        "model": model_summary(model, k),
        "settings": {"positions": pos, "chunk": chunk, "decode_batch": batch, "reps": reps, "warmup": warmup,
                     "index_topk": k, "seed": seed, "statistic": "median",
                     "prefix": "random values written into the cache (cost does not depend on them)"},
        "price_per_hour": price_per_hour,
        "units": {"prefill_*/decode_*": "USD per million tokens", "*_s": "seconds per token",
                  "*_step_s": "seconds per measured call (prefill: one chunk; decode: one step of the batch)",
                  "*_ratio": "sparse / dense"},
        "rows": rows,
        "break_even": be,
        "longest": {"position": last["position"], "prefill_ratio": last["prefill_ratio"],
                    "decode_ratio": last["decode_ratio"],
                    "prefill_x_cheaper": 1 / last["prefill_ratio"], "decode_x_cheaper": 1 / last["decode_ratio"]},
        "elapsed_s": elapsed,
        "load_average": {"start": load_start, "end": _load_average()},
        "machine": machine_info(),
    }
    if analytic:
        a = _analytic(model, type(sc)(**{**sc.to_dict(), "index_topk": k}), pos, chunk, batch, price_per_hour)
        if a is not None:
            doc["analytic"] = a
    return doc


# ---- outputs ------------------------------------------------------------------------------------
def curve_table(doc: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in doc["rows"]:
        out.append([report.fmt_pos(r["position"]),
                    report.fmt_num(r["prefill_dense"]), report.fmt_num(r["prefill_sparse"]),
                    f"{r['prefill_ratio']:.3f}",
                    report.fmt_num(r["decode_dense"]), report.fmt_num(r["decode_sparse"]), f"{r['decode_ratio']:.3f}"])
    return out


_HEADERS = ["position", "prefill dense", "prefill sparse", "ratio", "decode dense", "decode sparse", "ratio"]


def _verdict_lines(doc: dict[str, Any]) -> list[str]:
    be, last = doc["break_even"], doc["longest"]
    lines = [f"break-even (sparse cheaper from here on): prefill {report.describe_break_even(be['prefill'])}, "
             f"decode {report.describe_break_even(be['decode'])}"]
    parts = []
    for ph in PHASES:
        r = last[f"{ph}_ratio"]
        parts.append(f"{ph} sparse/dense {r:.3f} ("
                     + (f"{1 / r:.2f}x cheaper" if r < 1 else f"sparse costs {r:.2f}x dense") + ")")
    lines.append(f"at {report.fmt_pos(last['position'])}: " + ", ".join(parts))
    return lines


def load_note(doc: dict[str, Any]) -> str:
    """'load average 5.5 -> 6.1 on 2 cores' (empty where unknown)."""
    la, cores = doc.get("load_average") or {}, doc["machine"].get("cores")
    if la.get("start") is None:
        return ""
    return f"load average {la['start']:g} -> {la['end']:g} on {cores} cores"


def _settings_line(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    load = load_note(doc)
    return (f"{m['cpu']}, {report.threads(m['threads'])}{', ' + m['gpu'] if m.get('gpu') else ''}"
            f"{' (' + load + ')' if load else ''}; torch {m['torch']}, "
            f"parca {m['parca']} @ {m['commit']}; price {doc['price_per_hour']:g} USD/h; prefill chunk {s['chunk']}, "
            f"decode batch {s['decode_batch']}; median of {s['reps']} after {s['warmup']} warm-up")


def curve_card(doc: dict[str, Any], paths: dict[str, str] | None = None) -> str:
    """The human card printed by `parca bench curve`."""
    w = [9, 13, 14, 6, 12, 13, 6]
    line = lambda cells: " ".join(str(c).rjust(n) for c, n in zip(cells, w))  # noqa: E731
    out = [f"parca bench curve: {_describe_model(doc['model'])}", f"machine: {_settings_line(doc)}",
           "$ per million tokens by token position (measured; ratio = sparse/dense)", line(_HEADERS),
           "-" * (sum(w) + len(w) - 1)]
    out += [line(r) for r in curve_table(doc)]
    out += _verdict_lines(doc)
    if doc.get("indexer_note"):
        out.append(f"note: {doc['indexer_note']}")
    if paths:
        out.append("wrote " + ", ".join(paths.values()))
    return "\n".join(out)


def curve_markdown(doc: dict[str, Any], png_name: str = "curve.png") -> str:
    s = doc["settings"]
    name = Path(str(doc["model"]["path"])).name or doc["model"]["architecture"]
    md = [f"# Cost per token position, measured: {name}",
          "", f"Model: {_describe_model(doc['model'])}.", "", f"Machine: {_settings_line(doc)}.", "",
          *([f"Note: {doc['indexer_note']}.", ""] if doc.get("indexer_note") else []),
          f"![cost curve]({png_name})", "", "$ per million tokens at "
          f"{doc['price_per_hour']:g} USD per machine-hour; ratio = sparse / dense (below 1: sparse is cheaper).", "",
          report.md_table(_HEADERS, curve_table(doc)), ""]
    md += [f"- {x}" for x in _verdict_lines(doc)]
    md += ["", "## How it was measured", "",
           f"- Prefill at position p: one chunk of {s['chunk']} tokens on top of a cached prefix of p tokens, "
           f"divided by {s['chunk']}. Decode at p: one step of {s['decode_batch']} sequence(s) with p tokens "
           f"cached, divided by {s['decode_batch']}.",
           "- The prefix is random keys, values and indexer keys written straight into the cache: a step's "
           "time does not depend on the values.",
           f"- Every point: {s['warmup']} warm-up call(s) per mode, then {s['reps']} timed calls per mode, dense "
           "and sparse taking turns; the median is kept (every repetition is in results.json).",
           "- Dense = the same model with attention='dense' (indexer keys are still computed and cached); sparse "
           f"= indexer scores + top-{s['index_topk']} + attention over the selected rows. Where the context is "
           f"at most {s['index_topk']} tokens the sparse path keeps every key (the dense computation).",
           f"- Break-even: {doc['break_even']['prefill']['rule']}."]
    if "analytic" in doc:
        d = doc["analytic"]["device"]
        md.append(f"- Dashed lines: parca's analytic roofline (`parca cost`) for this setup (decode batch "
                  f"{s['decode_batch']}, {s['chunk']}-token prefill chunks, the model's dtypes) on "
                  f"{d['description'] if d['name'] == 'cpu' else d['name'] + ': ' + d['description']}.")
    return "\n".join(md) + "\n"


def write_curve_report(doc: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """results.json, report.md and curve.png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParcaError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    paths = {"png": str(out / "curve.png"), "markdown": str(out / "report.md"), "json": str(out / "results.json")}
    name = Path(str(doc["model"]["path"])).name or doc["model"]["architecture"]
    report.plot_curve(doc["rows"], paths["png"], analytic=(doc.get("analytic") or {}).get("rows"),
                      break_even=doc["break_even"],
                      title=f"{name}: $ per M tokens at {doc['price_per_hour']:g} USD/h "
                            f"({doc['machine']['cpu']}, {report.threads(doc['machine']['threads'])})")
    Path(paths["markdown"]).write_text(curve_markdown(doc), encoding="utf-8")
    doc["artefacts"] = paths
    report.write_json(paths["json"], doc)
    return paths
