"""Checks a run config before anything is loaded, so a bad value fails in one line that names the fix."""
from __future__ import annotations

import math

from sqlm_jax.tasks import TASKS

_CHOICES = {
    "reward.kind": ("auto", "majority", "format", "unit_tests", "ground_truth"),
    "reward.invalid_proposals": ("reference", "keep", "mask"),
    "rollout.question_source": ("online", "pregenerated", "dataset"),
    "rl.advantage": ("grpo", "gae", "rloo", "reinforce_pp"),
    "rl.policy_loss": ("ppo", "gspo"),
    "rl.kl_kind": ("k1", "k2", "k3"),
    "rl.rollout_is": ("off", "token", "sequence"),
    "rl.loss_agg": ("reference", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "optim.schedule": ("constant", "cosine"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "splash", "xla"),
}


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to set."""


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(config, num_batch_devices: int | None = None) -> None:
    """Raises ConfigError for the first problem found. `num_batch_devices` = data × fsdp, when known."""
    if config.task not in TASKS:
        raise ConfigError(f"task={config.task!r} is not a task; choose one of {sorted(TASKS)}")
    for field, choices in _CHOICES.items():
        if _get(config, field) not in choices:
            raise ConfigError(f"{field}={_get(config, field)!r}; choose one of {list(choices)}")
    r, rl = config.rollout, config.rl
    if config.reward.kind == "unit_tests" and config.task != "coding" or \
            config.reward.kind == "majority" and config.task == "coding":
        raise ConfigError(f"reward.kind={config.reward.kind!r} does not suit task {config.task!r}; "
                          "use reward.kind='auto' for the task's own reward")
    if config.reward.kind == "ground_truth" and r.question_source != "dataset":
        raise ConfigError("reward.kind='ground_truth' needs labelled questions: set rollout.question_source='dataset'")
    if r.question_source == "dataset" and config.task == "coding" and config.reward.kind != "ground_truth":
        raise ConfigError("coding dataset questions carry no proposer tests to score by: set "
                          "reward.kind='ground_truth' (their labelled tests)")
    if r.n < 2:
        raise ConfigError(f"rollout.n={r.n}: groups of one give no advantage signal; use n >= 2 (paper: 4)")
    for field in ("rollout.batch_size", "rollout.max_prompt_len", "rollout.proposer_max_new_tokens",
                  "rollout.solver_max_new_tokens", "rl.mini_batch_size",
                  "rl.ppo_epochs", "train.steps", "train.max_nonfinite_steps", "checkpoint.every",
                  "checkpoint.keep", "eval.max_new_tokens", "eval.batch_size"):
        if _get(config, field) < 1:
            raise ConfigError(f"{field}={_get(config, field)} must be at least 1")
    if config.train.max_minutes < 0:
        raise ConfigError(f"train.max_minutes={config.train.max_minutes} must be >= 0 (0: no time budget)")
    if not 0 < r.top_p <= 1 or r.temperature < 0 or r.top_k < 0:
        raise ConfigError("rollout sampling: need 0 < top_p <= 1, temperature >= 0, top_k >= 0")
    if r.batch_size % rl.mini_batch_size:
        raise ConfigError(f"rl.mini_batch_size={rl.mini_batch_size} must divide rollout.batch_size="
                          f"{r.batch_size} (mini-batches are groups of prompt rows)")
    if rl.micro_batch_size < 1 and rl.micro_batch_size != -1 or r.rows_in_flight < -1:
        raise ConfigError(f"rl.micro_batch_size={rl.micro_batch_size} must be >= 1 or -1 (auto), "
                          f"rollout.rows_in_flight={r.rows_in_flight} >= 0 (0: all) or -1 (auto)")
    mini_sequences = rl.mini_batch_size * r.n
    if rl.micro_batch_size > 0 and mini_sequences % rl.micro_batch_size:  # -1: auto_knobs picks a divisor
        raise ConfigError(f"rl.micro_batch_size={rl.micro_batch_size} must divide the "
                          f"{mini_sequences} sequences of a mini-batch (rl.mini_batch_size × rollout.n)")
    if config.model.seq_block < 0:
        raise ConfigError(f"model.seq_block={config.model.seq_block} must be >= 0 (0: all positions at once)")
    if rl.rollout_is_cap <= 0:
        raise ConfigError(f"rl.rollout_is_cap={rl.rollout_is_cap} must be > 0 (the truncation of the "
                          "importance weights; verl's default is 2)")
    if rl.loss_agg_chunk < 1 or rl.logits_chunk_mib <= 0:
        raise ConfigError(f"rl.loss_agg_chunk={rl.loss_agg_chunk} must be >= 1 and "
                          f"rl.logits_chunk_mib={rl.logits_chunk_mib} positive")
    if num_batch_devices and rl.micro_batch_size > 0 and rl.micro_batch_size % num_batch_devices:
        raise ConfigError(f"rl.micro_batch_size={rl.micro_batch_size} must be a multiple of the "
                          f"{num_batch_devices} devices the batch is split over (mesh data × fsdp)")
    if rl.proposer_update_freq < 0 or config.eval.every < 0:
        raise ConfigError("rl.proposer_update_freq and eval.every must be >= 0 (0 = never / only at the ends)")
    if config.eval.max_prompt_len < 0:
        raise ConfigError("eval.max_prompt_len must be >= 0 (0 = keep every held-out problem)")
    if config.eval.sampled_n < 0 or config.eval.sampled_problems < 0:
        raise ConfigError("eval.sampled_n and eval.sampled_problems must be >= 0 (0 = off / all problems)")
    _validate_toolbox(config)
    if not math.isfinite(config.optim.lr) or config.optim.lr <= 0:
        raise ConfigError(f"optim.lr={config.optim.lr} must be a positive number")


LORA_TARGETS = ("qkv", "o", "gate_up", "down")


def _validate_toolbox(config) -> None:
    """The framework options of issue 17 (all off by default)."""
    rl, lora = config.rl, config.model.lora
    for field in ("rl.clip_eps_low", "rl.clip_eps_high", "rl.gspo_clip_eps_low", "rl.gspo_clip_eps_high"):
        value = _get(config, field)
        if value is not None and not 0 < value < 10:
            raise ConfigError(f"{field}={value} must be a positive clip range (e.g. DAPO: low 0.2, high 0.28)")
    if rl.policy_loss == "gspo" and rl.loss_agg != "seq-mean-token-mean":
        raise ConfigError(f"rl.policy_loss='gspo' averages each sequence's tokens, then the sequences (verl's "
                          f"compute_policy_loss_gspo): set rl.loss_agg='seq-mean-token-mean' (got {rl.loss_agg!r})")
    if rl.filter_zero_variance is False and config.rollout.max_extra_batches:
        raise ConfigError("rollout.max_extra_batches refills groups that rl.filter_zero_variance drops: "
                          "set rl.filter_zero_variance=True, or max_extra_batches=0")
    if config.rollout.max_extra_batches < 0 or config.reward.overlong_buffer < 0:
        raise ConfigError("rollout.max_extra_batches and reward.overlong_buffer must be >= 0 (0 = off)")
    shortest = min(config.rollout.proposer_max_new_tokens, config.rollout.solver_max_new_tokens)
    if config.reward.overlong_buffer >= shortest:
        raise ConfigError(f"reward.overlong_buffer={config.reward.overlong_buffer} must be below every "
                          f"max_new_tokens ({shortest}): the buffer is the last tokens before the limit")
    if lora.rank < 0 or lora.rank and lora.alpha <= 0:
        raise ConfigError(f"model.lora.rank={lora.rank} must be >= 0 (0 = off) and model.lora.alpha positive")
    unknown = sorted(set(t.strip() for t in lora.targets.split(",")) - set(LORA_TARGETS))
    if lora.rank and unknown:
        raise ConfigError(f"model.lora.targets names {unknown}; choose from {list(LORA_TARGETS)} (comma-separated)")
