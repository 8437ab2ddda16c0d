"""The decoder, its config, and Hugging Face checkpoint I/O."""
from sqlm_jax.models.config import ARCHITECTURES, ModelConfig, UnsupportedModelError
from sqlm_jax.models.hf import CheckpointError, load_pretrained, save_pretrained
from sqlm_jax.models.transformer import Transformer

__all__ = ["ARCHITECTURES", "CheckpointError", "ModelConfig", "Transformer", "UnsupportedModelError",
           "load_pretrained", "save_pretrained"]
