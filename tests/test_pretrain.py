"""The tiny model's corpus, tokenizer, warm start and shipped asset."""
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from transformers import AutoTokenizer

from configs import tiny_pretrain
from sqlm_jax import pretrain, tiny_corpus
from sqlm_jax.evaluate import evaluate
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task
from sqlm_jax.tokenizer import load_tokenizer

ASSET = Path(pretrain.__file__).parent / "assets" / "tiny"
_EXPRESSION = re.compile(r"\d+(?:[*+]\d+)*")


def _family():
    corpus = tiny_pretrain.get_config().corpus
    return tiny_corpus.ProblemFamily(tuple(corpus.a_range), tuple(corpus.b_range), by_digits=corpus.by_digits)


def test_corpus_is_deterministic_and_seed_dependent():
    a = tiny_corpus.chat_examples(300, seed=3, family=_family())
    assert a == tiny_corpus.chat_examples(300, seed=3, family=_family())
    assert a != tiny_corpus.chat_examples(300, seed=4, family=_family())


def _value(expression: str) -> int:
    """Value of a sum of products of decimal integers ("780+4*26"), leading zeros allowed ("05")."""
    return sum(math.prod(int(f) for f in term.split("*")) for term in expression.split("+"))


@pytest.mark.parametrize("style", ["prefix", "suffix"])
def test_every_scratchpad_step_computes_what_it_says(style):
    task = get_task("arithmetic")
    for a, b in [(7230, 3), (305, 9), (1000, 7), (9999, 9), (10, 2), (5, 5), (47, 26)]:
        response = tiny_corpus.solver_response(a, b, style)
        think = re.fullmatch(r"<think>(.*)</think><answer>\d+</answer>", response).group(1)
        for step in think.split(" "):
            sides = step.split("=")
            assert len(sides) >= 2 and all(_EXPRESSION.fullmatch(x) for x in sides), step
            assert len({_value(x) for x in sides}) == 1, step
        assert int(think.split("=")[-1]) == a * b  # the last step's result is the product
        assert task.parse_answer(response) == str(a * b)


def test_the_two_methods_walk_the_digits_in_opposite_orders():
    assert tiny_corpus.scratchpad(7230, 3, "prefix") == \
        "7*3=21 72*3=210+6=216 723*3=2160+9=2169 7230*3=21690+0=21690"
    assert tiny_corpus.scratchpad(7230, 3, "suffix") == \
        "0*3=0 30*3=90+0=90 230*3=600+90=690 7230*3=21000+690=21690"


def test_direct_answers_and_worked_fraction_by_multiplier():
    assert tiny_corpus.solver_response(7230, 3, "direct") == "<answer>21690</answer>"
    by_b = {b: 0.2 if b <= 5 else 0.8 for b in range(2, 10)}
    chats = tiny_corpus.chat_examples(6000, seed=0, family=_family(), proposer_fraction=0.0,
                                      worked_fraction=by_b)
    for low, high, expected in [(2, 5, 0.2), (6, 9, 0.8)]:
        worked = [reply.startswith("<think>") for user, reply in chats
                  if low <= int(user.split("*")[1]) <= high]
        assert abs(np.mean(worked) - expected) < 0.03
    with pytest.raises(ValueError, match="no fraction for b"):
        tiny_corpus.chat_examples(10, seed=0, family=_family(), worked_fraction={2: 0.5})
    with pytest.raises(ValueError, match="worked_style"):
        tiny_corpus.chat_examples(10, seed=0, worked_style="direct")


