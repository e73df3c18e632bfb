"""IP-Adapter (Ye et al. 2023): image prompts for SD 1.x/2.x and SDXL U-Nets, as diffusers 0.42's `load_ip_adapter`,
`set_ip_adapter_scale` and `prepare_ip_adapter_image_embeds` do it.

  from sdjax import ip_adapter, pipelines
  from sdjax.convert.clip_vision import load_clip_vision
  adapter = ip_adapter.load("ip-adapter_sd15.safetensors", sd.unet.config)   # params of one adapter
  params = {**params, "ip_adapter": (adapter,)}                              # one entry per adapter
  encoder, encoder_params = load_clip_vision("image_encoder")              # CLIPVisionModelWithProjection
  embeds, negative = ip_adapter.encode_image(encoder, encoder_params, images_uint8,
                                             output_hidden_states=ip_adapter.uses_hidden_states(adapter))
  prompt = prompt._replace(ip_adapter=ip_adapter.inputs(sd.unet.config, [embeds], scale=0.6,
                                                        negative_image_embeds=[negative]))
  images = pipelines.txt2img(sd, params, prompt, keys, ...)

The model: an image projection turns the image encoder's output into context tokens, and every cross-attention
(attn2) of the U-Net attends to them with its own key/value projections (to_k_ip, to_v_ip), adding scale * that
attention to its text attention before to_out (`layers.Attention`). Two projections (chosen by the file's keys, as
diffusers does): `ImageProjection` (IP-Adapter: the encoder's projected `image_embeds` [B, D] -> linear to
num_tokens * cross_attention_dim, reshape, LayerNorm) and `PlusImageProjection` (IP-Adapter Plus, diffusers'
`IPAdapterPlusImageProjection`: a perceiver resampler of learned queries over the encoder's penultimate hidden
states [B, 1 + patches, hidden]). `encode_image(..., output_hidden_states=uses_hidden_states(adapter))` gives
either input with its negative, as diffusers' `encode_image`.

Params of one adapter, `load`'s result: {"image_proj": {"image_embeds": {kernel, bias}, "norm": {scale, bias}}
(Plus: {"latents", "proj_in", "layers_i": {ln0, ln1, attn: {to_q, to_k, to_v, to_out_0}, ff_0, ff_1: {net_0:
{proj}, net_2}}, "proj_out", "norm_out"}, diffusers' module names), "unet": {down_blocks_1: {attentions_0:
{transformer_blocks_0: {attn2: {to_k_ip: {kernel}, to_v_ip: {kernel}}}}}, ...}}. A pipeline's params hold a tuple
of them under params["ip_adapter"] (the U-Net's own params stay as they were); `merge_unet_params` inserts adapter
i's projections as attn2/to_k_ip_i, attn2/to_v_ip_i (diffusers' `to_k_ip.i`) into a copy of the U-Net's params when
the U-Net is applied, which costs nothing under jit.

Per-image inputs travel in `pipelines.Prompt.ip_adapter` as an `IPAdapterInput` (every leaf has leading axis B):
the image embeddings per adapter, optional negative embeddings (None: zeros, which is what diffusers' `encode_image`
gives a plain adapter; a Plus adapter's come from encoding zero pixels), and the scale per adapter ([B], or per
attention block: see `inputs`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from sdjax.convert import diffusers as dconv
from sdjax.convert import safetensors_io
from sdjax.convert.tree import WeightMismatchError
from sdjax.eval import clip_score
from sdjax.models import layers
from sdjax.models.attention import dot_product_attention
from sdjax.models.clip_vision import CLIPVisionModelWithProjection
from sdjax.models.unet import UNetConfig

class ImageProjection(nn.Module):
  """diffusers' `ImageProjection`: image embeds [B, D] (or [B, n, D], n images) -> tokens [B, n * T, C] =
  LayerNorm(reshape(image_embeds(x), [.., T, C])); params image_embeds {kernel [D, T * C], bias}, norm."""
  num_tokens: int
  cross_attention_dim: int

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    h = layers.dense(self.num_tokens * self.cross_attention_dim, name="image_embeds")(x)
    h = h.reshape(h.shape[:-1] + (self.num_tokens, self.cross_attention_dim))
    h = layers.layer_norm(1e-5, name="norm")(h)
    return h.reshape(b, -1, self.cross_attention_dim)


class _GELUProj(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.gelu(layers.dense(self.features, use_bias=False, name="proj")(x), approximate=False)


class _PlusAttention(nn.Module):
  """diffusers' `Attention(query_dim, dim_head, heads, out_bias=False)` of the resampler: no biases at all."""
  heads: int
  dim_head: int

  @nn.compact
  def __call__(self, x, context):
    dim, inner = x.shape[-1], self.heads * self.dim_head
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
    q = layers.dense(inner, use_bias=False, name="to_q")(x)
    k = layers.dense(inner, use_bias=False, name="to_k")(context)
    v = layers.dense(inner, use_bias=False, name="to_v")(context)
    o = dot_product_attention(split(q), split(k), split(v))
    return layers.dense(dim, use_bias=False, name="to_out_0")(o.reshape(o.shape[0], o.shape[1], inner))


