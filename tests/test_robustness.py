"""Bad input and interrupted runs never lose a run's record (issue 15; more cases to come)."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT
from sdjax.train import run
from sdjax.train.trainer import Trainer


def _tiny(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny").unlock()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c.lock()


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_refused_resumes_keep_the_runs_record_and_stale_metrics_are_dropped(tmp_path, compilation_cache):
  w = str(tmp_path / "run")
  os.makedirs(w)
  # A run killed (kill -9) before its first checkpoint left records behind; the fresh start drops them.
  with open(os.path.join(w, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4))
  run(_tiny(), w)
  assert _steps(w) == [2, 4, 6]
  with open(os.path.join(w, "config.json")) as f:
    record = f.read()

  # Another model: with the same num_steps nothing is left to do; with more, the checkpoint refuses it. Either
  # way config.json, the run's record, is not touched.
  other = {"model.block_out_channels": (16, 32)}
  assert run(_tiny(**other), w)["steps_run"] == 0
  with pytest.raises(ValueError, match="does not match the model of this config"):
    run(_tiny(**other, **{"train.num_steps": 8}), w)
  with open(os.path.join(w, "config.json")) as f:
    assert f.read() == record
  # Another diffusion: refused naming the fields, unless explicitly allowed.
  changed = {"diffusion.prediction_type": "v_prediction", "diffusion.num_train_timesteps": 500, "train.num_steps": 8}
  with pytest.raises(ValueError, match=r"config.diffusion.num_train_timesteps: 1000 in the run, 500 now; "
                                       r"config.diffusion.prediction_type: 'epsilon' in the run, 'v_prediction' now"):
    run(_tiny(**changed), w)
  with open(os.path.join(w, "config.json")) as f:
    assert f.read() == record
  assert run(_tiny(**changed, **{"train.allow_diffusion_change": True}), w)["start_step"] == 6
  with open(os.path.join(w, "config.json")) as f:
    assert json.load(f)["diffusion"]["prediction_type"] == "v_prediction"
  assert _steps(w) == [2, 4, 6, 8]


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", 0, "config.train.batch_size must be >= 1, got 0"),
    ("train.batch_size", -8, "config.train.batch_size must be >= 1, got -8"),
    ("train.log_every", 0, "config.train.log_every must be >= 1, got 0"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every must be >= 1, got 0"),
    ("train.num_steps", -1, "config.train.num_steps must be >= 0, got -1"),
    ("train.ema_decay", 1.0, r"config.train.ema_decay must be in \[0, 1\), got 1.0"),
    ("optim.lr", -1e-3, "config.optim.lr must be >= 0"),
])
def test_bad_training_values_are_named_before_anything_runs(field, value, message):
  with pytest.raises(ValueError, match=message):
    Trainer.from_config(_tiny(**{field: value}))


def test_an_unusable_workdir_is_refused_before_anything_runs(tmp_path, monkeypatch):
  """A workdir that is a file, lies under a file or is read-only: one line naming it, nothing built or
  written (train.py prints it as `error: ...`; it used to be a raw OSError/FileExistsError)."""
  f = tmp_path / "file"
  f.write_text("x")
  built = []
  monkeypatch.setattr(Trainer, "from_config", lambda *a: built.append(1))
  with pytest.raises(ValueError, match=r"^workdir: .*file exists and is not a directory$"):
    run(_tiny(), str(f))
  with pytest.raises(ValueError, match=r"^workdir: cannot create .*file/run: .*file is not a directory$"):
    run(_tiny(), str(f / "run"))
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere: chmod cannot show it)
  with pytest.raises(ValueError, match=r"^workdir: .* is not writable \(creating .*new/run\)$"):
    run(_tiny(), str(tmp_path / "new" / "run"))
  assert not built and not (tmp_path / "new").exists() and f.read_text() == "x"


def test_a_second_process_on_a_workdir_is_refused_and_a_dead_owner_leaves_no_stale_lock(tmp_path):
  import subprocess
  import sys
  import textwrap
  from sdjax.lock import LockedError, WorkdirLock
  w = str(tmp_path / "run")
  os.makedirs(w)
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {ROOT!r})
      from sdjax.lock import WorkdirLock
      WorkdirLock({w!r}).acquire()
      print("locked", flush=True)
      time.sleep(120)
      """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=rf"is in use by another training run \(pid {holder.pid} on "):
      run(_tiny(), w)  # refused before anything is built or written
    assert sorted(os.listdir(w)) == [".lock"]
  finally:
    holder.kill()  # as kill -9: no clean-up ran
    holder.wait()
  with WorkdirLock(w):  # the dead owner's lock is gone with it
    with pytest.raises(LockedError):
      WorkdirLock(w).acquire()  # one holder at a time, also within a process
  WorkdirLock(w).acquire().release()


