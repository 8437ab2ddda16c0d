"""Warm start of a tiny coding model (issue 18, item 2; not trained or shipped yet):
`python -m sqlm_jax.pretrain --config=configs/tiny_coding_pretrain.py`.

The character tokenizer and architecture of `configs/tiny_algebra_pretrain.py` on the list-problem
corpus of `sqlm_jax.tiny_coding_corpus`: problems of `tasks.list_problems` with five tests
(proposer) or the reference program (solver). The held-out set is the generator's, scored in the
sandbox by the fraction of its tests a program passes.
"""
import runpy
from pathlib import Path

import ml_collections

from sqlm_jax import tiny_coding_corpus

TINY_ALGEBRA_PRETRAIN = runpy.run_path(str(Path(__file__).with_name("tiny_algebra_pretrain.py")))

TASK = dict(
    proposer_prompt=tiny_coding_corpus.PROPOSER_PROMPT,
    solver_instruction=tiny_coding_corpus.SOLVER_INSTRUCTION,
    system_prompt=None,
    generator="lists",
)


def get_config() -> ml_collections.ConfigDict:
    c = TINY_ALGEBRA_PRETRAIN["get_config"]()
    c.out_dir = "sqlm_jax/assets/tiny_coding"
    c.task_name = "coding"
    c.task = ml_collections.ConfigDict(TASK)
    c.corpus = ml_collections.ConfigDict(dict(proposer_fraction=0.2, exclude_heldout=5000))
    c.train.seq_len = 480
    c.eval.update(num_problems=300, n=4, batch_size=300, watch_problems=100, max_new_tokens=224,
                  num_proposals=300, proposer_max_new_tokens=320)
    return c
