"""Deviceless compile: a run's programs compiled by XLA's TPU compiler for a slice this host does not have.

    python -m sqlm_jax.plan --config=configs/algebra.py --accelerator=v5e-8 --compile

With libtpu installed (`pip install -e ".[aot]"`) the TPU compiler runs on any host, CPU-only ones
included (maxtext's train_compile.py does this for pretraining). The run is built from shapes alone:
the model's config.json (the shipped assets/model_configs cover the paper's models), abstract
parameters placed by the mesh rules on the slice's devices (`jax.experimental.topologies`), the
`Learner` of the run built on them (learner.build) and the samplers' knobs as `Rollouts` makes them.
Each program one self-play step runs is lowered with the run's own code and compiled; XLA's
`memory_analysis()` then gives what one chip holds while it runs: its arguments, outputs, temporaries
and code. The buffers that stay alive outside a program (the optimizer state while sampling, the
reference weights and the critic during the policy's update) are added from their shardings. That is
the figure the plan (sqlm_jax.plan) estimates and must agree with.

Nothing is allocated and nothing is downloaded; a 3B program takes minutes to compile on 2 cores.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import math
import multiprocessing
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import sampling
from sqlm_jax.device_memory import GiB, parse_accelerator
from sqlm_jax.learner import Learner
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.critic import Critic
from sqlm_jax.models.transformer import Transformer
from sqlm_jax.train_step import RoleBatch

# XLA's TPU limit per chip, below the HBM a chip has: what its compile errors name as the memory a
# program may use (v5e: "15.75G of 16.00G hbm").
XLA_RESERVED = 256 * 2 ** 20
# The topology API's names: a 2-D torus of chips (v5e, v6e) or a 3-D one of megacore chips (v4, v5p).
_TOPOLOGY = {"v5e": ("v5e", 2, "default"), "v6e": ("v6e", 2, "default"), "v4": ("v4", 3, "megacore"),
             "v5p": ("v5p", 3, "megacore")}


class AotUnavailable(RuntimeError):
    """libtpu is not installed, or the slice is not one the topology API knows."""


def topology_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The chips' torus as the topology API names it: 2-D 1x1, 2x2, 2x4, 4x4, 4x8 …; 3-D 2x2x1 (v4-8),
    2x2x2, 2x2x4, 2x4x4, 4x4x4 …: the smallest axis doubles, the last of equals first."""
    if chips < 1 or chips & (chips - 1):
        raise AotUnavailable(f"{chips} chips: the deviceless compile knows slices of a power of two chips")
    shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def slice_devices(accelerator: str) -> tuple[str, list]:
    """(chip family, the devices of the TPU slice `accelerator`, e.g. v5e-8, v4-8, v5litepod-16)."""
    family, chips = parse_accelerator(accelerator)
    if family not in _TOPOLOGY or chips is None:
        raise AotUnavailable(f"--accelerator={accelerator}: the deviceless compile needs a TPU slice such as "
                             "v5e-8, v4-8, v5e-1 or v5p-32")
    name, dims, chip_config = _TOPOLOGY[family]
    shape = topology_shape(chips, dims)
    if importlib.util.find_spec("libtpu") is None:
        raise AotUnavailable("the TPU compiler (libtpu) is not installed here; install it with "
                             "pip install -e \".[aot]\"")
    # Compiling touches no chip, so it may run beside another process that holds libtpu (a test
    # worker, a second compile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{name}:{'x'.join(map(str, shape))}", chip_config_name=chip_config,
            chips_per_host_bounds=tuple(min(s, 2) for s in shape[:2]) + (1,), num_slices=1,
            wrap=(False,) * 3)
    except Exception as e:  # the plugin failed to start: say how, in one line
        raise AotUnavailable(f"the TPU compiler did not start ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return family, list(topology.devices)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of the abstract arrays of `tree` (their shardings' shards)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _placed(state: nnx.State, mesh) -> nnx.State:
    """Abstract parameters with the shardings the mesh rules give them."""
    shardings = mesh_lib.param_shardings(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _rows(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.row_sharding(mesh, shape))


# What Learner.offloaded moves to host memory while the samplers run, and what Learner.update moves
# there while the other model of a run with a critic updates.
OFFLOADED = ("policy optimizer", "reference", "critic state")
AWAY_IN_UPDATE = {"policy update": ("critic state",), "critic update": ("policy params", "policy optimizer")}


@dataclasses.dataclass
class Program:
    """One compiled program of a step: its name, what one chip holds while it runs, and its cost."""

    name: str
    phase: str                   # sampling | training (the plan's phase it is checked against)
    arguments: int
    outputs: int
    temporaries: int
    code: int
    outside: int                 # the run's buffers alive beside it that are not its arguments
    flops: float
    bytes_accessed: float
    compile_s: float
    exhausted: bool = False      # XLA refused it for memory: temporaries are its figure, the rest unknown

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code + self.outside


@dataclasses.dataclass
class AbstractRun:
    """A run built from shapes: its mesh, Learner (policy, reference, critic) and samplers' knobs."""

    config: Any
    model_config: ModelConfig
    mesh: Any
    learner: Learner

    @classmethod
    def build(cls, config, model_cfg: ModelConfig, devices) -> "AbstractRun":
        mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
        def model():  # as models.hf.load_pretrained places it
            transformer = Transformer(model_cfg, rngs=nnx.Rngs(0))
            transformer.row_mesh = mesh
            return transformer

        graphdef, state = nnx.split(nnx.eval_shape(model))
        critic = None
        if config.rl.advantage == "gae":
            critic_graphdef, critic_state = nnx.split(nnx.eval_shape(lambda: Critic(model())))
            critic = critic_graphdef, _placed(critic_state, mesh)
        learner = Learner(config, mesh, graphdef, _placed(state, mesh), critic=critic)
        return cls(config, model_cfg, mesh, learner)

    # -------------------------------------------------------------------------------- what lives on
    def resident(self) -> dict[str, Any]:
        """The run's long-lived buffers: the policy's parameters and optimizer state, the frozen base
        (LoRA), the reference weights and the critic's TrainState."""
        learner, state = self.learner, self.learner.state
        return {"policy params": state.params, "policy optimizer": (state.step, state.opt_state),
                "frozen base": learner.frozen,
                "reference": None if learner.ref_params is learner.frozen else learner.ref_params,
                "critic state": learner.critic_state}

    def outside(self, phase: str, *passed: str, program: str = "") -> int:
        """Per-chip bytes of the resident buffers on the chips during `phase` (in `program`) that it does
        not take as arguments (rollout.offload_to_host: the sampler's neighbours wait in host memory,
        and with a critic, the other model's TrainState while one updates)."""
        offloaded = ()
        if self.config.rollout.offload_to_host and phase == "sampling":
            offloaded = OFFLOADED
        elif self.config.rollout.offload_to_host and self.learner.critic_state is not None:
            offloaded = next((away for kind, away in AWAY_IN_UPDATE.items() if program.endswith(kind)), ())
        return sum(per_chip_bytes(tree) for name, tree in self.resident().items()
                   if name not in passed and name not in offloaded)

    # ------------------------------------------------------------------------------------ programs
    def sampling_params(self, role: str) -> sampling.SamplingParams:
        r = self.config.rollout
        n = r.batch_size * r.n if role == "proposer" else r.n
        return sampling.SamplingParams(
            max_new_tokens=r.proposer_max_new_tokens if role == "proposer" else r.solver_max_new_tokens,
            temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p), n=n,
            stop_ids=tuple(np.atleast_1d(self.model_config.eos_token_id or 0).tolist()), pad_id=0,
            rows_in_flight=int(r.rows_in_flight))

    def _prompts(self, role: str) -> int:
        return 1 if role == "proposer" else self.config.rollout.batch_size * self.config.rollout.n

    def batch(self, role: str, rows: int | None = None) -> RoleBatch:
        """The role's batch as `Learner.role_batch` places it, its prompts at their longest (`rows`:
        that many of its rows, default all)."""
        r, params = self.config.rollout, self.sampling_params(role)
        rows, prompt = rows or self._prompts(role) * params.n, sampling.bucket_length(r.max_prompt_len)
        f32 = lambda: _rows(self.mesh, (rows, params.max_new_tokens), jnp.float32)
        return RoleBatch(
            prompt_ids=_rows(self.mesh, (rows, prompt), jnp.int32),
            prompt_mask=_rows(self.mesh, (rows, prompt), bool),
            response_ids=_rows(self.mesh, (rows, params.max_new_tokens), jnp.int32),
            response_mask=_rows(self.mesh, (rows, params.max_new_tokens), bool),
            advantages=f32(), old_logp=f32(), ref_logp=f32(), old_values=f32(), returns=f32(),
            prompt_group=self.learner.prompt_group(params.n))

    def programs(self) -> list[tuple[str, str, Callable[[], Any], tuple[str, ...]]]:
        """(name, phase, a thunk lowering it, the resident buffers it takes as arguments) for each
        program of a step: both samplers, both roles' log-prob passes, the updates."""
        learner, r = self.learner, self.config.rollout
        graphdef, policy = learner.policy
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=mesh_lib.replicated(self.mesh))
        policy_args = ("frozen base", "policy params")  # what the samplers and the passes read
        out = []
        for role in ("proposer", "solver"):
            params = self.sampling_params(role)
            prompts = (self._prompts(role), sampling.bucket_length(r.max_prompt_len))
            out.append((f"{role} sampler", "sampling", lambda params=params, prompts=prompts: sampling._sample.lower(
                graphdef, policy, _rows(self.mesh, prompts, jnp.int32), _rows(self.mesh, prompts, bool), key,
                params=params, mesh=self.mesh), policy_args))
        for role in ("proposer", "solver"):
            batch = self.batch(role)
            rewards = _rows(self.mesh, (batch.response_ids.shape[0] // self.sampling_params(role).n,
                                        self.sampling_params(role).n), jnp.float32)
            logprobs = (_rows(self.mesh, batch.response_ids.shape, jnp.float32)
                        if learner.passes_sampler_logprobs else None)
            out.append((f"{role} log-prob pass", "training", lambda batch=batch, rewards=rewards, logprobs=logprobs:
                        learner._prepare.lower(params=policy, ref_params=learner.ref_params,
                                               critic_params=None if learner.critic_state is None
                                               else learner.critic_state.params,
                                               batch=batch, rewards=rewards, sampler_logprobs=logprobs),
                        policy_args + ("reference",)))
            out.append((f"{role} policy update", "training",
                        lambda batch=batch: learner._update.lower(learner.state, batch, learner.frozen),
                        policy_args + ("policy optimizer",)))
            if learner.critic_state is not None:
                out.append((f"{role} critic update", "training",
                            lambda batch=batch: learner._critic_update.lower(learner.critic_state, batch, None),
                            ("critic state",)))
        return out

    def compile(self, only: Callable[[str], bool] = lambda name: True, log=print) -> list[Program]:
        """Every program compiled for the slice, with its per-chip memory and cost. A program whose
        temporaries alone exceed the chip (XLA refuses it: RESOURCE_EXHAUSTED) comes back with the
        temporaries XLA names, its resident arguments, and `exhausted` set."""
        compiled = []
        for name, phase, lower, passed in self.programs():
            if not only(name):
                continue
            start = time.perf_counter()
            try:
                program = lower().compile()
            except Exception as e:  # XLA's out-of-memory verdict is a fit figure, not a failure
                temporaries = exhausted_temporaries(str(e))
                if temporaries is None:
                    raise
                arguments = sum(per_chip_bytes(self.resident()[arg]) for arg in passed)
                compiled.append(Program(name=name, phase=phase, arguments=arguments, outputs=0,
                                        temporaries=temporaries, code=0,
                                        outside=self.outside(phase, *passed, program=name), flops=0.0,
                                        bytes_accessed=0.0, compile_s=time.perf_counter() - start, exhausted=True))
            else:
                memory, cost = program.memory_analysis(), _cost(program)
                compiled.append(Program(
                    name=name, phase=phase, arguments=memory.argument_size_in_bytes,
                    outputs=memory.output_size_in_bytes - memory.alias_size_in_bytes,
                    temporaries=memory.temp_size_in_bytes, code=memory.generated_code_size_in_bytes,
                    outside=self.outside(phase, *passed, program=name), flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)), compile_s=time.perf_counter() - start))
            log(describe(compiled[-1], self.config))
        return compiled


