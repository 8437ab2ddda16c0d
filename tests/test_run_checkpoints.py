"""A run's orbax checkpoints survive damage, full disks and mismatched configs: the newest intact one is
used, nothing saved is deleted, and every failure is one line that names the fix."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.checkpoints import INTEGRITY_FILE, Checkpointer, CheckpointProblem
from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def _state(step: int, width: int = 4096):
    return {"policy": {"w": jnp.arange(width, dtype=jnp.float32) + step, "b": jnp.full((3,), step, jnp.float32)}}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(directory, steps=(1, 2, 3), **kw) -> Checkpointer:
    ckpt = Checkpointer(str(directory), keep=5)
    for s in steps:
        ckpt.save(s, _state(s, **kw), {"steps_done": s})
    return ckpt


def _biggest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _overwrite(file: Path) -> None:
    """Same size, other bytes: what a storage fault or a partial copy leaves."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    file.write_bytes(bytes(data))


def test_overwritten_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
    ckpt = _saved(tmp_path / "checkpoints")
    damaged = _biggest_file(tmp_path / "checkpoints" / "3")
    _overwrite(damaged)
    damaged_bytes = damaged.read_bytes()
    step, state, meta = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2 and meta == {"steps_done": 2}
    np.testing.assert_array_equal(state["policy"]["w"], np.arange(4096) + 2)
    err = capfd.readouterr().err.strip().splitlines()
    relative = damaged.relative_to(tmp_path / "checkpoints" / "3")
    assert err == [f"warning: checkpoint of step 3 in {tmp_path / 'checkpoints'} is damaged ({relative} does not "
                   f"hold the bytes saved (CRC-32 differs)); moved to {tmp_path / 'checkpoints.damaged' / '3'}, "
                   "trying the one before it"]
    assert (tmp_path / "checkpoints.damaged" / "3" / relative).read_bytes() == damaged_bytes  # kept
    assert ckpt.latest_step() == 2


def test_unrecorded_truncated_checkpoint_is_found_by_restoring(tmp_path, capfd):
    """No integrity record (killed between orbax's rename and the record): a failed restore is the
    signal, reported in one line without the event loops' tracebacks."""
    ckpt = _saved(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "3" / INTEGRITY_FILE).unlink()
    damaged = _biggest_file(tmp_path / "checkpoints" / "3")
    os.truncate(damaged, damaged.stat().st_size // 2)
    step, state, _ = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint of step 3 ") and "damaged" in err[0]


def test_no_restorable_checkpoint_is_one_error_and_keeps_everything(tmp_path):
    ckpt = _saved(tmp_path / "checkpoints", steps=(1, 2))
    for s in (1, 2):
        _overwrite(_biggest_file(tmp_path / "checkpoints" / str(s)))
    with pytest.raises(CheckpointProblem) as e:
        ckpt.restore_latest(_abstract(_state(0)))
    message = str(e.value)
    assert "no checkpoint in" in message and "step 2:" in message and "step 1:" in message
    assert "fresh --config.workdir" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["1", "2"]


def test_a_step_damaged_again_is_moved_aside_beside_the_first_copy(tmp_path, capfd):
    """Step 2 saved, damaged and moved aside three times (a resumed run that keeps failing at the same
    step): checkpoints.damaged/ holds 2, 2.1 and 2.2, each copy as it was; none overwrites another."""
    ckpt = _saved(tmp_path / "checkpoints", steps=(1,))
    damaged = tmp_path / "checkpoints.damaged"
    kept = {}
    for name in ("2", "2.1", "2.2"):
        ckpt.save(2, _state(2), {"steps_done": 2})
        file = _biggest_file(tmp_path / "checkpoints" / "2")
        _overwrite(file)
        kept[name] = (file.relative_to(tmp_path / "checkpoints" / "2"), file.read_bytes())
        step, _, _ = ckpt.restore_latest(_abstract(_state(0)))
        assert step == 1
        assert capfd.readouterr().err.strip().endswith(f"moved to {damaged / name}, trying the one before it")
    assert sorted(p.name for p in damaged.iterdir()) == ["2", "2.1", "2.2"]
    for name, (relative, data) in kept.items():
        assert (damaged / name / relative).read_bytes() == data, name


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path / "checkpoints"), keep=2).restore_latest(_abstract(_state(0))) is None


def test_checkpoint_of_another_shape_names_the_first_leaf_and_the_fix(tmp_path):
    ckpt = _saved(tmp_path / "checkpoints", steps=(1,))
    with pytest.raises(CheckpointProblem) as e:
        ckpt.restore_latest(_abstract(_state(0, width=1024)))
    assert str(e.value) == (
        f"the checkpoint of step 1 in {tmp_path / 'checkpoints'} does not match this run: policy.w is "
        "float32[4096] there and float32[1024] in this run; resume with the config it was made with "
        "(model.path, LoRA, critic, optimizer), or choose a fresh --config.workdir")
    assert ckpt.latest_step() == 1, "a mismatch is not damage: nothing is moved"


