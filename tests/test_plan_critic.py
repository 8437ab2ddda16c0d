"""The memory plan's critic row (rl.advantage='gae'): the critic's weights and its AdamW moments, as the
learner really allocates them on the 8-device mesh; no row without a critic."""
import jax
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import plan
from sqlm_jax.defaults import base_config
from sqlm_jax.learner import Learner
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.critic import Critic
from sqlm_jax.models.transformer import Transformer

MESH = {"data": 1, "fsdp": 4, "tensor": 2}
TINY = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


def _config(advantage: str):
    c = base_config()
    c.rollout.batch_size, c.rollout.n = 2, 2
    c.rollout.max_prompt_len, c.rollout.proposer_max_new_tokens, c.rollout.solver_max_new_tokens = 16, 24, 8
    c.rl.mini_batch_size, c.rl.micro_batch_size = 2, 4
    c.rl.advantage = advantage
    return c


def _on_mesh(module, mesh):
    graphdef, params = nnx.split(module)
    return graphdef, jax.device_put(params, mesh_lib.param_shardings(params, mesh))


def _bytes_on_device0(tree) -> int:
    device = jax.devices()[0]
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
               for shard in x.addressable_shards if shard.device == device)


def test_critic_row_is_what_the_learner_allocates():
    """The critic (a copy of the policy's trunk and a value head) and its two AdamW moments: 3x the
    policy's weights per device, within the value head and the step counters."""
    assert jax.device_count() == 8, "conftest asks for 8 fake CPU devices"
    mesh = mesh_lib.make_mesh(MESH)
    c = _config("gae")
    policy = _on_mesh(Transformer(TINY, rngs=nnx.Rngs(0)), mesh)
    critic = _on_mesh(Critic(Transformer(TINY, rngs=nnx.Rngs(1))), mesh)
    learner = Learner(c, mesh, *policy, critic=critic)
    allocated = _bytes_on_device0(learner.critic_state)
    planned = plan.memory_plan(c, TINY, MESH)
    critic_row = planned.row("critic")
    assert critic_row.phase == "resident"
    assert abs(critic_row.bytes - allocated) <= 0.02 * allocated, (critic_row.bytes, allocated)
    assert critic_row.bytes == 3 * planned.row("parameters").bytes

    without = plan.memory_plan(_config("grpo"), TINY, MESH)
    assert "critic" not in [r.name for r in without.rows]
    assert planned.total - without.total == critic_row.bytes
