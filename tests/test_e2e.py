"""End to end through the CLIs: train (tiny) -> checkpoint -> SIGKILL -> resume -> sample."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from conftest import ROOT, finished_checkpoints, losses

TINY = ["--config", "configs/default.py:tiny", "--config.optim.schedule=constant", "--config.train.log_every=1",
        "--config.train.checkpoint_every=4"]


def cli(script, *args, **kw):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600, **kw)


def test_train_kill_resume_sample(tmp_path):
  steps = 16
  # Reference: uninterrupted.
  ref_dir = str(tmp_path / "ref")
  r = cli("train.py", *TINY, f"--config.train.num_steps={steps}", "--config.train.peak_tflops=0.5",
          "--workdir", ref_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  ref = losses(ref_dir)
  assert sorted(ref) == list(range(1, steps + 1))
  # MFU columns (sdjax.train.mfu): model FLOPs per step x steps/s per device, over the given peak.
  with open(os.path.join(ref_dir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["flops_per_step"] > 0 and summary["peak_tflops"] == 0.5
  # End-of-run quality of a digit run (sdjax.eval.digits), in summary.json and printed.
  assert summary["digit_eval_images"] == 20 and 0.0 <= summary["digit_accuracy"] <= 1.0
  assert np.isfinite(summary["digit_fid"]) and summary["digit_fid"] > 0
  assert "quality (20 samples, sdjax's digit classifier): accuracy" in r.stdout
  with open(os.path.join(ref_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for rec in records:
    tflops = summary["flops_per_step"] * rec["steps_per_s"] / summary["num_devices"] / 1e12
    np.testing.assert_allclose(rec["tflops_per_device"], tflops, rtol=1e-9)
    np.testing.assert_allclose(rec["mfu"], tflops / 0.5, rtol=1e-9)
  assert finished_checkpoints(ref_dir)[-1] == steps
  from sdjax.checkpoint import Checkpointer
  ckpt = Checkpointer(ref_dir, read_only=True)
  data_state = ckpt.restore_data_state()  # the input pipeline's position is saved with the state
  ckpt.close()
  assert data_state["kind"] == "grain" and data_state["next_step"] == steps
  assert data_state["iterator"] == {"next_index": steps * 16}  # grain's own iterator state
  assert data_state["global_batch_size"] == 16 and data_state["seed"] == 0
  assert os.path.exists(os.path.join(ref_dir, "samples", f"step_{steps:07d}.png"))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(ref_dir, "tensorboard")))

  # Interrupted: a long run killed with SIGKILL once its first checkpoint is on disk.
  run_dir = str(tmp_path / "run")
  p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--config.train.num_steps=100000",
                        "--workdir", run_dir], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not finished_checkpoints(run_dir) and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = finished_checkpoints(run_dir)
  assert killed_at and killed_at[-1] < steps, f"killed too late: {killed_at}"

  # Resume: same config as the reference; the later losses must equal the uninterrupted run's.
  r = cli("train.py", *TINY, f"--config.train.num_steps={steps}", "--workdir", run_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = losses(run_dir)
  assert sorted(resumed) == list(range(1, steps + 1)), "metrics past the checkpoint were rewritten, not duplicated"
  for s in range(killed_at[-1] + 1, steps + 1):
    np.testing.assert_allclose(resumed[s], ref[s], rtol=1e-5, err_msg=f"step {s}")
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["start_step"] == killed_at[-1]

  # Sample from the resumed run.
  out = str(tmp_path / "samples")
  r = cli("sample.py", "--workdir", run_dir, "--num", "3", "--steps", "4", "--seed", "7", "--sampler", "ddim",
          "--outdir", out)
  assert r.returncode == 0, r.stderr[-3000:]
  grid = Image.open(os.path.join(out, "grid.png"))
  assert grid.size == (3 * 30 + 2, 10 * 30 + 2)  # 3 columns, one row per class, 2 px padding
  assert grid.text["sampler"] == "ddim" and grid.text["steps"] == "4" and grid.text["seed"] == "7"
  pngs = sorted(n for n in os.listdir(out) if n.startswith("class"))
  assert len(pngs) == 30 and pngs[0] == "class0_0000.png"
  data = np.load(os.path.join(out, "samples.npz"))
  assert data["images"].shape == (30, 28, 28, 1) and data["images"].std() > 0
  # A deterministic sampler gives the same images whatever the batch size.
  r = cli("sample.py", "--workdir", run_dir, "--num", "3", "--steps", "4", "--seed", "7", "--sampler", "ddim",
          "--outdir", out + "2", "--batch_size", "7")
  assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_allclose(np.load(os.path.join(out + "2", "samples.npz"))["images"], data["images"], atol=1)


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  r = cli("sample.py", "--workdir", str(tmp_path))
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "train first" in r.stderr
  assert "Traceback" not in r.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--config.train.num_steps=100000",
                        "--config.train.checkpoint_every=1000", "--workdir", workdir], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  saved = finished_checkpoints(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 1000, saved  # saved where it stopped, not at an interval
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["preempted"] and summary["final_step"] == saved[0]
