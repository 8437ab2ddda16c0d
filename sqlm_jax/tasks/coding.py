"""Coding: the proposer writes a problem plus test cases; solvers are rewarded by passing them.

Held-out evaluation: Codeforces problems in the Eurus-2 RL data format (PRIME), from ``data_path``
or a small shipped sample (``data/codeforces_sample.jsonl``), scored by the fraction of ground-truth
tests passed in ``sqlm_jax.sandbox``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

from sqlm_jax.tasks import list_problems
from sqlm_jax.tasks.base import Question, load_records, sample
from sqlm_jax.tasks.features import SOLVER_REWARD, FeaturePanel, numbers, word_count

# Reference wording (verl fork, examples/data_preprocess/selfplay.py, prompt_version coding_v1).
CODING_PROPOSER_PROMPT = (
    "Generate an original programming problem similar in style and difficulty to LeetCode easy problems.\n\n"
    "Requirements:\n"
    "- The problem must take a single line of space-separated integers as input and produce either a "
    "single integer or a space-separated list of integers as output.\n"
    "- Provide 5 test cases in the exact format: INPUT_STRING ||| OUTPUT_STRING (no explanations, no "
    "extra text, OUTPUT_STRING must include the trailing '\\n' if needed).\n\n"
    "Example Output Format:\n"
    "Problem Description:\n"
    "You are given a list of integers. Write a program that reads the list and returns <expected output>.\n\n"
    "Input:\n"
    "A single line contains space-separated integers a_1, a_2, ..., a_n (\u22121000 <= a_i <= 1000).\n\n"
    "Output:\n"
    "Print a single integer \u2014 <expected output>.\n\n"
    "Test Cases:\n"
    "8 -3 7 0 2 ||| 14\n"
    "-2 5 -4 3 ||| 2\n"
    "10 -10 ||| 0\n"
    "4 ||| 4\n"
    "-5 -1 -4 ||| -10\n"
)

# Reference wording of the solver's user message suffix (ray_trainer.py extract_problem_description;
# the same suffix ends every Eurus-2 coding prompt).
CODING_SOLVER_INSTRUCTION = (
    "Write Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
)

# The system message the reference gives the coding solver (Eurus-2's action-format prompt).
CODING_SYSTEM_PROMPT = (
    "\nWhen tackling complex reasoning tasks, you have access to the following actions. "
    "Use them as needed to progress through your thought process.\n\n"
    "[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n[SIMPLIFY]\n\n[SYNTHESIZE]\n\n[PIVOT]\n\n[OUTPUT]\n\n"
    "You should strictly follow the format below:\n\n"
    "[ACTION NAME]\n\n"
    "# Your action step 1\n\n"
    "# Your action step 2\n\n"
    "# Your action step 3\n\n...\n\n"
    "Next action: [NEXT ACTION NAME]\n\n"
)

# Eurus-2 user messages are the problem followed by the solver instruction, which starts with this.
_INSTRUCTION_START = "Write Python code to solve the problem."

TESTS_MARKER = "Test Cases:"
TEST_SEPARATOR = "|||"
SAMPLE_FILE = "codeforces_sample.jsonl"


def parse_proposal(text: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(problem, tests) from a proposal, or None if it has no "Test Cases:", no problem or no test.

    As in the reference: the problem is the text before the first "Test Cases:"; the tests are the
    lines holding "|||" between the first and a second "Test Cases:", split at the first "|||" and
    stripped on both sides. The reference keeps a proposal with zero parsable tests; here it is
    invalid, since no solver could be rewarded on it.
    """
    parts = text.split(TESTS_MARKER)
    if len(parts) < 2:
        return None
    problem = parts[0].strip()
    tests = tuple(
        (given.strip(), expected.strip())
        for given, expected in (
            line.split(TEST_SEPARATOR, 1) for line in parts[1].splitlines() if TEST_SEPARATOR in line
        )
    )
    return (problem, tests) if problem and tests else None


def extract_program(text: str) -> str | None:
    """The program of a response: the last ```python block, else the first bare ``` block (a language
    word on its first line dropped), else None; then nothing is run and the response scores 0.

    Like the reference's extractor (split on the last "```python", then on the next "```"), a block
    cut off by the length limit runs to the end of the response.
    """
    if "```python" in text:
        return text.rsplit("```python", 1)[1].split("```", 1)[0].strip("\n")
    if "```" not in text:
        return None
    block = text.split("```", 2)[1]
    first, newline, rest = block.partition("\n")
    # "```cpp\n...": the word names the language; "```\nprint(1)": the first line is code.
    is_language_word = bool(newline) and first.strip().isidentifier() and " " not in first.strip()
    return (rest if is_language_word else block).strip("\n")


def _problem_statement(record: dict) -> str:
    """The bare problem of a Eurus-2 row: the user message without its code-format instruction."""
    user = [m["content"] for m in record["prompt"] if m["role"] == "user"][-1]
    return user.split(_INSTRUCTION_START, 1)[0].strip()


