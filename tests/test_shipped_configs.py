"""Every shipped config runs in the suite as shipped (issue 29): what users run, run here.

The paper configs (configs/arithmetic.py, algebra.py, coding.py; algebra also with
`--config.model.lora.rank=4`) and configs/colab_tpu.py (which the Colab notebook's TPU cell trains) run as a user runs them, `python -m sqlm_jax.main` in a subprocess on one CPU device, with only their
model swapped for the shipped tiny model of their task (and the task options that model was pretrained
on: its prompts, question template and held-out family) and their sizes shrunk (rows, lengths, steps,
held-out problems); every other field as shipped: remat, bfloat16 compute (and colab_tpu's bfloat16
base under LoRA), the memory knobs left to the plan (-1), GAE with a critic and no KL for coding. One
field that is not a size changes: the proposer is updated every 2 steps instead of 5, so that two
steps reach a proposer update. Each runs 2 steps to a checkpoint, resumes to a 3rd, and its export is
scored by `python -m sqlm_jax.evaluate` as the run's last evaluation scored the policy; run.json must
hold the shipped config but for exactly those changes. The tiny ablation configs and the pretraining
configs run end to end too, shrunk the same way, and a table names the test that runs each file of
sqlm_jax/configs/: a config added without one fails here.

Every one runs by default; SQLM_JAX_TEST_SHIPPED=quick runs arithmetic and colab_tpu only, and builds
and validates every other run's config (see `full_tier`).

Shared compiled work: every run is one CPU device under the session's persistent compilation cache
(tests/conftest.py); a resume or an evaluation repeats its run's shapes (but for a new longest solver
prompt), so it compiles little.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sqlm_jax import configs
from sqlm_jax.config_check import validate
from sqlm_jax.models import load_pretrained
from tests.sandbox_marks import needs_bwrap
from tests.tiny_models import (notebook_tpu_config, on_tiny_model, shipped_on_tiny_model,
                               subprocess_xla_flags)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu_demo.ipynb"
# One CPU device, as a user has; the session's flags otherwise (its compilation cache, no LLVM
# optimisation passes: these runs are a few short steps, where compiling is most of the work).
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}

# Two self-play steps, the second updating the proposer, then a resume to a third. The shipped
# rl.proposer_update_freq=5 would first update the proposer at step 5: it is 2 here, the one field
# changed that is not a size (steps cost little, but each compiles anew where its shapes are new).
STEPS = 2
# What each run changes besides the model: sizes only. Rows: 2 prompts (8 proposals, 32 answers) in
# mini-batches of one prompt row (the shipped configs' two or more mini-batches a step); lengths the
# tiny models' answers need (configs/tiny*.py); 8 held-out problems.
_SMALL = {"rollout.batch_size": 2, "rl.mini_batch_size": 1, "train.steps": STEPS, "eval.num_problems": 8,
          "rl.proposer_update_freq": STEPS}
_ARITHMETIC = {**_SMALL, "rollout.proposer_max_new_tokens": 16, "rollout.solver_max_new_tokens": 48,
               "eval.max_new_tokens": 48}
SIZES = {
    "arithmetic": _ARITHMETIC,
    "algebra": {**_SMALL, "rollout.proposer_max_new_tokens": 112, "rollout.solver_max_new_tokens": 64,
                "eval.max_new_tokens": 64},
    # One prompt row (4 proposals, 16 programs): coding's steps are the longest (its answers, the
    # critic), and its solver prompts (the proposed problems) change length, and so compile, each step.
    "coding": {**_SMALL, "rollout.batch_size": 1, "rollout.proposer_max_new_tokens": 336,
               "rollout.solver_max_new_tokens": 208, "eval.max_new_tokens": 208},
    # Its 64 rows in flight of the solver's 256: 8 of 32 here, so that slots are refilled as shipped.
    "colab_tpu": {**_ARITHMETIC, "rollout.rows_in_flight": 8},
}
# Resolved by the plan when shipped as -1 (run.json records what it chose), to at least this.
AUTO = {"rl.micro_batch_size": 1, "rollout.rows_in_flight": 0}

# Two tiers. Each run costs 20-220 s of one CPU core, most of it XLA compiling the run's ~7-10
# programs (each shipped config has its own: its model, LoRA, critic, lengths); all of them take
# ~900 CPU-seconds, more than the rest of the suite's 2-worker budget leaves. The suite runs one run
# of each code path the paper configs add to the tiny ones: arithmetic (remat, bfloat16 compute, the
# auto memory knobs; main, resume and evaluate as a user runs them) and colab_tpu (LoRA over a
# bfloat16 base, rows in flight refilled); the others too unless SQLM_JAX_TEST_SHIPPED=quick (~15 minutes
# alone on 2 cores), and every one of their configs is built and validated here in any case.
ALL = os.environ.get("SQLM_JAX_TEST_SHIPPED", "all") == "all"  # "quick": only the default pair
full_tier = pytest.mark.skipif(not ALL, reason="the full shipped-config tier: set SQLM_JAX_TEST_SHIPPED=all")

WRAPPER = '''"""configs/NAME.py as shipped on its task's tiny model, sizes shrunk (tests/test_shipped_configs.py)."""
from tests.tiny_models import shipped_on_tiny_model

