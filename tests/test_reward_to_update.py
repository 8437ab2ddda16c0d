"""From rewards to the update, end to end, on a policy with known answers (issue 13): the scripted
sampler's proposals and answers give known rewards; the learner's advantages, old and reference
log-probs and the first optimizer update are checked against the same quantities computed here by
hand, from the model's plain forward pass."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax import rollout
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.tiny_models import random_policy, rewarded_run_config, scripted_sample

# B = 2 rows of n = 4 proposals "2*3" … "9*3" (equal lengths, so every loss aggregation over the one
# chunk of 8 sequences is the same token mean). Question q gets 4 answers: the REWARDED ones two
# agreeing, one other, one unparsed (k = 2: proposer band 2 <= k < 4, solver [1, 1, 0, 0]); the others
# four agreeing (k = 4: proposer 0, solver [1, 1, 1, 1]).
REWARDED = {0, 4, 5, 7}
PROPOSER_REWARDS = [[1, 0, 0, 0], [1, 1, 0, 1]]
# GRPO: row 0 mean .25, std (n-1) .5; row 1 mean .75, std .5.
PROPOSER_ADVANTAGES = [[1.5, -0.5, -0.5, -0.5], [0.5, 0.5, -1.5, 0.5]]


def script(prompt: str, row: int) -> str:
    if "Let's think step by step" not in prompt:
        return f"{row + 2}*3"
    question, j = row // 4, row % 4
    if question in REWARDED:
        return ["<answer>6</answer>", "<answer>6</answer>", "<answer>7</answer>", "no answer"][j]
    return "<answer>6</answer>"


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _trainer(policy_folder, tmp_path, monkeypatch, optim=None, **rl):
    monkeypatch.setattr(rollout, "sample", scripted_sample(load_tokenizer(policy_folder), script))
    c = rewarded_run_config(policy_folder, tmp_path / "run")
    c.rollout.batch_size, c.rollout.n, c.rl.mini_batch_size = 2, 4, 2  # the proposer batch: one update
    # The gradient norm is ~1: clipping at 0.5 is active, so the update depends on it too.
    c.rl.kl_coef, c.optim.lr, c.optim.grad_clip = 0.05, 1e-3, 0.5
    c.rl.update(rl)
    c.optim.update(optim or {})
    return Trainer(c)


def _scored(trainer):
    policy, rollouts = trainer.learner.policy, trainer.rollouts
    proposer = rollouts.questions(policy, 0)
    return rollouts.score(proposer, rollouts.solve(policy, 0, proposer))


def _hand_logprobs(graphdef, params, sample):
    """log p(response token) `[N, R]` from one plain forward pass over prompt + response."""
    prompt, prompt_mask = jnp.asarray(sample.prompt_tokens), jnp.asarray(sample.prompt_mask)
    tokens, mask = jnp.asarray(sample.tokens), jnp.asarray(sample.mask)
    ids, full_mask = jnp.concatenate([prompt, tokens], 1), jnp.concatenate([prompt_mask, mask], 1)
    logits = nnx.merge(graphdef, params)(ids, full_mask)[:, prompt.shape[1] - 1:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    return jnp.where(mask, logp, 0.0)


def test_rewards_advantages_and_first_update_by_hand(policy_folder, tmp_path, monkeypatch):
    trainer = _trainer(policy_folder, tmp_path, monkeypatch)
    learner, c = trainer.learner, trainer.config
    proposer, solver = _scored(trainer)
    np.testing.assert_array_equal(proposer.rewards, PROPOSER_REWARDS)
    np.testing.assert_array_equal(solver.rewards, [[1, 1, 0, 0] if q in REWARDED else [1] * 4 for q in range(8)])

    # A reference apart from the current weights, so the KL term and its gradient are not zero.
    graphdef, params = learner.policy
    start = jax.tree.map(np.asarray, params)
    noise = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
    learner.ref_params = jax.tree.unflatten(jax.tree.structure(params), [
        x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(jax.tree.leaves(params), noise)])
    batch = learner.batch(proposer.sample, proposer.row_mask, proposer.rewards)

    mask = np.asarray(proposer.sample.mask)
    assert (mask.sum(1) == 4).all()  # "k*3" and the stop token
    # Each row's GRPO advantage on every token of its response, 0 on padding.
    np.testing.assert_allclose(batch.advantages, np.ravel(PROPOSER_ADVANTAGES)[:, None] * mask, rtol=1e-5)
    old = _hand_logprobs(graphdef, params, proposer.sample)
    ref = _hand_logprobs(graphdef, learner.ref_params, proposer.sample)
    np.testing.assert_allclose(batch.old_logp, old, atol=2e-5)
    np.testing.assert_allclose(batch.ref_logp, ref, atol=2e-5)
    assert np.abs(np.asarray(ref - old)).max() > 0.05  # the reference really is the frozen other one

    # The loss by hand at the current weights: PPO at ratio 1 (no clip active) and k3 to the reference.
    advantages = jnp.asarray(batch.advantages)

    def loss(p):
        logp = _hand_logprobs(graphdef, p, proposer.sample)
        d = ref - logp
        per_token = -advantages * jnp.exp(logp - old) + c.rl.kl_coef * (jnp.exp(d) - d - 1)
        return jnp.sum(jnp.where(mask, per_token, 0.0)) / mask.sum()

    # Compiled, as below: the op-by-op gradient aborted the process now and then (jax 0.10.2, this mesh).
    grads = jax.jit(jax.grad(loss))(params)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    assert norm > c.optim.grad_clip
    clipped = jax.tree.map(lambda g: g * min(1.0, c.optim.grad_clip / norm), grads)
    # Adam's first step is -lr · g / (|g| + eps) (m̂ = g, v̂ = g²); no weight decay.
    expected = jax.tree.map(lambda g: -c.optim.lr * g / (jnp.abs(g) + c.optim.eps), clipped)
    metrics = {k: float(np.mean(v)) for k, v in learner.update(batch).items()}
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    moved = jax.tree.map(lambda new, old: np.asarray(new) - old, learner.state.params, start)
    for (path, got), want, before in zip(jax.tree_util.tree_leaves_with_path(moved), jax.tree.leaves(expected),
                                         jax.tree.leaves(start)):
        # float32 resolves a change of a weight w to about 6e-8 · |w|
        resolution = 2.4e-7 * float(np.abs(before).max())
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(jnp.abs(want).max()) + resolution,
                                   err_msg=jax.tree_util.keystr(path))

    # The effect on the sequences: the rewarded proposals gained log-probability, the others lost it,
    # each by its first-order amount ∇ log p · Δθ.
    sequence = lambda p: _hand_logprobs(graphdef, p, proposer.sample).sum(axis=1)
    before = jax.tree.map(jnp.asarray, start)  # `params` were donated to the update
    change = np.asarray(sequence(learner.state.params) - sequence(before))
    # One row's gradient at a time (the MLP has no forward-mode rule, so no JVP), compiled: jax 0.10.2
    # on this mesh aborted the process in ~1 run of 4 computing the batched `jax.jacrev` op by op,
    # and compiled it gave a wrong Jacobian (embedding rows off by 20%); a plain compiled gradient is
    # what the update itself uses and matches the eager one.
    row_gradient = jax.jit(jax.grad(lambda p, i: sequence(p)[i]))
    first_order = np.array([sum(float(jnp.vdot(g, e)) for g, e in zip(
        jax.tree.leaves(row_gradient(before, i)), jax.tree.leaves(expected))) for i in range(len(change))])
    np.testing.assert_allclose(change, first_order, rtol=0.02, atol=0.01 * np.abs(first_order).max())
    rewarded = np.ravel(PROPOSER_ADVANTAGES) > 0
    assert change[rewarded].min() > 0 > change[~rewarded].max(), change
    assert np.abs(change).max() > 1e-3


def test_gae_places_the_outcome_on_the_last_token_and_whitens_the_rows_in_the_loss(
        policy_folder, tmp_path, monkeypatch):
    trainer = _trainer(policy_folder, tmp_path, monkeypatch, advantage="gae", use_kl=False)
    learner = trainer.learner
    # The value head starts at zero; a constant head makes the values, and so R - V, differ by token.
    state = learner.critic_state
    learner.critic_state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "value_head" in jax.tree_util.keystr(path) else x, state.params))
    proposer, _ = _scored(trainer)
    rewards = np.ravel(PROPOSER_REWARDS).astype(np.float32)
    for row_mask in (np.ones(8, bool), np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)):  # reference / mask
        batch = learner.batch(proposer.sample, row_mask, proposer.rewards)
        mask = np.asarray(proposer.sample.mask) & row_mask[:, None]
        np.testing.assert_array_equal(batch.response_mask, mask)  # rows out of the loss are out
        values = np.asarray(batch.old_values)
        assert np.abs(values[mask]).max() > 0
        # gamma = lambda = 1, the reward R on the last token: the return of every token is R, its
        # advantage R - V(t); whitened over the tokens in the loss (unbiased variance).
        raw = (rewards[:, None] - values)[mask]
        whitened = (raw - raw.mean()) / np.sqrt(raw.var(ddof=1) + 1e-8)
        np.testing.assert_allclose(np.asarray(batch.advantages)[mask], whitened, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(batch.returns)[mask], np.broadcast_to(rewards[:, None], mask.shape)[mask],
                                   atol=1e-6)
        assert not np.asarray(batch.advantages)[~mask].any()


def _gae_by_hand(rewards, values, mask, gamma, lam):
    """Row by row, backwards from the last response token (the outcome reward R there, V = 0 past it):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; returns A + V; then A
    whitened over the tokens in the loss."""
    advantages, returns = np.zeros(mask.shape), np.zeros(mask.shape)
    for i, row in enumerate(mask):
        length = int(row.sum())
        next_value = next_advantage = 0.0
        for t in reversed(range(length)):
            delta = (rewards[i] if t == length - 1 else 0.0) + gamma * next_value - values[i, t]
            advantages[i, t] = next_advantage = delta + gamma * lam * next_advantage
            returns[i, t], next_value = advantages[i, t] + values[i, t], values[i, t]
    raw = advantages[mask]
    advantages[mask] = (raw - raw.mean()) / np.sqrt(raw.var(ddof=1) + 1e-8)
    return advantages, returns


def test_gae_discounts_with_the_configs_gamma_and_lambda(policy_folder, tmp_path, monkeypatch):
    """rl.gamma = 0.5, rl.lam = 0.8 (not the reference's 1 and 1): the learner's advantages and returns
    are GAE's with these, by hand; with 1 and 1 every token's return would be R."""
    trainer = _trainer(policy_folder, tmp_path, monkeypatch, advantage="gae", use_kl=False, gamma=0.5, lam=0.8)
    learner = trainer.learner
    state = learner.critic_state
    learner.critic_state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "value_head" in jax.tree_util.keystr(path) else x, state.params))
    proposer, _ = _scored(trainer)
    batch = learner.batch(proposer.sample, proposer.row_mask, proposer.rewards)
    mask, values = np.asarray(proposer.sample.mask), np.asarray(batch.old_values)
    advantages, returns = _gae_by_hand(np.ravel(PROPOSER_REWARDS), values, mask, 0.5, 0.8)
    np.testing.assert_allclose(np.asarray(batch.advantages), advantages, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.returns), returns, rtol=1e-5, atol=1e-6)
    assert np.abs(returns[mask] - np.broadcast_to(np.ravel(PROPOSER_REWARDS)[:, None], mask.shape)[mask]).max() > 0.1


def test_the_critic_learns_at_its_own_rate(policy_folder, tmp_path, monkeypatch):
    """rl.critic_lr = 3e-3, the policy's optim.lr = 1e-2 (Adam's eps 1e-8, no weight decay): Adam's
    first step moves each weight by the learning rate times g / (|g| + eps), so the value head (the
    only part of the critic with a gradient at first: it starts at zero) moves by 3e-3 wherever its
    gradient is not tiny; at the policy's rate it would move by 1e-2."""
    trainer = _trainer(policy_folder, tmp_path, monkeypatch, optim=dict(eps=1e-8, lr=1e-2, weight_decay=0.0),
                       advantage="gae", use_kl=False, critic_lr=3e-3)
    learner = trainer.learner
    proposer, _ = _scored(trainer)
    batch = learner.batch(proposer.sample, proposer.row_mask, proposer.rewards)
    critic_before = jax.tree.map(np.asarray, learner.critic_state.params)
    policy_before = jax.tree.map(np.asarray, learner.state.params)
    learner.update(batch, actor=False)
    head = lambda params: next(np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
                               if "value_head" in jax.tree_util.keystr(p))
    moved = np.abs(head(learner.critic_state.params) - head(critic_before))
    assert moved.max() == pytest.approx(3e-3, rel=1e-3) and np.median(moved) == pytest.approx(3e-3, rel=1e-2)
    for got, want in zip(jax.tree.leaves(learner.state.params), jax.tree.leaves(policy_before)):
        np.testing.assert_array_equal(got, want)  # the critic's update leaves the policy alone


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_the_advantages_by_the_trainers_over_the_samplers_odds(
        policy_folder, tmp_path, monkeypatch, level):
    """rl.rollout_is: the old log-probs are the trainer's pass even where the sampler's would be
    reused, and each token's advantage is scaled by min(π_train / π_sampler, cap). The scripted
    sampler records log-prob 0 (probability 1) for every token, so the weight is the trainer's own
    probability of the token (of the row, by sequence): below 1, never capped."""
    trainer = _trainer(policy_folder, tmp_path, monkeypatch, rollout_is=level, reuse_sampler_logprobs=True)
    learner = trainer.learner
    assert learner.reuses_sampler_logprobs and learner.passes_sampler_logprobs
    proposer, _ = _scored(trainer)
    batch = learner.batch(proposer.sample, proposer.row_mask, proposer.rewards)
    mask = np.asarray(proposer.sample.mask)
    old = np.asarray(_hand_logprobs(*learner.policy, proposer.sample))
    np.testing.assert_allclose(batch.old_logp, old, atol=2e-5)
    odds = np.exp(old) if level == "token" else np.broadcast_to(np.exp(old.sum(1, keepdims=True)), old.shape)
    assert 0 < odds[mask].min() and odds[mask].max() < 1
    np.testing.assert_allclose(batch.advantages, np.ravel(PROPOSER_ADVANTAGES)[:, None] * odds * mask,
                               rtol=1e-4, atol=1e-6)
