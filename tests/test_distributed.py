"""Multi-host (two processes on one machine) and preemption (SIGTERM mid-run), each in subprocesses."""
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import random_policy

DRIVER = Path(__file__).with_name("run_driver.py")


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _driver(*args, **popen):
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _load_start(folder) -> dict:
    from flax import nnx
    from sqlm_jax.models import load_pretrained
    model, _ = load_pretrained(folder)
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def _load(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_match_one_process(policy_folder, tmp_path):
    """Two processes with 4 CPU devices each form one 8-device mesh; the result equals one process
    with 8 devices, same global batch and seed. The policy earns rewards (the scripted one) and there
    is no weight decay, so the weights move by gradients far larger than the tolerance: a cross-host
    reduction that lost or doubled a host's rows would show."""
    _finish(_driver(policy_folder, tmp_path / "single", tmp_path / "single.npz", "--rewarded"))
    port = _free_port()
    procs = [_driver(policy_folder, tmp_path / "multi", tmp_path / f"multi{i}.npz", "--devices", 4,
                     "--processes", 2, "--process-id", i, "--port", port, "--rewarded") for i in range(2)]
    for p in procs:
        _finish(p)
    # The same questions, answers and rewards, step by step ...
    for log in ("questions.jsonl", "samples.jsonl"):
        assert (tmp_path / "multi" / log).read_text() == (tmp_path / "single" / log).read_text(), log
    # ... and the same weights: bit-identical on both hosts, equal to one process up to float rounding
    # of the cross-host reductions.
    multi0, multi1, one = (_load(tmp_path / f) for f in ("multi0.npz", "multi1.npz", "single.npz"))
    assert multi0.keys() == one.keys()
    start = _load_start(policy_folder)
    for k in one:
        assert np.array_equal(multi0[k], multi1[k]), k
        np.testing.assert_allclose(multi0[k], one[k], rtol=0, atol=1e-7, err_msg=k)
    # Two Adam steps of lr 1e-2 with eps 1 (updates ~ lr · gradient), no weight decay: what moved the
    # weights is the gradient of the rewarded answers, ~1e4 times the tolerance above.
    moved = max(np.abs(one[k] - start[k]).max() for k in one)
    assert moved > 1e-3, moved
    solver_rewards = [r for line in (tmp_path / "multi" / "samples.jsonl").read_text().splitlines()
                      for r in json.loads(line)["solver_rewards"]]
    assert 0 < np.mean(solver_rewards) < 1, "the scripted policy earns some rewards, not all"
    # Only process 0 wrote logs and the export; the checkpoint was written once, jointly.
    assert (tmp_path / "multi" / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["1", "2"]


def test_sigterm_mid_run_checkpoints_and_resumes_exactly(policy_folder, tmp_path):
    # The uninterrupted run first: it also fills the compilation cache the others then read.
    _finish(_driver(policy_folder, tmp_path / "straight", tmp_path / "straight.npz", "--steps", 4))
    run = tmp_path / "interrupted"
    proc = _driver(policy_folder, run, tmp_path / "partial.npz", "--steps", 4)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"reward/solver"' in metrics.read_text()):
        time.sleep(0.2)  # wait for step 1 to finish, then interrupt step 2
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    stopped_at = int(out.split("SUMMARY")[-1].split()[0])
    assert 1 <= stopped_at < 4
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped_at, "the step reached was checkpointed before exiting"

    _finish(_driver(policy_folder, run, tmp_path / "resumed.npz", "--steps", 4, "--resume"))
    resumed, expected = _load(tmp_path / "resumed.npz"), _load(tmp_path / "straight.npz")
    for k in expected:
        assert np.array_equal(resumed[k], expected[k]), k
