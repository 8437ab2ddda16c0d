"""SQLM on linear equations with the shipped tiny algebra model (`sqlm_jax/assets/tiny_algebra`, made by
`configs/tiny_algebra_pretrain.py`), on a laptop CPU.

The algebra task as the paper runs it (the proposer writes problems and a "Selected Question:" line,
majority-vote rewards, GRPO with a KL term, proposer updated every few steps, questions online), with
the sizes and the three engineering choices of `configs/tiny.py`, on the model of
`configs/tiny_algebra_pretrain.py`. Ablations: `--config.rollout.question_source=pregenerated`,
`--config.reward.kind=format`. Results: docs/results.md.
"""
import runpy
from pathlib import Path

TINY = runpy.run_path(str(Path(__file__).with_name("tiny.py")))
PRETRAIN = runpy.run_path(str(Path(__file__).with_name("tiny_algebra_pretrain.py")))


def get_config():
    c = TINY["get_config"]()
    c.task = "algebra"
    c.workdir = "runs/tiny_algebra"
    c.model.path = str(Path(TINY["TINY_MODEL"]).with_name("tiny_algebra"))
    # The pretraining's prompts and held-out family (its sizes), 1000 problems of it.
    c.task_options = dict(PRETRAIN["TASK"])
    c.rollout.proposer_max_new_tokens = 112
    c.rollout.solver_max_new_tokens = 112
    c.rollout.max_prompt_len = 96
    c.eval.max_new_tokens = 112
    c.eval.second_set = ""
    c.eval.second_set_options = {}
    # Answers here are longer than the arithmetic ones: ~3.4 s a step on a 2-core VM (float32 matmul
    # peak ~200 GFLOP/s), so 130 steps keep the run, with its four evaluations, within 10 minutes.
    # On seed 0, 200 steps gained less than 50 did (docs/results.md).
    c.train.steps = 130
    return c
