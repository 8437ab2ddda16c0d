"""The deviceless compile (sqlm_jax.aot): a run's programs compiled by XLA's TPU compiler for a v5e-8
and a v4-8 on this CPU host, a scaled-down model in the paper configs' settings (remat, bfloat16
compute over float32 weights, slot refill, GAE with a critic for coding).

What is checked in the compiled programs: they compile; one chip holds less than the whole run; and
rows, not the width the weights are sharded on, are split over the chips: no collective of a sampler
or an update adds up (all-reduce, reduce-scatter) a tensor as wide as the model's activations. Before
the model pinned its residual stream to its rows (Transformer.row_mesh), XLA's partitioner split the
layers' matmuls on the fsdp-sharded width and all-reduced every row's activations in every layer.

Skipped, with the reason, only where libtpu cannot be loaded (pip install -e ".[aot]").
"""
import math
import re
import runpy
from pathlib import Path

import jax
import pytest

from sqlm_jax import aot
from sqlm_jax import mesh as mesh_lib
from sqlm_jax.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=1000, hidden_size=192, intermediate_size=640,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=48, qkv_bias=True,
                    param_dtype="float32", compute_dtype="bfloat16", remat=True, eos_token_id=2)
REDUCTION = re.compile(r"= (\(?[^=]*?) (?:all-reduce|reduce-scatter)\(")
GATHER = re.compile(r"= (\(?[^=]*?) all-gather(?:-start)?\(")
PERMUTE = re.compile(r"= (\(?[^=]*?) collective-permute(?:-start)?\(")
SHAPE = re.compile(r"(bf16|f16|f32)\[([\d,]*)\]")


def _devices(accelerator):
    try:
        return aot.slice_devices(accelerator)
    except aot.AotUnavailable as e:
        pytest.skip(str(e))


def _run(name: str, accelerator: str, rows_in_flight: int, model: ModelConfig = MODEL, prompt: int = 64,
         response: int = 128) -> aot.AbstractRun:
    """configs/NAME.py as shipped, with the model and the sizes shrunk."""
    c = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()
    c.rollout.batch_size, c.rollout.max_prompt_len = 16, prompt
    c.rollout.proposer_max_new_tokens = c.rollout.solver_max_new_tokens = response
    c.rl.mini_batch_size, c.rl.micro_batch_size, c.rollout.rows_in_flight = 8, 16, rows_in_flight
    family, devices = _devices(accelerator)
    c.mesh = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(dict(c.mesh), len(devices))))
    return aot.AbstractRun.build(c, model, devices)


def _weight_like(weights):
    """Whether sorted dims are a weight's, up to the TPU's tile padding."""
    shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(weights)}
    return lambda dims: any(len(w) == len(dims) and all(a <= d < a + 128 for a, d in zip(w, dims))
                            for w in shapes)


def _tensors(pattern: re.Pattern, hlo: str) -> list[list[int]]:
    """The sorted dims of the floating-point results of `pattern`'s collectives in `hlo`."""
    return [sorted(int(d) for d in dims.split(",") if d)
            for results in pattern.findall(hlo) for _, dims in SHAPE.findall(results)]


def activation_reductions(hlo: str, weights, decode_rows: int = 0) -> list[str]:
    """The floating-point tensors that `hlo`'s all-reduces and reduce-scatters sum and that are not
    a weight's gradient (up to the TPU's tile padding) nor a handful of metrics: activations, partial
    products of every row. `decode_rows`: a decode step's one position of each of that many rows is
    allowed: summing it moves a few MiB where gathering the step's weights moves the model (issue 31)."""
    is_weight, widest = _weight_like(weights), max(2 * MODEL.intermediate_size, MODEL.vocab_size)
    return [f"{dims}" for dims in _tensors(REDUCTION, hlo)
            if math.prod(dims) > 1024 and not is_weight(dims) and math.prod(dims) > decode_rows * widest]


def weight_gathers(hlo: str, weights) -> list[str]:
    """The weights (up to tile padding) that `hlo` all-gathers."""
    is_weight = _weight_like(weights)
    return [f"{dims}" for dims in _tensors(GATHER, hlo) if math.prod(dims) > 1024 and is_weight(dims)]


