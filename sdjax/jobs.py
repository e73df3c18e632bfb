"""Resumable batch text-to-image jobs: prompts (flags, .txt or .jsonl) -> one PNG per image with its
generation metadata, an index.jsonl, job.json, an optional grid and a summary. Every image written carries
diffusers' SDXL invisible watermark (sdjax.watermark, applied on the host) unless `Job.watermark` is off.

Image j of prompt p has an integer seed (the prompt's own `seed` + j, else one derived from (job seed, p,
j)) and its key is `jax.random.key(seed)`, so an image depends on neither the batch size, the device count
nor the other images of its batch. Work is grouped by the static arguments of the jitted pipeline (mode,
size, steps, sampler, guidance on/off, rescale on/off, strength, a refiner's high_noise_frac): one compile per
group, fixed-size batches sharded over the mesh. A re-run of the same job renders only the images whose PNG is
missing. A model may carry ControlNets (`load_controlnets`: per-image control images, scales and guidance windows
are inputs of the program) and IP-Adapters (`load_ip_adapters`: image prompts embedded once per image by the CLIP
vision encoder before rendering).

(~700 lines, above the ~450 of the style guide on purpose: it is one job's life read top to bottom, its model,
its seeds, its output folder's records, its compile groups and their memory check; prompt parsing is already
split out into sdjax.prompts, ControlNet and IP-Adapter inputs into sdjax.job_adapters.)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from sdjax import io, memory, parallel, pipelines, preemption, provenance, watermark
# ControlNets and IP-Adapters in jobs, part of the jobs' API (jobs.load_controlnets, jobs.Control, ...).
from sdjax.job_adapters import (Control, IPAdapters, adapter_fields, control_inputs, encode_ip_images,  # noqa: F401
                                file_hash, image_hashes, ip_input, load_control_image, load_controlnets,
                                load_ip_adapters, open_image)
# The prompts' API, part of the jobs' (jobs.read_prompts, jobs.Defaults, jobs.JobError, ...).
from sdjax.prompts import (FIELDS, SEED_MAX, Defaults, JobError, Spec, check_outdir, check_settings,  # noqa: F401
                           name_of, read_prompts, resolve)

# job.json fields that change the images (a re-run that changes one of them is refused).
IMAGE_FIELDS = ("model_hash", "seed", "watermark", "c2pa", "safety_checker", "preset", "refiner", "controlnet",
                "ip_adapter")
# What a job.json written before a field existed meant by its absence (no watermark, no C2PA, no safety check,
# no refiner, no ControlNet, no IP-Adapter).
OLD_DEFAULTS = {"watermark": False, "c2pa": False, "safety_checker": False, "refiner": None, "controlnet": None,
                "ip_adapter": None}
# Per-image outcomes recorded with the settings (PNG text, index.jsonl) but not compared on re-runs.
OUTCOMES = ("nsfw_content_detected",)


class Interrupted(KeyboardInterrupt):
  """SIGTERM (or Ctrl-C) while rendering; everything on disk is complete."""


class LostPeer(RuntimeError):
  """A multi-process job's collective failed: another process died. Every file on disk is complete."""


class Item(NamedTuple):
  """Image j of prompt p."""
  p: int
  j: int
  seed: int
  spec: Spec

  @property
  def name(self) -> str:
    return f"{self.p:05d}_{self.j:03d}.png"


@dataclasses.dataclass(eq=False)
class Refiner:
  """An SDXL refiner attached to a base Model (`load_refiner`): every txt2img image of the job is rendered by the
  ensemble of expert denoisers (`pipelines.ensemble`), the base for the first `high_noise_frac` of the schedule."""
  sd: pipelines.StableDiffusion
  params: Any
  tokenizers: list
  model_id: str
  high_noise_frac: float = 0.8

  @functools.cached_property
  def hash(self) -> str:
    from sdjax.convert import params_hash
    return params_hash(self.params["unet"])

  def info(self) -> dict:
    """What job.json and every image's metadata record of it."""
    return {"refiner": self.model_id, "refiner_hash": self.hash, "high_noise_frac": self.high_noise_frac}


@dataclasses.dataclass(eq=False)
class Model:
  """A loaded text-to-image model with what a job needs to know about it (`refiner`: an SDXL refiner for its
  txt2img images, `load_refiner`; `control`: ControlNets, `load_controlnets`; `ip_adapters`: IP-Adapters,
  `load_ip_adapters`)."""
  sd: pipelines.StableDiffusion
  params: Any
  tokenizers: list
  model_id: str
  default_size: int | None
  default_sampler: str | None
  _hash: str | None = None
  compiled: dict = dataclasses.field(default_factory=dict)  # (group, batch size, mesh) -> executable
  refiner: Refiner | None = None
  control: Control | None = None
  ip_adapters: IPAdapters | None = None

  @property
  def hash(self) -> str:
    if self._hash is None:
      from sdjax.convert import params_hash
      self._hash = params_hash(self.params["unet"])
    return self._hash


