"""Common words extraction (RULER's ``cwe``, own templates).

The context is a numbered list of words in which 10 "common" words each occur ``c`` times and the
others ("uncommon") ``u`` times, with ``c`` about 10x ``u`` (RULER's 30 vs 3 at 4K). As the list
grows with the length both counts grow, so the shipped pool of ~1,200 words is enough at any length.
The question asks for the 10 common words; all 10 are expected (``match_all``).

The 10 answer words are drawn only from pool words that are not part of any other pool word, so a
substring match cannot credit "art" for an output that says "start".
"""

from __future__ import annotations

import functools

from parca.evals.haystack import load_words
from parca.evals.tasks.base import Plan, TaskSpec, ceil_div

NUM_COMMON = 10
RATIO = 10  # occurrences of a common word per occurrence of an uncommon one


@functools.lru_cache(maxsize=None)
def _answerable_words() -> tuple[str, ...]:
    pool = load_words("common_words")
    return tuple(w for w in pool if not any(w != x and w in x for x in pool))


def composition(n: int, pool_size: int) -> tuple[int, int, int]:
    """``(c, u, k)`` for a list of ``n`` entries: common count, uncommon count, distinct uncommon words.

    The 10 common words fill ``10 * c`` entries, at most half the list; ``k`` uncommon words fill the
    rest ``u`` times each (the last one possibly fewer). Guarantees ``c > u`` for ``n >= 40`` and
    ``k <= pool_size``.
    """
    u = max(1, ceil_div(n, RATIO * NUM_COMMON + pool_size))
    c = min(RATIO * u, max(2, n // (2 * NUM_COMMON)))
    k = ceil_div(n - NUM_COMMON * c, u)
    return c, u, k


class CommonWordsTask(TaskSpec):
    def __init__(self, name: str = "cwe", *, description: str) -> None:
        super().__init__(name, "match_all", max_new_tokens=120, has_depth=False, description=description)

    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        rng = self.rng(seed, index, "values")
        common = rng.sample(_answerable_words(), NUM_COMMON)
        chosen = set(common)
        uncommon = [w for w in load_words("common_words") if w not in chosen]
        rng.shuffle(uncommon)

        def build(n: int, pad: int) -> str:
            c, u, k = composition(n, len(uncommon))
            entries = [w for w in common for _ in range(c)]
            rest = n - len(entries)
            for i in range(k):
                entries.extend([uncommon[i]] * min(u, rest - i * u))
            order = self.rng(seed, index, f"order-{n}")
            order.shuffle(entries)
            return "\n".join(f"{i}. {w}" for i, w in enumerate(entries, 1))

        def meta_for(n: int) -> dict:
            c, u, k = composition(n, len(uncommon))
            return {"common_count": c, "uncommon_count": u, "uncommon_words": k}

        n_common = NUM_COMMON
        return Plan(
            instruction=(
                "Below is a numbered list of words. Some words occur in it many more times than the others. "
                "Read the whole list and keep count."
            ),
            question=f"Question: What are the {n_common} words that occur most often in the list above?",
            answer_prefix=f"Answer: The {n_common} words that occur most often in the list above are:",
            answers=list(common),
            build=build,
            n_min=4 * NUM_COMMON,
            probe=128,
            meta_for=meta_for,
        )


SPECS: tuple[TaskSpec, ...] = (CommonWordsTask(description="name the 10 most frequent words of a numbered word list"),)
