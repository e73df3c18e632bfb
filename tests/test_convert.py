"""diffusers U-Net parity, loading / export of diffusers folders and single files, weight errors.

Fixtures: tools/make_unet_fixtures.py (diffusers 0.42 / torch 2.13, float32), tools/make_clip_fixtures.py,
tools/make_vae_fixtures.py, tools/make_single_file_fixtures.py.
"""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sdjax import convert
from sdjax.convert import safetensors_io, single_file, tree
from sdjax.convert import diffusers as dconv
from sdjax.models.unet import UNet, UNetConfig
from conftest import COMPONENTS, SINGLE, make_pipeline_folder, tiny_configs

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = os.path.join(FIXTURES, "models")
UNETS = ("unet_sd1", "unet_sd2", "unet_sdxl", "unet_class")


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def unet_outputs(module, params, ref):
  added = None
  if "time_ids" in ref:
    added = {"text_embeds": ref["text_embeds"], "time_ids": ref["time_ids"]}
  fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a, added_cond=added))
  return fn(params, ref["x"], ref["t"], ref.get("context"), ref.get("class_labels"))


@pytest.mark.parametrize("name", UNETS)
def test_unet_matches_diffusers(name):
  unet, params = convert.load_unet(os.path.join(MODELS, name))
  ref = dict(np.load(os.path.join(MODELS, name, "reference.npz")))
  out = unet_outputs(unet, params, ref)
  assert out.shape == ref["out"].shape
  assert rel_err(out, ref["out"]) < 1e-4  # max |diff| / max |ref|, float32


def test_unet_chunked_attention_and_bf16_match():
  unet, params = convert.load_unet(os.path.join(MODELS, "unet_sd2"))
  ref = dict(np.load(os.path.join(MODELS, "unet_sd2", "reference.npz")))
  chunked = UNet(dataclasses.replace(unet.config, attention_implementation="chunked"))
  assert rel_err(unet_outputs(chunked, params, ref), ref["out"]) < 1e-4
  bf16 = UNet(dataclasses.replace(unet.config, dtype="bfloat16"))
  assert rel_err(unet_outputs(bf16, params, ref), ref["out"]) < 5e-2


def test_sdxl_unet_needs_added_cond():
  unet, params = convert.load_unet(os.path.join(MODELS, "unet_sdxl"))
  ref = dict(np.load(os.path.join(MODELS, "unet_sdxl", "reference.npz")))
  with pytest.raises(ValueError, match="needs added_cond"):
    unet.apply({"params": params}, ref["x"], ref["t"], ref["context"])
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    unet.apply({"params": params}, ref["x"], ref["t"], ref["context"],
               added_cond={"text_embeds": ref["text_embeds"][:, :3], "time_ids": ref["time_ids"]})


def count(shapes):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_full_size_parameter_counts_equal_diffusers():
  # diffusers' counts for the reference releases (SD 1.5: 859,520,964), from shapes only.
  expected = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
  for model_type, n in expected.items():
    config = UNetConfig.from_diffusers_config(single_file.default_configs(model_type)["unet"])
    assert count(dconv.param_shapes("unet", config)) == n, model_type
  configs = single_file.default_configs("sdxl")
  assert count(dconv.param_shapes("vae", dconv.config_from_dict("vae", configs["vae"]))) == 83_653_863
  assert count(dconv.param_shapes("text_encoder", dconv.config_from_dict(
      "text_encoder", configs["text_encoder_2"]))) == 694_659_840


def test_unet_config_round_trip_and_errors():
  with open(os.path.join(MODELS, "unet_sdxl", "config.json")) as f:
    d = json.load(f)
  config = UNetConfig.from_diffusers_config(d)
  assert UNetConfig.from_diffusers_config(config.to_diffusers_config()) == config
  with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift' is not supported"):
    UNetConfig.from_diffusers_config({**d, "resnet_time_scale_shift": "scale_shift"})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['fancy_option'\]"):
    UNetConfig.from_diffusers_config({**d, "fancy_option": 1})


def test_export_then_import_is_exact(tmp_path):
  for name, kind in (("unet_sdxl", "unet"), ("clip_sdxl2", "text_encoder"), ("vae_sd", "vae")):
    module, params = dconv.load_component(os.path.join(MODELS, name), kind)
    out = str(tmp_path / name)
    convert.save_component(out, kind, module.config, params)
    module2, params2 = dconv.load_component(out)  # kind from the written config's class name
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    assert convert.params_hash(params) == convert.params_hash(params2)


