"""sdjax.upscale (Stable Diffusion x4 upscaling) against diffusers 0.42's StableDiffusionUpscalePipeline, and the
U-Net's `only_cross_attention`, on the tiny random pipeline of tools/make_upscale_fixtures.py
(tests/fixtures/upscale/: the pipeline folder diffusers saved, and reference.npz).

Tolerances (float32 throughout): U-Net outputs within 1e-5 of diffusers' (measured ~1e-6, outputs of std ~0.3);
upscaled images in [-1, 1] within 1e-4 absolute (measured ~1e-5).

Speed: one compile per sampler and batch shape (DDIM batch 2, Euler batch 1), at XLA's backend optimisation level 0
as tests/test_pipelines.py (a third of the compile time on CPU; the same maths).
"""
import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from sdjax import pipelines, upscale
from sdjax.convert import diffusers as dconv
from sdjax.convert import tree

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "upscale", "pipeline")
REFERENCE = os.path.join(FIXTURES, "upscale", "reference.npz")
UNET_ATOL, IMAGE_ATOL = 1e-5, 1e-4

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
UPSCALE = jit(upscale.upscale, static_argnums=0, static_argnames=("sampler", "num_steps"))
UNET = jit(lambda unet, p, x, t, c, labels: unet.apply({"params": p}, x, t, c, class_labels=labels), static_argnums=0)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def loaded():
  return upscale.load(FOLDER)


def case_upscaler(up, reference, case):
  """The loaded upscaler with the scheduler diffusers sampled `case` with (the folder's DDIM, or Euler)."""
  config = json.loads(str(reference[f"{case}.scheduler"]))
  if config == up.scheduler_config:
    return up
  return upscale.with_scheduler(up, config)


def case_prompt(up, reference, case):
  prompts = [str(p) for p in reference[f"{case}.prompt"]]
  negatives = [str(n) for n in reference[f"{case}.negative"]]
  enc = (up.text_encoder,)
  return pipelines.Prompt(ids=pipelines.tokenize([up.tokenizer], enc, prompts),
                          negative_ids=pipelines.tokenize([up.tokenizer], enc, negatives),
                          guidance_scale=np.full(len(prompts), reference[f"{case}.guidance"], np.float32))


def run_case(up, params, reference, case, noise_level=None):
  b = reference[f"{case}.image_in"].shape[0]
  if noise_level is None:
    noise_level = np.full(b, reference[f"{case}.noise_level"], np.int32)
  return np.asarray(UPSCALE(up, params, case_prompt(up, reference, case), jax.random.split(jax.random.key(0), b),
                            reference[f"{case}.image_in"], noise_level=noise_level, sampler=up.sampler,
                            num_steps=int(reference[f"{case}.steps"]), noise=reference[f"{case}.noise"],
                            low_res_noise=reference[f"{case}.low_res_noise"]))


def test_load(loaded):
  up, params = loaded
  assert (up.sampler, up.max_noise_level, up.factor, up.vae.config.scaling_factor) == ("ddim", 350, 4, 0.08333)
  assert up.unet.config.only_cross_attention == (True, True, False)
  assert up.unet.config.in_channels == up.vae.config.latent_channels + 3
  assert up.low_res_scheduler_config["_class_name"] == "DDPMScheduler"
  # attn1 of an only_cross_attention block maps the 24-wide text to the block's 16 channels; elsewhere self-attention.
  attn1 = lambda block: params["unet"][block]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"]
  assert attn1("down_blocks_1").shape == attn1("up_blocks_1").shape == (24, 16)
  assert attn1("down_blocks_2").shape == attn1("up_blocks_0").shape == (32, 32)


def test_only_cross_attention_unet_matches_diffusers(loaded, reference):
  """One U-Net call (batch 2, noise levels 20 and 350 as class labels) against diffusers' UNet2DConditionModel with
  only_cross_attention [True, True, False]."""
  up, params = loaded
  args = [reference[f"unet.{k}"] for k in ("x", "t", "context", "class_labels")]
  got = np.asarray(UNET(up.unet, params["unet"], *args))
  want = reference["unet.out"]
  err = np.abs(got - want).max()
  print(f"U-Net vs diffusers: max abs {err:.2e}, max rel {err / np.abs(want).max():.2e}")
  assert err < UNET_ATOL


