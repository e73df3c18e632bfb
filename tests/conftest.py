"""Test setup: 8 fake CPU devices (set before jax is imported) and an isolated TFDS data dir."""
import json
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


def losses(workdir):
  """{step: loss} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def finished_checkpoints(workdir):
  """Steps of the checkpoints a run has finished writing (orbax renames a step's folder when done)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