def describe(program: Program, config) -> str:
    """One line of the compile log: the program, the knob it was compiled at, its time and figure."""
    knob = (f"micro-batch {config.rl.micro_batch_size}" if program.phase == "training" else
            f"{config.rollout.rows_in_flight or 'all'} rows in flight")
    return (f"compiled {program.name} ({knob}) in {program.compile_s:.0f} s: {program.total / GiB:.2f} GiB per chip"
            f"{' (XLA: its temporaries alone exceed the chip)' if program.exhausted else ''}")


def _compile_apart(accelerator: str, config, model_cfg: ModelConfig, name: str) -> Program:
    """In a process of its own: program `name` of the run compiled for the slice `accelerator`."""
    _, devices = slice_devices(accelerator)
    [program] = AbstractRun.build(config, model_cfg, devices).compile(only=name.__eq__, log=lambda line: None)
    return program


class CompiledJudge:
    """The TPU compiler as the judge of a run's fit (auto_knobs.resolve, plan --compile, a TPU run's
    start): `judge(config, phase)` is the most one chip holds in that phase's largest programs, compiled
    at the config's knobs; `limit` what it may hold. Compiled programs are kept by name and the knobs
    they depend on, so the knob search, the fit check and the report compile each at most once.

    With `accelerator` (a slice this host does not have, e.g. "v5e-8") each program is compiled in a
    fresh process: XLA's compiler keeps the host memory it grew to after a compile (a 3B program's
    takes 5–9 GB), so a knob search compiling several in one process outgrows a small host."""

    def __init__(self, model_cfg: ModelConfig, devices, usable: int, spare: float = 0.05, log=print,
                 accelerator: str | None = None):
        self.model_config, self.devices, self.log, self.accelerator = model_cfg, devices, log, accelerator
        self.usable, self.limit = usable, int(usable * (1 - spare))
        self._compiled: dict[tuple[str, str], Program] = {}

    def largest(self, config) -> dict[str, list[str]]:
        """Phase -> the programs that bound it: the role with the longer responses (the solver on a
        tie; the other role's programs have the same shapes or shorter ones), its sampler in sampling,
        its policy update (and its critic's) in training."""
        r = config.rollout
        role = "proposer" if r.proposer_max_new_tokens > r.solver_max_new_tokens else "solver"
        training = [f"{role} policy update"] + ([f"{role} critic update"] if config.rl.advantage == "gae" else [])
        return {"sampling": [f"{role} sampler"], "training": training}

    def programs(self, config, names=None) -> list[Program]:
        """The named programs (default: every program of a step) compiled at `config`'s knobs."""
        run = AbstractRun.build(config, self.model_config, self.devices)
        wanted = {name: _key(config, phase) for name, phase, *_ in run.programs() if names is None or name in names}
        missing = [name for name, key in wanted.items() if (name, key) not in self._compiled]
        if self.accelerator is not None:
            fresh = [self._apart(config, name) for name in missing]
        else:
            fresh = run.compile(only=missing.__contains__, log=self.log) if missing else []
        for program in fresh:
            self._compiled[program.name, wanted[program.name]] = program
        return [self._compiled[item] for item in wanted.items()]

    def _apart(self, config, name: str) -> Program:
        spawn = multiprocessing.get_context("spawn")  # a fork would share this process's compiler state
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            try:
                program = pool.submit(_compile_apart, self.accelerator, config, self.model_config, name).result()
            except concurrent.futures.process.BrokenProcessPool:
                raise RuntimeError(f"the process compiling {name} died (killed for host memory? a 3B "
                                   "program needs 5-9 GB): compile on a larger host") from None
        self.log(describe(program, config))
        return program

    def __call__(self, config, phase: str) -> int:
        return max(p.total for p in self.programs(config, self.largest(config)[phase]))


