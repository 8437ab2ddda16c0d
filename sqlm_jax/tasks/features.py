"""Pieces of the tasks' ``question_features``: regex counts over question text, and the panels that
say which features a task's curriculum plot draws (`FeaturePanel`).

Each task composes these into its own fixed set of keys; ``sqlm_jax.plots`` only lays them out, so
what makes a question hard stays with the task that asks it. Every function is pure and total: text
with no numbers, operators or variables gives empty counts, never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"(?<![\w.])-?(\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A binary operator sits between an operand (a digit or a closing parenthesis) and the next operand
# (a digit, possibly signed or parenthesised); this keeps "-5" a sign, not a subtraction.
_SYMBOL_OPERATOR = re.compile(r"[\d)]\s*([-+*/×÷xX·])\s*(?=[(-]?\s*\d)")
_OPERATOR_NAMES = {"+": "add", "-": "sub", "*": "mul", "×": "mul", "x": "mul", "X": "mul", "·": "mul",
                   "/": "div", "÷": "div"}
# Words are only a fallback (used when no symbol is found): "product", "sum" and the like also occur
# in questions that do not ask for that operation.
_WORD_OPERATORS = {
    "add": re.compile(r"\b(plus|add|added|sum)\b", re.I),
    "sub": re.compile(r"\b(minus|subtract|subtracted|difference)\b", re.I),
    "mul": re.compile(r"\b(times|multiply|multiplied|product)\b", re.I),
    "div": re.compile(r"\b(divide|divided|quotient)\b", re.I),
}
OPERATORS = ("add", "sub", "mul", "div")
# A variable: a lone letter right after a digit ("2y"), or next to an operator, "=" or a parenthesis
# ("3*x", "x ="), so that "a" in "a number" or "a 5% discount" and the pronoun "I" are not counted.
_VARIABLE = re.compile(r"(?:\d|[*+\-/=^(]\s*)([a-zA-Z])(?![a-zA-Z])"
                       r"|(?<![a-zA-Z])([a-zA-Z])(?=\s*[*+\-/=^)])")
_WORD = re.compile(r"\S+")


def numbers(text: str) -> list[int]:
    """The integer part of each number in the text, unsigned, in order ("-5 - 1,234.5" -> [5, 1234])."""
    return [int(m.group(1).replace(",", "")) for m in _NUMBER.finditer(text)]


def operand_digits(text: str) -> list[int]:
    """Digits of each number of the text, in order ("347*26" -> [3, 2])."""
    return [len(str(value)) for value in numbers(text)]


def operator_counts(text: str) -> dict[str, int]:
    """How often each of + - * / joins two operands; spelled-out operators when there is no symbol."""
    counts = dict.fromkeys(OPERATORS, 0)
    for m in _SYMBOL_OPERATOR.finditer(text):
        counts[_OPERATOR_NAMES[m.group(1)]] += 1
    if not any(counts.values()):
        for name, pattern in _WORD_OPERATORS.items():
            counts[name] = len(pattern.findall(text))
    return counts


def variables(text: str) -> set[str]:
    """The letters used as variables in the text ("Solve 3*x + 2 = 11 for x." -> {"x"})."""
    return {a or b for a, b in _VARIABLE.findall(text)}


def word_count(text: str) -> int:
    """Whitespace-separated words of the text."""
    return len(_WORD.findall(text))


# The key under which the plots put a question's mean solver reward (its logged solver reward sum
# over n) beside the task's features, so that a panel can draw it like any feature.
SOLVER_REWARD = "solver_reward"


@dataclass(frozen=True)
class FeaturePanel:
    """One curriculum panel: features (keys of ``question_features``, or `SOLVER_REWARD`) drawn
    against step as lines with bands, or as stacked shares."""

    title: str
    ylabel: str
    curves: tuple[tuple[str, str], ...]  # (feature key, legend label)
    stacked: bool = False
    fraction: bool = False  # drawn on [0, 1], so that noise in a flat fraction does not look like a trend


# The majority-vote tasks' solver reward is 1 for an answer that agrees with the majority.
MAJORITY_AGREEMENT_PANEL = FeaturePanel("Solver agreement (majority answers / n)", "fraction",
                                        ((SOLVER_REWARD, "agreement"),), fraction=True)
