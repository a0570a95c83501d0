"""Needle-in-a-haystack tasks (RULER's eight NIAH variants, own templates).

A needle is one sentence, "One of the special magic numbers for <key> is: <value>.", hidden in a
haystack; the question asks for the value(s) of one or more keys. Variants differ in haystack
(repeated noise paragraph, prose, or nothing but other needles), key and value kinds
("adjective-noun" words, 7-digit numbers, UUIDs) and how many needles / values / queries there are:

==================  =========  ======  ======  ==========================================
task                haystack   key     value   needles
==================  =========  ======  ======  ==========================================
niah_single_1       noise      word    number  1
niah_single_2       prose      word    number  1
niah_single_3       prose      word    uuid    1
niah_multikey_1     prose      word    number  4 keys, one asked
niah_multikey_2     needles    word    number  haystack = word->number distractor needles
niah_multikey_3     needles    uuid    uuid    haystack = uuid->uuid distractor needles
niah_multivalue     prose      word    number  1 key with 4 values, all expected
niah_multiquery     prose      word    number  4 keys asked at once, all 4 values expected
==================  =========  ======  ======  ==========================================

Depth: the (first) answer needle sits at ``depth``% of the haystack, moved back to the previous
sentence end (needle-only haystacks: that fraction of the lines). Several answer needles
(multivalue, multiquery) are spread evenly from ``depth`` towards the end; multikey_1's three
distractors sit at seeded random depths.
"""

from __future__ import annotations

import random
from typing import Callable

from parca.evals.haystack import EvalError, insert_at_depths, noise_units, prose_paragraph_starts, prose_units, take_units
from parca.evals.tasks.base import (
    Plan,
    TaskSpec,
    distinct,
    join_names,
    key_space,
    random_number,
    random_uuid,
    random_word_key,
    spread_depths,
)

_TYPE_NAME = {"number": "number", "uuid": "UUID"}


def needle_sentence(value_kind: str, key: str, value: str) -> str:
    return f"One of the special magic {_TYPE_NAME[value_kind]}s for {key} is: {value}."


class _Distractors:
    """Distractor needle lines, generated lazily and memoised so the first n never change with n."""

    def __init__(self, rng: random.Random, key_kind: str, value_kind: str, exclude_keys: set[str], limit: int | None):
        self.rng = rng
        self.key_kind = key_kind
        self.value_kind = value_kind
        self.seen = set(exclude_keys)
        self.limit = limit
        self.lines: list[str] = []

    def take(self, n: int) -> list[str]:
        if self.limit is not None and n > self.limit:
            raise EvalError(
                f"needle-only haystack needs {n} distinct keys but only {self.limit} exist; use a shorter length"
            )
        while len(self.lines) < n:
            key = random_word_key(self.rng) if self.key_kind == "word" else random_uuid(self.rng)
            if key in self.seen:
                continue
            self.seen.add(key)
            value = random_number(self.rng) if self.value_kind == "number" else random_uuid(self.rng)
            self.lines.append(needle_sentence(self.value_kind, key, value))
        return self.lines[:n]


