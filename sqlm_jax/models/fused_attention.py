"""Attention whose scores never reach HBM: Pallas splash attention on TPU.

`attention.attend` writes each block of float32 scores `[N, K, G, T, S]` to memory and reads it back
(the forward, the softmax, the backward): by the TPU compiler's cost model that traffic made the
paper's algebra update ~3x slower than its FLOPs allow (sqlm_jax.step_time). Splash attention
(jax.experimental.pallas.ops.tpu.splash_attention, the kernel maxtext uses) keeps a block of scores in
the chip's on-chip memory, skips the blocks a causal mask hides, and recomputes scores in its backward
kernels instead of storing them.

The layouts are the model's: q `[N, T, K, G, H]`, keys `[N, K, H, S]` (the kernel reads them
sequence-minor, as they lie), values `[N, K, S, H]`, and kv_mask `[N, S]`. The T queries sit at key
slots `offset … offset+T-1`, so the causal mask is bottom-right aligned over the first offset+T keys:
the update's whole-sequence pass (offset 0, S = T), its shared prompt pass into a cache (offset 0)
and its responses against that cache (offset = the prompt's length). Left padding is a segment: a
real query sees real keys only; a padded position sees padded keys only (its output is junk, as in
`attend`, but never a softmax over nothing).

A decode step (`splash_decode`) runs the forward kernel with a kv head's G query heads as its queries,
so each row's cache is read once a kv head, and the n rows that share a prompt as the queries against
its prefix; XLA's dot of G query heads against the cache counted ~5x the cache's bytes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, PartitionSpec as P

from sqlm_jax import mesh as mesh_lib

MAX_BLOCK = 512  # positions per block of queries and of keys (maxtext's default for splash)
LANES = 128  # a block is a multiple of the TPU's 128 lanes
SUBLANES = 8  # ... or, for a forward kernel's queries, of its 8 sublanes


def platform(mesh: Mesh | None) -> str:
    """The platform a model's passes run on: its mesh's devices' (a TPU slice compiled from this CPU
    host included), else the default backend's."""
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def chosen(attention: str, mesh: Mesh | None) -> bool:
    """Whether `ModelConfig.attention` = `attention` runs the splash kernel on `mesh`'s platform."""
    return attention == "splash" or (attention == "auto" and platform(mesh) == "tpu")


