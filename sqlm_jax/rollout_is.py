"""Truncated importance sampling for the rollout's own numerics (rl.rollout_is): the samples come from
the sampler, whose log-probs can differ from the trainer's under the same weights (bfloat16 decode
one token at a time against a full pass, another attention kernel, another chip). PPO's ratio then
starts from the trainer's old log-probs and each token's policy-gradient loss is weighted by how much
likelier the trainer finds it than the sampler did, capped:

    token:     w_t = min(π_train(y_t) / π_sampler(y_t), cap)
    sequence:  w_t = min(Π_s π_train(y_s) / π_sampler(y_s), cap)   for every token of the row

(TIS, Yao et al. 2025; verl's rollout_is with level token / sequence and mode truncate, tunix's
sampler_is, TRL's vllm_importance_sampling_cap.) The weights are constants of the update; the
learner folds them into the advantages, which scales every policy-gradient loss term by w exactly
(PPO's clipped and dual-clipped terms and GSPO's are linear in the advantage for w >= 0) and leaves
the KL, entropy and value losses alone, as verl does. The sampler records the model's log-probs at
temperature 1 (sampling.SampleOutput), so the weights correct the two computations' gap, not a
temperature or top-k / top-p.

Shapes as sqlm_jax.rl: N sequences, R response positions.
"""
from __future__ import annotations

import jax.numpy as jnp

LEVELS = ("off", "token", "sequence")


def truncated_is_weights(old_logp: jnp.ndarray, sampler_logp: jnp.ndarray, mask: jnp.ndarray, level: str,
                         cap: float) -> jnp.ndarray:
    """`[N, R]` weights min(π_train / π_sampler, cap) per token or per row (`level`), 0 off `mask`.

    Args:
      old_logp: [N, R] the trainer's log-probs of the sampled tokens, before the step's updates.
      sampler_logp: [N, R] the sampler's log-probs of the same tokens.
      mask: [N, R] response tokens that count.
      level: "token" or "sequence".
      cap: the truncation, > 0 (verl's default threshold: 2).
    """
    if level not in LEVELS[1:]:
        raise ValueError(f"rollout_is level {level!r}: one of {LEVELS[1:]}")
    mask = mask.astype(bool)
    log_ratio = jnp.where(mask, old_logp - sampler_logp, 0.0)
    if level == "sequence":
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True), log_ratio.shape)
    # min in log space: exp never overflows however far apart the two are
    return jnp.where(mask, jnp.exp(jnp.minimum(log_ratio, jnp.log(cap))), 0.0)
