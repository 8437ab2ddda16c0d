"""`python -m sqlm_jax.plan --config=FILE [--mesh=...] [--accelerator=SLICE] [--compile [--step_time]] [--json=PATH]`

The per-device memory plan of a config (sqlm_jax.plan); with `--compile`, the TPU compiler's own
account of every program of a step, compiled for the slice without one (sqlm_jax.aot), beside the
plan's estimate; with `--step_time` too, a step's projected seconds and roofline ratios by the
compiler's cost model (sqlm_jax.step_time). Exit 1 when the run does not fit, with what to change.
"""
from __future__ import annotations

import json
import math
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sqlm_jax import auto_knobs, plan
from sqlm_jax import mesh as mesh_lib
from sqlm_jax.device_memory import GiB, accelerator_bytes, local_device_bytes, parse_accelerator

# --compile's verdict keeps this share of XLA's usable HBM to spare: XLA's figures are exact for the
# program, but the runtime adds buffers of its own (transfers, the host's batches in flight).
COMPILED_SPARE = 0.05


def parse_mesh(text: str) -> dict[str, int]:
    """`data=1,fsdp=4,tensor=2` -> {"data": 1, "fsdp": 4, "tensor": 2} (-1: the devices left over)."""
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part)}
    except ValueError:
        raise mesh_lib.MeshError(f"--mesh={text!r}: write it as data=1,fsdp=4,tensor=2") from None


