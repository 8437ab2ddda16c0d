"""Three-digit multiplication with Qwen2.5-3B-Instruct (paper: 0.791 -> 0.948), reference settings."""
from sqlm_jax.defaults import base_config


def get_config():
    c = base_config()
    c.task = "arithmetic"
    c.workdir = "runs/arithmetic"
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    # Memory knobs: -1, the largest that fit the slice (sqlm_jax.auto_knobs; on TPU the TPU compiler
    # judges, from the smallest candidate up; per-slice figures in tpu/README.md). Neither changes a token.
    c.rl.micro_batch_size = -1
    c.rollout.rows_in_flight = -1
    c.rollout.offload_to_host = True  # the optimizer state and reference wait in host memory while sampling
    c.rollout.proposer_max_new_tokens = 1024
    c.rollout.solver_max_new_tokens = 1024
    c.eval.max_new_tokens = 1024
    return c
