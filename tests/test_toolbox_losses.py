"""The issue-17 formulas (clip-higher, GSPO, the advantage choice, DAPO's overlong penalty, the
zero-variance test): hand-computed cases, agreement on random data with the formulas as verl writes
them (re-derived in numpy here, not imported), and each option off giving exactly today's numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax import rewards, rl
from sqlm_jax.config_check import ConfigError, validate
from sqlm_jax.defaults import base_config
from sqlm_jax.train_step import LossConfig, RoleBatch, loss_weights, LossAgg, policy_objective

LN = math.log


def _tokens(ratios, adv, mask=None):
    """(logp, old_logp, advantages, mask) of one row whose tokens have these ratios and advantages."""
    ratios = jnp.array([ratios], jnp.float32)
    old = jnp.full(ratios.shape, -1.0)
    mask = jnp.ones(ratios.shape, bool) if mask is None else jnp.array([mask], bool)
    return old + jnp.log(ratios), old, jnp.array([adv], jnp.float32), mask


# ------------------------------------------------------------------------------------------ clip-higher
def test_clip_higher_by_hand():
    # token  ratio  A    symmetric eps .2           low .2 / high .28
    #   0    1.25   +1   clip 1.2: max(-1.25, -1.2) = -1.2 (clipped)   1.25 < 1.28: -1.25
    #   1    0.75   -1   clip 0.8: max(.75, .8) = .8 (clipped)          low .2 too: .8
    #   2    5      -1   dual clip: min(5, 3) = 3                       3
    logp, old, adv, mask = _tokens([1.25, 0.75, 5.0], [1.0, -1.0, -1.0])
    sym, _, m_sym = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    high, _, m_high = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose([sym, high], [-1.2 + 0.8 + 3, -1.25 + 0.8 + 3], rtol=1e-6)
    assert float(m_sym["pg_clipfrac"]) == 2 and float(m_high["pg_clipfrac"]) == 1
    assert float(m_high["pg_clipfrac_lower"]) == 1  # the dual clip is kept
    # A wider lower range lets the negative-advantage token at 0.75 through unclipped: .75.
    low, _, _ = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_low=0.3)
    np.testing.assert_allclose(low, -1.2 + 0.75 + 3, rtol=1e-6)
    grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, clip_eps_high=0.28)[0])(logp)
    np.testing.assert_allclose(grad, [[-1.25, 0.0, 0.0]], rtol=1e-6)  # -A · r where unclipped


def _verl_vanilla(old, logp, adv, mask, clip, low, high, c=3.0):
    """verl's compute_policy_loss_vanilla, token-mean, re-derived in numpy."""
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    neg_kl = np.clip(logp - old, -20.0, 20.0)
    ratio = np.exp(neg_kl)
    low, high = clip if low is None else low, clip if high is None else high
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high)
    clip1 = np.maximum(pg1, pg2)
    pg3 = -adv * c
    losses = np.where(adv < 0, np.minimum(pg3, clip1), clip1)
    return (masked_mean(losses), masked_mean((pg2 > pg1).astype(float)),
            masked_mean(-neg_kl), masked_mean((clip1 > pg3) * (adv < 0)))


def _random_tokens(seed, rows=6, width=7, spread=0.5):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (rows, width))
    logp = old + rng.normal(0.0, spread, (rows, width))
    lengths = rng.integers(1, width + 1, rows)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(size=(rows, 1)) * np.ones((1, width))
    return logp, old, adv, mask


