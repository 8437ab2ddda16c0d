"""Three-digit multiplication with Qwen2.5-3B-Instruct (paper: 0.791 -> 0.948), reference settings."""
from sqlm_jax.defaults import base_config


def get_config():
    c = base_config()
    c.task = "arithmetic"
    c.workdir = "runs/arithmetic"
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    # Memory knobs, set by the TPU compiler's account on a v5e-8 (tpu/README.md): micro-batch 16 is
    # 13.5 GiB per chip (the plan's auto pick, 64, was not compiled: the plan is 25-30% low on TPU),
    # and every row at once in the sampler 12.9. On a slice of more than 16 chips: -1 or a multiple of them.
    c.rl.micro_batch_size = 16
    c.rollout.rows_in_flight = 0
    c.rollout.offload_to_host = True  # the optimizer state and reference wait in host memory while sampling
    c.rollout.proposer_max_new_tokens = 1024
    c.rollout.solver_max_new_tokens = 1024
    c.eval.max_new_tokens = 1024
    return c
