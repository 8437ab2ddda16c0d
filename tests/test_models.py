"""The decoder agrees with transformers; checkpoints load, shard, export and fail with clear messages."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models import (CheckpointError, UnsupportedModelError, load_pretrained, save_pretrained)
from tests.checkpoints import FAMILIES, SHAPE, make_checkpoint


def _left_padded_batch(vocab: int):
    """ids [3, 11] with 0, 4 and 7 pad positions on the left of rows 0, 1, 2."""
    ids = np.random.RandomState(0).randint(0, vocab, (3, 11))
    mask = np.ones((3, 11), bool)
    mask[1, :4] = False
    mask[2, :7] = False
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids),
                     attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def _max_diff_at_real_positions(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask].max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    folder, ref_model = make_checkpoint(tmp_path, family)
    model, cfg = load_pretrained(folder)
    ids, mask = _left_padded_batch(cfg.vocab_size)
    diff = _max_diff_at_real_positions(model(jnp.asarray(ids), jnp.asarray(mask)),
                                       _torch_logits(ref_model, ids, mask), mask)
    assert diff <= 1e-4, f"{family}: max |Δlogits| = {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_gradients_match_transformers(tmp_path, family):
    """The gradient of a next-token loss w.r.t. every weight, exported to HF names by save_pretrained's
    own layout rules, equals torch autograd's (this pins the hand-written backward passes too)."""
    folder, ref_model = make_checkpoint(tmp_path, family)
    model, cfg = load_pretrained(folder)
    ids, mask = _left_padded_batch(cfg.vocab_size)
    # A different weight per predicted token, 0 where the input or the target is padding.
    weights = np.random.RandomState(1).uniform(0.5, 1.5, ids[:, 1:].shape) * (mask[:, 1:] & mask[:, :-1])

    def our_loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0] * weights).sum()

    graphdef, params = nnx.split(model)
    save_pretrained(nnx.merge(graphdef, jax.grad(our_loss)(params)), cfg, tmp_path / "grads")
    ours = load_file(str(tmp_path / "grads" / "model.safetensors"))

    logits = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(logp, -1, torch.tensor(ids[:, 1:])[..., None])[..., 0]
    (-(picked * torch.tensor(weights, dtype=torch.float32)).sum()).backward()
    theirs = {name: p.grad.numpy() for name, p in ref_model.named_parameters()}

    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        err, scale = np.abs(ours[name].numpy() - grad).max(), np.abs(grad).max()
        assert err <= 1e-4 * max(scale, 1.0), f"{family} {name}: max |Δgrad| {err:.1e}, largest {scale:.1e}"


def test_family_features_are_read_from_config(tmp_path):
    cfgs = {f: load_pretrained(make_checkpoint(tmp_path / f, f)[0])[1] for f in FAMILIES}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen2-tied"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24 and not cfgs["qwen3"].qkv_bias
    assert cfgs["llama3"].rope_scaling_dict["rope_type"] == "llama3"


