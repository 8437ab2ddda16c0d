"""Decoding under a budget of rows in flight: W slots decode at once, and a slot whose row has stopped
takes the next pending row, so the work follows the tokens generated, not rows × the longest response.

    prompts [B, P] ──prefill of the first P-1 columns──▶ prefix [B, K, H, P-1] per layer (shared)
    pending rows (row i answers prompt i // n) ──fill free slots──▶ W slots ──one decode tick──▶
      a token per slot (a fresh slot feeds its prompt's last token) ──stopped rows free their slots──▶

(Shapes: the package's alphabet, sqlm_jax/__init__.py; R is max_new_tokens, W = rows_in_flight.)

A slot reads its prompt's prefix through an index, so a prompt is prefilled and held once whatever the
budget, and its n rows may run in any slots at any time. Prompts go in waves of a few times the budget
(`wave_prompts`), so the prompts' cache and the prefill's buffers follow the budget too; a wave's
tail runs in a quarter of the slots (`_narrow`). Each slot keeps its own R cache slots:
slot 0 holds the prompt's last token, slot j the row's token j-1. Rows draw from their own random
streams (`sampling.draw`: fold_in(fold_in(key, row), step)), so a row's tokens do not depend on the
budget, the slot it ran in or the rows beside it.

On a mesh the rows split over D = data × fsdp devices in contiguous blocks as the prompts do; each
device's W/D slots take only its own block's rows, so a slot's prefix and outputs stay on its device.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models.attention import LayerCache
from sqlm_jax.models.transformer import Transformer, positions_from_mask
from sqlm_jax.prompt_pass import constrain_cache, prompt_pass

# A wave's tail (no row pending, at most 1/TAIL_SHRINK of a block's slots active) runs in that fraction
# of the slots: long-tailed lengths leave a few rows decoding long after the rest have stopped.
TAIL_SHRINK = 4
# Rows per slot in a wave: each wave ends in a tail, so fewer, longer waves waste less (on
# bench/rollout_lengths.py's workload 16 beat 4 by ~1.3x at 16 slots); the price is the wave's prompt
# cache and prefill, which the memory plan counts.
WAVE_ROWS = 16


class Slots(NamedTuple):
    """The decode loop's carry: D blocks of w slots over m rows each (D·w = W slots, D·m = N rows)."""

    row: jax.Array        # [D, w] int32 the slot's row within its block (m: none)
    active: jax.Array     # [D, w] bool
    step: jax.Array       # [D, w] int32 tokens its row has generated
    position: jax.Array   # [D, w] int32 RoPE position of the slot's input token
    last: jax.Array       # [D, w] int32 the slot's input token
    pending: jax.Array    # [D] int32 the block's next row without a slot
    cache: list[LayerCache]  # per layer, keys [W, K, H, R] and values [W, K, R, H]
    tokens: jax.Array     # [D, m, R] int32
    logprobs: jax.Array   # [D, m, R] float32


def batch_shards(mesh: Mesh | None, prompts: int) -> int:
    """D: the row blocks of the mesh's batch axes, where the prompts split over them evenly (as
    mesh.row_sharding puts them), else 1."""
    if mesh is None:
        return 1
    d = mesh.shape["data"] * mesh.shape["fsdp"]
    return d if prompts % d == 0 else 1


