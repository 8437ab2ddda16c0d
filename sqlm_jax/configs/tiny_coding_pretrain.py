"""Warm start of a tiny coding model (issue 18, item 2; not trained or shipped yet):
`python -m sqlm_jax.pretrain --config=configs/tiny_coding_pretrain.py`.

The character tokenizer and architecture of `configs/tiny_algebra_pretrain.py` on the list-problem
corpus of `sqlm_jax.tiny_coding_corpus`: problems of `tasks.list_problems` with five tests
(proposer) or the reference program (solver). The held-out set is the generator's, scored in the
sandbox by the fraction of its tests a program passes.
"""
import ml_collections

from sqlm_jax import tiny_coding_corpus

TASK = dict(
    proposer_prompt=tiny_coding_corpus.PROPOSER_PROMPT,
    solver_instruction=tiny_coding_corpus.SOLVER_INSTRUCTION,
    system_prompt=None,
    generator="lists",
)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.out_dir = "sqlm_jax/assets/tiny_coding"
    c.task_name = "coding"
    c.task = ml_collections.ConfigDict(TASK)
    c.corpus = ml_collections.ConfigDict(dict(proposer_fraction=0.2, exclude_heldout=5000))
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_layers=6, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=512))
    c.train = ml_collections.ConfigDict(dict(
        steps=3000, batch_size=32, seq_len=480, learning_rate=2e-3, warmup_steps=60,
        eval_every=480, normalizer_rows=480 * 32, snapshot_dir="", from_snapshot="",
        weight_decay=0.1, grad_clip=1.0))
    c.eval = ml_collections.ConfigDict(dict(
        seed=1234, num_problems=300, n=4, batch_size=300, watch_problems=100, max_new_tokens=224,
        num_proposals=300, proposer_max_new_tokens=320))
    return c
