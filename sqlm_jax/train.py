"""The SQLM self-play loop: run the steps, evaluate, checkpoint and resume, finish (export, plots, summary).

One step (SQLM_SPEC "One training step"), `Trainer.self_play_step`:
  1. propose: B·n questions from one topic prompt (rollout.py);
  2. solve: the task parses them; the solver samples n answers to each (B·n·n answers);
  3. score: majority vote (math), unit tests in the sandbox (coding) or format-only (ablation);
     refill: the update's rows, with the reward options (overlong penalty, truncated rows masked) and
     dynamic sampling's zero-variance filter and extra rounds (dynamic_sampling.py; all off by default);
  4. log-probs: old and reference log-probs of both batches under the weights before any update of
     this step (the old ones are the sampler's own when rl.reuse_sampler_logprobs applies: the same
     weights), then advantages per group (a proposer group: one row's n proposals; a solver group:
     the n answers to one question) (learner.py);
  5. update: with a critic (GAE), the critic on the proposer batch, then on the solver batch, every
     step; then PPO on the solver batch every step, and on the proposer batch every
     `proposer_update_freq` steps.
Questions from a fixed pool (rollout.question_source pregenerated or dataset) train no proposer.
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

from sqlm_jax import aot, auto_knobs, distributed, dynamic_sampling, learner, plan
from sqlm_jax import mesh as mesh_lib
from sqlm_jax.checkpoints import Checkpointer, CheckpointProblem
from sqlm_jax.config_check import validate
from sqlm_jax.evaluate import drop_overlong, evaluate, evaluate_heldout
from sqlm_jax.learner import Learner, NonFiniteError
from sqlm_jax.models import load_pretrained, save_pretrained
from sqlm_jax.models.critic import Critic
from sqlm_jax.plots import plot_run
from sqlm_jax.rollout import FIXED_SOURCES, Rollouts
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
        # The options given (None keeps the task's default), recorded in run.json and summary.json.
        self.task_options = {k: v for k, v in c.task_options.items() if v is not None}
        self.task = get_task(c.task, **self.task_options)
        self.mesh = mesh_lib.make_mesh(dict(c.mesh))
        validate(c, num_batch_devices=self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        # Memory knobs left at -1 ("auto") become the largest that fit (auto_knobs); then refuse up front,
        # with the per-device table, a run that cannot fit (before any weight loads). On TPU the
        # compiler judges auto knobs, from the programs themselves (the plan is a quarter low there);
        # pinned ones cost no compile here, and XLA's own refusal is one line (errors.out_of_memory).
        model_cfg, device_bytes = plan.load_model_config(c), plan.local_device_bytes()
        judge = (aot.judge_on_this_host(model_cfg, device_bytes,
                                        log=print if jax.process_index() == 0 else lambda line: None)
                 if auto_knobs.AUTO in (c.rl.micro_batch_size, c.rollout.rows_in_flight) else None)
        self.config = c = auto_knobs.resolve(c, model_cfg, dict(self.mesh.shape), device_bytes, judge)
        if judge is None:
            plan.check_fits(c, model_cfg, dict(self.mesh.shape), device_bytes)
        else:
            aot.check_fits(judge, c, plan.memory_plan(c, model_cfg, dict(self.mesh.shape)))
        load = lambda: load_pretrained(c.model.path, mesh=self.mesh, dtype=c.model.param_dtype,
                                       compute_dtype=c.model.compute_dtype,
                                       **plan.runtime_options(c))
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
        self.log = RunLog(self.workdir.local, enabled=jax.process_index() == 0,
                          wandb_project=c.log.wandb_project, wandb_table_every=c.log.wandb_table_every,
                          config=c.to_dict())
        self.checkpointer = Checkpointer(self.workdir.checkpoints, keep=c.checkpoint.keep)
        heldout = self.task.heldout_problems(c.eval.num_problems, c.eval.seed)
        self.heldout_texts = {q.text for q, _ in heldout}  # kept out of a dataset run's questions
        self.eval_problems, self.eval_dropped = drop_overlong(self.tokenizer, self.task, heldout,
                                                              c.eval.max_prompt_len)
        self.second_set = self._second_set() if c.eval.second_set else None
        self.steps_done = 0
        self.eval_history: list[dict[str, Any]] = []
        self.nonfinite_steps = 0  # steps in a row with an update skipped for a non-finite loss

    @property
    def model(self):
        return nnx.merge(*self.learner.policy)

    def self_play_step(self, step: int) -> dict[str, float]:
        """Steps 1-5 of the module docstring, one call and one timer (`time/<phase>`) each."""
        c, policy, times = self.config, self.learner.policy, {}
        has_critic = self.learner.critic_state is not None
        actor = {"solver": True, "proposer": bool(c.rl.proposer_update_freq) and
                 (step + 1) % c.rl.proposer_update_freq == 0}
        with self.learner.offloaded():
            with _timer(times, "propose"):
                proposer = self.rollouts.questions(policy, step)
            with _timer(times, "solve"):
                solver = self.rollouts.solve(policy, step, proposer)
            with _timer(times, "score"):
                proposer, solver = self.rollouts.score(proposer, solver)
            # A pool's questions were not sampled this step: nothing of the proposer's to train on.
            rollouts = {"proposer": proposer, "solver": solver} if proposer.sample is not None else {"solver": solver}
            trained = [role for role in rollouts if actor[role] or has_critic]
            with _timer(times, "refill"):
                rows, sampling_metrics, extra_tokens = dynamic_sampling.step_rows(self.rollouts, policy, step,
                                                                                  rollouts, trained)
        with _timer(times, "logprobs"):
            batches = jax.block_until_ready({role: self.learner.batch(*rows[role]) for role in trained})
        with _timer(times, "update"):
            # The reference's order (ray_trainer.py `fit`): update_critic on the proposer batch, then on
            # the solver's, every step; update_actor on the solver batch, then on the proposer's only
            # every self_play_proposer_update_freq steps.
            updates = {role: {} for role in batches}
            for role in ("proposer", "solver"):
                if has_critic and role in batches:
                    updates[role].update(self.learner.update(batches[role], actor=False))
            for role in ("solver", "proposer"):
                if actor[role] and role in batches:
                    updates[role].update(self.learner.update(batches[role], critic=False))
            metrics = learner.fetch(updates)

        tokens = solver.generated_tokens + proposer.generated_tokens + extra_tokens
        metrics.update(**proposer.metrics, **solver.metrics, **sampling_metrics,
                       **{f"time/{k}": v for k, v in times.items()})
        metrics.update({"length/solver": solver.generated_tokens / len(solver.texts),
                        "length/proposer": proposer.generated_tokens / len(proposer.texts),
                        "throughput/generated_tokens_per_s": tokens / sum(times.values())})
        self._log_rollouts(step, proposer, solver)
        return metrics

    def _log_rollouts(self, step: int, proposer, solver) -> None:
        # "valid": the proposal follows the task's format (what the curriculum plots read), whatever
        # reward.invalid_proposals made of the others.
        n, valid, proposer_r = self.config.rollout.n, proposer.parsed, proposer.rewards.reshape(-1)
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
        c = self.config
        result, sampled = evaluate_heldout(self.model, self.tokenizer, self.task, self.eval_problems, c.eval,
                                           n=c.eval.sampled_n, seed=c.seed, mesh=self.mesh)
        out = {"eval/greedy_accuracy": result.accuracy}
        if sampled is not None:
            out["eval/sampled_accuracy"] = sampled.sampled_accuracy
            if sampled.majority_accuracy is not None:
                out["eval/majority_accuracy"] = sampled.majority_accuracy
        if self.second_set is not None:
            task, problems = self.second_set
            tokens = c.eval.second_set_max_new_tokens or c.eval.max_new_tokens
            out[f"eval/{c.eval.second_set}_greedy_accuracy"] = evaluate(
                self.model, self.tokenizer, task, problems, max_new_tokens=tokens, batch_size=c.eval.batch_size,
                mesh=self.mesh)
        self.eval_history.append({"step": self.steps_done, **out})
        self.log.scalars(self.steps_done, out)
        return out

    def _second_set(self):
        """(task, problems) of eval.second_set: the held-out generator under its own task options."""
        c = self.config
        task = get_task(c.task, **{**self.task_options, **dict(c.eval.second_set_options)})
        problems = task.heldout_problems(c.eval.second_set_problems, c.eval.seed)
        return task, drop_overlong(self.tokenizer, task, problems, c.eval.max_prompt_len)[0]

    def save(self) -> None:
        self.checkpointer.save(self.steps_done, self.learner.states, {
            "steps_done": self.steps_done, "seed": self.config.seed, "data_position": self.rollouts.position,
            "eval_history": self.eval_history, "pregenerated": self.rollouts.pool,
            "nonfinite_steps": self.nonfinite_steps})
        self.workdir.push()

    def restore(self) -> bool:
        """Continues from the newest intact checkpoint (damaged newer ones are moved aside)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.learner.states)
        restored = self.checkpointer.restore_latest(abstract)
        if restored is None:
            return False
        _, states, meta = restored
        if meta["seed"] != self.config.seed:
            raise CheckpointProblem(f"the checkpoint in {self.config.workdir} was made with seed {meta['seed']}, "
                                    f"not {self.config.seed}: resume with --config.seed={meta['seed']}")
        self.learner.states = states
        self.steps_done, self.rollouts.position = meta["steps_done"], meta["data_position"]
        self.eval_history, self.rollouts.pool = meta["eval_history"], meta["pregenerated"]
        self.nonfinite_steps = meta.get("nonfinite_steps", 0)
        return True

    def run(self) -> dict[str, Any]:
        c = self.config
        if not c.resume and self.checkpointer.latest_step() is not None:
            raise FileExistsError(f"{c.workdir} already holds checkpoints; pass --config.resume=True to "
                                  "continue that run, or choose another --config.workdir")
        if c.resume:
            self.restore()
        self.checkpointer.check_space(self.learner.states)
        self._write_run_record()
        if c.rollout.question_source in FIXED_SOURCES and self.rollouts.pool is None:
            if c.rollout.question_source == "dataset":
                self.rollouts.load_dataset(self.heldout_texts)
            else:
                self.rollouts.pregenerate(self.learner.policy)
        if not self.eval_history:
            self.evaluate()
        eval_every = c.eval.every or c.train.steps
        started = time.monotonic()
        out_of_time = lambda: c.train.max_minutes and time.monotonic() - started > 60 * c.train.max_minutes
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
                last = self.steps_done == c.train.steps or distributed.any_host(bool(out_of_time()))
                if self.steps_done % eval_every == 0 or last:
                    self.evaluate()
                stopping = distributed.any_host(stop.requested)  # every host stops at the same step
                if stopping or self.steps_done % c.checkpoint.every == 0 or last:
                    self.save()
                if stopping:
                    return {"stopped_at": self.steps_done}
                if last:
                    break
        return self.finish()

    def _run_record(self) -> dict[str, Any]:
        """What evaluating the run's model again needs: the task and its options, the held-out set."""
        c = self.config
        return {"task": c.task, "task_options": self.task_options,
                "eval": {"num_problems": c.eval.num_problems, "seed": c.eval.seed,
                         "max_new_tokens": c.eval.max_new_tokens, "max_prompt_len": c.eval.max_prompt_len,
                         "problems": len(self.eval_problems), "dropped_overlong": self.eval_dropped}}

    def _write_run_record(self) -> None:
        """run.json at the start of a run: its task before any summary.json exists (plots of a run in
        progress read it), and the whole config."""
        if jax.process_index() == 0:
            os.makedirs(self.workdir.local, exist_ok=True)
            with open(os.path.join(self.workdir.local, "run.json"), "w") as f:
                json.dump({**self._run_record(), "config": json.loads(self.config.to_json_best_effort())},
                          f, indent=2)

    def finish(self) -> dict[str, Any]:
        c = self.config
        export_dir = None
        if c.export:
            export_dir = os.path.join(self.workdir.local, "export")
            save_pretrained(self.model, self.model_config, export_dir)  # collective: every host calls it
            if jax.process_index() == 0:
                self.tokenizer.hf.save_pretrained(export_dir)
        summary = {
            **self._run_record(),
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
