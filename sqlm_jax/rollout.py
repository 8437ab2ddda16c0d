"""One step's rollouts: the proposer proposes, the solver solves, the host scores; one `Rollout` per role.

    topic prompt ──sample B·n──▶ proposals ──task.parse_question──▶ questions [Q = B·n]
    questions ──solver_prompts──▶ ──sample n each──▶ answers [Q·n]
    answers ──task.parse_answer → answer ids, or the sandbox → pass fractions──▶ rewards.reward_fn
      ──▶ solver rewards [Q, n], proposer rewards [B, n]

Everything that touches text or runs programs happens here, on the host; the sampled arrays stay on
the device(s) for the learner. The pregenerated pool (the ablation's fixed questions) lives here too.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import distributed, sandbox
from sqlm_jax import rewards as rewards_lib
from sqlm_jax.sampling import SampleOutput, SamplingParams, sample
from sqlm_jax.tasks.base import Question, Task
from sqlm_jax.tokenizer import Tokenizer


_majority_info = jax.jit(rewards_lib.majority_info)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A sampling seed that depends only on (run seed, step, stream): resumed runs redraw the same."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def solver_prompts(tokenizer: Tokenizer, task: Task, questions: Sequence[Question]) -> list[list[int]]:
    """Chat-formatted solver prompts: what the solver sees in training and in evaluation."""
    return [tokenizer.chat_prompt(task.solver_prompt(q), system=task.system_prompt) for q in questions]


@dataclasses.dataclass
class Rollout:
    """One role's N sampled rows and what the host made of them. Rows i·n … i·n+n-1 form group i."""

    sample: SampleOutput | None   # the sampler's arrays; None for proposals from the pregenerated pool
    texts: list[str]              # [N] decoded responses
    questions: list[Question | None]  # the proposer's parsed questions [N] (None: invalid); the solver's [Q]
    row_mask: np.ndarray | None = None   # [N] bool: rows in the role's loss
    rewards: np.ndarray | None = None    # [N/n, n]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        """[Q] bool: the questions that parsed (and fit the solver's prompt)."""
        return np.array([q is not None for q in self.questions])

    @property
    def generated_tokens(self) -> int:
        return 0 if self.sample is None else sum(map(len, self.sample.token_lists))


