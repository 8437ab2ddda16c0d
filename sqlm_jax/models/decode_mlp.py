"""A decode step's MLP on a mesh, with its weights split on F for sampling (Megatron's column / row
split): each chip gathers the rows' one position (`[N, D]`, a few MiB), multiplies its F slice of
both weights, and the `[N, D]` partial sums are summed back onto the rows' chips.

In the training layout the weights are split on D, which a decode step contracts: every chip's
`[N, 2F]` partial sums were written, all-reduced and read again, the largest part of a decode step's
bytes after the cache (tpu/README.md). Constraints alone did not hold XLA to this plan (it gathered the
whole weight every step instead), so it is a `shard_map`.

Shapes: the package's alphabet (sqlm_jax/__init__.py); F the MLP width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sqlm_jax import mesh as mesh_lib

def f_axes(f: int, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a sampler splits F over (mesh.SAMPLING_RULES), () where they do not divide it."""
    spec = mesh_lib.logical_spec(("mlp",), (f,), mesh, mesh_lib.SAMPLING_RULES)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def applies(f: int, mesh: Mesh | None) -> bool:
    """Whether a decode step's MLP runs split on F: on a mesh that splits it."""
    return mesh is not None and bool(f_axes(f, mesh))


def mlp_step(x: jax.Array, gate_up: jax.Array, down: jax.Array, gated, mesh: Mesh) -> jax.Array:
    """`x [N, D]` (rows split over the batch axes where they divide) through `gate_up [D, 2, F]` and
    `down [F, D]` (split on F as `f_axes` says) -> `[N, D]`, rows split as they came; `gated` maps
    `[M, 2, F'] -> [M, F']`."""
    axes = f_axes(down.shape[0], mesh)
    rows = mesh_lib.logical_spec(("batch", None), x.shape, mesh)
    split = () if rows[0] is None else (rows[0],) if isinstance(rows[0], str) else tuple(rows[0])
    gathered = tuple(a for a in split if a in axes)  # F's axes that also split the rows
    summed = tuple(a for a in axes if a not in gathered)

    def local(x, gate_up, down):
        if gathered:
            x = jax.lax.all_gather(x, gathered, axis=0, tiled=True)
        partial = gated(jnp.einsum("md,dkf->mkf", x, gate_up)) @ down  # [M, D] from this chip's F slice
        if summed:
            partial = jax.lax.psum(partial, summed)
        return jax.lax.psum_scatter(partial, gathered, scatter_dimension=0, tiled=True) if gathered else partial

    f_spec = axes[0] if len(axes) == 1 else axes
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(None, None, f_spec), P(f_spec, None)),
                         out_specs=rows, check_vma=False)(x, gate_up, down)
