"""IP-Adapter (sdjax.ip_adapter) vs diffusers 0.42: loading, image projection, decoupled cross-attention, scales.

Fixtures (tests/fixtures/ip_adapter/, tools/make_ip_adapter_fixtures.py, diffusers 0.42.1 / torch 2.13 CPU float32):
random diffusers-format adapters for the fixture U-Nets (unet_sd1: two adapters, scales [0.6, 0.3]; unet_sdxl: one,
a per-block scale dict) with diffusers' U-Net outputs, and for the tiny random pipelines (sdjax.convert.random,
seed 0) diffusers' txt2img with `ip_adapter_image` (through clip_vision_tiny_tower and the CLIPImageProcessor
load_ip_adapter creates) and with `ip_adapter_image_embeds`, set_ip_adapter_scale(0.6), guidance 5, 4 steps.
"""
import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from sdjax import ip_adapter, pipelines, schedules
from sdjax.convert import diffusers as dconv
from sdjax.convert import safetensors_io
from sdjax.convert.clip_vision import load_clip_vision
from sdjax.convert.random import random_pipeline, tiny_configs
from sdjax.convert.tree import WeightMismatchError
from sdjax.models import clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "ip_adapter")
SIZE, STEPS = 32, 4
# Max abs error. U-Net outputs (std ~0.6) and image embeddings: float32 vs float32, measured ~1e-6; images in
# [-1, 1] after 4 guided steps and the VAE, as tests/test_pipelines' TORCH_ATOL.
UNET_ATOL, EMBED_ATOL, IMAGE_ATOL = 2e-5, 1e-5, 1e-4

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FOLDER, "reference.npz")))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.partial(jit, static_argnums=0)
def _unet(module, params, adapters, x, t, context, embeds, scales, added):
  """The U-Net with each adapter's tokens (projected from `embeds`) at `scales`."""
  params = ip_adapter.merge_unet_params(params, adapters)
  ip = tuple(zip(ip_adapter.project(adapters, embeds), scales))
  return module.apply({"params": params}, x, t, context, added_cond=added, ip_adapter=ip)


@pytest.mark.parametrize("case", ["unet_sd1", "unet_sdxl"])
def test_unet_matches_diffusers_and_scale_zero_is_no_adapter(reference, case):
  """U-Net level: diffusers' UNet2DConditionModel with `_load_ip_adapter_weights` + `set_ip_adapter_scale`
  (unet_sd1: two adapters at [0.6, 0.3]; unet_sdxl: {"down": {"block_1": [0, 1]}, "mid": 0.8, "up": {"block_0":
  [0.5, 1, 0.25]}}). In the same call (per-row scales) the inputs again at scale 0, which must give diffusers' U-Net
  without the adapters."""
  module, params = dconv.load_unet(os.path.join(FIXTURES, "models", case))
  names = ["a", "b"] if case == "unet_sd1" else [None]
  adapters = tuple(ip_adapter.load(os.path.join(FOLDER, f"{case}_{n}.safetensors" if n else f"{case}.safetensors"),
                                   module.config) for n in names)
  r = lambda k: reference[f"{case}.{k}"]
  twice = lambda a: np.concatenate([a, a])
  embeds = [twice(r(f"image_embeds_{i}")) for i in range(len(adapters))]
  scale = [0.6, 0.3] if case == "unet_sd1" else json.loads(str(r("scale")))
  ip = ip_adapter.inputs(module.config, embeds, scale)
  if case == "unet_sdxl":  # the per-block scale as diffusers expands it (blocks not named: 0)
    assert ip.scale[0]["down_blocks.1.attentions.0"].tolist() == [0.0] * 4
    assert ip.scale[0]["up_blocks.0.attentions.2"].tolist() == [0.25] * 4
  scales = jax.tree.map(lambda s: s * np.asarray([1, 1, 0, 0], np.float32), ip.scale)  # rows 2, 3: scale 0
  added = None
  if module.config.addition_embed_type:
    added = {"text_embeds": twice(r("text_embeds")), "time_ids": twice(r("time_ids"))}
  got = _unet(module, params, adapters, twice(r("x")), twice(r("t")), twice(r("context")), ip.image_embeds,
              scales, added)
  errs = max_err(got[:2], r("out")), max_err(got[2:], r("out_plain"))
  print(f"{case}: U-Net with IP-Adapter vs diffusers max abs err {errs[0]:.2e}; at scale 0 vs diffusers without "
        f"adapter {errs[1]:.2e}")
  assert max(errs) < UNET_ATOL
  assert max_err(r("out"), r("out_plain")) > 0.1  # the adapters do change the output


