"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") with diffusers'
`ControlNetModel` structure and parameter names, for SD 1.x / 2.x / SDXL U-Nets.

A ControlNet is a trainable copy of the U-Net's encoder (conv_in, time/SDXL embeddings, down blocks, mid block)
whose input is the noisy latents plus an embedding of a control image (`controlnet_cond_embedding`); every skip
output and the mid-block output pass through a zero-initialised 1x1 convolution (`controlnet_down_blocks_i`,
`controlnet_mid_block`) and are added to the U-Net's skips and mid output (`UNet(..., down_residuals=,
mid_residual=)`). NHWC in and out.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models import layers, remat as remat_lib, unet as unet_lib
from sdjax.models.unet import UNetBlock, UNetConfig

# ControlNetModel config fields that are not UNet2DConditionModel fields, with diffusers' defaults.
_OWN_DEFAULTS = {"conditioning_channels": 3, "conditioning_embedding_out_channels": (16, 32, 96, 256),
                 "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
# Every field of diffusers' ControlNetModel.__init__ (config.json keys besides the private "_" ones).
_DIFFUSERS_FIELDS = (
    "in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
    "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions", "addition_embed_type_num_heads")
# The U-Net fields a ControlNet has no use for: they are set from the others (`_encoder_config`) and not exported.
_UNET_ONLY = ("out_channels", "up_block_types", "dropout", "sample_size", "time_cond_proj_dim")
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}


def _encoder_config(config: UNetConfig) -> UNetConfig:
  """`config` with the fields a ControlNet does not have set canonically (up blocks mirroring the down blocks,
  out_channels = in_channels, no dropout, no sample_size), so equal ControlNets have equal configs."""
  up = tuple("CrossAttnUpBlock2D" if k == "CrossAttnDownBlock2D" else "UpBlock2D"
             for k in reversed(config.down_block_types))
  heads = config.addition_embed_type_num_heads if config.addition_embed_type_num_heads is not None else 64
  return dataclasses.replace(config, out_channels=config.in_channels, up_block_types=up, dropout=0.0,
                             sample_size=None, addition_embed_type_num_heads=heads)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """ControlNet hyper-parameters: `unet` holds the fields shared with the U-Net (named as in diffusers'
  `UNet2DConditionModel`; its up_block_types / out_channels / dropout / sample_size are canonical and unused), the
  others are diffusers' `ControlNetModel` fields of the same names:

  conditioning_channels: channels of the control image; conditioning_embedding_out_channels: widths of the
  control-image encoder (len - 1 stride-2 convolutions: the image is that power of 2 larger than the latents);
  controlnet_conditioning_channel_order: "rgb" or "bgr" (the image's channels are reversed first);
  global_pool_conditions: the residuals are averaged over H, W (and the pipelines then run in guess mode).
  """
  unet: UNetConfig
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  controlnet_conditioning_channel_order: str = "rgb"
  global_pool_conditions: bool = False

  def __post_init__(self):
    object.__setattr__(self, "unet", _encoder_config(self.unet))
    object.__setattr__(self, "conditioning_embedding_out_channels",
                       tuple(self.conditioning_embedding_out_channels))
    if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
      raise ValueError(f"ControlNetConfig.conditioning_channels must be a positive int, got "
                       f"{self.conditioning_channels!r}")
    chans = self.conditioning_embedding_out_channels
    if not chans or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in chans):
      raise ValueError(f"ControlNetConfig.conditioning_embedding_out_channels must be positive ints, got {chans}")
    if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
      raise ValueError("ControlNetConfig.controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                       f"{self.controlnet_conditioning_channel_order!r}")
    if not isinstance(self.global_pool_conditions, bool):
      raise ValueError(f"ControlNetConfig.global_pool_conditions must be a bool, got {self.global_pool_conditions!r}")
    if self.unet.num_class_embeds is not None:
      raise ValueError("ControlNetConfig: num_class_embeds (class-conditional ControlNets) is not supported")
    if self.unet.time_cond_proj_dim is not None:
      raise ValueError("ControlNetConfig: time_cond_proj_dim is not a ControlNet field (its time_embedding has no "
                       "cond_proj)")
    if self.unet.cross_attention_dim is None:
      raise ValueError("ControlNetConfig: cross_attention_dim is needed (ControlNets are text-conditioned)")

  @property
  def image_downscale(self) -> int:
    """How many times larger the control image is than the latents."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @property
  def num_down_residuals(self) -> int:
    """1 (conv_in) + layers_per_block per level + one per downsampler: the U-Net's number of skips."""
    n = len(self.unet.block_out_channels)
    return 1 + n * self.unet.layers_per_block + n - 1

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any], **overrides) -> "ControlNetConfig":
    """From a diffusers `ControlNetModel` config.json dict; `overrides` set sdjax-only U-Net fields (dtype, remat,
    attention_implementation). Unknown fields and unsupported values raise, naming the field."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(_DIFFUSERS_FIELDS))
    if unknown:
      raise ValueError(f"ControlNet config: unknown field(s) {unknown}; known fields are {sorted(_DIFFUSERS_FIELDS)}")
    own = {k: d.pop(k, v) for k, v in _OWN_DEFAULTS.items()}
    if isinstance(own["conditioning_embedding_out_channels"], list):
      own["conditioning_embedding_out_channels"] = tuple(own["conditioning_embedding_out_channels"])
    if own["conditioning_embedding_out_channels"] is None:
      raise ValueError("ControlNet config: conditioning_embedding_out_channels=None is not supported")
    mid = d.pop("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_BLOCKS:
      raise ValueError(f"ControlNet config: mid_block_type={mid!r} is not supported (one of {sorted(_MID_BLOCKS)})")
    d.setdefault("cross_attention_dim", 1280)  # ControlNetModel's default (UNetConfig's is SD 1.x's 768)
    d.setdefault("addition_embed_type_num_heads", 64)
    down = d.get("down_block_types", UNetConfig.down_block_types)
    d["up_block_types"] = ["CrossAttnUpBlock2D" if k == "CrossAttnDownBlock2D" else "UpBlock2D"
                           for k in reversed(down)] if isinstance(down, (list, tuple)) else down
    d["out_channels"] = d.get("in_channels", 4)
    try:
      unet = UNetConfig.from_diffusers_config(d, mid_block_attention=_MID_BLOCKS[mid], **overrides)
    except ValueError as e:
      raise ValueError(f"ControlNet config: {str(e).removeprefix('UNet config: ')}") from None
    return cls(unet=unet, **own)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers `ControlNetModel` config.json dict of this ControlNet."""
    d = dataclasses.replace(self.unet, mid_block_attention=True).to_diffusers_config()
    d = {k: v for k, v in d.items() if k in _DIFFUSERS_FIELDS}
    d["mid_block_type"] = "UNetMidBlock2DCrossAttn" if self.unet.mid_block_attention else "UNetMidBlock2D"
    d.update(conditioning_channels=self.conditioning_channels,
             conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
             controlnet_conditioning_channel_order=self.controlnet_conditioning_channel_order,
             global_pool_conditions=self.global_pool_conditions)
    return {"_class_name": "ControlNetModel", **dict(sorted(d.items()))}


def init_args(config: ControlNetConfig, batch: int = 1, size: int | None = None) -> tuple:
  """Small example inputs (x, t, context, cond_image, conditioning_scale, added_cond) to initialise a ControlNet."""
  x, t, context, _, added = unet_lib.init_args(config.unet, batch, size)
  f = config.image_downscale
  image = jnp.zeros((batch, x.shape[1] * f, x.shape[2] * f, config.conditioning_channels), jnp.float32)
  return x, t, context, image, 1.0, added


def guess_mode_scales(num_down_residuals: int) -> np.ndarray:
  """diffusers' guess-mode scales `torch.logspace(-1, 0, n + 1)` (0.1 ... 1): one per down residual, the last
  for the mid residual; float32."""
  return (10.0 ** np.linspace(-1.0, 0.0, num_down_residuals + 1)).astype(np.float32)


def _zero_conv(features: int, dtype, name: str):
  """A 1x1 convolution initialised to zero (diffusers' `zero_module(nn.Conv2d(c, c, 1))`)."""
  return nn.Conv(features, (1, 1), dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.BIAS_AXES))


class ConditioningEmbedding(nn.Module):
  """diffusers' `ControlNetConditioningEmbedding`: conv_in, then per width step a 3x3 conv and a stride-2 3x3 conv
  (`blocks_{2j}`, `blocks_{2j+1}`), SiLU after each, and the zero-initialised conv_out to `features` channels."""
  features: int
  channels: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image):
    h = nn.silu(layers.conv(self.channels[0], dtype=self.dtype, name="conv_in")(image))
    for j in range(len(self.channels) - 1):
      h = nn.silu(layers.conv(self.channels[j], dtype=self.dtype, name=f"blocks_{2 * j}")(h))
      h = nn.silu(layers.conv(self.channels[j + 1], stride=2, dtype=self.dtype, name=f"blocks_{2 * j + 1}")(h))
    return nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_out",
                   kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.BIAS_AXES))(h)


class ControlNet(nn.Module):
  """`apply({"params": p}, x, t, context, cond_image, conditioning_scale=1.0, added_cond=None, guess_mode=False)`
  -> (down_residuals, mid_residual): a tuple of `config.num_down_residuals` arrays [B, h_i, w_i, C_i] (one per
  U-Net skip, in the U-Net's order) and [B, h, w, C_last], float32, for `UNet(..., down_residuals=,
  mid_residual=)`.

  x: [B, h, w, in_channels] latents (the U-Net's input, scaled as the sampler scales it); t: [B] timesteps;
  context: [B, L, cross_attention_dim]; cond_image: [B, h * f, w * f, conditioning_channels] in [0, 1] (f =
  `config.image_downscale`, the VAE's downscale for the usual 4-step encoder), as diffusers' pipelines prepare it;
  added_cond: SDXL's {"text_embeds", "time_ids"}. conditioning_scale: a scalar or [B] per-image scale multiplied
  into every residual; guess_mode (static): residual i is further scaled by `guess_mode_scales`[i] (0.1 ... 1,
  the mid residual by 1), as diffusers' `guess_mode` (not with global_pool_conditions, which averages every
  residual over H, W instead).
  """
  config: ControlNetConfig

  @nn.compact
  def __call__(self, x, t, context, cond_image, conditioning_scale=1.0, added_cond=None, guess_mode: bool = False,
               train: bool = False):
    cfg, ucfg = self.config, self.config.unet
    dtype = jnp.dtype(ucfg.dtype)
    chans = ucfg.block_out_channels
    if x.ndim != 4 or x.shape[-1] != ucfg.in_channels:
      raise ValueError(f"ControlNet expects x of shape [B, H, W, {ucfg.in_channels}], got {x.shape}")
    b, f = x.shape[0], cfg.image_downscale
    if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[-1] != ucfg.cross_attention_dim:
      raise ValueError(f"ControlNet expects context of shape [{b}, L, {ucfg.cross_attention_dim}], got "
                       f"{None if context is None else context.shape}")
    want = (b, x.shape[1] * f, x.shape[2] * f, cfg.conditioning_channels)
    if cond_image.shape != want:
      raise ValueError(f"ControlNet expects a control image of shape {want} (the latents {x.shape[1:3]} x {f}, "
                       f"{cfg.conditioning_channels} channels), got {cond_image.shape}")
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != b):
      raise ValueError(f"conditioning_scale must be a scalar or [{b}], got shape {scale.shape}")
    scale = scale.reshape((-1, 1, 1, 1)) if scale.ndim else scale
    if cfg.controlnet_conditioning_channel_order == "bgr":
      cond_image = cond_image[..., ::-1]

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    temb = layers.timestep_embedding(t, chans[0], flip_sin_to_cos=ucfg.flip_sin_to_cos, freq_shift=ucfg.freq_shift)
    emb = layers.TimestepEmbedding(ucfg.time_embed_dim, dtype=dtype, name="time_embedding")(temb.astype(dtype))
    if ucfg.addition_embed_type == "text_time":
      emb = emb + unet_lib.text_time_embedding(ucfg, added_cond, b, dtype, owner="ControlNet")
    context = context.astype(dtype)
    deterministic = not train
    block_cls = remat_lib.wrap(UNetBlock, ucfg.remat, static_argnums=(5, 6))

    h = layers.conv(chans[0], dtype=dtype, name="conv_in")(x.astype(dtype))
    h = h + ConditioningEmbedding(chans[0], cfg.conditioning_embedding_out_channels, dtype=dtype,
                                  name="controlnet_cond_embedding")(cond_image.astype(dtype))
    skips = [h]
    for i, kind in enumerate(ucfg.down_block_types):
      block = block_cls(ucfg, i, kind == "CrossAttnDownBlock2D", "down", name=f"down_blocks_{i}")
      h, outs = block(h, emb, context, None, None, deterministic)
      skips.extend(outs)
    h, _ = block_cls(ucfg, len(chans) - 1, ucfg.mid_block_attention, "mid", name="mid_block")(
        h, emb, context, None, None, deterministic)

    down = [_zero_conv(s.shape[-1], dtype, f"controlnet_down_blocks_{i}")(s).astype(jnp.float32)
            for i, s in enumerate(skips)]
    mid = _zero_conv(chans[-1], dtype, "controlnet_mid_block")(h).astype(jnp.float32)
    if guess_mode and not cfg.global_pool_conditions:
      scales = guess_mode_scales(len(down))
      down = [d * (s * scale) for d, s in zip(down, scales)]
      mid = mid * (scales[-1] * scale)
    else:
      down = [d * scale for d in down]
      mid = mid * scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return tuple(down), mid


def _copied_prefixes(config: ControlNetConfig) -> tuple[str, ...]:
  """The top-level params diffusers' `ControlNetModel.from_unet` copies from the U-Net."""
  names = ["conv_in", "time_embedding", "mid_block"] + [f"down_blocks_{i}"
                                                        for i in range(len(config.unet.block_out_channels))]
  if config.unet.addition_embed_type == "text_time":
    names.append("add_embedding")
  return tuple(names)


def from_unet(unet_config: UNetConfig, unet_params: Any, conditioning_channels: int = 3, *,
              conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
              controlnet_conditioning_channel_order: str = "rgb", seed: int = 0) -> tuple[ControlNetConfig, dict]:
  """(ControlNetConfig, params) of a ControlNet made from a U-Net, as diffusers' `ControlNetModel.from_unet`:
  the config copies the U-Net's encoder fields; conv_in, time_embedding, add_embedding (SDXL), down_blocks_i and
  mid_block are copies of the U-Net's params; the zero convolutions (controlnet_down_blocks_i, controlnet_mid_block,
  controlnet_cond_embedding.conv_out) are zero; the control-image encoder's other convolutions have LeCun-normal
  kernels drawn from numpy's generator seeded with `seed` and zero biases (diffusers draws both from torch's
  default initialiser). Numpy float32 arrays; nothing is compiled."""
  if unet_config.num_class_embeds is not None:
    raise ValueError("from_unet: a class-conditional U-Net (num_class_embeds) has no ControlNet counterpart here")
  if unet_config.time_cond_proj_dim is not None:
    raise ValueError("from_unet: an LCM-distilled U-Net (time_cond_proj_dim) cannot be copied: diffusers' "
                     "ControlNet time_embedding has no cond_proj")
  config = ControlNetConfig(unet=unet_config, conditioning_channels=conditioning_channels,
                            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
  module = ControlNet(config)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args(config))))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "controlnet_cond_embedding" and names[1] != "conv_out" and names[-1] == "kernel":
      fan_in = int(np.prod(spec.shape[:-1]))
      return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.zeros(spec.shape, np.float32)

  params = dict(jax.tree_util.tree_map_with_path(draw, shapes))
  for name in _copied_prefixes(config):
    if name not in unet_params:
      raise ValueError(f"from_unet: the U-Net params have no {name!r}")
    mine = jax.tree.map(np.shape, params[name])
    theirs = jax.tree.map(np.shape, dict(unet_params[name]))
    if mine != theirs:
      raise ValueError(f"from_unet: the U-Net's {name!r} params do not have the shapes of its config")
    params[name] = jax.tree.map(lambda a: np.array(a, np.float32), dict(unet_params[name]))
  return config, params


def normalize_state_dict(state: dict) -> dict:
  """diffusers ControlNetModel keys -> the names `sdjax.convert.tree.torch_key` gives this module's params:
  `controlnet_cond_embedding.blocks.N.` -> `...blocks_N.`, `controlnet_down_blocks.N.` ->
  `controlnet_down_blocks_N.`."""
  out = {}
  for k, v in state.items():
    for prefix in ("controlnet_cond_embedding.blocks.", "controlnet_down_blocks."):
      if k.startswith(prefix):
        n, rest = k[len(prefix):].split(".", 1)
        k = f"{prefix[:-1]}_{n}.{rest}"
    out[k] = v
  return out


def denormalize_state_dict(state: dict) -> dict:
  """The inverse of `normalize_state_dict`: this module's torch-style keys -> diffusers ControlNetModel keys."""
  out = {}
  for k, v in state.items():
    for prefix in ("controlnet_cond_embedding.blocks_", "controlnet_down_blocks_"):
      if k.startswith(prefix):
        n, rest = k[len(prefix):].split(".", 1)
        k = f"{prefix[:-1]}.{n}.{rest}"
    out[k] = v
  return out
