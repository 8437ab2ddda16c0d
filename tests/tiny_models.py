"""A tiny random policy folder (our decoder + the shipped character tokenizer) and a run config for it."""
from __future__ import annotations

import os
import runpy
from pathlib import Path

from flax import nnx

from sqlm_jax.defaults import base_config
from sqlm_jax.models import ModelConfig, Transformer, save_pretrained
from sqlm_jax.tiny_corpus import build_tokenizer, save_tokenizer


def subprocess_xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a subprocess: the session's (conftest's) with `devices` fake CPU devices instead
    of 8 (0: one device, as a user has)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"] * bool(devices))


def random_policy(folder: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A random Qwen2-architecture model with a chat tokenizer, saved as an HF folder."""
    tokenizer = build_tokenizer()
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=len(tokenizer), hidden_size=hidden_size,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      qkv_bias=True, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(seed)), cfg, folder)
    save_tokenizer(tokenizer, folder)
    return Path(folder)


def tiny_run_config(model_path: Path, workdir: Path, task: str = "arithmetic", steps: int = 2):
    """Every size shrunk so two self-play steps take seconds; the mesh spans all 8 test devices."""
    c = base_config()
    c.task = task
    c.model.path = str(model_path)
    c.workdir = str(workdir)
    c.rollout.batch_size = 4
    c.rollout.n = 2
    c.rollout.max_prompt_len = 1024
    c.rollout.proposer_max_new_tokens = 12
    c.rollout.solver_max_new_tokens = 12
    c.rl.mini_batch_size = 4
    c.rl.micro_batch_size = 8
    c.rl.proposer_update_freq = 2
    c.optim.lr = 1e-3  # large, so that a few updates visibly move a random model
    c.train.steps = steps
    c.eval.every = 0
    c.eval.num_problems = 8
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 8
    c.checkpoint.every = 1
    c.checkpoint.keep = 5
    return c


def shipped_two_step_config(name: str, workdir: Path, eval_problems: int):
    """configs/NAME.py as shipped, for 2 steps evaluated at both ends on `eval_problems` held-out
    problems (half of them sampled), checkpointed at the end; the mesh spans all 8 test devices."""
    c = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"))["get_config"]()
    c.workdir = str(workdir)
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.train.steps = c.eval.every = c.checkpoint.every = 2
    c.eval.num_problems = c.eval.batch_size = eval_problems
    c.eval.sampled_problems = eval_problems // 2
    return c


def scripted_sample(tokenizer, respond):
    """A stand-in for `sampling.sample` (install it as `sqlm_jax.rollout.sample`) whose responses are
    `respond(prompt_text, row) -> str`, `row` indexing the call's N rows: a policy with known answers,
    so rewards, advantages and updates have known, non-zero values.

    The arrays are laid out as the sampler lays them out (prompts left padded to its bucketed length,
    each response ended by the stop id then padded, rows on the mesh). Its log-probs are zeros: a run
    using it sets rl.reuse_sampler_logprobs=False, so the learner computes the old ones itself.
    """
    import numpy as np

    from sqlm_jax import mesh as mesh_lib
    from sqlm_jax.sampling import SampleOutput, bucket_length
    from sqlm_jax.tokenizer import pad_left

    def sample(graphdef, weights, prompts, *, params, seed, mesh=None):
        del graphdef, weights, seed
        n, width = params.n, params.max_new_tokens
        texts = [tokenizer.hf.decode(p) for p in prompts]
        token_lists = [tokenizer.encode(respond(texts[i // n], i))[:width - 1] + [params.stop_ids[0]]
                       for i in range(len(prompts) * n)]
        tokens = np.full((len(token_lists), width), params.pad_id, np.int32)
        mask = np.zeros(tokens.shape, bool)
        for i, row in enumerate(token_lists):
            tokens[i, :len(row)], mask[i, :len(row)] = row, True
        prompt_tokens, prompt_mask = pad_left(prompts, params.pad_id, bucket_length(max(map(len, prompts))))
        placed = mesh_lib.shard_rows((tokens, np.zeros(tokens.shape, np.float32), mask), mesh)
        return SampleOutput(*placed, token_lists=token_lists, prompt_tokens=np.repeat(prompt_tokens, n, 0),
                            prompt_mask=np.repeat(prompt_mask, n, 0), n=n)

    return sample


def arithmetic_script(prompt: str, row: int) -> str:
    """Known answers for the arithmetic task at rollout.n = 2: proposal i is "<i+2>*3"; the solver
    answers question q with "<q>" twice when q is even (rewards [1, 1]) and with "<q>" then no answer
    when q is odd (rewards [1, 0]: a tie goes to the answer seen first)."""
    if "Let's think step by step" not in prompt:
        return f"{row + 2}*3"
    question, second = row // 2, row % 2
    return f"<answer>{question}</answer>" if question % 2 == 0 or not second else "I do not know"


def rewarded_run_config(model_path: Path, workdir: Path, steps: int = 2):
    """`tiny_run_config` for a run under `scripted_sample(tokenizer, arithmetic_script)`: old log-probs
    recomputed, no weight decay and Adam with a large eps (updates ~ lr · gradient), so that the weights
    move by the rewarded samples' gradients alone."""
    c = tiny_run_config(model_path, workdir, steps=steps)
    c.rl.reuse_sampler_logprobs = False
    c.optim.weight_decay, c.optim.eps, c.optim.lr = 0.0, 1.0, 1e-2
    return c


# The shipped tiny model of each task, and the config that runs it (configs/tiny*.py).
TINY_CONFIG_OF_TASK = {"arithmetic": "tiny", "algebra": "tiny_algebra", "coding": "tiny_coding"}


def on_tiny_model(config):
    """`config` with only its model swapped for the shipped tiny model of its task: the model's path,
    and the task options that model was pretrained on (its short prompts, question template and held-out
    family; configs/tiny*.py set the same), without which a character model cannot read its prompts."""
    from sqlm_jax import configs
    tiny = configs.get(TINY_CONFIG_OF_TASK[config.task])
    config.model.path = tiny.model.path
    config.task_options = tiny.task_options
    return config


def notebook_tpu_config(notebook: Path):
    """The config the Colab notebook's TPU cell (tagged "tpu") trains, built by the cell's own code as
    if on a TPU runtime, up to the `Trainer(config)` it hands it to."""
    import json

    from sqlm_jax import configs

    class Built(Exception):
        pass

    def trainer(config):
        raise Built(config)

    cells = [c for c in json.loads(Path(notebook).read_text())["cells"]
             if "tpu" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook}: {len(cells)} cells tagged 'tpu', expected one"
    try:
        exec("".join(cells[0]["source"]), {"ON_TPU": True, "configs": configs, "Trainer": trainer})
    except Built as built:
        return built.args[0]
    raise AssertionError(f"{notebook}: the TPU cell never built a Trainer")


def shipped_on_tiny_model(name: str, sizes: dict):
    """configs/NAME.py as shipped on the shipped tiny model of its task (`on_tiny_model`), with the dotted fields of
    `sizes` set (e.g. {"rollout.batch_size": 2}): every other field as shipped."""
    from sqlm_jax import configs
    config = configs.get(name)
    config = on_tiny_model(config)
    for field, value in sizes.items():
        *parents, leaf = field.split(".")
        section = config
        for part in parents:
            section = section[part]
        assert leaf in section, f"{name}: no field {field} to size"
        section[leaf] = value
    return config
