"""Plots of a run (sqlm_jax.plots): features, PCA, and the PNGs drawn from a fake workdir."""
import json
import random

import numpy as np
import pytest

from sqlm_jax import plots

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
N_SOLVER = 4


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


def fake_run(workdir, steps: int = 60, per_step: int = 16, evals: bool = True):
    """A workdir as sqlm_jax.train writes it: metrics, questions, samples and summary."""
    rng = random.Random(0)
    metrics, questions, samples = [], [], []
    for step in range(steps):
        proposals = [fake_proposal(rng, step, steps) for _ in range(per_step)]
        valid = [bool(p.strip()) for p in proposals]
        agreement = [rng.randint(1, N_SOLVER) if v else 0 for v in valid]
        questions.append({"step": step, "proposals": proposals, "valid": valid, "agreement": agreement,
                          "proposer_reward": [float(2 <= k < N_SOLVER) for k in agreement]})
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


def test_plot_run_writes_three_pngs(tmp_path):
    paths = plots.plot_run(fake_run(tmp_path))
    assert [p.name for p in paths] == ["rewards.png", "curriculum.png", "questions_pca.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_plot_run_without_eval_lines_or_summary(tmp_path):
    fake_run(tmp_path, steps=5, evals=False)
    (tmp_path / "summary.json").unlink()
    for path in plots.plot_run(tmp_path):  # the task is read off the proposals
        assert_png(path, min_kb=5)


def test_plot_run_on_an_empty_workdir(tmp_path):
    for path in plots.plot_run(tmp_path, "algebra"):
        assert_png(path, min_kb=5)


OTHER_TASK_PROPOSALS = {
    "algebra": ["1. ...\nSelected Question: Solve 3*x + 2 = 11 for x.", "no marker",
                "Selected Question: If 2a + b = 7 and a - b = 2, find a.", "Selected Question: x = 4"],
    "coding": ["Sum the list.\nTest Cases:\n1 2 ||| 3\n5 ||| 5\n", "no tests",
               "Print the maximum of the integers.\nTest Cases:\n3 9 1 ||| 9\n"],
}


@pytest.mark.parametrize("task", sorted(OTHER_TASK_PROPOSALS))
def test_plot_run_infers_other_tasks(tmp_path, task):
    proposals = OTHER_TASK_PROPOSALS[task]
    valid = ["no " not in p for p in proposals]
    write_jsonl(tmp_path / "questions.jsonl", [
        {"step": step, "proposals": proposals, "valid": valid, "agreement": [1.5] * len(proposals)}
        for step in range(4)])
    assert plots.infer_task(proposals) == task
    for path in plots.plot_run(tmp_path):
        assert_png(path, min_kb=5)


def test_half_written_last_line_is_skipped(tmp_path):
    fake_run(tmp_path, steps=3)
    with open(tmp_path / "questions.jsonl", "a") as f:
        f.write('{"step": 3, "proposals": ["1+')
    assert set(plots.load_proposals(plots.read_jsonl(tmp_path / "questions.jsonl")).steps) == {0, 1, 2}


def test_later_line_of_a_step_wins():
    steps, values = plots.metric_series([{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 1, "x": 3.0},
                                         {"step": 3, "y": 0.0}, {"step": 4, "x": "nan?"}], "x")
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 2.0]


def test_arithmetic_features():
    f = plots.question_features("347*26", "arithmetic")
    assert (f["digits_a"], f["digits_b"], f["product_digits"]) == (3, 2, 4)  # 347*26 = 9022
    assert (f["op_mul"], f["op_add"], f["op_none"]) == (1, 0, 0)
    f = plots.question_features("What is 12 + 5?", "arithmetic")
    assert (f["digits_a"], f["digits_b"], f["op_add"]) == (2, 1, 1)
    f = plots.question_features("-5 - 1,234 x 7", "arithmetic")  # a sign is not an operator
    assert (f["digits_a"], f["digits_b"], f["op_sub"], f["op_mul"]) == (1, 4, 0.5, 0.5)
    f = plots.question_features("Compute the product of 12 and 30.", "arithmetic")
    assert f["op_mul"] == 1
    f = plots.question_features("Sure! Here is a problem:", "arithmetic")
    assert (f["digits_a"], f["numbers"], f["op_none"]) == (0, 0, 1)


def test_algebra_features():
    f = plots.question_features("Solve 3*x + 2 = 11 for x.", "algebra")
    assert (f["variables"], f["equations"]) == (1, 1)
    proposal = ("1. ...\n2. ...\n**Selected Question:** If 2a + 3b = 12 and a - b = 1, find a and b. "
                "A number is used 5 times.")
    f = plots.question_features(proposal, "algebra")
    assert (f["variables"], f["equations"]) == (2, 2)


def test_coding_features():
    proposal = ("Problem Description:\nSum the list.\n\nTest Cases:\n1 2 3 ||| 6\n4 ||| 4\n-1 1 ||| 0\n")
    f = plots.question_features(proposal, "coding")
    assert (f["tests"], f["words"], f["input_ints"]) == (3, 5, 2)
    assert plots.question_features("no tests here", "coding")["tests"] == 0
    with pytest.raises(ValueError, match="unknown task"):
        plots.question_features("1+1", "poetry")


def test_pca_recovers_the_principal_direction():
    rng = np.random.default_rng(0)
    direction = np.array([1.0, 2.0, -2.0]) / 3.0
    x = rng.normal(size=(500, 1)) * 5 * direction + rng.normal(size=(500, 3)) * 0.1 + 7.0
    fit = plots.pca(x, k=2)
    assert abs(fit.components[0] @ direction) > 0.999
    assert fit.explained[0] == pytest.approx(25, rel=0.15)
    assert fit.total_variance == pytest.approx(np.var(x, axis=0, ddof=1).sum())
    assert abs(fit.projected[:, 0].std(ddof=1) ** 2 - fit.explained[0]) < 1e-6
    assert plots.pca(x[:1]).total_variance == 0.0


def test_pca_spread_is_larger_for_varied_questions():
    rng = random.Random(0)
    varied = [f"{rng.randint(1, 999)}{rng.choice('+-*/')}{rng.randint(1, 999)}" for _ in range(200)]
    narrow = [f"{rng.randint(10, 12)}*{rng.randint(2, 3)}" for _ in range(200)]
    assert plots.pca_spread(varied) > 100 * plots.pca_spread(narrow)
    assert plots.pca_spread(varied) == plots.pca_spread(list(varied))  # deterministic
    assert plots.pca_spread([]) == 0.0


def test_subsample_is_deterministic_and_spans_the_run():
    index = plots.subsample(10_000, 100)
    assert len(index) == 100 and index[0] == 0 and index[-1] == 9_999
    assert plots.subsample(50, 100).tolist() == list(range(50))


def test_solver_samples_source_order():
    assert plots.solver_samples([], [{"solver_rewards": [0, 1, 1]}], np.array([])) == 3
    assert plots.solver_samples([{"agreement/k1": 0, "agreement/k8": 0}], [], np.array([])) == 8
    assert plots.solver_samples([], [], np.array([2.5, np.nan])) == 3


def test_compare_runs(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    for d in (a, b, c):
        d.mkdir()
    fake_run(a, steps=30)
    fake_run(b, steps=20)
    out = plots.compare_runs({"seed 0": a, "seed 1": b, "no eval": c}, tmp_path / "cmp" / "acc.png")
    assert_png(out)


def test_cli(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run = fake_run(tmp_path / "run", steps=10)
    paths = plots.main([str(run), "--compare", str(tmp_path / "acc.png")])
    assert len(paths) == 4
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
