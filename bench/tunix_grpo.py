"""The tunix side of bench/vs_tunix.py: GRPO iterations in google/tunix's GRPOLearner, vanilla sampler.

Runs in tunix's own virtualenv (bench/vs_tunix.py creates it), so it imports neither sqlm_jax nor
bench/common.py: tunix 0.1.7 needs safetensors<0.8, our transformers pin needs >=0.8. It is driven over
pipes, one JSON object a line:

  stdin, first line: the run (HF folder, prompts per iteration, the GRPO and AdamW settings; see
      `main`); then one "go" line after each iteration it reports.
  stdout: {"event": "ready", "logits": ...} once the models are loaded (the logits of the first prompt,
      for the caller's same-weights check); {"event": "iteration", ...} after each iteration, with its
      seconds (wall: total, generation, logprobs, update; cpu: this process, all threads), after which
      it waits for "go" so that the caller's iterations alternate with these; {"event": "done"}.
Everything else tunix or JAX prints goes to stderr.

One iteration is one GRPOLearner global step: the vanilla sampler generates all prompts x n completions
at once (rollout micro-batch = all), reference log-probs (one pass), GRPO advantages from a dummy
reward, then "micro_batch" sequences per gradient-accumulation step and one AdamW update. The
iteration is timed from one call of `_generate_and_compute_advantage` to the next (or to the end of
train()), with the actor's weights waited for at both ends.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WordTokenizer:
    """The bench's word-level vocabulary (<pad> 0, <eos> 1, <unk> 2, then w3 ... w{V-1}) in the
    shape tunix's TokenizerAdapter accepts: encode / decode / bos_id / eos_id / pad_id."""

    def __init__(self, vocab_size: int):
        self.words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, vocab_size)]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str, **kwargs) -> list[int]:
        return [self.ids.get(w, 2) for w in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(self.words[i] if 0 <= i < len(self.words) else "<unk>" for i in ids)

    def bos_id(self):
        return None  # no BOS, as on our side

    def eos_id(self) -> int:
        return 1

    def pad_id(self) -> int:
        return 0


def qwen2_config(folder: str):
    """tunix's Qwen2 ModelConfig from the HF folder's config.json, float32."""
    from tunix.models.qwen2 import model as qwen2
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    return qwen2.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf.get("rope_theta", 10000)),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf.get("tie_word_embeddings", False))


def main():
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else is printed goes to stderr
    sys.stdout = sys.stderr
    run = json.loads(sys.stdin.readline())

    def say(**message):
        protocol.write(json.dumps(message) + "\n")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    started = time.perf_counter()
    mesh = jax.make_mesh((jax.device_count(), 1), ("fsdp", "tp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as tunix's examples
    config = qwen2_config(run["folder"])
    # tunix's own random init has zero MLP kernels and N(0, 1) embeddings: load the shared weights.
    actor = qwen2_params.create_model_from_safe_tensors(run["folder"], config, mesh)
    reference = qwen2_params.create_model_from_safe_tensors(run["folder"], config, mesh)

    ids = jnp.asarray([WordTokenizer(config.vocab_size).encode(run["prompts"][0][0])], jnp.int32)
    length = ids.shape[1]
    logits, _ = actor(ids, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool)))
    say(event="ready", logits=np.asarray(logits[0], np.float64).tolist(),
        setup_s=time.perf_counter() - started, tunix_devices=jax.device_count())

    optim = run["optim"]
    optimizer = optax.chain(
        optax.clip_by_global_norm(optim["grad_clip"]),
        optax.adamw(optim["lr"], b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                    weight_decay=optim["weight_decay"]))
    prompts, n = len(run["prompts"][0]), run["n"]
    steps = len(run["prompts"])
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                              rl_cluster_lib.Role.ROLLOUT)},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=steps,
            mini_batch_size=prompts,  # one optimizer update over all the completions
            train_micro_batch_size=run["micro_batch"] // n,  # in prompts (x n sequences)
            rollout_micro_batch_size=prompts, compute_logps_micro_batch_size=prompts),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=run["new_tokens"], max_prompt_length=run["prompt_len"],
            kv_cache_size=run["prompt_len"] + run["new_tokens"],
            temperature=1.0, top_p=1.0, top_k=None,  # without top_p the sampler decodes greedily
            # No early stop (as on our side): a stop id the model cannot sample.
            eos_tokens=[config.vocab_size], seed=run["seed"]))  # an int: a key array would be donated
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference,
                                       tokenizer=WordTokenizer(config.vocab_size),
                                       cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(
        num_generations=n, num_iterations=1, beta=run["kl_coef"], kl_loss_mode="low_var_kl",
        kl_clamp_value=10.0, loss_agg_mode="token-mean", epsilon=run["clip_eps"])
    algo.epsilon_c = run["dual_clip_c"]  # read by the loss with getattr; not a GRPOConfig field in 0.1.7
    reward_rng = np.random.default_rng(run["seed"])

    def dummy_reward(prompts, completions, **kwargs):
        return reward_rng.random(len(completions)).tolist()

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=dummy_reward)

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = jax.block_until_ready(fn(*args, **kwargs))
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    cluster.generate = timed("generation", cluster.generate)
    prepare = timed("prepare", learner._generate_and_compute_advantage)
    clock, reported = {}, []

    def finish_iteration():
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        if clock:
            total = time.perf_counter() - clock["wall"]
            print(f"tunix_grpo: iteration {len(reported)} took {total:.2f} s", file=sys.stderr, flush=True)
            reported.append(total)
            say(event="iteration", total=total, generation=phases["generation"],
                logprobs=phases["prepare"] - phases["generation"], update=total - phases["prepare"],
                cpu=cpu_seconds() - clock["cpu"], optimizer_steps=int(cluster.actor_trainer.train_steps))
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("tunix_grpo: the caller went away")
        phases.clear()
        clock.update(wall=time.perf_counter(), cpu=cpu_seconds())

    def generate_and_compute_advantage(*args, **kwargs):
        finish_iteration()
        return prepare(*args, **kwargs)

    learner._generate_and_compute_advantage = generate_and_compute_advantage
    learner.train([{"prompts": np.array(batch)} for batch in run["prompts"]])  # an array, as grain gives
    finish_iteration()
    say(event="done")


if __name__ == "__main__":
    main()
