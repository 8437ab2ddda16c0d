"""LoRA (Hu et al. 2021, arXiv 2106.09685): low-rank adapters on the decoder's fused projections.

An adapted projection computes `y = x·W + (alpha / r)·(x·A)·B` with the base weight W frozen, A
`[in, r]` and B `[r, out]` over W's contracted (in) and output (out) dims, B zero at first so an adapted
model starts as exactly its base. The adapters are `nnx.LoRAParam` variables, a subclass of `nnx.Param`,
held beside their weight (`Attention.lora_qkv`, `lora_o`, `MLP.lora_gate_up`, `lora_down`), so one
filter splits a model into what is trained (the adapters) and what is frozen (the base):

    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)

The product is never merged into W while training: merging would build a weight-sized array per layer in
the forward pass and its weight-sized gradient in the backward one. Unmerged, the gradient w.r.t. the
adapters flows through activations `[N, T, r]`, and the base, an argument that is not differentiated,
has no gradient computed at all. `merged` folds an adapter into its weight for export (hf.py).

On the fused layouts (transformer.py) an adapter is one rank-r update of the whole fused weight: q, k
and v share A (as do gate and up), unlike PEFT's one adapter per HF projection. Exported merged, the
model is a plain HF checkpoint either way.

Why not a library: flax's `nnx.LoRA` wraps a 2-D `nnx.Linear` kernel (ours are einsum weights of 3-4
dims with logical axes), and qwix's LoraProvider adds adapters by intercepting the einsum / dot_general
calls of named modules, which misses the gate/up matmul inside `transformer.swiglu`'s custom VJP (its
hand-written backward would return no adapter gradient). A module of our own is ~60 lines.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sqlm_jax import mesh as mesh_lib

# target -> (the DecoderLayer submodule holding the weight, how many leading dims of it the input
# contracts with). Names as config.model.lora.targets gives them (config_check.LORA_TARGETS).
TARGETS = {"qkv": ("attn", 1), "o": ("attn", 2), "gate_up": ("mlp", 1), "down": ("mlp", 1)}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank 0: no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)

    @classmethod
    def from_config(cls, lora_cfg) -> "LoraSpec":
        return cls(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                   targets=tuple(t.strip() for t in lora_cfg.targets.split(",") if t.strip()))


class LoRA(nnx.Module):
    """The adapter of one weight `W [in..., out...]`: A `[in..., r]`, B `[r, out...]`, each carrying W's
    logical axes on W's dims (so it shards as W does), float32 whatever W's dtype (as PEFT keeps
    adapters: their updates are small)."""

    def __init__(self, weight: nnx.Param, contracted: int, spec: LoraSpec, rngs: nnx.Rngs):
        shape, r = weight.shape, spec.rank
        axes = weight.get_metadata().get("axes") or (None,) * len(shape)
        bound = 1 / math.sqrt(math.prod(shape[:contracted]))  # PEFT's Kaiming-uniform init of A
        self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), shape[:contracted] + (r,), jnp.float32,
                                                  -bound, bound), axes=tuple(axes[:contracted]) + (None,))
        self.b = nnx.LoRAParam(jnp.zeros((r,) + shape[contracted:], jnp.float32),
                               axes=(None,) + tuple(axes[contracted:]))
        self.scale = spec.alpha / r

    def __call__(self, x: jax.Array) -> jax.Array:
        """The update `[..., out]` (W's output dims flattened) for `x [..., in]` (its contracted dims
        flattened), in x's dtype."""
        r = self.a.shape[-1]
        low = (x @ self.a[...].astype(x.dtype).reshape(-1, r)) * self.scale  # [..., r]: scaled where small
        return low @ self.b[...].astype(x.dtype).reshape(r, -1)

    def merged(self, weight: jax.Array) -> jax.Array:
        """`W + scale·A·B` in W's layout and dtype (the sum in float32)."""
        r = self.a.shape[-1]
        delta = self.scale * (self.a[...].reshape(-1, r) @ self.b[...].reshape(r, -1))
        return (weight.astype(jnp.float32) + delta.reshape(weight.shape)).astype(weight.dtype)


def add_adapters(model, spec: LoraSpec, rngs: nnx.Rngs) -> None:
    """Attaches a fresh adapter to each targeted weight of every layer of `model` (a Transformer), in
    place."""
    for layer in model.layers:
        for target in spec.targets:
            owner_name, contracted = TARGETS[target]
            owner = getattr(layer, owner_name)
            # nnx.data: the attribute was None (static) until now
            setattr(owner, f"lora_{target}", nnx.data(LoRA(getattr(owner, target), contracted, spec, rngs)))


def adapters_by_weight(model) -> dict[str, LoRA]:
    """{the adapted weight's path, e.g. 'layers.0.attn.qkv': its adapter} of `model`."""
    found = {}
    for i, layer in enumerate(model.layers):
        for target, (owner_name, _) in TARGETS.items():
            adapter = getattr(getattr(layer, owner_name), f"lora_{target}")
            if adapter is not None:
                found[f"layers.{i}.{owner_name}.{target}"] = adapter
    return found


def attach(graphdef: nnx.GraphDef, params: nnx.State, spec: LoraSpec, *, seed: int, mesh=None
           ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The model `(graphdef, params)` with adapters: (graphdef of the adapted model, adapters placed on
    `mesh` as their weights' logical axes say, the base: the same arrays as `params`, not a copy)."""
    def adapted_model(params):
        model = nnx.merge(graphdef, params)
        add_adapters(model, spec, nnx.Rngs(seed))
        return model

    shardings = lambda adapters: mesh_lib.param_shardings(adapters, mesh)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):  # shapes, no weights
        adapted, adapters, _ = nnx.split(nnx.eval_shape(adapted_model, params), nnx.LoRAParam, ...)
        return adapted, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     adapters, shardings(adapters)), params
    # The base the split leaves is `params` itself: the same tree of the same arrays.
    adapted, adapters, _ = nnx.split(adapted_model(params), nnx.LoRAParam, ...)
    return adapted, jax.device_put(adapters, shardings(adapters)), params


def with_frozen(loss_fn, frozen: nnx.State | None):
    """`loss_fn(params, ...)` of a whole adapted model as a function of its adapters alone, the base
    `frozen` held fixed: differentiating it differentiates the adapters only. `loss_fn` itself when
    `frozen` is None (full fine-tuning)."""
    if frozen is None:
        return loss_fn
    return lambda adapters, *args: loss_fn(nnx.merge_state(frozen, adapters), *args)
