"""A decode step's MLP and vocabulary matmuls on a mesh, their weights split for sampling on the width
a decode step does not contract (Megatron's column / row split; mesh.SAMPLING_RULES): each chip
gathers the rows' one position (`[N, D]`, a few MiB) and multiplies its slice of the weight.

In the training layout these weights are split on D, which a decode step contracts: every chip's
`[N, 2F]` partial sums were written, all-reduced and read again, the largest part of a decode step's
bytes after the cache (tpu/README.md). Constraints alone did not hold XLA to this plan (it gathered
whole weights every step instead), so these are `shard_map`s.

Shapes: the package's alphabet (sqlm_jax/__init__.py); F the MLP width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sqlm_jax import mesh as mesh_lib

def split_axes(logical: str, size: int, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a sampler splits a `logical` width ("mlp", "vocab") of `size` over, () where they do
    not divide it."""
    spec = mesh_lib.logical_spec((logical,), (size,), mesh, mesh_lib.SAMPLING_RULES)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def applies(logical: str, size: int, mesh: Mesh | None) -> bool:
    """Whether a decode step's matmul over `logical` runs split: on a mesh that splits it."""
    return mesh is not None and bool(split_axes(logical, size, mesh))


def _rows(x: jax.Array, axes: tuple[str, ...], mesh: Mesh):
    """x's rows spec, and of the weight's split `axes`: those that split the rows too, and the rest."""
    rows = mesh_lib.logical_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    split = () if rows[0] is None else (rows[0],) if isinstance(rows[0], str) else tuple(rows[0])
    gathered = tuple(a for a in split if a in axes)
    return rows, gathered, tuple(a for a in axes if a not in gathered)


def _spec(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def mlp_step(x: jax.Array, gate_up: jax.Array, down: jax.Array, gated, mesh: Mesh) -> jax.Array:
    """`x [N, D]` (rows split over the batch axes where they divide) through `gate_up [D, 2, F]` and
    `down [F, D]` (split on F) -> `[N, D]`, rows split as they came; `gated` maps `[M, 2, F'] -> [M, F']`."""
    axes = split_axes("mlp", down.shape[0], mesh)
    rows, gathered, summed = _rows(x, axes, mesh)

    def local(x, gate_up, down):
        if gathered:
            x = jax.lax.all_gather(x, gathered, axis=0, tiled=True)
        partial = gated(jnp.einsum("md,dkf->mkf", x, gate_up)) @ down  # [M, D] from this chip's F slice
        if summed:
            partial = jax.lax.psum(partial, summed)
        return jax.lax.psum_scatter(partial, gathered, scatter_dimension=0, tiled=True) if gathered else partial

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(None, None, _spec(axes)), P(_spec(axes), None)),
                         out_specs=rows, check_vma=False)(x, gate_up, down)


def logits_step(x: jax.Array, table: jax.Array, mesh: Mesh) -> jax.Array:
    """`x [N, D]` against a vocabulary `table [V, D]` split on V -> float32 logits `[N, V]`, rows split as
    they came: each chip scores the gathered rows against its V slice, and the slices are exchanged so
    each chip holds its rows' whole vocabulary."""
    axes = split_axes("vocab", table.shape[0], mesh)
    rows, gathered, rest = _rows(x, axes, mesh)

    def local(x, table):
        if gathered:
            x = jax.lax.all_gather(x, gathered, axis=0, tiled=True)
        out = jnp.einsum("md,vd->mv", x, table).astype(jnp.float32)  # [M, V'], this chip's V slice
        if rest:  # V is split rows-axes-major: the minor axes' slices first make one contiguous block
            out = jax.lax.all_gather(out, rest, axis=1, tiled=True)
        if gathered:  # rows back to their chips, each with the blocks of the chips that gathered them
            out = jax.lax.all_to_all(out, gathered, split_axis=0, concat_axis=1, tiled=True)
        return out

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(_spec(axes), None)), out_specs=rows,
                         check_vma=False)(x, table)


def embed_step(ids: jax.Array, table: jax.Array, mesh: Mesh) -> jax.Array:
    """The rows' token ids `[N]` looked up in a vocabulary `table [V, D]` split on V -> `[N, D]`, rows
    split as they came: each chip looks up the ids in its V slice, zeros elsewhere, summed over chips."""
    axes = split_axes("vocab", table.shape[0], mesh)
    rows, gathered, summed = _rows(ids, axes, mesh)

    def local(ids, table):
        if gathered:
            ids = jax.lax.all_gather(ids, gathered, axis=0, tiled=True)
        first = jax.lax.axis_index(axes) * table.shape[0]  # this chip's first token id
        mine = (ids >= first) & (ids < first + table.shape[0])
        out = jnp.where(mine[:, None], table[jnp.clip(ids - first, 0, table.shape[0] - 1)], 0)
        if summed:
            out = jax.lax.psum(out, summed)
        return jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True) if gathered else out

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(_spec(axes), None)),
                         out_specs=P(*rows, None), check_vma=False)(ids, table)


def lookup(table: jax.Array, input_ids: jax.Array, mesh: Mesh | None, rows) -> jax.Array:
    """`input_ids [N, T]` looked up in `table [V, D]` -> `[N, T, D]`: a decode step's (T = 1) by
    `embed_step` where the sampler splits V, else gathered whole and pinned by `rows`."""
    if input_ids.shape[1] == 1 and applies("vocab", table.shape[0], mesh):
        return embed_step(input_ids[:, 0], table, mesh)[:, None]
    return rows(table[input_ids])
