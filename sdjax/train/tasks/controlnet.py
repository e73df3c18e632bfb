"""ControlNet training (`config.task = "controlnet"`), as diffusers' examples/controlnet/train_controlnet.py: a
trainable ControlNet (sdjax.models.controlnet) next to a frozen Stable Diffusion (U-Net, VAE, text encoder).

- Frozen: the pipeline folder config.frozen.from_pipeline (its unet/, vae/, text_encoder/, tokenizer/, scheduler/),
  any part replaced by config.frozen.unet / vae / text_encoder. Their params travel as the train step's third
  argument; the trainable tree (optimizer, EMA, checkpoint) is the ControlNet's params and nothing else.
- The ControlNet starts as `controlnet.from_unet` of the frozen U-Net (its encoder copied, the zero convolutions
  zero, so step 0 predicts exactly what the frozen U-Net predicts), or from an existing diffusers ControlNetModel
  folder (config.controlnet.from_pretrained) that must fit the U-Net and the VAE.
- Each example's control image [H, W, 3] in [0, 1] is derived from its image on the data side
  (sdjax.data.control_images, config.control.kind: silhouette | edges | sobel).
- The loss is the U-Net's usual objective (config.diffusion's target, config.loss's weighting) on VAE latents of
  the image (encoded in the step: the control image needs the image, so cached latents are refused), with the
  ControlNet's residuals added to the frozen U-Net's skips and mid block. Captions are dropped to "" with
  config.data.caption_dropout (diffusers' --proportion_empty_prompts), so classifier-free guidance still works.

The end of a run writes the EMA ControlNet as a diffusers ControlNetModel folder, `<workdir>/controlnet`
(`sdjax.convert.load_controlnet` and diffusers' `ControlNetModel.from_pretrained` read it). Sample grids and
`sdjax.runs.load` sample with `pipelines.txt2img(..., controlnets=, control=)`.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import control as control_lib, convert, parallel, pipelines, schedules
from sdjax.data import control_images, input_pipeline
from sdjax.data.pipeline import Pipeline
from sdjax.models import controlnet as controlnet_lib
from sdjax.train import task as task_lib
from sdjax.train.tasks.diffusion import DiffusionTask, schedule_from
from sdjax.train.tasks.latent import LatentDiffusion, _path, load_frozen_parts, place_frozen

EXPORT_FOLDER = "controlnet"
# diffusers' ControlNetModel default control-image encoder widths (for an 8x VAE); a VAE of downscale f uses the
# first log2(f) + 1 of them unless config.controlnet.conditioning_embedding_out_channels says otherwise.
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)
_CONTROLNET_FIELDS = ("from_pretrained", "conditioning_embedding_out_channels")
_COMPUTE_FIELDS = ("dtype", "remat", "attention_implementation")


class ControlNetModel(NamedTuple):
  """A trained ControlNet with its frozen Stable Diffusion (what `sdjax.runs.load` gives for a "controlnet" run):
  `pipelines.txt2img(sd, params, prompt, keys, ..., controlnets=(controlnet,), control=(control.control_input(
  images),))` with params = {"unet", "vae", "text_encoders", "controlnets": (ControlNet params,)}; `control`
  makes control images from images (`control_images.control_images(images, control)`)."""
  sd: pipelines.StableDiffusion
  controlnet: controlnet_lib.ControlNet
  params: dict
  tokenizers: list
  control: control_images.ControlConfig


def _embedding_channels(value: Any, factor: int) -> tuple[int, ...]:
  """config.controlnet.conditioning_embedding_out_channels (empty: diffusers' default widths cut to the VAE's
  downscale `factor`), checked against it."""
  levels = int(np.log2(factor)) + 1
  if 2 ** (levels - 1) != factor:
    raise ValueError(f"config.frozen.vae: downscale {factor} is not a power of 2 (no ControlNet encoder matches it)")
  chans = tuple(int(c) for c in (value or ())) or DEFAULT_EMBEDDING_CHANNELS[:levels]
  if len(chans) != levels:
    raise ValueError(f"config.controlnet.conditioning_embedding_out_channels has {len(chans)} widths, i.e. a "
                     f"{2 ** (len(chans) - 1)}x control-image encoder; the VAE downscales {factor}x, which needs "
                     f"{levels} widths")
  return chans


@task_lib.register("controlnet")
class ControlNetTask(LatentDiffusion):
  """config sections: frozen (from_pipeline; unet, vae, text_encoder), controlnet (from_pretrained,
  conditioning_embedding_out_channels), control (sdjax.data.control_images.ControlConfig), data (captioned images),
  model (compute settings of both networks: dtype, remat, attention_implementation), diffusion (optional: else the
  pipeline's scheduler), loss, sample (sampler, num_steps, guidance_scale, num_images)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    input_pipeline.check_config(config.data)
    if config.data.get("source") == "latents":
      raise ValueError("config.data.source: the controlnet task derives each control image from its image, so it "
                       "needs images, not cached latents")
    if config.get("pretrained"):
      raise ValueError("config.pretrained: the controlnet task trains no U-Net; name the frozen pipeline in "
                       "config.frozen.from_pipeline")
    fc = config.get("frozen") or {}
    base = os.path.expanduser(fc.get("from_pipeline") or "")
    if not base:
      raise ValueError("config.frozen.from_pipeline is empty: the controlnet task needs a pretrained Stable Diffusion "
                       "pipeline folder (its U-Net, VAE, text encoder and tokenizer are frozen)")
    self.control = control_images.control_config(config.get("control"))
    cc = dict(config.get("controlnet") or {})
    unknown = sorted(set(cc) - set(_CONTROLNET_FIELDS))
    if unknown:
      raise ValueError(f"config.controlnet: unknown field(s) {unknown}; known fields are {list(_CONTROLNET_FIELDS)}")

    parts = load_frozen_parts(config)
    if len(parts.encoders) != 1:
      raise ValueError("config.frozen.text_encoder_2: the controlnet task trains SD 1.x / 2.x ControlNets (one text "
                       "encoder); SDXL is not supported")
    self.pretrained, self.lora, self._pretrained_unet = "", None, None
    self.vae, vae_params = parts.vae
    self.tokenizer_paths = parts.tokenizer_paths
    overrides = {k: config.model[k] for k in _COMPUTE_FIELDS if k in (config.get("model") or {})}
    self.unet, unet_params = convert.load_unet(_path(fc.get("unet") or "", base, "unet", "frozen.unet"), **overrides)
    encoder = parts.encoders[0]
    convert.diffusers.check_compatible({"unet": (self.unet, None), "vae": (self.vae, None), "text_encoder": encoder},
                                       "config.frozen (U-Net, VAE, text encoder)")
    if config.get("diffusion"):
      self.schedule = schedule_from(config)
    else:
      path = os.path.join(base, "scheduler", "scheduler_config.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"config.diffusion is missing and config.frozen.from_pipeline has no {path}")
      with open(path) as f:
        self.schedule = schedules.from_diffusers_config(json.load(f))
    DiffusionTask.__init__(self, config, mesh)
    self.sd = pipelines.StableDiffusion(self.unet, self.vae, (encoder[0],), self.schedule)

    size = input_pipeline.image_size(config.data)
    self.image_shape = (size, size, self.vae.config.in_channels)
    try:
      self.latent_shape = self.sd.latent_shape(size, size)
    except ValueError as e:
      raise ValueError(f"config.data.resolution: {e}") from e
    levels = 2 ** (len(self.unet.config.block_out_channels) - 1)
    if self.latent_shape[0] % levels:
      raise ValueError(f"config.data.resolution: the latents' size {self.latent_shape[0]} does not divide by the "
                       f"U-Net's {levels}x downsampling")

    if cc.get("from_pretrained"):
      where = "config.controlnet.from_pretrained"
      path = os.path.expanduser(cc["from_pretrained"])
      if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path} is not a folder")
      if cc.get("conditioning_embedding_out_channels"):
        raise ValueError("config.controlnet.conditioning_embedding_out_channels: set it only for a ControlNet made "
                         "from the U-Net (a pretrained one has its own)")
      module, params = convert.load_controlnet(path, **overrides)
    else:
      where = "config.controlnet"
      chans = _embedding_channels(cc.get("conditioning_embedding_out_channels"), self.vae.config.downscale)
      try:
        cn_config, params = controlnet_lib.from_unet(self.unet.config, unet_params, 3,
                                                     conditioning_embedding_out_channels=chans, seed=int(config.seed))
      except ValueError as e:
        raise ValueError(f"config.frozen.unet: {e}") from e
      module = controlnet_lib.ControlNet(cn_config)
    if module.config.conditioning_channels != 3:
      raise ValueError(f"{where}: the ControlNet takes {module.config.conditioning_channels}-channel control images; "
                       f"config.control makes 3-channel ones")
    probe = control_lib.control_input(np.zeros((1, size, size, 3), np.float32))
    try:
      control_lib.check(self.sd, {"controlnets": (params,)}, (module,), (probe,), self.latent_shape, 1)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    down = [d for d in module.config.unet.down_block_types]
    if down != list(self.unet.config.down_block_types):
      raise ValueError(f"{where}: the ControlNet's down_block_types {down} are not the U-Net's "
                       f"{list(self.unet.config.down_block_types)}")
    self.controlnet = module
    self._initial = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    self._frozen = place_frozen({"vae": vae_params, "text": (encoder[1],), "unet": unet_params}, config, mesh)

  # --- params ---------------------------------------------------------------------------------------

  def init(self, rng, frozen):
    """The ControlNet's params as logically-partitioned boxes (for shapes and shardings; the values trained from
    are `initial_params`)."""
    x, t, ctx, image, scale, added = controlnet_lib.init_args(self.controlnet.config)
    return self.controlnet.init(rng, x, t, ctx, image, scale, added)["params"]

  def initial_params(self):
    """The ControlNet copied from the U-Net (`from_unet`) or loaded from config.controlnet.from_pretrained."""
    return self._initial

  def unet_params(self, params, frozen):
    return frozen["unet"]

  # --- data and the train step ----------------------------------------------------------------------

  def input_pipeline(self, process_index: int, process_count: int):
    """The ldm task's captioned images, each with its control image ("control" [H, W, 3] in [0, 1])."""
    data = dict(self.config.data)
    data["tokenizer"], data["tokenizer_2"] = self.tokenizer_paths[0], ""
    source = input_pipeline.open_source(data, label=False)
    transform = control_images.WithControl(
        input_pipeline.make_transform(data, channels=self.image_shape[-1], label=False, source=source), self.control)
    get = lambda k, d: d if data.get(k) is None else data[k]
    return Pipeline(source, transform, self.config.train.batch_size, self.config.seed, process_index=process_index,
                    process_count=process_count, num_threads=int(get("num_threads", 8)),
                    prefetch=int(get("prefetch", 2)), name=f"{get('source', 'bundled')}:{data.get('name') or ''}")

  def encode(self, batch, rng, frozen):
    """The ldm task's (latents, text conditioning), plus the control image ("control")."""
    x0, cond, rng = super().encode(batch, rng, frozen)
    return x0, {**cond, "control": batch["control"].astype(jnp.float32)}, rng

  def residuals(self, params, x, t, cond, rng=None):
    """The ControlNet's (down residuals, mid residual) for latents x at timesteps t."""
    kw = {"train": True, "rngs": {"dropout": rng}} if rng is not None else {}
    return self.controlnet.apply({"params": params}, x, t, cond["context"], cond["control"], 1.0, **kw)

  def apply(self, params, frozen, x, t, cond, rng):
    """The frozen U-Net's prediction with the ControlNet's residuals added (the U-Net runs deterministically, as
    diffusers' script leaves it in eval mode)."""
    down, mid = self.residuals(params, x, t, cond, rng)
    return self.unet.apply({"params": frozen["unet"]}, x, t, cond["context"], down_residuals=down, mid_residual=mid)

  # --- sampling -------------------------------------------------------------------------------------

  def full_params(self, params, frozen):
    """pipelines' params with the ControlNet: {"unet", "vae", "text_encoders", "controlnets": (params,)}."""
    return {"unet": frozen["unet"], "vae": frozen["vae"], "text_encoders": frozen["text"], "controlnets": (params,)}

  def sample_grid(self, data, frozen) -> task_lib.SampleGrid | None:
    """Three rows of config.sample.num_images training examples (the first ones of data.split): the control image,
    the sample generated from it and the example's caption, the original. num_images 0: no grids."""
    sc = self.config.sample
    n = int(sc.get("num_images", 0) or 0)
    if n <= 0:
      return None
    cfg = {**self.config.data.to_dict(), "caption_dropout": 0.0, "tokenizer": "", "tokenizer_2": ""}
    source = input_pipeline.open_source(cfg, label=False)
    if len(source) < n:
      raise ValueError(f"config.sample.num_images is {n} but the data have {len(source)} examples")
    transform = control_images.WithControl(
        input_pipeline.make_transform(cfg, channels=self.image_shape[-1], label=False, source=source), self.control)
    rng = np.random.default_rng(self.config.seed)
    examples = [transform(source[i], rng) for i in range(n)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32)
    controls = np.stack([e["control"] for e in examples])
    texts = [str(source[i].get("caption") or "") for i in range(n)]
    guidance = float(sc.guidance_scale)
    prompt = self._prompt(self.tokenizers(), texts, guidance, self.image_shape[0])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.config.seed + 1), i))(jnp.arange(n))
    ctl = control_lib.control_input(controls)
    prompt, keys, ctl, images = jax.device_put((prompt, keys, ctl, images), parallel.rows_sharding(self.mesh, n))
    sampler, steps, size = sc.sampler, int(sc.num_steps), self.image_shape[0]

    def fn(params, frozen, prompt, keys, ctl, images):
      out = pipelines.txt2img(self.sd, self.full_params(params, frozen), prompt, keys, height=size, width=size,
                              sampler=sampler, num_steps=steps, controlnets=(self.controlnet,), control=(ctl,))
      return jnp.concatenate([ctl.image * 2.0 - 1.0, out, images])

    return task_lib.SampleGrid(jax.jit(fn), (frozen, prompt, keys, ctl, images), n,
                               {"sampler": sampler, "steps": steps, "guidance_scale": guidance,
                                "control": self.control.kind, "rows": "control | generated | original"})

  def eval_samples(self, eval_config, frozen):
    """None: config.eval does not judge ControlNets (bench/digits_demo.py controlnet does)."""
    return None

  def inference(self, state, frozen) -> ControlNetModel:
    return ControlNetModel(self.sd, self.controlnet, self.full_params(state.ema_params, frozen), self.tokenizers(),
                           self.control)

  # --- export ---------------------------------------------------------------------------------------

  def export(self, state, workdir, data, *, write):
    """Write the EMA ControlNet as a diffusers ControlNetModel folder, `<workdir>/controlnet` (config.json +
    diffusion_pytorch_model.safetensors). Every process joins the gather; only `write` ones write."""
    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)
    folder = os.path.join(workdir, EXPORT_FOLDER)
    if write:
      convert.save_component(folder, "controlnet", self.controlnet.config, ema)
    return {"exported": folder}
