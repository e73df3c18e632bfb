"""A Flax Linen U-Net with diffusers' `UNet2DConditionModel` structure and parameter names.

The same module serves the small pixel-space class-conditional models of sdjax's own configs and,
with the corresponding config, the SD-style text-conditioned U-Nets (cross-attention to a context).
NHWC in and out.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models import attention, layers, remat as remat_lib, validate
from sdjax.models.validate import BOOL, MAX_COUNT, MAX_LAYERS, MAX_SIZE, MAX_WIDTH, OPTIONAL_BOOL, OPTIONAL_STR
from sdjax.models.validate import STR, STRS, Field, floats, ints

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


# diffusers `UNet2DConditionModel` config fields that sdjax accepts only at these values (anything else
# would silently change the network). Pure metadata (sample_size, addition_embed_type_num_heads) are fields of
# UNetConfig that the network ignores, kept so that configs round-trip.
_FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
          "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
          "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
          "encoder_hid_dim": None, "encoder_hid_dim_type": None, "mid_block_only_cross_attention": None,
          "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
          "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
          "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
          "timestep_post_act": None, "attention_type": "default"}

_WIDTH = ints(1, MAX_WIDTH)
# Type and range of every field (sdjax.models.validate), checked before anything else.
_FIELDS = {
    "in_channels": _WIDTH, "out_channels": _WIDTH, "block_out_channels": ints(1, MAX_WIDTH, shape="tuple"),
    "layers_per_block": ints(1, MAX_LAYERS), "down_block_types": STRS, "up_block_types": STRS,
    "mid_block_attention": BOOL,
    "attention_head_dim": ints(1, MAX_WIDTH, shape="either", optional=True),
    "num_attention_heads": ints(1, MAX_WIDTH, shape="either", optional=True),
    # 0: an attention block of projections only (diffusers builds the same)
    "transformer_layers_per_block": ints(0, MAX_LAYERS, shape="either"),
    "cross_attention_dim": ints(1, MAX_WIDTH, optional=True), "use_linear_projection": OPTIONAL_BOOL,
    "upcast_attention": OPTIONAL_BOOL, "only_cross_attention": Field("bool", shape="either"),
    "norm_num_groups": _WIDTH, "norm_eps": floats(0, open_lo=True),
    "flip_sin_to_cos": OPTIONAL_BOOL, "freq_shift": floats(), "num_class_embeds": ints(1, MAX_COUNT, optional=True),
    "addition_embed_type": OPTIONAL_STR, "addition_time_embed_dim": ints(1, MAX_WIDTH, optional=True),
    "projection_class_embeddings_input_dim": ints(1, MAX_WIDTH, optional=True),
    "dropout": floats(0, 1, open_hi=True), "dtype": STR, "attention_implementation": OPTIONAL_STR,
    "sample_size": ints(1, MAX_SIZE, shape="either", optional=True),
    "addition_embed_type_num_heads": ints(1, MAX_WIDTH, optional=True),
    "time_cond_proj_dim": ints(1, MAX_WIDTH, optional=True),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """U-Net hyper-parameters, named as in diffusers' `UNet2DConditionModel` config."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  mid_block_attention: bool = True
  # As in diffusers: `num_attention_heads` defaults to `attention_head_dim` (a historical misnomer);
  # the per-head width is then block channels // heads.
  attention_head_dim: int | tuple[int, ...] | None = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  transformer_layers_per_block: int | tuple[int, ...] = 1
  cross_attention_dim: int | None = 768
  use_linear_projection: bool = False
  # Softmax in float32. Every sdjax attention path computes logits and softmax in float32 anyway; the
  # field is kept so diffusers configs round-trip.
  upcast_attention: bool = False
  # diffusers' flag, per down block (a bool: every block; up block i uses the entry of down block n - 1 - i, the
  # same level): the attention blocks' attn1 attends to the context instead of to the image tokens (the x4
  # upscaler: [True, True, True, False]). The mid block ignores it, as diffusers' UNetMidBlock2DCrossAttn does.
  only_cross_attention: bool | tuple[bool, ...] = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  num_class_embeds: int | None = None
  # SDXL: "text_time" adds an embedding of [pooled text embeds, sinusoidal(time_ids)] to the time embedding.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  # LCM-distilled U-Nets: the width of `timestep_cond` (the guidance-scale embedding, `guidance_embedding`), which
  # time_embedding.cond_proj (no bias) maps onto the sinusoidal timestep embedding before linear_1.
  time_cond_proj_dim: int | None = None
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; params are always float32
  # Rematerialisation policy of each block (sdjax.models.remat.POLICIES; True/False = "full"/"none").
  remat: bool | str = "none"
  attention_implementation: str | None = None  # see sdjax.models.attention; None = automatic
  # Metadata, unused by the network: the latent size the model was trained at (pipelines' default image size
  # is sample_size x the VAE's downscale), and an SDXL field diffusers writes.
  sample_size: int | tuple[int, ...] | None = None
  addition_embed_type_num_heads: int | None = None

  def __post_init__(self):
    validate.check(self, _FIELDS)
    object.__setattr__(self, "remat", remat_lib.normalize("UNetConfig.remat", self.remat))
    attention.validate_implementation(self.attention_implementation, "UNetConfig.attention_implementation")
    n = len(self.block_out_channels)
    if self.attention_head_dim is None and self.num_attention_heads is None:
      raise ValueError("UNetConfig: attention_head_dim and num_attention_heads are both None (expected at least "
                       "one to give the number of attention heads)")
    for field in ("down_block_types", "up_block_types"):
      value = getattr(self, field)
      if len(value) != n:
        raise ValueError(f"UNetConfig.{field} has {len(value)} entries, block_out_channels has {n}")
    for kind in self.down_block_types:
      if kind not in DOWN_BLOCKS:
        raise ValueError(f"UNetConfig.down_block_types: unknown block {kind!r}; expected one of {DOWN_BLOCKS}")
    for kind in self.up_block_types:
      if kind not in UP_BLOCKS:
        raise ValueError(f"UNetConfig.up_block_types: unknown block {kind!r}; expected one of {UP_BLOCKS}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"UNetConfig.block_out_channels: {c} is not divisible by norm_num_groups="
                         f"{self.norm_num_groups}")
    if any(self.per_block(self.only_cross_attention)) and self.cross_attention_dim is None:
      raise ValueError("UNetConfig.only_cross_attention needs cross_attention_dim (attn1 attends to the context)")
    for field in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
                  "only_cross_attention"):
      value = getattr(self, field)
      if isinstance(value, tuple) and len(value) != n:
        raise ValueError(f"UNetConfig.{field} has {len(value)} entries, block_out_channels has {n}")
    for c, h in zip(self.block_out_channels, self.heads):
      if c % h:
        raise ValueError(f"UNetConfig: {c} channels do not split into {h} attention heads")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"UNetConfig.addition_embed_type: {self.addition_embed_type!r} is not supported "
                       "(None or 'text_time')")
    if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None
                                                    or self.projection_class_embeddings_input_dim is None):
      raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                       "projection_class_embeddings_input_dim")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"UNetConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any], **overrides) -> "UNetConfig":
    """From a diffusers `UNet2DConditionModel` config.json dict; `overrides` set sdjax-only fields
    (dtype, remat, attention_implementation). Unsupported fields or values raise, naming them."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    for key, default in _FIXED.items():
      value = d.pop(key, default)
      if value != default:
        raise ValueError(f"UNet config: {key}={value!r} is not supported by sdjax (only {default!r})")
    mid = d.pop("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
      raise ValueError(f"UNet config: mid_block_type={mid!r} is not supported (only 'UNetMidBlock2DCrossAttn')")
    d["mid_block_attention"] = True
    lpb = d.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
      if not lpb or any(x != lpb[0] for x in lpb):
        raise ValueError(f"UNet config: per-block layers_per_block={lpb} is not supported")
      d["layers_per_block"] = lpb[0]
    if isinstance(d.get("cross_attention_dim"), (list, tuple)):
      raise ValueError(f"UNet config: per-block cross_attention_dim={d['cross_attention_dim']} is not supported")
    tlpb = d.get("transformer_layers_per_block", 1)
    if isinstance(tlpb, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlpb):
      raise ValueError("UNet config: nested transformer_layers_per_block is not supported")
    reverse = d.pop("reverse_transformer_layers_per_block", None)
    if reverse is not None:
      raise ValueError("UNet config: reverse_transformer_layers_per_block is not supported")
    d.update(overrides)
    return cls.from_dict(d)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config.json dict of this U-Net."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for key in ("dtype", "remat", "attention_implementation", "mid_block_attention"):
      d.pop(key)
    if not self.mid_block_attention:
      raise ValueError("a U-Net without mid-block attention has no diffusers equivalent")
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()
         if not (k in ("sample_size", "addition_embed_type_num_heads") and v is None)}
    return {"_class_name": "UNet2DConditionModel", **_FIXED, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "reverse_transformer_layers_per_block": None, **d}

  def per_block(self, value) -> tuple:
    n = len(self.block_out_channels)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

  @property
  def heads(self) -> tuple[int, ...]:
    return self.per_block(self.num_attention_heads or self.attention_head_dim)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


def init_args(config: UNetConfig, batch: int = 1, size: int | None = None) -> tuple:
  """Small example inputs (x, t, context, class_labels, added_cond) to initialise a U-Net of `config`."""
  size = size or 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  context = None if config.cross_attention_dim is None else jnp.zeros((batch, 1, config.cross_attention_dim))
  labels = None if config.num_class_embeds is None else jnp.zeros((batch,), jnp.int32)
  added = None
  if config.addition_embed_type == "text_time":
    # SDXL base: 6 time ids; the refiner: 5 (aesthetic score). The parameter shapes depend only on the total width.
    n_ids = 6 if config.projection_class_embeddings_input_dim > 6 * config.addition_time_embed_dim else 5
    text = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
    if text <= 0:
      raise ValueError("UNetConfig.projection_class_embeddings_input_dim is too small for 5 or 6 time ids of "
                       f"addition_time_embed_dim={config.addition_time_embed_dim}")
    added = {"text_embeds": jnp.zeros((batch, text)), "time_ids": jnp.zeros((batch, n_ids))}
  return x, t, context, labels, added


def guidance_embedding(w: jax.Array, embedding_dim: int) -> jax.Array:
  """diffusers' `get_guidance_scale_embedding` (LatentConsistencyModelPipeline): [B] guidance weights w (the
  pipelines pass guidance_scale - 1) -> [B, embedding_dim] float32 = [sin(1000 w f), cos(1000 w f)] with
  f_i = exp(-i log(10000) / (half - 1)), i < half = embedding_dim // 2, zero-padded to an odd width. The
  frequencies are the float32 values torch computes (float32 log, division, product and exp)."""
  if not isinstance(embedding_dim, int) or embedding_dim < 4:  # torch's frequencies are NaN below 4 (0 / 0)
    raise ValueError(f"guidance_embedding: embedding_dim must be an int >= 4, got {embedding_dim!r}")
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 1:
    raise ValueError(f"guidance_embedding: w must be [B], got shape {w.shape}")
  half = embedding_dim // 2
  step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
  freqs = jnp.asarray(np.exp(np.arange(half, dtype=np.float32) * -step), jnp.float32)
  emb = (w * np.float32(1000.0))[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, embedding_dim % 2)))


class CondTimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding` with `cond_proj_dim`: (x + cond_proj(cond)) -> linear_1 -> SiLU -> linear_2,
  cond_proj without bias. Same parameter names as `layers.TimestepEmbedding`, plus cond_proj."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    x = x + layers.dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(cond)
    x = layers.dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return layers.dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class UNet(nn.Module):
  """`apply({"params": p}, x, t, context=None, class_labels=None)` -> prediction, both [B, H, W, C].

  x: [B, H, W, in_channels]; t: [B] float timesteps (training units); context: [B, L, D] for
  cross-attention; class_labels: [B] int for class-conditional models (`num_class_embeds`); timestep_cond:
  [B, time_cond_proj_dim] for an LCM-distilled U-Net (`time_cond_proj_dim`; `guidance_embedding` of
  guidance_scale - 1). None there is diffusers' `timestep_cond=None` (no cond_proj term: cond_proj has no bias, so
  this is the same as zeros); given to a U-Net without time_cond_proj_dim it is an error.
  down_residuals / mid_residual: ControlNet outputs (sdjax.models.controlnet), added to the skip connections (a
  tuple with one [B, h_i, w_i, C_i] per skip, conv_in's first) and to the mid block's output, as diffusers'
  `down_block_additional_residuals` / `mid_block_additional_residual`; either may be given alone.
  ip_adapter: IP-Adapter inputs (sdjax.ip_adapter), a sequence of (tokens [B, N_i, cross_attention_dim], scale)
  pairs, one per adapter i: the projected image tokens every attn2 attends to besides the context (diffusers'
  `IPAdapterAttnProcessor2_0`, see layers.Attention). scale: a scalar or [B], or a dict from diffusers' attention
  block names ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.2") to one
  (every attention block named). The params then need attn2/to_k_ip_i and attn2/to_v_ip_i (no bias).
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, context=None, class_labels=None, added_cond=None, train: bool = False,
               timestep_cond=None, ip_adapter=None, down_residuals=None, mid_residual=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects x of shape [B, H, W, {cfg.in_channels}], got {x.shape}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    if cfg.cross_attention_dim is not None:
      if context is None:
        raise ValueError("this UNet has cross_attention_dim set and needs a context [B, L, D]")
      if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
        raise ValueError(f"UNet expects context of shape [B, L, {cfg.cross_attention_dim}], got {context.shape}")
    if cfg.num_class_embeds is not None and class_labels is None:
      raise ValueError("this UNet is class-conditional (num_class_embeds) and needs class_labels [B]")
    if ip_adapter is not None:
      ip_adapter = _check_ip_adapter(ip_adapter, x.shape[0], cfg.cross_attention_dim)

    # Time (and class, and SDXL text/size) embedding, [B, 4*C0].
    temb = layers.timestep_embedding(t, chans[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
    if cfg.time_cond_proj_dim is None:
      if timestep_cond is not None:
        raise ValueError("timestep_cond given, but this UNet has no time_cond_proj_dim (not an LCM-distilled U-Net)")
      emb = layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="time_embedding")(temb.astype(dtype))
    else:
      cond = jnp.zeros((x.shape[0], cfg.time_cond_proj_dim)) if timestep_cond is None else timestep_cond
      if cond.shape != (x.shape[0], cfg.time_cond_proj_dim):
        raise ValueError(f"UNet expects timestep_cond of shape [B, {cfg.time_cond_proj_dim}] "
                         f"(time_cond_proj_dim), got {cond.shape}")
      emb = CondTimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="time_embedding")(
          temb.astype(dtype), cond.astype(dtype))
    if cfg.num_class_embeds is not None:
      emb = emb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=dtype, name="class_embedding",
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(1.0), layers.EMBED_AXES))(class_labels)
    if cfg.addition_embed_type == "text_time":
      emb = emb + text_time_embedding(cfg, added_cond, x.shape[0], dtype)
    if context is not None:
      context = context.astype(dtype)
    deterministic = not train
    # Flax counts `self` as argument 0: (up_size, deterministic) are static.
    block_cls = remat_lib.wrap(UNetBlock, cfg.remat, static_argnums=(5, 6))

    h = layers.conv(chans[0], dtype=dtype, name="conv_in")(x.astype(dtype))
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      block = block_cls(cfg, i, kind == "CrossAttnDownBlock2D", "down", name=f"down_blocks_{i}")
      h, outs = block(h, emb, context, None, None, deterministic, ip_adapter)
      skips.extend(outs)
    h, _ = block_cls(cfg, len(chans) - 1, cfg.mid_block_attention, "mid", name="mid_block")(
        h, emb, context, None, None, deterministic, ip_adapter)
    if down_residuals is not None or mid_residual is not None:  # ControlNet (diffusers' *_additional_residual*)
      skips, h = _add_residuals(skips, h, down_residuals, mid_residual)
    for i, kind in enumerate(cfg.up_block_types):
      n = cfg.layers_per_block + 1
      skips, block_skips = skips[:-n], tuple(skips[-n:][::-1])
      block = block_cls(cfg, len(chans) - 1 - i, kind == "CrossAttnUpBlock2D", "up", name=f"up_blocks_{i}")
      up_size = tuple(skips[-1].shape[1:3]) if skips else None
      h, _ = block(h, emb, context, block_skips, up_size, deterministic, ip_adapter)

    h = nn.silu(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=dtype, name="conv_norm_out")(h))
    h = layers.conv(cfg.out_channels, dtype=dtype, name="conv_out")(h)
    return h.astype(jnp.float32)


