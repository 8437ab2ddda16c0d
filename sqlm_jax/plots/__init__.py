"""Pictures of a run: rewards and held-out accuracy, the emergent curriculum, a PCA of the questions.

Everything is read back from what a run writes in its workdir (``metrics.jsonl``, ``questions.jsonl``,
``samples.jsonl``, ``summary.json``; see ``sqlm_jax.run_log``), so the plots can be drawn while a run
is still going, after it ended, or for a run made on another machine::

    python -m sqlm_jax.plots WORKDIR [WORKDIR ...] [--task arithmetic] [--compare accuracy.png]

What a question's difficulty is belongs to its task (``Task.question_features`` and
``Task.curriculum_panels``); this package only reads, reduces and lays out:

- ``run_files``: reading a workdir back (metrics, proposals, the run's task);
- ``step_stats``: moving averages and per-step-bin means with 95% intervals;
- ``embedding``: the model-free question embedding, its PCA and the questions' spread;
- ``figures``: one function per figure, each returning a matplotlib Figure; ``save`` writes a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from sqlm_jax.plots.figures import (compare_runs, curriculum_figure, questions_pca_figure, rewards_figure,
                                    save)
from sqlm_jax.plots.run_files import load_proposals, read_jsonl, run_task_name, solver_samples
from sqlm_jax.tasks import TASKS, get_task

PLOTS_DIR = "plots"


def plot_run(workdir: str | Path, task_name: str | None = None) -> list[Path]:
    """Writes rewards.png, curriculum.png and questions_pca.png into WORKDIR/plots/ and returns their
    paths. The task is `task_name`, else the one summary.json names (a ValueError saying to pass it
    when there is none). Works on a run in progress: missing files and lines give empty panels with
    a note."""
    workdir = Path(workdir)
    task = get_task(task_name or run_task_name(workdir))
    metric_lines = read_jsonl(workdir / "metrics.jsonl")
    proposals = load_proposals(read_jsonl(workdir / "questions.jsonl"))
    n = solver_samples(metric_lines, read_jsonl(workdir / "samples.jsonl"), proposals.solver_reward_sum)
    out = workdir / PLOTS_DIR
    title = f"{workdir.name} ({task.name})"
    return [save(rewards_figure(metric_lines, title), out / "rewards.png"),
            save(curriculum_figure(proposals, task, n, title), out / "curriculum.png"),
            save(questions_pca_figure(proposals, task, title), out / "questions_pca.png")]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """The command line: plots of each WORKDIR, and optionally their accuracies on one axis; prints
    and returns the PNG paths."""
    parser = argparse.ArgumentParser(prog="python -m sqlm_jax.plots", description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (holding metrics.jsonl etc.)")
    parser.add_argument("--task", choices=sorted(TASKS),
                        help="task of the runs (default: the one each run's summary.json names)")
    parser.add_argument("--compare", metavar="PNG",
                        help="also draw every run's held-out greedy accuracy on one axis into PNG")
    args = parser.parse_args(argv)
    paths = []
    for workdir in args.workdirs:
        if not Path(workdir).is_dir():
            parser.error(f"{workdir} is not a directory")
        try:
            task_name = args.task or run_task_name(workdir)
        except ValueError as e:  # one line naming the fix, not a traceback
            parser.error(str(e))
        paths += plot_run(workdir, task_name)
    if args.compare:
        # Labels are the directory names, or the whole paths where two names are the same.
        names = [Path(w).name for w in args.workdirs]
        labels = names if len(set(names)) == len(names) else list(args.workdirs)
        paths.append(compare_runs(dict(zip(labels, args.workdirs)), args.compare))
    for path in paths:
        print(path)
    return paths


__all__ = ["PLOTS_DIR", "compare_runs", "main", "plot_run", "read_jsonl"]
