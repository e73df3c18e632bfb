"""Original-LDM single-file checkpoints (SD 1.x, SD 2.x, SDXL, the SDXL refiner) -> diffusers-layout state dicts,
in numpy.

Users bring one `.safetensors` file with the CompVis / Stability (LDM, SGM) key names:
  model.diffusion_model.*                      the U-Net (openaimodel `input_blocks`, `middle_block`, ...)
  first_stage_model.*                          the VAE (taming `encoder.down.N.block.M`, `mid.attn_1`, ...)
  cond_stage_model.transformer.text_model.*    SD 1.x: transformers' CLIP ViT-L text model
  cond_stage_model.model.*                     SD 2.x: OpenCLIP ViT-H text tower
  conditioner.embedders.0.transformer.*        SDXL: CLIP ViT-L (as in SD 1.x)
  conditioner.embedders.1.model.*              SDXL: OpenCLIP ViT-bigG text tower with `text_projection`
  conditioner.embedders.0.model.*              the SDXL refiner: that OpenCLIP ViT-bigG tower alone (text_encoder_2)
`ldm_to_diffusers` renames (and, where the layouts differ, splits or transposes) those arrays into the
state dicts diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel` /
`CLIPTextModelWithProjection` checkpoints hold (text keys start `text_model.`), which sdjax's loaders read.

(~480 lines, above the ~450 of the style guide on purpose: it is one idea, the key maps of one file format, and
each map is read against the same prefixes and block numbering; split, the reader would jump between files.)
Shapes are not checked here: the Flax loader checks them against the model.

Every key is accounted for. Keys that are not model weights (schedule buffers such as `betas` or
`alphas_cumprod`, EMA copies `model_ema.*`, `position_ids`, OpenCLIP's `logit_scale`, the OpenCLIP blocks
diffusers drops, SD 2.x's unused `text_projection`, the VAE's training-loss networks) come back in an
`ignored` list; any other key that no rule maps raises `UnmappedKeysError` naming it.
"""
from __future__ import annotations

import importlib.resources
import json
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Union

import numpy as np

from sdjax.models.validate import MAX_LAYERS, MAX_LEVELS