class _PlusBlock(nn.Module):
  """diffusers' `IPAdapterPlusImageProjectionBlock`: the latents attend to [ln0(x), ln1(latents)], residual; then
  LayerNorm (ff_0) + GELU feed-forward without biases (ff_1), residual."""
  heads: int
  dim_head: int
  ff_inner: int

  @nn.compact
  def __call__(self, x, latents):
    lat = layers.layer_norm(1e-5, name="ln1")(latents)
    context = jnp.concatenate([layers.layer_norm(1e-5, name="ln0")(x), lat], axis=1)
    latents = _PlusAttention(self.heads, self.dim_head, name="attn")(lat, context) + latents
    h = layers.layer_norm(1e-5, name="ff_0")(latents)
    return latents + _PlusFeedForward(self.ff_inner, latents.shape[-1], name="ff_1")(h)


class _PlusFeedForward(nn.Module):
  inner: int
  dim: int

  @nn.compact
  def __call__(self, x):
    return layers.dense(self.dim, use_bias=False, name="net_2")(_GELUProj(self.inner, name="net_0")(x))


class PlusImageProjection(nn.Module):
  """diffusers' `IPAdapterPlusImageProjection` (IP-Adapter Plus's Resampler): image encoder hidden states
  [B, T, E] (or [B, n, T, E], n images) -> tokens [B, n * Q, output_dims]: learned latents [1, Q, H] attend, in
  `depth` blocks, to proj_in(x); then proj_out and norm_out. Heads of dim_head 64, as diffusers assumes."""
  num_queries: int
  hidden_dims: int
  output_dims: int
  depth: int
  heads: int
  ff_inner: int
  dim_head: int = 64

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    x = x.reshape((-1,) + x.shape[-2:])  # [B * n, T, E]
    latents = self.param("latents", nn.initializers.normal(self.hidden_dims ** -0.5),
                         (1, self.num_queries, self.hidden_dims))
    latents = jnp.broadcast_to(latents, (x.shape[0],) + latents.shape[1:])
    x = layers.dense(self.hidden_dims, name="proj_in")(x)
    for i in range(self.depth):
      latents = _PlusBlock(self.heads, self.dim_head, self.ff_inner, name=f"layers_{i}")(x, latents)
    out = layers.layer_norm(1e-5, name="norm_out")(layers.dense(self.output_dims, name="proj_out")(latents))
    return out.reshape(b, -1, self.output_dims)


def uses_hidden_states(adapter: Mapping[str, Any]) -> bool:
  """Whether an adapter's projection takes the image encoder's hidden states (Plus) rather than its projected
  image embeddings (diffusers: `not isinstance(image_proj_layer, ImageProjection)`)."""
  return "latents" in adapter["image_proj"]


