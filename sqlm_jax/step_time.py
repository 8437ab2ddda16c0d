"""Projected step time by the TPU compiler's cost model (`plan --compile --step_time`).

XLA's `cost_analysis()` gives a compiled program's FLOPs and bytes accessed per chip, but it counts a
loop's body once, and a step's programs are loops: the update over mini- and micro-batches, the
log-prob pass over micro-batches, the sampler over decode steps, and inside them the layers' sequence
blocks and the loss's logits chunks. So the bodies are compiled as programs of their own, with the
run's code (sqlm_jax.aot builds it from shapes): one mini-batch's optimizer step (its scan's body,
one micro-batch's gradient, and the update applied), one micro-batch's log-prob pass, one decode
step. Each is compiled without inner loops (seq_block 0, one logits chunk) at two depths, 1 and 2
layers: their difference is one layer's cost, extrapolated to the model's depth, then multiplied by
the config's trip counts.

A piece's time is the roofline's max(FLOPs / peak, bytes / bandwidth) per chip. Its ideal is FLOPs /
peak for the update and the log-prob pass, and the chip's share of the weights and of the live KV
cache read once, over the bandwidth, for a decode step. The roofline ratio is time over ideal.

Not counted: the prompt passes at the samplers' start (their FLOPs at peak are added to both
figures), collectives' latency beyond their bytes, the host's work between programs, dynamic
sampling's extra rounds. Decode assumes every row runs to its length limit (the worst case).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from sqlm_jax import aot, sampling
from sqlm_jax.device_memory import parse_accelerator
from sqlm_jax.mesh import replicated
from sqlm_jax.models import fused_attention
from sqlm_jax.models.config import ModelConfig

# Per chip: bfloat16 matmul peak (FLOP/s) and HBM bandwidth (bytes/s), Google's published figures.
CHIPS = {"v4": (275e12, 1.2e12), "v5e": (197e12, 819e9), "v5p": (459e12, 2.765e12), "v6e": (918e12, 1.64e12)}
DEPTHS = (1, 2)  # the pieces' depths: their difference is one layer
# A splash kernel's call in compiled HLO: its kind and its operands' shapes (q first, then the keys).
SPLASH_CALL = re.compile(r"%splash_mha_(fwd|dq|dkv)\S* = .*?custom-call\(.*?operand_layout_constraints=\{(.*?)\}\}")
FLOAT_OPERAND = re.compile(r"(bf16|f16|f32)\[([\d,]+)\]")
ONE_CHUNK_MIB = 1e9  # logits_chunk_mib: the loss's logits in one chunk, no loop


def at_depth(low: float, high: float, depth: int) -> float:
    """A figure at DEPTHS[0] layers (`low`) and DEPTHS[1] (`high`), extrapolated to `depth` layers."""
    return low + (depth - DEPTHS[0]) / (DEPTHS[1] - DEPTHS[0]) * (high - low)


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per chip: FLOPs and bytes accessed, as XLA's cost model counts them."""

    flops: float
    bytes: float

    def at_depth(self, deeper: "Cost", depth: int) -> "Cost":
        """This cost at DEPTHS[0] layers and `deeper` at DEPTHS[1], extrapolated to `depth` layers."""
        return Cost(at_depth(self.flops, deeper.flops, depth), at_depth(self.bytes, deeper.bytes, depth))

    def seconds(self, chip: tuple[float, float]) -> float:
        return max(self.flops / chip[0], self.bytes / chip[1])


@dataclasses.dataclass
class Projection:
    """One program of a step: its projected seconds, the ideal, and how many times a step runs it."""

    name: str
    projected_s: float
    ideal_s: float
    per_step: float
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def roofline_ratio(self) -> float:
        return self.projected_s / self.ideal_s


