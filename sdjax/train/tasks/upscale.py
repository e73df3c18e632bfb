"""Text-guided latent super-resolution (`config.task = "upscale"`), structured as Stable Diffusion's x4 upscaler
(stabilityai/stable-diffusion-x4-upscaler; diffusers' StableDiffusionUpscalePipeline).

A training example is a high-res image x in [-1, 1] [H, W, C] and its caption. Inside the jitted step:
- the target: the frozen VAE's latents of x (a posterior sample, scaled as the ldm task scales them),
  [H/f, W/f, latent_channels] with f the VAE's downscale;
- the low-res image: x downsampled by the same f to [H/f, W/f, C] (`config.upscale.downsample`: "area", the
  mean of each f x f block, i.e. an exact antialiased box filter; or "bicubic", `jax.image.resize` with
  antialiasing, the Keys a = -0.5 kernel widened by f as PIL's BICUBIC reduction), so the low-res image has the
  latents' resolution (with the x4 upscaler's 4x VAE it is the image downsampled 4x);
- noise augmentation: an integer noise_level ~ U{0, ..., max_noise_level} per image (inclusive: every level the
  pipeline accepts is trained; the original LDM code draws torch.randint(0, max_noise_level), one level less),
  and the low-res image noised to that level of a separate DDPM schedule, the pipeline's `low_res_scheduler`:
  sqrt(abar_l) * low + sqrt(1 - abar_l) * n, n ~ N(0, I);
- the U-Net sees [noisy latents, noisy low-res image] concatenated on channels (in_channels = latent channels +
  image channels, 4 + 3 = 7), the noise level as `class_labels` (num_class_embeds, 1000 in the real model), and
  the CLIP text embeddings of the caption (dropped to "" with data.caption_dropout, for classifier-free
  guidance), and is trained on the main schedule's target (config.diffusion; the x4 upscaler's:
  v_prediction, scaled_linear betas 1e-4..0.02, 1000 steps).

Schedules (the x4 upscaler's x4-upscaling.yaml: `linear_start: 0.0001, linear_end: 0.02` for both, whose LDM
"linear" betas are linspace(sqrt(start), sqrt(end))^2, diffusers' "scaled_linear"): config.diffusion for the
latents, config.upscale.low_res_* for the low-res noise (configurable; scaled_linear 1e-4..0.02 by default).

The end of a run writes the EMA U-Net with the frozen parts as a diffusers StableDiffusionUpscalePipeline folder,
`<workdir>/upscaler` (`export`, through `sdjax.upscale.save`; `sdjax.upscale.load` and diffusers read it). The
sample grids and `sdjax.runs.load` sample with `sdjax.upscale.upscale`, the pipeline's sampling loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import parallel, pipelines, schedules
from sdjax import upscale as upscale_lib
from sdjax.data import input_pipeline
from sdjax.models import AutoencoderKL, UNet, UNetConfig
from sdjax.models import unet as unet_lib
from sdjax.train import task as task_lib
from sdjax.train.tasks.diffusion import DiffusionTask, schedule_from
from sdjax.train.tasks.latent import LatentDiffusion, load_frozen_parts, place_frozen

DOWNSAMPLES = ("area", "bicubic")
PIPELINE_VAE_SCALE = upscale_lib.VAE_SCALING_FACTOR  # StableDiffusionUpscalePipeline forces it on any VAE
EXPORT_FOLDER = "upscaler"


@dataclasses.dataclass(frozen=True)
class UpscaleConfig:
  """config.upscale: the low-res conditioning of the x4 upscaler."""
  max_noise_level: int = 350                  # noise levels 0..max_noise_level (the pipeline's max_noise_level)
  low_res_beta_schedule: str = "scaled_linear"  # the low_res_scheduler (a DDPMScheduler) that noises the image
  low_res_beta_start: float = 1e-4
  low_res_beta_end: float = 0.02
  low_res_num_train_timesteps: int = 1000
  downsample: str = "area"                    # area | bicubic: high-res image -> low-res image

  def low_res_schedule(self) -> schedules.Schedule:
    return schedules.make_schedule(self.low_res_beta_schedule, self.low_res_num_train_timesteps,
                                   self.low_res_beta_start, self.low_res_beta_end)

  def low_res_scheduler_config(self) -> dict[str, Any]:
    """diffusers' low_res_scheduler/scheduler_config.json."""
    return {"_class_name": "DDPMScheduler", "beta_schedule": self.low_res_beta_schedule,
            "beta_start": self.low_res_beta_start, "beta_end": self.low_res_beta_end,
            "num_train_timesteps": self.low_res_num_train_timesteps, "clip_sample": False,
            "prediction_type": "epsilon", "variance_type": "fixed_small"}


