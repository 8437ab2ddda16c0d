"""Sampler throughput against transformers' `generate`, on the same weights and CPU, in one process.

    python bench/sampling.py                       # batch 8, 64, 256 + n=8 samples of 8 prompts, 10 reps
    python bench/sampling.py --batches 8 --reps 3

A tiny Qwen2-shaped model (vocab 512, hidden 256, 4 layers, 4 heads / 2 kv heads, MLP 1024: 4.2M
parameters), random weights, prompts of 32 tokens, 64 new tokens, greedy on both sides (transformers
with min_new_tokens so both always generate 64). Timings are the best of `--reps` runs, ours and
transformers' interleaved so a busy machine slows both alike.

Columns: tokens/s (new tokens only), the ratio to transformers, our decode FLOP rate (matmul and
attention FLOPs of the decode steps over decode time = full run minus a prefill-only run) as a fraction
of the float32 matmul peak measured here (common.matmul_peak_flops: the best of --reps jitted 2048³
matmuls), and compile time (first call minus
a steady call: tracing + XLA compile of every shape the call needs).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak_flops, timed  # noqa: E402

from sqlm_jax import sampling  # noqa: E402
from sqlm_jax.models import load_pretrained  # noqa: E402

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _timed(fn) -> float:
    """Wall-clock seconds of `fn()` (common.timed, which also waits for JAX arrays it returns)."""
    return timed(fn)[1]


def decode_flops(cfg, rows: int, prompt: int, new: int) -> float:
    """FLOPs of decode steps 1 … new-1 (prefill and the first token excluded) over `rows` rows."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qkv = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = 2 * (layers * (qkv + cfg.num_heads * cfg.head_dim * d + 3 * d * f) + d * v)
    keys = sum(prompt + i for i in range(1, new))  # keys attended by the steps' queries
    attention = 4 * layers * cfg.num_heads * cfg.head_dim * keys  # q·k and p·v
    return rows * (per_token * (new - 1) + attention)


class Runner:
    """Our sampler and transformers' generate on one set of random weights."""

    def __init__(self, folder):
        self.ours, self.cfg = load_pretrained(folder)
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()

    def ours_fn(self, prompts: np.ndarray, new: int, **knobs):
        args = {"max_new_tokens": new, "temperature": 0.0, **knobs}
        return lambda: sampling.generate(self.ours, prompts.tolist(), **args).tokens.block_until_ready()

    def hf_fn(self, prompts: np.ndarray, new: int, **knobs):
        ids = torch.tensor(prompts)
        args = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0, **knobs}

        def run():
            with torch.no_grad():
                out = self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
            assert out.shape[1] == ids.shape[1] + new
        return run


def best_of(fns: dict, reps: int) -> dict[str, float]:
    """Best wall time of each function, the functions interleaved rep by rep."""
    times = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] = min(times[name], _timed(fn))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,64,256")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8, help="n for the n-samples row (0: skip)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="bench_sampling_")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).save_pretrained(folder)
    runner = Runner(folder)
    peak = matmul_peak_flops(calls=args.reps).per_second
    print(f"model: {runner.cfg.num_params() / 1e6:.1f}M params; prompt {args.prompt}, {args.new} new tokens; "
          f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s; torch threads {torch.get_num_threads()}")
    print(f"{'case':<18}{'ours tok/s':>11}{'HF tok/s':>10}{'ratio':>7}{'decode GFLOP/s':>16}"
          f"{'of peak':>9}{'compile s':>11}")
    rng = np.random.RandomState(0)
    for batch in map(int, args.batches.split(",")):
        prompts = rng.randint(1, CONFIG["vocab_size"], (batch, args.prompt))
        ours, prefill_only = runner.ours_fn(prompts, args.new), runner.ours_fn(prompts, 1)
        compile_s = _timed(ours)
        prefill_only()
        times = best_of({"ours": ours, "hf": runner.hf_fn(prompts, args.new), "prefill": prefill_only},
                        args.reps)
        compile_s -= times["ours"]
        flops = decode_flops(runner.cfg, batch, args.prompt, args.new) / (times["ours"] - times["prefill"])
        _row(f"batch {batch}", batch * args.new, times, compile_s, flops, peak)
    if args.samples:
        n, batch = args.samples, 8
        prompts = rng.randint(1, CONFIG["vocab_size"], (batch, args.prompt))
        sample = dict(temperature=1.0)
        ours = runner.ours_fn(prompts, args.new, n=n, **sample)
        compile_s = _timed(ours)
        hf = runner.hf_fn(prompts, args.new, num_return_sequences=n, do_sample=True, top_k=0, top_p=1.0,
                          **sample)
        times = best_of({"ours": ours, "hf": hf}, args.reps)
        _row(f"{batch} prompts x n={n}", batch * n * args.new, times, compile_s - times["ours"], None, peak)


def _row(name, tokens, times, compile_s, flops, peak):
    ours, hf = tokens / times["ours"], tokens / times["hf"]
    rate = f"{flops / 1e9:16.1f}{flops / peak:9.0%}" if flops else f"{'':16}{'':9}"
    print(f"{name:<18}{ours:11.0f}{hf:10.0f}{ours / hf:7.2f}{rate}{compile_s:11.2f}", flush=True)


if __name__ == "__main__":
    main()
