"""Config fields reach the code they name (issue 32): a trainer built from a config whose fields are all
off their defaults carries each value where it is used, field by field from one table; the optimizer is
AdamW of every optim field, by hand; a decaying schedule lasts the run's updates, PPO epochs included."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sqlm_jax.defaults import base_config
from sqlm_jax.evaluate import drop_overlong
from sqlm_jax.learner import updates_per_run
from sqlm_jax.models import lora
from sqlm_jax.train import Trainer
from sqlm_jax.train_step import LossAgg, LossConfig, make_optimizer
from tests.tiny_models import random_policy, tiny_run_config


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _adapters(trainer):
    from flax import nnx
    return lora.adapters_by_weight(nnx.merge(*trainer.learner.policy))


# (field, a value off its default, where the trainer holds it). Each row: built from the config, the
# value is there.
TABLE = [
    ("rollout.temperature", 0.7, lambda t: (t.rollouts.proposer_params.temperature,
                                            t.rollouts.solver_params.temperature)),
    ("rollout.top_k", 5, lambda t: (t.rollouts.proposer_params.top_k, t.rollouts.solver_params.top_k)),
    ("rollout.top_p", 0.9, lambda t: (t.rollouts.proposer_params.top_p, t.rollouts.solver_params.top_p)),
    ("rollout.rows_in_flight", 4, lambda t: (t.rollouts.proposer_params.rows_in_flight,
                                             t.rollouts.solver_params.rows_in_flight)),
    ("rollout.proposer_max_new_tokens", 10, lambda t: t.rollouts.proposer_params.max_new_tokens),
    ("rollout.solver_max_new_tokens", 11, lambda t: t.rollouts.solver_params.max_new_tokens),
    ("rollout.n", 4, lambda t: (t.rollouts.proposer_params.n // t.config.rollout.batch_size,
                                t.rollouts.solver_params.n)),
    ("reward.kind", "format", lambda t: t.rollouts.reward_kind),
    ("checkpoint.keep", 2, lambda t: (t.checkpointer.keep, t.checkpointer.manager._options.max_to_keep)),
    ("model.remat", True, lambda t: t.model_config.remat),
    ("model.lora.rank", 2, lambda t: {a.a.shape[-1] for a in _adapters(t).values()}),
    ("model.lora.alpha", 6.0, lambda t: {a.scale * a.a.shape[-1] for a in _adapters(t).values()}),
    ("model.lora.targets", "o,down", lambda t: {k.rsplit(".", 1)[-1] for k in _adapters(t)}),
    ("rl.micro_batch_size", 16, lambda t: t.learner.rows_per_device * 4),  # over data 2 x fsdp 2
    ("rl.shared_prompt_pass", False, lambda t: t.learner.prompt_group(4) > 1),
    ("task_options.proposer_prompt", "Write one product.", lambda t: t.task.proposer_prompt),
    ("eval.num_problems", 6, lambda t: len(t.eval_problems) + t.eval_dropped),
]
EXPECTED = {"rollout.temperature": (0.7, 0.7), "rollout.top_k": (5, 5), "rollout.top_p": (0.9, 0.9),
            "rollout.rows_in_flight": (4, 4), "rollout.n": (4, 4), "checkpoint.keep": (2, 2),
            "model.lora.rank": {2}, "model.lora.alpha": {6.0}, "model.lora.targets": {"o", "down"}}


@pytest.fixture(scope="module")
def built(policy_folder, tmp_path_factory):
    """A Trainer of every TABLE value, plus eval.seed and eval.max_prompt_len, on a 2 x 2 x 2 mesh."""
    c = tiny_run_config(policy_folder, tmp_path_factory.mktemp("run") / "run")
    c.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    c.rollout.batch_size = c.rl.mini_batch_size = 4
    for field, value, _ in TABLE:
        *parents, leaf = field.split(".")
        section = c
        for part in parents:
            section = section[part]
        assert section[leaf] != value, f"{field}: pick a value off the default"
        section[leaf] = value
    c.eval.seed, c.eval.max_prompt_len = 99, 222  # prompts of 222 and 223 tokens
    return Trainer(c)


@pytest.mark.parametrize("field, value, found", TABLE, ids=[row[0] for row in TABLE])
def test_the_field_reaches_the_trainer(built, field, value, found):
    assert found(built) == EXPECTED.get(field, value)


def test_the_heldout_set_is_the_configs(built):
    """eval.num_problems, eval.seed and eval.max_prompt_len: the task's held-out problems of that seed,
    those whose solver prompt passes 222 tokens dropped and counted."""
    heldout = built.task.heldout_problems(6, 99)
    kept, dropped = drop_overlong(built.tokenizer, built.task, heldout, 222)
    assert built.eval_problems == kept and built.eval_dropped == dropped and 0 < dropped < 6
    assert [q.text for q, _ in heldout] != [q.text for q, _ in built.task.heldout_problems(6, 1234)]


def test_reuse_of_the_samplers_logprobs_follows_its_fields(built):
    """rl.reuse_sampler_logprobs, and the sampling knobs under which the sampler's log-probs are exact."""
    c, learner = built.config, built.learner
    saved = c.rollout.temperature, c.rollout.top_k, c.rollout.top_p
    try:
        assert not learner.reuses_sampler_logprobs  # temperature 0.7, top-k, top-p
        c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = 1.0, 0, 1.0
        assert learner.reuses_sampler_logprobs
        c.rl.reuse_sampler_logprobs = False
        assert not learner.reuses_sampler_logprobs
    finally:
        c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = saved
        c.rl.reuse_sampler_logprobs = True


