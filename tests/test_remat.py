"""`model.remat` is a memory knob only: with it on, the sampler's tokens and log-probs, evaluation's
answers, and the update's loss and gradients (full fine-tuning, the critic, LoRA) equal those with it
off, to float rounding.

Every paper config sets remat; before it was a pure `jax.checkpoint` (models/transformer.py), nnx.remat
crashed in the sampler's loops and in the LoRA loss. The models here are float32, on one device, so a
difference beyond rounding is a bug, not noise.
"""
import dataclasses
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import sampling
from sqlm_jax.evaluate import evaluate
from sqlm_jax.learner import Learner
from sqlm_jax.models import ModelConfig, Transformer, load_pretrained
from sqlm_jax.models.critic import Critic
from sqlm_jax.tasks import get_task
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train_step import LossConfig, accumulate_gradients, policy_loss_fn, value_loss_fn
from tests.checkpoints import make_checkpoint
from tests.test_lora import _prepared
from tests.test_train_step import _batch, _split
from tests.tiny_models import tiny_run_config

TINY = Path(__file__).resolve().parents[1] / "sqlm_jax" / "assets" / "tiny"


def _with_remat(model: Transformer, remat: bool) -> Transformer:
    """The same weights (the same arrays) under a config with `remat` set."""
    graphdef, state = nnx.split(model)
    twin = nnx.merge(graphdef, state)
    twin.config = dataclasses.replace(model.config, remat=remat)
    return twin


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("remat"), "qwen2")[0]


@pytest.mark.parametrize("rows_in_flight", [0, 3], ids=["static", "slot-refill"])
def test_remat_samples_the_same_tokens_and_logprobs(checkpoint, rows_in_flight):
    model, _ = load_pretrained(checkpoint)
    assert not model.config.remat
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, 97, length).tolist() for length in (5, 11, 3, 8)]
    knobs = dict(max_new_tokens=24, temperature=1.0, n=2, stop_ids=tuple(range(1, 8)), seed=3, rows_in_flight=rows_in_flight)
    off = sampling.generate(model, prompts, **knobs)
    on = sampling.generate(_with_remat(model, True), prompts, **knobs)
    np.testing.assert_array_equal(np.asarray(on.tokens), np.asarray(off.tokens))
    np.testing.assert_allclose(np.asarray(on.logprobs), np.asarray(off.logprobs), atol=1e-6)
    assert len({len(t) for t in off.token_lists}) > 1  # some rows stopped early: refill had work to do


def test_remat_evaluates_the_same_answers():
    """Greedy and sampled evaluation of the shipped tiny model, as a run evaluates it."""
    config = runpy.run_path(str(TINY.parents[1] / "configs" / "tiny.py"))["get_config"]()
    task = get_task(config.task, **{k: v for k, v in config.task_options.items() if v is not None})
    tokenizer = load_tokenizer(TINY)
    problems = task.heldout_problems(12, 0)
    results = {}
    for remat in (False, True):
        model, _ = load_pretrained(TINY, remat=remat)
        results[remat] = [evaluate(model, tokenizer, task, problems, greedy=greedy, n=1 if greedy else 2,
                                   max_new_tokens=40, full=True) for greedy in (True, False)]
    for off, on in zip(results[False], results[True]):
        assert on.responses == off.responses
        np.testing.assert_array_equal(on.scores, off.scores)
    assert 0 < results[False][0].accuracy < 1  # real answers, some right and some wrong


CFG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=40, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def _gradients(which: str, remat: bool, prompt_group: int):
    """(loss metrics, gradients) of the policy's or the critic's loss over 2 micro-batches of 4."""
    policy = Transformer(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0))
    model = policy if which == "policy" else Critic(policy)
    graphdef, params = nnx.split(model)
    if which == "critic":  # a non-zero head, so the gradients reach the layers
        params["value_head"].set_value(0.1 * jnp.ones(CFG.hidden_size))
    loss_fn = (policy_loss_fn(graphdef, LossConfig()) if which == "policy"
               else value_loss_fn(graphdef, value_clip=0.5))
    batch = _batch()
    if prompt_group > 1:  # rows of a group share their first row's prompt
        first = lambda x: np.repeat(x[::prompt_group], prompt_group, axis=0)
        batch = batch.replace(prompt_ids=first(batch.prompt_ids), prompt_mask=first(batch.prompt_mask),
                              prompt_group=prompt_group)
    grads, metrics = jax.jit(lambda p, b: accumulate_gradients(loss_fn, p, b))(params, _split(batch, 4))
    return metrics, grads


@pytest.mark.parametrize("which,prompt_group", [("policy", 1), ("policy", 2), ("critic", 2)])
def test_remat_gives_the_same_loss_and_gradients(which, prompt_group):
    (m_off, g_off), (m_on, g_on) = (_gradients(which, remat, prompt_group) for remat in (False, True))
    assert float(m_off["loss"]) != 0 and max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_off)) > 1e-3
    np.testing.assert_allclose(m_on["loss"], m_off["loss"], rtol=1e-6)
    for on, off in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
        np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-7)


def test_remat_gives_the_same_lora_update(checkpoint):
    """The LoRA update (the frozen base merged inside the loss) with remat on: the same old and
    reference log-probs, metrics and adapters after one update as with it off."""
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    after = {}
    for remat in (False, True):
        c = tiny_run_config(checkpoint, "/unused")
        c.model.lora.rank, c.rl.kl_coef, c.optim.lr, c.model.remat = 4, 0.05, 1e-2, remat
        model, _ = load_pretrained(checkpoint, mesh=mesh, remat=remat)
        learner = Learner(c, mesh, *nnx.split(model))
        batch = _prepared(learner, 97)
        metrics = learner.update(batch)
        after[remat] = batch, metrics, jax.tree.map(np.asarray, learner.state.params)
    (b_off, m_off, p_off), (b_on, m_on, p_on) = after[False], after[True]
    np.testing.assert_allclose(b_on.old_logp, b_off.old_logp, atol=1e-6)
    np.testing.assert_allclose(b_on.ref_logp, b_off.ref_logp, atol=1e-6)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m_on[key], m_off[key], rtol=1e-5)
    moved = [np.abs(x).max() for p, x in nnx.to_flat_state(p_off) if p[-1] == "b"]
    assert min(moved) > 0  # the update moved every adapter
    for on, off in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
        np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-7)