def text_time_embedding(cfg: UNetConfig, added_cond, batch: int, dtype, owner: str = "UNet") -> jax.Array:
  """SDXL: add_embedding([text_embeds, sinusoidal(time_ids) flattened]) [B, time_embed_dim], created in the calling
  module's scope (the U-Net's and the ControlNet's `add_embedding`). `owner` names the caller in errors."""
  if not isinstance(added_cond, dict) or not {"text_embeds", "time_ids"} <= set(added_cond):
    raise ValueError(f"this {owner} (addition_embed_type='text_time', SDXL) needs "
                     "added_cond={'text_embeds': [B, D], 'time_ids': [B, N]} (N = 6, the refiner's 5)")
  text, ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"], jnp.float32)
  if text.ndim != 2 or ids.ndim != 2 or text.shape[0] != batch or ids.shape[0] != batch:
    raise ValueError(f"added_cond: text_embeds must be [B, D] and time_ids [B, N] with B={batch}, got "
                     f"{text.shape} and {ids.shape}")
  width = text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim
  if width != cfg.projection_class_embeddings_input_dim:
    raise ValueError(f"added_cond: text_embeds {text.shape} and time_ids {ids.shape} give {width} features; the "
                     f"{owner}'s projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
  time_embeds = layers.timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                                          flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
  add = jnp.concatenate([text.astype(jnp.float32), time_embeds.reshape(batch, -1)], axis=-1)
  return layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="add_embedding")(add.astype(dtype))