def _record_tests(record: dict) -> tuple[tuple[str, str], ...]:
    truth = record["reward_model"]["ground_truth"]
    cases = json.loads(truth) if isinstance(truth, str) else truth
    return tuple(zip(cases["inputs"], cases["outputs"], strict=True))


@dataclass
class CodingTask:
    """Coding self-play; reward from unit tests.

    ``solver_instruction`` is appended to the problem after a blank line. ``data_path`` is a local
    Eurus-2 RL file (.jsonl/.json/.parquet); rows whose ``data_source`` does not contain
    ``data_source`` (default "codeforces", the paper's benchmark; None keeps all) are left out.
    ``generator="lists"`` takes held-out and training problems from ``list_problems`` instead (the
    tiny coding demo's family), with the generator's ground-truth tests.
    """

    name: ClassVar[str] = "coding"
    reward: ClassVar[str] = "unit_tests"
    curriculum_panels: ClassVar[tuple[FeaturePanel, ...]] = (
        FeaturePanel("Test cases", "count", (("tests", "test cases"), ("input_ints", "integers per input"))),
        FeaturePanel("Problem length", "words", (("words", "words"),)),
        # The coding solver's reward is the fraction of the proposer's tests its program passes.
        FeaturePanel("Solver pass rate (mean over n solutions)", "fraction", ((SOLVER_REWARD, "pass rate"),),
                     fraction=True))

    proposer_prompt: str = CODING_PROPOSER_PROMPT
    solver_instruction: str = CODING_SOLVER_INSTRUCTION
    system_prompt: str | None = CODING_SYSTEM_PROMPT
    normalize_answers: bool = False  # accepted for a uniform config; programs are not normalised
    data_path: str | None = None
    data_source: str | None = "codeforces"
    generator: str | None = None

    def __post_init__(self):
        if self.generator not in (None, "lists"):
            raise ValueError(f"generator={self.generator!r}; choose None (Codeforces data) or 'lists'")

    def parse_question(self, text: str) -> Question | None:
        parsed = parse_proposal(text)
        return None if parsed is None else Question(*parsed)

    def reference_question(self, text: str) -> Question:
        """The problem before "Test Cases:" with its tests; without a parsable test, no tests, so that
        every solution scores 0 (ray_trainer.py ``fit``, proposer_parser_version v3: the reference's
        dummy unit tests on ``extract_unit_tests(...) == 'error'``)."""
        parsed = parse_proposal(text)
        return Question(*parsed) if parsed is not None else Question(text.split(TESTS_MARKER)[0].strip())

    def solver_prompt(self, question: Question) -> str:
        return f"{question.text}\n\n{self.solver_instruction}"

    def parse_answer(self, text: str) -> str | None:
        return extract_program(text)

    def heldout_problems(self, n: int, seed: int) -> list[tuple[Question, tuple[tuple[str, str], ...]]]:
        """(question, ground-truth tests) pairs; the tests stay out of the Question the solver sees."""
        if self.generator == "lists":
            return [(Question(p.text), tests) for p, tests in list_problems.problems(n, seed)]
        if self.data_path is None:
            records = load_records(str(resources.files("sqlm_jax.tasks") / "data" / SAMPLE_FILE))
        else:
            records = load_records(self.data_path)
        if self.data_source is not None:  # rows without a data_source field are kept
            records = [r for r in records if self.data_source in r.get("data_source", self.data_source)]
        return [(Question(_problem_statement(r)), _record_tests(r)) for r in sample(records, n, seed)]

    def training_problems(self, n: int, seed: int, path: str | None = None
                          ) -> list[tuple[Question, tuple[tuple[str, str], ...]]]:
        """Labelled training problems from a Eurus-2 RL file at ``path`` (every data source kept), else
        the list generator's (``generator="lists"``)."""
        if path is None and self.generator == "lists":
            return [(Question(p.text), tests) for p, tests in list_problems.problems(n, seed)]
        if path is None:
            raise ValueError("the coding task has no problem generator: set rollout.dataset_path to a "
                             "Eurus-2 RL file of training problems")
        return [(Question(_problem_statement(r)), _record_tests(r)) for r in sample(load_records(path), n, seed)]

    def score(self, response: str, truth: tuple[tuple[str, str], ...]) -> float:
        """Fraction of the ground-truth tests the response's program passes (0.0 without a program)."""
        program = self.parse_answer(response)
        if program is None:
            return 0.0
        from sqlm_jax.sandbox import run_program  # lazy: the sandbox is optional for everything else

        return float(run_program(program, truth).fraction)

    def question_features(self, question: Question) -> dict[str, float]:
        """tests: the proposer's test cases; words: length of the problem in words; input_ints: mean
        count of integers in a test's input (0 without tests)."""
        input_ints = [len(numbers(given)) for given, _ in question.tests]
        return {
            "tests": float(len(question.tests)),
            "words": float(word_count(question.text)),
            "input_ints": sum(input_ints) / len(input_ints) if input_ints else 0.0,
        }
