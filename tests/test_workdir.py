"""A remote workdir: logs are written to a local mirror, copied up, and copied down on resume."""
from sqlm_jax.workdir import Workdir


def test_mirror_pushes_logs_up_and_pulls_them_back_on_a_fresh_machine(tmp_path):
    bucket = tmp_path / "bucket" / "run"  # stands in for gs://bucket/run (same code path through epath)
    first = Workdir(str(bucket), mirror=str(tmp_path / "vm1"), remote=True)
    assert first.checkpoints == f"{bucket}/checkpoints"
    (tmp_path / "vm1" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "vm1" / "tensorboard").mkdir()
    (tmp_path / "vm1" / "tensorboard" / "events").write_text("e")
    (bucket / "checkpoints" / "1").mkdir(parents=True)  # orbax's, never copied by the mirror
    first.push()
    assert (bucket / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (bucket / "tensorboard" / "events").read_text() == "e"

    second = Workdir(str(bucket), mirror=str(tmp_path / "vm2"), remote=True)  # the machine after preemption
    second.pull()
    assert (tmp_path / "vm2" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "vm2" / "checkpoints").exists()


def test_local_workdir_is_used_in_place(tmp_path):
    w = Workdir(str(tmp_path / "run"))
    assert not w.remote and w.local == str(tmp_path / "run")
    assert w.checkpoints == str(tmp_path / "run" / "checkpoints")
    w.push(), w.pull()  # no-ops
