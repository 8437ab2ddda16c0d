"""One GRPO iteration in this project and in TRL's GRPOTrainer, side by side, on the same tiny model (CPU).

An iteration, on both sides: --prompts prompts of --prompt-len tokens × --n samples × --new-tokens new
tokens at temperature 1 with no early stop (our sampler gets no stop ids; TRL's generate gets
min_new_tokens), log-probs of the completions under a frozen reference (KL coefficient --kl-coef > 0),
GRPO advantages from a dummy reward (seeded random numbers), and one AdamW update (clip 1.0, constant
learning rate) over all the completions, the loss a token mean over the whole batch on both sides.

  ours: sampling.sample(n) -> Learner.batch (reference log-probs and GRPO advantages in one jitted
        call, the batch left on the device) -> Learner.update (one jitted update, the state donated,
        micro-batches of --micro-batch), as Trainer runs them with its defaults: the old log-probs are
        the sampler's own (rl.reuse_sampler_logprobs; exact at temperature 1, no top-k/p), all-padding
        prompt columns trimmed (learner.trim_prompt_padding; none here), and the n samples of a prompt
        share one pass over it (RoleBatch.prompt_group = n, rl.shared_prompt_pass) in the reference
        pass and the update. --recompute-old-logprobs and --no-shared-prompt-pass switch those off. Rows are split over every local device
        (common.data_mesh): by default the CPU is one device; with
        XLA_FLAGS=--xla_force_host_platform_device_count=2 it is one device per core.
  TRL:  GRPOTrainer, per_device_train_batch_size=--trl-batch with gradient accumulation up to all the
        completions (one generation and one optimizer step per iteration; 32 was TRL's fastest of 16,
        32, 128 here), fp32, default attention, torch's default threads (one per core).

Same weights: a transformers Qwen2ForCausalLM is built and saved once; TRL loads that folder and we
load it with load_pretrained (the script checks the two give the same logits). A word-level tokenizer of
exactly --vocab tokens makes every prompt --prompt-len tokens on both sides.

The sides alternate: trainer.train() drives TRL's loop and a callback runs one of our iterations after
each TRL optimizer step, so both see the same machine load. The first --warmup iterations of each side
(compilation, allocator warm-up) are dropped; the table shows medians of the other --iters.

    pip install -e .[bench]   # torch, trl
    python bench/vs_trl.py
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/vs_trl.py
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_model_args, cpu_seconds, data_mesh, machine_line, markdown_table, median,  # noqa: E402
                    model_config)

from sqlm_jax.defaults import base_config  # noqa: E402
from sqlm_jax.learner import Learner, fetch  # noqa: E402
from sqlm_jax.models import load_pretrained  # noqa: E402
from sqlm_jax.sampling import SamplingParams, sample  # noqa: E402

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="samples per prompt (TRL's num_generations)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kl-coef", type=float, default=0.04, help="beta (TRL) = kl_coef (ours), k3 estimator")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--micro-batch", type=int, default=32, help="our sequences per gradient-accumulation step")
    p.add_argument("--trl-batch", type=int, default=32, help="TRL per_device_train_batch_size")
    p.add_argument("--recompute-old-logprobs", action="store_true",
                   help="ours: old log-probs by a forward pass (rl.reuse_sampler_logprobs=False)")
    p.add_argument("--no-shared-prompt-pass", action="store_true",
                   help="ours: one pass per row over prompt and response (rl.shared_prompt_pass=False)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_checkpoint(args, folder: Path):
    """Saves a random transformers Qwen2ForCausalLM in `folder`; returns a word-level tokenizer of
    exactly --vocab tokens (one token per space-separated word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    ours = model_config(args)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_layers, num_attention_heads=ours.num_heads,
        num_key_value_heads=ours.num_kv_heads, tie_word_embeddings=True, rms_norm_eps=ours.rms_norm_eps,
        rope_theta=ours.rope_theta, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
        bos_token_id=None))
    model.save_pretrained(folder)
    return tokenizer


def check_same_weights(folder: Path, ours_model, ids: list[int]) -> float:
    """Max |logit difference| between transformers and our load of `folder` on one sequence."""
    from transformers import Qwen2ForCausalLM
    with torch.no_grad():
        theirs = Qwen2ForCausalLM.from_pretrained(folder)(torch.tensor([ids])).logits.numpy()
    return float(np.abs(np.asarray(ours_model(jnp.asarray([ids]))) - theirs).max())


class OurGRPO:
    """This project's GRPO iteration: the sampler and the Learner, as Trainer runs them."""

    def __init__(self, args, folder: Path):
        self.args = args
        self.mesh = data_mesh()
        model, _ = load_pretrained(folder, mesh=self.mesh)
        c = base_config()
        c.optim.lr = args.lr
        c.rl.kl_coef, c.rl.kl_kind = args.kl_coef, "k3"
        c.rollout.batch_size = c.rl.mini_batch_size = args.prompts  # one update over all the completions
        c.rollout.n, c.rl.micro_batch_size = args.n, args.micro_batch
        c.rl.reuse_sampler_logprobs = not args.recompute_old_logprobs
        c.rl.shared_prompt_pass = not args.no_shared_prompt_pass
        c.train.steps = args.warmup + args.iters
        self.learner = Learner(c, self.mesh, *nnx.split(model))
        self.sampling = SamplingParams(max_new_tokens=args.new_tokens, n=args.n)  # temperature 1, no stop
        self.rng = np.random.default_rng(args.seed)
        self.prompt_group = self.learner.prompt_group(args.n)

    @property
    def model(self):
        return nnx.merge(*self.learner.policy)

    def iteration(self, prompts: list[list[int]], seed: int) -> dict[str, float]:
        """One iteration on `prompts`; returns seconds per phase."""
        t0, cpu = time.perf_counter(), cpu_seconds()
        out = sample(*self.learner.policy, prompts, params=self.sampling, seed=seed, mesh=self.mesh)
        t1 = time.perf_counter()
        rewards = self.rng.random((len(prompts), self.args.n), np.float32)  # the dummy reward
        batch = jax.block_until_ready(self.learner.batch(out, np.ones(len(out.token_lists), bool), rewards))
        t2 = time.perf_counter()
        fetch({"policy": self.learner.update(batch)})
        t3 = time.perf_counter()
        return {"generation": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2, "total": t3 - t0,
                "cpu": cpu_seconds() - cpu}


