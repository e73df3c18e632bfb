"""Text-conditioned latent diffusion (`config.task = "ldm"`): a U-Net trained on VAE latents of captioned
images, conditioned on frozen CLIP text encoder(s) — from scratch, or fine-tuning a diffusers Stable
Diffusion checkpoint fully or with LoRA on the attention projections.

The VAE and text encoders are frozen: their params (and a LoRA's base U-Net) travel as the train step's
third argument, never in the optimizer or the checkpoint. Images are encoded inside the jitted step (a fresh
posterior sample each time) unless the data are cached latents (`data.source = "latents"`), and captions
are encoded there too unless the cache holds prompt embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import convert, lora as lora_lib, parallel, pipelines, schedules
from sdjax.data import input_pipeline
from sdjax.models import UNet, UNetConfig
from sdjax.models import vae as vae_lib
from sdjax.train import task as task_lib
from sdjax.train.tasks.diffusion import DiffusionTask, schedule_from


def _path(value: str, base: str, sub: str, field: str) -> str:
  """config.<field>, or `<base>/<sub>` (base: config.pretrained or config.frozen.from_pipeline)."""
  path = value or (os.path.join(base, sub) if base else "")
  if not path:
    raise ValueError(f"config.{field} is empty and there is no config.pretrained or config.frozen.from_pipeline "
                     f"to take {sub}/ from")
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.{field}: {path} is not a folder"
                            + (f" ({base} has no {sub}/)" if not value else ""))
  return path


class FrozenParts(NamedTuple):
  """The frozen networks a latent task's config names, loaded on the host (see `load_frozen_parts`)."""
  pretrained: str                 # config.pretrained, expanded ("" when training from scratch)
  base: str                       # the pipeline folder missing parts come from (pretrained or frozen.from_pipeline)
  vae: Any                        # (module, params) of the VAE
  names: list[str]                # "text_encoder"[, "text_encoder_2"]
  encoders: list[tuple]           # (module, params) per text encoder, in `names` order
  tokenizer_paths: list[str]      # one tokenizer folder per text encoder


def load_frozen_parts(config: ml_collections.ConfigDict) -> FrozenParts:
  """The VAE, text encoder(s) and tokenizer folder(s) of config.pretrained / config.frozen / config.data; errors
  name the config key whose folder is missing or is no pipeline."""
  pretrained = os.path.expanduser(config.get("pretrained") or "")
  fc = config.get("frozen") or {}
  base = pretrained or os.path.expanduser(fc.get("from_pipeline") or "")
  for field, folder in (("pretrained", pretrained), ("frozen.from_pipeline", base)):
    if folder and not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise FileNotFoundError(f"config.{field}: {folder} is not a diffusers pipeline folder (no model_index.json)")
  vae = convert.load_vae(_path(fc.get("vae") or "", base, "vae", "frozen.vae"))
  names = ["text_encoder"] + (["text_encoder_2"] if fc.get("text_encoder_2") or (
      base and os.path.isdir(os.path.join(base, "text_encoder_2"))) else [])
  encoders = [convert.load_text_encoder(_path(fc.get(n) or "", base, n, f"frozen.{n}"),
                                        **({"with_projection": True} if n == "text_encoder_2" else {}))
              for n in names]
  tokenizer_paths = [_path(config.data.get(t) or "", base, t, f"data.{t}")
                     for t in ("tokenizer", "tokenizer_2")[:len(names)]]
  return FrozenParts(pretrained, base, vae, names, encoders, tokenizer_paths)


