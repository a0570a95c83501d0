"""The task registry: ``TASKS`` maps a task name to its :class:`TaskSpec`.

One file per task family (niah.py, vt.py, cwe.py, fwe.py, passkey.py), each exporting ``SPECS``;
see ``parca/evals/ADDING_A_TASK.md`` to add one.
"""

from __future__ import annotations

from parca.evals.haystack import EvalError
from parca.evals.tasks import cwe, fwe, niah, passkey, vt
from parca.evals.tasks.base import Plan, Sample, TaskSpec, parse_length

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add a task to ``TASKS`` (a user plugin, or a family file below)."""
    if spec.name in TASKS and not replace:
        raise EvalError(f"task {spec.name!r} is already registered; pass replace=True to override it")
    TASKS[spec.name] = spec
    return spec


for _family in (niah, vt, cwe, fwe, passkey):
    for _spec in _family.SPECS:
        register_task(_spec)

# RULER's 13 tasks minus the two QA tasks (they need downloaded data), plus passkey.
RULER_TASKS: tuple[str, ...] = tuple(n for n in TASKS if n != "passkey")


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name raises EvalError (a ValueError) listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise EvalError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


__all__ = ["RULER_TASKS", "TASKS", "Plan", "Sample", "TaskSpec", "get_task", "parse_length", "register_task"]
