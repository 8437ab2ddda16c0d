"""The compiled train step's speed against this CPU's matmul peak, and where a self-play step spends its time.

Part 1, the update alone: `train_step.train_step` (policy loss: PPO-clip + k3 KL, exact micro-batch
accumulation, AdamW with clipping), jitted with the state donated as Trainer does, on --sequences
sequences of --prompt-len prompt + --response-len response tokens, for each micro-batch size in
--micro-batches. Each round times the float32 matmul peak (common.matmul_peak_flops) and then one step of
every micro-batch size, so peak and steps see the same machine load; the table gives medians over
--rounds. "of peak" is the median over rounds of (step FLOP/s) / (that round's peak), both per wall-clock
second; "of peak per CPU second" divides FLOPs by the process's CPU time instead, on both sides, which
other jobs on the machine disturb much less.

Train FLOPs (`train_flops`) = 3 × forward (backward = 2 × forward), the forward counting matmuls only:
  2 × (matmul weights per layer × layers) × every token   (q/k/v, o, gate/up, down)
  + 2 × vocab × hidden × response tokens                   (the LM head runs on response positions only)
  + 4 × layers × heads × head_dim × S² per sequence         (QKᵀ and PV over all S = prompt + response
                                                              positions, dense as computed, mask applied after)
i.e. 6 × params × tokens + attention. With --prompt-group g, every g sequences share one prompt (as the
n samples of a prompt do in training) and the update runs it once per group (RoleBatch.prompt_group):
its tokens count once per group. Embedding lookups, norms, softmax, the loss and the optimizer are not
counted; their time is.

With --lora-rank=r the same update also runs on LoRA adapters of rank r (model.lora: all four fused
projections, alpha 16) over the frozen base, alternating with full fine-tuning in each round, and the
table gives both, with XLA's memory accounting of each compiled update: "train state" (the donated
state: parameters and AdamW moments, plus the frozen base with LoRA) and "temporaries" (gradients,
activations, logits). LoRA's FLOPs count the frozen weights' matmuls twice (forward, input gradient)
instead of three times; the adapters' own are not counted.

Rows are split over every local device (common.data_mesh), weights replicated, in both parts: by default
the CPU is one XLA device whose operations use all cores; XLA_FLAGS=--xla_force_host_platform_device_count=2
makes one device per core (data parallelism across cores). The peak is one jnp.dot on the first device.

Part 2, one full self-play step: Trainer.self_play_step on the arithmetic task with the tiny corpus's
short prompts and the same model shape (random weights, the character tokenizer), B=--batch-size rows
× n=--n proposals, n answers each, --new-tokens new tokens for both roles, both roles updated every
step. It reports Trainer's own split (time/propose, time/solve, time/score, time/logprobs, time/update),
medians over the steps after the first --compile-steps, whose time (mostly compilation) is reported
separately.

    python bench/train_step.py
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/train_step.py
    python bench/train_step.py --skip-update     # part 2 only (--skip-self-play: part 1 only)
    python bench/train_step.py --lora-rank=8 --skip-self-play   # the update: LoRA beside full fine-tuning
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_model_args, data_mesh, machine_line, markdown_table, matmul_peak_flops,  # noqa: E402
                    median, micro_batches, model_config, timed)

from sqlm_jax import mesh as mesh_lib  # noqa: E402
from sqlm_jax.defaults import base_config  # noqa: E402
from sqlm_jax.models import ModelConfig, Transformer, save_pretrained  # noqa: E402
from sqlm_jax.models import lora  # noqa: E402
from sqlm_jax.train_step import (LossConfig, RoleBatch, TrainState, make_optimizer,  # noqa: E402
                                 policy_loss_fn, train_step)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    g = p.add_argument_group("part 1: the update")
    g.add_argument("--sequences", type=int, default=128, help="sequences per update")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--response-len", type=int, default=64)
    g.add_argument("--micro-batches", default="8,16,32,64,128", help="micro-batch sizes to compare")
    g.add_argument("--prompt-group", type=int, default=1,
                   help="sequences sharing one prompt pass (RoleBatch.prompt_group; 1: a full pass each)")
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--lora-rank", type=int, default=0,
                   help="also time the update of LoRA adapters of this rank (0: full fine-tuning only)")
    g = p.add_argument_group("part 2: one self-play step")
    g.add_argument("--batch-size", type=int, default=16, help="B: proposer rows per step")
    g.add_argument("--n", type=int, default=4)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--micro-batch", type=int, default=16, help="Trainer's rl.micro_batch_size")
    g.add_argument("--compile-steps", type=int, default=1)
    g.add_argument("--steps", type=int, default=3, help="measured steps after the compile steps")
    p.add_argument("--skip-update", action="store_true", help="part 2 only")
    p.add_argument("--skip-self-play", action="store_true", help="part 1 only")
    return p.parse_args()


def train_flops(cfg: ModelConfig, sequences: int, prompt_len: int, response_len: int,
                prompt_group: int = 1, frozen_weights: bool = False) -> float:
    """FLOPs of one update (forward + backward) on `sequences` sequences; see the module docstring.

    With `prompt_group` g > 1 the prompt runs once per g sequences (transformer.response_hidden): its
    tokens and its queries' attention count once per group. Attention is dense over all prompt + response
    positions in both cases (the cache path has P + R slots), as computed. `frozen_weights` (LoRA): the
    weights get no gradient, so their matmuls run twice, not three times."""
    d, dh, seq = cfg.hidden_size, cfg.head_dim, prompt_len + response_len
    groups = sequences // prompt_group
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * dh + cfg.num_heads * dh * d \
        + 3 * d * cfg.intermediate_size
    attention = 4 * cfg.num_layers * cfg.num_heads * dh
    weights = (2 * per_layer * cfg.num_layers * (sequences * response_len + groups * prompt_len)
               + 2 * cfg.vocab_size * d * sequences * response_len)
    return (2 if frozen_weights else 3) * weights + 3 * attention * seq * (sequences * response_len
                                                                            + groups * prompt_len)


def random_batch(cfg: ModelConfig, sequences: int, prompt_len: int, response_len: int,
                 prompt_group: int = 1) -> RoleBatch:
    """Full-length random prompts and responses, with advantages and log-probs of realistic size; each
    `prompt_group` consecutive sequences share a prompt (RoleBatch.prompt_group)."""
    rng = np.random.default_rng(0)
    ids = lambda length: rng.integers(0, cfg.vocab_size, (sequences, length), dtype=np.int32)
    ones = lambda length: np.ones((sequences, length), bool)
    noise = lambda: rng.standard_normal((sequences, response_len)).astype(np.float32)
    prompts = np.repeat(ids(prompt_len)[::prompt_group], prompt_group, axis=0)
    return RoleBatch(prompt_ids=prompts, prompt_mask=ones(prompt_len), response_ids=ids(response_len),
                     response_mask=ones(response_len), advantages=noise(),
                     old_logp=np.log(1 / cfg.vocab_size) + 0.1 * noise(),
                     ref_logp=np.log(1 / cfg.vocab_size) + 0.1 * noise(), old_values=noise(), returns=noise(),
                     prompt_group=prompt_group)


def compiled_updates(args, cfg: ModelConfig, mesh, micro: dict) -> dict[str, list]:
    """{method: [train state, frozen base or None, {micro-batch size: compiled update}]} for full
    fine-tuning and, with --lora-rank, LoRA; each update compiled once with the state donated, as
    Trainer runs it."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    params = jax.device_put(params, mesh_lib.replicated(mesh))
    tx = make_optimizer(base_config().optim, total_updates=1000)
    methods = {"full": (graphdef, params, None)}
    if args.lora_rank:
        # A base of its own: full fine-tuning's update donates (deletes) the parameters it is given.
        adapted, adapters, frozen = lora.attach(graphdef, jax.tree.map(jnp.copy, params),
                                                lora.LoraSpec(rank=args.lora_rank), seed=0)
        methods[f"LoRA r={args.lora_rank}"] = (adapted, jax.device_put(adapters, mesh_lib.replicated(mesh)), frozen)
    out = {}
    for name, (g, trained, frozen) in methods.items():
        update = jax.jit(functools.partial(_update, loss_fn=policy_loss_fn(g, LossConfig()), tx=tx),
                         donate_argnums=0)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=trained, opt_state=tx.init(trained))
        out[name] = [state, frozen, {mb: update.lower(state, batch, frozen).compile() for mb, batch in micro.items()}]
    return out


