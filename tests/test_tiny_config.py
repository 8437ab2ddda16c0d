"""The README's first command, for a handful of steps: the shipped tiny model and configs/tiny.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task
from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_config_runs_self_play_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}  # one CPU device, as a user has
    out = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", "--config=configs/tiny.py", "--config.train.steps=4",
         "--config.eval.every=2", "--config.eval.num_problems=64", "--config.checkpoint.every=2",
         f"--config.workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["steps"] == 4
    assert [e["step"] for e in summary["eval_history"]] == [0, 2, 4]
    assert 0 < summary["base_accuracy"] < 1  # the shipped model is imperfect, and not useless
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
