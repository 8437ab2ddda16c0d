"""The run's figures, each a matplotlib Figure built from plain data (what `run_files` reads); `save`
writes one as a PNG.

Figures are drawn with matplotlib's object API on the Agg canvas, never through pyplot, so no
display is needed, the caller's backend is left alone, and a test can read back what was drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sqlm_jax.plots.embedding import embed_questions, feature_table, pca, subsample
from sqlm_jax.plots.run_files import Proposals, eval_series, logged_questions, metric_series
from sqlm_jax.plots.step_stats import binned_stats, moving_average, step_bins
from sqlm_jax.tasks import Task
from sqlm_jax.tasks.features import SOLVER_REWARD

DPI = 120

TRAIN_CURVES = (("reward/solver", "solver reward"), ("reward/proposer", "proposer reward"),
                ("proposals/valid", "valid proposals"))
EVAL_CURVES = (("eval/greedy_accuracy", "greedy", "-"),
               ("eval/sampled_accuracy", "sampled (mean of n)", "--"),
               ("eval/majority_accuracy", "majority of n", ":"))


def save(fig: Figure, path: Path) -> Path:
    """Writes the figure as a PNG at `path` (making its folder) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")


def _change(steps: np.ndarray, values: np.ndarray) -> str:
    """First → last value of a non-empty curve, with their steps."""
    return f"{values[0]:.3f} → {values[-1]:.3f} (step {steps[0]} → {steps[-1]})"