def splash_cost(hlo: str) -> Cost:
    """The splash attention kernels' FLOPs and bytes in a compiled program (`hlo`, its text), which
    XLA's cost model counts as nothing: each call's cost from its operands' shapes by the kernel's block
    schedule (fused_attention.kernel_cost), once per call in the text as XLA counts its own ops."""
    flops = bytes_ = 0.0
    for kind, operands in SPLASH_CALL.findall(hlo):
        (dtype, q), (_, k) = FLOAT_OPERAND.findall(operands)[:2]
        q, k = [int(d) for d in q.split(",")], [int(d) for d in k.split(",")]
        rows = q[0] if len(q) == 4 else 1  # [N, K·G, T, H], or one row's [K·G, T, H]
        heads, t, head_dim = q[-3:]
        f, b = fused_attention.kernel_cost(kind, rows, heads, t, k[-1], head_dim, 2 if dtype != "f32" else 4)
        flops, bytes_ = flops + f, bytes_ + b
    return Cost(flops, bytes_)


def shallow_run(config, model_cfg: ModelConfig, depth: int, devices) -> aot.AbstractRun:
    """The run at `depth` layers with no inner loop: seq_block 0, the logits in one chunk, one epoch."""
    c = config.copy_and_resolve_references()
    c.rl.logits_chunk_mib, c.rl.ppo_epochs = ONE_CHUNK_MIB, 1
    return aot.AbstractRun.build(c, dataclasses.replace(model_cfg, num_layers=depth, seq_block=0), devices)


def lower_optimizer_step(run: aot.AbstractRun, role: str, model: str = "policy"):
    """The update program on one mini-batch: its micro-batch scan's body (one micro-batch's gradient)
    counted once, and the optimizer's update applied."""
    learner = run.learner
    batch = run.batch(role, run.config.rl.mini_batch_size * run.config.rollout.n)
    if model == "critic":
        return learner._critic_update.lower(learner.critic_state, batch, None)
    return learner._update.lower(learner.state, batch, learner.frozen)