@pytest.mark.parametrize("seed, low, high", [(0, None, 0.28), (1, 0.1, 0.3), (2, None, None)])
def test_clip_higher_matches_verl_on_random_data(seed, low, high):
    logp, old, adv, mask = _random_tokens(seed)
    loss_sum, count, m = rl.ppo_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)),
                                            clip_eps=0.2, clip_eps_low=low, clip_eps_high=high)
    loss, clipfrac, ppo_kl, lower = _verl_vanilla(old, logp, adv, mask, 0.2, low, high)
    ours = [loss_sum / count] + [m[k] / count for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")]
    np.testing.assert_allclose(ours, [loss, clipfrac, ppo_kl, lower], rtol=1e-5, atol=1e-6)
    assert clipfrac > 0


def _todays_ppo(logp, old_logp, advantages, mask, clip_eps=0.2, dual_clip_c=3.0):
    """The PPO loss sum before issue 17, operation for operation."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    loss_ppo = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))
    losses = jnp.where(advantages < 0, jnp.minimum(loss_ppo, -advantages * dual_clip_c), loss_ppo)
    return jnp.sum(jnp.where(mask.astype(bool), losses, 0.0), dtype=jnp.float32)


def test_options_off_give_todays_policy_loss_exactly():
    logp, old, adv, mask = (jnp.asarray(x, jnp.float32) for x in _random_tokens(3))
    cfg = LossConfig.from_config(base_config().rl)
    assert (cfg.policy_loss, cfg.clip_eps_low, cfg.clip_eps_high) == ("ppo", None, None)
    batch = RoleBatch(prompt_ids=jnp.zeros((6, 1), jnp.int32), prompt_mask=jnp.ones((6, 1), bool),
                      response_ids=jnp.zeros(mask.shape, jnp.int32), response_mask=mask.astype(bool),
                      advantages=adv, old_logp=old, ref_logp=old, old_values=old, returns=old)
    weights = jnp.ones(mask.shape)
    ours = policy_objective(logp, jnp.zeros(mask.shape), batch, cfg, weights)[1]["pg_loss"]
    assert float(ours) == float(_todays_ppo(logp, old, adv, mask))


def _one_row_batch(logp, old, adv, mask):
    return RoleBatch(prompt_ids=jnp.zeros((1, 1), jnp.int32), prompt_mask=jnp.ones((1, 1), bool),
                     response_ids=jnp.zeros(mask.shape, jnp.int32), response_mask=mask, advantages=adv,
                     old_logp=old, ref_logp=logp, old_values=old, returns=old)


def test_clip_higher_reaches_the_objective_from_the_config():
    c = base_config()
    c.rl.clip_eps_low, c.rl.clip_eps_high = 0.1, 0.28
    cfg = LossConfig.from_config(c.rl)
    logp, old, adv, mask = _tokens([1.25, 0.85], [1.0, -1.0])
    pg = policy_objective(logp, jnp.zeros((1, 2)), _one_row_batch(logp, old, adv, mask), cfg, jnp.ones((1, 2)))
    np.testing.assert_allclose(pg[1]["pg_loss"], -1.25 + 0.9, rtol=1e-6)  # 0.85 clipped up to 1 - .1


# ---------------------------------------------------------------------------------------------- GSPO
def test_gspo_by_hand():
    # Row 0: log ratios .1, -.3 -> mean -.1, s = e^-.1 = .904837 for both tokens; row 1: one token,
    # log ratio .0002 -> s = 1.0002, inside [1 - 3e-4, 1 + 4e-4]; row 2: e^.001 = 1.0010005, above.
    logp = jnp.array([[0.1, -0.3], [0.0002, 0.0], [0.001, 0.0]])
    old, mask = jnp.zeros((3, 2)), jnp.array([[1, 1], [1, 0], [1, 0]], bool)
    for a0, loss0, grad0 in [(1.0, -math.exp(-0.1), -math.exp(-0.1)),  # A > 0, s < 1: unclipped
                             (-1.0, 1 - 3e-4, 0.0)]:                   # A < 0, s < 1 - eps: clipped
        adv = jnp.array([[a0, a0], [1.0, 1.0], [1.0, 1.0]])
        loss_sum, count, m = rl.gspo_policy_loss(logp, old, adv, mask)
        # A > 0 above the range: clipped to 1 + 4e-4 (row 2).
        expected = 2 * loss0 - math.exp(0.0002) - (1 + 4e-4)
        np.testing.assert_allclose(loss_sum, expected, rtol=1e-6, atol=1e-6)
        assert float(count) == 4 and float(m["pg_clipfrac"]) == (1 if a0 > 0 else 3)
        assert float(m["pg_clipfrac_lower"]) == 0
        np.testing.assert_allclose(m["ppo_kl"], -(0.1 - 0.3 + 0.0002 + 0.001), rtol=1e-5)
        # Each token's gradient: -A · s where unclipped (row 0's tokens share s), 0 where clipped.
        grad = jax.grad(lambda lp: rl.gspo_policy_loss(lp, old, adv, mask)[0])(logp)
        np.testing.assert_allclose(grad, [[grad0, grad0], [-math.exp(0.0002), 0], [0, 0]], rtol=1e-5, atol=1e-7)


def test_gspo_log_ratio_is_clamped_at_10():
    loss_sum, _, _ = rl.gspo_policy_loss(jnp.array([[12.0]]), jnp.array([[0.0]]), jnp.array([[-1.0]]),
                                         jnp.array([[True]]))
    np.testing.assert_allclose(loss_sum, math.exp(10.0), rtol=1e-6)


def _verl_gspo(old, logp, adv, mask, low, high):
    """verl's compute_policy_loss_gspo in numpy: (loss, pg_clipfrac, ppo_kl, d loss / d logp)."""
    neg_kl = logp - old
    seq = (neg_kl * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
    log_ratio = np.minimum(np.zeros_like(logp) + seq[:, None], 10.0)  # log_prob - log_prob.detach() = 0
    ratio = np.exp(log_ratio)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high)
    losses = np.maximum(pg1, pg2)
    loss = np.mean((losses * mask).sum(-1) / mask.sum(-1))  # seq-mean-token-mean
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    # Through the stop-gradients only the token's own log p moves s_i,t: d s_i,t / d logp_t = s_i,t;
    # it counts where the unclipped term is the max and the ratio is under the clamp.
    live = (pg1 >= pg2) & (log_ratio < 10.0)
    grad = np.where(live, -adv * ratio, 0.0) * mask / mask.sum(-1, keepdims=True) / mask.shape[0]
    return loss, masked_mean((pg2 > pg1).astype(float)), masked_mean(-neg_kl), grad


@pytest.mark.parametrize("seed, low, high", [(0, 3e-4, 4e-4), (1, 0.05, 0.08), (2, 0.01, 0.02)])
def test_gspo_matches_verl_on_random_data(seed, low, high):
    logp, old, adv, mask = _random_tokens(seed, spread=0.1)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
    weights = loss_weights(args[3], LossAgg("seq-mean-token-mean"))
    loss_fn = lambda lp: rl.gspo_policy_loss(lp, *args[1:], clip_eps_low=low, clip_eps_high=high, weights=weights)
    loss, count, m = loss_fn(args[0])
    grad = jax.grad(lambda lp: loss_fn(lp)[0])(args[0])
    verl_loss, clipfrac, ppo_kl, verl_grad = _verl_gspo(old, logp, adv, mask, low, high)
    np.testing.assert_allclose([loss, m["pg_clipfrac"] / count, m["ppo_kl"] / count],
                               [verl_loss, clipfrac, ppo_kl], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, verl_grad, rtol=1e-4, atol=1e-6)
    assert 0 < clipfrac < 1


def test_gspo_gradient_is_the_sequence_level_objectives():
    """Aggregated per sequence, the token form's gradient equals that of GSPO's own objective
    mean_i max(-A_i s_i, -A_i clip(s_i)) with s_i = exp(mean_t(logp - old)) differentiated directly."""
    logp, old, adv, mask = (jnp.asarray(x, jnp.float32) for x in _random_tokens(4, spread=0.05))
    low, high = 0.02, 0.03
    weights = loss_weights(mask, LossAgg("seq-mean-token-mean"))
    token_form = jax.grad(lambda lp: rl.gspo_policy_loss(lp, old, adv, mask, clip_eps_low=low,
                                                         clip_eps_high=high, weights=weights)[0])(logp)

    def sequence_form(lp):
        s = jnp.exp(jnp.sum(jnp.where(mask, lp - old, 0.0), 1) / mask.sum(1))
        a = adv[:, 0]
        return jnp.mean(jnp.maximum(-a * s, -a * jnp.clip(s, 1 - low, 1 + high)))

    direct = jax.grad(sequence_form)(logp)
    np.testing.assert_allclose(token_form, direct * mask, rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(direct)).max() > 1e-3


def test_policy_loss_gspo_reaches_the_objective():
    c = base_config()
    c.rl.policy_loss, c.rl.gspo_clip_eps_low, c.rl.gspo_clip_eps_high = "gspo", 0.01, 0.02
    cfg = LossConfig.from_config(c.rl)
    logp, old, adv, mask = _tokens([1.05, 1.05], [1.0, 1.0])
    pg = policy_objective(logp, jnp.zeros((1, 2)), _one_row_batch(logp, old, adv, mask), cfg,
                          jnp.full((1, 2), 0.5))[1]["pg_loss"]
    np.testing.assert_allclose(pg, -1.02, rtol=1e-6)  # s = 1.05 clipped to 1 + .02 (PPO's .2: -1.05)


def test_gspo_needs_its_loss_aggregation():
    c = base_config()
    c.rl.policy_loss = "gspo"
    with pytest.raises(ConfigError, match="seq-mean-token-mean"):
        validate(c)
    c.rl.loss_agg = "seq-mean-token-mean"
    validate(c)


# ----------------------------------------------------------------------------- the advantage choice
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
MASK = (np.arange(3)[None] < np.array([3, 1, 2, 3, 2, 2, 1, 3])[:, None])
S0, S1 = 3 ** -0.5 + 1e-6, 0.5 + 1e-6  # group stds (n - 1 divisor) + eps: [1, 0, 0, 1] and [1, 1, 1, 0]


@pytest.mark.parametrize("kind, per_sequence", [
    ("grpo", [0.5 / S0, -0.5 / S0, -0.5 / S0, 0.5 / S0, 0.25 / S1, 0.25 / S1, 0.25 / S1, -0.75 / S1]),
    ("rloo", [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1]),  # r - mean of the other three
])
def test_group_estimators_through_the_dispatch(kind, per_sequence):
    adv, returns = rl.compute_advantages(kind, jnp.asarray(REWARDS), jnp.asarray(MASK), jnp.zeros(MASK.shape))
    np.testing.assert_allclose(adv, np.asarray(per_sequence)[:, None] * MASK, rtol=1e-5)
    assert not np.asarray(returns).any()


def test_dr_grpo_and_the_token_estimators_through_the_dispatch():
    r, m = jnp.asarray(REWARDS), jnp.asarray(MASK)
    values = jnp.asarray(np.random.default_rng(0).normal(size=MASK.shape), jnp.float32)
    dr, _ = rl.compute_advantages("grpo", r, m, values, scale_by_std=False)
    np.testing.assert_allclose(dr, (REWARDS - REWARDS.mean(1, keepdims=True)).reshape(-1, 1) * MASK, rtol=1e-6)
    outcome = rl.outcome_token_rewards(r.reshape(-1), m)
    pp, _ = rl.compute_advantages("reinforce_pp", r, m, values, gamma=0.5)
    np.testing.assert_array_equal(pp, rl.reinforce_pp_advantages(outcome, m, 0.5))
    assert not np.allclose(pp, rl.reinforce_pp_advantages(outcome, m, 1.0))  # gamma reaches it
    gae, returns = rl.compute_advantages("gae", r, m, values, gamma=0.9, lam=0.8)
    want = rl.gae_advantages(outcome, values, m, 0.9, 0.8)
    np.testing.assert_array_equal(gae, want[0])
    np.testing.assert_array_equal(returns, want[1])
    with pytest.raises(ValueError, match="rl.advantage='ppo'"):
        rl.compute_advantages("ppo", r, m, values)


def test_default_advantage_is_todays_grpo_exactly():
    c = base_config().rl
    r, m = jnp.asarray(REWARDS), jnp.asarray(MASK)
    adv, _ = rl.compute_advantages(c.advantage, r, m, jnp.zeros(MASK.shape), grpo_eps=c.grpo_eps,
                                   scale_by_std=c.grpo_scale_by_std, gamma=c.gamma, lam=c.lam)
    mean, std = jnp.mean(r, -1, keepdims=True), jnp.std(r, -1, keepdims=True, ddof=1)
    todays = ((r - mean) / (std + 1e-6)).reshape(-1)[:, None] * m.astype(jnp.float32)
    np.testing.assert_array_equal(adv, todays)


# ------------------------------------------------------------------------------- rewards of issue 17
def test_overlong_penalty_by_hand():
    # limit 10, buffer 4: up to 6 tokens free, then -penalty · (L - 6) / 4
    got = rewards.overlong_penalty(jnp.array([3, 6, 7, 9, 10]), 10, 4, 0.5)
    np.testing.assert_allclose(got, [0, 0, -0.125, -0.375, -0.5], rtol=1e-6)


def _verl_overlong(length, max_resp_len, buffer_len, factor):
    expected_len = max_resp_len - buffer_len
    exceed_len = length - expected_len
    return min(-exceed_len / buffer_len * factor, 0)


def test_overlong_penalty_matches_verl_on_random_lengths():
    lengths = np.random.default_rng(0).integers(1, 65, 50)
    want = [_verl_overlong(int(L), 64, 16, 1.0) for L in lengths]
    np.testing.assert_allclose(rewards.overlong_penalty(jnp.asarray(lengths), 64, 16, 1.0), want, rtol=1e-6, atol=1e-7)
    assert min(want) < 0 and max(want) == 0


def test_zero_variance_groups():
    r = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.25]])
    np.testing.assert_array_equal(rewards.zero_variance_groups(r), [True, True, False, False])
