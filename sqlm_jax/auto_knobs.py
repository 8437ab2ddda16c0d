"""Memory knobs chosen for the user: `rl.micro_batch_size = -1` and `rollout.rows_in_flight = -1`
("auto", the paper configs' defaults) become the largest values that fit the devices. Both are pure
memory knobs: the micro-batch is exact gradient accumulation and the loss's weights come from the
mini-batch (train_step.loss_weights); rows in flight never change a token (sqlm_jax.refill). The
method's batch (rollout.batch_size, n, lengths, rl.mini_batch_size) is never touched. -1, not a
string, so the fields keep their int type and `--config.rl.micro_batch_size=8` and `=-1` both work
from the command line.

Two judges of "fits". The memory plan (sqlm_jax.plan) is an estimate, calibrated against XLA's CPU
compiler; on TPU it is low by a quarter (tpu/README.md). Where the TPU compiler is at hand (a TPU run,
or `plan --compile` with libtpu), it has the last word: from the plan's pick downwards, each candidate
is compiled (aot.CompiledJudge) until one fits, and after a miss the search skips the candidates that
the plan, scaled by the compiler's figure over its own at the miss, still puts over the limit. Each
miss costs one compile (minutes on a small host, under a minute on a TPU VM).
"""
from __future__ import annotations

from typing import Callable, Mapping

from sqlm_jax import plan as plan_lib

AUTO = -1


def resolve(config, model_cfg, mesh_shape: Mapping[str, int], device_bytes: int,
            compiled: Callable[[object, str], int] | None = None):
    """A copy of `config` with each auto knob set: the largest candidate that fits, or the smallest
    when none does (plan.check_fits then says what else to change). `compiled(config, phase)`: the
    TPU compiler's bytes per chip for the phase, with `compiled.limit` the most that fits; without it
    the plan judges alone against `device_bytes`.

    Micro-batches: the divisors of a mini-batch's sequences that are multiples of the batch devices
    (data × fsdp). Rows in flight: 0 (every row at once) first, then batch devices × 2^k below the
    largest sampler call's rows.
    """
    c = config.copy_and_resolve_references()
    devices = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    usable = plan_lib.usable_bytes(device_bytes)
    planned = lambda phase: lambda: plan_lib.memory_plan(c, model_cfg, mesh_shape).during(phase)
    searches = []
    if c.rl.micro_batch_size == AUTO:
        sequences = c.rl.mini_batch_size * c.rollout.n
        sizes = [m for m in range(sequences, 0, -1) if sequences % m == 0 and m % devices == 0] or [sequences]
        searches.append((c.rl, "micro_batch_size", sizes, "training"))
    if c.rollout.rows_in_flight == AUTO:
        c.rollout.rows_in_flight = 0
        rows = max(calls[1] for calls in plan_lib.sampling_calls(c).values())
        budgets = [0] + [devices << k for k in range(rows.bit_length(), -1, -1) if devices << k < rows]
        searches.append((c.rollout, "rows_in_flight", budgets, "sampling"))
    for section, field, candidates, phase in searches:
        bytes_of = planned(phase)
        _largest(section, field, candidates, lambda: bytes_of() <= usable)
        if compiled is not None:
            _largest_compiled(section, field, candidates, bytes_of, lambda: compiled(c, phase), compiled.limit)
    return c


def _largest(section, field: str, candidates: list[int], fits) -> None:
    """Sets `section[field]` to the first of `candidates` (largest first) for which `fits()`."""
    for value in candidates:
        section[field] = value
        if fits():
            return


def _largest_compiled(section, field: str, candidates: list[int], planned, compiled, limit: int) -> None:
    """From `section[field]` (the plan's pick) down `candidates` to the first the compiler fits; after
    a miss, past those whose plan × (compiled / planned at the miss) is still over `limit`."""
    i = candidates.index(section[field])
    while True:
        section[field] = candidates[i]
        measured = compiled()
        if measured <= limit or i == len(candidates) - 1:
            return
        ratio = measured / planned()
        i += 1
        while i < len(candidates) - 1:
            section[field] = candidates[i]
            if planned() * ratio <= limit:
                break
            i += 1
