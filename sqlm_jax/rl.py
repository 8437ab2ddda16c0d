"""RL math as pure functions: log-probs, advantages (GRPO, RLOO, REINFORCE++, GAE), PPO-clip and GSPO,
KL estimators, value loss.

Shapes (the package's alphabet, sqlm_jax/__init__.py): N sequences, R response positions, V vocabulary,
Q groups of n samples (the n answers to a question, or a proposer row's n proposals). `mask[N, R]` is 1
on response tokens that count (bool or 0/1 numbers). Per-token losses are returned as
`(sum over valid tokens, valid token count)` so a caller accumulating over micro-batches divides once
at the end and gets exactly the big-batch token mean. Metrics are returned as sums for the same reason.

Formulas follow verl's `verl/trainer/ppo/core_algos.py` (the reference implementation is a verl fork).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Log-ratio clamp before exp(), as verl, so a stale old log-prob cannot overflow the ratio.
_LOG_RATIO_CLAMP = 20.0
# verl clamps the k3 ("low_var_kl") estimate to this range.
_K3_CLAMP = 10.0
# verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8).
_WHITEN_EPS = 1e-8
# verl's compute_policy_loss_gspo clamps the (combined) log sequence ratio to at most this.
_GSPO_LOG_CLAMP = 10.0


def masked_sum(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Sum of x over mask; padded entries contribute 0 even if they hold inf or nan. Scalar float32."""
    return jnp.sum(jnp.where(mask.astype(bool), x, 0.0), dtype=jnp.float32)


def token_count(mask: jnp.ndarray) -> jnp.ndarray:
    """Number of valid tokens in mask. Scalar float32."""
    return jnp.sum(mask.astype(bool), dtype=jnp.float32)


