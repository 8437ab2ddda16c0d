"""Tasks: proposal and answer parsing, prompts, held-out sets and their scoring."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlm_jax.tasks import TASKS, Question, answers, get_task
from sqlm_jax.tasks.algebra import linear_equation_problems
from sqlm_jax.tasks.features import SOLVER_REWARD, numbers, operand_digits, operator_counts, variables
from sqlm_jax.tasks.arithmetic import multiplication_pairs, sample_operand
from tests.sandbox_marks import needs_bwrap

# ---------------------------------------------------------------------------------------------
# get_task


def test_get_task_builds_every_task_with_the_protocol():
    for name in ("arithmetic", "algebra", "coding"):
        task = get_task(name)
        assert task.name == name
        assert task.reward == ("unit_tests" if name == "coding" else "majority")
        assert task.proposer_prompt
        for method in ("parse_question", "reference_question", "solver_prompt", "parse_answer",
                       "heldout_problems", "score", "question_features"):
            assert callable(getattr(task, method))


def test_get_task_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'geometry'; valid names: algebra, arithmetic, coding"):
        get_task("geometry")


def test_get_task_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"no option\(s\) \['data_pth'\].*data_path"):
        get_task("algebra", data_pth="x.jsonl")


def test_get_task_overrides():
    task = get_task("arithmetic", proposer_prompt="Ask me.", solver_instruction="Go:", normalize_answers=True)
    assert task.proposer_prompt == "Ask me."
    assert task.solver_prompt(Question("1 + 1")) == "Go: 1 + 1"
    assert task.parse_answer("<answer>2.0</answer>") == "2"


# ---------------------------------------------------------------------------------------------
# Proposals


def test_arithmetic_parse_question():
    task = get_task("arithmetic")
    assert task.parse_question("  What is 123 * 456?\n") == Question("What is 123 * 456?")
    assert task.parse_question("") is None
    assert task.parse_question(" \n\t ") is None


@pytest.mark.parametrize(
    "proposal, expected",
    [
        ("1. A\n2. B\n3. C\nSelected Question: C again", "C again"),
        ("Selected Question: first\nSelected Question:\n  the last one \n", "the last one"),
        ("**Selected Question:** Tom has 3 apples.", "Tom has 3 apples."),
        ("Selected Question - what is x?", "- what is x?"),
        ("three problems, no selection", None),
        ("Selected Question:   \n", None),
        ("selected question: wrong case", None),
    ],
)
def test_algebra_parse_question(proposal, expected):
    parsed = get_task("algebra").parse_question(proposal)
    assert (parsed and parsed.text) == expected


def test_coding_parse_question():
    proposal = (
        "Problem Description:\nSum the list.\n\nTest Cases:\n"
        "1 2 3 ||| 6\n"
        "no separator on this line\n"
        "  -1 1   |||   0  \n"
        "5 ||| 5 ||| extra\n"
    )
    question = get_task("coding").parse_question(proposal)
    assert question.text == "Problem Description:\nSum the list."
    assert question.tests == (("1 2 3", "6"), ("-1 1", "0"), ("5", "5 ||| extra"))


def test_coding_parse_question_reads_only_the_first_tests_section():
    question = get_task("coding").parse_question("P\nTest Cases:\n1 ||| 1\nTest Cases:\n2 ||| 2\n")
    assert question.tests == (("1", "1"),)


@pytest.mark.parametrize(
    "proposal",
    ["Sum the list.\n1 2 ||| 3", "Sum the list.\nTest Cases:\nnone here", "Test Cases:\n1 ||| 1"],
)
def test_coding_parse_question_invalid(proposal):
    assert get_task("coding").parse_question(proposal) is None


# ---------------------------------------------------------------------------------------------
# Solver prompts


def test_math_solver_prompt_prefixes_the_reference_instruction():
    prompt = get_task("algebra").solver_prompt(Question("Solve 2*x = 4 for x."))
    assert prompt.startswith("Let's think step by step and enclose the reasoning process and answer within")
    assert "<answer> RESULT_NUMBER </answer>. Solve 2*x = 4 for x." in prompt


def test_coding_solver_prompt_appends_the_instruction():
    task = get_task("coding")
    prompt = task.solver_prompt(Question("Sum the list."))
    assert prompt.startswith("Sum the list.\n\nWrite Python code to solve the problem.")
    assert "```python" in prompt and prompt.endswith("at the end.")
    assert "[ASSESS]" in task.system_prompt
    assert get_task("arithmetic").system_prompt is None


# ---------------------------------------------------------------------------------------------
# Answers: reference rules


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>6*7</think> <answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>4.5</answer>", None),
        ("<answer>05</answer>", "05"),
        ("<answer>-7</answer>", "-7"),
        ("<answer>x = 5</answer>", None),
        ("<answer>3/4</answer>", None),
        ("<answer></answer>", None),
        ("the answer is 42", None),
        ("<answer>\n42\n</answer>", None),  # the reference regex has no DOTALL
        ("<answer>7</answer> <answer>\n8\n</answer>", "7"),
    ],
)
def test_reference_parse_answer(response, expected):
    assert get_task("arithmetic").parse_answer(response) == expected
    assert get_task("algebra").parse_answer(response) == expected


def test_reference_votes_are_exact_strings():
    task = get_task("arithmetic")
    assert task.parse_answer("<answer>05</answer>") != task.parse_answer("<answer>5</answer>")


# ---------------------------------------------------------------------------------------------
# Answers: normalised


@pytest.mark.parametrize(
    "content, expected",
    [
        ("3/4", "3/4"),
        ("0.75", "3/4"),
        ("6/8", "3/4"),
        ("\\frac{3}{4}", "3/4"),
        ("-\\dfrac{6}{8}", "-3/4"),
        ("x = 5", "5"),
        ("y=-2/4", "-1/2"),
        ("5.0", "5"),
        ("05", "5"),
        ("-2", "-2"),
        ("+3", "3"),
        (".5", "1/2"),
        ("1,234", "1234"),
        ("$12$", "12"),
        ("\\boxed{7}", "7"),
        ("7.", "7"),
        ("\u22124", "-4"),
        ("2x = 10", None),
        ("1/0", None),
        ("1/2/3", None),
        ("five", None),
        ("1,23", None),
        ("", None),
    ],
)
def test_normalized_answers(content, expected):
    task = get_task("algebra", normalize_answers=True)
    assert task.parse_answer(f"<think>...</think><answer> {content} </answer>") == expected


def test_normalized_answers_accept_multiline_tags_and_merge_equal_values():
    task = get_task("arithmetic", normalize_answers=True)
    assert task.parse_answer("<answer>\n42\n</answer>") == "42"
    votes = {task.parse_answer(f"<answer>{a}</answer>") for a in ("0.5", "1/2", "x = 2/4", "\\frac{1}{2}")}
    assert votes == {"1/2"}


def test_to_fraction_and_same_value():
    assert answers.to_fraction("x = -3/6") == Fraction(-1, 2)
    assert answers.same_value("05", 5)
    assert answers.same_value("1/2", "0.5")
    assert not answers.same_value(None, "1")
    assert not answers.same_value("1", "not a number")


# ---------------------------------------------------------------------------------------------
# Math scoring


def test_math_score_compares_values():
    arithmetic = get_task("arithmetic")
    assert arithmetic.score("<answer>05</answer>", "5") == 1.0
    assert arithmetic.score("<answer>6</answer>", "5") == 0.0
    assert arithmetic.score("no tag", "5") == 0.0
    algebra = get_task("algebra")
    assert algebra.score("<answer>0.75</answer>", "3/4") == 0.0  # reference parser: integers only
    assert get_task("algebra", normalize_answers=True).score("<answer>0.75</answer>", "3/4") == 1.0


# ---------------------------------------------------------------------------------------------
# Held-out: arithmetic


def test_arithmetic_heldout_is_seeded_with_exact_products():
    task = get_task("arithmetic")
    problems = task.heldout_problems(300, seed=3)
    assert problems == task.heldout_problems(300, seed=3)
    assert problems != task.heldout_problems(300, seed=4)
    pairs = set()
    for question, truth in problems:
        match = re.fullmatch(r"Give me the answer of the following equation: (\d+) \* (\d+) =", question.text)
        a, b = map(int, match.groups())
        assert 0 <= a <= 999 and 0 <= b <= 999
        assert truth == str(a * b)
        pairs.add((a, b))
    assert len(pairs) == 300  # duplicates dropped, like the reference
    assert task.score(f"<answer>{problems[0][1]}</answer>", problems[0][1]) == 1.0


def test_operand_distribution_matches_the_reference_mixture():
    rng = random.Random(0)
    draws = [sample_operand(rng) for _ in range(40_000)]
    assert min(draws) == 0 and max(draws) == 999
    ones = sum(d < 10 for d in draws) / len(draws)
    tens = sum(10 <= d < 100 for d in draws) / len(draws)
    # [0,9] w.p. 1/4, [0,99] w.p. 1/4, [0,999] w.p. 1/2:
    assert ones == pytest.approx(0.25 + 0.25 * 0.1 + 0.5 * 0.01, abs=0.012)
    assert tens == pytest.approx(0.25 * 0.9 + 0.5 * 0.09, abs=0.012)


def test_multiplication_pairs_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n must be in"):
        multiplication_pairs(10**6, seed=0)


# ---------------------------------------------------------------------------------------------
# Held-out: algebra


def _solve_generated(text: str) -> tuple[str, dict[str, Fraction]]:
    """Independently solve a generated "Solve <eq>, <eq> for v." problem; check uniqueness."""
    body, asked = re.fullmatch(r"Solve (.+) for ([a-z])\.", text).groups()
    equations = [eq.split(" = ") for eq in body.split(", ")]
    names = sorted(set(re.findall(r"\b[a-z]\b", body)))
    assert asked in names and len(equations) == len(names) in (1, 2)

    def residual(lhs, rhs, point):  # lhs - rhs, an affine function of the variables
        return eval(lhs, {}, point) - eval(rhs, {}, point)

    zero = {v: Fraction(0) for v in names}
    rows = []
    for lhs, rhs in equations:
        const = residual(lhs, rhs, zero)
        coefs = [residual(lhs, rhs, {**zero, v: Fraction(1)}) - const for v in names]
        rows.append((coefs, -const))
    if len(names) == 1:
        (a,), b = rows[0]
        assert a != 0
        solution = {names[0]: b / a}
    else:
        ((a, b), e), ((c, d), f) = rows
        det = a * d - b * c
        assert det != 0
        solution = {names[0]: (e * d - b * f) / det, names[1]: (a * f - e * c) / det}
    for lhs, rhs in equations:  # substitution
        assert residual(lhs, rhs, solution) == 0
    return asked, solution


def test_algebra_generator_solutions_verified_by_substitution():
    task = get_task("algebra")
    problems = task.heldout_problems(200, seed=0)
    assert problems == task.heldout_problems(200, seed=0)
    assert problems != task.heldout_problems(200, seed=1)
    kinds = Counter()
    for question, truth in problems:
        asked, solution = _solve_generated(question.text)
        assert truth == str(solution[asked])
        assert Fraction(truth).denominator == 1  # integer solutions, scorable by the reference parser
        assert task.score(f"<answer>{truth}</answer>", truth) == 1.0
        kinds[len(solution)] += 1
    assert kinds[1] > 50 and kinds[2] > 50


def test_linear_equation_problems_read_naturally():
    for text, _ in linear_equation_problems(100, seed=5):
        assert text.startswith("Solve ") and text.endswith(".")
        assert not re.search(r"[+-] [+-]|(?<!\d)[01]\*", text), text  # no "+ -", "1*x" or "0*x"


def test_algebra_heldout_from_local_files(tmp_path):
    omega_rows = [
        {"messages": [{"role": "user", "content": f"Solve {i}*x = {2 * i} for x."}], "ground_truth": "2"}
        for i in range(1, 6)
    ]
    omega = tmp_path / "omega.jsonl"
    omega.write_text("".join(json.dumps(r) + "\n" for r in omega_rows))
    problems = get_task("algebra", data_path=str(omega)).heldout_problems(3, seed=0)
    assert len(problems) == 3 and all(truth == "2" for _, truth in problems)
    assert all(q.text.startswith("Solve ") for q, _ in problems)
    assert problems == get_task("algebra", data_path=str(omega)).heldout_problems(3, seed=0)
    assert len(get_task("algebra", data_path=str(omega)).heldout_problems(100, seed=0)) == 5

    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([{"question": "What is x if x + 1 = 2?", "answer": 1}]))
    assert get_task("algebra", data_path=str(flat)).heldout_problems(5, seed=0) == [
        (Question("What is x if x + 1 = 2?"), "1")
    ]


def test_algebra_heldout_from_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is needed only for .parquet data files")
    import pyarrow as pa

    path = tmp_path / "omega.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Solve x = 3 for x.", "answer": "3"}]), path)
    problems = get_task("algebra", data_path=str(path)).heldout_problems(1, seed=0)
    assert problems == [(Question("Solve x = 3 for x."), "3")]


def test_algebra_data_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_path"):
        get_task("algebra", data_path=str(tmp_path / "missing.jsonl")).heldout_problems(1, seed=0)
    bad = tmp_path / "omega.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        get_task("algebra", data_path=str(bad)).heldout_problems(1, seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="pass data_path=<local"):
        get_task("algebra", dataset="allenai/omega-explorative").heldout_problems(1, seed=0)


# ---------------------------------------------------------------------------------------------
# Coding: answers, held-out sample, scoring


def test_coding_parse_answer_takes_the_last_python_block():
    task = get_task("coding")
    response = "```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```\n"
    assert task.parse_answer(response) == "print(2)"
    cut_off = "print(3)\n# cut off by the length limit"
    assert task.parse_answer(f"```python\n{cut_off}") == cut_off
    assert task.parse_answer("no code here") is None


def test_coding_program_falls_back_to_the_first_bare_block():
    """Issue 14: the reference's extractor reads the first bare ``` block when there is no ```python
    one, dropping a language word on its first line."""
    task = get_task("coding")
    assert task.parse_answer("```\nprint(4)\n```\n```\nprint(5)\n```") == "print(4)"
    assert task.parse_answer("Here:\n```py\nprint(6)\n```") == "print(6)"
    assert task.parse_answer("```cpp\nint main() {}\n```") == "int main() {}"
    assert task.parse_answer("```print(7)```") == "print(7)"
    assert task.parse_answer("```python\nprint(8)\n```\n```\nprint(9)\n```") == "print(8)"
    assert task.score("I would print the sum.", (("1 2", "3"),)) == 0.0  # no block: nothing runs


def test_reference_questions_are_what_the_reference_sends_the_solver():
    """ray_trainer.py fit(): arithmetic's raw proposal; algebra's text after the last "Selected
    Question" (colon kept) or the whole proposal; coding's problem with its tests, or none."""
    arithmetic, algebra, coding = (get_task(n) for n in ("arithmetic", "algebra", "coding"))
    assert arithmetic.reference_question(" 12*3\n") == Question(" 12*3\n")
    assert arithmetic.reference_question("") == Question("")
    assert algebra.reference_question("A.\nSelected Question: Solve x+1=2.") == Question(": Solve x+1=2.")
    assert algebra.reference_question("Solve 2x = 4 for x.") == Question("Solve 2x = 4 for x.")
    assert coding.reference_question("Sum them.\nTest Cases:\n1 2 ||| 3\n") == Question("Sum them.", (("1 2", "3"),))
    assert coding.reference_question("Sum them.\nTest Cases:\nnone") == Question("Sum them.")
    assert coding.reference_question("Sum them.") == Question("Sum them.")
    for task, proposal in ((algebra, "no marker"), (coding, "Sum.\nTest Cases:\n1 ||| 1")):
        if task.parse_question(proposal) is not None:  # strict and reference agree on valid proposals
            assert task.parse_question(proposal).tests == task.reference_question(proposal).tests