def test_corpus_roles_and_exclusion():
    family = _family()
    excluded = {family.question(a, b) for a in range(100, 200) for b in range(2, 10)}
    chats = tiny_corpus.chat_examples(2000, seed=0, family=family, exclude=excluded,
                                      proposer_fraction=0.5)
    proposals = [reply for user, reply in chats if user == tiny_corpus.PROPOSER_PROMPT]
    assert 800 < len(proposals) < 1200
    for user, reply in chats:
        question = reply if user == tiny_corpus.PROPOSER_PROMPT else user.split(" ", 1)[1]
        assert question not in excluded
        a, b = map(int, question.split("*"))
        assert family.a_range[0] <= a <= family.a_range[1]
        assert family.b_range[0] <= b <= family.b_range[1]


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    tiny_corpus.save_tokenizer(tiny_corpus.build_tokenizer(), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    prompt = hf.apply_chat_template([{"role": "user", "content": "Solve: 347*6"}],
                                    add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nSolve: 347*6<|im_end|>\n<|im_start|>assistant\n"
    reply = tiny_corpus.solver_response(347, 6, "prefix")
    ids = hf.encode(reply, add_special_tokens=False)
    assert hf.decode(ids) == reply
    assert hf.convert_ids_to_tokens(hf.encode("<think>2087", add_special_tokens=False)) == \
        ["<think>", "2", "0", "8", "7"]
    assert hf.convert_ids_to_tokens(hf.encode("user assistant", add_special_tokens=False)) == \
        ["user", "Ġ", "assistant"]  # byte-level: a space is Ġ
    tok = load_tokenizer(tmp_path)
    stop = hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.stop_ids == (stop,)
    # decode drops the stop and special tokens but keeps the tags the answer parser needs.
    assert tok.decode(ids + [stop, 7, 7]) == reply


def test_encode_chats_masks_the_reply_and_stop_only():
    tokenizer = tiny_corpus.build_tokenizer()
    tokens, mask = pretrain.encode_chats(tokenizer, [("Solve: 12*3", "<think>x</think>")], seq_len=48)
    row = tokenizer.decode(tokens[0][mask[0]])
    assert row == "<think>x</think><|im_end|>"
    assert tokens[0, mask[0].nonzero()[0][-1] + 1:].tolist() == \
        [tokenizer.pad_token_id] * (48 - mask[0].nonzero()[0][-1] - 1)
    with pytest.raises(ValueError, match="seq_len"):
        pretrain.encode_chats(tokenizer, [("Solve: 12*3", "x" * 60)], seq_len=48)


def test_length_buckets_cover_rows_once_and_do_not_depend_on_the_corpus_size():
    lengths = np.random.default_rng(0).integers(10, 100, 1000)
    batches = list(pretrain.length_bucketed_batches(lengths, 16, seed=0))
    assert len(batches) == 62 and all(len(b) == 16 for b in batches)
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used)  # one pass: no row twice
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)  # batches hold chats of similar length
    # The first k steps are the same in a longer run: runs can be stopped at any step.
    shorter = list(pretrain.length_bucketed_batches(lengths[:512], 16, seed=0))
    assert all((a == b).all() for a, b in zip(shorter, batches[:32]))


def test_warm_start_steps_reduce_the_loss():
    tokenizer = tiny_corpus.build_tokenizer()
    chats = tiny_corpus.chat_examples(256, seed=0, family=_family())
    tokens, mask = pretrain.encode_chats(tokenizer, chats, seq_len=128)
    model_cfg = ConfigDict(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, rope_theta=10000.0, tie_word_embeddings=True,
                                max_position_embeddings=128))
    train_cfg = ConfigDict(dict(steps=12, batch_size=16, learning_rate=1e-2, warmup_steps=2,
                                weight_decay=0.0, grad_clip=1.0, eval_every=6))
    cfg = pretrain.model_config(model_cfg, tokenizer)
    seen = {}
    model, losses = pretrain.warm_start(cfg, tokens, mask, train_cfg, seed=0, log_every=1,
                                        on_eval=lambda step, m, losses: seen.setdefault(step, m.embed[...]))
    assert losses[-1][1] < 0.8 * losses[0][1]
    assert sorted(seen) == [6, 12]
    # The same seed gives the same model, and a 6-step run is the 12-step run stopped at step 6.
    train_cfg.steps, train_cfg.eval_every = 6, 0
    again, _ = pretrain.warm_start(cfg, tokens, mask, train_cfg, seed=0, log_every=1)
    np.testing.assert_array_equal(np.asarray(seen[6]), np.asarray(again.embed[...]))

    # A shorter run trains on the corpus's first rows only (its corpus is steps x batch_size chats).
    # With the loss normalizer from the first `normalizer_rows` rows, and at a multiple of 16 steps
    # (whole length-bucket pools), it is still the longer run stopped there, bit for bit: a snapshot
    # can be shipped as the shorter run's model.
    train_cfg = ConfigDict(dict(steps=32, batch_size=4, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
                                grad_clip=1.0, eval_every=16, normalizer_rows=64))
    seen = {}
    pretrain.warm_start(cfg, tokens[:128], mask[:128], train_cfg, seed=0,
                        on_eval=lambda step, m, losses: seen.setdefault(step, m.embed[...]))
    train_cfg.steps, train_cfg.eval_every = 16, 0
    short, _ = pretrain.warm_start(cfg, tokens[:64], mask[:64], train_cfg, seed=0)
    np.testing.assert_array_equal(np.asarray(seen[16]), np.asarray(short.embed[...]))


