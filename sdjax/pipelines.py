"""Sampling pipelines: class-conditional pixel models, and Stable Diffusion's txt2img / img2img / inpainting
composed from the text encoder(s), a classifier-free-guided sampler over the U-Net and the VAE.

Everything here is a pure function of (modules, params, arrays) that runs under `jax.jit`. The modules
travel in a `StableDiffusion` (static: it is closed over or passed as a static argument), the params as
`{"unet", "vae", "text_encoders": (p1[, p2])}`, the per-image inputs as a `Prompt` pytree and one PRNG key
per image. Every random draw of image i (its starting noise, the stochastic samplers' step noise, the VAE
posterior sample of img2img/inpainting) comes from key i alone, so an image does not depend on the batch
it is rendered in, nor on the number of devices.

An optional safety checker (diffusers' `StableDiffusionSafetyChecker` with its CLIPImageProcessor settings, on
the `StableDiffusion` as `safety_checker` + `feature_extractor`, params under `params["safety_checker"]`) runs
inside the same jitted function: `txt2img(..., safety_check=True)` (likewise img2img / inpaint) returns
`(images, has_nsfw_concept [B] bool)` with flagged images replaced by black ones, as diffusers' pipelines.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import ip_adapter as ip_adapter_lib
from sdjax import control as control_lib
from sdjax import parallel, samplers
from sdjax.eval import clip_score
from sdjax.guidance import classifier_free_guidance
from sdjax.models import AutoencoderKL, CLIPTextModel, UNet
from sdjax.models import safety_checker as safety_lib
from sdjax.models import unet as unet_lib
from sdjax.models import vae as vae_lib
from sdjax.schedules import Schedule


# --- class-conditional pixel-space models (the default job) -----------------------------------------

def class_conditional(model: UNet, params: Any, labels: jax.Array, noise: jax.Array, rng: jax.Array, *,
                      schedule: Schedule, sampler: str, num_steps: int, guidance_scale: float,
                      **options: Any) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] for class `labels` [B] from standard-normal `noise` [B, H, W, C].

  Classifier-free guidance: the null class (for the unconditional branch) is the model's last class
  embedding. A guidance scale of 1 runs the conditional model alone (one model call per step).
  `rng` drives stochastic samplers only. An unconditional model (no `num_class_embeds`) ignores `labels`.
  """
  if labels.shape[0] != noise.shape[0]:
    raise ValueError(f"labels {labels.shape} and noise {noise.shape} disagree on the batch size")

  def conditional(x, t, c):
    return model.apply({"params": params}, x, t, class_labels=c)

  if model.config.num_class_embeds is None:  # an unconditional model: labels and guidance do not apply
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
  elif guidance_scale == 1.0:
    model_fn = lambda x, t: conditional(x, t, labels)
  else:
    null = jnp.full_like(labels, model.config.num_class_embeds - 1)
    model_fn = classifier_free_guidance(conditional, labels, null, guidance_scale)
  x = samplers.sample(model_fn, noise, schedule=schedule, sampler=sampler, num_steps=num_steps,
                      rng=rng, **options)
  return jnp.clip(x, -1.0, 1.0)


class ClassConditionalModel(NamedTuple):
  """A trained class-conditional pixel model (what `sdjax.runs.load` gives for a "diffusion" run)."""
  unet: UNet
  params: Any
  schedule: Schedule
  image_shape: tuple[int, int, int]  # [H, W, C]
  num_classes: int


def class_conditional_fn(unet: UNet, schedule: Schedule, image_shape: Sequence[int], *, sampler: str,
                         num_steps: int, guidance_scale: float):
  """jitted (params, labels [B], seed, indices [B]) -> images [B, H, W, C] in [-1, 1].

  Image i's starting noise is drawn from (seed, indices[i]) alone, so deterministic samplers give the same
  image for the same (seed, index) whatever the batch it is rendered in.
  """
  shape = tuple(image_shape)

  def fn(params, labels, seed, indices):
    base = jax.random.key(seed)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(indices)
    rng = jax.random.fold_in(jax.random.split(base)[1], indices[0])  # stochastic samplers only
    return class_conditional(unet, params, labels, noise, rng, schedule=schedule, sampler=sampler,
                             num_steps=num_steps, guidance_scale=guidance_scale)

  return jax.jit(fn)


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


