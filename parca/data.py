"""Training text for ``parca retrofit``: files, directories, JSONL, or synthetic retrieval text, packed.

    docs = read_documents(["notes/", "corpus.jsonl", "synthetic"], tokenizer=tok, seq_len=4096)
    data = load_packed(["notes/", "corpus.jsonl"], tok, seq_len=4096, n_heldout=4, seed=0)
    data.train    # (N, seq_len) int64 training sequences
    data.heldout  # (H, seq_len) int64 sequences never trained on (recall / KL evaluation)

Sources (``--data PATH [PATH...]``):

* a text file (any name; ``.jsonl`` files are read as JSONL), UTF-8;
* a directory: every ``*.txt``, ``*.md``, ``*.text`` and ``*.jsonl`` below it, recursively, in sorted path
  order (hidden files and folders ignored);
* a JSONL file: one JSON object per line with a string ``text`` (or ``context``) field (blank lines are
  skipped);
* the word ``synthetic``: generated long-range retrieval text (key/value records in filler prose, asked
  back at the end; plus the eval task generators' prompts when ``seq_len`` is long enough for them).

Documents are tokenized with the model's tokenizer (no special tokens), joined with the EOS token (BOS
when there is no EOS) after each document, and cut into ``seq_len`` windows; the tail shorter than one
window is dropped. Files are read by the shared reader (:mod:`parca.documents`) with its strict policy:
every mistake (no data, binary file, JSONL line without text) is a ``DataError`` naming the file (and
line). Imports no torch at module level: ``pack`` and ``load_packed`` import it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from . import documents as _documents
from .errors import ParcaError

__all__ = [
    "DataError",
    "SYNTHETIC",
    "TEXT_SUFFIXES",
    "PackedData",
    "discover_files",
    "read_documents",
    "synthetic_documents",
    "pack",
    "load_packed",
    "batch_indices",
]

SYNTHETIC = "synthetic"
TEXT_SUFFIXES = _documents.SUFFIXES


class DataError(ParcaError):
    """Training data is missing, empty, binary, or malformed."""


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


# ---- reading files (the shared reader, strict policy) --------------------------------------------
def discover_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand ``--data`` paths into files: directories recursively (``TEXT_SUFFIXES`` only), files as given.

    ``synthetic`` entries are skipped (see ``read_documents``). Raises DataError for a missing path or a
    directory without any text file.
    """
    files: list[Path] = []
    for raw in paths:
        if str(raw) == SYNTHETIC:
            continue
        if not Path(raw).exists():
            raise DataError(f"--data {raw}: no such file or directory (or pass 'synthetic' for generated text)")
        files.extend(_documents.text_files(raw, flag="--data", error_cls=DataError))
    return files


