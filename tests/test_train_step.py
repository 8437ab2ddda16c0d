"""The compiled update: exact micro-batch accumulation, GRPO moving probability toward reward, and the
shortcuts that must not change it (a shared prompt pass per group, trimmed prompt padding)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqlm_jax import rl
from sqlm_jax.models import ModelConfig, Transformer
from sqlm_jax.models.critic import Critic
from sqlm_jax.learner import check_prompt_groups, trim_prompt_padding
from sqlm_jax.train_step import (LossConfig, RoleBatch, TrainState, accumulate_gradients, batch_logprobs,
                                 policy_loss_fn, train_step, value_loss_fn)

CFG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=40, hidden_size=32, intermediate_size=48,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def _batch(n=8, p=5, r=6, seed=0) -> RoleBatch:
    """Random prompts (left padded) and responses (right padded, different lengths)."""
    rng = np.random.RandomState(seed)
    prompt_mask = np.arange(p)[None, :] >= rng.randint(0, 3, (n, 1))
    response_mask = np.arange(r)[None, :] < rng.randint(2, r + 1, (n, 1))
    f32 = lambda x: x.astype(np.float32)
    return RoleBatch(
        prompt_ids=rng.randint(0, CFG.vocab_size, (n, p)).astype(np.int32), prompt_mask=prompt_mask,
        response_ids=rng.randint(0, CFG.vocab_size, (n, r)).astype(np.int32), response_mask=response_mask,
        advantages=f32(rng.randn(n, r)), old_logp=f32(-3 + 0.1 * rng.randn(n, r)),
        ref_logp=f32(-3 + 0.1 * rng.randn(n, r)), old_values=f32(rng.randn(n, r)),
        returns=f32(rng.randn(n, r)))


def _split(batch: RoleBatch, micro: int) -> RoleBatch:
    return jax.tree.map(lambda x: jnp.asarray(x).reshape((-1, micro) + x.shape[1:]), batch)


def _grads(which, seed=0):
    """(params, jitted gradient of the policy's or the critic's loss over micro-batches)."""
    policy = Transformer(CFG, rngs=nnx.Rngs(seed))
    model = policy if which == "policy" else Critic(policy)
    graphdef, params = nnx.split(model)
    if which == "critic":  # a non-zero head, so the value gradients are not trivially zero
        params["value_head"].set_value(0.1 * jnp.ones(CFG.hidden_size))
    loss_fn = (policy_loss_fn(graphdef, LossConfig()) if which == "policy"
               else value_loss_fn(graphdef, value_clip=0.5))
    return params, jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b))


def _assert_same_update(a, b, tol=1e-5):
    (grads_a, metrics_a), (grads_b, metrics_b) = a, b
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), grads_a, grads_b))
    assert max(diffs) < tol
    assert float(optax.tree.norm(grads_a)) > 1e-3  # the comparison is not between two zeros
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=max(tol, 1e-5), atol=tol)


@pytest.mark.parametrize("which", ["policy", "critic"])
def test_micro_batch_accumulation_equals_one_big_batch(which):
    params, accumulate = _grads(which)
    batch = _batch()
    big, small = accumulate(params, _split(batch, 8)), accumulate(params, _split(batch, 2))
    _assert_same_update(big, small, tol=1e-6)
    assert float(big[1]["tokens"]) == batch.response_mask.sum()


def test_grpo_update_raises_the_rewarded_answer_and_lowers_the_other():
    """One group of two answers to one prompt, rewards [1, 0]: after an update the rewarded answer is
    more likely and the other less likely."""
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(1)))
    batch = _batch(n=2, seed=3)
    batch = batch.replace(prompt_ids=np.repeat(batch.prompt_ids[:1], 2, 0),
                          prompt_mask=np.repeat(batch.prompt_mask[:1], 2, 0))
    adv = rl.grpo_advantages(jnp.array([[1.0, 0.0]])).reshape(-1)  # [+0.707, -0.707]
    batch = batch.replace(advantages=np.asarray(rl.broadcast_sequence_advantage(
        adv, jnp.asarray(batch.response_mask))))
    token_logp = jax.jit(lambda p: batch_logprobs(graphdef, p, _split(batch, 2))[0])
    logp = lambda p: np.asarray((token_logp(p) * batch.response_mask).sum(-1))
    batch = batch.replace(old_logp=np.asarray(token_logp(params)), ref_logp=np.asarray(token_logp(params)))
    tx = optax.adamw(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    before = logp(params)
    state, metrics = jax.jit(lambda s, b: train_step(s, b, loss_fn=policy_loss_fn(graphdef, LossConfig()),
                                                     tx=tx))(state, _split(batch, 2))
    after = logp(state.params)
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3
    assert int(state.step) == 1 and float(metrics["grad_norm"]) > 0


def _share_prompts(batch: RoleBatch, group: int) -> RoleBatch:
    """`batch` with rows g·k … g·k+g-1 given row g·k's prompt (g = `group`)."""
    first = lambda x: np.repeat(np.asarray(x)[::group], group, axis=0)
    return batch.replace(prompt_ids=first(batch.prompt_ids), prompt_mask=first(batch.prompt_mask))