def token_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of x over mask (0 when the mask is empty). Scalar float32."""
    return masked_sum(x, mask) / jnp.maximum(token_count(mask), 1.0)


def token_logprobs(logits: jnp.ndarray, tokens: jnp.ndarray, temperature: float = 1.0) -> jnp.ndarray:
    """Log-probability of each chosen token.

    Args:
      logits: [N, R, V], any float dtype; computed in float32.
      tokens: [N, R] int ids; logits[:, r] is the distribution that produced tokens[:, r].
      temperature: the sampling temperature; logits are divided by it first, as verl does, so the
        PPO ratio is taken against the distribution the samples were actually drawn from.

    Returns:
      [N, R] float32.
    """
    logits = logits.astype(jnp.float32) / temperature
    # Gather-then-subtract avoids materialising a [N, R, V] log_softmax.
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy(logits: jnp.ndarray, temperature: float = 1.0) -> jnp.ndarray:
    """Entropy of each next-token distribution: logsumexp(z) - sum(softmax(z) * z).

    Args:
      logits: [N, R, V], computed in float32.

    Returns:
      [N, R] float32.
    """
    logits = logits.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    # 0 * -inf is nan: a token masked out with a -inf logit must contribute 0, not poison the sum.
    expected_logit = jnp.sum(jnp.where(probs > 0, probs * logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - expected_logit


def grpo_advantages(rewards: jnp.ndarray, eps: float = 1e-6, *, scale_by_std: bool = True) -> jnp.ndarray:
    """GRPO outcome advantages: (r - group mean) / (group std + eps), std with the n - 1 divisor.

    Args:
      rewards: [Q, n] one scalar reward per sample, n samples per group.
      eps: added to the std so an all-equal group gives advantage 0, not nan.
      scale_by_std: False gives Dr. GRPO's unnormalised r - group mean (Liu et al. 2025, "Understanding
        R1-Zero-Like Training"; verl's norm_adv_by_std_in_grpo=False).

    Returns:
      [Q, n] float32. A singleton group (n = 1) has no sample std; verl then uses mean 0 and std 1,
      i.e. advantage r / (1 + eps), and so do we.
    """
    rewards = rewards.astype(jnp.float32)
    if rewards.shape[-1] == 1:
        return rewards / (1.0 + eps)
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    if not scale_by_std:
        return rewards - mean
    std = jnp.std(rewards, axis=-1, keepdims=True, ddof=1)
    return (rewards - mean) / (std + eps)


def rloo_advantages(rewards: jnp.ndarray) -> jnp.ndarray:
    """REINFORCE leave-one-out: each sample's reward minus the mean of the other n - 1 of its group
    (Ahmadian et al. 2024; verl's compute_rloo_outcome_advantage), i.e. n/(n-1) · (r - group mean).

    Args:
      rewards: [Q, n].

    Returns:
      [Q, n] float32; a singleton group keeps its reward (no other sample to compare with).
    """
    rewards = rewards.astype(jnp.float32)
    n = rewards.shape[-1]
    if n == 1:
        return rewards
    return (rewards - jnp.mean(rewards, axis=-1, keepdims=True)) * (n / (n - 1))


def reinforce_pp_advantages(token_rewards: jnp.ndarray, mask: jnp.ndarray, gamma: float = 1.0) -> jnp.ndarray:
    """REINFORCE++ (Hu 2025; verl's compute_reinforce_plus_plus_outcome_advantage): the discounted
    return to go of each token, whitened over every valid token of the batch, with no group baseline.

    Args:
      token_rewards: [N, R] (an outcome reward on the last valid token, `outcome_token_rewards`).
      mask: [N, R].
      gamma: discount.

    Returns:
      [N, R] float32, zero on padding. Call it on the whole batch: the whitening is batch-wide.
    """
    m = mask.astype(jnp.float32)

    def step(running, xs):
        r_t, m_t = xs
        running = r_t + gamma * running
        return running * m_t, running * m_t  # verl resets the running return on padding

    _, returns = jax.lax.scan(step, jnp.zeros(m.shape[0], jnp.float32),
                              (token_rewards.astype(jnp.float32).T, m.T), reverse=True)
    return masked_whiten(returns.T, mask)


def broadcast_sequence_advantage(advantages: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Applies one advantage per sequence to every valid token of it.

    Args:
      advantages: [N].
      mask: [N, R].

    Returns:
      [N, R] float32, zero on padding.
    """
    return advantages.astype(jnp.float32)[:, None] * mask.astype(jnp.float32)


def outcome_token_rewards(rewards: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """One outcome reward per sequence placed on its last valid token, as verl's reward managers do.

    Args:
      rewards: [N].
      mask: [N, R] (right padded).

    Returns:
      [N, R] float32, zero elsewhere. A row without valid tokens gets its reward at position 0.
    """
    last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * rewards.astype(jnp.float32)[:, None]


def masked_whiten(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """verl's masked_whiten: (x - mean) / sqrt(var + 1e-8), mean and unbiased var over valid tokens.

    Args:
      x: [N, R]; mask: [N, R].

    Returns:
      [N, R] float32, zero on padding. With fewer than two valid tokens verl raises (n/(n-1) is
      undefined); here the Bessel factor falls back to 1 instead.
    """
    count = token_count(mask)
    mean = token_mean(x, mask)
    var = token_mean(jnp.square(x - mean), mask) * count / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(mask.astype(bool), (x - mean) * jax.lax.rsqrt(var + _WHITEN_EPS), 0.0)


def gae_advantages(
    token_rewards: jnp.ndarray,
    values: jnp.ndarray,
    mask: jnp.ndarray,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Generalised advantage estimation, as verl's compute_gae_advantage_return.

    Backward over positions t: delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, where
    V_next and A_next come from the next *valid* token (padding is skipped, not treated as a state).
    returns = A + V (before whitening); the advantages are then whitened over all valid tokens of the
    batch (`masked_whiten`), so call this on the whole batch, not per micro-batch.

    Args:
      token_rewards: [N, R] (the outcome reward sits on the last valid token).
      values: [N, R] critic values V(s_t).
      mask: [N, R].
      gamma, lam: discount and GAE lambda (1.0 and 1.0 in the reference).

    Returns:
      (advantages[N, R] whitened, returns[N, R]), float32, zero on padding.
    """
    m = mask.astype(jnp.float32)
    r = token_rewards.astype(jnp.float32)
    v = values.astype(jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        # On padding keep the carry, so the next valid token to the left bootstraps past it.
        next_value = v_t * m_t + (1.0 - m_t) * next_value
        next_adv = adv * m_t + (1.0 - m_t) * next_adv
        return (next_value, next_adv), next_adv

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    advantages = adv_tb.T
    returns = (advantages + v) * m
    return masked_whiten(advantages, mask), returns


ADVANTAGES = ("grpo", "gae", "rloo", "reinforce_pp")


def compute_advantages(kind: str, rewards: jnp.ndarray, mask: jnp.ndarray, values: jnp.ndarray, *,
                       grpo_eps: float = 1e-6, scale_by_std: bool = True, gamma: float = 1.0,
                       lam: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The advantage estimator named by rl.advantage, on one role's whole batch.

    Args:
      kind: "grpo" (`grpo_advantages`, scale_by_std=False: Dr. GRPO), "rloo", "reinforce_pp" or "gae".
      rewards: [Q, n], row q·n + j of the batch is sample j of group q.
      mask: [N, R], N = Q·n: the tokens in the loss (the whitening of gae and reinforce_pp is over them).
      values: [N, R] critic values (gae only).

    Returns:
      (advantages [N, R], returns [N, R]); returns are the critic's targets (zeros but for gae).
    """
    zeros = jnp.zeros(mask.shape, jnp.float32)
    if kind == "grpo":
        return broadcast_sequence_advantage(grpo_advantages(rewards, grpo_eps, scale_by_std=scale_by_std)
                                            .reshape(-1), mask), zeros
    if kind == "rloo":
        return broadcast_sequence_advantage(rloo_advantages(rewards).reshape(-1), mask), zeros
    outcome = outcome_token_rewards(rewards.reshape(-1), mask)
    if kind == "reinforce_pp":
        return reinforce_pp_advantages(outcome, mask, gamma), zeros
    if kind == "gae":
        return gae_advantages(outcome, values, mask, gamma, lam)
    raise ValueError(f"rl.advantage={kind!r}; choose one of {list(ADVANTAGES)}")


def ppo_policy_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, advantages: jnp.ndarray, mask: jnp.ndarray, *,
                    clip_eps: float = 0.2, clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                    dual_clip_c: float = 3.0, weights: jnp.ndarray | None = None
                    ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """PPO clipped surrogate with dual clip (verl's compute_policy_loss_vanilla).

    ratio = exp(clamp(logp - old_logp, -20, 20));
    loss = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)), and where A < 0 additionally
    min(loss, -A * c): a huge ratio on a negative-advantage token cannot blow the loss up.

    Args:
      logp: [N, R] current log-probs (differentiated).
      old_logp: [N, R] log-probs of the sampling-time weights.
      advantages: [N, R].
      mask: [N, R].
      clip_eps: PPO clip epsilon, both sides unless one is given below.
      clip_eps_low, clip_eps_high: clip-higher (DAPO, Yu et al. 2025): separate lower and upper ranges;
        a larger upper one lets unlikely tokens with positive advantage grow (None: clip_eps).
      dual_clip_c: dual-clip bound, must be > 1.
      weights: [N, R] per-token weights of loss_sum (train_step.loss_weights, the loss aggregation);
        None: 1 per token. The metrics stay plain sums.

    Returns:
      (loss_sum, token_count, metrics): loss = loss_sum / token_count. metrics are sums over valid
      tokens, to be divided by the same count: "pg_clipfrac" (tokens where the eps-clip is active),
      "pg_clipfrac_lower" (tokens where the dual clip is active), "ppo_kl" (sum of old_logp - logp).
    """
    if dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); 3.0 is the reference value")
    log_ratio = jnp.clip(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    loss_clipped = -advantages * jnp.clip(ratio, 1.0 - low, 1.0 + high)
    loss_ppo = jnp.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * dual_clip_c
    negative = advantages < 0
    losses = jnp.where(negative, jnp.minimum(loss_ppo, loss_dual), loss_ppo)
    metrics = {
        "pg_clipfrac": masked_sum((loss_clipped > loss_unclipped).astype(jnp.float32), mask),
        "pg_clipfrac_lower": masked_sum(((loss_ppo > loss_dual) & negative).astype(jnp.float32), mask),
        "ppo_kl": masked_sum(-log_ratio, mask),
    }
    return masked_sum(losses if weights is None else losses * weights, mask), token_count(mask), metrics


def gspo_policy_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, advantages: jnp.ndarray, mask: jnp.ndarray, *,
                     clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4, weights: jnp.ndarray | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), the token-level form of verl's
    compute_policy_loss_gspo: one importance ratio per sequence, the geometric mean of its tokens'.

    s_i = exp(mean over the valid tokens t of (logp - old_logp)); each token carries
    s_i,t = sg[s_i] · p_t / sg[p_t] (value s_i, gradient s_i · ∇log p_t), clamped in log space to at
    most 10 as verl; loss = max(-A · s_i,t, -A · clip(s_i,t, 1 - eps_low, 1 + eps_high)), no dual clip.
    Aggregated per sequence (weights of rl.loss_agg "seq-mean-token-mean", which GSPO requires), the
    gradient is that of the sequence-level objective mean_i max(-A_i s_i, -A_i clip(s_i)).

    Args:
      logp, old_logp, advantages, mask: [N, R] as in `ppo_policy_loss`; every valid token of a row
        must be in the call (a micro-batch holds whole rows).
      clip_eps_low, clip_eps_high: the sequence ratio's clip range (the paper: 3e-4, 4e-4).
      weights: [N, R] per-token weights of loss_sum, as in `ppo_policy_loss`.

    Returns:
      (loss_sum, token_count, metrics) with the keys of `ppo_policy_loss`; "pg_clipfrac_lower" is 0
      (no dual clip), "ppo_kl" the token-level sum of old_logp - logp.
    """
    m = mask.astype(jnp.float32)
    log_ratio = jnp.where(mask.astype(bool), logp - old_logp, 0.0)
    sequence = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
    combined = jnp.minimum(logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(sequence), _GSPO_LOG_CLAMP)
    ratio = jnp.exp(combined)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    losses = jnp.maximum(loss_unclipped, loss_clipped)
    metrics = {
        "pg_clipfrac": masked_sum((loss_clipped > loss_unclipped).astype(jnp.float32), mask),
        "pg_clipfrac_lower": jnp.zeros((), jnp.float32),
        "ppo_kl": masked_sum(-log_ratio, mask),
    }
    return masked_sum(losses if weights is None else losses * weights, mask), token_count(mask), metrics


def kl_penalty(logp: jnp.ndarray, ref_logp: jnp.ndarray, kind: str = "k3") -> jnp.ndarray:
    """Per-token KL(policy || reference) estimate from sampled-token log-probs (Schulman's k1/k2/k3).

    k1: logp - ref_logp.
    k2: 0.5 * (logp - ref_logp)^2.
    k3 (verl "low_var_kl"): with d = clamp(ref_logp - logp, -20, 20), exp(d) - d - 1 clamped to
      [-10, 10] (it is >= 0, so in effect to at most 10).

    Args:
      logp, ref_logp: [N, R].
      kind: "k1", "k2" or "k3".

    Returns:
      [N, R] float32.
    """
    diff = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * jnp.square(diff)
    if kind == "k3":
        d = jnp.clip(-diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of 'k1', 'k2', 'k3'")


def value_loss(
    values: jnp.ndarray,
    old_values: jnp.ndarray,
    returns: jnp.ndarray,
    mask: jnp.ndarray,
    clip: float = 0.5,
    weights: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """Clipped value loss (verl's compute_value_loss): 0.5 * max((V - R)^2, (V_clipped - R)^2).

    V_clipped = old_V + clip(V - old_V, -clip, clip): the critic may not move further than `clip`
    from its sampling-time value unless that also lowers the loss.

    Args:
      values: [N, R] current critic values (differentiated).
      old_values: [N, R] critic values when the batch was collected.
      returns: [N, R] targets (from `gae_advantages`).
      mask: [N, R].
      clip: value clip range (0.5 in the reference).
      weights: [N, R] per-token weights of loss_sum, as in `ppo_policy_loss`.

    Returns:
      (loss_sum, token_count, metrics) with metrics {"vf_clipfrac": count of tokens where the clipped
      term is the larger one}, all sums over valid tokens.
    """
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    loss_unclipped = jnp.square(values - returns)
    loss_clipped = jnp.square(clipped - returns)
    losses = 0.5 * jnp.maximum(loss_unclipped, loss_clipped)
    metrics = {"vf_clipfrac": masked_sum((loss_clipped > loss_unclipped).astype(jnp.float32), mask)}
    return masked_sum(losses if weights is None else losses * weights, mask), token_count(mask), metrics
