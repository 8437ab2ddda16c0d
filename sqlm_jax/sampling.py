"""Sampling: prefill a batch of left-padded prompts once, then decode with a KV cache, all in one jit.

    prompts ──left pad to a bucketed length P──▶ prompt tokens [B, P]
      ──prefill──▶ KV cache of the P prompt slots (the prefix), first-token logits repeated n times
      ──▶ DecodeState over N = B·n rows ──decode segments (while loops)──▶ tokens, log-probs [N, R]

(Shapes: the package's alphabet, sqlm_jax/__init__.py; R is max_new_tokens, S the rows' cache slots.)

Samples of prompt i are rows i·n … i·n+n-1; they share prompt i's slots of the prefix and each keeps
its own cache of response slots. A row ends with its first stop id; decoding ends early once
every row has. Greedy decoding is temperature 0.

The log-prob reported for a token is log softmax of the model's raw logits (temperature 1, no top-k /
top-p) at that token: what PPO's old-policy ratio needs, whatever distribution the token was drawn from.

Compilation: one program per (model structure, weight shapes and shardings, number of prompts,
bucketed prompt length P, SamplingParams, mesh); jax.jit caches it, and `bucket_length` keeps a training
run to a handful of P. The model enters as nnx.split's graphdef (static) and state (an argument):
`sample` takes them as they are (a trainer holds them split), `generate` takes a model.

Speed (bench/sampling.py, docs/benchmarks.md): decoding runs in a few segments, each a
`jax.lax.while_loop`. Before a segment the cache grows to just the slots its last step can reach, so
early steps do not read empty slots. The cache lives and dies inside the one compiled call: XLA
updates it in place, which is what donating it between separate prefill and decode calls would buy,
without a host round trip between them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sqlm_jax import mesh as mesh_lib
from sqlm_jax import refill
from sqlm_jax.models import fused_attention
from sqlm_jax.models.attention import LayerCache
from sqlm_jax.models.transformer import Transformer
from sqlm_jax.prompt_pass import constrain_cache, prompt_pass
from sqlm_jax.tokenizer import pad_left

# Decoding is split into segments of about MIN_SEGMENT steps, at most MAX_SEGMENTS of them. Each segment
# is one more copy of the decode step for XLA to compile (~0.5 s on the 2-core bench machine) and saves
# reading the cache slots its steps cannot reach yet (N=64: 2 segments are ~3-9% faster than 1).
MAX_SEGMENTS = 4
MIN_SEGMENT = 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The static knobs of one compiled sampler. temperature 0 means greedy (argmax)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0          # 0: off
    top_p: float = 1.0      # 1: off
    n: int = 1
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # Rows decoded at once (0: all N). Fewer than N: slots refill as rows stop (sqlm_jax.refill), so
    # memory holds W rows' cache and the work follows the tokens generated. Never changes the tokens.
    rows_in_flight: int = 0

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.n < 1:
            problems.append(f"n={self.n} must be at least 1")
        if self.rows_in_flight < 0:
            problems.append(f"rows_in_flight={self.rows_in_flight} must be >= 0 (0 = every row at once)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass
class SampleOutput:
    """Responses of N = B·n rows (rows i·n … i·n+n-1 answer prompt i), R = max_new_tokens.

    The responses stay on the device(s), where the update uses them; the prompts stay on the host,
    where they were padded (the update trims and places them itself).
    """

    tokens: jax.Array         # [N, R] int32; pad_id after the stop token
    logprobs: jax.Array       # [N, R] float32; log p(token) at temperature 1, 0 where masked
    mask: jax.Array           # [N, R] bool; response tokens, the stop token included
    token_lists: list[list[int]]  # each response up to and including its stop id
    prompt_tokens: np.ndarray  # [N, P] int32, left padded with pad_id
    prompt_mask: np.ndarray    # [N, P] bool
    n: int                     # samples per prompt


class DecodeState(NamedTuple):
    """What the decode loop carries over N rows, P prompt slots and R new tokens."""

    step: jax.Array          # [] int32: tokens generated so far
    tokens: jax.Array        # [N, R] int32, pad_id where not (yet) generated
    logprobs: jax.Array      # [N, R] float32
    done: jax.Array          # [N] bool: the row has emitted a stop id
    positions: jax.Array     # [N] int32: RoPE position of the last generated token
    kv_mask: jax.Array       # [N, T] bool: real prompt slots and all response slots
    prefix: list[LayerCache]  # per layer, the prompts' keys [B, K, H, P] and values, shared by n rows each
    cache: list[LayerCache]  # per layer, the responses' keys [N, K, H, S] and values [N, K, S, H], S < R
    keys: jax.Array          # [N] PRNG keys, row i's fold_in(key, i) (`draw`)


def bucket_length(length: int) -> int:
    """The padded prompt length: the next of 16, 32, …, 512, then the next multiple of 512.

    Powers of two keep short prompts to a few compiled shapes; past 512, doubling would waste too much
    prefill work, so lengths grow in steps of 512.
    """
    if length <= 512:
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 512) * 512


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """`logits[..., V]` with all but the k largest set to -inf (ties with the k-th largest are kept)."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """`logits[..., V]` keeping the smallest set of most likely tokens whose probability reaches p.

    A token is kept when the tokens strictly more likely than it hold less than p of the mass, so the
    most likely token always survives.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The least likely kept token's logit is the threshold: everything at least as likely stays.
    threshold = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row from `logits[N, V]`: argmax at temperature 0, else temperature, top-k, top-p;
    row i's randomness from its own `keys[i]`, so it does not depend on the other rows."""
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    # The exponential race: with E_i ~ Exp(1), argmax_i p_i / E_i is token i with probability p_i (the
    # Gumbel-max trick with one logarithm per token instead of two; sampling was ~9% of decoding on CPU).
    # p is left unnormalized (argmax does not care) and tiny keeps E_i > 0.
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    uniform = lambda key: jax.random.uniform(key, logits.shape[-1:], minval=jnp.finfo(jnp.float32).tiny)
    race = -jnp.log(jax.vmap(uniform)(keys))
    return jnp.argmax(probs / race, axis=-1).astype(jnp.int32)


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """`[N]` keys, one per row id: the random stream of row i is fold_in(key, i) whatever its slot."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, rows)


def draw(logits: jax.Array, keys: jax.Array, steps: jax.Array, params: SamplingParams
         ) -> tuple[jax.Array, jax.Array]:
    """Token and its log-prob (temperature 1, unfiltered) `[N]` from `logits[N, V]`, row i's token
    `steps[i]` drawn with fold_in(keys[i], steps[i])."""
    step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(steps, keys.shape))
    token = sample_tokens(logits, step_keys, params)
    return token, jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, -1)


def _emit(state: DecodeState, logits: jax.Array, params: SamplingParams) -> DecodeState:
    """Samples token `state.step` of every row from `logits[N, V]` and records it."""
    token, logprob = draw(logits, state.keys, state.step, params)
    # Rows already finished keep emitting pad with log-prob 0; their forward passes are wasted work
    # that a static batch shape cannot avoid.
    token = jnp.where(state.done, params.pad_id, token)
    logprob = jnp.where(state.done, 0.0, logprob)
    is_stop = jnp.isin(token, jnp.asarray(params.stop_ids, jnp.int32)) if params.stop_ids else False
    return state._replace(
        step=state.step + 1,
        tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, token, state.step, 1),
        logprobs=jax.lax.dynamic_update_index_in_dim(state.logprobs, logprob, state.step, 1),
        done=state.done | is_stop,
    )


def _constrain_state(state: DecodeState, mesh: Mesh | None) -> DecodeState:
    rows = lambda x: mesh_lib.constrain_rows(x, mesh)
    return state._replace(tokens=rows(state.tokens), logprobs=rows(state.logprobs), done=rows(state.done),
                          positions=rows(state.positions), kv_mask=rows(state.kv_mask),
                          prefix=constrain_cache(state.prefix, mesh), cache=constrain_cache(state.cache, mesh))


def _grow_cache(cache: list[LayerCache], length: int) -> list[LayerCache]:
    """Pads every layer's cache with empty slots up to `length` (keys `[N, K, H, S]`, values `[N, K, S, H]`)."""
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)
    return [LayerCache(pad(layer.k, 3), pad(layer.v, 2)) for layer in cache]


