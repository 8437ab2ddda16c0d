"""The projected step time (sqlm_jax.step_time): XLA's cost of a step's loop bodies, compiled for a
v5e-8 on this CPU host, extrapolated in depth and multiplied by the config's trip counts.

Skipped, with the reason, only where libtpu cannot be loaded (pip install -e ".[aot]").
"""
import dataclasses
import json
import subprocess
import sys

import pytest

from sqlm_jax import aot, step_time
from test_aot import MODEL, ROOT, _run

V5E_PEAK, V5E_BANDWIDTH = step_time.CHIPS["v5e"]


def _timer(name="algebra", model=MODEL) -> step_time.StepTime:
    run = _run(name, "v5e-8", 64)  # batch 16 (n = 4), mini-batch 8 prompts, micro-batch 16 rows
    return step_time.StepTime(run.config, model, list(run.mesh.devices.flat), "v5e-8", log=lambda line: None)


def test_xla_counts_a_loop_body_once_so_the_update_is_costed_by_its_body():
    """The whole solver update (8 mini-batches of 2 micro-batches) costs, by XLA's count, what one
    mini-batch's optimizer step does: the loops' bodies once. project() multiplies them out (below)."""
    timer = _timer()
    run = timer._runs[MODEL.num_layers]  # the model's own depth: no extrapolation
    learner = run.learner
    whole = timer._costed(learner._update.lower(learner.state, run.batch("solver"), learner.frozen))
    body = timer.cost("optimizer step", "solver")
    assert whole.flops == pytest.approx(body.flops, rel=0.05)


def test_one_layers_cost_extrapolates_to_a_deeper_model():
    """A piece's cost at 1 and 2 layers, extrapolated to 4, is the 4-layer program's cost."""
    deep = dataclasses.replace(MODEL, num_layers=4)
    timer = _timer(model=deep)
    extrapolated = timer.cost("log-prob pass", "solver")
    direct = timer._costed(step_time.lower_logprob_pass(
        step_time.shallow_run(timer.config, deep, 4, timer.devices), "solver"))
    assert extrapolated.flops == pytest.approx(direct.flops, rel=0.02)
    assert extrapolated.bytes == pytest.approx(direct.bytes, rel=0.05)


def test_the_step_multiplies_each_piece_by_its_trip_count_and_schedule(monkeypatch):
    """Known costs per piece, the step's seconds by hand: algebra at the test's sizes, proposer policy
    updated every 5 steps, no critic."""
    per_piece = {"optimizer step": step_time.Cost(3e12, 8e11),
                 "log-prob pass": step_time.Cost(1e12, 1e9), "decode step": step_time.Cost(1e9, 4e9)}
    monkeypatch.setattr(step_time.StepTime, "cost", lambda self, piece, role, model="policy": per_piece[piece])
    timer = _timer()
    c = timer.config
    assert (c.rollout.batch_size, c.rollout.n, c.rl.mini_batch_size, c.rl.micro_batch_size) == (16, 4, 8, 16)
    assert c.rl.proposer_update_freq == 5 and c.rollout.solver_max_new_tokens == 128
    got = {p.name: p for p in timer.project()}
    assert set(got) == {f"{role} {program}" for role in ("proposer", "solver")
                        for program in ("sampler", "decode step", "log-prob pass", "policy update")}
    # Solver: 16 x 4 questions x 4 answers = 256 rows: 8 mini-batches of 32 rows, 2 micro-batches each.
    # Each micro-batch is costed as the optimizer step's body, bytes-bound (8e11 B / 819 GB/s).
    update = got["solver policy update"]
    assert update.projected_s == pytest.approx(8 * 2 * 8e11 / V5E_BANDWIDTH)
    assert update.ideal_s == pytest.approx(8 * 2 * 3e12 / V5E_PEAK)
    assert got["solver log-prob pass"].projected_s == pytest.approx(256 / 16 * 1e12 / V5E_PEAK)
    # The proposer: 64 rows, 2 mini-batches; its policy updated (and its batch prepared) every 5 steps.
    assert got["proposer policy update"].projected_s == pytest.approx(2 * 2 * 8e11 / V5E_BANDWIDTH)
    assert got["proposer policy update"].per_step == got["proposer log-prob pass"].per_step == 0.2
    # 256 rows, 64 in flight: 4 waves of 128 decode steps, each reading 4e9 bytes.
    assert got["solver sampler"].projected_s - got["solver sampler"].ideal_s == pytest.approx(
        512 * (4e9 / V5E_BANDWIDTH - got["solver decode step"].ideal_s))
    table, record = step_time.step_table(list(got.values()))
    assert record["projected_s"] == pytest.approx(sum(p.per_step * p.projected_s for p in got.values()))


def test_a_decode_steps_ideal_reads_the_chips_share_of_weights_and_live_cache_once(monkeypatch):
    monkeypatch.setattr(step_time.StepTime, "cost", lambda *args: step_time.Cost(1.0, 1.0))
    timer = _timer()
    run = timer._runs[MODEL.num_layers]
    weights = aot.per_chip_bytes(run.learner.policy[1])
    # 64 rows in flight, each its own cache half full (64 of 128 slots) and a quarter of its prompt's
    # 64 slots (4 rows share a prompt), 2 layers x k,v x 2 kv heads x 48 dims in bfloat16, over 8 chips.
    live_kv = 64 * (64 + 64 / 4) * (2 * 2 * 2 * 48 * 2) / 8
    decode = next(p for p in timer._sampler("solver") if p.name == "solver decode step")
    assert decode.ideal_s == pytest.approx((weights + live_kv) / V5E_BANDWIDTH)


def test_plan_compile_cli_judges_the_fit_and_projects_the_step(tmp_path):
    """The command a user runs before renting a slice, on a scaled-down model: every compile in a
    process of its own, exit 0 when the programs fit, the step's projection in the table and --json."""
    _run("algebra", "v5e-8", 64)  # skips where libtpu cannot be loaded
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MODEL.to_hf_dict()))
    sizes = {"model.path": tmp_path / "model", "rollout.batch_size": 16, "rollout.max_prompt_len": 64,
             "rollout.proposer_max_new_tokens": 128, "rollout.solver_max_new_tokens": 128,
             "rl.mini_batch_size": 8, "rl.micro_batch_size": 16, "rollout.rows_in_flight": 64}
    run = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.plan", "--config=configs/algebra.py", "--accelerator=v5e-8", "--compile",
         "--programs=solver log-prob pass", "--step_time", f"--json={tmp_path / 'out.json'}",
         *(f"--config.{key}={value}" for key, value in sizes.items())],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "solver log-prob pass" in run.stdout and "fits" in run.stdout and "one step" in run.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["fits"] and [p["name"] for p in record["programs"]] == ["solver log-prob pass"]
    assert record["programs"][0]["roofline_ratio"] >= 1.0
    step = record["step_time"]
    assert step["projected_s"] == pytest.approx(sum(p["runs_per_step"] * p["projected_s"] for p in step["programs"]))
