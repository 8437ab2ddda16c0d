"""Ablation: configs/tiny.py with the format-only reward (1 for any parseable answer) instead of
majority vote, on the same budget."""
import runpy
from pathlib import Path

TINY = runpy.run_path(str(Path(__file__).with_name("tiny.py")))


def get_config():
    c = TINY["get_config"]()
    c.workdir = "runs/tiny_format_reward"
    c.reward.kind = "format"
    return c
