"""Haystack material and sizing for the long-context tasks.

Three kinds of material, all shipped with the package (no download at run time):

* ``noise``: one self-written filler paragraph, repeated (RULER's "noise" haystack, own words);
* ``prose``: public-domain literature in ``data/prose.txt`` (Milton, Britannica 1911, Shakespeare),
  read from a seeded paragraph onwards and wrapped around at the end;
* word lists (``data/*.txt``): adjectives and nouns for "adjective-noun" keys, common English words.

Streams are cut into *units* = one word plus the whitespace after it, so a haystack of n units is
``"".join(units[start:start + n])`` and keeps the source's line breaks. A task sizes its haystack by
choosing n with :func:`fit_to_budget`, which needs only a handful of full-prompt encodes (an estimate
from a probe, then secant steps inside a bracket), so a 128K-token prompt sizes in well under a second
with a Rust BPE tokenizer.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Protocol, Sequence

from parca.errors import ParcaError


class EvalError(ParcaError, ValueError):
    """A bad eval request: unknown task or metric, a length too small for a task, a bad depth or length string.

    Also a ``ValueError`` so callers that only know the builtin family can catch it.
    """


class BudgetTooSmall(EvalError):
    """The fixed parts of a prompt (with the smallest haystack) already exceed the token budget."""

    def __init__(self, message: str, needed: int, budget: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.budget = budget


class Tokenizer(Protocol):
    """What the tasks need from a tokenizer: ``encode`` without special tokens (and ``decode``)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens ``tokenizer.encode(text)`` gives (also accepts an HF ``Encoding`` with ``.ids``)."""
    ids: Any = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))


# ---------------------------------------------------------------------------------------------
# material

# Self-written filler; five short sentences so a needle can snap to a sentence end every ~10 words.
NOISE = (
    "The fields are quiet and the river runs slowly past the old mill. "
    "A few clouds drift over the hills. "
    "Nothing much happens here, and nobody minds. "
    "The path goes down to the water and back up again. "
    "Evening comes, and the lamps are lit one by one."
)

_UNIT_RE = re.compile(r"\S+\s*")
_DATA = "data"


def _data_text(name: str) -> str:
    return resources.files("parca.evals").joinpath(_DATA, name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def load_words(name: str) -> tuple[str, ...]:
    """A shipped word list (``adjectives``, ``nouns``, ``common_words``): lower-case, unique, in file order.

    Lines starting with ``#`` are comments (each file opens with one naming its source).
    """
    words: list[str] = []
    seen: set[str] = set()
    for line in _data_text(f"{name}.txt").splitlines():
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        if not (w.isascii() and w.isalpha() and w.islower()):
            raise EvalError(f"word list data/{name}.txt: {w!r} is not a lower-case ASCII word")
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


@functools.lru_cache(maxsize=None)
def prose_text() -> str:
    """The prose haystack without its header line (plain ASCII text, paragraphs split by blank lines)."""
    text = _data_text("prose.txt")
    if text.startswith("#"):
        text = text.split("\n", 1)[1]
    return text


@functools.lru_cache(maxsize=None)
def prose_units() -> tuple[str, ...]:
    units = _UNIT_RE.findall(prose_text())
    # The stream wraps around: give the last word a paragraph break so the restart reads as a new paragraph.
    units[-1] = units[-1].rstrip() + "\n\n"
    return tuple(units)


@functools.lru_cache(maxsize=None)
def prose_paragraph_starts() -> tuple[int, ...]:
    """Unit indices at which a paragraph starts (valid seeded starting points of a prose haystack)."""
    units = prose_units()
    return tuple(i for i in range(len(units)) if i == 0 or units[i - 1].endswith("\n\n"))


@functools.lru_cache(maxsize=None)
def noise_units() -> tuple[str, ...]:
    return tuple(_UNIT_RE.findall(NOISE + " "))


def take_units(units: Sequence[str], start: int, n: int) -> str:
    """``n`` units of a cyclic stream from ``start``, trailing whitespace removed."""
    if n <= 0:
        return ""
    size = len(units)
    start %= size
    if start + n <= size:
        text = "".join(units[start : start + n])
    else:
        text = "".join(itertools.islice(itertools.cycle(units), start, start + n))
    return text.rstrip()


# ---------------------------------------------------------------------------------------------
# needle placement

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace or the
# end of the text, or at a blank line. A needle goes right after such an end (or at the very start).
_SENT_END = re.compile(r"""[.!?]['")\]]*(?=\s|$)|\n[ \t]*\n""")


def sentence_boundary_before(text: str, pos: int) -> int:
    """The last sentence boundary at or before ``pos`` (0 if there is none): where a needle may go."""
    pos = max(0, min(pos, len(text)))
    window = 2048
    while True:
        lo = max(0, pos - window)
        last = -1
        for m in _SENT_END.finditer(text, lo, pos):
            last = m.end()
        if last >= 0:
            return last
        if lo == 0:
            return 0
        window *= 4


def insert_at_depths(hay: str, needles: Sequence[tuple[float, str]]) -> str:
    """Insert each ``(depth_percent, sentence)`` at ``depth``% of ``hay``, moved back to the previous sentence end.

    Positions are computed on the original haystack, so needles never split one another; needles that
    land on the same boundary keep their given order.
    """
    placed = []
    for order, (depth, needle) in enumerate(needles):
        pos = sentence_boundary_before(hay, round(len(hay) * depth / 100.0))
        placed.append((pos, order, needle))
    placed.sort()
    out: list[str] = []
    prev = 0
    for pos, _, needle in placed:
        out.append(hay[prev:pos])
        if pos == 0 or hay[pos - 1].isspace():
            out.append(needle + (" " if pos < len(hay) else ""))
        else:
            out.append(" " + needle)
        prev = pos
    out.append(hay[prev:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# sizing


MIN_TOKENS_PER_UNIT = 0.05


@dataclass
class Fit:
    """Result of :func:`fit_to_budget`: the chosen unit count, its rendered text and token count."""

    n: int
    text: str
    tokens: int
    encodes: int


def fit_to_budget(
    render: Callable[[int], str],
    count: Callable[[str], int],
    budget: int,
    *,
    n_min: int,
    slack: int,
    probe: int = 256,
    n_max: int | None = None,
    what: str = "prompt",
) -> Fit:
    """The largest-ish ``n`` with ``budget - slack <= count(render(n)) <= budget``.

    ``count(render(n))`` must grow (roughly linearly) with ``n``. Starts from a probe estimate of tokens
    per unit, then takes secant steps inside the bracket [best n under the budget, smallest n over it],
    falling back to bisection, so it ends in a few encodes. If no ``n`` lands in the window (units
    coarser than ``slack``) it returns the largest ``n`` under the budget that it found.

    Raises:
        BudgetTooSmall: ``render(n_min)`` already exceeds the budget (the task's fixed parts do not fit).
    """
    encodes = 0

    def measure(n: int) -> tuple[int, str, int]:
        nonlocal encodes
        text = render(n)
        encodes += 1
        return n, text, count(text)

    lo = measure(n_min)
    if lo[2] > budget:
        raise BudgetTooSmall(
            f"{what}: needs {lo[2]} tokens with the smallest haystack ({n_min} units) but the budget is {budget}",
            lo[2],
            budget,
        )
    hi: tuple[int, str, int] | None = None
    points = [lo]
    aim = budget - slack / 2.0
    n_next = n_min + max(1, probe)  # a small probe gives the first tokens-per-unit estimate
    while True:
        if lo[2] >= budget - slack:
            break
        if hi is not None and hi[0] - lo[0] <= 1:
            break  # units coarser than the window: keep the best fit under the budget
        if n_max is not None and lo[0] >= n_max:
            break  # the source is exhausted
        if len(points) > 40:
            break  # pathological token counts; never loop forever
        if n_next is None:
            if hi is not None:
                a, b = lo, hi
            else:
                a, b = points[-2], points[-1]
            slope = (b[2] - a[2]) / (b[0] - a[0]) if b[0] != a[0] else 1.0
            # Units are words / entries / lines: at least ~1 token each. The floor stops a tokenizer that
            # (wrongly) does not grow from sending n, and the rendered text, through the roof.
            slope = max(slope, MIN_TOKENS_PER_UNIT)
            n_next = int(round(lo[0] + (aim - lo[2]) / slope))
        n = max(lo[0] + 1, n_next)
        if hi is not None:
            n = min(n, hi[0] - 1)
            if len(points) > 6:  # secant is creeping: bisect the bracket
                n = (lo[0] + hi[0]) // 2
        if n_max is not None:
            n = min(n, n_max)
        p = measure(n)
        points.append(p)
        if p[2] > budget:
            hi = p
        else:
            lo = p
        n_next = None
    return Fit(lo[0], lo[1], lo[2], encodes)
