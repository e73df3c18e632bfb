"""Model configs with wrong types or absurd sizes are refused, before anything is built, with one-line
ValueErrors naming the config class, the field, the value and what is expected; every shipped config still
parses unchanged (sdjax.models.validate)."""
import dataclasses
import glob
import importlib.util
import json
import math
import os
import time

import numpy as np
import pytest

from conftest import ROOT
from sdjax.convert import diffusers, load_component, load_text_encoder, load_unet, load_vae, single_file
from sdjax.convert import random as random_configs
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}
BASE = {"unet": "unet_sd1", "vae": "vae_sd", "text_encoder": "clip_sd1"}


def _fixture_config(kind):
  with open(os.path.join(FIXTURES, "models", BASE[kind], "config.json")) as f:
    return json.load(f)


def _folder(tmp_path, d):
  """A component folder holding only config.json (the loaders read the config before any weights)."""
  with open(tmp_path / "config.json", "w") as f:
    json.dump(d, f)
  return str(tmp_path)


def _refused(loader, folder, match):
  """The loader's ValueError: one line, naming config.json, matching `match`, raised in well under a second."""
  start = time.perf_counter()
  with pytest.raises(ValueError, match=match) as e:
    loader(folder)
  assert time.perf_counter() - start < 1.0
  message = str(e.value)
  assert "\n" not in message and message.startswith(os.path.join(folder, "config.json") + ": ")
  return message


def test_huge_layers_per_block_is_refused_at_once(tmp_path):
  folder = _folder(tmp_path, {**_fixture_config("unet"), "layers_per_block": 10**7})
  message = _refused(load_unet, folder, "layers_per_block")
  assert message.endswith("UNetConfig.layers_per_block: 10000000 is out of range (expected an int in [1, 1000])")
  with pytest.raises(ValueError, match=r"UNetConfig.layers_per_block: 10000000 is out of range"):
    UNetConfig(layers_per_block=10**7)  # configs built in Python go through the same check


