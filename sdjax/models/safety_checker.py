"""diffusers' `StableDiffusionSafetyChecker` in Flax Linen: a CLIP vision tower whose projected image embedding is
compared with 17 "concept" and 3 "special care" embeddings, each with its own threshold.

The computation is diffusers' `forward` (diffusers/pipelines/stable_diffusion/safety_checker.py), vectorised and
jittable. For each image, with cos(a, b) the cosine similarity of L2-normalised vectors (torch's `normalize`:
x / max(|x|, 1e-12)):
  special_raw[j] = cos(image, special_care_embeds[j]) - special_care_embeds_weights[j]
  special_care   = any_j round(special_raw[j], 3) > 0
  adjustment     = 0.01 if special_care else 0.0
  concept_scores = round(cos(image, concept_embeds[k]) - concept_embeds_weights[k] + adjustment, 3)
  has_nsfw_concept = any_k concept_scores[k] > 0
Rounding is numpy's `round(x, 3)` on float32 (x * 1000 rounded half to even, / 1000, all in float32), so an image
is flagged when a score exceeds 0.0005, not 0, exactly as diffusers. x * 1000 and its rounding are exact IEEE
float32 operations here too, so the flags agree bit for bit; XLA's float32 division on CPU is not always correctly
rounded, so a rounded score may differ from numpy's by one float32 ulp (~1e-8). diffusers' loop over the special
concepts adds the 0.01 to the special scores that follow the first one above its threshold; `special_scores` here
reproduce that (the flags do not depend on it). The "thresholds" (`*_weights`) are parameters, as in diffusers'
checkpoints.

Parameter paths mirror diffusers' state-dict keys: `vision_model/...` and `visual_projection` are
`sdjax.models.clip_vision`'s (a `CLIPVisionModel`'s pooled output through a bias-free projection, the same maths
as `CLIPVisionModelWithProjection`), and each raw tensor (`concept_embeds`, `special_care_embeds`,
`concept_embeds_weights`, `special_care_embeds_weights`) is the `embedding` leaf of a child of that name
(`normalize_state_dict` adds the `.weight` suffix the loader expects). Inputs are NHWC pixel values preprocessed
as the pipeline's `feature_extractor` (a CLIPImageProcessor) does: `FeatureExtractorConfig` holds its settings,
`sdjax.pipelines.safety_check` applies them inside the jitted pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models import clip_vision, layers
from sdjax.models.clip_vision import CLIPVisionConfig

NUM_CONCEPTS = 17  # fixed by diffusers' StableDiffusionSafetyChecker.__init__
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
RAW_PARAMETERS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")
ARCHITECTURE = "StableDiffusionSafetyChecker"
# diffusers' logger.warning when a batch has a flagged image (StableDiffusionSafetyChecker.forward).
NSFW_WARNING = ("Potential NSFW content was detected in one or more images. A black image will be returned instead. "
                "Try again with a different prompt and/or seed.")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' CLIPImageProcessor defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


class SafetyCheckerOutput(NamedTuple):
  """Per-image results, leading axis B. `has_nsfw_concept` [B] bool (diffusers' `has_nsfw_concepts`);
  `special_care` [B] bool (a special-care concept is above its threshold, which lowers every concept threshold by
  0.01); `concept_scores` [B, 17] and `special_scores` [B, 3] float32, the rounded values of diffusers'
  `result_img["concept_scores"]` / `["special_scores"]` (> 0: above threshold); `concept_cos` [B, 17] and
  `special_cos` [B, 3], the unrounded cosine similarities (diffusers' `cos_dist` / `special_cos_dist`)."""
  has_nsfw_concept: jax.Array
  special_care: jax.Array
  concept_scores: jax.Array
  special_scores: jax.Array
  concept_cos: jax.Array
  special_cos: jax.Array


@dataclasses.dataclass(frozen=True)
class FeatureExtractorConfig:
  """The safety checker's input preprocessing: transformers' `CLIPImageProcessor` as Stable Diffusion pipelines
  configure it (`feature_extractor/preprocessor_config.json`). Images (uint8) are resized so that their shortest
  side is `size` (Pillow bicubic), center-cropped to `crop_size` squared, multiplied by `rescale_factor` and
  normalised with `image_mean` / `image_std`. Defaults: CLIPImageProcessor's (224, OpenAI CLIP mean/std)."""
  size: int = 224
  crop_size: int = 224
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    for name in ("size", "crop_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**16:
        raise ValueError(f"FeatureExtractorConfig.{name}: {v!r:.40} is not an int in [1, 65536]")
    if self.crop_size > self.size:
      raise ValueError(f"FeatureExtractorConfig: crop_size {self.crop_size} is larger than the resized shortest "
                       f"side {self.size} (the CLIPImageProcessor would pad; not supported)")
    for name in ("image_mean", "image_std"):
      v = getattr(self, name)
      if not (isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                           for x in v)):
        raise ValueError(f"FeatureExtractorConfig.{name}: {v!r:.60} is not 3 numbers (one per RGB channel)")
    if any(x <= 0 for x in self.image_std):
      raise ValueError(f"FeatureExtractorConfig.image_std: {self.image_std} has a value <= 0")
    if not isinstance(self.rescale_factor, (int, float)) or isinstance(self.rescale_factor, bool) \
        or not 0 < self.rescale_factor <= 1:
      raise ValueError(f"FeatureExtractorConfig.rescale_factor: {self.rescale_factor!r:.40} is not in (0, 1]")

  @classmethod
  def from_preprocessor_config(cls, d: Mapping[str, Any]) -> "FeatureExtractorConfig":
    """From a `preprocessor_config.json` dict (old `CLIPFeatureExtractor` ints or newer `{"shortest_edge": n}` /
    `{"height": h, "width": w}` dicts). Settings the pipeline's preprocessing does not implement (no resize, no
    crop, a non-bicubic filter, a non-square crop, resizing to a fixed height and width) are errors."""
    d = dict(d)
    kind = d.get("image_processor_type") or d.get("feature_extractor_type") or "CLIPImageProcessor"
    if not (isinstance(kind, str) and kind.startswith("CLIP")):
      raise ValueError(f"preprocessor config: {kind!r:.60} is not a CLIPImageProcessor/CLIPFeatureExtractor")
    for flag in ("do_resize", "do_center_crop"):
      if d.get(flag, True) is not True:
        raise ValueError(f"preprocessor config: {flag}={d[flag]!r:.20} is not supported (the safety checker's "
                         "preprocessing always resizes and center-crops, as Stable Diffusion pipelines do)")
    if d.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
      raise ValueError(f"preprocessor config: resample={d['resample']!r:.20} is not supported (only 3, Pillow's "
                       "BICUBIC, the CLIPImageProcessor default)")
    kwargs: dict[str, Any] = {}
    size = d.get("size", 224)
    if isinstance(size, dict):
      if set(size) != {"shortest_edge"}:
        raise ValueError(f"preprocessor config: size {size!r:.80} is not supported (expected an int or "
                         "{'shortest_edge': n})")
      size = size["shortest_edge"]
    kwargs["size"] = size
    crop = d.get("crop_size", 224)
    if isinstance(crop, dict):
      if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
        raise ValueError(f"preprocessor config: crop_size {crop!r:.80} is not supported (expected an int or a "
                         "square {'height': n, 'width': n})")
      crop = crop["height"]
    kwargs["crop_size"] = crop
    if d.get("do_normalize", True):
      for name in ("image_mean", "image_std"):
        if d.get(name) is not None:
          v = d[name]
          kwargs[name] = tuple(v) if isinstance(v, (list, tuple)) else v
    else:
      kwargs.update(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    if d.get("do_rescale", True):
      if d.get("rescale_factor") is not None:
        kwargs["rescale_factor"] = d["rescale_factor"]
    else:
      kwargs["rescale_factor"] = 1.0
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> CLIPVisionConfig:
  """The vision tower's config from a safety checker's `config.json` (a transformers `CLIPConfig`:
  `vision_config` and the top-level `projection_dim`, the concept embeddings' width). Another architecture named
  in `architectures` is an error."""
  archs = d.get("architectures")
  if isinstance(archs, list) and archs and archs[0] != ARCHITECTURE:
    raise ValueError(f"architectures {archs!r:.80} is not [{ARCHITECTURE!r}]")
  if d.get("model_type", "clip") != "clip" or not isinstance(d.get("vision_config") or d.get("vision_config_dict"),
                                                             dict):
    raise ValueError(f"not a CLIPConfig (model_type {d.get('model_type')!r:.40}; a safety checker's config.json is a "
                     "transformers CLIPConfig with model_type 'clip' and a vision_config)")
  return CLIPVisionConfig.from_diffusers_config(dict(d))


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers' state dict in the layout of these parameter paths: the raw parameters and the class embedding get
  the `.weight` suffix of their Flax child (`embedding` leaf)."""
  state = clip_vision.normalize_state_dict(dict(state_dict))
  return {f"{k}.weight" if k in RAW_PARAMETERS else k: v for k, v in state.items()}


def init_args(config: CLIPVisionConfig) -> tuple[jax.Array]:
  """Example inputs for `init`/`eval_shape`: one preprocessed NHWC image."""
  return clip_vision.init_args(config)


class RawParameter(nn.Module):
  """One tensor that is an `nn.Parameter` of its own in PyTorch (no module around it); initialised to ones, as
  diffusers does."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    axes = ("vocab", "channels_out")[-len(self.shape):]
    return self.param("embedding", nn.with_logical_partitioning(nn.initializers.ones, axes), self.shape)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """diffusers' `cosine_distance`: [B, D] x [N, D] -> [B, N] float32, both sides L2-normalised as torch's
  `normalize` (divided by max(norm, 1e-12))."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("bd,nd->bn", a, b, precision=jax.lax.Precision.HIGHEST)


def scores(special_cos: jax.Array, concept_cos: jax.Array, special_weights: jax.Array,
           concept_weights: jax.Array) -> SafetyCheckerOutput:
  """diffusers' per-image score loop, vectorised (see the module docstring). float32 throughout, as diffusers'
  numpy float32 arithmetic: `cos - threshold + adjustment`, then numpy's round to 3 decimals."""
  special_raw = special_cos - special_weights.astype(jnp.float32)  # [B, 3]
  above = jnp.round(special_raw, 3) > 0  # each special concept with the adjustment still 0
  # diffusers sets adjustment = 0.01 after the first special concept above its threshold; the later special
  # scores include it. Whether any is above does not depend on it (the first one is judged with 0).
  before = (jnp.cumsum(above.astype(jnp.int32), axis=1) - above.astype(jnp.int32)) > 0
  special_scores = jnp.round(special_raw + jnp.where(before, SPECIAL_CARE_ADJUSTMENT, 0.0).astype(jnp.float32), 3)
  special_care = jnp.any(above, axis=1)
  adjustment = jnp.where(special_care, SPECIAL_CARE_ADJUSTMENT, 0.0).astype(jnp.float32)[:, None]
  concept_scores = jnp.round(concept_cos - concept_weights.astype(jnp.float32) + adjustment, 3)
  return SafetyCheckerOutput(jnp.any(concept_scores > 0, axis=1), special_care, concept_scores, special_scores,
                             concept_cos, special_cos)


def replace_flagged(images: jax.Array, flags: jax.Array, black: float = -1.0) -> jax.Array:
  """`images` [B, ...] with every image whose flag [B] is set replaced by a constant `black` image (diffusers'
  `zeros_like` black image). The default -1.0 is black for sdjax's [-1, 1] images (diffusers zeroes its [-1, 1]
  tensor and then skips the denormalisation of flagged images: the same black PNG); pass 0 for uint8 or [0, 1]."""
  flags = jnp.asarray(flags, bool).reshape((-1,) + (1,) * (images.ndim - 1))
  return jnp.where(flags, jnp.asarray(black, images.dtype), images)


class StableDiffusionSafetyChecker(nn.Module):
  """diffusers' `StableDiffusionSafetyChecker`.

  `apply({"params": p}, pixel_values [B, S, S, 3] (NHWC, preprocessed; S = config.image_size))` ->
  `SafetyCheckerOutput`. `config` is the vision tower's (`config_from_dict` reads a safety checker's
  config.json); `projection_dim` is the width of the image and concept embeddings. Pure and jittable.
  """
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> SafetyCheckerOutput:
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"StableDiffusionSafetyChecker expects pixel_values [batch, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}] (NHWC, preprocessed), got shape {tuple(pixel_values.shape)}")
    _, pooled, _ = clip_vision.CLIPVisionTransformer(cfg, name="vision_model")(pixel_values)
    image_embeds = layers.dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                name="visual_projection")(pooled)  # [B, projection_dim]
    d = cfg.projection_dim
    concept_embeds = RawParameter((NUM_CONCEPTS, d), name="concept_embeds")()
    special_embeds = RawParameter((NUM_SPECIAL_CARE, d), name="special_care_embeds")()
    concept_weights = RawParameter((NUM_CONCEPTS,), name="concept_embeds_weights")()
    special_weights = RawParameter((NUM_SPECIAL_CARE,), name="special_care_embeds_weights")()
    return scores(cosine_similarity(image_embeds, special_embeds), cosine_similarity(image_embeds, concept_embeds),
                  special_weights, concept_weights)