# --- Stable Diffusion --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """The modules of a latent text-to-image model (SD 1.x / 2.x / SDXL, or an inpainting U-Net).

  force_zeros_for_empty_prompt: SDXL's rule — an image with no negative prompt gets zero negative
  embeddings instead of the encoded empty string. safety_checker / feature_extractor: the optional NSFW
  checker and its input preprocessing (both or neither; `run_safety_checker`).
  requires_aesthetics_score: an SDXL refiner (diffusers' `requires_aesthetics_score`): its U-Net takes 5 time ids,
  (original size, crop top-left, aesthetic score), not 6 (`micro_conditioning`); it renders from an image or a base
  model's latents only (img2img / `ensemble`), with text_encoder_2 alone (`encode_prompt`).
  """
  unet: UNet
  vae: AutoencoderKL
  text_encoders: tuple[CLIPTextModel, ...]
  schedule: Schedule
  force_zeros_for_empty_prompt: bool = False
  safety_checker: safety_lib.StableDiffusionSafetyChecker | None = None
  feature_extractor: safety_lib.FeatureExtractorConfig | None = None
  requires_aesthetics_score: bool = False

  def __post_init__(self):
    if (self.safety_checker is None) != (self.feature_extractor is None):
      raise ValueError("StableDiffusion: safety_checker and feature_extractor go together (the checker needs its "
                       "input preprocessing)")

  @property
  def sdxl(self) -> bool:
    return self.unet.config.addition_embed_type == "text_time"

  @property
  def num_time_ids(self) -> int | None:
    """SDXL micro-conditioning ids per image: 6 (base), 5 (refiner: aesthetic score); None without."""
    return (5 if self.requires_aesthetics_score else 6) if self.sdxl else None

  @property
  def embedded_guidance(self) -> bool:
    """An LCM-distilled U-Net (`time_cond_proj_dim`): the guidance scale enters the U-Net as an embedding
    (`timestep_cond`), with no classifier-free guidance (LatentConsistencyModelPipeline)."""
    return self.unet.config.time_cond_proj_dim is not None

  @property
  def inpainting(self) -> bool:
    """A 9-channel inpainting U-Net: latents + mask + masked-image latents."""
    return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

  @property
  def downscale(self) -> int:
    return self.vae.config.downscale

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    f = self.downscale
    if height % f or width % f or height <= 0 or width <= 0:
      raise ValueError(f"image size {height}x{width} must be positive multiples of {f} (the VAE's downscale)")
    return (height // f, width // f, self.vae.config.latent_channels)


def from_components(models: dict[str, tuple], schedule: Schedule, *, model_type: str = "",
                    safety_checker: tuple | None = None, force_zeros_for_empty_prompt: bool | None = None,
                    requires_aesthetics_score: bool | None = None) -> tuple[StableDiffusion, dict[str, Any]]:
  """(StableDiffusion, params) from `{"unet": (module, params), "vae": ..., "text_encoder"[, "_2"]: ...}`
  (the `models` of `sdjax.convert.load_pipeline`). `safety_checker`: None, or the (module, params,
  feature_extractor) of `sdjax.convert.safety_checker.load_safety_checker`; its params go under
  `params["safety_checker"]`. force_zeros_for_empty_prompt / requires_aesthetics_score: the pipeline config's
  (`Pipeline.pipeline_config`); None: diffusers' defaults for `model_type` (SDXL base: zeros for empty prompts;
  "sdxl_refiner": aesthetic scores, no zeros)."""
  names = [n for n in ("text_encoder", "text_encoder_2") if n in models]
  checker, checker_params, feature_extractor = safety_checker if safety_checker is not None else (None, None, None)
  refiner = model_type == "sdxl_refiner"
  if force_zeros_for_empty_prompt is None:
    force_zeros_for_empty_prompt = model_type == "sdxl" or len(names) == 2
  sd = StableDiffusion(unet=models["unet"][0], vae=models["vae"][0],
                       text_encoders=tuple(models[n][0] for n in names), schedule=schedule,
                       force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt),
                       safety_checker=checker, feature_extractor=feature_extractor,
                       requires_aesthetics_score=bool(refiner if requires_aesthetics_score is None
                                                      else requires_aesthetics_score))
  params = {"unet": models["unet"][1], "vae": models["vae"][1],
            "text_encoders": tuple(models[n][1] for n in names)}
  if checker is not None:
    params["safety_checker"] = checker_params
  return sd, params


class TextToImageModel(NamedTuple):
  """A text-to-image model ready to sample (what `sdjax.runs.load` gives for an "ldm" run)."""
  sd: StableDiffusion
  params: dict
  tokenizers: list


class Prompt(NamedTuple):
  """The per-image conditioning of a batch of B images (a pytree; every leaf has leading axis B).

  ids: token ids [B, L] per text encoder. negative_ids: the same for the negative prompts, or None for no
  classifier-free guidance (one U-Net call per step). guidance_scale: [B]. guidance_rescale: [B] or None
  (no rescale). time_ids: SDXL micro-conditioning [B, 6] = (original h, w, crop top, left, target h, w), or for a
  refiner [B, 5] = (original h, w, crop top, left, aesthetic score) (`micro_conditioning`).
  zero_negative: SDXL [B] bool, rows whose negative embeddings are zeros (no negative prompt given).
  negative_time_ids: the unconditional branch's time ids [B, n] (a refiner's negative aesthetic score, diffusers'
  negative_original_size / crop); None: the same as time_ids.
  ip_adapter: IP-Adapter image prompts (`sdjax.ip_adapter.IPAdapterInput`: image embeddings, optional negative
  ones, scales, per adapter), with the adapters' params under params["ip_adapter"]; None: none.
  """
  ids: tuple[jax.Array, ...]
  negative_ids: tuple[jax.Array, ...] | None = None
  guidance_scale: jax.Array | None = None
  guidance_rescale: jax.Array | None = None
  time_ids: jax.Array | None = None
  zero_negative: jax.Array | None = None
  negative_time_ids: jax.Array | None = None
  ip_adapter: ip_adapter_lib.IPAdapterInput | None = None


def encode_prompt(encoders: Sequence[CLIPTextModel], params: Sequence[Any], ids: Sequence[jax.Array], *,
                  sdxl: bool | None = None) -> dict[str, jax.Array]:
  """Prompt embeddings as diffusers' pipelines make them: one encoder (SD 1.x/2.x): the last hidden state
  [B, L, C] as "context"; SDXL (`sdxl`; None: two encoders), as its `encode_prompt`: the encoders' penultimate
  hidden states concatenated along features, and the last encoder's pooled (projected) output [B, C2] as "pooled"
  (the refiner, text_encoder_2 alone: its penultimate hidden state and pooled output)."""
  if len(encoders) != len(ids) or len(encoders) != len(params):
    raise ValueError(f"{len(encoders)} text encoder(s) but {len(params)} param set(s) and {len(ids)} id arrays")
  if not (len(encoders) == 2 if sdxl is None else sdxl):
    last, _ = encoders[0].apply({"params": params[0]}, ids[0])
    return {"context": last.astype(jnp.float32)}
  states, pooled = [], None
  for enc, p, i in zip(encoders, params, ids):
    _, pooled, hidden = enc.apply({"params": p}, i, output_hidden_states=True)
    states.append(hidden[-2].astype(jnp.float32))
  return {"context": jnp.concatenate(states, axis=-1), "pooled": pooled.astype(jnp.float32)}


def conditioning(sd: StableDiffusion, params: Any, prompt: Prompt) -> tuple[dict, dict | None]:
  """(cond, uncond) U-Net conditioning pytrees for `prompt`; uncond is None without guidance."""
  cond = encode_prompt(sd.text_encoders, params["text_encoders"], prompt.ids, sdxl=sd.sdxl)
  uncond = None
  if prompt.negative_ids is not None:
    uncond = encode_prompt(sd.text_encoders, params["text_encoders"], prompt.negative_ids, sdxl=sd.sdxl)
    if sd.force_zeros_for_empty_prompt and prompt.zero_negative is not None:
      keep = ~prompt.zero_negative
      uncond = jax.tree.map(lambda u: u * keep.reshape((-1,) + (1,) * (u.ndim - 1)), uncond)
  if sd.sdxl:
    n = sd.num_time_ids
    what = "an SDXL refiner U-Net" if sd.requires_aesthetics_score else "an SDXL U-Net"
    ids = ", aesthetic score" if sd.requires_aesthetics_score else ", target size"
    for name in ("time_ids", "negative_time_ids"):
      v = getattr(prompt, name)
      if (v is None and name == "time_ids") or (v is not None and v.shape[-1:] != (n,)):
        got = "none" if v is None else f"shape {tuple(v.shape)}"
        raise ValueError(f"{what} needs Prompt.{name} [B, {n}] (micro-conditioning: original size, crop "
                         f"top-left{ids}; pipelines.micro_conditioning), got {got}")
    cond["time_ids"] = prompt.time_ids.astype(jnp.float32)
    if uncond is not None:
      neg = prompt.negative_time_ids
      uncond["time_ids"] = cond["time_ids"] if neg is None else neg.astype(jnp.float32)
  if prompt.ip_adapter is not None:
    if "ip_adapter" not in params:
      raise ValueError('Prompt.ip_adapter given, but params has no "ip_adapter" entry (a tuple of '
                       'sdjax.ip_adapter.load results, one per adapter)')
    cond["ip_adapter"], ip_uncond = ip_adapter_lib.conditioning(params["ip_adapter"], prompt.ip_adapter)
    if uncond is not None:
      uncond["ip_adapter"] = ip_uncond
  return cond, uncond


def unet_fn(sd: StableDiffusion, params: Any):
  """model(x, t, cond) for `classifier_free_guidance`: the U-Net on latents x [B, h, w, c] (with the
  inpainting U-Net's extra channels `cond["extra"]` appended) and text conditioning `cond` (with IP-Adapter
  tokens `cond["ip_adapter"]`: params["ip_adapter"]'s projections join the U-Net's params) and ControlNet residuals
  `cond["down_residuals"]` / `cond["mid_residual"]` (`sdjax.control`) added to its skips and mid block."""

  def model(x, t, cond):
    if "extra" in cond:
      x = jnp.concatenate([x, cond["extra"].astype(x.dtype)], axis=-1)
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if sd.sdxl else None
    ip = cond.get("ip_adapter")
    unet_params = params["unet"] if ip is None else ip_adapter_lib.merge_unet_params(params["unet"],
                                                                                      params["ip_adapter"])
    return sd.unet.apply({"params": unet_params}, x, t, cond["context"], added_cond=added,
                         timestep_cond=cond.get("timestep_cond"), ip_adapter=ip,
                         down_residuals=cond.get("down_residuals"), mid_residual=cond.get("mid_residual"))

  return model


def image_noise(keys: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Standard-normal starting noise [B, *shape], row i drawn from keys[i] alone."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), tuple(shape), jnp.float32))(keys)


def _step_noise(keys, shape, length):
  """[length, B, *shape] per-step noise for stochastic samplers, row i from keys[i] alone."""
  z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (length,) + tuple(shape), jnp.float32))(keys)
  return jnp.swapaxes(z, 0, 1)


def encode_image(sd: StableDiffusion, params: Any, image: jax.Array, keys: jax.Array, salt: int) -> jax.Array:
  """Diffusion-space latents of `image` [B, H, W, C] in [-1, 1]: a posterior sample (as diffusers'
  `retrieve_latents`), row i drawn from keys[i], scaled by the VAE's scaling factor (and shift)."""
  mean, logvar = sd.vae.apply({"params": params["vae"]}, image, method="encode")
  z = jax.vmap(lambda m, lv, k: vae_lib.sample_latent(m, lv, jax.random.fold_in(k, salt)))(mean, logvar, keys)
  return vae_lib.scale_latents(z, sd.vae.config)


