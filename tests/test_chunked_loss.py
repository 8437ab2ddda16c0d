"""Log-probs, entropy and the loss over chunks of the response (train_step.token_stats): the same loss,
gradients and metrics as the whole-micro-batch logits, for every model family, with the update's
compiled memory no longer growing with vocabulary × response × micro-batch."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqlm_jax.models import ModelConfig, Transformer, load_pretrained
from sqlm_jax.train_step import (LossAgg, LossConfig, RoleBatch, TrainState, accumulate_gradients,
                                 batch_logprobs, make_optimizer, policy_loss_fn, train_step)
from sqlm_jax.defaults import base_config
from tests.checkpoints import FAMILIES, make_checkpoint

WHOLE = 1e6  # MiB: every position in one chunk, the whole-micro-batch logits


def _batch(vocab: int, n=8, p=5, r=7, seed=0) -> RoleBatch:
    rng = np.random.RandomState(seed)
    f32 = lambda x: x.astype(np.float32)
    return RoleBatch(
        prompt_ids=rng.randint(0, vocab, (n, p)).astype(np.int32),
        prompt_mask=np.arange(p)[None, :] >= rng.randint(0, 3, (n, 1)),
        response_ids=rng.randint(0, vocab, (n, r)).astype(np.int32),
        response_mask=np.arange(r)[None, :] < rng.randint(2, r + 1, (n, 1)),
        advantages=f32(rng.randn(n, r)), old_logp=f32(-4.5 + 0.3 * rng.randn(n, r)),
        ref_logp=f32(-4.5 + 0.3 * rng.randn(n, r)), old_values=f32(rng.randn(n, r)), returns=f32(rng.randn(n, r)))


def _split(batch: RoleBatch, micro: int) -> RoleBatch:
    return jax.tree.map(lambda x: jnp.asarray(x).reshape((-1, micro) + x.shape[1:]), batch)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_loss_gradients_and_metrics_equal_the_whole_logits(tmp_path, family):
    """Micro-batches of 4 rows x 7 positions, vocab 97: a budget of 4·97·4·2 bytes gives chunks of 2
    positions (4 chunks, the last one padded). Entropy is in the loss, so its chunked gradient counts."""
    model, cfg = load_pretrained(make_checkpoint(tmp_path, family)[0])
    graphdef, params = nnx.split(model)
    batch = _split(_batch(cfg.vocab_size), 4)
    chunk = 2 * 4 * cfg.vocab_size * 4 / 2 ** 20
    run = lambda mib: jax.jit(lambda p: accumulate_gradients(policy_loss_fn(graphdef, LossConfig(
        entropy_coef=0.01, logits_chunk_mib=mib)), p, batch))(params)
    (g_whole, m_whole), (g_chunk, m_chunk) = run(WHOLE), run(chunk)
    assert float(optax.tree.norm(g_whole)) > 1e-3
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_whole, g_chunk))
    assert max(diffs) < 1e-5 * max(1.0, float(optax.tree.norm(g_whole)))
    assert m_whole.keys() == m_chunk.keys()
    for k in m_whole:
        np.testing.assert_allclose(m_chunk[k], m_whole[k], rtol=1e-5, atol=1e-6, err_msg=k)
    logprobs = lambda mib: np.asarray(jax.jit(lambda p: batch_logprobs(graphdef, p, batch, mib))(params))
    np.testing.assert_allclose(logprobs(chunk), logprobs(WHOLE), atol=1e-5)


def _update_temp_bytes(model_cfg: ModelConfig, micro: int, response: int, chunk_mib: float) -> int:
    """XLA's temporary memory of one update (2 micro-batches), lowered on abstract shapes."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    tx = make_optimizer(base_config().optim, 10)
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                           params)

    def field(f):
        dtype = jnp.int32 if f.name.endswith("_ids") else bool if f.name.endswith("_mask") else jnp.float32
        return jax.ShapeDtypeStruct((2, micro, 16 if f.name.startswith("prompt") else response), dtype)

    batch = RoleBatch(**{f.name: field(f) for f in dataclasses.fields(RoleBatch) if f.name != "prompt_group"})
    loss_fn = policy_loss_fn(graphdef, LossConfig(logits_chunk_mib=chunk_mib))
    update = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx, agg=LossAgg("token-mean")),
                     donate_argnums=0)
    return update.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_update_memory_does_not_grow_with_vocab_times_tokens():
    """V = 32k, R = 256, micro-batches of 4: whole logits are 128 MiB a copy; chunks of 4 MiB hold the
    update's temporary memory under a quarter of that program's, and doubling the micro-batch adds far
    less to it than to the whole-logits program."""
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=32768, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True)
    whole, chunked = _update_temp_bytes(cfg, 4, 256, WHOLE), _update_temp_bytes(cfg, 4, 256, 4.0)
    assert chunked < whole / 4, (chunked, whole)
    whole_8, chunked_8 = _update_temp_bytes(cfg, 8, 256, WHOLE), _update_temp_bytes(cfg, 8, 256, 4.0)
    assert chunked_8 - chunked < (whole_8 - whole) / 8, (chunked, chunked_8, whole, whole_8)
