"""sqlm_jax.sandbox: hostile programs score 0 (or, probing for secrets, find none) and leave the host
unharmed (honest programs: test_sandbox_scoring.py).

Every hostile program goes through the public API while the test watches the host: afterwards no
process carrying the test's unique marker survives, no file named after it exists outside the
sandbox, the planted secret and the local server were never reached, and a normal program runs.
A hostile program that starts processes first re-executes with the marker in its command line,
so the process scan finds exactly this test's leftovers even while other sandboxes run.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from sqlm_jax import sandbox
from sqlm_jax.sandbox import SandboxConfig, SandboxUnavailableError, run_many, run_program
from tests.sandbox_marks import ADD, needs_bwrap, needs_root

HOSTILE_TIMEOUT_S = 1.0
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Hostile programs.


def _marked_processes(marker):
    """Host processes whose command line carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or it just exited
            continue
        if marker.encode() in cmdline and entry.name != str(os.getpid()):
            found.append((entry.name, cmdline.replace(b"\0", b" ")[:200]))
    return found


def assert_host_unharmed(marker, config=None):
    """No leftover process or stray file of this test, and the sandbox still runs programs."""
    deadline = time.monotonic() + 2.0  # killed processes take a moment to leave /proc
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _marked_processes(marker) == []
    for directory in ("/tmp", "/var/tmp", "/dev/shm", "/root", str(REPO), os.getcwd()):
        assert [p for p in Path(directory).glob(f"*{marker}*")] == []
    assert run_program(ADD, [("2 3", "5")], config=config).statuses == ("passed",)


