"""CLIP / OpenCLIP text encoders (transformers' `CLIPTextModel[WithProjection]`) in Flax Linen, and the tokenizer.

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (quick_gelu), SD 2.x OpenCLIP ViT-H (gelu), SDXL both: CLIP
ViT-L as encoder 1 and OpenCLIP ViT-bigG with a text projection as encoder 2. One module covers them all.
Parameter paths mirror transformers' state-dict keys (`text_model/encoder/layers_0/self_attn/q_proj`, ...),
so `sdjax.convert` maps a checkpoint onto them by name. No torch here: only transformers' tokenizers.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models import layers, validate
from sdjax.models.validate import BOOL, MAX_COUNT, MAX_LAYERS, MAX_WIDTH, STR, floats, ints
from sdjax.models.attention import dot_product_attention

POSITION_AXES = ("positions", "channels_out")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# config.json keys that carry no architecture: transformers bookkeeping and generation/fine-tuning defaults
# that older transformers versions wrote into every config.
METADATA_KEYS = frozenset({
    "transformers_version", "architectures", "model_type", "torch_dtype", "dtype", "name_or_path",
    "initializer_range", "initializer_factor", "output_hidden_states", "output_attentions", "return_dict",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "num_labels", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "gradient_checkpointing", "use_cache",
})
DROPOUT_KEYS = ("attention_dropout", "dropout", "hidden_dropout")  # ignored at 0: inference has no dropout
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at argmax(input_ids) instead
# Type and range of every field (sdjax.models.validate), checked before anything else.
_FIELDS = {
    "vocab_size": ints(1, MAX_COUNT), "hidden_size": ints(1, MAX_WIDTH), "intermediate_size": ints(1, MAX_WIDTH),
    "projection_dim": ints(1, MAX_WIDTH, optional=True), "num_hidden_layers": ints(1, MAX_LAYERS),
    "num_attention_heads": ints(1, MAX_WIDTH), "max_position_embeddings": ints(1, MAX_COUNT), "hidden_act": STR,
    "layer_norm_eps": floats(0, open_lo=True), "pad_token_id": ints(0, MAX_COUNT, optional=True),
    "bos_token_id": ints(0, MAX_COUNT, optional=True), "eos_token_id": ints(0, MAX_COUNT),
    "with_projection": BOOL, "dtype": STR,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text-encoder hyper-parameters, named as in transformers' `CLIPTextConfig` (defaults: SD 1.x's ViT-L/14)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int | None = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 0
  eos_token_id: int = 2
  with_projection: bool = False  # CLIPTextModelWithProjection: pooled output is `text_embeds`
  dtype: str = "float32"         # compute dtype; params are always float32

  def __post_init__(self):
    if isinstance(self.eos_token_id, (list, tuple)):  # transformers allows several; the pooling needs one
      raise ValueError(f"CLIPTextConfig.eos_token_id must be one integer, got {self.eos_token_id!r}")
    validate.check(self, _FIELDS)
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIPTextConfig.hidden_act: unsupported activation {self.hidden_act!r}; "
                       f"expected one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig.hidden_size ({self.hidden_size}) is not divisible by "
                       f"num_attention_heads ({self.num_attention_heads})")
    if self.with_projection and not self.projection_dim:
      raise ValueError("CLIPTextConfig.projection_dim must be set when with_projection is true, "
                       f"got {self.projection_dim!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_diffusers_config(cls, d: dict[str, Any]) -> "CLIPTextConfig":
    """From a transformers text-encoder `config.json` dict (a full `CLIPConfig`'s `text_config` is taken)."""
    d = dict(d)
    architectures = d.get("architectures") or []
    if not isinstance(architectures, (list, tuple)):
      raise ValueError(f"CLIPTextConfig: architectures is {architectures!r:.60} (expected a list of class names)")
    for key in ("text_config", "text_config_dict"):
      if not isinstance(d.get(key) or {}, dict):
        raise ValueError(f"CLIPTextConfig: {key} is {type(d[key]).__name__} {d[key]!r:.60} (expected an object)")
    if "text_config" in d or d.get("model_type") == "clip":  # a full CLIPConfig: only its text tower
      sub = dict(d.get("text_config") or {})
      sub.update(d.get("text_config_dict") or {})  # old configs: text_config_dict overrides text_config
      if "projection_dim" in d:
        sub.setdefault("projection_dim", d["projection_dim"])
      d = sub
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"CLIPTextConfig: model_type {model_type!r} is not a CLIP text model "
                       "(expected 'clip_text_model')")
    if d.get("pruned_heads"):
      raise ValueError(f"CLIPTextConfig.pruned_heads: pruned attention heads are not supported, "
                       f"got {d['pruned_heads']}")
    for key in DROPOUT_KEYS:
      if d.pop(key, 0.0) not in (0, 0.0, None):
        raise ValueError(f"CLIPTextConfig: {key} must be 0 (dropout is not implemented for the text encoder)")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in d.items() if k in fields}
    unknown = sorted(k for k in d if k not in fields and k not in METADATA_KEYS and not k.startswith("_"))
    if unknown:
      raise ValueError(f"CLIPTextConfig: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    kwargs.setdefault("with_projection", "CLIPTextModelWithProjection" in architectures)
    if kwargs.get("layer_norm_eps") is None:
      kwargs.pop("layer_norm_eps", None)
    return cls(**kwargs)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The transformers text-encoder config.json dict of this encoder."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("dtype", "with_projection")}
    arch = "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "torch_dtype": "float32", **d}


def init_args(config: CLIPTextConfig) -> tuple[jax.Array]:
  """Example inputs for `init`/`eval_shape`: one sequence of max_position_embeddings token ids."""
  return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)


