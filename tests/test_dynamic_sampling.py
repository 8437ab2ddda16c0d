"""The update's rows and advantages under the issue-17 options, on a scripted policy: which groups
dynamic sampling drops, which extra rounds refill their places and in what order, that the budget
bounds the rounds, that a refilled row keeps its own prompt, that the step trains on those rows, DAPO's
overlong penalty and truncation mask per role, and the advantage estimator the learner picks."""
import dataclasses
import re

import numpy as np
import pytest

from sqlm_jax import dynamic_sampling, rollout
from sqlm_jax import mesh as mesh_lib
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.tiny_models import random_policy, rewarded_run_config, scripted_sample

SOLVER_CUE = "Let's think step by step"


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


class Rounds:
    """B = 4 rows of n = 2 proposals; round r's proposal j is "<100 r + j + 2>*3". Question x gets two
    equal answers (solver [1, 1], proposer 0) unless x is in SPLIT: then x and no answer (solver
    [1, 0], proposer 1 at k_min = 1). Counts the sampler's calls."""

    SPLIT = {3, 5, 7,     # round 0: solver groups 1, 3, 5 kept, 0, 2, 4, 6, 7 dropped; proposer (6, 7) dropped
             102, 104,    # round 1: solver groups 0, 2 fill places 0, 2; proposer group (0, 1) fills place 3
             209}         # round 2: solver group 7 fills place 4; later rounds: nothing to refill with

    INVALID = set()  # (round, row) of proposals with no question (whitespace: arithmetic's only invalid one)

    def __init__(self):
        self.round, self.calls, self.seeds, self.tokens = -1, 0, [], []

    def __call__(self, prompt: str, row: int) -> str:
        if SOLVER_CUE not in prompt:
            self.round += row == 0
            return "  " if (self.round, row) in self.INVALID else f"{100 * self.round + row + 2}*3"
        found = re.findall(r"(\d+)\*3", prompt)
        if not found:
            return "no answer"
        x = int(found[-1])
        return "no answer" if x in self.SPLIT and row % 2 else f"<answer>{x}</answer>"


def _trainer(policy_folder, tmp_path, monkeypatch, script, **options):
    tokenizer = load_tokenizer(policy_folder)
    base = scripted_sample(tokenizer, script)

    def counted(*args, **kwargs):
        script.calls += 1
        script.seeds.append(kwargs["seed"])
        out = base(*args, **kwargs)
        script.tokens.append(sum(map(len, out.token_lists)))  # the tokens this call generated
        return out

    monkeypatch.setattr(rollout, "sample", counted)
    c = rewarded_run_config(policy_folder, tmp_path / "run")
    c.reward.k_min = 1  # n = 2: the proposer is rewarded for split questions (k = 1)
    for key, value in options.items():
        section, field = key.split("__")
        c[section][field] = value
    return Trainer(c), tokenizer


def _first_round(trainer):
    policy, rollouts = trainer.learner.policy, trainer.rollouts
    proposer = rollouts.questions(policy, 0)
    proposer, solver = rollouts.score(proposer, rollouts.solve(policy, 0, proposer))
    return {"proposer": proposer, "solver": solver}


