"""A compositional generator of list-of-integers programming problems, with their truth.

The tiny coding demo's problem family (issue 18): the reference's coding prompt asks for problems
whose input is one line of space-separated integers and whose output is an integer or a list of
integers. A problem here is a pipeline over the input list, two or three stages deep:

    [filter] -> [map] -> [reorder] -> reduce or print

each stage optional but the last, at least one before it, in that order (two to four stages); e.g. "Keep the even numbers,
double each number, then print their sum." The problem text, a reference program and the truth are
written from the same stages, so the truth is exact; test cases are the reference function on seeded
random inputs. Filters and maps take a constant from a range, so the family holds ~6 x 10^4 problem texts and
a proposer rarely writes a held-out one by chance.

`worked` writes how a test's output comes about, one stage at a time (issue 33): the scratchpad the
tiny coding proposer writes before each test line, so that it computes one small step at a time
instead of a whole pipeline in its head.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Callable

Numbers = list[int]
PREFIX = "You are given a line of space-separated integers. "


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a pipeline: how the problem says it, the program's line, and the function."""

    text: str  # "keep the even numbers"
    code: str  # "a = [x for x in a if x % 2 == 0]"
    apply: Callable[[Numbers], Numbers | int]
    # How the scratchpad shows this stage's step on its input list (None: its result, as `show`).
    work: Callable[[Numbers], str] | None = None


def _filters(k: int) -> list[Stage]:
    return [
        Stage("keep the even numbers", "a = [x for x in a if x % 2 == 0]", lambda a: [x for x in a if x % 2 == 0]),
        Stage("keep the odd numbers", "a = [x for x in a if x % 2 == 1]", lambda a: [x for x in a if x % 2 == 1]),
        Stage("keep the positive numbers", "a = [x for x in a if x > 0]", lambda a: [x for x in a if x > 0]),
        Stage("keep the negative numbers", "a = [x for x in a if x < 0]", lambda a: [x for x in a if x < 0]),
        Stage(f"keep the numbers greater than {k}", f"a = [x for x in a if x > {k}]",
              lambda a: [x for x in a if x > k]),
        Stage(f"keep the numbers less than {k}", f"a = [x for x in a if x < {k}]", lambda a: [x for x in a if x < k]),
    ]


def _maps(k: int) -> list[Stage]:
    """``k`` is nonzero and not +-1 (adding 0 or multiplying by 1 would be no stage at all)."""
    return [
        Stage("double each number", "a = [2 * x for x in a]", lambda a: [2 * x for x in a]),
        Stage("square each number", "a = [x * x for x in a]", lambda a: [x * x for x in a]),
        Stage("replace each number by its absolute value", "a = [abs(x) for x in a]", lambda a: [abs(x) for x in a]),
        Stage("negate each number", "a = [-x for x in a]", lambda a: [-x for x in a]),
        Stage(f"add {k} to each number", f"a = [x + {k} for x in a]", lambda a: [x + k for x in a]),
        Stage(f"multiply each number by {k}", f"a = [x * {k} for x in a]", lambda a: [x * k for x in a]),
    ]


REORDERS = [
    Stage("sort them in increasing order", "a = sorted(a)", sorted),
    Stage("sort them in decreasing order", "a = sorted(a, reverse=True)", lambda a: sorted(a, reverse=True)),
    Stage("reverse their order", "a = a[::-1]", lambda a: a[::-1]),
    Stage("replace them by their prefix sums", "a = list(itertools.accumulate(a))",
          lambda a: list(itertools.accumulate(a))),
]

def show(value: Numbers | int) -> str:
    """A scratchpad's value: a list's numbers, "none" for an empty list (visible, unlike an empty
    string), or the integer."""
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _running_sums(a: Numbers) -> str:
    # A sum of up to five two-digit numbers in one go is where a character model slips; one addition
    # per number is within its reach, and the last running sum is the answer.
    return show(list(itertools.accumulate(a)) or [0])


def _range(a: Numbers) -> str:
    return f"{max(a)} - {min(a)} = {max(a) - min(a)}" if a else "0"


FINALS = [
    Stage("print their sum", "print(sum(a))", sum, _running_sums),
    Stage("print how many there are", "print(len(a))", len),
    Stage("print the largest (0 if there are none)", "print(max(a, default=0))", lambda a: max(a, default=0)),
    Stage("print the smallest (0 if there are none)", "print(min(a, default=0))", lambda a: min(a, default=0)),
    Stage("print the first (0 if there are none)", "print(a[0] if a else 0)", lambda a: a[0] if a else 0),
    Stage("print the last (0 if there are none)", "print(a[-1] if a else 0)", lambda a: a[-1] if a else 0),
    Stage("print the largest minus the smallest (0 if there are none)", "print(max(a) - min(a) if a else 0)",
          lambda a: max(a) - min(a) if a else 0, _range),
    Stage("print them separated by spaces", "print(*a)", lambda a: a),
]


