"""One error path for every command line: a mistake a user can make, or a disk, checkpoint or sandbox
that fails, reaches the console as one `error: ...` line naming the fix, with exit code 1 and no
traceback. Anything else is a bug (in this package, or below it): it shows a short traceback, the
frames of this package (and of any other code that is not an installed library) and the error, with
the frames of jax, flax and the other libraries counted but not shown (`short_traceback`), and exits
with code 1. `SQLM_JAX_DEBUG=1` in the environment shows Python's own, full traceback instead, for
both."""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import site
import sys
import sysconfig
import traceback

DEBUG_VARIABLE = "SQLM_JAX_DEBUG"
_PACKAGE = os.path.realpath(os.path.dirname(__file__))
# The note jax adds to an exception whose traceback it filtered; the short traceback filters more.
_JAX_NOTE = "For simplicity, JAX has removed its internal frames"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (imported here, when one is raised, so a
    command line's start-up does not pay for modules it may never use)."""
    from sqlm_jax.checkpoints import CheckpointProblem
    from sqlm_jax.config_check import ConfigError
    from sqlm_jax.learner import NonFiniteError
    from sqlm_jax.mesh import MeshError
    from sqlm_jax.models import CheckpointError, UnsupportedModelError
    from sqlm_jax.plan import MemoryPlanError
    from sqlm_jax.sandbox import SandboxUnavailableError
    return (ConfigError, MeshError, CheckpointError, UnsupportedModelError, MemoryPlanError,
            CheckpointProblem, NonFiniteError, SandboxUnavailableError, FileNotFoundError,
            FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError, ModuleNotFoundError)


@contextlib.contextmanager
def one_line_errors():
    """Turns a user error raised inside into `error: <message>` and exit code 1, and any other
    exception (a bug) into `short_traceback` on stderr and exit code 1."""
    try:
        yield
    except Exception as e:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        if isinstance(e, user_errors()):
            message = " ".join(str(e).split()) or type(e).__name__
            sys.exit(f"error: {message}")
        if out_of_memory(e):
            sys.exit(f"error: {out_of_memory(e)}")
        try:
            report = short_traceback(e)
        except Exception:  # never lose a bug to a fault in its report
            report = "".join(traceback.format_exception(e))
        sys.stdout.flush()
        sys.stderr.write(report)
        sys.stderr.flush()
        sys.exit(1)


def out_of_memory(e: BaseException) -> str | None:
    """The one line for XLA's refusal of a program too large for the accelerator (RESOURCE_EXHAUSTED
    at compile or run time), None for any other error."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
        return None
    said = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line).strip()
    return (f"the accelerator ran out of memory ({said[:300]}). Set --config.rl.micro_batch_size=-1 and "
            "--config.rollout.rows_in_flight=-1 (on TPU the compiler then picks them) or smaller values; "
            "python -m sqlm_jax.plan --config=FILE --accelerator=SLICE --compile checks a TPU slice from any host")


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    dirs.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


@functools.lru_cache(maxsize=None)
def _is_library(filename: str) -> bool:
    """True for a frame of the standard library or of an installed package other than this one."""
    if filename.startswith("<frozen "):
        return True
    if filename.startswith("<"):  # <string>, <stdin>: the user's own code
        return False
    path = os.path.realpath(filename)
    if path == _PACKAGE or path.startswith(os.path.join(_PACKAGE, "")):
        return False
    return path.startswith(_library_dirs())


def _frames(e: BaseException) -> list[tuple[traceback.FrameSummary, str | None]]:
    """(frame, library name or None) for each frame of `e`'s traceback, outermost first."""
    tb = e.__traceback__
    summaries = traceback.extract_tb(tb)
    out = []
    for summary, (frame, _) in zip(summaries, traceback.walk_tb(tb)):
        if frame.f_code is one_line_errors.__wrapped__.__code__:
            continue
        if not _is_library(summary.filename):  # without the carets under the line: short
            out.append((traceback.FrameSummary(summary.filename, summary.lineno, summary.name,
                                               line=summary.line), None))
        else:
            module = frame.f_globals.get("__name__") or ""
            if summary.filename.startswith("<frozen "):
                module = summary.filename[len("<frozen "):].rstrip(">")
            out.append((summary, module.split(".")[0] or "?"))
    return out


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _chain(e: BaseException) -> list[tuple[BaseException, str | None]]:
    """`e` and the exceptions it was raised from or while handling, oldest first, each with the line
    Python prints between the one before it and it."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__cause__ is not None:
            chain.append((e, _CAUSE))
            e = e.__cause__
        elif e.__context__ is not None and not e.__suppress_context__:
            chain.append((e, _CONTEXT))
            e = e.__context__
        else:
            chain.append((e, None))
            e = None
    return chain[::-1]


def _exception_lines(e: BaseException) -> list[str]:
    """`type: message` and the exception's notes, less the one jax adds about its own filtering."""
    notes = getattr(e, "__notes__", None)
    if not isinstance(notes, list):
        return traceback.format_exception_only(type(e), e)
    try:
        e.__notes__ = [n for n in notes if not (isinstance(n, str) and _JAX_NOTE in n)]
        return traceback.format_exception_only(type(e), e)
    finally:
        e.__notes__ = notes


def short_traceback(e: BaseException) -> str:
    """The traceback of `e` that matters for a bug: the frames outside installed libraries (this
    package's, a user's own script), each run of library frames (jax, flax, absl, Python's) as one
    `... N frames in flax, jax` line, and the exception with its message. Of the exceptions it was
    raised from (or while handling), those raised and handled wholly inside libraries are left out,
    as is jax's unfiltered copy of its traceback; `SQLM_JAX_DEBUG=1` shows all of it."""
    parts: list[str] = []
    hidden = hidden_exceptions = 0
    chain = _chain(e)
    shown_before = False
    for i, (exc, link) in enumerate(chain):
        frames = _frames(exc)
        if i < len(chain) - 1 and (type(exc).__name__ == "UnfilteredStackTrace"
                                   or all(library for _, library in frames)):
            hidden += len(frames)
            hidden_exceptions += 1
            shown_before = False
            continue
        if shown_before and link:
            parts.append(link)
        shown_before = True
        if frames:
            parts.append("Traceback (most recent call last):\n")
        for in_library, group in itertools.groupby(frames, key=lambda frame: frame[1] is not None):
            group = list(group)
            if in_library:
                hidden += len(group)
                names = ", ".join(sorted({library for _, library in group}))
                parts.append(f"  ... {len(group)} frame{'s' * (len(group) > 1)} in {names}\n")
            else:  # formatted by Python, its folding of a repeated line included
                parts.extend(traceback.StackSummary.from_list([s for s, _ in group]).format())
        parts.extend(_exception_lines(exc))
    if hidden:
        also = (f", {hidden_exceptions} exception{'s' * (hidden_exceptions > 1)} raised inside them before "
                "this one") if hidden_exceptions else ""
        parts.append(f"(hidden: {hidden} frames inside libraries{also}; {DEBUG_VARIABLE}=1 shows the full "
                     "traceback)\n")
    return "".join(parts)