def _update(state, micro_batches, frozen, *, loss_fn, tx):
    return train_step(state, micro_batches, loss_fn=lora.with_frozen(loss_fn, frozen), tx=tx)


def bench_update(args) -> None:
    cfg, mesh = model_config(args), data_mesh()
    batch = random_batch(cfg, args.sequences, args.prompt_len, args.response_len, args.prompt_group)
    micro_sizes = [int(m) for m in args.micro_batches.split(",")]
    micro = {mb: micro_batches(batch, mb, mesh) for mb in micro_sizes}
    start = time.perf_counter()
    updates = compiled_updates(args, cfg, mesh, micro)
    compile_s = (time.perf_counter() - start) / (len(updates) * len(micro_sizes))

    def step(method, mb):
        state, frozen, compiled = updates[method]
        updates[method][0], metrics = compiled[mb](state, micro[mb], frozen)
        return metrics

    cases = [(method, mb) for method in updates for mb in micro_sizes]
    first_s = {case: timed(step, *case)[1] for case in cases}
    peaks, walls, cpus = [], {case: [] for case in cases}, {case: [] for case in cases}
    for _ in range(args.rounds):
        peaks.append(matmul_peak_flops())
        for case in cases:
            _, wall, cpu = timed(step, *case)
            walls[case].append(wall)
            cpus[case].append(cpu)

    flops = {method: train_flops(cfg, args.sequences, args.prompt_len, args.response_len, args.prompt_group,
                                 frozen_weights=method != "full") for method in updates}
    tokens = args.sequences * (args.prompt_len + args.response_len)  # as a full pass per sequence has them
    rows = []
    for method, mb in cases:
        s, f = median(walls[method, mb]), flops[method]
        of_peak = median([f / t / p.per_second for t, p in zip(walls[method, mb], peaks)])
        of_peak_cpu = median([f / c / p.per_cpu_second for c, p in zip(cpus[method, mb], peaks)])
        memory = updates[method][2][mb].memory_analysis()
        rows.append([method, f"{args.sequences // mb} x {mb}", f"{s * 1e3:.0f} ms", f"{median(cpus[method, mb]):.2f} s",
                     f"{tokens / s:,.0f}", f"{f / s / 1e9:.1f}", f"**{of_peak:.0%}**", f"{of_peak_cpu:.0%}",
                     f"{compile_s + first_s[method, mb]:.1f} s", f"{memory.argument_size_in_bytes / 2**20:.1f}",
                     f"{memory.temp_size_in_bytes / 2**20:.1f}"])
    print(f"\n## Update: {cfg.num_params() / 1e6:.2f}M parameters (hidden {cfg.hidden_size}, {cfg.num_layers} "
          f"layers, {cfg.num_heads} heads / {cfg.num_kv_heads} kv, MLP {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}); {args.sequences} sequences x ({args.prompt_len} + {args.response_len}) tokens "
          f"= {tokens} tokens, prompt groups of {args.prompt_group}; GFLOP per update: "
          + ", ".join(f"{m} {f / 1e9:.1f}" for m, f in flops.items()))
    wall_peaks, cpu_peaks = [p.per_second for p in peaks], [p.per_cpu_second for p in peaks]
    print(f"float32 matmul peak (2048^3 jnp.dot), median of {args.rounds} rounds: "
          f"{median(wall_peaks) / 1e9:.1f} GFLOP/s (min {min(wall_peaks) / 1e9:.1f}, max "
          f"{max(wall_peaks) / 1e9:.1f}); per CPU second: {median(cpu_peaks) / 1e9:.1f} GFLOP\n")
    print(markdown_table(["fine-tuning", "micro-batches x size", "step (median)", "CPU time", "tokens/s", "GFLOP/s",
                          "of peak", "of peak per CPU second", "compile + first step",
                          "XLA arguments MiB (state, base, batch)", "XLA temporaries MiB"], rows))


