"""The combined policy loss and the optimizer chain, by hand (issues 13 and 14): every loss aggregation
(rl.loss_agg), the memory micro-batch never changing any of them, the KL and entropy terms' signs and
coefficients, k3's clamps at an extreme log-ratio, and global-norm clipping in make_optimizer.

Each of these one-line bugs makes a test here fail (checked by applying them one at a time, see
tests/mutation_check.py): the KL term's sign flipped in `policy_objective`, the entropy term's sign
flipped, `clip_by_global_norm` removed from `make_optimizer`, `kl_coef` forced to 0 in
`LossConfig.from_config`, k3's inner clamp dropped.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqlm_jax.defaults import base_config
from sqlm_jax.train_step import (LOSS_AGGS, LossAgg, LossConfig, RoleBatch, accumulate_gradients, loss_weights,
                                 make_optimizer, policy_loss_fn, policy_objective)
from sqlm_jax.models import Transformer
from tests.test_chunked_loss import _batch, _split
from tests.test_train_step import CFG

# Rows of 1, 3, 2 and 0 valid tokens; row i's per-token loss is i + 1.
MASK = np.array([[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
LOSS = np.array([[1.0] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3], np.float32)


@pytest.mark.parametrize("agg, expected", [
    (LossAgg("token-mean"), (1 + 6 + 6) / 6),                   # 6 tokens
    (LossAgg("reference", chunk=2), ((1 + 6) / 4 + 6 / 2) / 2),  # chunks: rows 0-1 (4 tokens), 2-3 (2)
    (LossAgg("reference", chunk=4), (1 + 6 + 6) / 6),           # one chunk: the token mean
    (LossAgg("seq-mean-token-mean"), (1 + 2 + 3 + 0) / 4),      # the empty row counts, adds 0
    (LossAgg("seq-mean-token-sum"), (1 + 6 + 6 + 0) / 4),
])
def test_loss_weights_by_hand(agg, expected):
    weights = np.asarray(loss_weights(jnp.asarray(MASK), agg))
    assert (weights[~MASK] == 0).all()
    assert math.isclose(float((weights * LOSS).sum()), expected, rel_tol=1e-6)


def test_reference_chunk_that_does_not_divide_the_rows_leaves_a_short_last_chunk():
    weights = np.asarray(loss_weights(jnp.asarray(MASK), LossAgg("reference", chunk=3)))
    expected = ((1 + 6 + 6) / 6 + 0) / 2  # chunks: rows 0-2 (6 tokens), row 3 (none)
    assert math.isclose(float((weights * LOSS).sum()), expected, rel_tol=1e-6)


def _verl_agg_loss(loss_mat, mask, mode, micro=8):
    """verl's `agg_loss` re-derived in numpy; "reference" is dp_actor's token mean per micro-batch of
    `micro` rows, each divided by the number of micro-batches (gradient accumulation)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * mask).sum(-1) / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask).sum(-1).mean()
    parts = [slice(i, i + micro) for i in range(0, len(mask), micro)]
    return sum(_verl_agg_loss(loss_mat[s], mask[s], "token-mean") / len(parts) for s in parts)


@pytest.mark.parametrize("mode", LOSS_AGGS)
def test_loss_weights_match_verl_on_random_data(mode):
    rng = np.random.default_rng(len(mode))
    mask = np.arange(9)[None] < rng.integers(1, 10, 24)[:, None]  # 24 rows, none empty (verl divides by 0)
    loss_mat = rng.normal(size=mask.shape)
    weights = np.asarray(loss_weights(jnp.asarray(mask), LossAgg(mode, chunk=8)), np.float64)
    np.testing.assert_allclose((weights * loss_mat).sum(), _verl_agg_loss(loss_mat, mask, mode), rtol=1e-5)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="rl.loss_agg='sum'"):
        loss_weights(jnp.asarray(MASK), LossAgg("sum"))


