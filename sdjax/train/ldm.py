"""Text-conditioned latent diffusion (`config.task = "ldm"`): a U-Net trained on VAE latents of captioned
images, conditioned on frozen CLIP text encoder(s) — from scratch, or fine-tuning a diffusers Stable
Diffusion checkpoint fully or with LoRA on the attention projections.

The VAE and text encoders are frozen: their params (and a LoRA's base U-Net) travel as the train step's
third argument, never in the optimizer or the checkpoint. Images are encoded inside the jitted step (a fresh
posterior sample each time) unless the data are cached latents (`data.source = "latents"`), and captions
are encoded there too unless the cache holds prompt embeddings.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from sdjax import checkpoint, convert, lora as lora_lib, parallel, pipelines, samplers, schedules
from sdjax.data import input_pipeline
from sdjax.models import UNet, UNetConfig
from sdjax.models import vae as vae_lib
from sdjax.train import optim, state as state_lib
from sdjax.train.loop import SampleGrid, check_batch_size, step_config
from sdjax.train.step import make_train_step


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


class LatentExperiment:
  """Everything a latent-diffusion run derives from its config; the same interface as loop.Experiment."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    input_pipeline.check_config(config.data)
    pretrained = os.path.expanduser(config.get("pretrained") or "")
    fc = config.get("frozen") or {}
    base = pretrained or os.path.expanduser(fc.get("from_pipeline") or "")
    for field, folder in (("pretrained", pretrained), ("frozen.from_pipeline", base)):
      if folder and not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"config.{field}: {folder} is not a diffusers pipeline folder (no model_index.json)")
    self.pretrained = pretrained
    self.vae, vae_params = convert.load_vae(_path(fc.get("vae") or "", base, "vae", "frozen.vae"))
    names = ["text_encoder"] + (["text_encoder_2"] if fc.get("text_encoder_2") or (
        base and os.path.isdir(os.path.join(base, "text_encoder_2"))) else [])
    encoders = [convert.load_text_encoder(_path(fc.get(n) or "", base, n, f"frozen.{n}"),
                                          **({"with_projection": True} if n == "text_encoder_2" else {}))
                for n in names]
    self.tokenizer_paths = [_path(config.data.get(t) or "", base, t, f"data.{t}")
                            for t in ("tokenizer", "tokenizer_2")[:len(names)]]

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
      overrides = {k: config.model[k] for k in ("dtype", "remat") if k in config.get("model", {})}
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
      try:
        self.schedule = schedules.from_config(config.diffusion.to_dict())
      except ValueError as e:
        raise ValueError(f"config.diffusion: {e}") from e
    elif pretrained:
      with open(os.path.join(pretrained, "scheduler", "scheduler_config.json")) as f:
        self.schedule = schedules.from_diffusers_config(json.load(f))
    else:
      raise ValueError("config.diffusion is missing (and there is no config.pretrained scheduler to use)")
    samplers.get(config.sample.sampler)
    self.sd = pipelines.StableDiffusion(self.unet, self.vae, tuple(e[0] for e in encoders), self.schedule,
                                        force_zeros_for_empty_prompt=len(encoders) == 2)

    self.optimizer, self.lr_schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    self.step_config = step_config(config, None)
    if config.data.get("source") != "latents":
      size = input_pipeline.image_size(config.data)
      self.image_shape = (size, size, self.vae.config.in_channels)
      self.latent_shape = self.sd.latent_shape(size, size)
    else:
      self.image_shape = self.latent_shape = None  # from the cache
    self.mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
    self.rules = parallel.rules_from_config(config.mesh)
    fsdp_min = int(config.mesh.get("fsdp_min_size", parallel.FSDP_MIN_SIZE))

    frozen = {"vae": vae_params, "text": tuple(e[1] for e in encoders)}
    if self.lora is not None:
      frozen["unet"] = base_unet
    self.frozen_shardings = pipelines.param_shardings(frozen, self.mesh, fsdp_min)
    self.frozen = jax.device_put(frozen, self.frozen_shardings)
    self._pretrained_unet = base_unet if self.lora is None else None

    boxed = jax.eval_shape(self._init_params, jax.random.key(0))
    abstract = jax.eval_shape(lambda p: state_lib.create(p, self.optimizer, 0), nn.meta.unbox(boxed))
    self.state_shardings = parallel.state_shardings(abstract, boxed, self.mesh, self.rules, fsdp_min)
    self.abstract_state = checkpoint.abstract_with_shardings(abstract, self.state_shardings)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

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

  def _init_params(self, rng):
    """The trainable params: a LoRA tree, or the U-Net (logically-partitioned boxes for shardings)."""
    if self.lora is not None:
      return lora_lib.init(self.frozen["unet"], self.lora, rng)
    return self._boxed_unet(rng)

  def unet_params(self, params: Any, frozen: Any) -> Any:
    """The U-Net's params from the trainable ones (LoRA merged into the frozen base)."""
    return lora_lib.merge(frozen["unet"], params, self.lora) if self.lora is not None else params

  def init_state(self) -> state_lib.TrainState:
    seed = int(self.config.seed)
    if self.lora is None and self._pretrained_unet is not None:  # full fine-tuning: start from the checkpoint
      init = jax.jit(lambda p: state_lib.create(p, self.optimizer, seed), out_shardings=self.state_shardings)
      return init(self._pretrained_unet)
    if self.lora is not None:
      init = jax.jit(lambda rng, base: state_lib.create(lora_lib.init(base, self.lora, rng), self.optimizer, seed),
                     out_shardings=self.state_shardings)
      return init(jax.random.key(seed), self.frozen["unet"])
    init = jax.jit(lambda rng: state_lib.create(nn.meta.unbox(self._boxed_unet(rng)), self.optimizer, seed),
                   out_shardings=self.state_shardings)
    return init(jax.random.key(seed))

  # --- data and the train step ----------------------------------------------------------------------

  def input_pipeline(self, process_index: int, process_count: int):
    data = dict(self.config.data)
    data["tokenizer"] = self.tokenizer_paths[0]
    data["tokenizer_2"] = self.tokenizer_paths[1] if len(self.tokenizer_paths) > 1 else ""
    data["micro_conditioning"] = self.sd.sdxl or bool(data.get("micro_conditioning"))
    return input_pipeline.pipeline_from_config(
        data, channels=self.vae.config.in_channels, global_batch_size=int(self.config.train.batch_size),
        seed=int(self.config.seed), label=False, process_index=process_index, process_count=process_count)

  def _prepare(self, frozen, batch, rng):
    """(diffusion-space latents, U-Net conditioning) of a batch, with the frozen VAE and text encoders."""
    if "latents" in batch:
      x0 = batch["latents"]
    else:
      mean, logvar = self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
      x0 = vae_lib.scale_latents(vae_lib.sample_latent(mean, logvar, rng), self.vae.config)
    if "prompt_embeds" in batch:
      cond = {"context": batch["prompt_embeds"].astype(jnp.float32)}
      if "pooled_prompt_embeds" in batch:
        cond["pooled"] = batch["pooled_prompt_embeds"].astype(jnp.float32)
    else:
      ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if "input_ids_2" in batch else [])
      cond = pipelines.encode_prompt(self.sd.text_encoders, frozen["text"], ids)
    if self.sd.sdxl:
      cond["time_ids"] = batch["time_ids"].astype(jnp.float32)
    return x0, cond

  def _apply(self, params, frozen, x, t, cond, rng):
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if self.sd.sdxl else None
    return self.unet.apply({"params": self.unet_params(params, frozen)}, x, t, cond["context"], added_cond=added,
                           train=True, rngs={"dropout": rng})

  def train_step(self, *, donate: bool = True):
    check_batch_size(self.config, self.mesh, self.step_config.grad_accum_steps)
    fn = make_train_step(self._apply, self.schedule, self.optimizer, self.step_config, self.lr_schedule,
                         prepare=self._prepare)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding, self.frozen_shardings),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,) if donate else ())

  def export(self, state: state_lib.TrainState, workdir: str, *, write: bool = True) -> dict[str, str]:
    """Write the EMA weights in diffusers' layout: a LoRA as `<workdir>/lora/pytorch_lora_weights.safetensors`
    (diffusers' `pipe.load_lora_weights` reads it), else the U-Net as a `<workdir>/unet` folder (drop it into a
    copy of the base pipeline folder). Every process joins the gather; only `write` ones write."""
    from jax.experimental import multihost_utils
    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)
    if self.lora is not None:
      folder = os.path.join(workdir, "lora")
      if write:
        lora_lib.save(folder, ema, self.lora)
    else:
      folder = os.path.join(workdir, "unet")
      if write:
        convert.save_component(folder, "unet", self.unet.config, ema)
    return {"exported": folder}

  # --- sampling -------------------------------------------------------------------------------------

  def tokenizers(self) -> list:
    from sdjax.models.clip import load_tokenizer
    return [load_tokenizer(p) for p in self.tokenizer_paths]

  def full_params(self, params: Any, frozen: Any) -> dict[str, Any]:
    """pipelines' params {"unet", "vae", "text_encoders"} from trainable + frozen params."""
    return {"unet": self.unet_params(params, frozen), "vae": frozen["vae"], "text_encoders": frozen["text"]}

  def sample_grid(self) -> SampleGrid:
    """The validation grid: config.sample.prompts (one row each) x sample.per_class images."""
    sc = self.config.sample
    prompts = list(sc.get("prompts") or ())
    if not prompts:
      raise ValueError("config.sample.prompts is empty: give the validation prompts for the sample grids")
    per = int(sc.per_prompt)
    texts = [p for p in prompts for _ in range(per)]
    size = self.image_shape[0] if self.image_shape else int(self.config.sample.get("size", 0) or 0)
    if not size:
      raise ValueError("config.sample.size must be set when training from cached latents")
    toks = self.tokenizers()
    n = len(texts)
    guidance = float(sc.guidance_scale)
    prompt = pipelines.Prompt(
        ids=pipelines.tokenize(toks, self.sd.text_encoders, texts),
        negative_ids=pipelines.tokenize(toks, self.sd.text_encoders, [""] * n) if guidance > 1 else None,
        guidance_scale=np.full((n,), guidance, np.float32) if guidance > 1 else None,
        time_ids=np.stack([pipelines.micro_conditioning(size, size)] * n) if self.sd.sdxl else None,
        zero_negative=np.ones((n,), bool) if self.sd.sdxl and guidance > 1 else None)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(self.config.seed) + 1), i))(jnp.arange(n))
    rows = self.batch_sharding if n % parallel.batch_devices(self.mesh) == 0 else self.replicated
    prompt, keys = jax.device_put((prompt, keys), rows)
    sampler, steps = sc.sampler, int(sc.num_steps)

    def fn(params, frozen, prompt, keys):
      return pipelines.txt2img(self.sd, self.full_params(params, frozen), prompt, keys, height=size, width=size,
                               sampler=sampler, num_steps=steps)

    return SampleGrid(jax.jit(fn), (self.frozen, prompt, keys), per,
                      {"sampler": sampler, "steps": steps, "guidance_scale": guidance, "prompts": " | ".join(prompts)})


def load_text_to_image(workdir: str, step: int | None = None):
  """(StableDiffusion, params, tokenizers, model id) from a latent-diffusion run's latest checkpoint (EMA
  params; a LoRA merged into its base)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{workdir} is not an sdjax training run (no config.json)")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("task") != "ldm":
    raise ValueError(f"{workdir} is a {config.get('task', 'diffusion')!r} run, not a text-to-image ('ldm') run")
  try:
    mesh = parallel.mesh_from_config(config.mesh)
  except ValueError:
    mesh = parallel.make_mesh({"data": -1})
  exp = LatentExperiment(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first: python train.py --workdir {workdir}")
    state = ckpt.restore(exp.abstract_state, step)
  finally:
    ckpt.close()
  params = exp.full_params(state.ema_params, exp.frozen)
  return exp.sd, params, exp.tokenizers(), f"{os.path.abspath(workdir)}@{step}"
