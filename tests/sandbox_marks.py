"""What the sandbox tests share: skip marks for what this machine lacks, and an honest program."""
import os

import pytest

from sqlm_jax import sandbox

needs_bwrap = pytest.mark.skipif(
    sandbox._isolation_problem() is not None,
    reason=f"bubblewrap cannot isolate here ({sandbox._isolation_problem()}); apt-get install bubblewrap",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="per-test uids (and their process limit) need root")

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
