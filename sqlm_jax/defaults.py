"""The base experiment config: every knob a run has, with the SQLM reference values as defaults.

Experiment files in configs/ start from `base_config()` and change what differs. Any field can be set
from the command line: `--config.rl.kl_coef=0.01`.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "arithmetic"  # arithmetic | algebra | coding (sqlm_jax.tasks.get_task)
    # Passed to get_task; None keeps the task's reference default.
    c.task_options = ml_collections.ConfigDict({
        "proposer_prompt": placeholder(str),
        "solver_instruction": placeholder(str),
        "normalize_answers": False,      # reference: integers compared as exact strings
        "data_path": placeholder(str),  # local eval set file
        "dataset": placeholder(str),    # hub dataset id (online)
    })
    c.workdir = "runs/default"  # logs, checkpoints, exports (local path or gs://)
    # With a gs:// workdir: the local folder where logs are written before they are copied up.
    c.workdir_mirror = placeholder(str)
    c.seed = 0
    c.resume = False  # continue from the latest checkpoint in workdir

    # Multi-host: on a TPU pod slice the workers find each other; elsewhere name the coordinator
    # (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
    c.distributed = ml_collections.ConfigDict({
        "coordinator_address": placeholder(str),  # "10.0.0.2:1234"
        "num_processes": placeholder(int),
        "process_id": placeholder(int),
        "cpu_collectives": "gloo",   # collectives between CPU hosts ("" to leave JAX's default)
    })

    c.model = ml_collections.ConfigDict({
        "path": "Qwen/Qwen2.5-3B-Instruct",  # HF hub id or local folder
        "param_dtype": "float32",
        "compute_dtype": "float32",  # bfloat16 on TPU/GPU
        "remat": False,              # recompute each layer in the backward pass (saves memory)
        # Long passes (the update, the log-prob passes) run each row's positions this many at a time
        # through attention's queries and the MLP, each block recomputed in the backward pass, so only
        # one block's scores and MLP activations are alive: memory only, the same results; 0 = all at once.
        "seq_block": 256,
        # Attention in passes over many positions (prompt passes, log-prob passes, the update): "splash",
        # the Pallas kernel that keeps its scores in on-chip memory (TPU; elsewhere its interpreter, for
        # tests only); "xla", scores in memory a query block at a time; "auto": splash on TPU, else xla.
        # The same results to float rounding; decoding's one position per row is always "xla".
        "attention": "auto",
        # LoRA (Hu et al. 2021): rank 0 = full fine-tuning (the reference). rank > 0 trains low-rank
        # adapters on the named projections only; the frozen base is the KL reference (no second copy).
        "lora": ml_collections.ConfigDict({
            "rank": 0,
            "alpha": 16.0,           # adapter output scaled by alpha / rank
            "targets": "qkv,o,gate_up,down",  # comma-separated: attention qkv, o; MLP gate_up, down
        }),
    })
    # Mesh axis sizes; -1 takes the devices left over. Batch splits over data×fsdp, weights over fsdp×tensor.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.rollout = ml_collections.ConfigDict({
        "batch_size": 64,            # B: proposer prompt rows per step
        "n": 4,                      # proposals per row, and answers per question
        "max_prompt_len": 512,
        "proposer_max_new_tokens": 1024,
        "solver_max_new_tokens": 1024,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,                  # 0 = no top-k
        # Rows the sampler decodes at once, slots refilled as rows stop (memory knob; never changes a
        # token): 0 = every row of a call at once, -1 = auto (the largest that fits, from the plan).
        "rows_in_flight": 0,
        # The optimizer states and the reference weights wait in host memory while the samplers run,
        # back on the devices for the log-prob passes and the updates (memory knob; jax memory kinds).
        "offload_to_host": False,
        # online (the method) | pregenerated (ablation: a pool proposed by the base model at step 0) |
        # dataset (the task's training problems, never held-out ones: labelled RL with
        # reward.kind=ground_truth, TTRL-style with the majority vote); the proposer is trained only online.
        "question_source": "online",
        "pregenerated_questions": 1024,  # size of the fixed pool (pregenerated and dataset)
        "dataset_path": placeholder(str),  # dataset: a file of labelled questions (None: the task's generator)
        "dataset_seed": 4321,        # dataset: draws the pool (held-out problems are removed from it)
        # Dynamic sampling (DAPO; needs rl.filter_zero_variance): extra rounds of questions a step may
        # sample to refill the groups dropped for zero reward variance (0 = none; never loops past it).
        "max_extra_batches": 0,
    })
    c.reward = ml_collections.ConfigDict({
        # auto (task's own: majority or unit_tests) | majority | format | ground_truth (labels of dataset questions)
        "kind": "auto",
        "k_min": 2,                  # proposer band k_min <= k < n (reference: k > 1)
        # reference (every proposal asks its task.reference_question, rewarded as usual) | keep (strict
        # parse: invalid ones get reward 0 and stay in the proposer loss, their answers leave the
        # solver's) | mask (as keep, and they also leave the proposer loss)
        "invalid_proposals": "reference",
        "code_timeout_s": 10.0,
        "sandbox_workers": 0,        # 0 = one per core
        "allow_unisolated_sandbox": False,
        # Soft overlong punishment (DAPO): the last overlong_buffer tokens before a role's
        # max_new_tokens cost up to overlong_penalty, linearly (0 = off, the reference).
        "overlong_buffer": 0,
        "overlong_penalty": 1.0,
    })
    c.rl = ml_collections.ConfigDict({
        # grpo | gae (with a critic, the reference for coding) | rloo (leave-one-out baseline) |
        # reinforce_pp (REINFORCE++: returns whitened over the batch)
        "advantage": "grpo",
        "grpo_eps": 1e-6,
        "grpo_scale_by_std": True,   # False: Dr. GRPO (rewards minus the group mean, no std division)
        "clip_eps": 0.2,
        # Clip-higher (DAPO): separate lower / upper clip ranges of the ratio; None = clip_eps.
        "clip_eps_low": placeholder(float),
        "clip_eps_high": placeholder(float),
        # ppo (token-level ratio, the reference) | gspo (GSPO: the sequence-level ratio, a length-normalised
        # geometric mean, clipped to [1 - gspo_clip_eps_low, 1 + gspo_clip_eps_high])
        "policy_loss": "ppo",
        "gspo_clip_eps_low": 3e-4,
        "gspo_clip_eps_high": 4e-4,
        # Dynamic sampling (DAPO): groups whose n rewards are all equal leave the update, per role; a
        # mini-batch with no row left makes no optimizer step (metric ROLE/no_signal; train_step).
        "filter_zero_variance": False,
        "mask_truncated": False,     # overlong filtering (DAPO): responses cut at max_new_tokens leave the loss
        "dual_clip_c": 3.0,
        "entropy_coef": 0.0,
        "use_kl": True,
        "kl_coef": 0.001,
        "kl_kind": "k3",             # k1 | k2 | k3 (verl's low_var_kl, clamped to ±10)
        "ppo_epochs": 1,
        "mini_batch_size": 32,       # prompt rows per optimizer update (× n sequences)
        # Sequences per gradient-accumulation step (memory knob only). -1 = auto: the largest that fits
        # the devices, from the plan (sqlm_jax.auto_knobs); the loss never depends on it.
        "micro_batch_size": 16,
        # How per-token losses become a mini-batch's loss (train_step.loss_weights): reference (token
        # mean within fixed chunks of loss_agg_chunk sequences, averaged over chunks, as verl's
        # micro-batches of 8) | token-mean (one over the mini-batch) | seq-mean-token-mean |
        # seq-mean-token-sum (Dr. GRPO's). Fixed chunks: the memory micro-batch never changes the loss.
        "loss_agg": "reference",
        "loss_agg_chunk": 8,
        "logits_chunk_mib": 128.0,   # MiB of float32 logits the loss builds at once (memory knob only)
        # Speed knobs; neither changes the loss. shared_prompt_pass: the samples of one prompt share one
        # pass over it in the update and the log-prob passes. reuse_sampler_logprobs: the old log-probs
        # are the sampler's own (same weights) instead of a forward pass, when sampling at temperature
        # 1 without top-k / top-p.
        "shared_prompt_pass": True,
        "reuse_sampler_logprobs": True,
        # Truncated importance sampling toward the sampler's distribution (sqlm_jax.rollout_is): off |
        # token | sequence. On: the old log-probs are the trainer's own pass (never the sampler's) and
        # each token's policy-gradient loss is weighted by min(π_train / π_sampler, rollout_is_cap).
        "rollout_is": "off",
        "rollout_is_cap": 2.0,
        "proposer_update_freq": 5,   # update on the proposer batch every this many steps (0 = never)
        "gamma": 1.0,
        "lam": 1.0,
        "value_clip": 0.5,
        "critic_lr": 1e-5,
    })
    c.optim = ml_collections.ConfigDict({
        "lr": 1e-6,
        "schedule": "constant",      # constant | cosine
        "warmup_steps": 0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
    })
    c.train = ml_collections.ConfigDict({
        "steps": 100,
        # Steps in a row with an update skipped for a non-finite loss or gradient norm (each skip as the
        # reference does) before the run stops.
        "max_nonfinite_steps": 3,
        # A wall-clock budget for this process's self-play loop (0 = none; a resume starts a new one):
        # the first step that ends past it is the run's last (evaluated, checkpointed and exported as
        # at train.steps). For comparisons at equal compute, e.g. dynamic sampling (docs/results.md).
        "max_minutes": 0.0,
    })
    c.eval = ml_collections.ConfigDict({
        "every": 20,                 # steps between greedy evaluations (0 = only at start and end)
        "num_problems": 500,
        "seed": 1234,
        "max_new_tokens": 1024,
        "max_prompt_len": 512,       # held-out problems whose solver prompt is longer are dropped (0: none)
        "batch_size": 64,
        "sampled_n": 0,              # also report mean accuracy of this many samples at temperature 1
        "sampled_problems": 0,       # ... on the first this many held-out problems (0 = all of them)
        # A second held-out set, greedy at every evaluation as eval/<name>_greedy_accuracy: the task's
        # held-out generator with these task options over task_options (e.g. operands beyond the
        # warm-start corpus: where a curriculum that climbs past it would show), its own token budget.
        "second_set": "",            # its name ("" = none)
        "second_set_options": {},
        "second_set_problems": 500,
        "second_set_max_new_tokens": 0,  # 0 = eval.max_new_tokens
    })
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 3})
    c.log = ml_collections.ConfigDict({
        "samples": 4,                      # question/answer examples logged per step
        "wandb_project": placeholder(str),  # also log to Weights & Biases (pip install 'sqlm_jax[wandb]')
        "wandb_table_every": 10,           # steps between W&B tables of sampled questions and answers
    })
    c.export = True                  # write an HF folder of the final policy to workdir/export
    return c
