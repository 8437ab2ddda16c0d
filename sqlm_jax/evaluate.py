"""Held-out evaluation: any model, any task, scored against ground truth (evaluation only).

    model, _ = load_pretrained("runs/tiny/export")
    task = get_task("arithmetic")
    accuracy = evaluate(model, load_tokenizer("runs/tiny/export"), task, task.heldout_problems(1000, 0))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from sqlm_jax.rewards import majority_answers
from sqlm_jax.rollout import solver_prompts
from sqlm_jax.sampling import generate
from sqlm_jax.tasks.answers import same_value
from sqlm_jax.tasks.base import Question, Task
from sqlm_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class EvalResult:
    accuracy: float                  # mean score of the greedy (or first sampled) response
    scores: np.ndarray               # [Q, n] score of each response to each of Q problems
    responses: list[list[str]]       # [Q][n] decoded responses
    majority_accuracy: float | None = None  # math tasks with n > 1: accuracy of the majority answer

    @property
    def sampled_accuracy(self) -> float:
        """Mean score over all n samples: the expected accuracy of one temperature-1 sample."""
        return float(self.scores.mean())


def evaluate_responses(task: Task, responses: list[list[str]], truths: Sequence[Any]) -> EvalResult:
    """Scores `responses[Q][n]` against `truths[Q]`; majority accuracy uses the task's answer parser."""
    scores = np.array([[task.score(r, t) for r in rs] for rs, t in zip(responses, truths)], np.float32)
    result = EvalResult(accuracy=float(scores[:, 0].mean()) if len(scores) else 0.0,
                        scores=scores, responses=responses)
    if task.reward == "majority" and scores.shape[1] > 1:
        majorities = majority_answers([[task.parse_answer(r) for r in rs] for rs in responses])
        result.majority_accuracy = float(np.mean([m is not None and same_value(m, t)
                                                  for m, t in zip(majorities, truths)]))
    return result


def evaluate(model, tokenizer: Tokenizer, task: Task, problems: Sequence[tuple[Question, Any]], *,
             greedy: bool = True, n: int = 1, max_new_tokens: int = 1024, batch_size: int = 64,
             seed: int = 0, mesh=None, full: bool = False) -> float | EvalResult:
    """Accuracy of `model` on `problems` (greedy by default; `n` samples at temperature 1 otherwise).

    Returns the accuracy, or with `full=True` the `EvalResult` (per-sample scores, responses,
    sampled and majority accuracy).
    """
    if greedy and n != 1:
        raise ValueError("greedy evaluation takes n=1; pass greedy=False to sample n answers")
    questions, truths = [q for q, _ in problems], [t for _, t in problems]
    prompts = solver_prompts(tokenizer, task, questions)
    responses: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                       temperature=0.0 if greedy else 1.0, n=n, stop_ids=tokenizer.stop_ids,
                       pad_id=tokenizer.pad_id, seed=seed + start, mesh=mesh)
        texts = [tokenizer.decode(t) for t in out.token_lists]
        responses += [texts[i:i + n] for i in range(0, len(texts), n)]
    result = evaluate_responses(task, responses, truths)
    return result if full else result.accuracy
