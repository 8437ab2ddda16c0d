"""Evaluation a user can reproduce: `python -m sqlm_jax.evaluate` scores a run's export as the run did,
and the held-out metrics' pieces on hand-worked numbers."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax.evaluate import EvalResult, bootstrap_interval, drop_overlong, heldout_report
from sqlm_jax.rollout import solver_prompts
from sqlm_jax.tasks import Question, get_task
from sqlm_jax.tokenizer import load_tokenizer
from tests.tiny_models import random_policy, subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reproduces_the_runs_final_greedy_accuracy(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}  # one CPU device, as a user has
    shared = ["--config=configs/tiny.py", "--config.eval.num_problems=48", "--config.eval.batch_size=48",
              "--config.eval.sampled_n=0", f"--config.workdir={workdir}"]
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=900)
    trained = run("sqlm_jax.main", *shared, "--config.train.steps=1", "--config.checkpoint.every=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())

    responses = tmp_path / "responses.jsonl"
    out = run("sqlm_jax.evaluate", *shared, f"--model={workdir}/export", "--n=2", f"--output={responses}")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(records) == 48 and all(len(r["samples"]) == 2 for r in records)
    # The same problems, prompts and greedy decoding as the run's final evaluation.
    assert np.mean([r["greedy_score"] for r in records]) == pytest.approx(summary["final_accuracy"], abs=1e-6)
    greedy = float(re.search(r"^greedy accuracy: ([0-9.]+)", out.stdout, re.M).group(1))
    assert greedy == pytest.approx(summary["final_accuracy"], abs=1e-4)
    for metric in ("mean@2", "maj@2", "pass@2 (best@2)"):
        assert re.search(rf"^{re.escape(metric)}: [0-9.]+  \(95% bootstrap interval", out.stdout, re.M), out.stdout
    assert "48 held-out problems (0 dropped" in out.stdout

    # The README's snippet: the run's task options and held-out set from its summary.json.
    snippet = f"""import json
from sqlm_jax.evaluate import evaluate; from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task; from sqlm_jax.tokenizer import load_tokenizer
s = json.load(open("{workdir}/summary.json")); task = get_task(s["task"], **s["task_options"])
model, _ = load_pretrained("{workdir}/export"); tokenizer = load_tokenizer("{workdir}/export")
print(evaluate(model, tokenizer, task, task.heldout_problems(s["eval"]["num_problems"], s["eval"]["seed"]), max_new_tokens=s["eval"]["max_new_tokens"]))
"""
    readme = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert readme.returncode == 0, readme.stderr[-3000:]
    assert float(readme.stdout.split()[-1]) == pytest.approx(summary["final_accuracy"], abs=1e-6)


def test_cli_user_errors_are_one_line():
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", "--config=configs/tiny.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "--model=" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", "--config=configs/tiny.py",
                          "--model=/nonexistent/model"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")


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