def run_hostile(marker, body, tests=None, *, respawn=False, config=None, passes=False):
    """Run `body` (which sees os, sys and MARKER) through the public API; assert it scored 0, or
    with `passes` all tests (for probes that print what they got through to: an honest, contained
    probe prints the secret-free answer the test expects, and any leak then scores a failure).

    With `respawn` (for programs that start processes), it first re-executes with the marker in its
    command line, which every process it then starts inherits; the host is then watched during the
    run, and the program may never have more processes than the configured limit.
    """
    program = f"import os, sys\nMARKER = {marker!r}\n" + textwrap.dedent(body)
    if respawn:
        program = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {program!r}, {marker!r}])"
    most_processes, done = 0, threading.Event()

    def watch():
        nonlocal most_processes
        while not done.wait(0.05):
            most_processes = max(most_processes, len(_marked_processes(marker)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        result = run_program(program, tests or [("", marker)], timeout_s=HOSTILE_TIMEOUT_S, config=config)
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - started < 5 + len(result.statuses) * (HOSTILE_TIMEOUT_S + 1)
    assert result.fraction == (1.0 if passes else 0.0), result
    assert most_processes <= (config or SandboxConfig()).nproc
    return result


@pytest.fixture
def marker():
    return f"sqlm-hostile-{uuid.uuid4().hex}"


@needs_bwrap
@pytest.mark.parametrize(
    "name, body, statuses, respawn",
    [
        ("infinite loop", "while True:\n    pass", {"timeout"}, False),
        ("sleeper", "import time\ntime.sleep(60)", {"timeout"}, False),
        ("fork bomb", "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
         {"timeout"}, True),
        ("memory bomb", "x = bytearray(64 << 30)\nprint(MARKER)", {"memory"}, False),
        # Zero-filling the 1 GiB limit can outlast the 1 s timeout on a busy 2-core machine.
        ("memory creep", "xs = []\nwhile True:\n    xs.append(bytearray(1 << 24))",
         {"memory", "timeout"}, False),
        ("gigabyte of output", "chunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
         {"output_limit"}, False),
        ("deep recursion", "def f(n):\n    return f(n + 1) + 1\nf(0)", {"crash"}, False),
        ("unbounded recursion", "sys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1) + 1\nf(0)",
         {"crash", "memory", "timeout"}, False),
        ("closes stdout, keeps running", "os.close(1)\nwhile True:\n    pass", {"timeout"}, False),
        ("background child holding stdout", "if os.fork() == 0:\n    os.setsid()\n    import time\n"
         "    time.sleep(60)\nprint(MARKER)", {"timeout"}, True),
    ],
)
def test_hostile_program_is_contained(marker, name, body, statuses, respawn):
    result = run_hostile(marker, body, respawn=respawn)
    assert set(result.statuses) <= statuses, name
    assert_host_unharmed(marker)


@needs_bwrap
def test_detached_background_child_is_killed(marker):
    body = """
        import time
        if os.fork() == 0:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(0.2)  # let the grandchild settle before this test ends
        """
    result = run_hostile(marker, body, respawn=True)
    assert result.statuses == ("wrong_answer",)  # it ended normally, printing nothing
    assert_host_unharmed(marker)


@needs_bwrap
def test_filling_the_disk_stays_in_the_sandbox(marker):
    one_file = "with open(MARKER, 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))"
    assert run_hostile(marker, one_file).statuses == ("crash",)  # EFBIG at file_size_bytes
    many_files = """
        written = 0
        for i in range(1000):
            try:
                with open(f"{MARKER}-{i}", "wb") as f:
                    f.write(b"x" * (8 << 20))
                written += 8
            except OSError:
                break
        print(written)
        """
    result = run_hostile(marker, many_files, tests=[("", "1000")])
    assert result.statuses == ("wrong_answer",)  # stopped by the 64 MiB tmpfs
    assert_host_unharmed(marker)


@needs_bwrap
def test_writing_and_reading_outside_its_directory_fails(marker, tmp_path):
    secret_file = tmp_path / f"secret-{marker}"
    secret_file.write_text("the trainer's secret")
    targets = ["/tmp", "/var/tmp", "/dev/shm", "/root", "/etc", "/usr", str(REPO), os.getcwd(),
               str(Path.home()), str(tmp_path)]
    body = f"""
        escaped = []
        for directory in {targets!r}:
            try:
                with open(os.path.join(directory, MARKER), "w") as f:
                    f.write("pwned")
                if directory != "/tmp":  # the sandbox's own /tmp is its working directory
                    escaped.append(directory)
            except OSError:
                pass
        try:
            escaped.append(open({str(secret_file)!r}).read())
        except OSError:
            pass
        print(escaped)
        """
    run_hostile(marker, body, tests=[("", "[]")], passes=True)  # nothing escaped, nothing read
    assert sorted(p.name for p in tmp_path.iterdir()) == [secret_file.name]
    assert_host_unharmed(marker)


@needs_bwrap
def test_network_is_unreachable(marker):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        body = f"""
            import socket
            reached = []
            for host in ("127.0.0.1", "8.8.8.8"):
                try:
                    socket.create_connection((host, {port}), timeout=0.5).sendall(MARKER.encode())
                    reached.append(host)
                except OSError:
                    pass
            print(reached)
            """
        run_hostile(marker, body, tests=[("", "[]")], passes=True)
        assert select.select([server], [], [], 0.2)[0] == []  # never a connection to accept
    assert_host_unharmed(marker)


# Prints where it saw the trainer's secret (the marker, planted in the trainer's environment): its
# own environment or any process's it can read. Contained, it prints "[]". Only os and sys: the
# fallback's uids may not be able to import anything else (see the fallback test).
ENV_PROBE = """
    seen = [k for k, v in os.environ.items() if k == "SQLM_TEST_SECRET" or MARKER in v]
    for pid in os.listdir("/proc"):
        path = f"/proc/{pid}/environ"
        try:
            if MARKER.encode() in open(path, "rb").read():
                seen.append(path)
        except OSError:
            pass
    print(seen)
    """


@needs_bwrap
def test_environment_secret_is_not_visible(marker, monkeypatch):
    monkeypatch.setenv("SQLM_TEST_SECRET", marker)
    run_hostile(marker, ENV_PROBE, tests=[("", "[]")], passes=True)  # a leak prints where it was seen
    assert_host_unharmed(marker)


@needs_bwrap
def test_killing_its_parent_or_group_kills_only_itself(marker):
    body = """
        import signal
        for pid in (os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.kill(-1, signal.SIGKILL)  # every process it may signal: only its own
        os.killpg(0, signal.SIGKILL)
        print(MARKER)
        """
    # Both tests ran, so the runner survived the first one's attempts.
    assert run_hostile(marker, body, tests=[("", marker)] * 2).statuses == ("killed", "killed")
    assert_host_unharmed(marker)


@needs_bwrap
def test_sandbox_dies_with_the_trainer(marker):
    """A trainer killed mid-run (SIGKILL: no cleanup of its own) takes its running sandbox along."""
    # The marker in two halves: the trainer's own command line must not carry it whole.
    sleeper = ("import os, sys\n"
               f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
               f"{marker[:10]!r} + {marker[10:]!r}])")
    trainer = subprocess.Popen([sys.executable, "-c", "from sqlm_jax.sandbox import run_program\n"
                                f"run_program({sleeper!r}, [('', '')], timeout_s=60)"], cwd=REPO)
    try:
        deadline = time.monotonic() + 30.0
        while not _marked_processes(marker):  # until the program sleeps inside the sandbox
            assert trainer.poll() is None and time.monotonic() < deadline, "the sleeper never started"
            time.sleep(0.05)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 5.0  # bubblewrap's pid 1 dies, and the kernel kills the rest
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _marked_processes(marker) == []  # not left to sleep out its 60 s
    finally:
        trainer.kill()
        for pid, _ in _marked_processes(marker):  # a failed run's leftovers, found by our marker
            os.kill(int(pid), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Without bubblewrap.


@pytest.fixture
def no_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation_problem", lambda: "bwrap disabled by the test")


def test_missing_bubblewrap_is_reported(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "not installed" in sandbox._isolation_problem.__wrapped__()


def test_without_bubblewrap_refuses_unless_allowed(no_bwrap):
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap.*allow_unisolated"):
        run_program(ADD, [("1 2", "3")])
    with pytest.raises(SandboxUnavailableError):
        run_many([(ADD, [("1 2", "3")])])


@needs_root  # as non-root, the fallback cannot give a test its own uid
def test_unisolated_fallback_still_limits_and_cleans_up(no_bwrap, marker, monkeypatch):
    config = SandboxConfig(allow_unisolated_fallback=True)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        result = run_program(ADD, [("1 2", "3"), ("1 2", "4")], config=config)
        assert result.statuses == ("passed", "wrong_answer")
    monkeypatch.setenv("SQLM_TEST_SECRET", marker)
    with pytest.warns(RuntimeWarning):
        # The secret-free answer passes; a leaked environment would print the marker instead.
        run_hostile(marker, ENV_PROBE, tests=[("", "[]")], config=config, passes=True)
        result = run_hostile(marker, "while True:\n    pass", config=config)
        assert result.statuses == ("timeout",)
        # The fallback's uids may not reach this interpreter (under /root here), but /bin/sh they may.
        body = """
            if os.fork() == 0:
                os.setsid()
                os.close(1)
                os.execv("/bin/sh", ["sh", "-c", f"sleep 60; : {MARKER}"])
            """
        assert run_hostile(marker, body, config=config).statuses == ("wrong_answer",)
        assert_host_unharmed(marker, config)
