"""Per-example preprocessing: decode, resize, crop, flip, scale to [-1, 1], captions, SDXL micro-conditioning.

The image path follows diffusers' training scripts (train_text_to_image*.py) on PIL images: resize the
shorter side to `resolution` (bilinear, PIL's antialiasing resize, as torchvision's `Resize` on a PIL image),
flip, then a center crop (top = round((h - res) / 2)) or a uniformly random one; pixels / 127.5 - 1.
SDXL's micro-conditioning records what happened: `time_ids = (original_h, original_w, crop_top, crop_left,
target_h, target_w)`, the crop corner in the resized image, as `StableDiffusionXLPipeline._get_add_time_ids`.

Randomness (crop corner, flip, caption dropout) comes from the numpy Generator that the pipeline derives from
(seed, epoch, example index), so an example is transformed the same way whichever host or batch reads it.
"""
from __future__ import annotations

import dataclasses
import io
import threading
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

CROPS = ("center", "random")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  resolution: int = 0            # 0: keep the source size (every image must then have the same size)
  channels: int = 3              # 1: grayscale, 3: RGB
  crop: str = "center"           # center | random
  random_flip: bool = False
  micro_conditioning: bool = False  # emit SDXL time_ids

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels}")
    if self.resolution < 0:
      raise ValueError(f"resolution must be >= 0 (0: keep the source size), got {self.resolution}")


def decode_image(data: bytes | np.ndarray | Image.Image, where: str = "image") -> Image.Image:
  """Encoded bytes (PNG, JPEG, WebP, ...), a uint8 HWC array or a PIL image -> a fully loaded PIL image.

  A truncated or unreadable file raises ValueError naming `where` (the file's path when known)."""
  if isinstance(data, Image.Image):
    return data
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f"{where}: expected a uint8 [H, W(, C)] image array, got {data.dtype} {data.shape}")
    return Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated file fails here, not later
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{where}: unreadable or truncated image ({e})") from e
  return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
  if channels == 1:
    return img if img.mode == "L" else img.convert("L")
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    # Composite transparency over white (what a viewer shows), not over black garbage.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) with the shorter side `size`, the longer one scaled and truncated (torchvision's rule)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def crop_corner(height: int, width: int, size: int, mode: str, rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) of a size x size crop: centered as torchvision's CenterCrop, or uniformly random."""
  if mode == "center":
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def process_image(data: Any, opts: ImageOptions, rng: np.random.Generator, where: str = "image",
                  original_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """-> {"image": float32 [res, res, C] in [-1, 1]} (+ "time_ids" float32 [6] with micro-conditioning).

  `original_size` (h, w): the size before any downscaling at `prepare` time (default: the decoded size)."""
  img = to_mode(decode_image(data, where), opts.channels)
  orig_w, orig_h = img.size
  res = opts.resolution
  if res:
    h, w = resized_size(orig_h, orig_w, res)
    if (h, w) != (orig_h, orig_w):
      img = img.resize((w, h), Image.BILINEAR)
  else:
    h, w = orig_h, orig_w
  if opts.random_flip and rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  top = left = 0
  if res:
    top, left = crop_corner(h, w, res, opts.crop, rng)
    if (h, w) != (res, res):
      img = img.crop((left, top, left + res, top + res))
  x = np.asarray(img, np.float32)
  if x.ndim == 2:
    x = x[..., None]
  out = {"image": x / 127.5 - 1.0}
  if opts.micro_conditioning:
    th, tw = x.shape[:2]
    oh, ow = original_size or (orig_h, orig_w)
    out["time_ids"] = np.array([oh, ow, top, left, th, tw], np.float32)
  return out


class CaptionTokenizer:
  """Tokenize one caption with one or two tokenizers (SDXL), thread-safely; caption dropout first.

  transformers' fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
  and grain's reader threads do call this concurrently, hence the lock (tokenizing is ~50 us).
  """

  def __init__(self, tokenizers: Sequence[Any], max_length: int = 77, dropout: float = 0.0):
    if not 0.0 <= dropout <= 1.0:
      raise ValueError(f"caption dropout must be a probability in [0, 1], got {dropout}")
    self.tokenizers = list(tokenizers)
    self.max_length = max_length
    self.dropout = dropout
    self._lock = threading.Lock()

  def __call__(self, caption: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from sdjax.models.clip import tokenize

    if self.dropout and rng.random() < self.dropout:
      caption = ""  # the unconditional prompt, for classifier-free guidance
    out = {}
    with self._lock:
      for i, tok in enumerate(self.tokenizers):
        out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenize(tok, caption, self.max_length)[0]
    return out


def caption_of(example: Mapping[str, Any], key: str, where: str) -> str:
  value = example.get(key)
  if value is None:
    raise ValueError(f"{where}: no caption field {key!r}; the example has {sorted(example)}")
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
    value = value.item()
    value = value.decode("utf-8") if isinstance(value, bytes) else value
  return str(value)


@dataclasses.dataclass
class ExampleTransform:
  """A raw example (sdjax.data.sources vocabulary) -> the arrays of one training example.

  Images: "image" float32 [H, W, C] in [-1, 1] (+ "time_ids"). Latent records (cache_latents): "latents",
  the diffusion model's input `(z - shift) * scale` with z drawn from the cached mean/logvar (or the cached
  sample). Captions: "input_ids" (+ "input_ids_2") via `tokenizer`, or cached "prompt_embeds" (+
  "pooled_prompt_embeds") replaced by the cached empty prompt's on caption dropout. Labels: "label" int32.
  """
  image: ImageOptions | None = None
  tokenizer: CaptionTokenizer | None = None
  label: bool = False
  latent_shift: Any = 0.0
  latent_scale: Any = 1.0
  caption_dropout: float = 0.0          # for cached prompt embeddings (the tokenizer has its own)
  empty_prompt: Mapping[str, np.ndarray] | None = None

  def __call__(self, ex: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    where = str(ex.get("path") or "example")
    out: dict[str, np.ndarray] = {}
    if "mean" in ex or "latent" in ex:
      if "latent" in ex:
        z = np.asarray(ex["latent"], np.float32)
      else:
        mean, logvar = np.asarray(ex["mean"], np.float32), np.asarray(ex["logvar"], np.float32)
        z = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, np.float32)
      out["latents"] = (z - np.asarray(self.latent_shift, np.float32)) * np.asarray(self.latent_scale, np.float32)
      if "time_ids" in ex:
        out["time_ids"] = np.asarray(ex["time_ids"], np.float32)
    elif self.image is not None:
      orig = (ex["orig_height"], ex["orig_width"]) if "orig_height" in ex else None
      image = ex.get("image")
      if image is None:
        raise ValueError(f"{where}: no image")
      out.update(process_image(image, self.image, rng, where, original_size=orig))
    if "prompt_embeds" in ex and self.tokenizer is None:
      drop = self.caption_dropout and rng.random() < self.caption_dropout
      for k in ("prompt_embeds", "pooled_prompt_embeds"):
        if k in ex:
          out[k] = np.asarray(self.empty_prompt[k] if drop else ex[k], np.float32)
    elif self.tokenizer is not None:
      out.update(self.tokenizer(caption_of(ex, "caption", where), rng))
    if self.label:
      if "label" not in ex:
        raise ValueError(f"{where}: the model is class-conditional but the example has no label")
      out["label"] = np.int32(ex["label"])
    return out
