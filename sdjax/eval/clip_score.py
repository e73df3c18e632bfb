"""CLIP score as torchmetrics defines it, on sdjax's CLIP towers, with CLIPImageProcessor's preprocessing.

torchmetrics' `CLIPScore` (and `functional.clip_score`): the images go through transformers' `CLIPProcessor`,
the captions through its tokenizer; `image_embeds = get_image_features(pixel_values)` and `text_embeds =
get_text_features(input_ids)` are L2-normalised, each pair scores `100 * <image_embeds, text_embeds>`, and the
metric is `max(mean over all pairs, 0)`: the clamp applies to the mean, not to each pair (torchmetrics'
`compute`: `torch.max(self.score / self.n_samples, 0)`). MLPerf's "CLIP score >= 0.15" is the same cosine
without the factor 100.

Preprocessing (`preprocess`) is the PIL-backend `CLIPImageProcessor`'s, bit for bit and jittable: resize the
shortest side to `image_size` with Pillow's BICUBIC filter (Pillow's fixed-point separable resampler reproduced
in int32: horizontal pass, rounding to uint8, vertical pass), center crop (top = (h - size) // 2), rescale by
1/255, normalise with OpenAI's CLIP mean/std. This is what torchmetrics gets from transformers 4.x, and from
transformers 5 without torchvision (`CLIPImageProcessorPil`). transformers 5 with torchvision installed picks
the torchvision backend by default, whose antialiased bicubic (same a = -0.5 kernel) works in float and rounds
once instead of after each pass, so a few pixels may differ by one uint8 level: not measured here (the fixture
environment has no torchvision).

Captions: sdjax's tokenizer (`sdjax.models.clip.tokenize`, padded to max_length) instead of torchmetrics'
pad-to-longest: the text tower is causal and pools at the EOS token, so padding after EOS changes nothing. Only
a caption longer than the tower's context differs: torchmetrics cuts its ids (dropping EOS), the tokenizer here
truncates keeping EOS last.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD (also OpenCLIP's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c, 8 bits per channel


def _bicubic(x: np.ndarray) -> np.ndarray:
  """Pillow's bicubic filter (a = -0.5, support 2)."""
  a, x = -0.5, np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                  np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] int32 fixed-point weights of Pillow's BICUBIC resize along one axis.

  Resample.c's `precompute_coeffs` (float64, support scaled by the downscaling factor: antialiased) and
  `normalize_coeffs_8bpc` (each row normalised to sum 1, then rounded half away from zero to 22 fraction bits).
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  out = np.zeros((out_size, in_size), np.int32)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    w = _bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
    total = w.sum()
    if total != 0.0:
      w = w / total
    w = w * (1 << _PRECISION_BITS)
    out[xx, xmin:xmax] = np.where(w < 0, np.trunc(w - 0.5), np.trunc(w + 0.5)).astype(np.int32)
  return out