def projection(adapter: Mapping[str, Any]) -> ImageProjection | PlusImageProjection:
  """The image projection module of one adapter's params (its sizes follow from the param shapes, as in
  diffusers' `_convert_ip_adapter_image_proj_to_diffusers`)."""
  proj = adapter["image_proj"]
  if uses_hidden_states(adapter):
    _, q, h = proj["latents"].shape
    depth = sum(1 for k in proj if k.startswith("layers_"))
    block = proj["layers_0"]
    return PlusImageProjection(q, h, proj["norm_out"]["scale"].shape[0], depth,
                               block["attn"]["to_q"]["kernel"].shape[1] // 64,
                               block["ff_1"]["net_0"]["proj"]["kernel"].shape[1])
  width = proj["norm"]["scale"].shape[0]
  return ImageProjection(proj["image_embeds"]["kernel"].shape[1] // width, width)


def _input_width(adapter: Mapping[str, Any]) -> int:
  proj = adapter["image_proj"]
  return (proj["proj_in"] if uses_hidden_states(adapter) else proj["image_embeds"])["kernel"].shape[0]


def project(adapters: Sequence[Mapping[str, Any]], image_embeds: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """IP tokens [B, n * T, C] per adapter from its image embeddings [B, D] or [B, n, D] (diffusers'
  `MultiIPAdapterImageProjection`)."""
  if len(adapters) != len(image_embeds):
    raise ValueError(f"{len(adapters)} IP-Adapter(s) but {len(image_embeds)} image embedding array(s)")
  out = []
  for i, (adapter, embeds) in enumerate(zip(adapters, image_embeds)):
    module, d = projection(adapter), _input_width(adapter)
    plus = uses_hidden_states(adapter)
    if jnp.ndim(embeds) not in ((3, 4) if plus else (2, 3)) or jnp.shape(embeds)[-1] != d:
      want = f"[B, T, {d}] or [B, n, T, {d}] (image encoder hidden states)" if plus else f"[B, {d}] or [B, n, {d}]"
      raise ValueError(f"IP-Adapter {i}: image embeddings must be {want} (the image projection's input width), "
                       f"got shape {tuple(jnp.shape(embeds))}")
    out.append(module.apply({"params": adapter["image_proj"]}, embeds))
  return tuple(out)


# --- the U-Net's attention layout -------------------------------------------------------------------------------

def cross_attention_layers(config: UNetConfig) -> list[tuple[tuple[str, ...], int]]:
  """(sdjax path of every attn2, its width) in diffusers' `attn_processors` order: down blocks, then up blocks,
  then the mid block (the order UNet2DConditionModel registers them in), each block's attentions and transformer
  blocks in turn. The n-th has the ids "2n+1" in an IP-Adapter file (`_convert_ip_adapter_attn_to_diffusers`
  counts key_id from 1 in steps of 2 over the cross-attention processors)."""
  if config.cross_attention_dim is None:
    raise ValueError("an IP-Adapter needs a U-Net with cross-attention (cross_attention_dim is None)")
  chans, last = config.block_out_channels, len(config.block_out_channels) - 1
  depth = config.per_block(config.transformer_layers_per_block)
  out = []

  def add(block, level, n_attn):
    for j in range(n_attn):
      for k in range(depth[level]):
        out.append(((block, f"attentions_{j}", f"transformer_blocks_{k}", "attn2"), chans[level]))

  for i, kind in enumerate(config.down_block_types):
    if kind == "CrossAttnDownBlock2D":
      add(f"down_blocks_{i}", i, config.layers_per_block)
  for i, kind in enumerate(config.up_block_types):
    if kind == "CrossAttnUpBlock2D":
      add(f"up_blocks_{i}", last - i, config.layers_per_block + 1)
  if config.mid_block_attention:
    add("mid_block", last, 1)
  return out


def attention_block_names(config: UNetConfig) -> list[str]:
  """diffusers' names of the U-Net's attention blocks ("down_blocks.1.attentions.0", "mid_block.attentions.0",
  ...), the keys of a per-block scale."""
  names = []
  for path, _ in cross_attention_layers(config):
    name = f"{path[0].replace('_blocks_', '_blocks.')}.{path[1].replace('_', '.')}"
    if name not in names:
      names.append(name)
  return names


# --- loading ------------------------------------------------------------------------------------------------------

def read(path: str, *, allow_pickle: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """An IP-Adapter file as diffusers' `load_ip_adapter` reads it: {"image_proj": {...}, "ip_adapter": {...}}.

  .safetensors: flat keys "image_proj.<name>" / "ip_adapter.<name>" (others ignored, as diffusers does). A pickle
  (.bin, the original release format: a dict of two state dicts) only with allow_pickle (torch.load with
  weights_only=True; needs torch)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no IP-Adapter weights file at {path}")
  groups: dict[str, dict[str, np.ndarray]] = {"image_proj": {}, "ip_adapter": {}}
  if path.endswith(dconv.PICKLE_SUFFIXES):
    if not allow_pickle:
      dconv.read_state_dict(path)  # raises the pickle refusal
    import torch  # noqa: PLC0415 - optional, only for explicitly allowed pickles
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not {"image_proj", "ip_adapter"} <= set(obj):
      raise ValueError(f"{path}: not an IP-Adapter file (expected a dict with 'image_proj' and 'ip_adapter' "
                       f"state dicts, got {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    for group in groups:
      groups[group] = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj[group].items()}
  else:
    for key, value in safetensors_io.load(path).items():
      group, _, name = key.partition(".")
      if group in groups and name:
        groups[group][name] = value
    if not groups["image_proj"] and not groups["ip_adapter"]:
      raise ValueError(f"{path}: not an IP-Adapter file (no 'image_proj.*' or 'ip_adapter.*' keys)")
  return groups


def _check_keys(path: str, group: str, got: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> None:
  missing = [k for k in shapes if k not in got]
  extra = sorted(k for k in got if k not in shapes)
  wrong = [f"{k} {tuple(got[k].shape)} (expected {shapes[k]})" for k in shapes
           if k in got and tuple(got[k].shape) != shapes[k]]
  if missing or extra or wrong:
    parts = [f"{len(missing)} missing: {', '.join(missing[:12])}" if missing else "",
             f"{len(extra)} unexpected: {', '.join(extra[:12])}" if extra else "",
             f"{len(wrong)} mis-shaped: {', '.join(wrong[:12])}" if wrong else ""]
    raise WeightMismatchError(f"{path}: the IP-Adapter's {group} weights do not fit this U-Net; "
                              + "; ".join(p for p in parts if p))


_f32 = lambda a: np.asarray(a, np.float32)
_norm = lambda proj, key: {"scale": _f32(proj[f"{key}.weight"]), "bias": _f32(proj[f"{key}.bias"])}
_linear = lambda proj, key: {"kernel": _f32(proj[f"{key}.weight"]).T, "bias": _f32(proj[f"{key}.bias"])}


def _plain_projection(proj: Mapping[str, np.ndarray], c: int, what: str) -> dict[str, Any]:
  weight = proj["proj.weight"]
  rows, d = weight.shape if weight.ndim == 2 else (0, 0)
  if rows % c or rows == 0:
    raise WeightMismatchError(f"{what}: image_proj.proj.weight has shape {tuple(weight.shape)}; expected "
                              f"[num_tokens * {c} (the U-Net's cross_attention_dim), image embed width]")
  _check_keys(what, "image_proj", proj, {"proj.weight": (rows, d), "proj.bias": (rows,), "norm.weight": (c,),
                                         "norm.bias": (c,)})
  return {"image_embeds": _linear(proj, "proj"), "norm": _norm(proj, "norm")}


def _plus_projection(proj: Mapping[str, np.ndarray], c: int, what: str) -> dict[str, Any]:
  """The original Resampler's keys (what diffusers' loader reads) -> PlusImageProjection's params: layers.i.0 is the
  attention (norm1 = ln0 on x, norm2 = ln1 on the latents, to_q, to_kv = [to_k; to_v], to_out), layers.i.1 the
  feed-forward (0: LayerNorm, 1: linear, 3: linear)."""
  sizing = ("latents", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
  missing = [k for k in sizing if k not in proj]
  if missing or proj["latents"].ndim != 3:
    raise WeightMismatchError(f"{what}: the IP-Adapter Plus image_proj weights are incomplete (missing "
                              f"{missing or ['latents [1, Q, H]']})")
  _, q, h = proj["latents"].shape
  e = proj["proj_in.weight"].shape[-1]
  inner, ff = proj["layers.0.0.to_q.weight"].shape[0], proj["layers.0.1.1.weight"].shape[0]
  if inner % 64:
    raise WeightMismatchError(f"{what}: layers.0.0.to_q.weight has {inner} rows, not a multiple of 64 (diffusers' "
                              "IPAdapterPlusImageProjection has heads of 64 channels)")
  depth = 1 + max(int(k.split(".")[1]) for k in proj if k.startswith("layers.") and k.split(".")[1].isdigit())
  shapes = {"latents": (1, q, h), "proj_in.weight": (h, e), "proj_in.bias": (h,), "proj_out.weight": (c, h),
            "proj_out.bias": (c,), "norm_out.weight": (c,), "norm_out.bias": (c,)}
  for i in range(depth):
    shapes.update({f"layers.{i}.0.{n}.{w}": (h,) for n in ("norm1", "norm2") for w in ("weight", "bias")})
    shapes.update({f"layers.{i}.0.to_q.weight": (inner, h), f"layers.{i}.0.to_kv.weight": (2 * inner, h),
                   f"layers.{i}.0.to_out.weight": (h, inner), f"layers.{i}.1.0.weight": (h,),
                   f"layers.{i}.1.0.bias": (h,), f"layers.{i}.1.1.weight": (ff, h), f"layers.{i}.1.3.weight": (h, ff)})
  _check_keys(what, "image_proj", proj, shapes)
  kernel = lambda key: {"kernel": _f32(proj[key]).T}
  out = {"latents": _f32(proj["latents"]), "proj_in": _linear(proj, "proj_in"), "proj_out": _linear(proj, "proj_out"),
         "norm_out": _norm(proj, "norm_out")}
  for i in range(depth):
    kv = _f32(proj[f"layers.{i}.0.to_kv.weight"])
    out[f"layers_{i}"] = {
        "ln0": _norm(proj, f"layers.{i}.0.norm1"), "ln1": _norm(proj, f"layers.{i}.0.norm2"),
        "attn": {"to_q": kernel(f"layers.{i}.0.to_q.weight"), "to_k": {"kernel": kv[:inner].T},
                 "to_v": {"kernel": kv[inner:].T}, "to_out_0": kernel(f"layers.{i}.0.to_out.weight")},
        "ff_0": _norm(proj, f"layers.{i}.1.0"),
        "ff_1": {"net_0": {"proj": kernel(f"layers.{i}.1.1.weight")}, "net_2": kernel(f"layers.{i}.1.3.weight")}}
  return out


def from_state_dict(state: Mapping[str, Mapping[str, np.ndarray]], config: UNetConfig, *,
                    what: str = "IP-Adapter") -> dict[str, Any]:
  """One adapter's params (module docstring) from `read`'s groups, checked against the U-Net `config`: every
  key present, none extra, every shape fitting (tokens of cross_attention_dim width; to_k_ip / to_v_ip of each
  attn2 [block width, cross_attention_dim]). Image projections: the plain IP-Adapter's (proj + norm) and IP-Adapter
  Plus's (a Resampler: latents, proj_in, layers.*, proj_out, norm_out); others (Full Face, FaceID) are refused."""
  proj, attn = dict(state.get("image_proj", {})), dict(state.get("ip_adapter", {}))
  c = config.cross_attention_dim
  layout = cross_attention_layers(config)
  if "proj.weight" in proj and "proj.3.weight" not in proj:
    image_proj = _plain_projection(proj, c, what)
  elif "latents" in proj:
    image_proj = _plus_projection(proj, c, what)
  else:
    kind = ("IP-Adapter Full Face" if "proj.3.weight" in proj else
            "IP-Adapter FaceID" if "norm.weight" in proj else "an unknown image projection")
    raise ValueError(f"{what}: image_proj is {kind}; sdjax supports the IP-Adapter projection (image_proj.proj.*, "
                     f"norm.*) and IP-Adapter Plus's resampler (latents, layers.*), keys found: {sorted(proj)[:8]}")
  shapes = {}
  for n, (_, width) in enumerate(layout):
    for name in ("to_k_ip", "to_v_ip"):
      shapes[f"{2 * n + 1}.{name}.weight"] = (width, c)
  _check_keys(what, "ip_adapter", attn, shapes)
  unet: dict[tuple[str, ...], np.ndarray] = {}
  for n, (path, _) in enumerate(layout):
    for name in ("to_k_ip", "to_v_ip"):
      unet[path + (name, "kernel")] = _f32(attn[f"{2 * n + 1}.{name}.weight"]).T
  return {"image_proj": image_proj, "unet": traverse_util.unflatten_dict(unet)}


def load(path: str, config: UNetConfig, *, allow_pickle: bool = False) -> dict[str, Any]:
  """One adapter's params from a diffusers-format IP-Adapter file (e.g. ip-adapter_sd15.safetensors, or the .bin
  with allow_pickle) for a U-Net of `config`; errors name the file and every missing, extra or mis-shaped key."""
  return from_state_dict(read(path, allow_pickle=allow_pickle), config, what=path)


def merge_unet_params(unet_params: Any, adapters: Sequence[Mapping[str, Any]]) -> dict:
  """A copy of the U-Net's params with adapter i's projections as .../attn2/to_k_ip_i and to_v_ip_i."""
  flat = traverse_util.flatten_dict(unet_params)
  for i, adapter in enumerate(adapters):
    for path, leaf in traverse_util.flatten_dict(adapter["unet"]).items():
      if path[:-2] + ("to_q", "kernel") not in flat:
        raise ValueError(f"IP-Adapter {i}: the U-Net has no attention layer {'/'.join(path[:-2])} (an adapter "
                         "for another U-Net?)")
      flat[path[:-2] + (f"{path[-2]}_{i}", path[-1])] = leaf
  return traverse_util.unflatten_dict(flat)


# --- per-image inputs -----------------------------------------------------------------------------------------

class IPAdapterInput(NamedTuple):
  """The IP-Adapter inputs of a batch of B images (a pytree; every leaf has leading axis B), one entry per adapter.

  image_embeds: [B, D] or [B, n, D] (n images per prompt; the image encoder's projected `image_embeds`, see
  `encode_image`), for a Plus adapter hidden states [B, T, W] or [B, n, T, W]. negative_image_embeds: the same for
  the unconditional branch of classifier-free guidance, or None for zeros (right for a plain adapter only: a Plus
  adapter's are `encode_image`'s second output). scale: [B], or a dict from every attention block name
  (`attention_block_names`) to [B] (built by `inputs` from diffusers' `set_ip_adapter_scale` arguments).
  """
  image_embeds: tuple[jax.Array, ...]
  negative_image_embeds: tuple[jax.Array, ...] | None = None
  scale: tuple[Any, ...] = ()


def expand_scale(config: UNetConfig, scale: float | Mapping[str, Any]) -> float | dict[str, float]:
  """One adapter's scale as diffusers' `set_ip_adapter_scale` resolves it: a float applies everywhere; a dict
  ({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 1.0}, per transformer-carrying block
  one value or one per attention) becomes {attention block name: float}, every block not named getting 0 (diffusers'
  `_maybe_expand_lora_scales(..., default_scale=0.0)`)."""
  if not isinstance(scale, Mapping):
    return float(scale)
  unknown = sorted(set(scale) - {"down", "mid", "up"})
  if unknown:
    raise ValueError(f"IP-Adapter scale: unknown key(s) {unknown}; expected 'down', 'mid', 'up'")
  names = attention_block_names(config)
  out = {name: 0.0 for name in names}
  if "mid" in scale:
    mid = scale["mid"]
    if isinstance(mid, (list, tuple)):
      if len(mid) != 1:
        raise ValueError(f"IP-Adapter scale: expected 1 scale for mid, got {len(mid)}")
      mid = mid[0]
    out["mid_block.attentions.0"] = float(mid)
  per_block = {"down": config.layers_per_block, "up": config.layers_per_block + 1}
  for updown, count in per_block.items():
    value = scale.get(updown, 0.0)
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith(f"{updown}_blocks.")})
    if not isinstance(value, Mapping):
      value = {f"block_{i}": value for i in blocks}
    bad = sorted(set(value) - {f"block_{i}" for i in blocks})
    if bad:
      raise ValueError(f"IP-Adapter scale: {updown} has no attention block(s) {bad}; blocks with attention: "
                       f"{[f'block_{i}' for i in blocks]}")
    for i in blocks:
      v = value.get(f"block_{i}", 0.0)
      v = list(v) if isinstance(v, (list, tuple)) else [v]
      if len(v) == 1:
        v = v * count
      if len(v) != count:
        raise ValueError(f"IP-Adapter scale: expected {count} scales for {updown}.block_{i}, got {len(v)}")
      for j, s in enumerate(v):
        out[f"{updown}_blocks.{i}.attentions.{j}"] = float(s)
  return out


