"""Reward rules pinned to hand-worked cases. N stands for rewards.NO_ANSWER (an unparseable answer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax import rewards

N = rewards.NO_ANSWER


def vote(row, k_min=2):
    solver, proposer = rewards.majority_vote(jnp.array([row], jnp.int32), k_min=k_min)
    return np.asarray(solver[0]).tolist(), float(proposer[0])


# (answers, majority id, k, solver rewards, proposer reward with k_min = 2)
MAJORITY_CASES = [
    # 5 and 7 both appear twice; 5 is seen first -> majority 5, k = 2; 2 <= 2 < 4 -> proposer 1.
    ([5, 7, 5, 7], 5, 2, [1, 0, 1, 0], 1.0),
    # None appears twice, 3 and 4 once -> None wins -> every sample 0, proposer 0.
    ([N, N, 3, 4], N, 2, [0, 0, 0, 0], 0.0),
    # 3 and None tie at 2; 3 is seen first -> majority 3; only the 3s are rewarded; k = 2 -> proposer 1.
    ([3, N, N, 3], 3, 2, [1, 0, 0, 1], 1.0),
    # Same tie, None seen first -> None wins -> all 0.
    ([N, 3, 3, N], N, 2, [0, 0, 0, 0], 0.0),
    # All different: every count is 1, the first (1) wins; k = 1 < k_min = 2 -> proposer 0.
    ([1, 2, 3, 4], 1, 1, [1, 0, 0, 0], 0.0),
    # All agree: k = n = 4 -> solver all 1, proposer 0 (too easy).
    ([9, 9, 9, 9], 9, 4, [1, 1, 1, 1], 0.0),
    # Clear majority 7 with k = 3: 2 <= 3 < 4 -> proposer 1.
    ([2, 7, 7, 7], 7, 3, [0, 1, 1, 1], 1.0),
    # Three-way tie at 2 (n = 6), None first -> None wins -> all 0.
    ([N, 4, 2, 2, 4, N], N, 2, [0, 0, 0, 0, 0, 0], 0.0),
    # Same three-way tie, 4 first -> majority 4, k = 2 -> proposer 1.
    ([4, N, 2, 2, 4, N], 4, 2, [1, 0, 0, 0, 1, 0], 1.0),
    # Nothing parsed: None wins with k = n -> all 0.
    ([N, N, N, N], N, 4, [0, 0, 0, 0], 0.0),
]


@pytest.mark.parametrize("row, majority, k, solver, proposer", MAJORITY_CASES)
def test_majority_vote_rules(row, majority, k, solver, proposer):
    got_majority, got_k = rewards.majority_info(jnp.array([row], jnp.int32))
    assert int(got_majority[0]) == majority
    assert int(got_k[0]) == k
    assert vote(row) == (solver, proposer)


def test_k_min_is_configurable():
    # [1, 2, 3, 4]: k = 1. k_min = 1 ("0 < k < n" of the prose summaries) -> 1 <= 1 < 4 -> proposer 1.
    assert vote([1, 2, 3, 4], k_min=1)[1] == 1.0
    # [2, 7, 7, 7]: k = 3. k_min = 4 -> 3 < 4 -> proposer 0.
    assert vote([2, 7, 7, 7], k_min=4)[1] == 0.0
    # None winning stays 0 even when k_min = 0 would let k pass the band.
    assert vote([N, N, 3, 4], k_min=0)[1] == 0.0


def test_majority_vote_batch_jit_and_vmap():
    rows = jnp.array([case[0] for case in MAJORITY_CASES if len(case[0]) == 4], jnp.int32)  # [Q=8, 4]
    expected_solver = np.array([case[3] for case in MAJORITY_CASES if len(case[0]) == 4], np.float32)
    expected_proposer = np.array([case[4] for case in MAJORITY_CASES if len(case[0]) == 4], np.float32)

    solver, proposer = jax.jit(functools.partial(rewards.majority_vote, k_min=2))(rows)
    assert solver.dtype == jnp.float32 and proposer.dtype == jnp.float32
    np.testing.assert_array_equal(solver, expected_solver)
    np.testing.assert_array_equal(proposer, expected_proposer)

    # vmap over a leading axis of two [4, 4] batches gives the same as the [8, 4] batch.
    solver_v, proposer_v = jax.vmap(rewards.majority_vote)(rows.reshape(2, 4, 4))
    np.testing.assert_array_equal(solver_v.reshape(8, 4), expected_solver)
    np.testing.assert_array_equal(proposer_v.reshape(8), expected_proposer)


def test_answer_ids_exact_strings_and_none():
    ids = rewards.answer_ids([["5", "05", "5", None], ["x", "x", None, "y"]])
    # Row 0: "5" -> 0, "05" -> 1 (exact comparison, not numeric), None -> NO_ANSWER.
    # Row 1: ids restart per row: "x" -> 0, "y" -> 1.
    np.testing.assert_array_equal(ids, [[0, 1, 0, N], [0, 0, N, 1]])
    assert ids.dtype == np.int32
    # "5" twice beats "05" once: solver [1, 0, 1, 0], k = 2 -> proposer 1.
    assert vote(ids[0].tolist()) == ([1, 0, 1, 0], 1.0)


def test_answer_ids_rejects_ragged_rows():
    with pytest.raises(ValueError, match="same number of answers"):
        rewards.answer_ids([["1", "2"], ["1"]])


def test_code_rewards():
    passes = jnp.array([
        [1.0, 0.5, 0.0, 0.0],  # mean 0.375, inside (0, 1) -> proposer 1
        [1.0, 1.0, 1.0, 1.0],  # mean 1 -> every program passes everything -> proposer 0
        [0.0, 0.0, 0.0, 0.0],  # mean 0 -> nobody passes anything -> proposer 0
        [0.0, 0.0, 0.0, 0.1],  # mean 0.025 -> proposer 1
    ])
    solver, proposer = jax.jit(rewards.code_rewards)(passes)
    np.testing.assert_array_equal(solver, passes)  # solver reward is the pass fraction itself
    np.testing.assert_array_equal(proposer, [1.0, 0.0, 0.0, 1.0])


def test_format_rewards():
    ids = jnp.array([
        [3, N, 5, N],  # 2 parsed: solver [1, 0, 1, 0]; k = 2, 2 <= 2 < 4 -> proposer 1
        [N, N, N, 1],  # 1 parsed: k = 1 < k_min = 2 -> proposer 0
        [1, 1, 2, 3],  # all parsed (agreement does not matter): k = 4 = n -> proposer 0
        [N, N, N, N],  # none parsed: k = 0 -> proposer 0
    ], jnp.int32)
    solver, proposer = rewards.format_rewards(ids)
    np.testing.assert_array_equal(solver, [[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(proposer, [1.0, 0.0, 0.0, 0.0])
    # k_min = 1: the "0 < mean < 1" band; row 1 (k = 1) now earns the proposer a reward.
    _, proposer = rewards.format_rewards(ids, k_min=1)
    np.testing.assert_array_equal(proposer, [1.0, 1.0, 0.0, 0.0])


def test_reward_fn_is_chosen_by_name():
    ids = jnp.array([[0, 0, 1, rewards.NO_ANSWER]])
    for kind, expected in (("majority", rewards.majority_vote(ids, k_min=2)),
                           ("format", rewards.format_rewards(ids, k_min=2))):
        for got, want in zip(rewards.reward_fn(kind, k_min=2)(ids), expected):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fractions = jnp.array([[0.0, 0.5]])
    solver, proposer = rewards.reward_fn("unit_tests")(fractions)
    np.testing.assert_array_equal(np.asarray(solver), [[0.0, 0.5]])
    assert np.asarray(proposer).tolist() == [1.0]
    with pytest.raises(ValueError, match="choose one of"):
        rewards.reward_fn("vibes")


def test_majority_answers_follow_the_training_rule():
    """Ties go to the answer seen first; "no answer" is a candidate and may win."""
    rows = [["7", "5", "5", "7"], [None, None, "3", "4"], ["05", "5", "5", "05"], ["1", None, "2", "3"]]
    assert rewards.majority_answers(rows) == ["7", None, "05", "1"]


def test_ground_truth_rewards_are_the_scores_and_no_proposer_reward():
    scores = jnp.array([[1.0, 0.0, 1.0], [0.25, 0.5, 0.0]])
    solver, proposer = jax.jit(rewards.reward_fn("ground_truth"))(scores)
    np.testing.assert_array_equal(np.asarray(solver), np.asarray(scores))
    assert solver.dtype == jnp.float32 and np.asarray(proposer).tolist() == [0.0, 0.0]
