"""How far the coding solver's training reward is from the truth, in a finished tiny coding run.

    python docs/coding_reward_truth.py runs/tiny_coding_seed0 [...]

For the proposals a run logged in samples.jsonl whose statement is one of the generator's problems,
each logged program is run again in the sandbox on 5 of the generator's ground-truth tests: the
reward it deserved. Prints, per run and for the first and second half of its steps, the mean reward
it got (the fraction of the proposer's own tests passed), the mean it deserved, and their correlation.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from sqlm_jax import sandbox
from sqlm_jax.tasks import list_problems
from sqlm_jax.tasks.coding import extract_program, parse_proposal


def reward_and_truth(samples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """[M] rewards got and [M] ground-truth pass fractions of the logged programs of parsable proposals
    (a program-less answer deserves 0, as it got; no program runs for it)."""
    got, jobs, slots = [], [], []
    rng = random.Random(0)
    for sample in samples:
        parsed = parse_proposal(sample["proposal"])
        problem = parsed and list_problems.parse_problem(parsed[0])
        if problem is None:
            continue
        truth = list_problems.tests_for(problem, rng)
        for answer, reward in zip(sample["answers"], sample["solver_rewards"]):
            got.append(reward)
            program = extract_program(answer)
            if program is not None:
                jobs.append((program, truth))
                slots.append(len(got) - 1)
    deserved = np.zeros(len(got))
    for slot, result in zip(slots, sandbox.run_many(jobs, timeout_s=10.0)):
        deserved[slot] = result.fraction
    return np.asarray(got), deserved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    for workdir in parser.parse_args().runs:
        samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
        middle = (max(s["step"] for s in samples) + 1) / 2
        for label, part in [("first half", [s for s in samples if s["step"] < middle]),
                            ("second half", [s for s in samples if s["step"] >= middle])]:
            got, deserved = reward_and_truth(part)
            corr = np.corrcoef(got, deserved)[0, 1] if got.std() and deserved.std() else float("nan")
            print(f"{workdir.name} {label}: {len(got)} programs; reward got {got.mean():.3f}, deserved "
                  f"{deserved.mean():.3f}, correlation {corr:.2f}")


if __name__ == "__main__":
    main()
