"""The tiny ablation configs (configs/tiny_format_reward.py, tiny_pregenerated.py) and the pretraining
configs (configs/tiny*_pretrain.py) run end to end as shipped, shrunk (tests/shipped_runs.py)."""
import json

import numpy as np
import pytest

from sqlm_jax import configs
from sqlm_jax.models import load_pretrained
from tests.sandbox_marks import needs_bwrap
from tests.shipped_runs import ROOT, _lines, _run, full_tier

# Shrunk as tests/test_tiny_config.py shrinks configs/tiny.py, further: 2 prompt rows, answers of 48.
TINY_SIZES = ["--config.train.steps=2", "--config.rollout.batch_size=2", "--config.rl.mini_batch_size=2",
              "--config.rl.micro_batch_size=8", "--config.rollout.solver_max_new_tokens=48",
              "--config.eval.max_new_tokens=48", "--config.eval.second_set_max_new_tokens=48",
              "--config.eval.num_problems=8", "--config.eval.second_set_problems=8",
              "--config.eval.sampled_problems=8"]


@full_tier
@pytest.mark.parametrize("name", ["tiny_format_reward", "tiny_pregenerated"])
def test_tiny_ablation_config_runs(name, tmp_path):
    workdir = tmp_path / "run"
    out = _run("sqlm_jax.main", f"--config=configs/{name}.py", f"--config.workdir={workdir}", *TINY_SIZES)
    assert "held-out greedy accuracy" in out.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and (workdir / "export" / "model.safetensors").is_file()
    recorded = json.loads((workdir / "run.json").read_text())["config"]
    metrics = [m for m in _lines(workdir / "metrics.jsonl") if "reward/solver" in m]
    assert len(metrics) == 2 and all("solver/loss" in m for m in metrics)
    if name == "tiny_format_reward":
        assert recorded["reward"]["kind"] == "format"
        # Format-only rewards: every parseable answer is rewarded, so the tiny model's mostly are.
        assert np.mean([m["reward/solver"] for m in metrics]) > 0.5
    else:
        assert recorded["rollout"]["question_source"] == "pregenerated"
        # The pool is proposed once at the start; the proposer is never trained.
        assert not any(k.startswith("proposer/") for m in metrics for k in m)


PRETRAIN_SIZES = ["--config.train.steps=2", "--config.train.eval_every=1", "--config.eval.num_problems=8",
                  "--config.eval.watch_problems=8", "--config.eval.num_proposals=8"]


@full_tier
@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_algebra_pretrain",
                                  pytest.param("tiny_coding_pretrain", marks=needs_bwrap)])
def test_pretrain_config_runs(name, tmp_path):
    """`python -m sqlm_jax.pretrain --config=configs/NAME.py` for 2 steps, from a folder that is not the
    checkout (its out_dir is relative), into a new folder: the shipped asset's architecture and files."""
    config = configs.get(name)
    out_dir = tmp_path / "model"
    _run("sqlm_jax.pretrain", f"--config=configs/{name}.py", f"--config.out_dir={out_dir}", *PRETRAIN_SIZES,
         cwd=tmp_path)
    asset = ROOT / config.out_dir
    assert {p.name for p in out_dir.iterdir()} == {p.name for p in asset.iterdir()}
    assert json.loads((out_dir / "config.json").read_text()) == json.loads((asset / "config.json").read_text())
    metrics = json.loads((out_dir / "pretrain_metrics.json").read_text())
    assert [w["step"] for w in metrics["watched"]] == [1, 2]
    assert metrics["solver"]["num_problems"] == 8 and len(metrics["solver"]["greedy_scores"]) == 8
    load_pretrained(out_dir)
