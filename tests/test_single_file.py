"""Single-file LDM/SGM checkpoints -> diffusers-layout state dicts (sdjax.convert.single_file), no torch.

The fixtures (tools/make_single_file_fixtures.py) are tiny random diffusers/transformers models written
under LDM key names, a file diffusers' own single-file converters read back exactly; the conversion here
must give the same arrays (exact equality, same dtype) under the same keys.
"""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from sdjax import schedules
from sdjax.convert import single_file as sf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "single_file")
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
SCHEDULE_AND_EMA = ["alphas_cumprod", "alphas_cumprod_prev", "betas", "model_ema.decay", "model_ema.num_updates"]
OPENCLIP_BLOCK_2 = [f"cond_stage_model.model.transformer.resblocks.2.{name}" for name in (
    "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight", "ln_1.bias",
    "ln_1.weight", "ln_2.bias", "ln_2.weight", "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias",
    "mlp.c_proj.weight")]
IGNORED = {
    "sd1": SCHEDULE_AND_EMA + ["cond_stage_model.transformer.text_model.embeddings.position_ids"],
    # The OpenCLIP model has 3 blocks; diffusers' text encoder keeps 2 (the penultimate layer's output).
    "sd2": SCHEDULE_AND_EMA + ["cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"]
    + OPENCLIP_BLOCK_2,
    "sdxl": SCHEDULE_AND_EMA + ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                "conditioner.embedders.1.model.logit_scale"],
}


def load(kind):
  """(LDM state dict, {component: expected diffusers state dict}, {component: tiny config})."""
  expected = {c: load_file(os.path.join(FIXTURES, f"{kind}.{c}.safetensors")) for c in COMPONENTS[kind]}
  configs = {}
  for c in COMPONENTS[kind]:
    with open(os.path.join(FIXTURES, f"{kind}.{c}.json")) as f:
      configs[c] = json.load(f)
  return load_file(os.path.join(FIXTURES, f"{kind}.safetensors")), expected, configs


def convert(state_dict, configs, model_type=None, **kw):
  return sf.ldm_to_diffusers(state_dict, model_type, unet_config=configs["unet"], vae_config=configs["vae"],
                             **kw)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_reproduces_diffusers_state_dicts_exactly(kind):
  ldm, expected, configs = load(kind)
  assert sf.detect_model_type(ldm) == kind
  components, ignored = convert(ldm, configs, text_encoder_config=configs["text_encoder"])
  assert set(components) == set(COMPONENTS[kind])
  for name, want in expected.items():
    got = components[name]
    assert sorted(got) == sorted(want), f"{name}: key sets differ: {sorted(set(got) ^ set(want))[:8]}"
    for key, value in want.items():
      assert got[key].dtype == value.dtype and got[key].shape == value.shape, f"{name}.{key}"
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")
  assert ignored == sorted(IGNORED[kind])


