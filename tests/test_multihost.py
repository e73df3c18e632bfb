"""Two processes (jax.distributed on 127.0.0.1, gloo collectives, one CPU device each) train exactly like
one process with two devices and the same global batch: losses, checkpoints, resume, final state, and a
SIGTERM that both processes answer at the same step.

The children compile with XLA's cheap CPU settings and a one-level U-Net without attention (the tiny
config otherwise): compilation is most of each run's time, and both sides of every comparison use the
same settings, so agreement is unaffected.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, finished_checkpoints, losses
from sdjax import checkpoint, parallel
from sdjax.train.trainer import Trainer

TIMEOUT_S = 300  # per launch; a launch takes ~15-30 s on a 2-core machine
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ARGS = ["--config", "configs/default.py:tiny", "--config.optim.schedule=constant", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3", "--config.model.block_out_channels=(8,)",
        "--config.model.down_block_types=('DownBlock2D',)", "--config.model.up_block_types=('UpBlock2D',)",
        "--config.model.mid_block_attention=False"]
# Not inherited by the children. The XLA cache too: two processes compiling one program at once would write the
# same cache file at the same time (jax writes it in place).
MULTIHOST_ENV = ("SDJAX_COORDINATOR_ADDRESS", "SDJAX_NUM_PROCESSES", "SDJAX_PROCESS_ID", "JAX_COMPILATION_CACHE_DIR")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Launcher:
  """Starts train.py children (output to log files) and makes sure none outlives the test."""

  def __init__(self, logdir):
    self.logdir = logdir
    self.started = []

  def one(self, name, workdir, *args, devices, sample=False):
    """train.py on `workdir` (sample=True: sample.py, `workdir` its --outdir)."""
    env = {k: v for k, v in os.environ.items() if k not in MULTIHOST_ENV}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    log = os.path.join(self.logdir, f"{name}.log")
    command = (["sample.py", *args, "--outdir", workdir] if sample else
               ["train.py", *ARGS, *args, "--workdir", workdir])
    with open(log, "w") as out:
      p = subprocess.Popen([sys.executable, os.path.join(ROOT, command[0]), *command[1:]],
                           cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    p.log = log
    self.started.append(p)
    return p

  def two(self, name, workdir, *args, sample=False):
    """Processes 0 and 1 of a two-process job, one CPU device each, sharing `workdir`."""
    flags = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
    return [self.one(f"{name}_p{i}", workdir, *args, *flags, f"--process_id={i}", devices=1, sample=sample)
            for i in range(2)]

  def kill_all(self):
    for p in self.started:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def launch(tmp_path):
  launcher = Launcher(str(tmp_path))
  yield launcher
  launcher.kill_all()


def output(p, last=3000):
  with open(p.log, errors="replace") as f:
    text = f.read()
  return text[-last:] if last else text


def finish(procs, timeout=TIMEOUT_S):
  """Wait for `procs`; all must exit 0. When one fails the others get 30 s before they are killed (a peer
  waiting in a collective may never return), as do all at the timeout; the failure shows every log."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if any(p.returncode not in (None, 0) for p in procs):
      deadline = min(deadline, time.monotonic() + 30)
    if time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      break
    time.sleep(0.1)
  codes = [p.returncode for p in procs]
  if codes != [0] * len(procs):
    logs = "\n".join(f"----- {os.path.basename(p.log)} (exit {p.returncode}) -----\n{output(p)}" for p in procs)
    pytest.fail(f"exit codes {codes} (negative: killed by that signal)\n{logs}")


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def restore(workdir, step):
  """The train state saved at `step`, restored onto one device of this process."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp = Trainer.from_config(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return jax.device_get(ckpt.restore(exp.abstract_state, step))
  finally:
    ckpt.close()


def test_two_processes_train_and_resume_like_one_process(tmp_path, launch):
  steps = 6
  ref_dir = str(tmp_path / "ref")
  finish([launch.one("ref", ref_dir, f"--config.train.num_steps={steps}", devices=2)])
  ref = losses(ref_dir)
  assert sorted(ref) == list(range(1, steps + 1))

  # Two processes: steps 1-3 (checkpoint at 3), then a second launch resumes there and runs to 6.
  run_dir = str(tmp_path / "run")
  finish(launch.two("first", run_dir, "--config.train.num_steps=3"))
  assert finished_checkpoints(run_dir) == [3]
  finish(launch.two("resumed", run_dir, f"--config.train.num_steps={steps}"))
  got = losses(run_dir)
  assert sorted(got) == list(range(1, steps + 1))
  for s in range(1, steps + 1):
    np.testing.assert_allclose(got[s], ref[s], rtol=1e-5, err_msg=f"step {s}")
  assert finished_checkpoints(run_dir) == [3, 6]
  info = summary(run_dir)
  assert info["num_devices"] == 2 and info["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert info["start_step"] == 3 and info["final_step"] == steps and info["steps_run"] == 3
  assert os.path.exists(os.path.join(run_dir, "samples", f"step_{steps:07d}.png"))

  # The checkpoint both processes wrote holds the one-process run's state (params, optimizer, EMA, step, rng).
  want, have = restore(ref_dir, steps), restore(run_dir, steps)
  assert int(have.step) == steps
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(have)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_sigterm_stops_both_processes_at_the_same_step(tmp_path, launch):
  workdir = str(tmp_path / "run")
  procs = launch.two("run", workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=1000")
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + TIMEOUT_S
  while (time.monotonic() < deadline and all(p.poll() is None for p in procs)
         and not (os.path.exists(metrics) and os.path.getsize(metrics))):
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  finish(procs)
  saved = finished_checkpoints(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 1000, saved  # saved where it stopped, not at an interval
  # jax's preemption sync point: every process stopped after the same step, and that step was saved.
  for p in procs:
    stops = [line for line in output(p, last=None).splitlines() if "preemption notice: saving a checkpoint" in line]
    assert len(stops) == 1 and stops[0].endswith(f"at step {saved[0]} and exiting"), (p.log, stops)
  info = summary(workdir)
  assert info["preempted"] and info["final_step"] == saved[0]
  assert max(losses(workdir)) == saved[0]


def test_two_processes_render_a_text_to_image_job_like_one_process_and_resume_after_one_dies(tmp_path, launch):
  """sample.py as two processes renders exactly the images one process renders, each once (PNG pixels and
  index.jsonl), and when one process is killed mid-job the other stops at once with one line (it used to
  wait ~80 s for the dead one's heartbeat and then abort); the same command then renders only the rest."""
  from PIL import Image
  from sdjax.convert import random as random_pipeline
  model = str(tmp_path / "sd1")
  random_pipeline.write_random_pipeline(model, "sd1", tokenizer=os.path.join(ROOT, "tests", "fixtures", "models",
                                                                             "tokenizer"))
  args = ["--model", model, *[f"--prompt=prompt {i}" for i in range(4)], "--num_per_prompt=2", "--steps=30",
          "--sampler=ddim", "--height=32", "--width=32", "--batch_size=2", "--seed=3"]
  ref, two, killed = (str(tmp_path / name) for name in ("ref", "two", "killed"))
  finish([launch.one("ref", ref, *args, devices=2, sample=True)])
  names = sorted(f for f in os.listdir(ref) if f.endswith(".png"))
  assert len(names) == 8

  def index(outdir):
    with open(os.path.join(outdir, "index.jsonl")) as f:
      return [json.loads(line) for line in f]

  def same_images(outdir):
    assert sorted(f for f in os.listdir(outdir) if f.endswith(".png")) == names
    for name in names:
      np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(outdir, name))),
                                    np.asarray(Image.open(os.path.join(ref, name))), err_msg=name)
    assert sorted(r["file"] for r in index(outdir)) == names  # each image once
    assert sorted(index(outdir), key=lambda r: r["file"]) == sorted(index(ref), key=lambda r: r["file"])

  finish(launch.two("two", two, *args, sample=True))
  same_images(two)

  procs = launch.two("killed", killed, *args, sample=True)
  deadline = time.monotonic() + TIMEOUT_S
  while (time.monotonic() < deadline and all(p.poll() is None for p in procs)
         and not (os.path.isdir(killed) and any(f.endswith(".png") for f in os.listdir(killed)))):
    time.sleep(0.02)
  procs[1].kill()
  assert procs[0].wait(timeout=60) == 1, output(procs[0])
  last = output(procs[0]).strip().splitlines()[-1]
  assert last.startswith("error: process 0 of 2: rendering with the other processes failed") and \
      last.endswith("re-run the same command on every host to render the rest."), last
  done = sorted(f for f in os.listdir(killed) if f.endswith(".png"))
  assert 0 < len(done) < len(names), done  # killed mid-job
  finish(launch.two("resumed", killed, *args, sample=True))
  same_images(killed)
  with open(os.path.join(killed, "summary.json")) as f:
    assert json.load(f)["skipped"] == len(done)
