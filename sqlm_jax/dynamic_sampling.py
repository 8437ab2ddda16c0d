"""Dynamic sampling for self-play (DAPO, Yu et al. 2025), each role on its own groups: the rows a step's
update trains on.

    scored rollouts ──Rollouts.role_rows (overlong penalty, truncated rows masked)──▶ RoleRows per role
      rl.filter_zero_variance: groups whose n rewards are all equal leave the loss (row mask)
      rollout.max_extra_batches = K: up to K extra rounds (propose → solve → score, with fresh seeds)
        while a trained role still has dropped groups; each round's groups with unequal rewards
        take the dropped groups' places, in order ──▶ RoleRows of the same shape

A group is what the role's advantage compares: for the solver the n answers to one question, for the
proposer the n proposals of one prompt row (the reference's grouping). One extra round yields
candidates for both roles at once (its proposals are rewarded by its own solver answers). The batch
never changes shape, so the update never recompiles for it; when the budget runs out the groups left
unfilled simply stay out of the loss (verl's DAPO recipe raises there instead). Everything outside
the update (logged samples, reward metrics, the curriculum) describes the step's first round.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sqlm_jax import rewards as rewards_lib
from sqlm_jax.rollout import Rollout, RoleRows, Rollouts
from sqlm_jax.sampling import SampleOutput


def step_rows(rollouts: Rollouts, policy, step: int, scored: dict[str, Rollout], trained: Sequence[str]
              ) -> tuple[dict[str, RoleRows], dict[str, float], int]:
    """Each role's RoleRows for this step's update, its metrics, and the tokens extra rounds generated.

    `scored`: the step's scored rollouts by role ("proposer" absent for a fixed question pool);
    `trained`: the roles whose batch this step builds, the only ones worth extra rounds.
    Metrics: "zero_variance/<role>" (fraction of groups with all-equal rewards, always); with the
    filter, "dynamic_sampling/<role>_dropped" (fraction of groups dropped from the first round),
    "..._extra_batches" (extra rounds sampled while the role had dropped groups) and "..._masked"
    (fraction of groups still out of the loss once the budget is spent).
    """
    c, n = rollouts.config, rollouts.config.rollout.n
    rows, metrics = {}, {}
    for role, rollout in scored.items():
        rows[role], shaped = rollouts.role_rows(role, rollout)
        metrics.update(shaped)
        metrics[f"zero_variance/{role}"] = float(np.mean(_zero_variance(rows[role])))
    if not c.rl.filter_zero_variance:
        return rows, metrics, 0
    holes, sources = {}, {}  # per role: the dropped groups' places, and (round, group) filling each place
    for role, r in rows.items():
        dropped = _in_loss(r, n) & _zero_variance(r)
        rows[role] = r._replace(row_mask=r.row_mask & ~np.repeat(dropped, n))
        holes[role], sources[role] = list(np.flatnonzero(dropped)), [(0, g) for g in range(len(dropped))]
        metrics[f"dynamic_sampling/{role}_dropped"] = float(dropped.mean())
        metrics[f"dynamic_sampling/{role}_extra_batches"] = 0.0
    rounds, extra_tokens = [rows], 0
    for extra in range(1, c.rollout.max_extra_batches + 1):
        wanting = [role for role in trained if holes.get(role)]
        if not wanting:
            break
        proposer = rollouts.questions(policy, step, extra=extra)
        proposer, solver = rollouts.score(proposer, rollouts.solve(policy, step, proposer, extra=extra))
        extra_tokens += proposer.generated_tokens + solver.generated_tokens
        fresh = {}
        for role in wanting:
            fresh[role], _ = rollouts.role_rows(role, {"proposer": proposer, "solver": solver}[role])
            usable = np.flatnonzero(_in_loss(fresh[role], n) & ~_zero_variance(fresh[role]))
            for group in usable[:len(holes[role])]:
                sources[role][holes[role].pop(0)] = (extra, int(group))
            metrics[f"dynamic_sampling/{role}_extra_batches"] += 1
        rounds.append(fresh)
    for role in rows:
        metrics[f"dynamic_sampling/{role}_masked"] = len(holes[role]) / len(sources[role])
        if any(r for r, _ in sources[role]):
            rows[role] = splice([each.get(role) for each in rounds], sources[role], n, rollouts.tokenizer.pad_id)
    return rows, metrics, extra_tokens


def _zero_variance(rows: RoleRows) -> np.ndarray:
    return np.asarray(rewards_lib.zero_variance_groups(rows.rewards))


def _in_loss(rows: RoleRows, n: int) -> np.ndarray:
    """[groups] bool: groups with a row in the loss (the others are out already, e.g. invalid questions)."""
    return rows.row_mask.reshape(-1, n).any(axis=1)


def splice(rounds: list[RoleRows | None], sources: list[tuple[int, int]], n: int, pad_id: int) -> RoleRows:
    """RoleRows whose group g (rows g·n … g·n+n-1) is group `sources[g][1]` of `rounds[sources[g][0]]`.

    Responses stay on the device, gathered there and placed as the first round's; prompts, left
    padded to the widest round's width, stay on the host. Every round has the same shapes but the
    prompt width, and groups move whole, so rows sharing a prompt stay together.
    """
    used = sorted({r for r, _ in sources})
    parts = [rounds[r] for r in used]
    starts = dict(zip(used, np.cumsum([0] + [p.row_mask.shape[0] for p in parts[:-1]])))
    index = np.concatenate([starts[r] + g * n + np.arange(n) for r, g in sources])
    samples = [p.sample for p in parts]
    device = [jax.device_put(_take_rows([getattr(s, f) for s in samples], index), getattr(samples[0], f).sharding)
              for f in ("tokens", "logprobs", "mask")]
    width = max(s.prompt_tokens.shape[1] for s in samples)
    left = lambda x, fill: np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)
    host = lambda f, fill: np.concatenate([left(getattr(s, f), fill) for s in samples])[index]
    token_lists = [t for s in samples for t in s.token_lists]
    sample = SampleOutput(*device, token_lists=[token_lists[i] for i in index],
                          prompt_tokens=host("prompt_tokens", pad_id), prompt_mask=host("prompt_mask", False),
                          n=samples[0].n)
    row_mask = np.concatenate([p.row_mask for p in parts])[index]
    rewards = np.concatenate([p.rewards.reshape(-1) for p in parts])[index].reshape(-1, n)
    return RoleRows(sample, row_mask, rewards)


@jax.jit
def _take_rows(arrays: list[jax.Array], index: np.ndarray) -> jax.Array:
    return jnp.concatenate(arrays)[index]
