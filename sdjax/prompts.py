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
          "mask": str, "strength": float}


# Ranges of the numeric settings, shared by prompts-file fields, job defaults and sample.py's flags:
# (low, high, low inclusive); None: unbounded. Floats must also be finite.
RANGES = {"seed": (0, SEED_MAX, True), "steps": (1, 10_000, True), "num_images": (1, 1000, True),
          "guidance_scale": (0, None, True), "guidance_rescale": (0, 1, True), "strength": (0, 1, False),
          "height": (1, None, True), "width": (1, None, True), "batch_size": (1, None, True), "num": (1, None, True)}


class JobError(ValueError):
  """A job that cannot run as given (bad prompt line, setting, model or output folder)."""


def check_value(name: str, value) -> str | None:
  """Why `value` is no valid `name` (a FIELDS or RANGES setting), or None when it is (None: not given)."""
  if value is None:
    return None
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

  @property
  def mode(self) -> str:
    return "inpaint" if self.mask else "img2img" if self.init_image else "txt2img"

  @property
  def group(self) -> tuple:
    """The static arguments of its jitted function (classifier-free guidance only for a scale > 1)."""
    return (self.mode, self.height, self.width, self.steps, self.sampler, self.guidance_scale > 1.0,
            self.guidance_rescale > 0.0, self.strength)


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
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or isinstance(value, bool) or (kind is float and not np.isfinite(value)):
      raise JobError(f"{where}: field {key!r} must be {'a number' if kind is float else kind.__name__}, got {value!r}")
  if not obj.get("prompt"):
    raise JobError(f"{where}: field 'prompt' is required (a non-empty string)")
  for key in ("init_image", "mask"):  # relative to the prompts file
    if key in obj and not os.path.isabs(obj[key]):
      obj[key] = os.path.join(base, obj[key])
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
  for name, path in (("init_image", init), ("mask", mask)):
    if not path:
      continue
    if not os.path.isfile(path):
      fail(name, f"image file {path} does not exist")
    try:
      Image.open(path).verify()
    except Exception as e:  # PIL raises many kinds for a file that is not an image
      fail(name, f"cannot read image {path}: {e}")
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
  return Spec(raw["prompt"], get("negative_prompt") or "", seed, float(get("guidance_scale")),
              float(get("guidance_rescale")), int(get("steps")), size["height"], size["width"],
              int(get("num_images")), sampler, init, mask, strength)
