"""Run untrusted, model-written Python programs against model-written tests: the coding reward.

Scoring follows the reference: only the first ``max_tests`` (10) tests count; a test passes when the
program's stdout, trailing newlines stripped (``rstrip("\\n")``, nothing else), equals the expected
output stripped the same way, with a clean exit; a program that does not compile fails every test.

Isolation. Every run gets a bubblewrap (``bwrap``) sandbox with its own pid, network, IPC and UTS
namespaces, a new session, and a root file system holding only the system directories and the
interpreter, read-only (so /root, /home, the repository and the trainer's files do not exist there),
a fresh private /tmp of ``tmpfs_bytes`` as working directory (gone when the sandbox exits), and an
environment rebuilt from nothing. ``--die-with-parent`` takes the sandbox down with the trainer.
Inside, a small trusted runner (``_sandbox_runner.py``) forks one child per test; each child gets
rlimits on CPU time, address space, file size, open files and process count, a wall-clock deadline
after which it and all it started are killed, and a cap on its stdout. Expected outputs never enter
the sandbox (the host compares), so no program can find them in memory it inherits. When the trainer
runs as root, bwrap is run without a user namespace (one would map the sandbox's uid back to root,
for which RLIMIT_NPROC does not bind and root-only files are readable), and each test runs as a
fresh random unprivileged uid: it can neither signal the runner nor outlive its test. As non-root,
bwrap's user namespace is used and the test shares the runner's uid, so a program may kill its own
runner (its remaining tests then read ``sandbox_error``); the trainer is still out of reach.

Speed. One bwrap and one interpreter per *program*, not per test: the runner compiles the program
once and forks a child per test, ~1.6 ms of CPU, where a sandbox per test would cost a whole run,
~25 ms (interpreter start ~10 ms, bwrap ~5 ms); all tests of a program share its /tmp. The runner
starts with ``-S`` (this environment's .pth files add ~40 ms to every start) and few imports. On the
2-core machine, 5-test programs cost ~6.5 ms of CPU per test execution: ~300 executions/s on idle
cores. Numbers and command: docs/benchmarks.md (``bench/sandbox.py``).

Fallback. Without a working bwrap, ``run_program`` raises :class:`SandboxUnavailableError` unless
``SandboxConfig(allow_unisolated_fallback=True)``, which runs the same runner directly (rlimits,
process groups, clean environment, temporary directory) and warns about what is lost.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import marshal
import os
import shutil
import site
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

STATUSES = (
    "passed",
    "wrong_answer",  # clean exit, different output
    "compile_error",  # the program does not compile: every test
    "timeout",  # wall-clock deadline or CPU limit
    "memory",  # MemoryError at the address-space limit
    "output_limit",  # more stdout than output_bytes
    "crash",  # non-zero exit: uncaught exception (also EFBIG past file_size_bytes), sys.exit(1), segfault...
    "killed",  # SIGKILL it did not get from the sandbox (e.g. killed its own process group)
    "sandbox_error",  # the sandbox itself failed; `detail` says why
)

_RUNNER_SOURCE = Path(__file__).with_name("_sandbox_runner.py").read_text()
# Replaces the trainer's environment entirely (cloud credentials live there). One BLAS thread,
# because a library that starts a thread per core would trip the process-count limit.
_SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
# Visible (read-only) inside the sandbox besides the interpreter's own directories.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_FALLBACK_LOSSES = (
    "no network, pid or file-system isolation (the program can connect to local services, see "
    "other processes and read or write whatever its uid may), and no quota on the disk it fills"
)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap cannot isolate programs here and the unisolated fallback was not allowed."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run. A run's worst-case memory is about nproc * memory_bytes + tmpfs_bytes."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS of each test process
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file a test may write
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp working directory (bubblewrap only)
    open_files: int = 64  # RLIMIT_NOFILE
    nproc: int = 4  # RLIMIT_NPROC: processes and threads of one test, itself included
    output_bytes: int = 8 << 20  # stdout captured per test; more is status output_limit
    max_tests: int = 10  # only the first max_tests tests count (the reference's rule)
    allow_unisolated_fallback: bool = False  # run without bubblewrap rather than refuse


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program on its counted tests."""

    passed: tuple[bool, ...]
    statuses: tuple[str, ...]  # one of STATUSES per counted test
    fraction: float  # passed / counted tests; 0.0 without tests
    detail: str = ""  # the compile error, or why the sandbox failed


