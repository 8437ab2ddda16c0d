"""Test session setup: CPU only, with 8 fake devices so sharding tests can form real meshes."""
import os

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# No test may reach the network: hub ids must fail fast with our message, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One compilation cache for the session, shared with the subprocesses tests start (through the
# environment): the end-to-end tests build many trainers whose compiled steps are identical, and XLA's
# CPU compile (seconds per program) would otherwise dominate the suite.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sqlm_jax_xla_cache_")
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