def self_play_steps(args, work: Path) -> tuple[ModelConfig, list[dict[str, float]]]:
    """Runs compile_steps + steps self-play steps in `work`; returns the model config and each step's metrics."""
    from sqlm_jax import tiny_corpus
    from sqlm_jax.train import Trainer

    tokenizer = tiny_corpus.build_tokenizer()
    cfg = model_config(args, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, work / "model")
    tiny_corpus.save_tokenizer(tokenizer, work / "model")

    c = base_config()
    c.task, c.model.path, c.workdir = "arithmetic", str(work / "model"), str(work / "run")
    c.task_options.proposer_prompt = tiny_corpus.PROPOSER_PROMPT
    c.task_options.solver_instruction = tiny_corpus.SOLVER_INSTRUCTION
    c.rollout.batch_size, c.rollout.n = args.batch_size, args.n
    c.rollout.proposer_max_new_tokens = c.rollout.solver_max_new_tokens = args.new_tokens
    c.rl.mini_batch_size, c.rl.micro_batch_size = args.batch_size, args.micro_batch
    c.rl.proposer_update_freq = 1
    c.mesh.data, c.mesh.fsdp = -1, 1  # as data_mesh(): weights replicated, rows split
    c.train.steps = args.compile_steps + args.steps
    trainer = Trainer(c)
    steps = []
    for i in range(c.train.steps):
        metrics, wall, cpu = timed(trainer.self_play_step, i)
        steps.append({**metrics, "time/total": wall, "cpu/total": cpu})
    return cfg, steps


