"""LoRA (models/lora.py): an adapter's arithmetic by hand; an adapted model starts as its base and exports,
merged, to a plain HF folder that transformers runs with the adapted model's logits; the learner trains
the adapters alone against the base as its KL reference (no copy); rank 0 is full fine-tuning bit for bit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.learner import Learner, updates_per_run
from sqlm_jax.models import load_pretrained, save_pretrained
from sqlm_jax.models.lora import LoRA, LoraSpec, adapters_by_weight, add_adapters
from sqlm_jax.sampling import SampleOutput
from sqlm_jax.train_step import LossAgg, LossConfig, make_optimizer, policy_loss_fn, response_logprobs, train_step
from tests.checkpoints import make_checkpoint
from tests.test_models import _left_padded_batch, _max_diff_at_real_positions, _torch_logits
from tests.tiny_models import tiny_run_config


def test_adapter_by_hand():
    """W `[2, 3]` (one contracted dim, as `down`), r = 1, alpha = 2: scale 2."""
    weight = nnx.Param(jnp.ones((2, 3)), axes=("mlp", "embed"))
    adapter = LoRA(weight, 1, LoraSpec(rank=1, alpha=2.0), nnx.Rngs(0))
    assert adapter.a.shape == (2, 1) and adapter.b.shape == (1, 3) and not adapter.b[...].any()
    assert adapter.a.get_metadata()["axes"] == ("mlp", None)  # sharded as W's input dim
    assert adapter.b.get_metadata()["axes"] == (None, "embed")
    adapter.a.set_value(jnp.array([[1.0], [2.0]]))
    adapter.b.set_value(jnp.array([[1.0, 0.0, -1.0]]))
    # x·A = 3 + 8 = 11, times 2 = 22, times B = [22, 0, -22].
    np.testing.assert_array_equal(adapter(jnp.array([[3.0, 4.0]])), [[22.0, 0.0, -22.0]])
    # W + 2·A·B = 1 + 2·[[1, 0, -1], [2, 0, -2]].
    np.testing.assert_array_equal(adapter.merged(weight[...]), [[3.0, 1.0, -1.0], [5.0, 1.0, -3.0]])


def test_adapter_scale_is_alpha_over_rank_at_rank_4():
    """r = 4, alpha = 8: scale 2 (alpha / sqrt(r), rsLoRA's, would be 4; at r = 1 the two agree)."""
    weight = nnx.Param(jnp.zeros((2, 3)), axes=("mlp", "embed"))
    adapter = LoRA(weight, 1, LoraSpec(rank=4, alpha=8.0), nnx.Rngs(0))
    adapter.a.set_value(jnp.ones((2, 4)))
    adapter.b.set_value(jnp.full((4, 3), 0.5))
    # x·A = [3, 3, 3, 3] (x = [1, 2]), times 2 = 6 each, times B = 4 · 6 · 0.5 = 12.
    np.testing.assert_array_equal(adapter(jnp.array([[1.0, 2.0]])), [[12.0, 12.0, 12.0]])
    np.testing.assert_array_equal(adapter.merged(weight[...]), np.full((2, 3), 4.0))  # 2 · 4 · 0.5


def test_lora_targets_choose_the_adapted_projections(tiny_folder):
    """model.lora.targets="qkv,o": the learner trains adapters on the attention projections alone."""
    learner, _, _ = _learner(tiny_folder, rank=2, targets="qkv,o")
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(learner.state.params)}
    assert sorted(flat) == [f"layers.{i}.attn.lora_{t}.{m}" for i in range(2) for t in ("o", "qkv") for m in "ab"]
    assert all(flat[p].shape[-1] == 2 for p in flat if p.endswith(".a"))  # rank 2


def test_adapted_model_starts_as_its_base_and_exports_merged(tmp_path):
    folder, _ = make_checkpoint(tmp_path, "qwen2")
    model, cfg = load_pretrained(folder)
    ids, mask = _left_padded_batch(cfg.vocab_size)
    logits = lambda m: np.asarray(m(jnp.asarray(ids), jnp.asarray(mask)))
    base = logits(model)
    add_adapters(model, LoraSpec(rank=4, alpha=8.0), nnx.Rngs(1))
    np.testing.assert_array_equal(logits(model), base)  # B = 0: exactly the base

    # B as training leaves it: non-zero, so every adapter changes the model.
    adapters = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(adapters)) == cfg.num_layers * 4 * 2  # qkv, o, gate_up, down; A and B
    for i, adapter in enumerate(adapters_by_weight(model).values()):
        adapter.b.set_value(0.5 * jax.random.normal(jax.random.key(i), adapter.b.shape))
    adapted = logits(model)
    assert _max_diff_at_real_positions(adapted, base, mask) > 0.05

    out = save_pretrained(model, cfg, tmp_path / "merged")
    with safe_open(out / "model.safetensors", "np") as f, safe_open(folder / "model.safetensors", "np") as g:
        assert set(f.keys()) == set(g.keys())  # a plain checkpoint: the base's tensors, no adapters
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _max_diff_at_real_positions(adapted, _torch_logits(reloaded, ids, mask), mask) <= 1e-4