def test_weight_errors_name_each_weight(tmp_path):
  folder = str(tmp_path / "unet")
  shutil.copytree(os.path.join(MODELS, "unet_class"), folder)
  path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  state = dict(safetensors_io.load(path))
  state.pop("conv_in.bias")
  state["extra.weight"] = np.zeros(3, np.float32)
  state["conv_out.weight"] = np.zeros((1, 8, 3, 3), np.float32)[:, :4]
  safetensors_io.save(path, state)
  with pytest.raises(convert.WeightMismatchError) as e:
    convert.load_unet(folder)
  message = str(e.value)
  assert "missing:" in message and "conv_in.bias (shape (8,))" in message
  assert "unexpected:" in message and "extra.weight" in message
  assert "conv_out.weight: checkpoint (1, 4, 3, 3), model expects (1, 8, 3, 3)" in message
  # A truncated file is reported as corrupt, with its path.
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(convert.CorruptCheckpointError, match="truncated"):
    convert.load_unet(folder)


def test_pickled_weights_are_refused(tmp_path):
  folder = str(tmp_path / "unet")
  shutil.copytree(os.path.join(MODELS, "unet_class"), folder)
  os.rename(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
            os.path.join(folder, "diffusion_pytorch_model.bin"))
  with pytest.raises(FileNotFoundError, match="pickled weights.*allow_pickle=True"):
    convert.load_unet(folder)
  with pytest.raises(ValueError, match="pickled checkpoint"):
    dconv.read_state_dict(os.path.join(folder, "diffusion_pytorch_model.bin"))


def test_safetensors_io_bfloat16_round_trip(tmp_path):
  import ml_dtypes
  path = str(tmp_path / "w.safetensors")
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16)}
  safetensors_io.save(path, tensors, {"format": "pt"})
  back = safetensors_io.load(path)
  assert back["b"].dtype == ml_dtypes.bfloat16
  jax.tree.map(np.testing.assert_array_equal, tensors, back)
  assert safetensors_io.read_metadata(path) == {"format": "pt"}


def test_tree_key_mapping():
  assert tree.torch_key(("down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_0", "proj",
                         "kernel")) == "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"
  assert tree.torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
  assert tree.torch_key(("text_model", "encoder", "layers_3", "layer_norm1", "scale")) == \
      "text_model.encoder.layers.3.layer_norm1.weight"


@pytest.mark.parametrize("model_type", ["sd1", "sd2", "sdxl"])
def test_single_file_and_pipeline_folder_load_the_same_weights(tmp_path, model_type):
  folder = str(tmp_path / "pipe")
  configs = make_pipeline_folder(folder, model_type)
  from_folder = convert.load_pipeline(folder)
  from_file = convert.load_single_file(os.path.join(SINGLE, f"{model_type}.safetensors"), configs=configs)
  assert from_folder.model_type == from_file.model_type == model_type
  assert from_folder.skipped == ["safety_checker (None)"] or from_folder.skipped == []
  assert set(from_folder.models) == set(from_file.models) == set(COMPONENTS[model_type])
  for name in COMPONENTS[model_type]:
    assert from_folder.models[name][0].config == from_file.models[name][0].config
    jax.tree.map(np.testing.assert_array_equal, from_folder.models[name][1], from_file.models[name][1])
  assert set(from_folder.tokenizers) == ({"tokenizer", "tokenizer_2"} if model_type == "sdxl" else {"tokenizer"})
  assert from_folder.sampler in ("ddim", "pndm", "euler", "ddpm")
  from_folder.schedule  # the scheduler config parses

  # Exported and re-imported: the same configs and weights.
  out = str(tmp_path / "exported")
  convert.save_pipeline(out, from_folder)
  again = convert.load_pipeline(out)
  for name in COMPONENTS[model_type]:
    jax.tree.map(np.testing.assert_array_equal, from_folder.models[name][1], again.models[name][1])
  assert again.scheduler_config == from_folder.scheduler_config


def test_single_file_errors(tmp_path):
  path = os.path.join(SINGLE, "sd1.safetensors")
  with pytest.raises(ValueError, match="keys are those of a sd1 checkpoint, not sdxl"):
    convert.load_single_file(path, "sdxl")
  # The full-size default config does not fit the tiny weights: every mismatch is named.
  with pytest.raises(convert.WeightMismatchError, match="wrong shape"):
    convert.load_single_file(path)
  configs = tiny_configs("sd1")
  configs["unet"] = {**configs["unet"], "cross_attention_dim": 16}
  with pytest.raises(convert.WeightMismatchError, match="attn2.to_k.weight: checkpoint"):
    convert.load_single_file(path, configs=configs)
  ckpt = str(tmp_path / "model.ckpt")
  shutil.copy(path, ckpt)
  with pytest.raises(ValueError, match="pickled checkpoint"):
    convert.load_single_file(ckpt)
