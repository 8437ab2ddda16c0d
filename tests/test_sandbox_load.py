"""The sandbox under load: ~2,000 mixed honest and hostile programs through run_many leave no process,
temporary directory or file descriptor behind, and every honest program scores exactly as it does alone."""
import os
import random
import tempfile
import time
from pathlib import Path

import pytest

from sqlm_jax.sandbox import SandboxConfig, run_many, run_program
from tests.sandbox_marks import ADD, needs_bwrap

TIMEOUT_S = 0.5
HONEST = {  # name -> (program, tests); the expected scores follow from the tests
    "right": (ADD, [("2 3", "5"), ("-1 1", "0")]),
    "half right": (ADD, [("2 3", "5"), ("1 1", "3")]),
    "wrong": ("print(42)", [("2 3", "5")]),
    "reads all input": ("import sys\nprint(sum(map(int, sys.stdin.read().split())))", [("1 2 3 4", "10")]),
}
HOSTILE = {  # quick to fail, so thousands fit in the suite; the slow ones are few
    "raises": "raise ValueError('no')",
    "exits non-zero": "import sys\nsys.exit(3)",
    "kills its parent": "import os\nos.kill(os.getppid(), 9)",
    "opens files until refused": "fs = []\nwhile True:\n    fs.append(open('/dev/null'))",
    "forks and leaves": "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(30)",
    "writes a big file": "open('x', 'w').write('x' * (64 << 20))",
    "closes stdout": "import os\nos.close(1)\nos.close(2)",
    "syntax error": "def (:",
}
SLOW_HOSTILE = {"infinite loop": "while True:\n    pass"}


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sqlm-sandbox-*")}


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """The sandbox's temporary directories under this test's own folder: another test running
    alongside (pytest -n) must not count as a leak, nor hide one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@needs_bwrap
def test_thousands_of_mixed_programs_leave_nothing_behind(own_tempdir):
    config = SandboxConfig()
    alone = {name: run_program(code, tests, timeout_s=TIMEOUT_S, config=config) for name, (code, tests) in HONEST.items()}
    assert [alone[k].fraction for k in HONEST] == [1.0, 0.5, 0.0, 1.0]  # the known answers
    # Processes earlier tests left to exit on their own (e.g. wandb's service) are not run_many's.
    fds, dirs, before = sorted(os.listdir("/proc/self/fd")), _sandbox_dirs(), set(_descendants(os.getpid()))

    rng = random.Random(0)
    # A program that forks and leaves holds the pipes until its deadline (~0.25 s each, the rest
    # ~10 ms), so a quarter as many of those.
    kinds = ([("honest", k) for k in HONEST] * 320 + [("hostile", k) for k in HOSTILE if k != "forks and leaves"] * 100
             + [("hostile", "forks and leaves")] * 25 + [("slow", k) for k in SLOW_HOSTILE] * 8)
    rng.shuffle(kinds)
    jobs = [HONEST[k] if side == "honest" else ({**HOSTILE, **SLOW_HOSTILE}[k], [("1 2", "3")])
            for side, k in kinds]
    started = time.monotonic()
    results = run_many(jobs, timeout_s=TIMEOUT_S, config=config)
    elapsed = time.monotonic() - started

    assert len(results) == len(jobs) == 1280 + 700 + 25 + 8
    for (side, kind), result in zip(kinds, results):
        if side == "honest":
            assert result == alone[kind], (kind, result)
        else:
            assert result.fraction == 0.0, (kind, result)
    deadline = time.monotonic() + 20.0  # killed processes take a moment to be reaped (longer under load)
    while set(_descendants(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_descendants(os.getpid())) - before == set(), "sandbox processes outlived run_many"
    assert sorted(os.listdir("/proc/self/fd")) == fds, "file descriptors leaked"
    assert _sandbox_dirs() == dirs, "temporary directories left behind"
    print(f"{len(jobs)} programs in {elapsed:.1f} s")