def test_checkpoint_with_a_critic_resumed_without_one(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(1, {**_state(1), "critic": {"v": jnp.zeros(2)}}, {})
    with pytest.raises(CheckpointProblem, match="the checkpoint has critic, this run has none"):
        ckpt.restore_latest(_abstract(_state(0)))


def test_space_warning_before_the_run(tmp_path, capfd, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    import sqlm_jax.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints, "free_bytes", lambda _: 40_000)  # 4 checkpoints of 16 KiB: 65 KiB
    ckpt.check_space(_state(0))
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.keep=3 (+1 being written) need 0.1 MiB" in err[0]
    assert "lower --config.checkpoint.keep" in err[0]


def _tmpfs(tmp_path, size: str):
    """A tmpfs of `size` (root only, as in CI), unmounted when the test ends."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    return mount


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that fills during a save."""
    mount = _tmpfs(tmp_path, "4m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # debug: the writers' own
def test_full_disk_during_a_save_is_one_line_and_keeps_older_checkpoints(small_disk, capfd, monkeypatch, debug):
    """The one line, and nothing else on the console: what orbax's writers print as they fail goes to
    checkpoint_errors.log beside the checkpoints, named in the line; SQLM_JAX_DEBUG=1 leaves it all on
    the console and chains the writers' error to the one raised."""
    monkeypatch.delenv("SQLM_JAX_DEBUG", raising=False)
    if debug:
        monkeypatch.setenv("SQLM_JAX_DEBUG", "1")
    ckpt = Checkpointer(str(small_disk / "checkpoints"), keep=5)
    ckpt.save(1, _state(1, width=200_000), {"steps_done": 1})  # 0.8 MB: fits
    # 8 MB of random numbers (orbax compresses, so zeros would fit) in 8 arrays: does not fit.
    big = {"policy": {f"w{i}": jax.random.normal(jax.random.key(i), (250_000,)) for i in range(8)}}
    with pytest.raises(CheckpointProblem) as e:
        ckpt.save(2, big, {"steps_done": 2})
    message = str(e.value)
    assert message.startswith(f"saving the checkpoint of step 2 to {small_disk / 'checkpoints'} failed "
                              "(no space left on the device); it needs about 7.6 MiB, ")
    assert "MiB are free; the checkpoints already saved ([1]) are intact" in message and "\n" not in message
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"], "partial save removed"
    log = small_disk / "checkpoint_errors.log"
    if debug:
        assert not log.exists() and "RESOURCE_EXHAUSTED" in str(e.value.__cause__)
    else:
        assert capfd.readouterr().err == ""
        assert message.endswith(f"--config.resume=True; details in {log}")
        assert "RESOURCE_EXHAUSTED" in log.read_text() and "Traceback" in log.read_text()
    step, state, meta = Checkpointer(str(small_disk / "checkpoints"), keep=5).restore_latest(
        _abstract(_state(0, width=200_000)))
    assert step == 1 and meta == {"steps_done": 1}
    np.testing.assert_array_equal(state["policy"]["w"], np.arange(200_000) + 1)


# The run of issue 32, without its minutes: the shipped tiny config, each self-play step and
# evaluation replaced by a stub, so the run reaches its first checkpoint in seconds.
STUBBED_RUN = """
import runpy
from sqlm_jax import train
train.Trainer.evaluate = lambda self: {}
train.Trainer.self_play_step = lambda self, step: {"reward/solver": 0.0, "reward/proposer": 0.0,
                                                   "proposals/valid": 1.0}
runpy.run_module("sqlm_jax.main", run_name="__main__")
"""


def test_a_run_on_a_full_disk_ends_with_one_error_line(tmp_path):
    """`python -m sqlm_jax.main` with its workdir on a 2 MiB disk: the first checkpoint (9.4 MiB) does
    not fit. The console holds the space warning, the progress bar and the one error line: no
    traceback, none of the writers' dozens (they are in the workdir's checkpoint_errors.log)."""
    disk = _tmpfs(tmp_path, "2m")
    try:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}
        env.pop("SQLM_JAX_DEBUG", None)
        out = subprocess.run([sys.executable, "-c", STUBBED_RUN, "--config=configs/tiny.py",
                              f"--config.workdir={disk / 'run'}", "--config.checkpoint.every=1"],
                             cwd=ROOT, env=env, capture_output=True, timeout=300)
        stderr = out.stderr.decode()  # as bytes: text mode would turn the progress bar's \r into lines
        lines = stderr.strip().split("\n")
        assert out.returncode == 1 and out.stdout == b"", stderr[-3000:]
        assert len(lines) <= 3 and "Traceback" not in stderr, stderr[-3000:]
        assert lines[0].startswith("warning: checkpoints of this run take 9.4 MiB each"), stderr
        assert lines[-1].startswith(f"error: saving the checkpoint of step 1 to {disk / 'run' / 'checkpoints'} "
                                    "failed (no space left on the device); it needs about 9.4 MiB"), stderr
        log = disk / "run" / "checkpoint_errors.log"
        assert lines[-1].endswith(f"details in {log}") and "RESOURCE_EXHAUSTED" in log.read_text()
        assert not list((disk / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