def test_sharded_mesh_gives_the_same_logits(tmp_path):
    assert len(jax.devices()) == 8, "conftest asks for 8 fake CPU devices"
    folder, ref_model = make_checkpoint(tmp_path, "qwen2")
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, cfg = load_pretrained(folder)
    sharded, _ = load_pretrained(folder, mesh=mesh)
    # Weights really are split: the q/k/v kernel over fsdp (embed) and tensor (kv heads).
    qkv = sharded.layers[0].attn.qkv[...]
    assert qkv.sharding.spec[:2] == ("fsdp", "tensor")
    assert qkv.addressable_shards[0].data.shape[:2] == (cfg.hidden_size // 2, cfg.num_kv_heads // 2)
    ids, mask = _left_padded_batch(cfg.vocab_size)
    ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])  # batch 6 does not split 4 ways
    ids, mask = ids[:4], mask[:4]
    sharded_ids, sharded_mask = mesh_lib.shard_rows((ids, mask), mesh)
    out_sharded = jax.jit(lambda m, i, a: m(i, a))(sharded, sharded_ids, sharded_mask)
    out_single = single(jnp.asarray(ids), jnp.asarray(mask))
    assert _max_diff_at_real_positions(out_sharded, np.asarray(out_single), mask) <= 1e-5


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    folder, ref_model = make_checkpoint(tmp_path / "src", "qwen2")
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    model, cfg = load_pretrained(tmp_path / "sharded")
    ids, mask = _left_padded_batch(cfg.vocab_size)
    assert _max_diff_at_real_positions(model(jnp.asarray(ids), jnp.asarray(mask)),
                                       _torch_logits(ref_model, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("family,shard_bytes", [("qwen2", 4 << 30), ("qwen3", 30_000),
                                                 ("qwen2-tied", 4 << 30), ("llama3", 4 << 30)])
def test_save_pretrained_round_trips_through_transformers(tmp_path, family, shard_bytes):
    folder, ref_model = make_checkpoint(tmp_path / "src", family)
    model, cfg = load_pretrained(folder)
    out = save_pretrained(model, cfg, tmp_path / "export", max_shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").is_file() == (shard_bytes < 1 << 20)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _left_padded_batch(cfg.vocab_size)
    assert _max_diff_at_real_positions(_torch_logits(reloaded, ids, mask),
                                       _torch_logits(ref_model, ids, mask), mask) <= 1e-5
    # and back into our model
    again, cfg2 = load_pretrained(out)
    assert cfg2 == cfg


def test_exported_shards_stay_under_the_cap_and_are_filled_in_order(tmp_path):
    """max_shard_bytes=30,000: every shard's tensors take at most 30,000 bytes, and a shard closes only
    when the next tensor would pass the cap (the next shard's first tensor would not have fitted); the
    index names every tensor once, in files model-0000i-of-0000k.safetensors."""
    folder, _ = make_checkpoint(tmp_path / "src", "qwen3")
    model, cfg = load_pretrained(folder)
    out = save_pretrained(model, cfg, tmp_path / "export", max_shard_bytes=30_000)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    assert len(files) > 3 and sorted(weight_map) == sorted(load_file(folder / "model.safetensors"))
    shards = [load_file(out / name) for name in files]
    sizes = [sum(t.nbytes for t in shard.values()) for shard in shards]
    assert max(sizes) <= 30_000, sizes
    # The index lists the tensors in the order written: each shard's first.
    firsts = [next(name for name, file in weight_map.items() if file == f) for f in files]
    for shard_bytes, following, first in zip(sizes, shards[1:], firsts[1:]):
        assert shard_bytes + following[first].nbytes > 30_000, (sizes, first)


def test_export_replaces_an_existing_folder_but_keeps_tokenizer_files(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "src", "qwen2")
    model, cfg = load_pretrained(folder)
    export = tmp_path / "export"
    save_pretrained(model, cfg, export, max_shard_bytes=30_000)  # sharded first
    (export / "tokenizer.json").write_text("{}")
    save_pretrained(model, cfg, export)  # then single-file: stale shards must go
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors",
                                                        "tokenizer.json"]
    assert not list(tmp_path.glob(".export*")), "no staging or backup folder is left behind"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_pretrained(tmp_path / "nope")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="offline"):
        load_pretrained("Qwen/Qwen2.5-0.5B-Instruct-does-not-exist")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    folder, _ = make_checkpoint(tmp_path, "qwen2")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM.*Qwen3ForCausalLM.*LlamaForCausalLM"):
        load_pretrained(folder)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder, _ = make_checkpoint(tmp_path, "qwen2")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = SHAPE["intermediate_size"] * 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*do not match the config"):
        load_pretrained(folder)


def test_missing_tensor_is_named(tmp_path):
    folder, _ = make_checkpoint(tmp_path, "qwen2")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_pretrained(folder)


def test_bfloat16_checkpoint_loads_and_computes(tmp_path):
    folder, ref_model = make_checkpoint(tmp_path / "src", "qwen2")
    ref_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, cfg = load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    ids, mask = _left_padded_batch(cfg.vocab_size)
    ref = _torch_logits(ref_model.to(torch.float32), ids, mask)
    # bf16 weights and compute: agreement to bf16 precision only.
    assert _max_diff_at_real_positions(model(jnp.asarray(ids), jnp.asarray(mask)), ref, mask) < 0.1