def inputs(config: UNetConfig, image_embeds: Sequence[Any], scale: Any = 1.0,
           negative_image_embeds: Sequence[Any] | None = None) -> IPAdapterInput:
  """An `IPAdapterInput` for a U-Net of `config`: image_embeds (and negative_image_embeds, None: zeros) one array
  [B, D] or [B, n, D] per adapter; scale: what diffusers' `set_ip_adapter_scale` takes (a float or a per-block
  dict, or a list of them, one per adapter; a single one applies to every adapter), broadcast to [B]."""
  image_embeds = tuple(jnp.asarray(e, jnp.float32) for e in image_embeds)
  if not image_embeds:
    raise ValueError("IP-Adapter inputs need image embeddings for at least one adapter")
  b = image_embeds[0].shape[0]
  scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
  if len(scales) == 1:
    scales = scales * len(image_embeds)
  if len(scales) != len(image_embeds):
    raise ValueError(f"{len(scales)} IP-Adapter scale(s) for {len(image_embeds)} adapter(s)")
  row = lambda v: np.full((b,), v, np.float32)
  scales = [expand_scale(config, s) for s in scales]
  scales = tuple({k: row(v) for k, v in s.items()} if isinstance(s, dict) else row(s) for s in scales)
  negative = None
  if negative_image_embeds is not None:
    negative = tuple(jnp.asarray(e, jnp.float32) for e in negative_image_embeds)
    if [e.shape for e in negative] != [e.shape for e in image_embeds]:
      raise ValueError(f"negative_image_embeds {[e.shape for e in negative]} and image_embeds "
                       f"{[e.shape for e in image_embeds]} differ in shape")
  return IPAdapterInput(image_embeds, negative, scales)


