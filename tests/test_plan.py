"""The memory plan agrees with the bytes really allocated, divides by the mesh right, and explains misfits."""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import plan
from sqlm_jax.defaults import base_config
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
MESH = {"data": 1, "fsdp": 4, "tensor": 2}
TINY = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


def _tiny_config():
    c = base_config()
    c.rollout.batch_size, c.rollout.n = 2, 2
    c.rollout.max_prompt_len, c.rollout.proposer_max_new_tokens, c.rollout.solver_max_new_tokens = 16, 24, 8
    c.rl.mini_batch_size, c.rl.micro_batch_size = 2, 4
    return c


def _bytes_on_device0(tree) -> int:
    """Bytes of every array of `tree` that live on device 0, shard by shard."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
               for shard in x.addressable_shards if shard.device == device)


@pytest.fixture(scope="module")
def allocated():
    """Real parameters, AdamW state and a planned-shape KV cache on the 8-device CPU mesh."""
    assert jax.device_count() == 8, "conftest asks for 8 fake CPU devices"
    mesh = mesh_lib.make_mesh(MESH)
    # Zeros allocated straight into the model's shardings (random init would only cost compile time).
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda v, s: v.replace(jnp.zeros(v.shape, v.dtype, device=s.get_value())),
                          abstract, mesh_lib.param_shardings(abstract, mesh),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    # The optimizer state is sharded like the parameters, as the trainer does it.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.01))
    shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                      jax.tree.map(lambda x: x.sharding, params),
                                      transform_non_params=lambda _: NamedSharding(mesh, mesh_lib.P()))
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    def zeros(shape):
        sharding = NamedSharding(mesh, mesh_lib.logical_spec(("batch", "kv_heads", None, None), shape, mesh))
        return jax.jit(lambda: jnp.zeros(shape, TINY.compute_dtype), out_shardings=sharding)()
    cache = [(zeros(shape), zeros(shape)) for shape in plan.kv_cache_shapes(_tiny_config(), TINY)
             for _ in range(TINY.num_layers)]
    return {"parameters": params, "optimizer state": opt_state, "KV cache": cache}


@pytest.mark.parametrize("row", ["parameters", "optimizer state", "KV cache"])
def test_plan_matches_allocated_bytes(allocated, row):
    planned = plan.memory_plan(_tiny_config(), TINY, MESH).row(row).bytes
    actual = _bytes_on_device0(allocated[row])
    assert abs(planned - actual) <= 0.1 * actual, f"{row}: planned {planned} B, allocated {actual} B"


def test_kv_cache_is_the_larger_sampler_call():
    c = _tiny_config()  # B = n = 2, prompts bucketed to 16 slots
    c.rollout.proposer_max_new_tokens, c.rollout.solver_max_new_tokens = 24, 16
    # Solver: 4 prompts x 16 + B·n·n = 8 rows x 16 = 192 slots; proposer: 2 x 16 + 4 x 24 = 128.
    assert plan.kv_cache_shapes(c, TINY) == [(4, 2, 16, 16), (8, 2, 16, 16)]
    c.rollout.proposer_max_new_tokens = 48  # proposer: 2 x 16 + 4 x 48 = 224
    assert plan.kv_cache_shapes(c, TINY) == [(2, 2, 16, 16), (4, 2, 48, 16)]


def test_fsdp_quarters_the_embed_sharded_weights():
    layout = plan.param_layout(TINY)
    whole = plan.weights_bytes(layout, plan.abstract_mesh({}))
    quartered = plan.weights_bytes(layout, plan.abstract_mesh({"fsdp": 4}))
    embed = sum(d.itemsize * math.prod(s) for s, a, d in layout if "embed" in a)
    assert embed > 0.9 * whole  # nearly every weight has an embed axis (norms and biases do not)
    assert quartered == whole - embed + embed // 4
    v, d = TINY.vocab_size, TINY.hidden_size
    assert plan.shard_bytes((v, d), ("vocab", "embed"), 4, plan.abstract_mesh({"fsdp": 4})) == v * d


def test_check_fits_raises_with_the_table_and_the_fix():
    c = _tiny_config()
    total = plan.memory_plan(c, TINY, MESH).total
    plan.check_fits(c, TINY, MESH, device_bytes=2 * total)  # fits: no error
    with pytest.raises(plan.MemoryPlanError) as e:
        plan.check_fits(c, TINY, MESH, device_bytes=total // 2)
    message = str(e.value)
    for text in ("parameters", "KV cache", "activations", "total", "does NOT fit",
                 "mesh.fsdp", "micro_batch_size", "rollout.batch_size"):
        assert text in message


def test_remat_shrinks_activations():
    c = _tiny_config()
    c.rollout.max_prompt_len = 512  # long enough that all the layers' intermediates dominate
    with_remat = plan.memory_plan(c, dataclasses.replace(TINY, remat=True), MESH)
    without = plan.memory_plan(c, TINY, MESH)
    assert with_remat.row("activations").bytes < without.row("activations").bytes


def test_bundled_reference_configs_load_offline():
    c = base_config()
    sizes = {}
    for hub_id in ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-Coder-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"):
        c.model.path = hub_id
        sizes[hub_id] = plan.load_model_config(c).num_params()
    assert round(sizes["Qwen/Qwen2.5-3B-Instruct"] / 1e9, 2) == 3.09  # the published 3.09B
    assert sizes["Qwen/Qwen2.5-Coder-3B-Instruct"] == sizes["Qwen/Qwen2.5-3B-Instruct"]
    assert round(sizes["Qwen/Qwen2.5-0.5B-Instruct"] / 1e9, 2) == 0.49  # the published 0.49B


def test_accelerator_names():
    assert plan.parse_accelerator("v5e") == ("v5e", None)
    assert plan.parse_accelerator("v4-8") == ("v4", 4)  # v4 types count TensorCores, 2 per chip
    assert plan.parse_accelerator("v5litepod-8") == ("v5e", 8)
    assert plan.parse_accelerator("v5p-32") == ("v5p", 16)
    with pytest.raises(ValueError, match="unknown accelerator"):
        plan.parse_accelerator("v9-8")


def test_cpu_devices_share_the_host_ram():
    assert plan.local_device_bytes() == plan.host_ram_bytes() // jax.local_device_count()


def test_cli_prints_the_table_offline():
    run = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.plan", "--config=configs/algebra.py", "--accelerator=v5p-32"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    for text in ("Qwen/Qwen2.5-3B-Instruct", "fsdp=16", "KV cache", "solver: 256 prompts x 512 slots + 1024 rows x 3072 slots",
                 "total", "v5p: 95.0 GiB per device", "fits"):
        assert text in run.stdout, run.stdout
