"""Test session setup: CPU only, with 8 fake devices so sharding tests can form real meshes."""
import os

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are tiny and compiled once or twice each, so LLVM's optimisation passes cost
# more than they save: without them the suite's CPU time fell ~17% (the same HLO, so the same buffers
# and memory_analysis figures; every process of the session, subprocesses included, uses the flag).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# No test may reach the network: hub ids must fail fast with our message, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One compilation cache for the session, shared with the subprocesses tests start (through the
# environment): the end-to-end tests build many trainers whose compiled steps are identical, and XLA's
# CPU compile (seconds per program) would otherwise dominate the suite.
# Under pytest-xdist the workers inherit the controller's directory, so a program compiled by one
# worker is a cache hit for the other.
if "SQLM_JAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["SQLM_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sqlm_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["SQLM_JAX_TEST_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SQLM_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The modules that take longest run first, so that under pytest-xdist (`-n 2 --dist loadfile`, the
# README's command: a module runs whole on one worker, its module-scoped fixtures built once; pytest.ini
# keeps xdist from reordering them) neither worker is left with a long module at the end while the other
# idles. Order: `--durations=0` summed per module (docs/benchmarks.md, "Test suite wall time").
SLOW_FIRST = ("test_shipped_configs", "test_shipped_algebra", "test_train", "test_distributed",
              "test_tiny_config", "test_kill_resume", "test_tiny_coding", "test_tiny_algebra", "test_sampling",
              "test_resume_errors", "test_pretrain", "test_sandbox_load", "test_shipped_tiny_configs",
              "test_plan", "test_chunked_loss", "test_train_step", "test_toolbox_runs", "test_lora",
              "test_lora_run", "test_models", "test_reward_to_update", "test_loss_agg", "test_rl",
              "test_sandbox", "test_dynamic_sampling", "test_toolbox_losses")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
