"""Readable output of the eval runner, fidelity and perplexity: text tables, CSV, PNG plots.

Plots use matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no global backend
switch, so importing or calling this from a notebook leaves the notebook's backend alone.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

ROW_FIELDS = ("task", "length", "attention", "score", "samples")
RULER_THRESHOLD = 85.6  # RULER's effective-length threshold (Llama-2-7B at 4K)


def fmt_length(n: int) -> str:
    """4096 -> '4k', 1000 -> '1000'."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _num(x: float | None, width: int, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return (f"{x:+.1f}" if signed else f"{x:.1f}").rjust(width)


# ---- task runner ------------------------------------------------------------------------------------
def format_eval_table(rows: Sequence[dict], attentions: Sequence[str], summary: dict | None = None,
                      effective: dict | None = None) -> str:
    """task x length x (one column per attention mode, and delta = sparse - dense when both ran).

    ``n`` is the number of samples behind each score ("4/3" when the modes differ, e.g. an interrupted run).
    """
    cells: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"]), {})[r["attention"]] = r
    both = "dense" in attentions and "sparse" in attentions
    tw = max([len("task")] + [len(t) for t, _ in cells] + [len("mean (all tasks)")])
    head = f"{'task':<{tw}}  {'length':>7}  {'n':>7}" + "".join(f"  {a:>7}" for a in attentions)
    if both:
        head += f"  {'delta':>7}"
    lines = [head, "-" * len(head)]
    for (task, length), per in cells.items():
        counts = [per[a]["samples"] if a in per else 0 for a in attentions]
        n = str(counts[0]) if len(set(counts)) == 1 else "/".join(str(c) for c in counts)
        line = f"{task:<{tw}}  {fmt_length(length):>7}  {n:>7}"
        scores = {a: per[a]["score"] if a in per else None for a in attentions}
        line += "".join(f"  {_num(scores[a], 7)}" for a in attentions)
        if both:
            d = None if scores["dense"] is None or scores["sparse"] is None else scores["sparse"] - scores["dense"]
            line += f"  {_num(d, 7, signed=True)}"
        lines.append(line)
    if summary:
        lengths = sorted({int(k) for per in summary.values() for k in per})
        if len({t for t, _ in cells}) > 1:
            lines.append("-" * len(head))
            for length in lengths:
                vals = {a: summary.get(a, {}).get(length) for a in attentions}
                line = f"{'mean (all tasks)':<{tw}}  {fmt_length(length):>7}  {'':>7}"
                line += "".join(f"  {_num(vals[a], 7)}" for a in attentions)
                if both:
                    d = None if vals["dense"] is None or vals["sparse"] is None else vals["sparse"] - vals["dense"]
                    line += f"  {_num(d, 7, signed=True)}"
                lines.append(line)
    if effective:
        parts = [f"{a} {fmt_length(v) if v else 'none'}" for a, v in effective.items()]
        lines.append(f"effective length (mean score > {RULER_THRESHOLD} at every length up to it): " + ", ".join(parts))
    return "\n".join(lines)