def conditioning(adapters: Sequence[Mapping[str, Any]], ip: IPAdapterInput) -> tuple[tuple, tuple]:
  """(cond, uncond) values of the U-Net's `ip_adapter` argument: (projected tokens, scale) per adapter for the
  image embeddings and for the negative ones (zeros when not given)."""
  if len(ip.scale) != len(ip.image_embeds):
    raise ValueError(f"IPAdapterInput: {len(ip.scale)} scale(s) for {len(ip.image_embeds)} adapter(s)")
  negative = ip.negative_image_embeds
  negative = tuple(jnp.zeros_like(e) for e in ip.image_embeds) if negative is None else negative
  cond = tuple(zip(project(adapters, ip.image_embeds), ip.scale))
  uncond = tuple(zip(project(adapters, negative), ip.scale))
  return cond, uncond


def encode_image(encoder: CLIPVisionModelWithProjection, encoder_params: Any, images: jax.Array, *,
                 output_hidden_states: bool = False, size: int | None = None, rescale_factor: float = 1 / 255,
                 mean=clip_score.CLIP_MEAN, std=clip_score.CLIP_STD) -> tuple[jax.Array, jax.Array]:
  """(image embeddings, negative image embeddings) of uint8 RGB images [B, H, W, 3], float32, as diffusers'
  `encode_image`: preprocessing by the CLIPImageProcessor that `load_ip_adapter` creates (resize of the shortest
  side and center crop to the encoder's image_size; a feature extractor's settings as keywords; PIL backend,
  `sdjax.eval.clip_score.preprocess`, bit-exact), then CLIPVisionModelWithProjection. A plain adapter: its
  `image_embeds` [B, projection_dim] and zeros; output_hidden_states (IP-Adapter Plus, `uses_hidden_states`): the
  penultimate hidden states [B, 1 + patches, hidden] of the images and of all-zero pixel values. Jittable
  (encoder static)."""
  pixels = clip_score.preprocess(images, encoder.config.image_size, size=size, rescale_factor=rescale_factor,
                                 mean=mean, std=std).astype(jnp.dtype(encoder.config.dtype))
  if not output_hidden_states:
    _, embeds = encoder.apply({"params": encoder_params}, pixels)
    embeds = embeds.astype(jnp.float32)
    return embeds, jnp.zeros_like(embeds)
  both = jnp.concatenate([pixels, jnp.zeros_like(pixels)])
  _, _, states = encoder.apply({"params": encoder_params}, both, output_hidden_states=True)
  hidden = states[-2].astype(jnp.float32)
  return hidden[:images.shape[0]], hidden[images.shape[0]:]
