"""What a run writes for people: JSONL and TensorBoard always, Weights & Biases when asked (offline here)."""
import json
import time

import pytest

from sqlm_jax.run_log import RunLog


def test_jsonl_logs_hold_the_scalars_and_samples(tmp_path):
    log = RunLog(str(tmp_path))
    log.scalars(1, {"reward/solver": 0.5})
    log.samples(1, [{"proposal": "1*2", "answers": ["2", "3"]}])
    log.close()
    assert [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "reward/solver": 0.5}]
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 1, "proposal": "1*2", "answers": ["2", "3"]}
    assert not (tmp_path / "wandb").exists(), "W&B only when log.wandb_project is set"


def _records(run, wait_s: float = 30.0) -> bytes:
    """The offline run's record file once wandb's service (its own process) has written the scalars
    to it: under load that can come a moment after `finish` returns."""
    deadline = time.monotonic() + wait_s
    while b"reward/solver" not in (records := next(run.glob("run-*.wandb")).read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return records


def test_wandb_offline_gets_the_scalars_and_a_table_of_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(str(tmp_path), wandb_project="sqlm-test", wandb_table_every=2, config={"task": "arithmetic"})
    log.scalars(1, {"reward/solver": 0.5, "note": "text is not a scalar"})
    log.samples(1, [{"proposal": "skipped: not a table step"}])
    log.samples(2, [{"proposal": "1*2", "answers": ["2", "3"], "proposer_reward": 1.0}])
    log.scalars(2, {"reward/solver": 0.75})
    log.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run / "files" / "media" / "table").glob("samples_*.table.json")
    assert json.loads(table.read_text()) == {"columns": ["step", "answers", "proposal", "proposer_reward"],
                                             "data": [[2, '["2", "3"]', "1*2", 1.0]]}
    records = _records(run)
    assert b"reward/solver" in records and b"0.75" in records and b"sqlm-test" in records

    run_id = (tmp_path / "wandb_run_id").read_text()
    assert run.name.endswith(run_id), "a resumed run continues the same W&B run"
    RunLog(str(tmp_path), wandb_project="sqlm-test").close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id


def test_a_run_with_wandb_project_logs_to_wandb(tmp_path, monkeypatch):
    """The config field reaches the run: two tiny steps with log.wandb_project set, offline."""
    pytest.importorskip("wandb")
    from sqlm_jax.train import Trainer
    from tests.tiny_models import random_policy, tiny_run_config
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_run_config(random_policy(tmp_path / "model"), tmp_path / "run")
    config.log.wandb_project, config.log.wandb_table_every, config.export = "sqlm-test", 1, False
    Trainer(config).run()
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert b"reward/solver" in _records(run)
    assert len(list((run / "files" / "media" / "table").glob("samples_*.table.json"))) == 2
