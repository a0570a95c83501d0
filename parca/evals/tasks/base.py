"""What every task shares: the ``Sample`` record, the ``TaskSpec`` base class, seeding and sizing.

A task family only writes :meth:`TaskSpec.plan`: its templates, answers, and a ``build(n, pad)``
function that renders a context with ``n`` haystack units. ``TaskSpec.generate`` then sizes ``n``
with the model's tokenizer so that ``prompt tokens + max_new_tokens`` lands just under ``length``,
locates the needles, and returns a :class:`Sample`.

Seeding: every random choice comes from ``random.Random`` seeded with a string made of the task name,
``seed``, ``index`` and a stream name (Python hashes string seeds with SHA-512, so this is stable across
runs and machines and never touches the global RNG). Neither ``length`` nor ``depth`` enters the seed:
the same (seed, index) gives the same keys, values and haystack start at every length and depth, so a
depth x length heatmap varies only what it means to vary.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from parca.evals.haystack import (
    BudgetTooSmall,
    EvalError,
    Tokenizer,
    count_tokens,
    fit_to_budget,
    load_words,
)

# The fitted prompt lands in [budget - SLACK * length, budget]: 1% under, never over, the budget.
SLACK = 0.01
METRIC_NAMES = ("match_all", "match_part", "passkey")


@dataclass
class Sample:
    """One generated prompt with its expected answers (see the module docstring of ``parca.evals``)."""

    task: str
    length: int
    index: int
    context: str
    prompt: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    depth: float | None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for JSONL dumps)."""
        return dataclasses.asdict(self)


@dataclass
class Plan:
    """What a task family returns from :meth:`TaskSpec.plan`; ``generate`` does the rest.

    Attributes:
        instruction: text before the context.
        question: text after the context.
        answer_prefix: the last thing in the prompt; the model continues it.
        answers: expected strings.
        build: ``build(n, pad) -> context`` for ``n`` haystack units and ``pad`` filler words; must be
            deterministic and grow (roughly linearly) in ``n``.
        n_min: the smallest haystack the task accepts (in units).
        probe: unit count of the first sizing probe (about 100-1000 tokens' worth is right).
        n_max: the most units the source can give (``None``: unbounded).
        pad_max: if > 0 and whole units are too coarse to land in the window, up to this many filler
            words are added by a second sizing pass (needle-only haystacks use it).
        needles: ``(role, text)`` for sentences to locate in the context (role ``answer``/``distractor``).
        depth: the depth reported on the sample.
        qa_sep: joins question and answer prefix.
        meta: extra facts to record on the sample.
        meta_for: ``meta_for(n) -> dict``, extra facts that depend on the fitted unit count ``n``.
    """

    instruction: str
    question: str
    answer_prefix: str
    answers: list[str]
    build: Callable[[int, int], str]
    n_min: int = 1
    probe: int = 256
    n_max: int | None = None
    pad_max: int = 0
    needles: list[tuple[str, str]] = field(default_factory=list)
    depth: float | None = None
    qa_sep: str = "\n"
    meta: dict = field(default_factory=dict)
    meta_for: Callable[[int], dict] | None = None


# ---------------------------------------------------------------------------------------------
# lengths, seeds, values

_LENGTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(value: int | str) -> int:
    """``"4k"`` -> 4096 (k = 1024, m = 1024**2); plain ints and digit strings pass through.

    Raises:
        EvalError (a ValueError): anything else, naming the bad value.
    """
    hint = "expected a positive token count such as 4096, or a number with a k/m suffix (k = 1024) such as 4k or 32k"
    if isinstance(value, bool):
        raise EvalError(f"bad length {value!r}: {hint}")
    if isinstance(value, int):
        if value <= 0:
            raise EvalError(f"bad length {value!r}: {hint}")
        return value
    if not isinstance(value, str):
        raise EvalError(f"bad length {value!r} (a {type(value).__name__}): {hint}")
    m = _LENGTH_RE.match(value)
    if not m:
        raise EvalError(f"bad length {value!r}: {hint}")
    number, suffix = m.groups()
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[suffix.lower()]
    tokens = float(number) * scale
    if tokens <= 0 or tokens != int(tokens):
        raise EvalError(f"bad length {value!r}: {hint}")
    return int(tokens)


def derive_rng(task: str, seed: int, index: int, stream: str) -> random.Random:
    """A private RNG for one named stream of one sample (never the global RNG)."""
    return random.Random(f"parca-eval|{task}|{int(seed)}|{int(index)}|{stream}")


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4-shaped UUID drawn from ``rng`` (``uuid.uuid4()`` would use the OS RNG)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def key_space() -> int:
    return len(load_words("adjectives")) * len(load_words("nouns"))


