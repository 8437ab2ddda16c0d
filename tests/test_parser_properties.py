"""Parsers never crash on what a model writes: every task's question, answer and test-case parser and the
answer normaliser return a value or None for any text (random unicode, huge numbers, nested or unclosed
tags and code fences), and stay linear-ish on 100 kB of adversarial input (no regex backtracking blow-up)."""
import re
import signal
from contextlib import contextmanager
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlm_jax.tasks import TASKS, Question, answers, get_task
from sqlm_jax.tasks.algebra import parse_selected_question
from sqlm_jax.tasks.coding import extract_program, parse_proposal

FRAGMENTS = ["<answer>", "</answer>", "<think>", "</think>", "```", "```python\n", "```py", "\n", " ",
             "Selected Question:", "Selected Question", "Test Cases:", " ||| ", "|||", "\\boxed{", "{", "}",
             "\\frac{", "\\dfrac{1}{2}", "####", "x = ", "=", "-", "+", ".", ",", "/", "1,000", "0.5",
             "3/4", "−", "٣", "１２", "e10", "NaN", "inf", "\x00", "\ud7ff", "🙂"]
huge_numbers = st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n)
model_text = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(FRAGMENTS), huge_numbers,
                                st.integers().map(str)), max_size=30).map("".join)

PARSERS = {
    "last_answer_tag": answers.last_answer_tag,
    "last_answer_tag multiline": lambda t: answers.last_answer_tag(t, multiline=True),
    "reference_answer": answers.reference_answer,
    "normalized_answer": answers.normalized_answer,
    "to_fraction": answers.to_fraction,
    "parse_math_answer": answers.parse_math_answer,
    "parse_math_answer normalized": lambda t: answers.parse_math_answer(t, normalize=True),
    "last_boxed": answers.last_boxed,
    "hash_answer": answers.hash_answer,
    "parse_math_answer boxed normalized": lambda t: answers.parse_math_answer(t, normalize=True, answer_format="boxed"),
    "parse_selected_question": parse_selected_question,
    "parse_proposal": parse_proposal,
    "extract_program": extract_program,
}
RESULT_TYPES = (str, Fraction, tuple, Question, type(None))


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name) for name in TASKS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=model_text)
def test_parsers_return_a_value_or_none(text):
    for name, parse in PARSERS.items():
        assert isinstance(parse(text), RESULT_TYPES), name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=model_text, truth=st.one_of(st.integers().map(str), huge_numbers, st.text(max_size=10)))
def test_every_task_parses_and_scores_any_text(tasks, text, truth):
    for name, task in tasks.items():
        question = task.parse_question(text)
        assert question is None or isinstance(question, Question)
        assert isinstance(task.reference_question(text), Question)
        assert isinstance(task.parse_answer(text), (str, type(None)))
        if name != "coding":  # coding's truth is its tests, scored in the sandbox
            assert 0.0 <= task.score(text, truth) <= 1.0
            assert isinstance(answers.same_value(task.parse_answer(text), truth), bool)


@settings(max_examples=500, deadline=None)
@given(text=st.lists(st.sampled_from(["<answer>", "</answer>", "<answer", "answer>", "\n", " 1", "2 ", "x"]),
                     max_size=14).map("".join))
def test_last_answer_tag_finds_what_the_reference_regex_finds(text):
    for multiline, flags in ((False, 0), (True, re.DOTALL)):
        found = re.findall(r"<answer>(.*?)</answer>", text, flags)
        assert answers.last_answer_tag(text, multiline=multiline) == (found[-1].strip() if found else None)


@contextmanager
def _time_limit(seconds: int, what: str):
    def fail(*_):
        raise AssertionError(f"{what} took over {seconds} s on 100 kB: backtracking blow-up")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


ADVERSARIAL = {  # each ~100 kB, shaped to make a naive regex retry from every position
    "unclosed answer tags": "<answer>1 " * 10_000,
    "answer tags, no close": "<answer>" + "1" * 100_000,
    "open fences": "```python\n" * 10_000,
    "fence words": "```" * 33_000,
    "nested braces": "\\boxed{" * 14_000 + "1",
    "fractions": "\\frac{" * 16_000,
    "thousands": "1," * 50_000,
    "assignments": "x=" * 50_000,
    "test separators": "1 ||| " * 16_000,
    "selected": "Selected Question: " * 5_000,
    "digits": "9" * 100_000,
    "spaces": " " * 100_000 + "x",
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_parsers_are_fast_on_100_kB_of_adversarial_text(tasks, case):
    text = ADVERSARIAL[case]
    for name, parse in PARSERS.items():
        with _time_limit(5, f"{name} on {case!r}"):
            assert isinstance(parse(text), RESULT_TYPES)
    for name, task in tasks.items():
        with _time_limit(5, f"{name} task on {case!r}"):
            task.parse_question(text)
            task.parse_answer(text)
