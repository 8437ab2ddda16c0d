"""Two self-play steps of the tiny random policy (the real sampler) for each family of issue-17
options: the run finishes, updates both roles, and logs what the options do."""
import json
import math

import pytest

from sqlm_jax.train import Trainer
from tests.tiny_models import random_policy, tiny_run_config

FAMILIES = {
    "rloo+gspo": {"rl.advantage": "rloo", "rl.policy_loss": "gspo", "rl.loss_agg": "seq-mean-token-mean"},
    "reinforce_pp+clip_higher+overlong": {
        "rl.advantage": "reinforce_pp", "rl.clip_eps_high": 0.28, "reward.overlong_buffer": 4,
        "rl.mask_truncated": True},
    "dr_grpo+dynamic_sampling": {"rl.grpo_scale_by_std": False, "rl.filter_zero_variance": True,
                                 "rollout.max_extra_batches": 2},
}


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_per_option_family(policy_folder, tmp_path, family):
    config = tiny_run_config(policy_folder, tmp_path / "run")
    for key, value in FAMILIES[family].items():
        section, field = key.split(".")
        config[section][field] = value
    summary = Trainer(config).run()
    assert summary["steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward/solver" in s]
    assert len(steps) == 2 and "proposer/loss" in steps[1]  # proposer_update_freq = 2
    for s in steps:
        assert math.isfinite(s["solver/loss"]) and s["solver/skipped_steps"] == 0
        assert 0 <= s["zero_variance/solver"] <= 1 and 0 <= s["truncated/solver"] <= 1
    if family.startswith("reinforce_pp"):
        # The random policy rarely stops within 12 tokens: cut responses are common and penalised.
        assert all(s["truncated/solver"] > 0 and s["overlong/solver_penalty"] < 0 for s in steps)
    if family.startswith("dr_grpo"):
        for s in steps:
            assert 0 <= s["dynamic_sampling/solver_extra_batches"] <= 2
            assert s["dynamic_sampling/solver_masked"] <= s["dynamic_sampling/solver_dropped"]
            assert "time/refill" in s
        # The path named: groups were dropped and extra rounds sampled to refill them.
        assert any(s["dynamic_sampling/solver_dropped"] > 0 and s["dynamic_sampling/solver_extra_batches"] > 0
                   for s in steps), steps


def test_a_time_budget_ends_the_run_like_its_last_step(policy_folder, tmp_path):
    """train.max_minutes: the first step past the budget is the last, evaluated, saved and exported
    (what the dynamic-sampling comparison at equal wall-clock relies on)."""
    config = tiny_run_config(policy_folder, tmp_path / "run", steps=50)
    config.checkpoint.every = 10
    config.train.max_minutes = 1e-9  # spent by the end of the first step
    summary = Trainer(config).run()
    assert summary["steps"] == 1 and [e["step"] for e in summary["eval_history"]] == [0, 1]
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir() and (tmp_path / "run" / "export" / "config.json").is_file()