@pytest.mark.parametrize("which", ["policy", "critic"])
def test_shared_prompt_pass_gives_the_full_pass_loss_and_gradients(which):
    """Groups of 4 rows share a prompt (each group its own left padding); micro-batches of 4 and 8."""
    params, accumulate = _grads(which)
    batch = _share_prompts(_batch(), 4)
    full = accumulate(params, _split(batch, 8))
    for micro in (4, 8):
        _assert_same_update(full, accumulate(params, _split(batch.replace(prompt_group=4), micro)))


def test_shared_prompt_pass_runs_each_groups_first_prompt():
    """With prompt_group 4, rows get the log-probs of their responses after their group's first prompt:
    the prompt really runs once per group (this batch's rows have different prompt tokens; the masks,
    which also give each row's positions, are shared)."""
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    logprobs = jax.jit(lambda b: batch_logprobs(graphdef, params, b))
    batch = _batch()
    batch = batch.replace(prompt_mask=_share_prompts(batch, 4).prompt_mask)
    grouped = np.asarray(logprobs(_split(batch.replace(prompt_group=4), 8)))
    np.testing.assert_allclose(grouped, np.asarray(logprobs(_split(_share_prompts(batch, 4), 8))), atol=1e-5)
    assert np.abs(grouped - np.asarray(logprobs(_split(batch, 8)))).max() > 1e-3
    with pytest.raises(ValueError, match="prompt groups of 3"):
        logprobs(_split(batch.replace(prompt_group=3), 8))


def test_check_prompt_groups():
    batch = _batch()
    check_prompt_groups(batch.prompt_ids, batch.prompt_mask, 1)
    shared = _share_prompts(batch, 4)
    check_prompt_groups(shared.prompt_ids, shared.prompt_mask, 4)
    with pytest.raises(ValueError, match="do not share one prompt"):
        check_prompt_groups(batch.prompt_ids, batch.prompt_mask, 4)


def test_trimming_all_padding_prompt_columns_keeps_the_loss():
    """Prompts of <= 5 tokens left-padded to 45 columns: trimmed to 16, the same loss and gradients."""
    params, accumulate = _grads("policy")
    batch = _share_prompts(_batch(), 2)
    pad = lambda x, value: np.concatenate([np.full((x.shape[0], 40), value, x.dtype), x], axis=1)
    padded = batch.replace(prompt_ids=pad(batch.prompt_ids, 0), prompt_mask=pad(batch.prompt_mask, False))
    ids, mask = trim_prompt_padding(padded.prompt_ids, padded.prompt_mask)
    assert ids.shape == mask.shape == (8, 16)
    np.testing.assert_array_equal(ids[:, -5:], batch.prompt_ids)
    assert not mask[:, :11].any()
    trimmed = padded.replace(prompt_ids=ids, prompt_mask=mask)
    full = accumulate(params, _split(padded, 4))
    _assert_same_update(full, accumulate(params, _split(trimmed, 4)))
    _assert_same_update(full, accumulate(params, _split(trimmed.replace(prompt_group=2), 4)))
    # A prompt of 17 real tokens keeps 32 columns; a width already within the multiple stays as it is.
    wide = np.arange(40)[None, :] >= 23
    assert trim_prompt_padding(np.zeros((1, 40)), wide)[1].shape == (1, 32)
    assert trim_prompt_padding(np.zeros((1, 20)), np.arange(20)[None, :] >= 3)[1].shape == (1, 20)


def _identical(a, b) -> bool:
    """Whether two pytrees (parameters, optimizer states) hold exactly the same values."""
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_non_finite_loss_skips_the_update_and_counts_it():
    """A batch whose advantages hold a NaN makes the loss and every gradient NaN: parameters, optimizer
    state and step stay exactly as they were, and "skipped" is 1. The same batch made finite updates."""
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(2)))
    tx = optax.adamw(1e-3)
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=policy_loss_fn(graphdef, LossConfig()), tx=tx))
    start = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    batch = _batch()
    poisoned = batch.advantages.copy()
    poisoned[0, 0] = np.nan  # a valid token: row 0's response mask starts True
    assert batch.response_mask[0, 0]

    state, metrics = step(start, _split(batch.replace(advantages=poisoned), 4))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(state.step) == 0
    assert _identical((state.params, state.opt_state), (start.params, start.opt_state))

    state, metrics = step(start, _split(batch, 4))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert not _identical(state.params, start.params)


def test_a_mini_batch_with_no_tokens_makes_no_update():
    """Every row filtered out (rl.filter_zero_variance) leaves no token in the loss: after an update
    with signal, such a step leaves parameters, AdamW's moments and the step count exactly as they
    were, where AdamW would still move the weights by its momentum, and counts "no_signal"."""
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(3)))
    tx = optax.adamw(1e-3)
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=policy_loss_fn(graphdef, LossConfig()), tx=tx))
    batch = _batch()
    state, metrics = step(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
                          _split(batch, 4))
    assert float(metrics["no_signal"]) == 0.0 and int(state.step) == 1
    empty = batch.replace(response_mask=np.zeros_like(batch.response_mask))
    after, metrics = step(state, _split(empty, 4))
    assert float(metrics["no_signal"]) == 1.0 and float(metrics["skipped"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and int(after.step) == 1
    assert _identical((after.params, after.opt_state), (state.params, state.opt_state))
    drift, _ = tx.update(jax.tree.map(jnp.zeros_like, state.params), state.opt_state, state.params)
    assert float(optax.tree.norm(drift)) > 0  # the momentum a plain AdamW step would have applied
