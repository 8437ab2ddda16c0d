"""What a run writes for people to read: TensorBoard events, metrics.jsonl, samples.jsonl, questions.jsonl,
console, and optionally Weights & Biases (`log.wandb_project`): the same scalars, plus a table of sampled
questions and answers every `log.wandb_table_every` steps (what the reference's `vis_wandb_table`
shows). W&B is never required: without the option nothing imports it; WANDB_MODE=offline works."""
from __future__ import annotations

import json
import os
import uuid
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

    def __init__(self, workdir: str, enabled: bool = True, *, wandb_project: str | None = None,
                 wandb_table_every: int = 10, config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self.wandb = None
        self.wandb_table_every = wandb_table_every
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        os.makedirs(workdir, exist_ok=True)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(workdir, "samples.jsonl"), "a")
        self.questions_file = open(os.path.join(workdir, "questions.jsonl"), "a")
        if wandb_project:
            self.wandb = _start_wandb(workdir, wandb_project, config)

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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in plain.items() if isinstance(v, (int, float))}, step=step)

    def samples(self, step: int, records: list[Mapping[str, Any]]) -> None:
        """Questions and answers of this step, so the curriculum can be read back."""
        if not self.enabled:
            return
        plain = [{k: _plain(v) for k, v in record.items()} for record in records]
        for record in plain:
            self.samples_file.write(json.dumps({"step": step, **record}) + "\n")
        self.samples_file.flush()
        if self.wandb is not None and plain and step % self.wandb_table_every == 0:
            import wandb
            columns = sorted({k for record in plain for k in record})
            rows = [[json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for k in columns]
                    for r in plain]
            self.wandb.log({"samples": wandb.Table(columns=["step"] + columns, data=[[step] + r for r in rows])},
                           step=step)

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
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(workdir: str, project: str, config: Mapping[str, Any] | None):
    """A W&B run logging into `workdir/wandb`; a resumed run continues the same W&B run (its id is kept
    in the workdir)."""
    try:
        import wandb
    except ImportError as e:
        raise ModuleNotFoundError("log.wandb_project is set but wandb is not installed: pip install "
                                  "'sqlm_jax[wandb]', or leave log.wandb_project unset") from e
    id_file = os.path.join(workdir, "wandb_run_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=project, dir=workdir, id=run_id, resume="allow", config=dict(config or {}))
