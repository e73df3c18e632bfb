"""CLIP text encoders against transformers (fixtures from tools/make_clip_fixtures.py), tokenizer, configs.

Parity tolerance: float32 outputs within rtol 1e-4 plus atol 1e-4 * max|reference| (relative to the
tensor's scale), of transformers' PyTorch outputs.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sdjax.convert import safetensors_io
from sdjax.models import clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")
ENCODERS = ("clip_sd1", "clip_sd2", "clip_sdxl2")
CONTAINERS = ("down_blocks", "up_blocks", "mid_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
              "transformer_blocks", "to_out", "net", "layers")
TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=8)


def to_flax(state_dict, shapes):
  """The naming convention in a few lines: `a.layers.3.fc1.weight` -> a/layers_3/fc1/kernel (transposed)."""
  params = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    path = []
    for i, p in enumerate(parts[:-1]):
      if p.isdigit():
        assert parts[i - 1] in CONTAINERS, key
        path[-1] = f"{path[-1]}_{p}"
      else:
        path.append(p)
    node = shapes
    for p in path:
      node = node[p]
    leaf = {"weight": "kernel" if "kernel" in node else "scale" if "scale" in node else "embedding",
            "bias": "bias"}[parts[-1]]
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      value = value.T
    assert value.shape == node[leaf].shape, (key, value.shape, node[leaf].shape)
    tree = params
    for p in path:
      tree = tree.setdefault(p, {})
    tree[leaf] = jnp.asarray(value)
  assert jax.tree.structure(params) == jax.tree.structure(shapes), "every parameter is loaded exactly once"
  return params


def load(name, **overrides):
  folder = os.path.join(FIXTURES, name)
  with open(os.path.join(folder, "config.json")) as f:
    config = dataclasses.replace(clip.CLIPTextConfig.from_diffusers_config(json.load(f)), **overrides)
  model = clip.CLIPTextModel(config)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *clip.init_args(config))))["params"]
  state = clip.normalize_state_dict(safetensors_io.load(os.path.join(folder, "model.safetensors")))
  return model, to_flax(state, shapes), dict(np.load(os.path.join(folder, "reference.npz")))


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)
  return float(np.abs(actual - expected).max() / scale)


@pytest.mark.parametrize("name", ENCODERS)
def test_text_encoder_matches_transformers(name):
  model, params, ref = load(name)
  ids = jnp.asarray(ref["input_ids"])
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))
  last, pooled, states = apply(params, ids, None)
  assert len(states) == model.config.num_hidden_layers + 1
  assert_close(last, ref["last_hidden_state"], f"{name} last_hidden_state")
  assert_close(pooled, ref["pooled"], f"{name} pooled")
  assert_close(states[-2], ref["hidden_states"][-2], f"{name} hidden_states[-2]")
  for i, (state, expected) in enumerate(zip(states, ref["hidden_states"])):
    assert_close(state, expected, f"{name} hidden_states[{i}]")
  # With the padding mask (tokens after EOS masked out as keys), as transformers' attention_mask.
  last, pooled, states = apply(params, ids, jnp.asarray(ref["attention_mask"]))
  assert_close(last, ref["masked_last_hidden_state"], f"{name} masked last_hidden_state")
  assert_close(pooled, ref["masked_pooled"], f"{name} masked pooled")
  assert_close(states[-2], ref["masked_hidden_states"][-2], f"{name} masked hidden_states[-2]")
  # Without output_hidden_states: the two-element contract of load_text_encoder's module.
  out = model.apply({"params": params}, ids)
  assert len(out) == 2
  np.testing.assert_allclose(out[1], apply(params, ids, None)[1], rtol=1e-5, atol=1e-5)  # eager vs jit


def test_fixture_layouts_and_configs():
  sd1 = safetensors_io.load(os.path.join(FIXTURES, "clip_sd1", "model.safetensors"))
  sd2 = safetensors_io.load(os.path.join(FIXTURES, "clip_sd2", "model.safetensors"))
  assert "text_model.embeddings.position_ids" in sd1  # written by transformers 4.x, as SD 1.x checkpoints
  assert "embeddings.token_embedding.weight" in sd2   # transformers 5: no text_model. prefix
  assert set(clip.normalize_state_dict(sd2)) == {k for k in clip.normalize_state_dict(sd1)
                                                 if not k.startswith("text_model.encoder.layers.2.")}
  configs = {}
  for name in ENCODERS:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
      configs[name] = clip.CLIPTextConfig.from_diffusers_config(json.load(f))
  assert configs["clip_sd1"].hidden_act == "quick_gelu" and configs["clip_sd1"].eos_token_id == 2
  assert configs["clip_sd2"].hidden_act == "gelu" and configs["clip_sd2"].eos_token_id == 999
  assert configs["clip_sdxl2"].with_projection and configs["clip_sdxl2"].projection_dim == 24
  assert not configs["clip_sd1"].with_projection


def test_parameter_names_and_logical_axes():
  config = clip.CLIPTextConfig(**TINY, with_projection=True)
  boxed = clip.CLIPTextModel(config).init(jax.random.key(0), *clip.init_args(config))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves), "every parameter has logical axis names"
  params = nn.meta.unbox(boxed)
  assert set(params) == {"text_model", "text_projection"}
  assert set(params["text_projection"]) == {"kernel"}  # no bias
  tm = params["text_model"]
  assert set(tm) == {"embeddings", "encoder", "final_layer_norm"}
  assert tm["embeddings"]["token_embedding"]["embedding"].shape == (50, 16)
  assert tm["embeddings"]["position_embedding"]["embedding"].shape == (8, 16)
  assert set(tm["encoder"]) == {"layers_0", "layers_1"}
  layer = tm["encoder"]["layers_0"]
  assert set(layer) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
  assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
  assert layer["mlp"]["fc1"]["kernel"].shape == (16, 32)
  assert boxed["text_model"]["embeddings"]["token_embedding"]["embedding"].names[0] == "vocab"


def test_pooling_rule_legacy_argmax_vs_first_eos():
  ids = jnp.array([[0, 7, 3, 45, 3, 3, 3, 3],    # EOS (3) at 2, larger id later
                   [0, 9, 9, 9, 9, 9, 49, 3]])   # EOS at 7, largest id at 6
  for eos, expect in ((3, [2, 7]), (2, [3, 6])):  # 2 is the legacy marker: pool at argmax(input_ids)
    config = clip.CLIPTextConfig(**TINY, eos_token_id=eos)
    model = clip.CLIPTextModel(config)
    params = model.init(jax.random.key(1), ids)["params"]
    last, pooled = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(pooled, last[jnp.arange(2), jnp.array(expect)])
  # No EOS at all: position 0, as transformers' argmax over an all-false row.
  config = clip.CLIPTextConfig(**TINY, eos_token_id=40)
  last, pooled = clip.CLIPTextModel(config).apply({"params": params}, ids)
  np.testing.assert_array_equal(pooled, last[:, 0])


def test_padding_mask_and_causality():
  config = clip.CLIPTextConfig(**TINY, eos_token_id=3)
  model = clip.CLIPTextModel(config)
  a = jnp.array([[0, 11, 12, 3, 5, 6, 7, 8]])
  b = jnp.array([[0, 11, 12, 3, 9, 6, 7, 8]])  # same prefix through EOS, one padding token differs
  params = model.init(jax.random.key(2), a)["params"]
  la, pa = model.apply({"params": params}, a)
  lb, pb = model.apply({"params": params}, b)
  # Causal: positions up to EOS, hence the pooled output, do not see later tokens.
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  np.testing.assert_allclose(pa, pb, atol=1e-6)
  assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)  # unmasked, later positions see position 4
  # With a padding mask, padded keys are invisible: positions 5.. no longer see position 4, and the
  # positions up to EOS are exactly as without a mask.
  mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  ma, _ = model.apply({"params": params}, a, mask)
  mb, _ = model.apply({"params": params}, b, mask)
  np.testing.assert_allclose(ma[:, :4], la[:, :4], atol=1e-6)
  np.testing.assert_allclose(ma[:, 5:], mb[:, 5:], atol=1e-6)
  assert not np.allclose(ma[:, 4], mb[:, 4], atol=1e-3)  # its own token still differs
  with pytest.raises(ValueError, match="attention_mask shape"):
    model.apply({"params": params}, a, mask[:, :4])
  with pytest.raises(ValueError, match="max_position_embeddings=8"):
    model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


def test_bfloat16_compute_stays_close():
  model, params, ref = load("clip_sdxl2", dtype="bfloat16")
  last, pooled = model.apply({"params": params}, jnp.asarray(ref["input_ids"]))
  assert last.dtype == jnp.bfloat16
  for out, key in ((last, "last_hidden_state"), (pooled, "pooled")):
    err = np.abs(np.asarray(out, np.float32) - ref[key]).max() / np.abs(ref[key]).max()
    assert err < 0.05, (key, err)


def test_config_errors():
  ok = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "transformers_version": "4.25.0",
        "torch_dtype": "float16", "_name_or_path": "x", "initializer_range": 0.02, "attention_dropout": 0.0,
        "dropout": 0.0, "hidden_act": "gelu", "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 1,
        "output_attentions": False, "id2label": {"0": "LABEL_0"}}
  cfg = clip.CLIPTextConfig.from_diffusers_config(ok)
  assert cfg.hidden_act == "gelu" and cfg.eos_token_id == 49407 and not cfg.with_projection
  assert cfg.dtype == "float32"  # config.json's dtype is the checkpoint's, not the compute dtype
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['frobnicate'\]"):
    clip.CLIPTextConfig.from_diffusers_config({**ok, "frobnicate": 1})
  with pytest.raises(ValueError, match="hidden_act: unsupported activation 'swish'"):
    clip.CLIPTextConfig.from_diffusers_config({**ok, "hidden_act": "swish"})
  with pytest.raises(ValueError, match="attention_dropout must be 0"):
    clip.CLIPTextConfig.from_diffusers_config({**ok, "attention_dropout": 0.1})
  with pytest.raises(ValueError, match="model_type 'clip_vision_model'"):
    clip.CLIPTextConfig.from_diffusers_config({**ok, "model_type": "clip_vision_model"})
  with pytest.raises(ValueError, match="eos_token_id must be one integer"):
    clip.CLIPTextConfig.from_diffusers_config({**ok, "eos_token_id": [49407, 0]})
  with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
    clip.CLIPTextConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="projection_dim must be set"):
    clip.CLIPTextConfig(with_projection=True, projection_dim=None)
  # A full CLIPConfig: its text_config (text_config_dict overriding), the top-level projection_dim.
  full = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 640, "logit_scale_init_value": 2.6,
          "text_config": {**ok, "hidden_size": 1280, "num_attention_heads": 20},
          "text_config_dict": {"num_hidden_layers": 32}, "vision_config": {"hidden_size": 1664}}
  cfg = clip.CLIPTextConfig.from_diffusers_config(full)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.projection_dim) == (1280, 32, 640)
  projection = clip.CLIPTextConfig.from_diffusers_config({**ok, "architectures": ["CLIPTextModelWithProjection"],
                                                          "projection_dim": 1280})
  assert projection.with_projection and projection.projection_dim == 1280


def test_tokenizer_loads_offline_and_reproduces_recorded_ids(tmp_path):
  folder = os.path.join(FIXTURES, "tokenizer")
  ref = np.load(os.path.join(folder, "reference.npz"))
  tok = clip.load_tokenizer(folder)
  ids = clip.tokenize(tok, [str(p) for p in ref["prompts"]])
  assert ids.dtype == np.int32 and ids.shape == (3, 16)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  assert ids[0, 0] == tok.bos_token_id == 998 and tok.eos_token_id == 999
  np.testing.assert_array_equal(clip.tokenize(tok, str(ref["prompts"][0])), ref["input_ids"][:1])
  short = clip.tokenize(tok, ["a photograph of an astronaut riding a horse"], max_length=6)
  assert short.shape == (1, 6) and short[0, -1] == 999 and short[0, 0] == 998  # truncated, EOS kept
  with pytest.raises(ValueError, match="prompts must be"):
    clip.tokenize(tok, [])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip.load_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(ValueError, match="incomplete: it needs vocab.json and merges.txt"):
    clip.load_tokenizer(str(tmp_path))


def test_tokenizer_ids_feed_the_encoder():
  """The fixture encoders were run on the tokenizer's ids (padding after EOS replaced per model)."""
  tok_ids = np.load(os.path.join(FIXTURES, "tokenizer", "reference.npz"))["input_ids"]
  for name in ENCODERS:
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    np.testing.assert_array_equal(np.where(ref["attention_mask"] == 1, ref["input_ids"], 0),
                                  np.where(ref["attention_mask"] == 1, tok_ids, 0))


def test_load_text_encoder_matches_reference():
  convert = pytest.importorskip("sdjax.convert")
  if not hasattr(convert, "load_text_encoder"):
    pytest.skip("sdjax.convert.load_text_encoder is not written yet")
  for name in ENCODERS:
    model, params = convert.load_text_encoder(os.path.join(FIXTURES, name))
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    last, pooled = model.apply({"params": params}, jnp.asarray(ref["input_ids"]))
    assert_close(last, ref["last_hidden_state"], f"{name} last_hidden_state via load_text_encoder")
    assert_close(pooled, ref["pooled"], f"{name} pooled via load_text_encoder")
