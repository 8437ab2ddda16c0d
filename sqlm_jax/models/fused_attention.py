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


def padded(length: int) -> int:
    """`length` rounded up to whole blocks."""
    block = block_size(length)
    return -(-length // block) * block


def visited_blocks(t: int, s: int) -> int:
    """(query block, key block) pairs the kernel computes for T queries that are the last of S keys
    (T and S whole blocks, bottom-right causal): those with a key at or before one of their queries."""
    bq, bkv = block_size(t), block_size(s)
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
    query blocks stream past. Per-position float32 statistics (log-sum-exp, the dq kernel's row sums)
    and segment ids are stored broadcast over the TPU's 128 lanes, as the kernel lays them out.
    """
    bq, bkv = block_size(t), block_size(s)
    pairs = rows * heads * visited_blocks(t, s)
    flops = pairs * MATMULS[kind] * 2 * bq * bkv * head_dim
    kv_block = 2 * bkv * head_dim * itemsize + bkv * LANES * 4  # keys, values, segment ids
    stats = bq * LANES * 4
    if kind == "fwd":  # q, out, log-sum-exp per query block
        per_query_block = 2 * bq * head_dim * itemsize + stats
        return flops, pairs * kv_block + rows * heads * (t // bq) * per_query_block
    if kind == "dq":  # q, do, dq, log-sum-exp, row sums per query block
        per_query_block = 3 * bq * head_dim * itemsize + 2 * stats
        return flops, pairs * kv_block + rows * heads * (t // bq) * per_query_block
    q_block = 2 * bq * head_dim * itemsize + 2 * stats  # q, do, log-sum-exp, row sums per pair
    return flops, pairs * q_block + rows * heads * (s // bkv) * (kv_block + 2 * bkv * head_dim * itemsize)


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
