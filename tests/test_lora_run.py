"""A LoRA self-play run end to end: two steps, checkpoints of the adapters alone, resume, the merged export;
resuming with LoRA off or another rank is one line naming the difference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax import rollout
from sqlm_jax.checkpoints import Checkpointer, CheckpointProblem, _flat_shapes
from sqlm_jax.models import load_pretrained
from sqlm_jax.tokenizer import load_tokenizer
from sqlm_jax.train import Trainer
from tests.tiny_models import arithmetic_script, random_policy, rewarded_run_config, scripted_sample


def _config(model, workdir, steps=2, rank=4):
    c = rewarded_run_config(model, workdir, steps=steps)
    c.model.lora.rank = rank
    c.optim.eps = 1e-8  # plain Adam steps (~ lr each): B starts at 0 and must visibly move in two steps
    return c


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Two steps of the scripted policy (known answers, half of them rewarded: non-zero advantages)."""
    tmp = tmp_path_factory.mktemp("lora_run")
    model = random_policy(tmp / "model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout, "sample", scripted_sample(load_tokenizer(model), arithmetic_script))
        trainer = Trainer(_config(model, tmp / "run"))
        return tmp, model, trainer, trainer.run()


def test_checkpoints_hold_the_adapters_and_their_moments(lora_run):
    tmp, _, _, summary = lora_run
    assert summary["steps"] == 2
    shapes = _flat_shapes(Checkpointer(str(tmp / "run" / "checkpoints"), keep=5).manager.item_metadata(2)["state"])
    params = [shape for k, (shape, _) in shapes.items() if k.startswith("policy.params.")]
    assert len(params) == 2 * 4 * 2  # layers x targets x (A, B): no base weight is saved
    assert all(".lora_" in k for k in shapes if k.startswith("policy.params."))
    moments = [shape for k, (shape, _) in shapes.items() if k.startswith("policy.opt_state.") and shape]
    assert sum(map(np.prod, moments)) == 2 * sum(map(np.prod, params))


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
    config = _config(model, tmp / "run", steps=3)
    config.resume = True
    resumed = Trainer(config)
    assert resumed.restore() and resumed.steps_done == 2
    for a, b in zip(jax.tree.leaves(resumed.learner.state), jax.tree.leaves(first.learner.state)):
        np.testing.assert_array_equal(a, b)
    assert resumed.run()["steps"] == 3


@pytest.mark.parametrize("rank, expected", [
    (0, "the checkpoint has lora, this run has none"),
    (2, "lora_o.a.value is float32[4, 8, 4] there and float32[4, 8, 2] in this run")])
def test_resume_with_other_lora_settings_names_the_difference(lora_run, rank, expected):
    tmp, model, _, _ = lora_run
    trainer = Trainer(_config(model, tmp / "run", rank=rank))
    with pytest.raises(CheckpointProblem) as e:
        trainer.restore()
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
