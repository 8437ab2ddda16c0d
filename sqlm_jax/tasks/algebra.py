"""Linear-equation algebra: the proposer writes three word problems and selects the last one.

Held-out evaluation: OMEGA's linear-equation problems, from a local file (``data_path``) or the hub
(``dataset``, only when asked); otherwise a small seeded generator of one- and two-variable linear
equations in the OMEGA / DeepMind-mathematics style ("Solve 3*k + 4 = -2*k - 6 for k.").
The generator only makes integer solutions, so the reference's integer-only answer parser can
score every problem; with ``normalize_answers`` fractional OMEGA answers can be scored too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from sqlm_jax.tasks.base import (MathTask, Question, load_hub_records, load_records, record_answer,
                                 record_question, sample)
from sqlm_jax.tasks.features import (MAJORITY_AGREEMENT_PANEL, FeaturePanel, operand_digits, variables,
                                     word_count)

# Reference wording (verl fork, examples/data_preprocess/selfplay.py, linear_equations_v1).
ALGEBRA_PROPOSER_PROMPT = (
    "Create three diverse, challenging algebra word problems that involve linear equations with up "
    "to two variables. Use only integers for all coefficients. The problem should be solvable with a "
    "unique solution where each variable has a rational (integer or fractional) value. Do not solve "
    "the problems. Then select the last one and put it in the format: Selected Question: <question>"
)

SELECTED_MARKER = "Selected Question"

# Variable names: single letters, minus ones that read as constants or words (e, i, l, o).
_VARIABLES = "abcdfghjkmnpqrstuvwxyz"


def parse_selected_question(text: str) -> str | None:
    """Text after the last "Selected Question", without the colon / markdown bold around the marker.

    None if the marker is absent or nothing follows it. (The reference keeps the text after the
    marker as is, colon included, and on a missing marker sends the whole proposal to the solver,
    rewarded as usual: ``AlgebraTask.reference_question``.)
    """
    if SELECTED_MARKER not in text:
        return None
    question = text.rsplit(SELECTED_MARKER, 1)[1].lstrip(" \t\r\n:*").strip()
    return question or None


def _linear(terms: list[tuple[int, str]], constant: int = 0) -> str:
    """Format sum(coef*var) + constant as "3*x - y + 5"; zero terms are left out."""
    parts = [(c, f"{abs(c)}*{v}" if abs(c) != 1 else v) for c, v in terms if c]
    if constant or not parts:
        parts.append((constant, str(abs(constant))))
    head_sign, head = parts[0]
    text = ("-" if head_sign < 0 else "") + head
    return text + "".join(f" {'-' if c < 0 else '+'} {body}" for c, body in parts[1:])


def _nonzero(rng: random.Random, bound: int) -> int:
    return rng.choice([k for k in range(-bound, bound + 1) if k])


@dataclass(frozen=True)
class LinearFamily:
    """The sizes of the generator's problems; the defaults are the OMEGA-style held-out set's.

    One variable: ``a*v + b = c*v + d`` with ``|a|, |c| <= coefficient_bound``, ``|b| <= constant_bound``.
    Two variables: a 2x2 system with nonzero coefficients ``<= system_coefficient_bound`` in size.
    Solutions are integers in ``[-solution_bound, solution_bound]``; a ``two_variable_fraction`` of
    the problems are systems.
    """

    coefficient_bound: int = 15
    constant_bound: int = 60
    solution_bound: int = 12
    system_coefficient_bound: int = 9
    two_variable_fraction: float = 0.5

    def one_variable(self, rng: random.Random) -> tuple[str, Fraction]:
        """a*v + b = c*v + d with a != c (so the solution is unique) and an integer solution."""
        v = rng.choice(_VARIABLES)
        solution = rng.randint(-self.solution_bound, self.solution_bound)
        a = _nonzero(rng, self.coefficient_bound)
        c = rng.choice([k for k in range(-self.coefficient_bound, self.coefficient_bound + 1) if k != a])
        b = rng.randint(-self.constant_bound, self.constant_bound)
        d = (a - c) * solution + b
        return f"Solve {_linear([(a, v)], b)} = {_linear([(c, v)], d)} for {v}.", Fraction(solution)

    def two_variable(self, rng: random.Random) -> tuple[str, Fraction]:
        """A 2x2 system with nonzero determinant (unique solution), integer solutions; asks for one."""
        u, w = rng.sample(_VARIABLES, 2)
        x, y = (rng.randint(-self.solution_bound, self.solution_bound) for _ in range(2))
        while True:
            a, b, c, d = (_nonzero(rng, self.system_coefficient_bound) for _ in range(4))
            if a * d - b * c:
                break
        asked, value = rng.choice([(u, x), (w, y)])
        first = f"{_linear([(a, u), (b, w)])} = {a * x + b * y}"
        second = f"{_linear([(c, u), (d, w)])} = {c * x + d * y}"
        return f"Solve {first}, {second} for {asked}.", Fraction(value)

    def problem(self, rng: random.Random) -> tuple[str, Fraction]:
        return (self.two_variable if rng.random() < self.two_variable_fraction else self.one_variable)(rng)


def linear_equation_problems(n: int, seed: int, family: LinearFamily = LinearFamily()) -> list[tuple[str, Fraction]]:
    """``n`` seeded problems of ``family``."""
    rng = random.Random(seed)
    return [family.problem(rng) for _ in range(n)]


@dataclass
class AlgebraTask(MathTask):
    """Linear-equation self-play; reward by majority vote.

    Held-out source, first that applies: ``data_path`` (local OMEGA file: .jsonl/.json/.parquet,
    rows with question/answer fields or OMEGA's messages/ground_truth), ``dataset`` (a hub id read
    with ``datasets``; ``dataset_config`` / ``dataset_split`` pick the subset), else the generator.
    """

    name: ClassVar[str] = "algebra"
    curriculum_panels: ClassVar[tuple[FeaturePanel, ...]] = (
        FeaturePanel("Unknowns", "count", (("variables", "variables"), ("equations", "'=' signs"))),
        FeaturePanel("Question length", "words", (("words", "words"),)),
        MAJORITY_AGREEMENT_PANEL)

    proposer_prompt: str = ALGEBRA_PROPOSER_PROMPT
    data_path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "test"
    # The generator's sizes (LinearFamily): for the held-out set without a file, and training_problems.
    coefficient_bound: int = LinearFamily.coefficient_bound
    constant_bound: int = LinearFamily.constant_bound
    solution_bound: int = LinearFamily.solution_bound
    system_coefficient_bound: int = LinearFamily.system_coefficient_bound
    two_variable_fraction: float = LinearFamily.two_variable_fraction

    @property
    def family(self) -> LinearFamily:
        return LinearFamily(self.coefficient_bound, self.constant_bound, self.solution_bound,
                            self.system_coefficient_bound, self.two_variable_fraction)

    def parse_question(self, text: str) -> Question | None:
        question = parse_selected_question(text)
        return None if question is None else Question(question)

    def reference_question(self, text: str) -> Question:
        """The text after the last "Selected Question" as it stands (colon included), or the whole
        proposal without one (ray_trainer.py ``fit``, proposer_parser_version v2)."""
        return Question(text.split(SELECTED_MARKER)[-1])

    def heldout_problems(self, n: int, seed: int) -> list[tuple[Question, str]]:
        """(question, truth) pairs; truth is the exact answer string (generator: ``str(Fraction)``)."""
        if self.data_path is None and self.dataset is None:
            return [(Question(text), str(value)) for text, value in linear_equation_problems(n, seed, self.family)]
        if self.data_path is not None:
            records = load_records(self.data_path)
        else:
            records = load_hub_records(self.dataset, self.dataset_config, self.dataset_split)
        return [(Question(record_question(r)), record_answer(r)) for r in sample(records, n, seed)]

    def training_problems(self, n: int, seed: int, path: str | None = None) -> list[tuple[Question, str]]:
        """Labelled training questions: rows of the file at ``path`` (as ``data_path`` reads them), else
        the generator's (never ``data_path`` or ``dataset``, which hold the held-out problems)."""
        if path is not None:
            return [(Question(record_question(r)), record_answer(r)) for r in sample(load_records(path), n, seed)]
        return [(Question(text), str(value)) for text, value in linear_equation_problems(n, seed, self.family)]

    def question_features(self, question: Question) -> dict[str, float]:
        """variables: distinct letters used as variables; equations: "=" signs; numbers: their count;
        digits_max: digits of the largest number; words: length in words."""
        digits = operand_digits(question.text)
        return {
            "variables": float(len(variables(question.text))),
            "equations": float(question.text.count("=")),
            "numbers": float(len(digits)),
            "digits_max": float(max(digits, default=0)),
            "words": float(word_count(question.text)),
        }