@pytest.mark.parametrize("case", ["ddim", "euler"])
def test_upscale_matches_diffusers(loaded, reference, case):
  """StableDiffusionUpscalePipeline, 16x16 -> 64x64, 3 steps, guidance 7.5 with negative prompts, the same starting
  latents and low-res noise: DDIM (the folder's scheduler, v-prediction) at noise_level 20, Euler at 60."""
  up, params = loaded
  up = case_upscaler(up, reference, case)
  assert (up is loaded[0]) == (case == "ddim")  # the folder's own scheduler for DDIM
  want = reference[f"{case}.image"]
  got = run_case(up, params, reference, case)
  assert got.shape == want.shape == reference[f"{case}.image_in"].shape[:1] + (64, 64, 3)
  err = np.abs(got - want).max()
  print(f"{case} vs diffusers: max abs {err:.2e} (mean {np.abs(got - want).mean():.2e})")
  assert err < IMAGE_ATOL
  if case == "ddim":  # a traced out-of-range noise level cannot raise under jit: its image is NaN (same compile)
    poisoned = run_case(up, params, reference, case, noise_level=np.asarray([20, 400], np.int32))
    np.testing.assert_array_equal(poisoned[0], got[0])
    assert np.isnan(poisoned[1]).all()


def test_save_load_round_trip(loaded, reference, tmp_path):
  """save -> load gives the same modules, schedulers and params, hence the same images; the folder has diffusers'
  layout."""
  up, params = loaded
  folder = str(tmp_path / "upscaler")
  upscale.save(folder, up.unet, up.vae, up.text_encoder, params, os.path.join(FOLDER, "tokenizer"),
               up.scheduler_config, up.low_res_scheduler_config, up.max_noise_level)
  with open(os.path.join(folder, "model_index.json")) as f:
    index = json.load(f)
  assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
  assert index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
  assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
  assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
  with open(os.path.join(folder, "unet", "config.json")) as f:
    assert json.load(f)["only_cross_attention"] == [True, True, False]
  again, params2 = upscale.load(folder)
  for name in ("unet", "vae", "text_encoder"):
    assert getattr(again, name).config == getattr(up, name).config, name
  assert (again.scheduler_config, again.low_res_scheduler_config, again.max_noise_level, again.sampler) == (
      up.scheduler_config, up.low_res_scheduler_config, up.max_noise_level, up.sampler)
  flat, flat2 = tree.from_flax(params["unet"]), tree.from_flax(params2["unet"])
  assert flat.keys() == flat2.keys()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = pipelines.tokenize([again.tokenizer], (again.text_encoder,), ["a photo of a cat", ""])
  np.testing.assert_array_equal(ids, pipelines.tokenize([up.tokenizer], (up.text_encoder,), ["a photo of a cat", ""]))
  # The saved params through the (equal) loaded modules: the same images, bit for bit (one compile, shared).
  np.testing.assert_array_equal(run_case(up, params2, reference, "ddim"), run_case(up, params, reference, "ddim"))