# --- sources ---------------------------------------------------------------------------------------------

def load_model(path: str, *, tokenizer: str | None = None, tokenizer_2: str | None = None,
               model_type: str | None = None, names: Mapping[str, str] | None = None,
               safety_checker: bool = True, loras: Sequence[tuple[str, float]] = (),
               echo: Callable[[str], None] = print) -> Model:
  """A diffusers folder or a single-file checkpoint (whose tokenizers come from `tokenizer`[_2]); `names`:
  how errors name the arguments (sdjax.prompts.name_of). `safety_checker`: load the folder's NSFW checker
  (sdjax.convert.safety_checker) when it has one, so that every image is checked inside the jitted render;
  a model without one is said so through `echo`. `loras`: (file, scale) pairs fused into the U-Net and text
  encoder weights (sdjax.lora_loading: diffusers or kohya naming); the model hash then covers the text encoders
  too."""
  from sdjax import convert
  from sdjax.convert import single_file
  from sdjax.models import clip
  if not os.path.exists(path):
    raise JobError(f"{name_of(names, 'model')}: {path} does not exist")
  checker = None
  if os.path.isfile(path):
    pipe = convert.load_single_file(path, model_type)
    size = single_file.default_configs(pipe.model_type)["unet"].get("sample_size")
  else:
    pipe = convert.load_pipeline(path)
    with open(os.path.join(path, "unet", "config.json")) as f:
      size = json.load(f).get("sample_size")
    checker = convert.load_safety_checker(path) if safety_checker else None
  if safety_checker and checker is None:
    from sdjax.convert.safety_checker import no_safety_checker_message
    echo("note: " + (no_safety_checker_message(path) if os.path.isdir(path) else
                     f"{path}: a single-file checkpoint carries no safety checker: generated images are not "
                     "checked for NSFW content"))
  sd, params = pipelines.from_components(pipe.models, pipe.schedule, model_type=pipe.model_type,
                                         safety_checker=checker, **pipe.pipeline_config)
  lora_hash = None
  if loras:
    from sdjax import lora_loading
    from sdjax.convert import params_hash
    try:
      params = lora_loading.fuse(params, list(loras))
    except (ValueError, FileNotFoundError) as e:
      raise JobError(f"{name_of(names, 'lora')}: {e}") from None
    echo("fused LoRAs: " + ", ".join(f"{p} x{s:g}" for p, s in loras))
    lora_hash = params_hash({k: v for k, v in params.items() if k in ("unet", "text_encoders")})
  kinds, folders = ("tokenizer", "tokenizer_2")[:len(sd.text_encoders)], (tokenizer, tokenizer_2 or tokenizer)
  if sd.requires_aesthetics_score:  # the SDXL refiner: text_encoder_2 alone
    kinds, folders = ("tokenizer_2",), (tokenizer_2 or tokenizer,)
  toks = [pipe.tokenizers.get(n) for n in kinds]
  for i, folder in enumerate(folders[:len(kinds)]):
    if folder:
      toks[i] = clip.load_tokenizer(folder)
  if any(t is None for t in toks):
    raise JobError(f"{path} carries no tokenizer: pass {name_of(names, 'tokenizer')} DIR (and "
                   f"{name_of(names, 'tokenizer_2')} for SDXL)")
  try:
    sampler = pipe.sampler
  except ValueError:
    sampler = None
  return Model(sd, params, toks, os.path.abspath(path), size * sd.downscale if size else None, sampler, lora_hash)


