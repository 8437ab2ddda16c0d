"""Self-Questioning Language Models (arXiv 2508.03682) in JAX / Flax NNX.

Shapes, one alphabet for every docstring and shape comment in the package:
  B   prompts (rows before sampling; the proposer's B rows all hold the one topic prompt)
  n   samples per prompt (proposals per row, answers per question)
  N   sequences, N = B·n (a model call's rows)
  Q   groups of n: the questions (Q = B·n proposals, each answered n times: N = Q·n answers), or the
      proposer's B rows; rewards and advantages are `[Q, n]`
  P   prompt length (left padded), R response length (right padded, max new tokens), T = P + R
      (or the positions a model call gets), S key slots of a KV cache
  V   vocabulary, D model width, F MLP width, L layers
  K   kv heads, G query heads per kv head (K·G query heads), H head dim
  M   micro-batches of mb rows each (a mini-batch is M·mb rows)

Modules, one line each:
  main         command line: --config=<file> [--config.x=y ...], builds and runs the Trainer
  train        the loop only: steps, evaluation, checkpoint / resume, finish (export, plots, summary)
  rollout      one step's propose -> solve -> score on the host, a Rollout per role; the pregenerated pool
  learner      the trained states, the reference, compiled log-prob / advantage and update passes
  train_step   the pure pieces of an update: RoleBatch, losses, micro-batch accumulation, optax step
  rl           pure RL math: log-probs, GRPO / RLOO / REINFORCE++ / GAE advantages, PPO-clip, GSPO, KL,
               value loss
  dynamic_sampling  the rows a step updates on: zero-variance groups dropped, extra rounds refilling them
  rewards      pure reward rules (majority vote, unit tests, format), chosen by name
  sampling     prefill + decode with a KV cache in one jit
  evaluate     greedy / sampled accuracy on held-out problems
  mesh         the device mesh, logical-axis rules, and putting rows on it
  models/      the decoder (transformer), its config, LoRA adapters, the critic, Hugging Face I/O
  tasks/       prompts, parsing and held-out sets per task; sandbox runs generated programs
  plan         per-device memory plan; plots, run_log, checkpoints, workdir: a run's outputs

One step (Trainer.self_play_step), each phase one call and one timer `time/<phase>`:
  propose   topic prompt ─sample [B·n]─▶ proposals ─task.reference_question (or the strict parse_question,
            reward.invalid_proposals)─▶ questions                                    (Rollouts.questions)
  solve     questions ─solver_prompts─▶ ─sample n each─▶ answers [Q·n]                  (Rollouts.solve)
  score     answers ─parse / sandbox─▶ ─rewards.reward_fn─▶ solver [Q, n], proposer [B, n]
                                                                                        (Rollouts.score)
  refill    per role: overlong penalty, truncated rows masked; with rl.filter_zero_variance the
            all-equal groups dropped, extra rounds (rollout.max_extra_batches) refilling their places
                                                                            (dynamic_sampling.step_rows)
  logprobs  per role: prompts placed, responses left on the device ─one jit─▶ old and
            reference log-probs (or critic values) ─▶ advantages                       (Learner.batch)
  update    with GAE the critic on both batches every step; the actor on the solver batch every step,
            on the proposer's every rl.proposer_update_freq ─one jit each─▶ new state;
            every role's metrics fetched in one transfer               (Learner.update, learner.fetch)
"""