def write_csv(rows: Iterable[dict], path: str | Path) -> Path:
    """One CSV line per row, columns ``task,length,attention,score,samples``."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": "" if r.get("score") is None else f"{r['score']:.4f}"})
    return path


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=110, bbox_inches="tight")
    return path


def plot_scores(rows: Sequence[dict], attentions: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Score (0-100) vs context length: per mode the mean over tasks (thick), each task faint behind it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(111)
    colours = {"dense": "tab:blue", "sparse": "tab:orange"}
    styles = {"dense": ("-", "o"), "sparse": ("--", "s")}  # dashed on top: equal curves stay visible
    lengths = sorted({r["length"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    for a in attentions:
        c = colours.get(a, None)
        for t in tasks:
            pts = sorted((r["length"], r["score"]) for r in rows if r["attention"] == a and r["task"] == t
                         and r["score"] is not None)
            if len(tasks) > 1 and pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, alpha=0.2, lw=1)
        means = []
        for length in lengths:
            vals = [r["score"] for r in rows if r["attention"] == a and r["length"] == length and r["score"] is not None]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ls, mk = styles.get(a, ("-", "o"))
        ax.plot(lengths, means, ls=ls, marker=mk, lw=2.2, color=c, label=f"{a} (mean of {len(tasks)} task(s))")
    ax.axhline(RULER_THRESHOLD, color="grey", ls=":", lw=1, label=f"RULER threshold {RULER_THRESHOLD}")
    if lengths and lengths[-1] / max(1, lengths[0]) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([fmt_length(n) for n in lengths])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("context length (prompt + answer tokens)")
    ax.set_ylabel("score (0-100)")
    ax.set_title(title or "score vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def nearest_depth(depth: float, grid: Sequence[float]) -> float:
    return min(grid, key=lambda g: (abs(g - depth), g))


def needle_grid(records: Iterable[dict], attention: str, lengths: Sequence[int], depths: Sequence[float]):
    """Mean score (0..1) per (depth, length) cell over the needle records of one mode.

    A record's depth is its ``sample_depth`` (where the needle went; else ``depth``), binned to the nearest
    value of ``depths``.

    Returns:
        (values, counts): lists of lists [depth][length]; ``values`` holds NaN where no sample landed.
    """
    li = {n: i for i, n in enumerate(lengths)}
    sums = [[0.0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    di = {d: i for i, d in enumerate(depths)}
    for r in records:
        depth = r.get("sample_depth", r.get("depth"))
        if r["attention"] != attention or depth is None or r["length"] not in li:
            continue
        i = di[nearest_depth(float(depth), depths)]
        sums[i][li[r["length"]]] += float(r["score"])
        counts[i][li[r["length"]]] += 1
    values = [[s / c if c else float("nan") for s, c in zip(srow, crow)] for srow, crow in zip(sums, counts)]
    return values, counts


def plot_heatmap(values: Sequence[Sequence[float]], counts: Sequence[Sequence[int]], lengths: Sequence[int],
                 depths: Sequence[float], path: str | Path, title: str) -> Path:
    """Needle heatmap: context length (x) by depth % (y), red -> yellow -> green over 0..1, cell means written in."""
    import numpy as np
    from matplotlib.figure import Figure

    arr = np.array(values, dtype=float)  # (depths, lengths)
    fig = Figure(figsize=(1.3 + 0.9 * max(3, len(lengths)), 1.2 + 0.5 * max(3, len(depths))))
    ax = fig.add_subplot(111)
    masked = np.ma.masked_invalid(arr)
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")  # grey: no sample in the cell
    im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([fmt_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if counts[i][j]:
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="score (0..1)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


# ---- fidelity ---------------------------------------------------------------------------------------
def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_fidelity(result: dict) -> str:
    """A readable card of :func:`parca.evals.fidelity.fidelity`'s result."""
    out = [f"fidelity of sparse (top-k {result['index_topk']}) to dense attention, same model, same tokens",
           f"tokens: {result['bos']}",
           f"decode: prefill the first L-{result['decode_window']} tokens in each mode, then decode the last "
           f"{result['decode_window']} one at a time (teacher-forced) through the cache",
           "recall: share of the head-summed dense attention mass on the selected keys, per layer, over query "
           "positions that see more than k keys (fewer: trivially 1; 'n' = positions counted)"]
    for entry in result["lengths"]:
        L = entry["length"]
        out.append("")
        if not entry["documents"]:
            out.append(f"== length {fmt_length(L)}: skipped ({entry.get('skipped', 'no document long enough')})")
            continue
        out.append(f"== length {fmt_length(L)} ({entry['documents']} document(s))")
        for path in ("prefill", "decode"):
            part = entry[path]
            rec = part["recall"]
            per = "  ".join(f"L{r['layer']} {_f(r['recall'], '.3f')}" for r in rec["per_layer"])
            out.append(f"  {path:<7} recall mean {_f(rec['mean'], '.4f')} (n={rec['positions']} per layer)  {per}")
            o = part["output"]["overall"]
            out.append(f"  {path:<7} {'positions':>9} {'tokens':>7} {'KL(d||s)':>10} {'top-1':>7} {'dNLL':>9}")
            for b in part["output"]["buckets"] + [dict(o, bucket="all")]:
                if not b["tokens"]:
                    continue
                out.append(f"  {'':<7} {b['bucket']:>9} {b['tokens']:>7} {_f(b['kl'], '.3e'):>10} "
                           f"{_f(b['top1'], '.4f'):>7} {_f(b['delta_nll'], '+.4f'):>9}")
    if result.get("files"):
        out.append("")
        out.extend(f"wrote {p}" for p in result["files"])
    return "\n".join(out)


