"""LCM-LoRA as published (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl) vs diffusers 0.42: sdjax reads the file
with `sdjax.lora_loading`, fuses it, and samples with the `lcm_lora` preset (LCM sampler, 4 steps, guidance 1) to
diffusers' `load_lora_weights` + `fuse_lora` + LCMScheduler outputs.

Fixture (tests/fixtures/lcm_lora/, tools/make_lcm_lora_fixtures.py, torch 2.13 CPU float32): tiny random LoRAs in the
published files' format (kohya keys `lora_unet_<diffusers module>.lora_down/lora_up.weight` + scalar `.alpha`,
float16, one layer per module of the training script's 14 target module types: attention projections, proj_in/out,
feed-forward, resnet conv1/conv2/conv_shortcut/time_emb_proj, down/upsampler convs), rank 4 and alpha 0.5 (the
published rank 64, alpha 8: scale 1/8), for the tiny random SD 1.x and SDXL pipelines of `sdjax.convert.random`
(seed 0, rebuilt here in memory). Cases: SD 1.x at guidance 1 (no classifier-free guidance) and 1.5 (with it, and
negative prompts), SDXL at guidance 1; the per-step noise is the noise diffusers' LCMScheduler drew.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sdjax import lora_loading, pipelines, presets, schedules
from sdjax.convert import safetensors_io
from sdjax.convert.random import random_pipeline, tiny_configs
from sdjax.convert.tree import torch_key
from sdjax.models import clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "lcm_lora")
SIZE = 32
PRESET = presets.get("lcm_lora")
# float32 on both sides. Measured: fused U-Net output within 9.4e-7 of its max; latents (std ~19) within 9.1e-7 of
# their max, images (in [-1, 1]) within 2.4e-6 max abs.
UNET_RTOL, LATENT_RTOL, IMAGE_ATOL = 1e-5, 1e-5, 1e-5


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _render(sd, params, prompt, keys, noise, step_noise):
  latents = pipelines.denoise(sd, params, prompt, keys, noise.shape[1:], sampler=PRESET.sampler,
                              num_steps=PRESET.steps, noise=noise, step_noise=step_noise)
  return latents, pipelines.decode(sd, params, latents)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FOLDER, "reference.npz")))


@pytest.fixture(scope="module")
def tokenizer():
  return clip.load_tokenizer(os.path.join(FIXTURES, "models", "tokenizer"))


@functools.cache
def _model(model_type, scheduler_json):
  tok = clip.load_tokenizer(os.path.join(FIXTURES, "models", "tokenizer"))
  names = ("tokenizer", "tokenizer_2") if model_type == "sdxl" else ("tokenizer",)
  pipe = random_pipeline(tiny_configs(model_type), seed=0, tokenizers={n: tok for n in names}, model_type=model_type)
  config = json.loads(scheduler_json)
  assert schedules.sampler_from_diffusers_config(config) == PRESET.sampler
  sd, params = pipelines.from_components(pipe.models, schedules.from_diffusers_config(config), model_type=model_type)
  return sd, params, lora_loading.fuse(params, [(os.path.join(FOLDER, model_type), 1.0)])


def model(reference, model_type):
  """(sd, params, fused params) of the tiny random pipeline with the case's LCMScheduler config and its LCM-LoRA."""
  return _model(model_type, str(reference[f"{model_type}_w1.scheduler"]))


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_the_preset():
  assert (PRESET.sampler, PRESET.steps, PRESET.guidance_scale, PRESET.schedule_options) == ("lcm", 4, 1.0, ())