def segment_ends(max_new_tokens: int) -> list[int]:
    """The step counts at which decode segments end: steps 1 … R-1 in near-equal parts of about
    MIN_SEGMENT steps, at most MAX_SEGMENTS of them."""
    steps = max_new_tokens - 1
    parts = min(MAX_SEGMENTS, max(1, round(steps / MIN_SEGMENT)))
    return [1 + math.ceil(steps * (j + 1) / parts) for j in range(parts)] if steps else []


def _prefill(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array,
             params: SamplingParams, mesh: Mesh | None) -> DecodeState:
    """Runs the `[B, P]` prompts once and samples each row's first token.

    The prompts' cache becomes the prefix that each prompt's n rows share; the rows' own cache starts
    empty and decoding grows it.
    """
    b, n, new = prompt_tokens.shape[0], params.n, params.max_new_tokens
    last, prefix = prompt_pass(model, prompt_tokens, prompt_mask, mesh)
    logits = model.logits(last)  # [B, V]: left padding puts every prompt's end at P-1
    repeat = lambda x: jnp.repeat(x, n, axis=0)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((b * n, new), params.pad_id, jnp.int32),
        logprobs=jnp.zeros((b * n, new), jnp.float32),
        done=jnp.zeros((b * n,), bool),
        positions=repeat(prompt_mask.sum(axis=1, dtype=jnp.int32)) - 1,
        kv_mask=repeat(jnp.concatenate([prompt_mask, jnp.ones((b, new), bool)], axis=1)),
        prefix=prefix,
        cache=model.init_cache(b * n, 0),
        keys=mesh_lib.constrain_rows(row_keys(key, jnp.arange(b * n)), mesh),
    )
    return _emit(_constrain_state(state, mesh), repeat(logits), params)


