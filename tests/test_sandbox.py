"""sqlm_jax.sandbox: honest programs score exactly; hostile ones score 0 and leave the host unharmed.

Every hostile program goes through the public API while the test watches the host: afterwards no
process carrying the test's unique marker survives, no file named after it exists outside the
sandbox, the planted secret and the local server were never reached, and a normal program runs.
A hostile program that starts processes first re-executes with the marker in its command line,
so the process scan finds exactly this test's leftovers even while other sandboxes run.
"""
import os
import select
import socket
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from sqlm_jax import sandbox
from sqlm_jax.sandbox import (SandboxConfig, SandboxResult, SandboxUnavailableError, run_many, run_program,
                              status_counts)

needs_bwrap = pytest.mark.skipif(
    sandbox._isolation_problem() is not None,
    reason=f"bubblewrap cannot isolate here ({sandbox._isolation_problem()}); apt-get install bubblewrap",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="per-test uids (and their process limit) need root")

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
HOSTILE_TIMEOUT_S = 1.0
REPO = Path(__file__).resolve().parents[1]


def score(code, tests, **kwargs):
    return run_program(textwrap.dedent(code), tests, **kwargs)


# --------------------------------------------------------------------------------------------------
# Honest programs: the reference's comparison rule, exactly.


@needs_bwrap
@pytest.mark.parametrize(
    "code, tests, expected_statuses",
    [
        (ADD, [("1 2", "3"), ("10 -4\n", "6\n"), ("0 0", "0")], ["passed"] * 3),
        # Trailing newlines are stripped on both sides, and nothing else is.
        ("print('1 2')\nprint()\n", [("", "1 2")], ["passed"]),
        ("print('1 2', end='')", [("", "1 2\n\n\n")], ["passed"]),
        ("print('1 2 ')", [("", "1 2")], ["wrong_answer"]),
        ("print(' 1 2')", [("", "1 2")], ["wrong_answer"]),
        ("print('1  2')", [("", "1 2")], ["wrong_answer"]),
        ("print('1 2')", [("", "1 2 ")], ["wrong_answer"]),
        ("print('')", [("", "")], ["passed"]),
        # Subtly wrong: max that starts from 0 fails exactly the all-negative tests.
        (
            "xs = map(int, input().split())\nm = 0\nfor x in xs:\n    m = max(m, x)\nprint(m)\n",
            [("1 5 3", "5"), ("-1 -5", "-1"), ("0", "0"), ("-7", "-7"), ("2 2", "2")],
            ["passed", "wrong_answer", "passed", "wrong_answer", "passed"],
        ),
        # A correct output followed by an error exit is not a pass; sys.exit(0) is.
        ("print(3)\nraise ValueError", [("", "3")], ["crash"]),
        ("import sys\nprint(3)\nsys.exit(0)", [("", "3")], ["passed"]),
        ("import sys\nprint(3)\nsys.exit(2)", [("", "3")], ["crash"]),
        ("input()", [("", "")], ["crash"]),  # EOFError on empty stdin
        ("print(1", [("", "1"), ("", "1")], ["compile_error"] * 2),
    ],
)
def test_honest_programs_score_exactly(code, tests, expected_statuses):
    result = run_program(code, tests)
    assert list(result.statuses) == expected_statuses
    assert result.passed == tuple(status == "passed" for status in expected_statuses)
    assert result.fraction == expected_statuses.count("passed") / len(expected_statuses)


@needs_bwrap
def test_only_the_first_ten_tests_count():
    tests = [(f"{i} 1", str(i + 1)) for i in range(10)] + [("1 1", "3"), ("2 2", "5")]
    result = run_program(ADD, tests)
    assert len(result.statuses) == 10 and result.fraction == 1.0
    wrong_first = run_program(ADD, [("1 1", "3")] + tests[1:])
    assert wrong_first.fraction == 0.9
    assert run_program(ADD, tests, config=SandboxConfig(max_tests=12)).fraction == 10 / 12


@needs_bwrap
def test_compile_error_and_no_tests():
    result = run_program("def f(:\n    pass", [("", "")] * 3)
    assert result.statuses == ("compile_error",) * 3 and result.fraction == 0.0
    assert "SyntaxError" in result.detail
    assert run_program(ADD, []) == SandboxResult((), (), 0.0)
    with pytest.raises(ValueError, match="timeout_s"):
        run_program(ADD, [("1 2", "3")], timeout_s=0)


