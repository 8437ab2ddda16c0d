"""Proxy rewards for self-play: majority vote, unit-test pass rates, format-only; and the labelled
baseline's ground-truth reward.

Every reward function takes one row per question (Q rows) and one column per solver sample (n columns)
and returns `(solver_reward[Q, n], proposer_reward[Q])`, both float32. They are pure jnp functions:
jittable, vmappable, no host state. The host turns each answer into a number first: an integer id of
its parsed answer (`answer_ids`) for majority and format, the fraction of tests it passed for unit
tests. `reward_fn` picks one by its config name (reward.kind).

Rules follow the reference implementation (lili-chen/self-questioning-lm, a verl fork):
- the majority answer is the most common one, ties going to the answer seen first in sample order
  (what `collections.Counter.most_common(1)` does on insertion-ordered counts);
- "no answer" is a candidate like any other, but when it wins every sample gets 0;
- the proposer is rewarded for questions in the band `k_min <= k < n`, where k is the number of
  solver samples that earned reward 1 (the reference sums the solver rewards; k_min = 2 there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

NO_ANSWER = -1
"""Answer id of a sample whose answer could not be parsed. Parsed answers get ids >= 0."""


def answer_ids(answers: Sequence[Sequence[str | None]]) -> np.ndarray:
    """Maps parsed answer strings to int32 ids, row by row (host side).

    Args:
      answers: Q rows of n answers each; None stands for an unparseable answer.

    Returns:
      ids[Q, n] int32: within a row, equal strings share an id (exact comparison: "05" != "5"),
      ids are numbered 0, 1, ... in order of first appearance, and None maps to NO_ANSWER.
      Ids mean nothing across rows; only equality within a row is used.
    """
    widths = {len(row) for row in answers}
    if len(widths) > 1:
        raise ValueError(f"every question needs the same number of answers; got row lengths {sorted(widths)}")
    ids = np.full((len(answers), widths.pop() if widths else 0), NO_ANSWER, dtype=np.int32)
    for q, row in enumerate(answers):
        seen: dict[str, int] = {}
        for j, answer in enumerate(row):
            if answer is not None:
                ids[q, j] = seen.setdefault(answer, len(seen))
    return ids


def majority_info(answer_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Majority answer and its count per question.

    Args:
      answer_ids: [Q, n] int ids, NO_ANSWER for unparseable answers.

    Returns:
      (majority_id[Q] int32, count[Q] int32). The majority may be NO_ANSWER; count is then the number
      of unparseable samples. Useful on its own for the agreement histogram.
    """
    # counts[q, j]: how many samples of row q share sample j's answer. n is small (4 in the paper), so
    # the [Q, n, n] comparison is cheaper than any sort and keeps sample order.
    counts = jnp.sum(answer_ids[:, :, None] == answer_ids[:, None, :], axis=-1, dtype=jnp.int32)
    # argmax returns the first maximal index. Every sample of an answer carries that answer's count,
    # so the first sample with the top count is the first appearance of the first-seen top answer:
    # ties go to the answer seen first.
    first = jnp.argmax(counts, axis=-1)
    majority = jnp.take_along_axis(answer_ids, first[:, None], axis=-1)[:, 0]
    return majority.astype(jnp.int32), jnp.max(counts, axis=-1)


def band_reward(k: jnp.ndarray, n: int, k_min: int) -> jnp.ndarray:
    """Proposer reward for k rewarded solver samples out of n: 1.0 if k_min <= k < n else 0.0.

    Args:
      k: [Q] counts.
    Returns:
      [Q] float32.
    """
    return ((k >= k_min) & (k < n)).astype(jnp.float32)


def majority_vote(answer_ids: jnp.ndarray, *, k_min: int = 2) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Majority-vote rewards (arithmetic, algebra).

    Args:
      answer_ids: [Q, n] int ids, NO_ANSWER for unparseable answers.
      k_min: smallest majority count that earns the proposer a reward (reference: 2, i.e. k > 1).

    Returns:
      solver_reward[Q, n]: 1 where the sample's answer equals the majority and the majority is an
        answer (not NO_ANSWER), else 0.
      proposer_reward[Q]: 1 if the majority is an answer and k_min <= k < n, k its count, else 0.
        (For k_min >= 1 this equals the reference's rule on the sum of the solver rewards; the
        explicit gate keeps a question whose majority is "no answer" at 0 even for k_min = 0.)
    """
    majority, k = majority_info(answer_ids)
    answered = majority != NO_ANSWER
    solver = ((answer_ids == majority[:, None]) & answered[:, None]).astype(jnp.float32)
    proposer = band_reward(k, answer_ids.shape[-1], k_min) * answered
    return solver, proposer


def code_rewards(pass_fraction: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Unit-test rewards (coding).

    Args:
      pass_fraction: [Q, n] fraction of the question's tests each program passed, in [0, 1].

    Returns:
      solver_reward[Q, n]: the pass fraction itself.
      proposer_reward[Q]: 1 if 0 < mean over the n programs < 1 (neither trivial nor impossible).
    """
    solver = pass_fraction.astype(jnp.float32)
    mean = jnp.mean(solver, axis=-1)
    return solver, ((mean > 0) & (mean < 1)).astype(jnp.float32)


