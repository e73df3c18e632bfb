"""A Stable Diffusion pipeline's `safety_checker/` + `feature_extractor/` -> sdjax (module, params, preprocessing).

  load_safety_checker(pipeline_folder)        None when the pipeline has none (model_index.json says null, or
                                              names no safety_checker), else a `SafetyChecker`
  load_safety_checker_component(checker_folder, feature_extractor_folder)

`safety_checker/` holds a transformers `CLIPConfig` config.json (architectures ["StableDiffusionSafetyChecker"])
and `model.safetensors` (a variant such as `model.fp16.safetensors` with `variant`; a pickled
`pytorch_model.bin` only with allow_pickle, as sdjax.convert.diffusers) with the keys `vision_model.*`,
`visual_projection.weight`, `concept_embeds`, `special_care_embeds`, `concept_embeds_weights`,
`special_care_embeds_weights`. `feature_extractor/preprocessor_config.json` is the CLIPImageProcessor's.
Weights that do not fit the config raise one WeightMismatchError naming every missing, unexpected and mis-shaped
tensor. No torch.

sdjax.convert.load_pipeline lists these components in `skipped`; load them with this module (it reads the same
folder) and pass the result to `sdjax.pipelines.from_components(..., safety_checker=...)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, NamedTuple

from sdjax.convert import clip_vision as clip_vision_convert
from sdjax.convert import diffusers
from sdjax.convert.diffusers import read_folder_weights
from sdjax.convert.tree import WeightMismatchError
from sdjax.models import safety_checker as sc
from sdjax.models.clip_vision import CLASS_EMBEDDING_KEY

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class SafetyChecker(NamedTuple):
  """A loaded safety checker: the Flax module, its params, and the feature extractor's preprocessing."""
  module: sc.StableDiffusionSafetyChecker
  params: Any
  feature_extractor: sc.FeatureExtractorConfig


def no_safety_checker_message(path: str) -> str:
  """What to tell a user whose pipeline has no safety checker (sampling goes on unchecked)."""
  return (f"{path} has no safety_checker (model_index.json names none): generated images are not checked for "
          "NSFW content")


def read_feature_extractor(folder: str) -> sc.FeatureExtractorConfig:
  """The preprocessing settings of a `feature_extractor/` folder (preprocessor_config.json)."""
  path = os.path.join(folder, PREPROCESSOR_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: not a feature extractor folder (no {PREPROCESSOR_CONFIG}); the safety "
                            "checker needs the pipeline's feature_extractor")
  try:
    with open(path) as f:
      d = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object of settings, got {type(d).__name__} {d!r:.60}")
  try:
    return sc.FeatureExtractorConfig.from_preprocessor_config(d)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def from_state_dict(config, state_dict, *, what: str = "safety checker") -> tuple:
  """(StableDiffusionSafetyChecker, params) from diffusers' state dict and a `CLIPVisionConfig`."""
  module = sc.StableDiffusionSafetyChecker(config)
  state = sc.normalize_state_dict(dict(state_dict))
  try:
    return module, clip_vision_convert._to_params(module, sc.init_args(config), state, what)
  except WeightMismatchError as e:  # name the tensors as the file does (no `.weight` on raw parameters)
    raw = "|".join(re.escape(k) for k in sc.RAW_PARAMETERS + (CLASS_EMBEDDING_KEY,))
    raise WeightMismatchError(re.sub(rf"\b({raw})\.weight\b", r"\1", str(e))) from None


def load_safety_checker_component(checker_folder: str, feature_extractor_folder: str, *, variant: str | None = None,
                                  allow_pickle: bool = False, dtype: str = "float32") -> SafetyChecker:
  """A `SafetyChecker` from a `safety_checker/` folder and its `feature_extractor/` folder. `dtype`: the vision
  tower's compute dtype (scores are computed in float32 whatever it is). The crop size must be the tower's
  image_size."""
  d = diffusers._read_config(checker_folder, "safety checker")
  try:
    config = sc.config_from_dict(d)
  except ValueError as e:
    raise ValueError(f"{os.path.join(checker_folder, 'config.json')}: {e}") from None
  config = dataclasses.replace(config, dtype=dtype)
  feature_extractor = read_feature_extractor(feature_extractor_folder)
  if feature_extractor.crop_size != config.image_size:
    raise ValueError(f"{feature_extractor_folder}: crop_size {feature_extractor.crop_size} does not match the safety "
                     f"checker's image_size {config.image_size} ({checker_folder})")
  state = read_folder_weights(checker_folder, "model", variant, allow_pickle=allow_pickle)
  module, params = from_state_dict(config, state, what=checker_folder)
  return SafetyChecker(module, params, feature_extractor)


def load_safety_checker(path: str, *, variant: str | None = None, allow_pickle: bool = False,
                        dtype: str = "float32") -> SafetyChecker | None:
  """The safety checker of the diffusers pipeline folder `path`, or None when it has none (model_index.json has no
  `safety_checker` entry, or `[null, null]`, as SDXL pipelines and `save_pipeline`'s output). A named checker whose
  folder or feature extractor is missing is an error (diffusers refuses a checker without a feature extractor)."""
  index = diffusers.read_model_index(path)
  index_path = os.path.join(path, "model_index.json")
  spec = index.get("safety_checker") if isinstance(index, dict) else None
  if not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[1] is None:
    return None
  if spec[1] != sc.ARCHITECTURE:
    raise ValueError(f"{index_path}: safety_checker is {spec[1]!r:.60}; sdjax loads {sc.ARCHITECTURE!r}")
  fe_spec = index.get("feature_extractor")
  if not isinstance(fe_spec, (list, tuple)) or len(fe_spec) != 2 or fe_spec[1] is None:
    raise ValueError(f"{index_path}: the pipeline has a safety_checker but no feature_extractor (the checker's "
                     "image preprocessing)")
  checker = os.path.join(path, "safety_checker")
  if not os.path.isdir(checker):
    raise FileNotFoundError(f"{path}: model_index.json names a safety_checker but there is no safety_checker/ folder")
  return load_safety_checker_component(checker, os.path.join(path, "feature_extractor"), variant=variant,
                                       allow_pickle=allow_pickle, dtype=dtype)
