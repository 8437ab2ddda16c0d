"""What a run writes for people to read: TensorBoard events, metrics.jsonl, samples.jsonl, questions.jsonl,
console."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class RunLog:
    """Writes per-step scalars and text samples under `workdir`; a no-op where `enabled` is False
    (every process but the first of a multi-host run)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        os.makedirs(workdir, exist_ok=True)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(workdir, "samples.jsonl"), "a")
        self.questions_file = open(os.path.join(workdir, "questions.jsonl"), "a")

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in metrics.items()}
        for name, value in plain.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(name, value, step)
        self.metrics_file.write(json.dumps({"step": step, **plain}) + "\n")
        self.metrics_file.flush()
        self.tb.flush()

    def samples(self, step: int, records: list[Mapping[str, Any]]) -> None:
        """Questions and answers of this step, so the curriculum can be read back."""
        if not self.enabled:
            return
        for record in records:
            self.samples_file.write(json.dumps({"step": step, **{k: _plain(v) for k, v in record.items()}})
                                    + "\n")
        self.samples_file.flush()

    def questions(self, step: int, proposals, valid, solver_reward_sums, proposer_rewards) -> None:
        """Every proposal of the step, one line: the raw material of the curriculum and PCA plots.

        `proposals`, `valid`, `solver_reward_sums` and `proposer_rewards` are `[B·n]`, one per proposal;
        a solver reward sum is over the question's n answers (under the majority reward, how many agree
        with the majority; under unit tests, the sum of their pass rates), so sum / n is the question's
        mean solver reward.
        """
        if not self.enabled:
            return
        self.questions_file.write(json.dumps({
            "step": step, "proposals": list(proposals), "valid": _plain(np.asarray(valid)),
            "solver_reward_sum": _plain(np.asarray(solver_reward_sums)),
            "proposer_reward": _plain(np.asarray(proposer_rewards))}) + "\n")
        self.questions_file.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            for f in (self.metrics_file, self.samples_file, self.questions_file):
                f.close()