@pytest.mark.parametrize("budget, solver_extra, solver_masked", [(0, 0, 5), (1, 1, 3), (2, 2, 2), (4, 4, 2)])
def test_dropped_groups_refilled_in_order_within_the_budget(policy_folder, tmp_path, monkeypatch,
                                                            budget, solver_extra, solver_masked):
    script = Rounds()
    trainer, tokenizer = _trainer(policy_folder, tmp_path, monkeypatch, script, rl__filter_zero_variance=True,
                                  rollout__max_extra_batches=budget)
    scored = _first_round(trainer)
    rows, metrics, extra_tokens = dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 0, scored,
                                                             ["proposer", "solver"])
    assert script.calls == 2 + 2 * solver_extra  # a propose and a solve per extra round, never more
    assert metrics["dynamic_sampling/solver_dropped"] == 5 / 8
    assert metrics["dynamic_sampling/proposer_dropped"] == 1 / 4
    assert metrics["dynamic_sampling/solver_extra_batches"] == solver_extra
    assert metrics["dynamic_sampling/proposer_extra_batches"] == min(budget, 1)
    assert metrics["dynamic_sampling/solver_masked"] == solver_masked / 8
    assert metrics["dynamic_sampling/proposer_masked"] == (0 if budget else 1 / 4)
    assert metrics["zero_variance/solver"] == 5 / 8 and metrics["zero_variance/proposer"] == 1 / 4
    # Every token the extra rounds generated, the proposer's as well as the solver's, counts.
    assert extra_tokens == sum(script.tokens[2:]) and (extra_tokens > 0) == (budget > 0)

    # Each place's question (round 0 unless refilled), its answers and its prompt travel together.
    fills = {1: {0: 102, 2: 104}, 2: {0: 102, 2: 104, 4: 209}}.get(min(budget, 2), {})
    questions = [fills.get(g, g + 2) for g in range(8)]
    solver = rows["solver"]
    prompts = [tokenizer.hf.decode(p[m]) for p, m in zip(solver.sample.prompt_tokens, solver.sample.prompt_mask)]
    for g, x in enumerate(questions):
        assert [re.findall(r"(\d+)\*3", prompts[i])[-1] for i in (2 * g, 2 * g + 1)] == [str(x)] * 2, g
        assert tokenizer.decode(solver.sample.token_lists[2 * g]) == f"<answer>{x}</answer>"
    split = [x in Rounds.SPLIT for x in questions]
    np.testing.assert_array_equal(solver.rewards, [[1, 0] if s else [1, 1] for s in split])
    kept = split  # every place holding a split question is in the loss, no other
    np.testing.assert_array_equal(solver.row_mask, np.repeat(kept, 2))
    proposer = rows["proposer"]
    expected_proposals = [2, 3, 4, 5, 6, 7] + ([102, 103] if budget else [8, 9])
    assert [tokenizer.decode(t) for t in proposer.sample.token_lists] == [f"{x}*3" for x in expected_proposals]
    np.testing.assert_array_equal(proposer.row_mask, [True] * 6 + [bool(budget)] * 2)

    # The learner builds the batch as ever: the same shapes, the masked places out of every token.
    batch = trainer.learner.batch(*solver)
    assert batch.response_ids.shape == scored["solver"].sample.tokens.shape
    mask = np.asarray(solver.sample.mask) & np.repeat(kept, 2)[:, None]
    np.testing.assert_array_equal(batch.response_mask, mask)
    advantages = np.asarray(batch.advantages)[:, 0].reshape(-1, 2)
    np.testing.assert_allclose(advantages, [[0.7071, -0.7071] if s else [0, 0] for s in split], atol=1e-4)


def test_invalid_questions_are_neither_dropped_nor_refilled(policy_folder, tmp_path, monkeypatch):
    """invalid_proposals='keep', round 0's first proposal blank (no question): its answers are out of the
    solver loss already, with rewards [0, 0]. Dynamic sampling counts 4 of the 8 solver groups dropped
    (x = 4, 6, 8, 9), not 5, and round 1's two usable groups (102, 104) fill places 2 and 4, not the
    invalid question's place 0, which stays out of the loss."""
    script = Rounds()
    script.INVALID = {(0, 0)}
    trainer, tokenizer = _trainer(policy_folder, tmp_path, monkeypatch, script, rl__filter_zero_variance=True,
                                  rollout__max_extra_batches=1, reward__invalid_proposals="keep")
    scored = _first_round(trainer)
    assert scored["solver"].questions[0] is None and not scored["solver"].row_mask[:2].any()
    rows, metrics, _ = dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 0, scored,
                                                  ["proposer", "solver"])
    assert metrics["dynamic_sampling/solver_dropped"] == 4 / 8
    assert metrics["dynamic_sampling/solver_masked"] == 2 / 8  # places 6 and 7: nothing left to fill them
    solver = rows["solver"]
    prompts = [tokenizer.hf.decode(p[m]) for p, m in zip(solver.sample.prompt_tokens, solver.sample.prompt_mask)]
    questions = [(re.findall(r"(\d+)\*3", prompts[2 * g]) or [None])[-1] for g in range(8)]
    assert questions == [None, "3", "102", "5", "104", "7", "8", "9"]
    np.testing.assert_array_equal(solver.row_mask, np.repeat([False, True, True, True, True, True, False, False], 2))
    np.testing.assert_array_equal(solver.rewards[0], [0, 0])
    # The proposer's blank proposal stays in its loss ('keep': a format penalty, reward 0).
    assert metrics["dynamic_sampling/proposer_dropped"] == 1 / 4
    np.testing.assert_array_equal(rows["proposer"].rewards[0], [0, 1])


def test_filter_off_leaves_the_rows_as_scored(policy_folder, tmp_path, monkeypatch):
    script = Rounds()
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, script)
    scored = _first_round(trainer)
    rows, metrics, extra_tokens = dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 0, scored,
                                                             ["proposer", "solver"])
    for role, r in scored.items():
        assert rows[role].sample is r.sample and rows[role].row_mask is r.row_mask and rows[role].rewards is r.rewards
    assert script.calls == 2 and extra_tokens == 0
    assert sorted(metrics) == ["truncated/proposer", "truncated/solver", "zero_variance/proposer",
                               "zero_variance/solver"]


