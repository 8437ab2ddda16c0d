"""Warm start of the shipped tiny algebra model: `python -m sqlm_jax.pretrain --config=configs/tiny_algebra_pretrain.py`.

Writes `sqlm_jax/assets/tiny_algebra` (HF folder + tokenizer + pretrain_metrics.json), deterministic
from `seed`: `configs/tiny_pretrain.py` (tokenizer, architecture, optimizer, evaluation) with two more
layers, on the linear-equation corpus of `sqlm_jax.tiny_algebra_corpus`, for 4,800 steps of 32 chats
(~2.9 steps/s on 2 CPU cores of a 213 GFLOP/s VM: ~30 minutes with its evaluations). Held-out greedy
accuracy climbs late: 11% at step 1,920 (where two earlier runs were stopped), 22% at 2,880, 42% at the
end (docs/results.md).
"""
import runpy
from pathlib import Path

import ml_collections

from sqlm_jax import tiny_algebra_corpus

TINY_PRETRAIN = runpy.run_path(str(Path(__file__).with_name("tiny_pretrain.py")))

# The held-out generator's sizes for the tiny model (AlgebraTask options; configs/tiny_algebra.py
# passes the same): one variable, |coefficients| <= 6 and |constant| <= 12; systems (a third of the
# problems), coefficients of size <= 3; integer solutions in [-6, 6]. (With sizes 9 / 20 / 4 / 9 and
# half systems, 1,920 steps of this model stayed at 5-10% greedy: docs/results.md.)
TASK = dict(
    proposer_prompt=tiny_algebra_corpus.PROPOSER_PROMPT,
    solver_instruction=tiny_algebra_corpus.SOLVER_INSTRUCTION,
    coefficient_bound=6,
    constant_bound=12,
    solution_bound=6,
    system_coefficient_bound=3,
    two_variable_fraction=0.3,
)


def get_config() -> ml_collections.ConfigDict:
    c = TINY_PRETRAIN["get_config"]()
    c.out_dir = "sqlm_jax/assets/tiny_algebra"
    c.task_name = "algebra"
    c.task = ml_collections.ConfigDict(TASK)
    # The held-out generator's own family; one-variable problems are mostly answered straight away,
    # systems mostly worked (the self-consistency gap; tiny_algebra_corpus).
    c.corpus = ml_collections.ConfigDict(dict(
        worked_fraction_one=0.4,
        worked_fraction_two=0.8,
        proposer_fraction=0.1,
        # Chats that drill one scratchpad operation (``Compute -27+3.``); 0 in the recipes so far.
        drill_fraction=0.0,
        exclude_heldout=5000,
    ))
    c.model.num_layers = 6
    c.train.steps = 4800
    c.train.batch_size = 32
    c.train.seq_len = 176
    # Watched (and saved with snapshot_dir) every 480 steps; with the normalizer from the first 480
    # batches, a snapshot at step k is the model a k-step run ships, bit for bit (train.from_snapshot).
    c.train.eval_every = 480
    c.train.normalizer_rows = 480 * 32
    c.eval.max_new_tokens = 112
    c.eval.proposer_max_new_tokens = 112
    return c
