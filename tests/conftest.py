"""Test setup: 8 fake CPU devices (set before jax is imported), an isolated TFDS data dir, and one persistent XLA
cache for the CLI subprocesses."""
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("SDJAX_DATA_DIR", os.path.join(tempfile.gettempdir(), f"sdjax-test-data-{os.getuid()}"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; XLA_FLAGS was set too late"
# One persistent XLA cache for the train.py / sample.py subprocesses the tests start, set after jax is imported:
# jax reads these variables when it is imported, so they reach the children only. A child loads what an earlier
# child compiled instead of compiling it again (a cached tiny train.py starts in ~17 s instead of ~60 s here); a
# cached executable is the same executable, so results are unchanged, and an unreadable entry (a child killed while
# writing it) is a jax warning and a recompile. In this process writing every compile to disk costs more than the
# few repeats save (tests/test_models.py: +3% CPU), so tests that repeat compiles use `persistent_compilation_cache`.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="sdjax-test-xla-")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def losses(workdir):
  """{step: loss} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def finished_checkpoints(workdir):
  """Steps of the checkpoints a run has finished writing (orbax renames a step's folder when done)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@contextlib.contextmanager
def persistent_compilation_cache(directory):
  """A persistent XLA cache in `directory` while the block runs: a resumed run reuses the first run's compiled
  step."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    cc.reset_cache()


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent XLA cache for this test only (`persistent_compilation_cache`)."""
  with persistent_compilation_cache(tmp_path / "xla_cache"):
    yield


def with_overrides(config, **overrides):
  """A locked copy of `config` with dotted keys replaced: with_overrides(c, **{"train.num_steps": 4})."""
  c = config.unlock()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c.lock()


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
  """A random tiny SD 1.x pipeline folder (sdjax.convert.random) on the fixture tokenizer, once per module."""
  from sdjax.convert.random import write_random_pipeline
  folder = str(tmp_path_factory.mktemp("pipelines") / "tiny_sd1")
  write_random_pipeline(folder, "sd1", tokenizer=os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer"))
  return folder


# --- tiny Stable Diffusion pipelines (tools/make_single_file_fixtures.py) ---

SINGLE = os.path.join(ROOT, "tests", "fixtures", "single_file")
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def tiny_configs(model_type):
  configs = {}
  for c in COMPONENTS[model_type]:
    with open(os.path.join(SINGLE, f"{model_type}.{c}.json")) as f:
      configs[c] = json.load(f)
  from sdjax.convert import single_file
  configs["scheduler"] = single_file.default_configs(model_type)["scheduler"]
  return configs


def make_pipeline_folder(root, model_type):
  """A diffusers pipeline folder assembled from the (diffusers-verified) single-file fixture components."""
  configs = tiny_configs(model_type)
  index = {"_class_name": "StableDiffusionXLPipeline" if model_type == "sdxl" else "StableDiffusionPipeline",
           "safety_checker": [None, None]}
  for c in COMPONENTS[model_type]:
    os.makedirs(os.path.join(root, c))
    with open(os.path.join(root, c, "config.json"), "w") as f:
      json.dump(configs[c], f)
    name = "model" if c.startswith("text") else "diffusion_pytorch_model"
    shutil.copy(os.path.join(SINGLE, f"{model_type}.{c}.safetensors"), os.path.join(root, c, f"{name}.safetensors"))
    cls = configs[c].get("_class_name") or ("CLIPTextModelWithProjection" if c == "text_encoder_2" else "CLIPTextModel")
    index[c] = ["transformers" if c.startswith("text") else "diffusers", cls]
  for tok in ("tokenizer", "tokenizer_2") if model_type == "sdxl" else ("tokenizer",):
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer"), os.path.join(root, tok))
    index[tok] = ["transformers", "CLIPTokenizer"]
  os.makedirs(os.path.join(root, "scheduler"))
  sched = dict(configs["scheduler"])
  with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched, f)
  index["scheduler"] = ["diffusers", sched["_class_name"]]
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(index, f)
  return configs