def block_size(length: int) -> int:
    """The kernel's block for a sequence of `length`: up to MAX_BLOCK, a multiple of LANES."""
    return min(MAX_BLOCK, -(-length // LANES) * LANES)


def query_block(length: int) -> int:
    """The kernel's block of `length` queries: a forward-only call of fewer than LANES queries (decode
    steps, whose grouped query heads are the queries) is one block of whole sublanes."""
    return -(-length // SUBLANES) * SUBLANES if length < LANES else block_size(length)


def padded(length: int) -> int:
    """`length` rounded up to whole blocks."""
    block = block_size(length)
    return -(-length // block) * block


def visited_blocks(t: int, s: int) -> int:
    """(query block, key block) pairs the kernel computes for T queries that are the last of S keys
    (T and S whole blocks, bottom-right causal): those with a key at or before one of their queries."""
    bq, bkv = query_block(t), block_size(s)
    return sum(min(s // bkv, (i * bq + bq - 1 + s - t) // bkv + 1) for i in range(t // bq))


# Each kernel's matmuls per (query, key) pair and head dim: forward q·k and p·v; the dq kernel
# recomputes q·k, then do·v and ds·k; the dkv kernel recomputes q·k, then p·do, do·v and ds·q.
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def kernel_cost(kind: str, rows: int, heads: int, t: int, s: int, head_dim: int, itemsize: int) -> tuple[float, float]:
    """FLOPs and HBM bytes of one splash kernel call ("fwd", "dq" or "dkv") on `rows` rows of `heads`
    query heads, T queries over S keys (padded), from its block schedule: XLA's cost model does not
    see inside a Pallas kernel, so sqlm_jax.step_time adds these.

    Per head, the kernel walks the visited (query block, key block) pairs. The forward and dq kernels
    hold a query block while the key blocks stream past: the keys, values and their segment ids are
    read once per pair, the query side once per query block. The dkv kernel holds a key block while the
    query blocks stream past. Each operand is counted in the block the kernel's BlockSpec gives it:
    segment ids and float32 statistics are broadcast over 128 lanes or 8 sublanes, as the kernel
    lays them out (splash_attention_kernel.py).
    """
    bq, bkv = query_block(t), block_size(s)
    pairs = rows * heads * visited_blocks(t, s)
    q_blocks, kv_blocks = rows * heads * (t // bq), rows * heads * (s // bkv)
    flops = pairs * MATMULS[kind] * 2 * bq * bkv * head_dim
    q_tile, kv_tile = bq * head_dim * itemsize, bkv * head_dim * itemsize  # one block of q (or do, dq, out)
    lanes, sublanes = lambda rows: rows * LANES * 4, lambda cols: SUBLANES * cols * 4  # int32 or float32
    if kind == "fwd":  # per pair keys, values, kv segment ids; per query block q, out, q segment ids, lse
        return flops, pairs * (2 * kv_tile + sublanes(bkv)) + q_blocks * (2 * q_tile + 2 * lanes(bq))
    if kind == "dq":  # per pair as fwd; per query block q, do, dq, q segment ids, lse and di [1, bq]
        return flops, pairs * (2 * kv_tile + sublanes(bkv)) + q_blocks * (3 * q_tile + lanes(bq) + 2 * bq * 4)
    # dkv: per pair q, do, q segment ids, lse, di; per key block keys, values, dk, dv, kv segment ids
    return flops, pairs * (2 * q_tile + 3 * sublanes(bq)) + kv_blocks * (4 * kv_tile + lanes(bkv))


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, t: int, s: int, interpret: bool) -> splash.SplashAttentionKernel:
    """One row's kernel: q `[K·G, T, H]`, keys `[K, H, S]`, values `[K, S, H]`, T and S whole blocks,
    the queries the last T of the S keys."""
    bq, bkv = block_size(t), block_size(s)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, s), offset=s - t)] * heads)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
                              k_layout=splash.QKVLayout.SEQ_MINOR)
    with jax.ensure_compile_time_eval():  # the mask's block tables: constants, not a caller's tracers
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array, offset: int,
                  mesh: Mesh | None, interpret: bool = False) -> jax.Array:
    """Causal softmax attention of q `[N, T, K, G, H]` (at key slots offset…) over keys `[N, K, H, S]`
    and values `[N, K, S, H]` (only the first offset+T are read), kv_mask `[N, S]` -> `[N, T, K, G, H]`.

    On a mesh each device runs the kernel on its rows and kv heads (shard_map): the kernel is one
    device's program, so XLA cannot partition it. `interpret` runs the kernel's Python on any platform
    (the tests, on CPU).
    """
    n, t, kv_heads, g, dh = q.shape
    s = offset + t
    tp, sp = padded(t), padded(s)
    # Padding goes in front: the queries stay the last of the keys, so the kernel's mask and cost
    # follow from the padded lengths alone. Padded slots are segment 0, as left padding is.
    pad = lambda x, axis, to: jnp.pad(x, [(to - x.shape[axis] if a == axis else 0, 0) for a in range(x.ndim)])
    q = q * jnp.asarray(1 / math.sqrt(dh), q.dtype)  # the kernel does not scale
    q = pad(q.transpose(0, 2, 3, 1, 4).reshape(n, kv_heads * g, t, dh), 2, tp)  # [N, K·G, T', H]
    # The kernel's interface is head-dim-minor; told the keys lie sequence-minor (k_layout), the
    # transpose is a layout of the operand XLA hands it, not a copy.
    k, v = pad(k[..., :s].swapaxes(2, 3), 2, sp), pad(v[:, :, :s], 2, sp)
    kv_segment = pad(kv_mask[:, :s].astype(jnp.int32), 1, sp)
    q_segment = pad(kv_mask[:, offset:s].astype(jnp.int32), 1, tp)

    def rows(q, k, v, q_segment, kv_segment):
        kernel = _kernel(q.shape[1], tp, sp, interpret)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_segment, kv_segment))

    if mesh is not None:
        head_spec = mesh_lib.logical_spec(("batch", "kv_heads", None, None), k.shape, mesh)
        segment_spec = P(head_spec[0], None)
        rows = jax.shard_map(rows, mesh=mesh, in_specs=(head_spec,) * 3 + (segment_spec,) * 2,
                             out_specs=head_spec, check_vma=False)
    out = rows(q, k, v, q_segment, kv_segment)[:, :, tp - t:]  # [N, K·G, T, H]
    return out.reshape(n, kv_heads, g, t, dh).transpose(0, 3, 1, 2, 4)


