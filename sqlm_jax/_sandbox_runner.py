"""The in-sandbox half of :mod:`sqlm_jax.sandbox`: runs one program against its test inputs.

``sqlm_jax.sandbox`` starts this file's source as ``python -I -S -c <source>`` (inside bubblewrap,
or in the opt-in unisolated fallback) and writes a marshalled job on its stdin::

    {"code": str, "inputs": [str, ...], "timeout_s": float, "output_bytes": int,
     "limits": {rlimit name: value}, "drop_uid": bool, "own_pid_namespace": bool,
     "site_packages": [directory, ...]}

It compiles the program once, runs each input in a forked child and writes, per test, a header line
``STATUS NBYTES`` and then the test's NBYTES of stdout (only for STATUS ``ok``) on its own stdout; a
program that does not compile gets the single line ``compile_error NBYTES`` and the message.

Trust split. This process is trusted; the untrusted code only ever runs in the children, and:
- never sees an expected output: the host compares, so nothing a child inherits across ``fork`` (its
  copy of this process's memory) can leak the answers;
- holds only stdin (a private copy of its input), stdout (a pipe read here, capped) and stderr
  (/dev/null): every other descriptor, including the pipe the results go back on, is closed;
- when ``drop_uid`` (the host runs as root), switches to a fresh random uid before the untrusted code
  runs, so RLIMIT_NPROC binds (it never binds root) and counts this test alone, and it cannot signal
  or trace this process;
- is killed when its test ends, with everything it started (see ``_kill_test``).

Standard library only, and few imports: start-up is paid once per program, on every training step.
"""
import marshal
import os
import resource
import select
import sys
import time

# The C half of ``signal``, already loaded at start-up; ``import signal`` would pull in enum, ~10 ms.
import _signal

EXIT_MEMORY = 121  # how a child reports MemoryError (120 is CPython's own "could not flush stdout")
EXIT_SETUP = 122  # a child that failed before the program started: reported as sandbox_error
_UID_BASE = 1_800_000_000  # fresh uids are drawn from [_UID_BASE, _UID_BASE + 2**24): unused by any system


def main():
    """Run every test; return the compiled program in a test's child, None in this process."""
    job = marshal.loads(_read_all(0))
    try:
        program = compile(job["code"], "main.py", "exec", dont_inherit=True)
    except Exception as err:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError...
        _report("compile_error", f"{type(err).__name__}: {err}".encode(errors="replace"))
        return None
    # -S skipped site, whose .pth files cost tens of ms per start here; programs still need its
    # directories (the host's site.getsitepackages()) to import installed packages such as numpy.
    sys.path.extend(job["site_packages"])
    for text in job["inputs"]:
        stdin_fd = os.memfd_create("stdin")  # a file, not a pipe: no deadlock on a large input
        _write_all(stdin_fd, text.encode(errors="surrogatepass"))
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        uid = _UID_BASE + int.from_bytes(os.urandom(3), "little") if job["drop_uid"] else None
        pid = os.fork()
        if pid == 0:
            _confine(stdin_fd, out_w, uid, job)
            return program
        os.close(stdin_fd)
        os.close(out_w)
        status, output = _supervise(pid, out_r, uid, job)
        _report(status, output if status == "ok" else b"")
    return None


