"""The synthetic chat corpus of the shipped tiny algebra model (`sqlm_jax/assets/tiny_algebra`).

Linear equations in the held-out generator's style (`tasks.algebra.LinearFamily`), as chats in the two
roles SQLM needs:

* proposer: the topic prompt -> two problems, the last one selected, as the reference's prompt asks
  (``Solve 2*x + 3 = 7 for x.\\nSelected Question: Solve 5*y - 1 = 2*y + 8 for y.``);
* solver: the solver instruction and a problem -> the answer, straight away (``<answer>3</answer>``)
  or after a short worked solution:
  one variable ``a*v + b = c*v + d``: move the terms, add them, divide,
  ``<think>5*y-2*y=8+1 3*y=9 y=9/3=3</think><answer>3</answer>``;
  two variables: Cramer's rule, each product written out,
  ``<think>D=2*(-1)-3*1=-2-3=-5 N=13*(-1)-3*(-1)=-13+3=-10 u=-10/(-5)=2</think><answer>2</answer>``.

Every answer is the generator's (`solve` re-derives it from the text, for the tests). As in the arithmetic corpus
(`tiny_corpus`), one-variable problems are answered straight away more often than worked and
systems the other way round, so the greedy answer of a one-variable problem is a direct one, while
the worked answers among samples agree with each other: the self-consistency gap majority-vote
self-play learns from. Held-out problems can be excluded. Pure functions of a seed.
"""
from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Callable, Iterable

from sqlm_jax.tasks.algebra import LinearFamily, parse_selected_question

PROPOSER_PROMPT = "Write two linear equations and select the last one."
SOLVER_INSTRUCTION = "Answer:"

_TERM = re.compile(r"\s*([+-]?)\s*(\d*)\*?([a-z]?)")
_QUESTION = re.compile(r"Solve (.+) for ([a-z])\.")


def _signed(x: int) -> str:
    """An operand after an operator: negatives in parentheses, ``3*(-2)``."""
    return f"({x})" if x < 0 else str(x)


def _minus(x: int) -> str:
    """``- x`` written as it reads: ``-4`` for 4, ``+4`` for -4."""
    return f"-{x}" if x >= 0 else f"+{-x}"


def parse_side(text: str) -> tuple[dict[str, int], int] | None:
    """``"3*x - y + 5"`` -> ({"x": 3, "y": -1}, 5); None if it is not a sum of such terms."""
    text = text.strip()
    if not text:
        return None
    coefficients, constant, pos = {}, 0, 0
    while pos < len(text):
        match = _TERM.match(text, pos)
        if not match or match.end() == pos or not (match.group(2) or match.group(3)):
            return None
        sign = -1 if match.group(1) == "-" else 1
        if pos and not match.group(1):
            return None  # terms after the first need an operator
        value = sign * int(match.group(2) or 1)
        if match.group(3):
            coefficients[match.group(3)] = coefficients.get(match.group(3), 0) + value
        else:
            constant += value
        pos = match.end()
    return coefficients, constant


def parse_question(question: str) -> tuple[list[tuple[tuple[dict[str, int], int], ...]], str] | None:
    """``Solve <eq>[, <eq>] for <v>.`` -> ([(left side, right side) per equation], v), each side as
    `parse_side` reads it; None if the text is not of that form."""
    match = _QUESTION.fullmatch(question.strip())
    if not match:
        return None
    equations = []
    for equation in match.group(1).split(","):
        sides = equation.split("=")
        if len(sides) != 2 or None in (parsed := [parse_side(s) for s in sides]):
            return None
        equations.append(tuple(parsed))
    return equations, match.group(2)


