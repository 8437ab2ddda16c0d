"""The pure pieces of a PPO update: sequence log-probs, the losses, and one optimizer step.

A role's batch (`RoleBatch`) holds N sequences: a left-padded prompt `[N, P]` and a right-padded
response `[N, R]`. Rows come in groups of `prompt_group` consecutive rows that share one prompt (the n
samples of a prompt); the prompt then runs through the model once per group, its keys and values are
repeated for the group's rows, and only the responses run per row (`models.transformer.response_hidden`):
the same log-probs, losses and gradients as one full pass per row, with less work. Everything here is a
pure function of (params, batch); `learner.Learner` owns the jitted, sharded versions. Micro-batches
arrive as a leading axis `[M, mb, ...]` so gradient accumulation is one `lax.scan`, exact because each
token's loss weight comes from the whole mini-batch (`loss_weights`, the rl.loss_agg rule). Logits are
never built over a whole micro-batch `[mb, R, V]`: `token_stats` takes them in chunks of positions,
recomputed in the backward pass, so the loss's memory follows the chunk, not the vocabulary × tokens.
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


# The loss aggregations (`loss_weights`): how per-token losses are weighted into one mini-batch loss.
LOSS_AGGS = ("reference", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# Metrics that are the aggregated loss itself (weighted sums); the others are token sums, reported as
# token means.
_AGGREGATED = ("loss", "pg_loss", "value_loss")
# MiB of float32 logits one chunk of `token_stats` may hold (rl.logits_chunk_mib's default).
LOGITS_CHUNK_MIB = 128.0


@dataclasses.dataclass(frozen=True)
class LossAgg:
    """How a mini-batch's per-token losses become one loss (static, hashable). See `loss_weights`."""

    mode: str = "reference"
    chunk: int = 8  # "reference": sequences per fixed chunk

    @classmethod
    def from_config(cls, rl_cfg) -> "LossAgg":
        return cls(mode=rl_cfg.loss_agg, chunk=rl_cfg.loss_agg_chunk)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static knobs of the policy loss (hashable, so they can be jit-static)."""

    clip_eps: float = 0.2
    clip_eps_low: float | None = None   # clip-higher (DAPO); None: clip_eps
    clip_eps_high: float | None = None
    dual_clip_c: float = 3.0
    policy_loss: str = "ppo"            # ppo | gspo (rl.ppo_policy_loss, rl.gspo_policy_loss)
    gspo_clip_eps_low: float = 3e-4
    gspo_clip_eps_high: float = 4e-4
    kl_coef: float = 0.001
    kl_kind: str = "k3"
    use_kl: bool = True
    entropy_coef: float = 0.0
    logits_chunk_mib: float = LOGITS_CHUNK_MIB  # see `token_stats`

    @classmethod
    def from_config(cls, rl_cfg) -> "LossConfig":
        return cls(clip_eps=rl_cfg.clip_eps, clip_eps_low=rl_cfg.clip_eps_low, clip_eps_high=rl_cfg.clip_eps_high,
                   dual_clip_c=rl_cfg.dual_clip_c, policy_loss=rl_cfg.policy_loss,
                   gspo_clip_eps_low=rl_cfg.gspo_clip_eps_low, gspo_clip_eps_high=rl_cfg.gspo_clip_eps_high,
                   kl_coef=rl_cfg.kl_coef, kl_kind=rl_cfg.kl_kind, use_kl=rl_cfg.use_kl,
                   entropy_coef=rl_cfg.entropy_coef, logits_chunk_mib=rl_cfg.logits_chunk_mib)


def loss_weights(mask: jax.Array, agg: LossAgg) -> jax.Array:
    """Per-token weights `[N, R]` (0 off `mask`) whose weighted sum of per-token losses over a
    mini-batch's N rows is its loss:

      token-mean           1 / (valid tokens of the mini-batch): one global token mean;
      reference            the token mean within each fixed chunk of `agg.chunk` consecutive rows (the
                           last one shorter if the chunk does not divide N), averaged over the chunks (verl: a token mean per micro-batch of 8
                           sequences per GPU, `dp_actor.update_policy` dividing by the accumulation
                           steps; the SQLM reference runs it with ppo_micro_batch_size_per_gpu = 8);
      seq-mean-token-mean  each row's token mean, averaged over the N rows;
      seq-mean-token-sum   each row's token sum, averaged over the N rows (Dr. GRPO's normaliser up to
                           its constant 1 / R).

    The weights depend on the mini-batch's mask only, never on the memory micro-batch, so accumulating
    weighted sums over micro-batches of any size gives the same loss and gradient. An empty chunk or
    row adds 0 and still counts, as verl's masked means do.
    """
    m = mask.astype(jnp.float32)
    rows = m.shape[0]
    if agg.mode == "token-mean":
        return m / jnp.maximum(m.sum(), 1.0)
    if agg.mode == "reference":
        chunks = -(-rows // agg.chunk)  # the last one short when the chunk does not divide N
        per_row = jnp.pad(m.sum(axis=1), (0, chunks * agg.chunk - rows))
        chunk_tokens = jnp.repeat(per_row.reshape(chunks, agg.chunk).sum(axis=1), agg.chunk)[:rows]  # [N]
        return m / (jnp.maximum(chunk_tokens, 1.0) * chunks)[:, None]
    if agg.mode == "seq-mean-token-mean":
        return m / (jnp.maximum(m.sum(axis=1, keepdims=True), 1.0) * rows)
    if agg.mode == "seq-mean-token-sum":
        return m / rows
    raise ValueError(f"rl.loss_agg={agg.mode!r}; choose one of {list(LOSS_AGGS)}")


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


def _sequences(batch: RoleBatch) -> dict[str, Any]:
    """The fields a forward pass over the batch's sequences takes, as keywords."""
    return dict(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask, response_ids=batch.response_ids,
                response_mask=batch.response_mask, prompt_group=batch.prompt_group)