MODEL_TYPES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
# Names accepted for `model_type`: the key layouts above plus the default-config names (`sd2_v` is SD 2.x
# with v-prediction: same weights layout as `sd2`).
_LAYOUT = {"sd1": "sd1", "sd2": "sd2", "sd2_v": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner"}
DEFAULT_CONFIGS = ("sd1", "sd2", "sd2_v", "sdxl", "sdxl_refiner")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_SDXL = "conditioner.embedders.0.transformer."
OPENCLIP_SDXL = "conditioner.embedders.1.model."
OPENCLIP_SDXL_REFINER = "conditioner.embedders.0.model."

# A handler maps (the key's suffix below its rule's prefix, array) to [(diffusers suffix, array)], or to
# None when the suffix is not one it knows.
Handler = Callable[[str, np.ndarray], "list[tuple[str, np.ndarray]] | None"]


class _Ignore:
  """Rule target for keys that are not weights of any diffusers component."""

  def __repr__(self):
    return "IGNORE"


IGNORE = _Ignore()


class Converted(NamedTuple):
  """`components`: {"unet", "vae", "text_encoder"[, "text_encoder_2"]} -> diffusers-layout state dict;
  `ignored`: the checkpoint keys deliberately left out (not model weights), sorted."""
  components: dict[str, dict[str, np.ndarray]]
  ignored: list[str]


class UnmappedKeysError(ValueError):
  """Checkpoint keys that look like model weights but that no rule maps (`.keys` holds them all)."""

  def __init__(self, keys: list[str], model_type: str):
    self.keys = keys
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    super().__init__(f"{len(keys)} checkpoint key(s) do not map onto the {model_type} diffusers layout (wrong "
                     f"model type or config, or weights sdjax does not support): {shown}")


# --- detection ---------------------------------------------------------------------------------------

def detect_model_type(keys: Iterable[str]) -> str:
  """The key layout, "sd1", "sd2", "sdxl" or "sdxl_refiner", of an LDM/SGM state dict (its keys or the dict itself).

  The weights do not say whether an SD 2.x model predicts epsilon (2.x-base, 512 px) or v (768 px): both
  give "sd2"; pick `default_configs("sd2")` or `default_configs("sd2_v")` accordingly.
  """
  keys = list(keys)
  def has(prefix):
    return any(k.startswith(prefix) for k in keys)
  if has(OPENCLIP_SDXL) and has(CLIP_SDXL):
    kind = "sdxl"
  elif has(OPENCLIP_SDXL_REFINER) and not has(CLIP_SDXL):  # diffusers' "xl_refiner"
    kind = "sdxl_refiner"
  elif has(OPENCLIP_SD2):
    kind = "sd2"
  elif has(CLIP_SD1):
    kind = "sd1"
  else:
    kind = None
  if kind is None or not has(UNET):
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    raise ValueError(
        "unrecognised single-file checkpoint: expected LDM/SGM Stable Diffusion keys, i.e. "
        f"'{UNET}*' and a text encoder under '{CLIP_SD1}*' (SD 1.x), '{OPENCLIP_SD2}*' (SD 2.x) or "
        f"'{CLIP_SDXL}*' + '{OPENCLIP_SDXL}*' (SDXL) or '{OPENCLIP_SDXL_REFINER}*' (the SDXL refiner); found key "
        f"prefixes {prefixes[:20]}")
  return kind


# --- suffix handlers ---------------------------------------------------------------------------------

def _leaf(suffix, a):
  return [(suffix, a)] if suffix in ("weight", "bias") else None


def _exact(suffix, a):
  return [("", a)] if suffix == "" else None


def _transposed(suffix, a):
  # OpenCLIP applies `text_projection` as x @ P; a torch Linear stores P.T.
  return [("", np.ascontiguousarray(a.T))] if suffix == "" and a.ndim == 2 else None


def _renamed(table: Mapping[str, str]) -> Handler:
  """Handler for `<module>.<weight|bias>` suffixes with the module renamed by `table`."""
  def handler(suffix, a):
    module, _, leaf = suffix.rpartition(".")
    if module in table and leaf in ("weight", "bias"):
      return [(f"{table[module]}.{leaf}", a)]
    return None
  return handler


def _matching(pattern: str, prefix: str = "") -> Handler:
  """Handler that keeps suffixes matching `pattern` (after prepending `prefix` where missing)."""
  regex = re.compile(pattern)
  def handler(suffix, a):
    if prefix and not suffix.startswith(prefix):
      suffix = prefix + suffix
    return [(suffix, a)] if regex.fullmatch(suffix) else None
  return handler


# openaimodel ResBlock -> diffusers ResnetBlock2D.
_unet_resnet = _renamed({"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                         "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"})
# SpatialTransformer and diffusers' Transformer2DModel share their parameter names.
_transformer = _matching(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|"
                         r"to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.(weight|bias)")
# taming ResnetBlock -> diffusers ResnetBlock2D (no time embedding).
_vae_resnet = _renamed({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                        "nin_shortcut": "conv_shortcut"})
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_attention(suffix, a):
  """taming AttnBlock (q/k/v/proj_out as 1x1 convs [C, C, 1, 1]) -> diffusers Attention (Linear [C, C])."""
  module, _, leaf = suffix.rpartition(".")
  if module not in _VAE_ATTN or leaf not in ("weight", "bias"):
    return None
  if module != "norm" and leaf == "weight" and a.ndim == 4:
    if a.shape[2:] != (1, 1):
      raise ValueError(f"VAE attention {suffix}: expected a 1x1 convolution kernel, got shape {a.shape}")
    a = a[:, :, 0, 0]
  return [(f"{_VAE_ATTN[module]}.{leaf}", a)]


# transformers' CLIPTextModel keys, below `cond_stage_model.transformer.` (SD 1.x) or SDXL's embedder 0.
# Very old checkpoints lack the `text_model.` level; it is added.
_hf_clip = _matching(r"text_model\.(embeddings\.(token|position)_embedding\.weight|encoder\.layers\.\d+\."
                     r"(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)|"
                     r"final_layer_norm\.(weight|bias))", prefix="text_model.")
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _openclip_block(suffix, a):
  """OpenCLIP ResidualAttentionBlock -> CLIPEncoderLayer; the fused in-projection [3D, D] splits into q, k, v."""
  if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
    if a.shape[0] % 3:
      raise ValueError(f"OpenCLIP {suffix}: first dimension {a.shape[0]} is not 3 x width")
    leaf = "weight" if suffix.endswith("weight") else "bias"
    q, k, v = np.split(a, 3, axis=0)
    return [(f"self_attn.{n}_proj.{leaf}", x) for n, x in (("q", q), ("k", k), ("v", v))]
  return _renamed(_OPENCLIP_BLOCK)(suffix, a)


# --- rules -------------------------------------------------------------------------------------------
# A rule set maps LDM key prefixes (ending in ".") or full keys to (component, diffusers key prefix (or
# full key), handler), or to IGNORE. A key takes the rule of its longest prefix with one.
Rule = Union[tuple[str, str, Handler], _Ignore]


def _check(config: Mapping[str, Any], where: str, field: str, allowed: tuple, default: Any = None) -> Any:
  value = config.get(field, default)
  if value not in allowed:
    raise ValueError(f"{where}.{field}={value!r} is not supported for single-file conversion "
                     f"(supported: {', '.join(map(repr, allowed))})")
  return value


def _blocks(config: Mapping[str, Any], where: str, field: str, allowed: tuple[str, ...]) -> list[str]:
  kinds = config.get(field) or ()
  if not isinstance(kinds, (list, tuple)):
    raise ValueError(f"{where}.{field}: {kinds!r:.60} is not a list of block types")
  if not kinds:
    raise ValueError(f"{where}.{field} is missing or empty")
  if len(kinds) > MAX_LEVELS:
    raise ValueError(f"{where}.{field}: {len(kinds)} blocks are too many (at most {MAX_LEVELS})")
  bad = [k for k in kinds if k not in allowed]
  if bad:
    raise ValueError(f"{where}.{field}: unsupported block(s) {bad}; expected {' / '.join(allowed)}")
  return kinds


def _layers_per_block(config: Mapping[str, Any], where: str) -> int:
  n = config.get("layers_per_block")
  if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
    raise ValueError(f"{where}.layers_per_block must be an int in [1, {MAX_LAYERS}], got {n!r:.60}")
  return n


def unet_rules(config: Mapping[str, Any], prefix: str = UNET) -> dict[str, Rule]:
  """openaimodel `UNetModel` -> diffusers `UNet2DConditionModel`, for the block layout in `config`.

  LDM numbers the encoder's modules flat: input_blocks.0 is conv_in, then per level `layers_per_block`
  (ResBlock[, SpatialTransformer]) entries and, except at the last level, one Downsample entry. The
  decoder's output_blocks hold `layers_per_block + 1` entries per level, the last carrying the Upsample.
  """
  where = "unet_config"
  down = _blocks(config, where, "down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"))
  up = _blocks(config, where, "up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D"))
  if len(up) != len(down):
    raise ValueError(f"{where}: {len(down)} down_block_types but {len(up)} up_block_types")
  per_block = _layers_per_block(config, where)
  _check(config, where, "mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn")
  for field in ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
                "time_cond_proj_dim"):
    _check(config, where, field, (None,))
  _check(config, where, "dual_cross_attention", (False, None))
  addition = _check(config, where, "addition_embed_type", (None, "text_time"))

  rules: dict[str, Rule] = {}
  def add(ldm, diffusers, handler=_leaf):
    rules[prefix + ldm] = ("unet", diffusers, handler)

  add("time_embed.0.", "time_embedding.linear_1.")
  add("time_embed.2.", "time_embedding.linear_2.")
  if addition == "text_time":  # SDXL: label_emb embeds the pooled text + size/crop conditioning
    add("label_emb.0.0.", "add_embedding.linear_1.")
    add("label_emb.0.2.", "add_embedding.linear_2.")
  add("input_blocks.0.0.", "conv_in.")
  i = 1
  for b, kind in enumerate(down):
    for j in range(per_block):
      add(f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.", _unet_resnet)
      if kind == "CrossAttnDownBlock2D":
        add(f"input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{j}.", _transformer)
      i += 1
    if b < len(down) - 1:
      add(f"input_blocks.{i}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.")
      i += 1
  add("middle_block.0.", "mid_block.resnets.0.", _unet_resnet)
  add("middle_block.1.", "mid_block.attentions.0.", _transformer)
  add("middle_block.2.", "mid_block.resnets.1.", _unet_resnet)
  o = 0
  for u, kind in enumerate(up):
    attention = kind == "CrossAttnUpBlock2D"
    for j in range(per_block + 1):
      add(f"output_blocks.{o}.0.", f"up_blocks.{u}.resnets.{j}.", _unet_resnet)
      if attention:
        add(f"output_blocks.{o}.1.", f"up_blocks.{u}.attentions.{j}.", _transformer)
      if j == per_block and u < len(up) - 1:  # the Upsample follows the ResBlock (and transformer)
        add(f"output_blocks.{o}.{2 if attention else 1}.conv.", f"up_blocks.{u}.upsamplers.0.conv.")
      o += 1
  add("out.0.", "conv_norm_out.")
  add("out.2.", "conv_out.")
  return rules


def vae_rules(config: Mapping[str, Any], prefix: str = VAE) -> dict[str, Rule]:
  """taming `Encoder`/`Decoder` -> diffusers `AutoencoderKL`, for the block layout in `config`.

  The LDM decoder numbers its levels from the highest resolution (`up.0` is the last to run); diffusers
  numbers them in execution order, so `decoder.up.{n-1-u}` is `decoder.up_blocks.{u}`.
  """
  where = "vae_config"
  down = _blocks(config, where, "down_block_types", ("DownEncoderBlock2D",))
  up = _blocks(config, where, "up_block_types", ("UpDecoderBlock2D",))
  if len(up) != len(down):
    raise ValueError(f"{where}: {len(down)} down_block_types but {len(up)} up_block_types")
  per_block = _layers_per_block(config, where)
  _check(config, where, "mid_block_add_attention", (True,), True)
  n = len(down)

  rules: dict[str, Rule] = {}
  def add(ldm, diffusers, handler=_leaf):
    rules[prefix + ldm] = ("vae", diffusers, handler)

  for part in ("encoder", "decoder"):
    add(f"{part}.conv_in.", f"{part}.conv_in.")
    add(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _vae_resnet)
    add(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _vae_attention)
    add(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _vae_resnet)
    add(f"{part}.norm_out.", f"{part}.conv_norm_out.")
    add(f"{part}.conv_out.", f"{part}.conv_out.")
  for i in range(n):
    for j in range(per_block):
      add(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _vae_resnet)
    if i < n - 1:
      add(f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.")
  for u in range(n):
    level = n - 1 - u
    for j in range(per_block + 1):
      add(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{u}.resnets.{j}.", _vae_resnet)
    if level > 0:
      add(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{u}.upsamplers.0.conv.")
  if config.get("use_quant_conv", True):
    add("quant_conv.", "quant_conv.")
  if config.get("use_post_quant_conv", True):
    add("post_quant_conv.", "post_quant_conv.")
  rules[prefix + "loss."] = IGNORE  # LPIPS / discriminator used to train the autoencoder
  return rules


def hf_clip_rules(prefix: str, component: str) -> dict[str, Rule]:
  """A transformers CLIPTextModel stored below `prefix` (SD 1.x, SDXL's first encoder): keys kept."""
  return {prefix: (component, "", _hf_clip),
          prefix + "text_model.embeddings.position_ids": IGNORE,
          prefix + "embeddings.position_ids": IGNORE}


def openclip_rules(prefix: str, component: str, num_blocks: int, keep_blocks: int,
                   projection: bool) -> dict[str, Rule]:
  """An OpenCLIP text tower below `prefix` -> transformers CLIPTextModel[WithProjection] keys.

  Blocks `keep_blocks`..`num_blocks - 1` are dropped (ignored): diffusers' SD 2.x text encoder is the
  OpenCLIP model cut after its penultimate block, the layer SD 2.x conditions on. With `projection`,
  `text_projection` (applied as x @ P) becomes the Linear weight P.T; without, it is ignored.
  """
  rules: dict[str, Rule] = {
      prefix + "token_embedding.": (component, "text_model.embeddings.token_embedding.", _leaf),
      prefix + "positional_embedding": (component, "text_model.embeddings.position_embedding.weight", _exact),
      prefix + "ln_final.": (component, "text_model.final_layer_norm.", _leaf),
      prefix + "text_projection": (component, "text_projection.weight", _transposed) if projection else IGNORE,
      prefix + "logit_scale": IGNORE,
      prefix + "attn_mask": IGNORE,
  }
  for k in range(num_blocks):
    block = prefix + f"transformer.resblocks.{k}."
    rules[block] = (component, f"text_model.encoder.layers.{k}.", _openclip_block) if k < keep_blocks else IGNORE
  return rules


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
  stem = prefix + "transformer.resblocks."
  found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(stem) + r"(\d+)\.", k))}
  return max(found) + 1 if found else 0


def _match(key: str, rules: Mapping[str, Rule]) -> str | None:
  """The rule for `key`: the key itself, else its longest dotted prefix with a rule."""
  if key in rules:
    return key
  end = len(key)
  while (end := key.rfind(".", 0, end)) >= 0:
    if key[:end + 1] in rules:
      return key[:end + 1]
  return None


# --- conversion --------------------------------------------------------------------------------------

def apply_rules(state_dict: Mapping[str, np.ndarray], keys: Iterable[str], rules: Mapping[str, Rule]
                ) -> tuple[dict[str, dict[str, np.ndarray]], list[str], list[str]]:
  """Map `keys` of `state_dict` by `rules`: ({component: {diffusers key: array}}, ignored keys, unmapped keys).

  Ignored: keys of an IGNORE rule, and keys that match no rule and have no dot (buffers of the top-level
  LatentDiffusion module: betas, alphas_cumprod, posterior_* ..., the noise schedule, which comes from the
  scheduler config instead). Unmapped: other keys that match no rule, or whose handler refuses them. Two keys
  that map to one component key raise ValueError naming both."""
  components: dict[str, dict[str, np.ndarray]] = {}
  source: dict[tuple[str, str], str] = {}
  ignored, unmapped = [], []
  for key in keys:
    rule_key = _match(key, rules)
    if rule_key is None:
      (ignored if "." not in key else unmapped).append(key)
      continue
    rule = rules[rule_key]
    if rule is IGNORE:
      ignored.append(key)
      continue
    component, target, handler = rule
    out = handler(key[len(rule_key):], np.asarray(state_dict[key]))
    if out is None:
      unmapped.append(key)
      continue
    for suffix, array in out:
      name = target + suffix
      if (component, name) in source:
        raise ValueError(f"checkpoint keys {source[component, name]!r} and {key!r} both map to "
                         f"{component} key {name!r}")
      source[component, name] = key
      components.setdefault(component, {})[name] = array
  return components, ignored, unmapped


def ldm_to_diffusers(state_dict: Mapping[str, np.ndarray], model_type: str | None = None, *,
                     unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                     text_encoder_config: Mapping[str, Any] | None = None,
                     text_encoder_layers: int | None = None) -> Converted:
  """Split an LDM/SGM single-file state dict into diffusers-layout component state dicts.

  Args:
    state_dict: checkpoint key -> array (e.g. `safetensors.numpy.load_file(path)`).
    model_type: "sd1", "sd2" (or "sd2_v"), "sdxl" or "sdxl_refiner"; detected from the keys when None.
    unet_config, vae_config: the diffusers `config.json` dicts of the U-Net and VAE (block types,
      `layers_per_block`, ...), e.g. `default_configs(model_type)["unet"]`.
    text_encoder_config: SD 2.x only: the transformers CLIPTextConfig dict, whose `num_hidden_layers`
      says how many OpenCLIP blocks the diffusers text encoder keeps.
    text_encoder_layers: SD 2.x only: that count directly (overrides the config). With neither, all but
      the last OpenCLIP block are kept (the penultimate layer, as in every SD 2.x diffusers release:
      23 of ViT-H's 24). The dropped blocks are listed in `ignored`.

  Returns:
    `Converted(components, ignored)`: components "unet", "vae", "text_encoder" and, for SDXL,
    "text_encoder_2" (CLIPTextModelWithProjection; the refiner: "unet", "vae", "text_encoder_2" with every
    OpenCLIP block kept), each a {diffusers key: array} dict; `ignored` lists
    the checkpoint keys that are not model weights. Arrays keep their dtype; they are views where possible.

  Raises:
    UnmappedKeysError (a ValueError) naming every key that is neither mapped nor known to be ignorable;
    ValueError for an unrecognised checkpoint, unsupported config values or a missing component.
  """
  keys = list(state_dict)
  if model_type is None:
    model_type = detect_model_type(keys)
  if model_type not in _LAYOUT:
    raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(_LAYOUT)}")
  layout = _LAYOUT[model_type]

  rules: dict[str, Rule] = {"model_ema.": IGNORE}  # EMA copies (flattened names) of the U-Net weights
  rules.update(unet_rules(unet_config))
  rules.update(vae_rules(vae_config))
  roots = {"unet": UNET, "vae": VAE}
  if layout == "sd1":
    rules.update(hf_clip_rules(CLIP_SD1, "text_encoder"))
    roots["text_encoder"] = CLIP_SD1
  elif layout == "sd2":
    blocks = _count_blocks(keys, OPENCLIP_SD2)
    keep = text_encoder_layers
    if keep is None and text_encoder_config is not None:
      keep = text_encoder_config.get("num_hidden_layers")
    if keep is None:
      keep = max(blocks - 1, 0)
    if blocks and (not isinstance(keep, int) or isinstance(keep, bool) or not 0 < keep <= blocks):
      raise ValueError(f"text_encoder_layers={keep!r}: the checkpoint's OpenCLIP text model has {blocks} "
                       f"blocks ({OPENCLIP_SD2}transformer.resblocks.*); expected 1..{blocks}")
    rules.update(openclip_rules(OPENCLIP_SD2, "text_encoder", blocks, keep, projection=False))
    roots["text_encoder"] = OPENCLIP_SD2
  elif layout == "sdxl_refiner":
    blocks = _count_blocks(keys, OPENCLIP_SDXL_REFINER)
    rules.update(openclip_rules(OPENCLIP_SDXL_REFINER, "text_encoder_2", blocks, blocks, projection=True))
    roots["text_encoder_2"] = OPENCLIP_SDXL_REFINER
  else:
    rules.update(hf_clip_rules(CLIP_SDXL, "text_encoder"))
    blocks = _count_blocks(keys, OPENCLIP_SDXL)
    rules.update(openclip_rules(OPENCLIP_SDXL, "text_encoder_2", blocks, blocks, projection=True))
    roots["text_encoder"] = CLIP_SDXL
    roots["text_encoder_2"] = OPENCLIP_SDXL

  mapped, ignored, unmapped = apply_rules(state_dict, keys, rules)
  components = {name: mapped.get(name, {}) for name in roots}
  if unmapped:
    raise UnmappedKeysError(sorted(unmapped), model_type)
  for name, root in roots.items():
    if not components[name]:
      raise ValueError(f"the {model_type} checkpoint has no {name} weights ('{root}*' keys)")
  return Converted(components, sorted(ignored))


