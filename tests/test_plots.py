"""Plots of a run (sqlm_jax.plots): reading a workdir, step statistics, the PCA, what each figure
draws (read back from the matplotlib Figures), and the PNGs and CLI on a fake workdir."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlm_jax import plots
from sqlm_jax.plots import embedding, figures, run_files, step_stats
from sqlm_jax.tasks import Question, get_task

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
N_SOLVER = 4
ARITHMETIC = get_task("arithmetic")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_proposal(rng: random.Random, step: int, steps: int) -> str:
    """Arithmetic-like proposals whose operands grow and whose mix drifts to '*' over the run."""
    digits = 1 + round(2 * step / steps)
    a, b = rng.randint(1, 10 ** digits - 1), rng.randint(1, 99)
    op = rng.choice("+-*" if rng.random() > step / steps else "**/")
    if rng.random() < 0.1:
        return rng.choice(["", "Sure! Here is a problem:", "hello there"])
    return f"{a}{op}{b}" if rng.random() < 0.5 else f"What is {a} {op} {b}?"


def fake_run(workdir, steps: int = 60, per_step: int = 16, evals: bool = True,
             reward_sum_field: str = "solver_reward_sum"):
    """A workdir as sqlm_jax.train writes it: metrics, questions, samples and summary
    (`reward_sum_field="agreement"`: questions.jsonl as written before that field was renamed)."""
    rng = random.Random(0)
    metrics, questions, samples = [], [], []
    for step in range(steps):
        proposals = [fake_proposal(rng, step, steps) for _ in range(per_step)]
        valid = [bool(p.strip()) for p in proposals]
        sums = [rng.randint(1, N_SOLVER) if v else 0 for v in valid]
        questions.append({"step": step, "proposals": proposals, "valid": valid, reward_sum_field: sums,
                          "proposer_reward": [float(2 <= k < N_SOLVER) for k in sums]})
        samples.append({"step": step, "proposal": proposals[0], "valid": valid[0],
                        "solver_rewards": [1.0] * N_SOLVER, "proposer_reward": 0.0, "answers": []})
        metrics.append({"step": step + 1, "reward/solver": 0.5 + 0.3 * step / steps + rng.gauss(0, 0.05),
                        "reward/proposer": rng.random(), "proposals/valid": float(np.mean(valid)),
                        **{f"agreement/k{j}": 0.25 for j in range(1, N_SOLVER + 1)}})
        if evals and step % 10 == 0:
            metrics.append({"step": step, "eval/greedy_accuracy": 0.4 + 0.2 * step / steps,
                            "eval/sampled_accuracy": 0.3 + 0.2 * step / steps,
                            "eval/majority_accuracy": 0.45 + 0.2 * step / steps})
    write_jsonl(workdir / "metrics.jsonl", metrics)
    write_jsonl(workdir / "questions.jsonl", questions)
    write_jsonl(workdir / "samples.jsonl", samples)
    (workdir / "summary.json").write_text(json.dumps({"task": "arithmetic", "base_accuracy": 0.4}))
    return workdir


def assert_png(path, min_kb: int = 10):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_HEADER
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"


def lines_by_label(ax) -> dict[str, np.ndarray]:
    """The labelled lines of an axes: label -> `[points, 2]` (x, y)."""
    return {line.get_label(): line.get_xydata() for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def stack_tops(collection) -> np.ndarray:
    """The upper edge of one stackplot layer: the largest y of its polygon at each x, by x."""
    vertices = collection.get_paths()[0].vertices
    return np.array([vertices[vertices[:, 0] == x, 1].max() for x in np.unique(vertices[:, 0])])


# ------------------------------------------------------------------------------------ PNGs and CLI
def test_plot_run_writes_three_pngs(tmp_path):
    paths = plots.plot_run(fake_run(tmp_path))  # the task is summary.json's
    assert [p.name for p in paths] == ["rewards.png", "curriculum.png", "questions_pca.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_plot_run_without_eval_lines_or_summary(tmp_path):
    fake_run(tmp_path, steps=5, evals=False)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(ValueError, match="unknown: .*pass it: --task NAME"):  # never guessed
        plots.plot_run(tmp_path)
    for path in plots.plot_run(tmp_path, "arithmetic"):
        assert_png(path, min_kb=5)


def test_plot_run_on_an_empty_workdir(tmp_path):
    for path in plots.plot_run(tmp_path, "algebra"):
        assert_png(path, min_kb=5)


def test_plot_run_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        plots.plot_run(tmp_path, "poetry")
    (tmp_path / "summary.json").write_text(json.dumps({"task": "poetry"}))
    with pytest.raises(ValueError, match="names 'poetry', not one of algebra, arithmetic, coding"):
        run_files.run_task_name(tmp_path)


OTHER_TASK_PROPOSALS = {
    "algebra": ["1. ...\nSelected Question: Solve 3*x + 2 = 11 for x.", "no marker",
                "Selected Question: If 2a + b = 7 and a - b = 2, find a.", "Selected Question: x = 4"],
    "coding": ["Sum the list.\nTest Cases:\n1 2 ||| 3\n5 ||| 5\n", "no tests",
               "Print the maximum of the integers.\nTest Cases:\n3 9 1 ||| 9\n"],
}


@pytest.mark.parametrize("task", sorted(OTHER_TASK_PROPOSALS))
def test_plot_run_other_tasks(tmp_path, task):
    proposals = OTHER_TASK_PROPOSALS[task]
    valid = ["no " not in p for p in proposals]
    write_jsonl(tmp_path / "questions.jsonl", [
        {"step": step, "proposals": proposals, "valid": valid, "solver_reward_sum": [1.5] * len(proposals)}
        for step in range(4)])
    (tmp_path / "summary.json").write_text(json.dumps({"task": task}))
    assert run_files.run_task_name(tmp_path) == task
    for path in plots.plot_run(tmp_path):
        assert_png(path, min_kb=5)


def test_compare_runs(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    for d in (a, b, c):
        d.mkdir()
    fake_run(a, steps=30)
    fake_run(b, steps=20)
    out = plots.compare_runs({"seed 0": a, "seed 1": b, "no eval": c}, tmp_path / "cmp" / "acc.png")
    assert_png(out)
    drawn = lines_by_label(figures.compare_figure({"seed 0": a, "seed 1": b, "no eval": c}).axes[0])
    # 30 steps evaluate at 0, 10, 20: greedy 0.4 + 0.2 * step / 30.
    np.testing.assert_allclose(drawn["seed 0: 0.400 → 0.533"],
                               [[0, 0.4], [10, 0.4 + 0.2 / 3], [20, 0.4 + 0.4 / 3]])
    np.testing.assert_allclose(drawn["seed 1: 0.400 → 0.500"], [[0, 0.4], [10, 0.5]])
    assert drawn["no eval: no evaluation logged"].size == 0


def test_cli(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run = fake_run(tmp_path / "run", steps=10)
    paths = plots.main([str(run), "--compare", str(tmp_path / "acc.png")])
    assert len(paths) == 4
    assert capsys.readouterr().out.split() == [str(p) for p in paths]


def test_cli_without_a_task_says_how_to_pass_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m sqlm_jax.plots: error: the task of {tmp_path} is unknown: it has no summary.json naming "
        "one (the run has not finished); pass it: --task NAME, or plot_run(workdir, task_name)")


def test_python_dash_m(tmp_path):
    run = fake_run(tmp_path, steps=5)
    done = subprocess.run([sys.executable, "-m", "sqlm_jax.plots", str(run), "--task", "arithmetic"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(run / "plots" / name)
                                   for name in ("rewards.png", "curriculum.png", "questions_pca.png")]


# ------------------------------------------------------------------------------------------ reading
def test_half_written_last_line_is_skipped(tmp_path):
    fake_run(tmp_path, steps=3)
    with open(tmp_path / "questions.jsonl", "a") as f:
        f.write('{"step": 3, "proposals": ["1+')
    lines = run_files.read_jsonl(tmp_path / "questions.jsonl")
    assert set(run_files.load_proposals(lines).steps) == {0, 1, 2}


def test_later_line_of_a_step_wins():
    steps, values = run_files.metric_series([{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0},
                                             {"step": 1, "x": 3.0}, {"step": 3, "y": 0.0},
                                             {"step": 4, "x": "nan?"}], "x")
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 2.0]


def test_old_agreement_field_reads_as_solver_reward_sum(tmp_path):
    def proposals(field):
        (tmp_path / field).mkdir()
        run = fake_run(tmp_path / field, steps=4, reward_sum_field=field)
        return run_files.load_proposals(run_files.read_jsonl(run / "questions.jsonl"))

    new, old = proposals("solver_reward_sum"), proposals("agreement")
    np.testing.assert_array_equal(old.solver_reward_sum, new.solver_reward_sum)
    assert np.isfinite(new.solver_reward_sum).all() and new.solver_reward_sum.size == 4 * 16


def test_load_proposals_pads_and_flattens():
    proposals = run_files.load_proposals([
        {"step": 1, "proposals": ["b", 7], "solver_reward_sum": [2]},  # no valid: all valid
        {"step": 0, "proposals": ["a"], "valid": [False], "solver_reward_sum": [True]},  # a bool is no sum
        {"step": "x", "proposals": ["ignored"]}])
    assert proposals.steps.tolist() == [0, 1, 1] and proposals.texts == ["a", "b", ""]
    assert proposals.valid.tolist() == [False, True, True]
    np.testing.assert_array_equal(proposals.solver_reward_sum, [np.nan, 2.0, np.nan])
    valid = proposals.only_valid()
    assert valid.texts == ["b", ""] and valid.steps.tolist() == [1, 1]


def test_logged_questions_are_the_tasks_questions():
    coding = get_task("coding")
    parsed, unparsed = run_files.logged_questions(["Sum.\nTest Cases:\n1 2 ||| 3\n", " no tests here "],
                                                  coding)
    assert parsed == Question("Sum.", (("1 2", "3"),))
    assert unparsed == Question("no tests here")
    assert coding.question_features(unparsed)["tests"] == 0


def test_solver_samples_source_order():
    assert run_files.solver_samples([], [{"solver_rewards": [0, 1, 1]}], np.array([])) == 3
    assert run_files.solver_samples([{"agreement/k1": 0, "agreement/k8": 0}], [], np.array([])) == 8
    assert run_files.solver_samples([], [], np.array([2.5, np.nan])) == 3


# -------------------------------------------------------------------------------------- step stats
def test_moving_average_known_values():
    np.testing.assert_allclose(step_stats.moving_average([1, 2, 3, 4, 5], 3), [1.5, 2, 3, 4, 4.5])
    np.testing.assert_array_equal(step_stats.moving_average([1, 5], 1), [1, 5])


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=50), st.integers(1, 60))
def test_moving_average_stays_within_the_values(values, window):
    smoothed = step_stats.moving_average(values, window)
    assert smoothed.shape == (len(values),)
    assert (smoothed >= min(values) - 1e-9).all() and (smoothed <= max(values) + 1e-9).all()


def test_step_bins():
    np.testing.assert_array_equal(step_stats.step_bins(np.array([3, 0, 0])), [0, 3, 4])
    np.testing.assert_allclose(step_stats.step_bins(np.arange(100), max_bins=4), [0, 25, 50, 75, 100])
    np.testing.assert_array_equal(step_stats.step_bins(np.array([], dtype=int)), [0, 1])


def test_binned_stats_known_values():
    b = step_stats.binned_stats(np.array([0, 0, 1, 1, 2]), np.array([1.0, 3.0, 5.0, np.nan, np.nan]),
                                np.array([0.0, 1.0, 2.0, 3.0]))
    # Bin 0: mean 2, standard error std([1, 3]) / sqrt(2) = 1; bin 1: one value; bin 2: none.
    np.testing.assert_allclose(b.centers, [0, 1])
    np.testing.assert_allclose(b.mean, [2, 5])
    np.testing.assert_allclose(b.low, [2 - 1.96, 5])
    np.testing.assert_allclose(b.high, [2 + 1.96, 5])


# --------------------------------------------------------------------------------------------- PCA
def test_pca_recovers_the_principal_direction():
    rng = np.random.default_rng(0)
    direction = np.array([1.0, 2.0, -2.0]) / 3.0
    x = rng.normal(size=(500, 1)) * 5 * direction + rng.normal(size=(500, 3)) * 0.1 + 7.0
    fit = embedding.pca(x, k=2)
    assert abs(fit.components[0] @ direction) > 0.999
    assert fit.explained[0] == pytest.approx(25, rel=0.15)
    assert fit.total_variance == pytest.approx(np.var(x, axis=0, ddof=1).sum())
    assert abs(fit.projected[:, 0].std(ddof=1) ** 2 - fit.explained[0]) < 1e-6
    assert embedding.pca(x[:1]).total_variance == 0.0


def test_pca_of_points_on_a_line():
    # (0,0), (1,1), (2,2): direction (1,1)/sqrt2, coordinates -sqrt2, 0, sqrt2, variance 2; rank 1.
    fit = embedding.pca(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), k=2)
    np.testing.assert_allclose(fit.components[0], [2 ** -0.5, 2 ** -0.5])
    np.testing.assert_allclose(fit.projected[:, 0], [-2 ** 0.5, 0, 2 ** 0.5])
    np.testing.assert_allclose(fit.projected[:, 1], 0, atol=1e-12)
    np.testing.assert_allclose(fit.explained, [2, 0], atol=1e-12)
    assert fit.total_variance == pytest.approx(2)


def test_pca_spread_is_larger_for_varied_questions():
    rng = random.Random(0)
    varied = [Question(f"{rng.randint(1, 999)}{rng.choice('+-*/')}{rng.randint(1, 999)}") for _ in range(200)]
    narrow = [Question(f"{rng.randint(10, 12)}*{rng.randint(2, 3)}") for _ in range(200)]
    assert embedding.pca_spread(varied, ARITHMETIC) > 100 * embedding.pca_spread(narrow, ARITHMETIC)
    assert embedding.pca_spread(varied, ARITHMETIC) == embedding.pca_spread(list(varied), ARITHMETIC)
    assert embedding.pca_spread([], ARITHMETIC) == 0.0


def test_embedding_is_unit_ngrams_beside_the_tasks_features():
    questions = [Question("12+3"), Question("What is 999 * 999?")]
    x = embedding.embed_questions(questions, ARITHMETIC)
    features = ARITHMETIC.question_features(questions[1])
    assert x.shape == (2, embedding.HASH_DIM + len(features))
    np.testing.assert_allclose(np.linalg.norm(x[:, :embedding.HASH_DIM], axis=1), 1)
    np.testing.assert_allclose(x[1, embedding.HASH_DIM:],
                               np.log1p(list(features.values())) / np.sqrt(len(features)))
    assert embedding.embed_questions([], ARITHMETIC).shape == (0, embedding.HASH_DIM + len(features))


def test_subsample_is_deterministic_and_spans_the_run():
    index = embedding.subsample(10_000, 100)
    assert len(index) == 100 and index[0] == 0 and index[-1] == 9_999
    assert embedding.subsample(50, 100).tolist() == list(range(50))


# ----------------------------------------------------------------------------- what figures draw
def test_rewards_figure_draws_the_logged_curves():
    lines = [{"step": s, "reward/solver": 0.1 * s} for s in (1, 2, 3, 4)] + [
        {"step": 0, "eval/greedy_accuracy": 0.4}, {"step": 4, "eval/greedy_accuracy": 0.5}]
    top, bottom = figures.rewards_figure(lines, "run").axes
    raw, smooth = top.get_lines()  # no proposer reward or validity logged: no line for them
    np.testing.assert_allclose(raw.get_xydata(), [[1, 0.1], [2, 0.2], [3, 0.3], [4, 0.4]])
    assert smooth.get_label() == "solver reward"  # 4 points: a window of 1, the raw values
    np.testing.assert_allclose(smooth.get_xydata(), raw.get_xydata())
    assert list(lines_by_label(bottom)) == ["greedy"]
    np.testing.assert_allclose(lines_by_label(bottom)["greedy"], [[0, 0.4], [4, 0.5]])
    assert bottom.get_title() == "held-out accuracy; greedy 0.400 → 0.500 (step 0 → 4)"


def test_rewards_figure_smooths_long_runs_and_notes_what_is_missing(tmp_path):
    metric_lines = run_files.read_jsonl(fake_run(tmp_path, steps=60, evals=False) / "metrics.jsonl")
    top, bottom = figures.rewards_figure(metric_lines, "run").axes
    steps, values = run_files.metric_series(metric_lines, "reward/solver")
    drawn = lines_by_label(top)
    assert list(drawn) == ["solver reward", "proposer reward", "valid proposals"]
    np.testing.assert_allclose(drawn["solver reward"][:, 1], step_stats.moving_average(values, 60 // 25))
    assert [t.get_text() for t in bottom.texts] == ["no evaluation logged yet"]
    empty_top, _ = figures.rewards_figure([], "run").axes
    assert [t.get_text() for t in empty_top.texts] == ["no training steps logged yet"]


def test_curriculum_figure_draws_per_step_means_of_the_tasks_features():
    proposals = run_files.Proposals(
        steps=np.array([0, 0, 1, 1, 1]), texts=["12+3", "1+2", "123*45", "7*8", "ignored: invalid"],
        valid=np.array([True, True, True, True, False]),
        solver_reward_sum=np.array([4.0, 2.0, 1.0, 3.0, 0.0]))
    fig = figures.curriculum_figure(proposals, ARITHMETIC, n=4, title="run")
    size, mix, agreement = fig.axes[:3]
    assert [ax.get_title() for ax in (size, mix, agreement)] == \
        [p.title for p in ARITHMETIC.curriculum_panels]
    assert "curriculum of 4 valid proposals (of 5)" in fig.get_suptitle()
    drawn = lines_by_label(size)
    # Steps 0 and 1: first operands (2, 1) and (3, 1) digits; second (1, 1) and (2, 1); products
    # 36 and 2 (2 and 1 digits), 5535 and 56 (4 and 2 digits).
    np.testing.assert_allclose(drawn["1st operand"], [[0, 1.5], [1, 2.0]])
    np.testing.assert_allclose(drawn["2nd operand"], [[0, 1.0], [1, 1.5]])
    np.testing.assert_allclose(drawn["product of operands"], [[0, 1.5], [1, 3.0]])
    # Stacked operator shares, in the order + − × ÷ none: step 0 all "+", step 1 all "×"; each
    # layer's top is the cumulative share.
    layers = {c.get_label(): stack_tops(c) for c in mix.collections}
    assert list(layers) == ["+", "−", "×", "÷", "none found"]
    for label, top in zip(layers, ([1, 0], [1, 0], [1, 1], [1, 1], [1, 1])):
        np.testing.assert_allclose(layers[label], top)
    assert mix.get_ylim() == (0, 1)
    # Mean solver reward over n = 4: (4 + 2) / 2 / 4 and (1 + 3) / 2 / 4.
    np.testing.assert_allclose(lines_by_label(agreement)["agreement"], [[0, 0.75], [1, 0.5]])


def test_curriculum_figure_of_the_coding_task():
    proposals = run_files.Proposals(
        steps=np.array([0, 2]),
        texts=["Sum.\nTest Cases:\n1 2 ||| 3\n5 ||| 5\n", "Max of them.\nTest Cases:\n3 9 1 ||| 9\n"],
        valid=np.array([True, True]), solver_reward_sum=np.array([1.0, 0.5]))
    fig = figures.curriculum_figure(proposals, get_task("coding"), n=2, title="run")
    tests, length, pass_rate = fig.axes[:3]
    np.testing.assert_allclose(lines_by_label(tests)["test cases"], [[0, 2], [2, 1]])
    np.testing.assert_allclose(lines_by_label(tests)["integers per input"], [[0, 1.5], [2, 3]])
    np.testing.assert_allclose(lines_by_label(length)["words"], [[0, 1], [2, 3]])
    np.testing.assert_allclose(lines_by_label(pass_rate)["pass rate"], [[0, 0.5], [2, 0.25]])


def test_curriculum_figure_without_proposals_says_so():
    empty = run_files.load_proposals([])
    for ax in figures.curriculum_figure(empty, get_task("algebra"), n=4, title="run").axes:
        assert [t.get_text() for t in ax.texts] == ["no valid proposals logged yet"]


def test_questions_pca_figure_scatters_the_pca_coloured_by_step():
    small, large = "1+1", "What is 999 * 999?"
    proposals = run_files.Proposals(
        steps=np.array([0, 0, 0, 5, 5, 5, 9]), texts=[small] * 3 + [large] * 3 + ["invalid"],
        valid=np.array([True] * 6 + [False]), solver_reward_sum=np.zeros(7))
    fig = figures.questions_pca_figure(proposals, ARITHMETIC, "run")
    ax = fig.axes[0]
    points = ax.collections[0]
    x = embedding.embed_questions([Question(small)] * 3 + [Question(large)] * 3, ARITHMETIC)
    np.testing.assert_allclose(points.get_offsets(), embedding.pca(x).projected)
    np.testing.assert_array_equal(points.get_array(), [0, 0, 0, 5, 5, 5])
    # Two clusters of three identical points, d apart: all variance on PC1, 6 (d/2)^2 / 5 in total.
    d2 = np.sum((x[0] - x[3]) ** 2)
    assert ax.get_xlabel() == f"PC1 ({0.3 * d2:.3f})" and ax.get_ylabel() == "PC2 (0.000)"
    assert f"spread (total variance) = {0.3 * d2:.4f}; PC1+PC2 explain 100%" in ax.get_title()
    # The questions at the ends of PC1 are written out.
    assert {t.get_text() for t in ax.texts} == {small, large}
    lone = figures.questions_pca_figure(run_files.load_proposals([]), ARITHMETIC, "run").axes[0]
    assert [t.get_text() for t in lone.texts] == ["fewer than two valid proposals logged yet"]
