"""What every task offers, plus the pieces the concrete tasks share.

A task owns all the text handling of one topic: the proposer prompt, turning a proposal into a
:class:`Question` (or None when the proposal is invalid), the solver prompt, extracting the answer
a solver response votes with, a held-out evaluation set with ground truth, and the features that
describe how hard a question is (for the curriculum plots). Ground truth is for evaluation only; it
never feeds a training reward.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from sqlm_jax.tasks import answers
from sqlm_jax.tasks.features import FeaturePanel


@dataclass(frozen=True)
class Question:
    """A question as the solver sees it.

    ``text`` is what goes into the solver prompt. ``tests`` holds the proposer's own test cases
    ``(stdin, expected stdout)`` for the coding task (they are the solver's reward, not ground
    truth); it is empty for the math tasks.
    """

    text: str
    tests: tuple[tuple[str, str], ...] = ()


class Task(Protocol):
    """The interface the trainer and the evaluator code against.

    ``system_prompt`` is the system message the reference puts before the solver prompt (only the
    coding task has one; None elsewhere). Chat templates are applied by the caller.

    ``parse_question`` is strict: None for a proposal that does not follow the format.
    ``reference_question`` is what the reference sends to the solver for any proposal, valid or not
    (verl fork, ray_trainer.py, the proposer_parser_version branches of ``fit``): the default
    ``reward.invalid_proposals="reference"`` uses it, ``"mask"`` drops what ``parse_question`` rejects.

    ``training_problems`` are labelled questions for the dataset baselines
    (``rollout.question_source="dataset"``): from a file at ``path``, else the task's generator, never
    its held-out source (the trainer also drops any whose text is a held-out question's).

    ``question_features`` maps a question to a fixed set of named difficulty measures (operand
    digits, operators, variables, test cases, length ...): the same keys for every question of the
    task, zeros where a question has none of a thing. ``curriculum_panels`` names which of them the
    curriculum plot draws, and how.
    """

    name: str  # "arithmetic" | "algebra" | "coding"
    reward: str  # "majority" (arithmetic, algebra) | "unit_tests" (coding)
    proposer_prompt: str
    system_prompt: str | None
    curriculum_panels: tuple[FeaturePanel, ...]

    def parse_question(self, text: str) -> Question | None: ...

    def reference_question(self, text: str) -> Question: ...

    def solver_prompt(self, question: Question) -> str: ...

    def parse_answer(self, text: str) -> str | None: ...

    def heldout_problems(self, n: int, seed: int) -> list[tuple[Question, Any]]: ...

    def training_problems(self, n: int, seed: int, path: str | None = None) -> list[tuple[Question, Any]]: ...

    def score(self, response: str, truth: Any) -> float: ...

    def question_features(self, question: Question) -> dict[str, float]: ...


# The reference's solver instruction for the math tasks (verl fork, ray_trainer.py, parser v1/v2),
# placed before the question with one space.
MATH_SOLVER_INSTRUCTION = (
    "Let's think step by step and enclose the reasoning process and answer within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> RESULT_NUMBER </answer>."
)


@dataclass
class MathTask:
    """Shared behaviour of the majority-vote tasks; subclasses add prompts and held-out sets.

    ``normalize_answers`` switches answer extraction from the reference rules (integer strings,
    compared exactly: "05" != "5") to exact-rational canonical strings (see ``answers``).
    ``answer_format`` is where the answer is read: ``"tag"`` (the last ``<answer>``, the paper's
    prompts), ``"boxed"`` (the last ``\\boxed{}``) or ``"hash"`` (GSM8K's ``#### answer``), the three
    forms the reference's majority manager reads.
    """

    reward: ClassVar[str] = "majority"
    system_prompt: ClassVar[str | None] = None

    solver_instruction: str = MATH_SOLVER_INSTRUCTION
    normalize_answers: bool = False
    answer_format: str = "tag"

    def __post_init__(self):
        if self.answer_format not in answers.ANSWER_FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r}; choose one of {list(answers.ANSWER_FORMATS)}")

    def solver_prompt(self, question: Question) -> str:
        return f"{self.solver_instruction} {question.text}"

    def parse_answer(self, text: str) -> str | None:
        return answers.parse_math_answer(text, normalize=self.normalize_answers, answer_format=self.answer_format)

    def score(self, response: str, truth: Any) -> float:
        """1.0 if the response's parsed answer has the truth's exact value, else 0.0."""
        return float(answers.same_value(self.parse_answer(response), truth))


def load_records(path: str) -> list[dict]:
    """Rows of a local .jsonl, .json (a list, or {"data": [...]}) or .parquet file, as dicts."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data_path {path!r} is not a file; pass a .jsonl, .json or .parquet file")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        with file.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        return data["data"] if isinstance(data, dict) else data
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs pyarrow (pip install pyarrow), or convert it to .jsonl") from e
        return pq.read_table(file).to_pylist()
    raise ValueError(f"data_path {path!r}: unsupported extension {suffix!r}; use .jsonl, .json or .parquet")


def record_question(record: dict) -> str:
    """The problem text of an OMEGA row (``messages``) or of a flat {question|problem|prompt} row."""
    for key in ("question", "problem", "prompt"):
        if isinstance(record.get(key), str):
            return record[key]
    messages = record.get("messages") or record.get("prompt") or []
    user = [m["content"] for m in messages if m.get("role") == "user"]
    if not user:
        raise ValueError(f"row has no question/problem/prompt text or user message: keys {sorted(record)}")
    return user[-1]


def record_answer(record: dict) -> str:
    """The answer of a labelled row, as a string."""
    for key in ("answer", "ground_truth", "solution"):
        if key in record:
            return str(record[key])
    raise ValueError(f"row has no answer/ground_truth/solution field: keys {sorted(record)}")


def load_hub_records(dataset: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hugging Face hub dataset, with one clear error when that is not possible here."""
    hint = (
        f"could not load hub dataset {dataset!r} (config={config!r}, split={split!r}); it needs the "
        "`datasets` package (pip install 'sqlm_jax[data]') and network access. Offline, download the "
        "file elsewhere and pass data_path=<local .jsonl/.json/.parquet>, or leave dataset unset to "
        "use the built-in generator."
    )
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(hint) from e
    try:
        return list(datasets.load_dataset(dataset, config, split=split))
    except Exception as e:  # offline, unknown id or config: all mean the same fix for the user
        raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from e


def sample(items: Sequence, n: int, seed: int) -> list:
    """``n`` items in a seeded random order (all of them, shuffled, if there are fewer than ``n``)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n]]
