"""The critic for PPO with GAE (the reference's coding setup): a decoder trunk plus a scalar value head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sqlm_jax.models.transformer import Transformer, response_hidden


class Critic(nnx.Module):
    """Values `[N, R]` of the states before each response token.

    The trunk starts as a copy of the policy's weights (as the reference initialises its critic from
    the actor); the value head starts at zero so the first values are 0 rather than noise.
    """

    def __init__(self, trunk: Transformer):
        self.trunk = trunk
        d = trunk.config.hidden_size
        self.value_head = nnx.Param(jnp.zeros((d,), jnp.dtype(trunk.config.param_dtype)), axes=("embed",))

    def values(self, *, prompt_ids, prompt_mask, response_ids, response_mask, prompt_group: int = 1
               ) -> jax.Array:
        """Values `[N, R]`; arguments as `transformer.response_hidden`'s."""
        hidden = response_hidden(self.trunk, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                                 response_ids=response_ids, response_mask=response_mask,
                                 prompt_group=prompt_group)
        return (hidden @ self.value_head[...].astype(hidden.dtype)).astype(jnp.float32)