def _decode_segment(model: Transformer, state: DecodeState, end: int, params: SamplingParams,
                    mesh: Mesh | None) -> DecodeState:
    """Generates tokens `state.step` … `end - 1` (fewer once every row has stopped).

    The rows' cache is first grown to end - 1 slots, all that step end - 1 can have filled, so the
    segment's queries never read slots that no step of it can reach; with the splash kernel, to its
    next whole block (at most R): the kernel reads whole blocks, and padding the cache to them would
    copy it every step.
    """
    prompt_len = state.kv_mask.shape[1] - params.max_new_tokens
    length = end - 1
    if fused_attention.chosen(model.config.attention, mesh):
        length = min(fused_attention.padded(length), params.max_new_tokens)
    kv_mask = state.kv_mask[:, :prompt_len + length]
    running = lambda state: (state.step < end) & ~jnp.all(state.done)
    state = _constrain_state(state._replace(cache=_grow_cache(state.cache, length)), mesh)
    return jax.lax.while_loop(running, lambda state: decode_step(model, state, kv_mask, params, mesh), state)


def decode_step(model: Transformer, state: DecodeState, kv_mask: jax.Array, params: SamplingParams,
                mesh: Mesh | None) -> DecodeState:
    """Token `state.step` of every row, over the cache slots `kv_mask [N, P + S]` covers."""
    last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [N, 1]
    positions = state.positions + 1
    hidden, cache = model.hidden_states(last, positions[:, None], kv_mask, cache=state.cache,
                                        write_index=state.step - 1, prefix=state.prefix)
    state = state._replace(positions=positions, cache=cache)
    return _constrain_state(_emit(state, model.logits(hidden[:, 0]), params), mesh)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("params", "mesh"))
