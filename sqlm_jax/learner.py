"""The learner: the weights being trained (policy, and critic with GAE), the frozen reference, and the
compiled passes that turn one role's sampled rows into an update.

    SampleOutput (responses on the device, prompts on the host)
      ──role_batch: trim all-padding prompt columns, place prompts on the mesh──▶ RoleBatch [N, ...]
      ──prepare (one jit): old log-probs (the sampler's own, or a pass), reference log-probs, critic
                           values, advantages (rl.advantage: GRPO / RLOO over the groups of
                           `rewards [Q, n]`, REINFORCE++ or GAE over the batch)──▶
      ──update (one jit per trained model): PPO epochs × mini-batches × micro-batches, optax──▶ state
      ──fetch: every role's metrics in one host transfer

A batch is built once and stays on the device(s) from the sampler to the update; the host sends the
prompts and rewards and receives the metrics. Micro-batches are cut inside the compiled calls, rows of
each split over the mesh's batch axes.
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import rl
from sqlm_jax.models import lora
from sqlm_jax.rollout_is import truncated_is_weights
from sqlm_jax.sampling import SampleOutput
from sqlm_jax.train_step import (LossAgg, LossConfig, RoleBatch, TrainState, batch_logprobs, batch_values,
                                 make_optimizer, policy_loss_fn, train_step, value_loss_fn)


class NonFiniteError(RuntimeError):
    """Updates were skipped for a non-finite loss or gradient norm for too many steps in a row."""


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


def _moved(tree, kind: str):
    """`tree` in the memory `kind` (device | pinned_host), with the same shardings."""
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding.with_memory_kind(kind), tree))


def updates_per_run(config, critic: bool = False) -> int:
    """Optimizer updates of a whole run (the length of a decaying learning-rate schedule): the
    policy's, or with `critic` the critic's, which sees the proposer batch every step."""
    c = config
    solver = c.rollout.batch_size * c.rollout.n // c.rl.mini_batch_size
    proposer = c.rollout.batch_size // c.rl.mini_batch_size
    if not critic:
        proposer = (proposer if c.rl.proposer_update_freq else 0) / max(c.rl.proposer_update_freq, 1)
    return int(c.train.steps * c.rl.ppo_epochs * (solver + proposer)) + 1


class Learner:
    """The policy's TrainState (and the critic's), the reference weights, and their compiled passes.

    `(graphdef, params)` is the loaded policy. With model.lora.rank > 0 adapters are attached to it
    (models/lora.py) and the TrainState holds them alone (so do the optimizer state, the gradients and
    the checkpoints); the base is `frozen`, an argument of every pass and never donated, and the KL
    reference is that base with the adapters off: no second copy of the weights. `critic` is
    `(graphdef, params)` of a models.critic.Critic already on the mesh, or None (GRPO); it is trained
    whole either way.
    """

    def __init__(self, config, mesh, graphdef, params, *, critic=None):
        c = self.config = config
        self.mesh, self.reference_graphdef = mesh, graphdef
        self.rows_per_device = c.rl.micro_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        spec = lora.LoraSpec.from_config(c.model.lora)
        if spec.rank:
            self.graphdef, params, self.frozen = lora.attach(graphdef, params, spec, seed=c.seed, mesh=mesh)
            self.ref_params = self.frozen if c.rl.use_kl else None
        else:
            self.graphdef, self.frozen = graphdef, None
            # A real copy: the policy's buffers are donated to each update.
            copy = lambda p: jax.tree.map(jnp.copy, p)
            self.ref_params = (build(copy, params, jax.tree.map(lambda x: x.sharding, params))
                               if c.rl.use_kl else None)
        total = updates_per_run(c)
        self.state, self._update = self._compiled(
            params, make_optimizer(c.optim, total_updates=total),
            policy_loss_fn(self.graphdef, LossConfig.from_config(c.rl)))
        self.critic_graphdef = self.critic_state = None
        if critic is not None:
            self.critic_graphdef, critic_params = critic
            critic_tx = make_optimizer(ml_collections.ConfigDict({**c.optim, "lr": c.rl.critic_lr}),
                                       total_updates=updates_per_run(c, critic=True))
            self.critic_state, self._critic_update = self._compiled(
                critic_params, critic_tx, value_loss_fn(self.critic_graphdef, c.rl.value_clip))
        self._assemble = jax.jit(_assemble, static_argnames="prompt_group")
        self._prepare = jax.jit(self._prepare_fn)

    def _compiled(self, params, tx, loss_fn):
        """A TrainState placed on the mesh and its jitted `update(state, batch, frozen)`.

        Optimizer moments shard like their parameters; step counters are replicated.
        """
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        replicated = mesh_lib.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
            param_shardings, transform_non_params=lambda _: replicated)
        shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
        state = build(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                      params, shardings)
        update = jax.jit(functools.partial(self._update_fn, loss_fn=loss_fn, tx=tx), donate_argnums=0,
                         out_shardings=(shardings, None))
        return state, update

    @contextlib.contextmanager
    def offloaded(self):
        """With rollout.offload_to_host, the buffers no sampler reads (optimizer states, the reference
        copy, the critic) wait in pinned host memory inside the block and return to the devices after;
        the devices' copies are freed meanwhile, which is what makes room for the sampler's KV cache."""
        if not self.config.rollout.offload_to_host:
            yield
            return
        self._move_idle("pinned_host")
        try:
            yield
        finally:
            self._move_idle("device")

    def _move_idle(self, kind: str) -> None:
        self.state = self.state.replace(opt_state=_moved(self.state.opt_state, kind))
        if self.ref_params is not None and self.ref_params is not self.frozen:
            self.ref_params = _moved(self.ref_params, kind)
        if self.critic_state is not None:
            self.critic_state = _moved(self.critic_state, kind)

    # ------------------------------------------------------------------------------ what is trained
    @property
    def policy(self):
        """The policy as `(graphdef, params)`, the form the sampler takes (with LoRA: the adapted model,
        base and adapters in one State of the same arrays)."""
        params = self.state.params
        return self.graphdef, params if self.frozen is None else nnx.merge_state(self.frozen, params)

    @property
    def states(self) -> dict[str, TrainState]:
        """Everything trained, as checkpoints hold it: the policy, and the critic when there is one."""
        return {"policy": self.state, **({"critic": self.critic_state} if self.critic_state else {})}

    @states.setter
    def states(self, states: dict[str, TrainState]) -> None:
        self.state, self.critic_state = states["policy"], states.get("critic")

    @property
    def reuses_sampler_logprobs(self) -> bool:
        """Whether the old log-probs are the sampler's (rl.reuse_sampler_logprobs, and sampling at
        temperature 1 without top-k / top-p) rather than a forward pass under the same weights."""
        c = self.config
        return bool(c.rl.reuse_sampler_logprobs and c.rollout.temperature == 1 and c.rollout.top_k == 0
                    and c.rollout.top_p == 1)

    @property
    def passes_sampler_logprobs(self) -> bool:
        """Whether `prepare` takes the sampler's log-probs: as the old ones, or for rl.rollout_is."""
        return self.reuses_sampler_logprobs or self.config.rl.rollout_is != "off"

    def prompt_group(self, samples_per_prompt: int) -> int:
        """Rows of a role batch that share one prompt pass (1: rl.shared_prompt_pass off): runs of the
        samples of one prompt, in groups that never span two devices or two micro-batches."""
        if not self.config.rl.shared_prompt_pass:
            return 1
        return prompt_group_size(samples_per_prompt, self.rows_per_device)

    # ------------------------------------------------------------------------------ one role's batch
    def batch(self, sample: SampleOutput, row_mask: np.ndarray, rewards: np.ndarray) -> RoleBatch:
        """A role's batch ready for `update`: `role_batch`, then `prepare` with the sampler's
        log-probs as the old ones where they are exact."""
        return self.prepare(self.role_batch(sample, row_mask), rewards,
                            sample.logprobs if self.passes_sampler_logprobs else None)

    def role_batch(self, sample: SampleOutput, row_mask: np.ndarray) -> RoleBatch:
        """The sampled rows as a RoleBatch on the mesh, rows outside `row_mask [N]` out of every loss;
        the other fields are zeros until `prepare`."""
        prompt_ids, prompt_mask = trim_prompt_padding(sample.prompt_tokens, sample.prompt_mask)
        group = self.prompt_group(sample.n)
        check_prompt_groups(prompt_ids, prompt_mask, group)
        prompt_ids, prompt_mask, row_mask = mesh_lib.shard_rows((prompt_ids, prompt_mask, row_mask), self.mesh)
        return self._assemble(prompt_ids=prompt_ids, prompt_mask=prompt_mask, row_mask=row_mask,
                              response_ids=sample.tokens, response_mask=sample.mask, prompt_group=group)

    def prepare(self, batch: RoleBatch, rewards, sampler_logprobs=None) -> RoleBatch:
        """Old and reference log-probs, critic values and advantages, before any update of the step.

        `rewards [Q, n]`: one per row, Q groups of n consecutive rows. The old log-probs are
        `sampler_logprobs [N, R]` when given: the sampler's, recorded under the weights it sampled with,
        which are the current ones (every role samples before the step's first update); with
        rl.rollout_is they are the trainer's, and the sampler's weight the advantages (rollout_is).
        """
        if self.config.rl.rollout_is != "off" and sampler_logprobs is None:
            raise ValueError("rl.rollout_is needs the sampler's log-probs of the batch")
        critic_params = None if self.critic_state is None else self.critic_state.params
        rewards = mesh_lib.shard_rows(np.asarray(rewards, np.float32), self.mesh)
        return self._prepare(params=self.policy[1], ref_params=self.ref_params, critic_params=critic_params,
                             batch=batch, rewards=rewards, sampler_logprobs=sampler_logprobs)

    def _prepare_fn(self, *, params, ref_params, critic_params, batch: RoleBatch, rewards, sampler_logprobs):
        micro, mask = self._micro_batches(batch, -1), batch.response_mask
        flat = lambda x: x.reshape(mask.shape)
        zeros = jnp.zeros(mask.shape, jnp.float32)
        logprobs = lambda p, graphdef=self.graphdef: flat(batch_logprobs(graphdef, p, micro,
                                                                         self.config.rl.logits_chunk_mib))
        rl_cfg = self.config.rl
        correcting = rl_cfg.rollout_is != "off"
        old = (logprobs(params) if sampler_logprobs is None or correcting
               else jnp.where(mask, sampler_logprobs, 0.0))
        ref = zeros if ref_params is None else logprobs(ref_params, self.reference_graphdef)
        values = zeros if critic_params is None else flat(batch_values(self.critic_graphdef, critic_params, micro))
        advantages, returns = rl.compute_advantages(
            rl_cfg.advantage, rewards, mask, values, grpo_eps=rl_cfg.grpo_eps,
            scale_by_std=rl_cfg.grpo_scale_by_std, gamma=rl_cfg.gamma, lam=rl_cfg.lam)
        if correcting:
            advantages = advantages * truncated_is_weights(old, sampler_logprobs, mask, rl_cfg.rollout_is,
                                                           rl_cfg.rollout_is_cap)
        return batch.replace(old_logp=old, ref_logp=ref, old_values=values, advantages=advantages,
                             returns=returns)

    # ------------------------------------------------------------------------------------- updates
    def update(self, batch: RoleBatch, *, actor: bool = True, critic: bool = True) -> dict[str, jax.Array]:
        """PPO epochs over mini-batches of `rl.mini_batch_size` groups of n rows: the critic's update
        (when there is one and `critic`), then the policy's (when `actor`); metrics `[updates]` on the
        device, for `fetch`, the critic's named critic_*."""
        metrics = {}
        if critic and self.critic_state is not None:
            with self._other_away("policy"):
                self.critic_state, values = self._critic_update(self.critic_state, batch, None)
            metrics = {f"critic_{k}": v for k, v in values.items()}
        if actor:
            with self._other_away("critic"):
                self.state, policy = self._update(self.state, batch, self.frozen)
            metrics.update(policy)
        return metrics

    @contextlib.contextmanager
    def _other_away(self, name: str):
        """With rollout.offload_to_host and a critic, the TrainState (weights and optimizer state) of
        the model not being updated waits in pinned host memory while the other one updates: on a
        v4-8 it is 8.6 GiB per chip, what coding's policy update needs to fit (tpu/README.md)."""
        if not self.config.rollout.offload_to_host or self.critic_state is None:
            yield
            return
        attribute = "state" if name == "policy" else "critic_state"
        setattr(self, attribute, _moved(getattr(self, attribute), "pinned_host"))
        try:
            yield
        finally:
            setattr(self, attribute, _moved(getattr(self, attribute), "device"))

    def _update_fn(self, state: TrainState, batch: RoleBatch, frozen, *, loss_fn, tx):
        step = functools.partial(train_step, loss_fn=lora.with_frozen(loss_fn, frozen), tx=tx,
                                 agg=LossAgg.from_config(self.config.rl))
        rows = self.config.rl.mini_batch_size * self.config.rollout.n
        mini = self._micro_batches(batch, batch.response_ids.shape[0] // rows, -1)  # [mini, M, mb, ...]
        metrics = []
        for _ in range(self.config.rl.ppo_epochs):
            state, m = jax.lax.scan(step, state, mini)
            metrics.append(m)
        return state, jax.tree.map(lambda *x: jnp.concatenate(x), *metrics)

    def _micro_batches(self, tree, *lead: int):
        """`[N, ...]` arrays -> `[*lead, mb, ...]`, mb = rl.micro_batch_size rows split over the mesh."""
        mb = self.config.rl.micro_batch_size
        split = jax.tree.map(lambda x: x.reshape(lead + (mb,) + x.shape[1:]), tree)
        return mesh_lib.constrain_rows(split, self.mesh, row_axis=len(lead))


def is_abstract(tree) -> bool:
    """Whether `tree` holds shapes (jax.ShapeDtypeStruct) rather than arrays: a run built without
    weights, to compile its programs for devices this host does not have (sqlm_jax.aot)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def build(fn, tree, out_shardings):
    """`fn(tree)` compiled onto `out_shardings`; for an abstract `tree`, the shapes and shardings it
    would have."""
    compiled = jax.jit(fn, out_shardings=out_shardings)
    return jax.eval_shape(compiled, tree) if is_abstract(tree) else compiled(tree)


def fetch(metrics: dict[str, dict[str, jax.Array]]) -> dict[str, float]:
    """`{role: update metrics [updates]}` -> `{"role/name": value}` on the host, in one transfer: the
    mean over a role's updates, and for "skipped" the count, named "skipped_steps"."""
    names = [(role, k) for role in metrics for k in sorted(metrics[role])]
    if not names:
        return {}
    arrays = [metrics[role][k] for role, k in names]
    values = np.split(mesh_lib.to_host(_concatenate(arrays)), np.cumsum([x.size for x in arrays])[:-1])
    return {f"{role}/{k}_steps" if k.endswith("skipped") else f"{role}/{k}":
            float(v.sum() if k.endswith("skipped") else v.mean()) for (role, k), v in zip(names, values)}


@jax.jit
def _concatenate(arrays: list[jax.Array]) -> jax.Array:
    return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in arrays])


def _assemble(*, prompt_ids, prompt_mask, row_mask, response_ids, response_mask, prompt_group: int) -> RoleBatch:
    mask = response_mask & row_mask[:, None]
    zeros = jnp.zeros(mask.shape, jnp.float32)
    return RoleBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                     response_mask=mask, advantages=zeros, old_logp=zeros, ref_logp=zeros, old_values=zeros,
                     returns=zeros, prompt_group=prompt_group)