def _add_residuals(skips: list, h, down_residuals, mid_residual) -> tuple[list, jax.Array]:
  """(skips, h) with the ControlNet residuals added; shapes checked against the U-Net's own."""
  if down_residuals is not None:
    down_residuals = tuple(down_residuals)
    if len(down_residuals) != len(skips):
      raise ValueError(f"down_residuals has {len(down_residuals)} entries, the U-Net has {len(skips)} skip "
                       "connections")
    for i, (s, r) in enumerate(zip(skips, down_residuals)):
      if tuple(r.shape) != tuple(s.shape):
        raise ValueError(f"down_residuals[{i}] has shape {tuple(r.shape)}, the U-Net's skip {i} is {tuple(s.shape)}")
    skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
  if mid_residual is not None:
    if tuple(mid_residual.shape) != tuple(h.shape):
      raise ValueError(f"mid_residual has shape {tuple(mid_residual.shape)}, the U-Net's mid block output is "
                       f"{tuple(h.shape)}")
    h = h + mid_residual.astype(h.dtype)
  return skips, h


def _check_ip_adapter(ip_adapter, batch: int, width: int | None) -> tuple:
  """UNet's ip_adapter argument as a tuple of (tokens, scale) pairs, shapes checked."""
  if width is None:
    raise ValueError("ip_adapter given, but this UNet has no cross-attention (cross_attention_dim is None)")
  pairs = tuple(ip_adapter)
  for i, pair in enumerate(pairs):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"ip_adapter[{i}]: expected a (tokens, scale) pair, got {type(pair).__name__}")
    tokens, scale = pair
    if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != width:
      raise ValueError(f"ip_adapter[{i}]: tokens must be [B={batch}, N, {width}] (cross_attention_dim), got "
                       f"{tuple(tokens.shape)}")
    for s in (scale.values() if isinstance(scale, dict) else (scale,)):
      if jnp.ndim(s) not in (0, 1) or (jnp.ndim(s) == 1 and jnp.shape(s)[0] != batch):
        raise ValueError(f"ip_adapter[{i}]: a scale must be a scalar or [B={batch}], got shape {jnp.shape(s)}")
  return tuple((tokens, scale) for tokens, scale in pairs)


