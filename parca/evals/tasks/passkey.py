"""Passkey retrieval (Landmark Attention style, own filler).

"The pass key is N. Remember it. N is the pass key." hidden in the repeated noise paragraph at
``depth``%; the prompt ends "What is the pass key? The pass key is". N is uniform in 1..50000 and the
score is 1 when the first integer of the output equals N (metric ``passkey``).
"""

from __future__ import annotations

from parca.evals.haystack import insert_at_depths, noise_units, take_units
from parca.evals.tasks.base import Plan, TaskSpec


class PasskeyTask(TaskSpec):
    def __init__(self, name: str = "passkey", *, description: str) -> None:
        super().__init__(name, "passkey", max_new_tokens=16, has_depth=True, description=description)

    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        key = str(self.rng(seed, index, "values").randint(1, 50000))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        first = self.pick_depth(seed, index, depth)
        units = noise_units()

        def build(n: int, pad: int) -> str:
            return insert_at_depths(take_units(units, 0, n), [(first, needle)])

        return Plan(
            instruction=(
                "There is an important piece of information hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about it."
            ),
            question="What is the pass key?",
            answer_prefix="The pass key is",
            qa_sep=" ",
            answers=[key],
            build=build,
            n_min=8,
            probe=256,
            needles=[("answer", needle)],
            depth=first,
        )


SPECS: tuple[TaskSpec, ...] = (PasskeyTask(description="Landmark-style pass key (1..50000) hidden in filler"),)