@pytest.mark.parametrize("config,accelerator,rows_in_flight,programs", [
    ("algebra", "v5e-8", 64, ("solver sampler", "solver policy update")),  # slot refill: 256 rows, 64 slots
    ("coding", "v4-8", 0, ("solver sampler", "solver critic update")),      # every row at once; the critic
])
def test_programs_compile_for_the_slice_with_rows_split(config, accelerator, rows_in_flight, programs):
    run = _run(config, accelerator, rows_in_flight)
    assert run.mesh.devices.size == (8 if accelerator == "v5e-8" else 4)
    lowered = {name: (phase, lower) for name, phase, lower, _ in run.programs()}
    assert {"proposer sampler", "solver log-prob pass", "proposer policy update"} <= set(lowered)
    assert ("solver critic update" in lowered) == (config == "coding")
    resident = sum(aot.per_chip_bytes(tree) for tree in run.resident().values())
    for name in programs:
        compiled = lowered[name][1]().compile()
        memory = compiled.memory_analysis()
        assert 0 < memory.argument_size_in_bytes <= resident
        assert memory.generated_code_size_in_bytes > 0
        weights = [run.learner.state.params, None if run.learner.critic_state is None
                   else run.learner.critic_state.params]
        decode_rows = rows_in_flight or 16 * 4 * 4 if name.endswith("sampler") else 0
        assert activation_reductions(compiled.as_text(), weights, decode_rows) == [], name


def test_a_decode_step_reads_each_chips_share_of_the_weights():
    """A decode step gathers no weight: each chip multiplies its share and the rows' one position is
    summed over the chips (a training layout's rows pinned in decode gathered every weight, and the
    embedding table several times, in every step: issue 31)."""
    from sqlm_jax import step_time
    run = _run("algebra", "v5e-8", 64)
    hlo = step_time.lower_decode_step(run, "solver").compile().as_text()
    assert weight_gathers(hlo, run.learner.state.params) == []


def test_an_update_gathers_each_layers_weights_rather_than_passing_shards_around():
    """A pass over many positions multiplies each layer's weights gathered whole: no fsdp shard of a
    layer's weight goes around the ring (collective-permute). Left split on the width they contract,
    XLA's TPU program multiplied the shards one at a time into float32 partial sums of the whole
    activation (a windowed einsum; ~2/3 of the paper's update's memory traffic, tpu/README.md). XLA
    does that only for operands this large: the model is wider than the other tests' and one layer deep."""
    import dataclasses
    from sqlm_jax import step_time
    model = dataclasses.replace(MODEL, hidden_size=1024, intermediate_size=4096, num_layers=1, num_heads=8,
                                head_dim=128)
    run = _run("algebra", "v5e-8", 0, model, prompt=256, response=768)
    hlo = step_time.lower_optimizer_step(run, "solver").compile().as_text()
    layer = run.learner.state.params["layers"][0]
    shards = {tuple(sorted(d for d in x.sharding.shard_shape(x.shape) if d > 1)) for x in jax.tree.leaves(layer)
              if x.ndim > 1}
    permuted = {tuple(sorted(d for d in dims if d > 1)) for dims in _tensors(PERMUTE, hlo)}
    assert shards and not shards & permuted


def test_topology_names():
    assert aot.topology_shape(8, 2) == (2, 4) and aot.topology_shape(1, 2) == (1, 1)
    assert aot.topology_shape(4, 3) == (2, 2, 1) and aot.topology_shape(16, 3) == (2, 2, 4)
    assert aot.topology_shape(64, 3) == (4, 4, 4)
    with pytest.raises(aot.AotUnavailable, match="power of two"):
        aot.topology_shape(12, 2)
    with pytest.raises(aot.AotUnavailable, match="TPU slice"):
        aot.slice_devices("h100")


@pytest.mark.parametrize("offload", [True, False])
def test_the_buffers_beside_each_program(offload):
    """While the samplers run, the optimizer state and the reference weights wait in host memory
    (rollout.offload_to_host, as the paper configs ship) or stay on the chips; the update takes the
    optimizer state itself and leaves the reference beside it."""
    run = _run("algebra", "v5e-8", 64)
    assert run.config.rollout.offload_to_host  # as shipped
    run.config.rollout.offload_to_host = offload
    state, ref = run.learner.state, run.learner.ref_params
    optimizer, reference = aot.per_chip_bytes(state.opt_state), aot.per_chip_bytes(ref)
    # AdamW's two moments, and its counters (int32 scalars)
    assert 0 <= optimizer - 2 * aot.per_chip_bytes(state.params) <= 16 and reference > 0
    passed = {name: (phase, args) for name, phase, _, args in run.programs()}
    beside = run.outside(*passed["solver sampler"][:1], *passed["solver sampler"][1])
    assert beside == (0 if offload else optimizer + reference + 4)  # + the step counter
    assert run.outside("training", *passed["solver policy update"][1]) == reference