@pytest.mark.parametrize("answer_format, response, expected", [
    ("tag", "<think>2*3</think> <answer> 6 </answer>", "6"),
    ("tag", "<answer>6.0</answer>", None),  # the reference keeps integer strings only
    ("boxed", "so \\boxed{6} and finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("boxed", "\\boxed{x^{2}} then \\boxed{12", None),  # verl: an unclosed last box reads as none
    ("boxed", "no box", None),
    ("hash", "Natalia sold 48 + 24 = 72 clips.\n#### 1,072", "1072"),
    ("hash", "#### $5\n#### 7", "7"),  # "$5" is not a number right after "#### ": the next one is
    ("hash", "#### 5\n#### 7", "5"),  # verl's strict search: the first one in the last 300 characters
    ("hash", "the answer is 7", None),
])
def test_answer_formats_of_labelled_math_data(answer_format, response, expected):
    assert get_task("algebra", answer_format=answer_format).parse_answer(response) == expected


def test_answer_formats_normalised():
    assert get_task("algebra", answer_format="boxed", normalize_answers=True).parse_answer(
        "\\boxed{\\frac{2}{4}}") == "1/2"
    assert get_task("arithmetic", answer_format="hash", normalize_answers=True).parse_answer("#### 1,000.0") == "1000"
    with pytest.raises(ValueError, match="answer_format='latex'; choose one of"):
        get_task("algebra", answer_format="latex")


# Reference solutions of the shipped sample, by extra_info.index; kept here, out of the data file.
SAMPLE_SOLUTIONS = {
    0: "w = int(input())\nprint('YES' if w % 2 == 0 and w > 2 else 'NO')",
    1: "for _ in range(int(input())):\n"
    "    s = input().strip()\n"
    "    print(s if len(s) <= 10 else f'{s[0]}{len(s) - 2}{s[-1]}')",
    2: "print(sum(sum(map(int, input().split())) >= 2 for _ in range(int(input()))))",
    3: "print(sum(1 if '++' in input() else -1 for _ in range(int(input()))))",
    4: "m, n = map(int, input().split())\nprint(m * n // 2)",
    5: "a, b = input().lower(), input().lower()\nprint((a > b) - (a < b))",
    6: "print('+'.join(sorted(input().strip().split('+'))))",
    7: "s = input().strip()\nprint(s[0].upper() + s[1:])",
    8: "input()\ns = input().strip()\nprint(sum(x == y for x, y in zip(s, s[1:])))",
    9: "a, b = map(int, input().split())\nyears = 0\n"
    "while a <= b:\n    a, b, years = 3 * a, 2 * b, years + 1\n"
    "print(years)",
    10: "input()\nprint(*sorted(map(int, input().split())))",
}


def _sample_rows():
    from importlib import resources

    path = resources.files("sqlm_jax.tasks") / "data" / "codeforces_sample.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_sample_is_in_eurus_format_and_solvable():
    rows = _sample_rows()
    assert sorted(r["extra_info"]["index"] for r in rows) == sorted(SAMPLE_SOLUTIONS)
    for row in rows:
        assert row["data_source"] == "codeforces" and row["ability"] == "code"
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        truth = json.loads(row["reward_model"]["ground_truth"])
        assert len(truth["inputs"]) == len(truth["outputs"]) >= 4
        program = SAMPLE_SOLUTIONS[row["extra_info"]["index"]]
        for given, expected in zip(truth["inputs"], truth["outputs"], strict=True):
            run = subprocess.run(
                [sys.executable, "-c", program], input=given, capture_output=True, text=True, timeout=10
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout.rstrip("\n") == expected.rstrip("\n"), (row["extra_info"]["index"], given)


def test_coding_heldout_from_the_sample():
    task = get_task("coding")
    problems = task.heldout_problems(5, seed=0)
    assert problems == task.heldout_problems(5, seed=0)
    assert len(problems) == 5 and len(task.heldout_problems(1000, seed=0)) == len(SAMPLE_SOLUTIONS)
    for question, tests in problems:
        assert question.tests == ()  # ground truth stays out of the question
        assert "Write Python code" not in question.text and "Input" in question.text
        assert tests and all(isinstance(t, str) for pair in tests for t in pair)


def test_coding_heldout_filters_data_source(tmp_path):
    rows = _sample_rows()
    rows[0]["data_source"] = "taco"
    path = tmp_path / "eurus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(get_task("coding", data_path=str(path)).heldout_problems(100, seed=0)) == len(rows) - 1
    assert len(get_task("coding", data_path=str(path), data_source=None).heldout_problems(100, seed=0)) == len(rows)


@needs_bwrap  # on a machine without bubblewrap the sandbox refuses, as it should: nothing to score
def test_coding_score_runs_the_sandbox():
    pytest.importorskip("sqlm_jax.sandbox", reason="sqlm_jax.sandbox (the sandbox issue) has not landed yet")
    task = get_task("coding")
    row = next(r for r in _sample_rows() if r["extra_info"]["index"] == 4)
    truth = json.loads(row["reward_model"]["ground_truth"])
    tests = tuple(zip(truth["inputs"], truth["outputs"], strict=True))
    right = f"Tiles.\n```python\n{SAMPLE_SOLUTIONS[4]}\n```"
    assert task.score(right, tests) == 1.0
    half_right = "```python\nm, n = map(int, input().split())\nprint(4)\n```"  # right on 2 of 5 tests
    assert task.score(half_right, tests) == pytest.approx(2 / 5)
    assert task.score("no program", tests) == 0.0


def test_registry_names_match_classes():
    assert {name: cls.name for name, cls in TASKS.items()} == {n: n for n in TASKS}


# ---------------------------------------------------------------------------------------------
# Question features


def test_feature_pieces():
    assert numbers("-5 - 1,234.5 and 07") == [5, 1234, 7]
    assert operand_digits("347*26") == [3, 2]
    assert operator_counts("(1 + 2) * -3 / 4") == {"add": 1, "sub": 0, "mul": 1, "div": 1}
    assert operator_counts("What is 6 times 7?") == {"add": 0, "sub": 0, "mul": 1, "div": 0}
    assert variables("Solve 3*x + 2 = 11 for x. I have a number.") == {"x"}


def test_arithmetic_features():
    task = get_task("arithmetic")
    f = task.question_features(Question("347*26"))
    assert (f["digits_a"], f["digits_b"], f["product_digits"]) == (3, 2, 4)  # 347*26 = 9022
    assert (f["op_mul"], f["op_add"], f["op_none"]) == (1, 0, 0)
    assert (f["log10_a"], f["numbers"], f["chars"]) == (pytest.approx(math.log10(348)), 2, 6)
    f = task.question_features(Question("What is 12 + 5?"))
    assert (f["digits_a"], f["digits_b"], f["op_add"]) == (2, 1, 1)
    f = task.question_features(Question("-5 - 1,234 x 7"))  # a sign is not an operator
    assert (f["digits_a"], f["digits_b"], f["op_sub"], f["op_mul"]) == (1, 4, 0.5, 0.5)
    f = task.question_features(Question("Compute the product of 12 and 30."))
    assert f["op_mul"] == 1
    f = task.question_features(Question("Sure! Here is a problem:"))
    assert (f["digits_a"], f["numbers"], f["op_none"]) == (0, 0, 1)


def test_algebra_features():
    task = get_task("algebra")
    f = task.question_features(Question("Solve 3*x + 2 = 11 for x."))
    assert (f["variables"], f["equations"]) == (1, 1)
    assert f == {"variables": 1, "equations": 1, "numbers": 3, "digits_max": 2, "words": 8}
    proposal = ("1. ...\n2. ...\n**Selected Question:** If 2a + 3b = 12 and a - b = 1, find a and b. "
                "A number is used 5 times.")
    f = task.question_features(task.parse_question(proposal))
    assert (f["variables"], f["equations"]) == (2, 2)


def test_coding_features():
    task = get_task("coding")
    proposal = ("Problem Description:\nSum the list.\n\nTest Cases:\n1 2 3 ||| 6\n4 ||| 4\n-1 1 ||| 0\n")
    f = task.question_features(task.parse_question(proposal))
    assert (f["tests"], f["words"], f["input_ints"]) == (3, 5, 2)
    assert task.question_features(Question("no tests here"))["tests"] == 0


@pytest.mark.parametrize("name", sorted(TASKS))
@given(text=st.text(max_size=200), tests=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=5)),
                                                  max_size=4))