@needs_bwrap
@pytest.mark.parametrize(
    "code, stdin, expected",
    [
        # The stack-size idiom of competitive programmers: the answer comes from a non-daemon thread.
        ("""
         import sys, threading
         sys.setrecursionlimit(10**6)
         threading.stack_size(1 << 26)
         def depth(n):
             return 0 if n == 0 else 1 + depth(n - 1)
         threading.Thread(target=lambda: print(depth(int(input())))).start()
         """, "20000", "20000"),
        # The fast-I/O template: print into a buffer, written out by an atexit handler.
        ("""
         import atexit, io, sys
         sys.stdout = io.StringIO()
         atexit.register(lambda: sys.__stdout__.write(sys.stdout.getvalue()))
         print(sum(map(int, sys.stdin.read().split())))
         """, "1 2 3\n4", "10"),
        ("import numpy as np\nprint(int(np.array(input().split(), dtype=int).sum()))", "1 2 3", "6"),
        ("print(input()[::-1])", "héllo ✓", "✓ olléh"),
        ("print(__name__, __file__)\nimport sys\nprint(sys.argv)", "", "__main__ main.py\n['main.py']"),
        # Large input and output: 200k numbers each way.
        ("import sys\nprint(' '.join(str(2 * int(x)) for x in sys.stdin.read().split()))",
         " ".join(map(str, range(200_000))), " ".join(str(2 * i) for i in range(200_000))),
    ],
)
def test_programs_behave_as_under_plain_python(code, stdin, expected):
    result = score(code, [(stdin, expected)])
    assert result.statuses == ("passed",)


@needs_bwrap
def test_run_many_keeps_order_and_counts_statuses():
    jobs = [(ADD, [(f"{i} {i}", str(2 * i)), ("1 1", "3")]) for i in range(6)] + [("print(1", [("", "1")])]
    results = run_many(jobs, workers=2)
    assert [r.statuses for r in results[:6]] == [("passed", "wrong_answer")] * 6
    assert results[6].statuses == ("compile_error",)
    counts = status_counts(results)
    assert counts["passed"] == 6 and counts["wrong_answer"] == 6 and counts["compile_error"] == 1
    assert set(counts) == set(sandbox.STATUSES) and sum(counts.values()) == 13


@needs_bwrap
@needs_root
def test_limits_are_the_configured_ones():
    threads = """
        import threading, time
        started = 0
        try:
            for _ in range(10):
                threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        print(started)
        """
    assert score(threads, [("", "3")]).statuses == ("passed",)  # nproc 4: itself and 3 threads
    assert score(threads, [("", "7")], config=SandboxConfig(nproc=8)).statuses == ("passed",)
    allocate = "x = bytearray(300 << 20)\nprint(len(x) >> 20)"
    assert score(allocate, [("", "300")]).statuses == ("passed",)
    small = SandboxConfig(memory_bytes=256 << 20)
    assert score(allocate, [("", "300")], config=small).statuses == ("memory",)


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


def run_hostile(marker, body, tests=None, *, respawn=False, config=None):
    """Run `body` (which sees os, sys and MARKER) through the public API; assert it scored 0.

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
    assert result.fraction == 0.0
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
        print(escaped or MARKER)
        """
    result = run_hostile(marker, body, tests=[("", "[]")])
    assert result.statuses == ("wrong_answer",)
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
            for host in ("127.0.0.1", "8.8.8.8"):
                try:
                    socket.create_connection((host, {port}), timeout=0.5).sendall(MARKER.encode())
                    print(MARKER)
                except OSError:
                    pass
            """
        assert run_hostile(marker, body).statuses == ("wrong_answer",)
        assert select.select([server], [], [], 0.2)[0] == []  # never a connection to accept
    assert_host_unharmed(marker)


@needs_bwrap
def test_environment_secret_is_not_visible(marker, monkeypatch):
    monkeypatch.setenv("SQLM_TEST_SECRET", marker)
    body = """
        import glob
        seen = [k for k, v in os.environ.items() if k == "SQLM_TEST_SECRET" or MARKER in v]
        for path in glob.glob("/proc/*/environ"):
            try:
                if MARKER.encode() in open(path, "rb").read():
                    seen.append(path)
            except OSError:
                pass
        print(seen or "unseen")
        """
    assert run_hostile(marker, body, tests=[("", "[]")]).statuses == ("wrong_answer",)  # prints "unseen"
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
        result = run_hostile(marker, "print(os.environ.get('SQLM_TEST_SECRET'))", config=config)
        assert result.statuses == ("wrong_answer",)
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
