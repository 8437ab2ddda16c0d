"""Warm start of the shipped tiny coding model: `python -m sqlm_jax.pretrain --config=configs/tiny_coding_pretrain.py`.

Writes `sqlm_jax/assets/tiny_coding`: the character tokenizer and the 4-layer architecture of
`configs/tiny_pretrain.py` on the list-problem corpus of `sqlm_jax.tiny_coding_corpus`: problems of
`tasks.list_problems` with five tests (proposer) or the reference program (solver). The held-out set
is the generator's, scored in the sandbox by the fraction of its tests a program passes. Deterministic
from `seed`: 2,240 steps of 32 chats, ~1.1 s a step alone on 2 CPU cores of a ~220 GFLOP/s VM (~45
minutes with its evaluations, estimated from the steps that ran alone; the shipped run took 67,
sharing the cores with pilot self-play runs).
Held-out greedy score (100 watched problems) climbs late: 5% at step 640, 21% at 1,600, 33% at 2,240,
where it stops: `train.snapshot_dir` keeps every 320th step's model, and `train.from_snapshot` ships
one without training again (docs/results.md).

Issue 33 tried a second stage on this model (`train.init_from`): proposals whose tests are each worked
out on a scratchpad line first (`corpus.worked`), on inputs of 1-4 integers that something passes the
filter of (`corpus.nonempty`). 640 steps made the programs better but not the tests (docs/results.md,
"A proposer that works its tests out"); the shipped model is still the one below.
"""
import runpy
from pathlib import Path

import ml_collections

from sqlm_jax import tiny_coding_corpus

TINY_PRETRAIN = runpy.run_path(str(Path(__file__).with_name("tiny_pretrain.py")))

TASK = dict(
    proposer_prompt=tiny_coding_corpus.PROPOSER_PROMPT,
    solver_instruction=tiny_coding_corpus.SOLVER_INSTRUCTION,
    # No system message. "" rather than None: a run's task options of None mean the task's default
    # (the reference's long action-format prompt), and the model never saw one.
    system_prompt="",
    generator="lists",
)


def get_config() -> ml_collections.ConfigDict:
    c = TINY_PRETRAIN["get_config"]()
    c.out_dir = "sqlm_jax/assets/tiny_coding"
    c.task_name = "coding"
    c.task = ml_collections.ConfigDict(TASK)
    # The proposer's tests are shorter than the held-out ones (1-5 integers of size <= 9, against 1-8
    # of size <= 20): a character model pays for every digit, and small inputs keep the outputs it
    # must compute within its reach.
    c.corpus = ml_collections.ConfigDict(dict(proposer_fraction=0.2, exclude_heldout=5000,
                                              test_length=(1, 5), test_value=9, worked=False, nonempty=False))
    c.train.init_from = ""  # a folder of an earlier warm start to go on from; "" starts from scratch
    c.train.steps = 2240
    c.train.batch_size = 32
    c.train.seq_len = 448
    c.train.eval_every = 320
    c.train.normalizer_rows = 320 * 32
    c.eval.update(num_problems=300, n=4, batch_size=300, watch_problems=100, max_new_tokens=208,
                  num_proposals=300, proposer_max_new_tokens=336)
    return c