def solve(question: str) -> Fraction | None:
    """The unique value of the asked variable in ``Solve <eq>[, <eq>] for <v>.``; None if the text is
    not such a question or the solution is not unique."""
    parsed = parse_question(question)
    if parsed is None:
        return None
    equations, asked = parsed
    rows = []
    for (left, lc), (right, rc) in equations:
        terms = {v: left.get(v, 0) - right.get(v, 0) for v in {*left, *right}}
        rows.append((terms, Fraction(rc - lc)))
    names = sorted({v for terms, _ in rows for v in terms})
    if asked not in names or len(rows) != len(names) or len(rows) > 2:
        return None
    if len(rows) == 1:
        coefficient = rows[0][0][asked]
        return rows[0][1] / coefficient if coefficient else None
    (t1, e), (t2, f) = rows
    u, w = names
    a, b, c, d = t1.get(u, 0), t1.get(w, 0), t2.get(u, 0), t2.get(w, 0)
    det = a * d - b * c
    if not det:
        return None
    return (e * d - b * f) / det if asked == u else (a * f - e * c) / det


def worked_one_variable(a: int, b: int, c: int, d: int, v: str) -> str:
    """The scratchpad for ``a*v + b = c*v + d``: move the terms (signs flipped), add them, divide."""
    moved = f"{a}*{v}" + (f"{'-' if c > 0 else '+'}{abs(c)}*{v}" if c else "") + f"={d}" + (_minus(b) if b else "")
    collected = f"{a - c}*{v}={d - b}"
    steps = ([] if moved == collected else [moved]) + [collected]
    return " ".join(steps + [f"{v}={d - b}/{_signed(a - c)}={(d - b) // (a - c)}"])


def _cramer(coefficients: tuple[int, int, int, int], e: int, f: int, asked_first: bool):
    """D = a*d - b*c of ``a*u + b*w = e, c*u + d*w = f``, and the numerator's two factor pairs:
    e*d - b*f for u (``asked_first``), a*f - e*c for w."""
    a, b, c, d = coefficients
    return a * d - b * c, (((e, d), (b, f)) if asked_first else ((a, f), (e, c)))


def worked_two_variable(coefficients: tuple[int, int, int, int], e: int, f: int, asked_first: bool,
                        v: str) -> str:
    """Cramer's rule for ``a*u + b*w = e, c*u + d*w = f``, asking u (``asked_first``) or w."""
    a, b, c, d = coefficients
    det, ((p, q), (r, s)) = _cramer(coefficients, e, f, asked_first)
    num = p * q - r * s

    def difference(name, p, q, r, s, value):
        return f"{name}={p}*{_signed(q)}-{_signed(r)}*{_signed(s)}={p * q}{_minus(r * s)}={value}"

    return (f"{difference('D', a, d, b, c, det)} {difference('N', p, q, r, s, num)} "
            f"{v}={num}/{_signed(det)}={num // det}")


def scratchpad(question: str) -> str:
    """The worked solution of a question of the generator's form (``_linear`` sides)."""
    equations, asked = parse_question(question)
    if len(equations) == 1:
        (left, b), (right, d) = equations[0]
        return worked_one_variable(left.get(asked, 0), b, right.get(asked, 0), d, asked)
    (l1, e), (l2, f) = [(left, right_constant) for (left, _), (_, right_constant) in equations]
    u, w = l1  # the generator writes u before w in both equations
    return worked_two_variable((l1[u], l1[w], l2[u], l2[w]), e, f, asked == u, asked)


