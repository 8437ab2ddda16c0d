"""Decoding's attention (one query per row) over a bfloat16 cache, as on TPU and GPU: dots that
accumulate in float32 and read the cache as it is, never a float32 copy of it (which XLA's TPU program
wrote and read back in every layer of every decode step, issue 31); the same softmax attention."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.models.attention import LayerCache, attend

N, K, G, H, S, P = 4, 2, 3, 8, 12, 5


def _decode_inputs(dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (N, 1, K, G, H)).astype(dtype)
    k = jax.random.normal(keys[1], (N, K, H, S)).astype(dtype)
    v = jax.random.normal(keys[2], (N, K, S, H)).astype(dtype)
    prefix = LayerCache(jax.random.normal(keys[3], (N // 2, K, H, P)).astype(dtype),
                        jax.random.normal(keys[4], (N // 2, K, P, H)).astype(dtype))
    filled = jnp.array([3, 12, 7, 1])  # each row's own slots written so far
    mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(P) >= 1, (N, 1, P)),
                            (jnp.arange(S)[None, :] < filled[:, None])[:, None, :]], axis=-1)
    return q, k, v, mask, prefix


def _reference(q, k, v, mask, prefix) -> np.ndarray:
    """Softmax attention in float64 over the prefix (shared by pairs of rows) then each row's slots."""
    f64 = lambda x: np.asarray(x, np.float64)
    keys = np.concatenate([np.repeat(f64(prefix.k), 2, axis=0), f64(k)], axis=-1)    # [N, K, H, P+S]
    values = np.concatenate([np.repeat(f64(prefix.v), 2, axis=0), f64(v)], axis=-2)  # [N, K, P+S, H]
    scores = np.einsum("nkgh,nkhs->nkgs", f64(q)[:, 0], keys) / np.sqrt(H)
    scores = np.where(np.asarray(mask)[:, 0][:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("nkgs,nksh->nkgh", probs, values)[:, None]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_one_query_per_row_is_softmax_attention(dtype):
    inputs = _decode_inputs(dtype)
    got = np.asarray(attend(*inputs).astype(jnp.float32))
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # bfloat16 probabilities and output
    np.testing.assert_allclose(got, _reference(*inputs), rtol=tolerance, atol=tolerance)


def test_a_bfloat16_cache_is_read_as_it_is():
    """No float32 copy of the rows' cache in the program: the dots take it in bfloat16."""
    q, k, v, mask, prefix = _decode_inputs(jnp.bfloat16)
    text = jax.jit(attend).lower(q, k, v, mask, prefix).as_text()
    converted = [math.prod(map(int, dims.split("x")))
                 for dims in re.findall(r"stablehlo.convert .*-> tensor<([\dx]+)xf32>", text)]
    assert k.size not in converted and v.size not in converted, converted


def test_refill_steps_read_the_shortest_cache_that_holds_every_row():
    """Rows at different steps (slot refill) read S/8, S/4, S/2 or S slots: the shortest holding the
    furthest row's slot, so the result is that of reading all S whichever length is read, including a
    row exactly at a length's last slot or one past it."""
    from sqlm_jax.models import decode_attention
    assert decode_attention.read_lengths(S, False) == [2, 3, 6, 12]
    assert decode_attention.read_lengths(3072, True) == [384, 1024, 1536, 3072]  # whole splash blocks
    q, k, v, _, prefix = _decode_inputs(jnp.float32)
    kv_mask = jnp.ones((N, P + S), bool).at[:, 0].set(False)
    for furthest in (0, 1, 2, 5, 6, 11):  # the last slot of a length, and the first past it
        write_index = jnp.array([0, furthest, furthest // 2, 1])
        causal = jnp.arange(P + S)[None, None, :] <= P + write_index[:, None, None]
        mask = kv_mask[:, None, :] & causal
        out = decode_attention.attend_step(q, k, v, mask, kv_mask, prefix, write_index, False, None)
        np.testing.assert_allclose(out, attend(q, k, v, mask, prefix), atol=1e-6, err_msg=f"furthest {furthest}")
