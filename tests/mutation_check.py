"""Applies one-line bugs to the reward-to-update path one at a time, runs the tests that should catch
each, restores the file, and prints which were caught (issues 13, 14, 17 and 32). Not a test itself:

    python tests/mutation_check.py [NAME ...]     # all of them, or the named ones

Each mutation is (name, file, the exact text, its replacement, the tests to run); a mutation whose
text is no longer in the file is reported as stale rather than silently passing. It edits the files
in place (restored after each): with others at work in the same checkout, run it from a copy of the
tree (`python /copy/tests/mutation_check.py` mutates /copy).
"""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per mutation: far past its tests' time on a busy 2-core machine
ROLLOUT, LEARNER, TRAIN = "sqlm_jax/rollout.py", "sqlm_jax/learner.py", "sqlm_jax/train.py"
EVALUATE = "sqlm_jax/evaluate.py"
E2E = "tests/test_reward_to_update.py"
MODES = "tests/test_rollout.py"
STEP, LOSS = "sqlm_jax/train_step.py", "tests/test_loss_agg.py"
LORA, LORA_TESTS = "sqlm_jax/models/lora.py", "tests/test_lora.py"
RL, REWARDS, DYNAMIC = "sqlm_jax/rl.py", "sqlm_jax/rewards.py", "sqlm_jax/dynamic_sampling.py"
TOOLBOX, ROWS = "tests/test_toolbox_losses.py", "tests/test_dynamic_sampling.py"
SANDBOX, SANDBOX_TESTS = "sqlm_jax/sandbox.py", "tests/test_sandbox.py"
WAVES = "tests/test_sampling.py::test_rows_in_flight_across_waves_and_narrowed_tails"
REFILL = "sqlm_jax/refill.py"
BLOCKS = "tests/test_sampling.py::test_rows_in_flight_on_a_mesh_refill_each_block_and_narrow_its_tail"
PATHS, EVAL_CLI = "tests/test_config_paths.py", "tests/test_evaluate_cli.py"
CHECKPOINTS, CKPT_TESTS = "sqlm_jax/checkpoints.py", "tests/test_run_checkpoints.py"
DAMAGED_AGAIN = CKPT_TESTS + "::test_a_step_damaged_again_is_moved_aside_beside_the_first_copy"

