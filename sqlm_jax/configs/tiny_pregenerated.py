"""Ablation: configs/tiny.py with questions proposed once by the base model before training (a fixed
pool, cycled) instead of online each step, on the same budget. The proposer is never updated."""
import runpy
from pathlib import Path

TINY = runpy.run_path(str(Path(__file__).with_name("tiny.py")))


def get_config():
    c = TINY["get_config"]()
    c.workdir = "runs/tiny_pregenerated"
    c.rollout.question_source = "pregenerated"
    c.rollout.pregenerated_questions = c.rollout.batch_size * c.rollout.n * 8
    return c
