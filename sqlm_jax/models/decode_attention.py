"""A decode step's attention (T = 1): the rows' own cache slots and their prompts' shared prefix, by
the splash kernel (fused_attention.splash_decode) or XLA's one-query form (attention.attend).

Rows at different steps (slot refill: `write_index [N]`) read their cache up to the shortest of
READ_PARTS' fractions of its S slots that holds every row's tokens, so a tick of young rows does not
pay for S (bench/rollout_lengths.py). Each length is a branch of the compiled step; only the attention
output leaves a branch, the cache is written before it in full. Rows at one step (the static sampler)
read all S: its segments already grow the cache with the step (sampling._decode_segment).

Shapes: the package's alphabet (sqlm_jax/__init__.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sqlm_jax.models import fused_attention
from sqlm_jax.models.attention import LayerCache, attend

READ_PARTS = (8, 4, 2, 1)  # a step reads S/8, S/4, S/2 or S cache slots


def read_lengths(s: int, whole_blocks: bool) -> list[int]:
    """The cache lengths a step of rows at different steps may read, shortest first (in whole splash
    blocks where `whole_blocks`, as the kernel reads them)."""
    lengths = {-(-s // parts) for parts in READ_PARTS}
    if whole_blocks:
        lengths = {min(s, fused_attention.padded(n)) for n in lengths}
    return sorted(lengths)


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_mask: jax.Array,
                prefix: LayerCache | None, write_index, splash: bool, mesh) -> jax.Array:
    """q `[N, 1, K, G, H]` over keys `[N, K, H, S]` and values `[N, K, S, H]` (this step's written), and
    a `prefix` shared by groups of rows (or None); `mask [N, 1, P + S]` the keys each query sees,
    `kv_mask [N, P + S]` the real ones. -> `[N, 1, K, G, H]`."""
    n, prefix_len = q.shape[0], 0 if prefix is None else prefix.v.shape[2]

    def over(length, q, k, v, mask):
        k, v, mask = k[..., :length], v[:, :, :length], mask[..., :prefix_len + length]
        if not splash:
            return attend(q, k, v, mask, prefix)
        groups = n if prefix is None else prefix.v.shape[0]
        return fused_attention.splash_decode(q, k, v, mask[:, 0, prefix_len:], prefix,
                                             kv_mask[::n // groups, :prefix_len], mesh,
                                             interpret=fused_attention.platform(mesh) != "tpu")

    s = v.shape[2]
    if jnp.ndim(write_index) == 0:
        return over(s, q, k, v, mask)
    lengths = read_lengths(s, splash)
    filled = jnp.max(write_index) + 1
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(lengths), filled),
                          [functools.partial(over, length) for length in lengths], q, k, v, mask)