def _confine(stdin_fd, out_w, uid, job):
    """In a test's child, before any untrusted code: set up stdio, limits and the uid."""
    try:
        os.setpgid(0, 0)  # its own group: killpg(0, ...) hits this test only
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(devnull, 2)
        os.closerange(3, 1 << 20)  # above all, the result pipe to the host (our fd 1 before dup2)
        for name, value in job["limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        cpu_s = int(job["timeout_s"]) + 1  # a backstop: the wall-clock deadline normally fires first
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # also drops every capability
        sys.argv = ["main.py"]
    except BaseException:
        os._exit(EXIT_SETUP)


def _supervise(pid, out_r, uid, job):
    """Watch one test's child to its end, then kill all it left behind; return (status, stdout)."""
    try:
        verdict, wait_status, output = _watch(pid, out_r, job)
    finally:
        _kill_test(pid, uid, job["own_pid_namespace"])
        os.close(out_r)
    if wait_status is None:
        os.kill(pid, _signal.SIGKILL)  # still ours to signal: not reaped, so the pid is not reused
        wait_status = os.waitpid(pid, 0)[1]
    return verdict or _classify(wait_status), output


def _run_as_main(program):
    """Run the program as ``python main.py`` would, including what happens at exit; return its status.

    A fresh ``__main__`` module, then the steps of interpreter shutdown a program can observe, in
    CPython's order: join non-daemon threads, atexit handlers, flush stdout (status 120 if that fails).
    The full finalization would cost ~4 ms per test and change nothing a test can see.
    """
    module = type(sys)("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    try:
        exec(program, module.__dict__)
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except MemoryError:
        return EXIT_MEMORY
    except BaseException:  # the traceback would go to /dev/null
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()  # what CPython itself calls at exit
        import atexit

        atexit._run_exitfuncs()
    except MemoryError:
        return EXIT_MEMORY
    except BaseException:
        status = status or 1
    try:
        for stream in (sys.stdout, sys.__stdout__):  # a program may have replaced sys.stdout
            if stream is not None:
                stream.flush()
    except BaseException:
        return 120
    return status & 0xFF


def _watch(pid, out_r, job):
    """Collect the child's stdout until it has exited and closed stdout, or a limit fires.

    Returns (verdict or None, wait status or None if not reaped, stdout). Waiting for EOF as well as
    exit matches ``subprocess.run(..., timeout=...)``: a background child still holding stdout open
    runs the test into its timeout.
    """
    deadline = time.monotonic() + job["timeout_s"]
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    chunks, size, eof, wait_status = [], 0, False, None
    try:
        while not (eof and wait_status is not None):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", wait_status, b""
            for fd, _ in poller.poll(remaining * 1000):
                if fd == pidfd:
                    wait_status = os.waitpid(pid, 0)[1]
                    poller.unregister(pidfd)
                    continue
                chunk = os.read(out_r, 1 << 16)
                if not chunk:
                    eof = True
                    poller.unregister(out_r)
                size += len(chunk)
                if size > job["output_bytes"]:
                    return "output_limit", wait_status, b""
                chunks.append(chunk)
    finally:
        os.close(pidfd)
    return None, wait_status, b"".join(chunks)


def _kill_test(pid, uid, own_pid_namespace):
    """Kill the test's process and everything it started, wherever it moved to."""
    # kill(-1) signals, in one atomic sweep that a fork bomb cannot outrun, every process the
    # caller may signal but itself (and init).
    if own_pid_namespace:
        _kill_quietly(-1)  # all of the sandbox: only the test's processes besides us
    elif uid is not None:
        helper = os.fork()
        if helper == 0:
            try:
                os.setresuid(uid, uid, uid)  # may signal exactly the test's processes
                _kill_quietly(-1)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
    else:
        # Unisolated, unprivileged fallback: a child that left its process group escapes this.
        _kill_quietly(-pid)
        _kill_quietly(pid)


def _kill_quietly(target):
    try:
        os.kill(target, _signal.SIGKILL)
    except ProcessLookupError:  # nothing (left) to kill
        pass


def _classify(wait_status):
    """Name how a child that ran to its end (no deadline, no output cap) finished."""
    if os.WIFSIGNALED(wait_status):
        return {_signal.SIGXCPU: "timeout", _signal.SIGKILL: "killed"}.get(os.WTERMSIG(wait_status), "crash")
    code = os.WEXITSTATUS(wait_status)
    return {0: "ok", EXIT_MEMORY: "memory", EXIT_SETUP: "sandbox_error"}.get(code, "crash")


def _report(status, payload):
    _write_all(1, f"{status} {len(payload)}\n".encode() + payload)


def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    _program = main()
    if _program is not None:  # in a test's child
        os._exit(_run_as_main(_program))