def _key(config, phase: str) -> str:
    """The config as a phase's programs see it: the other phase's memory knob does not change them."""
    c = config.copy_and_resolve_references()
    if phase == "training":
        c.rollout.rows_in_flight = 0
    else:
        c.rl.micro_batch_size = 0
    return c.to_json_best_effort(sort_keys=True)


def judge_on_this_host(model_cfg: ModelConfig, device_bytes: int, log=print) -> CompiledJudge | None:
    """The compiler as judge where this process runs on TPU (the plan is a quarter low there); None
    elsewhere, where the plan, calibrated on XLA's CPU compiler, judges."""
    devices = jax.devices()
    return CompiledJudge(model_cfg, devices, device_bytes, log=log) if devices[0].platform == "tpu" else None


def check_fits(judge: CompiledJudge, config, estimate) -> None:
    """Raises plan.MemoryPlanError, with the compiler's figure per phase and what to change, unless
    both phases' largest programs fit `judge.limit` per chip."""
    from sqlm_jax.plan import MemoryPlanError, advice
    figures = {phase: judge(config, phase) for phase in ("training", "sampling")}
    if any(total > judge.limit for total in figures.values()):
        raise MemoryPlanError("\n".join(
            [f"{phase}: {total / GiB:.2f} GiB per chip by the TPU compiler, "
             f"{'over' if total > judge.limit else 'within'} the limit of {judge.limit / GiB:.2f}"
             for phase, total in figures.items()] + [advice(estimate, config)]))


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT])\)", re.S)


def exhausted_temporaries(message: str) -> int | None:
    """The temporaries' bytes in XLA's out-of-memory refusal ("...the total memory required for HLO
    temporaries (33.19G) exceeds available HBM (30.75G)"), None for any other error."""
    found = _EXHAUSTED.search(message)
    return None if found is None else int(float(found[1]) * 1024 ** "KMGT".index(found[2]) * 1024)


def _cost(program) -> dict[str, float]:
    cost = program.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def usable_bytes(family: str) -> int:
    from sqlm_jax.device_memory import HBM_BYTES
    return HBM_BYTES[family] - XLA_RESERVED
