"""Stable Diffusion x4 upscaling (diffusers' `StableDiffusionUpscalePipeline`): load, run, save.

The contract (what diffusers 0.42's pipeline does, and what the parity tests check against it):
- A low-res image [B, h, w, 3] in [-1, 1] is noised with the *low-res* schedule (a DDPMScheduler, `add_noise`) to
  `noise_level` (an int in [0, max_noise_level]; diffusers' default 20) and concatenated on channels to the latents
  the sampler denoises, which have the low-res image's size: U-Net in_channels = latent channels + 3.
- The noise level is also the U-Net's class label (`class_labels`, num_class_embeds 1000), for both branches of
  classifier-free guidance; the text conditioning is SD 2.x's (one CLIP text encoder, `sdjax.pipelines.Prompt`).
- The final latents are decoded by the VAE (the real upscaler's has 3 blocks, a 4x downscale, and scaling_factor
  0.08333, which diffusers' pipeline forces and so does `load`): images [B, f h, f w, 3] in [-1, 1], f = the VAE's
  downscale (4).
- The real x4 U-Net has `only_cross_attention` [True, True, True, False] (`sdjax.models.unet.UNetConfig`).

API:
- `load(folder)` -> `(Upscaler, params)` from a diffusers StableDiffusionUpscalePipeline folder; params is
  `{"unet", "vae", "text_encoders": (p,)}` (the layout of `sdjax.pipelines`).
- `upscale(up, params, prompt, keys, low_res_image, *, noise_level, sampler, num_steps, ...)` -> images; pure and
  jit-able (`up` and the sampler settings static). Image i's random draws (starting latents, low-res noise, the
  stochastic samplers' step noise) come from keys[i] alone.
- `save(folder, unet, vae, text_encoder, params, tokenizer, scheduler_config, low_res_scheduler_config,
  max_noise_level=350)` writes the same diffusers layout (model_index.json with the classes and max_noise_level,
  unet/, vae/, text_encoder/, tokenizer/, scheduler/, low_res_scheduler/) that `load` and diffusers' `from_pretrained`
  read. It takes sdjax modules, the params layout above, a tokenizer folder path and scheduler config dicts, so a
  training task can export a fine-tuned upscaler through it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import pipelines, samplers, schedules
from sdjax.convert import diffusers as dconv
from sdjax.guidance import classifier_free_guidance
from sdjax.models import AutoencoderKL, CLIPTextModel, UNet, clip
from sdjax.schedules import Schedule

PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
LOW_RES_SCHEDULER_CLASS = "DDPMScheduler"
IMAGE_CHANNELS = 3
DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' default when model_index.json has none
VAE_SCALING_FACTOR = 0.08333  # what diffusers' pipeline sets on any other VAE
# Salts of keys[i] (sdjax.pipelines uses 0 for the starting noise, 1 for step noise, 2 and 3 for VAE draws).
_LOW_RES_NOISE_SALT = 4


@dataclasses.dataclass(frozen=True, eq=False)
class Upscaler:
  """The modules and settings of an x4 upscaler (static under jit; params travel separately).

  schedule / sampler: the sampling scheduler's schedule and sdjax sampler name (`schedules.from_diffusers_config`,
  `schedules.sampler_from_diffusers_config`); low_res_schedule: the DDPM schedule that noises the low-res image;
  scheduler_config / low_res_scheduler_config: the diffusers dicts they came from (with `_class_name`), for `save`.
  """
  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  schedule: Schedule
  sampler: str
  low_res_schedule: Schedule
  max_noise_level: int
  scheduler_config: dict
  low_res_scheduler_config: dict
  tokenizer: Any = None

  def __post_init__(self):
    check_upscaler(self.unet, self.vae, self.text_encoder, self.max_noise_level, "Upscaler")
    object.__setattr__(self, "max_noise_level", int(self.max_noise_level))  # (a numpy int would not go to JSON)

  @property
  def sd(self) -> pipelines.StableDiffusion:
    """The modules as a `pipelines.StableDiffusion`, for its conditioning and decoding helpers."""
    return pipelines.StableDiffusion(unet=self.unet, vae=self.vae, text_encoders=(self.text_encoder,),
                                     schedule=self.schedule)

  @property
  def factor(self) -> int:
    """Output pixels per input pixel along each axis (the VAE's downscale: 4 for the x4 upscaler)."""
    return self.vae.config.downscale


def check_upscaler(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, max_noise_level: int,
                   where: str) -> None:
  """The components fit an upscaling pipeline: U-Net in_channels = latent channels + 3 and out_channels = latent
  channels, a class-conditional U-Net (the noise level) with num_class_embeds > max_noise_level, and cross-attention
  as wide as the text encoder. (`dconv.check_compatible`, the text-to-image rule, refuses latent + 3 inputs.)"""
  ucfg, latent = unet.config, vae.config.latent_channels
  if ucfg.in_channels != latent + IMAGE_CHANNELS or ucfg.out_channels != latent:
    raise ValueError(f"{where}: an upscaling U-Net takes latent + {IMAGE_CHANNELS} = {latent + IMAGE_CHANNELS} "
                     f"channels and returns {latent} (the VAE's latent channels); this one takes {ucfg.in_channels} "
                     f"and returns {ucfg.out_channels}")
  if ucfg.cross_attention_dim != text_encoder.config.hidden_size:
    raise ValueError(f"{where}: the U-Net's cross_attention_dim is {ucfg.cross_attention_dim} but the text encoder "
                     f"gives {text_encoder.config.hidden_size} features")
  if ucfg.addition_embed_type is not None or ucfg.time_cond_proj_dim is not None:
    raise ValueError(f"{where}: the U-Net has SDXL or LCM conditioning, which the upscaling pipeline does not give")
  if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, (int, np.integer)) or max_noise_level < 0:
    raise ValueError(f"{where}: max_noise_level must be an int >= 0, got {max_noise_level!r}")
  if ucfg.num_class_embeds is None or ucfg.num_class_embeds <= max_noise_level:
    raise ValueError(f"{where}: the U-Net's class embedding (num_class_embeds={ucfg.num_class_embeds}) must cover "
                     f"the noise levels 0..max_noise_level={max_noise_level}")


