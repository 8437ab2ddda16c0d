"""RL math pinned to hand-worked numbers (arithmetic in the comments)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax import rl

LN = math.log


def test_token_logprobs_and_entropy():
    # Row softmax of log([1, 2, 1]) is [0.25, 0.5, 0.25]; of [0, 0, 0] uniform 1/3.
    logits = jnp.array([[[0.0, LN(2), 0.0], [0.0, 0.0, 0.0]]], jnp.bfloat16)  # [B=1, T=2, V=3]
    tokens = jnp.array([[1, 2]])
    logp = rl.token_logprobs(logits, tokens)
    assert logp.dtype == jnp.float32
    # log 0.5 and log 1/3 (bf16 rounds ln 2 to 0.69140625, hence the tolerance).
    np.testing.assert_allclose(logp, [[LN(0.5), LN(1 / 3)]], atol=2e-3)
    # Entropy of [.25, .5, .25] = 2 * .25 * ln 4 + .5 * ln 2 = 1.0397; of uniform over 3 = ln 3.
    ent = rl.entropy(logits)
    np.testing.assert_allclose(ent, [[0.5 * LN(4) + 0.5 * LN(2), LN(3)]], atol=2e-3)
    # Temperature 2 halves the logits: log([1, 2, 1]) / 2 = log([1, sqrt 2, 1]) -> p(1) = sqrt2 / (2 + sqrt2).
    logp_t = rl.token_logprobs(jnp.array([[[0.0, LN(2), 0.0]]]), jnp.array([[1]]), temperature=2.0)
    np.testing.assert_allclose(logp_t, [[LN(math.sqrt(2) / (2 + math.sqrt(2)))]], rtol=1e-6)


def test_entropy_ignores_minus_inf_logits():
    # A -inf logit has probability 0 and contributes 0: entropy of [.5, .5, 0] = ln 2.
    logits = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(rl.entropy(logits), [[LN(2)]], rtol=1e-6)


def test_masked_helpers():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    # Valid: 1 + 2 + 4 = 7 over 3 tokens; nan and inf sit on padding and must not leak.
    assert float(rl.masked_sum(x, mask)) == 7.0
    assert float(rl.token_count(mask)) == 3.0
    np.testing.assert_allclose(rl.token_mean(x, mask), 7 / 3)
    assert float(rl.token_mean(x, jnp.zeros_like(mask))) == 0.0


def test_grpo_advantages():
    rewards = jnp.array([
        [1.0, 0.0, 0.0, 1.0],  # mean .5, sample var (4 * .25) / 3 = 1/3 -> +-.5 / sqrt(1/3) = +-0.866025
        [1.0, 0.0, 0.0, 0.0],  # mean .25, var (.5625 + 3 * .0625) / 3 = .25, std .5 -> [1.5, -.5, -.5, -.5]
        [1.0, 1.0, 1.0, 1.0],  # std 0: (1 - 1) / (0 + 1e-6) = 0, not nan
    ])
    adv = jax.jit(rl.grpo_advantages)(rewards)
    s = 0.5 / math.sqrt(1 / 3)
    np.testing.assert_allclose(adv[0], [s, -s, -s, s], rtol=1e-5)
    np.testing.assert_allclose(adv[1], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    np.testing.assert_array_equal(adv[2], [0.0, 0.0, 0.0, 0.0])


def test_grpo_singleton_groups_use_mean0_std1():
    # As verl: a group of one gets mean 0 and std 1 -> r / (1 + eps).
    adv = rl.grpo_advantages(jnp.array([[1.0], [0.0], [-2.0]]))
    np.testing.assert_allclose(adv[:, 0], [1 / (1 + 1e-6), 0.0, -2 / (1 + 1e-6)], rtol=1e-7)


def test_broadcast_sequence_advantage():
    adv = rl.broadcast_sequence_advantage(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_array_equal(adv, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_gae_gamma_lambda_one():
    rewards = jnp.array([[0.0, 1.0, 0.0]])
    values = jnp.array([[0.5, 0.8, 9.0]])
    mask = jnp.array([[1, 1, 0]])
    # Backwards, padding skipped (V_next = 0 past the end):
    #   t=1: delta = 1 + 0 - .8 = .2,  A = .2
    #   t=0: delta = 0 + .8 - .5 = .3, A = .3 + .2 = .5
    # returns = A + V = [1.0, 1.0]: with gamma = lam = 1 the return is the sum of future rewards.
    # Whitened over the 2 valid tokens: mean .35, unbiased var (.15^2 * 2) / 1 = .045,
    #   .15 / sqrt(.045) = 0.707107 -> [+.7071, -.7071].
    adv, ret = jax.jit(rl.gae_advantages)(rewards, values, mask)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(adv, [[0.707107, -0.707107, 0.0]], rtol=1e-5)


def test_gae_discounted_skips_interior_padding():
    rewards = jnp.array([[0.0, 0.0, 0.0, 2.0]])
    values = jnp.array([[1.0, 5.0, 0.5, 1.0]])
    mask = jnp.array([[1, 0, 1, 1]])
    # gamma = .9, lam = .8, gamma * lam = .72. Backwards:
    #   t=3: delta = 2 + 0 - 1 = 1,            A = 1
    #   t=2: delta = 0 + .9 * 1 - .5 = .4,     A = .4 + .72 * 1 = 1.12
    #   t=1: padding, skipped (V = 5 is never used; the carry stays V_next = .5, A_next = 1.12)
    #   t=0: delta = 0 + .9 * .5 - 1 = -.55,   A = -.55 + .72 * 1.12 = .2564
    # returns = A + V = [1.2564, -, 1.62, 2.0]
    # Whitening [.2564, 1.12, 1.0]: mean .792133, unbiased var .218858 -> [-1.145164, .700836, .444328]
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(ret, [[1.2564, 0.0, 1.62, 2.0]], rtol=1e-5)
    np.testing.assert_allclose(adv, [[-1.145164, 0.0, 0.700836, 0.444328]], rtol=1e-5)


def _ppo_case():
    # One row of 6 tokens: (ratio, A) and what PPO makes of each, eps = .2, c = 3.
    ratios = jnp.array([[1.0, 1.5, 0.5, 0.5, 5.0, 1.0]])
    adv = jnp.array([[1.0, 1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    old = jnp.full((1, 6), -1.0)
    return old + jnp.log(ratios), old, adv, mask


def test_ppo_policy_loss_clip_and_dual_clip():
    logp, old, adv, mask = _ppo_case()
    loss_sum, count, metrics = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip_c=3.0)
    # token  ratio  A   -A*r   -A*clip(r)  max    dual (A<0): min(max, -A*3)
    #   0     1     +1   -1     -1          -1     -
    #   1     1.5   +1   -1.5   -1.2        -1.2   -            eps-clip active (-1.2 > -1.5)
    #   2     0.5   +1   -0.5   -0.8        -0.5   -            not clipped: PPO only clips improvements
    #   3     0.5   -1   +0.5   +0.8        +0.8   min(.8, 3)=.8 eps-clip active
    #   4     5     -1   +5     +1.2        +5     min(5, 3)=3  dual clip active
    #   5     padding
    # loss_sum = -1 - 1.2 - .5 + .8 + 3 = 1.1 over 5 tokens.
    np.testing.assert_allclose(loss_sum, 1.1, rtol=1e-6)
    assert float(count) == 5.0
    assert float(metrics["pg_clipfrac"]) == 2.0
    assert float(metrics["pg_clipfrac_lower"]) == 1.0
    # ppo_kl sums old - new = -log ratio: -(0 + ln 1.5 + 2 ln .5 + ln 5) = -0.628609
    np.testing.assert_allclose(metrics["ppo_kl"], -(LN(1.5) + 2 * LN(0.5) + LN(5)), rtol=1e-5)


def test_ppo_policy_loss_gradient():
    logp, old, adv, mask = _ppo_case()
    grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask)[0])(logp)
    # d(-A * r)/dlogp = -A * r where the unclipped term is used; 0 where a clip holds it constant:
    # token 0: -1 * 1 = -1; 1: clipped -> 0; 2: -1 * .5 = -.5; 3: clipped -> 0; 4: dual clip -> 0; 5: padding.
    np.testing.assert_allclose(grad, [[-1.0, 0.0, -0.5, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_ppo_ratio_clamp_and_bad_dual_clip():
    # log ratio 25 is clamped to 20 (ratio e^20, finite); with A = -1 the dual clip caps the loss at 3.
    loss_sum, _, metrics = rl.ppo_policy_loss(jnp.array([[25.0]]), jnp.array([[0.0]]), jnp.array([[-1.0]]),
                                              jnp.array([[1]]))
    assert float(loss_sum) == 3.0
    assert float(metrics["ppo_kl"]) == -20.0
    with pytest.raises(ValueError, match="dual_clip_c"):
        rl.ppo_policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1)), dual_clip_c=1.0)


def test_kl_estimators():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-2.0, -1.0]])
    # logp - ref = [1, -1]
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), [[1.0, -1.0]])
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2"), [[0.5, 0.5]])
    # k3 with d = ref - logp = [-1, 1]: e^-1 + 1 - 1 = 0.367879; e - 1 - 1 = 0.718282
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), [[math.exp(-1), math.e - 2]], rtol=1e-6)
    # d/dlogp k3 = 1 - e^d: 1 - e^-1 = .632121 and 1 - e = -1.718282
    grad = jax.grad(lambda lp: jnp.sum(rl.kl_penalty(lp, ref, "k3")))(logp)
    np.testing.assert_allclose(grad, [[1 - math.exp(-1), 1 - math.e]], rtol=1e-6)
    with pytest.raises(ValueError, match="k1"):
        rl.kl_penalty(logp, ref, "full")


def test_k3_clamps():
    logp = jnp.array([[-5.0, -30.0, 0.0]])
    ref = jnp.array([[0.0, 0.0, -30.0]])
    # d = ref - logp = [5, 30, -30]
    #   d = 5:   e^5 - 5 - 1 = 142.41 -> clamped to 10
    #   d = 30:  d clamped to 20 first (e^30 never computed), e^20 - 21 -> 10
    #   d = -30: d clamped to -20, e^-20 + 20 - 1 = 19.0 -> 10
    kl = rl.kl_penalty(logp, ref, "k3")
    np.testing.assert_array_equal(kl, [[10.0, 10.0, 10.0]])
    # Past the clamp the estimate is constant, so it pushes no gradient (as torch.clamp in verl).
    grad = jax.grad(lambda lp: jnp.sum(rl.kl_penalty(lp, ref, "k3")))(logp)
    np.testing.assert_array_equal(grad, [[0.0, 0.0, 0.0]])


def test_value_loss_clipping():
    values = jnp.array([[1.0, 2.0, 2.0, 100.0]])
    old = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    returns = jnp.array([[0.0, 2.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    # clip .5 -> V_clipped = old + clip(V - old, -.5, .5)
    # token  V  old  R   V_clip  (V-R)^2  (Vc-R)^2  0.5*max
    #   0    1  1    0   1       1        1         .5      equal: not counted as clipped
    #   1    2  1    2   1.5     0        .25       .125    clipped term larger
    #   2    2  1    0   1.5     4        2.25      2.0     unclipped larger
    #   3    padding
    # sum = .5 + .125 + 2 = 2.625 over 3 tokens.
    loss_sum, count, metrics = rl.value_loss(values, old, returns, mask, clip=0.5)
    np.testing.assert_allclose(loss_sum, 2.625, rtol=1e-6)
    assert float(count) == 3.0
    assert float(metrics["vf_clipfrac"]) == 1.0
    # Gradient of 0.5 * (V - R)^2 is (V - R) where the unclipped term wins, 0 where the saturated
    # clipped term wins: token 0: V - old = 0 is inside the clip, so V_clipped = V and both terms give
    # 1 - 0 = 1; token 1: 0; token 2: 2 - 0 = 2; token 3: padding, 0.
    grad = jax.grad(lambda v: rl.value_loss(v, old, returns, mask)[0])(values)
    np.testing.assert_allclose(grad, [[1.0, 0.0, 2.0, 0.0]], rtol=1e-6)


def test_grpo_gradient_step_favours_rewarded_sample():
    # A 1-token policy over V = 3 tokens, logits theta (uniform at start). A group of 4 samples
    # [0, 1, 2, 0] got rewards [1, 0, 0, 1] -> GRPO advantages [+.866, -.866, -.866, +.866].
    theta = jnp.zeros(3)
    tokens = jnp.array([[0], [1], [2], [0]])  # [B=4, T=1]
    adv = rl.broadcast_sequence_advantage(rl.grpo_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0]]))[0],
                                          jnp.ones((4, 1)))
    mask = jnp.ones((4, 1))

    def logp_of(params):
        return rl.token_logprobs(jnp.broadcast_to(params, (4, 1, 3)), tokens)

    old = jax.lax.stop_gradient(logp_of(theta))

    def loss(params):
        loss_sum, count, _ = rl.ppo_policy_loss(logp_of(params), old, adv, mask)
        return loss_sum / count

    new_theta = theta - 0.1 * jax.jit(jax.grad(loss))(theta)
    before = jax.nn.log_softmax(theta)
    after = jax.nn.log_softmax(new_theta)
    assert after[0] > before[0]  # the rewarded answer becomes more likely
    assert after[1] < before[1] and after[2] < before[2]


def test_microbatch_accumulation_equals_full_batch():
    # A toy linear policy: logits = x @ W. Rows have different lengths, so per-micro-batch token means
    # would weight tokens unequally; accumulating (sum, count) must not.
    B, T, D, V = 4, 5, 3, 7
    kx, kw, kt, ka, ko = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(kx, (B, T, D))
    w = jax.random.normal(kw, (D, V))
    tokens = jax.random.randint(kt, (B, T), 0, V)
    adv = jax.random.normal(ka, (B, T))
    mask = jnp.arange(T)[None, :] < jnp.array([5, 1, 3, 4])[:, None]
    old = rl.token_logprobs(x @ (w + 0.3 * jax.random.normal(ko, (D, V))), tokens)  # ratios != 1
    ref = rl.token_logprobs(x @ (w - 0.2), tokens)

    def loss_sum_and_count(params, batch):
        x, tokens, old, ref, adv, mask = batch
        logp = rl.token_logprobs(x @ params, tokens)
        pg_sum, count, _ = rl.ppo_policy_loss(logp, old, adv, mask)
        kl_sum = rl.masked_sum(rl.kl_penalty(logp, ref, "k3"), mask)
        return pg_sum + 0.001 * kl_sum, count

    grad_fn = jax.jit(jax.value_and_grad(loss_sum_and_count, has_aux=True))
    batch = (x, tokens, old, ref, adv, mask)
    (full_sum, full_count), full_grad = grad_fn(w, batch)

    acc_sum, acc_count, acc_grad = 0.0, 0.0, jnp.zeros_like(w)
    for sl in (slice(0, 2), slice(2, 4)):  # micro-batches with 6 and 7 tokens
        (s, c), g = grad_fn(w, tuple(a[sl] for a in batch))
        acc_sum, acc_count, acc_grad = acc_sum + s, acc_count + c, acc_grad + g

    assert float(acc_count) == float(full_count) == 13.0
    np.testing.assert_allclose(acc_sum / acc_count, full_sum / full_count, rtol=1e-6)
    np.testing.assert_allclose(acc_grad / acc_count, full_grad / full_count, rtol=1e-5, atol=1e-7)


def test_outcome_reward_sits_on_the_last_valid_token():
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    out = rl.outcome_token_rewards(jnp.array([2.0, -1.0, 5.0]), mask)
    np.testing.assert_array_equal(np.asarray(out), [[0, 0, 2, 0], [-1, 0, 0, 0], [5, 0, 0, 0]])
    assert out.dtype == jnp.float32