@pytest.mark.parametrize("mode", LOSS_AGGS)
def test_memory_micro_batch_never_changes_the_loss(mode):
    """8 rows, reference chunks of 4: micro-batches of 8 and of 2 rows (each chunk spanning two of them)
    give the same loss, gradients and metrics."""
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    batch = _batch(CFG.vocab_size)
    run = jax.jit(lambda b, agg: accumulate_gradients(policy_loss_fn(graphdef, LossConfig()), params, b, agg),
                  static_argnums=1)
    agg = LossAgg(mode, chunk=4)
    results = [run(_split(batch, micro), agg) for micro in (8, 2)]
    for grads, metrics in results[1:]:
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[0][0], grads))
        assert max(diffs) < 1e-6
        for k in metrics:
            np.testing.assert_allclose(metrics[k], results[0][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
    if mode != "token-mean":  # the aggregations really differ on this batch
        token_mean = run(_split(batch, 8), LossAgg("token-mean"))[1]["loss"]
        assert abs(float(results[0][1]["loss"]) - float(token_mean)) > 1e-4


def _one_token(logp, old, adv, ref, entropy=1.5):
    """A RoleBatch of one valid token and the (logp, entropy) arrays `policy_objective` takes."""
    a = lambda x: jnp.array([[x]], jnp.float32)
    batch = RoleBatch(prompt_ids=jnp.zeros((1, 1), jnp.int32), prompt_mask=jnp.ones((1, 1), bool),
                      response_ids=jnp.zeros((1, 1), jnp.int32), response_mask=jnp.ones((1, 1), bool),
                      advantages=a(adv), old_logp=a(old), ref_logp=a(ref), old_values=a(0.0), returns=a(0.0))
    return a(logp), a(entropy), batch


def test_combined_policy_loss_and_its_gradient_by_hand():
    """ratio 1, A = 2, d = ref - logp = ln 2, entropy 1.5, kl_coef 0.1, entropy_coef 0.01:
    loss = -A + 0.1 (e^d - d - 1) - 0.01 · 1.5; d loss / d logp = -A + 0.1 (1 - e^d) = -2.1,
    d loss / d entropy = -0.01."""
    logp, entropy, batch = _one_token(-1.0, -1.0, 2.0, -1.0 + math.log(2))
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    weights = jnp.ones((1, 1))
    loss = lambda lp, ent: policy_objective(lp, ent, batch, cfg, weights)[0]
    k3 = 2 - math.log(2) - 1
    assert math.isclose(float(loss(logp, entropy)), -2 + 0.1 * k3 - 0.015, rel_tol=1e-6)
    d_logp, d_entropy = jax.grad(loss, argnums=(0, 1))(logp, entropy)
    assert math.isclose(float(d_logp[0, 0]), -2.0 + 0.1 * (1 - 2), rel_tol=1e-6)
    assert math.isclose(float(d_entropy[0, 0]), -0.01, rel_tol=1e-6)
    metrics = policy_objective(logp, entropy, batch, cfg, weights)[1]
    assert math.isclose(float(metrics["kl"]), k3, rel_tol=1e-6) and float(metrics["entropy"]) == 1.5


def test_kl_coef_reaches_the_loss_from_the_config():
    c = base_config()
    c.rl.kl_coef, c.rl.entropy_coef = 0.05, 0.0
    cfg = LossConfig.from_config(c.rl)
    assert cfg.kl_coef == 0.05 and cfg.use_kl
    logp, entropy, batch = _one_token(-1.0, -1.0, 0.0, -1.0 + math.log(2))  # A = 0: only the KL term
    loss = float(policy_objective(logp, entropy, batch, cfg, jnp.ones((1, 1)))[0])
    assert math.isclose(loss, 0.05 * (2 - math.log(2) - 1), rel_tol=1e-6)


def test_k3_at_an_extreme_log_ratio_has_a_finite_gradient():
    """d = ref - logp = 100: exp(100) overflows float32. k3 clamps d to 20 first, then the estimate to
    10, so its gradient is 0 and the loss's gradient is the PPO term's alone (-A at ratio 1)."""
    logp, entropy, batch = _one_token(-101.0, -101.0, 2.0, -1.0)
    cfg = LossConfig(kl_coef=0.1)
    loss = lambda lp: policy_objective(lp, entropy, batch, cfg, jnp.ones((1, 1)))[0]
    assert math.isclose(float(loss(logp)), -2 + 0.1 * 10, rel_tol=1e-6)
    grad = float(jax.grad(loss)(logp)[0, 0])
    assert np.isfinite(grad) and math.isclose(grad, -2.0, rel_tol=1e-6)


def test_make_optimizer_clips_the_global_norm_before_adam():
    """Two AdamW steps (no weight decay) on params (a, b) with gradients (6, 8) then (0.6, 0.8):
    clipped to global norm 1, both steps' gradients are (0.6, 0.8) and each step moves every
    parameter by exactly lr. Unclipped, Adam's second step would be 0.741 lr (the first gradient's
    10x larger second moment); clipping each leaf alone would change the ratio between a and b."""
    c = base_config().optim
    c.lr, c.weight_decay, c.grad_clip = 0.1, 0.0, 1.0
    tx = make_optimizer(c, total_updates=10)
    params = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
    state = tx.init(params)
    for g in ({"a": 6.0, "b": 8.0}, {"a": 0.6, "b": 0.8}):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose([float(params["a"]), float(params["b"])], [0.8, 1.8], rtol=1e-5)
