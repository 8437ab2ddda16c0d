"""Attention's queries in blocks (model.query_block, issue 30): the same outputs and gradients as all
queries at once, for left padding, grouped-query heads, a shared prompt prefix and a length that the
block does not divide; and the point of it, a backward pass whose float32 scores are one block's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.models.attention import LayerCache, attend

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