def load_refiner(base: Model, path: str, *, high_noise_frac: float = 0.8, tokenizer: str | None = None,
                 names: Mapping[str, str] | None = None, echo: Callable[[str], None] = print) -> Model:
  """`base` with the SDXL refiner at `path` (a diffusers folder or sd_xl_refiner-style single file) attached: the
  job's txt2img images become base + refiner ensembles (`pipelines.ensemble`, denoising_end / denoising_start =
  `high_noise_frac`). The refiner's tokenizer: its folder's, else `tokenizer`, else the base's last (SDXL's
  OpenCLIP tokenizer, which the refiner shares). The two VAEs must downscale alike (the base's latents are the
  refiner's)."""
  from sdjax import samplers
  flag = name_of(names, "refiner")
  try:
    samplers.check_fraction("high_noise_frac", high_noise_frac)
  except ValueError as e:
    raise JobError(f"{name_of(names, 'high_noise_frac')}: {e}") from None
  quiet, where = (lambda _: None), {**(names or {}), "model": flag}
  if tokenizer is None and os.path.isfile(path):  # a single file carries none: the base's OpenCLIP tokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      base.tokenizers[-1].save_pretrained(tmp)
      ref = load_model(path, tokenizer=tmp, names=where, safety_checker=False, echo=quiet)
  else:
    ref = load_model(path, tokenizer=tokenizer, names=where, safety_checker=False, echo=quiet)
  if not ref.sd.requires_aesthetics_score:
    raise JobError(f"{flag}: {path} is not an SDXL refiner (its U-Net takes no aesthetic score)")
  if not base.sd.sdxl or base.sd.requires_aesthetics_score:
    raise JobError(f"{flag} needs an SDXL base model ({base.model_id} is not one)")
  if (ref.sd.downscale, ref.sd.vae.config.latent_channels) != (base.sd.downscale, base.sd.vae.config.latent_channels):
    raise JobError(f"{flag}: the refiner's VAE (downscale {ref.sd.downscale}, {ref.sd.vae.config.latent_channels} "
                   f"latent channels) does not match the base's ({base.sd.downscale}, "
                   f"{base.sd.vae.config.latent_channels}): the refiner continues from the base's latents")
  echo(f"refiner: {ref.model_id} for the last {1 - high_noise_frac:.0%} of each txt2img schedule")
  return dataclasses.replace(base, refiner=Refiner(ref.sd, ref.params, ref.tokenizers, ref.model_id,
                                                   float(high_noise_frac)), compiled={})


def load_workdir(workdir: str) -> Model:
  """The latest checkpoint (EMA params) of a text-to-image (`task: ldm`) training run."""
  from sdjax import runs
  r = runs.load(workdir, task="ldm")
  config = r.config.to_dict()
  data, sample = config.get("data", {}), config.get("sample", {})
  size = sample.get("size") or data.get("resolution")
  if not size and data.get("source", "bundled") != "latents":
    from sdjax.data import input_pipeline
    size = input_pipeline.image_size(data)
  return Model(r.model.sd, r.model.params, list(r.model.tokenizers), r.model_id, int(size) if size else None,
               sample.get("sampler"))


# --- images ------------------------------------------------------------------------------------------

def image_seed(job_seed: int, p: int, j: int, spec: Spec) -> int:
  """The integer seed of image j of prompt p: the prompt's seed + j, else derived from (job seed, p, j)."""
  if spec.seed is not None:
    return spec.seed + j
  return int(np.random.SeedSequence([job_seed, p, j]).generate_state(1)[0]) & SEED_MAX


def items(specs: Sequence[Spec], job_seed: int) -> list[Item]:
  return [Item(p, j, image_seed(job_seed, p, j, s), s) for p, s in enumerate(specs) for j in range(s.num_images)]


@functools.lru_cache(None)
def sdjax_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("sdjax")
  except metadata.PackageNotFoundError:
    return "unknown"


def token_limits(model: Model) -> list[int]:
  """The token length each text encoder's prompts are padded and truncated to (as pipelines.tokenize)."""
  out = []
  for tok, enc in zip(model.tokenizers, model.sd.text_encoders):
    n = enc.config.max_position_embeddings
    out.append(min(int(tok.model_max_length), n) if 2 <= tok.model_max_length <= 100_000 else n)
  return out


def truncated_texts(model: Model, texts: Sequence[str]) -> list[bool]:
  """Whether each text has more tokens (with its start/end tokens) than some text encoder takes."""
  texts = list(texts)
  out = [False] * len(texts)
  if not texts:
    return out
  for tok, limit in zip(model.tokenizers, token_limits(model)):
    ids = tok(texts, truncation=False, verbose=False)["input_ids"]
    out = [t or len(i) > limit for t, i in zip(out, ids)]
  return out


def record(item: Item, model: Model, truncated: bool = False, watermarked: bool = True,
           hashes: Mapping[str, str] | None = None) -> dict:
  """The generation metadata of one image (PNG tEXt chunks and its index.jsonl line); `truncated`: its
  prompt or negative prompt was cut to the text encoder's token length; `watermark`: sdjax.watermark.LABEL
  when the job watermarks its images (`watermarked`) and the image is large enough to carry it, else "none".
  With ControlNets / IP-Adapters: `adapter_fields` (`hashes`: `image_hashes` of the job's prompts)."""
  s = item.spec
  r = {"file": item.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": item.seed,
       "sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
       "guidance_rescale": s.guidance_rescale, "height": s.height, "width": s.width, "mode": s.mode,
       "strength": s.strength, "model": model.model_id, "model_hash": model.hash, "sdjax_version": sdjax_version(),
       "watermark": watermark.label(s.height, s.width, watermarked)}
  r.update({k: getattr(s, k) for k in ("init_image", "mask") if getattr(s, k)})
  if model.refiner is not None and s.mode == "txt2img":
    r.update(model.refiner.info(), high_noise_frac=s.high_noise_frac)
  r.update(adapter_fields(s, model, image_hashes([s]) if hashes is None else hashes))
  if truncated:
    r["truncated"] = True
  return r