class Rollouts:
    """Propose, solve and score for one task; sampling knobs and the reward rule chosen once."""

    def __init__(self, config, task: Task, tokenizer: Tokenizer, mesh):
        c = self.config = config
        self.task, self.tokenizer, self.mesh = task, tokenizer, mesh
        r = c.rollout
        knobs = lambda n, max_new_tokens: SamplingParams(
            max_new_tokens=max_new_tokens, temperature=float(r.temperature), top_k=int(r.top_k),
            top_p=float(r.top_p), n=n, stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
        self.proposer_params = knobs(r.batch_size * r.n, r.proposer_max_new_tokens)
        self.solver_params = knobs(r.n, r.solver_max_new_tokens)
        self.reward_kind = task.reward if c.reward.kind == "auto" else c.reward.kind
        # Compiled once: eager jnp would send each of the rule's Python constants to the device per call.
        self.reward = jax.jit(rewards_lib.reward_fn(self.reward_kind, k_min=c.reward.k_min))
        self.pool: list[dict] | None = None  # the ablation's fixed questions
        self.position = 0  # questions of the pool used so far

    def propose(self, policy, step: int, stream: int = 0) -> Rollout:
        """B·n proposals from the one topic prompt, sampled by `policy = (graphdef, params)`.

        Seeded by (run seed, `step`, `stream`): stream 0 for a step's proposals, 2 for the chunks of
        the pregenerated pool (stream 1 is the solver's)."""
        prompt = self.tokenizer.chat_prompt(self.task.proposer_prompt)
        out = sample(*policy, [prompt], params=self.proposer_params,
                     seed=step_seed(self.config.seed, step, stream), mesh=self.mesh)
        texts = [self.tokenizer.decode(t) for t in out.token_lists]
        questions = [self.task.parse_question(t) for t in texts]
        # A question whose solver prompt would not fit max_prompt_len counts as invalid.
        fits = lambda q: len(solver_prompts(self.tokenizer, self.task, [q])[0]) <= self.config.rollout.max_prompt_len
        return Rollout(out, texts, [q if q is not None and fits(q) else None for q in questions])

    def questions(self, policy, step: int) -> Rollout:
        """Online: fresh proposals. Pregenerated (ablation): the next B·n from the fixed pool."""
        if self.config.rollout.question_source == "online":
            return self.propose(policy, step)
        count = self.proposer_params.n
        picked = [self.pool[(self.position + i) % len(self.pool)] for i in range(count)]
        self.position += count
        return Rollout(None, [p["proposal"] for p in picked],
                       [Question(p["text"], tuple(map(tuple, p["tests"]))) for p in picked])

    def pregenerate(self, policy) -> None:
        """The ablation's fixed question pool, proposed once by the base model before training."""
        wanted, pool, chunk = self.config.rollout.pregenerated_questions, [], 0
        while len(pool) < wanted and chunk < 100:
            proposals = self.propose(policy, chunk, stream=2)
            pool += [{"proposal": p, "text": q.text, "tests": q.tests}
                     for p, q in zip(proposals.texts, proposals.questions) if q is not None]
            chunk += 1
        if not pool:
            raise RuntimeError("the base model proposed no valid question; cannot pregenerate a pool")
        self.pool = pool[:wanted]

    def solve(self, policy, step: int, proposer: Rollout) -> Rollout:
        """n answers to each question; an invalid proposal's raw text stands in for its question."""
        questions = [q if q is not None else Question(p) for q, p in zip(proposer.questions, proposer.texts)]
        out = sample(*policy, solver_prompts(self.tokenizer, self.task, questions), params=self.solver_params,
                     seed=step_seed(self.config.seed, step, 1), mesh=self.mesh)
        return Rollout(out, [self.tokenizer.decode(t) for t in out.token_lists], proposer.questions)

    def score(self, proposer: Rollout, solver: Rollout) -> tuple[Rollout, Rollout]:
        """Both roles with rewards and row masks: solver `[Q, n]`, proposer `[B, n]`, 0 for invalid
        questions; answers to invalid questions leave the solver's loss, invalid proposals stay in
        the proposer's unless reward.invalid_proposals='mask'."""
        n, valid = self.config.rollout.n, proposer.valid
        per_answer, metrics = (self._pass_fractions if self.reward_kind == "unit_tests" else self._answer_ids)(
            proposer.questions, solver.texts)
        solver_r, proposer_r = (np.asarray(x) for x in self.reward(jnp.asarray(per_answer)))
        solver_r, proposer_r = solver_r * valid[:, None], proposer_r * valid
        metrics["reward/solver"] = float(solver_r[valid].mean()) if valid.any() else 0.0
        keep = valid if self.config.reward.invalid_proposals == "mask" else np.ones_like(valid)
        return (dataclasses.replace(proposer, row_mask=keep, rewards=proposer_r.reshape(-1, n), metrics={
                    "reward/proposer": float(proposer_r.mean()), "proposals/valid": float(valid.mean())}),
                dataclasses.replace(solver, row_mask=np.repeat(valid, n), rewards=solver_r, metrics=metrics))

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

    def _pass_fractions(self, questions, answers: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        """Each program's fraction of its question's tests passed `[Q, n]`, and the sandbox's statuses."""
        n, c = self.config.rollout.n, self.config.reward
        programs = [self.task.parse_answer(a) for a in answers]
        jobs = [(p or "", questions[i // n].tests if questions[i // n] is not None else ())
                for i, p in enumerate(programs)]

        isolation = sandbox.SandboxConfig(allow_unisolated_fallback=c.allow_unisolated_sandbox)

        def run(jobs):
            results = sandbox.run_many(jobs, workers=c.sandbox_workers or None, timeout_s=c.code_timeout_s,
                                       config=isolation)
            return np.array([[r.fraction] + [r.statuses.count(s) for s in sandbox.STATUSES] for r in results])

        results = distributed.split_across_hosts(run, jobs, 1 + len(sandbox.STATUSES))
        counts = results[:, 1:].sum(axis=0)
        metrics = {f"sandbox/{s}": k / max(counts.sum(), 1) for s, k in zip(sandbox.STATUSES, counts)}
        metrics["answers/parsed"] = float(np.mean([p is not None for p in programs]))
        return results[:, 0].astype(np.float32).reshape(-1, n), metrics