def decode(sd: StableDiffusion, params: Any, latents: jax.Array) -> jax.Array:
  """Diffusion-space latents -> images [B, H, W, C] clipped to [-1, 1]."""
  z = vae_lib.unscale_latents(latents, sd.vae.config)
  return jnp.clip(sd.vae.apply({"params": params["vae"]}, z, method="decode"), -1.0, 1.0)


def safety_checker_input(images: jax.Array, feature_extractor: safety_lib.FeatureExtractorConfig) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] -> the safety checker's pixel values [B, S, S, 3] (S = crop_size), as
  diffusers' `run_safety_checker` makes them: `VaeImageProcessor.postprocess(output_type="pil")` (x * 0.5 + 0.5
  clamped to [0, 1], times 255, rounded half to even, uint8), then the CLIPImageProcessor (PIL backend): Pillow's
  bicubic resize of the shortest side to `size` (`sdjax.eval.clip_score.resize_shortest_side`, bit-exact), center
  crop (top = (h - S) // 2), `rescale_factor` (float64, rounded to float32), (x - mean) / std in float32: the
  processor steps are `sdjax.eval.clip_score.preprocess` with the feature extractor's settings."""
  fe = feature_extractor
  u8 = jnp.round(jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  return clip_score.preprocess(u8, fe.crop_size, size=fe.size, rescale_factor=fe.rescale_factor,
                               mean=fe.image_mean, std=fe.image_std)


def check_images(sd: StableDiffusion, params: Any, images: jax.Array) -> safety_lib.SafetyCheckerOutput:
  """The safety checker's verdict and scores for images [B, H, W, 3] in [-1, 1] (no replacement)."""
  if sd.safety_checker is None:
    raise ValueError("this StableDiffusion has no safety checker (its pipeline folder has no safety_checker/; "
                     "load one with sdjax.convert.safety_checker and pass it to from_components)")
  if "safety_checker" not in params:
    raise ValueError('params has no "safety_checker" entry (from_components puts the checker\'s params there)')
  pixels = safety_checker_input(images, sd.feature_extractor)
  return sd.safety_checker.apply({"params": params["safety_checker"]}, pixels)


def run_safety_checker(sd: StableDiffusion, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """diffusers' `run_safety_checker`, jittable: (images with every flagged one replaced by black (-1), and
  has_nsfw_concept [B] bool) for images [B, H, W, 3] in [-1, 1]."""
  flags = check_images(sd, params, images).has_nsfw_concept
  return safety_lib.replace_flagged(images, flags), flags


def _finish(sd: StableDiffusion, params: Any, latents: jax.Array, safety_check: bool):
  images = decode(sd, params, latents)
  return run_safety_checker(sd, params, images) if safety_check else images


def denoise(sd: StableDiffusion, params: Any, prompt: Prompt, keys: jax.Array, latent_shape: Sequence[int], *,
            sampler: str, num_steps: int, noise: jax.Array | None = None, init_latents: jax.Array | None = None,
            strength: float = 1.0, inpaint_mask: jax.Array | None = None, extra: jax.Array | None = None,
            step_noise: jax.Array | None = None, control: Sequence[control_lib.ControlInput] | None = None,
            controlnets: Sequence[Any] = (), guess_mode: bool = False, **options: Any) -> jax.Array:
  """The guided sampling loop in latent space; returns diffusion-space latents [B, h, w, c].

  An LCM-distilled U-Net (`sd.embedded_guidance`) runs as diffusers' LatentConsistencyModelPipeline: one U-Net
  call per step with timestep_cond = `unet.guidance_embedding(guidance_scale - 1)` (Prompt.guidance_scale None:
  scale 1, w = 0); negative prompts and guidance_rescale are not used (that pipeline has neither).
  `noise` overrides the starting noise drawn from `keys` (e.g. diffusers' `latents=` for comparisons), and
  `step_noise` [scan_length, B, h, w, c] the stochastic samplers' per-step noise (e.g. the noise diffusers'
  scheduler drew).
  init_latents/strength: img2img; inpaint_mask (1 = generate, latent resolution): mask blending for an
  ordinary U-Net; extra: the inpainting U-Net's mask + masked-image latent channels.
  control / controlnets / guess_mode (static: controlnets, guess_mode): ControlNet guidance (`sdjax.control`):
  one `control.ControlInput` (control image at the output size, scale, guidance start / end, per image) per
  `sdjax.models.controlnet.ControlNet` module, their params the tuple params["controlnets"]; txt2img, img2img and
  inpaint pass them here.
  """
  b = keys.shape[0]
  noise = image_noise(keys, latent_shape) if noise is None else noise
  if noise.shape != (b,) + tuple(latent_shape):
    raise ValueError(f"noise has shape {noise.shape}, expected {(b,) + tuple(latent_shape)}")
  if control is not None:
    control_lib.check(sd, params, controlnets, control, latent_shape, b)
  elif controlnets:
    raise ValueError("controlnets given without control inputs (control=, one control.ControlInput each)")
  guidance = None
  if sd.embedded_guidance:
    scale = jnp.ones((b,), jnp.float32) if prompt.guidance_scale is None else prompt.guidance_scale
    guidance = unet_lib.guidance_embedding(scale.astype(jnp.float32) - 1.0, sd.unet.config.time_cond_proj_dim)
    prompt = prompt._replace(negative_ids=None, guidance_rescale=None, zero_negative=None)
  cond, uncond = conditioning(sd, params, prompt)
  if guidance is not None:
    cond["timestep_cond"] = guidance
  if extra is not None:
    cond["extra"] = extra
    if uncond is not None:
      uncond["extra"] = extra
  model = unet_fn(sd, params)

  def guide(model, cond, uncond):
    if uncond is None:
      return lambda x, t: model(x, t, cond)
    per_row = lambda v: v.astype(jnp.float32).reshape((-1, 1, 1, 1))
    rescale = 0.0 if prompt.guidance_rescale is None else per_row(prompt.guidance_rescale)
    return classifier_free_guidance(model, cond, uncond, per_row(prompt.guidance_scale), rescale)

  if control is None:
    model_fn = guide(model, cond, uncond)
  else:
    schedule, n = samplers.with_custom_steps(sd.schedule, num_steps, options.get("timesteps"), options.get("sigmas"))
    tables, length = samplers.step_tables(schedule, sampler, n, strength,
                                          denoising_start=options.get("denoising_start"),
                                          denoising_end=options.get("denoising_end"))
    model_fn = control_lib.controlled_model_fn(
        guide, model, cond, uncond, controlnets=tuple(controlnets), params=params["controlnets"],
        control=tuple(control), guess_mode=guess_mode, timesteps=tables["timesteps"][:length], sdxl=sd.sdxl)
  if step_noise is None and samplers.get(sampler).stochastic:
    length = samplers.scan_length(sd.schedule, sampler, num_steps, strength,
                                  denoising_start=options.get("denoising_start"),
                                  denoising_end=options.get("denoising_end"))
    step_noise = _step_noise(keys, latent_shape, length)
  return samplers.sample(model_fn, noise, schedule=sd.schedule, sampler=sampler, num_steps=num_steps,
                         step_noise=step_noise, init_image=init_latents, strength=strength,
                         inpaint_mask=inpaint_mask, **options)


def _check_batch(prompt: Prompt, keys: jax.Array, *arrays: jax.Array | None) -> int:
  b = keys.shape[0]
  for leaf in jax.tree.leaves(prompt) + [a for a in arrays if a is not None]:
    if leaf.shape[0] != b:
      raise ValueError(f"batch mismatch: {b} keys but an input of shape {leaf.shape}")
  if prompt.negative_ids is not None and prompt.guidance_scale is None:
    raise ValueError("Prompt.negative_ids given without guidance_scale")
  return b


OUTPUTS = ("images", "latents")


def _output(sd: StableDiffusion, params: Any, latents: jax.Array, safety_check: bool, output: str):
  """txt2img / img2img's result: decoded images (`_finish`), or with output="latents" the sampler's final x."""
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if output == "latents":
    if safety_check:
      raise ValueError("safety_check needs images: it does not apply to output='latents'")
    return latents
  return _finish(sd, params, latents, safety_check)


def _refiner_error(sd: StableDiffusion) -> None:
  if sd.requires_aesthetics_score:
    raise ValueError("this is an SDXL refiner (requires_aesthetics_score: 5 time ids with an aesthetic score): it "
                     "renders from an image or a base model's latents: use img2img(..., image=...) or "
                     "img2img(..., latents=..., denoising_start=...), or pipelines.ensemble(base, ..., refiner, ...)")


def txt2img(sd: StableDiffusion, params: Any, prompt: Prompt, keys: jax.Array, *, height: int, width: int,
            sampler: str, num_steps: int, noise: jax.Array | None = None, safety_check: bool = False,
            denoising_end: float | None = None, output: str = "images",
            **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Images [B, height, width, C] in [-1, 1] for `prompt`, image i from keys[i].

  safety_check (static under jit): run `sd.safety_checker` on the images and return `(images, has_nsfw_concept
  [B] bool)`, flagged images black (-1), as `run_safety_checker`.
  denoising_end (a fraction in (0, 1), static): stop at diffusers' timestep cutoff (`samplers.step_tables`), as
  the base model of the SDXL ensemble of expert denoisers; output="latents" then returns the sampler's x
  [B, h, w, c] as it is (what `img2img(..., latents=..., denoising_start=...)` continues from) instead of images.
  An SDXL refiner (`sd.requires_aesthetics_score`) is refused: it starts from an image or latents.
  """
  _check_batch(prompt, keys, noise)
  if sd.inpainting:
    raise ValueError("this is an inpainting U-Net (9 input channels): use inpaint()")
  _refiner_error(sd)
  latents = denoise(sd, params, prompt, keys, sd.latent_shape(height, width), sampler=sampler,
                    num_steps=num_steps, noise=noise, denoising_end=denoising_end, **options)
  return _output(sd, params, latents, safety_check, output)


def img2img(sd: StableDiffusion, params: Any, prompt: Prompt, keys: jax.Array, image: jax.Array | None = None, *,
            strength: float | None = None, sampler: str, num_steps: int, noise: jax.Array | None = None,
            safety_check: bool = False, latents: jax.Array | None = None, denoising_start: float | None = None,
            denoising_end: float | None = None, output: str = "images",
            **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`image` [B, H, W, C] in [-1, 1] re-rendered from `strength` (0, 1] of the way to noise: the first
  num_steps - int(num_steps * strength) steps are skipped, as in diffusers' img2img pipelines. safety_check:
  as txt2img's.

  `latents` [B, h, w, c] instead of `image`: diffusion-space latents (diffusers' 4-channel `image`), not encoded.
  denoising_start (a fraction in (0, 1), static; diffusers' SDXL img2img): strength is ignored, only the steps with
  timestep below the cutoff run, and `latents` (a base model's `txt2img(..., denoising_end=, output="latents")`)
  are taken as the sampler's x as they are, with no noise added: the refiner of the ensemble of expert denoisers.
  denoising_end / output: as txt2img's (a middle expert)."""
  _check_batch(prompt, keys, image, noise, latents)
  if sd.inpainting:
    raise ValueError("this is an inpainting U-Net (9 input channels): use inpaint()")
  if (image is None) == (latents is None):
    raise ValueError("img2img takes an image or latents (one of the two)")
  if denoising_start is not None and latents is None:
    raise ValueError("denoising_start continues from latents (a base model's txt2img(..., denoising_end=..., "
                     "output='latents')): pass latents=, not an image")
  if strength is None and denoising_start is None:
    raise ValueError("img2img needs strength (or denoising_start with latents)")
  init = encode_image(sd, params, image, keys, salt=2) if latents is None else latents.astype(jnp.float32)
  latents = denoise(sd, params, prompt, keys, init.shape[1:], sampler=sampler, num_steps=num_steps, noise=noise,
                    init_latents=init, strength=1.0 if denoising_start is not None else strength,
                    denoising_start=denoising_start, denoising_end=denoising_end, **options)
  return _output(sd, params, latents, safety_check, output)


def ensemble(base: StableDiffusion, base_params: Any, refiner: StableDiffusion, refiner_params: Any, prompt: Prompt,
             refiner_prompt: Prompt, keys: jax.Array, *, height: int, width: int, sampler: str, num_steps: int,
             high_noise_frac: float = 0.8, noise: jax.Array | None = None, safety_check: bool = False,
             **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The SDXL ensemble of expert denoisers (diffusers' base + refiner recipe): `base` runs txt2img for the first
  `high_noise_frac` of the schedule (denoising_end), `refiner` continues from its latents (img2img with
  denoising_start = high_noise_frac) with the same sampler and num_steps, and its VAE decodes: images
  [B, H', W', C] in [-1, 1], H' = h * the refiner's VAE downscale for the base's latent height h (the same
  height when both VAEs downscale alike).

  `prompt` is the base's Prompt and `refiner_prompt` the refiner's (its own tokenizer and 5 time ids:
  `micro_conditioning(..., aesthetic_score=6.0)`, negative 2.5). The refiner's stochastic step noise comes from
  keys folded with 1 (the base's from keys). safety_check: the base's checker when it has one, else the refiner's.
  """
  latents = txt2img(base, base_params, prompt, keys, height=height, width=width, sampler=sampler,
                    num_steps=num_steps, noise=noise, denoising_end=high_noise_frac, output="latents", **options)
  refiner_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  latents = img2img(refiner, refiner_params, refiner_prompt, refiner_keys, latents=latents, sampler=sampler,
                    num_steps=num_steps, denoising_start=high_noise_frac, output="latents", **options)
  images = decode(refiner, refiner_params, latents)
  if not safety_check:
    return images
  checker, checker_params = (base, base_params) if base.safety_checker is not None else (refiner, refiner_params)
  return run_safety_checker(checker, checker_params, images)


def inpaint(sd: StableDiffusion, params: Any, prompt: Prompt, keys: jax.Array, image: jax.Array, mask: jax.Array,
            *, sampler: str, num_steps: int, strength: float = 1.0, noise: jax.Array | None = None,
            safety_check: bool = False, **options: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Repaint where `mask` [B, H, W, 1] >= 0.5 (1 = generate) in `image` [B, H, W, C] in [-1, 1].

  An inpainting U-Net (9 channels) gets the mask and the masked image's latents as extra inputs
  (diffusers' StableDiffusionInpaintPipeline); an ordinary U-Net keeps the unmasked region by blending
  in the image's latents noised to each step's level, and the image's latents after the last step.
  The mask goes to latent resolution by nearest-neighbour sampling (torch's `interpolate` default).
  safety_check: as txt2img's.
  """
  _check_batch(prompt, keys, image, mask, noise)
  if mask.shape != image.shape[:3] + (1,):
    raise ValueError(f"mask must have shape {image.shape[:3] + (1,)} for image {image.shape}, got {mask.shape}")
  mask = (mask >= 0.5).astype(jnp.float32)
  f = sd.downscale
  mask_latent = mask[:, ::f, ::f]
  init = encode_image(sd, params, image, keys, salt=2)
  extra = blend_mask = None
  if sd.inpainting:
    extra = jnp.concatenate([mask_latent, encode_image(sd, params, image * (1.0 - mask), keys, salt=3)], axis=-1)
  else:
    blend_mask = mask_latent
  latents = denoise(sd, params, prompt, keys, init.shape[1:], sampler=sampler, num_steps=num_steps, noise=noise,
                    init_latents=init, strength=strength, inpaint_mask=blend_mask, extra=extra, **options)
  return _finish(sd, params, latents, safety_check)


# --- host side: tokens, micro-conditioning, sharding ------------------------------------------------

def tokenize(tokenizers: Sequence[Any], encoders: Sequence[CLIPTextModel], prompts: Sequence[str]
             ) -> tuple[np.ndarray, ...]:
  """Token ids [B, L] int32 per text encoder (L: the tokenizer's model_max_length, at most the encoder's
  positions), padded and truncated as diffusers' pipelines do."""
  from sdjax.models import clip
  if len(tokenizers) != len(encoders) or any(t is None for t in tokenizers):
    raise ValueError(f"{len(encoders)} text encoder(s) need as many tokenizers, got {len(tokenizers)} "
                     "(a single-file checkpoint carries none: pass a tokenizer folder)")
  out = []
  for tok, enc in zip(tokenizers, encoders):
    n = enc.config.max_position_embeddings
    length = min(int(tok.model_max_length), n) if 2 <= tok.model_max_length <= 100_000 else n
    ids = clip.tokenize(tok, list(prompts), max_length=length)
    if ids.size and ids.max() >= enc.config.vocab_size:  # an embedding lookup past the table gives NaN
      raise ValueError(f"the tokenizer produced id {int(ids.max())} but the text encoder's vocab_size is "
                       f"{enc.config.vocab_size}: tokenizer and text encoder do not belong together")
    out.append(ids)
  return tuple(out)


def micro_conditioning(height: int, width: int, original_size: tuple[int, int] | None = None,
                       crop_top_left: tuple[int, int] = (0, 0), aesthetic_score: float | None = None) -> np.ndarray:
  """SDXL's add_time_ids [6]: original size (default: the target), crop top-left, target size; with
  `aesthetic_score` (an SDXL refiner, `StableDiffusion.requires_aesthetics_score`) [5]: original size, crop
  top-left, aesthetic score (diffusers' defaults: 6.0 for the prompt, 2.5 for the negative branch, whose row is
  made the same way from negative_original_size / negative_crops_coords_top_left: `Prompt.negative_time_ids`)."""
  oh, ow = original_size or (height, width)
  last = [height, width] if aesthetic_score is None else [aesthetic_score]
  return np.asarray([oh, ow, crop_top_left[0], crop_top_left[1], *last], np.float32)


def param_shardings(params: Any, mesh: jax.sharding.Mesh, fsdp_min_size: int = parallel.FSDP_MIN_SIZE) -> Any:
  """Shardings for inference params: replicated on a mesh without an fsdp axis, else each array split
  along its largest fsdp-divisible dimension (the same rule as training)."""
  return jax.tree.map(lambda a: jax.sharding.NamedSharding(mesh, parallel.spec_for(a.shape, None, mesh, (),
                                                                                     fsdp_min_size)), params)
