"""Bad sampling inputs (issue 15): one-line errors naming the flag, before anything is rendered or written;
long prompts are truncated with a warning and recorded as such."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT

from sdjax import jobs, memory, prompts, sampling
from sdjax.convert import random as random_pipeline

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
NAMES = {"seed": "--seed", "steps": "--steps", "guidance_scale": "--guidance", "guidance_rescale": "--rescale",
         "strength": "--strength", "num_images": "--num_per_prompt", "batch_size": "--batch_size", "num": "--num",
         "outdir": "--outdir", "sampler": "--sampler", "height": "--height", "width": "--width"}
FLAGS = dict(steps=2, sampler="ddim", height=16, width=16, seed=7, num_images=1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("robust_models") / "sd1")
  random_pipeline.write_random_pipeline(folder, "sd1", tokenizer=TOKENIZER)
  return jobs.load_model(folder)


@pytest.mark.parametrize("name,value,match", [
    ("guidance_scale", math.nan, r"--guidance: must be a finite number, got nan"),
    ("guidance_scale", math.inf, r"--guidance: must be a finite number, got inf"),
    ("guidance_scale", -1.0, r"--guidance: must be >= 0, got -1.0"),
    ("guidance_rescale", 1.5, r"--rescale: must be in \[0, 1\], got 1.5"),
    ("guidance_rescale", math.nan, r"--rescale: must be a finite number"),
    ("strength", 0.0, r"--strength: must be in \(0, 1\], got 0.0"),
    ("strength", -math.inf, r"--strength: must be a finite number"),
    ("steps", 0, r"--steps: must be in \[1, 10000\], got 0"),
    ("batch_size", 0, r"--batch_size: must be >= 1, got 0"),
    ("num", 0, r"--num: must be >= 1, got 0"),
    ("num_images", 0, r"--num_per_prompt: must be in \[1, 1000\], got 0"),
    ("seed", 2**40, r"--seed: must be in \[0, 2147483647\], got 1099511627776"),
    ("seed", -1, r"--seed: must be in \[0, 2147483647\], got -1"),
])
def test_bad_flag_values(name, value, match):
  with pytest.raises(jobs.JobError, match=match):
    prompts.check_settings({name: value}, NAMES)


def test_good_flag_values_pass():
  prompts.check_settings({"guidance_scale": 0.0, "guidance_rescale": 1.0, "strength": 1.0, "steps": 1,
                          "batch_size": 1, "num": 1, "seed": prompts.SEED_MAX, "height": None}, NAMES)


def test_resolve_rejects_nonfinite_defaults_and_too_few_pndm_steps(sd1):
  raw = [({"prompt": "x"}, "--prompt #0")]
  with pytest.raises(jobs.JobError, match=r"--guidance: must be a finite number, got nan"):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "guidance_scale": math.nan}), sd1, names=NAMES)
  with pytest.raises(jobs.JobError, match=r"--rescale: must be a finite number, got inf"):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "guidance_rescale": math.inf}), sd1, names=NAMES)
  with pytest.raises(jobs.JobError, match=r"--steps: pndm needs num_steps in \[2, "):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "sampler": "pndm", "steps": 1}), sd1, names=NAMES)
  jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "sampler": "pndm", "steps": 2}), sd1, names=NAMES)


def test_bad_outdir(tmp_path, monkeypatch):
  f = tmp_path / "file.txt"
  f.write_text("x")
  with pytest.raises(jobs.JobError, match=r"--outdir: .*file.txt exists and is not a directory"):
    prompts.check_outdir(str(f), NAMES)
  with pytest.raises(jobs.JobError, match=r"--outdir: cannot create .*: .*file.txt is not a directory"):
    prompts.check_outdir(str(f / "sub"), NAMES)
  prompts.check_outdir(str(tmp_path / "new" / "dir"), NAMES)
  assert not (tmp_path / "new").exists()
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere)
  with pytest.raises(jobs.JobError, match=r"--outdir: .* is not writable"):
    prompts.check_outdir(str(tmp_path), NAMES)


def test_class_conditional_checks_before_loading_the_run(tmp_path):
  missing = str(tmp_path / "no_run")  # loading it would fail: the checks come first
  f = tmp_path / "file"
  f.write_text("x")
  for kw, match in ((dict(guidance_scale=math.nan), r"--guidance: must be a finite number"),
                    (dict(steps=0), r"--steps: must be in \[1, 10000\]"),
                    (dict(batch_size=0), r"--batch_size: must be >= 1"),
                    (dict(seed=2**40), r"--seed: must be in"),
                    (dict(outdir=str(f)), r"--outdir: .* exists and is not a directory")):
    with pytest.raises(jobs.JobError, match=match):
      sampling.sample_run(missing, names=NAMES, **kw)


def test_long_prompt_is_truncated_with_a_warning_and_recorded(sd1, tmp_path, capsys):
  long = "a very long prompt " * 500
  raw = (({"prompt": long}, "--prompt #0"), ({"prompt": "short"}, "--prompt #1"))
  job = jobs.Job(str(tmp_path / "out"), raw, jobs.Defaults(**FLAGS), batch_size=2, names=NAMES)
  jobs.run(job, sd1, progress=False)
  err = capsys.readouterr().err
  assert err.count("warning:") == 1 and "1 of 2 prompts" in err and f"truncated to {jobs.token_limits(sd1)[0]} tokens" in err
  with open(tmp_path / "out" / "index.jsonl") as f:
    index = {r["file"]: r for r in map(json.loads, f)}
  assert index["00000_000.png"]["truncated"] is True and "truncated" not in index["00001_000.png"]
  from PIL import Image
  assert Image.open(tmp_path / "out" / "00000_000.png").text["truncated"] == "True"


def cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_flags_are_one_line_and_write_nothing(tmp_path):
  out = tmp_path / "out"
  r = cli("--model", str(tmp_path / "no_model"), "--prompt", "x", "--guidance", "nan", "--outdir", str(out))
  assert r.returncode == 1 and r.stderr.strip() == "error: --guidance: must be a finite number, got nan"
  r = cli("--workdir", str(tmp_path / "no_run"), "--steps", "0", "--outdir", str(out))
  assert r.returncode == 1 and r.stderr.strip() == "error: --steps: must be in [1, 10000], got 0"
  assert not out.exists()


def _size_job(tmp_path, size, batch_size=1, num_images=1):
  defaults = jobs.Defaults(**{**FLAGS, "height": size, "width": size, "num_images": num_images})
  return jobs.Job(str(tmp_path / f"out{size}"), (({"prompt": "x"}, "--prompt #0"),), defaults,
                  batch_size=batch_size, names=NAMES)


def test_an_image_size_out_of_reach_is_refused_before_compiling(sd1, tmp_path, monkeypatch):
  """--height 65536 used to abort inside XLA or compile for 20 CPU-minutes: the lower bound (the U-Net's
  first-level activations, here 412 GB) refuses it at once, before job.json is written or XLA is called."""
  def no_compile(*a, **k):
    raise AssertionError("compiled")
  monkeypatch.setattr(jobs, "render_fn", no_compile)
  with pytest.raises(jobs.JobError, match=r"^--height 65536 x --width 65536: rendering \d+ images? at once needs "
                                          r"at least [0-9.]+ GiB \(the U-Net's first-level activations at 32768x32768 "
                                          r"latents\), more than the .* of host memory available \(MemAvailable\); "
                                          r"use a smaller --height/--width"):
    jobs.run(_size_job(tmp_path, 65536), sd1, progress=False)
  assert not (tmp_path / "out65536").exists()
  # The bound scales with the batch (and says so): 8 x 256 px images against 40 MB free.
  monkeypatch.setattr(memory, "_host_available", lambda: 40 * 2 ** 20)
  with pytest.raises(jobs.JobError, match=r"rendering 8 images at once needs at least 48\.0 MiB .* use a smaller "
                                          r"--height/--width or --batch_size$"):
    jobs.run(_size_job(tmp_path, 256, batch_size=8, num_images=8), sd1, progress=False)


def test_a_program_larger_than_free_memory_is_refused_after_compiling_not_run(sd1, tmp_path, monkeypatch):
  """Between the bound and the real need, XLA's memory analysis of the compiled program decides (here the tiny
  model's 64 px program needs tens of MB per device; 20 MB are free), before anything runs; the error says how much."""
  monkeypatch.setattr(memory, "_host_available", lambda: 20 * 2 ** 20)
  ran = []
  monkeypatch.setattr(jobs.multihost_utils, "process_allgather", lambda *a, **k: ran.append(1))
  with pytest.raises(jobs.JobError, match=r"^--height 64 x --width 64: rendering \d+ images? at once needs "
                                          r"[0-9.]+ [MG]iB \(XLA's memory analysis of the compiled program\), more "
                                          r"than the 20\.0 MiB of host memory"):
    jobs.run(_size_job(tmp_path, 64), sd1, progress=False)
  assert not ran and not list((tmp_path / "out64").glob("*.png"))


def test_running_out_of_device_memory_is_one_line(sd1, tmp_path, monkeypatch):
  def exhausted(*a, **k):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 10.0G\nmore")
  monkeypatch.setattr(jobs.multihost_utils, "process_allgather", exhausted)
  with pytest.raises(jobs.JobError, match=r"^--height 16 x --width 16: the devices ran out of memory rendering \d+ "
                                          r"images? at once \(RESOURCE_EXHAUSTED: Out of memory while trying to "
                                          r"allocate 10\.0G\); use a smaller --height/--width"):
    jobs.run(_size_job(tmp_path, 16), sd1, progress=False)


def test_memory_budget_and_bound():
  cpu = memory.available(jax.devices())
  assert cpu.shared and cpu.bytes > 0 and cpu.need(10, 4) == 40
  gpu = memory.Budget(100, "free on each H200", False)
  assert gpu.need(10, 4) == 10
