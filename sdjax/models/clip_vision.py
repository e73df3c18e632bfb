"""CLIP vision tower with its projection (transformers' `CLIPVisionModelWithProjection`) in Flax Linen.

One module covers OpenAI CLIP ViT-B/32, B/16, L/14 (quick_gelu) and OpenCLIP ViT-H/14 and bigG/14 converted to the
transformers layout (gelu): every shape comes from `CLIPVisionConfig`. Parameter paths mirror transformers'
state-dict keys (`vision_model/encoder/layers_0/self_attn/q_proj`, `visual_projection`, ...), so
`sdjax.convert.clip_vision` maps a checkpoint onto them by name; the one transformers parameter that is not a
module's weight, `vision_model.embeddings.class_embedding`, is the `embedding` of a `class_embedding` child here
(`normalize_state_dict` renames it). Images are NHWC, already preprocessed (`sdjax.eval.clip_score.preprocess`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models import layers, validate
from sdjax.models.clip import ACTIVATIONS, DROPOUT_KEYS, METADATA_KEYS, POSITION_AXES, CLIPEncoder
from sdjax.models.validate import MAX_LAYERS, MAX_SIZE, MAX_WIDTH, STR, floats, ints

CLASS_EMBEDDING_KEY = "vision_model.embeddings.class_embedding"  # an nn.Parameter in transformers, no `.weight`
_FIELDS = {
    "hidden_size": ints(1, MAX_WIDTH), "intermediate_size": ints(1, MAX_WIDTH), "projection_dim": ints(1, MAX_WIDTH),
    "num_hidden_layers": ints(1, MAX_LAYERS), "num_attention_heads": ints(1, MAX_WIDTH),
    "num_channels": ints(1, MAX_WIDTH), "image_size": ints(1, MAX_SIZE), "patch_size": ints(1, MAX_SIZE),
    "hidden_act": STR, "layer_norm_eps": floats(0, open_lo=True), "dtype": STR,
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision-tower hyper-parameters, named as in transformers' `CLIPVisionConfig` (defaults: OpenAI ViT-B/32).

  Released shapes (hidden, intermediate, layers, heads, patch, projection; image_size 224):
    ViT-B/32  768, 3072, 12, 12, 32, 512   quick_gelu
    ViT-B/16  768, 3072, 12, 12, 16, 512   quick_gelu
    ViT-L/14  1024, 4096, 24, 16, 14, 768  quick_gelu   (SD 1.x's text tower's sibling; torchmetrics' default)
    ViT-H/14  1280, 5120, 32, 16, 14, 1024 gelu         (OpenCLIP LAION-2B, SD 2.x's text tower's sibling)
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"  # compute dtype; params are always float32

  def __post_init__(self):
    validate.check(self, _FIELDS)
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIPVisionConfig.hidden_act: unsupported activation {self.hidden_act!r}; "
                       f"expected one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPVisionConfig.hidden_size ({self.hidden_size}) is not divisible by "
                       f"num_attention_heads ({self.num_attention_heads})")
    if self.patch_size > self.image_size:
      raise ValueError(f"CLIPVisionConfig.patch_size ({self.patch_size}) is larger than image_size "
                       f"({self.image_size})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    """Patches per image: (image_size // patch_size) ** 2, as transformers (a remainder is cropped by the conv)."""
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any]) -> "CLIPVisionConfig":
    """From a transformers vision `config.json` dict; a full `CLIPConfig`'s `vision_config` is taken, with the
    top-level `projection_dim` (the one `CLIPModel`'s `visual_projection` is built with)."""
    d = dict(d)
    for key in ("vision_config", "vision_config_dict"):
      if not isinstance(d.get(key) or {}, dict):
        raise ValueError(f"CLIPVisionConfig: {key} is {type(d[key]).__name__} {d[key]!r:.60} (expected an object)")
    if "vision_config" in d or d.get("model_type") == "clip":  # a full CLIPConfig: only its vision tower
      sub = dict(d.get("vision_config") or {})
      sub.update(d.get("vision_config_dict") or {})  # old configs: vision_config_dict overrides vision_config
      if d.get("projection_dim") is not None:
        sub["projection_dim"] = d["projection_dim"]
      d = sub
    model_type = d.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise ValueError(f"CLIPVisionConfig: model_type {model_type!r} is not a CLIP vision model "
                       "(expected 'clip_vision_model')")
    if d.get("pruned_heads"):
      raise ValueError(f"CLIPVisionConfig.pruned_heads: pruned attention heads are not supported, "
                       f"got {d['pruned_heads']}")
    for key in DROPOUT_KEYS:
      if d.pop(key, 0.0) not in (0, 0.0, None):
        raise ValueError(f"CLIPVisionConfig: {key} must be 0 (dropout is not implemented for the vision tower)")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    # Text-tower fields that transformers writes into every vision sub-config (PretrainedConfig defaults).
    ignored = METADATA_KEYS | {"pad_token_id", "bos_token_id", "eos_token_id", "vocab_size"}
    unknown = sorted(k for k in d if k not in fields and k not in ignored and not k.startswith("_"))
    if unknown:
      raise ValueError(f"CLIPVisionConfig: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    kwargs = {k: v for k, v in d.items() if k in fields}
    if kwargs.get("layer_norm_eps") is None:
      kwargs.pop("layer_norm_eps", None)
    return cls(**kwargs)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The transformers `CLIPVisionModelWithProjection` config.json dict of this tower."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dtype"}
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "attention_dropout": 0.0, "torch_dtype": "float32", **d}


