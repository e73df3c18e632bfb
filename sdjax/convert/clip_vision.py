"""transformers CLIP folders -> sdjax (module, params): the vision tower with projection, and whole `CLIPModel`s.

  load_clip_vision(folder)  a `CLIPVisionModelWithProjection` folder (e.g. an IP-Adapter `image_encoder/`)
  load_clip_model(folder)   a full `CLIPModel` (openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-...): one
                            config.json with text_config/vision_config/projection_dim, weights `vision_model.*`,
                            `visual_projection.weight`, `text_model.*`, `text_projection.weight`, `logit_scale`

No torch: safetensors are read with sdjax.convert.safetensors_io (pickles only with allow_pickle, as
sdjax.convert.diffusers). Weights that do not fit the config raise one WeightMismatchError whose message is one
line naming every missing, unexpected and mis-shaped tensor.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from flax import linen as nn

from sdjax.convert import diffusers, tree
from sdjax.convert.diffusers import read_folder_weights
from sdjax.models import clip, clip_vision

TEXT_PREFIXES = ("text_model.", "text_projection.")
VISION_PREFIXES = ("vision_model.", "visual_projection.")


class CLIPModel(NamedTuple):
  """The two towers of a transformers `CLIPModel`: `vision` = (CLIPVisionModelWithProjection, params),
  `text` = (CLIPTextModel with `with_projection`, params), and the learned `logit_scale` (log of the softmax
  temperature; CLIP score does not use it)."""
  vision: tuple
  text: tuple
  logit_scale: float


def _one_line(e: tree.WeightMismatchError) -> tree.WeightMismatchError:
  """tree's multi-line report as one line: `what: ...; 2 missing: a (shape ...), b (...); 1 wrong shape: c: ...`."""
  lines = str(e).splitlines()
  parts, current = [lines[0]], None
  for line in lines[1:]:
    if line.startswith("    "):
      current.append(line.strip())
    else:
      current = []
      parts.append((line.strip(), current))
  text = "; ".join([parts[0]] + [f"{title} {', '.join(items)}" for title, items in parts[1:]])
  return tree.WeightMismatchError(text)


def _param_shapes(module: nn.Module, args: tuple) -> dict:
  return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))["params"]


def _to_params(module: nn.Module, args: tuple, state: Mapping[str, np.ndarray], what: str) -> dict:
  try:
    return tree.to_flax(state, _param_shapes(module, args), what=what)
  except tree.WeightMismatchError as e:
    raise _one_line(e) from None


def vision_from_state_dict(config: clip_vision.CLIPVisionConfig, state_dict: Mapping[str, np.ndarray], *,
                           what: str = "clip vision tower") -> tuple:
  """(CLIPVisionModelWithProjection, params) from a transformers-layout state dict (`vision_model.*`,
  `visual_projection.weight`)."""
  module = clip_vision.CLIPVisionModelWithProjection(config)
  state = clip_vision.normalize_state_dict(dict(state_dict))
  return module, _to_params(module, clip_vision.init_args(config), state, what)


def text_from_state_dict(config: clip.CLIPTextConfig, state_dict: Mapping[str, np.ndarray], *,
                         what: str = "clip text tower") -> tuple:
  """(CLIPTextModel, params) from a transformers-layout text state dict (`text_model.*`[, `text_projection`])."""
  module = clip.CLIPTextModel(config)
  state = clip.normalize_state_dict(dict(state_dict))
  return module, _to_params(module, clip.init_args(config), state, what)


def _read_config(folder: str) -> dict[str, Any]:
  return diffusers._read_config(folder, "transformers model")


def _config(cls, d: dict, folder: str, **overrides):
  try:
    config = cls.from_diffusers_config(d)
    return dataclasses.replace(config, **overrides) if overrides else config
  except ValueError as e:
    raise ValueError(f"{os.path.join(folder, 'config.json')}: {e}") from None


def load_clip_vision(folder: str, *, allow_pickle: bool = False, **overrides) -> tuple:
  """(CLIPVisionModelWithProjection, params) from a transformers `CLIPVisionModelWithProjection` folder
  (config.json + model.safetensors). `overrides` set sdjax-only fields such as dtype="bfloat16"."""
  config = _config(clip_vision.CLIPVisionConfig, _read_config(folder), folder, **overrides)
  return vision_from_state_dict(config, read_folder_weights(folder, "model", allow_pickle=allow_pickle),
                                what=folder)


def load_clip_model(folder: str, *, allow_pickle: bool = False, dtype: str = "float32") -> CLIPModel:
  """Both towers of a transformers `CLIPModel` folder, each with its projection to the shared embedding space.

  The text tower is `clip.CLIPTextModel` with `with_projection=True` and the top-level `projection_dim` (as
  `CLIPModel.get_text_features`); the vision tower likewise (`get_image_features`). Every tensor of the file
  must belong to one tower or be `logit_scale` (`position_ids` buffers of older checkpoints are ignored).
  """
  d = _read_config(folder)
  if d.get("model_type") != "clip" or not isinstance(d.get("text_config"), dict) \
      or not isinstance(d.get("vision_config"), dict):
    raise ValueError(f"{os.path.join(folder, 'config.json')}: not a transformers CLIPModel config (model_type "
                     f"{d.get('model_type')!r:.40}; expected 'clip' with text_config and vision_config)")
  vision_config = _config(clip_vision.CLIPVisionConfig, d, folder, dtype=dtype)
  text_config = _config(clip.CLIPTextConfig, d, folder, dtype=dtype, with_projection=True,
                        **({"projection_dim": d["projection_dim"]} if d.get("projection_dim") is not None else {}))
  state = read_folder_weights(folder, "model", allow_pickle=allow_pickle)
  vision_state = {k: v for k, v in state.items() if k.startswith(VISION_PREFIXES)}
  text_state = {k: v for k, v in state.items() if k.startswith(TEXT_PREFIXES)}
  other = sorted(k for k in state if not k.startswith(VISION_PREFIXES + TEXT_PREFIXES) and k != "logit_scale")
  if other:
    raise tree.WeightMismatchError(f"{folder}: the weights do not match a CLIPModel; {len(other)} unexpected: "
                                   f"{', '.join(other[:25])}")
  if "logit_scale" not in state:
    raise tree.WeightMismatchError(f"{folder}: the weights do not match a CLIPModel; 1 missing: logit_scale")
  vision = vision_from_state_dict(vision_config, vision_state, what=f"{folder} (vision tower)")
  text = text_from_state_dict(text_config, text_state, what=f"{folder} (text tower)")
  return CLIPModel(vision, text, float(np.asarray(state["logit_scale"], np.float32).reshape(())))