@functools.lru_cache(maxsize=None)
def _decode_kernel(heads: int, t: int, s: int, interpret: bool) -> splash.SplashAttentionKernel:
    """One row's forward-only kernel without a causal mask, returning its log-sum-exp: q `[heads, T, H]`
    (T one block) over keys `[K, H, S]` and values `[K, S, H]`, S whole blocks."""
    bq, bkv = query_block(t), block_size(s)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((t, s))] * heads)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, k_layout=splash.QKVLayout.SEQ_MINOR)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      save_residuals=True, interpret=interpret)


def _attend_once(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, mesh: Mesh | None,
                 interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Queries that see the same keys, each set of keys read once a kv head: q `[N', K, Q, H]` (scaled)
    over keys `[N', K, H, S]`, values `[N', K, S, H]` where `valid [N', S]` -> out `[N', K, Q, H]` and its
    log-sum-exp `[N', K, Q]` (float32). More than MAX_BLOCK queries are split into query heads of a block
    each, which share their kv head (the kernel's grouped-query heads)."""
    n, kv_heads, queries, dh = q.shape
    chunks = -(-queries // MAX_BLOCK)
    t = query_block(-(-queries // chunks))
    s = padded(k.shape[-1])
    pad = lambda x, axis, to: jnp.pad(x, [(to - x.shape[axis] if a == axis else 0, 0) for a in range(x.ndim)])
    q = jnp.pad(q, ((0, 0), (0, 0), (0, chunks * t - queries), (0, 0))).reshape(n, kv_heads * chunks, t, dh)
    k, v = pad(k, 3, s).swapaxes(2, 3), pad(v, 2, s)  # the kernel reads the keys sequence-minor, as they lie
    kv_segment = pad(valid.astype(jnp.int32), 1, s)

    def rows(q, k, v, kv_segment):
        kernel = _decode_kernel(q.shape[1], t, s, interpret)
        q_segment = jnp.ones((q.shape[0], t), jnp.int32)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q_segment, kv_segment))

    if mesh is not None:
        head_spec = mesh_lib.logical_spec(("batch", "kv_heads", None, None), k.shape, mesh)
        rows = jax.shard_map(rows, mesh=mesh, in_specs=(head_spec,) * 3 + (P(head_spec[0], None),),
                             out_specs=(head_spec, (P(*head_spec[:3]),)), check_vma=False)
    out, (lse,) = rows(q, k, v, kv_segment)
    unchunk = lambda x: x.reshape((n, kv_heads, chunks * t) + x.shape[3:])[:, :, :queries]
    return unchunk(out), unchunk(lse)


def splash_decode(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, prefix, prefix_valid: jax.Array | None,
                  mesh: Mesh | None, interpret: bool = False) -> jax.Array:
    """One decode step's attention: q `[N, 1, K, G, H]` over the rows' own keys `[N, K, H, S]` and values
    `[N, K, S, H]` where `valid [N, S]`, and over a `prefix` (a LayerCache of `[N/n, ...]`, shared by
    groups of n rows, where `prefix_valid [N/n, P]`; or None) -> `[N, 1, K, G, H]`.

    A kv head's G query heads are the kernel's queries, so each row's cache is read once a kv head (as
    XLA's dot against the cache did not: sqlm_jax.step_time); the n rows of a group are the queries
    against their shared prefix, read once a group. The two softmaxes are merged by their
    log-sum-exps. The slots read are all S: the caller keeps S near the filled length (the static
    sampler's segments).
    """
    n, _, kv_heads, g, dh = q.shape
    q = q[:, 0] * jnp.asarray(1 / math.sqrt(dh), q.dtype)  # [N, K, G, H]
    out, lse = _attend_once(q, k, v, valid, mesh, interpret)
    if prefix is not None:
        groups = prefix.k.shape[0]
        grouped = q.reshape(groups, n // groups, kv_heads, g, dh).transpose(0, 2, 1, 3, 4)
        p_out, p_lse = _attend_once(grouped.reshape(groups, kv_heads, -1, dh), prefix.k.astype(q.dtype),
                                    prefix.v.astype(q.dtype), prefix_valid, mesh, interpret)
        ungroup = lambda x: jnp.moveaxis(x.reshape((groups, kv_heads, n // groups, g) + x.shape[3:]), 2, 1
                                         ).reshape((n, kv_heads, g) + x.shape[3:])
        p_out, p_lse = ungroup(p_out), ungroup(p_lse)
        top = jnp.maximum(lse, p_lse)
        w, p_w = jnp.exp(lse - top), jnp.exp(p_lse - top)
        out = ((out.astype(jnp.float32) * w[..., None] + p_out.astype(jnp.float32) * p_w[..., None])
               / (w + p_w)[..., None]).astype(q.dtype)
    return out[:, None]  # [N, 1, K, G, H]
