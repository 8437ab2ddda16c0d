"""Test session setup: CPU only, with 8 fake devices so sharding tests can form real meshes."""
import os

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# No test may reach the network: hub ids must fail fast with our message, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"

import tempfile  # noqa: E402

import jax  # noqa: E402

# One compilation cache for the session: the end-to-end tests build several trainers whose compiled
# steps are identical, and XLA's CPU compile (seconds each) would otherwise dominate the suite.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sqlm_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
