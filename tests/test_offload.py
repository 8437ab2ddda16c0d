"""rollout.offload_to_host (issue 30, as the paper configs ship): while the samplers run, the buffers no
sampler reads (optimizer states, the reference copy, the critic) wait in pinned host memory, and come
back for the log-prob passes and the updates without a bit changed."""
import jax
import numpy as np
import pytest
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.learner import Learner
from sqlm_jax.models import load_pretrained
from sqlm_jax.models.critic import Critic
from tests.checkpoints import make_checkpoint
from tests.test_lora import _prepared
from tests.tiny_models import tiny_run_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("offload"), "qwen2")[0]


def _learner(checkpoint, offload: bool) -> Learner:
    """Full fine-tuning with the KL reference and a GAE critic: every buffer that can move."""
    c = tiny_run_config(checkpoint, "/unused")
    c.rollout.offload_to_host, c.rl.kl_coef, c.rl.advantage, c.optim.lr = offload, 0.05, "gae", 1e-2
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    critic = nnx.split(Critic(load_pretrained(checkpoint, mesh=mesh)[0]))
    return Learner(c, mesh, *nnx.split(load_pretrained(checkpoint, mesh=mesh)[0]), critic=critic)


def _kinds(tree) -> set[str]:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_idle_buffers_wait_in_host_memory_while_sampling(checkpoint):
    learner = _learner(checkpoint, offload=True)
    idle = lambda: (learner.state.opt_state, learner.ref_params, learner.critic_state)
    assert _kinds(idle()) == {"device"}
    with learner.offloaded():
        assert _kinds(idle()) == {"pinned_host"}
        assert _kinds(learner.policy[1]) == {"device"}  # what the samplers read stays
    assert _kinds(idle()) == {"device"}


def test_off_by_default_and_no_bit_changed_by_the_round_trips(checkpoint):
    """Two steps' updates (the critic's and the policy's) with the idle buffers sent to host memory
    and back before each, against the same without: identical weights and optimizer states."""
    states = {}
    for offload in (False, True):
        learner = _learner(checkpoint, offload)
        for _ in range(2):
            with learner.offloaded():
                if not offload:
                    assert _kinds(learner.state.opt_state) == {"device"}
            batch = _prepared(learner, 97)
            learner.update(batch, actor=False)
            learner.update(batch, critic=False)
        states[offload] = jax.tree.map(np.asarray, (learner.states, learner.ref_params))
    for on, off in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False]), strict=True):
        np.testing.assert_array_equal(on, off)


def test_the_other_models_state_waits_in_host_memory_while_one_updates(checkpoint, monkeypatch):
    """With a critic, the critic's TrainState is in host memory during the policy's update and the
    policy's during the critic's (what coding's update needs on a v4-8); both back on the devices after."""
    learner = _learner(checkpoint, offload=True)
    seen = {}
    for name, attribute, other in (("policy", "_update", "critic_state"), ("critic", "_critic_update", "state")):
        compiled = getattr(learner, attribute)

        def spy(*args, compiled=compiled, name=name, other=other):
            seen[name] = _kinds(getattr(learner, other)), _kinds(args[0])
            return compiled(*args)

        monkeypatch.setattr(learner, attribute, spy)
    learner.update(_prepared(learner, 97))
    assert seen == {"critic": ({"pinned_host"}, {"device"}), "policy": ({"pinned_host"}, {"device"})}
    assert _kinds((learner.state, learner.critic_state)) == {"device"}