# ----------------------------------------------------------------------------------------- learner

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lora"), "qwen2")[0]


def _learner(folder, rank: int, targets: str | None = None):
    """A Learner of the tiny run config on one device (so the reduction order is fixed), KL on, a large
    learning rate so that one update visibly moves the adapters."""
    c = tiny_run_config(folder, "/unused")
    c.model.lora.rank, c.rl.kl_coef, c.optim.lr = rank, 0.05, 1e-2
    if targets is not None:
        c.model.lora.targets = targets
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    model, _ = load_pretrained(folder, mesh=mesh)
    graphdef, params = nnx.split(model)
    return Learner(c, mesh, graphdef, params), graphdef, jax.tree.map(np.asarray, params)


def _sample(vocab: int) -> tuple[SampleOutput, np.ndarray, np.ndarray]:
    """8 rows (4 prompts × n = 2) of random prompts and responses, with some padding; rewards `[4, 2]`
    with a non-zero advantage in three groups."""
    rng = np.random.default_rng(0)
    prompts = np.repeat(rng.integers(1, vocab, (4, 16)), 2, axis=0).astype(np.int32)
    prompt_mask = np.ones(prompts.shape, bool)
    prompt_mask[:2, :5] = False
    tokens = rng.integers(1, vocab, (8, 12)).astype(np.int32)
    mask = np.arange(12)[None] < np.array([12, 9, 12, 4, 12, 12, 7, 12])[:, None]
    sample = SampleOutput(tokens=jnp.asarray(tokens), logprobs=jnp.zeros(tokens.shape), mask=jnp.asarray(mask),
                          token_lists=[], prompt_tokens=prompts, prompt_mask=prompt_mask, n=2)
    return sample, np.ones(8, bool), np.array([[1, 0], [0, 1], [1, 1], [1, 0]], np.float32)


def _prepared(learner, vocab: int):
    sample, row_mask, rewards = _sample(vocab)
    return learner.prepare(learner.role_batch(sample, row_mask), rewards)  # old log-probs by a pass


def test_rank_zero_is_full_fine_tuning_bit_for_bit(tiny_folder):
    learner, graphdef, _ = _learner(tiny_folder, rank=0)
    assert learner.frozen is None and learner.graphdef == graphdef
    assert all(a is not b for a, b in zip(jax.tree.leaves(learner.ref_params), jax.tree.leaves(learner.state.params)))
    batch = _prepared(learner, 97)
    # The update as learner.py composed it before LoRA existed: train_step over the whole state.
    c = learner.config
    step = jax.jit(functools.partial(
        train_step, loss_fn=policy_loss_fn(graphdef, LossConfig.from_config(c.rl)),
        tx=make_optimizer(c.optim, updates_per_run(c)), agg=LossAgg.from_config(c.rl)))
    expected, _ = step(jax.tree.map(jnp.copy, learner.state),
                       jax.tree.map(lambda x: x.reshape((1,) + x.shape), batch))  # M = 1 micro-batch
    learner.update(batch)
    for got, want in zip(jax.tree.leaves(learner.state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_lora_trains_the_adapters_against_the_base(tiny_folder):
    learner, base_graphdef, base = _learner(tiny_folder, rank=4)
    adapters = learner.state.params
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(adapters)]
    assert len(paths) == 2 * 4 * 2 and all(".lora_" in f".{p}" for p in paths)
    # Optimizer moments of the adapters only; the reference is the base's own arrays, not a copy.
    adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(learner.state.opt_state) if x.ndim) == 2 * adapter_size
    assert all(a is b for a, b in zip(jax.tree.leaves(learner.ref_params), jax.tree.leaves(learner.frozen)))

    base_logp = lambda batch: response_logprobs(nnx.merge(base_graphdef, base), batch)
    first = _prepared(learner, 97)
    np.testing.assert_allclose(first.ref_logp, base_logp(first), atol=1e-6)
    np.testing.assert_array_equal(first.old_logp, first.ref_logp)  # B = 0: the policy is the base
    learner.update(first)
    for got, want in zip(jax.tree.leaves(learner.frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(got, want)  # the base never moves
    assert all(np.abs(b.get_value()).max() > 0 for p, b in nnx.to_flat_state(learner.state.params) if p[-1] == "b")

    second = _prepared(learner, 97)
    np.testing.assert_array_equal(second.ref_logp, first.ref_logp)  # still the base's, adapters off
    adapted = response_logprobs(nnx.merge(*learner.policy), second)  # the policy the sampler gets
    np.testing.assert_allclose(second.old_logp, adapted, atol=1e-6)
    assert np.abs(np.asarray(second.old_logp - second.ref_logp)).max() > 1e-3