def init_args(config: CLIPVisionConfig) -> tuple[jax.Array]:
  """Example inputs for `init`/`eval_shape`: one preprocessed NHWC image."""
  return (jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32),)


def normalize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """A transformers vision state dict in the layout these parameter paths mirror: the class embedding gets
  the `.weight` suffix of its Flax child (`embedding` leaf); `position_ids` buffers are dropped by the loader."""
  return {CLASS_EMBEDDING_KEY + ".weight" if k == CLASS_EMBEDDING_KEY else k: v for k, v in state_dict.items()}


class ClassEmbedding(nn.Module):
  """The learned [CLS] token, one vector of hidden_size (transformers' `embeddings.class_embedding`)."""
  features: int

  @nn.compact
  def __call__(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.features ** -0.5), layers.BIAS_AXES)
    return self.param("embedding", init, (self.features,))


class CLIPVisionEmbeddings(nn.Module):
  """Patch conv (stride = kernel = patch_size, no bias), prepended [CLS], plus learned position embeddings."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dtype,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), layers.CONV_AXES),
                      name="patch_embedding")(pixel_values)  # [B, H/p, W/p, C]
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over (h, w), as torch's flatten(2)
    cls = jnp.broadcast_to(ClassEmbedding(cfg.hidden_size, name="class_embedding")().astype(dtype),
                           (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches.astype(dtype)], axis=1)  # [B, 1 + N, C]
    positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=dtype, name="position_embedding",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), POSITION_AXES))
    return x + positions(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
  """embeddings -> pre_layrnorm -> encoder; post_layernorm on the [CLS] state (transformers' `vision_model`;
  `pre_layrnorm` is transformers' spelling)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, name="pre_layrnorm")(x)
    states = CLIPEncoder(cfg, causal=False, name="encoder")(x)
    last = states[-1]
    pooled = layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, name="post_layernorm")(last[:, 0])  # [B, C]
    return last, pooled, states


class CLIPVisionModelWithProjection(nn.Module):
  """transformers' `CLIPVisionModelWithProjection`.

  `apply({"params": p}, pixel_values [B, image_size, image_size, num_channels] (NHWC, preprocessed),
  output_hidden_states=False)` -> `(last_hidden_state [B, 1 + num_patches, hidden], image_embeds [B,
  projection_dim])`; `image_embeds` is `visual_projection(post_layernorm(last_hidden_state[:, 0]))`, not
  normalised. With `output_hidden_states`, a third element: the pre_layrnorm output and every layer's output,
  as transformers' `hidden_states`.
  """
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixel_values, output_hidden_states: bool = False):
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"CLIPVisionModelWithProjection expects pixel_values [batch, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}] (NHWC, preprocessed), got shape {tuple(pixel_values.shape)}")
    last, pooled, states = CLIPVisionTransformer(cfg, name="vision_model")(pixel_values)
    image_embeds = layers.dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                name="visual_projection")(pooled)
    return (last, image_embeds, states) if output_hidden_states else (last, image_embeds)
