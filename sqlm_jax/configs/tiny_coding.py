"""SQLM on list-of-integers programs with the shipped tiny coding model (`sqlm_jax/assets/tiny_coding`,
made by `configs/tiny_coding_pretrain.py`), on a laptop CPU.

The coding task as the reference runs it: the proposer writes a problem, "Test Cases:" and five
`INPUT ||| OUTPUT` lines; the solver writes a ```python program, rewarded by the fraction of the
proposer's tests it passes in the sandbox (never by the generator's truth); the proposer is rewarded
when that pass rate is strictly between 0 and 1; PPO with a GAE critic (gamma = lambda = 1), no KL
term. Sizes and learning rates are scaled to the tiny model, as in `configs/tiny.py`. Held-out score:
the fraction of the generator's ground-truth tests a greedy program passes, on 300 problems.
Ablation: `--config.reward.kind=format`. It does not learn: 78% of the proposer's tests are wrong,
three seeds end 1.4-3.6 points below the base, and trained harder (lr 1.5e-4, 96 steps) SQLM falls 17
points as the solver learns the proposer's mistakes, while the same run with the true tests as reward
gains 4.1 and 5.5 points on two seeds (docs/results.md).
"""
import runpy
from pathlib import Path

TINY = runpy.run_path(str(Path(__file__).with_name("tiny.py")))
PRETRAIN = runpy.run_path(str(Path(__file__).with_name("tiny_coding_pretrain.py")))


def get_config():
    c = TINY["get_config"]()
    c.task = "coding"
    c.workdir = "runs/tiny_coding"
    c.model.path = str(Path(TINY["TINY_MODEL"]).with_name("tiny_coding"))
    c.task_options = dict(PRETRAIN["TASK"])
    c.rollout.max_prompt_len = 256
    c.rollout.proposer_max_new_tokens = 336
    c.rollout.solver_max_new_tokens = 208
    # The reference's coding setup: a critic (initialised from the policy, value head at zero) and no
    # KL term. Its critic rate is 10x the actor's (1e-5 vs 1e-6); the tiny config keeps that ratio.
    c.rl.advantage = "gae"
    c.rl.use_kl = False
    c.rl.critic_lr = 10 * c.optim.lr
    # With a critic, a group whose n solutions pass the same fraction still has advantages (the
    # return minus the critic's value): every group stays in the update, as in the reference.
    c.rl.filter_zero_variance = False
    # ~13 s a step alone on a 2-core VM (float32 matmul peak ~220 GFLOP/s; the critic doubles the
    # update): 48 steps and four evaluations of 300 problems took 810-879 s alone.
    c.train.steps = 48
    c.eval.every = 16
    c.eval.num_problems = 300
    c.eval.batch_size = 300
    c.eval.max_new_tokens = 208
    c.eval.sampled_problems = 100
    c.eval.second_set = ""
    c.eval.second_set_options = {}
    c.checkpoint.every = 16
    return c
