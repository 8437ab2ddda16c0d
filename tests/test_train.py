"""End to end: self-play steps of every task on a tiny random model, checkpoints, resume, export, CLI."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax.models import load_pretrained
from sqlm_jax.train import Trainer
from tests.tiny_models import random_policy, tiny_run_config


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _params(trainer) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(trainer.state.params)}


def test_arithmetic_run_logs_checkpoints_and_exports(policy_folder, tmp_path):
    config = tiny_run_config(policy_folder, tmp_path / "run")
    trainer = Trainer(config)
    summary = trainer.run()

    workdir = tmp_path / "run"
    steps = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if "reward/solver" in s]
    assert [s["step"] for s in train_steps] == [1, 2]
    for key in ("reward/proposer", "proposals/valid", "agreement/k1", "solver/kl", "solver/entropy",
                "solver/pg_clipfrac", "solver/grad_norm", "length/solver", "time/sampling",
                "time/update", "throughput/generated_tokens_per_s"):
        assert key in train_steps[0], key
    # proposer_update_freq=2: the proposer is updated on step 2 only
    assert "proposer/grad_norm" not in train_steps[0] and "proposer/grad_norm" in train_steps[1]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    samples = [json.loads(l) for l in (workdir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * config.log.samples and len(samples[0]["answers"]) == config.rollout.n
    questions = [json.loads(l) for l in (workdir / "questions.jsonl").read_text().splitlines()]
    assert [len(q["proposals"]) for q in questions] == [8, 8]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]

    assert json.loads((workdir / "summary.json").read_text()) == summary
    assert summary["task"] == "arithmetic" and summary["steps"] == 2
    exported, _ = load_pretrained(summary["export_dir"])
    ids = jnp.arange(12)[None] % 50
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(trainer.model(ids)), atol=1e-6)


def test_resume_is_bit_for_bit(policy_folder, tmp_path):
    straight = Trainer(tiny_run_config(policy_folder, tmp_path / "a", steps=4))
    straight.run()
    first = Trainer(tiny_run_config(policy_folder, tmp_path / "b", steps=2))
    first.run()
    resumed_config = tiny_run_config(policy_folder, tmp_path / "b", steps=4)
    resumed_config.resume = True
    resumed = Trainer(resumed_config)
    resumed.run()
    assert resumed.steps_done == 4
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert int(straight.state.step) == int(resumed.state.step)
    # and the run really trained: the weights moved away from the start
    start, _ = load_pretrained(policy_folder)
    assert not np.array_equal(np.asarray(start.embed[...]), a[("embed",)])


def test_existing_checkpoints_without_resume_is_refused(policy_folder, tmp_path):
    Trainer(tiny_run_config(policy_folder, tmp_path / "run", steps=1)).run()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(tiny_run_config(policy_folder, tmp_path / "run", steps=2)).run()


@pytest.mark.parametrize("task", ["algebra", "coding"])
def test_other_tasks_run_two_steps(policy_folder, tmp_path, task):
    config = tiny_run_config(policy_folder, tmp_path / "run", task=task)
    if task == "coding":
        pytest.importorskip("sqlm_jax.sandbox", reason="the coding task needs the sandbox")
        config.rl.advantage = "gae"  # the reference's coding setup: PPO with a critic, no KL
        config.rl.use_kl = False
        config.reward.code_timeout_s = 2.0
    summary = Trainer(config).run()
    assert summary["steps"] == 2 and summary["task"] == task
    last = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert "reward/solver" in last
    if task == "coding":
        assert "solver/critic_value_loss" in last and any(k.startswith("sandbox/") for k in last)


def _main(*args):
    return subprocess.run([sys.executable, "-m", "sqlm_jax.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_unknown_key_is_one_line_with_the_close_match():
    out = _main("--config=configs/arithmetic.py", "--config.rl.kl_cof=0.1")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown config key")
    assert "kl_coef" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_value_names_the_field_and_choices():
    out = _main("--config=configs/arithmetic.py", "--config.rl.kl_kind=k4")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "rl.kl_kind='k4'" in out.stderr and "k3" in out.stderr


def test_cli_missing_model_folder_is_one_clear_line(tmp_path):
    out = _main("--config=configs/arithmetic.py", f"--config.model.path={tmp_path}/missing",
                f"--config.workdir={tmp_path}/run")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no checkpoint folder" in out.stderr
