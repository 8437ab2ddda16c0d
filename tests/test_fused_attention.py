"""Splash attention (models/fused_attention.py), the TPU kernel that keeps its scores on chip, against
the model's attention (models/attention.py): the same outputs and gradients with causal masking, left
padding, grouped-query heads, queries at an offset into a cache, and the update's shared-prompt layout;
and its cost, which XLA's cost model does not see, by hand.

On CPU the kernel runs in Pallas's interpreter (the kernel's own code, its block schedule and masks);
compiled for a TPU it runs in the deviceless compile below and in tests/test_aot.py.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqlm_jax import mesh as mesh_lib, sampling, step_time
from sqlm_jax.models import ModelConfig, Transformer
from sqlm_jax.models import fused_attention as fa
from sqlm_jax.models.attention import attend
from sqlm_jax.models.transformer import response_hidden
from test_aot import MODEL, _run

N, K, G, H = 2, 2, 3, 16


def _inputs(t, offset, extra_slots, seed=0):
    rng = np.random.default_rng(seed)
    s = offset + t + extra_slots  # cache slots past the queries: never read
    q = jnp.asarray(rng.normal(size=(N, t, K, G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(N, K, H, s)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(N, K, s, H)), jnp.float32)
    kv_mask = np.ones((N, s), bool)
    kv_mask[0, :3] = False  # row 0 left-padded by three slots
    return q, k, v, jnp.asarray(kv_mask)


def _reference(q, k, v, kv_mask, offset):
    """Softmax attention by definition, in float64 numpy: query i sees the real keys up to offset + i."""
    q, k, v, kv_mask = (np.asarray(x, np.float64) for x in (q, k, v, kv_mask))
    t, s = q.shape[1], k.shape[-1]
    scores = np.einsum("ntkgh,nkhs->nkgts", q, k) / math.sqrt(q.shape[-1])
    visible = (kv_mask[:, None, :] > 0) & (np.arange(s)[None, None] <= offset + np.arange(t)[None, :, None])
    scores = np.where(visible[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("nkgts,nksh->ntkgh", probs, v)


@pytest.mark.parametrize("t, offset, extra", [(20, 0, 0), (12, 9, 5), (130, 200, 3)])
def test_splash_matches_softmax_attention_and_its_gradients(t, offset, extra):
    """A whole-sequence pass (offset 0), queries into a cache after a prompt, and a query block longer
    than the 128 lanes with keys over two blocks: real positions as by definition, gradients as the
    model's attention's. Padded query positions are junk in both and are left out."""
    q, k, v, kv_mask = _inputs(t, offset, extra)
    real = np.asarray(kv_mask[:, offset:offset + t])
    splash = lambda q, k, v: fa.splash_attend(q, k, v, kv_mask, offset, None, interpret=True)
    np.testing.assert_allclose(np.asarray(splash(q, k, v))[real], _reference(q, k, v, kv_mask, offset)[real],
                               atol=2e-5)

    s = k.shape[-1]
    mask = kv_mask[:, None, :] & (jnp.arange(s)[None, None] <= offset + jnp.arange(t)[None, :, None])
    weights = jnp.cos(jnp.arange(H))  # a loss that weighs each output dim differently
    grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None, None], f(q, k, v), 0)
                                                       * weights), argnums=(0, 1, 2))(q, k, v)
    for ours, theirs in zip(grads(splash), grads(lambda q, k, v: attend(q, k, v, mask))):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=5e-5)


def test_the_update_pass_is_the_same_with_splash_on_a_mesh():
    """The update's response pass as the paper configs run it (remat, prompts shared by groups of rows,
    left-padded prompts, right-padded responses) on a mesh that splits rows and kv heads: hidden states
    and every weight's gradient as with the model's attention."""
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                      tie_word_embeddings=True, remat=True)
    rng = np.random.default_rng(0)
    rows, p, r = 8, 9, 7
    prompt_mask = np.repeat(np.arange(p)[None] >= np.array([[3], [0], [5], [1]]), 2, axis=0)
    prompt = np.repeat(rng.integers(1, 50, (rows // 2, p)), 2, axis=0)
    response, response_mask = rng.integers(1, 50, (rows, r)), np.ones((rows, r), bool)
    response_mask[1, 4:] = False
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def run(attention, group):
        model = Transformer(dataclasses.replace(cfg, attention=attention), rngs=nnx.Rngs(0))
        model.row_mesh = mesh
        graphdef, state = nnx.split(model)

        def loss(state):
            m = nnx.merge(graphdef, state)
            hidden = response_hidden(m, prompt_ids=prompt, prompt_mask=prompt_mask, response_ids=response,
                                     response_mask=response_mask, prompt_group=group)
            return jnp.sum(jnp.where(response_mask[..., None], m.logits(hidden), 0) ** 2) / 1e3, hidden
        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return np.asarray(hidden)[response_mask], jax.tree.leaves(grads)

    for group in (1, 2):
        (hidden, grads), (ref_hidden, ref_grads) = run("splash", group), run("xla", group)
        np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5)
        for ours, theirs in zip(grads, ref_grads):
            np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max())


def test_blocks_visited_and_the_kernels_cost_by_hand():
    # 3,584 positions (the paper's update): 7 blocks of 512 a side, the causal half and the diagonal.
    assert fa.visited_blocks(3584, 3584) == 7 * 8 // 2
    assert fa.visited_blocks(512, 1536) == 3  # one query block after 1,024 prompt keys: all three key blocks
    assert fa.visited_blocks(1024, 1536) == 2 + 3
    assert (fa.block_size(300), fa.padded(300), fa.padded(3584)) == (384, 384, 3584)
    # One row, two heads, one 512 block, head dim 128, bfloat16: per pair of blocks 2·512·512·128 FLOPs
    # a matmul. Bytes as the kernel's BlockSpecs lay them out: a 512 x 128 bfloat16 tile of q, keys,
    # values, out or a gradient; segment ids and statistics (int32 / float32) over 128 lanes or 8 sublanes.
    matmul, tile, lanes, sublanes = 2 * 512 * 512 * 128, 512 * 128 * 2, 512 * 128 * 4, 8 * 512 * 4
    fwd = 2 * tile + sublanes + 2 * tile + 2 * lanes  # keys, values, kv ids; q, out, q ids, lse
    assert fa.kernel_cost("fwd", 1, 2, 512, 512, 128, 2) == (2 * 2 * matmul, 2 * fwd)
    dq = 2 * tile + sublanes + 3 * tile + lanes + 2 * 512 * 4  # keys, values, kv ids; q, do, dq, q ids, lse, di
    assert fa.kernel_cost("dq", 1, 2, 512, 512, 128, 2) == (2 * 3 * matmul, 2 * dq)
    dkv = 2 * tile + 3 * sublanes + 4 * tile + lanes  # q, do, q ids, lse, di; keys, values, dk, dv, kv ids
    assert fa.kernel_cost("dkv", 1, 2, 512, 512, 128, 2) == (2 * 4 * matmul, 2 * dkv)
    # A decode step: 8 grouped query heads as the queries of one block of sublanes, over 1,536 cache
    # slots in three blocks; bytes: the cache read once, 3 x 512 x 128 x 2 x 2 per head.
    assert (fa.query_block(8), fa.query_block(7), fa.visited_blocks(8, 1536)) == (8, 8, 3)
    step = fa.kernel_cost("fwd", 1, 1, 8, 1536, 128, 2)
    assert step == (3 * 2 * 2 * 8 * 512 * 128, 3 * (2 * tile + sublanes) + 2 * 8 * 128 * 2 + 2 * 8 * 128 * 4)


def test_the_tpu_update_writes_no_scores_and_its_kernels_are_costed():
    """The paper's algebra update compiled for a v5e-8 (a scaled-down model): with the model's attention
    the program holds float32 scores `[.., T, S]`, with splash none, and step_time finds every kernel
    call: per layer, the shared prompt pass and the responses' pass each run forward twice (remat
    recomputes it), then dq and dkv."""
    prompt, response = 64, 96  # lengths no dim of the model has
    compiled = {}
    for attention in ("xla", "auto"):
        run = _run("algebra", "v5e-8", 0, dataclasses.replace(MODEL, attention=attention), prompt, response)
        compiled[attention] = step_time.lower_optimizer_step(run, "solver").compile().as_text()
    queries = [t * g for t in (prompt, response) for g in (1, 2)]  # the model's attention has G·T rows
    assert scores_in(compiled["xla"], queries, [prompt, prompt + response])
    hlo = compiled["auto"]
    assert not scores_in(hlo, queries, [prompt, prompt + response])

    calls = step_time.SPLASH_CALL.findall(hlo)
    assert sorted(kind for kind, _ in calls) == sorted(["fwd"] * 8 + ["dq"] * 4 + ["dkv"] * 4)
    # 16 rows, two a chip; the prompt pass runs once per group of rows that share a prompt.
    rows, group = 16 // run.mesh.devices.size, run.learner.prompt_group(run.config.rollout.n)
    assert group == 2
    passes = [(rows // group, fa.padded(prompt), fa.padded(prompt)),
              (rows, fa.padded(response), fa.padded(prompt + response))]
    expected = [fa.kernel_cost(kind, n, 4, t, s, 48, 2) for n, t, s in passes for kind in ("fwd", "fwd", "dq", "dkv")]
    cost = step_time.splash_cost(hlo)  # two layers
    assert (cost.flops, cost.bytes) == (2 * sum(f for f, _ in expected), 2 * sum(b for _, b in expected))


def scores_in(hlo: str, queries, keys) -> list[str]:
    """The float32 results in `hlo` whose last two dims are a query length by a key length."""
    found = []
    for line in hlo.splitlines():
        result = line.split(" = ", 1)[-1].split("(", 1)[0]
        for dims in re.findall(r"f32\[([\d,]+)\]", result):
            dims = [int(d) for d in dims.split(",")]
            if len(dims) >= 2 and dims[-2] in queries and dims[-1] in keys:
                found.append(line[:200])
    return found


@pytest.mark.parametrize("rows_in_flight", [0, 4])
def test_decoding_with_the_splash_kernel_samples_the_same_tokens(rows_in_flight):
    """A decode step's splash path (each row's own cache and its prompt's shared prefix, merged by their
    log-sum-exps; G = 3 query heads padded to a block of 8): the static sampler (prefix shared by n = 3
    rows, cache grown in whole blocks) and slot refill (a prefix per slot) give the model's tokens and
    log-probs, with left padding and stop tokens."""
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=97, hidden_size=48, intermediate_size=64,
                      num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, qkv_bias=True,
                      param_dtype="float32", compute_dtype="float32", eos_token_id=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=length).tolist() for length in (5, 9, 3)]
    out = {}
    for attention in ("xla", "splash"):
        model = Transformer(dataclasses.replace(cfg, attention=attention), rngs=nnx.Rngs(0))
        out[attention] = sampling.generate(model, prompts, max_new_tokens=20, n=3, seed=1, stop_ids=tuple(range(3, 13)),
                                           rows_in_flight=rows_in_flight)
    assert out["splash"].token_lists == out["xla"].token_lists
    assert len({len(t) for t in out["xla"].token_lists}) > 2  # rows stop at different steps
    np.testing.assert_allclose(out["splash"].logprobs, out["xla"].logprobs, atol=1e-5)