def compiled_report(config, judge, family: str, estimate: plan.Plan, only: list[str] | None = None
                    ) -> tuple[str, dict]:
    """The compiled programs' table (GiB per chip) and the --json object; `only`: these programs."""
    from sqlm_jax import aot
    names = [name for name, *_ in aot.AbstractRun.build(config, judge.model_config, judge.devices).programs()]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"--programs: no program {unknown}; the programs are {names}")
    programs = judge.programs(config, only)
    devices, usable, limit = judge.devices, judge.usable, judge.limit
    planned = lambda p: estimate.during(p.phase)
    lines = [f"Compiled for {len(devices)} {family} chip(s) by XLA's TPU compiler, GiB per chip "
             f"(usable {usable / GiB:.2f}; fits with {COMPILED_SPARE:.0%} to spare: <= {limit / GiB:.2f})",
             f"{'program':<24}{'args':>7}{'outs':>7}{'temps':>7}{'code':>6}{'beside':>8}{'total':>8}"
             f"{'plan':>8}{'plan/XLA':>9}  verdict"]
    for p in programs:
        lines.append(f"{p.name:<24}{p.arguments / GiB:7.2f}{p.outputs / GiB:7.2f}{p.temporaries / GiB:7.2f}"
                     f"{p.code / GiB:6.2f}{p.outside / GiB:8.2f}{p.total / GiB:8.2f}{planned(p) / GiB:8.2f}"
                     f"{planned(p) / p.total:9.2f}  {'fits' if p.total <= limit else 'does NOT fit'}"
                     f"{' (XLA refused it: temporaries alone over the chip)' if p.exhausted else ''}")
    fits = all(p.total <= limit for p in programs)
    record = {"fits": fits, "usable_bytes": usable, "limit_bytes": limit, "accelerator": family,
              "chips": len(devices), "mesh": dict(config.mesh),
              "knobs": {"rl.micro_batch_size": config.rl.micro_batch_size,
                        "rollout.rows_in_flight": config.rollout.rows_in_flight},
              "programs": [{"name": p.name, "phase": p.phase, "total_bytes": p.total, "plan_bytes": planned(p),
                            "argument_bytes": p.arguments, "output_bytes": p.outputs,
                            "temp_bytes": p.temporaries, "exhausted": p.exhausted, "code_bytes": p.code, "outside_bytes": p.outside,
                            "flops": p.flops, "bytes_accessed": p.bytes_accessed,
                            "compile_s": round(p.compile_s, 1)} for p in programs]}
    return "\n".join(lines), record


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing logs at INFO
    f = flags.FLAGS
    config = f.config
    if config is None:
        sys.exit("error: pass --config=configs/<experiment>.py")
    try:
        sizes = parse_mesh(f.mesh) if f.mesh else dict(config.mesh)
        family, chips = parse_accelerator(f.accelerator) if f.accelerator else (None, None)
        judge = None
        if f.compile:
            from sqlm_jax import aot
            family, devices = aot.slice_devices(f.accelerator or "")
            chips = len(devices)
        count = chips or f.num_devices
        if count is None:  # only -1 needs a device count; use this host's devices
            count = math.prod(sizes.values()) if -1 not in sizes.values() else jax.device_count()
        mesh_shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(sizes, count)))
        model_cfg = plan.load_model_config(config)
        budget = (accelerator_bytes(family, math.prod(mesh_shape.values())) if family is not None
                  else local_device_bytes())
        if f.compile:  # the TPU compiler judges the auto knobs (auto_knobs: from the smallest candidate up)
            config.mesh = mesh_shape
            judge = aot.CompiledJudge(model_cfg, devices, aot.usable_bytes(family), COMPILED_SPARE,
                                      log=lambda line: print(line, file=sys.stderr, flush=True),
                                      accelerator=f.accelerator)
        config = auto_knobs.resolve(config, model_cfg, mesh_shape, budget, judge)
        estimate = plan.memory_plan(config, model_cfg, mesh_shape)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(plan.format_plan(estimate))
    print(f"memory knobs: rl.micro_batch_size={config.rl.micro_batch_size}, rollout.rows_in_flight="
          f"{config.rollout.rows_in_flight} (0: all rows at once); the method's batch as configured")
    fits = True
    if family is not None:
        print(plan.fit_line(estimate, budget, family))
        fits = estimate.total <= plan.usable_bytes(budget)
    if judge is not None:
        try:
            table, record = compiled_report(config, judge, family, estimate,
                                            [p.strip() for p in f.programs.split(",")] if f.programs else None)
        except (ValueError, RuntimeError) as e:  # RuntimeError: a compiling process died
            sys.exit(f"error: {e}")
        print(table)
        fits = record["fits"]
        if f.step_time:
            from sqlm_jax import step_time
            timer = step_time.StepTime(config, model_cfg, judge.devices, f.accelerator,
                                       log=lambda line: print(line, file=sys.stderr, flush=True))
            table, record["step_time"] = step_time.step_table(timer.project())
            projected = {p["name"]: p for p in record["step_time"]["programs"]}
            for program in record["programs"]:
                program.update({k: projected[program["name"]][k] for k in ("projected_s", "ideal_s", "roofline_ratio")})
            print(f"Projected step time on {f.accelerator} (XLA's cost model, loop bodies x trip counts):\n{table}")
        if f.json:
            with open(f.json, "w") as out:
                json.dump(record, out, indent=1)
    if not fits:
        print(plan.advice(estimate, config))
        sys.exit(1)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
    flags.DEFINE_string("mesh", None, "mesh sizes, e.g. data=1,fsdp=4,tensor=2 (default: the config's)")
    flags.DEFINE_string("accelerator", None,
                        "v4 | v5e | v5p | v6e | h100 | h200 | cpu, or a TPU type such as v5p-32 "
                        "(its chip count then resolves a -1 mesh axis)")
    flags.DEFINE_integer("num_devices", None, "devices in the mesh, to resolve a -1 axis")
    flags.DEFINE_bool("compile", False, "also compile every program of a step for the TPU slice "
                      "--accelerator (e.g. v5e-8) with XLA's TPU compiler, no TPU needed "
                      "(pip install -e \".[aot]\"), and judge the fit by its figures")
    flags.DEFINE_string("programs", None, "with --compile: only these programs, comma-separated "
                        "(e.g. 'solver sampler,solver policy update'; default: every program of a step)")
    flags.DEFINE_string("json", None, "with --compile: write the compiled figures to this JSON file")
    flags.DEFINE_bool("step_time", False, "with --compile: also project a step's seconds on the slice "
                      "and each program's roofline ratio (sqlm_jax.step_time)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
