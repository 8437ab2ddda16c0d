"""Tables and figures of docs/results.md from finished tiny runs (it reads runs; it trains nothing).

    python docs/tiny_results.py runs/tiny_seed0 runs/tiny_seed1 runs/tiny_seed2 \
        --ablation format-only=runs/tiny_format_reward --ablation pregenerated=runs/tiny_pregenerated

Prints the markdown tables (every evaluation of every run; the proposals' overlap with the held-out
set) and writes docs/img/tiny_*.png.
"""
from __future__ import annotations

import argparse
import json
import runpy
import statistics
from pathlib import Path

from sqlm_jax.plots import compare_runs, read_jsonl
from sqlm_jax.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
IMG = Path(__file__).with_name("img")


def run_table(runs: dict[str, Path]) -> str:
    """One row per run and evaluation step: greedy, sampled and majority accuracy."""
    lines = ["| run | step | greedy | sampled (mean of 4) | majority of 4 |", "|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    for name, workdir in runs.items():
        for e in json.loads((workdir / "summary.json").read_text())["eval_history"]:
            lines.append(f"| {name} | {e['step']} | {fmt(e['eval/greedy_accuracy'])} | "
                         f"{fmt(e.get('eval/sampled_accuracy'))} | {fmt(e.get('eval/majority_accuracy'))} |")
    return "\n".join(lines)


def gains(runs: dict[str, Path]) -> dict[str, float]:
    out = {}
    for name, workdir in runs.items():
        s = json.loads((workdir / "summary.json").read_text())
        out[name] = s["final_accuracy"] - s["base_accuracy"]
    return out


def overlap(workdir: Path, heldout: set[str]) -> tuple[int, int]:
    """(proposals that are held-out questions, all proposals) over the run."""
    proposals = [p.strip() for line in read_jsonl(workdir / "questions.jsonl") for p in line["proposals"]]
    return sum(p in heldout for p in proposals), len(proposals)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("seeds", nargs="+", type=Path, help="workdirs of the tiny config's seeds")
    parser.add_argument("--ablation", action="append", default=[], help="NAME=WORKDIR")
    args = parser.parse_args()
    seeds = {p.name: p for p in args.seeds}
    ablations = dict((k, Path(v)) for k, v in (a.split("=", 1) for a in args.ablation))
    print(run_table({**seeds, **ablations}), "\n")
    seed_gains = gains(seeds)
    print("gains:", {k: round(v, 3) for k, v in {**seed_gains, **gains(ablations)}.items()},
          "median over seeds:", round(statistics.median(seed_gains.values()), 3), "\n")

    config = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    task = get_task("arithmetic", **{k: v for k, v in config.task_options.items() if v is not None})
    heldout = {q.text for q, _ in task.heldout_problems(config.eval.num_problems, config.eval.seed)}
    for name, workdir in {**seeds, **ablations}.items():
        hits, total = overlap(workdir, heldout)
        print(f"{name}: {hits} of {total} proposals are held-out questions ({hits / max(total, 1):.2%})")

    IMG.mkdir(exist_ok=True)
    for key, stem in [("eval/greedy_accuracy", "greedy"), ("eval/sampled_accuracy", "sampled")]:
        print(compare_runs({**seeds, **ablations}, IMG / f"tiny_{stem}.png", key=key))


if __name__ == "__main__":
    main()