def run_program(
    code: str,
    tests: Sequence[tuple[str, str]],
    *,
    timeout_s: float = 10.0,
    config: SandboxConfig | None = None,
) -> SandboxResult:
    """Run `code` on each test's input (stdin) and score its stdout against the expected output.

    Whatever the program does, this returns a result; it raises only SandboxUnavailableError
    (no isolation, no fallback allowed) and ValueError (a non-positive timeout).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    config = config or SandboxConfig()
    tests = list(tests)[: config.max_tests]
    if not tests:
        return SandboxResult((), (), 0.0)
    isolated = _use_isolation(config)
    job = _job(code, [stdin for stdin, _ in tests], timeout_s, config, isolated)
    deadline_s = 5.0 + len(tests) * (timeout_s + 2.0)
    if isolated:
        out, err = _execute(_bwrap_argv(config), job, deadline_s)
    else:
        with tempfile.TemporaryDirectory(prefix="sqlm-sandbox-") as workdir:
            os.chmod(workdir, 0o1777)  # writable by the tests' fresh uids when we are root
            out, err = _execute(_runner_argv(), job, deadline_s, cwd=workdir)
    return _score(tests, _parse_reports(out), err)


def run_many(
    jobs: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    config: SandboxConfig | None = None,
) -> list[SandboxResult]:
    """run_program over (code, tests) pairs, `workers` (default: one per core) at a time, in order."""
    config = config or SandboxConfig()
    _use_isolation(config)  # refuse (or warn) once, before starting anything
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        runs = [pool.submit(run_program, code, tests, timeout_s=timeout_s, config=config)
                for code, tests in jobs]
        return [run.result() for run in runs]


def status_counts(results: Iterable[SandboxResult]) -> dict[str, int]:
    """How many tests ended in each status (every status present, for stable metric names)."""
    counts = collections.Counter(status for result in results for status in result.statuses)
    return {status: counts[status] for status in STATUSES}


def _use_isolation(config: SandboxConfig) -> bool:
    """True to run in bubblewrap; False (with a warning) for the allowed fallback; else raise."""
    problem = _isolation_problem()
    if problem is None:
        return True
    if not config.allow_unisolated_fallback:
        raise SandboxUnavailableError(
            f"Cannot isolate untrusted programs: {problem}. Install bubblewrap "
            "(`apt-get install bubblewrap`) where it may create namespaces, or accept running "
            "programs unisolated with SandboxConfig(allow_unisolated_fallback=True)."
        )
    lost = _FALLBACK_LOSSES
    if os.geteuid() != 0:
        lost += "; and, not being root, programs run as the trainer's own user, so they can read its "
        lost += "files and /proc/<pid>/environ, signal it, and escape cleanup by leaving their process group"
    elif closed := _closed_to_others(sys.prefix):
        lost += f"; and programs, run as unprivileged users, cannot import from {sys.prefix} ({closed} is "
        lost += "closed to other users): only modules already loaded work"
    warnings.warn(f"Running programs WITHOUT isolation ({problem}): {lost}.", RuntimeWarning, stacklevel=3)
    return False


@functools.cache
def _isolation_problem() -> str | None:
    """Why bubblewrap cannot isolate programs here, or None. Checked once, by running a program."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    config = SandboxConfig()
    out, err = _execute(_bwrap_argv(config), _job("print(1)", [""], 10.0, config, True), 30.0)
    if _parse_reports(out) != [("ok", b"1\n")]:
        return f"bwrap failed to run a test program: {err.decode(errors='replace').strip()[-500:]}"
    return None


def _closed_to_others(path: str) -> str | None:
    """The first directory on the way to `path` that other users may not enter, if any."""
    for directory in [*reversed(Path(path).parents), Path(path)]:
        if not os.stat(directory).st_mode & 0o001:
            return str(directory)
    return None


def _job(code: str, inputs: list[str], timeout_s: float, config: SandboxConfig, isolated: bool) -> dict:
    """The runner's instructions (see _sandbox_runner.py)."""
    limits = {
        "RLIMIT_AS": config.memory_bytes,
        "RLIMIT_FSIZE": config.file_size_bytes,
        "RLIMIT_NOFILE": config.open_files,
        "RLIMIT_CORE": 0,
    }
    drop_uid = os.geteuid() == 0
    if drop_uid:
        limits["RLIMIT_NPROC"] = config.nproc  # each test has a uid of its own: counts it alone
    elif isolated:
        limits["RLIMIT_NPROC"] = config.nproc + 2  # the user namespace also holds bwrap and the runner
    # else: the count would include every process of the trainer's user; no usable limit.
    return {
        "code": code,
        "inputs": inputs,
        "timeout_s": float(timeout_s),
        "output_bytes": config.output_bytes,
        "limits": limits,
        "drop_uid": drop_uid,
        "own_pid_namespace": isolated,
        "site_packages": site.getsitepackages(),
    }


