"""What tests/test_shipped_*.py share: a shipped config run as a user runs it, `python -m sqlm_jax.main`
in a subprocess on one CPU device, with only its model swapped for the shipped tiny model of its task and
its sizes shrunk (SIZES); and the checks of such a run. The runs are split over modules so that the
suite's two workers (`-n 2 --dist loadfile`, one module per worker) share them."""
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
from sqlm_jax.models import load_pretrained
from tests.tiny_models import on_tiny_model, subprocess_xla_flags

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
# The paper configs ship their memory knobs as -1: the plan picks them here (on TPU the compiler).
_ARITHMETIC = {**_SMALL, "rollout.proposer_max_new_tokens": 16, "rollout.solver_max_new_tokens": 48,
               "eval.max_new_tokens": 48}
SIZES = {
    "arithmetic": _ARITHMETIC,
    # On a v5e-8 the compiler picks 512 rows in flight of the solver's 1,024 (tpu/README.md): 16 of 32
    # here, so that slots are refilled as there.
    "algebra": {**_SMALL, "rollout.proposer_max_new_tokens": 112, "rollout.solver_max_new_tokens": 64,
                "eval.max_new_tokens": 64, "rollout.rows_in_flight": 16},
    # One prompt row (4 proposals, 16 programs): coding's steps are the longest (its answers, the
    # critic), and its solver prompts (the proposed problems) change length, and so compile, each step.
    # On a v5e-8 the compiler picks 256 rows in flight of the solver's 16,384: 8 of 16 here, so that
    # slots are refilled as there.
    "coding": {**_SMALL, "rollout.batch_size": 1, "rollout.proposer_max_new_tokens": 336,
               "rollout.solver_max_new_tokens": 208, "eval.max_new_tokens": 208, "rollout.rows_in_flight": 8},
    # Its 64 rows in flight of the solver's 256: 8 of 32 here, so that slots are refilled as shipped.
    # Its micro-batch of 8 does not divide a mini-batch of 4 sequences: 4.
    "colab_tpu": {**_ARITHMETIC, "rl.micro_batch_size": 4, "rollout.rows_in_flight": 8},
}
ALGEBRA_LORA = ["--config.model.lora.rank=4"]  # algebra's second run: LoRA over its bfloat16 compute
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


def check_paper_run(name: str, flags: list[str], wrapper: Path, tmp_path: Path) -> None:
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
