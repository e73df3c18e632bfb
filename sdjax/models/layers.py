"""Building blocks shared by every sdjax U-Net (the small pixel-space ones and SD 1.x/2.x/SDXL).

Modules and parameter names follow diffusers (`resnets_0/norm1`, `attn1/to_q`, ...), so a diffusers
state dict maps onto them by replacing `.` with `/` and `.N` with `_N`. Images are NHWC.
Every kernel carries logical axis names; `sdjax.parallel` maps them onto mesh axes.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models import remat as remat_lib
from sdjax.models.attention import dot_product_attention

Dtype = Any

# Logical axis names. Convolution kernels are [kh, kw, in, out]; dense kernels are [in, out].
CONV_AXES = ("conv_h", "conv_w", "channels_in", "channels_out")
DENSE_AXES = ("channels_in", "channels_out")
BIAS_AXES = ("channels_out",)
NORM_AXES = ("norm",)
EMBED_AXES = ("vocab", "channels_out")


def _kernel(axes):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def dense(features: int, *, use_bias: bool = True, dtype: Dtype = jnp.float32, name: str | None = None):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_kernel(DENSE_AXES),
                  bias_init=_zeros(BIAS_AXES), name=name)


def conv(features: int, kernel: int = 3, *, stride: int = 1, padding: Any = None, dtype: Dtype = jnp.float32,
         name: str | None = None):
  """Conv2d; `padding` defaults to kernel // 2 on every side (PyTorch's `padding=k // 2`)."""
  if padding is None:
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, kernel_init=_kernel(CONV_AXES), bias_init=_zeros(BIAS_AXES), name=name)


def group_norm(groups: int, eps: float, *, dtype: Dtype = jnp.float32, name: str | None = None):
  # Statistics are reduced in float32 whatever the compute dtype (force_float32_reductions).
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, scale_init=_ones(NORM_AXES),
                      bias_init=_zeros(NORM_AXES), name=name)


def layer_norm(eps: float = 1e-5, *, dtype: Dtype = jnp.float32, name: str | None = None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=_ones(NORM_AXES), bias_init=_zeros(NORM_AXES),
                      name=name)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`.

  t: [B] -> [B, dim], computed in float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + (1x1) shortcut."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, deterministic: bool = True):
    # x: [B, H, W, Cin], temb: [B, T]
    h = nn.silu(group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
    h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
    if temb is not None:
      t = dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Downsample2D(nn.Module):
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(self.out_channels, stride=2, dtype=self.dtype, name="conv")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to `size` (default 2x) with PyTorch's `mode="nearest"`
  rule, source index floor(i * in / out); for sizes that are not multiples (e.g. 3 -> 5) it differs
  from half-pixel-centred resizing."""
  _, h, w, _ = x.shape
  size = size or (2 * h, 2 * w)
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (np.arange(size[0]) * h) // size[0]
  cols = (np.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int] | None = None):
    return conv(self.out_channels, dtype=self.dtype, name="conv")(upsample_nearest(x, size))


class Attention(nn.Module):
  """Multi-head attention with diffusers' names: to_q, to_k, to_v (no bias), to_out_0.

  ip: IP-Adapter's decoupled cross-attention (diffusers' `IPAdapterAttnProcessor2_0`), a sequence of
  (tokens [B, N_i, D_i], scale) pairs, one per adapter i; scale is a scalar or [B] (per row). Each adapter adds
  scale * attention(q, to_k_ip_i(tokens), to_v_ip_i(tokens)) to the attention output before to_out_0; its
  projections to_k_ip_i / to_v_ip_i (no bias; diffusers' `to_k_ip.i`) exist only in a module called with `ip`.
  """
  heads: int
  head_dim: int
  out_features: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None  # sdjax.models.attention implementation; None = automatic

  @nn.compact
  def __call__(self, x, context=None, ip=None):
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
    k = dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
    v = dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)
    out = dot_product_attention(split(q), split(k), split(v), implementation=self.implementation)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    for i, (tokens, scale) in enumerate(ip or ()):
      tokens = tokens.astype(self.dtype)
      k_ip = dense(inner, use_bias=False, dtype=self.dtype, name=f"to_k_ip_{i}")(tokens)
      v_ip = dense(inner, use_bias=False, dtype=self.dtype, name=f"to_v_ip_{i}")(tokens)
      o = dot_product_attention(split(q), split(k_ip), split(v_ip), implementation=self.implementation)
      scale = jnp.asarray(scale, jnp.float32)
      scale = scale.reshape((-1, 1, 1)) if scale.ndim else scale  # [B] -> per row
      out = out + (scale * o.reshape(out.shape).astype(jnp.float32)).astype(out.dtype)
    out = remat_lib.name_attention_output(out)
    return dense(self.out_features, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """proj (dim -> 2 * inner), then value * gelu(gate) (Shazeer, 2020; diffusers `GEGLU`)."""
  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward: net_0 (GEGLU, dim -> inner), net_2 (inner -> dim)."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
    return dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, optional cross-attention to `context`, GEGLU feed-forward; pre-LayerNorm residuals.

  only_cross_attention (diffusers' flag of the same name, used by the x4 upscaler's U-Net): attn1 attends to
  `context` instead of to x (its to_k / to_v then take the context's width); attn2 is unchanged. It needs
  cross_attention. ip: IP-Adapter tokens and scales for attn2 (see Attention), None without an adapter.
  """
  dim: int
  heads: int
  head_dim: int
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, context=None, ip=None):
    attn = lambda name: Attention(self.heads, self.head_dim, self.dim, dtype=self.dtype,
                                  implementation=self.attention_implementation, name=name)
    if self.only_cross_attention and not self.cross_attention:
      raise ValueError("only_cross_attention needs a transformer block with cross-attention")
    if self.cross_attention and context is None:
      raise ValueError("this transformer block has cross-attention and needs a context")
    if ip is not None and not self.cross_attention:
      raise ValueError("IP-Adapter tokens need a transformer block with cross-attention (attn2)")
    x = x + attn("attn1")(layer_norm(dtype=self.dtype, name="norm1")(x),
                          context if self.only_cross_attention else None)
    if self.cross_attention:
      x = x + attn("attn2")(layer_norm(dtype=self.dtype, name="norm2")(x), context, ip)
    x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(dtype=self.dtype, name="norm3")(x))
    return x


class Transformer2D(nn.Module):
  """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out, plus the input (residual).

  `use_linear_projection` selects dense (SD 2.x) or 1x1 conv (SD 1.x) projections; `only_cross_attention`:
  see BasicTransformerBlock. ip: IP-Adapter tokens and scales for every block's attn2 (see Attention).
  """
  heads: int
  head_dim: int
  depth: int = 1
  groups: int = 32
  cross_attention: bool = False
  use_linear_projection: bool = False
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  only_cross_attention: bool = False

  @nn.compact
  def __call__(self, x, context=None, ip=None):
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      y = dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
    else:
      y = conv(inner, 1, dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.depth):
      y = BasicTransformerBlock(inner, self.heads, self.head_dim, self.cross_attention, dtype=self.dtype,
                                attention_implementation=self.attention_implementation,
                                only_cross_attention=self.only_cross_attention,
                                name=f"transformer_blocks_{i}")(y, context, ip)
    if self.use_linear_projection:
      y = dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = conv(c, 1, dtype=self.dtype, name="proj_out")(y.reshape(b, h, w, inner))
    return x + y
