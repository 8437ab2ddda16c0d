"""Three-digit arithmetic: the proposer writes a problem, the solvers' majority answer is the label.

Held-out evaluation: multiplication problems with exact products, drawn like the reference's test
set (TinyZero's multiply-3_digit generator, which the reference evaluates on).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from sqlm_jax.tasks.base import MathTask, Question

# Reference wording (verl fork, examples/data_preprocess/selfplay.py, prompt_version arithmetic_v1).
ARITHMETIC_PROPOSER_PROMPT = (
    "Generate a three-digit arithmetic problem (up to three digits). "
    "Make sure the numbers are not similar and appear unpredictable. "
    "Do not solve the problem."
)

# The reference test set's question wording (TinyZero make_prefix, without its own preamble).
MULTIPLICATION_TEMPLATE = "Give me the answer of the following equation: {a} * {b} ="

# Unique pairs are drawn by rejection; far below the 10**6 possible pairs keeps that fast.
_MAX_HELDOUT = 100_000


def sample_operand(rng: random.Random) -> int:
    """One operand as the reference draws it: [0,9] w.p. 1/4, [0,99] w.p. 1/4, [0,999] w.p. 1/2."""
    bucket = rng.randint(0, 3)
    upper = 10 if bucket == 0 else 100 if bucket == 1 else 1000
    return rng.randint(0, upper - 1)


def multiplication_pairs(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` distinct ordered operand pairs; like the reference, duplicates are dropped."""
    if not 0 <= n <= _MAX_HELDOUT:
        raise ValueError(f"n must be in [0, {_MAX_HELDOUT}], got {n}")
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}  # an ordered set
    while len(pairs) < n:
        pairs[(sample_operand(rng), sample_operand(rng))] = None
    return list(pairs)


@dataclass
class ArithmeticTask(MathTask):
    """Arithmetic self-play; reward by majority vote.

    ``parse_question`` returns the stripped proposal. The reference passes the raw proposal to the
    solver and never declares one invalid; here an empty (whitespace-only) proposal is None, the
    only case where there is nothing to ask.
    """

    name: ClassVar[str] = "arithmetic"

    proposer_prompt: str = ARITHMETIC_PROPOSER_PROMPT

    def parse_question(self, text: str) -> Question | None:
        text = text.strip()
        return Question(text) if text else None

    def heldout_problems(self, n: int, seed: int) -> list[tuple[Question, str]]:
        """``n`` multiplication problems, truth = the exact product as a decimal string."""
        return [
            (Question(MULTIPLICATION_TEMPLATE.format(a=a, b=b)), str(a * b))
            for a, b in multiplication_pairs(n, seed)
        ]
