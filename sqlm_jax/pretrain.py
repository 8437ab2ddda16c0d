"""The supervised warm start that makes the shipped tiny model (`sqlm_jax/assets/tiny`).

    python -m sqlm_jax.pretrain --config=configs/tiny_pretrain.py

Builds the character tokenizer, trains a small Qwen2-architecture decoder on the synthetic chat corpus
of `tiny_corpus` (next-token loss on assistant tokens only, as instruction tuning does), writes it as a
Hugging Face folder, then measures what self-play will start from: held-out greedy, sampled and
majority-of-n accuracy, and the proposer's questions. Deterministic from `config.seed`.
"""
from __future__ import annotations

import collections
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from sqlm_jax import configs, rewards, sampling, tiny_algebra_corpus, tiny_coding_corpus, tiny_corpus
from sqlm_jax.evaluate import evaluate
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.hf import load_pretrained, save_pretrained
from sqlm_jax.models.transformer import Transformer
from sqlm_jax.tasks import Question, get_task
from sqlm_jax.tokenizer import Tokenizer, load_tokenizer
from sqlm_jax.train_step import make_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", str(configs.SHIPPED / "tiny_pretrain.py"),
                                          "warm-start config file")


def model_config(model_cfg, tokenizer) -> ModelConfig:
    """A Qwen2 config (q/k/v biases on) sized by `model_cfg`, with the tokenizer's vocabulary."""
    return ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=len(tokenizer), qkv_bias=True,
        hidden_size=model_cfg.hidden_size, intermediate_size=model_cfg.intermediate_size,
        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
        num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.hidden_size // model_cfg.num_heads,
        rope_theta=model_cfg.rope_theta, tie_word_embeddings=model_cfg.tie_word_embeddings,
        max_position_embeddings=model_cfg.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id)