# --- loading ----------------------------------------------------------------------------------------------

def _read_index(folder: str) -> dict:
  index = dconv.read_model_index(folder)
  if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
    name = index.get("_class_name") if isinstance(index, dict) else None
    raise ValueError(f"{folder}: a {name!r} folder, not a {PIPELINE_CLASS!r} one (use sdjax.convert.load_pipeline "
                     "for text-to-image pipelines)")
  return index


def _component(index: dict, folder: str, name: str) -> tuple[str, str]:
  spec = index.get(name)
  if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[1], str)):
    raise ValueError(f"{folder}: model_index.json has no {name!r} component (got {spec!r:.60})")
  return os.path.join(folder, name), spec[1]


def _scheduler_config(index: dict, folder: str, name: str) -> dict:
  path, cls_name = _component(index, folder, name)
  config_path = os.path.join(path, "scheduler_config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{folder}: {name}/scheduler_config.json is missing")
  with open(config_path) as f:
    config = json.load(f)
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: expected a JSON object")
  return {**{k: v for k, v in config.items() if not k.startswith("_")}, "_class_name": cls_name}


def load(folder: str, *, variant: str | None = None, **overrides) -> tuple[Upscaler, dict]:
  """(Upscaler, params) from a diffusers StableDiffusionUpscalePipeline folder. `overrides` (dtype, remat,
  attention_implementation) apply to the U-Net. A VAE whose scaling_factor is not 0.08333 gets 0.08333, with a
  warning, as diffusers' pipeline does."""
  index = _read_index(folder)
  unet_path, _ = _component(index, folder, "unet")
  vae_path, _ = _component(index, folder, "vae")
  text_path, text_cls = _component(index, folder, "text_encoder")
  tok_path, _ = _component(index, folder, "tokenizer")
  unet, unet_params = dconv.load_component(unet_path, "unet", variant=variant, **overrides)
  vae, vae_params = dconv.load_component(vae_path, "vae", variant=variant)
  if vae.config.scaling_factor != VAE_SCALING_FACTOR:
    warnings.warn(f"{vae_path}: scaling_factor {vae.config.scaling_factor} replaced by {VAE_SCALING_FACTOR}, as "
                  f"diffusers' {PIPELINE_CLASS} does", stacklevel=2)
    vae = type(vae)(dataclasses.replace(vae.config, scaling_factor=VAE_SCALING_FACTOR))
  text_encoder, text_params = dconv.load_component(text_path, "text_encoder", variant=variant,
                                                   with_projection=text_cls == "CLIPTextModelWithProjection")
  scheduler_config = _scheduler_config(index, folder, "scheduler")
  low_res_config = _scheduler_config(index, folder, "low_res_scheduler")
  max_noise_level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
  up = make(unet, vae, text_encoder, scheduler_config, low_res_config, max_noise_level,
            tokenizer=clip.load_tokenizer(tok_path), where=folder)
  return up, {"unet": unet_params, "vae": vae_params, "text_encoders": (text_params,)}


