"""The host side of a step (rollout.Rollouts) on hand-worked cases: every reward.invalid_proposals
mode, left truncation of long solver prompts, programs that are never run, dataset questions."""
import time

import numpy as np
import pytest

from sqlm_jax import sandbox
from sqlm_jax.rollout import Rollout, Rollouts, solver_prompts
from sqlm_jax.tasks import Question, get_task
from sqlm_jax.tokenizer import load_tokenizer
from tests.tiny_models import random_policy, tiny_run_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(random_policy(tmp_path_factory.mktemp("policy") / "model"))


LONG = "Selected Question: " + "Solve 3*z = 9 for z, where z counts the apples. " * 6
# Algebra, n = 2: p0 and p2 follow the format, p1 has no "Selected Question", p3 does but is too long
# for max_prompt_len = 300.
PROPOSALS = ["Three problems...\nSelected Question: Solve x + 1 = 3 for x.", "Solve 2*y = 8 for y.",
             "Selected Question: Solve 3*z = 9 for z.", LONG]
# Two answers per question; with k_min = 1 the proposer band is 1 <= k < 2: rewarded when they differ.
ANSWERS = ["<answer>2</answer>", "<answer>2</answer>",   # q0: agree    -> solver [1, 1], proposer 0
           "<answer>4</answer>", "<answer>5</answer>",   # q1: differ   -> solver [1, 0], proposer 1
           "<answer>3</answer>", "no answer",            # q2: differ   -> solver [1, 0], proposer 1
           "<answer>7</answer>", "<answer>7</answer>"]   # q3: agree    -> solver [1, 1], proposer 0


def _rollouts(tokenizer, task="algebra", **reward):
    c = tiny_run_config("unused", "unused", task=task)
    c.rollout.max_prompt_len, c.reward.k_min = 300, 1
    c.reward.update(reward)
    return Rollouts(c, get_task(task), tokenizer, mesh=None)


def _score(rollouts, proposals, answers):
    proposer = rollouts.proposals(None, proposals)
    return rollouts.score(proposer, Rollout(None, answers, proposer.questions, truths=proposer.truths))


@pytest.mark.parametrize("mode, valid, proposer_mask", [
    # reference: every proposal is a question (p1 whole, p3 left-truncated), rewarded as usual.
    ("reference", [1, 1, 1, 1], [1, 1, 1, 1]),
    # keep: p1 (no marker) and p3 (too long) are invalid: rewards 0, answers out of the solver loss;
    # the proposals stay in the proposer loss.
    ("keep", [1, 0, 1, 0], [1, 1, 1, 1]),
    # mask: as keep, and the invalid proposals leave the proposer loss too.
    ("mask", [1, 0, 1, 0], [1, 0, 1, 0]),
])
def test_invalid_proposal_modes(tokenizer, mode, valid, proposer_mask):
    rollouts = _rollouts(tokenizer, invalid_proposals=mode)
    proposer, solver = _score(rollouts, PROPOSALS, ANSWERS)
    valid = np.array(valid, bool)
    np.testing.assert_array_equal(solver.rewards, np.array([[1, 1], [1, 0], [1, 0], [1, 1]]) * valid[:, None])
    np.testing.assert_array_equal(proposer.rewards, (np.array([0, 1, 1, 0]) * valid).reshape(2, 2))
    np.testing.assert_array_equal(solver.row_mask, np.repeat(valid, 2))
    np.testing.assert_array_equal(proposer.row_mask, np.array(proposer_mask, bool))
    # The strict parse rate in every mode: p1 alone lacks the marker.
    assert proposer.metrics["proposals/valid"] == 0.75
    assert solver.metrics["reward/solver"] == pytest.approx(solver.rewards[valid].mean())
    if mode == "reference":
        assert proposer.questions[1] == Question(PROPOSALS[1])  # the whole proposal
        assert proposer.questions[0].text == ": Solve x + 1 = 3 for x."  # as the reference cuts it
    else:
        assert proposer.questions[1] is None and proposer.questions[3] is None


def test_long_solver_prompts_are_left_truncated(tokenizer):
    rollouts = _rollouts(tokenizer)
    questions = rollouts.proposals(None, PROPOSALS).questions
    full = solver_prompts(tokenizer, rollouts.task, questions)
    cut = rollouts.solver_inputs(questions)
    assert len(full[3]) > 300 and cut[3] == full[3][-300:]  # the question's start is lost, its end kept
    assert cut[:3] == full[:3]


def test_arithmetic_proposals_are_never_invalid_in_reference_mode(tokenizer):
    proposer = _rollouts(tokenizer, task="arithmetic").proposals(None, ["  ", "12*7"])
    assert proposer.questions == [Question("  "), Question("12*7")]
    assert proposer.parsed.tolist() == [False, True]


