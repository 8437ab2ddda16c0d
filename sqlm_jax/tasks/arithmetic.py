"""Three-digit arithmetic: the proposer writes a problem, the solvers' majority answer is the label.

Held-out evaluation: multiplication problems with exact products, drawn like the reference's test
set (TinyZero's multiply-3_digit generator, which the reference evaluates on).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from sqlm_jax.tasks.base import MathTask, Question, load_records, record_answer, record_question, sample
from sqlm_jax.tasks.features import (MAJORITY_AGREEMENT_PANEL, OPERATORS, FeaturePanel, numbers,
                                     operand_digits, operator_counts)

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


def multiplication_pairs(n: int, seed: int, a_range: tuple[int, int] | None = None,
                         b_range: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct ordered operand pairs; like the reference, duplicates are dropped.

    Operands are drawn as the reference draws them, unless ``a_range`` and ``b_range`` (inclusive)
    are given: then ``a`` and ``b`` are uniform over them (the tiny demo's problem family).
    """
    if (a_range is None) != (b_range is None):
        raise ValueError("set both heldout_a_range and heldout_b_range, or neither")
    space = None if a_range is None else (a_range[1] - a_range[0] + 1) * (b_range[1] - b_range[0] + 1)
    if not 0 <= n <= min(_MAX_HELDOUT, space // 2 if space else _MAX_HELDOUT):
        raise ValueError(f"n must be in [0, {_MAX_HELDOUT}] and at most half the {space} possible "
                         f"pairs, got {n}")
    rng = random.Random(seed)
    draw = (lambda: (sample_operand(rng), sample_operand(rng))) if a_range is None else \
        (lambda: (rng.randint(*a_range), rng.randint(*b_range)))
    pairs: dict[tuple[int, int], None] = {}  # an ordered set
    while len(pairs) < n:
        pairs[draw()] = None
    return list(pairs)


@dataclass
class ArithmeticTask(MathTask):
    """Arithmetic self-play; reward by majority vote.

    ``parse_question`` returns the stripped proposal. The reference passes the raw proposal to the
    solver and never declares one invalid; here an empty (whitespace-only) proposal is None, the
    only case where there is nothing to ask.
    """

    name: ClassVar[str] = "arithmetic"
    curriculum_panels: ClassVar[tuple[FeaturePanel, ...]] = (
        FeaturePanel("Operand size", "digits", (("digits_a", "1st operand"), ("digits_b", "2nd operand"),
                                                ("product_digits", "product of operands"))),
        FeaturePanel("Operator mix", "share of valid proposals",
                     (("op_add", "+"), ("op_sub", "−"), ("op_mul", "×"), ("op_div", "÷"),
                      ("op_none", "none found")),
                     stacked=True, fraction=True),
        MAJORITY_AGREEMENT_PANEL)

    proposer_prompt: str = ARITHMETIC_PROPOSER_PROMPT
    # Held-out set options, defaults = the reference. The tiny demo sets a uniform operand family
    # ((low, high) inclusive, both or neither) and a short question wording with {a} and {b}.
    heldout_a_range: tuple[int, int] | None = None
    heldout_b_range: tuple[int, int] | None = None
    question_template: str = MULTIPLICATION_TEMPLATE

    def parse_question(self, text: str) -> Question | None:
        text = text.strip()
        return Question(text) if text else None

    def reference_question(self, text: str) -> Question:
        """The raw proposal, never invalid (ray_trainer.py ``fit``, proposer_parser_version v1)."""
        return Question(text)

    def heldout_problems(self, n: int, seed: int) -> list[tuple[Question, str]]:
        """``n`` multiplication problems, truth = the exact product as a decimal string."""
        return [
            (Question(self.question_template.format(a=a, b=b)), str(a * b))
            for a, b in multiplication_pairs(n, seed, self.heldout_a_range, self.heldout_b_range)
        ]

    def training_problems(self, n: int, seed: int, path: str | None = None) -> list[tuple[Question, str]]:
        """Labelled training questions: rows of the file at ``path`` ({question, answer} fields), else
        the held-out generator's family drawn with another ``seed`` (the trainer drops the problems
        that are held-out ones)."""
        if path is not None:
            return [(Question(record_question(r)), record_answer(r)) for r in sample(load_records(path), n, seed)]
        return self.heldout_problems(n, seed)

    def question_features(self, question: Question) -> dict[str, float]:
        """digits_a / digits_b / digits_max: digits of the 1st / 2nd / largest number; product_digits:
        digits of the numbers' product; log10_a / log10_b: log10(1 + the 1st / 2nd number); numbers and
        operators: their counts; op_add, op_sub, op_mul, op_div: each operator's share of the
        question's operators (op_none = 1 when none is found); chars: length in characters."""
        values = numbers(question.text)
        digits = operand_digits(question.text)
        # Digits of the operands' product: the size of the answer of a multiplication, and a scale of
        # the work for the other operators.
        product_digits = sum(math.log10(max(v, 1)) for v in values)
        counts = operator_counts(question.text)
        total = sum(counts.values())
        return {
            "digits_a": float(digits[0]) if digits else 0.0,
            "digits_b": float(digits[1]) if len(digits) > 1 else 0.0,
            "digits_max": float(max(digits, default=0)),
            "product_digits": math.floor(product_digits) + 1.0 if values else 0.0,
            # Continuous sizes, which tell apart questions with equally long operands.
            "log10_a": math.log10(values[0] + 1) if values else 0.0,
            "log10_b": math.log10(values[1] + 1) if len(values) > 1 else 0.0,
            "numbers": float(len(values)),
            "operators": float(total),
            # Shares, so that their mean over proposals is the operator mix.
            **{f"op_{name}": counts[name] / total if total else 0.0 for name in OPERATORS},
            "op_none": 0.0 if total else 1.0,
            "chars": float(len(question.text)),
        }
