"""The self-play topics: arithmetic, algebra (linear equations) and coding.

``get_task(name, **overrides)`` builds one; overrides are the task's constructor options (from the
config), e.g. ``get_task("algebra", data_path="omega_test.jsonl", normalize_answers=True)``.

Known traps (SQLM_SPEC.md), handled here and documented where they bite:
- a proposal off the format (algebra without "Selected Question", coding without "Test Cases:" or
  any test, an empty arithmetic proposal) parses to None under the strict ``parse_question``;
  ``reference_question`` is what the reference asks the solver instead (the whole proposal, or a
  coding problem without tests); which one a run uses is the trainer's reward.invalid_proposals;
- by default answers are voted on as exact strings ("05" != "5"), as in the reference;
  ``normalize_answers=True`` votes on exact rational values instead.
"""

from __future__ import annotations

import dataclasses

from sqlm_jax.tasks.algebra import AlgebraTask
from sqlm_jax.tasks.arithmetic import ArithmeticTask
from sqlm_jax.tasks.base import Question, Task
from sqlm_jax.tasks.coding import CodingTask

TASKS = {cls.name: cls for cls in (ArithmeticTask, AlgebraTask, CodingTask)}


def get_task(name: str, **overrides) -> Task:
    """The task called ``name`` with its options overridden (passed as given, None included).

    Unknown names and options raise ValueError naming the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    options = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; valid options: {', '.join(sorted(options))}")
    return cls(**overrides)


__all__ = ["AlgebraTask", "ArithmeticTask", "CodingTask", "Question", "TASKS", "Task", "get_task"]
