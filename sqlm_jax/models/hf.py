"""Hugging Face checkpoints <-> our decoder: load onto a mesh one tensor at a time, export back.

The name map is a table of `_Rule`s, one per parameter of ours: which HF tensors feed it and how to
convert in each direction (transposes, and the fused q/k/v and gate/up layouts of transformer.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.lora import adapters_by_weight
from sqlm_jax.models.transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    ours: str                                   # our parameter path, dot-separated
    hf: tuple[str, ...]                          # the HF tensors it is made of
    to_ours: Callable[..., np.ndarray]           # HF arrays -> our array
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # our array -> HF arrays, same order as hf


def _fuse_qkv(cfg: ModelConfig, bias: bool):
    """HF q/k/v `[heads·H, D]` weights (or `[heads·H]` biases) <-> our `[D, K, G+2, H]` (or `[K, G+2, H]`)."""
    k, g, dh = cfg.num_kv_heads, cfg.group_size, cfg.head_dim

    def split(x, heads):
        return x.reshape(k, heads, dh) if bias else x.T.reshape(x.shape[1], k, heads, dh)

    def to_ours(q, kk, v):
        return np.concatenate([split(q, g), split(kk, 1), split(v, 1)], axis=-2)

    def to_hf(w):
        flat = lambda x: x.reshape(x.shape[:-3] + (-1,)) if bias else x.reshape(x.shape[0], -1).T
        return flat(w[..., :g, :]), flat(w[..., g:g + 1, :]), flat(w[..., g + 1:, :])

    return to_ours, to_hf


def _rules(cfg: ModelConfig) -> list[_Rule]:
    same = (lambda x: x, lambda x: (x,))
    transpose = (lambda x: x.T, lambda x: (x.T,))
    h, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    o_proj = (lambda x: x.T.reshape(h, dh, d), lambda x: (x.reshape(h * dh, d).T,))
    gate_up = (lambda gate, up: np.stack([gate.T, up.T], axis=1),
               lambda x: (x[:, 0].T, x[:, 1].T))

    rules = [_Rule("embed", ("model.embed_tokens.weight",), *same),
             _Rule("final_norm.scale", ("model.norm.weight",), *same)]
    if not cfg.tie_word_embeddings:
        rules.append(_Rule("lm_head", ("lm_head.weight",), *transpose))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        rules += [
            _Rule(ours + "input_norm.scale", (hf + "input_layernorm.weight",), *same),
            _Rule(ours + "post_attn_norm.scale", (hf + "post_attention_layernorm.weight",), *same),
            _Rule(ours + "attn.qkv", tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                  *_fuse_qkv(cfg, bias=False)),
            _Rule(ours + "attn.o", (attn + "o_proj.weight",), *o_proj),
            _Rule(ours + "mlp.gate_up", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                  *gate_up),
            _Rule(ours + "mlp.down", (hf + "mlp.down_proj.weight",), *transpose),
        ]
        if cfg.qkv_bias:
            rules.append(_Rule(ours + "attn.qkv_bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                               *_fuse_qkv(cfg, bias=True)))
        if cfg.qk_norm:
            rules += [_Rule(ours + "attn.q_norm.scale", (attn + "q_norm.weight",), *same),
                      _Rule(ours + "attn.k_norm.scale", (attn + "k_norm.weight",), *same)]
    return rules


def is_local_path(name: str) -> bool:
    """Whether `name` means a folder on this machine rather than a hub id ('org/model')."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (cached) by huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if is_local_path(name):
        raise FileNotFoundError(
            f"no checkpoint folder at {name!r}: pass a folder holding config.json and "
            "*.safetensors, or a Hugging Face hub id such as 'Qwen/Qwen2.5-3B-Instruct'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: one message naming the way out
        raise FileNotFoundError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the checkpoint elsewhere and pass its local folder."
        ) from e


