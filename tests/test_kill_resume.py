"""kill -9 anywhere is safe: a run killed at random moments (and in the middle of a checkpoint save),
then resumed, ends with parameters bit-identical to an uninterrupted run's."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import random_policy

DRIVER = Path(__file__).with_name("run_driver.py")
STEPS = 6


def _driver(model, workdir, out, *, resume):
    cmd = [sys.executable, str(DRIVER), str(model), str(workdir), str(out), "--steps", str(STEPS), "--devices", "1"]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _saving(workdir: Path) -> bool:
    """An orbax save is under way: its temporary directory exists."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def _finish(model, workdir, out, *, resume):
    process = _driver(model, workdir, out, resume=resume)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return np.load(out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _checkpointed(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_sigkill_at_random_moments_then_resume_is_bit_identical(model, tmp_path):
    straight = _finish(model, tmp_path / "straight", tmp_path / "straight.npz", resume=False)
    rng = random.Random(0)
    workdir, kills = tmp_path / "killed", []
    # Each kill comes once the run has made progress past the previous one: a random moment of the
    # step after a checkpoint, in the middle of a checkpoint save (orbax's temporary directory
    # exists), and a random moment again (start-up, a step or a save).
    for moment in ("mid-step", "saving", "random"):
        before = _checkpointed(workdir)
        process = _driver(model, workdir, tmp_path / "unused.npz", resume=bool(kills))
        started, deadline, delay = time.monotonic(), time.monotonic() + 300, rng.uniform(0.0, 0.4)
        while process.poll() is None and time.monotonic() < deadline:
            progressed = len(_checkpointed(workdir)) > len(before)
            if moment == "saving" and _saving(workdir) or moment == "mid-step" and progressed or \
                    moment == "random" and time.monotonic() - started > 3.0 + 10 * delay:
                break
            time.sleep(0.001)
        assert process.poll() is None, f"the run ended before the {moment} kill ({kills})"
        if moment == "mid-step":
            time.sleep(delay)
        _kill(process)
        kills.append((moment, _checkpointed(workdir)))
    assert _checkpointed(workdir)[-1:] != [STEPS], f"the kills came too late to test anything: {kills}"
    resumed = _finish(model, workdir, tmp_path / "resumed.npz", resume=True)
    assert straight.files == resumed.files
    for name in straight.files:
        assert np.array_equal(straight[name], resumed[name]), f"{name} differs after kills {kills}"
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*")), "a partial save was left"