def normalize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """A transformers text-encoder state dict in the layout these parameter paths mirror.

  transformers >= 5 saves `CLIPTextModel` without the `text_model.` prefix that checkpoints written by 4.x
  (every SD/SDXL release) carry; older checkpoints also hold the non-parameter `embeddings.position_ids`.
  """
  out = {}
  for key, value in state_dict.items():
    if key.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
      key = "text_model." + key
    if key != "text_model.embeddings.position_ids":
      out[key] = value
  return out


class CLIPAttention(nn.Module):
  """Multi-head self-attention: q_proj, k_proj, v_proj, out_proj (all with bias); causal plus padding mask for
  the text tower, over all tokens for the vision tower (`causal=False`, sdjax.models.clip_vision). `config` is a
  CLIPTextConfig or CLIPVisionConfig (the fields read here have the same names in both)."""
  config: Any
  causal: bool = True

  @nn.compact
  def __call__(self, x, mask=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    b, l, _ = x.shape
    split = lambda a: a.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)  # [B, L, H, D]
    q, k, v = (split(layers.dense(cfg.hidden_size, dtype=dtype, name=f"{n}_proj")(x)) for n in "qkv")
    out = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
    return layers.dense(cfg.hidden_size, dtype=dtype, name="out_proj")(out.reshape(b, l, cfg.hidden_size))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  config: Any  # CLIPTextConfig or CLIPVisionConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    h = ACTIVATIONS[cfg.hidden_act](layers.dense(cfg.intermediate_size, dtype=dtype, name="fc1")(x))
    return layers.dense(cfg.hidden_size, dtype=dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: Any  # CLIPTextConfig or CLIPVisionConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x, mask=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    x = x + CLIPAttention(cfg, self.causal, name="self_attn")(
        layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, name="layer_norm1")(x), mask)
    return x + CLIPMLP(cfg, name="mlp")(layers.layer_norm(cfg.layer_norm_eps, dtype=dtype, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
  """The stack of layers; returns the input and every layer's output (causal: the text tower)."""
  config: Any  # CLIPTextConfig or CLIPVisionConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x, mask=None) -> tuple[jax.Array, ...]:
    states = [x]
    for i in range(self.config.num_hidden_layers):
      states.append(CLIPEncoderLayer(self.config, self.causal, name=f"layers_{i}")(states[-1], mask))
    return tuple(states)


class CLIPTextEmbeddings(nn.Module):
  """Token embedding + learned absolute position embedding."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, name="token_embedding",
                      embedding_init=nn.with_logical_partitioning(init, layers.EMBED_AXES))(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, name="position_embedding",
                         embedding_init=nn.with_logical_partitioning(init, POSITION_AXES))
    return tokens + positions(jnp.arange(input_ids.shape[1]))[None]  # [B, L, C]


class CLIPTextTransformer(nn.Module):
  """embeddings -> encoder -> final_layer_norm (transformers' `text_model`)."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    cfg = self.config
    mask = None
    if attention_mask is not None:  # key padding mask, combined with the causal mask in attention
      mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]  # [B, 1, 1, L]
    states = CLIPEncoder(cfg, name="encoder")(CLIPTextEmbeddings(cfg, name="embeddings")(input_ids), mask)
    last = layers.layer_norm(cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), name="final_layer_norm")(states[-1])
    if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos_at = jnp.argmax(input_ids, axis=-1)  # legacy: EOS is the largest id in the vocabulary
    else:
      eos_at = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first EOS (0 when there is none)
    pooled = jnp.take_along_axis(last, eos_at[:, None, None], axis=1)[:, 0]  # [B, C]
    return last, pooled, states


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when `config.with_projection`.

  `apply({"params": p}, input_ids [B, L] int, attention_mask=None [B, L] 0/1, output_hidden_states=False)`
  -> `(last_hidden_state [B, L, C], pooled)`, pooled being the final-normed state at the EOS token
  ([B, C]) or its projection `text_embeds` ([B, projection_dim]). With `output_hidden_states`, a third
  element: the embeddings output and every layer's output (before the final LayerNorm), as transformers.
  """
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"CLIPTextModel expects input_ids [batch, length], got shape {input_ids.shape}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"CLIPTextModel: attention_mask shape {attention_mask.shape} differs from input_ids "
                       f"shape {input_ids.shape}")
    last, pooled, states = CLIPTextTransformer(cfg, name="text_model")(input_ids, attention_mask)
    if cfg.with_projection:
      pooled = layers.dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                            name="text_projection")(pooled)
    return (last, pooled, states) if output_hidden_states else (last, pooled)


TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # either set is enough


def load_tokenizer(folder: str):
  """transformers' CLIP tokenizer (the `tokenizers`-backed one) from a local tokenizer folder, offline."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
  present = set(os.listdir(folder))
  if not any(set(files) <= present for files in TOKENIZER_FILES):
    raise ValueError(f"tokenizer folder {folder!r} is incomplete: it needs vocab.json and merges.txt (or "
                     f"tokenizer.json); it has {sorted(present)}")
  import transformers  # tokenizers only; imported here so sdjax.models loads without transformers

  cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
  return cls.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Token ids [B, L] int32, padded and truncated to `max_length` (default: model_max_length), as SD pipelines."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
  max_length = max_length or tokenizer.model_max_length
  if not 2 <= max_length <= 100_000:  # transformers' "no limit" is a huge integer
    raise ValueError(f"tokenize: max_length {max_length} is not a usable length; the tokenizer has no "
                     "model_max_length, pass max_length (e.g. the text encoder's max_position_embeddings)")
  ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return np.asarray(ids, np.int32)