def read_documents(paths: Sequence[str | Path], *, tokenizer: Any = None, seq_len: int = 0,
                   synthetic_docs: int = 64, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` for every document of ``paths`` in order; empty documents are skipped.

    Files are read by :func:`parca.documents.read_documents` with the strict policy: the first binary,
    non-UTF-8 or malformed JSONL input raises ``DataError`` naming the file and line. ``synthetic`` entries
    need ``tokenizer`` and ``seq_len`` and yield ``synthetic_docs`` generated documents.
    """
    discover_files(paths)  # fail fast on a missing path before reading anything
    for raw in paths:
        if str(raw) == SYNTHETIC:
            if tokenizer is None or seq_len <= 0:
                raise ValueError("read_documents: 'synthetic' needs tokenizer and seq_len")
            for doc in synthetic_documents(tokenizer, seq_len, synthetic_docs, seed=seed):
                yield SYNTHETIC, doc
            continue
        docs, _ = _documents.read_documents(raw, flag="--data", strict=True, error_cls=DataError)
        for d in docs:
            yield d.path, d.text


# ---- synthetic long-range retrieval text -------------------------------------------------------
_EVAL_TASKS = ("niah_single_2", "passkey", "vt", "niah_multikey_1")


def _records_document(rng: random.Random, target_chars: int) -> str:
    """Key/value records scattered in prose, then every key asked back: answering needs long-range attention."""
    from .evals.haystack import load_words, prose_units, take_units

    adjs, nouns = load_words("adjectives"), load_words("nouns")
    units = prose_units()
    n_keys = max(1, target_chars // 600)
    keys = [f"{rng.choice(adjs)} {rng.choice(nouns)}" for _ in range(n_keys)]
    values = [str(rng.randrange(10_000, 100_000)) for _ in range(n_keys)]
    records = [f"The special number of the {k} is {v}." for k, v in zip(keys, values)]
    questions = [f"Q: the special number of the {k}? A: {v}." for k, v in zip(keys, values)]
    rng.shuffle(questions)
    recall = " ".join(questions)
    filler_chars = max(0, target_chars - sum(map(len, records)) - len(recall))
    per_gap = filler_chars // (len(records) + 1)
    parts: list[str] = []
    for rec in records:
        parts.append(take_units(units, rng.randrange(len(units)), max(1, per_gap // 6)))
        parts.append(rec)
    parts.append(take_units(units, rng.randrange(len(units)), max(1, per_gap // 6)))
    return " ".join(parts) + "\n\nRecall the special numbers. " + recall


def synthetic_documents(tokenizer: _Encoder, seq_len: int, n: int, *, seed: int = 0) -> list[str]:
    """``n`` generated documents of roughly ``seq_len`` tokens each, deterministic in ``seed``.

    Own template (records in prose, asked back at the end) for every document; the eval task generators
    (``niah_single_2``, ``passkey``, ``vt``, ``niah_multikey_1``) add variety where ``seq_len`` is at least
    their minimum length (about 600 tokens with a small vocabulary), alternating with the template.
    """
    from .evals import EvalError, get_task

    rng = random.Random(f"parca-synthetic-{seed}")
    # chars per token of this tokenizer on the template text, measured once
    probe = _records_document(random.Random(0), 2000)
    cpt = max(1.0, len(probe) / max(1, len(tokenizer.encode(probe))))
    usable = []
    for name in _EVAL_TASKS:
        try:
            get_task(name).generate(tokenizer, seq_len, seed=seed, index=0)
            usable.append(name)
        except EvalError:
            pass
    docs = []
    for i in range(n):
        if usable and i % 2:
            s = get_task(usable[(i // 2) % len(usable)]).generate(tokenizer, seq_len, seed=seed, index=i)
            docs.append(s.prompt + " " + s.answers[0])
        else:
            docs.append(_records_document(rng, int(seq_len * cpt)))
    return docs


# ---- packing -------------------------------------------------------------------------------------
@dataclass
class PackedData:
    """Packed token windows. ``train`` (N, L) and ``heldout`` (H, L) int64; ``sources`` lists what was read."""

    train: Any
    heldout: Any
    tokens: int
    documents: int
    sources: list[str] = field(default_factory=list)


def pack(docs: Iterable[list[int]], seq_len: int, sep_id: int | None):
    """Concatenate token lists (``sep_id`` after each) and cut into ``seq_len`` windows.

    Returns:
        (N, seq_len) int64 tensor; the tail shorter than ``seq_len`` is dropped.
    """
    import torch

    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        if sep_id is not None:
            flat.append(sep_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.int64).view(n, seq_len)  # (N, L)


def load_packed(paths: Sequence[str | Path], tokenizer: Any, seq_len: int, *, n_heldout: int = 4, seed: int = 0,
                synthetic_docs: int = 64) -> PackedData:
    """Read, tokenize and pack ``paths``; hold out ``n_heldout`` windows (a seeded choice) for evaluation.

    Raises DataError when the data gives fewer than ``n_heldout + 1`` windows (naming the token count).
    """
    import torch

    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: must be at least 2")
    sources: list[str] = []
    token_lists: list[list[int]] = []
    for source, text in read_documents(paths, tokenizer=tokenizer, seq_len=seq_len, synthetic_docs=synthetic_docs,
                                       seed=seed):
        sources.append(source)
        token_lists.append(tokenizer.encode(text, add_special_tokens=False))
    total = sum(map(len, token_lists))
    shown = " ".join(str(p) for p in paths)
    if not token_lists or total == 0:
        raise DataError(f"--data {shown}: no text found (all files empty); give text files, a directory of "
                        "*.txt/*.md/*.jsonl files, JSONL with a 'text' field, or 'synthetic'")
    sep = getattr(tokenizer, "eos_id", None)
    if sep is None:
        sep = getattr(tokenizer, "bos_id", None)
    seqs = pack(token_lists, seq_len, sep)
    need = n_heldout + 1
    if seqs.shape[0] < need:
        raise DataError(
            f"--data {shown}: {total:,} tokens make {seqs.shape[0]} window(s) of --seq-len {seq_len}, but "
            f"{need} are needed ({n_heldout} held out for evaluation + at least 1 to train on); add data or "
            f"lower --seq-len"
        )
    perm = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed))
    heldout = seqs[perm[:n_heldout].sort().values]
    train = seqs[perm[n_heldout:].sort().values]
    return PackedData(train=train, heldout=heldout, tokens=total, documents=len(token_lists),
                      sources=sorted(set(sources)))


def batch_indices(n_train: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Training-window indices of global step ``step``: a fixed, seeded shuffle per epoch.

    The data cursor is ``step * batch_size`` windows; the order depends only on (``seed``, epoch), so a resumed
    run reads exactly the windows an uninterrupted run would.
    """
    import torch

    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out