def place_frozen(frozen: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> task_lib.Frozen:
  """Frozen params put on `mesh`: replicated, or FSDP-split as config.mesh.fsdp_min_size says."""
  fsdp_min = int(config.mesh.get("fsdp_min_size", parallel.FSDP_MIN_SIZE))
  shardings = pipelines.param_shardings(frozen, mesh, fsdp_min)
  return task_lib.Frozen(jax.device_put(frozen, shardings), shardings)


@task_lib.register("ldm")
class LatentDiffusion(DiffusionTask):
  """config sections: data (captions), pretrained, frozen, model (UNetConfig; from scratch), lora, diffusion,
  loss, sample (prompts)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    input_pipeline.check_config(config.data)
    parts = load_frozen_parts(config)
    pretrained, names, encoders = parts.pretrained, parts.names, parts.encoders
    self.pretrained = pretrained
    self.vae, vae_params = parts.vae
    self.tokenizer_paths = parts.tokenizer_paths

    self.lora = None
    if int(config.get("lora", {}).get("rank", 0) or 0) > 0:
      lc = config.lora
      try:
        self.lora = lora_lib.LoraConfig(rank=int(lc.rank), alpha=lc.get("alpha") or None,
                                        targets=tuple(lc.get("targets") or lora_lib.LoraConfig.targets))
      except ValueError as e:
        raise ValueError(f"config.lora: {e}") from e
    base_unet = None
    if pretrained:
      overrides = {k: config.model[k] for k in ("dtype", "remat", "attention_implementation")
                   if k in config.get("model", {})}
      self.unet, base_unet = convert.load_unet(os.path.join(pretrained, "unet"), **overrides)
    else:
      if self.lora is not None:
        raise ValueError("config.lora.rank > 0 needs config.pretrained (LoRA adapts a trained U-Net)")
      try:
        self.unet = UNet(UNetConfig.from_dict(config.model.to_dict()))
      except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from e
    models = {"unet": (self.unet, None), "vae": (self.vae, None)}
    models.update({n: e for n, e in zip(names, encoders)})
    convert.diffusers.check_compatible(models, "config (U-Net, VAE, text encoders)")

    if config.get("diffusion"):
      self.schedule = schedule_from(config)
    elif pretrained:
      with open(os.path.join(pretrained, "scheduler", "scheduler_config.json")) as f:
        self.schedule = schedules.from_diffusers_config(json.load(f))
    else:
      raise ValueError("config.diffusion is missing (and there is no config.pretrained scheduler to use)")
    super().__init__(config, mesh)
    self.sd = pipelines.StableDiffusion(self.unet, self.vae, tuple(e[0] for e in encoders), self.schedule,
                                        force_zeros_for_empty_prompt=len(encoders) == 2)

    if config.data.get("source") != "latents":
      size = input_pipeline.image_size(config.data)
      self.image_shape = (size, size, self.vae.config.in_channels)
      self.latent_shape = self.sd.latent_shape(size, size)
    else:
      self.image_shape = self.latent_shape = None  # from the cache
    frozen = {"vae": vae_params, "text": tuple(e[1] for e in encoders)}
    if self.lora is not None:
      frozen["unet"] = base_unet
    self._frozen = place_frozen(frozen, config, mesh)
    self._pretrained_unet = base_unet if self.lora is None else None

  # --- params ---------------------------------------------------------------------------------------

  def _boxed_unet(self, rng):
    u = self.unet.config
    x = jnp.zeros((1, 2 ** (len(u.block_out_channels) - 1) * 2, 2 ** (len(u.block_out_channels) - 1) * 2,
                   u.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, u.cross_attention_dim), jnp.float32)
    added = None
    if self.sd.sdxl:
      pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
      added = {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    return self.unet.init(rng, x, jnp.zeros((1,), jnp.float32), ctx, added_cond=added)["params"]

  def frozen(self) -> task_lib.Frozen:
    """The VAE's and text encoders' params (and a LoRA's base U-Net), on the mesh."""
    return self._frozen

  def init(self, rng, frozen):
    """The trainable params: a LoRA tree, or the U-Net (logically-partitioned boxes for shardings)."""
    if self.lora is not None:
      return lora_lib.init(frozen["unet"], self.lora, rng)
    return self._boxed_unet(rng)

  def initial_params(self):
    """Full fine-tuning starts from the checkpoint's U-Net."""
    return self._pretrained_unet

  def unet_params(self, params: Any, frozen: Any) -> Any:
    """The U-Net's params from the trainable ones (LoRA merged into the frozen base)."""
    return lora_lib.merge(frozen["unet"], params, self.lora) if self.lora is not None else params

  # --- data and the train step ----------------------------------------------------------------------

  def input_pipeline(self, process_index: int, process_count: int):
    data = dict(self.config.data)
    data["tokenizer"] = self.tokenizer_paths[0]
    data["tokenizer_2"] = self.tokenizer_paths[1] if len(self.tokenizer_paths) > 1 else ""
    data["micro_conditioning"] = self.sd.sdxl or bool(data.get("micro_conditioning"))
    return input_pipeline.pipeline_from_config(
        data, channels=self.vae.config.in_channels, global_batch_size=self.config.train.batch_size,
        seed=self.config.seed, label=False, process_index=process_index, process_count=process_count)

  def encode(self, batch, rng, frozen):
    """(diffusion-space latents, U-Net conditioning, the model's key) of a batch, with the frozen VAE and text
    encoders."""
    rng, k_encode = jax.random.split(rng)
    if "latents" in batch:
      x0 = batch["latents"]
    else:
      mean, logvar = self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
      x0 = vae_lib.scale_latents(vae_lib.sample_latent(mean, logvar, k_encode), self.vae.config)
    if "prompt_embeds" in batch:
      cond = {"context": batch["prompt_embeds"].astype(jnp.float32)}
      if "pooled_prompt_embeds" in batch:
        cond["pooled"] = batch["pooled_prompt_embeds"].astype(jnp.float32)
    else:
      ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if "input_ids_2" in batch else [])
      cond = pipelines.encode_prompt(self.sd.text_encoders, frozen["text"], ids)
    if self.sd.sdxl:
      cond["time_ids"] = batch["time_ids"].astype(jnp.float32)
    return x0, cond, rng

  def apply(self, params, frozen, x, t, cond, rng):
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if self.sd.sdxl else None
    return self.unet.apply({"params": self.unet_params(params, frozen)}, x, t, cond["context"], added_cond=added,
                           train=True, rngs={"dropout": rng})

  def export(self, state, workdir, data, *, write):
    """Write the EMA weights in diffusers' layout: a LoRA as `<workdir>/lora/pytorch_lora_weights.safetensors`
    (diffusers' `pipe.load_lora_weights` reads it), else the U-Net as a `<workdir>/unet` folder (drop it into a
    copy of the base pipeline folder). Every process joins the gather; only `write` ones write."""
    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)
    if self.lora is not None:
      folder = os.path.join(workdir, "lora")
      if write:
        lora_lib.save(folder, ema, self.lora)
    else:
      folder = os.path.join(workdir, "unet")
      if write:
        config = self.unet.config
        if config.sample_size is None and self.latent_shape is not None:  # trained here: record its size
          config = dataclasses.replace(config, sample_size=self.latent_shape[0])
        convert.save_component(folder, "unet", config, ema)
    return {"exported": folder}

  # --- sampling -------------------------------------------------------------------------------------

  def tokenizers(self) -> list:
    from sdjax.models.clip import load_tokenizer
    return [load_tokenizer(p) for p in self.tokenizer_paths]

  def full_params(self, params: Any, frozen: Any) -> dict[str, Any]:
    """pipelines' params {"unet", "vae", "text_encoders"} from trainable + frozen params."""
    return {"unet": self.unet_params(params, frozen), "vae": frozen["vae"], "text_encoders": frozen["text"]}

  def _sample_size(self) -> int:
    size = self.image_shape[0] if self.image_shape else int(self.config.sample.get("size", 0) or 0)
    if not size:
      raise ValueError("config.sample.size must be set when training from cached latents")
    return size

  def _prompt(self, toks: list, texts: list[str], guidance: float, size: int) -> pipelines.Prompt:
    """The conditioning of `texts`, with classifier-free guidance against the empty prompt when guidance > 1."""
    n = len(texts)
    return pipelines.Prompt(
        ids=pipelines.tokenize(toks, self.sd.text_encoders, texts),
        negative_ids=pipelines.tokenize(toks, self.sd.text_encoders, [""] * n) if guidance > 1 else None,
        guidance_scale=np.full((n,), guidance, np.float32) if guidance > 1 else None,
        time_ids=np.stack([pipelines.micro_conditioning(size, size)] * n) if self.sd.sdxl else None,
        zero_negative=np.ones((n,), bool) if self.sd.sdxl and guidance > 1 else None)

  def _txt2img_fn(self, sampler: str, steps: int, size: int):
    """jitted (params, frozen, prompt, keys) -> images [B, size, size, C] in [-1, 1]."""

    def fn(params, frozen, prompt, keys):
      return pipelines.txt2img(self.sd, self.full_params(params, frozen), prompt, keys, height=size, width=size,
                               sampler=sampler, num_steps=steps)

    return jax.jit(fn)

  def sample_grid(self, data, frozen) -> task_lib.SampleGrid:
    """The validation grid: config.sample.prompts (one row each) x sample.per_class images."""
    sc = self.config.sample
    prompts = list(sc.get("prompts") or ())
    if not prompts:
      raise ValueError("config.sample.prompts is empty: give the validation prompts for the sample grids")
    per = int(sc.per_prompt)
    texts = [p for p in prompts for _ in range(per)]
    size = self._sample_size()
    n = len(texts)
    guidance = float(sc.guidance_scale)
    prompt = self._prompt(self.tokenizers(), texts, guidance, size)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.config.seed + 1), i))(jnp.arange(n))
    rows = parallel.rows_sharding(self.mesh, n)
    prompt, keys = jax.device_put((prompt, keys), rows)
    sampler, steps = sc.sampler, int(sc.num_steps)
    return task_lib.SampleGrid(self._txt2img_fn(sampler, steps, size), (frozen, prompt, keys), per,
                      {"sampler": sampler, "steps": steps, "guidance_scale": guidance, "prompts": " | ".join(prompts)})

  def eval_samples(self, eval_config, frozen) -> task_lib.EvalSamples:
    """config.eval's images: the prompts of eval.prompts (a file, one a line; "": config.sample.prompts), cycled
    to eval.num_samples; image i's noise from (eval.seed, i); batches of eval.batch_size (the last one padded)."""
    from sdjax.eval.evaluator import read_prompts
    ec = eval_config
    prompts = read_prompts(ec.prompts) if ec.prompts else list(self.config.sample.get("prompts") or ())
    if not prompts:
      raise ValueError("config.eval.prompts is empty and so is config.sample.prompts: give the prompts to evaluate")
    n, b, size = ec.num_samples, ec.batch_size, self._sample_size()
    texts = tuple(prompts[i % len(prompts)] for i in range(n))
    toks, fn = self.tokenizers(), self._txt2img_fn(ec.sampler, ec.steps, size)
    rows = parallel.rows_sharding(self.mesh, b)
    base = jax.random.key(ec.seed)

    def args(i):
      idx = np.arange(i * b, (i + 1) * b)
      prompt = self._prompt(toks, [texts[j] if j < n else "" for j in idx], ec.guidance, size)
      keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.asarray(idx))
      return (frozen, *jax.device_put((prompt, keys), rows))

    return task_lib.EvalSamples(fn, args, n, b, (size, size, self.vae.config.out_channels), prompts=texts)

  def inference(self, state, frozen) -> pipelines.TextToImageModel:
    """The EMA params (a LoRA merged into its base) as a text-to-image model."""
    return pipelines.TextToImageModel(self.sd, self.full_params(state.ema_params, frozen), self.tokenizers())