def _resample(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
  """One Pillow pass along `axis` of int32 [B, H, W, C] uint8 values: round, shift, clip to [0, 255]."""
  spec = "bhwc,xh->bxwc" if axis == 1 else "bhwc,xw->bhxc"
  acc = jnp.einsum(spec, x, jnp.asarray(weights), preferred_element_type=jnp.int32)
  return jnp.clip((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255)


def resize_shortest_side(images: jax.Array, size: int) -> jax.Array:
  """uint8 [B, H, W, C] -> uint8 [B, h, w, C] with min(h, w) = size and the long side int(size * long / short)
  (transformers' `get_resize_output_image_size`), resampled exactly as Pillow's `Image.resize(BICUBIC)`."""
  _, h, w, _ = images.shape
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  x = images.astype(jnp.int32)
  if new_w != w:  # Pillow: horizontal pass first; a kept side gets no pass (nor any rounding)
    x = _resample(x, pil_bicubic_matrix(w, new_w), axis=2)
  if new_h != h:
    x = _resample(x, pil_bicubic_matrix(h, new_h), axis=1)
  return x.astype(jnp.uint8)


def preprocess(images: jax.Array, image_size: int, *, size: int | None = None, rescale_factor: float = 1 / 255,
               mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
  """uint8 RGB images [B, H, W, 3] (any H, W) -> CLIP pixel values float32 [B, image_size, image_size, 3].

  CLIPImageProcessor (PIL backend) step by step: bicubic resize of the shortest side to `size` (default
  image_size), center crop to image_size, x * rescale_factor (rounded to float32 from float64, as transformers'
  `rescale`), (x - mean) / std in float32. Jittable; all images of one call share a size. Images must already be
  uint8 (sdjax.io.to_uint8 turns [-1, 1] floats into them): torchmetrics feeds the processor uint8 images, and
  the resize rounds to uint8 as Pillow does. The keywords are a preprocessor_config.json's other settings (the
  safety checker's feature extractor, sdjax.pipelines.safety_checker_input).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"preprocess expects RGB images [batch, height, width, 3], got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"preprocess expects uint8 images in [0, 255], got {images.dtype} (convert [-1, 1] floats "
                     "with sdjax.io.to_uint8)")
  x = resize_shortest_side(images, image_size if size is None else size)
  _, h, w, _ = x.shape
  top, left = (h - image_size) // 2, (w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  table = jnp.asarray((np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32))
  x = table[x.astype(jnp.int32)]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_scores(vision_params, text_params, pixel_values: jax.Array, token_ids: jax.Array, *, vision_model,
                text_model) -> jax.Array:
  """Per-pair scores [B] float32: `100 * cos(image_embeds, text_embeds)`, unclamped (torchmetrics'
  `_clip_score_update`). `pixel_values` [B, S, S, 3] from `preprocess`; `token_ids` [B, L] from
  `sdjax.models.clip.tokenize`. `vision_model` is a `CLIPVisionModelWithProjection`, `text_model` a
  `CLIPTextModel` with `with_projection` (`sdjax.convert.clip_vision.load_clip_model` gives both)."""
  if pixel_values.shape[0] != token_ids.shape[0]:
    raise ValueError(f"clip score: {pixel_values.shape[0]} images but {token_ids.shape[0]} captions")
  if not text_model.config.with_projection:
    raise ValueError("clip score: the text model has no text_projection (with_projection=False); load both towers "
                     "of a CLIPModel with sdjax.convert.clip_vision.load_clip_model")
  _, image_embeds = vision_model.apply({"params": vision_params}, pixel_values)
  _, text_embeds = text_model.apply({"params": text_params}, token_ids)
  if image_embeds.shape[-1] != text_embeds.shape[-1]:
    raise ValueError(f"clip score: image embeddings have {image_embeds.shape[-1]} features, text embeddings "
                     f"{text_embeds.shape[-1]} (the towers come from different CLIP models)")
  return 100.0 * jnp.sum(_normalise(image_embeds) * _normalise(text_embeds), axis=-1)


def clip_score(vision_params, text_params, pixel_values: jax.Array, token_ids: jax.Array, *, vision_model,
               text_model) -> jax.Array:
  """torchmetrics' CLIP score of one batch of (image, caption) pairs: `max(mean(clip_scores), 0)`, a float32
  scalar. Jit with the modules bound: `jax.jit(functools.partial(clip_score, vision_model=v, text_model=t))`.
  Over many batches, sum `clip_scores` and count pairs, then `from_sums`."""
  scores = clip_scores(vision_params, text_params, pixel_values, token_ids, vision_model=vision_model,
                       text_model=text_model)
  return jnp.maximum(jnp.mean(scores), 0.0)


def from_sums(score_sum, count) -> float:
  """The metric from the running sum of per-pair scores and the number of pairs (torchmetrics' `compute`)."""
  if count <= 0:
    raise ValueError(f"clip score: no pairs were scored (count {count})")
  return max(float(score_sum) / float(count), 0.0)