@dataclasses.dataclass(frozen=True)
class ListProblem:
    """A pipeline of stages; ``text`` the problem statement, ``program`` a reference solution."""

    stages: tuple[Stage, ...]

    @property
    def text(self) -> str:
        steps = [s.text for s in self.stages]
        body = ", ".join(steps[:-1]) + ", then " + steps[-1]
        return PREFIX + body[0].upper() + body[1:] + "."

    @property
    def program(self) -> str:
        imports = ["import itertools"] if any("itertools" in s.code for s in self.stages) else []
        return "\n".join(imports + ["a = list(map(int, input().split()))"] + [s.code for s in self.stages])

    def output(self, numbers: Numbers) -> str:
        """What the reference program prints for ``numbers``, newline included."""
        value = numbers
        for stage in self.stages:
            value = stage.apply(value)
        return (" ".join(map(str, value)) if isinstance(value, list) else str(value)) + "\n"

    def worked(self, numbers: Numbers) -> str:
        """The scratchpad line of one test: the input, then each stage's step, joined by " > ";
        e.g. "3 -2 5 > 3 5 > 6 10 > 6 16" for "keep the odd numbers, double each number, then print
        their sum". It never holds "|||", so a proposal's parser reads past it."""
        steps, value = [show(numbers)], numbers
        for stage in self.stages:
            steps.append(stage.work(value) if stage.work else show(stage.apply(value)))
            value = stage.apply(value)
        return " > ".join(steps)


def stage_choices(k_range: tuple[int, int] = (-9, 9)) -> tuple[list[Stage], list[Stage]]:
    """Every filter and every map (each constant of ``k_range`` a stage of its own; maps without -1, 0
    and 1), so that a uniform choice is uniform over the texts."""
    ks = range(k_range[0], k_range[1] + 1)
    filters = _filters(0)[:4] + [s for k in ks for s in _filters(k)[4:]]
    maps = _maps(2)[:4] + [s for k in ks if abs(k) > 1 for s in _maps(k)[4:]]
    return filters, maps


FILTERS, MAPS = stage_choices()


def random_problem(rng: random.Random) -> ListProblem:
    """Uniform over the pipelines' texts: a filter, a map and a reorder, each of them or none (not
    all three none), then a final stage."""
    while True:
        stages = [rng.choice([None, *options]) for options in (FILTERS, MAPS, REORDERS)]
        if any(stages):
            return ListProblem((*filter(None, stages), rng.choice(FINALS)))


def random_input(rng: random.Random, length: tuple[int, int] = (1, 8), value: int = 20) -> Numbers:
    return [rng.randint(-value, value) for _ in range(rng.randint(*length))]


def kept(problem: ListProblem, numbers: Numbers) -> Numbers:
    """The list the final stage is given."""
    for stage in problem.stages[:-1]:
        numbers = stage.apply(numbers)
    return numbers


def random_inputs(problem: ListProblem, rng: random.Random, n: int = 5, length: tuple[int, int] = (1, 8),
                  value: int = 20, nonempty: bool = False) -> list[Numbers]:
    """``n`` inputs of ``length`` integers in [-value, value]; with ``nonempty``, each redrawn (up to 20
    times) until something reaches the final stage: a filter that keeps nothing gives the output
    of an empty list whatever the program does in between, a test that tells few programs apart."""
    inputs = []
    for _ in range(n):
        x = random_input(rng, length, value)
        for _ in range(20 if nonempty else 0):
            if kept(problem, x):
                break
            x = random_input(rng, length, value)
        inputs.append(x)
    return inputs


def tests_for(problem: ListProblem, rng: random.Random, n: int = 5, length: tuple[int, int] = (1, 8),
              value: int = 20) -> tuple[tuple[str, str], ...]:
    """``n`` (stdin, expected stdout) pairs on seeded random inputs of ``length`` integers in
    [-value, value], as the sandbox scores them."""
    return tuple((" ".join(map(str, x)), problem.output(x)) for x in random_inputs(problem, rng, n, length, value))


def problems(n: int, seed: int, num_tests: int = 5) -> list[tuple[ListProblem, tuple[tuple[str, str], ...]]]:
    """``n`` seeded (problem, ground-truth tests) pairs; problems may repeat, texts are exact."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        problem = random_problem(rng)
        out.append((problem, tests_for(problem, rng, num_tests)))
    return out


_BY_TEXT = {stage.text: stage for stage in (*FILTERS, *MAPS, *REORDERS, *FINALS)}


def parse_problem(text: str) -> ListProblem | None:
    """The generator's problem whose statement is ``text`` exactly, or None (a model's own wording, a
    stage the generator lacks, stages out of order)."""
    text = text.strip()
    if not (text.startswith(PREFIX) and text.endswith(".")):
        return None
    body = text[len(PREFIX):-1]
    head, sep, last = body.rpartition(", then ")
    if not sep or not head:
        return None
    steps = [*head.split(", "), last]
    steps[0] = steps[0][:1].lower() + steps[0][1:]
    stages = [_BY_TEXT.get(step) for step in steps]
    if None in stages or stages[-1] not in FINALS:
        return None
    order = [next(i for i, group in enumerate((FILTERS, MAPS, REORDERS)) if s in group) for s in stages[:-1]]
    if order != sorted(set(order)):
        return None
    problem = ListProblem(tuple(stages))
    return problem if problem.text == text else None


def wrong_tests(problem: ListProblem, tests: tuple[tuple[str, str], ...]) -> list[bool] | None:
    """Per test of ``tests`` (stdin, stdout), whether it disagrees with the truth of ``problem``; None if
    an input is not a line of integers. (The generator's own functions compute the truth: no program
    runs.)"""
    wrong = []
    for given, expected in tests:
        try:
            numbers = [int(x) for x in given.split()]
        except ValueError:
            return None
        wrong.append(problem.output(numbers).strip() != expected.strip())
    return wrong
