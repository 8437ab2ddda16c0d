"""The pure pieces of a PPO update: sequence log-probs, the losses, and one optimizer step.

A role's batch (`RoleBatch`) holds N sequences: a left-padded prompt `[N, P]` and a right-padded
response `[N, R]`. Rows come in groups of `prompt_group` consecutive rows that share one prompt (the n
samples of a prompt); the prompt then runs through the model once per group, its keys and values are
repeated for the group's rows, and only the responses run per row (`models.transformer.response_hidden`):
the same log-probs, losses and gradients as one full pass per row, with less work. Everything here is a
pure function of (params, batch); `learner.Learner` owns the jitted, sharded versions. Micro-batches
arrive as a leading axis `[M, mb, ...]` so gradient accumulation is one `lax.scan`, exact because losses
travel as (sum, token count).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sqlm_jax import rl
from sqlm_jax.models.transformer import response_hidden


@flax.struct.dataclass
class RoleBatch:
    """N sequences of one role (proposer or solver). Arrays may carry a micro-batch axis in front."""

    prompt_ids: jax.Array      # [N, P] int32, left padded
    prompt_mask: jax.Array     # [N, P] bool
    response_ids: jax.Array    # [N, R] int32, right padded
    response_mask: jax.Array   # [N, R] bool, the tokens trained on (incl. the stop token)
    advantages: jax.Array      # [N, R] float32
    old_logp: jax.Array        # [N, R] log-probs under the weights before this step's first update
    ref_logp: jax.Array        # [N, R] log-probs under the frozen reference (zeros when KL is off)
    old_values: jax.Array      # [N, R] critic values before the step's first update (GAE only)
    returns: jax.Array         # [N, R] GAE returns, the critic's targets (GAE only)
    # Rows g·k … g·k+g-1 share one prompt (g = prompt_group; 1: no sharing assumed). Static: part of the
    # pytree structure, so jit compiles one program per value. Micro-batches must hold whole groups.
    prompt_group: int = flax.struct.field(pytree_node=False, default=1)


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # optimizer updates taken
    params: nnx.State
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static knobs of the policy loss (hashable, so they can be jit-static)."""

    clip_eps: float = 0.2
    dual_clip_c: float = 3.0
    kl_coef: float = 0.001
    kl_kind: str = "k3"
    use_kl: bool = True
    entropy_coef: float = 0.0

    @classmethod
    def from_config(cls, rl_cfg) -> "LossConfig":
        return cls(clip_eps=rl_cfg.clip_eps, dual_clip_c=rl_cfg.dual_clip_c, kl_coef=rl_cfg.kl_coef,
                   kl_kind=rl_cfg.kl_kind, use_kl=rl_cfg.use_kl, entropy_coef=rl_cfg.entropy_coef)


