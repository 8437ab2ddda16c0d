"""Long-tailed response lengths: our sampler with slot refill, as a static batch, and transformers'
`generate`, on the same weights and CPU, in one process.

    python bench/rollout_lengths.py                        # 64 prompts x n=4 = 256 rows, 512 new tokens
    python bench/rollout_lengths.py --rows-in-flight 16,64 --reps 3 --skip-hf

The model is bench/sampling.py's tiny Qwen2 shape (4.2M parameters, vocab 512) with random weights and
its final norm scaled to 0.01, so its next-token distributions are nearly uniform: with --stop-tokens
8 stop ids out of 512, each step ends a row with probability ~1/64, and lengths are geometric (mean ~64
= max / 8, a few rows near 512), the shape of real rollouts (many short answers, a few long traces).
Sampling at temperature 1, prompts of --prompt tokens.

Rows: "refill" decodes --rows-in-flight rows at a time and gives a stopped row's slot to the next
pending row (SamplingParams.rows_in_flight); "static" decodes every row at once until the last stops
(rows_in_flight=0); transformers samples the same batch with its own generate (its own random numbers,
so its lengths differ in detail, not in distribution). Useful tokens/s counts each row's tokens up to
and including its stop token. Refill and static must give the same tokens row for row (checked).
Memory: for ours XLA's accounting of the compiled sampler (temporaries, the KV cache included, plus
arguments and outputs); for transformers the KV cache it holds at the end (its peak; activations not
counted). Timings are the median of --reps, the cases interleaved rep by rep (this machine's speed
drifts by ~20% between runs, so only figures from one run are compared).
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
from common import machine_line, markdown_table, timed  # noqa: E402

from sqlm_jax import mesh as mesh_lib, sampling  # noqa: E402
from sqlm_jax.models import load_pretrained  # noqa: E402
from sqlm_jax.tokenizer import pad_left  # noqa: E402

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
MiB = 2 ** 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--stop-tokens", type=int, default=8, help="stop ids out of the 512 (p(stop) per step)")
    p.add_argument("--rows-in-flight", default="16,32,64", help="budgets to compare (comma-separated)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-hf", action="store_true")
    return p.parse_args()


def ours_memory_mib(model, prompts, params) -> float:
    """XLA's temp + argument + output bytes of the compiled sampler for these prompts and knobs."""
    from flax import nnx
    tokens, mask = pad_left(prompts, params.pad_id, sampling.bucket_length(max(map(len, prompts))))
    graphdef, weights = nnx.split(model)
    lowered = sampling._sample.lower(graphdef, weights, *mesh_lib.shard_rows((tokens, mask), None),
                                     sampling.jax.random.key(0), params=params, mesh=None)
    m = lowered.compile().memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / MiB


def main():
    args = parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="bench_lengths_")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).eval()
    with torch.no_grad():
        hf.model.norm.weight.fill_(0.01)  # near-uniform next tokens: p(stop) ~ stop tokens / vocab
    hf.save_pretrained(folder)
    ours, _ = load_pretrained(folder)
    stops = tuple(range(1, 1 + args.stop_tokens))
    rng = np.random.RandomState(0)
    prompts = rng.randint(1 + args.stop_tokens, CONFIG["vocab_size"], (args.prompts, args.prompt)).tolist()
    knobs = dict(max_new_tokens=args.new, n=args.n, stop_ids=stops, temperature=1.0, seed=0)
    budgets = [int(b) for b in args.rows_in_flight.split(",")]
    cases = {"static (every row at once)": 0, **{f"refill, {b} rows in flight": b for b in budgets}}
    outputs, walls = {}, {name: [] for name in cases}
    run_ours = lambda budget: sampling.generate(ours, prompts, rows_in_flight=budget, **knobs)
    for name, budget in cases.items():
        outputs[name] = run_ours(budget)  # compile
    hf_useful, hf_cache = None, None
    if not args.skip_hf:
        walls["transformers generate"] = []
    for _ in range(args.reps):
        for name, budget in cases.items():
            walls[name].append(timed(lambda: run_ours(budget).tokens)[1])
        if not args.skip_hf:
            ids = torch.tensor(prompts)
            out, wall = timed(lambda: _hf_generate(hf, ids, args, stops))[:2]
            walls["transformers generate"].append(wall)
            hf_useful, hf_cache = out
    median = {name: float(np.median(w)) for name, w in walls.items()}
    static = outputs["static (every row at once)"]
    lengths = np.array([len(t) for t in static.token_lists])
    for name in cases:
        assert outputs[name].token_lists == static.token_lists, f"{name}: tokens differ from the static batch"
    useful = int(lengths.sum())
    static_s = median["static (every row at once)"]
    rows = []
    for name, budget in cases.items():
        params = sampling.SamplingParams(rows_in_flight=budget, **{k: v for k, v in knobs.items() if k != "seed"})
        rate = useful / median[name]
        rows.append([name, f"{median[name]:.2f} s", f"{rate:,.0f}", f"{static_s / median[name]:.2f}x",
                     f"{ours_memory_mib(ours, prompts, params):,.0f} MiB (XLA)"])
    if not args.skip_hf:
        rate = hf_useful / median["transformers generate"]
        rows.append(["transformers generate", f"{median['transformers generate']:.2f} s", f"{rate:,.0f}",
                     f"{rate * static_s / useful:.2f}x", f"{hf_cache:,.0f} MiB (KV cache)"])
    print(f"{args.prompts} prompts x n={args.n} = {len(lengths)} rows, prompt {args.prompt}, max {args.new} new "
          f"tokens; lengths mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}; "
          f"useful tokens {useful:,}; refill and static identical row for row")
    print(markdown_table(["sampler", "median time", "useful tokens/s", "vs static", "peak memory"], rows))
    print(f"median of {args.reps}; {machine_line()}; torch threads {torch.get_num_threads()}")


def _hf_generate(hf, ids, args, stops) -> tuple[int, float]:
    """(useful tokens, KV cache MiB at the end) of transformers' sampled generate on `ids`."""
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n,
                          eos_token_id=list(stops), pad_token_id=0, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:].numpy()
    is_stop = np.isin(new, stops)
    lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, new.shape[1])
    cache = out.past_key_values
    tensors = [t for layer in (cache.layers if hasattr(cache, "layers") else []) for t in (layer.keys, layer.values)]
    if not tensors:
        tensors = [t for layer in cache for t in layer[:2]]
    return int(lengths.sum()), sum(t.numel() * t.element_size() for t in tensors) / MiB


if __name__ == "__main__":
    main()
