"""One error path for every command line: a mistake a user can make, or a disk, checkpoint or sandbox
that fails, reaches the console as one `error: ...` line naming the fix, with exit code 1 and no
traceback. `SQLM_JAX_DEBUG=1` in the environment shows the traceback instead."""
from __future__ import annotations

import contextlib
import os
import sys

DEBUG_VARIABLE = "SQLM_JAX_DEBUG"


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
    """Turns a user error raised inside into `error: <message>` and exit code 1."""
    try:
        yield
    except Exception as e:
        if os.environ.get(DEBUG_VARIABLE) or not isinstance(e, user_errors()):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        sys.exit(f"error: {message}")
