"""The synthetic chat corpus for a tiny coding model: list-of-integers problems (`tasks.list_problems`).

Two roles, as SQLM needs:

* proposer: the topic prompt -> a problem, "Test Cases:" and five ``INPUT ||| OUTPUT`` lines, the
  format of the reference's coding prompt; every test is the generator's truth, and (``worked``)
  worked out first on a scratchpad line of its own (`ListProblem.worked`);
* solver: the problem and the solver instruction -> a ```python program, the generator's reference.

Why the scratchpad sits between the test lines (issue 33): `tasks.coding.parse_proposal` gives the
solver the text before "Test Cases:" and reads as tests only the lines after it that hold "|||". A
worked line before the marker would hand the solver the answers; on a test line it would become part
of the expected output. A line of its own after the marker, without "|||", is read by nobody: the
method's parser, prompts and rewards stay as they are, and the proposer computes each output one small
step at a time before writing it (without it, 78% of the tiny model's test outputs were wrong).

Held-out problems can be excluded. Pure functions of a seed. A model trained on it will still write
wrong tests at times: `proposal_stats` counts them against the generator's truth.
"""
from __future__ import annotations

import collections
import random
from typing import Callable, Iterable

from sqlm_jax.tasks import list_problems
from sqlm_jax.tasks.coding import TESTS_MARKER, parse_proposal

PROPOSER_PROMPT = "Write a list problem with 5 tests."
SOLVER_INSTRUCTION = "Write Python code."


def proposal_text(problem: list_problems.ListProblem, tests, worked: bool = False) -> str:
    """The statement, "Test Cases:" and the ``tests`` (stdin, stdout); with ``worked``, each test line
    after its scratchpad line."""
    lines = []
    for given, expected in tests:
        if worked:
            lines.append(problem.worked([int(x) for x in given.split()]))
        lines.append(f"{given} ||| {expected.strip()}")
    return "\n".join([problem.text, TESTS_MARKER, *lines])


def solver_response(problem: list_problems.ListProblem) -> str:
    return f"```python\n{problem.program}\n```"


def chat_examples(n: int, seed: int, *, proposer_fraction: float = 0.2, proposer_prompt: str = PROPOSER_PROMPT,
                  solver_prompt: Callable[[str], str] = lambda q: f"{q}\n\n{SOLVER_INSTRUCTION}",
                  exclude: Iterable[str] = (), test_length: tuple[int, int] = (1, 8),
                  test_value: int = 20, worked: bool = False, nonempty: bool = False) -> list[tuple[str, str]]:
    """``n`` (user, assistant) chats, a ``proposer_fraction`` of them proposer turns, whose tests have
    ``test_length`` integers in [-test_value, test_value] (``nonempty``: inputs a filter leaves something
    of, `list_problems.random_inputs`), each worked out first with ``worked``; problems whose
    statement is in ``exclude`` never appear."""
    excluded = set(exclude)
    rng = random.Random(seed)
    chats = []
    while len(chats) < n:
        problem = list_problems.random_problem(rng)
        if problem.text in excluded:
            continue
        if rng.random() < proposer_fraction:
            inputs = list_problems.random_inputs(problem, rng, length=tuple(test_length), value=test_value,
                                                 nonempty=nonempty)
            tests = [(" ".join(map(str, x)), problem.output(x)) for x in inputs]
            chats.append((proposer_prompt, proposal_text(problem, tests, worked)))
        else:
            chats.append((solver_prompt(problem.text), solver_response(problem)))
    return chats


def proposal_stats(texts: list[str], heldout_questions: set[str]) -> dict:
    """What proposals hold: a problem with tests, a statement of the generator's family, held-out
    problems, repeats, and how often the proposer's own tests are wrong (against the generator's
    truth: the solver's reward then scores a correct program down)."""
    parsed = [p for p in map(parse_proposal, texts) if p is not None]
    known = [(list_problems.parse_problem(problem), tests) for problem, tests in parsed]
    known = [(p, tests) for p, tests in known if p is not None]
    flags = [list_problems.wrong_tests(p, tests) for p, tests in known]
    checked = [(sum(f), len(tests)) for f, (_, tests) in zip(flags, known) if f is not None]
    # A character model computes an output one digit at a time, in its head: longer inputs, more slips.
    by_length = collections.defaultdict(list)
    for f, (_, tests) in zip(flags, known):
        for wrong, (given, _) in zip(f or (), tests):
            by_length[len(given.split())].append(wrong)
    num = max(len(texts), 1)
    return {
        "num_proposals": len(texts),
        "with_tests_fraction": len(parsed) / num,
        "valid_fraction": len(known) / num,
        "heldout_overlap": sum(problem in heldout_questions for problem, _ in parsed) / num,
        "distinct_fraction": len({problem for problem, _ in parsed}) / num,
        "wrong_test_fraction": sum(w for w, _ in checked) / max(sum(t for _, t in checked), 1),
        "proposals_with_a_wrong_test": sum(w > 0 for w, _ in checked) / max(len(checked), 1),
        "wrong_test_fraction_by_input_length": {n: sum(w) / len(w) for n, w in sorted(by_length.items())},
        "examples": [problem for problem, _ in parsed[:10]],
    }
