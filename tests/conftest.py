"""Test setup: 8 fake CPU devices (set before jax is imported) and an isolated TFDS data dir."""
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("SDJAX_DATA_DIR", os.path.join(tempfile.gettempdir(), f"sdjax-test-data-{os.getuid()}"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; XLA_FLAGS was set too late"