def bench_self_play(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        cfg, steps = self_play_steps(args, Path(tmp))
    warm = steps[args.compile_steps:]
    total = median([m["time/total"] for m in warm])
    rows = [[k.split("/")[1], f"{median([m[k] for m in warm]):.2f} s",
             f"{median([m[k] / m['time/total'] for m in warm]):.0%}"]
            for k in ["time/propose", "time/solve", "time/score", "time/logprobs", "time/update"]]
    rows.append(["**total**", f"**{total:.2f} s**", f"CPU time {median([m['cpu/total'] for m in warm]):.2f} s"])
    rows.append([f"first {args.compile_steps} step(s), with compilation",
                 f"{sum(m['time/total'] for m in steps[:args.compile_steps]):.1f} s", ""])
    length = lambda role: median([m[f"length/{role}"] for m in warm])
    print(f"\n## One self-play step: {cfg.num_params() / 1e6:.2f}M parameters (vocab {cfg.vocab_size}, "
          f"character tokenizer), B={args.batch_size}, n={args.n}: {args.batch_size * args.n} proposals + "
          f"{args.batch_size * args.n ** 2} answers of <= {args.new_tokens} new tokens (mean lengths "
          f"{length('proposer'):.0f} / {length('solver'):.0f}), both roles updated; median of {args.steps} "
          f"steps after {args.compile_steps}\n")
    print(markdown_table(["phase", "time", "share"], rows))


def main():
    args = parse_args()
    print(machine_line())
    if not args.skip_update:
        bench_update(args)
    if not args.skip_self_play:
        bench_self_play(args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
