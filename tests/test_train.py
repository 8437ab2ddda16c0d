"""End to end: self-play steps of every task on a tiny random model, checkpoints, resume, export, CLI."""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax import rollout
from sqlm_jax.learner import NonFiniteError, fetch
from sqlm_jax.models import load_pretrained
from sqlm_jax.plots.run_files import run_task_name
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.tiny_models import (arithmetic_script, random_policy, rewarded_run_config, scripted_sample,
                               tiny_run_config)


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _params(trainer) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(trainer.learner.state.params)}


def test_arithmetic_run_logs_checkpoints_and_exports(policy_folder, tmp_path):
    config = tiny_run_config(policy_folder, tmp_path / "run")
    trainer = Trainer(config)
    summary = trainer.run()

    workdir = tmp_path / "run"
    steps = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if "reward/solver" in s]
    assert [s["step"] for s in train_steps] == [1, 2]
    for key in ("reward/proposer", "proposals/valid", "agreement/k1", "solver/kl", "solver/entropy",
                "solver/pg_clipfrac", "solver/grad_norm", "solver/loss", "solver/skipped_steps",
                "length/solver", "time/propose", "time/solve", "time/score", "time/logprobs",
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
    # What evaluating the export again needs: the task options and the held-out set, also in run.json
    # (written at the start, where plots of a run in progress find the task).
    run = json.loads((workdir / "run.json").read_text())
    assert run["task"] == "arithmetic" and run["config"]["rollout"]["n"] == config.rollout.n
    assert summary["task_options"] == run["task_options"] == {
        k: v for k, v in config.task_options.items() if v is not None}
    assert summary["eval"] == {"num_problems": 8, "seed": config.eval.seed, "max_new_tokens": 8,
                               "max_prompt_len": 512, "problems": 8, "dropped_overlong": 0}
    (workdir / "summary.json").unlink()
    assert run_task_name(workdir) == "arithmetic"
    exported, _ = load_pretrained(summary["export_dir"])
    ids = jnp.arange(12)[None] % 50
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(trainer.model(ids)), atol=1e-6)


def test_resume_is_bit_for_bit(policy_folder, tmp_path, monkeypatch):
    """On the scripted policy (half its answers rewarded) without weight decay; tests/test_distributed.py
    resumes a run of the real sampler."""
    monkeypatch.setattr(rollout, "sample", scripted_sample(load_tokenizer(policy_folder), arithmetic_script))
    straight = Trainer(rewarded_run_config(policy_folder, tmp_path / "a", steps=4))
    straight.run()
    first = Trainer(rewarded_run_config(policy_folder, tmp_path / "b", steps=2))
    first.run()
    resumed_config = rewarded_run_config(policy_folder, tmp_path / "b", steps=4)
    resumed_config.resume = True
    resumed = Trainer(resumed_config)
    resumed.run()
    assert resumed.steps_done == 4
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert int(straight.learner.state.step) == int(resumed.learner.state.step)
    # and the run really trained: with no weight decay, only the rewarded answers' gradients can have
    # moved the weights (4 steps of Adam with lr 1e-2, eps 1: ~ lr · gradient each)
    start, _ = load_pretrained(policy_folder)
    assert np.abs(np.asarray(start.embed[...]) - a[("embed",)]).max() > 1e-3
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/solver"] for m in metrics if "reward/solver" in m] == [0.75] * 4