def plot_selection(dense_map: Any, n_pos: int, q_positions: Sequence[int], selected: Any, path: str | Path,
                   title: str) -> Path:
    """Two panels over (key position x, query position y): the dense head-summed attention (binned, log
    colour) and the keys each (sampled) query selected."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 5), layout="constrained")
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    dm = np.asarray(dense_map, dtype=float)
    pos = dm[dm > 0]
    vmin = max(pos.min(), pos.max() * 1e-6) if pos.size else 1e-6
    im = ax1.imshow(np.where(dm > 0, dm, np.nan), origin="upper", aspect="auto", cmap="viridis",
                    extent=(0, n_pos, n_pos, 0), norm=LogNorm(vmin=vmin, vmax=max(vmin * 10, pos.max() if pos.size else 1)))
    fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.02, label="mean head-summed prob")
    ax1.set_title("dense attention (head-summed, binned)", fontsize=9)
    sel = np.asarray(selected)
    qs = np.repeat(np.asarray(q_positions), sel.shape[1]) if sel.ndim == 2 else np.array([])
    ks = sel.reshape(-1) if sel.ndim == 2 else np.array([])
    keep = ks >= 0
    # pixel markers: visible at any count (a sized marker vanishes when there are 10^5 of them)
    ax2.plot(ks[keep], qs[keep], ",", color="tab:red", rasterized=True)
    ax2.set_xlim(0, n_pos)
    ax2.set_ylim(n_pos, 0)
    ax2.set_title(f"selected keys ({len(q_positions)} query rows)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ---- perplexity -------------------------------------------------------------------------------------
def format_perplexity(result: dict) -> str:
    out = [f"perplexity ({result['mode']}): {result['scored']}", f"tokens: {result['bos']}"]
    if "sparse" in result.get("attentions", ()):
        out.append(f"sparse: each query attends to its top-{result['index_topk']} keys by indexer score")
    if result["mode"] == "strided":
        head = f"{'window':>8} {'stride':>7} {'attention':>9} {'docs':>5} {'tokens':>8} {'NLL':>8} {'PPL':>10}"
    else:
        head = f"{'length':>8} {'attention':>9} {'docs':>5} {'tokens':>8} {'NLL':>8} {'PPL':>10}"
    out += [head, "-" * len(head)]
    for r in result["rows"]:
        cells = [f"{fmt_length(r['window']):>8} {r['stride']:>7}" if result["mode"] == "strided" else f"{fmt_length(r['length']):>8}"]
        cells.append(f"{r['attention']:>9} {r['documents']:>5} {r['tokens']:>8} {_f(r['nll'], '.4f'):>8} "
                     f"{_f(r['ppl'], '.3f'):>10}")
        out.append(" ".join(cells))
    for note in result.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


__all__ = [
    "ROW_FIELDS",
    "RULER_THRESHOLD",
    "fmt_length",
    "format_eval_table",
    "format_fidelity",
    "format_perplexity",
    "needle_grid",
    "nearest_depth",
    "plot_heatmap",
    "plot_scores",
    "plot_selection",
    "write_csv",
]