def test_shipped_asset_loads_is_small_and_is_imperfect():
    files = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert sum(p.stat().st_size for p in ASSET.iterdir()) <= 10 * 2**20
    model, cfg = load_pretrained(ASSET)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias
    tok = load_tokenizer(ASSET)
    assert tok.hf.convert_ids_to_tokens(list(tok.stop_ids)) == ["<|im_end|>"]
    ids = tok.chat_prompt("Solve: 347*6")
    assert tok.hf.decode(ids) == "<|im_start|>user\nSolve: 347*6<|im_end|>\n<|im_start|>assistant\n"
    logits = model(jnp.asarray([ids]))
    assert logits.shape == (1, len(ids), cfg.vocab_size)

    # What self-play starts from, recomputed here rather than read back: the shipped model's greedy
    # figures on the recorded 1000 held-out problems, evaluated exactly as pretrain.py recorded them
    # (same problems, batches and seed; greedy decoding is deterministic up to float rounding, so
    # a few problems may flip on another machine), must be what pretrain_metrics.json claims.
    config = tiny_pretrain.get_config()
    task = get_task("arithmetic", **config.task)
    recorded = json.loads((ASSET / "pretrain_metrics.json").read_text())["solver"]
    problems = task.heldout_problems(recorded["num_problems"], config.eval.seed)
    greedy = evaluate(model, tok, task, problems, max_new_tokens=config.eval.max_new_tokens,
                      batch_size=config.eval.batch_size, seed=config.seed, full=True)
    assert recorded["num_problems"] == 1000
    assert abs(greedy.accuracy - recorded["greedy_accuracy"]) <= 0.005
    assert [r[0] for r in greedy.responses[:5]] == recorded["greedy_examples"]
    parsed = np.mean([task.parse_answer(r[0]) is not None for r in greedy.responses])
    assert abs(parsed - recorded["greedy_parse_rate"]) <= 0.005
    # Imperfect, as self-play needs: well inside (0, 1).
    assert 0.2 <= greedy.accuracy <= 0.7
    # The majority of n samples, recomputed on the first 100 problems (the full 8000 samples would
    # take ~30 s): within 3 standard errors (0.15 at p ~ 0.6) of the recorded 1000-problem figure,
    # whose self-consistency gap over greedy is what majority-vote rewards need.
    sampled = evaluate(model, tok, task, problems[:100], greedy=False, n=config.eval.n,
                       max_new_tokens=config.eval.max_new_tokens, batch_size=100, seed=config.seed,
                       full=True)
    assert abs(sampled.majority_accuracy - recorded["majority_accuracy"]) <= 0.15
    assert round(recorded["majority_accuracy"] - recorded["greedy_accuracy"], 3) >= 0.05


def test_a_snapshot_is_shipped_only_at_its_own_step(tmp_path):
    """train.from_snapshot: the snapshot's step is its last watched evaluation's, which need not be a
    step its losses were logged at (every 50); any other step, or no record, is a one-line error."""
    (tmp_path / "run_so_far.json").write_text(json.dumps(
        {"train_seconds": 1.0, "losses": [[50, 2.0], [300, 1.0]], "watched": [{"step": 160}, {"step": 320}]}))
    assert pretrain.snapshot_record(str(tmp_path), 320)["watched"][-1]["step"] == 320
    for steps in (300, 160):
        with pytest.raises(SystemExit, match=f"^error: .* is not a snapshot at step {steps}; set train.steps"):
            pretrain.snapshot_record(str(tmp_path), steps)
    with pytest.raises(SystemExit, match="^error: .*run_so_far.json not found"):
        pretrain.snapshot_record(str(tmp_path / "nope"), 320)
