"""Evaluation a user can reproduce: the CLI's user errors, its --help, the import path it shares with the
training command, and the held-out metrics' pieces on hand-worked numbers (the CLI against a real run's
export: tests/test_tiny_config.py)."""
import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax import evaluate as evaluate_module
from sqlm_jax.defaults import base_config
from sqlm_jax.evaluate import EvalResult, bootstrap_interval, drop_overlong, evaluate_heldout, heldout_report
from sqlm_jax.rollout import solver_prompts
from sqlm_jax.tasks import Question, get_task
from sqlm_jax.tokenizer import load_tokenizer
from tests.tiny_models import random_policy

ROOT = Path(__file__).resolve().parents[1]


def test_cli_user_errors_are_one_line():
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", "--config=configs/tiny.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "--model=" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", "--config=configs/tiny.py",
                          "--model=/nonexistent/model"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("command", ["sqlm_jax.evaluate", "sqlm_jax.main"])
def test_help_prints_the_usage_and_exits_0(command):
    out = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"python -m {command} --config=configs/" in out.stdout and "--config:" in out.stdout
    assert ("--model:" in out.stdout) == (command == "sqlm_jax.evaluate") and "Traceback" not in out.stderr


def _imports(module: str) -> set[str]:
    """The sqlm_jax modules `module` imports, at its top or inside its functions."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:  # `from sqlm_jax import mesh`: the module sqlm_jax.mesh; `...models import X`: models
        while name.startswith("sqlm_jax.") and not (ROOT / (name.replace(".", "/") + ".py")).exists() \
                and not (ROOT / name.replace(".", "/") / "__init__.py").exists():
            name = name.rpartition(".")[0]
        if name.startswith("sqlm_jax.") and name != module:
            found.add(name)
    return found


def test_no_import_circle_through_the_command_lines():
    """evaluate took --config from main, which imports train, which imports evaluate (issue 29): no
    module of the package that main, evaluate or train imports, however indirectly, imports them back."""
    graph, todo = {}, ["sqlm_jax.main", "sqlm_jax.evaluate", "sqlm_jax.train"]
    while todo:
        module = todo.pop()
        if module not in graph:
            graph[module] = _imports(module)
            todo += graph[module]
    assert "sqlm_jax.main" not in graph["sqlm_jax.evaluate"] and "sqlm_jax.evaluate" in graph["sqlm_jax.train"]

    def reaches(start, goal, seen):
        return any(m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen))
                   for m in graph.get(start, ()))

    circles = [m for m in ("sqlm_jax.main", "sqlm_jax.evaluate", "sqlm_jax.train") if reaches(m, m, set())]
    assert not circles, f"import circle through {circles}"


def test_heldout_report_by_hand():
    greedy = EvalResult(0.75, np.array([[1.0], [0.0], [1.0], [1.0]]), [])
    sampled = EvalResult(0.5, np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 0.0]]), [],
                         majority_scores=np.array([1.0, 0.0, 1.0, 0.0]))
    report = heldout_report(greedy, sampled)
    assert list(report) == ["greedy accuracy", "mean@2", "maj@2", "pass@2 (best@2)"]
    # mean@2: (.5 + 0 + 1 + .25) / 4; pass@2: the best of each row, (1 + 0 + 1 + .5) / 4.
    for name, value in (("greedy accuracy", 0.75), ("mean@2", 0.4375), ("maj@2", 0.5), ("pass@2 (best@2)", 0.625)):
        mean, low, high = report[name]
        assert mean == pytest.approx(value) and 0 <= low <= mean <= high <= 1, name
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def _binomial_mean_quantile(n: int, p: float, q: float) -> float:
    """The q-quantile of the mean of n draws of a coin of bias p (exact, from the binomial CDF)."""
    cdf = np.cumsum([math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(n + 1)])
    return int(np.searchsorted(cdf, q)) / n


def test_bootstrap_interval_is_the_95_percent_one():
    """1000 problems, 700 right: a resample's mean is Binomial(1000, .7) / 1000, whose 2.5% and 97.5%
    quantiles are .671 and .728; a 90% interval would be (.676, .724). The 1000 resamples of the
    (fixed) seed land within .0015 of the exact ends."""
    values = np.arange(1000) % 10 < 7
    for level, interval in ((None, (0.025, 0.975)), (0.9, (0.05, 0.95))):
        got = bootstrap_interval(values) if level is None else bootstrap_interval(values, level=level)
        want = [_binomial_mean_quantile(1000, 0.7, q) for q in interval]
        np.testing.assert_allclose(got, want, atol=0.0015, err_msg=f"level {level or 'default'}")


def test_overlong_heldout_prompts_are_dropped_and_counted(tmp_path):
    tokenizer = load_tokenizer(random_policy(tmp_path / "model"))
    task = get_task("coding")
    problems = [(Question("Sum the list."), ()), (Question("x" * 600), ()), (Question("Print 1."), ())]
    lengths = [len(p) for p in solver_prompts(tokenizer, task, [q for q, _ in problems])]
    limit = max(lengths[0], lengths[2])
    kept, dropped = drop_overlong(tokenizer, task, problems, limit)
    assert lengths[1] > limit
    assert kept == [problems[0], problems[2]] and dropped == 1
    assert drop_overlong(tokenizer, task, problems, 0) == (problems, 0)



@pytest.mark.parametrize("sampled_problems", [0, 2])
def test_sampled_evaluation_covers_eval_sampled_problems(monkeypatch, sampled_problems):
    """eval.sampled_problems=0, the default, means every held-out problem: all 5 are sampled n = 2
    times besides the greedy pass; 2 means the first 2. (The model's part is stubbed: what is checked
    is which problems each pass gets, and how.)"""
    assert base_config().eval.sampled_problems == 0
    calls = []

    def evaluate(model, tokenizer, task, problems, *, greedy=True, n=1, **kwargs):
        calls.append((list(problems), greedy, n, kwargs["max_new_tokens"], kwargs["batch_size"]))
        return EvalResult(0.0, np.zeros((len(problems), n)), [["r"] * n for _ in problems])

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    problems = get_task("arithmetic").heldout_problems(5, seed=0)
    eval_cfg = base_config().eval
    eval_cfg.sampled_problems, eval_cfg.max_new_tokens, eval_cfg.batch_size = sampled_problems, 7, 3
    greedy, sampled = evaluate_heldout(None, None, None, problems, eval_cfg, n=2, seed=0)
    count = sampled_problems or len(problems)
    assert calls == [(problems, True, 1, 7, 3), (problems[:count], False, 2, 7, 3)]
    assert greedy.scores.shape == (5, 1) and sampled.scores.shape == (count, 2)
