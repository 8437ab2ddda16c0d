"""The device mesh (axes data, fsdp, tensor), logical-axis rules, and sharding helpers.

Model weights carry logical axis names (`axes` metadata, see models/transformer.py); the rules table
below maps them to mesh axes. The same code runs on one CPU, 8 fake CPU devices and a TPU pod: with no
mesh (or a one-device mesh) every helper here is a no-op.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). Batch splits over data and fsdp; weights over fsdp and tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


class MeshError(ValueError):
    """The requested mesh cannot be formed from the devices present."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{data, fsdp, tensor}` sizes (one may be -1, "the rest") against `num_devices`."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh sizes {dict(zip(AXES, shape))}: use positive sizes and at most one -1")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"{num_devices} devices cannot be split into mesh {dict(zip(AXES, shape))}: "
                            f"the fixed axes multiply to {fixed}, which does not divide {num_devices}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise MeshError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but "
                        f"{num_devices} are present; set one axis to -1 to use all of them")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts) with axes (data, fsdp, tensor).

    Axes are `Auto`: shardings are declared on inputs and weights and XLA propagates the rest.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes or {"fsdp": -1}, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for a tensor with logical `axes`; a dim its mesh axes do not divide stays whole."""
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        target = table.get(name) if name else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if not targets or dim % math.prod(mesh.shape[t] for t in targets):
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh | None, rules=DEFAULT_RULES) -> nnx.State:
    """A NamedSharding per variable of `state` (from its `axes` metadata); one device when no mesh."""
    if mesh is None:
        mesh = make_mesh({"data": 1}, jax.devices()[:1])

    def one(v):
        axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_spec(axes, v.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sampling_weights(state: nnx.State, dtype) -> nnx.State:
    """Inside jit: the floating weights in the compute `dtype`, once per sampler call: cast inside the
    decode step, each step read every float32 weight, wrote its bfloat16 copy and read that
    (sqlm_jax.step_time, algebra on a v5e-8). Their layout stays the training one (tpu/README.md: a
    sampling layout split on the MLP's width, tried, moved more bytes by XLA's count)."""
    def one(v):
        x = v[...]
        return v.replace(x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def row_sharding(mesh: Mesh | None, shape: Sequence[int], row_axis: int = 0) -> NamedSharding | None:
    """Sharding of an array whose axis `row_axis` holds rows: rows over the batch axes (data, fsdp)
    where they divide evenly, every other axis whole. None without a mesh."""
    if mesh is None:
        return None
    axes = [None] * len(shape)
    axes[row_axis] = "batch"
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def shard_rows(tree, mesh: Mesh | None, row_axis: int = 0):
    """Every array of `tree` on the device(s), rows split as `row_sharding` says: the one way a batch
    goes onto the mesh (host arrays in, device arrays out)."""
    return jax.tree.map(lambda x: jax.device_put(x, row_sharding(mesh, np.shape(x), row_axis)), tree)


def constrain_rows(tree, mesh: Mesh | None, row_axis: int = 0):
    """Inside jit: pins every array of `tree` to `row_sharding` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, row_sharding(mesh, x.shape, row_axis)), tree)


def whole_over_batch_axes(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Inside jit: `x` (a weight with logical `axes`) gathered whole over the batch axes (data, fsdp) and
    still split over tensor as the rules place it, as FSDP multiplies a layer (no-op without a mesh)."""
    if mesh is None:
        return x
    batch = {"data", "fsdp"}
    drop = lambda entry: (entry if entry is None or isinstance(entry, str) and entry not in batch else
                          None if isinstance(entry, str) else tuple(a for a in entry if a not in batch) or None)
    spec = P(*(drop(entry) for entry in logical_spec(axes, x.shape, mesh)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, P())


def gather(x: jax.Array) -> jax.Array | np.ndarray:
    """The whole of `x` on this host (across hosts where it is not fully addressable here)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return x
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)


def to_host(tree):
    """Every array of `tree` as a numpy array holding its whole value, on every host."""
    return jax.tree.map(lambda x: np.asarray(gather(x)), tree)
