"""One step's rollouts: the proposer proposes, the solver solves, the host scores; one `Rollout` per role.

    topic prompt ──sample B·n──▶ proposals ──task.reference_question (or parse_question)──▶ questions [Q = B·n]
    questions ──solver prompts, left-truncated to rollout.max_prompt_len──▶ ──sample n each──▶ answers [Q·n]
    answers ──task.parse_answer → answer ids, or the sandbox → pass fractions, or the labels──▶
      rewards.reward_fn ──▶ solver rewards [Q, n], proposer rewards [B, n]

Everything that touches text or runs programs happens here, on the host; the sampled arrays stay on
the device(s) for the learner. The fixed question pools live here too: the "pregenerated" ablation's
(proposed once by the base model) and the "dataset" baselines' (the task's training problems).

Invalid proposals (reward.invalid_proposals), the one place the modes differ:
  reference  every proposal is a question, `task.reference_question`, rewarded as usual; its answers
             stay in the solver loss and GAE whitening (the reference's loss_mask has no effect)
  keep       `task.parse_question`: a proposal it rejects, or whose solver prompt exceeds
             rollout.max_prompt_len, is invalid: proposer reward 0, kept in the proposer loss (a
             format penalty); its answers get reward 0 and leave the solver loss
  mask       as keep, and invalid proposals also leave the proposer loss
`proposals/valid` is the strict parse rate in every mode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import distributed, sandbox
from sqlm_jax import rewards as rewards_lib
from sqlm_jax.sampling import SampleOutput, SamplingParams, sample
from sqlm_jax.tasks.base import Question, Task
from sqlm_jax.tokenizer import Tokenizer


_majority_info = jax.jit(rewards_lib.majority_info)
FIXED_SOURCES = ("pregenerated", "dataset")  # question sources whose questions come from a fixed pool


def step_seed(seed: int, step: int, stream: int, extra: int = 0) -> int:
    """A sampling seed that depends only on (run seed, step, stream, extra): resumed runs redraw the
    same. `extra` 0 is a step's own sample, 1, 2, … dynamic sampling's extra rounds."""
    return int(np.random.SeedSequence([seed, step, stream] + ([extra] if extra else [])).generate_state(1)[0])


def truncated(sample: SampleOutput, max_new_tokens: int, stop_ids: Sequence[int]) -> np.ndarray:
    """[N] bool: the responses the sampler cut at max_new_tokens before any stop id."""
    return np.array([len(t) == max_new_tokens and t[-1] not in stop_ids for t in sample.token_lists])


def solver_prompts(tokenizer: Tokenizer, task: Task, questions: Sequence[Question]) -> list[list[int]]:
    """Chat-formatted solver prompts: what the solver sees in training and in evaluation."""
    return [tokenizer.chat_prompt(task.solver_prompt(q), system=task.system_prompt) for q in questions]


@dataclasses.dataclass
class Rollout:
    """One role's N sampled rows and what the host made of them. Rows i·n … i·n+n-1 form group i."""

    sample: SampleOutput | None   # the sampler's arrays; None for questions from a fixed pool
    texts: list[str]              # [N] decoded responses
    # The proposer's questions [N], as the solver gets them (None: invalid, only outside "reference");
    # the solver's [Q], the same list.
    questions: list[Question | None]
    parsed: np.ndarray | None = None     # proposer [N] bool: the proposal follows the task's format
    truths: list[Any] | None = None      # [Q] labels of dataset questions (reward.kind="ground_truth")
    row_mask: np.ndarray | None = None   # [N] bool: rows in the role's loss
    rewards: np.ndarray | None = None    # [N/n, n]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        """[Q] bool: the questions the solver is rewarded and trained on."""
        return np.array([q is not None for q in self.questions])

    @property
    def generated_tokens(self) -> int:
        return 0 if self.sample is None else sum(map(len, self.sample.token_lists))


