"""Perplexity on long documents, dense and sparse side by side (report it beside the retrieval tasks, never
instead of them: plain perplexity hides long-range failures).

    from parca.evals import perplexity
    res = perplexity(model, tokenizer, "books/", mode="truncate", lengths=[4096, 16384])
    res = perplexity(model, tokenizer, "books/", mode="strided", window=8192, stride=4096)

Modes (each result states window, stride, which tokens are scored, and the BOS handling):

* ``truncate``: each document cut to its first ``L`` tokens (special tokens included); every token after the
  first is scored (``L - 1`` predictions per document) -> perplexity vs ``L``. Shorter documents are skipped.
* ``strided``: windows of ``W`` tokens moved by ``S`` (Hugging Face's recipe): the first window scores all its
  tokens, each later window only its last ``S``, so every token is scored once and each after the first
  window sees at least ``W - S`` tokens of context. Every window starts with the tokenizer's special prefix
  (BOS), which counts toward ``W`` and is never scored.

Tokens are the model's tokenizer with ``add_special_tokens=True`` (the BOS the model was trained with).
The attention modes run as rows of one batch, so dense and sparse see identical tokens.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from parca.evals import report
from parca.evals.fidelity import DEFAULT_MAX_CHUNK_BYTES, as_texts, forward_rows, logit_rows
from parca.evals.haystack import EvalError
from parca.evals.run import bos_note, check_lengths, model_context, parse_attentions, parse_lengths, special_prefix

MODES = ("truncate", "strided")


def score_tokens(model: Any, ids: list[int], modes: Sequence[str], topk: int | None, score_from: int, *,
                 prefill_chunk: int = 2048, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> tuple[list[float], int]:
    """Summed NLL of ``ids[score_from:]`` (each predicted from everything before it), one value per mode.

    Returns:
        (NLL sums, one per mode, in nats; number of scored tokens).
    """
    import torch

    t = len(ids)
    score_from = max(1, score_from)
    x = torch.tensor([ids], device=model.model.embed_tokens.weight.device)
    cache = model.make_cache(len(modes), t)
    sums = [0.0] * len(modes)
    n = 0
    for t0 in range(0, t, prefill_chunk):
        t1 = min(t, t0 + prefill_chunk)
        # logits at position p predict token p+1: this chunk scores targets max(t0+1, score_from) .. t1
        lo = max(t0, score_from - 1)
        hi = min(t1, t - 1)
        if hi <= lo:
            forward_rows(model, x[:, t0:t1], cache, t0, modes, topk, last_only=True, max_chunk_bytes=max_chunk_bytes)
            continue
        h = forward_rows(model, x[:, t0:t1], cache, t0, modes, topk, max_chunk_bytes=max_chunk_bytes)
        h = h[:, lo - t0 : hi - t0]
        for a, b, logits in logit_rows(model, h, max_chunk_bytes):
            tgt = x[0, lo + a + 1 : lo + b + 1]  # (b-a,)
            logp = torch.log_softmax(logits.double(), -1)  # (B, b-a, V)
            nll = -logp.gather(-1, tgt.view(1, -1, 1).expand(len(modes), -1, 1))[..., 0]  # (B, b-a)
            for r in range(len(modes)):
                sums[r] += float(nll[r].sum())
            n += b - a
    return sums, n


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: str | Path | Sequence[str] | Sequence[tuple[str, str]],
    *,
    mode: str = "truncate",
    lengths: str | Sequence[int | str] | None = None,
    window: int | None = None,
    stride: int | None = None,
    attentions: str | Sequence[str] | None = None,
    index_topk: int | None = None,
    max_tokens: int | None = None,
    max_docs: int | None = None,
    prefill_chunk: int = 2048,
    progress: bool = True,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity per length (truncate) or per window (strided), for each attention mode.

    Args:
        texts: documents (strings, ``(name, text)`` pairs, or a file/directory path).
        mode: ``truncate`` or ``strided`` (see the module docstring).
        lengths: truncate: the ``L`` values; strided: window sizes when ``window`` is not given.
            Default ``min(4096, context)``.
        window, stride: strided mode; ``stride`` defaults to half the window.
        attentions: default dense and sparse when the model has indexers, else dense.
        index_topk: keys each sparse query selects (default: the indexer config's).
        max_tokens: strided: score at most this many tokens of each document (its start).
        max_docs: at most this many documents (per length in truncate mode).
        out: directory for ``perplexity.json``.

    Returns:
        JSON-ready dict: ``mode``, ``scored`` (which tokens), ``bos``, ``rows`` (``attention``, ``length`` or
        ``window``/``stride``, ``documents``, ``tokens``, ``nll`` (nats/token), ``ppl``), ``notes``.
    """
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r}: expected truncate or strided")
    sc = getattr(model, "sparse_config", None)
    attentions = parse_attentions(attentions if attentions is not None else ("dense", "sparse") if sc else ("dense",))
    if "sparse" in attentions and sc is None:
        raise EvalError("sparse attention needs indexers: pass --indexer ADIR, or --attention dense")
    k = None if sc is None else int(index_topk or sc.index_topk)
    context = model_context(model)
    prefix = special_prefix(tokenizer)
    docs = [list(tokenizer.encode(t)) for t in as_texts(texts)]
    if not docs:
        raise EvalError("no documents given")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    result: dict[str, Any] = {"mode": mode, "attentions": attentions, "index_topk": k, "bos": bos_note(tokenizer),
                              "tokenizer": f"{type(tokenizer).__name__} (vocab {getattr(tokenizer, 'vocab_size', '?')})"}
    from tqdm.auto import tqdm

    if mode == "truncate":
        if window is not None or stride is not None:
            raise EvalError("--window/--stride belong to --mode strided; truncate mode takes --lengths")
        lengths = [min(4096, context)] if lengths is None else parse_lengths(lengths)
        check_lengths(lengths, context)
        jobs = []
        for length in lengths:
            use = [(prefix + d)[:length] for d in docs if len(prefix) + len(d) >= length]
            if max_docs is not None:
                use = use[: int(max_docs)]
            if not use:
                notes.append(f"length {length}: no document has {length} tokens (longest: "
                             f"{max(len(prefix) + len(d) for d in docs)}); skipped")
            jobs.append((length, use))
        result["scored"] = ("each document cut to its first L tokens (special tokens included); every token after "
                            "the first is scored (L-1 predictions per document); shorter documents are skipped")
        bar = tqdm(total=sum(len(u) for _, u in jobs), desc="ppl", unit="doc", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            for length, use in jobs:
                sums, n = [0.0] * len(attentions), 0
                for ids in use:
                    s, m = score_tokens(model, ids, attentions, k, 1, prefill_chunk=prefill_chunk)
                    sums = [a + b for a, b in zip(sums, s)]
                    n += m
                    bar.update(1)
                for a, total in zip(attentions, sums):
                    nll = total / n if n else None
                    rows.append({"length": length, "attention": a, "documents": len(use), "tokens": n, "nll": nll,
                                 "ppl": math.exp(nll) if nll is not None else None})
        finally:
            bar.close()
    else:
        windows = [int(window)] if window is not None else (
            [min(4096, context)] if lengths is None else parse_lengths(lengths))
        check_lengths(windows, context, flag="--window" if window is not None else "--lengths")
        if max_docs is not None:
            docs = docs[: int(max_docs)]
        if max_tokens is not None:
            docs = [d[: int(max_tokens)] for d in docs]
        plans = []
        for w in windows:
            span = w - len(prefix)  # document tokens per window
            s = int(stride) if stride is not None else max(1, span // 2)
            if span < 2:
                raise EvalError(f"window {w} leaves {span} document token(s) after the {len(prefix)} special token(s)")
            if not 1 <= s <= span:
                raise EvalError(f"--stride {s}: must be between 1 and the window's {span} document tokens")
            plans.append((w, span, s))
        result["scored"] = (f"sliding windows of W tokens (special tokens included) moved by S; the first window "
                            f"scores all its tokens, each later window only its last S (every token scored once, each "
                            f"after the first window with at least W-S tokens of context); every window starts with "
                            f"the tokenizer's special prefix ({len(prefix)} token(s)), never scored")
        n_windows = sum(len(range(0, max(1, len(d) - span + s), s)) for _, span, s in plans for d in docs)
        bar = tqdm(total=n_windows, desc="ppl", unit="window", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        try:
            for w, span, s in plans:
                sums, n, used = [0.0] * len(attentions), 0, 0
                for d in docs:
                    if len(d) + len(prefix) < 2:
                        continue
                    used += 1
                    prev_end = 0
                    for begin in range(0, len(d), s):
                        end = min(begin + span, len(d))
                        new = end - prev_end  # tokens no earlier window scored
                        win = prefix + d[begin:end]
                        got, m = score_tokens(model, win, attentions, k, len(win) - new, prefill_chunk=prefill_chunk)
                        sums = [a + b for a, b in zip(sums, got)]
                        n += m
                        prev_end = end
                        bar.update(1)
                        if end == len(d):
                            break
                for a, total in zip(attentions, sums):
                    nll = total / n if n else None
                    rows.append({"window": w, "stride": s, "attention": a, "documents": used, "tokens": n,
                                 "nll": nll, "ppl": math.exp(nll) if nll is not None else None})
        finally:
            bar.close()
        result["window"] = windows[0] if len(windows) == 1 else windows
        result["stride"] = plans[0][2] if len(plans) == 1 else [p[2] for p in plans]
    result["rows"] = rows
    result["notes"] = notes
    if not any(r["tokens"] for r in rows):
        raise EvalError("no tokens scored: " + ("; ".join(notes) or "the documents are empty"))
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "perplexity.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        result["files"] = [str(out_dir / "perplexity.json")]
    return result


def format_perplexity(result: dict) -> str:
    return report.format_perplexity(result)


__all__ = ["MODES", "format_perplexity", "perplexity", "score_tokens"]
