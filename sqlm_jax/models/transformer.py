"""One decoder-only transformer (Flax NNX) for the Qwen2 / Qwen2.5, Qwen3 and Llama-3 families.

RMSNorm, RoPE (with Llama-3 scaling), grouped-query attention, SwiGLU. Every weight carries logical axis
names in its `axes` metadata; `sqlm_jax.mesh` maps them to mesh axes, so this file knows nothing of
devices.

Two layouts differ from Hugging Face's on purpose (hf.py converts both ways):
  * q, k and v are one fused projection `[D, K, G+2, H]`: for each of the K key/value heads, its G query
    heads followed by its key and its value. One matmul instead of three is ~20% faster decoding at
    small batch, and grouping by kv head keeps tensor parallelism over heads a clean split.
  * gate and up are one fused projection `[D, 2, F]`.

Shapes use the package's alphabet (sqlm_jax/__init__.py): N rows, T positions of the call (the query
length), S key slots (the KV cache), D width, V vocab, K kv heads, G query heads per kv head (K·G
query heads), H head dim, F MLP width.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models import decode_attention, fused_attention
from sqlm_jax.models.attention import LayerCache, attend
from sqlm_jax.models.config import ModelConfig


def _weight(param: nnx.Param, dtype, mesh) -> jax.Array:
    """A layer's weight in `dtype` for a pass over several positions, whole over the batch axes of
    `mesh` (None in decode steps: each chip multiplies its shard there, see Transformer.hidden_states).
    Left split on the width it contracts, XLA's TPU program multiplied the weight's shards one at a time
    into float32 partial sums of the whole activation, read and written once a shard: ~2/3 of an update's
    memory traffic at the paper's 3,584 positions (sqlm_jax.step_time)."""
    axes = param.get_metadata().get("axes") or (None,) * param.ndim
    return mesh_lib.whole_over_batch_axes(param[...].astype(dtype), axes, mesh)


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = 0.02) -> nnx.Param:
    value = (jnp.ones(shape, dtype) if std is None
             else std * jax.random.normal(rngs.params(), shape, dtype))
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("norm",), dtype, std=None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 as transformers does, whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies `[H/2]`, with Llama-3's wavelength-dependent scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32)
                                         / cfg.head_dim))
    scaling = cfg.rope_scaling_dict
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) `[N, T, 2, H/2]` for `apply_rope`, built once per forward for every layer. The sin
    table carries rotate-half's sign: -sin for the first half of each head, +sin for the second."""
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [N, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return (jnp.concatenate([cos, cos], axis=-2).astype(dtype),
            jnp.concatenate([-sin, sin], axis=-2).astype(dtype))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x[N, T, ..., H]` by the tables of `rope_tables` (transformers' rotate-half convention).

    Rotate-half as the reverse of the two half-heads, `x·cos + reverse(x)·sin`, is elementwise in the
    forward and the backward pass; splitting and concatenating the halves made RoPE's backward ~5% of a
    training step on CPU (bench/vs_trl.py).
    """
    halves = x.reshape(x.shape[:-1] + (2, x.shape[-1] // 2))  # [..., 2, H/2]
    shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    return (halves * cos + jnp.flip(halves, axis=-2) * sin).reshape(x.shape)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        k, g, dh = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        self.qkv = _param(rngs, (cfg.hidden_size, k, g + 2, dh),
                          ("embed", "kv_heads", None, "head_dim"), dt)
        self.qkv_bias = (_param(rngs, (k, g + 2, dh), ("kv_heads", None, "head_dim"), dt)
                         if cfg.qkv_bias else None)
        self.o = _param(rngs, (cfg.num_heads, dh, cfg.hidden_size), ("heads", "head_dim", "embed"), dt)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, dt, rngs)
            self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, dt, rngs)
        else:
            self.q_norm = self.k_norm = None
        self.group_size = g
        self.seq_block = cfg.seq_block
        self.kernel = cfg.attention
        self.lora_qkv = self.lora_o = None  # LoRA adapters (models/lora.py), attached after loading

    def __call__(self, x, positions, kv_mask, rope, cache: LayerCache | None, write_index,
                 prefix: LayerCache | None = None, mesh=None):
        """x `[N, T, D]`, positions `[N, T]`, kv_mask `[N, S']` (True = a real key), rope = (cos, sin)
        from `rope_tables`.

        Without a cache the keys are the T inputs themselves (S' = S = T). With one, the T new keys and
        values are written at `write_index` and the queries attend over all S cache slots; a
        `write_index [N]` (one decode step, T = 1) writes each row at its own slot, for rows at
        different steps (the sampler's slot refill).
        Keys and values take the cache's layouts (see LayerCache) in both cases. A `prefix` of P slots
        (see `attend`) comes before the row's own keys: S' = P + S, and its slots come first in kv_mask.
        A pass over several positions at a fixed slot and without a prefix, and a decode step (T = 1),
        may run the splash kernel (fused_attention; `mesh`, the model's row mesh, says where its rows
        and heads lie). Only passes over several positions gather the weights whole (`_weight`).
        """
        dt, b, t = x.dtype, x.shape[0], x.shape[1]
        gather = mesh if t > 1 else None
        qkv = jnp.einsum("btd,dkgh->btkgh", x, _weight(self.qkv, dt, gather))
        if self.lora_qkv is not None:
            qkv = qkv + self.lora_qkv(x).reshape(qkv.shape)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(dt)
        g = self.group_size
        q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]  # [N,T,K,G,H], [N,T,K,H] x2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [N, K, H, T], [N, K, T, H]
        if cache is None:
            query_slot = jnp.arange(t)[None]  # [1, T]
        elif jnp.ndim(write_index) == 0:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), write_index, 3)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), write_index, 2)
            cache = LayerCache(k, v)
            query_slot = (write_index + jnp.arange(t))[None]
        else:  # T = 1, row i's key and value into its slot write_index[i]: a scatter of N·K·H values
            rows = jnp.arange(b)
            k = cache.k.at[rows, :, :, write_index].set(k[..., 0].astype(cache.k.dtype))
            v = cache.v.at[rows, :, write_index].set(v[:, :, 0].astype(cache.v.dtype))
            cache = LayerCache(k, v)
            query_slot = write_index[:, None]  # [N, 1]
        if t > 1 and prefix is None and isinstance(write_index, int) and fused_attention.chosen(self.kernel, mesh):
            out = fused_attention.splash_attend(q, k.astype(dt), v.astype(dt), kv_mask, write_index, mesh,
                                                interpret=fused_attention.platform(mesh) != "tpu")
        else:
            prefix_len = 0 if prefix is None else prefix.v.shape[2]
            key_slot = jnp.arange(prefix_len + v.shape[2])
            causal = key_slot[None, None, :] <= prefix_len + query_slot[:, :, None]
            mask = kv_mask[:, None, :] & causal  # [N, T, S']
            if t == 1 and cache is not None:
                out = decode_attention.attend_step(q, k.astype(dt), v.astype(dt), mask, kv_mask, prefix, write_index,
                                                   fused_attention.chosen(self.kernel, mesh), mesh)
            else:
                out = attend(q, k.astype(dt), v.astype(dt), mask, prefix, self.seq_block)
        out = out.reshape(b, t, -1)  # [N, T, K·G·H]
        # One [K·G·H, D] matmul: contracting (heads, H) as two dims made XLA copy the weight every step.
        projected = out @ _weight(self.o, dt, gather).reshape(out.shape[-1], -1)
        if self.lora_o is not None:
            projected = projected + self.lora_o(out)
        return projected, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.gate_up = _param(rngs, (cfg.hidden_size, 2, cfg.intermediate_size), ("embed", None, "mlp"), dt)
        self.down = _param(rngs, (cfg.intermediate_size, cfg.hidden_size), ("mlp", "embed"), dt)
        self.lora_gate_up = self.lora_down = None  # LoRA adapters (models/lora.py), attached after loading
        self.seq_block = cfg.seq_block

    def __call__(self, x, mesh=None):
        """x `[N, T, D]` -> `[N, T, D]` (`mesh`: see `_weight`), each row's positions `seq_block` at a time
        when T is longer: each block's `[N, seq_block, 2F]` projections are recomputed in the backward pass, so one
        block's are alive, not the whole row's (at 3,584 positions, ~150 MiB a copy per row, ~17 copies
        in the compiled update: issue 30). Positions are independent here, so the results are the same."""
        b, t, d = x.shape
        mesh = mesh if t > 1 else None
        gate_up, down = _weight(self.gate_up, x.dtype, mesh), _weight(self.down, x.dtype, mesh)

        def project(x):  # [M, D] -> [M, D]
            extra = None if self.lora_gate_up is None else self.lora_gate_up(x)
            hidden = swiglu(x, gate_up, extra)  # [M, F]
            out = hidden @ down
            return out if self.lora_down is None else out + self.lora_down(hidden)

        block = self.seq_block
        if not block or t <= block:
            return project(x.reshape(b * t, d)).reshape(b, t, d)
        blocks = -(-t // block)
        x = jnp.pad(x, ((0, 0), (0, blocks * block - t), (0, 0)))
        x = x.reshape(b, blocks, block, d).swapaxes(0, 1)  # [blocks, N, seq_block, D]: rows stay split
        out = jax.lax.map(jax.checkpoint(lambda x: project(x.reshape(b * block, d)).reshape(b, block, d)), x)
        return out.swapaxes(0, 1).reshape(b, blocks * block, d)[:, :t]


def _gated(projected: jax.Array) -> jax.Array:
    """`silu(gate) · up` of the fused projection `[N·T, 2, F]` -> `[N·T, F]`."""
    return jax.nn.silu(projected[:, 0]) * projected[:, 1]


@jax.custom_vjp
def swiglu(x: jax.Array, gate_up: jax.Array, extra: jax.Array | None) -> jax.Array:
    """`silu(x @ gate) · (x @ up)` for x `[N·T, D]` and the fused weight `gate_up [D, 2, F]` -> `[N·T, F]`;
    `extra [N·T, 2F]` (a LoRA adapter's update, or None) is added to the projection first.

    The backward pass is written by hand; autodiff's cost ~5% more per training step on CPU
    (bench/vs_trl.py), in two places:
      * the gradients of the gate and up slices were two zero-padded `[N·T, 2, F]` copies, added; here
        they are stacked once;
      * for the weight's gradient XLA transposed that `[N·T, 2F]` gradient rather than the 2F/D times
        smaller x. The barrier makes it transpose x: XLA cannot fold an explicit x.T back into the dot.
    """
    return _swiglu_fwd(x, gate_up, extra)[0]


def _swiglu_fwd(x, gate_up, extra):
    projected = x @ gate_up.reshape(gate_up.shape[0], -1)
    if extra is not None:
        projected = projected + extra
    projected = projected.reshape(x.shape[0], 2, -1)  # [N·T, 2, F]
    return _gated(projected), (x, gate_up, projected, extra is not None)


def _swiglu_bwd(residuals, d_out):
    # With the weight frozen (LoRA) its gradient is unused and XLA drops its computation.
    x, gate_up, projected, has_extra = residuals
    gate, up = projected[:, 0], projected[:, 1]
    sig = jax.nn.sigmoid(gate)
    d_gate = d_out * up * sig * (1 + gate * (1 - sig))  # d silu(g) / dg = σ(g)·(1 + g·(1 − σ(g)))
    d_projected = jnp.stack([d_gate, d_out * gate * sig], axis=1).reshape(x.shape[0], -1)  # [N·T, 2F]
    weight = gate_up.reshape(gate_up.shape[0], -1)
    d_weight = jax.lax.optimization_barrier(x.T) @ d_projected
    return d_projected @ weight.T, d_weight.reshape(gate_up.shape), d_projected if has_extra else None


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, kv_mask, rope, cache, write_index, prefix, rows=lambda x: x, mesh=None):
        attn_out, cache = self.attn(self.input_norm(x), positions, kv_mask, rope, cache, write_index, prefix, mesh)
        x = rows(x + attn_out)
        return rows(x + self.mlp(self.post_attn_norm(x), mesh)), cache


def _in_turn(state, x, mesh):
    """A layer's state and input; where `mesh` splits weights over fsdp (a pass that gathers each weight
    whole, `_weight`) tied by an optimization barrier, so XLA gathers a layer's weights once the layer
    before it is done. Free to schedule them, XLA's TPU program gathered every layer's weights at once
    (algebra's log-prob pass on a v5e-8: 6.3 -> 10.5 GiB a chip)."""
    if mesh is None or mesh.shape["fsdp"] == 1 or x.shape[1] == 1:
        return state, x
    return jax.lax.optimization_barrier((state, x))


def _run_layer(layer, rows, mesh, x, positions, kv_mask, rope, cache, write_index, prefix):
    graphdef, state = nnx.split(layer)
    state, x = _in_turn(state, x, mesh)
    return nnx.merge(graphdef, state)(x, positions, kv_mask, rope, cache, write_index, prefix, rows, mesh)


def _run_layer_remat(layer, rows, mesh, x, positions, kv_mask, rope, cache, write_index, prefix):
    """`_run_layer` recomputed in the backward pass: `jax.checkpoint` over the layer's split state (nnx.remat
    wrote an outer trace's Variables: the sampler's loops and LoRA's loss failed)."""
    graphdef, state = nnx.split(layer)
    state, x = _in_turn(state, x, mesh)
    # write_index stays a Python int where it is one: the splash kernel's causal offset is static.
    layer_fn = lambda state, *args: nnx.merge(graphdef, state)(*args, write_index, prefix, rows, mesh)
    return jax.checkpoint(layer_fn)(state, x, positions, kv_mask, rope, cache)


class Transformer(nnx.Module):
    """The decoder. `model(input_ids[N, T], attention_mask[N, T]) -> logits[N, T, V]`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt))
        self.row_mesh = None  # the mesh whose batch axes split the rows (set by models/hf.py)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits `[N, T, V]` (float32) for a left- or right-padded batch; padded positions are junk."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden, _ = self.hidden_states(input_ids, positions_from_mask(attention_mask),
                                       attention_mask.astype(bool))
        return self.logits(hidden)

    def hidden_states(self, input_ids, positions, kv_mask, *, cache: list[LayerCache] | None = None,
                      write_index=0, prefix: list[LayerCache] | None = None):
        """Final-normed hidden states `[N, T, D]` and the updated cache (None without one).

        `prefix`: per layer, a cache that groups of rows share ahead of their own (see `attend`).
        On a mesh (`row_mesh`) the residual stream of a pass over several positions is pinned to its
        rows' devices after every block: else XLA splits matmuls on the sharded width and all-reduces
        every row's (tpu/README.md). A decode step's one position per row is not: pinned, XLA gathered
        every weight onto every chip each step; unpinned, each chip multiplies its shard and the rows'
        one position is summed over the chips, a few MiB a layer (sqlm_jax.step_time).
        """
        cfg = self.config
        pinned = self.row_mesh if input_ids.shape[1] > 1 else None
        rows = lambda x: mesh_lib.constrain_rows(x, pinned)
        rope = rope_tables(positions, rope_inv_freq(cfg), cfg.compute_dtype)
        x = rows(self.embed[...].astype(cfg.compute_dtype)[input_ids])
        run = _run_layer_remat if cfg.remat else _run_layer
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = run(layer, rows, self.row_mesh, x, positions, kv_mask, rope,
                                 None if cache is None else cache[i],
                                 write_index, None if prefix is None else prefix[i])
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`hidden[..., D] -> logits[..., V]` in float32 (log-probs for PPO need the precision)."""
        dt = hidden.dtype
        if self.lm_head is None:
            out = jnp.einsum("...d,vd->...v", hidden, self.embed[...].astype(dt))
        else:
            out = hidden @ self.lm_head[...].astype(dt)
        return out.astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> list[LayerCache]:
        """An empty KV cache of S = `length` slots: per layer, keys `[N, K, H, S]`, values `[N, K, S, H]`.

        One buffer per layer, not one stacked `[L, ...]` array: updating a slice of a stacked cache made
        XLA copy the whole cache every layer and step.
        """
        cfg = self.config
        k, dh = cfg.num_kv_heads, cfg.head_dim
        zeros = lambda *shape: jnp.zeros(shape, cfg.compute_dtype)
        return [LayerCache(zeros(batch, k, dh, length), zeros(batch, k, length, dh))
                for _ in range(cfg.num_layers)]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids `[N, T]`: 0 at each row's first real token, so left padding does not shift RoPE."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def response_hidden(model: Transformer, *, prompt_ids, prompt_mask, response_ids, response_mask,
                    prompt_group: int = 1) -> jax.Array:
    """Hidden states `[N, R, D]` at the positions that predict each response token, for left-padded
    prompts `[N, P]` and right-padded responses `[N, R]`.

    With `prompt_group` g > 1, rows g·k … g·k+g-1 must share one prompt: the prompt of each group runs
    once through the model's KV-cache path, its keys and values are repeated for the group's g rows, and
    the responses run against them. Same result as g = 1 (one full pass per row) up to float rounding,
    gradients included (they flow back through the repeat into the one prompt pass).
    """
    p, r = prompt_ids.shape[1], response_ids.shape[1]
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)  # [N, T]
    positions = positions_from_mask(mask)
    if prompt_group == 1:
        hidden, _ = model.hidden_states(jnp.concatenate([prompt_ids, response_ids], axis=1), positions, mask)
        return hidden[:, p - 1:p + r - 1]
    n, g = prompt_ids.shape[0], prompt_group
    if n % g:
        raise ValueError(f"{n} rows do not split into prompt groups of {g}: micro-batches must hold whole groups")
    first = lambda x: x.reshape((n // g, g) + x.shape[1:])[:, 0]  # each group's first row [N/g, ...]
    prompt_hidden, cache = model.hidden_states(first(prompt_ids), first(positions)[:, :p], first(mask),
                                               cache=model.init_cache(n // g, p + r))
    cache = jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), cache)
    hidden, _ = model.hidden_states(response_ids, positions[:, p:], mask, cache=cache, write_index=p)
    # Left padding puts every prompt's last token at P-1: its hidden state predicts response token 0.
    return jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], g, axis=0), hidden[:, :-1]], axis=1)
