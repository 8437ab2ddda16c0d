"""Tables and figures of docs/results.md from finished tiny runs (it reads runs; it trains nothing).

    python docs/tiny_results.py runs/tiny_seed0 runs/tiny_seed1 runs/tiny_seed2 \
        --ablation format-only=runs/tiny_format_reward --ablation pregenerated=runs/tiny_pregenerated
    python docs/tiny_results.py --name=tiny_algebra runs/tiny_algebra_seed0 ...

Prints the markdown tables (every evaluation of every run; the proposals' overlap with the held-out
set, from the task and held-out set each run's summary.json names) and writes docs/img/NAME_*.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sqlm_jax import tiny_coding_corpus
from sqlm_jax.plots import compare_runs, read_jsonl
from sqlm_jax.tasks import get_task

IMG = Path(__file__).with_name("img")


def run_table(runs: dict[str, Path]) -> str:
    """One row per run and evaluation step: greedy, sampled and majority accuracy."""
    histories = {name: json.loads((w / "summary.json").read_text())["eval_history"] for name, w in runs.items()}
    # eval.second_set's greedy accuracy ("eval/beyond_greedy_accuracy"), where the runs have one.
    second = sorted({k for h in histories.values() for e in h for k in e
                     if k.endswith("_greedy_accuracy") and k != "eval/greedy_accuracy"})
    names = [k[len("eval/"):-len("_greedy_accuracy")] + " (greedy)" for k in second]
    header = ["run", "step", "greedy", "sampled (mean of 4)", "majority of 4", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    for name, history in histories.items():
        for e in history:
            values = [e["eval/greedy_accuracy"], e.get("eval/sampled_accuracy"), e.get("eval/majority_accuracy"),
                      *(e.get(k) for k in second)]
            lines.append(f"| {name} | {e['step']} | " + " | ".join(map(fmt, values)) + " |")
    return "\n".join(lines)


def gains(runs: dict[str, Path]) -> dict[str, float]:
    out = {}
    for name, workdir in runs.items():
        s = json.loads((workdir / "summary.json").read_text())
        out[name] = s["final_accuracy"] - s["base_accuracy"]
    return out


def overlap(workdir: Path) -> tuple[int, int]:
    """(proposals whose question is a held-out question, all proposals) over the run."""
    s = json.loads((workdir / "summary.json").read_text())
    task = get_task(s["task"], **s["task_options"])
    heldout = {q.text.strip() for q, _ in task.heldout_problems(s["eval"]["num_problems"], s["eval"]["seed"])}
    proposals = [p for line in read_jsonl(workdir / "questions.jsonl") for p in line["proposals"]]
    questions = [q.text.strip() for q in map(task.parse_question, proposals) if q is not None]
    return sum(q in heldout for q in questions), len(proposals)


def proposer_tests(workdir: Path) -> str:
    """Coding runs: how often the proposer's own tests are wrong (against the generator's truth), in the
    first and the last fifth of the run's steps."""
    lines = read_jsonl(workdir / "questions.jsonl")
    fifth = max(len(lines) // 5, 1)
    parts = []
    for label, part in [("first fifth", lines[:fifth]), ("last fifth", lines[-fifth:])]:
        stats = tiny_coding_corpus.proposal_stats([p for line in part for p in line["proposals"]], set())
        parts.append(f"{label}: {stats['valid_fraction']:.0%} of proposals are the generator's problems with "
                     f"tests; {stats['wrong_test_fraction']:.1%} of their tests are wrong, "
                     f"{stats['proposals_with_a_wrong_test']:.0%} have at least one wrong test")
    stats = tiny_coding_corpus.proposal_stats([p for line in lines for p in line["proposals"]], set())
    by_length = ", ".join(f"{n}: {w:.0%}" for n, w in stats["wrong_test_fraction_by_input_length"].items())
    parts.append(f"wrong tests by the input's length, whole run: {by_length}")
    return "; ".join(parts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("seeds", nargs="+", type=Path, help="workdirs of the tiny config's seeds")
    parser.add_argument("--ablation", action="append", default=[], help="NAME=WORKDIR")
    parser.add_argument("--name", default="tiny", help="the figures' file names: docs/img/NAME_greedy.png ...")
    args = parser.parse_args()
    seeds = {p.name: p for p in args.seeds}
    ablations = dict((k, Path(v)) for k, v in (a.split("=", 1) for a in args.ablation))
    print(run_table({**seeds, **ablations}), "\n")
    seed_gains = gains(seeds)
    print("gains:", {k: round(v, 3) for k, v in {**seed_gains, **gains(ablations)}.items()},
          "median over seeds:", round(statistics.median(seed_gains.values()), 3), "\n")

    for name, workdir in {**seeds, **ablations}.items():
        hits, total = overlap(workdir)
        print(f"{name}: {hits} of {total} proposals are held-out questions ({hits / max(total, 1):.2%})")
        if json.loads((workdir / "summary.json").read_text())["task"] == "coding":
            print(f"  {name}, proposer's tests: {proposer_tests(workdir)}")

    IMG.mkdir(exist_ok=True)
    for key, stem in [("eval/greedy_accuracy", "greedy"), ("eval/sampled_accuracy", "sampled")]:
        print(compare_runs({**seeds, **ablations}, IMG / f"{args.name}_{stem}.png", key=key))


if __name__ == "__main__":
    main()