def make(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, scheduler_config: Mapping[str, Any],
         low_res_scheduler_config: Mapping[str, Any], max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL, *,
         tokenizer: Any = None, where: str = "upscaler") -> Upscaler:
  """An Upscaler from modules and diffusers scheduler dicts (each with `_class_name`; the low-res one a
  DDPMScheduler), validated: the schedules and sampler are built here, so a bad config fails now, naming `where`."""
  configs = {"scheduler": dict(scheduler_config), "low_res_scheduler": dict(low_res_scheduler_config)}
  for name, config in configs.items():
    if not isinstance(config.get("_class_name"), str):
      raise ValueError(f"{where}: the {name} config needs a '_class_name' (the diffusers scheduler class)")
  if configs["low_res_scheduler"]["_class_name"] != LOW_RES_SCHEDULER_CLASS:
    raise ValueError(f"{where}: low_res_scheduler must be a {LOW_RES_SCHEDULER_CLASS}, got "
                     f"{configs['low_res_scheduler']['_class_name']!r}")
  try:
    schedule = schedules.from_diffusers_config(configs["scheduler"])
    sampler = schedules.sampler_from_diffusers_config(configs["scheduler"])
    low_res = schedules.from_diffusers_config(configs["low_res_scheduler"])
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return Upscaler(unet=unet, vae=vae, text_encoder=text_encoder, schedule=schedule, sampler=sampler,
                  low_res_schedule=low_res, max_noise_level=max_noise_level, scheduler_config=configs["scheduler"],
                  low_res_scheduler_config=configs["low_res_scheduler"], tokenizer=tokenizer)


def with_scheduler(up: Upscaler, scheduler_config: Mapping[str, Any]) -> Upscaler:
  """`up` sampling with another diffusers scheduler config (with `_class_name`), as diffusers'
  `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`."""
  return make(up.unet, up.vae, up.text_encoder, scheduler_config, up.low_res_scheduler_config, up.max_noise_level,
              tokenizer=up.tokenizer)


# --- upscaling --------------------------------------------------------------------------------------------

def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def noise_levels(up: Upscaler, noise_level: Any, batch: int) -> jax.Array:
  """`noise_level` (an int, or ints [B]) as int32 [B]; out-of-range values raise where they are concrete (a
  Python int, or an array outside jit)."""
  if isinstance(noise_level, bool) or isinstance(noise_level, float):
    raise ValueError(f"noise_level must be an int (or ints [B]), got {noise_level!r}")
  if _concrete(noise_level):
    levels = np.asarray(noise_level)
    if levels.dtype.kind not in "iu" or levels.ndim > 1 or (levels.ndim == 1 and levels.shape[0] != batch):
      raise ValueError(f"noise_level must be an int or ints [{batch}], got {noise_level!r:.60}")
    if levels.size and (levels.min() < 0 or levels.max() > up.max_noise_level):
      raise ValueError(f"noise_level must be in [0, max_noise_level={up.max_noise_level}], got {noise_level!r:.60}")
  levels = jnp.asarray(noise_level)
  if not jnp.issubdtype(levels.dtype, jnp.integer) or levels.ndim > 1:
    raise ValueError(f"noise_level must be an int or ints [{batch}], got {levels.dtype} {levels.shape}")
  return jnp.broadcast_to(levels.astype(jnp.int32), (batch,))


