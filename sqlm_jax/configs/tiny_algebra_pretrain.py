"""Warm start of the shipped tiny algebra model:
`python -m sqlm_jax.pretrain --config=configs/tiny_algebra_pretrain.py`.

Writes `sqlm_jax/assets/tiny_algebra` (HF folder + tokenizer + pretrain_metrics.json), deterministic
from `seed`: the character tokenizer and architecture of `configs/tiny_pretrain.py`, two layers
deeper, on the linear-equation corpus of `sqlm_jax.tiny_algebra_corpus`. Results: docs/results.md.
"""
import ml_collections

from sqlm_jax import tiny_algebra_corpus

# The held-out generator's sizes for the tiny model (AlgebraTask options; configs/tiny_algebra.py
# passes the same): one variable, |coefficients| <= 6 and |constant| <= 12; systems (a third of the
# problems), coefficients of size <= 3; integer solutions in [-6, 6]. (With sizes 9 / 20 / 4 / 9 and
# half systems, 3000 steps of this model stayed at 7-10% greedy: docs/results.md.)
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
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.out_dir = "sqlm_jax/assets/tiny_algebra"
    c.task_name = "algebra"
    c.task = ml_collections.ConfigDict(TASK)

    # The held-out generator's own family; one-variable problems are mostly answered straight away,
    # systems mostly worked (the self-consistency gap; tiny_algebra_corpus).
    c.corpus = ml_collections.ConfigDict(dict(
        worked_fraction_one=0.4,
        worked_fraction_two=0.8,
        proposer_fraction=0.1,
        exclude_heldout=5000,
    ))

    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128,
        intermediate_size=384,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=3000,
        batch_size=32,
        seq_len=176,
        learning_rate=2e-3,
        warmup_steps=60,
        # Watched (and saved with snapshot_dir) every 480 steps; with the normalizer from the first
        # 480 batches, a snapshot at step k is the model a k-step run ships, bit for bit.
        eval_every=480,
        normalizer_rows=480 * 32,
        snapshot_dir="",
        # A snapshot folder of a longer run at step `steps` (snapshot_dir/step_K): evaluated and shipped
        # instead of training again; exact only where normalizer_rows is set.
        from_snapshot="",
        weight_decay=0.1,
        grad_clip=1.0,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        seed=1234,
        num_problems=1000,
        n=8,
        batch_size=500,
        watch_problems=200,
        max_new_tokens=112,
        num_proposals=1000,
        proposer_max_new_tokens=112,
    ))
    return c