@pytest.mark.parametrize("case", ["sd1", "sdxl"])
def test_txt2img_matches_diffusers_with_image_and_with_precomputed_embeds(reference, case):
  """One jitted txt2img of 2 rows: row 0 from `ip_adapter_image` (sdjax's CLIPImageProcessor steps + the CLIP
  vision tower; negative embeds zeros, or for IP-Adapter Plus the hidden states of zero pixels), row 1 from
  precomputed `ip_adapter_image_embeds` (negative given). sd1 has two adapters, IP-Adapter and IP-Adapter Plus,
  at scales [0.6, 0.8]; sdxl one IP-Adapter at 0.6."""
  r = lambda k: reference[f"{case}.{k}"]
  scheduler = json.loads(str(r("scheduler")))
  tok = clip.load_tokenizer(os.path.join(FIXTURES, "models", "tokenizer"))
  names = ("tokenizer", "tokenizer_2") if case == "sdxl" else ("tokenizer",)
  pipe = random_pipeline(tiny_configs(case), seed=0, tokenizers={n: tok for n in names}, model_type=case)
  sd, params = pipelines.from_components(pipe.models, schedules.from_diffusers_config(scheduler), model_type=case)
  files = [f"pipe_{case}.safetensors"] + ([f"pipe_{case}_plus.safetensors"] if case == "sd1" else [])
  params["ip_adapter"] = tuple(ip_adapter.load(os.path.join(FOLDER, f), sd.unet.config) for f in files)
  assert [ip_adapter.uses_hidden_states(a) for a in params["ip_adapter"]] == [False, True][:len(files)]

  encoder, encoder_params = load_clip_vision(os.path.join(FIXTURES, "clip_vision_tiny_tower"))
  encode = jit(ip_adapter.encode_image, static_argnums=0, static_argnames="output_hidden_states")
  embeds, zeros = encode(encoder, encoder_params, r("ip_image")[None])
  err = max_err(embeds, r("image_embeds_ref"))
  print(f"{case}: image embeds vs diffusers' encode_image max abs err {err:.2e}")
  assert embeds.shape == (1, 16) and err < EMBED_ATOL and not np.any(zeros)
  # Row 0: the image; row 1: the precomputed embeddings (diffusers' ip_adapter_image_embeds = [negative; positive]).
  positive = [np.concatenate([np.asarray(embeds)[:, None], r("positive_embeds")])]  # [2, 1, 16]
  negative = [np.concatenate([np.asarray(zeros)[:, None], r("negative_embeds")])]
  scale = [0.6]
  if case == "sd1":
    hidden, uncond = encode(encoder, encoder_params, r("plus_ip_image")[None], output_hidden_states=True)
    errs = max_err(hidden, r("plus_hidden_ref")), max_err(uncond, r("plus_uncond_hidden_ref"))
    print(f"{case}: Plus hidden states vs diffusers' encode_image (image, zero pixels) max abs err {errs[0]:.2e}, "
          f"{errs[1]:.2e}")
    assert hidden.shape == (1, 17, 32) and max(errs) < EMBED_ATOL
    positive.append(np.concatenate([np.asarray(hidden)[:, None], r("plus_positive_embeds")]))  # [2, 1, 17, 32]
    negative.append(np.concatenate([np.asarray(uncond)[:, None], r("plus_negative_embeds")]))
    scale.append(0.8)
  toks = [tok] * len(sd.text_encoders)
  prompt = pipelines.Prompt(
      ids=pipelines.tokenize(toks, sd.text_encoders, [str(r("prompt"))] * 2),
      negative_ids=pipelines.tokenize(toks, sd.text_encoders, [str(r("negative"))] * 2),
      guidance_scale=np.full((2,), 5.0, np.float32),
      time_ids=np.stack([pipelines.micro_conditioning(SIZE, SIZE)] * 2) if sd.sdxl else None,
      zero_negative=np.zeros(2, bool) if sd.sdxl else None,
      ip_adapter=ip_adapter.inputs(sd.unet.config, positive, scale, negative_image_embeds=negative))
  noise = np.concatenate([r("noise")] * 2)
  txt2img = jit(pipelines.txt2img, static_argnums=0, static_argnames=("height", "width", "sampler", "num_steps"))
  got = txt2img(sd, params, prompt, jax.random.split(jax.random.key(0), 2), height=SIZE, width=SIZE,
                sampler=schedules.sampler_from_diffusers_config(scheduler), num_steps=STEPS, noise=noise)
  errs = max_err(got[0], r("out_image")[0]), max_err(got[1], r("out_embeds")[0])
  print(f"{case}: txt2img with ip_adapter_image / ip_adapter_image_embeds vs diffusers max abs err "
        f"{errs[0]:.2e} / {errs[1]:.2e}")
  assert max(errs) < IMAGE_ATOL


