"""The prompts of a text-to-image job (sdjax.jobs): read from a .txt or .jsonl file and resolved against
the job-wide defaults and the model into validated `Spec`s.

Errors name where a bad value came from: a file's line (`prompts.jsonl:3: field 'steps': ...`), or for a
job-wide setting the name its caller's user knows it by (`names`; sample.py passes its flags' names), by
default the setting's own (`guidance_scale: ...`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from PIL import Image

from sdjax import io, samplers

if TYPE_CHECKING:
  from sdjax.jobs import Model

SEED_MAX = 2**31 - 1
FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "guidance_scale": float, "guidance_rescale": float,
          "steps": int, "height": int, "width": int, "num_images": int, "sampler": str, "init_image": str,
          "mask": str, "strength": float, "control_image": str, "controlnet_conditioning_scale": float,
          "control_guidance_start": float, "control_guidance_end": float, "ip_adapter_image": str,
          "ip_adapter_scale": float, "high_noise_frac": float}
# Fields that also take a list (one value per ControlNet / IP-Adapter of the job); a single value applies to all
# (control_image: only with one ControlNet).
LIST_FIELDS = ("control_image", "controlnet_conditioning_scale", "ip_adapter_image", "ip_adapter_scale")
# Image paths: relative ones in a prompts file are relative to it.
PATH_FIELDS = ("init_image", "mask", "control_image", "ip_adapter_image")


# Ranges of the numeric settings, shared by prompts-file fields, job defaults and sample.py's flags:
# (low, high, low inclusive); None: unbounded. Floats must also be finite.
RANGES = {"seed": (0, SEED_MAX, True), "steps": (1, 10_000, True), "num_images": (1, 1000, True),
          "guidance_scale": (0, None, True), "guidance_rescale": (0, 1, True), "strength": (0, 1, False),
          "height": (1, None, True), "width": (1, None, True), "batch_size": (1, None, True), "num": (1, None, True),
          "controlnet_conditioning_scale": (0, None, True), "control_guidance_start": (0, 1, True),
          "control_guidance_end": (0, 1, True), "ip_adapter_scale": (0, None, True), "high_noise_frac": (0, 1, False)}


class JobError(ValueError):
  """A job that cannot run as given (bad prompt line, setting, model or output folder)."""


def check_value(name: str, value) -> str | None:
  """Why `value` is no valid `name` (a FIELDS or RANGES setting), or None when it is (None: not given)."""
  if value is None:
    return None
  if name in LIST_FIELDS and isinstance(value, (list, tuple)):
    if not value:
      return "must not be an empty list"
    return next((f"[{i}] {m}" for i, m in ((i, check_value(name, v)) for i, v in enumerate(value)) if m), None)
  kind = FIELDS.get(name, int if name in RANGES else None)
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
      return f"must be a finite number, got {value!r}"
  elif kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
    return f"must be {kind.__name__}, got {value!r}"
  if name in RANGES:
    lo, hi, closed = RANGES[name]
    if (value < lo if closed else value <= lo) or (hi is not None and value > hi):
      what = (f"[{lo}, {hi}]" if closed else f"({lo}, {hi}]") if hi is not None else f"{'>=' if closed else '>'} {lo}"
      return f"must be {'in ' if hi is not None else ''}{what}, got {value!r}"
  return None


def check_settings(settings: Mapping[str, object], names: Mapping[str, str] | None = None) -> None:
  """Validate job-wide settings (sample.py's flags: the same checks as a prompts file's fields)."""
  for name, value in settings.items():
    msg = check_value(name, value)
    if msg:
      raise JobError(f"{name_of(names, name)}: {msg}")


def check_outdir(outdir: str, names: Mapping[str, str] | None = None) -> None:
  """Refuse an output folder that is a file or cannot be created or written, before anything is rendered."""
  problem = io.unwritable_dir(outdir)
  if problem:
    raise JobError(f"{name_of(names, 'outdir')}: {problem}")


def check_steps(sampler: str, steps: int, schedule) -> str | None:
  """Why `sampler` cannot run `steps` steps on `schedule` (e.g. pndm needs >= 2), or None."""
  try:
    samplers.check_schedule(schedule, sampler)
    samplers.get(sampler).tables(schedule, steps)
  except ValueError as e:
    return str(e)
  return None


def name_of(names: Mapping[str, str] | None, setting: str) -> str:
  """How the user knows `setting` (sample.py: its flag); by default its own name."""
  return (names or {}).get(setting, setting)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Job-wide settings; a JSONL line's own fields override them (None: the model's default)."""
  negative_prompt: str = ""
  num_images: int = 1
  seed: int = 0
  steps: int = 25
  guidance_scale: float = 7.5
  guidance_rescale: float = 0.0
  sampler: str | None = None
  height: int | None = None
  width: int | None = None
  init_image: str | None = None
  mask: str | None = None
  strength: float | None = None  # None: 0.8 for img2img (diffusers' default), 1.0 for inpainting
  # ControlNet (a job with ControlNets, sdjax.jobs.load_controlnets): control images, one per ControlNet; scales
  # (None: the ControlNets' own, `Model.control.scales`); the guidance window as fractions of the steps run.
  control_image: str | tuple[str, ...] | None = None
  controlnet_conditioning_scale: float | tuple[float, ...] | None = None
  control_guidance_start: float = 0.0
  control_guidance_end: float = 1.0
  # IP-Adapter (sdjax.jobs.load_ip_adapters): the image prompt (one path for all adapters, or one per adapter);
  # scales (None: the adapters' own).
  ip_adapter_image: str | tuple[str, ...] | None = None
  ip_adapter_scale: float | tuple[float, ...] | None = None
  high_noise_frac: float | None = None  # with an SDXL refiner; None: the refiner's (Model.refiner.high_noise_frac)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One resolved prompt line."""
  prompt: str
  negative_prompt: str
  seed: int | None
  guidance_scale: float
  guidance_rescale: float
  steps: int
  height: int
  width: int
  num_images: int
  sampler: str
  init_image: str | None
  mask: str | None
  strength: float
  # Set only when the job has ControlNets / IP-Adapters / a refiner (txt2img), else None (job.json stays as before).
  control_image: tuple[str, ...] | None = None
  controlnet_conditioning_scale: tuple[float, ...] | None = None
  control_guidance_start: float | None = None
  control_guidance_end: float | None = None
  ip_adapter_image: tuple[str, ...] | None = None
  ip_adapter_scale: tuple[float, ...] | None = None
  high_noise_frac: float | None = None

  @property
  def mode(self) -> str:
    return "inpaint" if self.mask else "img2img" if self.init_image else "txt2img"

  @property
  def group(self) -> tuple:
    """The static arguments of its jitted function (classifier-free guidance only for a scale > 1; a refiner's
    high_noise_frac)."""
    return (self.mode, self.height, self.width, self.steps, self.sampler, self.guidance_scale > 1.0,
            self.guidance_rescale > 0.0, self.strength, self.high_noise_frac)


