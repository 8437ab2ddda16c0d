"""A decode step on a mesh with the sampler's layout (models/tensor_parallel.py): the MLP's weights
split on F and the vocabulary's on V, the rows' one position gathered, partial sums and logit slices
exchanged by hand (shard_map). The same tokens and log-probs as one device, in the static batch and
with slot refill, on meshes where F's and V's axes do and do not also split the rows."""
import numpy as np
import pytest
import transformers

from sqlm_jax import mesh as mesh_lib, sampling
from sqlm_jax.models import load_pretrained, tensor_parallel

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3, 4], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("sizes", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_a_decode_step_split_on_f_and_v_samples_as_one_device(folder, sizes):
    mesh = mesh_lib.make_mesh(sizes)
    assert tensor_parallel.applies("mlp", 96, mesh) and tensor_parallel.applies("vocab", 128, mesh)
    sharded, single = load_pretrained(folder, mesh=mesh)[0], load_pretrained(folder)[0]
    for budget in (0, 4):
        knobs = dict(max_new_tokens=10, n=2, seed=3, rows_in_flight=budget, stop_ids=tuple(range(1, 13)))
        ours, theirs = sampling.generate(sharded, PROMPTS, mesh=mesh, **knobs), sampling.generate(single, PROMPTS, **knobs)
        assert ours.token_lists == theirs.token_lists
        np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(theirs.logprobs), atol=2e-5)