def random_word_key(rng: random.Random) -> str:
    adjectives, nouns = load_words("adjectives"), load_words("nouns")
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def distinct(rng: random.Random, draw: Callable[[random.Random], str], k: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``k`` distinct draws, none in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < k:
        x = draw(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def spread_depths(first: float, k: int) -> list[float]:
    """``k`` depths from ``first`` evenly towards 100 (``first`` itself included, 100 excluded)."""
    return [first + i * (100.0 - first) / k for i in range(k)]


def join_names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# the task base class


class TaskSpec(abc.ABC):
    """A task: a name, a metric, a generation budget, and a generator of samples.

    Subclasses set the attributes in ``__init__`` and implement :meth:`plan`.
    """

    name: str
    metric: str
    max_new_tokens: int
    has_depth: bool
    description: str

    def __init__(self, name: str, metric: str, max_new_tokens: int, has_depth: bool, description: str) -> None:
        if metric not in METRIC_NAMES:
            raise EvalError(f"task {name}: unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)}")
        self.name = name
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.has_depth = has_depth
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r}, max_new_tokens={self.max_new_tokens})"

    @abc.abstractmethod
    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        """Templates, answers and a context builder for sample ``(seed, index)`` at ``depth``."""

    def rng(self, seed: int, index: int, stream: str) -> random.Random:
        return derive_rng(self.name, seed, index, stream)

    def pick_depth(self, seed: int, index: int, depth: float | None) -> float:
        """The requested depth, or a seeded uniform one in [0, 100) when ``depth`` is None."""
        if depth is not None:
            return float(depth)
        return round(self.rng(seed, index, "depth").uniform(0.0, 100.0), 2)

    def generate(
        self, tokenizer: Tokenizer, length: int | str, seed: int = 0, index: int = 0, depth: float | None = None
    ) -> Sample:
        """One sample whose prompt plus ``max_new_tokens`` fills ``length`` tokens (within 1%, never over).

        Args:
            tokenizer: anything with ``encode(text) -> list[int]`` adding no special tokens.
            length: the token budget (prompt + answer), an int or a string like ``"4k"``.
            seed, index: select the sample; same arguments -> same sample.
            depth: needle depth in percent of the haystack (0..100); ``None`` draws one from the seed.
                Tasks without a needle (``has_depth`` False) accept only ``None``.

        Raises:
            EvalError (a ValueError): bad length or depth, or a length too small for the task.
        """
        length = parse_length(length)
        if depth is not None:
            if not self.has_depth:
                raise EvalError(f"task {self.name} has no needle depth; pass depth=None")
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (0.0 <= float(depth) <= 100.0):
                raise EvalError(f"task {self.name}: depth must be a percentage in [0, 100], got {depth!r}")
        budget = length - self.max_new_tokens  # may be <= 0: the fit below then reports what is needed
        plan = self.plan(int(seed), int(index), None if depth is None else float(depth))
        head = plan.instruction + "\n\n"
        tail = "\n\n" + plan.question + plan.qa_sep + plan.answer_prefix

        def count(text: str) -> int:
            return count_tokens(tokenizer, text)

        slack = max(1, int(length * SLACK))
        try:
            fit = fit_to_budget(
                lambda n: head + plan.build(n, 0) + tail,
                count,
                budget,
                n_min=plan.n_min,
                slack=slack,
                probe=plan.probe,
                n_max=plan.n_max,
                what=f"task {self.name}",
            )
        except BudgetTooSmall as e:
            raise EvalError(
                f"task {self.name}: length {length} is too small: the instruction, question, answer prefix and "
                f"smallest haystack take {e.needed} tokens and {self.max_new_tokens} more are reserved for the "
                f"answer; use a length of at least {e.needed + self.max_new_tokens + slack}"
            ) from None
        n, pad, text, tokens, encodes = fit.n, 0, fit.text, fit.tokens, fit.encodes
        if plan.pad_max > 0 and tokens < budget - slack:
            pad_fit = fit_to_budget(
                lambda p: head + plan.build(n, p) + tail,
                count,
                budget,
                n_min=0,
                slack=slack,
                probe=min(8, plan.pad_max),
                n_max=plan.pad_max,
                what=f"task {self.name}",
            )
            pad, text, tokens, encodes = pad_fit.n, pad_fit.text, pad_fit.tokens, encodes + pad_fit.encodes
        context = text[len(head) : len(text) - len(tail)]
        needles = []
        for role, needle in plan.needles:
            off = context.find(needle)
            if off < 0:  # a family bug, not a user error
                raise RuntimeError(f"task {self.name}: needle {needle!r} missing from the built context")
            needles.append(
                {"role": role, "text": needle, "char_offset": off, "depth": round(100.0 * off / max(1, len(context)), 3)}
            )
        # Token offsets: encode the stretches between consecutive needles once each (one pass over the
        # prompt in all); each seam may shift the count by a token versus encoding the whole prompt.
        if needles:
            done_chars, done_tokens = 0, count(head)
            encodes += 1
            for nd in sorted(needles, key=lambda d: d["char_offset"]):
                if nd["char_offset"] > done_chars:
                    done_tokens += count(context[done_chars : nd["char_offset"]])
                    encodes += 1
                done_chars = nd["char_offset"]
                nd["token_offset"] = done_tokens
        meta = {
            "seed": int(seed),
            "budget": budget,
            "prompt_tokens": tokens,
            "units": n,
            "pad_words": pad,
            "encodes": encodes,
            "needles": needles,
        }
        meta.update(plan.meta)
        if plan.meta_for is not None:
            meta.update(plan.meta_for(n))
        return Sample(
            task=self.name,
            length=length,
            index=int(index),
            context=context,
            prompt=text,
            answers=list(plan.answers),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            depth=plan.depth,
            meta=meta,
        )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "METRIC_NAMES",
    "Plan",
    "Sample",
    "TaskSpec",
    "ceil_div",
    "derive_rng",
    "distinct",
    "join_names",
    "key_space",
    "parse_length",
    "random_number",
    "random_uuid",
    "random_word_key",
    "spread_depths",
]
