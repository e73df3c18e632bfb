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
from flax import linen as nn

from sdjax.models import layers

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


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
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  transformer_layers_per_block: int | tuple[int, ...] = 1
  cross_attention_dim: int | None = 768
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  num_class_embeds: int | None = None
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False     # rematerialise each block in the backward pass

  def __post_init__(self):
    n = len(self.block_out_channels)
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

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"UNetConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)

  def per_block(self, value) -> tuple:
    n = len(self.block_out_channels)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

  @property
  def heads(self) -> tuple[int, ...]:
    return self.per_block(self.num_attention_heads or self.attention_head_dim)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


class UNet(nn.Module):
  """`apply({"params": p}, x, t, context=None, class_labels=None)` -> prediction, both [B, H, W, C].

  x: [B, H, W, in_channels]; t: [B] float timesteps (training units); context: [B, L, D] for
  cross-attention; class_labels: [B] int for class-conditional models (`num_class_embeds`).
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, context=None, class_labels=None, train: bool = False):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects x of shape [B, H, W, {cfg.in_channels}], got {x.shape}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    if cfg.cross_attention_dim is not None and context is None:
      raise ValueError("this UNet has cross_attention_dim set and needs a context [B, L, D]")
    if cfg.num_class_embeds is not None and class_labels is None:
      raise ValueError("this UNet is class-conditional (num_class_embeds) and needs class_labels [B]")

    # Time (and class) embedding, [B, 4*C0].
    temb = layers.timestep_embedding(t, chans[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
    emb = layers.TimestepEmbedding(cfg.time_embed_dim, dtype=dtype, name="time_embedding")(temb.astype(dtype))
    if cfg.num_class_embeds is not None:
      emb = emb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=dtype, name="class_embedding",
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(1.0), layers.EMBED_AXES))(class_labels)
    if context is not None:
      context = context.astype(dtype)
    deterministic = not train
    # Flax counts `self` as argument 0: (up_size, deterministic) are static.
    block_cls = nn.remat(UNetBlock, static_argnums=(5, 6)) if cfg.remat else UNetBlock

    h = layers.conv(chans[0], dtype=dtype, name="conv_in")(x.astype(dtype))
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      block = block_cls(cfg, i, kind == "CrossAttnDownBlock2D", "down", name=f"down_blocks_{i}")
      h, outs = block(h, emb, context, None, None, deterministic)
      skips.extend(outs)
    h, _ = block_cls(cfg, len(chans) - 1, cfg.mid_block_attention, "mid", name="mid_block")(
        h, emb, context, None, None, deterministic)
    for i, kind in enumerate(cfg.up_block_types):
      n = cfg.layers_per_block + 1
      skips, block_skips = skips[:-n], tuple(skips[-n:][::-1])
      block = block_cls(cfg, len(chans) - 1 - i, kind == "CrossAttnUpBlock2D", "up", name=f"up_blocks_{i}")
      up_size = tuple(skips[-1].shape[1:3]) if skips else None
      h, _ = block(h, emb, context, block_skips, up_size, deterministic)

    h = nn.silu(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=dtype, name="conv_norm_out")(h))
    h = layers.conv(cfg.out_channels, dtype=dtype, name="conv_out")(h)
    return h.astype(jnp.float32)


class UNetBlock(nn.Module):
  """One down, mid or up block of the U-Net (diffusers' DownBlock2D / CrossAttnDownBlock2D /
  UNetMidBlock2DCrossAttn / UpBlock2D / CrossAttnUpBlock2D), with diffusers' submodule names.

  `level` indexes block_out_channels. Down blocks return their outputs for the skip connections;
  up blocks take `skips` (in the order they are consumed) and `up_size`, the [H, W] to upsample to
  (None for the last block, which does not upsample).
  """
  config: UNetConfig
  level: int
  has_attention: bool
  kind: str  # "down" | "mid" | "up"

  @nn.compact
  def __call__(self, h, emb, context, skips, up_size, deterministic: bool):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    c = cfg.block_out_channels[self.level]
    heads = cfg.heads[self.level]
    depth = cfg.per_block(cfg.transformer_layers_per_block)[self.level]
    last = len(cfg.block_out_channels) - 1

    def resnet(j, x):
      return layers.ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, dtype=dtype,
                                  name=f"resnets_{j}")(x, emb, deterministic)

    def attention(j, x):
      if not self.has_attention:
        return x
      return layers.Transformer2D(heads, c // heads, depth, cfg.norm_num_groups,
                                  cfg.cross_attention_dim is not None, cfg.use_linear_projection,
                                  dtype=dtype, name=f"attentions_{j}")(x, context)

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