def test_a_run_whose_steps_all_fail_stops_with_an_error(tmp_path):
  w = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"the last [2-6] steps \(to step [46]\) were all skipped.*"
                                               r"config.train.max_skipped_steps=2"):
    run(_tiny(**{"optim.lr": 1e12, "optim.warmup_steps": 0, "optim.grad_clip": 0.0, "train.max_skipped_steps": 2,
                 "train.num_steps": 12}), w)
  assert max(_steps(w)) < 12


def _truncate_arrays(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "state")
  for folder, _, names in os.walk(d):
    if os.path.basename(folder) == "d" and "ocdbt" in folder:  # the array data files
      for name in names:
        os.truncate(os.path.join(folder, name), 100)


# Reading the truncated arrays leaves tensorstore futures that report their errors again when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, compilation_cache, caplog):
  from sdjax.checkpoint import CorruptCheckpointError
  w = str(tmp_path / "run")
  const = {"optim.schedule": "constant"}             # the same learning rates whatever num_steps is
  run(_tiny(**const), w)                            # checkpoints at 3 and 6
  with open(os.path.join(w, "metrics.jsonl")) as f:
    first = {r["step"]: r["loss"] for r in map(json.loads, f)}
  _truncate_arrays(w, 6)
  summary = run(_tiny(**const, **{"train.num_steps": 9}), w)
  assert summary["start_step"] == 3 and summary["final_step"] == 9
  assert any("cannot be read" in r.message and "resuming from step 3" in r.message for r in caplog.records)
  assert os.path.isdir(os.path.join(w, "checkpoints_broken", "6"))  # kept, out of the way
  with open(os.path.join(w, "metrics.jsonl")) as f:
    again = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert sorted(again) == [2, 4, 6, 8, 9]
  # The same trajectory (the record at 4 averages steps 3-4 in the first run, step 4 alone after the resume).
  np.testing.assert_allclose(again[6], first[6], rtol=1e-6)

  for step in os.listdir(os.path.join(w, "checkpoints")):
    _truncate_arrays(w, step)
  with pytest.raises(CorruptCheckpointError, match=r"no checkpoint in .* can be read: .*/9 cannot be read"):
    run(_tiny(**const, **{"train.num_steps": 12}), w)


@pytest.mark.parametrize("component", ["unet_sd1", "unet_sd2", "unet_sdxl", "unet_class", "vae_sd", "vae_sdxl",
                                       "vae_shift"])
def test_every_field_diffusers_writes_round_trips(component):
  from sdjax.models.unet import UNetConfig
  from sdjax.models.vae import VAEConfig
  with open(os.path.join(ROOT, "tests", "fixtures", "models", component, "config.json")) as f:
    written = json.load(f)
  cls = UNetConfig if component.startswith("unet") else VAEConfig
  out = cls.from_diffusers_config(written).to_diffusers_config()
  lost = {k: (v, out.get(k, "missing")) for k, v in written.items()
          if not k.startswith("_") and json.dumps(v) != json.dumps(out.get(k, "missing"))}
  assert not lost, lost