@pytest.mark.parametrize("trained, calls, proposer_extra", [(["solver"], 4, 0), (["proposer", "solver"], 8, 3)])
def test_only_trained_roles_get_extra_rounds(policy_folder, tmp_path, monkeypatch, trained, calls, proposer_extra):
    """Round 1 splits every question: its solver groups refill the solver's 5 places, its proposer
    groups ([1, 1] each) none. A step that trains the solver only stops there; one that trains the
    proposer too spends the rest of the budget (rounds 2, 3) looking for the proposer's place."""
    script = Rounds()
    script.SPLIT = {3, 5, 7} | set(range(102, 110))
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, script, rl__filter_zero_variance=True,
                          rollout__max_extra_batches=3)
    _, metrics, _ = dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 0, _first_round(trainer),
                                               trained)
    assert script.calls == calls
    assert metrics["dynamic_sampling/solver_extra_batches"] == 1 and metrics["dynamic_sampling/solver_masked"] == 0
    assert metrics["dynamic_sampling/proposer_extra_batches"] == proposer_extra
    assert metrics["dynamic_sampling/proposer_masked"] == 1 / 4


def _cutting(tokenizer, respond, filler: int):
    """The scripted sampler of `respond`, but a response longer than max_new_tokens is cut there
    without a stop id, as the real sampler cuts it (the scripted one ends it with a stop instead)."""
    scripted = scripted_sample(tokenizer, respond)

    def sample(graphdef, weights, prompts, *, params, seed, mesh=None):
        out = scripted(graphdef, weights, prompts, params=params, seed=seed, mesh=mesh)
        texts = [tokenizer.hf.decode(p) for p in prompts]
        tokens, lists = np.asarray(out.tokens).copy(), [list(t) for t in out.token_lists]
        for i, t in enumerate(lists):
            if len(tokenizer.encode(respond(texts[i // params.n], i))) >= params.max_new_tokens:
                t[-1] = tokens[i, -1] = filler
        return dataclasses.replace(out, tokens=mesh_lib.shard_rows(tokens, mesh), token_lists=lists)
    return sample


def _lengths_script(prompt: str, row: int) -> str:
    """Proposals "<row + 100>*3" (5 tokens and the stop: the 6-token limit, not cut); question q's
    answers: "6" in 3 tokens (4 with the stop), then for even q "6" after a 4-digit scratchpad (10
    tokens), for odd q a scratchpad the 12-token limit cuts (no answer)."""
    if SOLVER_CUE not in prompt:
        return f"{row + 100}*3"
    q = int(re.findall(r"(\d+)\*3", prompt)[-1]) - 100
    if row % 2 == 0:
        return "<answer>6</answer>"
    return "<think>1111</think><answer>6</answer>" if q % 2 == 0 else "<think>" + "1" * 20


def test_overlong_penalty_per_role_and_truncated_rows_masked(policy_folder, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(policy_folder)
    monkeypatch.setattr(rollout, "sample", _cutting(tokenizer, _lengths_script, tokenizer.encode("7")[0]))
    c = rewarded_run_config(policy_folder, tmp_path / "run")
    c.reward.k_min, c.rollout.proposer_max_new_tokens = 1, 6
    c.reward.overlong_buffer, c.reward.overlong_penalty, c.rl.mask_truncated = 4, 0.5, True
    trainer = Trainer(c)
    scored = _first_round(trainer)
    solver_lengths = [len(t) for t in scored["solver"].sample.token_lists]
    assert solver_lengths == [4, 10, 4, 12] * 4 and {len(t) for t in scored["proposer"].sample.token_lists} == {6}
    rows, metrics, _ = dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 0, scored,
                                                  ["proposer", "solver"])
    # Solver limit 12, buffer 4: free up to 8 tokens; 10 costs .5 · 2/4, the cut 12 costs .5. Task
    # rewards: even questions [1, 1], odd ones [1, 0] (a tie goes to the answer seen first).
    np.testing.assert_allclose(rows["solver"].rewards, [[1, 0.75], [1, -0.5]] * 4, rtol=1e-6)
    np.testing.assert_array_equal(rows["solver"].row_mask, [True, True, True, False] * 4)
    # Proposer limit 6 (not the solver's 12): 6 tokens cost .5 · 4/4, and a response that stops at the
    # limit is not cut; its task rewards (k = 2 -> 0, k = 1 -> 1) come from the solver's task rewards,
    # not its penalties.
    np.testing.assert_allclose(rows["proposer"].rewards, np.array([[0, 1]] * 4) - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(rows["proposer"].row_mask, [True] * 8)
    assert metrics["truncated/solver"] == 0.25 and metrics["truncated/proposer"] == 0
    np.testing.assert_allclose([metrics["overlong/solver_penalty"], metrics["overlong/proposer_penalty"]],
                               [-(0.25 + 0.5) / 4, -0.5], rtol=1e-6)
    # What the scores and logs report stays the task's reward.
    np.testing.assert_array_equal(scored["solver"].rewards, [[1, 1], [1, 0]] * 4)
    batch = trainer.learner.batch(*rows["solver"])
    assert not np.asarray(batch.response_mask)[3::4].any() and np.asarray(batch.response_mask)[2::4].any()


def test_extra_rounds_draw_their_own_seeds(policy_folder, tmp_path, monkeypatch):
    script = Rounds()
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, script, rl__filter_zero_variance=True,
                          rollout__max_extra_batches=2)
    dynamic_sampling.step_rows(trainer.rollouts, trainer.learner.policy, 3, _first_round(trainer), ["solver"])
    seed = trainer.config.seed
    assert script.seeds[:2] == [rollout.step_seed(seed, 0, 0), rollout.step_seed(seed, 0, 1)]
    assert rollout.step_seed(seed, 0, 0) == int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0])
    assert script.seeds[2:] == [rollout.step_seed(seed, 3, stream, extra) for extra in (1, 2) for stream in (0, 1)]
    assert len(set(script.seeds)) == 6


def test_self_play_step_trains_on_the_filtered_rows(policy_folder, tmp_path, monkeypatch):
    """Step 2 (both roles updated) with the filter and no extra rounds: the batches the step updates
    on hold the kept groups' tokens only. Solver: groups 1, 3, 5, each a row of 4 tokens and one of 10
    (82 tokens unfiltered); proposer: 6 of the 8 proposals of 4 tokens."""
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, Rounds(), rl__filter_zero_variance=True)
    updated = {}

    def update(batch, *, actor=True, critic=True):  # records the batch instead of compiling an update
        updated[batch.response_ids.shape[0]] = int(np.asarray(batch.response_mask).sum())
        return {}

    trainer.learner.update = update
    metrics = trainer.self_play_step(1)
    assert updated == {16: 42, 8: 24}  # the solver's 16 rows, the proposer's 8
    assert metrics["dynamic_sampling/solver_dropped"] == 5 / 8 and metrics["time/refill"] >= 0
    assert metrics["reward/solver"] == 13 / 16  # what the step reports is its first round, all of it


def test_throughput_counts_the_extra_rounds_tokens(policy_folder, tmp_path, monkeypatch):
    """A step with one extra round: throughput/generated_tokens_per_s is every token the sampler
    generated in the step (4 calls: propose and solve, twice) over the step's time."""
    script = Rounds()
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, script, rl__filter_zero_variance=True,
                          rollout__max_extra_batches=1)
    trainer.learner.update = lambda batch, *, actor=True, critic=True: {}  # no update compiled
    metrics = trainer.self_play_step(1)
    assert script.calls == 4
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    assert metrics["throughput/generated_tokens_per_s"] * seconds == pytest.approx(sum(script.tokens), rel=1e-9)


@pytest.mark.parametrize("advantage, scale_by_std, eps, split_group", [
    ("grpo", True, 1e-6, [0.7071, -0.7071]), ("grpo", False, 1e-6, [0.5, -0.5]), ("rloo", True, 1e-6, [1.0, -1.0]),
    ("grpo", True, 1.0, [0.2929, -0.2929])])  # rl.grpo_eps = 1: ±0.5 / (0.7071 + 1)
def test_the_learner_uses_the_chosen_estimator(policy_folder, tmp_path, monkeypatch, advantage, scale_by_std, eps,
                                               split_group):
    trainer, _ = _trainer(policy_folder, tmp_path, monkeypatch, Rounds(), rl__advantage=advantage,
                          rl__grpo_scale_by_std=scale_by_std, rl__grpo_eps=eps)
    solver = _first_round(trainer)["solver"]
    batch = trainer.learner.batch(solver.sample, solver.row_mask, solver.rewards)
    split = [x in Rounds.SPLIT for x in range(2, 10)]
    np.testing.assert_allclose(np.asarray(batch.advantages)[:, 0].reshape(-1, 2),
                               [split_group if s else [0, 0] for s in split], atol=1e-4)
