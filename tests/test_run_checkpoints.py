"""A run's orbax checkpoints survive damage, full disks and mismatched configs: the newest intact one is
used, nothing saved is deleted, and every failure is one line that names the fix."""
import os
import subprocess
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqlm_jax.checkpoints import INTEGRITY_FILE, Checkpointer, CheckpointProblem


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


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only, as in CI): a disk that fills during a save."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_save_is_one_line_and_keeps_older_checkpoints(small_disk, capfd):
    ckpt = Checkpointer(str(small_disk / "checkpoints"), keep=5)
    ckpt.save(1, _state(1, width=200_000), {"steps_done": 1})  # 0.8 MB: fits
    # 8 MB of random numbers (orbax compresses, so zeros would fit): does not fit.
    big = {"policy": {"w": jax.random.normal(jax.random.key(0), (2_000_000,)), "b": jnp.zeros(3)}}
    with pytest.raises(CheckpointProblem) as e:
        ckpt.save(2, big, {"steps_done": 2})
    message = str(e.value)
    assert message.startswith(f"saving the checkpoint of step 2 to {small_disk / 'checkpoints'} failed "
                              "(no space left on the device); it needs about 7.6 MiB, ")
    assert "MiB are free; the checkpoints already saved ([1]) are intact" in message and "\n" not in message
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"], "partial save removed"
    assert "Traceback" not in capfd.readouterr().err
    step, state, meta = Checkpointer(str(small_disk / "checkpoints"), keep=5).restore_latest(
        _abstract(_state(0, width=200_000)))
    assert step == 1 and meta == {"steps_done": 1}
    np.testing.assert_array_equal(state["policy"]["w"], np.arange(200_000) + 1)
