"""Fidelity of sparse to dense attention on the same model and the same tokens: the most sensitive check,
needing no task at all.

    from parca.evals import fidelity, load_texts
    res = fidelity(model, tokenizer, [text for _, text in load_texts("docs/")], lengths=[4096, 16384])

Measured per length on the first ``L`` tokens of every document that has them:

* **attention recall**, per layer: the share of the head-summed, L1-normalised dense attention mass of a query
  that falls on the keys its indexer selected. Computed in the sparse row from that layer's own queries and
  cached keys (what dense attention would do at this layer with these inputs), one query chunk at a time
  (``head_summed_probs`` on a chunk: never a whole ``[T, T]``). Counted only over query positions that see
  more than ``k`` keys: a query at position ``t < k`` selects every key it can see, so its recall is 1 by
  construction; ``positions`` says how many counted. With no such position at all, recall is exactly 1.0
  (every selection was the full set) and ``positions`` is 0.
* **output fidelity**, bucketed by query position (0-4K, 4-16K, 16-64K, 64K+): per-token KL(dense || sparse)
  of the next-token distributions, top-1 agreement, and delta NLL of the true next token (sparse minus dense).
* both on a full **prefill** (chunked, through the cache, exactly as the engine prefills) and on
  token-by-token **decode**: each mode prefills the first ``L - N`` tokens in its own mode, then the last
  ``N`` tokens are fed one at a time (teacher-forced) through the cache and the logits compared per step.

Dense and sparse run side by side as two rows of one batch (the engine's per-row modes), so each forward
serves both. Documents are encoded with ``add_special_tokens=True`` (the model's BOS where it has one).

``dump_selection=LAYER`` (with ``out``) saves, for the first document of each length, which key positions
each query selected at that layer (``selection_layer<L>_<len>.npz``: ``q_positions``, ``selected`` (-1
padded), ``dense_map`` (binned head-summed dense attention), ...) and a PNG of the selection beside the
dense attention map.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from parca.evals import report
from parca.documents import read_documents
from parca.evals.haystack import EvalError
from parca.evals.run import bos_note, check_lengths, model_context, parse_lengths, special_prefix

BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (0, 4096, "0-4K"), (4096, 16384, "4-16K"), (16384, 65536, "16-64K"), (65536, None, "64K+"),
)
DEFAULT_DECODE_WINDOW = 64
# Budget for the float32 intermediates of one chunk (model attention, recall probabilities, logits): big
# enough that a 128K-token recall pass takes tens of query rows per call, not one.
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
DUMP_MAX_QUERIES = 1024  # query rows kept in a selection dump (evenly spaced when the length is longer)
DUMP_BINS = 256  # dense-map resolution per axis


# ---- input texts ------------------------------------------------------------------------------------
def load_texts(path: str | Path) -> list[tuple[str, str]]:
    """Documents from a file or a directory, as ``(name, text)``.

    The shared reader (:mod:`parca.documents`), strict: a ``.jsonl`` file gives one document per line (its
    ``text`` or ``context`` field); any other file is one document; a directory gives every
    ``.txt``/``.md``/``.text``/``.jsonl`` file in it (recursively, sorted). A bad file or line raises.
    """
    docs, _ = read_documents(path, flag="--text", strict=True, error_cls=EvalError)
    if not docs:
        raise EvalError(f"--text {path}: every document is empty")
    return [(d.name, d.text) for d in docs]


def _is_path(x: Any) -> bool:
    if isinstance(x, Path):
        return True
    if not isinstance(x, str) or "\n" in x or len(x) > 4096:
        return False
    try:
        return Path(x).exists()
    except OSError:  # e.g. a name too long to be a file: it is text
        return False


def as_texts(texts: str | Path | Sequence[str] | Sequence[tuple[str, str]]) -> list[str]:
    """Documents as strings: a file/directory path is read with :func:`load_texts`; a string is one text."""
    if _is_path(texts):
        return [t for _, t in load_texts(texts)]
    if isinstance(texts, str):
        return [texts]
    return [t[1] if isinstance(t, tuple) else t for t in texts]


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document with the tokenizer's special-token prefix (BOS) in front."""
    prefix = special_prefix(tokenizer)
    return [prefix + list(tokenizer.encode(t)) for t in texts]


