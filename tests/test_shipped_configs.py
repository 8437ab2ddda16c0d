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
from pathlib import Path

import pytest

from sqlm_jax import configs
from sqlm_jax.config_check import validate
from tests.sandbox_marks import needs_bwrap
from tests.shipped_runs import (ALGEBRA_LORA, NOTEBOOK, ROOT, SIZES, _overrides, check_paper_run,  # noqa: F401 (wrapper: a fixture)
                                full_tier, wrapper)
from tests.tiny_models import notebook_tpu_config, shipped_on_tiny_model

# algebra's two runs: tests/test_shipped_algebra.py.
PAPER_RUNS = [
    pytest.param("arithmetic", [], id="arithmetic"),
    # GAE with a critic on both roles every step, no KL term, programs scored in the sandbox.
    pytest.param("coding", [], id="coding", marks=[full_tier, needs_bwrap]),
    # The paper's model on one TPU chip: LoRA (rank 16) over a bfloat16 base, its own learning rate.
    pytest.param("colab_tpu", [], id="colab_tpu"),
]


@pytest.mark.parametrize("name, flags", PAPER_RUNS)
def test_paper_config_runs_resumes_and_exports_as_shipped(name, flags, wrapper, tmp_path):  # noqa: F811
    """configs/NAME.py for STEPS steps (checkpointed at the last), resumed for one more, its export
    scored by `python -m sqlm_jax.evaluate` as the run's last evaluation scored the policy."""
    check_paper_run(name, flags, wrapper, tmp_path)


@pytest.mark.parametrize("name, flags", [pytest.param(*p.values, id=p.id) for p in PAPER_RUNS]
                         + [("algebra", []), ("algebra", ALGEBRA_LORA)])
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


# ---------------------------------------------------------------------------------- every config
# Each file of sqlm_jax/configs/ and the test that runs it end to end, as shipped but for its model
# and sizes. A new config needs a run, and a line here.
RUN_BY = {
    "arithmetic": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "algebra": "test_shipped_algebra.py::test_algebra_runs_resumes_and_exports_as_shipped",
    "coding": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "colab_tpu": "test_shipped_configs.py::test_paper_config_runs_resumes_and_exports_as_shipped",
    "tiny": "test_tiny_config.py::test_tiny_config_runs_self_play_end_to_end",
    "tiny_algebra": "test_tiny_algebra.py::test_tiny_algebra_config_runs_self_play",
    "tiny_coding": "test_tiny_coding.py::test_tiny_coding_config_runs_self_play",
    "tiny_format_reward": "test_shipped_tiny_configs.py::test_tiny_ablation_config_runs",
    "tiny_pregenerated": "test_shipped_tiny_configs.py::test_tiny_ablation_config_runs",
    "tiny_pretrain": "test_shipped_tiny_configs.py::test_pretrain_config_runs",
    "tiny_algebra_pretrain": "test_shipped_tiny_configs.py::test_pretrain_config_runs",
    "tiny_coding_pretrain": "test_shipped_tiny_configs.py::test_pretrain_config_runs",
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