def format_rewards(answer_ids: jnp.ndarray, *, k_min: int = 2) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Format-only rewards (the ablation baseline): reward any answer that parses.

    Args:
      answer_ids: [Q, n] int ids, NO_ANSWER for unparseable answers.
      k_min: as in `majority_vote`.

    Returns:
      solver_reward[Q, n]: 1 where the answer parsed, else 0.
      proposer_reward[Q]: the majority-vote band applied to k = number of parsed answers,
        1 if k_min <= k < n. This is what the reference's proposer rule computes when its solver
        reward is the format reward (it sums the solver rewards of a question); k_min = 1 gives
        the "0 < mean < 1" band of the coding task instead.
    """
    solver = (answer_ids != NO_ANSWER).astype(jnp.float32)
    k = jnp.sum(answer_ids != NO_ANSWER, axis=-1)
    return solver, band_reward(k, answer_ids.shape[-1], k_min)


def ground_truth_rewards(scores: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Labelled-RL rewards (the baseline of rollout.question_source="dataset"): no self-play proxy.

    Args:
      scores: [Q, n] each answer's score against its question's label (1.0 for the right answer of a
        math question, the fraction of the labelled tests a program passes).

    Returns:
      solver_reward[Q, n]: the scores themselves.
      proposer_reward[Q]: 0 (the questions are given: there is no proposer to reward).
    """
    return scores.astype(jnp.float32), jnp.zeros(scores.shape[:-1], jnp.float32)


def overlong_penalty(lengths: jnp.ndarray, max_new_tokens: int, buffer: int, penalty: float) -> jnp.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025; verl's DAPORewardManager), added to a reward.

    A response of L tokens (its stop token included) in the last `buffer` tokens before the limit
    loses penalty · (L - (max_new_tokens - buffer)) / buffer: 0 up to max_new_tokens - buffer tokens,
    `penalty` at the limit, linear between.

    Args:
      lengths: [N] response lengths.

    Returns:
      [N] float32, <= 0.
    """
    exceed = lengths.astype(jnp.float32) - (max_new_tokens - buffer)
    return jnp.minimum(-exceed / buffer * penalty, 0.0)


def zero_variance_groups(rewards: jnp.ndarray) -> jnp.ndarray:
    """[Q, n] rewards -> [Q] bool: the groups whose n rewards are all equal, which carry no GRPO / RLOO
    advantage (DAPO's dynamic sampling drops them; verl's filter_groups keeps a group with std > 0)."""
    return jnp.all(rewards == rewards[:, :1], axis=-1)


def reward_fn(kind: str, *, k_min: int = 2) -> Callable[[jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]:
    """The reward function named by reward.kind: "majority" and "format" take answer ids `[Q, n]`,
    "unit_tests" takes pass fractions `[Q, n]`, "ground_truth" scores against labels `[Q, n]`."""
    rewards = {"majority": functools.partial(majority_vote, k_min=k_min),
               "format": functools.partial(format_rewards, k_min=k_min),
               "unit_tests": code_rewards,
               "ground_truth": ground_truth_rewards}
    if kind not in rewards:
        raise ValueError(f"reward kind {kind!r}; choose one of {sorted(rewards)}")
    return rewards[kind]


def majority_answers(answers: Sequence[Sequence[str | None]]) -> list[str | None]:
    """The majority answer of each row of parsed answers (None where "no answer" wins), by the
    training rule of `majority_info`."""
    ids = answer_ids(answers)
    majority, _ = majority_info(jnp.asarray(ids))
    first = np.argmax(ids == np.asarray(majority)[:, None], axis=1)
    return [row[j] for row, j in zip(answers, first)]
