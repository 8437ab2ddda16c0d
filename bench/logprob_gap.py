"""How far the sampler's log-probs are from the trainer's under the same weights (rl.rollout_is).

The sampler decodes one token at a time against its KV cache; the trainer runs one pass over prompt
and response. In float32 the two agree to rounding; in bfloat16 compute they do not, and
rl.reuse_sampler_logprobs then starts PPO's ratio off 1. This samples the shipped tiny arithmetic
model (a trained model: peaked distributions, as a real one) and the same architecture with random
weights, at temperature 1, in each compute dtype, and prints per-token statistics of
log π_train − log π_sampler and of the importance weights rl.rollout_is would apply.

    python bench/logprob_gap.py [--rows 256] [--tokens 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

from sqlm_jax import sampling  # noqa: E402
from sqlm_jax.models import load_pretrained  # noqa: E402
from sqlm_jax.rollout_is import truncated_is_weights  # noqa: E402
from sqlm_jax.tokenizer import load_tokenizer  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "sqlm_jax" / "assets" / "tiny"


def trainer_logprobs(model, sample) -> np.ndarray:
    """log p(response token) `[N, R]` from one full pass over prompt + response, as the update's."""
    prompt, prompt_mask = jnp.asarray(sample.prompt_tokens), jnp.asarray(sample.prompt_mask)
    tokens, mask = jnp.asarray(sample.tokens), jnp.asarray(sample.mask)
    logits = model(jnp.concatenate([prompt, tokens], 1), jnp.concatenate([prompt_mask, mask], 1))
    logits = logits[:, prompt.shape[1] - 1:-1].astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    return np.asarray(jnp.where(mask, logp, 0.0))


def gap_row(name: str, dtype: str, random: bool, args) -> str:
    model, cfg = load_pretrained(MODEL, compute_dtype=dtype)
    if random:
        graphdef, state = nnx.split(model)
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        model = nnx.merge(graphdef, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    tokenizer = load_tokenizer(MODEL)
    prompts = [tokenizer.chat_prompt(f"What is {100 + 7 * i} * {311 + 3 * i}?") for i in range(args.rows // 4)]
    params = sampling.SamplingParams(max_new_tokens=args.tokens, temperature=1.0, top_k=0, top_p=1.0, n=4,
                                     stop_ids=(int(cfg.eos_token_id or 0),), pad_id=0)
    sample = sampling.sample(*nnx.split(model), prompts, params=params, seed=0)
    mask = np.asarray(sample.mask)
    sampler, trainer = np.where(mask, np.asarray(sample.logprobs), 0.0), trainer_logprobs(model, sample)
    d = (trainer - sampler)[mask]
    w = lambda level: np.asarray(truncated_is_weights(trainer, sampler, mask, level, 2.0))[mask]
    seq = np.exp(np.minimum((trainer - sampler).sum(1), 50.0))
    return (f"| {name} | {dtype} | {mask.sum()} | {np.median(np.abs(d)):.2e} | {np.percentile(np.abs(d), 99):.2e} | "
            f"{np.abs(d).max():.2e} | {np.mean((np.exp(d) < 0.5) | (np.exp(d) > 2)):.4f} | "
            f"{np.mean(np.abs(w('token') - 1) > 0.1):.4f} | {np.median(np.abs(np.log(seq))):.2e} | "
            f"{np.mean(seq > 2.0):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(machine_line())
    print("| model | compute | tokens | median abs gap | p99 | max | ratio outside [1/2, 2] | token weight off 1 by > 0.1 "
          "| median abs log row ratio | rows capped (row ratio > 2) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, random in (("tiny arithmetic (trained)", False), ("same shape, random weights", True)):
        for dtype in ("float32", "bfloat16"):
            print(gap_row(name, dtype, random, args), flush=True)


if __name__ == "__main__":
    main()
