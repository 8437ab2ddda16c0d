"""The tiny coding demo: its corpus with the proposer's short tests, the shipped model it warm-starts
(imperfect, and scored as its record says) and configs/tiny_coding.py on it for two steps."""
import json
from pathlib import Path

import jax
import numpy as np

from sqlm_jax import tiny_coding_corpus as corpus
from sqlm_jax.configs import tiny_coding_pretrain
from sqlm_jax.evaluate import evaluate
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task, list_problems
from sqlm_jax.tasks.coding import parse_proposal
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.sandbox_marks import needs_bwrap
from tests.tiny_models import shipped_two_step_config

ASSET = Path(corpus.__file__).parent / "assets" / "tiny_coding"


def test_the_proposers_tests_have_the_configured_sizes_and_the_truth():
    options = tiny_coding_pretrain.get_config().corpus
    chats = corpus.chat_examples(2000, seed=0, test_length=options.test_length, test_value=options.test_value,
                                 worked=options.worked, nonempty=options.nonempty)
    tests = [parse_proposal(a) for u, a in chats if u == corpus.PROPOSER_PROMPT]
    assert len(tests) > 300
    inputs = [[int(x) for x in given.split()] for _, cases in tests for given, _ in cases]
    assert {len(x) for x in inputs} == {1, 2, 3, 4, 5}
    assert max(map(max, inputs)) == 9 and min(map(min, inputs)) == -9
    assert all(not any(list_problems.wrong_tests(list_problems.parse_problem(p), cases)) for p, cases in tests)


def test_worked_proposals_hold_the_truth_each_after_its_work():
    """Issue 33's corpus (`corpus.worked`, `corpus.nonempty`, inputs of 1-4 integers)."""
    chats = corpus.chat_examples(2000, seed=0, proposer_fraction=0.25, test_length=(1, 4), test_value=9,
                                 worked=True, nonempty=True)
    replies = [a for u, a in chats if u == corpus.PROPOSER_PROMPT]
    tests = [parse_proposal(a) for a in replies]
    assert len(tests) > 400
    problems = [list_problems.parse_problem(p) for p, _ in tests]
    assert all(not any(list_problems.wrong_tests(p, cases)) for p, (_, cases) in zip(problems, tests))
    # Each test line follows its own worked line, which the parser skips.
    for reply, problem, (_, cases) in zip(replies, problems, tests):
        lines = reply.split(corpus.TESTS_MARKER)[1].splitlines()[1:]
        assert lines == [line for given, expected in cases
                         for line in (problem.worked([int(x) for x in given.split()]), f"{given} ||| {expected}")]
    # Inputs leave the filter something in nearly every test.
    inputs = [(p, [int(v) for v in g.split()]) for p, (_, cases) in zip(problems, tests) for g, _ in cases]
    assert {len(x) for _, x in inputs} == {1, 2, 3, 4}
    assert sum(not list_problems.kept(p, x) for p, x in inputs) < 0.1 * len(inputs)


def test_a_worked_proposal_parses_to_exactly_its_tests_and_no_work_reaches_the_solver():
    problem = list_problems.ListProblem((list_problems.FILTERS[1], list_problems.MAPS[0], list_problems.FINALS[0]))
    text = corpus.proposal_text(problem, (("3 -2 5", "16\n"), ("4", "0\n")), worked=True)
    assert text == (problem.text + "\nTest Cases:\n3 -2 5 > 3 5 > 6 10 > 6 16\n3 -2 5 ||| 16\n"
                    "4 > none > none > 0\n4 ||| 0")
    assert parse_proposal(text) == (problem.text, (("3 -2 5", "16"), ("4", "0")))
    assert get_task("coding", generator="lists").parse_question(text).text == problem.text


def test_a_second_warm_start_stage_begins_from_the_saved_weights():
    """`train.init_from`: zero steps give back the shipped model's weights exactly, not a fresh model's."""
    import ml_collections
    from flax import nnx

    from sqlm_jax.pretrain import model_config, warm_start
    config = tiny_coding_pretrain.get_config()
    cfg = model_config(config.model, load_tokenizer(ASSET).hf)
    shipped = nnx.state(load_pretrained(ASSET)[0], nnx.Param)
    for init_from, same in ((str(ASSET), True), ("", False)):
        train = ml_collections.ConfigDict({**config.train.to_dict(), "steps": 0, "init_from": init_from})
        model, _ = warm_start(cfg, np.zeros((32, 16), np.int32), np.ones((32, 16), bool), train, seed=0)
        leaves = zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(shipped))
        assert all(np.array_equal(a, b) for a, b in leaves) == same


@needs_bwrap
def test_shipped_asset_is_small_imperfect_and_what_its_record_says():
    """The warm start self-play begins from: under 10 MB, passing some held-out tests but far from all,
    its proposer writing the generator's problems with tests; its greedy scores recomputed on 60
    held-out problems in the sandbox."""
    assert sum(p.stat().st_size for p in ASSET.iterdir()) <= 10 * 2**20
    config = tiny_coding_pretrain.get_config()
    task = get_task("coding", **config.task)
    metrics = json.loads((ASSET / "pretrain_metrics.json").read_text())
    recorded = metrics["solver"]
    assert recorded["num_problems"] == 300 and len(recorded["greedy_scores"]) == 300
    assert 0.2 <= recorded["greedy_accuracy"] <= 0.8
    assert metrics["proposer"]["valid_fraction"] > 0.5
    model, _ = load_pretrained(ASSET)
    problems = task.heldout_problems(60, config.eval.seed)  # the recorded set's first 60
    greedy = evaluate(model, load_tokenizer(ASSET), task, problems, max_new_tokens=config.eval.max_new_tokens,
                      batch_size=60, full=True)
    # "greedy_scores" marks the programs that pass every test.
    flips = sum((s == "1") != (r == 1) for s, r in zip(recorded["greedy_scores"], greedy.scores[:, 0]))
    assert flips <= 2, flips  # greedy decoding is deterministic up to float rounding across machines


@needs_bwrap
def test_tiny_coding_config_runs_self_play(tmp_path):
    """configs/tiny_coding.py for 2 steps on the shipped model: proposals with tests, pass-rate rewards
    neither all 0 nor all 1, the critic trained, checkpoint, plots, export."""
    config = shipped_two_step_config("tiny_coding", tmp_path / "run", eval_problems=16)
    # 8 proposals and 32 programs a step (the config's quarter): the suite's time, not the loop, shrinks.
    config.rollout.batch_size = config.rl.mini_batch_size = 2
    config.rl.micro_batch_size = 8
    summary = Trainer(config).run()

    workdir = tmp_path / "run"
    assert summary["task"] == "coding" and summary["steps"] == 2 and 0 < summary["base_accuracy"] < 1
    lines = [json.loads(line) for line in (workdir / "questions.jsonl").read_text().splitlines()]
    proposals = [p for line in lines for p in line["proposals"]]
    assert corpus.proposal_stats(proposals, set())["valid_fraction"] > 0.5
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward/solver" in m]
    assert len(steps) == 2 and 0 < np.mean([m["reward/solver"] for m in steps]) < 1
    assert all("solver/critic_value_loss" in m and "proposer/critic_value_loss" in m for m in steps)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
    _, cfg = load_pretrained(workdir / "export")
    assert cfg.architecture == "Qwen2ForCausalLM"
