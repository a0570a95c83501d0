"""`parca bench docs`: "test it on your own documents, with clear price and latency metrics, capturing billed
tokens per request", made a command.

Every usable document in a folder (.txt, .md: one document per file; .jsonl: one per line, its ``text`` or
``context`` field) becomes one request, sent twice through the engine -- dense and sparse, greedy, back to
back (alternating which goes first) -- and every request's meter is kept (billed tokens, seconds, TTFT,
cost). Answers are compared token for token and after text normalisation. A document longer than the model's
context minus the answer budget (minus the question / chat template) keeps its first tokens; the report says
which were cut. Files that cannot be used (empty, binary, not UTF-8, bad JSON) are named and skipped.

How the savings are counted (the two runs of one document may answer with different lengths):
* prefill: 1 - sparse prefill seconds / dense prefill seconds (same prompt tokens on both sides);
* decode: 1 - sparse seconds per decode step / dense seconds per decode step;
* overall: 1 - (sparse prefill seconds + sparse seconds per decode step x dense's decode steps) /
  dense seconds -- i.e. the dense run's token counts priced at sparse's measured rates.
Summed over all documents for the summary, per document for the table and the break-even.
"""

from __future__ import annotations

import re
import time
import unicodedata
from pathlib import Path
from typing import Any

from .. import documents as _documents
from ..errors import ParcaError
from . import report
from .common import machine_info
from .curve import _describe_model, _load_average, load_note, model_summary


# ---- reading ----------------------------------------------------------------------------------
def read_documents(docs_dir: str | Path) -> tuple[list[_documents.Document], list[dict[str, str]]]:
    """Documents of a folder (recursively, sorted by path) and the skipped inputs ``{"name", "reason"}``.

    The shared reader (:mod:`parca.documents`) with its lenient policy: a bad file or line is listed as
    skipped, never raised. Hidden files and folders are ignored.
    """
    root = Path(docs_dir)
    if not root.is_dir():
        raise ParcaError(f"--docs {root}: not a directory; give a folder of .txt, .md or .jsonl documents")
    docs, skipped = _documents.read_documents(root, flag="--docs", strict=False)
    return docs, [s.as_dict() for s in skipped]


def build_prompt(text: str, question: str | None) -> str:
    """The document, then the question when one is given (a plain continuation otherwise)."""
    return text if not question else f"{text}\n\nQuestion: {question}\nAnswer:"