def upscale_config(config: ml_collections.ConfigDict) -> UpscaleConfig:
  """config.upscale (a missing field: UpscaleConfig's default), checked; errors name the key."""
  section = config.get("upscale") or {}
  known = {f.name for f in dataclasses.fields(UpscaleConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f"config.upscale: unknown field(s) {unknown}; known fields are {sorted(known)}")
  try:
    uc = UpscaleConfig(**{k: section[k] for k in section})
    uc = dataclasses.replace(uc, max_noise_level=int(uc.max_noise_level),
                             low_res_num_train_timesteps=int(uc.low_res_num_train_timesteps),
                             low_res_beta_start=float(uc.low_res_beta_start),
                             low_res_beta_end=float(uc.low_res_beta_end))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.upscale: {e}") from e
  if uc.downsample not in DOWNSAMPLES:
    raise ValueError(f"config.upscale.downsample must be one of {DOWNSAMPLES}, got {uc.downsample!r}")
  if not 0 <= uc.max_noise_level < uc.low_res_num_train_timesteps:
    raise ValueError(f"config.upscale.max_noise_level must be in [0, {uc.low_res_num_train_timesteps - 1}] (the "
                     f"low-res schedule's timesteps), got {uc.max_noise_level}")
  try:
    uc.low_res_schedule()
  except ValueError as e:
    raise ValueError(f"config.upscale.low_res_*: {e}") from e
  return uc


def downsample(images: jax.Array, factor: int, method: str) -> jax.Array:
  """[B, H, W, C] -> [B, H/factor, W/factor, C] (`factor` divides H and W): "area", the mean of each factor x
  factor block; "bicubic", antialiased bicubic (jax.image.resize)."""
  b, h, w, c = images.shape
  if method == "area":
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
  return jax.image.resize(images, (b, h // factor, w // factor, c), "bicubic", antialias=True)


def noise_low_res(schedule: schedules.Schedule, low_res: jax.Array, noise: jax.Array, level: jax.Array) -> jax.Array:
  """The low_res_scheduler's `add_noise`: sqrt(abar_level) * low_res + sqrt(1 - abar_level) * noise, level int [B]."""
  return schedules.add_noise(schedule, low_res.astype(jnp.float32), noise, level)


def pipeline_vae(config: Any, params: Any) -> tuple[Any, Any]:
  """The VAE rewritten for StableDiffusionUpscalePipeline, which decodes `latents / 0.08333` whatever the VAE's
  config says: quant_conv's mean outputs and post_quant_conv's inputs are rescaled by k = scaling_factor /
  0.08333 (the log-variance shifted by 2 ln k), so that the rewritten VAE's latents times 0.08333 are exactly
  this VAE's latents times its scaling_factor, and its decoder maps them to the same images."""
  k = config.scaling_factor / PIPELINE_VAE_SCALE
  latent = config.latent_channels
  params = jax.tree.map(np.array, params)  # a copy
  q, pq = params["quant_conv"], params["post_quant_conv"]
  q["kernel"][..., :latent] *= k
  q["bias"][:latent] *= k
  q["bias"][latent:] += 2.0 * math.log(k)
  pq["kernel"] /= k  # [1, 1, in = latent, out]
  return dataclasses.replace(config, scaling_factor=PIPELINE_VAE_SCALE), params


class UpscaleModel(NamedTuple):
  """A trained upscaler ready to sample with `sdjax.upscale.upscale(up, params, ...)` (what `sdjax.runs.load`
  gives for an "upscale" run): `up` holds the frozen VAE with its own scaling factor, not the export's 0.08333."""
  up: upscale_lib.Upscaler
  params: dict                        # {"unet", "vae", "text_encoders": (p,)}


@task_lib.register("upscale")
class Upscale(LatentDiffusion):
  """config sections: data (captioned images), frozen (VAE, text encoder), model (UNetConfig: in_channels =
  latent + image channels, num_class_embeds > max_noise_level), upscale (UpscaleConfig), diffusion, loss,
  sample (num_images, noise_level, sampler, num_steps, guidance_scale). From scratch only (no config.pretrained,
  no LoRA), one text encoder."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    input_pipeline.check_config(config.data)
    if config.data.get("source") == "latents":
      raise ValueError("config.data.source: the upscale task needs images (the low-res input is made from them), "
                       "not cached latents")
    if config.get("pretrained"):
      raise ValueError("config.pretrained: the upscale task trains its U-Net from scratch")
    parts = load_frozen_parts(config)
    if len(parts.encoders) != 1:
      raise ValueError("config.frozen.text_encoder_2: StableDiffusionUpscalePipeline has one text encoder")
    self.pretrained, self.lora, self._pretrained_unet = "", None, None
    self.vae, vae_params = parts.vae
    self.tokenizer_paths = parts.tokenizer_paths
    self.up = upscale_config(config)

    vc = self.vae.config
    if not (vc.use_quant_conv and vc.use_post_quant_conv) or vc.shift_factor or vc.latents_mean is not None:
      raise ValueError("config.frozen.vae: StableDiffusionUpscalePipeline decodes latents / scaling_factor; the VAE "
                       "needs quant_conv and post_quant_conv and no shift_factor / latents_mean")
    try:
      self.unet = UNet(UNetConfig.from_dict(config.model.to_dict()))
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.model: {e}") from e
    u = self.unet.config
    want = vc.latent_channels + vc.in_channels
    if u.in_channels != want:
      raise ValueError(f"config.model.in_channels is {u.in_channels}, expected {want}: the VAE's "
                       f"{vc.latent_channels} latent channels + the low-res image's {vc.in_channels} channels")
    if u.out_channels != vc.latent_channels:
      raise ValueError(f"config.model.out_channels is {u.out_channels}, expected the VAE's {vc.latent_channels} "
                       f"latent channels")
    if u.num_class_embeds is None or u.num_class_embeds <= self.up.max_noise_level:
      raise ValueError(f"config.model.num_class_embeds is {u.num_class_embeds}: the noise level (0.."
                       f"{self.up.max_noise_level}, config.upscale.max_noise_level) is the U-Net's class label, so "
                       f"it needs more than {self.up.max_noise_level} (the x4 upscaler has 1000)")
    width = parts.encoders[0][0].config.hidden_size
    if u.cross_attention_dim != width:
      raise ValueError(f"config.model.cross_attention_dim is {u.cross_attention_dim} but the text encoder gives "
                       f"{width} features")
    if not config.get("diffusion"):
      raise ValueError("config.diffusion is missing (the latents' schedule)")
    self.schedule = schedule_from(config)
    DiffusionTask.__init__(self, config, mesh)
    self.sd = pipelines.StableDiffusion(self.unet, self.vae, (parts.encoders[0][0],), self.schedule)
    self.upscaler = upscale_lib.make(self.unet, self.vae, parts.encoders[0][0], self.scheduler_config(),
                                     self.up.low_res_scheduler_config(), self.up.max_noise_level, where="config")
    self.low_res_schedule = self.upscaler.low_res_schedule

    size = input_pipeline.image_size(config.data)
    f = vc.downscale
    if size % f:
      raise ValueError(f"config.data.resolution: images of {size}x{size} do not divide by the VAE's downscale "
                       f"factor {f} (config.frozen.vae): the low-res image and the latents are size / {f}")
    levels = 2 ** (len(u.block_out_channels) - 1)
    if (size // f) % levels:
      raise ValueError(f"config.model.block_out_channels: {len(u.block_out_channels)} levels need the latent size "
                       f"{size // f} (config.data.resolution {size} / VAE factor {f}) to divide by {levels}")
    self.factor = f
    self.image_shape = (size, size, vc.in_channels)
    self.latent_shape = self.sd.latent_shape(size, size)
    self.sample_noise_level = int(config.sample.get("noise_level", 20))
    if not 0 <= self.sample_noise_level <= self.up.max_noise_level:
      raise ValueError(f"config.sample.noise_level must be in [0, {self.up.max_noise_level}] "
                       f"(config.upscale.max_noise_level), got {self.sample_noise_level}")
    self._frozen = place_frozen({"vae": vae_params, "text": (parts.encoders[0][1],)}, config, mesh)

  # --- params and the train step --------------------------------------------------------------------

  def _boxed_unet(self, rng):
    x, t, ctx, labels, _ = unet_lib.init_args(self.unet.config)
    return self.unet.init(rng, x, t, ctx, labels)["params"]

  def encode(self, batch, rng, frozen):
    """The ldm task's (latents, text conditioning), plus the noise-augmented low-res image ("low_res") and its
    noise level ("noise_level", int32 [B])."""
    x0, cond, rng = super().encode(batch, rng, frozen)
    rng, k_level, k_noise = jax.random.split(rng, 3)
    low = downsample(batch["image"].astype(jnp.float32), self.factor, self.up.downsample)
    level = jax.random.randint(k_level, (low.shape[0],), 0, self.up.max_noise_level + 1, jnp.int32)
    noise = jax.random.normal(k_noise, low.shape, jnp.float32)
    cond = {**cond, "low_res": noise_low_res(self.low_res_schedule, low, noise, level), "noise_level": level}
    return x0, cond, rng

  def apply(self, params, frozen, x, t, cond, rng):
    x = jnp.concatenate([x, cond["low_res"].astype(x.dtype)], axis=-1)
    return self.unet.apply({"params": params}, x, t, cond["context"], class_labels=cond["noise_level"],
                           train=True, rngs={"dropout": rng})

  # --- sampling -------------------------------------------------------------------------------------

  def sample_grid(self, data, frozen) -> task_lib.SampleGrid | None:
    """Three rows of config.sample.num_images training examples (the first ones of data.split): the low-res
    input (nearest-upsampled), the upscaled sample (noise level sample.noise_level, guided by its own caption),
    the original. num_images 0: no grids."""
    sc = self.config.sample
    n = int(sc.num_images)
    if n <= 0:
      return None
    cfg = {**self.config.data.to_dict(), "caption_dropout": 0.0, "tokenizer": "", "tokenizer_2": ""}
    source = input_pipeline.open_source(cfg, label=False)
    if len(source) < n:
      raise ValueError(f"config.sample.num_images is {n} but the data have {len(source)} examples")
    transform = input_pipeline.make_transform(cfg, channels=self.image_shape[-1], label=False, source=source)
    examples = [source[i] for i in range(n)]
    rng = np.random.default_rng(self.config.seed)
    images = np.stack([transform(ex, rng)["image"] for ex in examples]).astype(np.float32)
    texts = [str(ex.get("caption") or "") for ex in examples]
    guidance = float(sc.guidance_scale)
    prompt = self._prompt(self.tokenizers(), texts, guidance, self.image_shape[0])  # guided when guidance > 1
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.config.seed + 1), i))(jnp.arange(n))
    prompt, keys, images = jax.device_put((prompt, keys, images), parallel.rows_sharding(self.mesh, n))
    sampler, steps, level, f = sc.sampler, int(sc.num_steps), self.sample_noise_level, self.factor

    def fn(params, frozen, prompt, keys, images):
      low = downsample(images, f, self.up.downsample)
      out = upscale_lib.upscale(self.upscaler, self.full_params(params, frozen), prompt, keys, low,
                                noise_level=level, sampler=sampler, num_steps=steps)
      return jnp.concatenate([jnp.repeat(jnp.repeat(low, f, axis=1), f, axis=2), out, images])

    return task_lib.SampleGrid(jax.jit(fn), (frozen, prompt, keys, images), n,
                               {"sampler": sampler, "steps": steps, "guidance_scale": guidance, "noise_level": level,
                                "rows": "low-res | upscaled | original"})

  def eval_samples(self, eval_config, frozen):
    """None: config.eval does not judge upscalers (a run that asks is refused at start-up)."""
    return None

  def inference(self, state, frozen) -> UpscaleModel:
    up = dataclasses.replace(self.upscaler, tokenizer=self.tokenizers()[0])
    return UpscaleModel(up, self.full_params(state.ema_params, frozen))

  # --- export ---------------------------------------------------------------------------------------

  def scheduler_config(self) -> dict[str, Any]:
    """The latents' scheduler as diffusers' DDIMScheduler config (config.diffusion and its sampler settings)."""
    d = self.config.diffusion.to_dict()
    s = self.schedule
    return {"_class_name": "DDIMScheduler", **d, "set_alpha_to_one": s.set_alpha_to_one,
            "steps_offset": s.steps_offset, "timestep_spacing": s.timestep_spacing}

  def export(self, state, workdir, data, *, write):
    """Write a diffusers StableDiffusionUpscalePipeline folder, `<workdir>/upscaler` (sdjax.upscale.save):
    model_index.json (with max_noise_level), unet/ (the EMA U-Net, sample_size = the latent size), vae/
    (`pipeline_vae`: the frozen VAE rescaled to the pipeline's fixed scaling_factor 0.08333), text_encoder/,
    tokenizer/, scheduler/ (DDIM, config.diffusion) and low_res_scheduler/ (DDPM, config.upscale). Every process
    joins the gathers; only `write` ones write."""
    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)
    frozen = multihost_utils.process_allgather(self._frozen.params, tiled=True)
    folder = os.path.join(workdir, EXPORT_FOLDER)
    if write:
      unet = UNet(dataclasses.replace(self.unet.config, sample_size=self.latent_shape[0]))
      vae_config, vae_params = pipeline_vae(self.vae.config, frozen["vae"])
      up = self.upscaler
      upscale_lib.save(folder, unet, AutoencoderKL(vae_config), up.text_encoder,
                       {"unet": ema, "vae": vae_params, "text_encoders": frozen["text"]}, self.tokenizer_paths[0],
                       up.scheduler_config, up.low_res_scheduler_config, up.max_noise_level)
    return {"exported": folder}