def _runner_argv() -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _RUNNER_SOURCE]


@functools.cache
def _bwrap_argv(config: SandboxConfig) -> tuple[str, ...]:
    """The bwrap command line that starts the runner in a fresh sandbox (cached: a tuple)."""
    argv = [shutil.which("bwrap"), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        # No user namespace: see the module docstring. The runner keeps only the capabilities
        # it needs to give each test a fresh uid and to kill what the test leaves behind.
        argv += ["--cap-drop", "ALL"]
        argv += [arg for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL") for arg in ("--cap-add", cap)]
    else:
        argv += ["--unshare-user"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # e.g. /bin -> usr/bin on merged-/usr systems
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    argv += ["--size", str(config.tmpfs_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    for path in _interpreter_dirs():  # after /tmp's tmpfs, which would hide a virtualenv in /tmp
        # bwrap would create the missing parents as 0700 (copying /root's mode): readable by no test.
        for parent in reversed(Path(path).parents[:-1]):
            if str(parent) != "/tmp":
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", os.path.realpath(path), path]
    return (*argv, "--chdir", "/tmp", "--", *_runner_argv())


def _interpreter_dirs() -> list[str]:
    """This interpreter's (and its virtualenv's) directories that nothing bound before covers."""
    covered, dirs = list(_SYSTEM_DIRS), []
    # Sorted, a directory comes before those inside it.
    for prefix in sorted({os.path.abspath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix,
                                                      sys.base_exec_prefix)}):
        if not any(prefix == d or prefix.startswith(d + "/") for d in covered):
            covered.append(prefix)
            dirs.append(prefix)
    return dirs


def _execute(argv: Sequence[str], job: dict, deadline_s: float, cwd: str | None = None
             ) -> tuple[bytes, bytes]:
    """Start the runner, hand it the job, return its (stdout, stderr); kill it at the deadline."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=_SANDBOX_ENV, start_new_session=True)
    except OSError as error:  # e.g. EAGAIN, out of processes: the run fails, the trainer does not
        return b"", f"could not start the sandbox: {error}".encode()
    try:
        return proc.communicate(marshal.dumps(job), timeout=deadline_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # under bwrap, the whole sandbox dies with it (--die-with-parent)
        try:
            out, err = proc.communicate(timeout=5.0)
        except subprocess.TimeoutExpired:  # only an unisolated leftover can still hold the pipes
            proc.stdout.close()
            proc.stderr.close()
            proc.wait()
            out, err = b"", b""
        return out, err + f"\nsandbox killed after its {deadline_s:.0f} s deadline".encode()


def _parse_reports(out: bytes) -> list[tuple[str, bytes]]:
    """Split the runner's output into (status, payload) pairs; a truncated tail is dropped."""
    reports, pos = [], 0
    while (end := out.find(b"\n", pos)) != -1:
        status, _, size = out[pos:end].decode(errors="replace").partition(" ")
        if status not in STATUSES + ("ok",) or not size.isdigit() or end + 1 + int(size) > len(out):
            break
        pos = end + 1 + int(size)
        reports.append((status, out[end + 1:pos]))
    return reports


def _score(tests: list[tuple[str, str]], reports: list[tuple[str, bytes]], err: bytes) -> SandboxResult:
    """Compare each reported stdout with its expected output (reference rule: rstrip newlines)."""
    if reports and reports[0][0] == "compile_error":
        statuses = ["compile_error"] * len(tests)
        detail = reports[0][1].decode(errors="replace")
    else:
        statuses = []
        for index, (_, expected) in enumerate(tests):
            if index >= len(reports):
                statuses.append("sandbox_error")
                continue
            status, output = reports[index]
            if status == "ok":
                same = output.rstrip(b"\n") == expected.rstrip("\n").encode(errors="surrogatepass")
                status = "passed" if same else "wrong_answer"
            statuses.append(status)
        detail = err.decode(errors="replace").strip()[-2000:] if "sandbox_error" in statuses else ""
    passed = tuple(status == "passed" for status in statuses)
    return SandboxResult(passed, tuple(statuses), sum(passed) / len(passed), detail)