def test_loss_knobs_reach_the_loss_config():
    rl_cfg = base_config().rl
    values = dict(clip_eps=0.3, clip_eps_low=0.1, clip_eps_high=0.4, dual_clip_c=5.0, policy_loss="gspo",
                  gspo_clip_eps_low=1e-3, gspo_clip_eps_high=2e-3, kl_coef=0.02, kl_kind="k2", use_kl=False,
                  entropy_coef=0.01, logits_chunk_mib=7.0)
    rl_cfg.update(values)
    rl_cfg.loss_agg, rl_cfg.loss_agg_chunk = "seq-mean-token-sum", 3
    assert LossConfig.from_config(rl_cfg) == LossConfig(**values)
    assert LossAgg.from_config(rl_cfg) == LossAgg(mode="seq-mean-token-sum", chunk=3)


def test_adamw_of_every_optim_field_by_hand():
    """lr 0.2, b1 0.5, b2 0.75, eps 0.1, weight decay 0.1, clip 100 (inactive): two steps on p = 1 with
    gradients 2 then -1, AdamW as optax writes it: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd p)."""
    c = base_config().optim
    c.lr, c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip = 0.2, 0.5, 0.75, 0.1, 0.1, 100.0
    p, m, v, expected = 1.0, 0.0, 0.0, []
    for t, g in enumerate((2.0, -1.0), start=1):
        m, v = 0.5 * m + 0.5 * g, 0.75 * v + 0.25 * g * g
        p -= 0.2 * (m / (1 - 0.5 ** t) / (np.sqrt(v / (1 - 0.75 ** t)) + 0.1) + 0.1 * p)
        expected.append(p)
    tx, params = make_optimizer(c, total_updates=10), jnp.array(1.0)
    state, got = tx.init(params), []
    for g in (2.0, -1.0):
        updates, state = tx.update(jnp.array(g), state, params)
        params = optax.apply_updates(params, updates)
        got.append(float(params))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("schedule, rates", [
    ("constant", [0, 0.5, 1, 1, 1, 1, 1]),
    # warmup 2 updates, then cosine to 0 at the run's 6th update: 1/2 (1 + cos(pi (t - 2) / 4))
    ("cosine", [0, 0.5, 1, 0.853553, 0.5, 0.146447, 0]),
])
def test_schedule_and_warmup_set_each_updates_rate(schedule, rates):
    """A gradient of 1 every update, Adam's eps and weight decay 0: each update moves p by that update's
    learning rate (m-hat = v-hat = 1), so the steps read the schedule off."""
    c = base_config().optim
    c.lr, c.schedule, c.warmup_steps, c.eps, c.weight_decay = 0.1, schedule, 2, 0.0, 0.0
    tx, params = make_optimizer(c, total_updates=6), jnp.array(0.0)
    state, steps = tx.init(params), []
    for _ in rates:
        updates, state = tx.update(jnp.array(1.0), state, params)
        steps.append(-float(updates))
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(steps, 0.1 * np.array(rates), rtol=2e-5, atol=1e-7)  # float32


@pytest.mark.parametrize("epochs, freq, policy, critic", [
    # B = 4, n = 2, mini-batches of 4 prompt rows: the solver batch (8 rows) is 2 updates an epoch, the
    # proposer batch (4 rows) 1, which the policy trains on every `freq` steps and the critic every step.
    (1, 2, 3 * 1 * (2 + 1 / 2) // 1 + 1, 3 * 1 * (2 + 1) + 1),   # 7 + 1, 9 + 1
    (2, 2, 3 * 2 * (2 + 1 / 2) + 1, 3 * 2 * (2 + 1) + 1),        # 15 + 1, 18 + 1
    (3, 0, 3 * 3 * 2 + 1, 3 * 3 * (2 + 1) + 1),                  # no proposer updates
])
def test_a_run_lasts_its_updates_epochs_included(epochs, freq, policy, critic):
    c = tiny_run_config("unused", "unused", steps=3)
    c.rl.ppo_epochs, c.rl.proposer_update_freq = epochs, freq
    assert updates_per_run(c) == int(policy) and updates_per_run(c, critic=True) == int(critic)

