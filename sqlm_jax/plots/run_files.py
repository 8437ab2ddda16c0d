"""Reading back what a run writes in its workdir (see ``sqlm_jax.run_log``): metrics, proposals, the
task. Tolerant of a run still being written: missing files read as empty, half-written lines are
skipped, and a resumed run's repeated steps resolve to the later line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from sqlm_jax.tasks import TASKS, Question, Task


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a .jsonl file; [] when it is missing. Lines that do not parse are skipped,
    since a run still being written may end in a half-written line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_summary(workdir: str | Path) -> dict:
    """summary.json of a finished run, {} for a run that has not finished (or a damaged file)."""
    try:
        summary = json.loads((Path(workdir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def run_task_name(workdir: str | Path) -> str:
    """The task a run was made with, from its summary.json, or while it runs from the run.json it
    wrote at its start; a clear error where neither names one, since guessing the task from the
    proposals' wording would draw the wrong features without a word."""
    summary = read_summary(workdir)
    if "task" not in summary:
        try:
            summary = json.loads((Path(workdir) / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
        summary = summary if isinstance(summary, dict) else {}
    if summary.get("task") in TASKS:
        return summary["task"]
    why = (f"its summary.json names {summary['task']!r}, not one of {', '.join(sorted(TASKS))}"
           if "task" in summary else "it has no summary.json naming one (the run has not finished)")
    raise ValueError(f"the task of {workdir} is unknown: {why}; pass it: --task NAME, or "
                     "plot_run(workdir, task_name)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(lines: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps `[S]` int, values `[S]` float) of one scalar, sorted by step. A resumed run logs the
    steps after its last checkpoint twice; the later line wins, as it is the one the final model
    descends from."""
    by_step = {int(line["step"]): float(line[key]) for line in lines
               if _is_number(line.get("step")) and _is_number(line.get(key))}
    steps = np.array(sorted(by_step), dtype=int)
    return steps, np.array([by_step[s] for s in steps], dtype=float)


def eval_series(workdir: str | Path, key: str = "eval/greedy_accuracy") -> tuple[np.ndarray, np.ndarray]:
    """An evaluation curve from metrics.jsonl, else from summary.json's eval_history."""
    steps, values = metric_series(read_jsonl(Path(workdir) / "metrics.jsonl"), key)
    if steps.size == 0:
        steps, values = metric_series(read_summary(workdir).get("eval_history") or [], key)
    return steps, values


@dataclasses.dataclass
class Proposals:
    """Every logged proposal, flattened over steps: parallel sequences of length N."""

    steps: np.ndarray  # int [N]
    texts: list[str]  # [N] the proposals as the proposer wrote them
    valid: np.ndarray  # bool [N]
    solver_reward_sum: np.ndarray  # float [N]: sum of the question's n solver rewards (NaN if not logged)

    def only_valid(self) -> Proposals:
        keep = self.valid
        return Proposals(self.steps[keep], [t for t, k in zip(self.texts, keep) if k], self.valid[keep],
                         self.solver_reward_sum[keep])


def _padded(values, length: int, fill) -> list:
    values = list(values) if isinstance(values, list) else []
    return (values + [fill] * length)[:length]


def load_proposals(question_lines: Iterable[Mapping]) -> Proposals:
    """Flattens questions.jsonl lines (the last line of a step wins, as in `metric_series`).

    A line missing `valid` counts its proposals valid; a missing `solver_reward_sum` reads as NaN.
    Files written before that field was named carry the same sums as `agreement`, read alike.
    """
    by_step = {int(line["step"]): line for line in question_lines
               if _is_number(line.get("step")) and isinstance(line.get("proposals"), list)}
    steps, texts, valid, reward_sums = [], [], [], []
    for step in sorted(by_step):
        line = by_step[step]
        proposals = [p if isinstance(p, str) else "" for p in line["proposals"]]
        count = len(proposals)
        steps += [step] * count
        texts += proposals
        valid += [bool(v) for v in _padded(line.get("valid", [True] * count), count, False)]
        sums = line.get("solver_reward_sum", line.get("agreement"))
        reward_sums += [float(s) if _is_number(s) else math.nan for s in _padded(sums, count, math.nan)]
    return Proposals(np.array(steps, dtype=int), texts, np.array(valid, dtype=bool),
                     np.array(reward_sums, dtype=float))


def logged_questions(texts: Iterable[str], task: Task) -> list[Question]:
    """The task's Question for each logged proposal. One the task cannot parse (a file that marks no
    proposal invalid) is taken as a question by itself, so that its features still count."""
    return [task.parse_question(t) or Question(t.strip()) for t in texts]


def solver_samples(metric_lines: Sequence[Mapping], sample_lines: Sequence[Mapping],
                   solver_reward_sum: np.ndarray) -> int:
    """n, the solver answers per question, which the logged solver reward sums `[N]` are over.

    Read from samples.jsonl (n rewards per question), else from the largest `agreement/k{j}` metric
    the math tasks log, else the largest sum seen (a lower bound, for a bare questions.jsonl).
    """
    for line in sample_lines:
        if isinstance(line.get("solver_rewards"), list) and line["solver_rewards"]:
            return len(line["solver_rewards"])
    ks = [int(m.group(1)) for line in metric_lines for key in line
          if (m := re.fullmatch(r"agreement/k(\d+)", key))]
    if ks:
        return max(ks)
    seen = solver_reward_sum[np.isfinite(solver_reward_sum)]
    return max(1, math.ceil(seen.max())) if seen.size else 1
