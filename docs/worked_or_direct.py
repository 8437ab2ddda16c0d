"""How much of a tiny run's gain is the choice to work problems out (docs/results.md; it trains nothing).

    python docs/worked_or_direct.py --config=configs/tiny_algebra.py sqlm_jax/assets/tiny_algebra runs/x/export

For each model: held-out greedy accuracy as it answers, and with every answer forced to open with the
corpus's scratchpad tag `<think>` (the prefix is fed as prompt, then counted as part of the answer),
each split by a problem class (algebra: one variable / systems; arithmetic: multiplier <= 5 / >= 6)
with the share of greedy answers that are worked. A self-play gain that the base model reaches by being
made to work every problem is a change of habit, not of skill.
"""
from __future__ import annotations

import argparse
import runpy

import numpy as np

from sqlm_jax.models import load_pretrained
from sqlm_jax.rollout import solver_prompts
from sqlm_jax.sampling import generate
from sqlm_jax.tasks import get_task
from sqlm_jax.tokenizer import load_tokenizer

WORKED = "<think>"
# A problem's class, from its text: (name of the True class, name of the False class, test).
CLASSES = {"algebra": ("systems", "one variable", lambda text: "," in text),
           "arithmetic": ("b >= 6", "b <= 5", lambda text: int(text.rsplit("*", 1)[1]) >= 6)}


def greedy_answers(model, tok, prompts: list[list[int]], prefix: str, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy answers to `prompts`, each opened with `prefix` (fed as prompt, kept in the answer)."""
    forced = tok.encode(prefix) if prefix else []
    texts = []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, [p + forced for p in prompts[start:start + batch_size]],
                       max_new_tokens=max_new_tokens, temperature=0.0, n=1, stop_ids=tok.stop_ids,
                       pad_id=tok.pad_id, seed=0)
        texts += [prefix + tok.decode(t) for t in out.token_lists]
    return texts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="the run's config file (task, held-out set)")
    parser.add_argument("models", nargs="+", help="HF model folders (the base, runs' export/)")
    args = parser.parse_args()
    c = runpy.run_path(args.config)["get_config"]()
    task = get_task(c.task, **{k: v for k, v in c.task_options.items() if v is not None})
    problems = task.heldout_problems(c.eval.num_problems, c.eval.seed)
    yes, no, test = CLASSES[c.task]
    in_class = np.array([test(q.text) for q, _ in problems])
    print(f"| model | answers | greedy | {no} | {yes} | worked |\n|---|---|---|---|---|---|")
    for path in args.models:
        model, _ = load_pretrained(path, dtype="float32", compute_dtype="float32")
        tok = load_tokenizer(path)
        prompts = solver_prompts(tok, task, [q for q, _ in problems])
        for name, prefix in (("as it answers", ""), ("forced worked", WORKED)):
            texts = greedy_answers(model, tok, prompts, prefix, c.eval.max_new_tokens, c.eval.batch_size)
            scores = np.array([task.score(t, truth) for t, (_, truth) in zip(texts, problems)])
            worked = np.mean([t.startswith(WORKED) for t in texts])
            print(f"| {path} | {name} | {scores.mean():.3f} | {scores[~in_class].mean():.3f} | "
                  f"{scores[in_class].mean():.3f} | {worked:.0%} |", flush=True)


if __name__ == "__main__":
    main()