def make_optimizer(optim_cfg, total_updates: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the configured learning-rate schedule."""
    if optim_cfg.schedule == "constant":
        lr = optax.warmup_constant_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps) \
            if optim_cfg.warmup_steps else optim_cfg.lr
    elif optim_cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps,
                                                max(total_updates, optim_cfg.warmup_steps + 1))
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}; choose 'constant' or 'cosine'")
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip),
        optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay),
    )


def response_logits(model, batch: RoleBatch) -> jax.Array:
    """Logits `[N, R, V]` that predict each response token (the prompt's logits are never built)."""
    return model.logits(response_hidden(model, **_sequences(batch)))


def _sequences(batch: RoleBatch) -> dict[str, Any]:
    """The fields a forward pass over the batch's sequences takes, as keywords."""
    return dict(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask, response_ids=batch.response_ids,
                response_mask=batch.response_mask, prompt_group=batch.prompt_group)


def response_logprobs(model, batch: RoleBatch) -> jax.Array:
    """log p(response token) `[N, R]` under `model`, 0 at masked positions."""
    logp = rl.token_logprobs(response_logits(model, batch), batch.response_ids)
    return jnp.where(batch.response_mask, logp, 0.0)


def policy_loss(model, batch: RoleBatch, loss_cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum over tokens, metric sums incl. "tokens"): PPO-clip + KL to the reference − entropy."""
    mask = batch.response_mask
    logits = response_logits(model, batch)
    logp = rl.token_logprobs(logits, batch.response_ids)
    pg_sum, count, pg_metrics = rl.ppo_policy_loss(
        logp, batch.old_logp, batch.advantages, mask,
        clip_eps=loss_cfg.clip_eps, dual_clip_c=loss_cfg.dual_clip_c)
    entropy_sum = rl.masked_sum(rl.entropy(logits), mask)
    total = pg_sum - loss_cfg.entropy_coef * entropy_sum
    metrics = {"tokens": count, "pg_loss": pg_sum, "entropy": entropy_sum, **pg_metrics}
    if loss_cfg.use_kl:
        kl_sum = rl.masked_sum(rl.kl_penalty(logp, batch.ref_logp, loss_cfg.kl_kind), mask)
        total = total + loss_cfg.kl_coef * kl_sum
        metrics["kl"] = kl_sum
    return total, metrics


def value_loss(critic, batch: RoleBatch, value_clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(clipped value loss sum, metric sums incl. "tokens") of the critic on one micro-batch."""
    values = critic.values(**_sequences(batch))
    loss_sum, count, metrics = rl.value_loss(values, batch.old_values, batch.returns,
                                             batch.response_mask, clip=value_clip)
    return loss_sum, {"tokens": count, "value_loss": loss_sum, **metrics}


def accumulate_gradients(loss_fn, params, micro_batches: RoleBatch):
    """Gradient of the mini-batch's token-mean loss, accumulated over micro-batches `[M, mb, ...]`.

    `loss_fn(params, micro_batch) -> (loss sum, metric sums incl. "tokens")`. Sums of losses and token
    counts are accumulated and divided once at the end, so the update is the same whatever the
    micro-batch size (a memory knob, not a hyperparameter). The metrics include the token-mean "loss".
    """
    grad_fn = jax.value_and_grad(lambda p, mb: _with_loss(*loss_fn(p, mb)), has_aux=True)

    def body(carry, mb):
        grads, sums = carry
        (_, metrics), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (zeros(params), zeros(jax.eval_shape(loss_fn, params, first)[1] | {"loss": jnp.zeros(())}))
    (grads, sums), _ = jax.lax.scan(body, init, micro_batches)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {k: v / tokens for k, v in sums.items() if k != "tokens"}
    metrics["tokens"] = sums["tokens"]
    return jax.tree.map(lambda g: g / tokens, grads), metrics


def _with_loss(total, metrics):
    return total, {**metrics, "loss": total}


def train_step(state: TrainState, micro_batches: RoleBatch, *, loss_fn, tx
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one mini-batch (given as micro-batches `[M, mb, ...]`).

    A non-finite loss or gradient norm skips the update, as the reference does (verl skips the
    optimizer step when grad_norm is not finite): parameters, optimizer state and step stay as they
    were, and the metric "skipped" is 1. A select, not a branch, so the step stays one fused program
    and the host learns of the skip from the metrics it fetches anyway.
    """
    grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics.update(grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
    return TrainState(step=state.step + finite.astype(state.step.dtype), params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state)), metrics


def policy_loss_fn(graphdef, loss_cfg: LossConfig):
    """`loss_fn(params, micro_batch)` of the policy, for `train_step`."""
    return lambda params, mb: policy_loss(nnx.merge(graphdef, params), mb, loss_cfg)


def value_loss_fn(graphdef, value_clip: float):
    """`loss_fn(params, micro_batch)` of the critic, for `train_step`."""
    return lambda params, mb: value_loss(nnx.merge(graphdef, params), mb, value_clip)


def batch_logprobs(graphdef, params, micro_batches: RoleBatch) -> jax.Array:
    """Response log-probs `[M, mb, R]` for every micro-batch (old or reference log-probs)."""
    return jax.lax.map(lambda mb: response_logprobs(nnx.merge(graphdef, params), mb), micro_batches)


def batch_values(graphdef, params, micro_batches: RoleBatch) -> jax.Array:
    """Critic values `[M, mb, R]` for every micro-batch, before any update of the step."""
    return jax.lax.map(lambda mb: nnx.merge(graphdef, params).values(**_sequences(mb)), micro_batches)