class RoleRows(NamedTuple):
    """What one role's update is built from (`Learner.batch`'s arguments), after the update's reward
    options (`Rollouts.role_rows`) and dynamic sampling (sqlm_jax.dynamic_sampling)."""

    sample: SampleOutput
    row_mask: np.ndarray   # [N] bool: rows in the loss
    rewards: np.ndarray    # [N/n, n] float32


class Rollouts:
    """Propose, solve and score for one task; sampling knobs and the reward rule chosen once."""

    def __init__(self, config, task: Task, tokenizer: Tokenizer, mesh):
        c = self.config = config
        self.task, self.tokenizer, self.mesh = task, tokenizer, mesh
        r = c.rollout
        knobs = lambda n, max_new_tokens: SamplingParams(
            max_new_tokens=max_new_tokens, temperature=float(r.temperature), top_k=int(r.top_k),
            top_p=float(r.top_p), n=n, stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
            rows_in_flight=int(r.rows_in_flight))
        self.proposer_params = knobs(r.batch_size * r.n, r.proposer_max_new_tokens)
        self.solver_params = knobs(r.n, r.solver_max_new_tokens)
        self.reward_kind = task.reward if c.reward.kind == "auto" else c.reward.kind
        # Compiled once: eager jnp would send each of the rule's Python constants to the device per call.
        self.reward = jax.jit(rewards_lib.reward_fn(self.reward_kind, k_min=c.reward.k_min))
        self.pool: list[dict] | None = None  # a fixed source's questions
        self.position = 0  # questions of the pool used so far

    def propose(self, policy, step: int, stream: int = 0, extra: int = 0) -> Rollout:
        """B·n proposals from the one topic prompt, sampled by `policy = (graphdef, params)`.

        Seeded by (run seed, `step`, `stream`, `extra`): stream 0 for a step's proposals, 2 for the
        chunks of the pregenerated pool (stream 1 is the solver's); `extra` > 0: an extra round."""
        prompt = self.tokenizer.chat_prompt(self.task.proposer_prompt)
        out = sample(*policy, [prompt], params=self.proposer_params,
                     seed=step_seed(self.config.seed, step, stream, extra), mesh=self.mesh)
        return self.proposals(out, [self.tokenizer.decode(t) for t in out.token_lists])

    def proposals(self, out: SampleOutput | None, texts: list[str]) -> Rollout:
        """The proposer's Rollout of `texts`: each proposal's question by reward.invalid_proposals."""
        parsed = [self.task.parse_question(t) for t in texts]
        if self.config.reward.invalid_proposals == "reference":
            # ray_trainer.py `fit` (the proposer_parser_version branches): every proposal is sent to
            # the solver, and its loss_mask reaches no loss.
            questions = [self.task.reference_question(t) for t in texts]
        else:
            limit = self.config.rollout.max_prompt_len
            fits = lambda q: len(solver_prompts(self.tokenizer, self.task, [q])[0]) <= limit
            questions = [q if q is not None and fits(q) else None for q in parsed]
        return Rollout(out, texts, questions, parsed=np.array([q is not None for q in parsed]))

    def questions(self, policy, step: int, extra: int = 0) -> Rollout:
        """Online: fresh proposals (of dynamic sampling's `extra` round when > 0). A fixed source
        (pregenerated, dataset): the next B·n of its pool."""
        source = self.config.rollout.question_source
        if source not in FIXED_SOURCES:
            return self.propose(policy, step, extra=extra)
        count = self.proposer_params.n
        picked = [self.pool[(self.position + i) % len(self.pool)] for i in range(count)]
        self.position += count
        return Rollout(None, [p["proposal"] for p in picked],
                       [Question(p["text"], tuple(map(tuple, p["tests"]))) for p in picked],
                       parsed=np.ones(count, bool),
                       truths=[p["truth"] for p in picked] if source == "dataset" else None)

    def pregenerate(self, policy) -> None:
        """The ablation's fixed question pool, proposed once by the base model before training."""
        wanted, pool, chunk = self.config.rollout.pregenerated_questions, [], 0
        while len(pool) < wanted and chunk < 100:
            proposals = self.propose(policy, chunk, stream=2)
            pool += [{"proposal": p, "text": q.text, "tests": q.tests}
                     for p, q, ok in zip(proposals.texts, proposals.questions, proposals.parsed)
                     if q is not None and ok]
            chunk += 1
        if not pool:
            raise RuntimeError("the base model proposed no valid question; cannot pregenerate a pool")
        self.pool = pool[:wanted]

    def load_dataset(self, heldout: set[str]) -> None:
        """The dataset baselines' fixed pool: rollout.pregenerated_questions of the task's training
        problems (its generator, or rollout.dataset_path), none of them a held-out question (`heldout`:
        the texts of the evaluation set)."""
        r = self.config.rollout
        problems = self.task.training_problems(r.pregenerated_questions + len(heldout), r.dataset_seed,
                                               path=r.dataset_path)
        pool = [{"proposal": q.text, "text": q.text, "tests": q.tests, "truth": truth}
                for q, truth in problems if q.text not in heldout]
        if not pool:
            raise RuntimeError("every training problem is a held-out one; set rollout.dataset_path or "
                               "rollout.dataset_seed to draw others")
        self.pool = pool[:r.pregenerated_questions]

    def solver_inputs(self, questions: Sequence[Question]) -> list[list[int]]:
        """Solver prompts, each cut to its last rollout.max_prompt_len tokens: the reference's left
        truncation of a long question's prompt (ray_trainer.py `fit`, verl_F.postprocess_data with
        truncation='left'), which keeps it in the batch."""
        limit = self.config.rollout.max_prompt_len
        return [p[-limit:] for p in solver_prompts(self.tokenizer, self.task, questions)]

    def solve(self, policy, step: int, proposer: Rollout, extra: int = 0) -> Rollout:
        """n answers to each question; an invalid proposal's raw text stands in for its question."""
        questions = [q if q is not None else Question(p) for q, p in zip(proposer.questions, proposer.texts)]
        out = sample(*policy, self.solver_inputs(questions), params=self.solver_params,
                     seed=step_seed(self.config.seed, step, 1, extra), mesh=self.mesh)
        return Rollout(out, [self.tokenizer.decode(t) for t in out.token_lists], proposer.questions,
                       truths=proposer.truths)

    def score(self, proposer: Rollout, solver: Rollout) -> tuple[Rollout, Rollout]:
        """Both roles with rewards and row masks: solver `[Q, n]`, proposer `[B, n]`, 0 for invalid
        questions, which leave the solver's loss (and the proposer's with invalid_proposals='mask')."""
        n, valid = self.config.rollout.n, proposer.valid
        if self.reward_kind == "ground_truth":
            per_answer, metrics = self._truth_scores(proposer.truths, solver.texts)
        elif self.reward_kind == "unit_tests":
            per_answer, metrics = self._pass_fractions([q.tests if q else () for q in proposer.questions],
                                                       solver.texts)
        else:
            per_answer, metrics = self._answer_ids(proposer.questions, solver.texts)
        solver_r, proposer_r = (np.asarray(x) for x in self.reward(jnp.asarray(per_answer)))
        solver_r, proposer_r = solver_r * valid[:, None], proposer_r * valid
        metrics["reward/solver"] = float(solver_r[valid].mean()) if valid.any() else 0.0
        keep = valid if self.config.reward.invalid_proposals == "mask" else np.ones_like(valid)
        parsed = valid if proposer.parsed is None else proposer.parsed
        return (dataclasses.replace(proposer, row_mask=keep, rewards=proposer_r.reshape(-1, n), metrics={
                    "reward/proposer": float(proposer_r.mean()), "proposals/valid": float(parsed.mean())}),
                dataclasses.replace(solver, row_mask=np.repeat(valid, n), rewards=solver_r, metrics=metrics))

    def role_rows(self, role: str, rollout: Rollout) -> tuple[RoleRows, dict[str, float]]:
        """A scored role's rows for its update: the rewards less DAPO's soft overlong penalty
        (reward.overlong_buffer, against the role's own max_new_tokens), and with rl.mask_truncated the
        responses cut at max_new_tokens out of the loss. The proposer's rewards come from the solver's
        task rewards, never from the solver's penalties. Metrics: the fraction truncated, the mean penalty."""
        c, out = self.config, rollout.sample
        limit = (self.proposer_params if role == "proposer" else self.solver_params).max_new_tokens
        cut = truncated(out, limit, self.tokenizer.stop_ids)
        rewards, row_mask, metrics = rollout.rewards, rollout.row_mask, {f"truncated/{role}": float(cut.mean())}
        if c.reward.overlong_buffer:
            penalty = np.asarray(rewards_lib.overlong_penalty(np.array([len(t) for t in out.token_lists]), limit,
                                                              c.reward.overlong_buffer, c.reward.overlong_penalty))
            rewards = rewards + penalty.reshape(rewards.shape)
            metrics[f"overlong/{role}_penalty"] = float(penalty.mean())
        if c.rl.mask_truncated:
            row_mask = row_mask & ~cut
        return RoleRows(out, row_mask, rewards), metrics

    def _answer_ids(self, questions, answers: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        """Answer ids `[Q, n]` of the parsed answers, and the agreement histogram of valid questions."""
        n = self.config.rollout.n
        parsed = [self.task.parse_answer(a) for a in answers]
        ids = rewards_lib.answer_ids([parsed[i:i + n] for i in range(0, len(parsed), n)])
        _, k = _majority_info(ids)
        k = np.asarray(k)[[q is not None for q in questions]]
        metrics = {f"agreement/k{j}": float(np.mean(k == j)) if len(k) else 0.0 for j in range(1, n + 1)}
        metrics["answers/parsed"] = float(np.mean([p is not None for p in parsed]))
        return ids, metrics

    def _truth_scores(self, truths: list[Any], answers: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        """Each answer's score against its question's label `[Q, n]`: 1 for the right answer (math),
        the fraction of the labelled tests passed (coding)."""
        n = self.config.rollout.n
        if self.task.reward == "unit_tests":
            return self._pass_fractions(truths, answers)
        scores = np.array([self.task.score(a, truths[i // n]) for i, a in enumerate(answers)], np.float32)
        return scores.reshape(-1, n), {
            "answers/parsed": float(np.mean([self.task.parse_answer(a) is not None for a in answers]))}

    def _pass_fractions(self, tests: Sequence[Sequence[tuple[str, str]]], answers: list[str]
                        ) -> tuple[np.ndarray, dict[str, float]]:
        """Each program's fraction of its question's tests (`tests [Q]`) passed `[Q, n]`, and the
        sandbox's statuses. A response without a program, or a question without tests, scores 0 and
        runs nothing: the empty program would pass every test that expects no output."""
        n, c = self.config.rollout.n, self.config.reward
        programs = [self.task.parse_answer(a) for a in answers]
        jobs = [(i, p, tests[i // n]) for i, p in enumerate(programs) if p is not None and len(tests[i // n])]
        isolation = sandbox.SandboxConfig(allow_unisolated_fallback=c.allow_unisolated_sandbox)

        def run(jobs):
            results = sandbox.run_many(jobs, workers=c.sandbox_workers or None, timeout_s=c.code_timeout_s,
                                       config=isolation)
            return np.array([[r.fraction] + [r.statuses.count(s) for s in sandbox.STATUSES] for r in results])

        results = np.zeros((len(answers), 1 + len(sandbox.STATUSES)))
        if jobs:  # the same list on every host, so all of them join split_across_hosts' all-gather
            results[[i for i, _, _ in jobs]] = distributed.split_across_hosts(
                run, [(p, t) for _, p, t in jobs], 1 + len(sandbox.STATUSES))
        counts = results[:, 1:].sum(axis=0)
        metrics = {f"sandbox/{s}": k / max(counts.sum(), 1) for s, k in zip(sandbox.STATUSES, counts)}
        metrics["answers/parsed"] = float(np.mean([p is not None for p in programs]))
        return results[:, 0].astype(np.float32).reshape(-1, n), metrics
