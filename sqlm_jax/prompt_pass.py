"""The prompt pass of both samplers (sampling's static batch, refill's waves): the prompts' last hidden
states and their KV cache, a few prompts per device at a time, with the cache's rows pinned to the
mesh's batch axes. Shapes: B prompts, P prompt positions, D hidden size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models.attention import LayerCache
from sqlm_jax.models.transformer import Transformer, positions_from_mask

# Prompt tokens per device that one piece of a prompt pass runs at once: the pass's buffers (the MLP's
# [tokens, 2, F], float32 scores) follow this, not the prompts of a call. At 256 prompts of 511 tokens
# whole, the algebra solver's pass held ~3.5 GiB of them per v5e chip (issue 30).
PREFILL_TOKENS = 4096


def _constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """Pins `x` to the sharding its logical `axes` get on `mesh` (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_lib.logical_spec(axes, x.shape, mesh)))


def constrain_cache(cache: list[LayerCache], mesh: Mesh | None) -> list[LayerCache]:
    """Rows over the mesh's batch axes, kv heads over its tensor axis."""
    return jax.tree.map(lambda x: _constrain(x, ("batch", "kv_heads", None, None), mesh), cache)


def prompt_pass(model: Transformer, tokens: jax.Array, mask: jax.Array, mesh: Mesh | None
                ) -> tuple[jax.Array, list[LayerCache]]:
    """The `[B, P]` prompts' last hidden states `[B, D]` and cache, a few prompts per device at a time
    (at most PREFILL_TOKENS tokens each) written into the whole cache in place."""
    (b, p), positions = tokens.shape, positions_from_mask(mask)
    batch_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    d = batch_devices if b % batch_devices == 0 else 1
    per_block = b // d  # prompts per device: rows split over the batch axes in contiguous blocks
    c = max(k for k in range(1, per_block + 1) if per_block % k == 0 and (k * p <= PREFILL_TOKENS or k == 1))
    blocks = lambda x: x.reshape((d, per_block) + x.shape[1:])

    def run(tokens, positions, mask):  # [N, P] -> last hidden [N, D], cache
        hidden, cache = model.hidden_states(tokens, positions, mask,
                                            cache=constrain_cache(model.init_cache(tokens.shape[0], p), mesh))
        return mesh_lib.constrain_rows(hidden[:, -1], mesh), constrain_cache(cache, mesh)

    if c == per_block:  # one piece: no whole cache to write it into
        return run(tokens, positions, mask)

    def piece(i, done):
        take = lambda x: jax.lax.dynamic_slice_in_dim(blocks(x), i * c, c, 1).reshape((d * c,) + x.shape[1:])
        put = lambda whole, part: jax.lax.dynamic_update_slice_in_dim(
            blocks(whole), part.reshape((d, c) + part.shape[1:]), i * c, 1).reshape(whole.shape)
        last, cache = jax.tree.map(put, done, run(take(tokens), take(positions), take(mask)))
        return mesh_lib.constrain_rows(last, mesh), constrain_cache(cache, mesh)

    empty = (jnp.zeros((b, model.config.hidden_size), model.config.compute_dtype), model.init_cache(b, p))
    return jax.lax.fori_loop(0, per_block // c, piece, (mesh_lib.constrain_rows(empty[0], mesh),
                                                        constrain_cache(empty[1], mesh)))