@pytest.mark.parametrize("model_type", ["sd1", "sdxl"])
def test_the_file_reads_as_published_and_adapts_every_target_module(reference, model_type):
  """kohya keys with float16 factors and scalar alphas; one layer for each U-Net Dense/Conv whose diffusers name
  matches a target module of the training script (as peft matches them), with alpha 0.5 and rank 4."""
  path = os.path.join(FOLDER, model_type, "pytorch_lora_weights.safetensors")
  tensors = safetensors_io.load(path)
  assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
             for k in tensors)
  assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
  assert all(t.shape == () for k, t in tensors.items() if k.endswith(".alpha"))
  lora = lora_loading.read(os.path.join(FOLDER, model_type))
  assert lora.format == "kohya" and list(lora.layers) == ["unet"]
  layers = lora.layers["unet"]
  assert {(layer.rank, layer.alpha, layer.scale) for layer in layers.values()} == {(4, 0.5, 0.125)}
  _, params, _ = model(reference, model_type)
  targets = [str(t) for t in reference["targets"]]
  modules = {torch_key(p).removesuffix(".weight") for p, a in traverse_util.flatten_dict(params["unet"]).items()
             if p[-1] == "kernel" and a.ndim in (2, 4)}
  adapted = {m.replace(".", "_") for m in modules if any(m == t or m.endswith("." + t) for t in targets)}
  assert set(layers) == adapted
  kinds = {t: [m for m in adapted if m.endswith("_" + t.replace(".", "_"))] for t in targets}
  assert all(kinds.values()), [t for t, ms in kinds.items() if not ms]  # every module type is present
  convs = {m for m, layer in layers.items() if layer.down.ndim == 4}
  assert any(layers[m].down.shape[2:] == (3, 3) for m in convs) and any("conv_shortcut" in m for m in convs)


def test_fused_unet_matches_diffusers(reference):
  sd, params, fused = model(reference, "sd1")
  apply = jax.jit(lambda p: sd.unet.apply({"params": p}, reference["unet.x"], reference["unet.t"],
                                          reference["unet.context"]))
  base, out = apply(params["unet"]), apply(fused["unet"])
  err, base_err = rel_err(out, reference["unet.fused"]), rel_err(base, reference["unet.base"])
  print(f"LCM-LoRA fused U-Net vs diffusers: {err:.2e} of the output's max (base {base_err:.2e})")
  assert err < UNET_RTOL and base_err < UNET_RTOL
  assert rel_err(base, reference["unet.fused"]) > 0.3  # the LoRA matters


@pytest.mark.parametrize("case", ["sd1_w1", "sd1_w15", "sdxl_w1"])
def test_lcm_lora_sampling_matches_diffusers(reference, tokenizer, case):
  """The preset's sampler and steps; guidance 1: no negative prompts (one U-Net call per step, as sdjax's jobs run
  it), 1.5: classifier-free guidance with negative prompts, as diffusers' StableDiffusion(XL)Pipeline."""
  model_type = case.split("_")[0]
  sd, _, fused = model(reference, model_type)
  assert json.loads(str(reference[f"{case}.scheduler"])) == json.loads(str(reference[f"{model_type}_w1.scheduler"]))
  prompts, negatives = list(reference[f"{case}.prompt"]), list(reference[f"{case}.negative"])
  b, guidance = len(prompts), float(reference[f"{case}.guidance"])
  toks = [tokenizer] * len(sd.text_encoders)
  cfg = guidance > 1.0
  prompt = pipelines.Prompt(
      ids=pipelines.tokenize(toks, sd.text_encoders, prompts),
      negative_ids=pipelines.tokenize(toks, sd.text_encoders, negatives) if cfg else None,
      guidance_scale=jnp.full((b,), guidance, jnp.float32),
      time_ids=jnp.asarray(np.stack([pipelines.micro_conditioning(SIZE, SIZE)] * b)) if sd.sdxl else None,
      zero_negative=jnp.zeros((b,), bool) if sd.sdxl and cfg else None)
  keys = jax.vmap(jax.random.key)(jnp.arange(b))
  latents, images = _render(sd, fused, prompt, keys, jnp.asarray(reference[f"{case}.noise"]),
                            jnp.asarray(reference[f"{case}.step_noise"]))
  latent_err = rel_err(latents, reference[f"{case}.latents"])
  image_err = float(np.max(np.abs(np.asarray(images) - reference[f"{case}.image"])))
  print(f"{case}: latents {latent_err:.2e} of their max, images {image_err:.2e} max abs")
  assert latent_err < LATENT_RTOL and image_err < IMAGE_ATOL