MUTATIONS = [
    ("advantage sign flipped", RL, "broadcast_sequence_advantage(grpo_advantages(rewards, grpo_eps",
     "broadcast_sequence_advantage(-grpo_advantages(rewards, grpo_eps", [E2E + "::test_rewards_advantages_and_first_update_by_hand"]),
    ("GRPO groups misaligned in the learner", RL, "grpo_advantages(rewards, grpo_eps, scale_by_std=scale_by_std)",
     "grpo_advantages(rewards.reshape(rewards.shape[1], -1), grpo_eps, scale_by_std=scale_by_std)",
     [E2E + "::test_rewards_advantages_and_first_update_by_hand"]),
    ("GRPO groups misaligned in the rollout", ROLLOUT, "rewards=proposer_r.reshape(-1, n)",
     "rewards=proposer_r.reshape(n, -1)", [E2E + "::test_rewards_advantages_and_first_update_by_hand"]),
    ("row mask dropped", LEARNER, "mask = response_mask & row_mask[:, None]", "mask = response_mask",
     [E2E + "::test_gae_places_the_outcome_on_the_last_token_and_whitens_the_rows_in_the_loss"]),
    ("invalid questions' solver rewards not zeroed", ROLLOUT,
     "solver_r, proposer_r = solver_r * valid[:, None], proposer_r * valid", "pass", [MODES]),
    ("invalid answers kept in the solver loss", ROLLOUT, "row_mask=np.repeat(valid, n)",
     "row_mask=np.repeat(np.ones_like(valid), n)", [MODES]),
    ("invalid_proposals='mask' ignored", ROLLOUT,
     'keep = valid if self.config.reward.invalid_proposals == "mask" else np.ones_like(valid)',
     "keep = np.ones_like(valid)", [MODES]),
    ("invalid_proposals='reference' treated as strict", ROLLOUT,
     'if self.config.reward.invalid_proposals == "reference":', "if False:", [MODES]),
    ("long solver prompts not truncated", ROLLOUT, "return [p[-limit:] for p in", "return [p for p in", [MODES]),
    ("the empty program run for a response without one", ROLLOUT,
     "if p is not None and len(tests[i // n])]", "if len(tests[i // n])]", [MODES]),
    ("GAE outcome on the first response token", "sqlm_jax/rl.py",
     "last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)", "last = jnp.zeros(mask.shape[0], jnp.int32)",
     [E2E + "::test_gae_places_the_outcome_on_the_last_token_and_whitens_the_rows_in_the_loss"]),
    ("reference log-probs from the current policy", LEARNER,
     "ref = zeros if ref_params is None else logprobs(ref_params, self.reference_graphdef)",
     "ref = zeros if ref_params is None else logprobs(params)",
     [E2E + "::test_rewards_advantages_and_first_update_by_hand"]),
    ("critic trained on proposals only on proposer steps", TRAIN,
     "trained = [role for role in rollouts if actor[role] or has_critic]",
     "trained = [role for role in rollouts if actor[role]]",
     ["tests/test_train.py::test_critic_trains_on_the_proposer_batch_every_step"]),
    ("critic on the solver batch before the proposer's", TRAIN,
     'for role in ("proposer", "solver"):\n                if has_critic',
     'for role in ("solver", "proposer"):\n                if has_critic',
     ["tests/test_train.py::test_critic_trains_on_the_proposer_batch_every_step"]),
    ("overlong held-out prompts kept", EVALUATE, "if length <= max_len]", "]",
     ["tests/test_evaluate_cli.py::test_overlong_heldout_prompts_are_dropped_and_counted"]),
    ("KL term's sign flipped", STEP, "total = total + loss_cfg.kl_coef * rl.masked_sum(kl * weights, mask)",
     "total = total - loss_cfg.kl_coef * rl.masked_sum(kl * weights, mask)", [LOSS]),
    ("entropy bonus's sign flipped", STEP, "total = pg - loss_cfg.entropy_coef * rl.masked_sum(entropy * weights, mask)",
     "total = pg + loss_cfg.entropy_coef * rl.masked_sum(entropy * weights, mask)", [LOSS]),
    ("an update with no token in the loss applied", STEP, "    applied = finite & signal", "    applied = finite",
     ["tests/test_train_step.py::test_a_mini_batch_with_no_tokens_makes_no_update"]),
    ("gradient clipping removed", STEP, "        optax.clip_by_global_norm(optim_cfg.grad_clip),\n", "", [LOSS]),
    ("kl_coef forced to 0 in LossConfig.from_config", STEP, "kl_coef=rl_cfg.kl_coef,", "kl_coef=0.0,", [LOSS]),
    ("k3's inner clamp dropped", "sqlm_jax/rl.py", "d = jnp.clip(-diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)",
     "d = -diff", [LOSS]),
    ("reference loss chunks ignored (one token mean)", STEP, "return m / (jnp.maximum(chunk_tokens, 1.0) * chunks)[:, None]",
     "return m / jnp.maximum(m.sum(), 1.0)", [LOSS]),
    ("chunked logits' last chunk misaligned", STEP, "merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, parts * c)[:, :r]",
     "merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, parts * c)[:, -r:]", ["tests/test_chunked_loss.py"]),
    ("dataset pool includes held-out problems", ROLLOUT, "for q, truth in problems if q.text not in heldout]",
     "for q, truth in problems]", [MODES + "::test_dataset_pool_leaves_out_the_heldout_problems"]),
    # LoRA (models/lora.py and what uses it)
    ("LoRA scale dropped", LORA, "low = (x @ self.a[...].astype(x.dtype).reshape(-1, r)) * self.scale",
     "low = x @ self.a[...].astype(x.dtype).reshape(-1, r)", [LORA_TESTS + "::test_adapter_by_hand"]),
    ("LoRA B initialised at random", LORA, "self.b = nnx.LoRAParam(jnp.zeros(", "self.b = nnx.LoRAParam(jnp.ones(",
     [LORA_TESTS + "::test_adapted_model_starts_as_its_base_and_exports_merged"]),
    ("o adapter not applied", "sqlm_jax/models/transformer.py", "projected = projected + self.lora_o(out)",
     "projected = projected", [LORA_TESTS + "::test_adapted_model_starts_as_its_base_and_exports_merged"]),
    ("export without merging the adapters", "sqlm_jax/models/hf.py", "value = adapters[rule.ours].merged(value)",
     "pass", [LORA_TESTS + "::test_adapted_model_starts_as_its_base_and_exports_merged"]),
    ("LoRA reference log-probs from the adapted policy", LEARNER,
     "ref = zeros if ref_params is None else logprobs(ref_params, self.reference_graphdef)",
     "ref = zeros if ref_params is None else logprobs(params)",
     [LORA_TESTS + "::test_lora_trains_the_adapters_against_the_base"]),
    ("LoRA reference a copy of the base", LEARNER, "self.ref_params = self.frozen if c.rl.use_kl else None",
     "self.ref_params = jax.tree.map(jnp.copy, self.frozen) if c.rl.use_kl else None",
     [LORA_TESTS + "::test_lora_trains_the_adapters_against_the_base"]),
    ("plan: LoRA optimizer state as full fine-tuning's", "sqlm_jax/plan/__init__.py", "trained = adapters if spec.rank else weights",
     "trained = weights", ["tests/test_plan.py::test_lora_update_trains_the_adapters_alone"]),
    # issue 17: the toolbox
    ("clip-higher's upper range ignored", RL, "high = clip_eps if clip_eps_high is None else clip_eps_high",
     "high = clip_eps", [TOOLBOX]),
    ("clip-higher's ranges swapped", RL, "jnp.clip(ratio, 1.0 - low, 1.0 + high)", "jnp.clip(ratio, 1.0 - high, 1.0 + low)",
     [TOOLBOX]),
    ("clip_eps_high dropped in LossConfig.from_config", STEP, "clip_eps_high=rl_cfg.clip_eps_high,",
     "clip_eps_high=None,", [TOOLBOX]),
    ("GSPO ratio per token, not per sequence", RL, "+ jax.lax.stop_gradient(sequence), _GSPO_LOG_CLAMP)",
     "+ jax.lax.stop_gradient(log_ratio), _GSPO_LOG_CLAMP)", [TOOLBOX]),
    ("GSPO sequence ratio not stop-gradient", RL, "+ jax.lax.stop_gradient(sequence), _GSPO_LOG_CLAMP)",
     "+ sequence, _GSPO_LOG_CLAMP)", [TOOLBOX]),
    ("GSPO log-ratio clamp dropped", RL, "jax.lax.stop_gradient(sequence), _GSPO_LOG_CLAMP)",
     "jax.lax.stop_gradient(sequence), jnp.inf)", [TOOLBOX]),
    ("GSPO clip range swapped", RL, "jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)",
     "jnp.clip(ratio, 1.0 - clip_eps_high, 1.0 + clip_eps_low)", [TOOLBOX]),
    ("rl.policy_loss='gspo' ignored", STEP, 'if loss_cfg.policy_loss == "gspo":', "if False:", [TOOLBOX]),
    ("GSPO's aggregation not checked", "sqlm_jax/config_check.py",
     'if rl.policy_loss == "gspo" and rl.loss_agg != "seq-mean-token-mean":', "if False:", [TOOLBOX]),
    ("RLOO computed as GRPO", RL, "broadcast_sequence_advantage(rloo_advantages(rewards)",
     "broadcast_sequence_advantage(grpo_advantages(rewards)", [TOOLBOX, ROWS + "::test_the_learner_uses_the_chosen_estimator"]),
    ("Dr. GRPO flag ignored in rl", RL, "grpo_eps, scale_by_std=scale_by_std)", "grpo_eps, scale_by_std=True)", [TOOLBOX]),
    ("Dr. GRPO flag not passed by the learner", LEARNER, "scale_by_std=rl_cfg.grpo_scale_by_std",
     "scale_by_std=True", [ROWS + "::test_the_learner_uses_the_chosen_estimator"]),
    ("REINFORCE++ gamma dropped", RL, "reinforce_pp_advantages(outcome, mask, gamma)",
     "reinforce_pp_advantages(outcome, mask)", [TOOLBOX]),
    ("overlong penalty's sign flipped", REWARDS, "jnp.minimum(-exceed / buffer * penalty, 0.0)",
     "jnp.minimum(exceed / buffer * penalty, 0.0)", [TOOLBOX]),
    ("overlong penalty against the solver's limit for both roles", ROLLOUT,
     'limit = (self.proposer_params if role == "proposer" else self.solver_params).max_new_tokens',
     "limit = self.solver_params.max_new_tokens", [ROWS]),
    ("rl.mask_truncated ignored", ROLLOUT, "row_mask = row_mask & ~cut", "row_mask = row_mask", [ROWS]),
    ("a response stopped at the limit counted as cut", ROLLOUT, "len(t) == max_new_tokens and t[-1] not in stop_ids",
     "len(t) == max_new_tokens", [ROWS]),
    ("zero variance as any equal pair", REWARDS, "jnp.all(rewards == rewards[:, :1], axis=-1)",
     "jnp.any(rewards == rewards[:, :1], axis=-1)", [TOOLBOX]),
    ("dropped groups kept in the loss", DYNAMIC, "rows[role] = r._replace(row_mask=r.row_mask & ~np.repeat(dropped, n))",
     "rows[role] = r", [ROWS]),
    ("places refilled last first", DYNAMIC, "sources[role][holes[role].pop(0)]", "sources[role][holes[role].pop()]",
     [ROWS]),
    ("one round past the budget", DYNAMIC, "range(1, c.rollout.max_extra_batches + 1)",
     "range(1, c.rollout.max_extra_batches + 2)", [ROWS]),
    ("extra rounds for roles not trained", DYNAMIC, "wanting = [role for role in trained if holes.get(role)]",
     "wanting = [role for role in holes if holes[role]]", [ROWS]),
    ("extra rounds reuse the step's seeds", DYNAMIC, "rollouts.questions(policy, step, extra=extra)",
     "rollouts.questions(policy, step, extra=0)", [ROWS]),
    ("refilled prompts not moved with their answers", DYNAMIC,
     "np.concatenate([left(getattr(s, f), fill) for s in samples])[index]",
     "np.concatenate([left(getattr(s, f), fill) for s in samples])[:len(index)]", [ROWS]),
    ("a narrowed tail keeps the idle slots", "sqlm_jax/refill.py", "jnp.argsort(~s.active, axis=1, stable=True)",
     "jnp.argsort(s.active, axis=1, stable=True)", [WAVES]),
    ("a narrowed tail loses its slots' caches", "sqlm_jax/refill.py",
     "cache = cache_axes([LayerCache(slots(c.k), slots(c.v)) for c in s.cache])",
     "cache = cache_axes([LayerCache(c.k[:d * narrow], c.v[:d * narrow]) for c in s.cache])", [WAVES]),
    ("sandbox environment not scrubbed", SANDBOX, "cwd=cwd, env=_SANDBOX_ENV, start_new_session=True)",
     "cwd=cwd, env={**os.environ, **_SANDBOX_ENV}, start_new_session=True)",
     [SANDBOX_TESTS + "::test_environment_secret_is_not_visible"]),
    ("--die-with-parent removed", SANDBOX, '"--unshare-cgroup-try", "--die-with-parent", "--new-session"]',
     '"--unshare-cgroup-try", "--new-session"]', [SANDBOX_TESTS + "::test_sandbox_dies_with_the_trainer"]),
    # The cross-host reduction is XLA's, from the shardings; a host whose gradient counts twice is its
    # one-line stand-in (what a reduction that doubled or lost a host's rows does to the update).
    ("one host's gradient counted twice", STEP, "updates, opt_state = tx.update(grads, state.opt_state, state.params)",
     "updates, opt_state = tx.update(jax.tree.map(lambda g: g * (1 + jax.process_index()), grads), "
     "state.opt_state, state.params)", ["tests/test_distributed.py::test_two_processes_match_one_process"]),
    ("the update never applied", STEP, "params = optax.apply_updates(state.params, updates)",
     "params = state.params", ["tests/test_train.py::test_resume_is_bit_for_bit"]),
    ("the step trains on the unfiltered rows", TRAIN, "self.learner.batch(*rows[role]) for role in trained",
     "self.learner.batch(r.sample, r.row_mask, r.rewards) for role, r in rollouts.items() if role in trained",
     [ROWS + "::test_self_play_step_trains_on_the_filtered_rows"]),
    # issue 32: config fields that must reach the code they name
    ("model.lora.targets ignored by the config", LORA,
     'targets=tuple(t.strip() for t in lora_cfg.targets.split(",") if t.strip()))', "targets=tuple(TARGETS))",
     [LORA_TESTS + "::test_lora_targets_choose_the_adapted_projections",
      PATHS + "::test_the_field_reaches_the_trainer"]),
    ("model.lora.targets ignored when attaching", LORA, "        for target in spec.targets:",
     "        for target in TARGETS:", [LORA_TESTS + "::test_lora_targets_choose_the_adapted_projections"]),
    ("reward.code_timeout_s not passed to the sandbox", ROLLOUT,
     "workers=c.sandbox_workers or None, timeout_s=c.code_timeout_s,", "workers=c.sandbox_workers or None,",
     [MODES + "::test_code_timeout_reaches_the_sandbox"]),
    ("rl.critic_lr ignored (the critic at the policy's rate)", LEARNER, '{**c.optim, "lr": c.rl.critic_lr}',
     "{**c.optim}", [E2E + "::test_the_critic_learns_at_its_own_rate"]),
    ("rl.gamma not passed by the learner", LEARNER, "gamma=rl_cfg.gamma, lam=rl_cfg.lam)",
     "gamma=1.0, lam=rl_cfg.lam)", [E2E + "::test_gae_discounts_with_the_configs_gamma_and_lambda"]),
    ("rl.lam not passed by the learner", LEARNER, "gamma=rl_cfg.gamma, lam=rl_cfg.lam)",
     "gamma=rl_cfg.gamma, lam=1.0)", [E2E + "::test_gae_discounts_with_the_configs_gamma_and_lambda"]),
    ("gamma and lam dropped in compute_advantages", RL, "return gae_advantages(outcome, values, mask, gamma, lam)",
     "return gae_advantages(outcome, values, mask)", [E2E + "::test_gae_discounts_with_the_configs_gamma_and_lambda"]),
    ("rl.ppo_epochs left out of the schedule's length", LEARNER,
     "return int(c.train.steps * c.rl.ppo_epochs * (solver + proposer)) + 1",
     "return int(c.train.steps * (solver + proposer)) + 1", [PATHS + "::test_a_run_lasts_its_updates_epochs_included"]),
    ("rl.grpo_eps not passed by the learner", LEARNER, "grpo_eps=rl_cfg.grpo_eps,", "grpo_eps=1e-6,",
     [ROWS + "::test_the_learner_uses_the_chosen_estimator"]),
    # issue 32: values where the bug would hide
    ("LoRA scale alpha / sqrt(r)", LORA, "self.scale = spec.alpha / r", "self.scale = spec.alpha / math.sqrt(r)",
     [LORA_TESTS + "::test_adapter_scale_is_alpha_over_rank_at_rank_4"]),
    ("bootstrap interval at 90%", EVALUATE, "level: float = 0.95", "level: float = 0.90",
     [EVAL_CLI + "::test_bootstrap_interval_is_the_95_percent_one"]),
    ("bootstrap interval's quantiles one-sided", EVALUATE, "[(1 - level) / 2, (1 + level) / 2]",
     "[1 - level, level]", [EVAL_CLI + "::test_bootstrap_interval_is_the_95_percent_one"]),
    ("eval.sampled_problems=0 samples no problem", EVALUATE, "problems[:eval_cfg.sampled_problems or None]",
     "problems[:eval_cfg.sampled_problems]", [EVAL_CLI + "::test_sampled_evaluation_covers_eval_sampled_problems"]),
    # issue 32: slot refill on a mesh of several row blocks
    ("a block narrows while another has rows in flight", REFILL, "jnp.all(s.active.sum(axis=1) <= narrow)",
     "jnp.any(s.active.sum(axis=1) <= narrow)", [BLOCKS]),
    ("a block's next row counted over every block", REFILL, "pending=s.pending + take.sum(axis=1, dtype=jnp.int32)",
     "pending=s.pending + take.sum(dtype=jnp.int32)", [BLOCKS]),
    ("every block's rows draw block 0's streams", REFILL,
     "offset = per_block * n * jnp.arange(d, dtype=jnp.int32) + index * g * n",
     "offset = 0 * jnp.arange(d, dtype=jnp.int32) + index * g * n", [BLOCKS]),
    # issue 32: dynamic sampling's bookkeeping
    ("invalid questions counted as dropped and refilled", DYNAMIC, "dropped = _in_loss(r, n) & _zero_variance(r)",
     "dropped = _zero_variance(r)", [ROWS + "::test_invalid_questions_are_neither_dropped_nor_refilled"]),
    ("extra rounds' proposer tokens not counted", DYNAMIC,
     "extra_tokens += proposer.generated_tokens + solver.generated_tokens",
     "extra_tokens += solver.generated_tokens",
     [ROWS + "::test_dropped_groups_refilled_in_order_within_the_budget",
      ROWS + "::test_throughput_counts_the_extra_rounds_tokens"]),
    ("extra rounds' tokens left out of the throughput", TRAIN,
     "tokens = solver.generated_tokens + proposer.generated_tokens + extra_tokens",
     "tokens = solver.generated_tokens + proposer.generated_tokens",
     [ROWS + "::test_throughput_counts_the_extra_rounds_tokens"]),
    # issue 32: the rest
    ("a damaged copy overwritten by the next", CHECKPOINTS, "while target.exists():  # never overwrite",
     "while False:  # never overwrite", [DAMAGED_AGAIN]),
    ("a third damaged copy onto the second", CHECKPOINTS, "while target.exists():  # never overwrite",
     "if target.exists():  # never overwrite", [DAMAGED_AGAIN]),
    ("safetensors shard past its cap", "sqlm_jax/models/hf.py", "if current and size + array.nbytes > max_shard_bytes:",
     "if current and size > max_shard_bytes:",
     ["tests/test_models.py::test_exported_shards_stay_under_the_cap_and_are_filled_in_order"]),
    ("plan: critic without its optimizer moments", "sqlm_jax/plan/__init__.py", 'Row("critic", "resident", 3 * weights,',
     'Row("critic", "resident", 1 * weights,', ["tests/test_plan_critic.py"]),
    ("plan: no critic row", "sqlm_jax/plan/__init__.py", 'if config.rl.advantage == "gae":\n        rows.append(Row("critic"',
     'if False:\n        rows.append(Row("critic"', ["tests/test_plan_critic.py"]),
    ("a row's steps share one draw", "sqlm_jax/sampling.py",
     "step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(steps, keys.shape))", "step_keys = keys",
     ["tests/test_sampling.py::test_each_step_draws_fresh_randomness"]),
    ("a full disk's writer reports on the console", CHECKPOINTS, 'if os.environ.get("SQLM_JAX_DEBUG"):  #',
     "if True:  #", [CKPT_TESTS + "::test_a_run_on_a_full_disk_ends_with_one_error_line"]),
    # issue 32, item 2: more config fields on their way to the code (tests/test_config_paths.py)
    ("model.remat not passed to the model", TRAIN, "compute_dtype=c.model.compute_dtype, remat=c.model.remat)",
     "compute_dtype=c.model.compute_dtype, remat=False)", [PATHS + "::test_the_field_reaches_the_trainer"]),
    ("checkpoint.keep ignored", TRAIN, "Checkpointer(self.workdir.checkpoints, keep=c.checkpoint.keep)",
     "Checkpointer(self.workdir.checkpoints, keep=3)", [PATHS + "::test_the_field_reaches_the_trainer"]),
    ("rollout.top_p ignored", ROLLOUT, "top_p=float(r.top_p)", "top_p=1.0",
     [PATHS + "::test_the_field_reaches_the_trainer"]),
    ("rollout.rows_in_flight ignored", ROLLOUT, "rows_in_flight=int(r.rows_in_flight))", "rows_in_flight=0)",
     [PATHS + "::test_the_field_reaches_the_trainer"]),
    ("eval.seed ignored", TRAIN, "heldout = self.task.heldout_problems(c.eval.num_problems, c.eval.seed)",
     "heldout = self.task.heldout_problems(c.eval.num_problems, 1234)",
     [PATHS + "::test_the_heldout_set_is_the_configs"]),
    ("optim.b2 ignored", STEP, "b2=optim_cfg.b2,", "b2=0.999,", [PATHS + "::test_adamw_of_every_optim_field_by_hand"]),
    ("optim.warmup_steps ignored by the cosine schedule", STEP,
     "warmup_cosine_decay_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps,",
     "warmup_cosine_decay_schedule(0.0, optim_cfg.lr, 0,",
     [PATHS + "::test_schedule_and_warmup_set_each_updates_rate"]),
    ("rl.entropy_coef dropped in LossConfig.from_config", STEP, "entropy_coef=rl_cfg.entropy_coef,",
     "entropy_coef=0.0,", [PATHS + "::test_loss_knobs_reach_the_loss_config"]),
    ("rl.loss_agg_chunk ignored", STEP, "chunk=rl_cfg.loss_agg_chunk)", "chunk=8)",
     [PATHS + "::test_loss_knobs_reach_the_loss_config"]),
    ("rl.shared_prompt_pass ignored", LEARNER, "if not self.config.rl.shared_prompt_pass:", "if False:",
     [PATHS + "::test_the_field_reaches_the_trainer"]),
    ("reward.sandbox_workers ignored", ROLLOUT, "workers=c.sandbox_workers or None,", "workers=None,",
     [MODES + "::test_code_timeout_reaches_the_sandbox"]),
    # Issues 29 and 30: remat is a memory knob; rows, not widths, split over a TPU slice.
    ("remat drops the shared prefix", "sqlm_jax/models/transformer.py",
     "_run_layer(nnx.merge(graphdef, state), rows, *args))(state, *args)",
     "_run_layer(nnx.merge(graphdef, state), rows, *args[:-1], None))(state, *args)", ["tests/test_remat.py"]),
    ("activations not pinned to their rows", "sqlm_jax/models/transformer.py",
     "rows = lambda x: mesh_lib.constrain_rows(x, self.row_mesh)", "rows = lambda x: x", ["tests/test_aot.py"]),
    ("load_pretrained leaves the rows to XLA", "sqlm_jax/models/hf.py", "model.row_mesh = mesh", "model.row_mesh = None",
     ["tests/test_sampling.py::test_rows_are_pinned_to_the_mesh"]),
    # Issue 30: the algebra setting on a v5e-8.
    ("query blocks keep every block's scores", "sqlm_jax/models/attention.py",
     "one_block = jax.checkpoint(lambda qm:", "one_block = (lambda qm:", ["tests/test_seq_blocks.py"]),
    ("query blocks' padding sees the last block's keys", "sqlm_jax/models/attention.py",
     "mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))", "mask = jnp.pad(mask, ((0, 0), (pad, 0), (0, 0)))",
     ["tests/test_seq_blocks.py"]),
    ("the MLP's blocks keep every block's activations", "sqlm_jax/models/transformer.py",
     "out = jax.lax.map(jax.checkpoint(lambda x: project", "out = jax.lax.map((lambda x: project",
     ["tests/test_seq_blocks.py"]),
    ("the MLP's blocks padded at the front", "sqlm_jax/models/transformer.py",
     "x = jnp.pad(x, ((0, 0), (0, blocks * block - t), (0, 0)))", "x = jnp.pad(x, ((0, 0), (blocks * block - t, 0), (0, 0)))",
     ["tests/test_seq_blocks.py"]),
    ("prompt-pass pieces written at the first prompt", "sqlm_jax/prompt_pass.py",
     "part.reshape((d, c) + part.shape[1:]), i * c, 1)", "part.reshape((d, c) + part.shape[1:]), 0, 1)",
     ["tests/test_sampling.py::test_the_prompt_pass_in_pieces_samples_the_same"]),
    ("the critic stays on the devices while sampling", LEARNER,
     "            self.critic_state = move(self.critic_state)", "            pass", ["tests/test_offload.py"]),
    ("the plan counts offloaded buffers while sampling", "sqlm_jax/plan/__init__.py",
     'if r.phase == "resident" and not (r.offloaded and phase == "sampling"))', 'if r.phase == "resident")',
     ["tests/test_plan_critic.py"]),
    ("the auto knobs ignore the TPU compiler", "sqlm_jax/auto_knobs.py", "        if compiled is None:",
     "        if True:", ["tests/test_plan.py::test_auto_knobs_with_the_compiler_as_judge_compile_few_candidates"]),
    ("the compiled search tries every candidate", "sqlm_jax/auto_knobs.py",
     "if predicted(plan_of(i)) <= limit), None)", "if True), None)",
     ["tests/test_plan.py::test_auto_knobs_with_the_compiler_as_judge_compile_few_candidates"]),
    ("the compiled search scales by the last figure alone", "sqlm_jax/auto_knobs.py",
     "return y1 + (x - x1) * (slope if slope > 0 else 1.0)", "return x * y1 / x1",
     ["tests/test_plan.py::test_auto_knobs_with_the_compiler_as_judge_compile_few_candidates"]),
    ("the compiled search keeps a miss as its answer", "sqlm_jax/auto_knobs.py",
     "fits, over = (guess, over) if seen[-1][1] <= limit else (fits, guess)", "fits, over = guess, over",
     ["tests/test_plan.py::test_auto_knobs_with_the_compiler_as_judge_compile_few_candidates"]),
    ("a TPU run refused by the plan alone", TRAIN, "        if judge is None:", "        if True:",
     ["tests/test_train.py::test_on_tpu_the_compiler_sets_the_auto_knobs_and_refuses_what_it_cannot_hold"]),
    ("the compiled programs kept under the whole config", "sqlm_jax/aot.py",
     "    return c.to_json_best_effort(sort_keys=True)", "    return config.to_json_best_effort(sort_keys=True)",
     ["tests/test_aot.py::test_the_tpu_compiler_judges_the_auto_micro_batch"]),
    ("the critic stays on the devices beside the policy's update", LEARNER,
     '            with self._other_away("critic"):', "            with contextlib.nullcontext():",
     ["tests/test_offload.py::test_the_other_models_state_waits_in_host_memory_while_one_updates"]),
    ("the compiled report counts the critic beside the policy's update", "sqlm_jax/aot.py",
     'AWAY_IN_UPDATE = {"policy update": ("critic state",),', 'AWAY_IN_UPDATE = {"policy update": (),',
     ["tests/test_aot.py::test_with_a_critic_the_other_models_state_is_not_beside_an_update"]),
    ("a deviceless knob search compiles in one process", "sqlm_jax/aot.py",
     "        if self.accelerator is not None:", "        if False:",
     ["tests/test_aot.py::test_a_slice_this_host_lacks_compiles_each_program_in_a_process_of_its_own"]),
    ("the step time drops a mini-batch's extra micro-batches", "sqlm_jax/step_time.py",
     "(minis * (micro - 1), ", "(minis * micro, ",
     ["tests/test_step_time.py::test_the_step_multiplies_each_piece_by_its_trip_count_and_schedule"]),
    ("the step time extrapolates depth from zero layers", "sqlm_jax/step_time.py",
     "steps = (depth - DEPTHS[0]) / (DEPTHS[1] - DEPTHS[0])", "steps = depth / (DEPTHS[1] - DEPTHS[0])",
     ["tests/test_step_time.py::test_one_layers_cost_extrapolates_to_a_deeper_model"]),
    ("a decode step's ideal reads no cache", "sqlm_jax/step_time.py",
     "ideal_step = (weights + live_kv) / self.chip[1]", "ideal_step = weights / self.chip[1]",
     ["tests/test_step_time.py::test_a_decode_steps_ideal_reads_the_chips_share_of_weights_and_live_cache_once"]),
    ("rollout IS weights never applied", LEARNER, "        if correcting:", "        if False:",
     [E2E + "::test_rollout_is_weights_the_advantages_by_the_trainers_over_the_samplers_odds"]),
    ("rollout IS keeps the sampler's old log-probs", LEARNER,
     "if sampler_logprobs is None or correcting", "if sampler_logprobs is None",
     [E2E + "::test_rollout_is_weights_the_advantages_by_the_trainers_over_the_samplers_odds"]),
    ("rollout IS ratio inverted", "sqlm_jax/rollout_is.py", "old_logp - sampler_logp", "sampler_logp - old_logp",
     ["tests/test_rollout_is.py"]),
]


def check(name, file, old, new, tests) -> str:
    path = ROOT / file
    text = path.read_text()
    if text.count(old) != 1:
        return "stale (text not found once)"
    path.write_text(text.replace(old, new))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a bug that loops forever is caught too
        return f"caught (hung past {TIMEOUT_S} s)"
    finally:
        path.write_text(text)
    return "caught" if run.returncode else "NOT CAUGHT"


if __name__ == "__main__":
    wanted = set(sys.argv[1:])
    for name, file, old, new, tests in MUTATIONS:
        if wanted and name not in wanted:
            continue
        start = time.time()
        print(f"{check(name, file, old, new, tests):>28}  {name}  ({time.time() - start:.0f} s)", flush=True)