def run_trl(args, folder: Path, prompt_texts: list[str], ours: OurGRPO, tokenizer) -> tuple[list, list]:
    """Runs TRL for warmup + iters steps, one of our iterations after each; returns both sides' timings."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    completions = args.prompts * args.n
    reward_rng = np.random.default_rng(args.seed)
    ours_times, trl_times = [], []

    def dummy_reward(completions, **kwargs):
        return reward_rng.random(len(completions)).tolist()

    class Alternate(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            self.start, self.cpu, self.generation = time.perf_counter(), cpu_seconds(), []

        def on_step_end(self, targs, state, control, **kwargs):
            total = time.perf_counter() - self.start
            trl_times.append({"generation": sum(self.generation), "update": total - sum(self.generation),
                              "total": total, "cpu": cpu_seconds() - self.cpu})
            i = len(ours_times)
            batch = prompt_texts[i * args.prompts:(i + 1) * args.prompts]
            ours_times.append(ours.iteration([tokenizer(t)["input_ids"] for t in batch], seed=i))
            print(f"iteration {i}: TRL {total:.2f} s, ours {ours_times[-1]['total']:.2f} s", flush=True)

    callback = Alternate()
    config = GRPOConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=args.trl_batch,
        gradient_accumulation_steps=completions // args.trl_batch, num_generations=args.n,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, beta=args.kl_coef, loss_type="dapo", learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        max_steps=args.warmup + args.iters, use_cpu=True, bf16=False, seed=args.seed,
        model_init_kwargs={"dtype": "float32"}, report_to="none", save_strategy="no",
        logging_steps=10 ** 6, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(folder), reward_funcs=dummy_reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompt_texts}),
                          processing_class=tokenizer, callbacks=[callback])
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a, **kw):  # sampling, rewards, reference log-probs, advantages
        start = time.perf_counter()
        result = generate_and_score(*a, **kw)
        callback.generation.append(time.perf_counter() - start)
        return result

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    return ours_times, trl_times


def main():
    args = parse_args()
    if (args.prompts * args.n) % args.micro_batch or (args.prompts * args.n) % args.trl_batch:
        raise SystemExit("--micro-batch and --trl-batch must divide --prompts x --n")
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        compare(args, Path(tmp))


def compare(args, folder: Path) -> None:
    tokenizer = make_checkpoint(args, folder)
    rng = np.random.default_rng(args.seed)
    steps = args.warmup + args.iters
    prompt_texts = [" ".join(f"w{i}" for i in rng.integers(3, args.vocab, args.prompt_len))
                    for _ in range(args.prompts * steps)]

    ours = OurGRPO(args, folder)
    diff = check_same_weights(folder, ours.model, tokenizer(prompt_texts[0])["input_ids"])
    print(f"same weights: max |logit difference| transformers vs ours = {diff:.1e}")
    print(f"torch threads {torch.get_num_threads()}; {machine_line()}")
    ours_times, trl_times = run_trl(args, folder, prompt_texts, ours, tokenizer)

    tokens = args.prompts * args.n * args.new_tokens
    keep = slice(args.warmup, None)
    med = lambda times, k: median([t[k] for t in times[keep]])
    o, t = {k: med(ours_times, k) for k in ours_times[0]}, {k: med(trl_times, k) for k in trl_times[0]}
    rows = [
        ["s per iteration", f"{o['total']:.2f}", f"{t['total']:.2f}", f"**{t['total'] / o['total']:.2f}x**"],
        ["completion tokens/s", f"{tokens / o['total']:,.0f}", f"{tokens / t['total']:,.0f}", ""],
        ["CPU s per iteration (process, all threads)", f"{o['cpu']:.2f}", f"{t['cpu']:.2f}",
         f"{t['cpu'] / o['cpu']:.2f}x"],
        ["  generation (TRL: + rewards, reference log-probs, advantages)", f"{o['generation']:.2f}",
         f"{t['generation']:.2f}", ""],
        ["  reference" + (" and old" if args.recompute_old_logprobs else "") + " log-probs, advantages",
         f"{o['logprobs']:.2f}", "(above)", ""],
        ["  update (TRL: policy forward + backward, AdamW)", f"{o['update']:.2f}", f"{t['update']:.2f}", ""],
        ["first iteration (ours: compilation)", f"{ours_times[0]['total']:.2f}", f"{trl_times[0]['total']:.2f}",
         ""],
    ]
    print(f"\nGRPO iteration: {args.prompts} prompts x {args.n} samples x {args.new_tokens} new tokens, "
          f"prompts {args.prompt_len} tokens, {model_config(args).num_params() / 1e6:.2f}M parameters; "
          f"median of {args.iters} after {args.warmup} warm-up; ours micro-batch {args.micro_batch}, "
          f"prompt groups of {ours.prompt_group}, "
          f"{'recomputed' if args.recompute_old_logprobs else 'sampler'} old log-probs, "
          f"TRL batch {args.trl_batch}; load average now {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(["", "ours", "TRL", "speed-up"], rows))


if __name__ == "__main__":
    main()
