"""LCM-distilled U-Nets (`time_cond_proj_dim`) and sdjax's txt2img on them vs diffusers' LatentConsistencyModelPipeline.

Fixture (tests/fixtures/lcm/, tools/make_lcm_pipeline_fixtures.py, diffusers 0.42.1 / torch 2.13 CPU float32): a
tiny random pipeline folder written by diffusers' `save_pretrained` (U-Net with time_cond_proj_dim 8, LCMScheduler)
and its outputs for 4 steps at guidance 8.5 and 1, fed the starting latents and the per-step noise diffusers drew.
The sdjax side loads the folder with `sdjax.convert.load_pipeline` and renders all rows in one jitted call (one
compile), with negative prompts given (diffusers' LCM pipeline has none: sdjax must ignore them).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import pipelines
from sdjax.convert import diffusers as dconv
from sdjax.models import unet as unet_lib

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "lcm")
SIZE, STEPS = 32, 4
# Measured: latents (std ~18) within 3e-7 of their max, images (in [-1, 1]) within 1e-6 max abs.
LATENT_RTOL, IMAGE_ATOL = 1e-4, 1e-4


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampler",),
                   compiler_options={"xla_backend_optimization_level": 0})
def _render(sd, params, prompt, keys, noise, step_noise, *, sampler):
  latents = pipelines.denoise(sd, params, prompt, keys, noise.shape[1:], sampler=sampler, num_steps=STEPS,
                              noise=noise, step_noise=step_noise)
  return latents, pipelines.decode(sd, params, latents)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FOLDER, "reference.npz")))


@pytest.fixture(scope="module")
def loaded():
  pipe = dconv.load_pipeline(os.path.join(FOLDER, "pipeline"))
  sd, params = pipelines.from_components(pipe.models, pipe.schedule, model_type=pipe.model_type)
  return pipe, sd, params


def test_folder_loads_as_an_lcm_pipeline(loaded):
  pipe, sd, params = loaded
  assert sd.embedded_guidance and pipe.sampler == "lcm"
  assert sd.unet.config.time_cond_proj_dim == 8
  assert params["unet"]["time_embedding"]["cond_proj"]["kernel"].shape == (8, 16)
  assert "bias" not in params["unet"]["time_embedding"]["cond_proj"]
  # The config round-trips through diffusers' layout.
  d = sd.unet.config.to_diffusers_config()
  assert d["time_cond_proj_dim"] == 8
  assert unet_lib.UNetConfig.from_diffusers_config(d) == sd.unet.config


def test_txt2img_matches_diffusers(loaded, reference):
  pipe, sd, params = loaded
  cases = json.loads(str(reference["cases"]))
  cat = lambda field: np.concatenate([reference[f"{c}.{field}"] for c in cases])
  prompts, negatives = list(cat("prompt")), list(cat("negative"))
  scales = np.concatenate([np.full(len(reference[f"{c}.prompt"]), reference[f"{c}.guidance"], np.float32)
                           for c in cases])
  tokenizers = [pipe.tokenizers["tokenizer"]]
  prompt = pipelines.Prompt(pipelines.tokenize(tokenizers, sd.text_encoders, prompts),
                            pipelines.tokenize(tokenizers, sd.text_encoders, negatives), jnp.asarray(scales))
  step_noise = np.concatenate([reference[f"{c}.step_noise"] for c in cases], axis=1)
  keys = jax.vmap(jax.random.key)(jnp.arange(len(prompts)))
  latents, images = _render(sd, params, prompt, keys, jnp.asarray(cat("noise")), jnp.asarray(step_noise),
                            sampler=pipe.sampler)
  want_latents, want_images = cat("latents"), cat("image")
  latent_err = float(np.max(np.abs(np.asarray(latents) - want_latents)) / np.max(np.abs(want_latents)))
  image_err = float(np.max(np.abs(np.asarray(images) - want_images)))
  print(f"LCM txt2img vs diffusers: latents {latent_err:.2e} of their scale, images {image_err:.2e} max abs")
  assert latent_err < LATENT_RTOL and image_err < IMAGE_ATOL


def test_guidance_embedding():
  w = jnp.asarray([0.0, 0.5, 7.5])
  e = np.asarray(unet_lib.guidance_embedding(w, 9))
  assert e.shape == (3, 9) and np.all(e[:, -1] == 0)  # odd width: zero-padded
  freqs = np.exp(-np.arange(4) * np.log(10000.0) / 3)
  arg = 1000.0 * np.asarray(w, np.float64)[:, None] * freqs
  np.testing.assert_allclose(e[:, :8], np.concatenate([np.sin(arg), np.cos(arg)], 1), atol=2e-3)
  np.testing.assert_array_equal(e[0, :8], [0] * 4 + [1] * 4)
  with pytest.raises(ValueError, match="embedding_dim must be an int >= 4"):
    unet_lib.guidance_embedding(w, 3)


def test_timestep_cond(loaded):
  _, sd, params = loaded
  x = jnp.zeros((1, 4, 4, 4))
  context = jnp.zeros((1, 3, 16))
  # The fixture's cond_proj is not negligible: the guidance embedding moves the time embedding (the parity test then
  # shows the U-Net uses it as diffusers does).
  embed = unet_lib.CondTimestepEmbedding(sd.unet.config.time_embed_dim)
  cond = unet_lib.guidance_embedding(jnp.asarray([0.0, 7.5]), 8)
  emb = embed.apply({"params": params["unet"]["time_embedding"]}, jnp.ones((2, 16)), cond)
  assert float(jnp.max(jnp.abs(emb[1] - emb[0]))) > 1e-2 * float(jnp.max(jnp.abs(emb[0])))
  with pytest.raises(ValueError, match=r"timestep_cond of shape \[B, 8\]"):
    sd.unet.apply({"params": params["unet"]}, x, jnp.zeros(1), context, timestep_cond=jnp.zeros((1, 5)))
  plain = unet_lib.UNet(unet_lib.UNetConfig.from_diffusers_config(
      {**sd.unet.config.to_diffusers_config(), "time_cond_proj_dim": None}))
  with pytest.raises(ValueError, match="no time_cond_proj_dim"):
    jax.eval_shape(lambda: plain.init(jax.random.key(0), x, jnp.zeros(1), context, timestep_cond=jnp.zeros((1, 8))))


def test_a_job_passes_the_guidance_of_an_lcm_unet_at_any_scale():
  """jobs: an LCM U-Net gets its guidance scale as an input even at <= 1 (diffusers embeds w = scale - 1 at any
  value) and no negative prompts (it has no unconditional branch)."""
  from sdjax import jobs
  model = jobs.load_model(os.path.join(FOLDER, "pipeline"), safety_checker=False, echo=lambda s: None)
  defaults = jobs.Defaults(steps=2, sampler="lcm", height=32, width=32, seed=1, guidance_scale=0.5)
  items = jobs.items(jobs.resolve((({"prompt": "a cat", "negative_prompt": "dog"}, "#0"),), defaults, model), 0)
  group = items[0].spec.group
  prompt, seeds, image, mask = jobs.batch_inputs(model, group, items)
  assert prompt.negative_ids is None and prompt.guidance_scale.tolist() == [0.5] and image is None