def test_input_errors(loaded, reference):
  """Bad inputs raise before any work (eager calls, nothing is compiled)."""
  up, params = loaded
  prompt = case_prompt(up, reference, "ddim")
  image, keys = reference["ddim.image_in"], jax.random.split(jax.random.key(0), 2)

  def call(**kw):
    args = {"prompt": prompt, "keys": keys, "low_res_image": image, "noise_level": 20, **kw}
    return upscale.upscale(up, params, sampler="ddim", num_steps=2, **args)

  with pytest.raises(ValueError, match=r"noise_level must be in \[0, max_noise_level=350\], got 400"):
    call(noise_level=400)
  with pytest.raises(ValueError, match="noise_level must be in"):
    call(noise_level=np.asarray([20, -1]))
  with pytest.raises(ValueError, match="noise_level must be an int"):
    call(noise_level=20.0)
  with pytest.raises(ValueError, match=r"low_res_image must be \[B, H, W, 3\]"):
    call(low_res_image=np.zeros((2, 16, 16, 4), np.float32))
  with pytest.raises(ValueError, match=r"low_res_image must be \[B, H, W, 3\]"):
    call(low_res_image=image[0])
  with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
    call(low_res_image=image * 2)
  with pytest.raises(ValueError, match="batch mismatch"):
    call(low_res_image=image[:1])
  with pytest.raises(ValueError, match="batch mismatch"):
    call(keys=keys[:1], low_res_image=image[:1])  # the prompt still has 2 rows
  with pytest.raises(ValueError, match="noise has shape"):
    call(noise=np.zeros((2, 8, 8, 4), np.float32))
  with pytest.raises(ValueError, match="low_res_noise has shape"):
    call(low_res_noise=np.zeros((2, 16, 16, 4), np.float32))


def test_folder_and_component_errors(loaded, tmp_path):
  up, params = loaded
  with pytest.raises(ValueError, match="'LatentConsistencyModelPipeline' folder, not a 'StableDiffusionUpscale"):
    upscale.load(os.path.join(FIXTURES, "lcm", "pipeline"))
  with pytest.raises(FileNotFoundError, match="no model_index.json"):
    upscale.load(str(tmp_path))
  # The text-to-image loader refuses the upscaler and says where to go.
  with pytest.raises(ValueError, match="x4 upscaler's U-Net: load such a pipeline with sdjax.upscale.load"):
    dconv.load_pipeline(FOLDER)
  args = (up.unet, up.vae, up.text_encoder, params, os.path.join(FOLDER, "tokenizer"), up.scheduler_config)
  with pytest.raises(ValueError, match="low_res_scheduler must be a DDPMScheduler"):
    upscale.save(str(tmp_path / "a"), *args, {**up.low_res_scheduler_config, "_class_name": "DDIMScheduler"})
  with pytest.raises(ValueError, match="must cover the noise levels 0..max_noise_level=1000"):
    upscale.save(str(tmp_path / "b"), *args, up.low_res_scheduler_config, 1000)
  wrong_vae = type(up.vae)(dataclasses.replace(up.vae.config, latent_channels=8))
  with pytest.raises(ValueError, match="an upscaling U-Net takes latent"):
    upscale.save(str(tmp_path / "c"), up.unet, wrong_vae, *args[2:], up.low_res_scheduler_config)
  with pytest.raises(ValueError, match=r"params\['vae'\] do not have the shapes"):
    upscale.save(str(tmp_path / "d"), *args[:3], {**params, "vae": params["unet"]}, *args[4:],
                 up.low_res_scheduler_config)
  assert not any(os.path.exists(tmp_path / n) for n in "abcd")  # nothing written before the checks pass


def test_only_cross_attention_config(loaded):
  """The flag as diffusers spells it: a bool (every block) or one bool per down block; it needs cross-attention,
  and it round-trips through the diffusers config."""
  unet_config = loaded[0].unet.config
  for value in (True, (False, True, True)):
    config = dataclasses.replace(unet_config, only_cross_attention=value)
    d = config.to_diffusers_config()
    assert d["only_cross_attention"] == (list(value) if isinstance(value, tuple) else value)
    assert type(config).from_diffusers_config(d) == config
  with pytest.raises(ValueError, match="only_cross_attention has 2 entries, block_out_channels has 3"):
    dataclasses.replace(unet_config, only_cross_attention=(True, False))
  with pytest.raises(ValueError, match="only_cross_attention needs cross_attention_dim"):
    dataclasses.replace(unet_config, only_cross_attention=True, cross_attention_dim=None)
  with pytest.raises(ValueError, match=r"only_cross_attention\[1\]: 1 has the wrong type int"):
    dataclasses.replace(unet_config, only_cross_attention=(True, 1, False))