def read_prompts(path: str, *, names: Mapping[str, str] | None = None) -> list[tuple[dict, str]]:
  """[(fields, "file:line")] from a .txt (one prompt a line, # comments) or .jsonl file."""
  origin = name_of(names, "prompts")
  if not os.path.isfile(path):
    raise JobError(f"{origin}: {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".jsonl"):
    raise JobError(f"{origin}: {path} must be a .txt (one prompt a line) or .jsonl file")
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      where, line = f"{path}:{n}", line.strip()
      if not line or (ext == ".txt" and line.startswith("#")):
        continue
      out.append(({"prompt": line}, where) if ext == ".txt" else (_parse_line(line, where, base), where))
  if not out:
    raise JobError(f"{origin}: {path} holds no prompts")
  return out


def _parse_line(line: str, where: str, base: str) -> dict:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise JobError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(obj, dict):
    raise JobError(f"{where}: expected a JSON object with a 'prompt', got {type(obj).__name__}")
  for key, value in obj.items():
    kind = FIELDS.get(key)
    if kind is None:
      raise JobError(f"{where}: unknown field {key!r}; expected one of {sorted(FIELDS)}")
    values = value if key in LIST_FIELDS and isinstance(value, list) and value else [value]
    for v in values:
      ok = isinstance(v, (int, float)) if kind is float else isinstance(v, kind)
      if not ok or isinstance(v, bool) or (kind is float and not np.isfinite(v)):
        what = "a number" if kind is float else kind.__name__
        if key in LIST_FIELDS:
          what += f" or a non-empty list of {'numbers' if kind is float else kind.__name__ + 's'}"
        raise JobError(f"{where}: field {key!r} must be {what}, got {value!r}")
  if not obj.get("prompt"):
    raise JobError(f"{where}: field 'prompt' is required (a non-empty string)")
  for key in PATH_FIELDS:  # relative to the prompts file
    if key in obj:
      rel = lambda p: p if os.path.isabs(p) else os.path.join(base, p)
      obj[key] = [rel(p) for p in obj[key]] if isinstance(obj[key], list) else rel(obj[key])
  return obj


def resolve(raw: Sequence[tuple[dict, str]], defaults: Defaults, model: Model, *,
            names: Mapping[str, str] | None = None) -> list[Spec]:
  """Validated `Spec`s: every field from the line or the job defaults; errors name the line or setting."""
  check_settings({k: v for k, v in dataclasses.asdict(defaults).items() if k in FIELDS}, names)
  return [_resolve_one(fields, where, defaults, model, names) for fields, where in raw]


def _resolve_one(raw: dict, where: str, d: Defaults, model: Model, names: Mapping[str, str] | None) -> Spec:
  def fail(name, msg):
    origin = f"{where}: field {name!r}" if name in raw else name_of(names, name)
    raise JobError(f"{origin}: {msg}")

  get = lambda name: raw.get(name, getattr(d, name))
  if model.sd.inpainting and not get("mask"):
    fail("mask", "this model has an inpainting U-Net (9 input channels): every prompt needs init_image and mask")
  sampler = get("sampler") or model.default_sampler
  if sampler is None:
    fail("sampler", f"the model's scheduler has no sdjax sampler: pass {name_of(names, 'sampler')}")
  if sampler not in samplers.SAMPLERS:
    fail("sampler", f"unknown sampler {sampler!r}; available: {sorted(samplers.SAMPLERS)}")
  size = {}
  for name in ("height", "width"):
    v = get(name) or model.default_size
    f = model.sd.downscale
    if v is None:
      fail(name, f"the model's default image size is unknown: pass {name_of(names, 'height')} and "
                 f"{name_of(names, 'width')}")
    if v <= 0 or v % f:
      fail(name, f"{v} must be a positive multiple of {f} (the VAE's downscale)")
    size[name] = v
  for name in ("steps", "num_images", "guidance_scale", "guidance_rescale", "strength"):
    msg = check_value(name, get(name))
    if msg:
      fail(name, msg)
  seed = raw.get("seed")
  if seed is not None and not 0 <= seed <= SEED_MAX - get("num_images") + 1:
    fail("seed", f"must be in [0, {SEED_MAX - get('num_images') + 1}] (seed + image index is 31-bit), got {seed}")
  init, mask = get("init_image"), get("mask")
  if mask and not init:
    fail("mask", "a mask needs an init_image (the image to repaint)")
  def check_image(name, path):
    if not os.path.exists(path):
      fail(name, f"image file {path} does not exist")
    if not os.path.isfile(path):  # a FIFO, a device (a link to /dev/zero), a folder: never read it
      fail(name, f"{path} is not a regular file (an image file)")
    try:
      with Image.open(path) as img:
        img.verify()
    except Exception as e:  # PIL raises many kinds for a file that is not an image
      fail(name, f"cannot read image {path}: {e}")

  for name, path in (("init_image", init), ("mask", mask)):
    if path:
      check_image(name, path)
  strength = get("strength")
  strength = float((0.8 if init and not mask else 1.0) if strength is None else strength)
  if not 0 < strength <= 1:
    fail("strength", f"must be in (0, 1], got {strength}")
  if strength < 1 and not init:
    fail("strength", "strength < 1 needs an init_image")
  if strength < 1 and not samplers.get(sampler).img2img:
    fail("strength", f"sampler {sampler!r} does not support strength < 1")
  if int(get("steps") * strength) < 1:
    fail("strength", f"strength {strength} leaves none of the {get('steps')} steps")
  msg = check_steps(sampler, int(get("steps")), model.sd.schedule)
  if msg:
    fail("steps", msg)
  extra = _resolve_adapters(raw, get, fail, check_image, model, names, init is None)
  return Spec(raw["prompt"], get("negative_prompt") or "", seed, float(get("guidance_scale")),
              float(get("guidance_rescale")), int(get("steps")), size["height"], size["width"],
              int(get("num_images")), sampler, init, mask, strength, **extra)


def _per_net(value, n: int, what: str, fail, name: str) -> tuple | None:
  """A single value or list as a tuple of `n` (a single value repeated), or None for None."""
  if value is None:
    return None
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if len(values) == 1:
    values *= n
  if len(values) != n:
    fail(name, f"{len(values)} value(s) for the job's {n} {what}(s): give one, or one per {what}")
  return values


def _resolve_adapters(raw: dict, get, fail, check_image, model: Model, names, txt2img: bool) -> dict:
  """A line's ControlNet, IP-Adapter and refiner settings (Spec's last fields); fields the job has no use for are
  refused."""
  out = {}
  for name in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "ip_adapter_scale",
               "high_noise_frac"):
    msg = check_value(name, get(name))
    if msg:
      fail(name, msg)
  control = getattr(model, "control", None)
  if control is None:
    for name in ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
      if name in raw:
        fail(name, f"the job has no ControlNet (pass {name_of(names, 'controlnet')} PATH)")
  else:
    n = len(control.paths)
    images = get("control_image")
    if images is None:
      fail("control_image", f"the job has {n} ControlNet(s): every prompt needs a control image, one per ControlNet "
                            f"(a prompts-file field or {name_of(names, 'control_image')})")
    images = tuple(images) if isinstance(images, (list, tuple)) else (images,)
    if len(images) != n:
      fail("control_image", f"{len(images)} control image(s) for the job's {n} ControlNet(s): give one each")
    for path in images:
      check_image("control_image", path)
    scales = _per_net(get("controlnet_conditioning_scale"), n, "ControlNet", fail, "controlnet_conditioning_scale")
    start, end = float(get("control_guidance_start")), float(get("control_guidance_end"))
    if not start < end:
      fail("control_guidance_end", f"control_guidance_start {start} must be below control_guidance_end {end}")
    out.update(control_image=images, controlnet_conditioning_scale=tuple(
        float(s) for s in (control.scales if scales is None else scales)), control_guidance_start=start,
        control_guidance_end=end)
  adapters = getattr(model, "ip_adapters", None)
  if adapters is None:
    for name in ("ip_adapter_image", "ip_adapter_scale"):
      if name in raw:
        fail(name, f"the job has no IP-Adapter (pass {name_of(names, 'ip_adapter')} PATH)")
  else:
    n = len(adapters.paths)
    images = _per_net(get("ip_adapter_image"), n, "IP-Adapter", fail, "ip_adapter_image")
    if images is None:
      fail("ip_adapter_image", f"the job has {n} IP-Adapter(s): every prompt needs an ip_adapter_image (a "
                               f"prompts-file field or {name_of(names, 'ip_adapter_image')})")
    for path in images:
      check_image("ip_adapter_image", path)
    scales = _per_net(get("ip_adapter_scale"), n, "IP-Adapter", fail, "ip_adapter_scale")
    out.update(ip_adapter_image=images,
               ip_adapter_scale=tuple(float(s) for s in (adapters.scales if scales is None else scales)))
  refiner = getattr(model, "refiner", None)
  if refiner is None:
    if "high_noise_frac" in raw:
      fail("high_noise_frac", f"the job has no refiner (pass {name_of(names, 'refiner')} PATH)")
  elif txt2img:
    frac = get("high_noise_frac")
    frac = float(refiner.high_noise_frac if frac is None else frac)
    if not 0 < frac < 1:
      fail("high_noise_frac", f"must be in (0, 1), got {frac}")
    out["high_noise_frac"] = frac
  return out