@pytest.mark.parametrize("kind, change, match", [
    ("unet", {"block_out_channels": [0, 16, 16]}, r"UNetConfig.block_out_channels\[0\]: 0 is out of range "
     r"\(expected an int in \[1, 65536\]\)"),
    ("unet", {"block_out_channels": [8, -16, 16]}, r"UNetConfig.block_out_channels\[1\]: -16 is out of range"),
    ("unet", {"block_out_channels": []}, r"UNetConfig.block_out_channels: \(\) is empty \(expected a non-empty list"),
    ("unet", {"block_out_channels": 16}, r"UNetConfig.block_out_channels: 16 has the wrong type int"),
    ("unet", {"block_out_channels": [8] * 100}, r"UNetConfig.block_out_channels: 100 entries are too many"),
    ("unet", {"block_out_channels": [8.0, 16, 16]}, r"block_out_channels\[0\]: 8.0 has the wrong type float"),
    ("unet", {"layers_per_block": 2.5}, r"UNetConfig.layers_per_block: 2.5 has the wrong type float \(expected an int"),
    ("unet", {"layers_per_block": 0}, r"UNetConfig.layers_per_block: 0 is out of range"),
    ("unet", {"layers_per_block": [2.5, 2.5, 2.5]}, r"UNetConfig.layers_per_block: 2.5 has the wrong type float"),
    ("unet", {"in_channels": 4.0}, r"UNetConfig.in_channels: 4.0 has the wrong type float"),
    ("unet", {"in_channels": True}, r"UNetConfig.in_channels: True has the wrong type bool \(expected an int"),
    ("unet", {"in_channels": "4"}, r"UNetConfig.in_channels: '4' has the wrong type str"),
    ("unet", {"norm_num_groups": 0}, r"UNetConfig.norm_num_groups: 0 is out of range"),
    ("unet", {"norm_eps": math.nan}, r"UNetConfig.norm_eps: nan is out of range \(expected a finite number > 0\)"),
    ("unet", {"norm_eps": math.inf}, r"UNetConfig.norm_eps: inf is out of range"),
    ("unet", {"norm_eps": 0}, r"UNetConfig.norm_eps: 0 is out of range"),
    ("unet", {"freq_shift": -math.inf}, r"UNetConfig.freq_shift: -inf is out of range"),
    ("unet", {"dropout": -0.1}, r"UNetConfig.dropout: -0.1 is out of range \(expected a number in \[0, 1\)\)"),
    ("unet", {"dropout": 1.0}, r"UNetConfig.dropout: 1.0 is out of range"),
    ("unet", {"attention_head_dim": [2, 0, 2]}, r"UNetConfig.attention_head_dim\[1\]: 0 is out of range"),
    ("unet", {"attention_head_dim": None}, r"attention_head_dim and num_attention_heads are both None"),
    ("unet", {"transformer_layers_per_block": 10**6}, r"UNetConfig.transformer_layers_per_block: 1000000 is out"),
    ("unet", {"cross_attention_dim": 10**9}, r"UNetConfig.cross_attention_dim: 1000000000 is out of range"),
    ("unet", {"num_class_embeds": 0}, r"UNetConfig.num_class_embeds: 0 is out of range"),
    ("unet", {"use_linear_projection": "false"}, r"UNetConfig.use_linear_projection: 'false' has the wrong type"),
    ("unet", {"down_block_types": "CrossAttnDownBlock2D"}, r"UNetConfig.down_block_types: 'CrossAttnDownBlock2D' "
     r"has the wrong type str \(expected a non-empty list of at most 32 strings\)"),
    ("vae", {"block_out_channels": []}, r"VAEConfig.block_out_channels: \(\) is empty"),
    ("vae", {"layers_per_block": 10**7}, r"VAEConfig.layers_per_block: 10000000 is out of range"),
    ("vae", {"layers_per_block": 1.0}, r"VAEConfig.layers_per_block: 1.0 has the wrong type float"),
    ("vae", {"norm_num_groups": 0}, r"VAEConfig.norm_num_groups: 0 is out of range"),
    ("vae", {"latent_channels": False}, r"VAEConfig.latent_channels: False has the wrong type bool"),
    ("vae", {"scaling_factor": 0}, r"VAEConfig.scaling_factor: 0 is out of range"),
    ("vae", {"scaling_factor": math.nan}, r"VAEConfig.scaling_factor: nan is out of range"),
    ("vae", {"shift_factor": math.inf}, r"VAEConfig.shift_factor: inf is out of range"),
    ("vae", {"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]},
     r"VAEConfig.latents_std\[1\]: 0.0 is out of range"),
    ("vae", {"sample_size": -1}, r"VAEConfig.sample_size: -1 is out of range"),
    ("text_encoder", {"vocab_size": 10**12}, r"CLIPTextConfig.vocab_size: 1000000000000 is out of range "
     r"\(expected an int in \[1, 10000000\]\)"),
    ("text_encoder", {"max_position_embeddings": 10**9}, r"CLIPTextConfig.max_position_embeddings: 1000000000 is out"),
    ("text_encoder", {"num_hidden_layers": 10**7}, r"CLIPTextConfig.num_hidden_layers: 10000000 is out of range"),
    ("text_encoder", {"num_attention_heads": 0}, r"CLIPTextConfig.num_attention_heads: 0 is out of range"),
    ("text_encoder", {"hidden_size": 32.0}, r"CLIPTextConfig.hidden_size: 32.0 has the wrong type float"),
    ("text_encoder", {"layer_norm_eps": math.nan}, r"CLIPTextConfig.layer_norm_eps: nan is out of range"),
    ("text_encoder", {"eos_token_id": True}, r"CLIPTextConfig.eos_token_id: True has the wrong type bool"),
    ("text_encoder", {"hidden_act": 3}, r"CLIPTextConfig.hidden_act: 3 has the wrong type int"),
    ("text_encoder", {"text_config": "x"}, r"CLIPTextConfig: text_config is str 'x' \(expected an object\)"),
])
def test_bad_fields_are_refused_naming_class_field_and_value(tmp_path, kind, change, match):
  folder = _folder(tmp_path, {**_fixture_config(kind), **change})
  _refused(LOADERS[kind], folder, match)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"unet"', b"3", b"null", b"{not json", b"\xff\xfe\x00"],
                         ids=["list", "string", "number", "null", "invalid", "binary"])
@pytest.mark.parametrize("kind", [None, "unet", "vae", "text_encoder"])
def test_config_json_that_is_not_an_object_is_refused(tmp_path, content, kind):
  (tmp_path / "config.json").write_bytes(content)
  message = _refused(lambda f: load_component(f, kind), str(tmp_path), "expected a JSON object|not valid JSON")
  assert len(message) < 300


def test_numbers_too_large_for_float_or_print_are_refused(tmp_path):
  (tmp_path / "config.json").write_text('{"in_channels": ' + "9" * 5000 + "}")
  _refused(load_unet, str(tmp_path), r"not valid JSON \(Exceeds the limit")
  with pytest.raises(ValueError, match=r"UNetConfig.in_channels: <int too large to print> is out of range"):
    UNetConfig(in_channels=10**5000)
  with pytest.raises(ValueError, match=r"UNetConfig.norm_eps: 10000.*\.\.\. is out of range"):
    UNetConfig(norm_eps=10**400)  # no float holds it


def test_unusable_class_name_or_non_mapping_config_is_refused(tmp_path):
  folder = _folder(tmp_path, {"architectures": "CLIPTextModel"})
  with pytest.raises(ValueError, match="component class None is not supported"):
    load_component(folder)
  with pytest.raises(ValueError, match=r"expected a JSON object of config fields, got list"):
    diffusers.config_from_dict("vae", [("in_channels", 3)])


def test_configs_built_in_python_and_replaced_are_checked():
  with pytest.raises(ValueError, match=r"VAEConfig.block_out_channels\[0\]: 0 is out of range"):
    VAEConfig(block_out_channels=(0,))
  with pytest.raises(ValueError, match=r"CLIPTextConfig.vocab_size: 0 is out of range"):
    dataclasses.replace(CLIPTextConfig(), vocab_size=0)
  with pytest.raises(ValueError, match=r"UNetConfig.sample_size\[1\]: 0 is out of range"):
    UNetConfig(sample_size=(64, 0))
  # numpy scalars are ints and floats too; integral floats for float fields, ints for floats
  cfg = UNetConfig(in_channels=np.int64(4), norm_eps=np.float32(1e-5), freq_shift=1, dropout=0)
  assert cfg.in_channels == 4


