"""Warm start of the shipped tiny model: `python -m sqlm_jax.pretrain --config=configs/tiny_pretrain.py`.

Writes `sqlm_jax/assets/tiny` (HF folder + tokenizer + pretrain_metrics.json). Deterministic from `seed`.
About 13 minutes on 2 CPU cores. The learning rate is constant after warm-up, so a longer run
(`--config.train.steps=3000 --config.train.snapshot_dir=DIR`) shows, and saves, how the model would go
on; `steps` is where the shipped model stops, while it still errs: see docs/results.md.
"""
import ml_collections

from sqlm_jax import tiny_corpus


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.out_dir = "sqlm_jax/assets/tiny"
    c.task_name = "arithmetic"

    # The arithmetic task as the tiny self-play run uses it (configs/tiny.py passes the same options):
    # short prompts, and a held-out set of a 2-4-digit number times a 1-digit number, uniform over
    # the 79,920 such problems, so proposals rarely hit it.
    c.task = ml_collections.ConfigDict(dict(
        proposer_prompt=tiny_corpus.PROPOSER_PROMPT,
        solver_instruction=tiny_corpus.SOLVER_INSTRUCTION,
        heldout_a_range=(10, 9999),
        heldout_b_range=(2, 9),
        question_template=tiny_corpus.QUESTION_TEMPLATE,
    ))

    # The warm-start text: the same kind of problem, with the number of digits of a uniform over
    # 1-4 (short problems are common, as easy text is in a pretraining mix), each answer either direct
    # or worked out on a scratchpad first. Problems of the held-out set never appear.
    c.corpus = ml_collections.ConfigDict(dict(
        a_range=(1, 9999),
        b_range=(2, 9),
        by_digits=True,
        worked_style="prefix",
        # How often an answer is worked out, by the second operand: authors who answer small
        # multipliers straight away more often than large ones. String keys: ConfigDict's rule.
        worked_fraction_by_b={str(b): 0.35 if b <= 5 else 0.75 for b in range(2, 10)},
        proposer_fraction=0.1,
        # The first problems of the held-out generator at eval.seed are left out of the corpus.
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
        steps=1500,
        batch_size=64,
        seq_len=112,
        learning_rate=2e-3,
        warmup_steps=60,
        eval_every=250,
        snapshot_dir="",
        normalizer_rows=0,  # 0: the whole corpus's mean (how the shipped model was made)
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
        # Watched every train.eval_every steps: a separate sample of held-out problems.
        watch_problems=200,
        max_new_tokens=96,
        num_proposals=1000,
        proposer_max_new_tokens=16,
    ))
    return c