def test_programs_missing_or_without_tests_run_nothing_and_score_0(tokenizer, monkeypatch):
    """Coding, n = 2. q0 tests that the program prints nothing: a response without a program would pass
    it as the empty program, so it must not run. q1 (no "Test Cases:") has no tests: nothing runs."""
    ran = []

    def run_many(jobs, **kwargs):  # every program that runs passes every test
        ran.extend(jobs)
        return [sandbox.SandboxResult((True,) * len(t), ("passed",) * len(t), 1.0) for _, t in jobs]

    monkeypatch.setattr(sandbox, "run_many", run_many)
    proposals = ["Print nothing.\nTest Cases:\n ||| \n", "Print the sum, no tests given."]
    answers = ["I would print nothing.", "```python\npass\n```",
               "```python\nprint(1)\n```", "```\nprint(2)\n```"]
    proposer, solver = _score(_rollouts(tokenizer, task="coding"), proposals, answers)
    assert ran == [("pass", (("", ""),))]
    np.testing.assert_array_equal(solver.rewards, [[0, 1], [0, 0]])
    np.testing.assert_array_equal(proposer.rewards, [[1, 0]])  # 0 < mean .5 < 1; mean 0
    assert solver.metrics["answers/parsed"] == 0.75


def test_code_timeout_reaches_the_sandbox(tokenizer, monkeypatch):
    """reward.code_timeout_s=1: a program that answers after 3 s times out and scores 0 (under the
    sandbox's own 10 s it would pass); one that answers at once passes. The real sandbox (isolated
    where bubblewrap can, as a run does, else the unisolated fallback, allowed here), given the
    reward section's workers and fallback too."""
    calls, run_many = [], sandbox.run_many
    monkeypatch.setattr(sandbox, "run_many", lambda jobs, **kw: calls.append(kw) or run_many(jobs, **kw))
    rollouts = _rollouts(tokenizer, task="coding", code_timeout_s=1.0, allow_unisolated_sandbox=True,
                         sandbox_workers=3)
    proposals = ["Echo the number.\nTest Cases:\n5 ||| 5\n", "Print the sum, no tests given."]
    answers = ["```python\nprint(input())\n```", "```python\nimport time\ntime.sleep(3)\nprint(input())\n```",
               "none", "none"]
    start = time.monotonic()
    _, solver = _score(rollouts, proposals, answers)
    np.testing.assert_array_equal(solver.rewards, [[1, 0], [0, 0]])
    assert solver.metrics["sandbox/timeout"] == 0.5 and solver.metrics["sandbox/passed"] == 0.5
    assert time.monotonic() - start < 2.9  # the sleeper was stopped, not waited for
    assert [(kw["timeout_s"], kw["workers"], kw["config"].allow_unisolated_fallback) for kw in calls] == \
        [(1.0, 3, True)]


def test_ground_truth_rewards_score_the_labels(tokenizer):
    rollouts = _rollouts(tokenizer, task="arithmetic", kind="ground_truth")
    proposer = Rollout(None, ["2*3", "4*3"], [Question("2*3"), Question("4*3")], parsed=np.ones(2, bool),
                       truths=["6", "12"])
    proposer, solver = rollouts.score(proposer, Rollout(None, [
        "<answer>6</answer>", "<answer>5</answer>", "<answer>12</answer>", "<answer>12</answer>"],
        proposer.questions, truths=proposer.truths))
    np.testing.assert_array_equal(solver.rewards, [[1, 0], [1, 1]])
    np.testing.assert_array_equal(proposer.rewards, [[0, 0]])  # no proposer to reward


def test_dataset_pool_leaves_out_the_heldout_problems(tokenizer):
    task = get_task("arithmetic", heldout_a_range=(2, 9), heldout_b_range=(2, 9))  # 64 problems in all
    c = tiny_run_config("unused", "unused")
    c.rollout.question_source, c.rollout.pregenerated_questions = "dataset", 20
    rollouts = Rollouts(c, task, tokenizer, mesh=None)
    heldout = {q.text for q, _ in task.heldout_problems(12, seed=c.eval.seed)}
    rollouts.load_dataset(heldout)
    texts = [p["text"] for p in rollouts.pool]
    assert len(texts) == 20 and not heldout & set(texts)
    assert all(p["truth"] == str(eval(p["text"].split("equation: ")[1].rstrip(" ="))) for p in rollouts.pool)
    batch = rollouts.questions(None, 0)
    assert batch.sample is None and batch.truths == [p["truth"] for p in rollouts.pool[:8]]
