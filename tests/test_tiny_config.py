"""The README's first command, for a handful of steps: the shipped tiny model and configs/tiny.py, and
`python -m sqlm_jax.evaluate` on what it exports."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task
from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}  # one CPU device, as a user has
# The run's held-out sets (for evaluate too): 64 problems, and 32 of the beyond-the-corpus set.
EVAL = ["--config=configs/tiny.py", "--config.eval.num_problems=64", "--config.eval.second_set_problems=32"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(workdir, completed process) of the tiny config for 4 steps, run once for this module's tests."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    out = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", *EVAL, "--config.train.steps=4", "--config.eval.every=2",
         "--config.checkpoint.every=2", f"--config.workdir={workdir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_tiny_config_runs_self_play_end_to_end(tiny_run):
    workdir, out = tiny_run

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["steps"] == 4
    assert [e["step"] for e in summary["eval_history"]] == [0, 2, 4]
    assert 0 < summary["base_accuracy"] < 1  # the shipped model is imperfect, and not useless
    beyond = [e["eval/beyond_greedy_accuracy"] for e in summary["eval_history"]]
    assert len(beyond) == 3 and all(0 <= a < summary["base_accuracy"] for a in beyond)  # harder than the corpus's
    assert "held-out" in out.stdout and summary["export_dir"] in out.stdout

    # The proposer writes questions of the task; the solver's answers sometimes disagree, so the
    # majority-vote rewards are neither all 0 nor all 1.
    task = get_task("arithmetic", question_template="{a}*{b}")
    lines = [json.loads(line) for line in (workdir / "questions.jsonl").read_text().splitlines()]
    proposals = [p for line in lines for p in line["proposals"]]
    assert np.mean([task.parse_question(p) is not None for p in proposals]) > 0.5
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    solver = [m["reward/solver"] for m in metrics if "reward/solver" in m]
    assert len(solver) == 4 and 0 < np.mean(solver) < 1

    assert (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
    model, cfg = load_pretrained(workdir / "export")
    assert cfg.architecture == "Qwen2ForCausalLM"


def test_evaluate_cli_reproduces_the_runs_final_greedy_accuracy(tiny_run, tmp_path):
    """`python -m sqlm_jax.evaluate` scores the run's export as the run's last evaluation did, and the
    README's snippet does too."""
    workdir, _ = tiny_run
    summary = json.loads((workdir / "summary.json").read_text())
    responses = tmp_path / "responses.jsonl"
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", *EVAL, f"--model={workdir}/export", "--n=2",
                          f"--output={responses}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(records) == 64 and all(len(r["samples"]) == 2 for r in records)
    # The same problems, prompts and greedy decoding as the run's final evaluation.
    assert np.mean([r["greedy_score"] for r in records]) == pytest.approx(summary["final_accuracy"], abs=1e-6)
    greedy = float(re.search(r"^greedy accuracy: ([0-9.]+)", out.stdout, re.M).group(1))
    assert greedy == pytest.approx(summary["final_accuracy"], abs=1e-4)
    for metric in ("mean@2", "maj@2", "pass@2 (best@2)"):
        assert re.search(rf"^{re.escape(metric)}: [0-9.]+  \(95% bootstrap interval", out.stdout, re.M), out.stdout
    assert "64 held-out problems (0 dropped" in out.stdout

    # The README's snippet: the run's task options and held-out set from its summary.json.
    snippet = f"""import json
from sqlm_jax.evaluate import evaluate; from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task; from sqlm_jax.tokenizer import load_tokenizer
s = json.load(open("{workdir}/summary.json")); task = get_task(s["task"], **s["task_options"])
model, _ = load_pretrained("{workdir}/export"); tokenizer = load_tokenizer("{workdir}/export")
print(evaluate(model, tokenizer, task, task.heldout_problems(s["eval"]["num_problems"], s["eval"]["seed"]), max_new_tokens=s["eval"]["max_new_tokens"]))
"""
    readme = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert readme.returncode == 0, readme.stderr[-3000:]
    assert float(readme.stdout.split()[-1]) == pytest.approx(summary["final_accuracy"], abs=1e-6)
