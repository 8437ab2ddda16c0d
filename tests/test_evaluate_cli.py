"""Evaluation a user can reproduce: the CLI's user errors, its --help, the import path it shares with the
training command, and the held-out metrics' pieces on hand-worked numbers (the CLI against a real run's
export: tests/test_tiny_config.py)."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax.evaluate import EvalResult, bootstrap_interval, drop_overlong, heldout_report
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
    # 1000 problems at p = .7: the 95% interval is about .7 ± 1.96 · sqrt(.21 / 1000) = .7 ± .028.
    low, high = bootstrap_interval(np.arange(1000) % 10 < 7)
    assert low == pytest.approx(0.7 - 0.028, abs=0.006) and high == pytest.approx(0.7 + 0.028, abs=0.006)


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
