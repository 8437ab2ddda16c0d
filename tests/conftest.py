"""Test session setup: CPU only, with 8 fake devices so sharding tests can form real meshes."""
import os

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# No test may reach the network: hub ids must fail fast with our message, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
