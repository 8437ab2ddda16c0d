"""OMEGA linear equations with Qwen2.5-3B-Instruct (paper: 0.440 -> 0.600), reference settings."""
from sqlm_jax.defaults import base_config


def get_config():
    c = base_config()
    c.task = "algebra"
    c.workdir = "runs/algebra"
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    # Memory knobs, set by the TPU compiler's account on a v5e-8 (tpu/README.md): the plan (-1, auto)
    # picks a micro-batch of 16, which XLA puts at 15.2 GiB per chip, over the 14.96 limit; 8 is 14.4.
    # On a slice of more than 8 chips the micro-batch must be a multiple of the chips: -1 there.
    c.rl.micro_batch_size = 8
    c.rollout.rows_in_flight = 512
    c.rollout.offload_to_host = True  # the optimizer state and reference wait in host memory while sampling
    c.rollout.proposer_max_new_tokens = 3072
    c.rollout.solver_max_new_tokens = 3072
    c.eval.max_new_tokens = 3072
    # OMEGA's linear-equation family: point data_path at a local copy, or set dataset to the hub id.
    return c
