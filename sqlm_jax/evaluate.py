"""Held-out evaluation: any model, any task, scored against ground truth (evaluation only).

    python -m sqlm_jax.evaluate --config=configs/tiny.py --model=runs/tiny/export [--num_problems=N] [--n=K]

evaluates a model on its config's held-out set exactly as a run of that config does (task options,
problems, lengths; the reference's `trainer.val_only`): greedy accuracy and, with K samples at
temperature 1, mean@K, maj@K (math tasks) and pass@K (best@K: the best of the K scores), each with a
95% bootstrap interval over the problems. Every response goes to a JSONL file (--output). In Python,
with what a run's summary.json records:

    s = json.load(open("runs/tiny/summary.json")); task = get_task(s["task"], **s["task_options"])
    model, _ = load_pretrained("runs/tiny/export"); tokenizer = load_tokenizer("runs/tiny/export")
    evaluate(model, tokenizer, task, task.heldout_problems(s["eval"]["num_problems"], s["eval"]["seed"]),
             max_new_tokens=s["eval"]["max_new_tokens"])
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
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
    majority_scores: np.ndarray | None = None  # [Q] 1.0 where the majority answer is right (same tasks)

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
        result.majority_scores = np.array([m is not None and same_value(m, t)
                                           for m, t in zip(majorities, truths)], np.float32)
        result.majority_accuracy = float(result.majority_scores.mean())
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


def drop_overlong(tokenizer: Tokenizer, task: Task, problems: Sequence[tuple[Question, Any]], max_len: int
                  ) -> tuple[list[tuple[Question, Any]], int]:
    """The problems whose solver prompt fits `max_len` tokens (0: all of them), and how many did not:
    the reference's `data.filter_overlong_prompts` (verl's RLHFDataset), which leaves a Codeforces
    problem longer than its 512-token prompt out of the evaluation rather than cutting it."""
    if not max_len:
        return list(problems), 0
    lengths = map(len, solver_prompts(tokenizer, task, [q for q, _ in problems]))
    kept = [p for p, length in zip(problems, lengths) if length <= max_len]
    return kept, len(problems) - len(kept)


def evaluate_heldout(model, tokenizer: Tokenizer, task: Task, problems, eval_cfg, *, n: int, seed: int,
                     mesh=None) -> tuple[EvalResult, EvalResult | None]:
    """A run's evaluation (`eval_cfg`: the config's eval section): greedy on every problem and, with
    `n`, n samples at temperature 1 on the first eval.sampled_problems (0: all)."""
    greedy = evaluate(model, tokenizer, task, problems, greedy=True, max_new_tokens=eval_cfg.max_new_tokens,
                      batch_size=eval_cfg.batch_size, mesh=mesh, full=True)
    sampled = None if not n else evaluate(
        model, tokenizer, task, problems[:eval_cfg.sampled_problems or None], greedy=False, n=n,
        max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size, seed=seed, mesh=mesh,
        full=True)
    return greedy, sampled


def bootstrap_interval(values, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values [Q]` (one per problem), problems
    resampled with replacement."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return float("nan"), float("nan")
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def heldout_report(greedy: EvalResult, sampled: EvalResult | None) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, low, high)}: greedy accuracy, and over K samples mean@K, maj@K, pass@K."""
    per_problem = {"greedy accuracy": greedy.scores[:, 0]}
    if sampled is not None:
        k = sampled.scores.shape[1]
        per_problem[f"mean@{k}"] = sampled.scores.mean(axis=1)
        if sampled.majority_scores is not None:
            per_problem[f"maj@{k}"] = sampled.majority_scores
        per_problem[f"pass@{k} (best@{k})"] = sampled.scores.max(axis=1)
    return {name: (float(np.mean(v)) if len(v) else 0.0, *bootstrap_interval(v)) for name, v in per_problem.items()}


def evaluate_config(config, model_path: str, *, num_problems: int | None = None, n: int | None = None,
                    output: str | None = None) -> dict[str, Any]:
    """The CLI's work: `model_path` on `config`'s held-out set; writes the responses to `output`
    (default WORKDIR/eval_responses.jsonl) and returns the report, counts and the file's path."""
    from sqlm_jax import mesh as mesh_lib, plan
    from sqlm_jax.models import load_pretrained
    from sqlm_jax.tasks import get_task
    from sqlm_jax.tokenizer import load_tokenizer

    c = config
    task = get_task(c.task, **{k: v for k, v in c.task_options.items() if v is not None})
    mesh = mesh_lib.make_mesh(dict(c.mesh))
    model, _ = load_pretrained(model_path, mesh=mesh, dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
                               **plan.runtime_options(c))
    tokenizer = load_tokenizer(model_path)
    problems, dropped = drop_overlong(tokenizer, task, task.heldout_problems(num_problems or c.eval.num_problems,
                                                                             c.eval.seed), c.eval.max_prompt_len)
    n = c.eval.sampled_n if n is None else n
    greedy, sampled = evaluate_heldout(model, tokenizer, task, problems, c.eval, n=n, seed=c.seed, mesh=mesh)
    output = output or os.path.join(c.workdir, "eval_responses.jsonl")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        for i, (question, truth) in enumerate(problems):
            record = {"question": question.text, "truth": truth, "greedy": greedy.responses[i][0],
                      "greedy_score": float(greedy.scores[i, 0])}
            if sampled is not None and i < len(sampled.responses):
                record.update(samples=sampled.responses[i], sample_scores=sampled.scores[i].tolist())
            f.write(json.dumps(record) + "\n")
    return {"report": heldout_report(greedy, sampled), "problems": len(problems), "dropped": dropped,
            "output": output}


def _cli() -> None:
    from absl import app, flags, logging

    from sqlm_jax.configs import config_flag, parse_flags

    _CONFIG = config_flag()  # the training command's --config flag (and its overrides)
    flags.declare_key_flag("config")  # listed by --help

    flags.DEFINE_string("model", None, "HF folder (or hub id) of the model to evaluate, e.g. a run's export")
    flags.DEFINE_integer("num_problems", None, "held-out problems (default: the config's eval.num_problems)")
    flags.DEFINE_integer("n", None, "samples per problem at temperature 1 for mean@n, maj@n, pass@n "
                         "(default: the config's eval.sampled_n; 0: greedy only)")
    flags.DEFINE_string("output", None, "JSONL file of the responses (default: WORKDIR/eval_responses.jsonl)")
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        from sqlm_jax.config_check import validate
        from sqlm_jax.errors import one_line_errors
        if _CONFIG.value is None or not FLAGS.model:
            sys.exit("error: pass --config=configs/<experiment>.py and --model=<HF folder, e.g. runs/tiny/export>")
        with one_line_errors():
            validate(_CONFIG.value)
            out = evaluate_config(_CONFIG.value, FLAGS.model, num_problems=FLAGS.num_problems, n=FLAGS.n,
                                  output=FLAGS.output)
        print(f"{out['problems']} held-out problems ({out['dropped']} dropped: solver prompt over "
              f"eval.max_prompt_len={_CONFIG.value.eval.max_prompt_len} tokens)")
        for name, (value, low, high) in out["report"].items():
            print(f"{name}: {value:.4f}  (95% bootstrap interval {low:.4f} - {high:.4f})")
        print(f"responses: {out['output']}")

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    _cli()