def token_stats(model, hidden: jax.Array, tokens: jax.Array, chunk_mib: float) -> tuple[jax.Array, jax.Array]:
    """(log p(token), entropy) `[N, R]` of the next-token distributions at `hidden [N, R, D]`.

    The float32 logits `[N, c, V]` are built for c response positions at a time, c as many as fit
    `chunk_mib` MiB, so memory holds one chunk's logits, not `[N, R, V]`. Under differentiation each
    chunk is a `jax.checkpoint`: the backward pass recomputes its logits from the hidden states (one
    more LM-head matmul) instead of keeping them. When all R positions fit one chunk this is the plain
    whole-batch computation. Chunking changes nothing but float rounding.
    """
    n, r, _ = hidden.shape
    c = chunk_positions(n, model.config.vocab_size, r, chunk_mib)
    if c == r:
        return _stats(model, hidden, tokens)
    parts = -(-r // c)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, parts * c - r)] + [(0, 0)] * (x.ndim - 2))
    split = lambda x: jnp.moveaxis(pad(x).reshape((n, parts, c) + x.shape[2:]), 1, 0)  # [parts, N, c, ...]
    stats = jax.checkpoint(lambda h, t: _stats(model, h, t))
    logp, entropy = jax.lax.map(lambda xs: stats(*xs), (split(hidden), split(tokens)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, parts * c)[:, :r]
    return merge(logp), merge(entropy)


def chunk_positions(rows: int, vocab: int, positions: int, chunk_mib: float) -> int:
    """Response positions per chunk of `token_stats` for `[rows, positions]` tokens: as many as fit
    `chunk_mib` MiB of float32 `[rows, c, vocab]` logits, spread evenly over the chunks needed."""
    c = max(1, int(chunk_mib * 2 ** 20) // (rows * vocab * 4))
    if c >= positions:
        return positions
    return -(-positions // -(-positions // c))  # the same number of chunks with the least padding


def _stats(model, hidden, tokens):
    logits = model.logits(hidden)
    return rl.token_logprobs(logits, tokens), rl.entropy(logits)


def response_logprobs(model, batch: RoleBatch, chunk_mib: float = LOGITS_CHUNK_MIB) -> jax.Array:
    """log p(response token) `[N, R]` under `model`, 0 at masked positions (logits in chunks: `token_stats`)."""
    logp, _ = token_stats(model, response_hidden(model, **_sequences(batch)), batch.response_ids, chunk_mib)
    return jnp.where(batch.response_mask, logp, 0.0)


def policy_loss(model, batch: RoleBatch, loss_cfg: LossConfig, weights: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted loss sum, metric sums incl. "tokens") of one micro-batch; `weights [N, R]` from
    `loss_weights`."""
    hidden = response_hidden(model, **_sequences(batch))
    logp, entropy = token_stats(model, hidden, batch.response_ids, loss_cfg.logits_chunk_mib)
    return policy_objective(logp, entropy, batch, loss_cfg, weights)


def policy_objective(logp: jax.Array, entropy: jax.Array, batch: RoleBatch, loss_cfg: LossConfig,
                     weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per token PPO-clip (or GSPO's sequence-ratio clip, loss_cfg.policy_loss) + kl_coef · KL(policy ‖
    reference) − entropy_coef · entropy, summed with `weights`, from the tokens' log-probs and
    entropies `[N, R]`.

    Metrics: "pg_loss" the weighted PPO part (as the loss), the others token sums ("kl", "entropy",
    the clip fractions), so the update reports token means of them.
    """
    mask = batch.response_mask
    if loss_cfg.policy_loss == "gspo":
        pg, count, pg_metrics = rl.gspo_policy_loss(
            logp, batch.old_logp, batch.advantages, mask, clip_eps_low=loss_cfg.gspo_clip_eps_low,
            clip_eps_high=loss_cfg.gspo_clip_eps_high, weights=weights)
    else:
        pg, count, pg_metrics = rl.ppo_policy_loss(
            logp, batch.old_logp, batch.advantages, mask, clip_eps=loss_cfg.clip_eps,
            clip_eps_low=loss_cfg.clip_eps_low, clip_eps_high=loss_cfg.clip_eps_high,
            dual_clip_c=loss_cfg.dual_clip_c, weights=weights)
    total = pg - loss_cfg.entropy_coef * rl.masked_sum(entropy * weights, mask)
    metrics = {"tokens": count, "pg_loss": pg, "entropy": rl.masked_sum(entropy, mask), **pg_metrics}
    if loss_cfg.use_kl:
        kl = rl.kl_penalty(logp, batch.ref_logp, loss_cfg.kl_kind)
        total = total + loss_cfg.kl_coef * rl.masked_sum(kl * weights, mask)
        metrics["kl"] = rl.masked_sum(kl, mask)
    return total, metrics


def value_loss(critic, batch: RoleBatch, value_clip: float, weights: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted clipped value loss sum, metric sums incl. "tokens") of the critic on one micro-batch."""
    values = critic.values(**_sequences(batch))
    loss, count, metrics = rl.value_loss(values, batch.old_values, batch.returns, batch.response_mask,
                                         clip=value_clip, weights=weights)
    return loss, {"tokens": count, "value_loss": loss, **metrics}


def accumulate_gradients(loss_fn, params, micro_batches: RoleBatch, agg: LossAgg = LossAgg()):
    """Gradient of the mini-batch's loss (aggregated by `agg`), accumulated over micro-batches `[M, mb, ...]`.

    `loss_fn(params, micro_batch, weights) -> (weighted loss sum, metric sums incl. "tokens")`. The
    per-token weights come from the whole mini-batch's mask (`loss_weights`), so summing over
    micro-batches is exact: the update is the same whatever the micro-batch size (a memory knob, not
    a hyperparameter). Metrics: the loss ("loss", and the loss parts in _AGGREGATED) as aggregated,
    the others as token means.
    """
    mask = micro_batches.response_mask
    weights = loss_weights(mask.reshape((-1,) + mask.shape[2:]), agg).reshape(mask.shape)
    grad_fn = jax.value_and_grad(lambda p, mb, w: _with_loss(*loss_fn(p, mb, w)), has_aux=True)

    def body(carry, xs):
        grads, sums = carry
        (_, metrics), g = grad_fn(params, *xs)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, metrics)), None

    first = jax.tree.map(lambda x: x[0], (micro_batches, weights))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (zeros(params), zeros(jax.eval_shape(loss_fn, params, *first)[1] | {"loss": jnp.zeros(())}))
    (grads, sums), _ = jax.lax.scan(body, init, (micro_batches, weights))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {k: v if k in _AGGREGATED else v / tokens for k, v in sums.items() if k != "tokens"}
    metrics["tokens"] = sums["tokens"]
    return grads, metrics


def _with_loss(total, metrics):
    return total, {**metrics, "loss": total}


def train_step(state: TrainState, micro_batches: RoleBatch, *, loss_fn, tx, agg: LossAgg = LossAgg()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one mini-batch (given as micro-batches `[M, mb, ...]`).

    A non-finite loss or gradient norm skips the update, as the reference does (verl skips the
    optimizer step when grad_norm is not finite): parameters, optimizer state and step stay as they
    were, and the metric "skipped" is 1. A mini-batch with no token in its loss (every row masked out,
    e.g. by rl.filter_zero_variance; the reference never makes one) is skipped the same way and counted
    by "no_signal": stepping AdamW on its zero gradient would still move every weight by the momentum
    of earlier steps, a drift with no reward behind it. A select, not a branch, so the step stays one
    fused program and the host learns of the skip from the metrics it fetches anyway.
    """
    grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches, agg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
    signal = metrics["tokens"] > 0
    applied = finite & signal
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
    metrics.update(grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32),
                   no_signal=1.0 - signal.astype(jnp.float32))
    return TrainState(step=state.step + applied.astype(state.step.dtype), params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state)), metrics


def policy_loss_fn(graphdef, loss_cfg: LossConfig):
    """`loss_fn(params, micro_batch, weights)` of the policy, for `train_step`."""
    return lambda params, mb, weights: policy_loss(nnx.merge(graphdef, params), mb, loss_cfg, weights)


def value_loss_fn(graphdef, value_clip: float):
    """`loss_fn(params, micro_batch, weights)` of the critic, for `train_step`."""
    return lambda params, mb, weights: value_loss(nnx.merge(graphdef, params), mb, value_clip, weights)


def batch_logprobs(graphdef, params, micro_batches: RoleBatch, chunk_mib: float = LOGITS_CHUNK_MIB) -> jax.Array:
    """Response log-probs `[M, mb, R]` for every micro-batch (old or reference log-probs)."""
    return jax.lax.map(lambda mb: response_logprobs(nnx.merge(graphdef, params), mb, chunk_mib), micro_batches)


def batch_values(graphdef, params, micro_batches: RoleBatch) -> jax.Array:
    """Critic values `[M, mb, R]` for every micro-batch, before any update of the step."""
    return jax.lax.map(lambda mb: nnx.merge(graphdef, params).values(**_sequences(mb)), micro_batches)
