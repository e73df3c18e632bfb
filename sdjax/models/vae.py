"""The KL autoencoder of Stable Diffusion (SD 1.x/2.x, SDXL, SD3, Flux) with diffusers' `AutoencoderKL`
structure and parameter names.

`encode` maps NHWC images in [-1, 1] to the posterior's (mean, logvar); `decode` maps latents back to
images. Latents here are the raw autoencoder latents: use `scale_latents` before handing them to a
diffusion model and `unscale_latents` before decoding, as diffusers' pipelines do.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models import layers, remat as remat_lib, validate
from sdjax.models.validate import MAX_LAYERS, MAX_SIZE, MAX_WIDTH, OPTIONAL_BOOL, STR, STRS, floats, ints
from sdjax.models.attention import dot_product_attention

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)
DTYPES = ("float32", "bfloat16", "float16")
EPS = 1e-6  # every norm in diffusers' Encoder/Decoder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this

_WIDTH = ints(1, MAX_WIDTH)
# Type and range of every field (sdjax.models.validate), checked before anything else.
_FIELDS = {
    "in_channels": _WIDTH, "out_channels": _WIDTH, "down_block_types": STRS, "up_block_types": STRS,
    "block_out_channels": ints(1, MAX_WIDTH, shape="tuple"), "layers_per_block": ints(1, MAX_LAYERS),
    "act_fn": STR, "latent_channels": _WIDTH, "norm_num_groups": _WIDTH,
    "sample_size": ints(1, MAX_SIZE, shape="either"), "scaling_factor": floats(0, open_lo=True),
    "shift_factor": floats(optional=True), "latents_mean": floats(shape="tuple", optional=True, max_len=MAX_WIDTH),
    "latents_std": floats(0, shape="tuple", optional=True, open_lo=True, max_len=MAX_WIDTH),
    "force_upcast": OPTIONAL_BOOL, "use_quant_conv": OPTIONAL_BOOL, "use_post_quant_conv": OPTIONAL_BOOL,
    "mid_block_add_attention": OPTIONAL_BOOL,
    "dtype": STR,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Autoencoder hyper-parameters, named as in diffusers' `AutoencoderKL` config, with its defaults
  (so a `config.json` that omits a field builds the model diffusers would build)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True  # diffusers runs such VAEs in float32; here `dtype` alone decides
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = "float32"  # compute dtype; params are always float32
  # Rematerialisation policy of each block (sdjax.models.remat.POLICIES; True/False = "full"/"none").
  remat: bool | str = "none"

  def __post_init__(self):
    validate.check(self, _FIELDS)
    object.__setattr__(self, "remat", remat_lib.normalize("VAEConfig.remat", self.remat))
    n = len(self.block_out_channels)
    for field in ("down_block_types", "up_block_types"):
      value = getattr(self, field)
      if len(value) != n:
        raise ValueError(f"VAEConfig.{field} has {len(value)} entries, block_out_channels has {n}")
    for field, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
      for kind in getattr(self, field):
        if kind not in known:
          raise ValueError(f"VAEConfig.{field}: unsupported block {kind!r}; expected one of {known}")
    if self.act_fn != "silu":
      raise ValueError(f"VAEConfig.act_fn: unsupported activation {self.act_fn!r}; only 'silu' is implemented")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAEConfig.block_out_channels: {c} is not divisible by norm_num_groups="
                         f"{self.norm_num_groups}")
    for field in ("latents_mean", "latents_std"):
      value = getattr(self, field)
      if value is not None and len(value) != self.latent_channels:
        raise ValueError(f"VAEConfig.{field} has {len(value)} entries, latent_channels is {self.latent_channels}")
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("VAEConfig.latents_mean and latents_std must be given together")
    if self.dtype not in DTYPES:
      raise ValueError(f"VAEConfig.dtype: unsupported compute dtype {self.dtype!r}; expected one of {DTYPES}")

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any], **overrides) -> "VAEConfig":
    """From a diffusers `AutoencoderKL` `config.json` dict; `overrides` set sdjax-only fields (dtype, remat).

    Keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are metadata and ignored; any other
    unknown key is an error, since it would change the model in a way this module does not implement.
    """
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      raise ValueError(f"VAEConfig: _class_name is {class_name!r}; only 'AutoencoderKL' is supported")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"VAEConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in {**d, **overrides}.items()}
    return cls(**d)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config.json dict of this autoencoder (sdjax-only fields dropped)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("dtype", "remat")}
    return {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each axis (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)


def init_args(config: VAEConfig, batch: int = 1, size: int | None = None) -> tuple[jax.Array]:
  """Small example inputs for `AutoencoderKL(config).init`: images whose latent is 2x2 by default."""
  size = size or 2 * config.downscale
  return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),)


_LEGACY_ATTENTION = re.compile(r"^(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Rename the mid-block attention weights of diffusers folders saved before diffusers 0.14
  (`query`, `key`, `value`, `proj_attn` -> `to_q`, `to_k`, `to_v`, `to_out.0`), as diffusers does on load."""
  out = {}
  for key, value in state_dict.items():
    m = _LEGACY_ATTENTION.match(key)
    out[f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key] = value
  return out


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


