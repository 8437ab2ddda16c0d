"""Per-device memory plan: will a config fit a mesh of a given accelerator, and if not, what to change.

    python -m sqlm_jax.plan --config=configs/algebra.py --mesh=data=1,fsdp=4,tensor=2 --accelerator=v5e

Weights are measured, not guessed: the parameter shapes and logical axes come from an abstract model
(`nnx.eval_shape`, no weights allocated) and each tensor is divided exactly as `mesh.logical_spec`
shards it. The phases' buffers are estimates of what XLA keeps alive, counted from the code and
checked against XLA's own accounting of the compiled sampler and update on CPU (tests/test_plan.py,
within 10%, for sequences of 256+ tokens where attention's quadratic term is a large share; shorter
ones are overestimated, ~30% at 80 tokens). The remat figure is the textbook one (layer inputs + one
layer), since XLA on CPU does not show remat's saving at all. The update's shared prompt pass
(rl.shared_prompt_pass) is not modelled: the training figure is then an upper bound. It models the
memory knobs as the code runs them: logits in chunks (rl.logits_chunk_mib), rows in flight with slot
refill (rollout.rows_in_flight); -1 ("auto") knobs are first set to the largest that fit (auto_knobs).
With LoRA (model.lora.rank > 0) the optimizer state and the gradients are the adapters' alone and the
KL reference is the frozen base itself (no reference copy).

A step has two phases that never hold their big buffers at the same time: sampling (the KV cache) and
training (gradients, activations, logits). Weights and optimizer state live through both, unless
rollout.offload_to_host puts the optimizer states, the reference and the critic in host memory while
sampling. So

    total per device = max(resident on the devices while sampling + sampling peak, resident + training peak).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import refill
from sqlm_jax.device_memory import (GiB, HBM_BYTES, abstract_mesh, accelerator_bytes,  # noqa: F401
                                    host_ram_bytes, local_device_bytes, param_layout, parse_accelerator,
                                    shard_bytes, weights_bytes)
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.hf import is_local_path, read_model_config, resolve_checkpoint
from sqlm_jax.models.lora import LoraSpec
from sqlm_jax.sampling import bucket_length
from sqlm_jax.train_step import chunk_positions

# Kept free for XLA's scratch buffers, fragmentation and the runtime: a plan that uses the last few
# percent of HBM on paper fails at compile time in practice.
HEADROOM = 0.10
_BUNDLED_CONFIGS = Path(__file__).parents[1] / "assets" / "model_configs"
PHASES = ("resident", "sampling", "training")


class MemoryPlanError(ValueError):
    """The planned run does not fit the device memory; the message holds the table and the fix."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the plan: `bytes` on each device during `phase`."""

    name: str
    phase: str   # resident (whole run) | sampling | training
    bytes: int
    note: str
    offloaded: bool = False  # resident, but in host memory while sampling (rollout.offload_to_host)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory of one config on one mesh."""

    title: str
    mesh_shape: dict[str, int]
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def phase_bytes(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    def during(self, phase: str) -> int:
        """What a device holds while `phase` (sampling | training) runs: its rows and the resident ones
        on the device then."""
        held = sum(r.bytes for r in self.rows
                   if r.phase == "resident" and not (r.offloaded and phase == "sampling"))
        return held + self.phase_bytes(phase)

    @property
    def total(self) -> int:
        """The larger of the two phases' peaks (they do not overlap), each with the resident memory."""
        return max(self.during("sampling"), self.during("training"))


# ---------------------------------------------------------------------------------------------------
# Model config without weights


def runtime_options(config) -> dict:
    """The model's runtime choices in `config` other than dtypes (ModelConfig's fields of those names)."""
    return dict(remat=bool(config.model.remat), seq_block=int(config.model.seq_block),
                attention=str(config.model.attention))


def load_model_config(config) -> ModelConfig:
    """The ModelConfig of `config.model.path`, with the run's dtypes and remat, read offline if possible.

    A local folder's config.json; for the reference hub ids the bundled copy of their public config.json
    (assets/model_configs); any other hub id: its config.json alone from the hub (or the HF cache).
    """
    runtime = dict(param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                   **runtime_options(config))
    path = str(config.model.path)
    if is_local_path(path):
        return read_model_config(resolve_checkpoint(path), **runtime)
    source = _BUNDLED_CONFIGS / (path.replace("/", "--") + ".json")
    if not source.is_file():
        from huggingface_hub import hf_hub_download
        try:
            source = Path(hf_hub_download(path, "config.json"))
        except Exception as e:  # offline, unknown or gated repo: one message naming the way out
            raise FileNotFoundError(
                f"no config.json for {path!r}: not a local folder, not one of the bundled reference "
                f"models ({', '.join(p.stem.replace('--', '/') for p in _BUNDLED_CONFIGS.glob('*.json'))}), "
                f"and the hub could not be reached ({type(e).__name__}). Pass a local checkpoint folder."
            ) from e
    return ModelConfig.from_hf_dict(json.loads(source.read_text()), **runtime)


def sampling_calls(config, devices: int = 1) -> dict[str, tuple[int, int, int, int]]:
    """(prompts, rows in flight, prompt slots, response slots) of the two sampler calls of a step, on
    `devices` batch devices (data × fsdp).

    The proposer samples B·n completions of the one topic prompt; the solver n answers to each of the
    B·n questions. The sampler keeps one cache of each prompt's bucketed length, shared by its rows,
    and one of max_new_tokens slots per row in flight: every row, or rollout.rows_in_flight of them
    (slot refill: a wave of prompts at a time, whose cache holds P-1 slots, the last prompt token
    being the row's; sqlm_jax.refill).
    """
    w, calls = config.rollout.rows_in_flight, {}
    for role, (prompts, rows, slots, new) in _all_rows_calls(config).items():
        if 0 < w < rows:
            d = refill.batch_shards(abstract_mesh({"data": devices}), prompts)
            per_block = -(-w // d)
            calls[role] = (d * refill.wave_prompts(prompts // d, rows // prompts, per_block), d * per_block,
                           slots - 1, new)
        else:
            calls[role] = (prompts, rows, slots, new)
    return calls


def _all_rows_calls(config) -> dict[str, tuple[int, int, int, int]]:
    b, n, r = config.rollout.batch_size, config.rollout.n, config.rollout
    prompt = bucket_length(r.max_prompt_len)
    return {"proposer": (1, b * n, prompt, r.proposer_max_new_tokens),
            "solver": (b * n, b * n * n, prompt, r.solver_max_new_tokens)}


def largest_sampling_call(config) -> str:
    """The role whose sampler call has the larger KV cache: the sampling phase's peak."""
    calls = sampling_calls(config)
    return max(calls, key=lambda role: calls[role][0] * calls[role][2] + calls[role][1] * calls[role][3])


_CACHE_AXES = ("batch", "kv_heads", None, None)  # as sampling.py constrains the cache (LayerCache)


def _kv_cache_bytes(rows: int, slots: int, model_cfg: ModelConfig, mesh) -> int:
    shape = (rows, model_cfg.num_kv_heads, slots, model_cfg.head_dim)
    itemsize = np.dtype(model_cfg.compute_dtype).itemsize
    return 2 * model_cfg.num_layers * shard_bytes(shape, _CACHE_AXES, itemsize, mesh)


def _layer_activations(cfg: ModelConfig, mb: int, seq: int, mesh) -> int:
    """Per-device bytes one decoder layer keeps for its backward pass over `[mb, seq]` tokens.

    Counted from transformer.py: the layer input, both RMSNorms (float32 statistics), the fused qkv, the
    roped q and k, the attention output, the o projection and the down projection over the whole row;
    over `seq_block` positions at a time when T is longer (models/attention.py, the MLP): the attention
    scores and probabilities (float32 `[K, G, T, S]`, the quadratic term) and their compute-dtype copy,
    the fused gate/up and the SwiGLU product.
    """
    b = np.dtype(cfg.compute_dtype).itemsize
    d, f, k, g, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    per_token = [  # (trailing shape, trailing logical axes, itemsize, copies)
        ((d,), ("embed",), b, 6),                               # input, 2 norm outputs, o-proj, residual, down
        ((d,), ("embed",), 4, 2),                               # float32 norm statistics
        ((k, g + 2, dh), ("kv_heads", None, "head_dim"), b, 1),  # fused qkv
        ((k, g + 1, dh), ("kv_heads", None, "head_dim"), b, 1),  # roped q and k
        ((k * g, dh), ("heads", "head_dim"), b, 1),              # attention output
    ]
    block = min(seq, cfg.seq_block or seq)
    per_block = [((2, f), (None, "mlp"), b, 1),                 # fused gate/up
                 ((f,), ("mlp",), b, 2)]                        # silu(gate), silu(gate) * up
    scores = [((mb, block, k, g, seq), 4, 2),  # scores and probs, float32
              ((mb, block, k, g, seq), b, 1)]  # probs in the compute dtype
    over = lambda positions, rows: sum(copies * shard_bytes((mb, positions) + shape, ("batch", None) + axes,
                                                            size, mesh) for shape, axes, size, copies in rows)
    return (over(seq, per_token) + over(block, per_block)
            + sum(copies * shard_bytes(shape, ("batch", None, "kv_heads", None, None), size, mesh)
                  for shape, size, copies in scores))


def _training_rows(config, cfg: ModelConfig, mesh, trained: int) -> list[Row]:
    mb = config.rl.micro_batch_size
    if mb < 1:
        raise ValueError("rl.micro_batch_size=-1 (auto): resolve it first (auto_knobs.resolve)")
    prompt = bucket_length(config.rollout.max_prompt_len)
    response = max(config.rollout.proposer_max_new_tokens, config.rollout.solver_max_new_tokens)
    seq = prompt + response
    layer = _layer_activations(cfg, mb, seq, mesh)
    if cfg.remat:  # each layer keeps only its input; one layer is recomputed, with its cotangents
        layer_input = shard_bytes((mb, seq, cfg.hidden_size), ("batch", None, "embed"),
                                  np.dtype(cfg.compute_dtype).itemsize, mesh)
        activations, how = cfg.num_layers * layer_input + 2 * layer, "remat: layer inputs + 1 layer x2"
    else:  # every layer keeps all of its intermediates; the backward pass frees them as it goes
        activations, how = cfg.num_layers * layer, f"no remat: {cfg.num_layers} layers"
    # Logits [mb, c, V] float32 of c positions at a time (train_step.token_stats) and what the loss
    # derives from them (log-softmax, the entropy's softmax, their cotangents): 5 copies in XLA's CPU
    # accounting when one chunk holds all R positions, 3 of a chunk recomputed in the backward pass.
    c = chunk_positions(mb, cfg.vocab_size, response, config.rl.logits_chunk_mib)
    copies = 5 if c == response else 3
    logits = copies * shard_bytes((mb, c, cfg.vocab_size), ("batch", None, "vocab"), 4, mesh)
    return [
        Row("gradients", "training", 2 * trained, "accumulator + one micro-batch's, of what is trained"),
        Row("activations", "training", activations,
            f"micro-batch {mb} x {seq} tokens, {how} (estimate)"),
        Row("logits", "training", logits, f"[{mb}, {c} of {response}, {cfg.vocab_size}] float32 x{copies}"),
    ]


def _sampling_rows(config, cfg: ModelConfig, mesh) -> list[Row]:
    role = largest_sampling_call(config)
    prompts, rows, prompt, response = sampling_calls(config, mesh.shape["data"] * mesh.shape["fsdp"])[role]
    # Besides the cache, the larger of: the prefill's (before the rows' cache exists) one layer, the
    # larger of its float32 scores and probabilities and its MLP's gate/up and product; and a decode
    # step's [rows, V] float32 buffers: the logits, the sampling race's uniforms and ratios, the
    # log-softmax (6 in XLA's CPU accounting, at temperature 1 without top-k / top-p, whose sorts add
    # more), with slot refill plus each slot's copy of its prompt's cache (gathered, every layer).
    item = np.dtype(cfg.compute_dtype).itemsize
    scores = 2 * shard_bytes((prompts, cfg.num_kv_heads, cfg.group_size, prompt, prompt),
                             ("batch", "kv_heads", None, None, None), 4, mesh)
    mlp = shard_bytes((prompts, prompt, 3, cfg.intermediate_size), ("batch", None, None, "mlp"), item, mesh)
    refilling = rows < _all_rows_calls(config)[role][1]
    logits = 6 * shard_bytes((rows, cfg.vocab_size), ("batch", "vocab"), 4, mesh) + (
        _kv_cache_bytes(rows, prompt, cfg, mesh) if refilling else 0)
    # A wave's tail moves into a quarter of the slots: that copy of their caches sits beside the wide one.
    narrowed = _kv_cache_bytes(rows // refill.TAIL_SHRINK, response, cfg, mesh) if refilling else 0
    cache = _kv_cache_bytes(prompts, prompt, cfg, mesh) + _kv_cache_bytes(rows, response, cfg, mesh)
    return [
        Row("KV cache", "sampling", cache,
            f"{role}: {prompts} prompts x {prompt} slots + {rows} rows x {response} slots"
            f"{' (rows in flight)' if refilling else ''}, x {cfg.num_layers} layers x k,v ({cfg.compute_dtype})"),
        Row("sampling transients", "sampling", max(scores, mlp, logits, narrowed),
            "prefill layer or decode logits x6" + (" + slots' prompt caches, or the narrowed tail's cache"
                                                   if refilling else "") + ", the largest"),
    ]


def memory_plan(config, model_cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> Plan:
    """The per-device memory of `config` with `model_cfg` on a mesh of `mesh_shape` ({data, fsdp, tensor})."""
    mesh = abstract_mesh(mesh_shape)
    weights, dtype = weights_bytes(param_layout(model_cfg), mesh), model_cfg.param_dtype
    spec = LoraSpec.from_config(config.model.lora)
    # LoRA: what is trained (optimizer moments, gradients) is the adapters; the frozen base is the
    # KL reference, so there is no reference copy.
    adapters = weights_bytes(param_layout(model_cfg, spec), mesh) if spec.rank else 0
    trained = adapters if spec.rank else weights
    lora_note = f" + LoRA rank {spec.rank} adapters ({adapters / 2**20:.1f} MiB float32)" if spec.rank else ""
    host = bool(config.rollout.offload_to_host)
    held = " (host memory while sampling)" if host else ""
    rows = [Row("parameters", "resident", weights + adapters,
                f"{model_cfg.num_params() / 1e9:.2f}B {dtype}, sharded by the logical-axis rules{lora_note}"),
            Row("optimizer state", "resident", 2 * trained,
                ("AdamW mu + nu of the adapters" if spec.rank else f"AdamW mu + nu ({dtype}, as the params)")
                + held, host)]
    if config.rl.use_kl and not spec.rank:
        rows.append(Row("reference weights", "resident", weights, "frozen initial policy for the KL term" + held,
                        host))
    if config.rl.advantage == "gae":
        rows.append(Row("critic", "resident", 3 * weights, "value model weights + AdamW mu, nu" + held, host))
    rows += _sampling_rows(config, model_cfg, mesh) + _training_rows(config, model_cfg, mesh, trained)
    sizes = {a: int(mesh_shape.get(a, 1)) for a in mesh_lib.AXES}
    title = (f"{config.model.path} ({model_cfg.num_params() / 1e9:.2f}B params, {dtype} weights, "
             f"{model_cfg.compute_dtype} compute, remat={model_cfg.remat}) on mesh "
             + " ".join(f"{a}={s}" for a, s in sizes.items()) + f" ({math.prod(sizes.values())} device(s))")
    return Plan(title=title, mesh_shape=sizes, rows=tuple(rows))


# ---------------------------------------------------------------------------------------------------
# Reporting


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as a table of GiB per device, phase subtotals and the total."""
    lines = [f"Memory per device: {plan.title}",
             f"{'phase':<10}{'what':<22}{'GiB':>8}  note"]
    lines += [f"{r.phase:<10}{r.name:<22}{_gib(r.bytes)}  {r.note}" for r in plan.rows]
    lines.append("-" * 72)
    lines += [f"{p:<10}{'subtotal':<22}{_gib(plan.phase_bytes(p))}" for p in PHASES]
    lines.append(f"{'total':<32}{_gib(plan.total)}  the larger phase with what is resident on the device then")
    return "\n".join(lines)


def usable_bytes(device_bytes: int) -> int:
    return int(device_bytes * (1 - HEADROOM))


def fit_line(plan: Plan, device_bytes: int, name: str = "device") -> str:
    """One sentence: does the plan fit `device_bytes` per device, with what to spare or what missing."""
    usable = usable_bytes(device_bytes)
    head = (f"{name}: {device_bytes / GiB:.1f} GiB per device, {usable / GiB:.1f} GiB usable "
            f"({HEADROOM:.0%} headroom)")
    if plan.total <= usable:
        return f"{head}: fits, {(usable - plan.total) / GiB:.2f} GiB to spare"
    return f"{head}: does NOT fit, {(plan.total - usable) / GiB:.2f} GiB short"


def advice(plan: Plan, config) -> str:
    """What to change, the knob for the largest rows first.

    bfloat16 weights are deliberately not offered: at the reference learning rate (1e-6) most AdamW
    updates are below bfloat16's resolution and would round away.
    """
    knobs = {
        "parameters": "shard the weights over more devices (a larger mesh.fsdp: fewer on data, or a larger slice)",
        "activations": ("a smaller --config.rl.micro_batch_size" if config.model.remat
                        else "--config.model.remat=True, or a smaller --config.rl.micro_batch_size"),
        "logits": "a smaller --config.rl.micro_batch_size",
        "KV cache": ("a smaller --config.rollout.rows_in_flight (or -1: the largest that fits), or more "
                     "devices on the batch axes (data, fsdp)"),
    }
    # Rows that one knob shrinks count together when ranking that knob.
    groups = {"parameters": ("parameters", "optimizer state", "reference weights", "critic", "gradients"),
              "activations": ("activations",), "logits": ("logits",),
              "KV cache": ("KV cache", "sampling transients")}
    size = {k: sum(r.bytes for r in plan.rows if r.name in names) for k, names in groups.items()}
    ranked = sorted(knobs, key=size.get, reverse=True)
    return "To fit, try (largest first): " + "; ".join(dict.fromkeys(knobs[k] for k in ranked)) + "."


def check_fits(config, model_cfg: ModelConfig, mesh_shape: Mapping[str, int], device_bytes: int) -> None:
    """Raises MemoryPlanError (the table, the verdict and what to change) unless the run fits."""
    plan = memory_plan(config, model_cfg, mesh_shape)
    if plan.total > usable_bytes(device_bytes):
        raise MemoryPlanError("\n".join([format_plan(plan), fit_line(plan, device_bytes),
                                         advice(plan, config)]))
