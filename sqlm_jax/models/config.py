"""ModelConfig: the decoder's hyperparameters, read from and written to a Hugging Face config.json."""
from __future__ import annotations

import dataclasses
from typing import Any

# Each supported HF architecture and what distinguishes it inside our one decoder.
#   qkv_bias: the default for biases on the q/k/v projections (config.json may override via attention_bias)
#   qk_norm:  RMSNorm over each head's queries and keys before RoPE (Qwen3)
ARCHITECTURES = {
    "Qwen2ForCausalLM": dict(model_type="qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(model_type="qwen3", qkv_bias=False, qk_norm=True),
    "LlamaForCausalLM": dict(model_type="llama", qkv_bias=False, qk_norm=False),
}
_BY_MODEL_TYPE = {v["model_type"]: k for k, v in ARCHITECTURES.items()}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this decoder implements."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder-only transformer.

    The architecture fields mirror config.json; `param_dtype`, `compute_dtype`, `remat`, `seq_block` and
    `attention` are runtime choices (float32 on CPU; bfloat16 compute on TPU/GPU) and are not written to
    config.json.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict items, e.g. llama3 scaling
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    seq_block: int = 256  # positions per row at a time through attention's queries and the MLP (memory only)
    attention: str = "auto"  # passes over many positions: "splash" (Pallas kernel), "xla", or "auto" by platform

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def num_params(self) -> int:
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * (h + 2 * kv) * hd + h * hd * d + (h + 2 * kv) * hd * self.qkv_bias
        per_layer = attn + 3 * d * f + 2 * d + 2 * hd * self.qk_norm
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "ModelConfig":
        """Builds a config from a parsed config.json; `runtime` sets the runtime fields (param_dtype ...)."""
        arch = _architecture_of(hf)
        family = ARCHITECTURES[arch]
        # transformers 5 nests rope settings in `rope_parameters`; older files use rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: 'default' and 'llama3'"
            )
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported (no supported family uses it)")
        heads = hf["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope_type == "llama3" else None,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", family["qkv_bias"])),
            qk_norm=family["qk_norm"],
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers needs to rebuild this model."""
        family = ARCHITECTURES[self.architecture]
        rope = {"rope_type": "default", **(self.rope_scaling_dict or {}), "rope_theta": self.rope_theta}
        out = {
            "architectures": [self.architecture],
            "model_type": family["model_type"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.architecture != "Qwen2ForCausalLM":  # Qwen2 always has q/k/v biases
            out["attention_bias"] = self.qkv_bias
        return out


def _architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    found = archs or [hf.get("model_type")]
    raise UnsupportedModelError(
        f"unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)} "
        "(Qwen2 / Qwen2.5, Qwen3, Llama 3.x)"
    )