def test_question_features_have_fixed_keys_and_finite_values(name, text, tests):
    task = get_task(name)
    f = task.question_features(Question(text, tuple(tests)))
    assert list(f) == list(task.question_features(Question("")))
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in f.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_curriculum_panels_draw_features_the_task_computes(name):
    task = get_task(name)
    keys = set(task.question_features(Question(""))) | {SOLVER_REWARD}
    curves = [key for panel in task.curriculum_panels for key, _ in panel.curves]
    assert curves and set(curves) <= keys
    assert SOLVER_REWARD in curves


def test_training_problems_come_from_the_generator_or_a_file_never_the_heldout_source(tmp_path):
    from sqlm_jax.tasks import get_task
    heldout_file = tmp_path / "omega.jsonl"
    heldout_file.write_text('{"question": "Solve 2*x = 4 for x.", "answer": "2"}\n')
    algebra = get_task("algebra", data_path=str(heldout_file))
    assert [q.text for q, _ in algebra.heldout_problems(1, 0)] == ["Solve 2*x = 4 for x."]
    generated = algebra.training_problems(5, 7)
    assert len(generated) == 5 and all(q.text.startswith("Solve ") for q, _ in generated)
    assert "Solve 2*x = 4 for x." not in {q.text for q, _ in generated}
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"question": "What is 6 * 7?", "answer": 42}\n')
    arithmetic = get_task("arithmetic")
    assert [(q.text, t) for q, t in arithmetic.training_problems(3, 0, path=str(train_file))] == [
        ("What is 6 * 7?", "42")]
    a, b = (6, 9), (2, 3)
    family = get_task("arithmetic", heldout_a_range=a, heldout_b_range=b, question_template="{a}*{b}")
    assert all(eval(q.text) == int(t) for q, t in family.training_problems(4, 1))
    with pytest.raises(ValueError, match="rollout.dataset_path"):
        get_task("coding").training_problems(2, 0)


def test_coding_problems_from_the_list_generator():
    from sqlm_jax.tasks import get_task, list_problems
    task = get_task("coding", generator="lists")
    heldout = task.heldout_problems(4, seed=2)
    assert [(q.text, t) for q, t in heldout] == [(p.text, t) for p, t in list_problems.problems(4, seed=2)]
    assert all(q.tests == () and len(t) == 5 for q, t in heldout)  # the truth stays out of the question
    assert len(task.training_problems(3, seed=9)) == 3
    with pytest.raises(ValueError, match="generator='nope'"):
        get_task("coding", generator="nope")
