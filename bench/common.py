"""Helpers shared by the benchmark scripts: the bench model, timing, the matmul peak, the machine line.

Benchmarks here run on machines other jobs may load, so scripts alternate what they compare within one
run and report medians; `machine_line()` records the load average next to every table. Besides wall-clock
time, `timed` measures the CPU time of the whole process (all threads): on a loaded machine it still
counts the work done, while wall-clock time also counts the waits for a core.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models import ModelConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the tiny Qwen2-shaped bench model (defaults: 4.2M parameters, vocab 512, the shape
    bench/sampling.py uses)."""
    g = parser.add_argument_group("model")
    g.add_argument("--vocab", type=int, default=512)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--intermediate", type=int, default=1024)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)


def model_config(args: argparse.Namespace, **overrides) -> ModelConfig:
    """The bench model: Qwen2 layout (q/k/v biases, tied embeddings), float32."""
    fields = dict(architecture="Qwen2ForCausalLM", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                  num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, qkv_bias=True,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)
    return ModelConfig(**{**fields, **overrides})


def data_mesh() -> jax.sharding.Mesh:
    """Every local device on the data axis: weights replicated, rows split. On a CPU, one XLA device
    per core needs `XLA_FLAGS=--xla_force_host_platform_device_count=<cores>` (set before jax starts);
    by default the CPU is one device whose operations use all cores."""
    return mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def micro_batches(batch, micro_batch: int, mesh: jax.sharding.Mesh):
    """`[N, ...]` arrays -> `[M, micro_batch, ...]` on `mesh`, each micro-batch's rows split over the
    batch axes (the layout the Learner's compiled calls cut inside)."""
    split = jax.tree.map(lambda x: np.asarray(x).reshape((-1, micro_batch) + np.shape(x)[1:]), batch)
    return mesh_lib.shard_rows(split, mesh, row_axis=1)


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable, *args):
    """(result, wall-clock seconds, process CPU seconds) of `fn(*args)`, waiting for JAX arrays in the result."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


class Peak(NamedTuple):
    """A float32 matmul peak: FLOPs per wall-clock second, and per CPU second of the process."""

    per_second: float
    per_cpu_second: float


_square_matmul = jax.jit(lambda a: a @ a)


def matmul_peak_flops(size: int = 2048, calls: int = 3) -> Peak:
    """This machine's float32 matmul peak right now, from the fastest of `calls` jitted
    `[size, size] @ [size, size]` products (2·size³ FLOPs each; compiled once, the first call not timed)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    _square_matmul(a).block_until_ready()
    wall, cpu = min((timed(_square_matmul, a)[1:] for _ in range(calls)), key=lambda t: t[0])
    return Peak(2 * size ** 3 / wall, 2 * size ** 3 / cpu)


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """`lscpu`'s model name (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU model, cores, load average now, date, and the versions that matter."""
    load = os.getloadavg()[0]
    return (f"{cpu_model()}, {os.cpu_count()} cores, load average {load:.2f}; "
            f"{datetime.date.today().isoformat()}; jax {jax.__version__}, {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s)")