# --- the job folder ----------------------------------------------------------------------------------

def _write_json(path: str, obj: Any, lines: bool = False) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    if lines:
      f.writelines(json.dumps(o) + "\n" for o in obj)
    else:
      json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def check_job(outdir: str, job: dict, names: Mapping[str, str] | None = None) -> None:
  """Refuse to continue a job whose existing job.json differs in a setting that changes the images."""
  path = os.path.join(outdir, "job.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = json.load(f)
  for key in IMAGE_FIELDS:  # a field missing on either side means what its absence always meant (OLD_DEFAULTS)
    before, now = old.get(key, OLD_DEFAULTS.get(key)), job.get(key, OLD_DEFAULTS.get(key))
    if before != now:
      _changed(names, outdir, key, before, now)
  for p, (a, b) in enumerate(zip(old.get("prompts", []), job["prompts"])):  # appended prompts are fine
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        _changed(names, outdir, f"prompts[{p}].{key}", a.get(key), b.get(key))
  if len(old.get("prompts", [])) > len(job["prompts"]):
    _changed(names, outdir, "number of prompts", len(old["prompts"]), len(job["prompts"]))


def _changed(names, outdir, field, old, new):
  raise JobError(f"{outdir} holds a job with {field}={old!r}, this one has {new!r}: use another "
                 f"{name_of(names, 'outdir')}, or {name_of(names, 'overwrite')} to render the changed images")


def make_grid(outdir: str, specs: Sequence[Spec]) -> np.ndarray | None:
  """One row per prompt (black where a prompt has fewer images), when all images share one size."""
  if len({(s.height, s.width) for s in specs}) != 1:
    return None
  n = max(s.num_images for s in specs)
  tiles = np.zeros((len(specs) * n, specs[0].height, specs[0].width, 3), np.uint8)
  for it in items(specs, 0):
    tiles[it.p * n + it.j] = np.asarray(Image.open(os.path.join(outdir, it.name)).convert("RGB"))
  return io.make_grid(tiles, nrow=n)


# --- rendering ---------------------------------------------------------------------------------------

def load_image(path: str, height: int, width: int, mask: bool = False) -> np.ndarray:
  """[H, W, 3] in [-1, 1] (an image) or [H, W, 1] in {0, 1} (a mask, white = repaint), resized."""
  img = open_image(path, "L" if mask else "RGB")
  if img.size != (width, height):
    img = img.resize((width, height), Image.NEAREST if mask else Image.LANCZOS)
  a = np.asarray(img, np.float32) / 255.0
  return (a[..., None] >= 0.5).astype(np.float32) if mask else a * 2.0 - 1.0


def batch_inputs(model: Model, group: tuple, batch: Sequence[Item]) -> tuple:
  """Host arrays (prompt, seeds [B], image [B, H, W, 3] | None, mask [B, H, W, 1] | None) for a batch; the prompt
  carries the IP-Adapter inputs (their images embedded beforehand, `encode_ip_images`). The ControlNets' inputs:
  `control_inputs`."""
  mode, h, w, _, _, cfg, rescale, _, _ = group
  sd, specs = model.sd, [it.spec for it in batch]
  embedded = sd.embedded_guidance  # an LCM U-Net: the scale is an input at any value, no negative branch
  ids = pipelines.tokenize(model.tokenizers, sd.text_encoders, [s.prompt for s in specs])
  neg = pipelines.tokenize(model.tokenizers, sd.text_encoders, [s.negative_prompt for s in specs]) \
      if cfg and not embedded else None
  time_ids, negative_time_ids = _time_ids(sd, h, w, len(batch))
  prompt = pipelines.Prompt(
      ids, neg, np.asarray([s.guidance_scale for s in specs], np.float32) if cfg or embedded else None,
      np.asarray([s.guidance_rescale for s in specs], np.float32) if cfg and rescale else None,
      time_ids, np.asarray([not s.negative_prompt for s in specs]) if sd.sdxl and cfg else None,
      negative_time_ids if cfg else None)
  if model.ip_adapters is not None:
    hashes = encode_ip_images(model, specs)  # (only hashes the images `run` embedded up front)
    prompt = prompt._replace(ip_adapter=ip_input(model, specs, hashes))
  if model.refiner is not None and mode == "txt2img":  # (base prompt, refiner prompt): pipelines.ensemble
    prompt = (prompt, _refiner_prompt(model.refiner, specs, h, w, cfg, rescale))
  seeds = np.asarray([it.seed for it in batch], np.int32)
  image = np.stack([load_image(s.init_image, h, w) for s in specs]) if mode != "txt2img" else None
  mask = np.stack([load_image(s.mask, h, w, mask=True) for s in specs]) if mode == "inpaint" else None
  return prompt, seeds, image, mask


def _time_ids(sd: pipelines.StableDiffusion, h: int, w: int, n: int) -> tuple:
  """SDXL time ids [n, 6] for an h x w image (negative: the same, None), or a refiner's [n, 5] with diffusers'
  default aesthetic scores 6 and 2.5; (None, None) for other models."""
  if not sd.sdxl:
    return None, None
  if not sd.requires_aesthetics_score:
    return np.stack([pipelines.micro_conditioning(h, w)] * n), None
  return (np.stack([pipelines.micro_conditioning(h, w, aesthetic_score=6.0)] * n),
          np.stack([pipelines.micro_conditioning(h, w, aesthetic_score=2.5)] * n))


def _refiner_prompt(refiner: Refiner, specs: Sequence[Spec], h: int, w: int, cfg: bool, rescale: bool):
  """The refiner's Prompt for a txt2img batch: its own tokenizer and aesthetic-score time ids (the refiner does
  not zero empty negative prompts: it encodes "", as diffusers' refiner)."""
  sd = refiner.sd
  ids = pipelines.tokenize(refiner.tokenizers, sd.text_encoders, [s.prompt for s in specs])
  neg = pipelines.tokenize(refiner.tokenizers, sd.text_encoders, [s.negative_prompt for s in specs]) if cfg else None
  time_ids, negative_time_ids = _time_ids(sd, h, w, len(specs))
  return pipelines.Prompt(
      ids, neg, np.asarray([s.guidance_scale for s in specs], np.float32) if cfg else None,
      np.asarray([s.guidance_rescale for s in specs], np.float32) if cfg and rescale else None,
      time_ids, None, negative_time_ids if cfg else None)


def render_fn(sd: pipelines.StableDiffusion, group: tuple, mesh, refiner: Refiner | None = None,
              control: Control | None = None) -> Callable:
  """jit (params, prompt, seeds, image, mask, control) -> (uint8 images [B, H, W, C], has_nsfw_concept [B] bool),
  batch sharded over `mesh`. With a safety checker (sd.safety_checker) flagged images are black; without, no flag
  is set. With a `refiner`, txt2img renders `pipelines.ensemble` at the group's high_noise_frac (params["refiner"]:
  its params; prompt: the (base, refiner) Prompt pair of `batch_inputs`). With `control` (ControlNets), every mode
  gets the control inputs (`control_inputs`; params["controlnets"]: their params); IP-Adapters travel in the prompt
  (params["ip_adapter"])."""
  mode, h, w, steps, sampler, _, _, strength, high_noise_frac = group
  checked = sd.safety_checker is not None

  def fn(params, prompt, seeds, image, mask, ctl):
    keys = jax.vmap(jax.random.key)(seeds)
    kw = {"sampler": sampler, "num_steps": steps, "safety_check": checked}
    if control is not None:
      kw.update(control=ctl, controlnets=control.modules, guess_mode=control.guess_mode)
    if mode == "txt2img" and refiner is not None:
      x = pipelines.ensemble(sd, params, refiner.sd, params["refiner"], prompt[0], prompt[1], keys, height=h,
                             width=w, high_noise_frac=high_noise_frac, **kw)
    elif mode == "txt2img":
      x = pipelines.txt2img(sd, params, prompt, keys, height=h, width=w, **kw)
    elif mode == "img2img":
      x = pipelines.img2img(sd, params, prompt, keys, image, strength=strength, **kw)
    else:
      x = pipelines.inpaint(sd, params, prompt, keys, image, mask, strength=strength, **kw)
    x, flags = x if checked else (x, jnp.zeros(x.shape[:1], bool))
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8), flags  # as io.to_uint8

  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


