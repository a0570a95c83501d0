"""Your own long-context data through the same runner and scoring: JSONL with ``context``, ``question``, ``answers``.

One JSON object per line (blank lines are skipped)::

    {"context": "<long document>", "question": "Who signed the lease?", "answers": ["Ada Lovelace"]}

Optional fields: ``id`` (any JSON scalar, kept in the per-sample records) and ``max_new_tokens`` (a positive
int; default :data:`DEFAULT_MAX_NEW_TOKENS`). The task name is ``user``, the metric ``match_part`` (1 if any
answer occurs, case-insensitively, in the output), and the prompt is::

    <context>\\n\\n<question>\\nAnswer:

Every bad line is reported with its line number (all of them, in one error), so a file is fixed in one pass.

Lengths: a record runs once, at its own size; the runner files it under the smallest requested length that
holds its prompt + answer tokens (a bucket, like LongBench's 0-4K / 4-8K / 8K+). A record longer than the
largest requested length has its context cut in the middle (head and tail kept, LongBench's rule) to fit,
and is marked ``truncated`` in its record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from parca.evals.haystack import EvalError
from parca.evals.tasks.base import Sample

USER_TASK = "user"
USER_METRIC = "match_part"
DEFAULT_MAX_NEW_TOKENS = 64
ANSWER_PREFIX = "Answer:"
MAX_REPORTED_ERRORS = 20


@dataclass
class UserRecord:
    """One line of a user JSONL file (``index``: 0-based among records, ``line``: 1-based line number)."""

    index: int
    line: int
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    id: Any = None
    extra: dict = field(default_factory=dict)


def user_prompt(context: str, question: str) -> str:
    """The prompt a user record becomes: context, question, then the answer prefix the model continues."""
    return f"{context}\n\n{question}\n{ANSWER_PREFIX}"


def _check_record(obj: Any, default_max_new: int) -> tuple[dict[str, Any] | None, str | None]:
    """(fields, None) for a good record, (None, what is wrong) for a bad one."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object with context, question, answers; got a {type(obj).__name__}"
    missing = [k for k in ("context", "question", "answers") if k not in obj]
    if missing:
        return None, f"missing field(s) {', '.join(missing)} (each line needs context, question, answers)"
    if not isinstance(obj["context"], str):
        return None, f"'context' must be a string, got {type(obj['context']).__name__}"
    if not isinstance(obj["question"], str):
        return None, f"'question' must be a string, got {type(obj['question']).__name__}"
    answers = obj["answers"]
    if isinstance(answers, str) or not isinstance(answers, list) or not answers:
        return None, f"'answers' must be a non-empty list of strings, got {answers!r:.80}"
    if not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) and str(a).strip() for a in answers):
        return None, "'answers' must hold non-empty strings (or numbers)"
    max_new = obj.get("max_new_tokens", default_max_new)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        return None, f"'max_new_tokens' must be a positive integer, got {max_new!r}"
    extra = {k: v for k, v in obj.items() if k not in ("context", "question", "answers", "max_new_tokens", "id")}
    return {"context": obj["context"], "question": obj["question"], "answers": [str(a) for a in answers],
            "max_new_tokens": max_new, "id": obj.get("id"), "extra": extra}, None


def parse_user_lines(lines: Sequence[str], where: str = "<data>",
                     default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[UserRecord]:
    """Parse JSONL lines into records; every bad line is reported (by 1-based line number) in one EvalError."""
    records: list[UserRecord] = []
    errors: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{where} line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        fields, problem = _check_record(obj, default_max_new_tokens)
        if problem is not None:
            errors.append(f"{where} line {lineno}: {problem}")
            continue
        records.append(UserRecord(index=len(records), line=lineno, **fields))
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"; and {len(errors) - len(shown)} more bad line(s)" if len(errors) > len(shown) else ""
        raise EvalError(f"{len(errors)} bad line(s) in user data: " + "; ".join(shown) + more)
    if not records:
        raise EvalError(f"{where}: no records (expected JSON lines with context, question, answers)")
    return records


def load_user_data(path: str | Path, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[UserRecord]:
    """Read a user JSONL file (see the module docstring). Raises EvalError naming the file and bad lines."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--data {p}: not found (expected a JSONL file with context, question, answers per line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalError(f"--data {p}: not UTF-8 text") from None
    return parse_user_lines(text.splitlines(), where=str(p), default_max_new_tokens=default_max_new_tokens)


def records_digest(records: Sequence[UserRecord]) -> str:
    """A short hash of the records' content (a resumed run refuses a changed data file)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.context, r.question, r.answers, r.max_new_tokens], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def fit_user_sample(record: UserRecord, tokenizer: Any, budget: int) -> tuple[Sample, int, bool]:
    """The record as a :class:`Sample` whose prompt (with special tokens) + answer fits ``budget`` tokens.

    The context is cut in the middle (head and tail kept) only when the whole prompt does not fit.

    Returns:
        (sample, total tokens = prompt ids with special tokens + max_new_tokens, truncated?).

    Raises:
        EvalError: the question and answer alone exceed the budget.
    """

    def total(ctx: str) -> int:
        return len(tokenizer.encode(user_prompt(ctx, record.question), add_special_tokens=True)) + record.max_new_tokens

    context = record.context
    n = total(context)
    truncated = False
    if n > budget:
        truncated = True
        ctx_ids = tokenizer.encode(context)
        fixed = total("")
        if fixed > budget:
            raise EvalError(
                f"user data line {record.line}: the question and answer prefix take {fixed - record.max_new_tokens} "
                f"tokens and {record.max_new_tokens} more are reserved for the answer, over the largest length "
                f"{budget}; use a larger --lengths value or a shorter question"
            )
        keep = max(0, len(ctx_ids) - (n - budget))
        for _ in range(8):  # decode/encode seams can shift the count by a token or two: shrink until it fits
            head = keep // 2
            context = tokenizer.decode(ctx_ids[:head]) + tokenizer.decode(ctx_ids[len(ctx_ids) - (keep - head):] if keep - head else [])
            n = total(context)
            if n <= budget or keep == 0:
                break
            keep = max(0, keep - (n - budget) - 1)
        if n > budget:
            context, n = "", fixed
    sample = Sample(
        task=USER_TASK, length=budget, index=record.index, context=context,
        prompt=user_prompt(context, record.question), answers=list(record.answers), metric=USER_METRIC,
        max_new_tokens=record.max_new_tokens, depth=None,
        meta={"line": record.line, "id": record.id, "truncated": truncated, **({"extra": record.extra} if record.extra else {})},
    )
    return sample, n, truncated


__all__ = [
    "ANSWER_PREFIX",
    "DEFAULT_MAX_NEW_TOKENS",
    "USER_METRIC",
    "USER_TASK",
    "UserRecord",
    "fit_user_sample",
    "load_user_data",
    "parse_user_lines",
    "records_digest",
    "user_prompt",
]
