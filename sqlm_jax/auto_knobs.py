"""Memory knobs chosen for the user: `rl.micro_batch_size = -1` and `rollout.rows_in_flight = -1`
("auto", the paper configs' defaults) become the largest values whose memory plan (sqlm_jax.plan) fits
the devices. Both are pure memory knobs: the micro-batch is exact gradient accumulation and the loss's
weights come from the mini-batch (train_step.loss_weights); rows in flight never change a token
(sqlm_jax.refill). The method's batch (rollout.batch_size, n, lengths, rl.mini_batch_size) is never
touched. -1, not a string, so the fields keep their int type and `--config.rl.micro_batch_size=8` and
`=-1` both work from the command line.
"""
from __future__ import annotations

from typing import Mapping

from sqlm_jax import plan as plan_lib

AUTO = -1


def resolve(config, model_cfg, mesh_shape: Mapping[str, int], device_bytes: int):
    """A copy of `config` with each auto knob set: the largest candidate whose plan fits `device_bytes`
    per device, or the smallest when none does (plan.check_fits then says what else to change).

    Micro-batches: the divisors of a mini-batch's sequences that are multiples of the batch devices
    (data × fsdp). Rows in flight: 0 (every row at once) first, then batch devices × 2^k below the
    largest sampler call's rows.
    """
    c = config.copy_and_resolve_references()
    devices = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    usable = plan_lib.usable_bytes(device_bytes)
    fits = lambda phase: lambda: plan_lib.memory_plan(c, model_cfg, mesh_shape).during(phase) <= usable
    if c.rl.micro_batch_size == AUTO:
        sequences = c.rl.mini_batch_size * c.rollout.n
        sizes = [m for m in range(sequences, 0, -1) if sequences % m == 0 and m % devices == 0] or [sequences]
        _largest(c.rl, "micro_batch_size", sizes, fits("training"))
    if c.rollout.rows_in_flight == AUTO:
        c.rollout.rows_in_flight = 0
        rows = max(calls[1] for calls in plan_lib.sampling_calls(c).values())
        budgets = [0] + [devices << k for k in range(rows.bit_length(), -1, -1) if devices << k < rows]
        _largest(c.rollout, "rows_in_flight", budgets, fits("sampling"))
    return c


def _largest(section, field: str, candidates: list[int], fits) -> None:
    """Sets `section[field]` to the first of `candidates` (largest first) for which `fits()`."""
    for value in candidates:
        section[field] = value
        if fits():
            return
