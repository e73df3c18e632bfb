"""ControlNets and IP-Adapters in text-to-image jobs (sdjax.jobs): loading them onto a job's Model with errors that
name the flag, the per-image inputs of a batch (control images as diffusers' ControlNet pipelines prepare them,
IP-Adapter image embeddings from the CLIP vision encoder, embedded once per image), and what each image records of
them (file hashes of its control / image-prompt files, scales, guidance window, the models' hashes).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from sdjax.prompts import JobError, Spec, name_of

if TYPE_CHECKING:
  from sdjax.jobs import Item, Model


@dataclasses.dataclass(eq=False)
class Control:
  """A job's ControlNets (`load_controlnets`; several: diffusers' MultiControlNet, residuals summed): every image
  gets one control image per ControlNet (Spec.control_image). `scales`: the default conditioning scale of each;
  guess_mode: diffusers' guess_mode for the whole job."""
  modules: tuple
  params: tuple
  paths: tuple[str, ...]
  scales: tuple[float, ...]
  guess_mode: bool = False

  @functools.cached_property
  def hashes(self) -> list[str]:
    from sdjax.convert import params_hash
    return [params_hash(p) for p in self.params]

  def info(self) -> dict:
    """What job.json records of them (per-image settings are in each record)."""
    return {"controlnets": list(self.paths), "controlnet_hashes": self.hashes, "guess_mode": self.guess_mode}


@dataclasses.dataclass(eq=False)
class IPAdapters:
  """A job's IP-Adapters (`load_ip_adapters`) with the CLIP vision image encoder that embeds their image prompts
  (Spec.ip_adapter_image; `embeds`: (file_hash of the image, hidden states?) -> (embeddings, negative embeddings),
  each [1, ...], filled by `encode_ip_images`). `scales`: the default scale of each."""
  params: tuple
  paths: tuple[str, ...]
  scales: tuple[float, ...]
  encoder: Any
  encoder_params: Any
  encoder_path: str
  embeds: dict = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def hashes(self) -> list[str]:
    from sdjax.convert import params_hash
    return [params_hash(p) for p in self.params]

  @functools.cached_property
  def encoder_hash(self) -> str:
    from sdjax.convert import params_hash
    return params_hash(self.encoder_params)

  def info(self) -> dict:
    """What job.json records of them."""
    return {"ip_adapters": list(self.paths), "ip_adapter_hashes": self.hashes, "image_encoder": self.encoder_path,
            "image_encoder_hash": self.encoder_hash}


# --- loading ---------------------------------------------------------------------------------------------

def load_controlnets(base: Model, nets: Sequence[tuple[str, float]], *, config: str | None = None,
                     guess_mode: bool = False, names: Mapping[str, str] | None = None,
                     echo: Callable[[str], None] = print) -> Model:
  """`base` with ControlNets attached: (path, default conditioning scale) pairs, each a diffusers ControlNetModel
  folder or an original single file (`sdjax.convert.load_controlnet`; `config`: its diffusers config folder or
  config.json, when the default by text width does not apply). Each must fit the model (`sdjax.control.check`),
  else JobError naming the flag."""
  from sdjax import control as control_lib
  from sdjax.convert import load_controlnet
  flag = name_of(names, "controlnet")
  if not nets:
    raise JobError(f"{flag}: no ControlNet given")
  if base.refiner is not None:
    raise JobError(f"{flag} does not combine with {name_of(names, 'refiner')} (the refiner has no ControlNet)")
  if base.sd.inpainting:
    raise JobError(f"{flag}: {base.model_id} has an inpainting U-Net (9 input channels): ControlNets take the "
                   "4-channel latents of an ordinary U-Net (inpaint with it and a mask instead)")
  if config is not None and os.path.isfile(config) and os.path.basename(config) == "config.json":
    config = os.path.dirname(config) or "."
  modules, params = [], []
  for path, _ in nets:
    if not os.path.exists(path):
      raise JobError(f"{flag}: {path} does not exist")
    if not (os.path.isfile(path) or os.path.isdir(path)):
      raise JobError(f"{flag}: {path} is not a regular file or folder")
    try:
      module, p = load_controlnet(path, config=config if os.path.isfile(path) else None)
    except (ValueError, OSError, KeyError) as e:
      raise JobError(f"{flag}: {path}: {e}") from None
    c, f = base.sd.vae.config.latent_channels, base.sd.downscale
    probe = control_lib.control_input(np.zeros((1, 8 * f, 8 * f, module.config.conditioning_channels), np.float32))
    try:
      control_lib.check(base.sd, {"controlnets": (p,)}, (module,), (probe,), (8, 8, c), 1)
    except ValueError as e:
      raise JobError(f"{flag}: {path} does not fit {base.model_id}: {e}") from None
    modules.append(module)
    params.append(p)
  control = Control(tuple(modules), tuple(params), tuple(os.path.abspath(p) for p, _ in nets),
                    tuple(float(s) for _, s in nets), bool(guess_mode))
  echo("ControlNets: " + ", ".join(f"{p} x{s:g}" for p, s in nets) + (" (guess mode)" if guess_mode else ""))
  return dataclasses.replace(base, control=control, compiled={})


