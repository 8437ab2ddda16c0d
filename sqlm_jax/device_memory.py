"""Memory per device of the accelerators the plan knows (sqlm_jax.plan): by name, and of this process's devices;
the model's parameter shapes (adapters included) and the bytes one device holds of a tensor sharded on a
(device-free) mesh."""
from __future__ import annotations

import functools
import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.lora import LoraSpec

GiB = 2 ** 30
# Memory per chip (per GPU). "cpu" is the host's RAM, shared by all of the host's devices.
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB,
             "h100": 80 * GiB, "h200": 141 * GiB}
# TPU accelerator-type prefix -> (family, TensorCores per chip): v4 and v5p type names count
# TensorCores (v4-8 is 4 chips), v5e and v6e count chips (v5litepod-8 is 8 chips).
_TPU_TYPES = {"v4": ("v4", 2), "v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v5p": ("v5p", 2),
              "v6e": ("v6e", 1)}


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_accelerator(name: str) -> tuple[str, int | None]:
    """`v5e`, `h100`, `cpu` -> (family, None); a TPU type `v4-8`, `v5litepod-8`, `v5p-32` -> (family, chips)."""
    key = name.strip().lower()
    if key in HBM_BYTES or key == "cpu":
        return key, None
    prefix, _, count = key.rpartition("-")
    if prefix in _TPU_TYPES and count.isdigit():
        family, cores_per_chip = _TPU_TYPES[prefix]
        return family, max(1, int(count) // cores_per_chip)
    raise ValueError(f"unknown accelerator {name!r}: use one of {', '.join([*HBM_BYTES, 'cpu'])} "
                     "or a TPU type such as v4-8, v5litepod-8, v5p-32, v6e-8")


def accelerator_bytes(family: str, num_devices: int) -> int:
    """Memory per device of `family`; on "cpu" the host RAM is shared by the mesh's devices."""
    return host_ram_bytes() // num_devices if family == "cpu" else HBM_BYTES[family]


def local_device_bytes(device: jax.Device | None = None) -> int:
    """Memory of one device of this process: the runtime's limit where it reports one, else the table."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return host_ram_bytes() // jax.local_device_count()
    kind = device.device_kind.lower()  # e.g. "TPU v5 lite", "TPU v4", "NVIDIA H100 80GB HBM3"
    for family, pattern in (("v5e", "v5 lite"), ("v6e", "v6"), ("v5p", "v5"), ("v4", "v4"),
                            ("h100", "h100"), ("h200", "h200")):
        if pattern in kind:
            return HBM_BYTES[family]
    raise ValueError(f"unknown device kind {device.device_kind!r}: pass the memory per device yourself")




def abstract_mesh(mesh_shape: Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh of the given axis sizes (missing axes are 1), for planning any slice size."""
    sizes = tuple(int(mesh_shape.get(a, 1)) for a in mesh_lib.AXES)
    if any(s < 1 for s in sizes):
        raise mesh_lib.MeshError(f"mesh {dict(mesh_shape)}: plan with explicit positive sizes "
                                 "(resolve -1 with mesh.mesh_shape first)")
    return AbstractMesh(sizes, mesh_lib.AXES)


def shard_bytes(shape: Sequence[int], axes: Sequence[str | None], itemsize: int, mesh) -> int:
    """Bytes one device holds of a `shape` tensor with logical `axes`, sharded as `logical_spec` does."""
    spec = mesh_lib.logical_spec(axes, shape, mesh)
    local = 1
    for dim, target in zip(shape, tuple(spec) + (None,) * len(shape)):
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        local *= dim // math.prod(mesh.shape[t] for t in targets)
    return local * itemsize


@functools.lru_cache(maxsize=8)  # auto_knobs plans one model many times
def param_layout(model_cfg: ModelConfig, lora_spec: LoraSpec | None = None
                 ) -> list[tuple[tuple[int, ...], tuple, np.dtype]]:
    """(shape, logical axes, dtype) of every parameter, or with `lora_spec` of the LoRA adapters
    alone, from an abstract model (nothing allocated)."""
    from flax import nnx
    from sqlm_jax.models.lora import add_adapters
    from sqlm_jax.models.transformer import Transformer

    def build():
        model = Transformer(model_cfg, rngs=nnx.Rngs(0))
        if lora_spec is not None:
            add_adapters(model, lora_spec, nnx.Rngs(0))
        return model

    variables = jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param if lora_spec is None else nnx.LoRAParam),
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(tuple(v.shape), v.get_metadata().get("axes") or (None,) * len(v.shape), np.dtype(v.dtype))
            for v in variables]


def weights_bytes(layout, mesh) -> int:
    """Per-device bytes of one copy of the parameters."""
    return sum(shard_bytes(shape, axes, dtype.itemsize, mesh) for shape, axes, dtype in layout)
