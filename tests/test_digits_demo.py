"""The "Stable Diffusion from scratch" chain on the coloured digits, tiny: the VAE stage (configs/vae_digits.py)
trains and exports; the text-conditioned U-Net stage (configs/ldm_digits.py) trains on that VAE, resumes,
exports and samples; bench/digits_demo.py's measurements run on the result. (Exact resume of each task is
pinned by its own tests: test_vae_train.py, test_ldm.py, test_upscale_train.py; the digits configs differ from
theirs by data source and sizes.)"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import persistent_compilation_cache, with_overrides
from configs import ldm_digits, vae_digits
from sdjax import convert, jobs
from sdjax.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(module, variant, **overrides):
  return with_overrides(module.get_config(variant), **overrides)


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return sorted({r["step"] for r in map(json.loads, f) if "loss" in r})


def _train_and_resume(module, workdir, **overrides):
  """2 steps, then the same run asked for 4: it resumes at step 2 (its checkpoint) and finishes."""
  run(_config(module, "tiny", **{**overrides, "train.num_steps": 2, "train.checkpoint_every": 2}), workdir)
  run(_config(module, "tiny", **{**overrides, "train.num_steps": 4, "train.checkpoint_every": 2}), workdir)
  assert _steps(workdir) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_sd1):
  """The VAE run for 2 steps, the U-Net run to step 2 and resumed to 4; a persistent XLA cache lets the resumed
  run reuse the first run's compiled step."""
  tmp = tmp_path_factory.mktemp("digits_demo")
  with persistent_compilation_cache(tmp / "xla_cache"):
    return _make_chain(tmp, tiny_sd1)


def _make_chain(tmp, pipe):
  vae_run, ldm_run = str(tmp / "vae"), str(tmp / "ldm")
  run(_config(vae_digits, "tiny", **{"train.num_steps": 2, "train.checkpoint_every": 2}), vae_run)
  _train_and_resume(ldm_digits, ldm_run, **{"train.log_every": 1, "frozen.from_pipeline": pipe,
                                            "frozen.vae": os.path.join(vae_run, "vae")})
  return tmp, vae_run, ldm_run


def test_the_vae_stage_exports_a_4x_rgb_autoencoder(chain):
  _, vae_run, _ = chain
  vae, _ = convert.load_vae(os.path.join(vae_run, "vae"))
  assert (vae.config.in_channels, vae.config.out_channels, vae.config.latent_channels) == (3, 3, 4)
  assert len(vae.config.block_out_channels) == 3  # 32 x 32 -> 8 x 8 latents
  assert np.isfinite(vae.config.scaling_factor) and vae.config.scaling_factor > 0


def test_the_text_to_image_stage_uses_the_trained_vae_and_samples(chain):
  tmp, vae_run, ldm_run = chain
  assert os.path.exists(os.path.join(ldm_run, "samples", "step_0000004.png"))
  model = jobs.load_workdir(ldm_run)
  exported_vae = convert.load_vae(os.path.join(vae_run, "vae"))[1]
  import jax
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params["vae"]), exported_vae)
  assert model.sd.latent_shape(32, 32) == (8, 8, 4)


def test_the_demo_measurements_run_on_the_tiny_chain(chain):
  tmp, vae_run, ldm_run = chain
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import digits_demo
  results, grids = str(tmp / "results.jsonl"), str(tmp / "grids")
  upscaler = os.path.join(ROOT, "tests", "fixtures", "upscale", "pipeline")  # random, 4x (tests/test_upscale.py)
  assert digits_demo.main(["vae", "text", "txt2img", "inpaint", "upscale", "--vae", os.path.join(vae_run, "vae"),
                           "--ldm", ldm_run, "--upscaler", upscaler, "--num", "4", "--batch", "4", "--steps", "2",
                           "--real", "8",
                           "--results", results, "--grids", grids]) == 0
  with open(results) as f:
    rows = [json.loads(line) for line in f]
  by_use = {}
  for r in rows:
    by_use.setdefault(r["use"], []).append(r)
  assert sorted(by_use) == ["inpaint", "text", "txt2img", "upscale", "vae"]
  assert by_use["upscale"][0]["input"] == "8x8" and by_use["upscale"][0]["images"] == 8
  assert by_use["text"][0]["captions"] == 80 and by_use["text"][0]["all_distinct"]
  assert [r["set"] for r in by_use["txt2img"]] == ["seen", "held_out"]
  for r in rows:
    for k, v in r.items():
      if isinstance(v, float):
        assert np.isfinite(v), (r["use"], k)
  assert sorted(os.listdir(grids)) == ["digits_inpaint.png", "digits_txt2img.png", "digits_upscale.png",
                                  "digits_vae.png"]