def encode_chats(tokenizer, chats: list[tuple[str, str]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens `[N, seq_len]` int32 (right-padded) and a loss mask `[N, seq_len]` bool.

    Each row is the chat-templated user turn with its generation prompt, then the assistant's reply and
    <|im_end|>. The mask is True on the reply and the stop token: the tokens the model must produce.
    """
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": u}] for u, _ in chats],
                                           add_generation_prompt=True, tokenize=False)
    # The Rust tokenizer directly: transformers' batch __call__ is ~8x slower on 10^5 short texts.
    encode = lambda texts: [e.ids for e in tokenizer.backend_tokenizer.encode_batch(
        texts, add_special_tokens=False)]
    prompt_ids, reply_ids = encode(prompts), encode([a for _, a in chats])
    stop = tokenizer.eos_token_id
    tokens = np.full((len(chats), seq_len), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(chats), seq_len), bool)
    for row, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
        ids = p + r + [stop]
        if len(ids) > seq_len:
            raise ValueError(f"a chat of {len(ids)} tokens does not fit seq_len={seq_len}; raise it")
        tokens[row, :len(ids)] = ids
        loss_mask[row, len(p):len(ids)] = True
    return tokens, loss_mask


def next_token_loss(model: Transformer, tokens: jax.Array, loss_mask: jax.Array,
                    normalizer: float) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of `tokens[:, 1:]` over `loss_mask[:, 1:]` positions: (sum / `normalizer`, mean).

    The first is the training loss. Its normalizer is a constant (rows × the corpus's mean targets per
    row), not the batch's own token count: batches are cut by length, and a per-batch mean would weigh
    a token of a short reply more than one of a long reply, skewing how often the model starts each
    kind of answer. The second, the batch's per-token mean, is for the log. Rows are right-padded, so
    causal attention alone keeps padding out of every real token's view.
    """
    logits = model(tokens[:, :-1])  # [N, T-1, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    total = jnp.sum(nll * loss_mask[:, 1:])
    return total / normalizer, total / jnp.maximum(jnp.sum(loss_mask[:, 1:]), 1)


def make_train_step(graphdef, tx: optax.GradientTransformation, normalizer: float):
    """One jitted step `(params, opt_state, tokens[N, T], loss_mask[N, T]) -> (params, opt_state, loss)`,
    the loss the batch's per-token mean."""

    def loss_of(params, tokens, loss_mask):
        return next_token_loss(nnx.merge(graphdef, params), tokens, loss_mask, normalizer)

    @jax.jit
    def step(params, opt_state, tokens, loss_mask):
        (_, loss), grads = jax.value_and_grad(loss_of, has_aux=True)(params, tokens, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, pool: int = 16):
    """Index arrays `[batch_size]` over the rows in corpus order (the corpus is already shuffled).

    Each run of `pool` batches is sorted by `lengths` before it is cut, so a batch holds chats of
    similar length and is trimmed to little padding; those batches are then shuffled, so the order of
    lengths carries no signal. Each run depends only on its own rows: the first k batches are the same
    whatever the corpus's size.
    """
    for start in range(0, len(lengths) - batch_size + 1, pool * batch_size):
        chunk = np.arange(start, min(start + pool * batch_size, len(lengths)))
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng = np.random.default_rng([seed, start])
        yield from (batches[i] for i in rng.permutation(len(batches)))


def warm_start(cfg: ModelConfig, tokens: np.ndarray, loss_mask: np.ndarray, train_cfg, seed: int,
               log_every: int = 50, on_eval=None) -> tuple[Transformer, list[tuple[int, float]]]:
    """Trains a fresh model (or, with `train_cfg.init_from`, the one saved in that folder) for
    `train_cfg.steps` steps on `tokens[N, T]`, one pass in corpus order.

    Each batch is cut to its longest chat, rounded up to a multiple of 16 (a handful of compiled
    shapes). Every `train_cfg.eval_every` steps (0: never) `on_eval(step, model, losses)` is called,
    to watch the run. Returns the model and `(step, mean loss since the last entry)` every `log_every` steps.
    """
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    if train_cfg.get("init_from", ""):  # a second stage, on a new corpus, from an earlier warm start
        params = nnx.split(load_pretrained(train_cfg.init_from)[0], nnx.Param)[1]
    # A constant rate after warm-up, no decay: the model at step k of a longer run is then the model a
    # k-step run makes, so a long run's watched curve shows where to stop. With `normalizer_rows` (the
    # loss normalizer from the corpus's first rows, not all of them) and k a multiple of 16 (whole
    # length-bucket pools) it is that model bit for bit; with 0 (the arithmetic asset's) the
    # normalizer, the whole corpus's mean, moves a little with its size.
    tx = make_optimizer(ml_collections.ConfigDict(dict(
        schedule="constant", lr=train_cfg.learning_rate, warmup_steps=train_cfg.warmup_steps, b1=0.9,
        b2=0.98, eps=1e-8, weight_decay=train_cfg.weight_decay, grad_clip=train_cfg.grad_clip)),
        total_updates=train_cfg.steps)
    opt_state = tx.init(params)
    lengths = loss_mask.shape[1] - np.argmax(loss_mask[:, ::-1], axis=1)  # last target + 1
    # Buckets by prompt length (the question's size), not the whole chat's: by whole length a batch
    # would hold direct answers only or worked answers only, and each step would swing the model's
    # choice between the two instead of learning the corpus's mix.
    prompt_lengths = np.argmax(loss_mask, axis=1)
    rows = train_cfg.get("normalizer_rows", 0) or len(loss_mask)
    normalizer = train_cfg.batch_size * float(loss_mask[:rows].sum()) / len(loss_mask[:rows])
    step = make_train_step(graphdef, tx, normalizer)
    batches = itertools.islice(length_bucketed_batches(prompt_lengths, train_cfg.batch_size, seed),
                               train_cfg.steps)
    losses, recent = [], []
    bar = tqdm(batches, total=train_cfg.steps, desc="warm start")
    for i, rows in enumerate(bar):
        width = min(-(-int(lengths[rows].max()) // 16) * 16, tokens.shape[1])
        params, opt_state, loss = step(params, opt_state, tokens[rows, :width], loss_mask[rows, :width])
        recent.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == train_cfg.steps:
            losses.append((i + 1, float(np.mean(recent))))
            recent = []
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
        if on_eval and train_cfg.eval_every and (i + 1) % train_cfg.eval_every == 0:
            on_eval(i + 1, nnx.merge(graphdef, params), losses)
    return nnx.merge(graphdef, params), losses


def evaluate_solver(model, tok: Tokenizer, task, problems, *, n: int, max_new_tokens: int,
                    batch_size: int, seed: int) -> dict:
    """Held-out accuracy: greedy, and over `n` samples at temperature 1 the mean and the majority's.

    Also how often the n answers disagree (groups where majority-vote RL has a reward spread), and
    how often answers are worked (open with a <think> scratchpad) and how accurate each kind is.
    Coding: scores are pass rates, "greedy_scores" marks programs that pass every test, and the best
    of the n samples replaces the majority.
    """
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, full=True)
    greedy = evaluate(model, tok, task, problems, **kw)
    sampled = evaluate(model, tok, task, problems, greedy=False, n=n, **kw)
    stats = {
        "num_problems": len(problems), "n": n,
        "greedy_accuracy": greedy.accuracy,
        "sampled_accuracy": sampled.sampled_accuracy,
        "greedy_parse_rate": float(np.mean([task.parse_answer(r[0]) is not None
                                            for r in greedy.responses])),
        **worked_answer_stats("greedy", greedy), **worked_answer_stats("sampled", sampled),
        "greedy_examples": [r[0] for r in greedy.responses[:5]],
        # Per problem, "1" where the greedy answer is right: a test can recheck any subset exactly.
        "greedy_scores": "".join("1" if s == 1 else "0" for s in np.asarray(greedy.scores).reshape(-1)),
    }
    if task.reward != "majority":  # coding: scores are pass rates; the best of n is pass@n
        return {**stats, "best_of_n_accuracy": float(sampled.scores.max(axis=1).mean())}
    answers = [[task.parse_answer(r) for r in responses] for responses in sampled.responses]
    agreement = np.asarray(rewards.majority_info(jnp.asarray(rewards.answer_ids(answers)))[1]) / n
    return {
        **stats,
        "majority_accuracy": sampled.majority_accuracy,
        "gap_majority_minus_greedy": sampled.majority_accuracy - greedy.accuracy,
        "mean_majority_agreement": float(np.mean(agreement)),
        "disagreement_fraction": float(np.mean(np.asarray(agreement) < 1)),
    }


def worked_answer_stats(name: str, result) -> dict:
    """The fraction of `result`'s responses that open with a scratchpad, and each kind's accuracy."""
    worked = np.array([[r.startswith("<think>") for r in rs] for rs in result.responses])
    mean = lambda x: float(x.mean()) if x.size else None
    return {f"{name}_worked_fraction": mean(worked),
            f"{name}_worked_accuracy": mean(result.scores[worked]),
            f"{name}_direct_accuracy": mean(result.scores[~worked])}


def sample_proposals(model, tok: Tokenizer, task, *, num: int, max_new_tokens: int, seed: int) -> list[str]:
    """``num`` proposals written at temperature 1 from the task's topic prompt, decoded."""
    prompt = tok.chat_prompt(task.proposer_prompt)
    out = sampling.generate(model, [prompt], n=num, max_new_tokens=max_new_tokens, temperature=1.0,
                            stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=seed)
    return [tok.decode(r) for r in out.token_lists]


def arithmetic_proposal_stats(texts: list[str], heldout_questions: set[str], task,
                              family: tiny_corpus.ProblemFamily,
                              heldout_family: tiny_corpus.ProblemFamily) -> dict:
    """Valid: exactly a question of the corpus's family. Also: how many fall in the held-out set's
    family and how many are held-out questions themselves, the operands' digit counts, repeats."""
    num = len(texts)
    questions = [q.text for q in map(task.parse_question, texts) if q is not None]
    operands = [ab for ab in map(family.parse, questions) if ab is not None]
    digits = collections.Counter(f"{len(str(a))}x{len(str(b))}" for a, b in operands)
    return {
        "num_proposals": num,
        "valid_fraction": len(operands) / num,
        "heldout_family_fraction": sum(heldout_family.parse(t) is not None for t in questions) / num,
        "heldout_overlap": sum(t in heldout_questions for t in questions) / num,
        "distinct_fraction": len(set(questions)) / num,
        "operand_digits": {k: v / max(len(operands), 1) for k, v in sorted(digits.items())},
        "examples": questions[:10],
    }


def corpus_and_proposal_stats(config, task, excluded: set[str]):
    """The warm-start chats of ``config.task_name``'s corpus, and the function that describes the
    proposals of the trained model: ``stats(texts, heldout_questions) -> dict``."""
    n = config.train.steps * config.train.batch_size
    solver_prompt = lambda q: task.solver_prompt(Question(q))
    if config.task_name == "coding":
        chats = tiny_coding_corpus.chat_examples(
            n, config.seed, proposer_fraction=config.corpus.proposer_fraction, proposer_prompt=task.proposer_prompt,
            solver_prompt=solver_prompt, exclude=excluded, test_length=config.corpus.test_length,
            test_value=config.corpus.test_value, worked=config.corpus.worked, nonempty=config.corpus.nonempty)
        return chats, tiny_coding_corpus.proposal_stats
    if config.task_name == "algebra":
        chats = tiny_algebra_corpus.chat_examples(
            n, config.seed, family=task.family, proposer_fraction=config.corpus.proposer_fraction,
            worked_fraction_one=config.corpus.worked_fraction_one,
            worked_fraction_two=config.corpus.worked_fraction_two, proposer_prompt=task.proposer_prompt,
            solver_prompt=solver_prompt, exclude=excluded, drill_fraction=config.corpus.drill_fraction)
        return chats, tiny_algebra_corpus.proposal_stats
    family = tiny_corpus.ProblemFamily(tuple(config.corpus.a_range), tuple(config.corpus.b_range),
                                       task.question_template, config.corpus.by_digits)
    chats = tiny_corpus.chat_examples(
        n, config.seed, family=family, proposer_fraction=config.corpus.proposer_fraction,
        worked_style=config.corpus.worked_style,
        worked_fraction={int(b): f for b, f in config.corpus.worked_fraction_by_b.items()},
        proposer_prompt=task.proposer_prompt, solver_prompt=solver_prompt, exclude=excluded)
    heldout_family = tiny_corpus.ProblemFamily(tuple(task.heldout_a_range), tuple(task.heldout_b_range),
                                               task.question_template)
    return chats, lambda texts, heldout: arithmetic_proposal_stats(texts, heldout, task, family, heldout_family)


def snapshot_record(folder: str, steps: int) -> dict:
    """The record (run_so_far.json) of a longer run's snapshot taken at step ``steps``, or a one-line error."""
    record = Path(folder) / "run_so_far.json"
    if not record.is_file():
        raise SystemExit(f"error: {record} not found; train.from_snapshot takes a snapshot_dir/step_K folder")
    so_far = json.loads(record.read_text())
    # The step of its last watched evaluation: its losses are logged every 50 steps, not there.
    if not so_far["watched"] or so_far["watched"][-1]["step"] != steps:
        raise SystemExit(f"error: {folder} is not a snapshot at step {steps}; set train.steps to its step")
    return so_far


def main(_):
    config = _CONFIG.value
    out_dir = Path(config.out_dir)
    tokenizer = tiny_corpus.build_tokenizer()
    task = get_task(config.task_name, **config.task)
    excluded = {q.text for q, _ in task.heldout_problems(config.corpus.exclude_heldout, config.eval.seed)}

    start = time.time()
    chats, proposal_stats = corpus_and_proposal_stats(config, task, excluded)
    tokens, loss_mask = encode_chats(tokenizer, chats, config.train.seq_len)
    cfg = model_config(config.model, tokenizer)
    print(f"corpus: {len(chats)} chats, {int(loss_mask.sum())} target tokens; "
          f"model: {cfg.num_params() / 1e6:.2f}M parameters")
    watch = task.heldout_problems(config.eval.watch_problems, config.eval.seed + 1)
    watched = []

    def on_eval(step, model, losses):
        tok = Tokenizer(tokenizer)
        stats = {"step": step, **evaluate_solver(model, tok, task, watch, n=config.eval.n,
                                                 max_new_tokens=config.eval.max_new_tokens,
                                                 batch_size=config.eval.batch_size, seed=config.seed)}
        stats.pop("greedy_examples"), stats.pop("greedy_scores")
        watched.append(stats)
        if config.train.snapshot_dir:  # to pick where to stop without training again
            snapshot = Path(config.train.snapshot_dir) / f"step_{step}"
            save_pretrained(model, cfg, snapshot)
            (snapshot / "run_so_far.json").write_text(json.dumps(
                {"train_seconds": round(time.time() - start, 1), "losses": losses, "watched": watched}))
        tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))

    if config.train.from_snapshot:
        # A snapshot of a longer run at step `steps` is the model this run would train (normalizer_rows),
        # so it is shipped, with its run's record, instead of training it again.
        so_far = snapshot_record(config.train.from_snapshot, config.train.steps)
        model, _ = load_pretrained(config.train.from_snapshot)
        train_seconds, losses, watched = so_far["train_seconds"], so_far["losses"], so_far["watched"]
    else:
        model, losses = warm_start(cfg, tokens, loss_mask, config.train, config.seed, on_eval=on_eval)
        train_seconds = time.time() - start

    save_pretrained(model, cfg, out_dir)
    tiny_corpus.save_tokenizer(tokenizer, out_dir)
    tok = load_tokenizer(out_dir)
    problems = task.heldout_problems(config.eval.num_problems, config.eval.seed)
    metrics = {
        "command": "python -m sqlm_jax.pretrain --config=" + config_flags.get_config_filename(flags.FLAGS["config"]),
        "train_seconds": round(train_seconds, 1),
        "num_params": cfg.num_params(),
        "losses": losses,
        "watched": watched,
        "solver": evaluate_solver(model, tok, task, problems, n=config.eval.n,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  batch_size=config.eval.batch_size, seed=config.seed),
        "proposer": proposal_stats(
            sample_proposals(model, tok, task, num=config.eval.num_proposals,
                             max_new_tokens=config.eval.proposer_max_new_tokens, seed=config.seed),
            {q.text for q, _ in problems}),
    }
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=configs.parse_flags)
