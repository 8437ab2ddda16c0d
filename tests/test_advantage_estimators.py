"""Advantage estimators beside GRPO and GAE (issue 17): hand-computed cases, and agreement on random data
with the formulas as verl writes them (re-derived in numpy here, loop for loop, not imported)."""
import numpy as np
import pytest

from sqlm_jax import rl


def test_dr_grpo_drops_the_std_division():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(rl.grpo_advantages(r, scale_by_std=False),
                               [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
    # std of [1, 0, 0, 1] with the n - 1 divisor: sqrt(1/3)
    np.testing.assert_allclose(rl.grpo_advantages(r)[0], np.array([0.5, -0.5, -0.5, 0.5]) / (3 ** -0.5 + 1e-6),
                               rtol=1e-6)


def test_rloo_hand_computed():
    # [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    np.testing.assert_allclose(rl.rloo_advantages(np.array([[1.0, 0.0, 0.0]])), [[1.0, -0.5, -0.5]])
    np.testing.assert_allclose(rl.rloo_advantages(np.array([[2.0], [5.0]])), [[2.0], [5.0]])


def _verl_rloo(scores: np.ndarray) -> np.ndarray:
    out = scores.astype(np.float64).copy()
    for g in range(scores.shape[0]):
        n, mean = scores.shape[1], scores[g].mean()
        out[g] = scores[g] * n / (n - 1) - mean * n / (n - 1)
    return out


def _verl_masked_whiten(x, mask):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / mask.sum()
    var *= mask.sum() / (mask.sum() - 1)
    return (x - mean) / np.sqrt(var + 1e-8)


def _verl_reinforce_pp(token_rewards, mask, gamma):
    returns, running = np.zeros_like(token_rewards), np.zeros(token_rewards.shape[0])
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return _verl_masked_whiten(returns, mask) * mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_verl_on_random_data(seed):
    scores = np.random.default_rng(seed).normal(size=(6, 4))
    np.testing.assert_allclose(rl.rloo_advantages(scores), _verl_rloo(scores), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_hand_computed():
    # one row, reward 1 on its last valid token (t = 2), gamma 0.5: returns 0.25, 0.5, 1, then padding
    token_rewards = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    returns = np.array([0.25, 0.5, 1.0, 0.0, 0.0])  # the five valid tokens
    mean, var = returns.mean(), returns.var(ddof=1)
    expected = np.zeros((2, 4))
    expected[0, :3], expected[1, :2] = (returns[:3] - mean) / np.sqrt(var + 1e-8), (returns[3:] - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(rl.reinforce_pp_advantages(token_rewards, mask, gamma=0.5), expected, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_matches_verl_on_random_data(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=5)
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.float64)
    token_rewards = np.asarray(rl.outcome_token_rewards(rng.normal(size=5), mask), np.float64)
    np.testing.assert_allclose(rl.reinforce_pp_advantages(token_rewards, mask, gamma=0.9),
                               _verl_reinforce_pp(token_rewards, mask, 0.9), rtol=1e-4, atol=1e-5)
