"""`parca demo`: the whole story on the shipped model, offline, in a few minutes.

1. A long document with a fact (a pass key) hidden at several depths; each is asked for with dense and with
   sparse attention, and the answers are printed side by side with time, tokens and dollars per request.
2. The measured cost per token position, dense vs sparse, out to 64K (cost does not depend on answer quality,
   so positions beyond the model's trained context are measured for cost only).
3. A report (markdown + PNG) in ``--out``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .errors import ParcaError

QUICK = {"context": 2048, "depths": [20.0, 80.0], "positions": [1024, 4096, 16384], "reps": 1}
FULL = {"context": 8192, "depths": [10.0, 50.0, 90.0], "positions": [1024, 4096, 16384, 65536], "reps": 2}


def _fmt_usd(x: float) -> str:
    return f"${x:.2e}"


def run_demo(model_dir: str, indexer: str | None, *, context: int | None = None, quick: bool = False,
             positions: list[int] | None = None, price_per_hour: float = 1.0, out: str | Path = "parca-demo",
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns the summary document (also written to ``out/summary.json``)."""
    from . import evals
    from .bench.curve import measure_curve, write_curve_report
    from .bench.report import md_table, write_json
    from .checkpoint import load_model
    from .engine import Engine, SamplingParams
    from .tokenizer import Tokenizer

    plan = dict(QUICK if quick else FULL)
    if context:
        plan["context"] = context
    if positions:
        plan["positions"] = positions
    t_start = time.perf_counter()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    model = load_model(model_dir, indexer=indexer)
    if model.sparse_config is None:
        raise ParcaError("the demo compares dense and sparse attention: the model needs indexers (--indexer ADIR)")
    cfg = model.config
    if plan["context"] > cfg.max_position_embeddings:
        raise ParcaError(f"--context {plan['context']} exceeds the model's context {cfg.max_position_embeddings}")
    tok = Tokenizer(model_dir)
    k = model.sparse_config.index_topk
    engine = Engine(model, tok, max_slots=2, price_per_hour=price_per_hour)
    task = evals.get_task("passkey")
    bos = len(tok.encode("", add_special_tokens=True))

    # ---- 1. facts hidden at several depths, asked dense and sparse ------------------------------------
    rows: list[dict[str, Any]] = []
    say(f"parca demo: {Path(model_dir).name}, top-k {k}, documents of {plan['context']:,} tokens "
        f"(sparse keeps {k / plan['context']:.0%} of the keys at the end of each)")
    for i, depth in enumerate(plan["depths"]):
        s = task.generate(tok, plan["context"] - bos, seed=seed, index=i, depth=depth)
        params = [SamplingParams(max_new_tokens=s.max_new_tokens, attention=m) for m in ("dense", "sparse")]
        say(f"  [{i + 1}/{len(plan['depths'])}] pass key at depth {depth:.0f}%: asking dense and sparse ...")
        dense, sparse = engine.generate([s.prompt, s.prompt], params)
        row = {"depth": depth, "expected": s.answers[0], "prompt_tokens": dense.prompt_tokens}
        for name, r in (("dense", dense), ("sparse", sparse)):
            m = r.meter
            row[name] = {"answer": " ".join(r.text.split()), "correct": evals.score("passkey", r.text, s.answers) == 1.0,
                         "seconds": m.seconds, "ttft_s": m.ttft_s, "completion_tokens": m.completion_tokens,
                         "cost_usd": m.cost_usd, "dense_cost_usd": m.dense_cost_usd}
        rows.append(row)

    # ---- 2. cost per token position ------------------------------------------------------------------
    say(f"  measuring cost per token position at {', '.join(f'{p // 1024}K' for p in plan['positions'])} ...")
    saved_ctx = cfg.max_position_embeddings
    cfg.max_position_embeddings = max(saved_ctx, max(plan["positions"]) + 512)  # cost only, not quality
    try:
        curve = measure_curve(model, plan["positions"], chunk=256, reps=plan["reps"], warmup=1,
                              price_per_hour=price_per_hour, analytic=False, progress=progress)
    finally:
        cfg.max_position_embeddings = saved_ctx
    out_dir = Path(out)
    curve_paths = write_curve_report(curve, out_dir / "curve")

    # ---- 3. report -------------------------------------------------------------------------------------
    table = [[f"{r['depth']:.0f}%", r["expected"], r["prompt_tokens"],
              f"{r['dense']['answer'][:24]} ({'ok' if r['dense']['correct'] else 'wrong'})",
              f"{r['sparse']['answer'][:24]} ({'ok' if r['sparse']['correct'] else 'wrong'})",
              f"{r['dense']['seconds']:.2f} / {r['sparse']['seconds']:.2f}",
              f"{_fmt_usd(r['dense']['cost_usd'])} / {_fmt_usd(r['sparse']['cost_usd'])}"] for r in rows]
    headers = ["depth", "pass key", "prompt tokens", "dense answer", "sparse answer", "seconds d / s", "cost d / s"]
    longest = curve["rows"][-1]
    agree = sum(r["dense"]["answer"] == r["sparse"]["answer"] for r in rows)
    right = {m: sum(r[m]["correct"] for r in rows) for m in ("dense", "sparse")}
    summary_line = (
        f"dense found {right['dense']}/{len(rows)} pass keys, sparse {right['sparse']}/{len(rows)} "
        f"(answers agreed {agree}/{len(rows)}); at {longest['position']:,} tokens sparse decode costs "
        f"{longest['decode_ratio']:.2f}x and prefill {longest['prefill_ratio']:.2f}x of dense on this machine")
    md = [f"# parca demo — {Path(model_dir).name}", "",
          f"Model {cfg.architecture}, {cfg.parameter_count() / 1e6:.1f}M parameters, context {saved_ctx:,}; "
          f"indexer {model.sparse_config.index_n_heads}x{model.sparse_config.index_head_dim}, top-k {k}. "
          f"Price {price_per_hour} USD per machine-hour.", "",
          "## Facts hidden in a long document", "", md_table(headers, table), "",
          "## Cost per token position (measured)", "",
          f"![curve](curve/{Path(curve_paths['png']).name})" if "png" in curve_paths else "", "",
          md_table(["position", "prefill $/M dense", "sparse", "decode $/M dense", "sparse"],
                   [[f"{r['position']:,}", f"{r['prefill_dense']:.3g}", f"{r['prefill_sparse']:.3g}",
                     f"{r['decode_dense']:.3g}", f"{r['decode_sparse']:.3g}"] for r in curve["rows"]]),
          "", f"**{summary_line}.**", "",
          f"Wall time {time.perf_counter() - t_start:.0f} s."]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    doc = {"model": str(model_dir), "indexer": indexer, "index_topk": k, "context": plan["context"],
           "facts": rows, "curve": {"rows": curve["rows"], "paths": curve_paths}, "summary": summary_line,
           "wall_s": time.perf_counter() - t_start, "machine": curve.get("machine")}
    write_json(out_dir / "summary.json", doc)

    # ---- the card -------------------------------------------------------------------------------------
    print(f"\nparca demo: {Path(model_dir).name} ({cfg.parameter_count() / 1e6:.1f}M params), top-k {k}, "
          f"{plan['context']:,}-token documents, {price_per_hour} USD/h")
    print(f"{'depth':>6} {'pass key':>9} | {'dense answer':>14} {'s':>6} {'cost':>9} | {'sparse answer':>14} "
          f"{'s':>6} {'cost':>9}")
    for r in rows:
        d, s_ = r["dense"], r["sparse"]
        print(f"{r['depth']:5.0f}% {r['expected']:>9} | {d['answer'][:14]:>14} {d['seconds']:6.2f} "
              f"{_fmt_usd(d['cost_usd']):>9} | {s_['answer'][:14]:>14} {s_['seconds']:6.2f} "
              f"{_fmt_usd(s_['cost_usd']):>9}")
    print(f"\n{'position':>9} | {'prefill $/M dense':>17} {'sparse':>9} | {'decode $/M dense':>16} {'sparse':>9}")
    for r in curve["rows"]:
        print(f"{r['position']:>9,} | {r['prefill_dense']:17.3g} {r['prefill_sparse']:9.3g} | "
              f"{r['decode_dense']:16.3g} {r['decode_sparse']:9.3g}")
    print(f"\n{summary_line}.\nreport: {out_dir / 'report.md'}  ({doc['wall_s']:.0f} s)")
    return doc