def _check_inputs(up: Upscaler, prompt: pipelines.Prompt, keys: jax.Array, image: jax.Array,
                  arrays: Mapping[str, tuple[jax.Array | None, tuple]]) -> None:
  if image.ndim != 4 or image.shape[-1] != IMAGE_CHANNELS or image.shape[1] < 1 or image.shape[2] < 1:
    raise ValueError(f"low_res_image must be [B, H, W, {IMAGE_CHANNELS}] (NHWC, in [-1, 1]), got {image.shape}")
  if _concrete(image):
    lo, hi = float(jnp.min(image)), float(jnp.max(image))
    if not (-1.0 <= lo and hi <= 1.0):  # also refuses NaN
      raise ValueError(f"low_res_image must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] (map [0, 1] images "
                       "with x * 2 - 1)")
  b = keys.shape[0]
  if image.shape[0] != b:
    raise ValueError(f"batch mismatch: {b} keys but low_res_image has shape {image.shape}")
  for leaf in jax.tree.leaves(prompt):
    if leaf.shape[0] != b:
      raise ValueError(f"batch mismatch: {b} keys but a Prompt entry of shape {leaf.shape}")
  for name, (value, shape) in arrays.items():
    if value is not None and value.shape != (b,) + shape:
      raise ValueError(f"{name} has shape {value.shape}, expected {(b,) + shape}")
  if prompt.negative_ids is not None and prompt.guidance_scale is None:
    raise ValueError("Prompt.negative_ids given without guidance_scale")
  if len(prompt.ids) != 1:
    raise ValueError(f"the upscaler has one text encoder, got {len(prompt.ids)} id arrays")
  if up.sd.sdxl or prompt.time_ids is not None:
    raise ValueError("Prompt.time_ids (SDXL micro-conditioning) does not apply to the upscaler")


def upscale(up: Upscaler, params: Any, prompt: pipelines.Prompt, keys: jax.Array, low_res_image: jax.Array, *,
            noise_level: Any = 20, sampler: str, num_steps: int, noise: jax.Array | None = None,
            low_res_noise: jax.Array | None = None, step_noise: jax.Array | None = None, **options: Any) -> jax.Array:
  """Images [B, f H, f W, 3] in [-1, 1] (f = `up.factor`, 4) upscaled from `low_res_image` [B, H, W, 3] in [-1, 1].

  params: `{"unet", "vae", "text_encoders": (p,)}`. prompt: one text encoder's ids; with negative_ids, classifier-
  free guidance at prompt.guidance_scale [B] (diffusers guides when guidance_scale > 1: pass negative_ids=None for
  guidance 1). noise_level: an int or ints [B] in [0, up.max_noise_level]; out-of-range levels raise where
  concrete, and give NaN images where traced (under jit they cannot raise). The image range is checked likewise
  only outside jit. keys: [B] PRNG keys, image i's draws from keys[i] alone. `noise` [B, H, W, latent] overrides the
  starting latents (diffusers' `latents=`), `low_res_noise` [B, H, W, 3] the noise added to the low-res image
  (diffusers draws it with `randn_tensor` from its generator), `step_noise` the stochastic samplers' per-step noise.
  `options` go to `samplers.sample`.
  """
  sd = up.sd
  b, h, w = low_res_image.shape[:3] if low_res_image.ndim == 4 else (None,) * 3
  latent_shape = (h, w, up.vae.config.latent_channels)
  _check_inputs(up, prompt, keys, low_res_image, {"noise": (noise, latent_shape),
                                                   "low_res_noise": (low_res_noise, (h, w, IMAGE_CHANNELS))})
  levels = noise_levels(up, noise_level, b)
  if low_res_noise is None:
    low_res_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _LOW_RES_NOISE_SALT),
                                                         (h, w, IMAGE_CHANNELS), jnp.float32))(keys)
  if noise is None:
    noise = pipelines.image_noise(keys, latent_shape)
  # diffusers: low_res_scheduler.add_noise(image, noise, noise_level) (DDPM's q(x_t | x_0)).
  noised = schedules.add_noise(up.low_res_schedule, low_res_image.astype(jnp.float32),
                               low_res_noise.astype(jnp.float32), levels)

  cond, uncond = pipelines.conditioning(sd, params, prompt)
  for c in (cond, uncond):
    if c is not None:
      c.update(image=noised, class_labels=levels)

  def model(x, t, c):  # [scaled latents, noised image] on channels, the noise level as class label
    x = jnp.concatenate([x, c["image"].astype(x.dtype)], axis=-1)
    return up.unet.apply({"params": params["unet"]}, x, t, c["context"], class_labels=c["class_labels"])

  if uncond is None:
    model_fn = lambda x, t: model(x, t, cond)
  else:
    scale = prompt.guidance_scale.astype(jnp.float32).reshape((-1, 1, 1, 1))
    rescale = 0.0 if prompt.guidance_rescale is None else prompt.guidance_rescale.astype(jnp.float32).reshape(
        (-1, 1, 1, 1))
    model_fn = classifier_free_guidance(model, cond, uncond, scale, rescale)
  if step_noise is None and samplers.get(sampler).stochastic:
    # Same per-image step noise as sdjax.pipelines' samplers (keys[i] folded with 1).
    step_noise = pipelines._step_noise(keys, latent_shape, samplers.scan_length(up.schedule, sampler, num_steps, 1.0))
  latents = samplers.sample(model_fn, noise, schedule=up.schedule, sampler=sampler, num_steps=num_steps,
                            step_noise=step_noise, **options)
  images = pipelines.decode(sd, params, latents)
  valid = (levels >= 0) & (levels <= up.max_noise_level)
  return jnp.where(valid[:, None, None, None], images, jnp.nan)