def wave_prompts(prompts: int, n: int, slots: int) -> int:
    """Prompts a block prefills and decodes together (a wave): the largest divisor of its `prompts` with
    at most WAVE_ROWS·slots rows, so the prompts' cache follows the budget while the slots stay busy (a
    wave's tail, its last rows finishing, is the only time slots wait)."""
    target = max(1, WAVE_ROWS * slots // n)
    return max(g for g in range(1, min(prompts, target) + 1) if prompts % g == 0)


def decode(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, params, mesh: Mesh | None,
           draw) -> tuple[jax.Array, jax.Array]:
    """Tokens and log-probs `[N, R]` of the B·n rows, W = params.rows_in_flight at a time.

    `draw(logits [W, V], rows [W], steps [W]) -> (tokens, log-probs) [W]` samples each slot's token
    from its row's stream. Each block's prompts go in waves of `wave_prompts` (one compiled wave,
    `lax.map` over them).
    """
    b, n = prompt_tokens.shape[0], params.n
    d = batch_shards(mesh, b)
    per_block = b // d
    w = min(per_block * n, -(-params.rows_in_flight // d))
    g = wave_prompts(per_block, n, w)
    waves = lambda x: jnp.moveaxis(x.reshape((d, per_block // g, g) + x.shape[1:]), 1, 0)  # [waves, D, g, ...]

    def wave(xs):
        index, tokens, mask = xs
        flat = lambda x: x.reshape((d * g,) + x.shape[2:])
        offset = per_block * n * jnp.arange(d, dtype=jnp.int32) + index * g * n  # [D] first row ids
        return _wave(model, flat(tokens), flat(mask), offset, d, w, params, mesh, draw)

    out = jax.lax.map(wave, (jnp.arange(per_block // g, dtype=jnp.int32), waves(prompt_tokens), waves(prompt_mask)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((b * n,) + x.shape[3:])  # [waves, D, g·n, R] -> [N, R]
    return merge(out[0]), merge(out[1])


def _wave(model, prompt_tokens, prompt_mask, offset, d: int, w: int, params, mesh, draw):
    """One wave: `[D·g, P]` prompts (D blocks of g), their g·n rows per block through w slots each;
    `offset [D]`: each block's first row id (its rows' random streams). Tokens, log-probs `[D, g·n, R]`."""
    b, n, r = prompt_tokens.shape[0], params.n, params.max_new_tokens
    m, per_block = b * n // d, b // d
    rows = lambda x: mesh_lib.constrain_rows(x, mesh)
    cache_axes = lambda c: constrain_cache(c, mesh)
    positions = positions_from_mask(prompt_mask)
    _, prefix = prompt_pass(model, prompt_tokens[:, :-1], prompt_mask[:, :-1], mesh)
    blocks = lambda x: x.reshape((d, per_block) + x.shape[1:])  # [D·g, ...] -> [D, g, ...]
    last_token, last_position = blocks(prompt_tokens[:, -1]), blocks(positions[:, -1])
    prefix_mask = blocks(prompt_mask[:, :-1])

    def tick(s: Slots) -> Slots:
        w = s.row.shape[1]  # the wave's slots, or its narrowed tail's
        free = ~s.active
        candidate = s.pending[:, None] + jnp.cumsum(free, axis=1) - 1
        take = free & (candidate < m)
        row = jnp.where(take, candidate, s.row)
        prompt = jnp.minimum(row // n, per_block - 1)  # a slot without a row reads any prompt
        of_prompt = lambda x: jnp.take_along_axis(x, prompt.reshape((d, w) + (1,) * (x.ndim - 2)), axis=1)
        s = s._replace(row=row, active=s.active | take, step=jnp.where(take, 0, s.step),
                       position=jnp.where(take, of_prompt(last_position), s.position),
                       last=jnp.where(take, of_prompt(last_token), s.last),
                       pending=s.pending + take.sum(axis=1, dtype=jnp.int32))
        flat = lambda x: x.reshape((d * w,) + x.shape[2:])
        slot_prefix = [LayerCache(flat(jax.vmap(lambda x, i: x[i])(blocks(c.k), prompt)),
                                  flat(jax.vmap(lambda x, i: x[i])(blocks(c.v), prompt))) for c in prefix]
        kv_mask = jnp.concatenate([flat(of_prompt(prefix_mask)), jnp.ones((d * w, r), bool)], axis=1)
        # An idle slot writes its junk at slot 0, which the next row's first step overwrites: the
        # rows' steps alone bound the slots a tick reads (models/decode_attention.py).
        write_index = jnp.where(flat(s.active), jnp.minimum(flat(s.step), r - 1), 0)
        hidden, cache = model.hidden_states(flat(s.last)[:, None], flat(s.position)[:, None], kv_mask,
                                            cache=s.cache, write_index=write_index,
                                            prefix=slot_prefix)
        global_row = flat(row + offset[:, None])
        token, logprob = draw(model.logits(hidden[:, 0]), global_row, flat(s.step))
        token, logprob = token.reshape(d, w), logprob.reshape(d, w)
        write = lambda out, x: jax.vmap(lambda o, i, j, v: o.at[i, j].set(v, mode="drop"))(
            out, jnp.where(s.active, s.row, m), s.step, x)  # row m is out of range: dropped
        stopped = (jnp.isin(token, jnp.asarray(params.stop_ids, jnp.int32)) if params.stop_ids else False)
        return s._replace(
            active=s.active & ~(stopped | (s.step + 1 >= r)), step=s.step + 1, position=s.position + 1,
            last=token, cache=cache_axes(cache), tokens=rows(write(s.tokens, token)),
            logprobs=rows(write(s.logprobs, logprob)))

    zeros = lambda dtype, value=0: rows(jnp.full((d, w), value, dtype))
    init = Slots(row=zeros(jnp.int32, m), active=zeros(bool), step=zeros(jnp.int32), position=zeros(jnp.int32),
                 last=zeros(jnp.int32), pending=jnp.zeros((d,), jnp.int32),
                 cache=cache_axes(model.init_cache(d * w, r)),
                 tokens=rows(jnp.full((d, m, r), params.pad_id, jnp.int32)),
                 logprobs=rows(jnp.zeros((d, m, r), jnp.float32)))
    busy = lambda s: jnp.any(s.active) | jnp.any(s.pending < m)
    narrow = max(1, w // TAIL_SHRINK)
    if narrow == w:
        out = jax.lax.while_loop(busy, tick, init)
    else:
        in_tail = lambda s: jnp.all(s.pending >= m) & jnp.all(s.active.sum(axis=1) <= narrow)
        wide = jax.lax.while_loop(lambda s: busy(s) & ~in_tail(s), tick, init)
        out = jax.lax.while_loop(busy, tick, _narrow(wide, narrow, cache_axes))
    return out.tokens, out.logprobs


def _narrow(s: Slots, narrow: int, cache_axes) -> Slots:
    """The wave's tail in fewer slots: each block's active slots (at most `narrow`, no row pending) move,
    with their caches, into `narrow` slots, so the last long rows stop paying for idle ones."""
    d, w = s.row.shape
    keep = jnp.argsort(~s.active, axis=1, stable=True)[:, :narrow]  # [D, narrow] active slots first
    pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
    slots = lambda x: pick(x.reshape((d, w) + x.shape[1:])).reshape((d * narrow,) + x.shape[1:])
    cache = cache_axes([LayerCache(slots(c.k), slots(c.v)) for c in s.cache])
    return s._replace(row=pick(s.row), active=pick(s.active), step=pick(s.step), position=pick(s.position),
                      last=pick(s.last), cache=cache)
