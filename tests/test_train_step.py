"""The compiled update: exact micro-batch accumulation, and GRPO moving probability toward reward."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqlm_jax import rl
from sqlm_jax.models import ModelConfig, Transformer
from sqlm_jax.models.critic import Critic
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


@pytest.mark.parametrize("which", ["policy", "critic"])
def test_micro_batch_accumulation_equals_one_big_batch(which):
    policy = Transformer(CFG, rngs=nnx.Rngs(0))
    model = policy if which == "policy" else Critic(policy)
    graphdef, params = nnx.split(model)
    if which == "critic":  # a non-zero head, so the value gradients are not trivially zero
        params["value_head"].set_value(0.1 * jnp.ones(CFG.hidden_size))
    loss_fn = (policy_loss_fn(graphdef, LossConfig()) if which == "policy"
               else value_loss_fn(graphdef, value_clip=0.5))
    batch = _batch()
    accumulate = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b))
    big, big_metrics = accumulate(params, _split(batch, 8))
    small, small_metrics = accumulate(params, _split(batch, 2))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), big, small))
    assert max(diffs) < 1e-6
    assert float(optax.tree.norm(big)) > 1e-3  # the comparison is not between two zeros
    assert float(big_metrics["tokens"]) == batch.response_mask.sum() == float(small_metrics["tokens"])
    for k in big_metrics:
        np.testing.assert_allclose(big_metrics[k], small_metrics[k], rtol=1e-5, atol=1e-6)


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
