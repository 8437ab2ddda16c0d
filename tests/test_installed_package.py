"""The package as a user installs it (`pip install .`, not editable) works away from the checkout: the
README's first command from any directory, and the Colab notebook opened on its own."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu_demo.ipynb"


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """The python of a virtualenv holding a non-editable install of this checkout. Its dependencies
    come from the test environment (system site-packages) so that no test needs the network;
    .ci/run checks a fresh install with nothing else in it."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                   check=True, capture_output=True)
    where = subprocess.run([str(python), "-c", "import sqlm_jax; print(sqlm_jax.__file__)"], cwd=venv,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), f"the checkout, not the installed copy, was imported: {where}"
    return python


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags(), **extra}  # one CPU device, as a user


def test_main_runs_a_shipped_config_from_any_directory(installed_python, tmp_path):
    out = subprocess.run(
        [str(installed_python), "-m", "sqlm_jax.main", "--config=configs/tiny.py", "--config.train.steps=1",
         "--config.eval.num_problems=64", "--config.eval.second_set_problems=16", "--config.workdir=run"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["steps"] == 1
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    missing = subprocess.run([str(installed_python), "-m", "sqlm_jax.main", "--config=configs/nope.py"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: config file 'configs/nope.py' not found; pass a path to a config file, or one of the "
        "shipped configs/NAME.py with NAME in ['algebra', 'arithmetic', 'coding', 'tiny', "
        "'tiny_format_reward', 'tiny_pregenerated', 'tiny_pretrain']"]


def test_notebook_runs_on_its_own_with_the_tiny_config(installed_python, tmp_path):
    """Top to bottom on CPU (its TPU cell skips itself), from a folder that is not the checkout."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert any("tpu" in c["metadata"].get("tags", []) for c in code), "the TPU part is tagged"
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join("".join(c["source"]) for c in code))
    env = _env(SQLM_DEMO_STEPS="2", SQLM_DEMO_WORKDIR=str(tmp_path / "run"), SQLM_DEMO_EVAL_PROBLEMS="64")
    out = subprocess.run([str(installed_python), str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
    assert "not a TPU runtime: skipped" in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
