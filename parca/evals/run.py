"""The long-context task runner: the SAME prompts through dense and sparse attention, scored RULER's way.

    from parca.evals import run_eval
    result = run_eval(model, tokenizer, tasks=["niah_single_1", "vt"], lengths=["4k", "8k"], samples=5,
                      attentions=("dense", "sparse"), out="runs/llama-k2048")
    print(result.table())                 # task x length x (dense, sparse, delta) with sample counts

Protocol (see /work/shared/reference/eval.md):

* a task length ``L`` is the whole budget: prompt tokens (special tokens included) + ``max_new_tokens`` <= L.
  The generators size the haystack with the tokenizer (no special tokens), so the runner asks them for
  ``L - s`` where ``s`` is the number of special tokens the tokenizer adds (e.g. 1 for a BOS);
* BOS: prompts are encoded with ``add_special_tokens=True`` so the model sees what it was trained with
  (a BOS where the tokenizer's post-processor or ``tokenizer_config.json`` asks for one);
* greedy decoding (temperature 0), at most the sample's ``max_new_tokens``, stopping at EOS;
* a sample is generated once and run through every requested attention mode, so dense and sparse see
  byte-identical prompts; per-sample scores are in [0, 1], a row's score is their mean x 100 (0-100).

Resume: with ``out``, every finished (sample, mode) is appended to ``out/samples.jsonl`` as it finishes; a
later call with the same ``out`` skips every (task, length, attention, index, depth) already there, so an
interrupted run picks up where it stopped. ``out/run.json`` pins what must not change between the runs
(model and indexer fingerprints, seed, top-k, user-data digest); a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from parca.evals import report
from parca.evals.haystack import EvalError
from parca.evals.scoring import score as score_one
from parca.evals.tasks import TASKS, get_task
from parca.evals.tasks.base import Sample, parse_length
from parca.evals.userdata import USER_TASK, UserRecord, fit_user_sample, load_user_data, records_digest

ATTENTIONS = ("dense", "sparse")
DEFAULT_LENGTHS = (4096, 8192, 16384)
DEFAULT_SAMPLES = 5
DEFAULT_DEPTH_GRID = (0.0, 25.0, 50.0, 75.0, 100.0)
SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SCORES_PNG = "scores.png"


# ---- argument parsing shared by the CLI and the library ---------------------------------------------
def _split(value: str | Sequence[Any]) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_lengths(value: str | int | Sequence[int | str]) -> list[int]:
    """``"4k,8k"`` / ``[4096, "8k"]`` -> sorted unique token counts."""
    items = [value] if isinstance(value, int) else _split(value)
    if not items:
        raise EvalError("no lengths given: expected e.g. 4k,8k,16k")
    return sorted({parse_length(v) for v in items})


def parse_depths(value: str | Sequence[float] | None) -> list[float] | None:
    """``"0,25,50"`` -> [0.0, 25.0, 50.0] (percent of the haystack); None -> None (a seeded depth per sample)."""
    if value is None:
        return None
    out = []
    for v in _split(value):
        try:
            d = float(v)
        except (TypeError, ValueError):
            raise EvalError(f"bad depth {v!r}: expected percentages in [0, 100] such as 0,25,50,75,100") from None
        if not 0.0 <= d <= 100.0 or math.isnan(d):
            raise EvalError(f"bad depth {v!r}: a needle depth is a percentage in [0, 100]")
        out.append(d)
    if not out:
        raise EvalError("no depths given: expected e.g. 0,25,50,75,100")
    return sorted(set(out))


def parse_attentions(value: str | Sequence[str]) -> list[str]:
    """``"dense,sparse"`` -> ["dense", "sparse"] (order kept, duplicates dropped)."""
    out: list[str] = []
    for a in _split(value):
        if a not in ATTENTIONS:
            raise EvalError(f"unknown attention mode {a!r}; expected dense, sparse or dense,sparse")
        if a not in out:
            out.append(a)
    if not out:
        raise EvalError("no attention mode given: expected dense, sparse or dense,sparse")
    return out


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """``None``/``"all"`` -> every registered task; a comma list or a sequence of names otherwise."""
    if tasks is None:
        return list(TASKS)
    items = _split(tasks)
    if items == ["all"]:
        return list(TASKS)
    out = []
    for name in items:
        if name == USER_TASK:
            raise EvalError("task 'user' is your own data: pass it with --data FILE.jsonl (data=...)")
        get_task(name)  # raises, listing the known tasks
        if name not in out:
            out.append(name)
    return out


# ---- tokens and model facts -------------------------------------------------------------------------
def special_prefix(tokenizer: Any) -> list[int]:
    """The ids ``encode(text, add_special_tokens=True)`` adds around any text (e.g. ``[bos_id]``)."""
    try:
        return list(tokenizer.encode("", add_special_tokens=True))
    except TypeError:  # a tokenizer without the keyword adds nothing
        return []


def bos_note(tokenizer: Any) -> str:
    """One line stating the BOS handling, for every report."""
    ids = special_prefix(tokenizer)
    if not ids:
        return "encoded with add_special_tokens=True; this tokenizer adds no special tokens (no BOS)"
    names = []
    for i in ids:
        try:
            names.append(tokenizer.decode([i], skip_special_tokens=False))
        except TypeError:
            names.append(str(i))
    return (f"encoded with add_special_tokens=True: {len(ids)} special token(s) {names} (ids {ids}) at the start, "
            f"as the model was trained; they count toward the length and are never scored")


def model_context(model: Any) -> int:
    return int(model.config.max_position_embeddings)


def check_lengths(lengths: Iterable[int], context: int, flag: str = "--lengths") -> None:
    """Refuse lengths beyond the model's context with a message that names the limit and the fix."""
    over = [n for n in lengths if n > context]
    if over:
        raise EvalError(
            f"{flag}: {', '.join(f'{n} ({report.fmt_length(n)})' for n in over)} exceed(s) the model's context of "
            f"{context} tokens (max_position_embeddings in config.json); use lengths of at most {context}"
        )


