"""The sampler agrees with transformers and with a fresh forward pass; stops, n samples, filters, mesh."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import prompt_pass, refill, sampling
from sqlm_jax.models import load_pretrained
from tests.checkpoints import make_checkpoint

PROMPT_LENGTHS = (5, 11, 3, 8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, torch reference, our model) for one random Qwen2 checkpoint."""
    folder, ref = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2")
    return folder, ref, load_pretrained(folder)[0]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(1, 97, length).tolist() for length in PROMPT_LENGTHS]


def _hf_greedy(ref, prompts, max_new_tokens):
    """transformers' greedy continuation `[B, N]` of a left-padded batch."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[:, width:].numpy()


def _forward_logprobs(model, out: sampling.SampleOutput) -> np.ndarray:
    """log p(response token) `[R, N]` from one fresh forward pass over prompt + response."""
    ids = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    logp = jax.nn.log_softmax(model(ids, mask), axis=-1)
    prompt_len = out.prompt_tokens.shape[1]
    predicted = logp[:, prompt_len - 1:-1]  # position t predicts token t + 1
    return np.asarray(jnp.take_along_axis(predicted, out.tokens[..., None], axis=-1)[..., 0])


def test_greedy_matches_transformers(checkpoint, prompts):
    _, ref, model = checkpoint
    out = sampling.generate(model, prompts, max_new_tokens=32, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), _hf_greedy(ref, prompts, 32))
    assert out.mask.all() and [len(t) for t in out.token_lists] == [32] * len(prompts)


@pytest.mark.parametrize("knobs", [dict(), dict(n=3, top_k=20, top_p=0.9, temperature=0.7)])
def test_logprobs_equal_a_fresh_forward_pass(checkpoint, prompts, knobs):
    model = checkpoint[2]
    out = sampling.generate(model, prompts, max_new_tokens=16, seed=1, stop_ids=(5, 7), **knobs)
    expected = np.where(out.mask, _forward_logprobs(model, out), 0.0)
    assert out.logprobs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-4, rtol=0)


def test_stop_ids_end_rows(checkpoint, prompts):
    model = checkpoint[2]
    free = np.asarray(sampling.generate(model, prompts, max_new_tokens=12, temperature=0.0).tokens)
    # A stop token that greedy row 0 emits but some other row never does.
    stop, other = next((int(t), r) for t in free[0] for r in range(1, len(prompts)) if t not in free[r])
    out = sampling.generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=(stop,), pad_id=0)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(len(prompts)):
        hits = np.flatnonzero(free[row] == stop)
        length = hits[0] + 1 if hits.size else 12
        assert out.token_lists[row] == free[row, :length].tolist()
        assert mask[row].sum() == length and mask[row, :length].all()
        assert (tokens[row, length:] == 0).all() and (np.asarray(out.logprobs)[row, length:] == 0).all()
    assert len(out.token_lists[other]) == 12 and mask[other].all()


def test_every_row_stopping_ends_decoding(checkpoint, prompts):
    out = sampling.generate(checkpoint[2], prompts, max_new_tokens=12, stop_ids=range(97), n=2)
    assert [len(t) for t in out.token_lists] == [1] * 8
    assert np.asarray(out.mask).sum(axis=1).tolist() == [1] * 8


def test_n_samples_share_their_prompt_and_follow_the_seed(checkpoint, prompts):
    model, n = checkpoint[2], 4
    run = lambda seed: sampling.generate(model, prompts[:2], max_new_tokens=10, n=n, seed=seed)
    out, again, other = run(0), run(0), run(1)
    prompt_tokens = np.asarray(out.prompt_tokens)
    for i, prompt in enumerate(prompts[:2]):
        rows = prompt_tokens[i * n:(i + 1) * n]
        assert all(row[-len(prompt):].tolist() == prompt for row in rows)
        assert len({tuple(t) for t in out.token_lists[i * n:(i + 1) * n]}) > 1  # samples differ
    assert out.token_lists == again.token_lists
    np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(again.logprobs))
    assert out.token_lists != other.token_lists


def test_top_k_1_is_greedy(checkpoint, prompts):
    model = checkpoint[2]
    greedy = sampling.generate(model, prompts, max_new_tokens=12, temperature=0.0)
    top1 = sampling.generate(model, prompts, max_new_tokens=12, temperature=1.3, top_k=1, seed=3)
    assert top1.token_lists == greedy.token_lists


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, 0, [0.4, 0.3, 0.2, 0.1, 0.0]),
    (0.5, 0, np.array([16, 9, 4, 1, 0]) / 30),   # p^(1/T), renormalised
    (1.0, 2, [4 / 7, 3 / 7, 0.0, 0.0, 0.0]),
])
def test_sample_tokens_draws_from_the_tempered_filtered_distribution(temperature, top_k, expected):
    """20,000 draws per case; every frequency within 4.5 standard errors, impossible tokens never drawn."""
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1, 0.0]] * 20_000))  # the last token: logit -inf
    params = sampling.SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k)
    keys = sampling.row_keys(jax.random.key(0), jnp.arange(len(logits)))
    tokens = np.asarray(jax.jit(sampling.sample_tokens, static_argnums=2)(logits, keys, params))
    freq, expected = np.bincount(tokens, minlength=5) / len(tokens), np.asarray(expected)
    stderr = np.sqrt(expected * (1 - expected) / len(tokens))
    assert np.all(np.abs(freq - expected) <= 4.5 * stderr + 1e-12), (freq, expected)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda p: np.flatnonzero(np.isfinite(sampling.top_p_filter(logits, p)[0])).tolist()
    assert kept(0.4) == [1]          # 0.5 alone reaches 0.4
    assert kept(0.5) == [1]          # ... and exactly 0.5
    assert kept(0.7) == [1, 3]       # 0.5 + 0.3
    assert kept(0.9) == [0, 1, 3]    # 0.5 + 0.3 + 0.15 = 0.95
    assert kept(1.0) == [0, 1, 2, 3]
    # Unnormalised logits (a shift) change nothing; a row is filtered on its own.
    np.testing.assert_array_equal(np.isfinite(sampling.top_p_filter(logits + 3.0, 0.7)),
                                  np.isfinite(sampling.top_p_filter(logits, 0.7)))


def test_top_k_filter():
    logits = jnp.array([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 5.0, 1.0]])
    kept = np.isfinite(sampling.top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert np.isfinite(sampling.top_k_filter(logits, 10)).all()  # k beyond the vocabulary: no filter


def test_bucket_length():
    assert [sampling.bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 1500)] == \
        [16, 16, 32, 128, 512, 1024, 1536]


def test_bad_arguments_are_named(checkpoint, prompts):
    model = checkpoint[2]
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, prompts, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(model, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        sampling.generate(model, [[1], []], max_new_tokens=4)


def test_sharded_mesh_gives_the_same_samples(checkpoint, prompts):
    assert len(jax.devices()) == 8, "conftest asks for 8 fake CPU devices"
    folder, _, single = checkpoint
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_pretrained(folder, mesh=mesh)
    for knobs in (dict(temperature=0.0), dict(n=2, temperature=1.0, seed=5)):
        ours = sampling.generate(sharded, prompts, max_new_tokens=12, mesh=mesh, **knobs)
        reference = sampling.generate(single, prompts, max_new_tokens=12, **knobs)
        assert ours.token_lists == reference.token_lists
        np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(reference.logprobs), atol=1e-5)
        assert ours.tokens.sharding.spec[0] == ("data", "fsdp")  # rows really are split


def test_one_new_token_is_the_prefill_alone(checkpoint, prompts):
    out = sampling.generate(checkpoint[2], prompts, max_new_tokens=1, temperature=0.0, n=2)
    greedy = sampling.generate(checkpoint[2], prompts, max_new_tokens=12, temperature=0.0)
    assert out.tokens.shape == (8, 1)
    assert [t[0] for t in out.token_lists] == [t[0] for t in greedy.token_lists for _ in range(2)]


def test_compiles_once_per_shape(checkpoint, prompts):
    folder, _, model = checkpoint
    other = load_pretrained(folder)[0]  # same structure, its own weight arrays (as after a train step)
    before = sampling._sample._cache_size()
    for m, seed, batch in ((model, 0, prompts), (other, 1, prompts), (model, 2, [p[:2] for p in prompts])):
        sampling.generate(m, batch, max_new_tokens=6, seed=seed)  # prompt lengths 2…11 share bucket 16
    assert sampling._sample._cache_size() == before + 1


@pytest.mark.parametrize("knobs", [dict(temperature=0.0), dict(temperature=1.0, seed=4)])
def test_rows_in_flight_never_change_the_tokens(checkpoint, prompts, knobs):
    """4 prompts x n = 3 rows, stop ids that end rows at different lengths: a budget of 1 row, of 8
    (slots refilled as rows stop, prompts' prefixes shared through an index) and every row at once (the
    static batch with its shared-prompt prefix) give the same tokens, log-probs and masks."""
    model = checkpoint[2]
    run = lambda budget: sampling.generate(model, prompts, max_new_tokens=14, n=3, stop_ids=(5, 7, 11, 13, 17),
                                           rows_in_flight=budget, **knobs)
    every = run(0)
    lengths = [len(t) for t in every.token_lists]
    assert len(set(lengths)) > 2 and min(lengths) < 14  # rows really stop at different steps
    for budget in (1, 8):
        out = run(budget)
        assert out.token_lists == every.token_lists, budget
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(every.tokens))
        np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(every.mask))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(every.logprobs), atol=1e-5)


def test_rows_in_flight_across_waves_and_narrowed_tails(checkpoint):
    """40 prompts x n = 2: a budget of 4 slots decodes two waves of 20 prompts, each wave's tail moved
    into 1 slot (refill.TAIL_SHRINK); a budget of 2 four waves of 10, tails in 1 slot too. The tokens
    and log-probs are those of every row at once, sampled at temperature 1."""
    rng = np.random.RandomState(1)
    many = [rng.randint(1, 97, rng.randint(2, 12)).tolist() for _ in range(40)]
    assert [refill.wave_prompts(40, 2, w) for w in (4, 2)] == [20, 10]
    run = lambda budget: sampling.generate(checkpoint[2], many, max_new_tokens=12, n=2, temperature=1.0,
                                           seed=3, stop_ids=(5, 7, 11, 13, 17), rows_in_flight=budget)
    every = run(0)
    assert len({len(t) for t in every.token_lists}) > 4
    for budget in (4, 2):
        out = run(budget)
        assert out.token_lists == every.token_lists, budget
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(every.logprobs), atol=1e-5)


def test_rows_are_pinned_to_the_mesh(checkpoint):
    """A model loaded on a mesh keeps each row's activations on the devices that own the row in its
    prompt pass: the sampler compiled for 8 devices (fsdp 8) sums no more than a decode step's one
    position of each of its 32 rows (decode sums that rather than gather the weights, issue 31). Left
    to itself XLA splits the layers' matmuls on the fsdp-sharded width and all-reduces every row's
    activations, all 32 positions (on CPU as on TPU; tests/test_aot.py checks the TPU programs)."""
    mesh = mesh_lib.make_mesh({"fsdp": -1})
    model, _ = load_pretrained(checkpoint[0], mesh=mesh)
    assert model.row_mesh is mesh
    tokens, mask = np.ones((16, 32), np.int32), np.ones((16, 32), bool)
    hlo = sampling._sample.lower(*nnx.split(model), *mesh_lib.shard_rows((tokens, mask), mesh), jax.random.key(0),
                                 params=sampling.SamplingParams(max_new_tokens=8, n=2), mesh=mesh).compile().as_text()
    summed = re.findall(r"= \(?(?:f32|bf16)\[([\d,]+)\][^=]*? (?:all-reduce|reduce-scatter)\(", hlo)
    one_position = 32 * max(2 * model.config.intermediate_size, model.config.vocab_size)
    assert [dims for dims in summed if math.prod(map(int, dims.split(","))) > one_position] == []


def test_rows_in_flight_on_a_mesh(checkpoint, prompts):
    """Rows split over 4 batch devices, 2 slots each: the same samples as every row at once on one device."""
    folder, _, single = checkpoint
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_pretrained(folder, mesh=mesh)
    knobs = dict(max_new_tokens=10, n=2, seed=2, stop_ids=(5, 7, 11))
    ours = sampling.generate(sharded, prompts, mesh=mesh, rows_in_flight=8, **knobs)
    assert ours.token_lists == sampling.generate(single, prompts, **knobs).token_lists


def test_rows_in_flight_on_a_mesh_refill_each_block_and_narrow_its_tail(checkpoint):
    """16 prompts x n = 2 on a mesh of 4 row blocks (data 2 x fsdp 2), 16 rows in flight: each block's
    4 slots take its own 8 rows as others stop (slot refill, not the static batch: 16 < 32 rows), and
    its tail narrows to 1 slot once no block has a row pending and none more than 1 active. Row for
    row, the tokens and log-probs of every row at once on one device, at temperature 1."""
    folder, _, single = checkpoint
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_pretrained(folder, mesh=mesh)
    rng = np.random.RandomState(2)
    many = [rng.randint(1, 97, rng.randint(2, 12)).tolist() for _ in range(16)]
    knobs = dict(max_new_tokens=12, n=2, temperature=1.0, seed=6, stop_ids=(5, 7, 11, 13, 17))
    assert refill.batch_shards(mesh, len(many)) == 4 and 0 < 16 < len(many) * 2  # the refill path, 4 blocks
    assert max(1, 16 // 4 // refill.TAIL_SHRINK) < 16 // 4  # 4 slots a block, a tail of 1
    ours = sampling.generate(sharded, many, mesh=mesh, rows_in_flight=16, **knobs)
    every = sampling.generate(single, many, **knobs)
    lengths = [len(t) for t in every.token_lists]
    blocks = [sorted(lengths[8 * b:8 * b + 8]) for b in range(4)]
    assert len({tuple(b) for b in blocks}) == 4 and len(set(lengths)) > 4  # each block's rows end their own way
    assert ours.token_lists == every.token_lists
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(every.tokens))
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(every.logprobs), atol=1e-5)


@pytest.mark.parametrize("rows_in_flight", [0, 16], ids=["static", "slot-refill"])
def test_the_prompt_pass_in_pieces_samples_the_same(checkpoint, monkeypatch, rows_in_flight):
    """16 prompts on 4 row blocks, the prompt pass one prompt per device at a time (PREFILL_TOKENS below
    one prompt: 4 pieces per block, each written into its rows' cache): the tokens and log-probs of the
    whole pass at once."""
    folder = checkpoint[0]
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_pretrained(folder, mesh=mesh)
    rng = np.random.RandomState(3)
    many = [rng.randint(1, 97, rng.randint(2, 12)).tolist() for _ in range(16)]
    run = lambda: sampling.generate(sharded, many, mesh=mesh, max_new_tokens=8, n=2, temperature=1.0, seed=7,
                                    rows_in_flight=rows_in_flight)
    whole = run()
    monkeypatch.setattr(prompt_pass, "PREFILL_TOKENS", 1)
    sampling._sample.clear_cache()
    pieces = run()
    assert pieces.token_lists == whole.token_lists
    np.testing.assert_allclose(np.asarray(pieces.logprobs), np.asarray(whole.logprobs), atol=1e-5)


def test_each_step_draws_fresh_randomness(checkpoint, prompts):
    """A model whose next-token distribution is uniform (lm_head zeroed: every logit 0) over 97 tokens,
    8 rows of 24 tokens at temperature 1: each token has log-prob -log 97, a row repeats a token only as
    often as independent draws do (~3 of 24), and no two rows are alike. Were the steps of a row to
    reuse one draw, every row would be one token 24 times."""
    model = load_pretrained(checkpoint[0])[0]
    model.lm_head.set_value(jnp.zeros_like(model.lm_head[...]))
    out = sampling.generate(model, prompts, max_new_tokens=24, n=2, seed=7)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), -np.log(97), rtol=1e-5)
    distinct = [len(set(row)) for row in tokens.tolist()]
    assert min(distinct) >= 16, distinct  # expected 97 · (1 - (96/97)^24) ≈ 21.3
    assert len({tuple(row) for row in tokens.tolist()}) == len(tokens)
    counts = np.bincount(tokens.ravel(), minlength=97)  # 192 draws over 97 tokens
    assert counts.max() <= 9, counts.max()
