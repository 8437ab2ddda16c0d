"""Codeforces-style coding with Qwen2.5-Coder-3B-Instruct (paper: 0.320 -> 0.391), reference settings.

The reference trains with PPO and a critic (GAE, gamma = lambda = 1), no KL term.
"""
from sqlm_jax.defaults import base_config


def get_config():
    c = base_config()
    c.task = "coding"
    c.workdir = "runs/coding"
    c.model.path = "Qwen/Qwen2.5-Coder-3B-Instruct"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    # Memory knobs left to the plan (-1: the largest that fit the devices; sqlm_jax.auto_knobs).
    # Memory knobs, set by the TPU compiler's account on a v5e-8 (tpu/README.md): the plan (-1, auto)
    # picks a micro-batch of 32, which XLA puts at 16.9 GiB per chip, over the 14.96 limit; 8 is 14.7.
    # On a slice of more than 8 chips the micro-batch must be a multiple of the chips: -1 there.
    c.rl.micro_batch_size = 8
    c.rollout.rows_in_flight = 256
    c.rollout.offload_to_host = True  # the optimizer state and reference wait in host memory while sampling
    c.rollout.batch_size = 1024
    c.rollout.proposer_max_new_tokens = 512
    c.rollout.solver_max_new_tokens = 512
    c.rl.mini_batch_size = 256
    c.rl.advantage = "gae"
    c.rl.use_kl = False
    c.eval.max_new_tokens = 512
    return c