def test_with_a_critic_the_other_models_state_is_not_beside_an_update():
    """Coding (a critic, offload to host as shipped): beside the policy's update neither the critic's
    TrainState nor anything else waits on the chips; beside the critic's, not the policy's."""
    run = _run("coding", "v4-8", 0)
    passed = {name: args for name, _, _, args in run.programs()}
    critic = aot.per_chip_bytes(run.learner.critic_state)
    policy = sum(aot.per_chip_bytes(run.resident()[k]) for k in ("policy params", "policy optimizer"))
    assert critic > 0 and policy > 0
    update = lambda name, **kw: run.outside("training", *passed[name], **kw)
    assert update("solver policy update") == critic  # the program's name not given: all stays
    assert update("solver policy update", program="solver policy update") == 0
    assert update("solver critic update") == policy
    assert update("solver critic update", program="solver critic update") == 0
    run.config.rollout.offload_to_host = False
    assert update("solver policy update", program="solver policy update") == critic


def test_the_tpu_compiler_judges_the_auto_micro_batch():
    """`-1` on a TPU slice: the compiler's judge compiles the smallest micro-batch (8 sequences, one
    per chip), then the largest that its figure plus the plan's growth puts within the limit (16,
    where the limit is set to hold it), and never the one the line through both rules out (32);
    the fit check and the report at the chosen knobs reuse what the search compiled."""
    from sqlm_jax import auto_knobs, plan
    run = _run("algebra", "v5e-8", 64)
    c = run.config
    c.rl.micro_batch_size = c.rollout.rows_in_flight = auto_knobs.AUTO  # 8 prompts × n = 4: 32, 16, 8
    judge = aot.CompiledJudge(MODEL, list(run.mesh.devices.flat), aot.usable_bytes("v5e"))
    mesh = dict(run.mesh.shape)
    at = {}
    for micro in (8, 16, 32):
        at[micro] = c.copy_and_resolve_references()
        at[micro].rl.micro_batch_size, at[micro].rollout.rows_in_flight = micro, 64
    planned = {m: plan.memory_plan(cfg, MODEL, mesh).during("training") for m, cfg in at.items()}
    compiled = {m: judge(at[m], "training") for m in (8, 16)}
    judge.limit = max(compiled[16], compiled[8] + planned[16] - planned[8])
    slope = (compiled[16] - compiled[8]) / (planned[16] - planned[8])
    assert compiled[16] + (planned[32] - planned[16]) * slope > judge.limit  # the line rules 32 out
    resolved = auto_knobs.resolve(c, MODEL, mesh, 1 << 40, judge)
    assert resolved.rl.micro_batch_size == 16
    updates = [key for name, key in judge._compiled if name == "solver policy update"]
    assert sorted(knobs_of(key) for key in updates) == [8, 16]
    kept = dict(judge._compiled)
    assert judge.programs(resolved, ["solver policy update"])[0].total == compiled[16]
    assert judge(resolved, "sampling") <= judge.limit and judge._compiled == kept


def knobs_of(key: str) -> int:
    import json
    return json.loads(key)["rl"]["micro_batch_size"]


def test_xla_refusing_a_program_for_memory_is_a_figure():
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(33.19G) exceeds available HBM (30.75G).")
    assert aot.exhausted_temporaries(refusal) == int(33.19 * 2 ** 30)
    assert aot.exhausted_temporaries(refusal.replace("33.19G", "512M")) == 512 * 2 ** 20
    assert aot.exhausted_temporaries("INVALID_ARGUMENT: shapes differ") is None


def test_a_slice_this_host_lacks_compiles_each_program_in_a_process_of_its_own(monkeypatch):
    """plan --compile's judge (`accelerator`) compiles in a fresh process, so the host memory XLA's
    compiler grows to is handed back after each program of a knob search; the figures are the same
    as compiled here."""
    run = _run("algebra", "v5e-8", 64)
    devices, usable = list(run.mesh.devices.flat), aot.usable_bytes("v5e")
    [here] = aot.CompiledJudge(MODEL, devices, usable).programs(run.config, ["solver log-prob pass"])
    monkeypatch.setattr(aot.AbstractRun, "compile", lambda *a, **k: pytest.fail("compiled in this process"))
    lines = []
    judge = aot.CompiledJudge(MODEL, devices, usable, log=lines.append, accelerator="v5e-8")
    [apart] = judge.programs(run.config, ["solver log-prob pass"])
    assert (apart.total, apart.temporaries, apart.arguments) == (here.total, here.temporaries, here.arguments)
    assert lines == [aot.describe(apart, run.config)]
