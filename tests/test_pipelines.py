"""sdjax.pipelines: txt2img / img2img / inpaint against step-by-step references written here as plain
Python loops over the parts (conditioning, U-Net, DDIM / Euler / Euler-ancestral updates from their
formulas, VAE), batch and device independence, input errors, and parity with diffusers' PyTorch pipelines
(tests/fixtures/pipelines/reference.npz, written by tools/make_pipeline_fixtures.py).

The tiny pipelines are `sdjax.convert.random`'s (numpy-seeded, so the same weights on every machine) with
the schedulers diffusers sampled the fixture with: SD 1.x DDIM (set_alpha_to_one False, steps_offset 1,
leading spacing), SDXL Euler. Their VAE downscales by 2: a 32x32 image has 16x16 latents.

Speed: every jitted function is module-level (one compile per model and shapes, shared between tests) and
compiled at XLA's backend optimisation level 0 (a third of the compile time on CPU; the same maths, only
fusion/codegen differ: measured differences to the default level ~4e-6 on [-1, 1] images).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sdjax import parallel, pipelines, schedules
from sdjax.convert import diffusers as dconv
from sdjax.convert.random import TINY_TEXT, random_pipeline, tiny_configs
from sdjax.models import clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REFERENCE = os.path.join(FIXTURES, "pipelines", "reference.npz")
TOKENIZER = os.path.join(FIXTURES, "models", "tokenizer")
SIZE, STEPS = 32, 4
# Max abs error on images in [-1, 1]. Jitted pipeline vs the step-by-step reference (float32 network,
# float64 update formulas; measured <= ~5e-6) and vs diffusers' PyTorch pipelines (measured ~4e-6).
REF_ATOL = 2e-5
TORCH_ATOL = 1e-4
PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "a bowl of fruit", "a red car",
           "a castle on a hill", "a dog", "a painting of the sea", "a city at night"]

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
STATIC = ("height", "width", "sampler", "num_steps", "strength")
_TXT2IMG = jit(pipelines.txt2img, static_argnums=0, static_argnames=STATIC)
IMG2IMG = jit(pipelines.img2img, static_argnums=0, static_argnames=STATIC)
INPAINT = jit(pipelines.inpaint, static_argnums=0, static_argnames=STATIC)
# The parts, for the references.
CONDITIONING = jit(pipelines.conditioning, static_argnums=0)
UNET = jit(lambda sd, params, x, t, c: pipelines.unet_fn(sd, params)(x, t, c), static_argnums=0)
ENCODE = jit(pipelines.encode_image, static_argnums=0, static_argnames="salt")
DECODE = jit(pipelines.decode, static_argnums=0)
IMAGE_NOISE = jit(pipelines.image_noise, static_argnums=1)
STEP_NOISE = jit(pipelines._step_noise, static_argnums=(1, 2))  # [steps, B, h, w, c], row i from keys[i]


def txt2img(sd, params, prompt, keys, sampler, noise=None):
  """The jitted txt2img, always called the same way: jit's cache tells positional from keyword arguments."""
  return _TXT2IMG(sd, params, prompt, keys, height=SIZE, width=SIZE, sampler=sampler, num_steps=STEPS, noise=noise)


@pytest.fixture(scope="module")
def tokenizer():
  return clip.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(REFERENCE))


def build(model_type, tokenizer, scheduler, *, inpainting=False):
  """(StableDiffusion, params, sampler name) of the tiny random pipeline and a diffusers scheduler config."""
  configs = tiny_configs(model_type, inpainting=inpainting)
  names = ("tokenizer", "tokenizer_2") if model_type == "sdxl" else ("tokenizer",)
  pipe = random_pipeline(configs, seed=0, tokenizers={n: tokenizer for n in names}, model_type=model_type)
  sd, params = pipelines.from_components(pipe.models, schedules.from_diffusers_config(scheduler),
                                         model_type=model_type)
  return sd, params, schedules.sampler_from_diffusers_config(scheduler)


def scheduler(reference, case):
  return json.loads(str(reference[f"{case}.scheduler"]))


@pytest.fixture(scope="module")
def sd1(tokenizer, reference):
  return build("sd1", tokenizer, scheduler(reference, "sd1"))


@pytest.fixture(scope="module")
def sdxl(tokenizer, reference):
  return build("sdxl", tokenizer, scheduler(reference, "sdxl"))