def read_model_config(folder: Path, **runtime) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return ModelConfig.from_hf_dict(json.loads(config_file.read_text()), **runtime)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Maps each HF tensor name to the safetensors file holding it (single file or sharded index)."""
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / WEIGHTS_NAME).is_file():
        with safe_open(folder / WEIGHTS_NAME, framework="flax") as f:
            return {name: folder / WEIGHTS_NAME for name in f.keys()}
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _read_tensor(file: Path, name: str) -> np.ndarray:
    # framework="flax" because safetensors' numpy reader rejects bfloat16; read on the host CPU so a
    # big tensor never lands whole on one accelerator.
    with jax.default_device(jax.local_devices(backend="cpu")[0]), safe_open(file, framework="flax") as f:
        return np.asarray(f.get_tensor(name))


def load_pretrained(path_or_hub_id, *, mesh: jax.sharding.Mesh | None = None, dtype: str = "float32",
                    compute_dtype: str | None = None, remat: bool = False, seq_block: int = 256,
                    attention: str = "auto", rules=mesh_lib.DEFAULT_RULES) -> tuple[Transformer, ModelConfig]:
    """Loads an HF checkpoint (local folder or hub id) as our `Transformer`, sharded over `mesh`.

    Tensors are read, converted and placed one at a time, straight into their shards: the host never
    holds more than the few HF tensors of one parameter. `dtype` is the parameter dtype; the compute
    dtype defaults to it.
    """
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = read_model_config(folder, param_dtype=dtype, compute_dtype=compute_dtype or dtype, remat=remat,
                            seq_block=seq_block, attention=attention)
    files = _tensor_files(folder)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = mesh_lib.param_shardings(state, mesh, rules)
    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings))

    for rule in _rules(cfg):
        missing = [n for n in rule.hf if n not in files]
        if missing:
            raise CheckpointError(f"checkpoint {folder} is missing tensor(s) {missing} "
                                  f"needed for {cfg.architecture} parameter {rule.ours!r}")
        value = rule.to_ours(*(_read_tensor(files[n], n) for n in rule.hf))
        key = tuple(int(p) if p.isdigit() else p for p in rule.ours.split("."))
        variable = flat_state[key]
        if value.shape != variable.shape:
            raise CheckpointError(
                f"tensor(s) {list(rule.hf)} give shape {value.shape} for {rule.ours!r}, but config.json "
                f"implies {variable.shape}: the weights do not match the config")
        value = value.astype(dtype)
        variable.set_value(jax.make_array_from_callback(
            value.shape, flat_shardings[key].get_value(), lambda index: value[index]))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat_state))
    model.row_mesh = mesh  # activations follow the rows over the mesh's batch axes (Transformer)
    return model, cfg


def save_pretrained(model: Transformer, cfg: ModelConfig, folder: str | os.PathLike, *,
                    max_shard_bytes: int = 4 << 30) -> Path:
    """Writes an HF folder (config.json + safetensors, sharded with an index past `max_shard_bytes`);
    LoRA adapters, if `model` has any, merged into their weights.

    The folder is assembled beside its destination and moved into place at the end, so an interrupted
    export never leaves a half-written model where a good one stood. In a multi-host run every process
    must call this (the weights are gathered collectively); only process 0 writes.
    """
    folder = Path(folder)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    adapters = adapters_by_weight(model)
    shards, current, size = [], {}, 0
    for rule in _rules(cfg):
        value = flat[rule.ours].get_value()
        if rule.ours in adapters:  # merged one weight at a time: the export is a plain HF checkpoint
            value = adapters[rule.ours].merged(value)
        ours = np.asarray(jax.device_get(mesh_lib.gather(value)))
        if jax.process_index() != 0:
            continue
        for name, array in zip(rule.hf, rule.to_hf(ours)):
            if current and size + array.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = jnp.asarray(np.ascontiguousarray(array))
            size += array.nbytes
    shards.append(current)
    if jax.process_index() != 0:
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    weight_map = {}
    for i, shard in enumerate(shards):
        file = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(staging / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if len(shards) > 1:
        (staging / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (staging / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    _replace_dir(staging, folder)
    return folder


def _replace_dir(staging: Path, folder: Path) -> None:
    """Moves `staging` to `folder`, keeping any files already there that the export does not write
    (tokenizer files, for instance)."""
    if folder.is_dir():
        for item in folder.iterdir():
            if not (staging / item.name).exists() and item.name not in (INDEX_NAME,) \
                    and not item.name.endswith(".safetensors"):
                shutil.copy2(item, staging / item.name) if item.is_file() else \
                    shutil.copytree(item, staging / item.name)
        backup = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        folder.rename(backup)
        staging.rename(folder)
        shutil.rmtree(backup)
    else:
        staging.rename(folder)
