"""Grouped-query softmax attention over a KV cache's layouts, with an optional prompt prefix shared by
groups of rows, and its queries in blocks for long passes.

Shapes use the package's alphabet (sqlm_jax/__init__.py): N rows, T positions of the call (the query
length), S key slots, P shared prefix slots, K kv heads, G query heads per kv head, H head dim.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    """One layer's keys `k[N, K, H, S]` (transposed) and values `v[N, K, S, H]`. In these layouts both attention products are plain batched matmuls over (N, K) that read the cache
    in place. With `[N, S, K, H]` for both, XLA on CPU transposed the whole cache every decode step
    (bench/sampling.py: decoding 4-8x slower in attention at batch 256).
    """

    k: jax.Array
    v: jax.Array


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           prefix: LayerCache | None = None, query_block: int = 0) -> jax.Array:
    """Softmax attention: q `[N, T, K, G, H]`, k `[N, K, H, S]`, v `[N, K, S, H]`, mask `[N, T, S']`
    -> `[N, T, K, G, H]`, its queries `query_block` at a time when T is longer (0: all at once).

    Each block's float32 scores `[N, K, G, query_block, S']` are recomputed in the backward pass, so
    only one block's are ever alive: at the paper's 3,584 tokens the whole `[K, G, T, S']` is ~0.8 GiB
    per row and copy, which alone kept the algebra update off a v5e-8 (issue 30). A row's softmax sees
    all of its keys either way, so the results are the same.
    """
    t = q.shape[1]
    if not query_block or t <= query_block:
        return _attend(q, k, v, mask, prefix)
    blocks = -(-t // query_block)
    pad = blocks * query_block - t  # padded queries see no key: a uniform softmax, sliced off below
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    split = lambda x: x.reshape((x.shape[0], blocks, query_block) + x.shape[2:]).swapaxes(0, 1)
    one_block = jax.checkpoint(lambda qm: _attend(qm[0], k, v, qm[1], prefix))
    out = jax.lax.map(one_block, (split(q), split(mask)))  # [blocks, N, query_block, K, G, H]
    return out.swapaxes(0, 1).reshape(q.shape)[:, :t]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix: LayerCache | None) -> jax.Array:
    """`attend` over all T queries at once. Scores and softmax in float32.

    A `prefix` (keys `[N/n, K, H, P]`, values `[N/n, K, P, H]`) holds P slots shared by each group of
    n consecutive rows, attended before the row's own S keys (S' = P + S; the mask covers the prefix
    first). The n samples of a prompt read its keys and values once per group, not once per row:
    decoding reads the prompt's cache 1/n as often (bench/vs_trl.py: decoding ~6% faster at n = 8).
    """
    b, t, kv_heads, g, dh = q.shape
    scores = _scores(q, k)  # [N, K, G, T, S]
    if prefix is not None:
        groups, prefix_len = prefix.k.shape[0], prefix.k.shape[3]
        grouped_q = q.reshape((groups, -1) + q.shape[1:])  # [N/n, n, T, K, G, H]
        prefix_scores = jnp.einsum("bntkgh,bkhs->bnkgts", grouped_q, prefix.k.astype(q.dtype))
        scores = jnp.concatenate([prefix_scores.reshape((b,) + prefix_scores.shape[2:]).astype(jnp.float32),
                                  scores], axis=-1)
    scores = scores / math.sqrt(dh)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if prefix is None:
        return _weighted_values(probs, v, q.dtype)
    prefix_probs = probs[..., :prefix_len].astype(q.dtype).reshape((groups, -1) + probs.shape[1:-1]
                                                                    + (prefix_len,))
    prefix_out = jnp.einsum("bnkgts,bksh->bntkgh", prefix_probs, prefix.v.astype(q.dtype)).reshape(q.shape)
    return prefix_out + _weighted_values(probs[..., prefix_len:], v, q.dtype)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q `[N, T, K, G, H]` · k `[N, K, H, S]` -> `[N, K, G, T, S]` float32, unscaled."""
    b, t, kv_heads, g, dh = q.shape
    if t == 1 and k.dtype != jnp.float32:
        # One query per row (decoding) over a bfloat16 cache (TPU, GPU): a dot accumulating in float32
        # reads the cache once as it is. Multiply-and-sum in float32 made XLA's TPU program write a
        # float32 copy of each layer's cache and read it back, every step (sqlm_jax.step_time).
        return jnp.einsum("nkgh,nkhs->nkgs", q[:, 0], k.astype(q.dtype),
                          preferred_element_type=jnp.float32)[:, :, :, None]
    if t == 1:
        # A float32 cache (CPU): multiply-and-sum, which XLA fuses into one pass over the cache. Its
        # CPU dot for these tiny per-(N, K) products was 3-4x slower (bench/sampling.py).
        q32 = q[:, 0].astype(jnp.float32)  # [N, K, G, H]
        return jnp.sum(q32[..., None] * k[:, :, None].astype(jnp.float32), axis=3)[:, :, :, None]
    # The G·T queries of a kv head as the rows of one plain matmul per (N, K). As an einsum over the
    # [N, T, K, G, H] layout, XLA on CPU computed transposed products in its slower generic dot:
    # the reference pass took 4% longer, a training step 2% (bench/vs_trl.py).
    q = q.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, dh)
    return (q @ k).reshape(b, kv_heads, g, t, -1).astype(jnp.float32)


def _weighted_values(probs: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """probs `[N, K, G, T, S]` (float32) · v `[N, K, S, H]` -> `[N, T, K, G, H]` in `dtype`."""
    b, kv_heads, g, t, s = probs.shape
    if t == 1 and v.dtype != jnp.float32:  # a bfloat16 cache read once, as in _scores
        out = jnp.einsum("nkgs,nksh->nkgh", probs[:, :, :, 0].astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out[:, None].astype(dtype)
    if t == 1:
        out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None].astype(jnp.float32), axis=3)[:, None]
        return out.astype(dtype)
    out = probs.astype(dtype).reshape(b, kv_heads, g * t, s) @ v  # [N, K, G·T, H]
    return out.reshape(b, kv_heads, g, t, -1).transpose(0, 3, 1, 2, 4)