def test_update_shortcuts_give_the_plain_first_update(policy_folder, tmp_path):
    """The learner's proposer batch with its shortcuts (old log-probs from the sampler, prompt padding
    trimmed, one prompt pass per group of 2 rows) and the same batch without them (old log-probs
    recomputed, the sampler's padded width, a pass per row): the same log-probs and the same update."""
    config = tiny_run_config(policy_folder, tmp_path / "run")
    config.rollout.batch_size = config.rl.mini_batch_size = 8
    config.rl.micro_batch_size = 16  # 2 rows per device: prompt groups of 2
    trainer = Trainer(config)
    learner = trainer.learner
    assert learner.reuses_sampler_logprobs
    out = trainer.rollouts.propose(learner.policy, 0).sample
    rows = out.tokens.shape[0]
    assert learner.prompt_group(rows) == 2
    fast = learner.role_batch(out, np.ones(rows, bool))
    full_width = np.asarray(out.prompt_mask).shape[1]
    assert fast.prompt_group == 2
    assert fast.prompt_ids.shape[1] % 16 == 0 and fast.prompt_ids.shape[1] < full_width  # trimmed
    plain = fast.replace(prompt_ids=np.asarray(out.prompt_tokens), prompt_mask=np.asarray(out.prompt_mask),
                         prompt_group=1)
    rewards = np.random.default_rng(0).random(rows).reshape(-1, config.rollout.n)
    fast = learner.prepare(fast, rewards, out.logprobs)
    plain = learner.prepare(plain, rewards)
    assert np.abs(plain.old_logp).sum() > 1 and fast.response_mask.sum() > rows
    for field in ("old_logp", "ref_logp", "advantages"):
        np.testing.assert_allclose(getattr(fast, field), getattr(plain, field), atol=2e-5)

    start = jax.tree.map(jnp.copy, learner.state)
    fast_metrics, fast_params = fetch({"proposer": learner.update(fast)}), _params(trainer)
    learner.state = start
    plain_metrics, plain_params = fetch({"proposer": learner.update(plain)}), _params(trainer)
    for k in plain_metrics:
        np.testing.assert_allclose(fast_metrics[k], plain_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Adam's first step is lr * g / (|g| + eps): where |g| is float noise (~1e-8) the two equal
    # computations' rounding moves a weight by up to ~2% of lr on some CPUs; a wrong shortcut moves
    # weights by O(lr).
    worst = max(np.abs(fast_params[k] - plain_params[k]).max() for k in plain_params)
    assert worst < 0.1 * config.optim.lr, worst

    trainer.config.rollout.temperature = 0.7  # the sampler's tokens, not its log-probs' distribution
    assert not learner.reuses_sampler_logprobs


def test_non_finite_updates_are_skipped_then_stop_the_run(policy_folder, tmp_path):
    """Weights poisoned with NaN: every update is skipped (the weights stay as they were, the skips are
    counted), and the third such step in a row stops the run with one line naming step and role."""
    config = tiny_run_config(policy_folder, tmp_path / "run", steps=5)
    config.train.max_nonfinite_steps = 3
    trainer = Trainer(config)
    learner = trainer.learner
    learner.state = learner.state.replace(params=jax.tree.map(lambda x: x * jnp.nan, learner.state.params))
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm at step 3 \(role solver"):
        trainer.run()
    assert trainer.steps_done == 3 and int(learner.state.step) == 0
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["solver/skipped_steps"] for m in metrics if "solver/skipped_steps" in m] == [2.0, 2.0, 2.0]
    assert [m["proposer/skipped_steps"] for m in metrics if "proposer/skipped_steps" in m] == [1.0]


def test_existing_checkpoints_without_resume_is_refused(policy_folder, tmp_path):
    Trainer(tiny_run_config(policy_folder, tmp_path / "run", steps=1)).run()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(tiny_run_config(policy_folder, tmp_path / "run", steps=2)).run()


def test_pregenerated_questions_cycle_through_one_pool(policy_folder, tmp_path):
    config = tiny_run_config(policy_folder, tmp_path / "run", steps=2)
    config.rollout.question_source = "pregenerated"
    config.rollout.pregenerated_questions = 12  # a step takes 8: step 2 wraps around
    trainer = Trainer(config)
    trainer.run()
    pool = [p["proposal"] for p in trainer.rollouts.pool]
    assert len(pool) == 12
    lines = [json.loads(l) for l in (tmp_path / "run" / "questions.jsonl").read_text().splitlines()]
    assert [line["proposals"] for line in lines] == [pool[:8], pool[8:] + pool[:4]]
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("proposer/grad_norm" in m for m in metrics)  # the proposer is never trained


@pytest.mark.parametrize("task", ["algebra", "coding"])
def test_other_tasks_run_two_steps(policy_folder, tmp_path, task):
    config = tiny_run_config(policy_folder, tmp_path / "run", task=task)
    # Short proposer prompts: a random model's output does not depend on the wording, and the character
    # tokenizer makes the reference's a 512-token prompt for algebra, 1,024 for coding (-8% CPU here).
    config.task_options.proposer_prompt = f"Write one {task} problem."
    if task == "coding":
        pytest.importorskip("sqlm_jax.sandbox", reason="the coding task needs the sandbox")
        config.rl.advantage = "gae"  # the reference's coding setup: PPO with a critic, no KL
        config.rl.use_kl = False
        config.reward.code_timeout_s = 2.0
        config.task_options.system_prompt = "Use the actions."  # the reference's: solver prompts of 1,024
    summary = Trainer(config).run()
    assert summary["steps"] == 2 and summary["task"] == task
    last = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert "reward/solver" in last
    if task == "coding":
        assert "solver/critic_value_loss" in last and any(k.startswith("sandbox/") for k in last)


def test_critic_trains_on_the_proposer_batch_every_step(policy_folder, tmp_path):
    """GAE: the critic's updates on the proposer batch, then the solver batch, every step; the actor's on
    the solver batch, and on the proposer batch every proposer_update_freq (2) steps."""
    config = tiny_run_config(policy_folder, tmp_path / "run")
    config.rl.advantage, config.rl.use_kl = "gae", False
    trainer = Trainer(config)
    calls, update = [], trainer.learner.update

    def recording(batch, *, actor=True, critic=True):
        calls.append((batch.response_ids.shape[0], actor, critic))
        return update(batch, actor=actor, critic=critic)

    trainer.learner.update = recording
    trainer.run()
    # Proposer batch: 8 rows (one mini-batch); solver batch: 16 rows (two).
    one_step = [(8, False, True), (16, False, True), (16, True, False)]
    assert calls == one_step + one_step + [(8, True, False)]
    assert int(trainer.learner.critic_state.step) == 2 * 3 and int(trainer.learner.state.step) == 2 * 2 + 1
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [s for s in steps if "reward/solver" in s][0]
    assert "proposer/critic_value_loss" in first and "proposer/grad_norm" not in first


def _labelled_script(prompt: str, row: int) -> str:
    """Right on even rows, wrong on odd ones, for the held-out wording "... equation: a * b =" ."""
    a, b = map(int, re.findall(r"(\d+) \* (\d+) =", prompt)[-1])
    return f"<answer>{a * b + row % 2}</answer>"


def test_dataset_questions_with_ground_truth_rewards(policy_folder, tmp_path, monkeypatch):
    """The labelled-RL baseline: questions from the task's generator, none held out, scored against
    their labels; the proposer is never trained."""
    monkeypatch.setattr(rollout, "sample", scripted_sample(load_tokenizer(policy_folder), _labelled_script))
    config = rewarded_run_config(policy_folder, tmp_path / "run")
    config.rollout.question_source, config.reward.kind = "dataset", "ground_truth"
    config.rollout.pregenerated_questions = 12
    trainer = Trainer(config)
    trainer.run()
    pool = [p["text"] for p in trainer.rollouts.pool]
    assert len(pool) == 12 and not set(pool) & trainer.heldout_texts
    lines = [json.loads(l) for l in (tmp_path / "run" / "questions.jsonl").read_text().splitlines()]
    assert [line["proposals"] for line in lines] == [pool[:8], pool[8:] + pool[:4]]
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/solver"] for m in metrics if "reward/solver" in m] == [0.5, 0.5]
    assert not any("proposer/grad_norm" in m for m in metrics)


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


def test_second_heldout_set_is_evaluated_under_its_own_options(policy_folder, tmp_path, monkeypatch):
    """eval.second_set: its problems come from the held-out generator under its options (first operands
    of 5 digits here), it is evaluated at every evaluation with its own token budget, and its accuracy
    is logged beside the main set's. The stand-in solver knows the products of 5-digit numbers only."""
    from types import SimpleNamespace

    from sqlm_jax import evaluate
    budgets = []

    def knows_big_products(model, prompts, *, max_new_tokens, n, **_):
        budgets.append(max_new_tokens)
        tokenizer = load_tokenizer(policy_folder)
        answers = []
        for p in prompts:
            a, b = map(int, re.findall(r"\d+", tokenizer.hf.decode(p))[-2:])
            answers += [tokenizer.encode(f"<answer>{a * b if a >= 10000 else -1}</answer>")] * n
        return SimpleNamespace(token_lists=answers)

    monkeypatch.setattr(evaluate, "generate", knows_big_products)
    config = tiny_run_config(policy_folder, tmp_path / "run", steps=1)
    config.eval.second_set = "beyond"
    config.eval.second_set_options = {"heldout_a_range": (10000, 99999), "heldout_b_range": (2, 9)}
    config.eval.second_set_problems, config.eval.second_set_max_new_tokens = 6, 20
    summary = Trainer(config).run()
    assert [e["eval/beyond_greedy_accuracy"] for e in summary["eval_history"]] == [1.0, 1.0]
    assert [e["eval/greedy_accuracy"] for e in summary["eval_history"]] == [0.0, 0.0]
    assert budgets.count(20) == 2 and budgets.count(config.eval.max_new_tokens) == 2


@pytest.mark.parametrize("room", ["ample", "none"])
def test_on_tpu_the_compiler_sets_the_auto_knobs_and_refuses_what_it_cannot_hold(policy_folder, tmp_path,
                                                                                 monkeypatch, room):
    """Where the run is on TPU (aot.judge_on_this_host gives the compiler's judge; here one compiling
    for this host's devices stands in), the auto micro-batch and rows in flight are judged by the
    compiled solver programs, and a run they cannot hold stops before any weight loads, naming the
    phases over the limit."""
    from sqlm_jax import aot
    from sqlm_jax.plan import MemoryPlanError
    judges = []

    def on_tpu(model_cfg, device_bytes, log=print):
        judges.append(aot.CompiledJudge(model_cfg, jax.devices(), device_bytes, log=log))
        judges[-1].limit = device_bytes if room == "ample" else 1
        return judges[-1]

    monkeypatch.setattr(aot, "judge_on_this_host", on_tpu)
    c = tiny_run_config(policy_folder, tmp_path / "run", steps=1)
    c.rl.micro_batch_size = c.rollout.rows_in_flight = -1
    if room == "none":
        with pytest.raises(MemoryPlanError, match=r"(?s)training: .* over the limit.*sampling: .* over the limit"):
            Trainer(c)
        return
    trainer = Trainer(c)
    # with room for all: the smallest of each knob compiled, then the largest; the fit check at the
    # chosen knobs reuses them
    knobs = sorted((name, json.loads(key)["rl" if "update" in name else "rollout"][
        "micro_batch_size" if "update" in name else "rows_in_flight"]) for name, key in judges[0]._compiled)
    largest, devices = c.rl.mini_batch_size * c.rollout.n, trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    assert knobs == sorted({("solver policy update", devices), ("solver policy update", largest),
                            ("solver sampler", 0), ("solver sampler", devices)})
    assert (trainer.config.rl.micro_batch_size, trainer.config.rollout.rows_in_flight) == (largest, 0)
