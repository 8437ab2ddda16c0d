"""A tiny random policy folder (our decoder + the shipped character tokenizer) and a run config for it."""
from __future__ import annotations

from pathlib import Path

from flax import nnx

from sqlm_jax.defaults import base_config
from sqlm_jax.models import ModelConfig, Transformer, save_pretrained
from sqlm_jax.tiny_corpus import build_tokenizer, save_tokenizer


def random_policy(folder: Path, seed: int = 0) -> Path:
    """A random Qwen2-architecture model with a chat tokenizer, saved as an HF folder."""
    tokenizer = build_tokenizer()
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=len(tokenizer), hidden_size=32,
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