SIZES = {sizes!r}


def get_config(name):
    return shipped_on_tiny_model(name, SIZES[name])
'''


def _flat(tree, prefix=""):
    """A config's nested dict as {"a.b": value}; eval.second_set_options, a free-form dict, is one value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "second_set_options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run(module: str, *args: str, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"python -m {module} {' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "shipped_on_tiny.py"
    path.write_text(WRAPPER.format(sizes=SIZES))
    return path


def _expected(name: str) -> dict:
    """The config a run of `name` must record: as shipped, on the tiny model, with SIZES."""
    shipped = configs.get(name)
    config = on_tiny_model(shipped)
    flat = _flat(json.loads(config.to_json_best_effort()))
    flat.update(SIZES[name])
    return flat


def _check_as_shipped(name: str, workdir: Path, overrides: dict) -> dict:
    """run.json's config is `_expected(name)` but for `overrides`, the workdir and the auto knobs (which
    the plan resolved); returns it, flat."""
    recorded = _flat(json.loads((workdir / "run.json").read_text())["config"])
    expected = {**_expected(name), "workdir": str(workdir), **overrides}
    assert set(recorded) == set(expected)
    differ = {k for k in expected if recorded[k] != expected[k]}
    assert differ <= set(AUTO) and all(expected[k] == -1 for k in differ), \
        {k: (recorded[k], expected[k]) for k in differ}
    assert all(recorded[k] >= AUTO[k] for k in differ), {k: recorded[k] for k in differ}
    return recorded


def _check_steps(workdir: Path, last: int, config: dict) -> list[dict]:
    """metrics.jsonl's self-play steps 1..last: both roles' rewards, the solver's update every step, the
    proposer's every rl.proposer_update_freq steps, the KL term where the config has one, the critic
    (where there is one) on both roles every step; finite losses, no update skipped."""
    metrics = [m for m in _lines(workdir / "metrics.jsonl") if "reward/solver" in m]
    assert [m["step"] for m in metrics] == list(range(1, last + 1))
    critic, kl = config["rl.advantage"] == "gae", config["rl.use_kl"]
    for m in metrics:
        assert {"reward/proposer", "proposals/valid", "solver/loss", "solver/grad_norm"} <= set(m), sorted(m)
        assert ("proposer/loss" in m) == (m["step"] % config["rl.proposer_update_freq"] == 0), (m["step"], sorted(m))
        for role in ("solver", "proposer"):
            assert (f"{role}/critic_value_loss" in m) == critic, sorted(m)
            if f"{role}/loss" in m:
                assert (f"{role}/kl" in m) == kl, sorted(m)
        losses = {k: v for k, v in m.items() if k.endswith("loss")}
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert not any(v for k, v in m.items() if k.endswith("skipped_steps")), m
    # The tiny model reads the config's prompts: its proposals are mostly the task's questions.
    assert np.mean([m["proposals/valid"] for m in metrics]) > 0.5
    return metrics


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _overrides(flags) -> dict:
    """`--config.a.b=4` flags as {"a.b": 4}."""
    return {k.removeprefix("--config."): ast.literal_eval(v) for k, v in (f.split("=", 1) for f in flags)}


PAPER_RUNS = [
    pytest.param("arithmetic", [], id="arithmetic"),
    pytest.param("algebra", [], id="algebra", marks=full_tier),
    pytest.param("algebra", ["--config.model.lora.rank=4"], id="algebra_lora4", marks=full_tier),
    # GAE with a critic on both roles every step, no KL term, programs scored in the sandbox.
    pytest.param("coding", [], id="coding", marks=[full_tier, needs_bwrap]),
    # The paper's model on one TPU chip: LoRA (rank 16) over a bfloat16 base, its own learning rate.
    pytest.param("colab_tpu", [], id="colab_tpu"),
]


@pytest.mark.parametrize("name, flags", PAPER_RUNS)
def test_paper_config_runs_resumes_and_exports_as_shipped(name, flags, wrapper, tmp_path):
    """configs/NAME.py for STEPS steps (checkpointed at the last), resumed for one more, its export
    scored by `python -m sqlm_jax.evaluate` as the run's last evaluation scored the policy."""
    workdir = tmp_path / "run"
    config = [f"--config={wrapper}:{name}", f"--config.workdir={workdir}", *flags]
    first = _run("sqlm_jax.main", *config)
    summary = json.loads((workdir / "summary.json").read_text())
    recorded = _check_as_shipped(name, workdir, _overrides(flags))
    assert summary["steps"] == STEPS and summary["task"] == recorded["task"]
    assert [e["step"] for e in summary["eval_history"]] == [0, STEPS]
    assert "held-out greedy accuracy" in first.stdout
    _check_steps(workdir, STEPS, recorded)
    assert _checkpoints(workdir) == [STEPS]

    resumed = _run("sqlm_jax.main", *config, "--config.resume=True", f"--config.train.steps={STEPS + 1}")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == STEPS + 1 and "held-out greedy accuracy" in resumed.stdout
    assert [e["step"] for e in summary["eval_history"]] == [0, STEPS, STEPS + 1]
    _check_steps(workdir, STEPS + 1, recorded)
    assert _checkpoints(workdir) == [STEPS, STEPS + 1]

    export = workdir / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    _, cfg = load_pretrained(export)
    assert cfg.architecture == "Qwen2ForCausalLM"
    if recorded["model.param_dtype"] == "float32":  # (a bfloat16 base rounds three steps' change away)
        # The trained policy was exported (with LoRA, its adapters merged), not the base it started from.
        exported, base = (load_file(f / "model.safetensors") for f in (export, Path(recorded["model.path"])))
        assert set(exported) == set(base) and any(not np.array_equal(exported[k], base[k]) for k in base)

    # The export scored as the run's last evaluation scored the policy: same problems, prompts, lengths
    # (with LoRA, the adapters merged into the base).
    responses = workdir / "responses.jsonl"
    out = _run("sqlm_jax.evaluate", *config, f"--model={export}", f"--output={responses}")
    records = _lines(responses)
    assert len(records) == summary["eval"]["problems"] == recorded["eval.num_problems"]
    assert np.mean([r["greedy_score"] for r in records]) == pytest.approx(summary["final_accuracy"], abs=1e-6)
    greedy = float(re.search(r"^greedy accuracy: ([0-9.]+)", out.stdout, re.M).group(1))
    assert greedy == pytest.approx(summary["final_accuracy"], abs=1e-4)


@pytest.mark.parametrize("name, flags", [pytest.param(*p.values, id=p.id) for p in PAPER_RUNS])
def test_every_run_config_is_valid(name, flags):
    """What every run here trains, the full tier's included: the shipped config on the tiny model with
    SIZES (and the run's flags) passes the run's own checks, in any tier."""
    config = shipped_on_tiny_model(name, SIZES[name])
    for field, value in _overrides(flags).items():
        *parents, leaf = field.split(".")
        section = config
        for part in parents:
            section = section[part]
        section[leaf] = value
    validate(config)


def test_notebook_tpu_cell_trains_colab_tpu_as_shipped():
    """The notebook's TPU cell hands the Trainer configs/colab_tpu.py as shipped, its own workdir
    aside: the config that test_colab_tpu runs end to end, so the cell's run is that run."""
    from sqlm_jax import configs
    cell, shipped = notebook_tpu_config(NOTEBOOK), configs.get("colab_tpu")
    assert cell.model.path == "Qwen/Qwen2.5-3B-Instruct" and cell.model.lora.rank > 0
    cell.workdir = shipped.workdir
    assert cell.to_dict() == shipped.to_dict()


# ----------------------------------------------------------------- the tiny ablations, the pretraining
# Shrunk as tests/test_tiny_config.py shrinks configs/tiny.py, further: 2 prompt rows, answers of 48.
TINY_SIZES = ["--config.train.steps=2", "--config.rollout.batch_size=2", "--config.rl.mini_batch_size=2",
              "--config.rl.micro_batch_size=8", "--config.rollout.solver_max_new_tokens=48",
              "--config.eval.max_new_tokens=48", "--config.eval.second_set_max_new_tokens=48",
              "--config.eval.num_problems=8", "--config.eval.second_set_problems=8",
              "--config.eval.sampled_problems=8"]


@full_tier
@pytest.mark.parametrize("name", ["tiny_format_reward", "tiny_pregenerated"])
def test_tiny_ablation_config_runs(name, tmp_path):
    workdir = tmp_path / "run"
    out = _run("sqlm_jax.main", f"--config=configs/{name}.py", f"--config.workdir={workdir}", *TINY_SIZES)
    assert "held-out greedy accuracy" in out.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and (workdir / "export" / "model.safetensors").is_file()
    recorded = json.loads((workdir / "run.json").read_text())["config"]
    metrics = [m for m in _lines(workdir / "metrics.jsonl") if "reward/solver" in m]
    assert len(metrics) == 2 and all("solver/loss" in m for m in metrics)
    if name == "tiny_format_reward":
        assert recorded["reward"]["kind"] == "format"
        # Format-only rewards: every parseable answer is rewarded, so the tiny model's mostly are.
        assert np.mean([m["reward/solver"] for m in metrics]) > 0.5
    else:
        assert recorded["rollout"]["question_source"] == "pregenerated"
        # The pool is proposed once at the start; the proposer is never trained.
        assert not any(k.startswith("proposer/") for m in metrics for k in m)


PRETRAIN_SIZES = ["--config.train.steps=2", "--config.train.eval_every=1", "--config.eval.num_problems=8",
                  "--config.eval.watch_problems=8", "--config.eval.num_proposals=8"]


@full_tier
@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_algebra_pretrain",
                                  pytest.param("tiny_coding_pretrain", marks=needs_bwrap)])
def test_pretrain_config_runs(name, tmp_path):
    """`python -m sqlm_jax.pretrain --config=configs/NAME.py` for 2 steps, from a folder that is not the
    checkout (its out_dir is relative), into a new folder: the shipped asset's architecture and files."""
    config = configs.get(name)
    out_dir = tmp_path / "model"
    _run("sqlm_jax.pretrain", f"--config=configs/{name}.py", f"--config.out_dir={out_dir}", *PRETRAIN_SIZES,
         cwd=tmp_path)
    asset = ROOT / config.out_dir
    assert {p.name for p in out_dir.iterdir()} == {p.name for p in asset.iterdir()}
    assert json.loads((out_dir / "config.json").read_text()) == json.loads((asset / "config.json").read_text())
    metrics = json.loads((out_dir / "pretrain_metrics.json").read_text())
    assert [w["step"] for w in metrics["watched"]] == [1, 2]
    assert metrics["solver"]["num_problems"] == 8 and len(metrics["solver"]["greedy_scores"]) == 8
    load_pretrained(out_dir)


# ---------------------------------------------------------------------------------- every config
# Each file of sqlm_jax/configs/ and the test that runs it end to end, as shipped but for its model
# and sizes. A new config needs a run, and a line here.
RUN_BY = {
    "arithmetic": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "algebra": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "coding": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "colab_tpu": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "tiny": "test_tiny_config.py::test_tiny_config_runs_self_play_end_to_end",
    "tiny_algebra": "test_tiny_algebra.py::test_tiny_algebra_config_runs_self_play",
    "tiny_coding": "test_tiny_coding.py::test_tiny_coding_config_runs_self_play",
    "tiny_format_reward": "test_shipped_configs.py::test_tiny_ablation_config_runs",
    "tiny_pregenerated": "test_shipped_configs.py::test_tiny_ablation_config_runs",
    "tiny_pretrain": "test_shipped_configs.py::test_pretrain_config_runs",
    "tiny_algebra_pretrain": "test_shipped_configs.py::test_pretrain_config_runs",
    "tiny_coding_pretrain": "test_shipped_configs.py::test_pretrain_config_runs",
}


def test_every_shipped_config_has_an_end_to_end_run():
    """A config added to sqlm_jax/configs/ fails here until a test runs it end to end and RUN_BY says
    which; each named test exists, and runs that config (a parameter here, its name elsewhere)."""
    assert set(configs.names()) == set(RUN_BY), \
        "a config in sqlm_jax/configs/ without an end-to-end run in RUN_BY (or a run of a config gone)"
    for name, test in RUN_BY.items():
        module, function = test.split("::")
        if module == Path(__file__).name:
            marks = getattr(globals()[function], "pytestmark", [])
            params = [p.values[0] if hasattr(p, "values") else p for m in marks if m.name == "parametrize"
                      for p in m.args[1]]
            assert name in params, f"{test} does not run {name}"
        else:
            source = (ROOT / "tests" / module).read_text()
            tree = ast.parse(source)
            assert function in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, f"{test}: no such test"
            assert f"configs/{name}.py" in source or f'"{name}"' in source, f"{module} does not run {name}"