def arithmetic_steps(question: str) -> list[tuple[str, int]]:
    """The scratchpad's operations on two numbers, each as ``(expression, value)``: the coefficient
    sum a - c (``4+3``), the constant d - b, the division (one variable); both products and their
    difference for D and N, the division (systems). ``expression`` is written as the scratchpad writes
    its operands."""
    equations, asked = parse_question(question)
    if len(equations) == 1:
        (left, b), (right, d) = equations[0]
        a, c = left.get(asked, 0), right.get(asked, 0)
        steps = [(f"{a}{_minus(c)}", a - c)] if c else []
        steps += [(f"{d}{_minus(b)}", d - b)] if b else []
        return steps + [(f"{d - b}/{_signed(a - c)}", (d - b) // (a - c))]
    (l1, e), (l2, f) = [(left, right_constant) for (left, _), (_, right_constant) in equations]
    u, w = l1
    a, b, c, d = l1[u], l1[w], l2[u], l2[w]
    det, ((p, q), (r, s)) = _cramer((a, b, c, d), e, f, asked == u)
    steps = []
    for x, y, z, t in ((a, d, b, c), (p, q, r, s)):
        steps += [(f"{x}*{_signed(y)}", x * y), (f"{_signed(z)}*{_signed(t)}", z * t),
                  (f"{x * y}{_minus(z * t)}", x * y - z * t)]
    return steps + [(f"{p * q - r * s}/{_signed(det)}", (p * q - r * s) // det)]


def drill_response(expression: str, value: int) -> str:
    """A drill's reply, its one step written as scratchpads write it."""
    return f"<think>{expression}={value}</think><answer>{value}</answer>"


def solver_response(question: str, answer: Fraction, worked: bool) -> str:
    """The answer ``answer`` (the generator's, an integer), after the scratchpad if ``worked``."""
    think = f"<think>{scratchpad(question)}</think>" if worked else ""
    return f"{think}<answer>{answer.numerator}</answer>"


def chat_examples(n: int, seed: int, *, family: LinearFamily = LinearFamily(),
                  proposer_fraction: float = 0.1, worked_fraction_one: float = 0.4,
                  worked_fraction_two: float = 0.8, proposer_prompt: str = PROPOSER_PROMPT,
                  solver_prompt: Callable[[str], str] = lambda q: f"{SOLVER_INSTRUCTION} {q}",
                  exclude: Iterable[str] = (), drill_fraction: float = 0.0) -> list[tuple[str, str]]:
    """``n`` (user, assistant) chats: a ``proposer_fraction`` of proposer turns, a ``drill_fraction``
    of arithmetic drills, the rest solver turns.

    A solver turn is worked with probability ``worked_fraction_one`` (one variable) or
    ``worked_fraction_two`` (a system), else direct. A drill is one operation of a generated problem's
    scratchpad (`arithmetic_steps`), asked as ``Compute <expression>.``: the signed sums and products
    the scratchpads need, many times more often than whole problems can show them, as the easy text of
    a pretraining mix. Questions in ``exclude`` never appear (a drill shows no question).
    """
    excluded = set(exclude)
    rng = random.Random(seed)
    chats = []
    while len(chats) < n:
        question, answer = family.problem(rng)
        if question in excluded:
            continue
        if drill_fraction and rng.random() < drill_fraction:
            expression, value = rng.choice(arithmetic_steps(question))
            chats.append((solver_prompt(f"Compute {expression}."), drill_response(expression, value)))
        elif rng.random() < proposer_fraction:
            draft = family.problem(rng)[0]
            while draft in excluded:
                draft = family.problem(rng)[0]
            chats.append((proposer_prompt, f"{draft}\nSelected Question: {question}"))
        else:
            fraction = worked_fraction_two if "," in question else worked_fraction_one
            chats.append((solver_prompt(question), solver_response(question, answer, rng.random() < fraction)))
    return chats


def proposal_stats(texts: list[str], heldout_questions: set[str]) -> dict:
    """What proposals hold: a selected question, one the generator's form solves with an integer, one
    or two variables, held-out questions, repeats."""
    questions = [parse_selected_question(t) for t in texts]
    selected = [q for q in questions if q is not None]
    solved = [q for q in selected if (s := solve(q)) is not None and s.denominator == 1]
    num = max(len(texts), 1)
    return {
        "num_proposals": len(texts),
        "selected_fraction": len(selected) / num,
        "valid_fraction": len(solved) / num,
        "two_variable_fraction": sum("," in q for q in solved) / max(len(solved), 1),
        "heldout_overlap": sum(q in heldout_questions for q in selected) / num,
        "distinct_fraction": len(set(selected)) / num,
        "examples": selected[:10],
    }