def rewards_figure(metric_lines: Sequence[Mapping], title: str) -> Figure:
    """Training rewards and validity over the held-out accuracy. Top axes: per `TRAIN_CURVES` key, the
    raw per-step line (faint, unlabelled) then its moving average (labelled); bottom axes: one line
    per `EVAL_CURVES` key that was logged."""
    fig = Figure(figsize=(9, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    drawn = False
    for (key, label), color in zip(TRAIN_CURVES, ("C0", "C1", "C2")):
        steps, values = metric_series(metric_lines, key)
        if steps.size:
            drawn = True
            top.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            top.plot(steps, moving_average(values, max(1, steps.size // 25)), color=color, label=label)
    if drawn:
        top.legend(loc="best", fontsize="small")
    else:
        _empty(top, "no training steps logged yet")
    top.set(ylabel="mean per step", title=f"{title}: rewards (faint: per step; solid: moving average)")
    top.set_ylim(-0.03, 1.03)

    greedy = metric_series(metric_lines, "eval/greedy_accuracy")
    for key, label, style in EVAL_CURVES:
        steps, values = metric_series(metric_lines, key)
        if steps.size:
            bottom.plot(steps, values, style, marker="o", markersize=4, label=label)
    if greedy[0].size:
        bottom.legend(loc="best", fontsize="small")
        bottom.set_title(f"held-out accuracy; greedy {_change(*greedy)}")
    else:
        _empty(bottom, "no evaluation logged yet")
        bottom.set_title("held-out accuracy")
    bottom.set(xlabel="step", ylabel="accuracy")
    bottom.grid(alpha=0.3)
    top.grid(alpha=0.3)
    return fig


def curriculum_table(proposals: Proposals, task: Task, n: int) -> dict[str, np.ndarray]:
    """The proposals' `question_features` `[N]` each, plus `SOLVER_REWARD`: their mean solver reward
    (solver reward sum / n)."""
    table = feature_table(logged_questions(proposals.texts, task), task)
    table[SOLVER_REWARD] = proposals.solver_reward_sum / max(n, 1)
    return table


def curriculum_figure(proposals: Proposals, task: Task, n: int, title: str) -> Figure:
    """Difficulty of the valid proposals against step, one axes per `task.curriculum_panels` entry:
    per curve the mean over each step bin (a line labelled as the curve) with its 95% band, or, for a
    stacked panel, the means stacked."""
    valid = proposals.only_valid()
    table = curriculum_table(valid, task, n)
    edges = step_bins(valid.steps)
    panels = task.curriculum_panels
    fig = Figure(figsize=(9, 3 * len(panels) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    per_step = len(edges) - 1 >= np.unique(valid.steps).size
    window = "per step" if per_step else f"windows of {edges[1] - edges[0]:.3g} steps"
    fig.suptitle(f"{title}: curriculum of {len(valid.texts)} valid proposals (of {len(proposals.texts)})\n"
                 f"mean over {window}; bands: 95% interval of the mean")
    for ax, panel in zip(axes, panels):
        ax.set(title=panel.title, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        stats = [(label, binned_stats(valid.steps, table[key], edges)) for key, label in panel.curves]
        if not any(s.centers.size for _, s in stats):
            _empty(ax, "no valid proposals logged yet")
            continue
        if panel.stacked:
            ax.stackplot(stats[0][1].centers, *[s.mean for _, s in stats], labels=[l for l, _ in stats],
                         alpha=0.8)
        else:
            for i, (label, s) in enumerate(stats):
                ax.plot(s.centers, s.mean, color=f"C{i}", label=label)
                ax.fill_between(s.centers, s.low, s.high, color=f"C{i}", alpha=0.2, linewidth=0)
        if panel.fraction:
            ax.set_ylim(0, 1)
        # Outside the axes: a stacked area has no empty corner to hold it.
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    axes[-1].set_xlabel("step")
    return fig


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def questions_pca_figure(proposals: Proposals, task: Task, title: str) -> Figure:
    """The valid proposals (a `subsample`) on their first two principal components: one scatter
    whose offsets are the PCA coordinates and whose colour array is the step, with the questions at
    the ends of each axis written out so the axes can be read."""
    valid = proposals.only_valid()
    index = subsample(len(valid.texts))
    questions = logged_questions([valid.texts[i] for i in index], task)
    steps = valid.steps[index]
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax = fig.subplots()
    if len(questions) < 2:
        _empty(ax, "fewer than two valid proposals logged yet")
        ax.set_title(f"{title}: PCA of proposed questions")
        return fig
    fit = pca(embed_questions(questions, task))
    points = ax.scatter(fit.projected[:, 0], fit.projected[:, 1], c=steps, cmap="viridis", s=10, alpha=0.6,
                        linewidths=0)
    fig.colorbar(points, ax=ax, label="step (early → late)")
    middle = fit.projected[:, 0].min() + np.ptp(fit.projected[:, 0]) / 2
    for axis in (0, 1):
        for i in sorted({int(fit.projected[:, axis].argmin()), int(fit.projected[:, axis].argmax())}):
            # Written towards the middle, and kept out of the layout, so a long question at the edge
            # neither leaves the figure nor squeezes the axes.
            right = fit.projected[i, 0] > middle
            label = ax.annotate(_short(questions[i].text), fit.projected[i], fontsize=7,
                                xytext=(-4 if right else 4, 4), textcoords="offset points",
                                ha="right" if right else "left", alpha=0.8)
            label.set_in_layout(False)
    share = fit.explained.sum() / fit.total_variance if fit.total_variance else 0.0
    ax.set(xlabel=f"PC1 ({fit.explained[0]:.3f})", ylabel=f"PC2 ({fit.explained[1]:.3f})",
           title=f"{title}: PCA of {len(questions)} proposed questions (of {len(valid.texts)} valid)\n"
                 f"spread (total variance) = {fit.total_variance:.4f}; PC1+PC2 explain {share:.0%}")
    ax.grid(alpha=0.3)
    return fig


def compare_figure(workdirs: Mapping[str, str | Path], key: str = "eval/greedy_accuracy") -> Figure:
    """One held-out curve of `key` per run (label -> workdir) on one axis, in the mapping's order;
    a run without it gets an empty line, so that its legend entry says so."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for label, workdir in workdirs.items():
        steps, values = eval_series(workdir, key)
        if steps.size:
            ax.plot(steps, values, marker="o", markersize=4,
                    label=f"{label}: {values[0]:.3f} → {values[-1]:.3f}")
        else:
            ax.plot([], [], label=f"{label}: no evaluation logged")
    if workdirs:
        ax.legend(loc="best", fontsize="small")
    else:
        _empty(ax, "no runs given")
    name = key.removeprefix("eval/").replace("_", " ")
    ax.set(xlabel="step", ylabel=name, title=f"held-out {name} by run")
    ax.grid(alpha=0.3)
    return fig


def compare_runs(workdirs: Mapping[str, str | Path], out_path: str | Path,
                 key: str = "eval/greedy_accuracy") -> Path:
    """`compare_figure` saved at `out_path` (seeds, ablations)."""
    return save(compare_figure(workdirs, key), Path(out_path))
