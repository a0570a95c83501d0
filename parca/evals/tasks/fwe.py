"""Frequent words extraction (RULER's ``fwe``, own templates).

The context is a run of made-up 6-letter "coded" words whose counts follow Zipf's law with
alpha = 2: the word of rank r occurs about n / (H * r**2) times. The rank-1 word is written as
dots ("....") and acts as noise; the question asks for the three most frequent coded words,
i.e. ranks 2-4, all expected (``match_all``). Counts are computed, not sampled, so the ranking
is strict at every length.
"""

from __future__ import annotations

import math
import string

from parca.evals.tasks.base import Plan, TaskSpec, distinct

ALPHA = 2.0
DOTS = "...."
NUM_ANSWERS = 3


def zipf_counts(n: int, alpha: float = ALPHA) -> list[int]:
    """Counts per rank (rank 1 first) summing to ``n``; strictly decreasing over the first 5 ranks for n >= 60."""
    vocab = max(5, int(math.sqrt(n / 1.645)))
    h = sum(1.0 / (r**alpha) for r in range(1, vocab + 1))
    counts = [max(1, int(n / (h * r**alpha))) for r in range(1, vocab + 1)]
    counts[0] += n - sum(counts)  # the rounding remainder goes to the dots
    return counts


class FrequentWordsTask(TaskSpec):
    def __init__(self, name: str = "fwe", *, description: str) -> None:
        super().__init__(name, "match_all", max_new_tokens=50, has_depth=False, description=description)

    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        rng = self.rng(seed, index, "values")
        words: list[str] = []  # coded words by rank 2, 3, ...; grown lazily (prefix-stable)

        def coded(k: int) -> list[str]:
            if len(words) < k:
                words.extend(
                    distinct(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=6)), k - len(words), set(words))
                )
            return words[:k]

        answers = coded(NUM_ANSWERS)

        def build(n: int, pad: int) -> str:
            counts = zipf_counts(n)
            vocab = [DOTS] + coded(len(counts) - 1)
            tokens = [w for w, c in zip(vocab, counts) for _ in range(c)]
            self.rng(seed, index, f"order-{n}").shuffle(tokens)
            return " ".join(tokens)

        def meta_for(n: int) -> dict:
            return {"top_counts": zipf_counts(n)[: NUM_ANSWERS + 2]}

        return Plan(
            instruction=(
                "Below is a text written in a code of made-up six-letter words, with runs of dots in between. "
                "Keep count of how often each coded word occurs."
            ),
            question="Question: Ignoring the dots, which three coded words occur most often in the text above?",
            answer_prefix="Answer: The three coded words that occur most often in the text above are:",
            answers=list(answers),
            build=build,
            n_min=60,
            probe=256,
            meta_for=meta_for,
        )


SPECS: tuple[TaskSpec, ...] = (
    FrequentWordsTask(description="name the 3 most frequent coded words of a Zipf (alpha 2) text, dots excluded"),
)