# ---- running dense and sparse side by side ----------------------------------------------------------
def forward_rows(model: Any, ids: Any, cache: Any, start: int, modes: Sequence[str], topk: int | None, *,
                 observer: Callable | None = None, last_only: bool = False,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
    """One forward of the same tokens in ``len(modes)`` batch rows (row b in cache slot b, mode ``modes[b]``).

    Args:
        ids: (1, T) int64 tokens at positions ``start .. start+T-1``.

    Returns:
        (B, T, hidden) final normed hidden states (``lm_head`` of them are the logits), or (B, 1, hidden).
    """
    import torch

    from parca.models.base import ForwardContext

    b = len(modes)
    ctx = ForwardContext(slots=list(range(b)), starts=[start] * b, modes=list(modes),
                         topks=[topk if m == "sparse" else None for m in modes], observer=observer,
                         max_chunk_bytes=max_chunk_bytes)
    with torch.inference_mode():
        return model(ids.repeat(b, 1), cache, ctx, last_only=last_only, return_hidden=True)


def logit_rows(model: Any, hidden: Any, max_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
    """Yield ``(t0, t1, logits (B, t1-t0, V) float32)`` over ``hidden`` (B, T, hidden) in bounded chunks."""
    import torch

    b, t, _ = hidden.shape
    vocab = model.lm_head.weight.shape[0]
    step = max(1, max_bytes // (vocab * 4 * 6 * b))
    with torch.inference_mode():
        for t0 in range(0, t, step):
            t1 = min(t, t0 + step)
            yield t0, t1, model.lm_head(hidden[:, t0:t1]).float()


def bucket_of(pos: int) -> int:
    for i, (lo, hi, _) in enumerate(BUCKETS):
        if pos >= lo and (hi is None or pos < hi):
            return i
    return len(BUCKETS) - 1


class OutputStats:
    """KL(dense || sparse), top-1 agreement and delta NLL, summed per position bucket."""

    def __init__(self) -> None:
        n = len(BUCKETS)
        self.tokens = [0] * n
        self.kl = [0.0] * n
        self.kl_max = [0.0] * n
        self.top1 = [0] * n
        self.nll_tokens = [0] * n
        self.nll_dense = [0.0] * n
        self.nll_sparse = [0.0] * n

    def add(self, positions: Sequence[int], logits_dense: Any, logits_sparse: Any, targets: Sequence[int]) -> None:
        """positions (n,), logits (n, V), targets (n,) true next tokens (-1: none, e.g. the last position)."""
        import torch

        ld = torch.log_softmax(logits_dense.double(), -1)
        ls = torch.log_softmax(logits_sparse.double(), -1)
        # KL >= 0 in exact arithmetic; rounding can leave -1e-17 where the distributions agree
        kl = (ld.exp() * (ld - ls)).sum(-1).clamp_min(0.0)  # (n,)
        agree = ld.argmax(-1) == ls.argmax(-1)
        tgt = torch.tensor(list(targets), dtype=torch.int64, device=ld.device)
        has = tgt >= 0
        nd = -ld.gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
        ns = -ls.gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
        kl, agree, has, nd, ns = kl.tolist(), agree.tolist(), has.tolist(), nd.tolist(), ns.tolist()
        for j, p in enumerate(positions):
            i = bucket_of(int(p))
            self.tokens[i] += 1
            self.kl[i] += kl[j]
            self.kl_max[i] = max(self.kl_max[i], kl[j])
            self.top1[i] += int(agree[j])
            if has[j]:
                self.nll_tokens[i] += 1
                self.nll_dense[i] += nd[j]
                self.nll_sparse[i] += ns[j]

    @staticmethod
    def _entry(name: str, tokens: int, kl: float, kl_max: float, top1: int, n_nll: int, nd: float, ns: float) -> dict:
        return {
            "bucket": name, "tokens": tokens,
            "kl": kl / tokens if tokens else None, "kl_max": kl_max if tokens else None,
            "top1": top1 / tokens if tokens else None,
            "nll_tokens": n_nll,
            "nll_dense": nd / n_nll if n_nll else None, "nll_sparse": ns / n_nll if n_nll else None,
            "delta_nll": (ns - nd) / n_nll if n_nll else None,
        }

    def to_dict(self) -> dict[str, Any]:
        buckets = [self._entry(name, self.tokens[i], self.kl[i], self.kl_max[i], self.top1[i], self.nll_tokens[i],
                               self.nll_dense[i], self.nll_sparse[i]) for i, (_, _, name) in enumerate(BUCKETS)]
        overall = self._entry("all", sum(self.tokens), sum(self.kl), max(self.kl_max), sum(self.top1),
                              sum(self.nll_tokens), sum(self.nll_dense), sum(self.nll_sparse))
        return {"overall": overall, "buckets": buckets}


def _probs_chunk_rows(q: Any, k: Any, max_bytes: int) -> int:
    """Query rows per ``head_summed_probs`` call so its intermediates stay in budget: per query row and key,
    one kv-head group's scores, mask and softmax (3 x G float32) plus the running sum and the visibility mask."""
    g = max(1, q.shape[2] // max(1, k.shape[2]))
    return max(1, max_bytes // (max(1, k.shape[1]) * (12 * g + 9)))


class RecallStats:
    """Per-layer attention recall of the selection of one batch row, fed by the model's observer.

    Only queries that see more than ``k`` keys count (the others select everything they see).
    """

    def __init__(self, n_layers: int, row: int = 1, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
        self.sums = [0.0] * n_layers
        self.counts = [0] * n_layers
        self.row = row
        self.max_chunk_bytes = max_chunk_bytes

    def observe(self, lv: Any) -> None:
        import torch

        from parca.sparse import attention_recall, head_summed_probs

        if lv.row != self.row or lv.idx is None:
            return  # the dense row, or the dense shortcut (context <= k): recall 1, nothing to count
        k = lv.idx.shape[-1]
        pos = lv.q_pos[0]  # (T,)
        visible = pos + 1 if lv.window is None else (pos + 1).clamp_max(lv.window)
        counted = visible > k  # (T,)
        n = int(counted.sum())
        if n == 0:
            return
        t = pos.shape[0]
        first = int(torch.nonzero(counted)[0, 0])
        step = _probs_chunk_rows(lv.q, lv.k, self.max_chunk_bytes)
        total = 0.0
        for a in range(first, t, step):
            b = min(t, a + step)
            m = counted[a:b]
            if not bool(m.any()):
                continue
            hi = int(pos[b - 1]) + 1  # keys beyond the chunk's last query are invisible to all of it
            target = head_summed_probs(lv.q[:, a:b], lv.k[:, :hi], lv.q_pos[:, a:b], lv.scale, window=lv.window)
            r = attention_recall(target, lv.idx[:, a:b])[0]  # (b-a,)
            total += float(r[m].double().sum())
        self.sums[lv.layer] += total
        self.counts[lv.layer] += n

    def to_dict(self) -> dict[str, Any]:
        per = [{"layer": i, "recall": (s / c) if c else 1.0, "positions": c}
               for i, (s, c) in enumerate(zip(self.sums, self.counts))]
        counted = [p for p in per if p["positions"]]
        mean = sum(p["recall"] for p in counted) / len(counted) if counted else 1.0
        return {"per_layer": per, "mean": mean, "positions": max((p["positions"] for p in per), default=0)}


class SelectionDump:
    """For one layer of the sparse row: the keys each (sampled) query selected, and a binned dense map."""

    def __init__(self, layer: int, length: int, topk: int, row: int = 1,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
        import numpy as np

        self.layer, self.length, self.topk, self.row = layer, length, topk, row
        self.max_chunk_bytes = max_chunk_bytes
        if length <= DUMP_MAX_QUERIES:
            qs = np.arange(length)
        else:
            qs = np.unique(np.linspace(0, length - 1, DUMP_MAX_QUERIES).round().astype(np.int64))
        self.q_positions = qs
        self._row_of = {int(p): i for i, p in enumerate(qs)}
        self.selected = np.full((len(qs), topk), -1, dtype=np.int32)
        self.bins = min(DUMP_BINS, length)
        self.dense_sum = np.zeros((self.bins, self.bins), dtype=np.float64)
        self.q_count = np.zeros(self.bins, dtype=np.int64)
        edges = (np.arange(length) * self.bins) // length
        self.k_per_bin = np.bincount(edges, minlength=self.bins)
        self._bin = edges

    def observe(self, lv: Any) -> None:
        import numpy as np
        import torch

        from parca.sparse import head_summed_probs

        if lv.row != self.row or lv.layer != self.layer:
            return
        pos = lv.q_pos[0].tolist()
        # selection of the sampled queries: the indexer's pick, or every visible key (dense shortcut)
        for j, p in enumerate(pos):
            i = self._row_of.get(int(p))
            if i is None:
                continue
            if lv.idx is not None:
                self.selected[i] = lv.idx[0, j].to(torch.int32).cpu().numpy()
            else:
                lo = 0 if lv.window is None else max(0, p - lv.window + 1)
                keys = np.arange(lo, p + 1, dtype=np.int32)[::-1][: self.topk]
                self.selected[i, : len(keys)] = keys
        step = _probs_chunk_rows(lv.q, lv.k, self.max_chunk_bytes)
        t = len(pos)
        kbin = torch.as_tensor(self._bin, device=lv.q.device)
        for a in range(0, t, step):
            b = min(t, a + step)
            hi = pos[b - 1] + 1
            probs = head_summed_probs(lv.q[:, a:b], lv.k[:, :hi], lv.q_pos[:, a:b], lv.scale, window=lv.window)[0]
            pooled = torch.zeros(b - a, self.bins, dtype=torch.float64, device=probs.device)
            pooled.index_add_(1, kbin[:hi], probs.double())  # (rows, key bins)
            qb = self._bin[pos[a]:pos[b - 1] + 1]
            np.add.at(self.dense_sum, qb, pooled.cpu().numpy())
            np.add.at(self.q_count, qb, 1)

    def save(self, out: Path, recall: float | None) -> list[str]:
        import numpy as np

        out.mkdir(parents=True, exist_ok=True)
        denom = np.outer(np.maximum(self.q_count, 1), np.maximum(self.k_per_bin, 1))
        dense_map = self.dense_sum / denom  # mean head-summed probability per (query bin, key bin)
        stem = out / f"selection_layer{self.layer}_{report.fmt_length(self.length)}"
        npz = stem.with_suffix(".npz")
        np.savez_compressed(npz, q_positions=self.q_positions, selected=self.selected, dense_map=dense_map,
                            bin_edges=np.searchsorted(self._bin, np.arange(self.bins)), layer=self.layer,
                            length=self.length, topk=self.topk)
        title = (f"layer {self.layer}, {self.length} tokens, top-k {self.topk}"
                 + ("" if recall is None else f", recall {recall:.4f}"))
        png = report.plot_selection(dense_map, self.length, self.q_positions.tolist(), self.selected,
                                    stem.with_suffix(".png"), title)
        return [str(npz), str(png)]


def _both(*fns: Callable | None) -> Callable | None:
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None

    def call(lv: Any) -> None:
        for f in fns:
            f(lv)

    return call


def _prefill_pass(model: Any, ids: list[int], topk: int, chunk: int, stats: OutputStats, recall: RecallStats,
                  dump: SelectionDump | None, max_bytes: int) -> None:
    import torch

    t = len(ids)
    x = torch.tensor([ids], device=model.model.embed_tokens.weight.device)
    cache = model.make_cache(2, t)
    obs = _both(recall.observe, None if dump is None else dump.observe)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        h = forward_rows(model, x[:, t0:t1], cache, t0, ("dense", "sparse"), topk, observer=obs,
                         max_chunk_bytes=max_bytes)
        for a, b, logits in logit_rows(model, h, max_bytes):
            pos = list(range(t0 + a, t0 + b))
            stats.add(pos, logits[0], logits[1], [ids[p + 1] if p + 1 < t else -1 for p in pos])


def _decode_pass(model: Any, ids: list[int], topk: int, window: int, chunk: int, stats: OutputStats,
                 recall: RecallStats, max_bytes: int) -> None:
    import torch

    t = len(ids)
    p0 = t - window
    x = torch.tensor([ids], device=model.model.embed_tokens.weight.device)
    cache = model.make_cache(2, t)
    for t0 in range(0, p0, chunk):  # each row prefills in its own mode (sparse decode reads a sparse prefix)
        forward_rows(model, x[:, t0:min(p0, t0 + chunk)], cache, t0, ("dense", "sparse"), topk, last_only=True,
                     max_chunk_bytes=max_bytes)
    for p in range(p0, t):
        h = forward_rows(model, x[:, p:p + 1], cache, p, ("dense", "sparse"), topk, observer=recall.observe,
                         max_chunk_bytes=max_bytes)
        logits = model.lm_head(h).float()  # (2,1,V)
        stats.add([p], logits[0], logits[1], [ids[p + 1] if p + 1 < t else -1])


def fidelity(
    model: Any,
    tokenizer: Any,
    texts: str | Path | Sequence[str] | Sequence[tuple[str, str]],
    lengths: str | Sequence[int | str] | None = None,
    *,
    index_topk: int | None = None,
    decode_window: int = DEFAULT_DECODE_WINDOW,
    max_docs: int | None = None,
    prefill_chunk: int = 2048,
    dump_selection: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> dict[str, Any]:
    """Recall, KL, top-1 agreement and delta NLL of sparse vs dense, on prefill and on decode.

    Args:
        model: a parca model with indexers.
        tokenizer: the model's tokenizer.
        texts: documents (strings, ``(name, text)`` pairs, or a file/directory path for :func:`load_texts`).
        lengths: token counts to measure at (each document with at least that many tokens, cut to it);
            default ``min(4096, context)``.
        index_topk: keys each sparse query selects (default: the indexer config's).
        decode_window: the last N tokens are decoded one at a time (N < length).
        max_docs: at most this many documents per length.
        prefill_chunk: tokens per prefill forward.
        dump_selection: a layer whose selections (first document per length) are saved to ``out``.
        out: directory for ``fidelity.json`` and the selection dumps.

    Returns:
        A JSON-ready dict: ``index_topk``, ``bos``, ``decode_window``, ``buckets`` and ``lengths``: one entry
        per length with ``documents``, ``prefill`` and ``decode`` (each ``recall`` + ``output``).
    """
    sc = getattr(model, "sparse_config", None)
    if sc is None:
        raise EvalError("fidelity compares sparse to dense attention and needs indexers: pass --indexer ADIR "
                        "(from `parca indexer init` or `parca retrofit`)")
    k = int(index_topk or sc.index_topk)
    if k < 1:
        raise EvalError(f"index_topk must be a positive integer, got {index_topk!r}")
    context = model_context(model)
    lengths = [min(4096, context)] if lengths is None else parse_lengths(lengths)
    check_lengths(lengths, context)
    n_layers = len(model.model.layers)
    if dump_selection is not None:
        if not 0 <= int(dump_selection) < n_layers:
            raise EvalError(f"--dump-selection {dump_selection}: the model has layers 0..{n_layers - 1}")
        if out is None:
            raise EvalError("--dump-selection needs --out DIR (where the .npz and .png go)")
    if decode_window < 1:
        raise EvalError(f"--decode-window must be >= 1, got {decode_window}")
    docs = encode_documents(tokenizer, as_texts(texts))
    if not docs:
        raise EvalError("no documents given")
    out_dir = None if out is None else Path(out)
    from tqdm.auto import tqdm

    plan = []
    for length in lengths:
        use = [d[:length] for d in docs if len(d) >= length]
        if max_docs is not None:
            use = use[: int(max_docs)]
        plan.append((length, use))
    result: dict[str, Any] = {
        "index_topk": k, "bos": bos_note(tokenizer), "decode_window": decode_window,
        "prefill_chunk": prefill_chunk, "buckets": [b[2] for b in BUCKETS], "lengths": [], "files": [],
    }
    bar = tqdm(total=sum(len(u) for _, u in plan), desc="fidelity", unit="doc", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for length, use in plan:
            if not use:
                longest = max(len(d) for d in docs)
                result["lengths"].append({"length": length, "documents": 0,
                                          "skipped": f"no document has {length} tokens (longest: {longest})"})
                continue
            n_dec = min(decode_window, length - 1)
            pre_out, pre_rec = OutputStats(), RecallStats(n_layers, max_chunk_bytes=max_chunk_bytes)
            dec_out, dec_rec = OutputStats(), RecallStats(n_layers, max_chunk_bytes=max_chunk_bytes)
            dump = None
            for j, ids in enumerate(use):
                bar.set_postfix_str(f"{report.fmt_length(length)}", refresh=False)
                if dump_selection is not None and j == 0:
                    dump = SelectionDump(int(dump_selection), length, k, max_chunk_bytes=max_chunk_bytes)
                _prefill_pass(model, ids, k, prefill_chunk, pre_out, pre_rec, dump if j == 0 else None, max_chunk_bytes)
                if n_dec >= 1:
                    _decode_pass(model, ids, k, n_dec, prefill_chunk, dec_out, dec_rec, max_chunk_bytes)
                bar.update(1)
            pre_recall = pre_rec.to_dict()
            entry = {
                "length": length, "documents": len(use),
                "prefill": {"positions": [0, length], "recall": pre_recall, "output": pre_out.to_dict()},
                "decode": {"positions": [length - n_dec, length], "recall": dec_rec.to_dict(),
                           "output": dec_out.to_dict()},
            }
            if dump is not None and out_dir is not None:
                layer_recall = pre_recall["per_layer"][dump.layer]["recall"]
                files = dump.save(out_dir, layer_recall)
                entry["selection_files"] = files
                result["files"].extend(files)
            result["lengths"].append(entry)
    finally:
        bar.close()
    if all(not e["documents"] for e in result["lengths"]):
        longest = max(len(d) for d in docs)
        raise EvalError(f"no document reaches any of the lengths {', '.join(map(str, lengths))} "
                        f"(longest document: {longest} tokens); pass longer texts or shorter --lengths")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "fidelity.json"
        result["files"].append(str(path))
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


__all__ = [
    "BUCKETS",
    "OutputStats",
    "RecallStats",
    "SelectionDump",
    "as_texts",
    "encode_documents",
    "fidelity",
    "forward_rows",
    "load_texts",
    "logit_rows",
]