def load_ip_adapters(base: Model, adapters: Sequence[tuple[str, float]], image_encoder: str | None, *,
                     names: Mapping[str, str] | None = None, echo: Callable[[str], None] = print) -> Model:
  """`base` with IP-Adapters attached: (file, default scale) pairs (`sdjax.ip_adapter.load`, diffusers' format)
  and `image_encoder`, the CLIP vision folder (CLIPVisionModelWithProjection) that embeds the image prompts; an
  adapter that does not fit the U-Net or the encoder is refused (JobError naming the flag)."""
  from sdjax import ip_adapter
  from sdjax.convert.clip_vision import load_clip_vision
  flag, enc_flag = name_of(names, "ip_adapter"), name_of(names, "image_encoder")
  if not adapters:
    raise JobError(f"{flag}: no IP-Adapter given")
  if base.refiner is not None:
    raise JobError(f"{flag} does not combine with {name_of(names, 'refiner')}")
  if not image_encoder:
    raise JobError(f"{flag} needs {enc_flag} DIR (the CLIP vision model, CLIPVisionModelWithProjection, that "
                   "embeds the image prompts)")
  if not os.path.isdir(image_encoder):
    raise JobError(f"{enc_flag}: {image_encoder} is not a folder (a CLIPVisionModelWithProjection folder)"
                   if os.path.exists(image_encoder) else f"{enc_flag}: {image_encoder} does not exist")
  try:
    encoder, encoder_params = load_clip_vision(image_encoder)
  except (ValueError, OSError, KeyError) as e:
    raise JobError(f"{enc_flag}: {image_encoder}: {e}") from None
  params = []
  for path, _ in adapters:
    if not os.path.exists(path):
      raise JobError(f"{flag}: {path} does not exist")
    if not os.path.isfile(path):
      raise JobError(f"{flag}: {path} is not a regular file (an IP-Adapter .safetensors)")
    try:
      p = ip_adapter.load(path, base.sd.unet.config)
    except (ValueError, OSError, KeyError) as e:
      raise JobError(f"{flag}: {path}: {e}") from None
    width = ip_adapter._input_width(p)
    want = encoder.config.hidden_size if ip_adapter.uses_hidden_states(p) else encoder.config.projection_dim
    if width != want:
      what = "hidden_size" if ip_adapter.uses_hidden_states(p) else "projection_dim"
      raise JobError(f"{flag}: {path} takes image embeddings of width {width}, the image encoder {image_encoder} "
                     f"gives {want} (its {what}): pass the adapter's own {enc_flag}")
    params.append(p)
  ips = IPAdapters(tuple(params), tuple(os.path.abspath(p) for p, _ in adapters), tuple(float(s) for _, s in adapters),
                   encoder, encoder_params, os.path.abspath(image_encoder))
  echo("IP-Adapters: " + ", ".join(f"{p} x{s:g}" for p, s in adapters))
  return dataclasses.replace(base, ip_adapters=ips, compiled={})


# --- records -----------------------------------------------------------------------------------------------

