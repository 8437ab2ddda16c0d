"""Tiny random Hugging Face checkpoints for tests, made with transformers' own PyTorch classes (fp32).

`make_checkpoint(tmp_path, family)` writes a folder that `sqlm_jax.models.load_pretrained` reads and
returns the PyTorch model as the reference to compare against. Families: qwen2, qwen2-tied, qwen3,
llama3 (with Llama-3 rope scaling).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        max_position_embeddings=16384, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
}


def make_checkpoint(tmp_path: Path, family: str = "qwen2", *, seed: int = 0, noise: float = 0.1,
                    **overrides) -> tuple[Path, torch.nn.Module]:
    """Saves a random `family` model under `tmp_path / family`; returns (folder, torch model in eval mode).

    Every weight gets Gaussian noise of scale `noise` on top of transformers' init (norm scales start at
    exactly 1 and biases at 0, which would hide mistakes in those paths), and is large enough that
    next-token distributions are far from uniform. `overrides` go into the config (e.g. vocab_size).
    """
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHAPE, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    folder = Path(tmp_path) / family
    model.save_pretrained(folder)
    return folder, model
