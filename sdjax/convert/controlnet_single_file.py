"""The original ControlNet file layout (lllyasviel's `control_*.pth` / `.safetensors`, `cldm.ControlNet`) -> sdjax,
with the key rules of `sdjax.convert.single_file` (the encoder is openaimodel's, numbered the same way):

  [control_model.]time_embed.{0,2}           time_embedding.linear_{1,2}
  [control_model.]label_emb.0.{0,2}          add_embedding.linear_{1,2} (SDXL-style ControlNets)
  [control_model.]input_blocks.*             conv_in and down_blocks.* (as the U-Net's)
  [control_model.]middle_block.*             mid_block.*
  [control_model.]input_hint_block.{0, 2, ..., 2 + 4 (n - 1)}
                                             controlnet_cond_embedding.conv_in, blocks.0 ..., conv_out (n: the length
                                             of conditioning_embedding_out_channels; 14 for the usual (16, 32, 96, 256))
  [control_model.]zero_convs.{i}.0           controlnet_down_blocks.{i}
  [control_model.]middle_block_out.0         controlnet_mid_block

Files whose ControlNet keys carry the "control_model." prefix (those that also hold a whole Stable Diffusion model,
e.g. the v1.0 control_sd15_*.pth) keep only those keys; the rest are listed as ignored, as diffusers'
`convert_controlnet_checkpoint` does. The file has no config: pass the diffusers ControlNetModel config.json of the
model, or let the default (the SD 1.5 / SD 2.1 U-Net's encoder with diffusers' default control-image encoder, as
lllyasviel's v1.1 and thibaud's SD 2.1 ControlNets) follow the text width the weights show.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from sdjax.convert import single_file
from sdjax.models import controlnet as controlnet_lib
from sdjax.models.unet import UNetConfig

PREFIX = "control_model."


def _hint_rules(n: int, prefix: str) -> dict[str, single_file.Rule]:
  """input_hint_block: conv_in at 0, then blocks.k at 2 (k + 1) (a SiLU between each), conv_out after them."""
  rules = {f"{prefix}input_hint_block.0.": ("controlnet", "controlnet_cond_embedding.conv_in.", single_file._leaf)}
  for k in range(2 * (n - 1)):
    rules[f"{prefix}input_hint_block.{2 * (k + 1)}."] = ("controlnet", f"controlnet_cond_embedding.blocks.{k}.",
                                                          single_file._leaf)
  rules[f"{prefix}input_hint_block.{2 + 4 * (n - 1)}."] = ("controlnet", "controlnet_cond_embedding.conv_out.",
                                                            single_file._leaf)
  return rules


def controlnet_rules(config: controlnet_lib.ControlNetConfig, prefix: str = "") -> dict[str, single_file.Rule]:
  """Original ControlNet key prefix -> (component, diffusers ControlNetModel key prefix, handler) for `config`."""
  rules = dict(single_file.unet_rules(config.unet.to_diffusers_config(), prefix))  # encoder rules; no decoder keys
  n_down = config.num_down_residuals
  for i in range(n_down):
    rules[f"{prefix}zero_convs.{i}.0."] = ("controlnet", f"controlnet_down_blocks.{i}.", single_file._leaf)
  rules[f"{prefix}middle_block_out.0."] = ("controlnet", "controlnet_mid_block.", single_file._leaf)
  rules.update(_hint_rules(len(config.conditioning_embedding_out_channels), prefix))
  return rules


def default_config(state_dict: Mapping[str, np.ndarray]) -> controlnet_lib.ControlNetConfig:
  """The config of an SD 1.5 (768-wide text) or SD 2.1 (1024) ControlNet, from the width of the weights' first
  cross-attention key projection."""
  keys = [k for k in state_dict if k.endswith("attn2.to_k.weight")]
  width = int(np.shape(state_dict[sorted(keys)[0]])[-1]) if keys else None
  model_type = {768: "sd1", 1024: "sd2"}.get(width)
  if model_type is None:
    raise ValueError(f"cannot tell the ControlNet's model from its text width {width} (768: SD 1.x, 1024: SD 2.x): "
                     "pass its diffusers config")
  unet = UNetConfig.from_diffusers_config(single_file.default_configs(model_type)["unet"])
  return controlnet_lib.ControlNetConfig(unet=unet)


def to_diffusers(state_dict: Mapping[str, np.ndarray], config: controlnet_lib.ControlNetConfig
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(diffusers ControlNetModel state dict, ignored keys) of an original-layout ControlNet state dict.

  Raises `single_file.UnmappedKeysError` naming every ControlNet key no rule maps."""
  keys = list(state_dict)
  prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
  rules = controlnet_rules(config, prefix)
  own = [k for k in keys if k.startswith(prefix)]
  mapped, ignored, unmapped = single_file.apply_rules(state_dict, own, rules)
  out = {}  # the encoder's rules name the "unet" component, the ControlNet's own ones "controlnet": one state dict
  for part in mapped.values():
    out.update(part)
  ignored += [k for k in keys if not k.startswith(prefix)]  # the rest of a whole-model file
  if unmapped:
    raise single_file.UnmappedKeysError(sorted(unmapped), "controlnet")
  if not out:
    raise ValueError("no ControlNet weights found (expected input_hint_block.*, zero_convs.*, input_blocks.*, ... "
                     f"keys, optionally under {PREFIX!r})")
  return out, sorted(ignored)


def resolve_config(config: Any, state: Mapping[str, np.ndarray], **overrides) -> controlnet_lib.ControlNetConfig:
  """The ControlNetConfig of an original-layout file's `state`: `config` is a ControlNetConfig, a diffusers
  ControlNetModel config dict, or a folder / config.json path holding one; None: `default_config` from the weights.
  `overrides` (dtype, remat, ...) go to its U-Net part. (`sdjax.convert.load_controlnet` reads the file.)"""
  if isinstance(config, str):
    file = os.path.join(config, "config.json") if os.path.isdir(config) else config
    with open(file) as f:
      config = json.load(f)
  if config is None:
    prefixed = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    config = default_config(prefixed or state)
  elif not isinstance(config, controlnet_lib.ControlNetConfig):
    config = controlnet_lib.ControlNetConfig.from_diffusers_config(dict(config))
  if overrides:
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, **overrides))
  return config
