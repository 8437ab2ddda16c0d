"""Warm start of the shipped tiny model: `python -m sqlm_jax.pretrain --config=configs/tiny_pretrain.py`.

Writes `sqlm_jax/assets/tiny` (HF folder + tokenizer + pretrain_metrics.json). Deterministic from `seed`.
"""
import ml_collections

from sqlm_jax import tiny_corpus


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.out_dir = "sqlm_jax/assets/tiny"

    # The arithmetic task as the tiny self-play run uses it: short prompts, and a held-out set drawn
    # from the same problem family as the corpus (configs/tiny.py must pass the same options).
    c.task = ml_collections.ConfigDict(dict(
        proposer_prompt=tiny_corpus.PROPOSER_PROMPT,
        solver_instruction=tiny_corpus.SOLVER_INSTRUCTION,
    ))

    c.corpus = ml_collections.ConfigDict(dict(
        a_range=(10, 999),
        b_range=(2, 99),
        styles=tiny_corpus.STYLES,
        proposer_fraction=0.1,
        # The first problems of the held-out generator at eval.seed never appear in the corpus.
        exclude_heldout=5000,
    ))

    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=600,
        batch_size=64,
        seq_len=112,
        learning_rate=2e-3,
        warmup_steps=60,
        weight_decay=0.1,
        grad_clip=1.0,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        seed=1234,
        num_problems=1000,
        n=8,
        max_new_tokens=96,
        num_proposals=1000,
    ))
    return c