def _latent_stats(config: VAEConfig):
  shift = config.shift_factor or 0.0
  if config.latents_mean is None:
    return shift, 1.0
  return shift + jnp.asarray(config.latents_mean, jnp.float32), jnp.asarray(config.latents_std, jnp.float32)


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """Autoencoder latents -> diffusion-model latents: `(z - shift) * scaling_factor`.

  As diffusers' pipelines: SD/SDXL `z * scale`, SD3/Flux `(z - shift_factor) * scale`, and where
  `latents_mean`/`latents_std` are set (per channel, the last axis) `(z - mean) * scale / std`.
  """
  shift, std = _latent_stats(config)
  return (z - shift) * config.scaling_factor / std


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """The inverse of `scale_latents`: `z / scaling_factor + shift`, ready for `decode`."""
  shift, std = _latent_stats(config)
  return z * std / config.scaling_factor + shift


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding bottom/right by one (diffusers' Downsample2D with padding=0)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.conv(self.out_channels, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="conv")(x)


class SpatialAttention(nn.Module):
  """One-head self-attention over all H*W positions with GroupNorm in front and a residual
  (diffusers' `Attention` as built by UNetMidBlock2D: group_norm, to_q/to_k/to_v/to_out_0 with biases)."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.group_norm(self.groups, EPS, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    q, k, v = (layers.dense(c, dtype=self.dtype, name=n)(y).reshape(b, h * w, 1, c)
               for n in ("to_q", "to_k", "to_v"))  # [B, HW, 1, C]
    y = dot_product_attention(q, k, v).reshape(b, h * w, c)
    y = layers.dense(c, dtype=self.dtype, name="to_out_0")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnets_0, then (attentions_0 if configured) and resnets_1 (diffusers' UNetMidBlock2D)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    c = cfg.block_out_channels[-1]
    x = layers.ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name="resnets_0")(x, None)
    if cfg.mid_block_add_attention:
      x = SpatialAttention(cfg.norm_num_groups, dtype=dtype, name="attentions_0")(x)
    return layers.ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name="resnets_1")(x, None)


class EncoderBlock(nn.Module):
  """layers_per_block resnets, then a stride-2 downsampler except at the last level (DownEncoderBlock2D)."""
  config: VAEConfig
  level: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    c = cfg.block_out_channels[self.level]
    for j in range(cfg.layers_per_block):
      x = layers.ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name=f"resnets_{j}")(x, None)
    if self.level < len(cfg.block_out_channels) - 1:
      x = Downsample(c, dtype=dtype, name="downsamplers_0")(x)
    return x


class DecoderBlock(nn.Module):
  """layers_per_block + 1 resnets, then a 2x nearest upsampler except at the last block (UpDecoderBlock2D).

  `level` indexes block_out_channels, so decoder up_blocks_i has level len(block_out_channels) - 1 - i.
  """
  config: VAEConfig
  level: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    c = cfg.block_out_channels[self.level]
    for j in range(cfg.layers_per_block + 1):
      x = layers.ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name=f"resnets_{j}")(x, None)
    if self.level > 0:
      x = layers.Upsample2D(c, dtype=dtype, name="upsamplers_0")(x)
    return x


def _maybe_remat(cls, config: VAEConfig):
  return remat_lib.wrap(cls, config.remat)


class Encoder(nn.Module):
  """[B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean and logvar, before quant_conv)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    h = layers.conv(chans[0], dtype=dtype, name="conv_in")(x.astype(dtype))
    for i in range(len(chans)):
      h = _maybe_remat(EncoderBlock, cfg)(cfg, i, name=f"down_blocks_{i}")(h)
    h = _maybe_remat(MidBlock, cfg)(cfg, name="mid_block")(h)
    h = nn.silu(layers.group_norm(cfg.norm_num_groups, EPS, dtype=dtype, name="conv_norm_out")(h))
    return layers.conv(2 * cfg.latent_channels, dtype=dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """[B, h, w, latent_channels] (after post_quant_conv) -> [B, h*f, w*f, out_channels]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    h = layers.conv(chans[-1], dtype=dtype, name="conv_in")(z.astype(dtype))
    h = _maybe_remat(MidBlock, cfg)(cfg, name="mid_block")(h)
    for i in range(len(chans)):
      h = _maybe_remat(DecoderBlock, cfg)(cfg, len(chans) - 1 - i, name=f"up_blocks_{i}")(h)
    h = nn.silu(layers.group_norm(cfg.norm_num_groups, EPS, dtype=dtype, name="conv_norm_out")(h))
    return layers.conv(cfg.out_channels, dtype=dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """The KL autoencoder. NHWC; outputs are float32 whatever the compute dtype.

  `apply({"params": p}, x, method="encode")` -> (mean, logvar), each [B, H/f, W/f, latent_channels];
  `apply({"params": p}, z, method="decode")` -> [B, H, W, out_channels];
  `apply({"params": p}, x, rng=None)` -> reconstruction (posterior mode, or a sample when rng is given).
  """
  config: VAEConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, dtype=dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, 1, dtype=dtype)

  def encode(self, x):
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"AutoencoderKL.encode expects x of shape [B, H, W, {cfg.in_channels}], got {x.shape}")
    if x.shape[1] % cfg.downscale or x.shape[2] % cfg.downscale:
      raise ValueError(f"AutoencoderKL.encode: image size {x.shape[1:3]} is not divisible by {cfg.downscale}")
    h = self.encoder(x)
    if cfg.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    cfg = self.config
    if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
      raise ValueError(f"AutoencoderKL.decode expects z of shape [B, h, w, {cfg.latent_channels}], got {z.shape}")
    z = z.astype(jnp.dtype(cfg.dtype))
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x, rng: jax.Array | None = None):
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample_latent(mean, logvar, rng)
    return self.decode(z)