def default_lengths(context: int) -> list[int]:
    """4k, 8k, 16k where the model holds them; else the model's whole context."""
    return [n for n in DEFAULT_LENGTHS if n <= context] or [context]


def model_identity(model: Any) -> dict[str, Any]:
    """Fingerprints of the base weights and, when present, of the indexers (name, index_* shape, weights)."""
    import torch

    from parca.checkpoint import base_identity

    base = base_identity(model)
    out: dict[str, Any] = {"name": base.get("name", ""), "fingerprint": base["fingerprint"]}
    sc = getattr(model, "sparse_config", None)
    if sc is not None:
        h = hashlib.sha256()
        for k, v in sorted(model.indexer_state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().reshape(-1)[:256].to(torch.bfloat16).float().cpu().numpy().tobytes())
        ix = {**sc.to_dict(), "fingerprint": h.hexdigest()[:16]}
        ix.pop("index_topk", None)  # the k in use is pinned on its own (index_topk)
        out["indexer"] = ix
    return out


# ---- per-sample records on disk ---------------------------------------------------------------------
def record_key(task: str, length: int, attention: str, index: int, depth: float | None) -> tuple:
    return (str(task), int(length), str(attention), int(index), None if depth is None else round(float(depth), 4))


def _key_of(rec: dict) -> tuple:
    return record_key(rec["task"], rec["length"], rec["attention"], rec["index"], rec.get("depth"))


