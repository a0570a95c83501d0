"""Variable tracking (RULER's ``vt``, own templates).

One chain of 4 hops is scattered through the noise haystack::

    VAR KQZTR = 40521.   ...   VAR MBWOE = VAR KQZTR.   ...   (3 more hops)

and the question asks which variables hold 40521; all 5 names are expected (``match_all``).
Names are 5 random upper-case letters, the value a 5-digit number. The first assignment sits at
``depth``%; the hops follow in order at seeded random depths between it and the end.
"""

from __future__ import annotations

import string

from parca.evals.haystack import insert_at_depths, noise_units, take_units
from parca.evals.tasks.base import Plan, TaskSpec, distinct, random_number

# The instruction's example uses these names; generated names avoid them.
_EXAMPLE = ("QWXRT", "PLMKO")


class VariableTrackingTask(TaskSpec):
    def __init__(self, name: str = "vt", *, hops: int = 4, description: str) -> None:
        super().__init__(name, "match_all", max_new_tokens=30, has_depth=True, description=description)
        self.hops = hops

    def plan(self, seed: int, index: int, depth: float | None) -> Plan:
        rng = self.rng(seed, index, "values")
        names = distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), self.hops + 1, set(_EXAMPLE))
        value = distinct(rng, lambda r: random_number(r, digits=5), 1, {"12345"})[0]
        statements = [f"VAR {names[0]} = {value}."]
        statements += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        first = self.pick_depth(seed, index, depth)
        layout = self.rng(seed, index, "layout")
        depths = [first] + sorted(layout.uniform(first, 100.0) for _ in statements[1:])
        placed = list(zip(depths, statements))
        units = noise_units()

        def build(n: int, pad: int) -> str:
            return insert_at_depths(take_units(units, 0, n), placed)

        instruction = (
            "Track the variable assignments hidden in the text below. A line such as "
            f'"VAR {_EXAMPLE[0]} = 12345." gives a variable a value, and "VAR {_EXAMPLE[1]} = VAR {_EXAMPLE[0]}." '
            f"copies the value of one variable into another, so that both {_EXAMPLE[0]} and {_EXAMPLE[1]} "
            "then hold 12345."
        )
        return Plan(
            instruction=instruction,
            question=f"Question: Which variables are assigned the value {value} in the text above? List all of them.",
            answer_prefix=f"Answer: The variables assigned the value {value} are:",
            answers=names,
            build=build,
            n_min=8,
            probe=256,
            needles=[("answer", s) for s in statements],
            depth=first,
            meta={"value": value, "chain": names},
        )


SPECS: tuple[TaskSpec, ...] = (
    VariableTrackingTask(description="a 4-hop chain of variable assignments in noise; name every variable"),
)
