"""The SQLM self-play loop: propose, solve, reward, update — and checkpoints, logs, evaluation, export.

One step (SQLM_SPEC "One training step"):
  1. the proposer samples B·n questions from one topic prompt (prefilled once);
  2. the task parses them; the solver samples n answers to each (B·n·n answers);
  3. rewards: majority vote (math), unit tests in the sandbox (coding) or format-only (ablation);
  4. old and reference log-probs of both batches under the weights before any update of this step
     (the old ones are the sampler's own when rl.reuse_sampler_logprobs applies: the same weights);
  5. GRPO advantages per group (a proposer group: one row's n proposals; a solver group: the n
     answers to one question);
  6. PPO updates on the solver batch every step, on the proposer batch every `proposer_update_freq`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import distributed, plan, sandbox
from sqlm_jax import rewards as rewards_lib
from sqlm_jax import rl
from sqlm_jax.checkpoints import Checkpointer
from sqlm_jax.config_check import validate
from sqlm_jax.evaluate import evaluate
from sqlm_jax.models import load_pretrained, save_pretrained
from sqlm_jax.run_log import RunLog
from sqlm_jax.sampling import generate
from sqlm_jax.tasks import get_task
from sqlm_jax.tasks.base import Question
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.workdir import Workdir
from sqlm_jax.models.critic import Critic
from sqlm_jax.plots import plot_run
from sqlm_jax.train_step import (LossConfig, RoleBatch, TrainState, batch_logprobs, batch_values,
                                 make_optimizer, policy_loss_fn, train_step, value_loss_fn)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A sampling seed that depends only on (run seed, step, stream): resumed runs redraw the same."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def trim_prompt_padding(prompt_ids: np.ndarray, prompt_mask: np.ndarray, multiple: int = 16
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts `[N, P]` without the leading columns that are padding in every row.

    The sampler pads prompts to a bucketed length; the update would spend that work on pad tokens. The
    width kept is the longest prompt rounded up to a multiple of `multiple` (at most P), so a run
    compiles few shapes. Positions come from the mask, so log-probs and losses are unchanged.
    """
    p = prompt_mask.shape[1]
    used = p - int(np.argmax(prompt_mask.any(axis=0)))  # from the first column any row uses
    keep = min(p, -(-used // multiple) * multiple)
    return prompt_ids[:, p - keep:], prompt_mask[:, p - keep:]


def prompt_group_size(samples_per_prompt: int, rows_per_device: int) -> int:
    """The largest group of consecutive rows that answer one prompt (runs of `samples_per_prompt`) and
    divides a micro-batch's `rows_per_device`: groups never span two prompts, devices or micro-batches."""
    return math.gcd(samples_per_prompt, rows_per_device)


def check_prompt_groups(prompt_ids: np.ndarray, prompt_mask: np.ndarray, group: int) -> None:
    """Raises unless rows g·k … g·k+g-1 (g = `group`) share one prompt, as RoleBatch.prompt_group says."""
    if group == 1:
        return
    if prompt_ids.shape[0] % group:
        raise ValueError(f"{prompt_ids.shape[0]} rows do not split into prompt groups of {group}")
    for x in (prompt_ids, prompt_mask):
        grouped = x.reshape((-1, group) + x.shape[1:])
        if not (grouped == grouped[:, :1]).all():
            raise ValueError(f"rows in a group of {group} do not share one prompt; set "
                             "rl.shared_prompt_pass=False or keep each prompt's samples together")


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


@dataclasses.dataclass
class Rollout:
    """One role's sampled sequences and what the host made of them."""

    batch: RoleBatch          # [N, ...] arrays, advantages and log-probs filled later
    rewards: np.ndarray       # [N] sequence rewards
    metrics: dict[str, float]


class Trainer:
    """Owns the model, the compiled steps, and the loop. Build it from a validated config."""

    def __init__(self, config):
        self.config = c = config
        self.task = get_task(c.task, **{k: v for k, v in c.task_options.items() if v is not None})
        self.reward_kind = self.task.reward if c.reward.kind == "auto" else c.reward.kind
        self.mesh = mesh_lib.make_mesh(dict(c.mesh))
        self.num_batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        validate(c, num_batch_devices=self.num_batch_devices)
        # Refuse up front, with the per-device table, a run that cannot fit (before any weight loads).
        plan.check_fits(c, plan.load_model_config(c), dict(self.mesh.shape), plan.local_device_bytes())
        model, self.model_config = load_pretrained(
            c.model.path, mesh=self.mesh, dtype=c.model.param_dtype,
            compute_dtype=c.model.compute_dtype, remat=c.model.remat)
        self.tokenizer = load_tokenizer(c.model.path)
        self.graphdef, params = nnx.split(model)
        # A real copy: the policy's buffers are donated to each update.
        self.ref_params = jax.tree.map(jnp.copy, params) if c.rl.use_kl else None
        self.tx = make_optimizer(c.optim, total_updates=self._updates_per_run())
        self.state, self._update = self._compiled_learner(
            params, self.tx, policy_loss_fn(self.graphdef, LossConfig.from_config(c.rl)))
        self._logprobs = jax.jit(functools.partial(batch_logprobs, self.graphdef))
        self.critic_state = None
        if c.rl.advantage == "gae":
            # The reference's critic: initialised from the same checkpoint, trained with its own AdamW.
            trunk, _ = load_pretrained(c.model.path, mesh=self.mesh, dtype=c.model.param_dtype,
                                       compute_dtype=c.model.compute_dtype, remat=c.model.remat)
            self.critic_graphdef, critic_params = nnx.split(Critic(trunk))
            critic_params = jax.device_put(critic_params, mesh_lib.param_shardings(critic_params, self.mesh))
            critic_tx = make_optimizer(ml_collections.ConfigDict({**c.optim, "lr": c.rl.critic_lr}),
                                       total_updates=self._updates_per_run())
            self.critic_state, self._critic_update = self._compiled_learner(
                critic_params, critic_tx, value_loss_fn(self.critic_graphdef, c.rl.value_clip))
            self._values = jax.jit(functools.partial(batch_values, self.critic_graphdef))

        self.workdir = Workdir(c.workdir, mirror=c.workdir_mirror)
        if c.resume:
            self.workdir.pull()
        self.log = RunLog(self.workdir.local, enabled=jax.process_index() == 0)
        self.checkpointer = Checkpointer(self.workdir.checkpoints, keep=c.checkpoint.keep)
        self.eval_problems = self.task.heldout_problems(c.eval.num_problems, c.eval.seed)
        self.steps_done = 0
        self.eval_history: list[dict[str, Any]] = []
        self.pregenerated: list[dict] | None = None  # the ablation's fixed question pool
        self.data_position = 0

    def _compiled_learner(self, params, tx, loss_fn):
        """A TrainState placed on the mesh and its jitted `update(state, micro_batches)`.

        Optimizer moments shard like their parameters; step counters are replicated.
        """
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        replicated = mesh_lib.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
            param_shardings, transform_non_params=lambda _: replicated)
        shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                        out_shardings=shardings)(params)
        update = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx), donate_argnums=0,
                         out_shardings=(shardings, None))
        return state, update

    # ----------------------------------------------------------------------------- sizes and sampling
    def _updates_per_run(self) -> int:
        c = self.config
        solver = c.rollout.batch_size * c.rollout.n // c.rl.mini_batch_size
        proposer = (c.rollout.batch_size // c.rl.mini_batch_size
                    if c.rl.proposer_update_freq else 0) / max(c.rl.proposer_update_freq, 1)
        return int(c.train.steps * c.rl.ppo_epochs * (solver + proposer)) + 1

    @property
    def model(self):
        return nnx.merge(self.graphdef, self.state.params)

    def _generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, seed: int):
        r = self.config.rollout
        return generate(self.model, prompts, max_new_tokens=max_new_tokens, temperature=r.temperature,
                        top_p=r.top_p, top_k=r.top_k, n=n, stop_ids=self.tokenizer.stop_ids,
                        pad_id=self.tokenizer.pad_id, seed=seed, mesh=self.mesh)

    def _solver_prompt(self, question: Question) -> list[int]:
        return self.tokenizer.chat_prompt(self.task.solver_prompt(question),
                                          system=self.task.system_prompt)

    # ------------------------------------------------------------------------------------- rollouts
    def propose(self, step: int, stream: int = 0) -> tuple[Any, list[str], list[Question | None]]:
        """B·n proposals from the one topic prompt; returns (sample output, texts, parsed questions).

        Seeded by (run seed, `step`, `stream`): stream 0 for a step's proposals, 2 for the chunks of
        the pregenerated pool (stream 1 is the solver's)."""
        c = self.config
        prompt = self.tokenizer.chat_prompt(self.task.proposer_prompt)
        out = self._generate([prompt], c.rollout.batch_size * c.rollout.n,
                             c.rollout.proposer_max_new_tokens, step_seed(c.seed, step, stream))
        texts = [self.tokenizer.decode(t) for t in out.token_lists]
        questions = [self.task.parse_question(t) for t in texts]
        # A question whose solver prompt would not fit max_prompt_len counts as invalid.
        questions = [q if q is not None and len(self._solver_prompt(q)) <= c.rollout.max_prompt_len
                     else None for q in questions]
        return out, texts, questions

    def score_answers(self, questions: list[Question | None], answers: list[str]
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Solver rewards `[Q, n]` and proposer rewards `[Q]` (0 for invalid questions)."""
        c, n = self.config, self.config.rollout.n
        valid = np.array([q is not None for q in questions])
        metrics: dict[str, float] = {}
        if self.reward_kind == "unit_tests":
            programs = [self.task.parse_answer(a) for a in answers]
            jobs = [(p or "", questions[i // n].tests if valid[i // n] else ())
                    for i, p in enumerate(programs)]
            results = distributed.split_across_hosts(self._run_programs, jobs, 1 + len(sandbox.STATUSES))
            fractions = results[:, 0].astype(np.float32).reshape(-1, n)
            solver, proposer = rewards_lib.code_rewards(jnp.asarray(fractions))
            counts = results[:, 1:].sum(axis=0)
            metrics.update({f"sandbox/{s}": c / max(counts.sum(), 1) for s, c in zip(sandbox.STATUSES, counts)})
            metrics["answers/parsed"] = float(np.mean([p is not None for p in programs]))
        else:
            parsed = [self.task.parse_answer(a) for a in answers]
            ids = jnp.asarray(rewards_lib.answer_ids([parsed[i:i + n] for i in range(0, len(parsed), n)]))
            if self.reward_kind == "format":
                solver, proposer = rewards_lib.format_rewards(ids, k_min=c.reward.k_min)
            else:
                solver, proposer = rewards_lib.majority_vote(ids, k_min=c.reward.k_min)
            _, k = rewards_lib.majority_info(ids)
            k = np.asarray(k)[valid]
            for j in range(1, n + 1):
                metrics[f"agreement/k{j}"] = float(np.mean(k == j)) if len(k) else 0.0
            metrics["answers/parsed"] = float(np.mean([p is not None for p in parsed]))
        solver = np.asarray(solver) * valid[:, None]
        proposer = np.asarray(proposer) * valid
        return solver, proposer, metrics

    def _run_programs(self, jobs) -> np.ndarray:
        """Sandbox runs of `(program, tests)` jobs: per job `[pass fraction, count of each status]`."""
        c = self.config.reward
        results = sandbox.run_many(jobs, workers=c.sandbox_workers or None, timeout_s=c.code_timeout_s,
                                   config=sandbox.SandboxConfig(allow_unisolated_fallback=c.allow_unisolated_sandbox))
        return np.array([[r.fraction] + [r.statuses.count(s) for s in sandbox.STATUSES] for r in results])

    def _prompt_group(self, samples_per_prompt: int) -> int:
        """Rows of a role batch that share one prompt pass in the update (1: shared_prompt_pass off).

        Consecutive rows that answer one prompt (the solver's n answers to a question; the proposer's
        B·n proposals, all from the one topic prompt), in groups that also divide a micro-batch's rows
        on one device, so a group never spans two devices or two micro-batches.
        """
        if not self.config.rl.shared_prompt_pass:
            return 1
        return prompt_group_size(samples_per_prompt, self.config.rl.micro_batch_size // self.num_batch_devices)

    def _role_batch(self, out, row_mask: np.ndarray, prompt_group: int) -> RoleBatch:
        """A RoleBatch from sampler output, `row_mask[N]` dropping whole rows from every loss, the prompt
        columns that are padding in every row cut (trim_prompt_padding)."""
        prompt_ids, prompt_mask, response_ids, mask = mesh_lib.to_host(
            (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask))
        prompt_ids, prompt_mask = trim_prompt_padding(prompt_ids, prompt_mask)
        check_prompt_groups(prompt_ids, prompt_mask, prompt_group)
        mask = mask & row_mask[:, None]
        zeros = np.zeros(mask.shape, np.float32)
        return RoleBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                         response_ids=response_ids, response_mask=mask, advantages=zeros,
                         old_logp=zeros, ref_logp=zeros, old_values=zeros, returns=zeros,
                         prompt_group=prompt_group)

    def _learner_batch(self, out, row_mask: np.ndarray, rewards: np.ndarray, group_size: int, *,
                       samples_per_prompt: int) -> RoleBatch:
        """A role's batch ready for the update: sampler output `out` (sampled with the step's starting
        weights, as every role is) with old and reference log-probs and advantages over groups of
        `group_size`; `samples_per_prompt` consecutive rows share a prompt."""
        batch = self._role_batch(out, row_mask, self._prompt_group(samples_per_prompt))
        batch = self.fill_logprobs(batch, out.logprobs if self.reuses_sampler_logprobs else None)
        return self.with_advantages(batch, rewards, group_size)

    def with_advantages(self, batch: RoleBatch, rewards: np.ndarray, group_size: int) -> RoleBatch:
        """GRPO: group-normalised sequence rewards on every token. GAE: the reward on the last
        response token, advantages and returns from the critic's values."""
        rl_cfg, mask = self.config.rl, jnp.asarray(batch.response_mask)
        if rl_cfg.advantage == "grpo":
            adv = rl.grpo_advantages(jnp.asarray(rewards, jnp.float32).reshape(-1, group_size),
                                     rl_cfg.grpo_eps).reshape(-1)
            return batch.replace(advantages=np.asarray(rl.broadcast_sequence_advantage(adv, mask)))
        last = np.maximum(batch.response_mask.sum(axis=1) - 1, 0)
        token_rewards = np.zeros(batch.response_mask.shape, np.float32)
        token_rewards[np.arange(len(last)), last] = rewards
        adv, returns = rl.gae_advantages(jnp.asarray(token_rewards), jnp.asarray(batch.old_values), mask,
                                         rl_cfg.gamma, rl_cfg.lam)
        return batch.replace(advantages=np.asarray(adv), returns=np.asarray(returns))

    # ------------------------------------------------------------------------------------- updates
    def _micro_batches(self, batch: RoleBatch, rows: slice | None = None) -> RoleBatch:
        """`[N, ...]` -> `[M, micro_batch_size, ...]` on the mesh, the micro axis split over devices."""
        mb = self.config.rl.micro_batch_size

        def split(x):
            x = np.asarray(x)[rows] if rows is not None else np.asarray(x)
            x = x.reshape((-1, mb) + x.shape[1:])
            spec = jax.sharding.PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
            return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

        return jax.tree.map(split, batch)

    @property
    def reuses_sampler_logprobs(self) -> bool:
        """Whether the old log-probs are the sampler's (rl.reuse_sampler_logprobs, and sampling at
        temperature 1 without top-k / top-p) rather than a forward pass under the same weights."""
        c = self.config
        return bool(c.rl.reuse_sampler_logprobs and c.rollout.temperature == 1 and c.rollout.top_k == 0
                    and c.rollout.top_p == 1)

    def fill_logprobs(self, batch: RoleBatch, sampler_logprobs=None) -> RoleBatch:
        """Old and reference log-probs, and critic values, before any update of the step.

        The old log-probs are `sampler_logprobs` `[N, R]` when given: the sampler's log-probs of its
        tokens, recorded under the weights it sampled with, which are the current weights (every role
        samples before the step's first update). Otherwise a forward pass under the current weights.
        """
        micro = self._micro_batches(batch)
        flat = lambda x: mesh_lib.to_host(x).reshape(batch.response_ids.shape)
        if sampler_logprobs is not None:
            old = np.where(batch.response_mask, mesh_lib.to_host(sampler_logprobs), 0.0).astype(np.float32)
        else:
            old = flat(self._logprobs(self.state.params, micro))
        ref = flat(self._logprobs(self.ref_params, micro)) if self.ref_params is not None else old * 0
        values = flat(self._values(self.critic_state.params, micro)) if self.critic_state else old * 0
        return batch.replace(old_logp=old, ref_logp=ref, old_values=values)

    def update(self, batch: RoleBatch, group_size: int) -> dict[str, float]:
        """PPO epochs over mini-batches of `mini_batch_size` groups; returns mean metrics."""
        c = self.config
        rows = c.rl.mini_batch_size * group_size
        metrics = []
        for _ in range(c.rl.ppo_epochs):
            for start in range(0, batch.response_ids.shape[0], rows):
                micro = self._micro_batches(batch, slice(start, start + rows))
                if self.critic_state is not None:
                    self.critic_state, critic_metrics = self._critic_update(self.critic_state, micro)
                self.state, m = self._update(self.state, micro)
                if self.critic_state is not None:
                    m.update({f"critic_{k}": v for k, v in critic_metrics.items()})
                metrics.append(m)
        metrics = mesh_lib.to_host(metrics)
        return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}

    # ---------------------------------------------------------------------------------- one step
    def questions_for_step(self, step: int):
        """Online: fresh proposals. Pregenerated (ablation): the next B·n from the fixed pool."""
        if self.config.rollout.question_source == "online":
            return self.propose(step)
        count = self.config.rollout.batch_size * self.config.rollout.n
        pool = self.pregenerated
        picked = [pool[(self.data_position + i) % len(pool)] for i in range(count)]
        self.data_position += count
        return None, [p["proposal"] for p in picked], \
            [Question(p["text"], tuple(map(tuple, p["tests"]))) for p in picked]

    def pregenerate(self) -> None:
        """The ablation's fixed question pool, proposed once by the base model before training."""
        c = self.config
        pool: list[dict] = []
        chunk = 0
        while len(pool) < c.rollout.pregenerated_questions and chunk < 100:
            _, proposals, questions = self.propose(chunk, stream=2)
            pool += [{"proposal": p, "text": q.text, "tests": q.tests}
                     for p, q in zip(proposals, questions) if q is not None]
            chunk += 1
        if not pool:
            raise RuntimeError("the base model proposed no valid question; cannot pregenerate a pool")
        self.pregenerated = pool[:c.rollout.pregenerated_questions]

    def self_play_step(self, step: int) -> dict[str, float]:
        c, n = self.config, self.config.rollout.n
        t0 = time.perf_counter()
        prop_out, proposals, questions = self.questions_for_step(step)
        valid = np.array([q is not None for q in questions])
        solver_prompts = [self._solver_prompt(q if q is not None else Question(p))
                          for q, p in zip(questions, proposals)]
        t_prop = time.perf_counter()
        sol_out = self._generate(solver_prompts, n, c.rollout.solver_max_new_tokens, step_seed(c.seed, step, 1))
        t_sampled = time.perf_counter()

        answers = [self.tokenizer.decode(t) for t in sol_out.token_lists]
        solver_r, proposer_r, metrics = self.score_answers(questions, answers)
        solver_batch = self._learner_batch(sol_out, np.repeat(valid, n), solver_r.reshape(-1), n,
                                           samples_per_prompt=n)
        train_proposer = (prop_out is not None and c.rl.proposer_update_freq > 0
                          and (step + 1) % c.rl.proposer_update_freq == 0)
        if train_proposer:
            keep = valid if c.reward.invalid_proposals == "mask" else np.ones_like(valid)
            # One topic prompt for every proposer row (propose).
            proposer_batch = self._learner_batch(prop_out, keep, proposer_r, n, samples_per_prompt=len(valid))
        t_host = time.perf_counter()

        metrics.update({f"solver/{k}": v for k, v in self.update(solver_batch, n).items()})
        if train_proposer:
            metrics.update({f"proposer/{k}": v for k, v in self.update(proposer_batch, n).items()})
        t_update = time.perf_counter()

        sol_tokens = int(solver_batch.response_mask.sum())
        prop_tokens = int(mesh_lib.to_host(prop_out.mask).sum()) if prop_out is not None else 0
        metrics.update({
            "reward/solver": float(solver_r[valid].mean()) if valid.any() else 0.0,
            "reward/proposer": float(proposer_r.mean()),
            "proposals/valid": float(valid.mean()),
            "length/solver": sol_tokens / len(answers),
            "length/proposer": prop_tokens / len(proposals),
            "time/sampling": (t_prop - t0) + (t_sampled - t_prop),
            "time/host_and_logprobs": t_host - t_sampled,
            "time/update": t_update - t_host,
            "throughput/generated_tokens_per_s": (sol_tokens + prop_tokens) / (t_update - t0),
        })
        self.log.samples(step, [
            {"proposal": proposals[i], "valid": bool(valid[i]), "solver_rewards": solver_r[i],
             "proposer_reward": proposer_r[i], "answers": answers[i * n:(i + 1) * n]}
            for i in range(min(c.log.samples, len(proposals)))])
        self.log.questions(step, proposals, valid, solver_r.sum(axis=1), proposer_r)
        return metrics

    # ------------------------------------------------------------------------------------- the run
    def evaluate(self) -> dict[str, float]:
        c = self.config
        result = evaluate(self.model, self.tokenizer, self.task, self.eval_problems, greedy=True,
                          max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size,
                          mesh=self.mesh, full=True)
        out = {"eval/greedy_accuracy": result.accuracy}
        if c.eval.sampled_n:
            problems = self.eval_problems[:c.eval.sampled_problems or None]
            sampled = evaluate(self.model, self.tokenizer, self.task, problems, greedy=False,
                               n=c.eval.sampled_n, max_new_tokens=c.eval.max_new_tokens,
                               batch_size=c.eval.batch_size, seed=c.seed, mesh=self.mesh, full=True)
            out["eval/sampled_accuracy"] = sampled.sampled_accuracy
            if sampled.majority_accuracy is not None:
                out["eval/majority_accuracy"] = sampled.majority_accuracy
        self.eval_history.append({"step": self.steps_done, **out})
        self.log.scalars(self.steps_done, out)
        return out

    def _learners(self) -> dict[str, TrainState]:
        """Everything trained: the policy, and the critic when there is one."""
        return {"policy": self.state, **({"critic": self.critic_state} if self.critic_state else {})}

    def save(self) -> None:
        self.checkpointer.save(self.steps_done, self._learners(), {
            "steps_done": self.steps_done, "seed": self.config.seed, "data_position": self.data_position,
            "eval_history": self.eval_history, "pregenerated": self.pregenerated})
        self.workdir.push()

    def restore(self) -> bool:
        step = self.checkpointer.latest_step()
        if step is None:
            return False
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self._learners())
        learners, meta = self.checkpointer.restore(step, abstract)
        self.state, self.critic_state = learners["policy"], learners.get("critic")
        if meta["seed"] != self.config.seed:
            raise ValueError(f"the checkpoint in {self.config.workdir} was made with seed {meta['seed']}, "
                             f"not {self.config.seed}: resume with --config.seed={meta['seed']}")
        self.steps_done, self.data_position = meta["steps_done"], meta["data_position"]
        self.eval_history, self.pregenerated = meta["eval_history"], meta["pregenerated"]
        return True

    def run(self) -> dict[str, Any]:
        c = self.config
        resumed = c.resume and self.restore()
        if not resumed and self.checkpointer.latest_step() is not None:
            raise FileExistsError(f"{c.workdir} already holds checkpoints; pass --config.resume=True to "
                                  "continue that run, or choose another --config.workdir")
        if c.rollout.question_source == "pregenerated" and self.pregenerated is None:
            self.pregenerate()
        if not self.eval_history:
            self.evaluate()
        eval_every = c.eval.every or c.train.steps
        with StopFlag() as stop, tqdm(total=c.train.steps, initial=self.steps_done,
                                      disable=jax.process_index() != 0, desc="self-play") as bar:
            while self.steps_done < c.train.steps:
                metrics = self.self_play_step(self.steps_done)
                self.steps_done += 1
                self.log.scalars(self.steps_done, metrics)
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
