"""The tiny algebra demo: its corpus (every answer and every scratchpad step correct, held-out problems
left out), the generator's sizes as task options, the shipped model it warm-starts and
configs/tiny_algebra.py on it."""
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax import tiny_algebra_corpus as corpus
from sqlm_jax.configs import tiny_algebra_pretrain
from sqlm_jax.evaluate import evaluate
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task
from sqlm_jax.tasks.algebra import LinearFamily, linear_equation_problems, parse_selected_question
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.tiny_models import shipped_two_step_config

TINY = LinearFamily(**{k: v for k, v in tiny_algebra_pretrain.TASK.items() if k in LinearFamily.__annotations__})
ASSET = Path(corpus.__file__).parent / "assets" / "tiny_algebra"


@pytest.mark.parametrize("family", [LinearFamily(), TINY], ids=["omega_sizes", "tiny_sizes"])
def test_solve_rederives_every_generated_answer(family):
    problems = linear_equation_problems(3000, seed=11, family=family)
    assert {"," in q for q, _ in problems} == {True, False}
    for question, answer in problems:
        assert corpus.solve(question) == answer, question


def test_solve_reads_what_a_model_may_write_and_refuses_the_rest():
    assert corpus.solve("Solve 3*x + 4 = x - 6 for x.") == -5
    assert corpus.solve("Solve 2*x = 3 for x.") == Fraction(3, 2)
    assert corpus.solve("Solve x + y = 3, x - y = 1 for y.") == 1
    for text in ("Solve x + y = 3, 2*x + 2*y = 6 for x.",  # not a unique solution
                 "Solve 3*x + 4 = 3*x - 6 for x.", "Solve 3*x + 4 = 7 for y.", "Solve 3*x + * 4 = 7 for x.",
                 "Solve 3x = 7", "What is 2+2?", ""):
        assert corpus.solve(text) is None, text


def test_the_generator_sizes_are_task_options_and_default_to_the_heldout_sets():
    default = get_task("algebra").heldout_problems(200, seed=3)
    assert [(q.text, a) for q, a in default] == [(q, str(a)) for q, a in linear_equation_problems(200, 3)]
    tiny = get_task("algebra", **tiny_algebra_pretrain.TASK).heldout_problems(2000, seed=3)
    numbers = [abs(int(n)) for q, _ in tiny for n in re.findall(r"\d+", q.text)]
    answers = [int(a) for _, a in tiny]
    assert max(answers) == 6 and min(answers) == -6  # solution_bound
    # coefficients <= 6, constants <= 12 + (6+6)*6 on the right-hand side of one-variable problems
    assert max(numbers) <= 12 + 12 * 6
    systems = [q.text for q, _ in tiny if "," in q.text]
    assert 0.25 < len(systems) / len(tiny) < 0.35
    assert all(int(c) <= 3 for q in systems for c in re.findall(r"(\d+)\*", q))


def _check_step(step: str):
    """``name=expr=...=value``: every expression after the first '=' has the value of the last."""
    parts = step.split("=")
    values = [eval(p, {"__builtins__": {}}) for p in parts[1:]]  # digits, + - * / and parentheses only
    assert all(re.fullmatch(r"[-+*/() 0-9]+", p) for p in parts[1:]), step
    assert all(v == values[-1] for v in values), step
    return parts[0], values[-1]


def test_every_answer_and_every_scratchpad_step_of_the_corpus_is_correct():
    chats = corpus.chat_examples(4000, seed=0, family=TINY)
    solver = [(u, a) for u, a in chats if u.startswith(corpus.SOLVER_INSTRUCTION)]
    proposer = [a for u, a in chats if u == corpus.PROPOSER_PROMPT]
    assert len(solver) + len(proposer) == 4000 and 300 < len(proposer) < 500
    worked = {True: [], False: []}
    for user, reply in solver:
        question = user[len(corpus.SOLVER_INSTRUCTION) + 1:]
        truth = corpus.solve(question)
        answer = re.fullmatch(r"(?:<think>(.*)</think>)?<answer>(-?\d+)</answer>", reply)
        assert answer and int(answer.group(2)) == truth, (question, reply)
        if answer.group(1):
            steps = [_check_step(s) for s in answer.group(1).split(" ")]
            asked = re.search(r"for ([a-z])\.$", question).group(1)
            assert steps[-1] == (asked, truth), (question, reply)  # the scratchpad ends on the answer
        worked["," in question].append(answer.group(1) is not None)
    # One-variable problems mostly direct, systems mostly worked: the corpus's mix.
    assert abs(np.mean(worked[False]) - 0.4) < 0.04 and abs(np.mean(worked[True]) - 0.8) < 0.04
    for reply in proposer:
        draft, selected = reply.split("\n")
        assert corpus.solve(draft) is not None
        assert parse_selected_question(reply) == selected.removeprefix("Selected Question: ")
        assert corpus.solve(parse_selected_question(reply)) is not None


