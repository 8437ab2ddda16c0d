"""Dynamic sampling on the tiny config at equal wall-clock (issue 17; the table in docs/results.md).

    python docs/dynamic_sampling.py --minutes 6 --root runs/dynamic_sampling

Runs configs/tiny.py three times, one after another, each with the same self-play budget
(`train.max_minutes`; steps are not the limit) and seed:
  plain        the method as it is (no filter; configs/tiny.py now filters by default, so it is
               switched off here);
  filter       rl.filter_zero_variance: groups with all-equal rewards leave the update;
  filter+refill  the same, with up to 2 extra rounds of questions a step to refill the dropped groups
               (rollout.max_extra_batches=2), which costs time and so leaves fewer steps.
A workdir that already holds summary.json is read, not rerun. Prints per run the fraction of
zero-variance groups per role (all steps; the first and last 20), what the filter did, the steps
reached and the held-out greedy accuracy (base, best, end). Run it on an otherwise idle machine:
the budget is wall-clock.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "plain": ["--config.rl.filter_zero_variance=False"],  # configs/tiny.py filters since issue 18
    "filter": ["--config.rl.filter_zero_variance=True"],
    "filter+refill": ["--config.rl.filter_zero_variance=True", "--config.rollout.max_extra_batches=2"],
}


def run(name: str, workdir: Path, minutes: float, seed: int) -> None:
    if (workdir / "summary.json").is_file():
        return
    cmd = [sys.executable, "-m", "sqlm_jax.main", "--config=configs/tiny.py", f"--config.workdir={workdir}",
           "--config.train.steps=100000", f"--config.train.max_minutes={minutes}", f"--config.seed={seed}",
           *RUNS[name]]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def row(name: str, workdir: Path) -> str:
    steps = [s for s in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if "reward/solver" in s]
    summary = json.loads((workdir / "summary.json").read_text())
    greedy = [e["eval/greedy_accuracy"] for e in summary["eval_history"]]
    zv = lambda role, part: f"{np.mean([s[f'zero_variance/{role}'] for s in part]):.2f}"
    fraction = lambda role: " / ".join(zv(role, part) for part in (steps, steps[:20], steps[-20:]))
    mean = lambda key: f"{np.mean([s[key] for s in steps if key in s]):.2f}" if key in steps[0] else "–"
    both = lambda what: " / ".join(mean(f"dynamic_sampling/{role}_{what}") for role in ("solver", "proposer"))
    return (f"| {name} | {len(steps)} | {fraction('proposer')} | {fraction('solver')} | "
            f"{both('dropped')} | {both('extra_batches')} | {both('masked')} | {greedy[0]:.3f} | {max(greedy[1:]):.3f} | {greedy[-1]:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=6.0, help="self-play budget of each run")
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "dynamic_sampling")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in RUNS:
        run(name, args.root / name, args.minutes, args.seed)
    print(f"\n{args.minutes:g} min of self-play each, seed {args.seed}; zero-variance groups: all steps / "
          "first 20 / last 20\n")
    print("| run | steps | zero-variance, proposer | zero-variance, solver | groups dropped (solver / "
          "proposer) | extra rounds / step | still masked | greedy base | best | end |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for name in RUNS:
        print(row(name, args.root / name))


if __name__ == "__main__":
    main()
