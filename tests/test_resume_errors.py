"""Resuming a run the wrong way, or from a damaged checkpoint, through the command line a user types:
one `error:` line naming the fix (no traceback), or one warning and an automatic fallback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import random_policy, subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
from tests.tiny_models import tiny_run_config

def get_config():
    c = tiny_run_config({model!r}, {workdir!r}, steps=2)
    c.export = False
    return c
"""


def _main(config_file, *overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": subprocess_xla_flags(1)}
    env.pop("SQLM_JAX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sqlm_jax.main", f"--config={config_file}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2, and its config file."""
    tmp = tmp_path_factory.mktemp("resume")
    config_file = tmp / "tiny.py"
    config_file.write_text(CONFIG.format(model=str(random_policy(tmp / "model")), workdir=str(tmp / "run")))
    out = _main(config_file)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, config_file


def _one_error_line(out) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


def test_resume_with_another_seed(finished_run):
    tmp, config_file = finished_run
    line = _one_error_line(_main(config_file, "--config.resume=True", "--config.seed=7", "--config.train.steps=3"))
    assert line == (f"error: the checkpoint in {tmp / 'run'} was made with seed 0, not 7: resume with "
                    "--config.seed=0")


def test_resume_with_another_model(finished_run):
    tmp, config_file = finished_run
    other = random_policy(tmp / "wider", hidden_size=48)
    line = _one_error_line(_main(config_file, "--config.resume=True", f"--config.model.path={other}",
                                 "--config.train.steps=3"))
    assert line.startswith(f"error: the checkpoint of step 2 in {tmp / 'run' / 'checkpoints'} does not match "
                           "this run: policy.params.")
    assert "float32[" in line and "there and float32[" in line and "fresh --config.workdir" in line


def test_existing_checkpoints_without_resume(finished_run):
    tmp, config_file = finished_run
    line = _one_error_line(_main(config_file))
    assert line == (f"error: {tmp / 'run'} already holds checkpoints; pass --config.resume=True to continue "
                    "that run, or choose another --config.workdir")


def test_damaged_newest_checkpoint_falls_back_and_the_run_finishes(finished_run):
    tmp, config_file = finished_run
    newest = tmp / "run" / "checkpoints" / "2"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    out = _main(config_file, "--config.resume=True", "--config.train.steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [l for l in out.stderr.splitlines() if l.startswith("warning: checkpoint of step 2")]
    assert len(warnings) == 1 and "CRC-32 differs" in warnings[0] and "Traceback" not in out.stderr
    assert (tmp / "run" / "checkpoints.damaged" / "2").is_dir()
    # resumed from step 1: steps 2 and 3 were trained and saved again, beside the damaged copy kept aside
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    assert (tmp / "run" / "checkpoints" / "2" / "sqlm_integrity.json").is_file()