def test_boundary_values_are_accepted():
  cfg = UNetConfig(block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                   up_block_types=("UpBlock2D",) * 2, layers_per_block=1000, norm_num_groups=1,
                   attention_head_dim=1, transformer_layers_per_block=0, dropout=0.999, sample_size=(64, 96))
  assert cfg.layers_per_block == 1000
  assert UNetConfig(attention_head_dim=None, num_attention_heads=(5, 10, 20, 20)).heads == (5, 10, 20, 20)
  assert VAEConfig(norm_num_groups=1, latent_channels=1, latents_mean=(-1.0,), latents_std=(0.5,)).latents_std
  assert CLIPTextConfig(vocab_size=10**7, num_hidden_layers=1000, pad_token_id=None, bos_token_id=None).vocab_size


def test_attention_blocks_of_depth_zero_still_build():
  """transformer_layers_per_block 0 (allowed) builds an attention block of projections only, as diffusers."""
  d = {**_fixture_config("unet"), "transformer_layers_per_block": 0}
  shapes = diffusers.param_shapes("unet", diffusers.config_from_dict("unet", d))
  attention = shapes["down_blocks_0"]["attentions_0"]
  assert {"norm", "proj_in", "proj_out"} == set(attention)


def test_huge_single_file_layers_per_block_is_refused_at_once():
  unet = {**single_file.default_configs("sd1")["unet"], "layers_per_block": 10**7}
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"unet_config.layers_per_block must be an int in \[1, 1000\], got 10000000"):
    single_file.unet_rules(unet)
  with pytest.raises(ValueError, match=r"vae_config.down_block_types: 100 blocks are too many"):
    single_file.vae_rules({"down_block_types": ["DownEncoderBlock2D"] * 100,
                           "up_block_types": ["UpDecoderBlock2D"] * 100, "layers_per_block": 1})
  assert time.perf_counter() - start < 1.0


# --- every shipped config parses unchanged -------------------------------------------------------------

def _kind_of(path):
  """unet / vae / text_encoder from the file name (configs/sd1/unet.json, sd1.vae.json, models/clip_sd1/...)."""
  name = os.path.basename(os.path.dirname(path)) if path.endswith("config.json") else os.path.basename(path)
  return next(kind for prefix, kind in (("unet", "unet"), ("vae", "vae"), ("clip", "text_encoder"),
                                        ("text_encoder", "text_encoder")) if prefix in name)


def _assert_unchanged(config, d):
  fields = {f.name for f in dataclasses.fields(config)}
  if isinstance(config, CLIPTextConfig):
    fields.discard("dtype")  # transformers' dtype is the checkpoint's, not the compute dtype
  for key, value in d.items():
    if key in fields:
      got = getattr(config, key)
      want = tuple(value) if isinstance(value, list) else value
      assert got == want, (type(config).__name__, key, got, want)


SHIPPED_JSON = sorted(glob.glob(os.path.join(ROOT, "sdjax", "convert", "configs", "*", "*.json"))
                      + glob.glob(os.path.join(FIXTURES, "models", "*", "config.json"))
                      + glob.glob(os.path.join(FIXTURES, "single_file", "*.json")))


@pytest.mark.parametrize("path", [p for p in SHIPPED_JSON if not p.endswith("scheduler.json")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_json_configs_parse_unchanged(path):
  with open(path) as f:
    d = json.load(f)
  _assert_unchanged(diffusers.config_from_dict(_kind_of(path), d), d)


@pytest.mark.parametrize("model_type", ["sd1", "sd2", "sdxl"])
def test_tiny_random_configs_parse_unchanged(model_type):
  for name, d in random_configs.tiny_configs(model_type, inpainting=model_type == "sd1").items():
    if name != "scheduler":
      kind = "text_encoder" if name.startswith("text_encoder") else name
      _assert_unchanged(diffusers.config_from_dict(kind, d), d)


def _experiment_configs():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    if os.path.basename(path) == "common.py":
      continue
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in (None, "tiny", "lora", "tiny_lora"):
      try:
        yield f"{os.path.basename(path)}:{arg}", module.get_config(arg)
      except ValueError:  # a variant this config does not have
        pass


def test_experiment_configs_parse_unchanged():
  checked = 0
  for name, c in _experiment_configs():
    model = c.get("model")
    if model is not None and "block_out_channels" in model:
      d = model.to_dict()
      if d.get("num_class_embeds") == 0:  # as the pixel task: 0 means unconditional
        d["num_class_embeds"] = None
      _assert_unchanged(UNetConfig.from_dict(d), d)
      checked += 1
    vae = c.get("vae")
    if vae is not None and not isinstance(vae, str):
      d = vae.to_dict()
      _assert_unchanged(VAEConfig.from_diffusers_config(d), d)
      checked += 1
  assert checked >= 8, checked