def test_drills_are_the_scratchpads_operations_with_their_values():
    chats = corpus.chat_examples(4000, seed=0, family=TINY, drill_fraction=0.5)
    drills = [(u, a) for u, a in chats if " Compute " in u]
    assert 1800 < len(drills) < 2200
    for user, reply in drills:
        expression = re.fullmatch(rf"{corpus.SOLVER_INSTRUCTION} Compute (.+)\.", user).group(1)
        assert re.fullmatch(r"[-+*/() 0-9]+", expression), user
        value = eval(expression, {"__builtins__": {}})
        assert value == int(value) and reply == f"<think>{expression}={int(value)}</think><answer>{int(value)}</answer>"
    # Each problem's operations are its scratchpad's, written as it writes them (a one-variable
    # problem's coefficient sum 4+3 as "4*t+3*t"); the last one gives the answer.
    for question, answer in linear_equation_problems(500, seed=3, family=TINY):
        steps, pad = corpus.arithmetic_steps(question), corpus.scratchpad(question)
        assert steps[-1][1] == answer and all(eval(e, {"__builtins__": {}}) == v for e, v in steps)
        variable = question[-2]
        assert all(e in pad or re.sub(r"(\d+)", rf"\1*{variable}", e) in pad for e, _ in steps), (pad, steps)
    assert corpus.chat_examples(500, seed=0, family=TINY, drill_fraction=0.0) == corpus.chat_examples(500, seed=0, family=TINY)


def test_heldout_problems_never_appear_in_the_corpus():
    task = get_task("algebra", **tiny_algebra_pretrain.TASK)
    heldout = {q.text for q, _ in task.heldout_problems(5000, seed=1234)}
    # The tiny family is small enough that a corpus of this size meets held-out problems by chance.
    plain = corpus.chat_examples(30000, seed=0, family=TINY)
    texts = lambda chats: {q for u, a in chats for q in re.findall(r"Solve [^\n]*?\.", u + "\n" + a)}
    assert texts(plain) & heldout
    assert not texts(corpus.chat_examples(30000, seed=0, family=TINY, exclude=heldout)) & heldout


def test_proposal_stats_count_selected_valid_and_heldout_questions():
    texts = ["Solve x + 1 = 3 for x.\nSelected Question: Solve 2*y = 4 for y.",
             "Selected Question: Solve 2*y = 5 for y.",  # a fraction: not the generator's form
             "Solve x + 1 = 3 for x.",  # no selected question
             "Selected Question: Solve 2*y = 4 for y."]
    stats = corpus.proposal_stats(texts, heldout_questions={"Solve 2*y = 4 for y."})
    assert stats["selected_fraction"] == 0.75 and stats["valid_fraction"] == 0.5
    assert stats["heldout_overlap"] == 0.5 and stats["distinct_fraction"] == 0.5


def test_shipped_asset_is_small_imperfect_and_what_its_record_says():
    """The warm start self-play begins from: under 10 MB, greedy accuracy in the band majority-vote
    self-play needs, majority-of-n above greedy; its greedy scores recomputed on 100 held-out problems."""
    assert sum(p.stat().st_size for p in ASSET.iterdir()) <= 10 * 2**20
    model, cfg = load_pretrained(ASSET)
    tok = load_tokenizer(ASSET)
    config = tiny_algebra_pretrain.get_config()
    task = get_task("algebra", **config.task)
    recorded = json.loads((ASSET / "pretrain_metrics.json").read_text())["solver"]
    assert recorded["num_problems"] == 1000 and len(recorded["greedy_scores"]) == 1000
    assert np.mean([s == "1" for s in recorded["greedy_scores"]]) == pytest.approx(recorded["greedy_accuracy"])
    assert 0.2 <= recorded["greedy_accuracy"] <= 0.7
    assert round(recorded["majority_accuracy"] - recorded["greedy_accuracy"], 3) >= 0.05
    problems = task.heldout_problems(100, config.eval.seed)  # the recorded set's first 100
    greedy = evaluate(model, tok, task, problems, max_new_tokens=config.eval.max_new_tokens, batch_size=100,
                      full=True)
    flips = sum(int(s) != r for s, r in zip(recorded["greedy_scores"], greedy.scores[:, 0]))
    assert flips <= 2, flips  # greedy decoding is deterministic up to float rounding across machines


def test_tiny_algebra_config_runs_self_play(tmp_path):
    """configs/tiny_algebra.py for 2 steps on the shipped model: the proposer's "Selected Question"
    proposals parse, majority-vote rewards are neither all 0 nor all 1, checkpoint, plots, export."""
    config = shipped_two_step_config("tiny_algebra", tmp_path / "run", eval_problems=32)
    summary = Trainer(config).run()

    workdir = tmp_path / "run"
    assert summary["task"] == "algebra" and summary["steps"] == 2 and 0 < summary["base_accuracy"] < 1
    task = get_task("algebra", **config.task_options)
    lines = [json.loads(line) for line in (workdir / "questions.jsonl").read_text().splitlines()]
    proposals = [p for line in lines for p in line["proposals"]]
    assert np.mean([task.parse_question(p) is not None for p in proposals]) > 0.5
    assert np.mean([corpus.solve(parse_selected_question(p) or "") is not None for p in proposals]) > 0.5
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    solver = [m["reward/solver"] for m in metrics if "reward/solver" in m]
    assert len(solver) == 2 and 0 < np.mean(solver) < 1
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
    exported, cfg = load_pretrained(workdir / "export")
    assert cfg.architecture == "Qwen2ForCausalLM"