def put(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays (every process holds the whole host array; works multi-process)."""
  def one(a, s):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
  return jax.tree.map(one, tree, shardings)


def compiled_for(model: Model, params: Any, group: tuple, args: tuple, mesh,
                 names: Mapping[str, str] | None = None) -> tuple[Any, float]:
  """The compiled render function for (group, batch size, mesh), and its compile seconds (0 if cached).
  Raises JobError when XLA's memory analysis of the program exceeds the devices' free memory."""
  key = (group, len(args[1]), mesh)
  if key in model.compiled:
    return model.compiled[key], 0.0
  t = time.perf_counter()
  with jax.set_mesh(mesh):  # traced under the mesh: Pallas attention kernels run per shard (shard_map)
    compiled = render_fn(model.sd, group, mesh, model.refiner, model.control).lower(params, *args).compile()
  per_device = memory.compiled_bytes(compiled)
  if per_device is not None:
    budget, devices = _budget(mesh)
    need = budget.need(per_device, devices)
    if budget.bytes is not None and need > budget.bytes:
      raise JobError(f"{_size_text(group, names)}: rendering {_images(len(args[1]))} at once needs "
                     f"{memory.gib(need)} (XLA's memory analysis of the compiled program), more than the "
                     f"{memory.gib(budget.bytes)} of {budget.source}; {_smaller(len(args[1]), names)}")
  model.compiled[key] = compiled
  return compiled, time.perf_counter() - t


def _budget(mesh) -> tuple[memory.Budget, int]:
  """The devices' free memory (the least of all processes') and this process's number of mesh devices."""
  devices = list(mesh.devices.flat)
  budget = memory.available(devices)
  if jax.process_count() > 1 and budget.bytes is not None:  # every process must decide alike
    mib = np.int32(min(budget.bytes >> 20, 2 ** 31 - 1))  # (collectives carry 32-bit ints unless x64 is on)
    least = int(np.min(multihost_utils.process_allgather(mib)))
    budget = dataclasses.replace(budget, bytes=least << 20)
  return budget, sum(d.process_index == jax.process_index() for d in devices)