@pytest.fixture(scope="module")
def sd1_inpainting(tokenizer, reference):
  return build("sd1", tokenizer, scheduler(reference, "sd1"), inpainting=True)


def make_prompt(sd, tokenizer, prompts, negatives, scale, rescale=None, zero_negative=None, time_ids=None):
  toks = [tokenizer] * len(sd.text_encoders)
  b = len(prompts)
  if sd.sdxl and time_ids is None:
    time_ids = np.stack([pipelines.micro_conditioning(SIZE, SIZE)] * b)
  if sd.sdxl and zero_negative is None:
    zero_negative = np.zeros(b, bool)
  return pipelines.Prompt(
      ids=pipelines.tokenize(toks, sd.text_encoders, prompts),
      negative_ids=pipelines.tokenize(toks, sd.text_encoders, negatives),
      guidance_scale=np.broadcast_to(np.float32(scale), (b,)).copy(),
      guidance_rescale=None if rescale is None else np.broadcast_to(np.float32(rescale), (b,)).copy(),
      time_ids=time_ids, zero_negative=zero_negative)


def keys_for(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def images(n, seed):
  rng = np.random.default_rng(seed)
  return np.clip(rng.standard_normal((n, SIZE, SIZE, 3)) * 0.5, -1, 1).astype(np.float32)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- the step-by-step reference -----------------------------------------------------------------------

def guided_model(sd, params, prompt):
  """eps(x, t[, extra]) with classifier-free guidance and rescale written out: two separate U-Net calls,
  uncond + scale (cond - uncond), then each row's std pulled towards the conditional output's by
  `rescale` (Lin et al. 2023, eq. 15-16)."""
  cond, uncond = CONDITIONING(sd, params, prompt)
  scale = np.asarray(prompt.guidance_scale, np.float64).reshape(-1, 1, 1, 1)
  rescale = np.zeros_like(scale) if prompt.guidance_rescale is None else \
      np.asarray(prompt.guidance_rescale, np.float64).reshape(-1, 1, 1, 1)

  def eps(x, t, extra=None):
    c, u = dict(cond), dict(uncond)
    if extra is not None:
      c["extra"] = u["extra"] = extra
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    out_c = np.asarray(UNET(sd, params, x, tt, c), np.float64)
    out_u = np.asarray(UNET(sd, params, x, tt, u), np.float64)
    guided = out_u + scale * (out_c - out_u)
    ratio = out_c.std(axis=(1, 2, 3), keepdims=True) / guided.std(axis=(1, 2, 3), keepdims=True)
    return rescale * guided * ratio + (1 - rescale) * guided

  return eps


def leading_timesteps(sd, num_steps):
  """diffusers' leading spacing: t_i = (n-1-i) * T//n + steps_offset."""
  T = sd.schedule.num_train_timesteps
  return [(num_steps - 1 - i) * (T // num_steps) + sd.schedule.steps_offset for i in range(num_steps)]


def ddim_reference(sd, params, prompt, noise, *, num_steps=STEPS, strength=1.0, init=None, blend_mask=None,
                   extra=None):
  """DDIM (eta = 0) latents as diffusers' DDIMScheduler, step by step: prev = t - T//n,
  x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps,
  abar_prev = 1 if set_alpha_to_one else abar_0 when prev < 0. img2img starts at step n - int(n * strength)
  from init noised there; `blend_mask` (1 = generate) puts back init noised to the next step's timestep
  (with the initial noise) after every step, and init itself after the last; `extra`: the inpainting
  U-Net's extra input channels."""
  T = sd.schedule.num_train_timesteps
  abar = sd.schedule.host_abar().astype(np.float64)
  final = 1.0 if sd.schedule.set_alpha_to_one else abar[0]
  alpha = lambda t: abar[t] if t >= 0 else final
  ts = leading_timesteps(sd, num_steps)[num_steps - int(num_steps * strength):]
  noise = np.asarray(noise, np.float64)
  noised = lambda t: np.sqrt(alpha(t)) * init + np.sqrt(1 - alpha(t)) * noise
  x = noise if strength == 1.0 else noised(ts[0])
  eps_fn = guided_model(sd, params, prompt)
  for i, t in enumerate(ts):
    prev = t - T // num_steps
    eps = eps_fn(x, t, extra)
    x0 = (x - np.sqrt(1 - alpha(t)) * eps) / np.sqrt(alpha(t))
    x = np.sqrt(alpha(prev)) * x0 + np.sqrt(1 - alpha(prev)) * eps
    if blend_mask is not None:
      known = noised(ts[i + 1]) if i + 1 < len(ts) else init
      x = (1 - blend_mask) * known + blend_mask * x
  return x


def euler_reference(sd, params, prompt, noise, step_noise=None, *, num_steps=STEPS):
  """Euler (diffusers' EulerDiscreteScheduler) or, with `step_noise`, Euler ancestral (k-diffusion's
  sample_euler_ancestral) in sigma space: sigma_t = sqrt((1 - abar_t) / abar_t) at the leading timesteps,
  then 0; x starts at noise * sqrt(sigma_max^2 + 1) (leading spacing), the model sees x / sqrt(sigma^2 + 1),
  x0 = x - sigma eps; ancestral: down to sigma_down, then sigma_up fresh noise."""
  abar = sd.schedule.host_abar().astype(np.float64)
  ts = leading_timesteps(sd, num_steps)
  sigmas = [np.sqrt((1 - abar[t]) / abar[t]) for t in ts] + [0.0]
  x = np.asarray(noise, np.float64) * np.sqrt(sigmas[0] ** 2 + 1)
  eps_fn = guided_model(sd, params, prompt)
  for i, t in enumerate(ts):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = x - s * eps_fn(x / np.sqrt(s**2 + 1), t)
    if step_noise is None:
      x = x + (x - x0) / s * (s_next - s)
    else:
      s_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
      s_down = np.sqrt(s_next**2 - s_up**2)
      x = x + (x - x0) / s * (s_down - s) + np.asarray(step_noise[i], np.float64) * s_up
  return x


def decode(sd, params, latents):
  return np.asarray(DECODE(sd, params, jnp.asarray(latents, jnp.float32)))


def check_close(name, got, want, atol=REF_ATOL):
  err = max_err(got, want)
  unclipped = float(np.mean(np.abs(want) < 0.999))
  print(f"{name}: max abs error {err:.1e} (images in [-1, 1], {unclipped:.0%} of values unclipped)")
  assert unclipped > 0.5, f"{name}: the reference images are mostly clipped; the comparison says little"
  np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


# --- 1. pipelines == step-by-step references ------------------------------------------------------------

def batch_of_3(sd, tokenizer):
  """Three prompts with per-row guidance scales and rescales (row 1 without rescale)."""
  return make_prompt(sd, tokenizer, PROMPTS[:3], ["blurry", "", "dark"], [5.0, 3.0, 7.0], [0.7, 0.0, 0.3])


def test_txt2img_sd1_ddim_with_guidance_rescale_matches_reference(sd1, tokenizer):
  sd, params, sampler = sd1
  assert sampler == "ddim" and not sd.schedule.set_alpha_to_one and sd.schedule.steps_offset == 1
  prompt = batch_of_3(sd, tokenizer)
  noise = normal((3,) + sd.latent_shape(SIZE, SIZE), seed=0)
  got = txt2img(sd, params, prompt, keys_for(3), "ddim", noise)
  check_close("sd1 txt2img ddim", got, decode(sd, params, ddim_reference(sd, params, prompt, noise)))


def test_txt2img_euler_ancestral_matches_reference_with_the_same_step_noise(sd1, tokenizer):
  sd, params, _ = sd1
  prompt = batch_of_3(sd, tokenizer)
  keys = keys_for(3, seed=1)
  got = txt2img(sd, params, prompt, keys, "euler_a")
  shape = sd.latent_shape(SIZE, SIZE)
  want = euler_reference(sd, params, prompt, IMAGE_NOISE(keys, shape), STEP_NOISE(keys, shape, STEPS))
  check_close("sd1 txt2img euler_a", got, decode(sd, params, want))


def test_txt2img_sdxl_zero_negatives_and_time_ids_match_reference(sdxl, tokenizer):
  sd, params, sampler = sdxl
  assert sampler == "euler" and sd.force_zeros_for_empty_prompt
  time_ids = np.stack([pipelines.micro_conditioning(SIZE, SIZE, original_size=(64, 48), crop_top_left=(4, 2)),
                       pipelines.micro_conditioning(SIZE, SIZE)])
  # Row 0 has no negative prompt: zero negative embeddings (force_zeros_for_empty_prompt), not encoded "".
  prompt = make_prompt(sd, tokenizer, PROMPTS[:2], ["", "ugly"], [5.0, 4.0], [0.7, 0.2],
                       zero_negative=np.array([True, False]), time_ids=time_ids)
  _, uncond = CONDITIONING(sd, params, prompt)
  assert not np.any(np.asarray(uncond["context"][0])) and not np.any(np.asarray(uncond["pooled"][0]))
  _, encoded = CONDITIONING(sd, params, prompt._replace(zero_negative=np.array([False, False])))
  assert np.all(np.abs(encoded["context"][0]).max(-1) > 0.1)  # the encoded "" is not zero...
  for name in ("context", "pooled"):  # ...and row 1 is the encoded negative prompt either way
    np.testing.assert_array_equal(uncond[name][1], encoded[name][1])
  noise = normal((2,) + sd.latent_shape(SIZE, SIZE), seed=1)
  run = lambda p: txt2img(sd, params, p, keys_for(2), "euler", noise)
  got = run(prompt)
  check_close("sdxl txt2img euler", got, decode(sd, params, euler_reference(sd, params, prompt, noise)))
  # The micro-conditioning and the zeroed negatives of row 0 both matter; row 1 is untouched by them.
  for change in [dict(time_ids=np.stack([time_ids[1]] * 2)), dict(zero_negative=np.array([False, False]))]:
    other = run(prompt._replace(**change))
    assert max_err(other[0], got[0]) > 1e-3 and max_err(other[1], got[1]) < 1e-6, change


def test_img2img_matches_reference(sd1, tokenizer):
  sd, params, _ = sd1
  prompt = make_prompt(sd, tokenizer, PROMPTS[2:5], ["", "blurry", "dark"], 4.0, [0.7, 0.0, 0.5])
  keys = keys_for(3, seed=3)
  image = images(3, seed=0)
  got = IMG2IMG(sd, params, prompt, keys, image, strength=0.5, sampler="ddim", num_steps=STEPS)
  init = np.asarray(ENCODE(sd, params, image, keys, salt=2), np.float64)  # a posterior sample per key
  noise = IMAGE_NOISE(keys, init.shape[1:])
  want = ddim_reference(sd, params, prompt, noise, strength=0.5, init=init)  # the last 2 of 4 steps
  check_close("sd1 img2img ddim strength 0.5", got, decode(sd, params, want))


def test_inpaint_with_an_ordinary_unet_blends_known_latents(sd1, tokenizer):
  sd, params, _ = sd1
  prompt = make_prompt(sd, tokenizer, PROMPTS[4:7], ["", "blurry", "dark"], 5.0, 0.7)
  keys = keys_for(3, seed=4)
  image = images(3, seed=1)
  mask = np.zeros((3, SIZE, SIZE, 1), np.float32)
  mask[0, 8:24, 4:20] = 0.8  # >= 0.5: generate
  mask[1, :, SIZE // 2:] = 1.0
  mask[1, :6, :6] = 0.3  # < 0.5: keep
  mask[2, 2::3, 3::5] = 1.0  # single pixels, some on the latent grid (even row and column), most off it
  got = INPAINT(sd, params, prompt, keys, image, mask, sampler="ddim", num_steps=STEPS)
  f = sd.downscale
  m = (mask[:, ::f, ::f] >= 0.5).astype(np.float64)  # nearest-neighbour, as torch's interpolate
  init = np.asarray(ENCODE(sd, params, image, keys, salt=2), np.float64)
  noise = IMAGE_NOISE(keys, init.shape[1:])
  latents = ddim_reference(sd, params, prompt, noise, init=init, blend_mask=m)
  np.testing.assert_array_equal(latents * (1 - m), init * (1 - m))  # the kept region is the image's latents
  check_close("sd1 inpaint (4-channel U-Net, blending) ddim", got, decode(sd, params, latents))


def test_inpaint_with_an_inpainting_unet_conditions_on_mask_and_masked_image(sd1_inpainting, tokenizer):
  sd, params, _ = sd1_inpainting
  assert sd.inpainting and sd.unet.config.in_channels == 9
  prompt = make_prompt(sd, tokenizer, PROMPTS[6:8], ["blurry", ""], 5.0, 0.7)
  keys = keys_for(2, seed=5)
  image = images(2, seed=2)
  mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
  mask[0, 6:22, 10:26] = 1.0
  mask[1, SIZE // 2:] = 0.6
  mask[1, 3:9, 3:9] = 0.7
  got = INPAINT(sd, params, prompt, keys, image, mask, sampler="ddim", num_steps=STEPS)
  f = sd.downscale
  m = (mask[:, ::f, ::f] >= 0.5).astype(np.float32)
  masked = image * (mask < 0.5)
  extra = jnp.concatenate([m, ENCODE(sd, params, masked, keys, salt=3)], axis=-1)  # after the latents
  noise = IMAGE_NOISE(keys, sd.latent_shape(SIZE, SIZE))
  want = ddim_reference(sd, params, prompt, noise, extra=extra)  # no blending
  check_close("sd1 inpaint (9-channel U-Net) ddim", got, decode(sd, params, want))


# --- 2. batch and device independence -------------------------------------------------------------------

def one_at_a_time(sd, params, prompt, keys, sampler, noise=None):
  row = lambda a, i: None if a is None else a[i:i + 1]
  return np.concatenate([txt2img(sd, params, jax.tree.map(lambda a: a[i:i + 1], prompt), keys[i:i + 1], sampler,
                                 row(noise, i)) for i in range(keys.shape[0])])


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_images_do_not_depend_on_the_batch(sd1, tokenizer, sampler):
  """ddim with given starting noise (the guided U-Net and the per-row guidance are row-wise); euler_a with
  the starting and step noise drawn from each image's key."""
  sd, params, _ = sd1
  prompt = batch_of_3(sd, tokenizer)
  keys = keys_for(3, seed=6)
  noise = normal((3,) + sd.latent_shape(SIZE, SIZE), seed=6) if sampler == "ddim" else None
  batch = np.asarray(txt2img(sd, params, prompt, keys, sampler, noise))
  one = one_at_a_time(sd, params, prompt, keys, sampler, noise)
  print(f"{sampler}: batch of 3 vs one at a time: max abs difference {max_err(batch, one):.1e}")
  np.testing.assert_allclose(batch, one, rtol=1e-5, atol=1e-5)
  assert max_err(batch[0], batch[1]) > 1e-2  # different keys and prompts give different images


def test_sharded_over_8_devices_equals_one_device(sd1, tokenizer):
  """Batch 8 split over the mesh's batch axes (data 2 x fsdp 4), params split over fsdp by
  `param_shardings` (the min size lowered so that the tiny model's do split), equals the images rendered
  one by one on one device. (A data-only mesh with replicated params is the simpler case of the same.)"""
  mesh_axes = {"data": 2, "fsdp": 4}
  sd, params, _ = sd1
  prompt = make_prompt(sd, tokenizer, PROMPTS, [""] * 4 + ["blurry"] * 4, np.linspace(2, 8, 8), 0.7)
  keys = keys_for(8, seed=7)
  mesh = parallel.make_mesh(mesh_axes)
  batch = NamedSharding(mesh, P(parallel.BATCH_AXES))
  param_sh = pipelines.param_shardings(params, mesh, fsdp_min_size=256)
  split = [s for s in jax.tree.leaves(param_sh) if "fsdp" in s.spec]
  assert len(split) > 50, len(split)
  fn = functools.partial(pipelines.txt2img, sd, height=SIZE, width=SIZE, sampler="euler_a", num_steps=STEPS)
  sharded = jit(fn, in_shardings=(param_sh, batch, batch), out_shardings=batch)
  out = sharded(jax.device_put(params, param_sh), jax.device_put(prompt, batch), jax.device_put(keys, batch))
  assert len(out.sharding.device_set) == 8
  single = one_at_a_time(sd, params, prompt, keys, "euler_a")
  print(f"{mesh_axes}, {len(split)} params split: sharded vs one device: max abs difference {max_err(out, single):.1e}")
  np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5)


# --- 3. errors -------------------------------------------------------------------------------------------

def test_input_errors_are_clear(sd1, sd1_inpainting, sdxl, tokenizer):
  sd, params, _ = sd1
  prompt = make_prompt(sd, tokenizer, PROMPTS[:2], ["", ""], 5.0)
  keys = keys_for(2)
  kw = dict(sampler="ddim", num_steps=STEPS)
  assert sd.downscale == 2  # the tiny VAE's; SD's is 8
  with pytest.raises(ValueError, match="multiples of 2"):
    pipelines.txt2img(sd, params, prompt, keys, height=SIZE + 1, width=SIZE, **kw)
  with pytest.raises(ValueError, match="batch mismatch: 3 keys"):
    pipelines.txt2img(sd, params, prompt, keys_for(3), height=SIZE, width=SIZE, **kw)
  with pytest.raises(ValueError, match="batch mismatch"):
    pipelines.img2img(sd, params, prompt, keys, images(3, 0), strength=0.5, **kw)
  with pytest.raises(ValueError, match="noise has shape"):
    pipelines.txt2img(sd, params, prompt, keys, height=SIZE, width=SIZE, noise=np.zeros((2, 4, 4, 4)), **kw)
  isd, iparams, _ = sd1_inpainting
  with pytest.raises(ValueError, match="inpainting U-Net.*use inpaint"):
    pipelines.txt2img(isd, iparams, prompt, keys, height=SIZE, width=SIZE, **kw)
  with pytest.raises(ValueError, match="inpainting U-Net.*use inpaint"):
    pipelines.img2img(isd, iparams, prompt, keys, images(2, 0), strength=0.5, **kw)
  for bad in [np.ones((2, SIZE, SIZE, 3)), np.ones((2, SIZE // 2, SIZE // 2, 1)), np.ones((2, SIZE, SIZE))]:
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 32, 32, 1\)"):
      pipelines.inpaint(isd, iparams, prompt, keys, images(2, 0), bad.astype(np.float32), **kw)
  xsd, xparams, _ = sdxl
  with pytest.raises(ValueError, match="time_ids"):  # traced only (eval_shape): the error comes before any maths
    jax.eval_shape(functools.partial(pipelines.conditioning, xsd), xparams,
                   make_prompt(xsd, tokenizer, PROMPTS[:1], [""], 5.0)._replace(time_ids=None))
  # A text encoder whose vocabulary is smaller than the tokenizer's (1000 tokens): ids past its embedding table.
  small = dconv.config_from_dict("text_encoder", {**TINY_TEXT, "vocab_size": 500})
  small = dconv.KINDS["text_encoder"].module_cls(small)
  with pytest.raises(ValueError, match="vocab_size is 500"):
    pipelines.tokenize([tokenizer], [small], ["a photo of a cat"])
  with pytest.raises(ValueError, match="1 text encoder"):
    pipelines.tokenize([tokenizer, tokenizer], [small], ["a photo of a cat"])


# --- 4. parity with diffusers' PyTorch pipelines -----------------------------------------------------------

@pytest.mark.parametrize("case", ["sd1", "sdxl", "sdxl_zero"])
def test_txt2img_matches_diffusers(sd1, sdxl, tokenizer, reference, case):
  """diffusers' StableDiffusionPipeline + DDIMScheduler / StableDiffusionXLPipeline + EulerDiscreteScheduler
  with the same random weights (write_random_pipeline, seed 0) and starting latents: 32x32, 4 steps,
  guidance 5, guidance_rescale 0.7. sdxl_zero: no negative prompt, so SDXL's force_zeros_for_empty_prompt
  zeroes the negative embeddings (prompt and pooled)."""
  sd, params, sampler = sd1 if case == "sd1" else sdxl
  assert scheduler(reference, case) == scheduler(reference, "sd1" if case == "sd1" else "sdxl")
  prompts, negatives = [str(p) for p in reference[f"{case}.prompt"]], [str(n) for n in reference[f"{case}.negative"]]
  b, size = len(prompts), reference[f"{case}.image"].shape[1]
  assert size == SIZE
  zero = np.full(b, bool(reference[f"{case}.zero_negative"])) if sd.sdxl else None
  prompt = make_prompt(sd, tokenizer, prompts, negatives, 5.0, 0.7, zero_negative=zero)
  got = txt2img(sd, params, prompt, keys_for(b), sampler, reference[f"{case}.noise"])
  check_close(f"{case} vs diffusers", got, reference[f"{case}.image"], atol=TORCH_ATOL)