def lower_logprob_pass(run: aot.AbstractRun, role: str, model: str = "policy"):
    """The log-prob pass (old and reference log-probs, values, advantages) over whole groups of n and
    whole micro-batches: its micro-batch map's body, one micro-batch, counted once."""
    learner, n = run.learner, run.sampling_params(role).n
    rows = math.lcm(int(run.config.rl.micro_batch_size), n)
    batch = run.batch(role, rows)
    logprobs = (aot._rows(run.mesh, batch.response_ids.shape, jnp.float32)
                if learner.passes_sampler_logprobs else None)
    return learner._prepare.lower(
        params=learner.policy[1], ref_params=learner.ref_params,
        critic_params=None if learner.critic_state is None else learner.critic_state.params,
        batch=batch, rewards=aot._rows(run.mesh, (rows // n, n), jnp.float32), sampler_logprobs=logprobs)


def rows_in_flight(run: aot.AbstractRun, role: str) -> int:
    every = run._prompts(role) * run.sampling_params(role).n
    return min(int(run.config.rollout.rows_in_flight) or every, every)


def lower_decode_step(run: aot.AbstractRun, role: str, model: str = "policy"):
    """One decode step of the rows in flight (the static sampler's step: slot refill adds only
    bookkeeping to it), their own caches half full: the mean over a row's steps."""
    rows = rows_in_flight(run, role)
    params = dataclasses.replace(run.sampling_params(role), n=min(run.sampling_params(role).n, rows))
    graphdef, weights = run.learner.policy
    # The weights as the sampler holds them for its decode steps (mesh.sampling_weights).
    dtype = jnp.dtype(run.model_config.compute_dtype)
    as_sampled = lambda x: (jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x)
    weights = jax.tree.map(as_sampled, weights)
    length = params.max_new_tokens // 2
    prompts = aot._rows(run.mesh, (rows // params.n, sampling.bucket_length(run.config.rollout.max_prompt_len)),
                        jnp.int32)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)

    def state_at(weights, tokens, key):
        state = sampling._prefill(nnx.merge(graphdef, weights), tokens, tokens > 0, key, params, run.mesh)
        return state._replace(cache=sampling._grow_cache(state.cache, length))
    placed = jax.tree.map(lambda x: aot._rows(run.mesh, x.shape, x.dtype) if x.ndim else
                          jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(run.mesh)),
                          jax.eval_shape(state_at, weights, prompts, key))
    mask = aot._rows(run.mesh, (rows, placed.kv_mask.shape[1] - params.max_new_tokens + length), bool)
    # The state donated, as the decode loop updates it in place.
    step = jax.jit(lambda w, s, m: sampling.decode_step(nnx.merge(graphdef, w), s, m, params, run.mesh),
                   donate_argnums=1)
    return step.lower(weights, placed, mask)


PIECES = {"optimizer step": lower_optimizer_step, "log-prob pass": lower_logprob_pass,
          "decode step": lower_decode_step}


class StepTime:
    """The pieces of a run's programs compiled for a slice at two depths, and the step they project."""

    def __init__(self, config, model_cfg: ModelConfig, devices, accelerator: str, log=print):
        self.config, self.model_config, self.devices, self.log = config, model_cfg, devices, log
        family, _ = parse_accelerator(accelerator)
        self.chip = CHIPS[family]
        self._runs = {depth: shallow_run(config, model_cfg, depth, devices) for depth in DEPTHS}
        self._costs: dict[tuple[str, str, str], Cost] = {}
        self._compiled: dict[str, Cost] = {}

    def cost(self, piece: str, role: str, model: str = "policy") -> Cost:
        """PIECES[piece] compiled at both depths, extrapolated to the model's; kept once costed."""
        key = (piece, role, model)
        if key not in self._costs:
            low, high = (self._costed(PIECES[piece](self._runs[depth], role, model)) for depth in DEPTHS)
            self._costs[key] = cost = low.at_depth(high, self.model_config.num_layers)
            self.log(f"costed {role} {model} {piece}: {cost.flops / 1e12:.2f} TFLOP, "
                     f"{cost.bytes / 1e9:.2f} GB per chip")
        return self._costs[key]

    # ------------------------------------------------------------------------------- a whole step
    def _costed(self, lowered) -> Cost:
        """XLA's cost of a lowered program, compiled once per program text (the roles' pieces are often
        the same program)."""
        text = lowered.as_text()
        if text not in self._compiled:
            compiled = lowered.compile()
            cost = aot._cost(compiled)
            kernels = splash_cost(compiled.as_text())
            self._compiled[text] = Cost(float(cost.get("flops", 0.0)) + kernels.flops,
                                        float(cost.get("bytes accessed", 0.0)) + kernels.bytes)
        return self._compiled[text]

    def _at_depth(self, of) -> float:
        """A figure of the shallow runs (`of(run)`), extrapolated to the model's depth."""
        return at_depth(*(of(self._runs[depth]) for depth in DEPTHS), self.model_config.num_layers)

    def _roofline(self, name: str, pieces: list[tuple[float, Cost]], per_step: float,
                  ideal_s: float | None = None, extra_s: float = 0.0) -> Projection:
        """Σ trips × the piece's roofline time (+ `extra_s` in both); ideal: FLOPs at peak unless given."""
        flops = sum(trips * cost.flops for trips, cost in pieces)
        projected = sum(trips * cost.seconds(self.chip) for trips, cost in pieces)
        ideal = flops / self.chip[0] if ideal_s is None else ideal_s
        return Projection(name, projected + extra_s, ideal + extra_s, per_step, flops,
                          sum(trips * cost.bytes for trips, cost in pieces))

    def project(self) -> list[Projection]:
        """Each program of a step, with how often a step runs it, and the step's decode steps."""
        c, run = self.config, self._runs[DEPTHS[0]]
        freq, critic = c.rl.proposer_update_freq, c.rl.advantage == "gae"
        proposer_share = 1.0 / freq if freq else 0.0
        micro = c.rl.mini_batch_size * c.rollout.n / c.rl.micro_batch_size  # micro-batches per mini-batch
        out = []
        for role in ("proposer", "solver"):
            out += self._sampler(role)
            rows = run._prompts(role) * run.sampling_params(role).n
            # The train loop's schedule (train.py): a role's batch is prepared when either model trains
            # on it; the critic trains on both roles every step, the proposer's policy every freq steps.
            updated = 1.0 if role == "solver" else proposer_share
            out.append(self._roofline(f"{role} log-prob pass", [
                (rows / c.rl.micro_batch_size, self.cost("log-prob pass", role))], 1.0 if critic else updated))
            minis = c.rl.ppo_epochs * rows / (c.rl.mini_batch_size * c.rollout.n)
            # Each micro-batch as the scan's body, whose piece also applies the update: counted once a
            # micro-batch, not once a mini-batch (AdamW's pass over the weights: ~1% of the update).
            for model, per_step in [("policy", updated)] + ([("critic", 1.0)] if critic else []):
                out.append(self._roofline(f"{role} {model} update", [
                    (minis * micro, self.cost("optimizer step", role, model))], per_step))
        return out

    def _sampler(self, role: str) -> list[Projection]:
        """The role's sampler (decode steps and its prompt pass) and one of its decode steps."""
        run = self._runs[DEPTHS[0]]
        rows = rows_in_flight(run, role)
        params, cfg = run.sampling_params(role), self.model_config
        every = run._prompts(role) * params.n
        steps = math.ceil(every / rows) * params.max_new_tokens  # every row to its length limit
        prompt = sampling.bucket_length(self.config.rollout.max_prompt_len)
        kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
        chips = len(self.devices)
        live_kv = rows * (params.max_new_tokens / 2 + prompt / min(params.n, rows)) * kv_token / chips
        weights = self._at_depth(lambda r: aot.per_chip_bytes(r.learner.policy[1]))  # LoRA: base and adapters
        parameters = self._at_depth(lambda r: sum(x.size for x in jax.tree.leaves(r.learner.policy[1])))
        prefill_s = 2 * parameters * run._prompts(role) * prompt / chips / self.chip[0]
        step = self.cost("decode step", role)
        ideal_step = (weights + live_kv) / self.chip[1]
        return [self._roofline(f"{role} sampler", [(steps, step)], 1.0, steps * ideal_step, prefill_s),
                self._roofline(f"{role} decode step", [(1, step)], 0.0, ideal_step)]


def step_table(projections: list[Projection]) -> tuple[str, dict]:
    """The projected step as a table and as the --json object's "step_time"."""
    lines = [f"{'program':<26}{'TFLOP':>11}{'GB':>11}{'runs/step':>10}{'projected s':>12}{'ideal s':>10}{'ratio':>7}"]
    for p in projections:
        lines.append(f"{p.name:<26}{p.flops / 1e12:11.2f}{p.bytes / 1e9:11.2f}{p.per_step:10.2f}"
                     f"{p.projected_s:12.4f}{p.ideal_s:10.4f}{p.roofline_ratio:7.2f}")
    projected = sum(p.per_step * p.projected_s for p in projections)
    ideal = sum(p.per_step * p.ideal_s for p in projections)
    lines.append(f"{'one step':<26}{'':>32}{projected:12.1f}{ideal:10.1f}{projected / ideal:7.2f}")
    record = {"projected_s": projected, "ideal_s": ideal, "roofline_ratio": projected / ideal,
              "programs": [{"name": p.name, "runs_per_step": p.per_step, "flops": p.flops, "bytes_accessed": p.bytes,
                            "projected_s": p.projected_s, "ideal_s": p.ideal_s, "roofline_ratio": p.roofline_ratio}
                           for p in projections]}
    return "\n".join(lines), record