def test_layout_facts():
  """The differences between the layouts, spelled out on the SDXL and SD 2.x fixtures."""
  ldm, _, configs = load("sdxl")
  out = convert(ldm, configs).components
  # VAE mid-block attention: 1x1 convs -> Linear.
  q = ldm["first_stage_model.encoder.mid.attn_1.q.weight"]
  assert q.shape[2:] == (1, 1)
  np.testing.assert_array_equal(out["vae"]["encoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
  # The LDM decoder numbers levels from the highest resolution; diffusers in execution order.
  np.testing.assert_array_equal(out["vae"]["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                                ldm["first_stage_model.decoder.up.2.upsample.conv.weight"])
  # OpenCLIP: fused in-projection -> q/k/v; text_projection (x @ P) -> Linear weight P.T.
  prefix = "conditioner.embedders.1.model."
  fused = ldm[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
  width = fused.shape[1]
  for i, name in enumerate("qkv"):
    np.testing.assert_array_equal(out["text_encoder_2"][f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"],
                                  fused[i * width:(i + 1) * width])
  projection = ldm[prefix + "text_projection"]
  assert projection.shape == (12, 10)  # [width, projection_dim]
  np.testing.assert_array_equal(out["text_encoder_2"]["text_projection.weight"], projection.T)
  # SDXL's added conditioning (label_emb) and the 2-layer transformer of an inner block.
  assert "add_embedding.linear_2.bias" in out["unet"]
  assert "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight" in out["unet"]


def test_sd2_text_encoder_layers():
  ldm, _, configs = load("sd2")
  layers = lambda te: {k.split(".")[3] for k in te if k.startswith("text_model.encoder.layers.")}
  # Default without a config: drop the last OpenCLIP block (penultimate layer).
  default = convert(ldm, configs)
  assert layers(default.components["text_encoder"]) == {"0", "1"}
  # Explicit count (overrides the config): blocks 1 and 2 are dropped and reported.
  one = convert(ldm, configs, text_encoder_config=configs["text_encoder"], text_encoder_layers=1)
  assert layers(one.components["text_encoder"]) == {"0"}
  assert sum(".resblocks.1." in k for k in one.ignored) == 12 and sum(".resblocks.2." in k for k in one.ignored) == 12
  # All three blocks (e.g. a text encoder config with num_hidden_layers=3).
  three = convert(ldm, configs, text_encoder_config={**configs["text_encoder"], "num_hidden_layers": 3})
  assert layers(three.components["text_encoder"]) == {"0", "1", "2"}
  with pytest.raises(ValueError, match=r"text_encoder_layers=4.*has 3 blocks"):
    convert(ldm, configs, text_encoder_layers=4)


def test_model_type_names_and_dtype():
  ldm, expected, configs = load("sd2")
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in ldm.items()}
  out = convert(half, configs, "sd2_v").components  # the v-prediction default-config name, same layout
  assert out["unet"]["conv_in.weight"].dtype == np.float16
  np.testing.assert_array_equal(out["unet"]["conv_in.weight"], expected["unet"]["conv_in.weight"].astype(np.float16))
  with pytest.raises(ValueError, match="model_type='sd3'"):
    convert(ldm, configs, "sd3")


def test_unmapped_keys_are_named():
  ldm, _, configs = load("sd1")
  extra = {"model.diffusion_model.input_blocks.1.0.in_layers.5.weight": np.zeros(2, np.float32),
           "model.diffusion_model.input_blocks.99.1.proj_in.weight": np.zeros(2, np.float32),
           "lora_unet_down_blocks_0.alpha": np.zeros((), np.float32),
           "cond_stage_model.transformer.text_model.encoder.layers.0.adapter.weight": np.zeros(2, np.float32)}
  with pytest.raises(sf.UnmappedKeysError) as info:
    convert({**ldm, **extra}, configs)
  assert info.value.keys == sorted(extra)
  for key in extra:
    assert key in str(info.value)
  # Keys that are not weights are reported, not raised on.
  buffers = {"posterior_variance": np.zeros(3, np.float32), "first_stage_model.loss.logvar": np.zeros((), np.float32),
             "model_ema.diffusion_modelout2bias": np.zeros(4, np.float32)}
  assert set(buffers) <= set(convert({**ldm, **buffers}, configs).ignored)


def test_wrong_model_type_or_config_is_an_error():
  ldm, _, configs = load("sdxl")
  with pytest.raises(sf.UnmappedKeysError, match="conditioner.embedders"):
    convert(ldm, configs, "sd1")
  sd1, _, sd1_configs = load("sd1")
  with pytest.raises(sf.UnmappedKeysError, match="cond_stage_model.transformer"):
    convert(sd1, sd1_configs, "sd2")
  with pytest.raises(sf.UnmappedKeysError, match="input_blocks"):  # layers_per_block 2 in the file
    convert(sd1, {**sd1_configs, "unet": {**sd1_configs["unet"], "layers_per_block": 1}})
  with pytest.raises(ValueError, match=r"unet_config.class_embed_type='projection'"):
    convert(sd1, {**sd1_configs, "unet": {**sd1_configs["unet"], "class_embed_type": "projection"}})
  with pytest.raises(ValueError, match=r"vae_config.down_block_types"):
    convert(sd1, {**sd1_configs, "vae": {**sd1_configs["vae"], "down_block_types": ["DownBlock2D"] * 3}})
  with pytest.raises(ValueError, match="1x1 convolution"):
    bad = dict(sd1)
    bad["first_stage_model.decoder.mid.attn_1.k.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    convert(bad, sd1_configs)
  with pytest.raises(ValueError, match="no vae weights"):
    convert({k: v for k, v in sd1.items() if not k.startswith("first_stage_model.")}, sd1_configs)


def test_detect_model_type_errors():
  ldm, _, _ = load("sd1")
  with pytest.raises(ValueError, match=r"unrecognised single-file checkpoint: expected .*cond_stage_model"):
    sf.detect_model_type(["encoder.conv_in.weight", "decoder.conv_out.bias"])
  with pytest.raises(ValueError, match="unrecognised"):  # a text encoder alone
    sf.detect_model_type([k for k in ldm if k.startswith("cond_stage_model.")])
  # The SDXL refiner (the OpenCLIP tower alone as embedder 0) is a layout of its own (tests/test_refiner.py).
  assert sf.detect_model_type(["model.diffusion_model.out.2.weight",
                               "conditioner.embedders.0.model.text_projection"]) == "sdxl_refiner"


@pytest.mark.parametrize("name", [n for n in sf.DEFAULT_CONFIGS if n != "sdxl_refiner"])  # (test_refiner.py)
def test_default_configs_load_and_parse(name):
  configs = sf.default_configs(name)
  expected = {"unet", "vae", "text_encoder", "scheduler"} | ({"text_encoder_2"} if name == "sdxl" else set())
  assert set(configs) == expected
  schedule = schedules.from_diffusers_config(configs["scheduler"])  # sdjax accepts every field
  assert schedule is not None and schedules.sampler_from_diffusers_config(configs["scheduler"])
  # The converter accepts the full-size block layouts.
  assert sf.unet_rules(configs["unet"]) and sf.vae_rules(configs["vae"])
  unet, te = configs["unet"], configs["text_encoder"]
  assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512] and configs["vae"]["latent_channels"] == 4
  if name == "sdxl":
    te2 = configs["text_encoder_2"]
    assert unet["cross_attention_dim"] == 2048 == te["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == 2816 == te2["projection_dim"] + 6 * 256
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["sample_size"] == 128
    assert (te2["num_hidden_layers"], te2["hidden_act"]) == (32, "gelu")
    assert configs["vae"]["scaling_factor"] == 0.13025
    assert configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
  else:
    assert unet["cross_attention_dim"] == te["hidden_size"] == (768 if name == "sd1" else 1024)
  if name == "sd1":
    assert (unet["attention_head_dim"], unet["use_linear_projection"], unet["sample_size"]) == (8, False, 64)
    assert (te["num_hidden_layers"], te["hidden_act"]) == (12, "quick_gelu")
    assert configs["vae"]["scaling_factor"] == 0.18215
  if name in ("sd2", "sd2_v"):
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"]
    assert (te["num_hidden_layers"], te["hidden_act"]) == (23, "gelu")  # OpenCLIP ViT-H minus its last block
  prediction = {"sd2_v": "v_prediction"}.get(name, "epsilon")
  assert configs["scheduler"]["prediction_type"] == prediction
  assert unet["sample_size"] == {"sd1": 64, "sd2": 64, "sd2_v": 96, "sdxl": 128}[name]
  with pytest.raises(ValueError, match="expected one of sd1, sd2, sd2_v, sdxl"):
    sf.default_configs("sd3")
