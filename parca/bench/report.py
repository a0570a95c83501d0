"""Report helpers shared by the benchmarks: number formatting, markdown tables, break-even analysis, JSON
files and the PNG figures (matplotlib's object API with the Agg canvas: no pyplot global state, no display).

Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

# Colours of the two modes in every figure (dense: DeepSeek V3.1-Terminus' blue-ish, sparse: orange).
COLORS = {"dense": "#1f77b4", "sparse": "#ff7f0e"}
# Sparse counts as cheaper only where it is at least this much below dense: smaller differences are within
# the timing noise of a shared machine (and below top-k the sparse path runs the same dense computation).
NOISE_MARGIN = 0.02


# ---- formatting -------------------------------------------------------------------------------
def fmt_pos(p: float | int | None) -> str:
    """Token position in the paper's style: 1024 -> '1K', 1536 -> '1.5K', 2**20 -> '1M', 100 -> '100'."""
    if p is None:
        return "-"
    p = float(p)
    for unit, name in ((1024 * 1024, "M"), (1024, "K")):
        if p >= unit:
            v = p / unit
            return f"{v:.0f}{name}" if abs(v - round(v)) < 0.05 else f"{v:.1f}{name}"
    return f"{p:.0f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    """Significant-digit formatting for $ and seconds; '-' for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column ('l' or 'r'; default: first left, rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, doc: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- break-even -------------------------------------------------------------------------------
def break_even(positions: Sequence[float], dense: Sequence[float], sparse: Sequence[float], *,
               margin: float = NOISE_MARGIN) -> dict[str, Any]:
    """Where sparse becomes cheaper, from measured points (any order; sorted by position here).

    ``position`` is the first measured position from which sparse is cheaper by at least ``margin`` at
    EVERY later measured position. ``interpolated`` places the crossing of sparse/dense = 1 between that
    point and the one before it, linearly in log2(position) (costs grow roughly linearly in the position,
    the positions are usually powers of two); None where the earlier point was already (within noise)
    below 1 or where there is no earlier point. ``status``: 'crossover', 'always' (cheaper from the first
    point) or 'never'.
    """
    pts = sorted((float(p), float(s) / float(d) if d > 0 else math.inf) for p, d, s in zip(positions, dense, sparse))
    out: dict[str, Any] = {"position": None, "interpolated": None, "status": "never", "margin": margin,
                           "rule": f"first position from which sparse costs at least {margin:.0%} less than dense "
                                   f"at every later measured position; interpolated: ratio = 1 crossing, linear in "
                                   f"log2(position) between neighbouring points"}
    if not pts:
        return out
    cheaper = [r < 1 - margin for _, r in pts]
    i = len(pts)
    while i > 0 and cheaper[i - 1]:
        i -= 1
    if i == len(pts):
        out["longest"] = pts[-1][0]
        return out
    out["position"] = pts[i][0]
    if i == 0:
        out["status"] = "always"
        return out
    out["status"] = "crossover"
    (p0, r0), (p1, r1) = pts[i - 1], pts[i]
    if r0 >= 1 > r1 and p1 > p0 > 0:
        t = (r0 - 1) / (r0 - r1)
        out["interpolated"] = 2 ** (math.log2(p0) + t * (math.log2(p1) - math.log2(p0)))
    return out


def describe_break_even(be: dict[str, Any], unit: str = "") -> str:
    """One phrase: 'at 8K (interpolated 6.2K)', 'already at 1K (the shortest measured)', 'not reached up to 32K'."""
    u = f" {unit}" if unit else ""
    if be["status"] == "never":
        return f"not reached up to {fmt_pos(be.get('longest'))}{u}"
    if be["status"] == "always":
        return f"already at {fmt_pos(be['position'])}{u} (the shortest measured)"
    s = f"at {fmt_pos(be['position'])}{u}"
    if be.get("interpolated"):
        s += f" (interpolated {fmt_pos(be['interpolated'])})"
    return s


# ---- figures ----------------------------------------------------------------------------------
def _figure(ncols: int, width: float = 5.2, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _position_axis(ax, positions: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    # ticks at power-of-two steps (positions are usually 1K, 2K, 4K, ...): 4-8 of them, labelled 4K, 8K, ...
    span = max(positions) if positions else 1
    ax.xaxis.set_major_locator(MultipleLocator(2 ** math.ceil(math.log2(max(span / 8, 1)))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_pos(v) if v >= 0 else ""))
    ax.set_xlim(left=0, right=max(positions) * 1.05 if positions else 1)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def plot_curve(rows: Sequence[dict[str, Any]], path: str | Path, *, analytic: Sequence[dict[str, Any]] | None = None,
               break_even: dict[str, dict[str, Any]] | None = None, title: str = "",
               ylabel: str = "$ per million tokens") -> Path:
    """The paper's figure 3 for one model on one machine: prefill | decode, $/M tokens vs token position,
    dense and sparse measured (solid, markers), the analytic model (dashed) when given, break-even marked."""
    fig, axes = _figure(2)
    pos = [r["position"] for r in rows]
    for ax, phase in zip(axes, ("prefill", "decode")):
        for mode in ("dense", "sparse"):
            ax.plot(pos, [r[f"{phase}_{mode}"] for r in rows], "o-", color=COLORS[mode], lw=1.8, ms=4,
                    label=f"{mode} (measured)")
            if analytic:
                ax.plot([r["position"] for r in analytic], [r[f"{phase}_{mode}"] for r in analytic], "--",
                        color=COLORS[mode], lw=1.1, alpha=0.8, label=f"{mode} (analytic model)")
        be = (break_even or {}).get(phase)
        if be and be.get("position") is not None and be["status"] == "crossover":
            x = be.get("interpolated") or be["position"]
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.annotate(f"break-even ~{fmt_pos(x)}", (x, 0), xytext=(4, 6), textcoords="offset points",
                        fontsize=8, color="grey")
        ax.set_title(f"{phase.capitalize()}")
        ax.set_xlabel("token position")
        ax.set_ylabel(ylabel)
        _position_axis(ax, pos)
        ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


def plot_xy(path: str | Path, panels: Sequence[dict[str, Any]], *, title: str = "", xlabel: str = "prompt tokens"
            ) -> Path:
    """Panels side by side, each ``{"title", "ylabel", "series": [(label, xs, ys, color, style)], "zero": bool}``;
    points are drawn sorted by x."""
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        allx: list[float] = []
        for label, xs, ys, color, style in panel["series"]:
            pts = sorted((x, y) for x, y in zip(xs, ys) if y is not None)
            if not pts:
                continue
            allx += [x for x, _ in pts]
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=color, lw=1.5, ms=5, label=label)
        if panel.get("zero"):
            ax.axhline(0, color="black", lw=0.8)
        ax.set_title(panel["title"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_xlabel(xlabel)
        if allx:
            _position_axis(ax, allx)
        if panel.get("zero"):
            ax.set_ylim(auto=True)
            ax.relim()
            ax.autoscale_view()
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