def _size_text(group: tuple, names: Mapping[str, str] | None) -> str:
  return f"{name_of(names, 'height')} {group[1]} x {name_of(names, 'width')} {group[2]}"


def _images(n: int) -> str:
  return f"{n} image" + ("s" if n != 1 else "")


def _smaller(rows: int, names: Mapping[str, str] | None) -> str:
  return (f"use a smaller {name_of(names, 'height')}/{name_of(names, 'width')}"
          + (f" or {name_of(names, 'batch_size')}" if rows > 1 else ""))


def check_memory(model: Model, groups: Mapping[tuple, Sequence["Item"]], batch_size: int, mesh,
                 names: Mapping[str, str] | None = None) -> None:
  """Refuse, before compiling anything, a group whose images cannot fit in the devices' free memory
  (`memory.render_lower_bound`: a size far out of reach must not reach XLA's compiler)."""
  budget, local = _budget(mesh)
  if budget.bytes is None:
    return
  ndev = parallel.batch_devices(mesh)
  for group, group_items in groups.items():
    rows = min(batch_size, -(-len(group_items) // ndev) * ndev)
    per_device, stage = memory.render_lower_bound(model.sd, -(-rows // ndev), group[1], group[2], group[5])
    need = budget.need(per_device, local)
    if need > budget.bytes:
      raise JobError(f"{_size_text(group, names)}: rendering {_images(rows)} at once needs at least "
                     f"{memory.gib(need)} ({stage}), more than the {memory.gib(budget.bytes)} of {budget.source}; "
                     f"{_smaller(rows, names)}")


# --- the job -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
  outdir: str
  raw_prompts: tuple  # ((fields, where), ...)
  defaults: Defaults = Defaults()
  batch_size: int = 8
  fsdp: int = 1
  grid: bool = False
  overwrite: bool = False
  max_images: int | None = None  # stop after rendering this many (then re-run to continue)
  watermark: bool = True  # diffusers' SDXL invisible watermark on every image written (sdjax.watermark)
  c2pa: provenance.Signer | None = None  # C2PA content credentials signed into every PNG (sdjax.provenance)
  preset: str | None = None  # the sdjax.presets name the model's schedule was set up with (recorded in job.json)
  names: Mapping[str, str] | None = None  # how errors name the settings (sample.py: its flags; sdjax.prompts)


def run(job: Job, model: Model, *, devices: Sequence[jax.Device] | None = None, progress: bool = True,
        echo: Callable[[str], None] = print) -> dict:
  """Render `job`'s missing images into job.outdir; returns (and writes) the summary."""
  t_start = time.perf_counter()
  specs = resolve(job.raw_prompts, job.defaults, model, names=job.names)
  check_refiner(model, specs)
  hashes = image_hashes(specs)
  check_settings({"batch_size": job.batch_size}, job.names)
  check_outdir(job.outdir, job.names)
  work = items(specs, job.defaults.seed)
  lead = jax.process_index() == 0
  texts = sorted({t for s in specs for t in (s.prompt, s.negative_prompt)})
  cut = {t for t, c in zip(texts, truncated_texts(model, texts)) if c}
  cut_specs = [s for s in specs if s.prompt in cut or s.negative_prompt in cut]
  if cut_specs and lead:
    print(f"warning: {len(cut_specs)} of {len(specs)} prompts (or their negative prompts) are longer than the "
          f"text encoder takes and were truncated to {min(token_limits(model))} tokens", file=sys.stderr)
  devices = list(jax.devices() if devices is None else devices)
  mesh = parallel.make_mesh({"data": -1, "fsdp": job.fsdp}, devices)
  ndev = parallel.batch_devices(mesh)
  batch_size = -(-max(1, job.batch_size) // ndev) * ndev
  if batch_size != job.batch_size:
    echo(f"note: batch_size {job.batch_size} -> {batch_size} (a multiple of the {ndev} devices)")
  info = {"sdjax_version": sdjax_version(), "model": model.model_id, "model_hash": model.hash,
          "seed": job.defaults.seed, "watermark": job.watermark, "c2pa": job.c2pa is not None,
          "safety_checker": model.sd.safety_checker is not None, "preset": job.preset,
          "refiner": model.refiner.info() if model.refiner is not None else None,
          "controlnet": model.control.info() if model.control is not None else None,
          "ip_adapter": model.ip_adapters.info() if model.ip_adapters is not None else None,
          "prompts": [_prompt_info(s, hashes) for s in specs],
          "execution": {"batch_size": batch_size, "devices": len(devices), "fsdp": job.fsdp}}
  records = {it.name: record(it, model, it.spec.prompt in cut or it.spec.negative_prompt in cut, job.watermark,
                            hashes) for it in work}
  check_memory(model, _groups(work), batch_size, mesh, job.names)
  done = _prepare_outdir(job, info, work, records, lead)
  todo = [it for it, d in zip(work, done) if not d]
  skipped = len(work) - len(todo)
  todo = todo if job.max_images is None else todo[:max(0, job.max_images)]
  groups = _groups(todo)
  all_params = dict(model.params)
  if model.refiner is not None:
    all_params["refiner"] = model.refiner.params
  if model.control is not None:
    all_params["controlnets"] = model.control.params
  if model.ip_adapters is not None:
    all_params["ip_adapter"] = model.ip_adapters.params
    encode_ip_images(model, [it.spec for it in todo])
  params = put(all_params, pipelines.param_shardings(all_params, mesh)) if todo else None

  stats = {"compile_s": 0.0, "render_s": 0.0, "rendered": 0, "nsfw": 0}
  with preemption.OnSigterm(raise_=Interrupted), tqdm(
      total=len(todo), unit="img", desc="sample", disable=not (lead and progress), dynamic_ncols=True) as bar:
    for group, group_items in groups.items():
      size = min(batch_size, -(-len(group_items) // ndev) * ndev)  # a small group: a smaller batch
      for start in range(0, len(group_items), size):
        _render_batch(model, params, group, group_items[start:start + size], size, mesh, job.outdir, records,
                      stats, lead, bar, job.names, job.watermark, job.c2pa)

  summary = {"outdir": job.outdir, "images": len(work), "rendered": stats["rendered"], "skipped": skipped,
             "remaining": None, "groups": len(groups), "batch_size": batch_size, "devices": len(devices),
             "compile_s": stats["compile_s"], "render_s": stats["render_s"],
             "images_per_s": stats["rendered"] / max(stats["render_s"], 1e-9),
             "safety_checker": model.sd.safety_checker is not None, "nsfw_flagged": stats["nsfw"]}
  if lead:
    finished = [it for it in work if os.path.exists(os.path.join(job.outdir, it.name))]
    summary["remaining"] = len(work) - len(finished)
    _write_json(os.path.join(job.outdir, "index.jsonl"), [records[it.name] for it in finished], lines=True)
    if job.grid and not summary["remaining"]:
      grid = make_grid(job.outdir, specs)
      if grid is None:
        echo("note: no grid.png: the prompts' image sizes differ")
      else:
        grid, mark = watermark.mark(grid, job.watermark)  # an image the job writes, as its tiles
        provenance.save_png(os.path.join(job.outdir, "grid.png"), grid,
                            {"model": model.model_id, "model_hash": model.hash, "watermark": mark}, job.c2pa)
    summary["wall_s"] = time.perf_counter() - t_start
    _write_json(os.path.join(job.outdir, "summary.json"), summary)
  return summary


def check_refiner(model: Model, specs: Sequence[Spec]) -> None:
  """Refuse, before anything is rendered, prompts an SDXL refiner cannot render: txt2img with a refiner as the model
  (it needs an init_image), or a refiner job's txt2img prompt whose sampler cannot split the schedule or whose
  steps leave no step to the base or the refiner at its high_noise_frac."""
  from sdjax import samplers
  for p, s in enumerate(specs):
    where = f"prompt {p} ({s.prompt[:40]!r})"
    if model.sd.requires_aesthetics_score and s.mode == "txt2img":
      raise JobError(f"{where}: {model.model_id} is an SDXL refiner: its prompts need an init_image (img2img); "
                     "to refine txt2img images give it as the refiner of an SDXL base model")
    if model.refiner is None or s.mode != "txt2img":
      continue
    frac = s.high_noise_frac
    try:
      samplers.step_tables(model.sd.schedule, s.sampler, s.steps, denoising_end=frac)
      samplers.step_tables(model.refiner.sd.schedule, s.sampler, s.steps, denoising_start=frac)
    except ValueError as e:
      raise JobError(f"{where}: with a refiner at high_noise_frac {frac}: {e}") from None


def _prepare_outdir(job: Job, info: dict, work: list[Item], records: dict, lead: bool) -> np.ndarray:
  """Check and write job.json, clean up a killed run, rebuild index.jsonl; returns which images exist."""
  os.makedirs(job.outdir, exist_ok=True)
  if not job.overwrite:
    check_job(job.outdir, info, job.names)
  if lead:
    for name in os.listdir(job.outdir):  # leftovers of a killed run's atomic writes
      if name.endswith(".tmp"):
        os.remove(os.path.join(job.outdir, name))
    for name, rec in records.items() if job.overwrite else ():  # a changed job: drop images now stale
      path = os.path.join(job.outdir, name)
      if os.path.exists(path) and _settings(dict(Image.open(path).text)) != _png_text(rec):
        os.remove(path)
    _write_json(os.path.join(job.outdir, "job.json"), info)
  done = np.asarray([os.path.exists(os.path.join(job.outdir, it.name)) for it in work])
  if jax.process_count() > 1:  # process 0's view of the (possibly unshared) output folder
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  if lead:  # one line per finished image (a killed run may have left a PNG without its line, or half a line)
    _write_json(os.path.join(job.outdir, "index.jsonl"), [records[it.name] for it, d in zip(work, done) if d],
                lines=True)
  return done


def _prompt_info(spec: Spec, hashes: Mapping[str, str]) -> dict:
  """A prompt as job.json records it: its Spec (JSON types; the ControlNet, IP-Adapter and refiner fields only when
  set, so a job without them reads as before they existed) with the hashes of its control / IP-Adapter images."""
  d = json.loads(json.dumps(dataclasses.asdict(spec)))
  for key in ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
              "ip_adapter_image", "ip_adapter_scale", "high_noise_frac"):
    if d.get(key) is None:
      d.pop(key, None)
  for key in ("control_image", "ip_adapter_image"):
    if d.get(key):
      d[f"{key}_hash"] = [hashes[p] for p in d[key]]
  return d


def _png_text(rec: dict) -> dict:
  return {k: str(v) for k, v in rec.items() if k != "file"}


def _settings(text: dict) -> dict:
  """A PNG's text chunks without the per-image outcomes (what a re-run compares with `_png_text`)."""
  return {k: v for k, v in text.items() if k not in OUTCOMES}


def _groups(work: Sequence[Item]) -> dict[tuple, list[Item]]:
  """Items by `Spec.group` (the settings one compiled program renders), in order."""
  groups: dict[tuple, list[Item]] = {}
  for it in work:
    groups.setdefault(it.spec.group, []).append(it)
  return groups


def _render_batch(model, params, group, batch, size, mesh, outdir, records, stats, lead, bar, names=None,
                  watermarked=True, c2pa=None):
  """Render one batch (padded to `size` by repeating its last row); process 0 watermarks the images (when
  `watermarked`, see `record`) and writes PNGs and index lines."""
  rows = list(batch) + [batch[-1]] * (size - len(batch))
  host = (*batch_inputs(model, group, rows), control_inputs(model, group, rows))
  sharding = parallel.batch_sharding(mesh)
  args = put(host, jax.tree.map(lambda _: sharding, host))
  fn, compile_s = compiled_for(model, params, group, args, mesh, names)
  if compile_s:
    bar.unpause()  # the bar's images/s counts rendering, not compiling
  t = time.perf_counter()
  try:
    images, nsfw = (a[:len(batch)] for a in multihost_utils.process_allgather(fn(params, *args), tiled=True))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      if jax.process_count() > 1:
        raise LostPeer(f"process {jax.process_index()} of {jax.process_count()}: rendering with the other processes "
                       f"failed, so one of them has probably died ({str(e).splitlines()[0][:200]})") from None
      raise
    raise JobError(f"{_size_text(group, names)}: the devices ran out of memory rendering {_images(size)} at once "
                   f"({str(e).splitlines()[0][:200]}); {_smaller(size, names)}") from None
  stats["render_s"] += time.perf_counter() - t
  stats["compile_s"] += compile_s
  stats["rendered"] += len(batch)
  if lead:
    images, _ = watermark.mark(np.asarray(images), watermarked)  # on the host: the jitted program stays pure
    if model.sd.safety_checker is not None:  # the checker's verdict, as diffusers names it (flagged: black)
      for it, flag in zip(batch, np.asarray(nsfw)):
        records[it.name]["nsfw_content_detected"] = bool(flag)
      stats["nsfw"] += int(np.sum(nsfw))
    with open(os.path.join(outdir, "index.jsonl"), "a") as f:
      for it, img in zip(batch, images):
        provenance.save_png(os.path.join(outdir, it.name), img, _png_text(records[it.name]), c2pa,
                            records[it.name])  # signed (C2PA) when the job has a signer
        f.write(json.dumps(records[it.name]) + "\n")
  bar.update(len(batch))
