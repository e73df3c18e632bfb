import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from conftest import ROOT

# Every experiment config (configs/common.py holds the section builders they compose, not a config).
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if os.path.basename(p) != "common.py")


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_is_locked_and_has_a_tiny_variant(path):
  module = load(path)
  for arg in (None, "tiny"):
    c = module.get_config(arg)
    assert isinstance(c, ml_collections.ConfigDict)
    assert c.is_locked
    with pytest.raises(AttributeError):
      c.no_such_key = 1
  assert module.__doc__ and "train.py" in module.__doc__, "the docstring holds the command that runs it"
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("nonsense")


def test_config_builds_an_experiment():
  from sdjax.train.trainer import Trainer
  c = load(os.path.join(ROOT, "configs", "default.py")).get_config("tiny")
  exp = Trainer.from_config(c)
  assert exp.task.model_config.block_out_channels == (8, 16)


@pytest.mark.parametrize("field,value,message", [
    ("model", {"block_out_channels": (8, 16, 32)}, "down_block_types has 2 entries"),
    ("data", {"name": "cifar"}, "config.data.name"),
    ("diffusion", {"beta_schedule": "quadratic"}, "unknown beta_schedule"),
    ("sample", {"sampler": "nope"}, "unknown sampler"),
    ("train", {"batch_size": 12}, "not divisible"),
])
def test_bad_values_are_named(field, value, message):
  from sdjax.train.trainer import Trainer
  c = load(os.path.join(ROOT, "configs", "default.py")).get_config("tiny")
  with c.unlocked():
    c[field].update(value)
  with pytest.raises(ValueError, match=message):
    Trainer.from_config(c).train_step()


def _train_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)


@pytest.mark.parametrize("override,needle", [
    ("--config.optim.lrr=3e-4", "lrr"),
    ("--config.train.batch_size=abc", "batch_size"),
])
def test_cli_rejects_unknown_key_and_wrong_type_in_one_line(override, needle, tmp_path):
  r = _train_cli("--config", "configs/default.py:tiny", override, "--workdir", str(tmp_path))
  assert r.returncode != 0
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert len(lines) <= 2, r.stderr  # the error, and at most absl's "Pass --helpshort" hint
  assert needle in lines[0], r.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