# --- saving -----------------------------------------------------------------------------------------------

def save(folder: str, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, params: Mapping[str, Any],
         tokenizer: str | Any, scheduler_config: Mapping[str, Any], low_res_scheduler_config: Mapping[str, Any],
         max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL, *, dtype: Any = None) -> None:
  """Write a diffusers StableDiffusionUpscalePipeline folder that `load` and diffusers' `from_pretrained` read.

  params: `{"unet", "vae", "text_encoders": (p,)}` (as `load` gives). tokenizer: a CLIP tokenizer folder (or a
  loaded transformers tokenizer), re-saved with `save_pretrained`. scheduler_config / low_res_scheduler_config:
  diffusers scheduler dicts with `_class_name` (the low-res one a DDPMScheduler). Everything is validated (the
  components fit, the schedulers are ones sdjax samples, the params have the modules' shapes) before anything is
  written. dtype (e.g. np.float16) casts the weights; default: as they are.
  """
  up = make(unet, vae, text_encoder, scheduler_config, low_res_scheduler_config, max_noise_level, where=folder)
  if not isinstance(params, Mapping) or not {"unet", "vae", "text_encoders"} <= set(params):
    raise ValueError('params must be {"unet", "vae", "text_encoders": (p,)}')
  if len(params["text_encoders"]) != 1:
    raise ValueError(f"the upscaler has one text encoder, got {len(params['text_encoders'])} param sets")
  models = {"unet": ("unet", unet, params["unet"]), "vae": ("vae", vae, params["vae"]),
            "text_encoder": ("text_encoder", text_encoder, params["text_encoders"][0])}
  for name, (kind, module, p) in models.items():
    expected = dconv.param_shapes(kind, module.config)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), p)
    if jax.tree.map(lambda s: tuple(s.shape), expected) != got:
      raise ValueError(f"{folder}: params[{name!r}] do not have the shapes of the {name} module")
  tok = clip.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
  if not hasattr(tok, "save_pretrained"):
    raise ValueError(f"tokenizer must be a tokenizer folder or a transformers tokenizer, got {type(tok).__name__}")
  index = {"_class_name": PIPELINE_CLASS}
  os.makedirs(folder, exist_ok=True)
  for name, (kind, module, p) in models.items():
    dconv.save_component(os.path.join(folder, name), kind, module.config, p, dtype=dtype)
    config = module.config.to_diffusers_config()
    index[name] = ["transformers" if kind == "text_encoder" else "diffusers",
                   config.get("_class_name") or config["architectures"][0]]
  tok.save_pretrained(os.path.join(folder, "tokenizer"))
  index["tokenizer"] = ["transformers", type(tok).__name__]
  for name, config in (("scheduler", up.scheduler_config), ("low_res_scheduler", up.low_res_scheduler_config)):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, name, "scheduler_config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    index[name] = ["diffusers", config["_class_name"]]
  index.update(safety_checker=[None, None], feature_extractor=[None, None], watermarker=[None, None],
               max_noise_level=up.max_noise_level)
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
