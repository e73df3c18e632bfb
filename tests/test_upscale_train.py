"""Super-resolution training (config.task = "upscale", Stable Diffusion's x4-upscaler structure) on the coloured
digits with the random tiny pipeline's frozen VAE and text encoder: the low-res conditioning's conventions, exact
resume, the StableDiffusionUpscalePipeline export, and config errors before step 1."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import losses, with_overrides
from configs import upscale_digits
from sdjax import runs, schedules
from sdjax import upscale as upscale_lib
from sdjax.models import vae as vae_lib
from sdjax.train import run
from sdjax.train.tasks import upscale
from sdjax.train.trainer import Trainer



def _config(tiny_sd1, **overrides):
  return with_overrides(upscale_digits.get_config("tiny"), **{"frozen.from_pipeline": tiny_sd1, **overrides})


def test_upscale_trains_resumes_and_exports_a_diffusers_upscale_pipeline(tmp_path, tiny_sd1, compilation_cache):
  # A constant learning rate: the 2-step run's train step is then the 4-step run's (one compile, cached). The
  # uninterrupted run checkpoints only at its end. No sample grids (their sampler's compile would add ~1/5).
  overrides = {"train.num_steps": 4, "train.checkpoint_every": 2, "train.log_every": 1, "optim.schedule": "constant",
               "sample.num_images": 0}
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  run(_config(tiny_sd1, **{**overrides, "train.checkpoint_every": 4}), full)
  run(_config(tiny_sd1, **{**overrides, "train.num_steps": 2}), part)
  run(_config(tiny_sd1, **overrides), part)  # resumes at step 2
  a, b = losses(full), losses(part)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and np.all(np.isfinite(list(a.values())))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)

  # The export: a StableDiffusionUpscalePipeline folder whose U-Net is the EMA U-Net, read back by sdjax.upscale.
  folder = os.path.join(full, "upscaler")
  model = runs.load(full).model  # (Upscaler with the frozen VAE as trained, params with the restored EMA U-Net)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the exported VAE already has the pipeline's scaling factor
    up, params = upscale_lib.load(folder)
  jax.tree.map(np.testing.assert_array_equal, params["unet"], jax.device_get(model.params["unet"]))
  jax.tree.map(np.testing.assert_array_equal, params["text_encoders"], jax.device_get(model.params["text_encoders"]))
  assert (up.unet.config.in_channels, up.unet.config.out_channels, up.unet.config.num_class_embeds,
          up.unet.config.sample_size, up.max_noise_level) == (7, 4, 1000, 8, 350)
  with open(os.path.join(folder, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
  assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == {
      "unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler"}
  for got, expected in ((up.schedule, model.up.schedule), (up.low_res_schedule, model.up.low_res_schedule)):
    np.testing.assert_array_equal(got.alphas_cumprod, expected.alphas_cumprod)
    assert got.prediction_type == expected.prediction_type
  assert up.schedule.prediction_type == "v_prediction" and up.sampler == "ddim"

  # The exported VAE has the pipeline's fixed scaling factor 0.08333 and gives the same diffusion-space latents and
  # images as the frozen VAE with its own.
  vae, vae_params, sd_vae = up.vae, params["vae"], model.up.vae
  assert vae.config.scaling_factor == upscale.PIPELINE_VAE_SCALE != sd_vae.config.scaling_factor
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)

  @jax.jit
  def both(p, p2):  # (diffusion-space latents, log-variances, decoded images) of the frozen and exported VAEs
    out = []
    for module, vp in ((sd_vae, p), (vae, p2)):
      mean, logvar = module.apply({"params": vp}, images, method="encode")
      z = vae_lib.scale_latents(mean, module.config)
      out.append((z, logvar, module.apply({"params": vp}, vae_lib.unscale_latents(z, module.config), method="decode")))
    return out

  (z, logvar, decoded), (z2, logvar2, decoded2) = both(model.params["vae"], vae_params)
  np.testing.assert_allclose(z2, z, rtol=1e-4, atol=1e-5 * float(jnp.abs(z).max()))
  np.testing.assert_allclose(logvar2 - logvar, 2 * np.log(sd_vae.config.scaling_factor / 0.08333), atol=1e-4)
  np.testing.assert_allclose(decoded2, decoded, atol=1e-4)


def test_upscale_low_res_conditioning(tiny_sd1):
  """prepare() gives the U-Net the area-downsampled image noised by the low-res schedule at integer levels in
  [0, max_noise_level], and the VAE latents of the full-size image."""
  exp = Trainer.from_config(_config(tiny_sd1, **{"upscale.max_noise_level": 999}))
  task = exp.task
  batch = task.input_pipeline(0, 1).batch(0)
  out, _ = jax.jit(task.prepare)(batch, jax.random.key(0), exp.frozen)
  level, low = np.asarray(out["cond"]["noise_level"]), np.asarray(out["cond"]["low_res"])
  assert out["x0"].shape == (16, 8, 8, 4) and low.shape == (16, 8, 8, 3) and level.dtype == np.int32
  assert 0 <= level.min() and level.max() <= 999 and len(np.unique(level)) > 8
  image = np.asarray(batch["image"], np.float64)
  area = image.reshape(16, 8, 2, 8, 2, 3).mean(axis=(2, 4))
  abar = np.asarray(task.low_res_schedule.alphas_cumprod, np.float64)[level][:, None, None, None]
  noise = (low - np.sqrt(abar) * area) / np.sqrt(1 - abar)  # what the low-res schedule added
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
  np.testing.assert_allclose(np.asarray(upscale.downsample(jnp.asarray(image, jnp.float32), 2, "area")), area,
                             atol=1e-6)
  ref = schedules.make_schedule("scaled_linear", 1000, 1e-4, 0.02)  # x4-upscaling.yaml's low-res schedule
  np.testing.assert_array_equal(task.low_res_schedule.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("overrides, match", [
    ({"data.resolution": 15}, r"config.data.resolution: images of 15x15 do not divide by the VAE's downscale"),
    ({"data.resolution": 6}, r"config.model.block_out_channels: 2 levels need the latent size 3"),
    ({"upscale.max_noise_level": 1000}, r"config.upscale.max_noise_level must be in \[0, 999\]"),
    ({"sample.noise_level": 400}, r"config.sample.noise_level must be in \[0, 350\]"),
    ({"model.num_class_embeds": 100}, r"config.model.num_class_embeds is 100"),
    ({"model.in_channels": 4}, r"config.model.in_channels is 4, expected 7"),
    ({"model.out_channels": 3}, r"config.model.out_channels is 3, expected the VAE's 4"),
    ({"upscale.downsample": "nearest"}, r"config.upscale.downsample must be one of"),
])
def test_upscale_config_errors(tiny_sd1, overrides, match):
  with pytest.raises(ValueError, match=match):
    Trainer.from_config(_config(tiny_sd1, **overrides))
