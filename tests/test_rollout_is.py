"""rl.rollout_is: truncated importance weights toward the sampler, by hand (sqlm_jax.rollout_is)."""
import math

import numpy as np
import pytest

from sqlm_jax.rollout_is import truncated_is_weights

L = math.log
# Row 0: the trainer finds token 0 twice as likely as the sampler did, token 1 half as likely, token 2
# is padding (its log-probs would give a ratio of e^10). Row 1: one token, ratio 1.2.
OLD = np.array([[L(.5), L(.3), 0.0], [L(.6), 0.0, 0.0]], np.float32)
SAMPLER = np.array([[L(.25), L(.6), -10.0], [L(.5), 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 0], [1, 0, 0]], bool)


def test_token_weights_are_the_ratio_capped():
    w = truncated_is_weights(OLD, SAMPLER, MASK, "token", cap=1.5)
    np.testing.assert_allclose(w, [[1.5, 0.5, 0.0], [1.2, 0.0, 0.0]], rtol=1e-6)  # 2.0 capped at 1.5
    np.testing.assert_allclose(truncated_is_weights(OLD, SAMPLER, MASK, "token", cap=3.0),
                               [[2.0, 0.5, 0.0], [1.2, 0.0, 0.0]], rtol=1e-6)


def test_sequence_weights_are_the_rows_ratio_capped_on_every_token():
    # row 0: 2.0 × 0.5 = 1 (the padding's e^10 left out); row 1: 1.2, capped at 1.1
    np.testing.assert_allclose(truncated_is_weights(OLD, SAMPLER, MASK, "sequence", cap=1.1),
                               [[1.0, 1.0, 0.0], [1.1, 0.0, 0.0]], rtol=1e-6)


def test_far_apart_log_probs_never_overflow():
    w = truncated_is_weights(np.array([[0.0]]), np.array([[-1e4]]), np.array([[True]]), "sequence", cap=2.0)
    assert float(w[0, 0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(OLD, SAMPLER, MASK, "off", cap=2.0)