class SampleStore:
    """``samples.jsonl``: one JSON record per finished (sample, mode), appended and flushed as it finishes.

    A line cut short by an interruption is skipped on load (and a newline is written before the next record,
    so the file stays one record per line).
    """

    def __init__(self, out: Path | None) -> None:
        self.path = None if out is None else Path(out) / SAMPLES_FILE
        self.records: dict[tuple, dict] = {}
        self.bad_lines = 0
        self._needs_newline = False
        if self.path is not None and self.path.is_file():
            raw = self.path.read_bytes()
            self._needs_newline = bool(raw) and not raw.endswith(b"\n")
            for line in raw.decode("utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.records[_key_of(rec)] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.bad_lines += 1

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def append(self, rec: dict) -> None:
        self.records[_key_of(rec)] = rec
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            if self._needs_newline:
                f.write("\n")
                self._needs_newline = False
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()


def _check_run_file(out: Path, pinned: dict[str, Any]) -> None:
    """Write ``run.json`` on a fresh ``out``; on a resumed one refuse a change to what the records depend on.

    A fact the earlier run did not pin (e.g. the indexer, when it ran dense only) is added, not compared.
    """
    path = out / RUN_FILE
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: not valid JSON ({e}); delete it (and samples.jsonl) or use another --out") from None
        for k, v in pinned.items():
            if k in old and old[k] != v:
                raise EvalError(
                    f"{out} holds results of a different run: {k} was {json.dumps(old[k])}, now {json.dumps(v)}; "
                    f"use another --out, or delete {out / SAMPLES_FILE} and {path} to start over"
                )
        if all(k in old for k in pinned):
            return
    else:
        out.mkdir(parents=True, exist_ok=True)
        old = {"format": "parca-eval-run", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps({**old, **pinned}, indent=2), encoding="utf-8")


# ---- the result -------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What :func:`run_eval` returns.

    Attributes:
        rows: one dict per task x length x attention: ``task``, ``length``, ``attention``, ``score`` (0-100,
            RULER's scale: mean per-sample score x 100), ``samples``.
        records: the per-sample records behind the rows (prediction, answers, score in [0, 1], ...).
        summary: ``{attention: {length: mean score over tasks}}`` (RULER's score of a length).
        effective_length: ``{attention: longest length whose mean stays above 85.6 at it and every shorter
            length, or None}``.
        generated: (sample, mode) generations run by this call; ``resumed``: how many were already in ``out``.
        files: artefacts written (name -> path).
    """

    rows: list[dict]
    records: list[dict]
    attentions: list[str]
    lengths: list[int]
    tasks: list[str]
    summary: dict[str, dict[int, float]]
    effective_length: dict[str, int | None]
    config: dict[str, Any]
    generated: int = 0
    resumed: int = 0
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        return report.format_eval_table(self.rows, self.attentions, self.summary, self.effective_length)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "summary": {a: {str(k): v for k, v in per.items()} for a, per in self.summary.items()},
            "effective_length": self.effective_length,
            "config": self.config,
            "generated": self.generated,
            "resumed": self.resumed,
            "files": self.files,
        }

    def write(self, out: str | Path) -> dict[str, str]:
        """Write results.json, results.csv, scores.png and one needle heatmap per mode into ``out``."""
        self.files = write_artefacts(self, Path(out))
        return self.files


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(records: Sequence[dict], tasks: Sequence[str], lengths: Sequence[int],
              attentions: Sequence[str]) -> tuple[list[dict], dict, dict]:
    """Rows (task x length x attention), per-length mean over tasks, and effective length per mode."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["task"], r["length"], r["attention"]), []).append(float(r["score"]))
    rows = []
    for t in tasks:
        for n in lengths:
            for a in attentions:
                vals = groups.get((t, n, a))
                if vals:
                    rows.append({"task": t, "length": n, "attention": a, "score": 100.0 * _mean(vals),
                                 "samples": len(vals)})
    summary: dict[str, dict[int, float]] = {}
    effective: dict[str, int | None] = {}
    for a in attentions:
        per = {}
        for n in lengths:
            vals = [r["score"] for r in rows if r["attention"] == a and r["length"] == n]
            if vals:
                per[n] = _mean(vals)
        summary[a] = per
        eff = None
        for n in sorted(per):
            if per[n] > report.RULER_THRESHOLD:
                eff = n
            else:
                break
        effective[a] = eff
    return rows, summary, effective


def write_artefacts(result: EvalResult, out: Path) -> dict[str, str]:
    """results.json (rows + summary + config), results.csv, scores.png, heatmap_<mode>.png (needle tasks)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    files["results.json"] = str(out / RESULTS_JSON)
    files["results.csv"] = str(report.write_csv(result.rows, out / RESULTS_CSV))
    if result.rows:
        files["scores.png"] = str(report.plot_scores(
            result.rows, result.attentions, out / SCORES_PNG,
            title=f"score vs context length ({', '.join(result.attentions)})"))
    depth_tasks = [t for t in result.tasks if t in TASKS and TASKS[t].has_depth]
    grid = result.config.get("depths") or list(DEFAULT_DEPTH_GRID)
    for a in result.attentions:
        recs = [r for r in result.records if r["attention"] == a and r["task"] in depth_tasks
                and r.get("sample_depth", r.get("depth")) is not None]
        if not recs:
            continue
        values, counts = report.needle_grid(recs, a, result.lengths, grid)
        overall = sum(float(r["score"]) for r in recs) / len(recs)
        used = sorted({r["task"] for r in recs})
        title = (f"{a} attention: needle score by length x depth\n"
                 f"overall mean {overall:.3f} ({len(recs)} samples; {', '.join(used)})")
        files[f"heatmap_{a}.png"] = str(report.plot_heatmap(values, counts, result.lengths, grid,
                                                            out / f"heatmap_{a}.png", title))
    result.files = files
    (out / RESULTS_JSON).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return files


# ---- the runner -------------------------------------------------------------------------------------
@dataclass
class _Cell:
    task: str
    length: int
    index: int
    depth: float | None
    sample: Sample | None = None  # built lazily (user data: built while bucketing)


def run_eval(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    lengths: str | Sequence[int | str] | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    attentions: str | Sequence[str] = ATTENTIONS,
    index_topk: int | None = None,
    depths: str | Sequence[float] | None = None,
    data: str | Path | Sequence[UserRecord] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    prefill_chunk: int = 2048,
    write: bool = True,
) -> EvalResult:
    """Run tasks x lengths (x depths) x samples through each attention mode; score; aggregate; write artefacts.

    Args:
        model: a parca model (with indexers for ``sparse``).
        tokenizer: the model's :class:`parca.tokenizer.Tokenizer`.
        tasks: task names, a comma list, ``"all"``; ``None`` = all tasks, or none when ``data`` is given.
        lengths: token budgets (prompt + answer), e.g. ``"4k,8k"``; default 4k/8k/16k within the context
            (with ``data``, plus the whole context as the last bucket).
        samples: samples per (task, length, depth); default 5 (user data: every record).
        seed: selects the samples (same seed -> same prompts).
        attentions: modes to run each prompt through.
        index_topk: keys each sparse query selects (default: the indexer config's ``index_topk``).
        depths: needle depths in percent for tasks that have a needle (a sweep: ``samples`` per depth);
            ``None`` draws a seeded depth per sample. Tasks without a needle ignore it.
        data: a user JSONL path (or parsed records): task ``user``, metric ``match_part``.
        out: directory for samples.jsonl (resume), results.json/.csv and the plots.
        progress: tqdm bar on stderr.
        prefill_chunk: prompt tokens per prefill forward.
        write: write the artefacts into ``out`` (when given).

    Raises:
        EvalError (a ParcaError): bad names, lengths beyond the model's context, a length too small for a
        task, sparse without indexers, bad user data, an ``out`` holding a different run.
    """
    from parca.engine import Engine, SamplingParams

    attentions = parse_attentions(attentions)
    context = model_context(model)
    if lengths is None:
        lengths = default_lengths(context)
        if data is not None and lengths[-1] < context:
            lengths.append(context)  # long user records land in a whole-context bucket instead of being cut
    else:
        lengths = parse_lengths(lengths)
    check_lengths(lengths, context)
    depth_list = parse_depths(depths)
    if samples is not None and (isinstance(samples, bool) or int(samples) < 1):
        raise EvalError(f"samples must be a positive integer, got {samples!r}")
    sc = getattr(model, "sparse_config", None)
    if "sparse" in attentions and sc is None:
        raise EvalError("sparse attention needs indexers: pass --indexer ADIR (an adapter from `parca indexer init` "
                        "or `parca retrofit`), or run --attention dense")
    if index_topk is not None and int(index_topk) < 1:
        raise EvalError(f"index_topk must be a positive integer, got {index_topk!r}")
    k_eff = None if sc is None else int(index_topk or sc.index_topk)
    records_in: list[UserRecord] | None = None
    if data is not None:
        records_in = load_user_data(data) if isinstance(data, (str, Path)) else list(data)
    task_names = resolve_tasks(tasks) if (tasks is not None or records_in is None) else []
    n_special = len(special_prefix(tokenizer))

    # ---- the plan: every (task, length, index, depth) cell, shortest lengths first -----------------------
    cells: list[_Cell] = []
    n_samples = DEFAULT_SAMPLES if samples is None else int(samples)
    problems: list[str] = []
    for length in lengths:
        for name in task_names:
            spec = get_task(name)
            dlist: list[float | None] = list(depth_list) if (depth_list and spec.has_depth) else [None]
            try:  # size-check every (task, length) up front: fail before hours of generation, not after
                first = spec.generate(tokenizer, length - n_special, seed=seed, index=0, depth=dlist[0])
            except EvalError as e:  # the generator saw the budget without the special tokens: report in full
                msg = str(e).replace(f"length {length - n_special} ", f"length {length} ")
                msg = re.sub(r"at least (\d+)", lambda m: f"at least {int(m.group(1)) + n_special}", msg)
                problems.append(msg)
                continue
            for depth in dlist:
                for i in range(n_samples):
                    cells.append(_Cell(name, length, i, depth, first if (i == 0 and depth == dlist[0]) else None))
    if problems:
        raise EvalError("; ".join(problems) + (f" (lengths include the {n_special} special token(s) the tokenizer "
                                               "adds)" if n_special else ""))
    if records_in is not None:
        chosen = records_in if samples is None else records_in[: int(samples)]
        biggest = max(lengths)
        for rec in chosen:
            sample, total, _ = fit_user_sample(rec, tokenizer, biggest)
            bucket = next(n for n in lengths if total <= n)
            sample.length = bucket
            cells.append(_Cell(USER_TASK, bucket, rec.index, None, sample))
        task_names = task_names + [USER_TASK]
    if not cells:
        raise EvalError("nothing to run: give --tasks and/or --data")

    ident = model_identity(model)
    pinned: dict[str, Any] = {"model": {k: v for k, v in ident.items() if k != "indexer"}, "seed": int(seed),
                              "bos": special_prefix(tokenizer)}
    if "sparse" in attentions:  # dense records do not depend on the indexer or k
        pinned["indexer"] = ident.get("indexer")
        pinned["index_topk"] = k_eff
    if records_in is not None:
        pinned["data_digest"] = records_digest(records_in)
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise EvalError(f"--out {out_dir}: exists and is not a directory")
        _check_run_file(out_dir, pinned)
    store = SampleStore(out_dir)

    todo = [(c, [a for a in attentions if record_key(c.task, c.length, a, c.index, c.depth) not in store])
            for c in cells]
    todo = [(c, modes) for c, modes in todo if modes]
    total = len(cells) * len(attentions)
    pending = sum(len(m) for _, m in todo)
    resumed = total - pending

    generated = 0
    if todo:
        from tqdm.auto import tqdm

        # one slot per mode: a sample's dense and sparse runs decode side by side; no cost metering (not used here)
        engine = Engine(model, tokenizer, max_slots=len(attentions), prefill_chunk=prefill_chunk, metering=False)
        bar = tqdm(total=total, initial=resumed, desc="eval", unit="gen", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        try:
            for cell, modes in todo:
                bar.set_postfix_str(f"{cell.task} @ {report.fmt_length(cell.length)}", refresh=False)
                sample = cell.sample
                if sample is None:
                    sample = get_task(cell.task).generate(tokenizer, cell.length - n_special, seed=seed,
                                                          index=cell.index, depth=cell.depth)
                ids = tokenizer.encode(sample.prompt, add_special_tokens=True)
                params = [SamplingParams(max_new_tokens=sample.max_new_tokens, temperature=0.0, attention=a,
                                         index_topk=index_topk if a == "sparse" else None) for a in modes]
                results = engine.generate([ids] * len(modes), params)
                for a, res in zip(modes, results):
                    store.append({
                        "task": cell.task, "length": cell.length, "attention": a, "index": cell.index,
                        "depth": cell.depth, "sample_depth": sample.depth, "seed": int(seed),
                        "index_topk": k_eff if a == "sparse" else None,
                        "score": score_one(sample.metric, res.text, sample.answers), "metric": sample.metric,
                        "prediction": res.text, "answers": list(sample.answers),
                        "prompt_tokens": len(ids), "completion_tokens": res.completion_tokens,
                        "finish_reason": res.finish_reason, "seconds": round(res.e2e_s, 4),
                        **({"line": sample.meta.get("line"), "id": sample.meta.get("id"),
                            "truncated": sample.meta.get("truncated")} if cell.task == USER_TASK else {}),
                    })
                    generated += 1
                bar.update(len(modes))
        finally:
            bar.close()

    wanted = {record_key(c.task, c.length, a, c.index, c.depth) for c in cells for a in attentions}
    records = [r for k, r in store.records.items() if k in wanted]
    rows, summary, effective = aggregate(records, task_names, lengths, attentions)
    config = {
        "tasks": task_names, "lengths": lengths, "samples": samples if samples is not None else
        (DEFAULT_SAMPLES if task_names != [USER_TASK] else None),
        "seed": int(seed), "attentions": attentions, "index_topk": k_eff, "depths": depth_list,
        "data": None if data is None or not isinstance(data, (str, Path)) else str(data),
        "model_context": context, "bos": bos_note(tokenizer), "decoding": "greedy (temperature 0), stop at EOS",
        "length_means": "prompt tokens incl. special tokens + max_new_tokens <= length",
        "model": ident,
    }
    result = EvalResult(rows=rows, records=records, attentions=attentions, lengths=lengths, tasks=task_names,
                        summary=summary, effective_length=effective, config=config, generated=generated,
                        resumed=resumed, out=out_dir)
    if out_dir is not None and write:
        result.write(out_dir)
    return result


__all__ = [
    "ATTENTIONS",
    "DEFAULT_DEPTH_GRID",
    "DEFAULT_LENGTHS",
    "EvalResult",
    "SampleStore",
    "aggregate",
    "bos_note",
    "check_lengths",
    "default_lengths",
    "model_identity",
    "parse_attentions",
    "parse_depths",
    "parse_lengths",
    "record_key",
    "resolve_tasks",
    "run_eval",
    "special_prefix",
    "write_artefacts",
]