def normalise(text: str) -> str:
    """For the text match: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def fit_prompt(engine: Any, text: str, question: str | None, limit: int, chat: bool = False
               ) -> tuple[str, list[int], int, bool]:
    """(prompt text, its ids, the document's own token count, truncated?) with at most ``limit`` prompt
    tokens: a document that does not fit keeps its first tokens (cut in tokens, decoded back to text)."""
    tok = engine.tokenizer
    prompt = build_prompt(text, question)
    ids = engine.encode_prompt(prompt, chat=chat)
    doc_ids = tok.encode(text)
    if len(ids) <= limit:
        return prompt, ids, len(doc_ids), False
    overhead = len(engine.encode_prompt(build_prompt("", question), chat=chat))
    keep = min(len(doc_ids), limit - overhead)
    while keep > 0:
        prompt = build_prompt(tok.decode(doc_ids[:keep]), question)
        ids = engine.encode_prompt(prompt, chat=chat)
        if len(ids) <= limit:
            return prompt, ids, len(doc_ids), True
        keep -= max(1, len(ids) - limit)  # re-tokenising at the cut can merge differently; shrink and retry
    raise ParcaError(f"the question and prompt template alone take {overhead} tokens, more than the {limit} the "
                     f"model's context leaves after the answer budget; shorten --question or --max-new-tokens")


# ---- savings ----------------------------------------------------------------------------------
def _savings(dense: list[dict[str, Any]], sparse: list[dict[str, Any]]) -> dict[str, float | None]:
    """Savings of sparse over dense summed over meters (see the module docstring for the definitions)."""
    dp, sp = sum(m["prefill_s"] for m in dense), sum(m["prefill_s"] for m in sparse)
    dd, sd = sum(m["decode_s"] for m in dense), sum(m["decode_s"] for m in sparse)
    dn = sum(max(m["completion_tokens"] - 1, 0) for m in dense)
    sn = sum(max(m["completion_tokens"] - 1, 0) for m in sparse)
    rate_d = dd / dn if dn else None
    rate_s = sd / sn if sn else None
    decode = 1 - rate_s / rate_d if (rate_d and rate_s is not None) else None
    # dense's decode steps at sparse's rate (dense's own rate where sparse decoded nothing)
    sparse_total = sp + (rate_s if rate_s is not None else (rate_d or 0.0)) * dn
    dense_total = dp + dd
    return {"total": 1 - sparse_total / dense_total if dense_total > 0 else None,
            "prefill": 1 - sp / dp if dp > 0 else None, "decode": decode,
            "dense_s": dense_total, "sparse_s_normalised": sparse_total}


# ---- the run ------------------------------------------------------------------------------------
def run_docs(model: Any, tokenizer: Any, docs_dir: str | Path, *, question: str | None = None,
             max_new_tokens: int = 32, index_topk: int | None = None, price_per_hour: float = 1.0,
             prefill_chunk: int = 2048, chat: bool = False, fixed_length: bool = False, progress: bool = True,
             indexer_note: str | None = None) -> dict[str, Any]:
    """Send every document dense and sparse; returns the results document (what results.json holds)."""
    from tqdm import tqdm

    from ..engine import Engine, SamplingParams

    sc = getattr(model, "sparse_config", None)
    if sc is None:
        raise ParcaError("`bench docs` compares dense and sparse attention, so the model needs indexers: pass "
                         "--indexer ADIR (from `parca indexer init` / `parca retrofit`)")
    if tokenizer is None:
        raise ParcaError("`bench docs` needs the model's tokenizer (tokenizer.json in the model directory)")
    if max_new_tokens < 1:
        raise ParcaError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    k = int(index_topk or sc.index_topk)
    context = model.config.max_position_embeddings
    limit = context - max_new_tokens
    if limit < 2:
        raise ParcaError(f"--max-new-tokens {max_new_tokens} leaves no room for a document in the model's "
                         f"{context}-token context")
    docs, skipped = read_documents(docs_dir)
    if not docs:
        why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:10]) or "the folder holds no files"
        raise ParcaError(f"--docs {docs_dir}: no usable document ({why}); expected UTF-8 .txt / .md files or "
                         f".jsonl lines with a 'text' or 'context' field")

    probe = Engine(model, tokenizer, max_slots=1, max_len=1, metering=False)  # encode_prompt only
    prepared = []
    for d in docs:
        prompt, ids, n_doc, cut = fit_prompt(probe, d.text, question, limit, chat)
        prepared.append({"document": d.name, "prompt": prompt, "ids": ids, "document_tokens": n_doc, "truncated": cut})
    del probe
    max_len = min(context, max(len(p["ids"]) for p in prepared) + max_new_tokens)
    # the cache is made once, sized to the longest request: no re-allocation inside any timed request
    engine = Engine(model, tokenizer, max_slots=1, max_len=max_len, prefill_chunk=prefill_chunk,
                    price_per_hour=price_per_hour)

    def params(mode: str, n: int = max_new_tokens) -> Any:
        return SamplingParams(max_new_tokens=n, attention=mode, index_topk=k, ignore_eos=fixed_length)

    # warm-up, untimed: one request per mode with a full prefill chunk (the largest buffers a request
    # allocates) and, where the documents allow, more than k tokens so the sparse path selects
    longest = max((p["ids"] for p in prepared), key=len)
    warm = longest[: min(len(longest), max(prefill_chunk, k + 16))]
    for mode in ("dense", "sparse"):
        engine.generate([warm], params(mode, 2))

    t0 = time.perf_counter()
    load_start = _load_average()
    records = []
    bar = tqdm(total=2 * len(prepared), desc="bench docs", unit="req", disable=not progress, leave=False)
    try:
        for i, p in enumerate(prepared):
            runs: dict[str, Any] = {}
            for mode in (("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")):
                bar.set_postfix_str(f"{p['document'][:30]} {mode}")
                res = engine.generate([p["ids"]], params(mode))[0]
                runs[mode] = {**res.meter.to_dict(), "text": res.text, "token_ids": res.token_ids,
                              "finish_reason": res.finish_reason, "usage": res.usage}
                bar.update(1)
            sav = _savings([runs["dense"]], [runs["sparse"]])
            records.append({
                "document": p["document"], "document_tokens": p["document_tokens"], "truncated": p["truncated"],
                "prompt_tokens": len(p["ids"]), "prompt": p["prompt"],
                "sparse_selects": len(p["ids"]) > k,
                "dense": runs["dense"], "sparse": runs["sparse"],
                "agree_exact": runs["dense"]["token_ids"] == runs["sparse"]["token_ids"],
                "agree_text": normalise(runs["dense"]["text"]) == normalise(runs["sparse"]["text"]),
                "savings": {"total": sav["total"], "prefill": sav["prefill"], "decode": sav["decode"]},
                "ratio": sav["sparse_s_normalised"] / sav["dense_s"] if sav["dense_s"] > 0 else None,
            })
    finally:
        bar.close()

    total = _savings([r["dense"] for r in records], [r["sparse"] for r in records])
    ok = [r for r in records if r["ratio"] is not None]
    be = report.break_even([r["prompt_tokens"] for r in ok], [1.0] * len(ok), [r["ratio"] for r in ok])
    doc: dict[str, Any] = {
        "kind": "parca.bench.docs",
        "model": model_summary(model, k),
        "settings": {"docs": str(docs_dir), "question": question, "chat": chat, "max_new_tokens": max_new_tokens,
                     "fixed_length": fixed_length, "index_topk": k, "prefill_chunk": prefill_chunk,
                     "sampling": "greedy", "context": context, "prompt_limit": limit,
                     "truncation": f"documents longer than the model's context ({context} tokens) minus the answer "
                                   f"budget ({max_new_tokens}) minus the question/template keep their first tokens "
                                   f"(at most {limit} prompt tokens per request)"},
        "price_per_hour": price_per_hour,
        "indexer_note": indexer_note,
        "requests": records,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - t0,
        "load_average": {"start": load_start, "end": _load_average()},
        "machine": machine_info(),
    }
    doc["summary"] = {
        "documents": len(records), "skipped": len(skipped), "truncated": sum(r["truncated"] for r in records),
        "savings": total["total"], "prefill_savings": total["prefill"], "decode_savings": total["decode"],
        "break_even": be,
        "agreed_exact": sum(r["agree_exact"] for r in records), "agreed_text": sum(r["agree_text"] for r in records),
        "dense_cost_usd": sum(r["dense"]["cost_usd"] for r in records),
        "sparse_cost_usd": sum(r["sparse"]["cost_usd"] for r in records),
        "at_most_topk": sum(not r["sparse_selects"] for r in records),
    }
    doc["summary"]["line"] = summary_line(doc)
    return doc


# ---- outputs ------------------------------------------------------------------------------------
def summary_line(doc: dict[str, Any]) -> str:
    """'at your lengths sparse saves X% (Y% prefill, Z% decode); break-even at N tokens; answers agreed in A of B
    requests' (plus what the reader must know: text-level agreement, documents sparse could not help)."""
    s, k = doc["summary"], doc["settings"]["index_topk"]
    be = s["break_even"]
    if be["status"] == "crossover":
        b = f"break-even at {be['position']:,.0f} tokens" + (
            f" (interpolated {be['interpolated']:,.0f})" if be.get("interpolated") else "")
    elif be["status"] == "always":
        b = f"sparse cheaper already at your shortest length ({be['position']:,.0f} tokens), so break-even is below it"
    else:
        b = f"no break-even at your lengths (sparse not cheaper up to {be.get('longest', 0):,.0f} tokens)"
    pct = lambda x: "n/a" if x is None else report.fmt_pct(x)  # noqa: E731
    line = (f"at your lengths sparse saves {pct(s['savings'])} ({pct(s['prefill_savings'])} "
            f"prefill, {pct(s['decode_savings'])} decode); {b}; answers agreed in {s['agreed_exact']} of "
            f"{s['documents']} requests ({s['agreed_text']} of {s['documents']} after normalising the text)")
    if s["at_most_topk"]:
        line += (f"; {s['at_most_topk']} of {s['documents']} documents fit in top-k = {k} tokens, where sparse "
                 f"attention keeps every token and cannot save anything")
    return line


def _request_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in doc["requests"]:
        d, s = r["dense"], r["sparse"]
        rows.append([
            r["document"],
            f"{r['prompt_tokens']:,}" + (f" (of {r['document_tokens']:,}, cut)" if r["truncated"] else ""),
            f"{d['completion_tokens']}/{s['completion_tokens']}",
            report.fmt_num(d["cost_usd"]), report.fmt_num(s["cost_usd"]), report.fmt_pct(r["savings"]["total"]),
            f"{report.fmt_num(d['ttft_s'])}/{report.fmt_num(s['ttft_s'])}",
            f"{report.fmt_num(d['e2e_s'])}/{report.fmt_num(s['e2e_s'])}",
            ("yes" if r["agree_exact"] else "no") + (" / yes" if r["agree_text"] else " / no"),
        ])
    return rows


_HEADERS = ["document", "prompt tokens", "answer tokens d/s", "dense $", "sparse $", "saved", "TTFT s d/s",
            "e2e s d/s", "agree tokens / text"]


def docs_card(doc: dict[str, Any], paths: dict[str, str] | None = None) -> str:
    m = doc["machine"]
    out = [f"parca bench docs: {_describe_model(doc['model'])}",
           f"machine: {m['cpu']}, {report.threads(m['threads'])}"
           f"{' (' + load_note(doc) + ')' if load_note(doc) else ''}; price {doc['price_per_hour']:g} USD/h; "
           f"{doc['settings']['truncation']}"]
    if doc.get("indexer_note"):
        out.append(f"note: {doc['indexer_note']}")
    for s in doc["skipped"]:
        out.append(f"skipped {s['name']}: {s['reason']}")
    out.append(" | ".join(_HEADERS))
    out += [" | ".join(r) for r in _request_rows(doc)]
    if paths:
        out.append("wrote " + ", ".join(paths.values()))
    out.append(doc["summary"]["line"])
    return "\n".join(out)


def docs_markdown(doc: dict[str, Any], pngs: dict[str, str]) -> str:
    st, m, sm = doc["settings"], doc["machine"], doc["summary"]
    md = ["# Your documents, dense vs sparse", "",
          f"Model: {_describe_model(doc['model'])}.", "",
          f"Machine: {m['cpu']}, {report.threads(m['threads'])}"
          f"{' (' + load_note(doc) + ')' if load_note(doc) else ''}; "
          f"torch {m['torch']}, parca {m['parca']} @ {m['commit']}. "
          f"Price {doc['price_per_hour']:g} USD per machine-hour.", "",
          f"Requests: {sm['documents']} documents from `{st['docs']}`, each sent dense and sparse (greedy, up to "
          f"{st['max_new_tokens']} answer tokens{', EOS ignored' if st['fixed_length'] else ''}"
          + (f", question: \"{st['question']}\"" if st["question"] else ", no question: the model continues the text")
          + f"). Truncation: {st['truncation']}; {sm['truncated']} of {sm['documents']} documents were cut.", ""]
    if doc.get("indexer_note"):
        md += [f"Note: {doc['indexer_note']}", ""]
    if doc["skipped"]:
        md += ["## Skipped inputs", ""] + [f"- `{s['name']}`: {s['reason']}" for s in doc["skipped"]] + [""]
    md += ["## Per request", "", "Costs are the meter's bill: (prefill + decode seconds) x price. d/s = dense/sparse.",
           "", report.md_table(_HEADERS, _request_rows(doc)), "",
           "## Figures", ""] + [f"![{k}]({Path(v).name})" for k, v in pngs.items()] + [
           "", "## How the savings are counted", "",
           "- prefill: 1 - sparse prefill seconds / dense prefill seconds (the same prompt on both sides);",
           "- decode: 1 - sparse seconds per decode step / dense seconds per decode step (answers may differ in "
           "length);",
           "- overall: dense's token counts priced at sparse's measured rates, against dense's bill;",
           f"- break-even: over documents sorted by prompt length, {sm['break_even']['rule']}.",
           f"- dense: {sm['dense_cost_usd']:.3g} USD in all; sparse: {sm['sparse_cost_usd']:.3g} USD (as billed).",
           "", "## Summary", "", sm["line"] + "."]
    return "\n".join(md) + "\n"


def write_docs_report(doc: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """report.md, cost.png, latency.png, savings.png and results.json in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParcaError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    reqs = doc["requests"]
    x = [r["prompt_tokens"] for r in reqs]
    col = report.COLORS

    def series(key: str, scale: float = 1.0):
        return [(mode, x, [r[mode][key] * scale for r in reqs], col[mode], "o-") for mode in ("dense", "sparse")]

    pngs = {"cost": str(out / "cost.png"), "latency": str(out / "latency.png"), "savings": str(out / "savings.png")}
    report.plot_xy(pngs["cost"], [
        {"title": "Cost per request", "ylabel": "USD per request", "series": series("cost_usd")},
        {"title": "Cost per token (prompt + answer)", "ylabel": "USD per million tokens",
         "series": [(mode, x, [r[mode]["cost_usd"] / max(r[mode]["total_tokens"], 1) * 1e6 for r in reqs], col[mode],
                     "o-") for mode in ("dense", "sparse")]},
    ], title=f"Cost by context length at {doc['price_per_hour']:g} USD/h")
    report.plot_xy(pngs["latency"], [
        {"title": "Time to first token", "ylabel": "seconds", "series": series("ttft_s")},
        {"title": "End-to-end latency", "ylabel": "seconds", "series": series("e2e_s")},
    ], title="Latency by context length")
    report.plot_xy(pngs["savings"], [
        {"title": "Sparse savings over dense", "ylabel": "% of dense cost saved", "zero": True,
         "series": [(name, x, [None if r["savings"][key] is None else 100 * r["savings"][key] for r in reqs], c, st)
                    for name, key, c, st in (("overall", "total", "black", "o-"),
                                             ("prefill", "prefill", "#2ca02c", "s--"),
                                             ("decode", "decode", "#9467bd", "^--"))]},
    ], title="Savings by context length")
    paths = {"markdown": str(out / "report.md"), **{f"png_{k}": v for k, v in pngs.items()},
             "json": str(out / "results.json")}
    Path(paths["markdown"]).write_text(docs_markdown(doc, pngs), encoding="utf-8")
    doc["artefacts"] = paths
    report.write_json(paths["json"], doc)
    return paths
