"""Per-sample scorers, each returning a float in [0, 1] (a runner reports the mean x 100).

* ``match_all``: the fraction of expected strings found in the output (RULER's needle, variable
  tracking and word tasks);
* ``match_part``: 1 if any expected string is found (QA-style tasks, user JSONL data);
* ``passkey``: 1 if the first integer in the output equals the pass key (Landmark Attention).

"Found" is RULER's rule: case-insensitive substring match, no other normalisation, so "the number is
1234567." matches "1234567" and extra words never cost anything.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from parca.evals.haystack import EvalError


def _check(prediction: str, answers: Sequence[str]) -> None:
    if not isinstance(prediction, str):
        raise EvalError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not answers:
        raise EvalError(f"answers must be a non-empty list of strings, got {answers!r}")


def match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` that occur (case-insensitively) in ``prediction``."""
    _check(prediction, answers)
    pred = prediction.lower()
    return sum(1.0 for a in answers if str(a).lower() in pred) / len(answers)


def match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` occurs (case-insensitively) in ``prediction``, else 0.0."""
    _check(prediction, answers)
    pred = prediction.lower()
    return 1.0 if any(str(a).lower() in pred for a in answers) else 0.0


# A run of digits, allowing thousands separators ("12,345" reads as 12345).
_INT_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


def first_integer(text: str) -> int | None:
    """The first integer written in ``text`` (digits, optionally with thousands commas), or None."""
    m = _INT_RE.search(text)
    return int(m.group().replace(",", "")) if m else None


def passkey_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the first integer in ``prediction`` equals ``int(answers[0])``."""
    _check(prediction, answers)
    got = first_integer(prediction)
    return 1.0 if got is not None and got == int(str(answers[0]).strip()) else 0.0


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "match_all": match_all,
    "match_part": match_part,
    "passkey": passkey_match,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one output with the named metric (``match_all``, ``match_part`` or ``passkey``), in [0, 1]."""
    try:
        fn = SCORERS[metric]
    except KeyError:
        raise EvalError(f"unknown metric {metric!r}; known metrics: {', '.join(SCORERS)}") from None
    return fn(prediction, answers)