def file_hash(path: str) -> str:
  """A short content hash (SHA-256, 16 hex digits) of a file: how records name a control or IP-Adapter image."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


def image_hashes(specs: Sequence[Spec]) -> dict[str, str]:
  """file_hash of every control and IP-Adapter image of the prompts."""
  paths = {p for s in specs for p in (s.control_image or ()) + (s.ip_adapter_image or ())}
  return {p: file_hash(p) for p in sorted(paths)}


def adapter_fields(spec: Spec, model: Model, hashes: Mapping[str, str]) -> dict:
  """A prompt's ControlNet / IP-Adapter settings with the hashes of its images and of the models (what its images
  record; empty without them)."""
  r = {}
  if model.control is not None and spec.control_image:
    r.update(control_image=list(spec.control_image), control_image_hash=[hashes[p] for p in spec.control_image],
             controlnet_conditioning_scale=list(spec.controlnet_conditioning_scale),
             control_guidance_start=spec.control_guidance_start, control_guidance_end=spec.control_guidance_end,
             guess_mode=model.control.guess_mode, controlnet=list(model.control.paths),
             controlnet_hash=model.control.hashes)
  if model.ip_adapters is not None and spec.ip_adapter_image:
    ips = model.ip_adapters
    r.update(ip_adapter_image=list(spec.ip_adapter_image),
             ip_adapter_image_hash=[hashes[p] for p in spec.ip_adapter_image],
             ip_adapter_scale=list(spec.ip_adapter_scale), ip_adapter=list(ips.paths), ip_adapter_hash=ips.hashes,
             image_encoder=ips.encoder_path, image_encoder_hash=ips.encoder_hash)
  return r


# --- batch inputs ------------------------------------------------------------------------------------------

def open_image(path: str, kind: str) -> Image.Image:
  try:
    return Image.open(path).convert(kind)
  except OSError as e:
    raise JobError(f"cannot read image {path}: {e}") from None


def load_control_image(path: str, height: int, width: int) -> np.ndarray:
  """A control image [H, W, 3] in [0, 1], as diffusers' ControlNet pipelines prepare it (VaeImageProcessor with
  do_convert_rgb, do_normalize=False: RGB, Lanczos resize to the output size, / 255)."""
  img = open_image(path, "RGB")
  if img.size != (width, height):
    img = img.resize((width, height), Image.LANCZOS)
  return np.asarray(img, np.float32) / 255.0


@functools.partial(jax.jit, static_argnums=0, static_argnames="output_hidden_states")
def _encode_images(encoder, encoder_params, images, output_hidden_states=False):
  from sdjax import ip_adapter
  return ip_adapter.encode_image(encoder, encoder_params, images, output_hidden_states=output_hidden_states)


def encode_ip_images(model: Model, specs: Sequence[Spec]) -> dict[str, str]:
  """Embed the prompts' IP-Adapter images not embedded yet into `model.ip_adapters.embeds`, with the image encoder
  (`sdjax.ip_adapter.encode_image`: one jitted, batched call per image size and kind of adapter input); returns
  their file hashes by path."""
  ips = model.ip_adapters
  if ips is None:
    return {}
  from sdjax import ip_adapter
  todo: dict[tuple, list[tuple[str, np.ndarray]]] = {}
  seen, hashes = set(ips.embeds), {}
  for s in specs:
    for path, adapter in zip(s.ip_adapter_image or (), ips.params):
      key = (hashes.setdefault(path, file_hash(path)), ip_adapter.uses_hidden_states(adapter))
      if key in seen:
        continue
      seen.add(key)
      img = np.asarray(open_image(path, "RGB"), np.uint8)
      todo.setdefault((img.shape, key[1]), []).append((key[0], img))
  for (_, hidden), pairs in todo.items():
    embeds, negative = _encode_images(ips.encoder, ips.encoder_params, np.stack([img for _, img in pairs]),
                                      output_hidden_states=hidden)
    for i, (digest, _) in enumerate(pairs):
      ips.embeds[(digest, hidden)] = (np.asarray(embeds[i:i + 1]), np.asarray(negative[i:i + 1]))
  return hashes


def ip_input(model: Model, specs: Sequence[Spec], hashes: Mapping[str, str]):
  """The batch's IPAdapterInput: per adapter the image embeddings [B, ...], their negatives, the scales [B]."""
  from sdjax import ip_adapter
  ips = model.ip_adapters
  embeds, negative, scales = [], [], []
  for k, adapter in enumerate(ips.params):
    hidden = ip_adapter.uses_hidden_states(adapter)
    pairs = [ips.embeds[(hashes[s.ip_adapter_image[k]], hidden)] for s in specs]
    embeds.append(np.concatenate([e for e, _ in pairs]))
    negative.append(np.concatenate([n for _, n in pairs]))
    scales.append(np.asarray([s.ip_adapter_scale[k] for s in specs], np.float32))
  return ip_adapter.IPAdapterInput(tuple(embeds), tuple(negative), tuple(scales))


def control_inputs(model: Model, group: tuple, batch: Sequence[Item]) -> tuple | None:
  """One sdjax.control.ControlInput per ControlNet for a batch (control images [B, H, W, 3] at the group's size,
  scales, guidance windows), or None for a model without ControlNets."""
  from sdjax import control as control_lib
  if model.control is None:
    return None
  h, w, specs = group[1], group[2], [it.spec for it in batch]
  out = []
  for k in range(len(model.control.modules)):
    images = np.stack([load_control_image(s.control_image[k], h, w) for s in specs])
    out.append(control_lib.control_input(
        images, np.asarray([s.controlnet_conditioning_scale[k] for s in specs], np.float32),
        np.asarray([s.control_guidance_start for s in specs], np.float32),
        np.asarray([s.control_guidance_end for s in specs], np.float32)))
  return tuple(out)
