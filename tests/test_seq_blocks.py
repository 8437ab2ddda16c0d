"""Long passes in blocks of positions (model.seq_block, issue 30): attention's queries and the MLP a block
at a time give the same outputs and gradients as all positions at once, for left padding, grouped-query
heads, a shared prompt prefix, a length that the block does not divide, remat and LoRA adapters; and the
point of it, a backward pass that holds one block's float32 scores and MLP activations."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax.models import ModelConfig, Transformer, lora
from sqlm_jax.models.attention import LayerCache, attend
from sqlm_jax.models.transformer import MLP

N, T, K, G, H, P = 4, 11, 2, 3, 8, 5


def _inputs(seed=0, prefix_groups=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (N, T, K, G, H))
    k = jax.random.normal(keys[1], (N, K, H, T))
    v = jax.random.normal(keys[2], (N, K, T, H))
    pad = jnp.array([0, 3, 1, 6])  # left padding per row
    slot = jnp.arange(T)
    own = (slot[None, :] >= pad[:, None])[:, None, :] & (slot[None, None, :] <= slot[None, :, None])
    if not prefix_groups:
        return q, k, v, own, None
    prefix = LayerCache(jax.random.normal(keys[3], (prefix_groups, K, H, P)),
                        jax.random.normal(keys[4], (prefix_groups, K, P, H)))
    prefix_mask = jnp.broadcast_to(jnp.arange(P) >= 1, (N, T, P))  # the prompt's first slot is padding
    return q, k, v, jnp.concatenate([prefix_mask, own], axis=-1), prefix


@pytest.mark.parametrize("block", [1, 4, 5, 10])
@pytest.mark.parametrize("prefix_groups", [0, 2])
def test_blocks_give_the_same_outputs_and_gradients(block, prefix_groups):
    q, k, v, mask, prefix = _inputs(prefix_groups=prefix_groups)
    weights = jax.random.normal(jax.random.key(9), (N, T, K, G, H))

    def loss(q, k, v, prefix, block):
        out = attend(q, k, v, mask, prefix, query_block=block)
        # Rows' padded queries are left out, as the loss masks them.
        return jnp.sum(jnp.where(mask[:, :, -1, None, None, None], out * weights, 0.0)), out

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (want, want_out), (got, got_out) = grad(q, k, v, prefix, 0), grad(q, k, v, prefix, block)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    for g_got, g_want in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g_got, g_want, atol=1e-5)


def test_the_backward_pass_holds_one_blocks_scores():
    """XLA's own account of the gradient's temporaries at T = 512: all queries at once keep the whole
    float32 `[N, K, G, T, T]` (~12 MiB here); 64 at a time keep an eighth of it."""
    n, t = 2, 512
    q = jax.ShapeDtypeStruct((n, t, K, G, H), jnp.float32)
    k = jax.ShapeDtypeStruct((n, K, H, t), jnp.float32)
    v = jax.ShapeDtypeStruct((n, K, t, H), jnp.float32)
    mask = jax.ShapeDtypeStruct((n, t, t), jnp.bool_)

    def temporaries(block):
        grad = jax.grad(lambda q, k, v, mask: jnp.sum(attend(q, k, v, mask, query_block=block)), (0, 1, 2))
        return jax.jit(grad).lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    scores = n * K * G * t * t * 4
    whole, blocked = temporaries(0), temporaries(64)
    assert whole >= scores, (whole, scores)
    assert blocked < scores / 2, (blocked, scores)


MODEL = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


@pytest.mark.parametrize("remat, rank", [(False, 0), (True, 0), (False, 2)], ids=["plain", "remat", "lora"])
def test_a_model_in_blocks_gives_the_same_logits_and_gradients(remat, rank):
    """A whole model, positions 4 at a time (T = 11: three blocks, the last padded) against all at once:
    its logits, and the gradients of a masked loss over them for every trained weight."""
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 1, MODEL.vocab_size)
    mask = jnp.arange(11)[None] >= jnp.array([0, 4, 2])[:, None]  # left padding
    weights = jax.random.normal(jax.random.key(2), (3, 11, MODEL.vocab_size))
    results = []
    for block in (0, 4):
        model = Transformer(dataclasses.replace(MODEL, remat=remat, seq_block=block), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        if rank:
            graphdef, params, frozen = lora.attach(graphdef, params, lora.LoraSpec(rank=rank, alpha=4.0), seed=3)
            params_of = lambda p, frozen=frozen: nnx.merge_state(frozen, p)
        else:
            params_of = lambda p: p

        def loss(p, graphdef=graphdef, params_of=params_of):
            logits = nnx.merge(graphdef, params_of(p))(tokens, mask)
            return jnp.sum(jnp.where(mask[..., None], logits * weights, 0.0)), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        results.append((logits, grads))
    (want_logits, want), (got_logits, got) = results
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4)
    moved = [float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want)]
    # Every weight has a gradient; LoRA's A factors not yet, as its B factors start at zero.
    assert sum(moved) == (len(moved) // 2 if rank else len(moved)) and len(moved) > 10
    for g_got, g_want in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_the_mlps_backward_pass_holds_one_blocks_activations():
    """XLA's account of the MLP's gradient at T = 512 positions: all at once it keeps several
    `[N·T, 2F]` buffers (~8 MiB each here); 64 at a time an eighth of that."""
    cfg = dataclasses.replace(MODEL, hidden_size=64, intermediate_size=1024)
    x = jax.ShapeDtypeStruct((2, 512, 64), jnp.float32)

    def temporaries(block):
        graphdef, params = nnx.split(MLP(dataclasses.replace(cfg, seq_block=block), nnx.Rngs(0)))
        grad = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), argnums=(0, 1))
        return jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    projection = 2 * 512 * 2 * 1024 * 4
    whole, blocked = temporaries(0), temporaries(64)
    assert whole >= 2 * projection, (whole, projection)
    assert blocked < projection, (blocked, projection)