# --- default configs ---------------------------------------------------------------------------------

def default_configs(model_type: str) -> dict[str, dict[str, Any]]:
  """The diffusers/transformers configs of the reference release of `model_type`, for loading a single
  file without a diffusers folder: {"unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"} (the refiner:
  no "text_encoder").

    sd1           runwayml/stable-diffusion-v1-5               (epsilon, 512 px)
    sd2           stabilityai/stable-diffusion-2-1-base        (epsilon, 512 px)
    sd2_v         stabilityai/stable-diffusion-2-1             (v-prediction, 768 px)
    sdxl          stabilityai/stable-diffusion-xl-base-1.0     (epsilon, 1024 px)
    sdxl_refiner  stabilityai/stable-diffusion-xl-refiner-1.0  (epsilon, 1024 px; U-Net as diffusers'
                  `create_unet_diffusers_config_from_ldm` makes it from sd_xl_refiner.yaml)
  """
  if model_type not in DEFAULT_CONFIGS:
    raise ValueError(f"default_configs: model_type={model_type!r}; expected one of {', '.join(DEFAULT_CONFIGS)}")
  folder = importlib.resources.files("sdjax") / "convert" / "configs" / model_type
  configs = {}
  for entry in folder.iterdir():
    if entry.name.endswith(".json"):
      configs[entry.name[:-len(".json")]] = json.loads(entry.read_text())
  return configs