def _sample(graphdef: nnx.GraphDef, weights: nnx.State, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            key: jax.Array, *, params: SamplingParams, mesh: Mesh | None) -> dict[str, jax.Array]:
    """Prefill and every decode step in one compiled call: tokens, log-probs and mask `[N, R]`.

    Every row at once (a static batch in segments), or under a budget of rows in flight with slot
    refill (sqlm_jax.refill); the same tokens either way.
    """
    dtype = nnx.merge(graphdef, weights).config.compute_dtype
    model: Transformer = nnx.merge(graphdef, mesh_lib.sampling_weights(weights, dtype))
    if 0 < params.rows_in_flight < prompt_tokens.shape[0] * params.n:
        rows_draw = lambda logits, rows, steps: draw(logits, row_keys(key, rows), steps, params)
        tokens, logprobs = refill.decode(model, prompt_tokens, prompt_mask, params, mesh, rows_draw)
    else:
        state = _prefill(model, prompt_tokens, prompt_mask, key, params, mesh)
        for end in segment_ends(params.max_new_tokens):
            state = _decode_segment(model, state, end, params, mesh)
        tokens, logprobs = state.tokens, state.logprobs
    stops = jnp.isin(tokens, jnp.asarray(params.stop_ids, jnp.int32)) if params.stop_ids \
        else jnp.zeros(tokens.shape, bool)
    # Log-probs are already 0 after the stop: finished rows record 0.
    return dict(tokens=tokens, logprobs=logprobs,
                mask=(jnp.cumsum(stops, axis=1) - stops) == 0)  # no stop token before this one


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, n: int = 1,
             stop_ids: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
             mesh: Mesh | None = None, rows_in_flight: int = 0) -> SampleOutput:
    """Samples `n` responses of at most `max_new_tokens` tokens to each prompt (lists of token ids).

    temperature 0 is greedy decoding; top_k 0 and top_p 1 switch those filters off. A row ends after
    its first token in `stop_ids`. With a `mesh`, the model's weights may be sharded on it and the
    rows are split over its batch axes (data, fsdp). `rows_in_flight` (0: all) bounds the rows decoded
    at once (SamplingParams). One compiled program serves every call with the same model structure,
    bucketed prompt length, number of prompts and knobs.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                            top_k=int(top_k), top_p=float(top_p), n=int(n),
                            stop_ids=tuple(int(i) for i in stop_ids), pad_id=int(pad_id),
                            rows_in_flight=int(rows_in_flight))
    graphdef, weights = nnx.split(model)
    return sample(graphdef, weights, prompts, params=params, seed=seed, mesh=mesh)


def sample(graphdef: nnx.GraphDef, weights: nnx.State, prompts: Sequence[Sequence[int]], *,
           params: SamplingParams, seed: int, mesh: Mesh | None = None) -> SampleOutput:
    """`generate` for a model held split, as `nnx.split` gives it, with its knobs built once."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    tokens, mask = pad_left(prompts, params.pad_id, bucket_length(max(map(len, prompts))))
    out = _sample(graphdef, weights, *mesh_lib.shard_rows((tokens, mask), mesh),
                  jax.random.key(seed), params=params, mesh=mesh)
    responses = np.asarray(mesh_lib.gather(out["tokens"]))
    lengths = np.asarray(mesh_lib.gather(out["mask"])).sum(axis=1)
    repeat = lambda x: np.repeat(x, params.n, axis=0)
    return SampleOutput(token_lists=[row[:length].tolist() for row, length in zip(responses, lengths)],
                        prompt_tokens=repeat(tokens), prompt_mask=repeat(mask), n=params.n, **out)
