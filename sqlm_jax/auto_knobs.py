"""Memory knobs chosen for the user: `rl.micro_batch_size = -1` and `rollout.rows_in_flight = -1`
("auto", the paper configs' defaults) become the largest values that fit the devices. Both are pure
memory knobs: the micro-batch is exact gradient accumulation and the loss's weights come from the
mini-batch (train_step.loss_weights); rows in flight never change a token (sqlm_jax.refill). The
method's batch (rollout.batch_size, n, lengths, rl.mini_batch_size) is never touched. -1, not a
string, so the fields keep their int type and `--config.rl.micro_batch_size=8` and `=-1` both work
from the command line.

Two judges of "fits". The memory plan (sqlm_jax.plan) is an estimate, calibrated against XLA's CPU
compiler; on TPU it is low by a quarter to a half (tpu/README.md). Where the TPU compiler is at hand
(a TPU run, or `plan --compile` with libtpu), it has the last word (aot.CompiledJudge): the smallest
candidate is compiled, then the largest that the compiler's figures so far, extrapolated along the
plan's, put within the limit, narrowing till no candidate is left between the largest known to fit
and the smallest known not to; usually one to three compiles (minutes each on a small host, about a
minute on a TPU VM).
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
        if compiled is None:
            _largest(section, field, candidates, lambda: bytes_of() <= usable)
        else:
            _largest_compiled(section, field, candidates, bytes_of, lambda: compiled(c, phase), compiled.limit)
    return c


def _largest(section, field: str, candidates: list[int], fits) -> None:
    """Sets `section[field]` to the first of `candidates` (largest first) for which `fits()`."""
    for value in candidates:
        section[field] = value
        if fits():
            return


def _largest_compiled(section, field: str, candidates: list[int], planned, compiled, limit: int) -> None:
    """Sets `section[field]` to the largest of `candidates` (largest first) whose compiled figure fits
    `limit`. The smallest is compiled first (a program over the chip is the slow one to compile, XLA
    trying to fit it); then, each time, the largest candidate between the largest known to fit and the
    smallest known not to that the compiler's figures, extrapolated along the plan's, put within the
    limit, till none is left between them. Each candidate is compiled at most once; what it returns
    always fits, though a bent line may leave a larger fitting candidate untried."""
    def plan_of(i: int) -> int:
        section[field] = candidates[i]
        return planned()

    def measure(i: int) -> None:
        x = plan_of(i)
        seen.append((x, compiled()))

    def predicted(x: int) -> float:
        """The compiler's figure at plan figure x, along the line through the last two measurements
        (a part the plan misses whatever the knob, and its share of what grows with it); after the
        first, the plan's growth added to that figure."""
        (x1, y1), (x2, y2) = seen[-1], seen[-2] if len(seen) > 1 else seen[-1]
        slope = (y1 - y2) / (x1 - x2) if x1 != x2 else 1.0
        return y1 + (x - x1) * (slope if slope > 0 else 1.0)

    seen: list[tuple[int, int]] = []
    fits, over = len(candidates) - 1, -1
    measure(fits)
    while seen[-1][1] <= limit or over >= 0:  # not when even the smallest is over: nothing fits
        guess = next((i for i in range(over + 1, fits) if predicted(plan_of(i)) <= limit), None)
        if guess is None:
            break
        measure(guess)
        fits, over = (guess, over) if seen[-1][1] <= limit else (fits, guess)
    section[field] = candidates[fits]
