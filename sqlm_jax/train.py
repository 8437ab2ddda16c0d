"""The SQLM self-play loop: run the steps, evaluate, checkpoint and resume, finish (export, plots, summary).

One step (SQLM_SPEC "One training step"), `Trainer.self_play_step`:
  1. propose: B·n questions from one topic prompt (rollout.py);
  2. solve: the task parses them; the solver samples n answers to each (B·n·n answers);
  3. score: majority vote (math), unit tests in the sandbox (coding) or format-only (ablation);
  4. log-probs: old and reference log-probs of both batches under the weights before any update of
     this step (the old ones are the sampler's own when rl.reuse_sampler_logprobs applies: the same
     weights), then advantages per group (a proposer group: one row's n proposals; a solver group:
     the n answers to one question) (learner.py);
  5. update: PPO on the solver batch every step, on the proposer batch every `proposer_update_freq`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from sqlm_jax import distributed, learner, plan
from sqlm_jax import mesh as mesh_lib
from sqlm_jax.checkpoints import Checkpointer
from sqlm_jax.config_check import validate
from sqlm_jax.evaluate import evaluate
from sqlm_jax.learner import Learner, NonFiniteError
from sqlm_jax.models import load_pretrained, save_pretrained
from sqlm_jax.models.critic import Critic
from sqlm_jax.plots import plot_run
from sqlm_jax.rollout import Rollouts
from sqlm_jax.run_log import RunLog
from sqlm_jax.tasks import get_task
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.workdir import Workdir


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes its step, checkpoints, and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """The run: a Learner (what is trained), Rollouts (what it samples and how it is scored), the loop."""

    def __init__(self, config):
        self.config = c = config
        self.task = get_task(c.task, **{k: v for k, v in c.task_options.items() if v is not None})
        self.mesh = mesh_lib.make_mesh(dict(c.mesh))
        validate(c, num_batch_devices=self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        # Refuse up front, with the per-device table, a run that cannot fit (before any weight loads).
        plan.check_fits(c, plan.load_model_config(c), dict(self.mesh.shape), plan.local_device_bytes())
        load = lambda: load_pretrained(c.model.path, mesh=self.mesh, dtype=c.model.param_dtype,
                                       compute_dtype=c.model.compute_dtype, remat=c.model.remat)
        model, self.model_config = load()
        critic = None
        if c.rl.advantage == "gae":
            # The reference's critic: initialised from the same checkpoint, trained with its own AdamW.
            critic_graphdef, critic_params = nnx.split(Critic(load()[0]))
            critic_params = jax.device_put(critic_params, mesh_lib.param_shardings(critic_params, self.mesh))
            critic = critic_graphdef, critic_params
        self.learner = Learner(c, self.mesh, *nnx.split(model), critic=critic)
        self.tokenizer = load_tokenizer(c.model.path)
        self.rollouts = Rollouts(c, self.task, self.tokenizer, self.mesh)

        self.workdir = Workdir(c.workdir, mirror=c.workdir_mirror)
        if c.resume:
            self.workdir.pull()
        self.log = RunLog(self.workdir.local, enabled=jax.process_index() == 0)
        self.checkpointer = Checkpointer(self.workdir.checkpoints, keep=c.checkpoint.keep)
        self.eval_problems = self.task.heldout_problems(c.eval.num_problems, c.eval.seed)
        self.steps_done = 0
        self.eval_history: list[dict[str, Any]] = []
        self.nonfinite_steps = 0  # steps in a row with an update skipped for a non-finite loss

    @property
    def model(self):
        return nnx.merge(*self.learner.policy)

    def self_play_step(self, step: int) -> dict[str, float]:
        """Steps 1-5 of the module docstring, one call and one timer (`time/<phase>`) each."""
        c, policy, times = self.config, self.learner.policy, {}
        with _timer(times, "propose"):
            proposer = self.rollouts.questions(policy, step)
        with _timer(times, "solve"):
            solver = self.rollouts.solve(policy, step, proposer)
        with _timer(times, "score"):
            proposer, solver = self.rollouts.score(proposer, solver)
        trained = {"solver": solver}
        if proposer.sample is not None and c.rl.proposer_update_freq and (step + 1) % c.rl.proposer_update_freq == 0:
            trained["proposer"] = proposer
        with _timer(times, "logprobs"):
            batches = jax.block_until_ready(
                {role: self.learner.batch(r.sample, r.row_mask, r.rewards) for role, r in trained.items()})
        with _timer(times, "update"):
            metrics = learner.fetch({role: self.learner.update(batch) for role, batch in batches.items()})

        tokens = solver.generated_tokens + proposer.generated_tokens
        metrics.update(**proposer.metrics, **solver.metrics, **{f"time/{k}": v for k, v in times.items()})
        metrics.update({"length/solver": solver.generated_tokens / len(solver.texts),
                        "length/proposer": proposer.generated_tokens / len(proposer.texts),
                        "throughput/generated_tokens_per_s": tokens / sum(times.values())})
        self._log_rollouts(step, proposer, solver)
        return metrics

    def _log_rollouts(self, step: int, proposer, solver) -> None:
        n, valid, proposer_r = self.config.rollout.n, proposer.valid, proposer.rewards.reshape(-1)
        self.log.samples(step, [
            {"proposal": proposer.texts[i], "valid": bool(valid[i]), "solver_rewards": solver.rewards[i],
             "proposer_reward": proposer_r[i], "answers": solver.texts[i * n:(i + 1) * n]}
            for i in range(min(self.config.log.samples, len(proposer.texts)))])
        self.log.questions(step, proposer.texts, valid, solver.rewards.sum(axis=1), proposer_r)

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Stops the run after train.max_nonfinite_steps steps in a row with a skipped update."""
        roles = [k.split("/")[0] + (" critic" if "/critic_" in k else "")
                 for k, v in metrics.items() if k.endswith("skipped_steps") and v]
        self.nonfinite_steps = self.nonfinite_steps + 1 if roles else 0
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_steps >= limit:
            raise NonFiniteError(
                f"non-finite gradient norm at step {self.steps_done} (role {', '.join(roles)}): the "
                f"update was skipped {self.nonfinite_steps} steps in a row (train.max_nonfinite_steps="
                f"{limit}); lower optim.lr, keep optim.grad_clip on, or train in float32 "
                "(model.param_dtype and model.compute_dtype)")

    # ------------------------------------------------------------------------------------- the run
    def evaluate(self) -> dict[str, float]:
        c, model = self.config, self.model
        result = evaluate(model, self.tokenizer, self.task, self.eval_problems, greedy=True,
                          max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size,
                          mesh=self.mesh, full=True)
        out = {"eval/greedy_accuracy": result.accuracy}
        if c.eval.sampled_n:
            problems = self.eval_problems[:c.eval.sampled_problems or None]
            sampled = evaluate(model, self.tokenizer, self.task, problems, greedy=False,
                               n=c.eval.sampled_n, max_new_tokens=c.eval.max_new_tokens,
                               batch_size=c.eval.batch_size, seed=c.seed, mesh=self.mesh, full=True)
            out["eval/sampled_accuracy"] = sampled.sampled_accuracy
            if sampled.majority_accuracy is not None:
                out["eval/majority_accuracy"] = sampled.majority_accuracy
        self.eval_history.append({"step": self.steps_done, **out})
        self.log.scalars(self.steps_done, out)
        return out

    def save(self) -> None:
        self.checkpointer.save(self.steps_done, self.learner.states, {
            "steps_done": self.steps_done, "seed": self.config.seed, "data_position": self.rollouts.position,
            "eval_history": self.eval_history, "pregenerated": self.rollouts.pool,
            "nonfinite_steps": self.nonfinite_steps})
        self.workdir.push()

    def restore(self) -> bool:
        step = self.checkpointer.latest_step()
        if step is None:
            return False
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.learner.states)
        self.learner.states, meta = self.checkpointer.restore(step, abstract)
        if meta["seed"] != self.config.seed:
            raise ValueError(f"the checkpoint in {self.config.workdir} was made with seed {meta['seed']}, "
                             f"not {self.config.seed}: resume with --config.seed={meta['seed']}")
        self.steps_done, self.rollouts.position = meta["steps_done"], meta["data_position"]
        self.eval_history, self.rollouts.pool = meta["eval_history"], meta["pregenerated"]
        self.nonfinite_steps = meta.get("nonfinite_steps", 0)
        return True

    def run(self) -> dict[str, Any]:
        c = self.config
        resumed = c.resume and self.restore()
        if not resumed and self.checkpointer.latest_step() is not None:
            raise FileExistsError(f"{c.workdir} already holds checkpoints; pass --config.resume=True to "
                                  "continue that run, or choose another --config.workdir")
        if c.rollout.question_source == "pregenerated" and self.rollouts.pool is None:
            self.rollouts.pregenerate(self.learner.policy)
        if not self.eval_history:
            self.evaluate()
        eval_every = c.eval.every or c.train.steps
        with StopFlag() as stop, tqdm(total=c.train.steps, initial=self.steps_done,
                                      disable=jax.process_index() != 0, desc="self-play") as bar:
            while self.steps_done < c.train.steps:
                metrics = self.self_play_step(self.steps_done)
                self.steps_done += 1
                self.log.scalars(self.steps_done, metrics)
                self._check_finite(metrics)
                bar.update(1)
                bar.set_postfix(solver=f"{metrics['reward/solver']:.2f}",
                                proposer=f"{metrics['reward/proposer']:.2f}",
                                valid=f"{metrics['proposals/valid']:.2f}")
                if self.steps_done % eval_every == 0 or self.steps_done == c.train.steps:
                    self.evaluate()
                stopping = distributed.any_host(stop.requested)  # every host stops at the same step
                if stopping or self.steps_done % c.checkpoint.every == 0 or self.steps_done == c.train.steps:
                    self.save()
                if stopping:
                    return {"stopped_at": self.steps_done}
        return self.finish()

    def finish(self) -> dict[str, Any]:
        c = self.config
        export_dir = None
        if c.export:
            export_dir = os.path.join(self.workdir.local, "export")
            save_pretrained(self.model, self.model_config, export_dir)  # collective: every host calls it
            if jax.process_index() == 0:
                self.tokenizer.hf.save_pretrained(export_dir)
        summary = {
            "task": c.task,
            "base_accuracy": self.eval_history[0]["eval/greedy_accuracy"],
            "final_accuracy": self.eval_history[-1]["eval/greedy_accuracy"],
            "steps": self.steps_done,
            "export_dir": export_dir and os.path.join(c.workdir, "export"),  # where it ends up
            "eval_history": self.eval_history,
        }
        if jax.process_index() == 0:
            summary["plots"] = [str(p) for p in plot_run(self.workdir.local, c.task)]
            with open(os.path.join(self.workdir.local, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.workdir.push()
        self.log.close()
        self.checkpointer.close()
        return summary


@contextlib.contextmanager
def _timer(times: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    times[phase] = time.perf_counter() - start
