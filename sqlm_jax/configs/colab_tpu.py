"""The paper's model on one TPU chip (a Colab v5e runtime): Qwen2.5-3B-Instruct self-plays arithmetic
with LoRA, a demo at a Colab-sized batch.

The method is configs/arithmetic.py's (majority vote, proposer band, GRPO with the KL term, the
proposer updated every 5 steps, questions online); what differs is what one 16 GiB chip can hold:
  * LoRA (model.lora): the frozen base in bfloat16 (6 GiB instead of 12), rank-16 adapters on every
    projection and their AdamW state in float32; the base with the adapters off is the KL reference,
    so there is no second copy. LoRA's usual learning rate, 2e-5, instead of the reference's 1e-6.
  * a smaller batch and shorter responses: 16 rows × n = 4, 256-token proposals, 512-token answers.
Micro-batch 8; 64 rows in flight. Its fit by the TPU compiler's own account:
    python -m sqlm_jax.plan --config=configs/colab_tpu.py --accelerator=v5e-1 --compile
"""
from sqlm_jax.configs.arithmetic import get_config as arithmetic


def get_config():
    c = arithmetic()
    c.workdir = "runs/colab_tpu"
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}  # one chip here; every chip of a larger runtime
    c.model.param_dtype = "bfloat16"
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.optim.lr = 2e-5
    c.rollout.batch_size = 16
    c.rl.mini_batch_size = 8
    c.rl.micro_batch_size = 8  # what the compiled figures below were measured at
    c.rollout.proposer_max_new_tokens = 256
    c.rollout.solver_max_new_tokens = 512
    # The solver's 256 answers in 64 slots at a time: all at once, the TPU compiler counts 17.2 GiB on
    # one chip for the sampler (the plan, 13.7).
    c.rollout.rows_in_flight = 64
    c.eval.max_new_tokens = 512
    c.eval.num_problems = 200
    c.eval.every = 10
    c.train.steps = 30
    return c