def test_expand_scale_follows_set_ip_adapter_scale():
  config = dconv.config_from_dict("unet", json.load(open(os.path.join(FIXTURES, "models", "unet_sdxl",
                                                                      "config.json"))))
  assert ip_adapter.attention_block_names(config) == [
      "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "up_blocks.0.attentions.0",
      "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "mid_block.attentions.0"]
  assert ip_adapter.expand_scale(config, 0.5) == 0.5
  assert ip_adapter.expand_scale(config, {"up": 1.0}) == {
      "down_blocks.1.attentions.0": 0.0, "down_blocks.1.attentions.1": 0.0, "up_blocks.0.attentions.0": 1.0,
      "up_blocks.0.attentions.1": 1.0, "up_blocks.0.attentions.2": 1.0, "mid_block.attentions.0": 0.0}
  with pytest.raises(ValueError, match=r"down has no attention block\(s\) \['block_0'\]"):
    ip_adapter.expand_scale(config, {"down": {"block_0": 1.0}})
  with pytest.raises(ValueError, match="expected 3 scales for up.block_0, got 2"):
    ip_adapter.expand_scale(config, {"up": {"block_0": [1.0, 0.0]}})
  with pytest.raises(ValueError, match="2 IP-Adapter scale"):
    ip_adapter.inputs(config, [np.zeros((1, 16))], [0.5, 0.5])


def test_load_errors_are_clear(tmp_path):
  sd1 = dconv.config_from_dict("unet", json.load(open(os.path.join(FIXTURES, "models", "unet_sd1", "config.json"))))
  sdxl = dconv.config_from_dict("unet", json.load(open(os.path.join(FIXTURES, "models", "unet_sdxl",
                                                                    "config.json"))))
  good = os.path.join(FOLDER, "unet_sd1_a.safetensors")
  state = safetensors_io.load(good)
  with pytest.raises(WeightMismatchError, match=r"image_proj.proj.weight has shape \(48, 16\); expected "
                                                r"\[num_tokens \* 20 \(the U-Net's cross_attention_dim\)"):
    ip_adapter.load(good, sdxl)
  wider = dataclasses.replace(sd1, block_out_channels=(8, 32, 32))  # the adapter of another U-Net
  with pytest.raises(WeightMismatchError, match=r"ip_adapter weights do not fit this U-Net; 12 mis-shaped: "
                                                r"5.to_k_ip.weight \(16, 12\) \(expected \(32, 12\)\)"):
    ip_adapter.load(good, wider)

  def write(name, tensors):
    path = str(tmp_path / name)
    safetensors_io.save(path, tensors)
    return path

  missing = write("missing.safetensors", {k: v for k, v in state.items() if k != "ip_adapter.3.to_v_ip.weight"})
  with pytest.raises(WeightMismatchError, match=r"ip_adapter weights .* 1 missing: 3.to_v_ip.weight"):
    ip_adapter.load(missing, sd1)
  extra = write("extra.safetensors", {**state, "ip_adapter.99.to_k_ip.weight": np.zeros((8, 12), np.float32)})
  with pytest.raises(WeightMismatchError, match=r"1 unexpected: 99.to_k_ip.weight"):
    ip_adapter.load(extra, sd1)
  shape = write("shape.safetensors", {**state, "ip_adapter.1.to_k_ip.weight": np.zeros((8, 7), np.float32)})
  with pytest.raises(WeightMismatchError, match=r"1.to_k_ip.weight \(8, 7\) \(expected \(8, 12\)\)"):
    ip_adapter.load(shape, sd1)
  plus = write("plus.safetensors", {"image_proj.latents": np.zeros((1, 4, 12), np.float32),
                                    "ip_adapter.1.to_k_ip.weight": np.zeros((8, 12), np.float32)})
  with pytest.raises(WeightMismatchError, match=r"Plus image_proj weights are incomplete \(missing \['proj_in"):
    ip_adapter.load(plus, sd1)
  plus_state = safetensors_io.load(os.path.join(FOLDER, "pipe_sd1_plus.safetensors"))
  plus = write("plus_missing.safetensors",
                {k: v for k, v in plus_state.items() if k != "image_proj.layers.3.1.3.weight"})
  with pytest.raises(WeightMismatchError, match=r"image_proj weights do not fit this U-Net; 1 missing: layers.3.1.3"):
    ip_adapter.load(plus, dconv.config_from_dict("unet", tiny_configs("sd1")["unet"]))
  with pytest.raises(WeightMismatchError, match=r"mis-shaped: proj_out.weight \(16, 16\) \(expected \(12, 16\)\)"):
    ip_adapter.load(os.path.join(FOLDER, "pipe_sd1_plus.safetensors"), sd1)  # another U-Net's adapter
  full = write("full.safetensors", {"image_proj.proj.0.weight": np.zeros((4, 4), np.float32),
                                    "image_proj.proj.3.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(ValueError, match="image_proj is IP-Adapter Full Face; sdjax supports"):
    ip_adapter.load(full, sd1)
  other = write("other.safetensors", {"unet.conv_in.weight": np.zeros((2,), np.float32)})
  with pytest.raises(ValueError, match="not an IP-Adapter file"):
    ip_adapter.load(other, sd1)
  pickle = tmp_path / "ip-adapter_sd15.bin"
  pickle.write_bytes(b"not read")
  with pytest.raises(ValueError, match="pickled checkpoint.*allow_pickle=True"):
    ip_adapter.load(str(pickle), sd1)
  with pytest.raises(FileNotFoundError, match="no IP-Adapter weights file"):
    ip_adapter.load(str(tmp_path / "absent.safetensors"), sd1)
