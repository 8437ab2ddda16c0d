"""A LoRA self-play run end to end: two steps, checkpoints of the adapters alone, resume, the merged export;
resuming with LoRA off or another rank is one line naming the difference."""
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.checkpoints import CheckpointProblem
from sqlm_jax.models import load_pretrained
from sqlm_jax.train import Trainer
from tests.tiny_models import random_policy, tiny_run_config


def _config(model, workdir, steps=2, rank=4):
    c = tiny_run_config(model, workdir, steps=steps)
    c.model.lora.rank = rank
    c.optim.lr = 1e-2  # adapters start at B = 0: a large rate so that two steps move the policy
    return c


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    model = random_policy(tmp / "model")
    trainer = Trainer(_config(model, tmp / "run"))
    return tmp, model, trainer, trainer.run()


def test_checkpoints_hold_the_adapters_and_their_moments(lora_run):
    tmp, _, trainer, summary = lora_run
    assert summary["steps"] == 2
    saved = trainer.checkpointer.manager.item_metadata(2)["state"]["policy"]
    params = [k for k in _flat_keys(saved["params"])]
    assert params and all(".lora_" in f".{k}" for k in params)  # no base weight is saved
    adapter_size = sum(np.prod(v.shape) for v in _leaves(saved["params"]))
    assert sum(np.prod(v.shape) for v in _leaves(saved["opt_state"]) if v.shape) == 2 * adapter_size


def test_export_is_the_adapted_model_merged(lora_run):
    tmp, model, trainer, summary = lora_run
    ids = jnp.arange(12)[None] % 50
    exported, _ = load_pretrained(summary["export_dir"])
    base, _ = load_pretrained(model)
    adapted = np.asarray(trainer.model(ids))
    np.testing.assert_allclose(np.asarray(exported(ids)), adapted, atol=1e-5)
    assert np.abs(adapted - np.asarray(base(ids))).max() > 1e-3  # the adapters did move the policy


def test_resume_continues_with_the_adapters(lora_run):
    tmp, model, first, _ = lora_run
    resumed = Trainer(_config(model, tmp / "run", steps=3))
    resumed.config.resume = True
    assert resumed.restore() and resumed.steps_done == 2
    for a, b in zip(_leaves(resumed.learner.state.params), _leaves(first.learner.state.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.run()["steps"] == 3


@pytest.mark.parametrize("rank, expected", [
    (0, "the checkpoint has lora, this run has none"),
    (2, "lora_qkv.a.value is float32[32, 4] there and float32[32, 2] in this run")])
def test_resume_with_other_lora_settings_names_the_difference(lora_run, rank, expected):
    tmp, model, _, _ = lora_run
    trainer = Trainer(_config(model, tmp / "run", rank=rank))
    with pytest.raises(CheckpointProblem) as e:
        trainer.restore()
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _flat_keys(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_keys(v, f"{prefix}{k}.")
    elif hasattr(tree, "shape"):
        yield prefix[:-1]
