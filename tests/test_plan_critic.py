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


def test_offloaded_rows_leave_the_devices_while_sampling():
    """rollout.offload_to_host: while the samplers run, a device holds the policy's weights alone, as
    the plan's sampling figure counts (the optimizer state, the reference and the critic wait in host
    memory); for the updates, all of it again."""
    mesh = mesh_lib.make_mesh(MESH)
    c = _config("gae")
    c.rollout.offload_to_host = True
    assert c.rl.use_kl  # a reference copy to move too
    learner = Learner(c, mesh, *_on_mesh(Transformer(TINY, rngs=nnx.Rngs(0)), mesh),
                      critic=_on_mesh(Critic(Transformer(TINY, rngs=nnx.Rngs(1))), mesh))
    device0 = jax.devices()[0]
    on_device = lambda: sum(shard.data.nbytes for x in jax.tree.leaves(
        (learner.state, learner.ref_params, learner.critic_state)) if x.sharding.memory_kind == "device"
        for shard in x.addressable_shards if shard.device == device0)
    planned = plan.memory_plan(c, TINY, MESH)
    resident = {p: planned.during(p) - planned.phase_bytes(p) for p in ("sampling", "training")}
    assert resident["sampling"] == planned.row("parameters").bytes
    with learner.offloaded():
        assert abs(on_device() - resident["sampling"]) <= 0.02 * resident["sampling"]
    assert abs(on_device() - resident["training"]) <= 0.02 * resident["training"]
    assert planned.total == max(planned.during("sampling"), planned.during("training"))