class NiahTask(TaskSpec):
    """One NIAH variant; see the module docstring for the table of variants."""

    def __init__(
        self,
        name: str,
        *,
        haystack: str,
        key_kind: str = "word",
        value_kind: str = "number",
        num_keys: int = 1,
        num_values: int = 1,
        num_queries: int = 1,
        description: str,
    ) -> None:
        metric = "match_all"
        super().__init__(name, metric, max_new_tokens=128, has_depth=True, description=description)
        if haystack not in ("noise", "prose", "needles"):
            raise ValueError(f"{name}: haystack must be noise, prose or needles")
        self.haystack = haystack
        self.key_kind = key_kind
        self.value_kind = value_kind
        self.num_keys = max(num_keys, num_queries)
        self.num_values = num_values
        self.num_queries = num_queries

    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        values_rng = self.rng(seed, index, "values")
        layout_rng = self.rng(seed, index, "layout")
        draw_key: Callable[[random.Random], str] = random_word_key if self.key_kind == "word" else random_uuid
        draw_value: Callable[[random.Random], str] = random_number if self.value_kind == "number" else random_uuid
        keys = distinct(values_rng, draw_key, self.num_keys)
        asked = keys[: self.num_queries]
        # Values: num_values for each asked key, one for every other key; all distinct.
        n_vals = self.num_queries * self.num_values + (self.num_keys - self.num_queries)
        vals = distinct(values_rng, draw_value, n_vals)
        answers: list[str] = []
        answer_needles: list[str] = []
        for i, key in enumerate(asked):
            for v in vals[i * self.num_values : (i + 1) * self.num_values]:
                answers.append(v)
                answer_needles.append(needle_sentence(self.value_kind, key, v))
        others = keys[self.num_queries :]
        distractor_needles = [
            needle_sentence(self.value_kind, k, v) for k, v in zip(others, vals[self.num_queries * self.num_values :])
        ]

        first = self.pick_depth(seed, index, depth)
        if depth is None and len(answer_needles) > 1:
            depths = sorted([first] + [layout_rng.uniform(0.0, 100.0) for _ in answer_needles[1:]])
            first = depths[0]
        else:
            depths = spread_depths(first, len(answer_needles))
        placed = list(zip(depths, answer_needles))
        placed += [(layout_rng.uniform(0.0, 100.0), d) for d in distractor_needles]

        type_name = _TYPE_NAME[self.value_kind]
        plural = self.num_values > 1 or self.num_queries > 1
        if plural:
            question = (
                f"Question: What are all the special magic {type_name}s for {join_names(asked)} mentioned in the "
                f"text above?"
            )
            prefix = f"Answer: The special magic {type_name}s for {join_names(asked)} mentioned in the text above are"
        else:
            question = f"Question: What is the special magic {type_name} for {asked[0]} mentioned in the text above?"
            prefix = f"Answer: The special magic {type_name} for {asked[0]} mentioned in the text above is"
        instruction = (
            f"A long text follows. Some special magic {type_name}s are hidden in it. Read it carefully and "
            f"remember every special magic {type_name}: you will be asked about them after the text."
        )

        if self.haystack == "needles":
            limit = key_space() - self.num_keys if self.key_kind == "word" else None
            pool = _Distractors(self.rng(seed, index, "distractors"), self.key_kind, self.value_kind, set(keys), limit)
            noise = noise_units()

            def build(n: int, pad: int) -> str:
                lines = list(pool.take(n))
                # Insert from the deepest so earlier indices stay valid; ties keep answer order.
                for d, needle in sorted(placed, key=lambda p: p[0], reverse=True):
                    lines.insert(round(n * d / 100.0), needle)
                body = "\n".join(lines)
                return (take_units(noise, 0, pad) + "\n" + body) if pad > 0 else body

            n_min, probe, n_max, pad_max = 1, 16, limit, 64
        else:
            if self.haystack == "prose":
                units = prose_units()
                start = layout_rng.choice(prose_paragraph_starts())
            else:
                units = noise_units()
                start = 0

            def build(n: int, pad: int) -> str:
                return insert_at_depths(take_units(units, start, n), placed)

            n_min, probe, n_max, pad_max = 8, 256, None, 0

        needles = [("answer", s) for s in answer_needles] + [("distractor", s) for s in distractor_needles]
        return Plan(
            instruction=instruction,
            question=question,
            answer_prefix=prefix,
            answers=answers,
            build=build,
            n_min=n_min,
            probe=probe,
            n_max=n_max,
            pad_max=pad_max,
            needles=needles,
            depth=first,
            meta={"keys": asked, "haystack": self.haystack},
        )


SPECS: tuple[TaskSpec, ...] = (
    NiahTask("niah_single_1", haystack="noise", description="one word->number needle in repeated filler noise"),
    NiahTask("niah_single_2", haystack="prose", description="one word->number needle in prose"),
    NiahTask("niah_single_3", haystack="prose", value_kind="uuid", description="one word->UUID needle in prose"),
    NiahTask(
        "niah_multikey_1", haystack="prose", num_keys=4, description="4 word->number needles in prose, one asked"
    ),
    NiahTask(
        "niah_multikey_2",
        haystack="needles",
        description="one word->number needle among word->number distractor needles only",
    ),
    NiahTask(
        "niah_multikey_3",
        haystack="needles",
        key_kind="uuid",
        value_kind="uuid",
        description="one UUID->UUID needle among UUID->UUID distractor needles only",
    ),
    NiahTask("niah_multivalue", haystack="prose", num_values=4, description="one key with 4 values in prose, all asked"),
    NiahTask("niah_multiquery", haystack="prose", num_queries=4, description="4 keys asked at once, prose haystack"),
)