def _ip_for_block(ip_adapter, name: str):
  """The (tokens, scale) pairs of the attention block diffusers names `name`: dict scales looked up by it."""
  if ip_adapter is None:
    return None
  out = []
  for i, (tokens, scale) in enumerate(ip_adapter):
    if isinstance(scale, dict):
      if name not in scale:
        raise ValueError(f"ip_adapter[{i}]: the per-block scale has no entry for attention block {name!r} "
                         f"(it has {sorted(scale)})")
      scale = scale[name]
    out.append((tokens, scale))
  return tuple(out)


class UNetBlock(nn.Module):
  """One down, mid or up block of the U-Net (diffusers' DownBlock2D / CrossAttnDownBlock2D /
  UNetMidBlock2DCrossAttn / UpBlock2D / CrossAttnUpBlock2D), with diffusers' submodule names.

  `level` indexes block_out_channels. Down blocks return their outputs for the skip connections;
  up blocks take `skips` (in the order they are consumed) and `up_size`, the [H, W] to upsample to
  (None for the last block, which does not upsample). ip_adapter: UNet's, checked (`_check_ip_adapter`).
  """
  config: UNetConfig
  level: int
  has_attention: bool
  kind: str  # "down" | "mid" | "up"

  @nn.compact
  def __call__(self, h, emb, context, skips, up_size, deterministic: bool, ip_adapter=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    c = cfg.block_out_channels[self.level]
    heads = cfg.heads[self.level]
    depth = cfg.per_block(cfg.transformer_layers_per_block)[self.level]
    # Up block i has the flag of down block n - 1 - i (diffusers reverses the list), i.e. of its level.
    only_cross = self.kind != "mid" and cfg.per_block(cfg.only_cross_attention)[self.level]
    last = len(cfg.block_out_channels) - 1

    def resnet(j, x):
      return layers.ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, dtype=dtype,
                                  name=f"resnets_{j}")(x, emb, deterministic)

    def attention(j, x):
      if not self.has_attention:
        return x
      # diffusers' name of this attention block (up block i is at level last - i), for per-block IP-Adapter scales
      block = {"down": f"down_blocks.{self.level}", "mid": "mid_block", "up": f"up_blocks.{last - self.level}"}
      ip = _ip_for_block(ip_adapter, f"{block[self.kind]}.attentions.{j}")
      return layers.Transformer2D(heads, c // heads, depth, cfg.norm_num_groups,
                                  cfg.cross_attention_dim is not None, cfg.use_linear_projection,
                                  dtype=dtype, attention_implementation=cfg.attention_implementation,
                                  only_cross_attention=only_cross, name=f"attentions_{j}")(x, context, ip)

    outs = []
    if self.kind == "down":
      for j in range(cfg.layers_per_block):
        h = attention(j, resnet(j, h))
        outs.append(h)
      if self.level < last:
        h = layers.Downsample2D(c, dtype=dtype, name="downsamplers_0")(h)
        outs.append(h)
    elif self.kind == "mid":
      h = resnet(0, h)
      if self.has_attention:
        h = resnet(1, attention(0, h))
    else:
      for j, skip in enumerate(skips):
        h = attention(j, resnet(j, jnp.concatenate([h, skip], axis=-1)))
      if up_size is not None:
        h = layers.Upsample2D(c, dtype=dtype, name="upsamplers_0")(h, up_size)
    return h, tuple(outs)
