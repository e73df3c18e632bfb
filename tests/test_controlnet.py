"""ControlNet (sdjax.models.controlnet, sdjax.control) against diffusers 0.42.1: the model's residuals, the U-Net with
them added, `from_unet` against diffusers' `ControlNetModel.from_unet`, the diffusers folder round trip, and the
ControlNet pipelines (txt2img with a guidance window, guess mode, MultiControlNet on Euler, img2img, inpainting with
an ordinary U-Net, SDXL) on the tiny random pipelines of `sdjax.convert.random` (seed 0, as tests/test_pipelines.py).
Fixtures: tests/fixtures/controlnet/, written by tools/make_controlnet_fixtures.py.

img2img and inpainting take the VAE posterior diffusers drew (its standard-normal draw replayed into sdjax's VAE
encoding) and run `pipelines.denoise` + `decode`: `img2img` / `inpaint` themselves draw the posterior from the keys.
Every jitted function is module-level and compiled at XLA's backend optimisation level 0 (as test_pipelines).
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import control as control_lib
from sdjax import pipelines, schedules
from sdjax.convert import diffusers as dconv
from sdjax.convert import load_controlnet, load_unet, safetensors_io, save_component, tree
from sdjax.convert.random import random_pipeline, tiny_configs
from sdjax.models import clip
from sdjax.models import controlnet as cn_lib
from sdjax.models import vae as vae_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONTROL = os.path.join(FIXTURES, "controlnet")
TOKENIZER = os.path.join(FIXTURES, "models", "tokenizer")
SIZE, STEPS, GUIDANCE = 32, 5, 5.0
# Max abs errors vs diffusers (float32 both sides): residuals and U-Net outputs (measured <= 2.8e-6), images in
# [-1, 1] (measured <= 6.9e-6; test_pipelines' TORCH_ATOL).
MODEL_ATOL = 1e-5
IMAGE_ATOL = 1e-4

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
STATIC = ("height", "width", "sampler", "num_steps", "strength", "controlnets", "guess_mode")
TXT2IMG = jit(pipelines.txt2img, static_argnums=0, static_argnames=STATIC)
# (error cases only: they raise while tracing, before anything is encoded or compiled)
IMG2IMG = jit(pipelines.img2img, static_argnums=0, static_argnames=STATIC)
INPAINT = jit(pipelines.inpaint, static_argnums=0, static_argnames=STATIC)
DENOISE = jit(pipelines.denoise, static_argnums=(0, 4), static_argnames=STATIC)
DECODE = jit(pipelines.decode, static_argnums=0)
VAE_ENCODE = jit(lambda vae, p, x: vae.apply({"params": p}, x, method="encode"), static_argnums=0)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(CONTROL, "reference.npz")))


@pytest.fixture(scope="module")
def tokenizer():
  return clip.load_tokenizer(TOKENIZER)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- the model ----------------------------------------------------------------------------------------------

@functools.partial(jit, static_argnums=(0, 1, 2))
def _model_outputs(module, pool, unet, params, unet_params, x, t, ctx, image, added):
  """plain (scale 0.7), and guess mode (without `pool`) or the bgr + global-pool variant `pool` and the U-Net with
  the plain residuals (one graph less to compile per model)."""
  plain = module.apply({"params": params}, x, t, ctx, image, 0.7, added_cond=added)
  out = {"plain": plain}
  if pool is None:
    out["guess"] = module.apply({"params": params}, x, t, ctx, image, 0.7, added_cond=added, guess_mode=True)
  else:
    out["pool"] = pool.apply({"params": params}, x, t, ctx, image, 0.7, added_cond=added)
  if unet is not None:
    out["unet"] = unet.apply({"params": unet_params}, x, t, ctx, down_residuals=plain[0], mid_residual=plain[1])
  return out


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_controlnet_model_matches_diffusers(reference, name):
  """ControlNetModel's residuals at conditioning_scale 0.7; sd1: with channel order bgr + global_pool_conditions,
  and the U-Net's output with the residuals added; sdxl: in guess mode (logspace(-1, 0) scales)."""
  module, params = load_controlnet(os.path.join(CONTROL, name))
  ref = {k[len(f"model.{name}."):]: v for k, v in reference.items() if k.startswith(f"model.{name}.")}
  assert module.config.num_down_residuals == len([k for k in ref if k.startswith("plain.down_")])
  pool = unet = unet_params = None
  if name == "sd1":
    pool = cn_lib.ControlNet(dataclasses.replace(module.config, controlnet_conditioning_channel_order="bgr",
                                                 global_pool_conditions=True))
    unet, unet_params = load_unet(os.path.join(FIXTURES, "models", "unet_sd1"))
  added = ({"text_embeds": ref["text_embeds"], "time_ids": ref["time_ids"]} if "time_ids" in ref else None)
  image = ref["image"].astype(np.float32) / 255.0
  out = _model_outputs(module, pool, unet, params, unet_params, ref["x"], ref["t"], ref["context"], image, added)
  for case in ("plain", "guess", "pool"):
    if case not in out:
      continue
    down, mid = out[case]
    errs = [max_err(d, ref[f"{case}.down_{i}"]) for i, d in enumerate(down)] + [max_err(mid, ref[f"{case}.mid"])]
    assert max(errs) < MODEL_ATOL, (case, errs)
  if "unet" in out:
    assert max_err(out["unet"], ref["unet"]) < MODEL_ATOL
  if "guess" in out:  # the guess-mode residuals are the plain ones scaled by 0.1 ... 1
    scales = cn_lib.guess_mode_scales(module.config.num_down_residuals)
    np.testing.assert_allclose(out["guess"][0][0], out["plain"][0][0] * scales[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_from_unet_matches_diffusers(reference, name):
  """from_unet: diffusers' config, state-dict keys, zero tensors (the zero convolutions) and the tensors copied
  from the U-Net (conv_in, time_embedding, add_embedding, down_blocks, mid_block) are the same."""
  unet, unet_params = load_unet(os.path.join(FIXTURES, "models", f"unet_{name}"))
  config, params = cn_lib.from_unet(unet.config, unet_params, conditioning_embedding_out_channels=(4, 8, 8, 16))
  want = {k: v for k, v in json.loads(str(reference[f"from_unet.{name}.config"])).items() if not k.startswith("_")}
  got = {k: v for k, v in json.loads(json.dumps(config.to_diffusers_config())).items() if not k.startswith("_")}
  assert got == want
  state = cn_lib.denormalize_state_dict(tree.from_flax(params))
  ustate = tree.from_flax(unet_params)
  assert sorted(state) == json.loads(str(reference[f"from_unet.{name}.keys"]))
  # zero: the zero convolutions, and in sdjax the control-image encoder's biases (torch draws them at random)
  zero = set(json.loads(str(reference[f"from_unet.{name}.zero"])))
  got_zero = {k for k, v in state.items() if not v.any()}
  assert zero <= got_zero
  assert all(k.startswith("controlnet_cond_embedding.") and k.endswith(".bias") for k in got_zero - zero)
  copied = sorted(k for k, v in state.items() if k in ustate and np.array_equal(v, ustate[k]))
  assert copied == json.loads(str(reference[f"from_unet.{name}.copied"]))
  assert cn_lib.ControlNetConfig.from_diffusers_config(config.to_diffusers_config()) == config


def test_convert_round_trip(tmp_path):
  """save_component(..., "controlnet") writes diffusers' layout (the same keys and config.json as diffusers'
  save_pretrained wrote) and loads back equal."""
  src = os.path.join(CONTROL, "pipe_sd1_a")
  module, params = load_controlnet(src)
  save_component(str(tmp_path), "controlnet", module.config, params)
  module2, params2 = load_controlnet(str(tmp_path))
  assert module2.config == module.config
  assert jax.tree.all(jax.tree.map(np.array_equal, params, params2))
  want = safetensors_io.load(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  got = safetensors_io.load(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k].astype(np.float32)) for k in want)
  read = lambda p: {k: v for k, v in json.load(open(os.path.join(p, "config.json"))).items() if not k.startswith("_")}
  assert read(str(tmp_path)) == read(src)
  assert dconv.load_component(str(tmp_path))[0].config == module.config  # the class name picks the kind
  bf16 = load_controlnet(src, dtype="bfloat16", remat=True)[0].config.unet  # sdjax-only fields go to its U-Net part
  assert (bf16.dtype, bf16.remat) == ("bfloat16", "full")


def test_original_single_file_layout_loads_as_diffusers_does(tmp_path):
  """lllyasviel's layout (input_hint_block, zero_convs, middle_block_out, under control_model. with a whole-model key
  beside them), which diffusers' convert_controlnet_checkpoint / from_single_file read back as the sd1 folder."""
  from sdjax.convert import controlnet_single_file
  path = os.path.join(CONTROL, "single_file_sd1.safetensors")
  want_module, want = load_controlnet(os.path.join(CONTROL, "sd1"))
  module, params = load_controlnet(path, config=os.path.join(CONTROL, "sd1"))
  assert module.config == want_module.config
  assert jax.tree.all(jax.tree.map(np.array_equal, params, want))
  state = safetensors_io.load(path)
  _, ignored = controlnet_single_file.to_diffusers(state, module.config)
  assert ignored == ["model.diffusion_model.out.2.bias"]
  # without the prefix, and with a key no rule maps
  bare = {k.removeprefix("control_model."): v for k, v in state.items() if k.startswith("control_model.")}
  assert controlnet_single_file.to_diffusers(bare, module.config)[1] == []
  with pytest.raises(ValueError, match="zero_convs.99.0.weight"):
    controlnet_single_file.to_diffusers({**bare, "zero_convs.99.0.weight": bare["zero_convs.0.0.weight"]},
                                        module.config)
  # the default config follows the text width: SD 1.5's (768), which this tiny file (12) is not
  with pytest.raises(ValueError, match="text width 12"):
    load_controlnet(path)
  with pytest.raises(ValueError, match="config= is for single files"):
    load_controlnet(os.path.join(CONTROL, "sd1"), config={})


def test_config_errors_name_the_field():
  d = json.load(open(os.path.join(CONTROL, "sd1", "config.json")))
  for key, value, words in (("controlnet_conditioning_channel_order", "gbr", "channel_order"),
                            ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
                            ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
                            ("class_embed_type", "timestep", "class_embed_type"),
                            ("num_class_embeds", 10, "num_class_embeds"),
                            ("sample_size", 64, "unknown field")):
    with pytest.raises(ValueError, match=words):
      cn_lib.ControlNetConfig.from_diffusers_config({**d, key: value})
  unet, unet_params = load_unet(os.path.join(FIXTURES, "models", "unet_sd1"))
  with pytest.raises(ValueError, match="time_cond_proj_dim"):
    cn_lib.from_unet(dataclasses.replace(unet.config, time_cond_proj_dim=8), unet_params)


# --- the pipelines ------------------------------------------------------------------------------------------

def build(model_type, tokenizer, reference, case):
  configs = tiny_configs(model_type)
  names = ("tokenizer", "tokenizer_2") if model_type == "sdxl" else ("tokenizer",)
  pipe = random_pipeline(configs, seed=0, tokenizers={n: tokenizer for n in names}, model_type=model_type)
  scheduler = json.loads(str(reference[f"{case}.scheduler"]))
  sd, params = pipelines.from_components(pipe.models, schedules.from_diffusers_config(scheduler),
                                         model_type=model_type)
  return sd, params, schedules.sampler_from_diffusers_config(scheduler)


@pytest.fixture(scope="module")
def sd1(tokenizer, reference):
  sd, params, _ = build("sd1", tokenizer, reference, "txt2img")
  nets = [load_controlnet(os.path.join(CONTROL, f"pipe_sd1_{k}")) for k in "ab"]
  return sd, {**params, "controlnets": tuple(p for _, p in nets)}, tuple(m for m, _ in nets)


def case_inputs(sd, tokenizer, reference, case):
  """(Prompt, controls, guess_mode, noise) of a fixture case."""
  prompts = [str(p) for p in reference[f"{case}.prompt"]]
  negatives = [str(p) for p in reference[f"{case}.negative"]]
  toks = [tokenizer] * len(sd.text_encoders)
  b = len(prompts)
  time_ids = np.stack([pipelines.micro_conditioning(SIZE, SIZE)] * b) if sd.sdxl else None
  prompt = pipelines.Prompt(ids=pipelines.tokenize(toks, sd.text_encoders, prompts),
                            negative_ids=pipelines.tokenize(toks, sd.text_encoders, negatives),
                            guidance_scale=np.full(b, GUIDANCE, np.float32), time_ids=time_ids,
                            zero_negative=np.zeros(b, bool) if sd.sdxl else None)
  controls = []
  for k in range(4):
    if f"{case}.control_{k}" not in reference:
      break
    controls.append(control_lib.control_input(reference[f"{case}.control_{k}"].astype(np.float32) / 255.0,
                                              reference[f"{case}.scale_{k}"], reference[f"{case}.start_{k}"],
                                              reference[f"{case}.end_{k}"]))
  return prompt, tuple(controls), bool(reference[f"{case}.guess_mode"]), reference[f"{case}.noise"]


def keys_for(n):
  return jax.random.split(jax.random.key(0), n)


@pytest.mark.parametrize("case", ["txt2img", "guess", "multi"])
def test_txt2img_matches_diffusers(sd1, tokenizer, reference, case):
  """StableDiffusionControlNetPipeline: one ControlNet at scale 0.7 within guidance start/end 0.2 / 0.8 (DDIM, 5
  steps: the first and last steps run without it); guess mode (DDIM); MultiControlNet with two images, scales
  (0.6, 1.3) and windows (0, 1) / (0.4, 0.9) on Euler (fractional timesteps)."""
  sd, params, nets = sd1
  scheduler = json.loads(str(reference[f"{case}.scheduler"]))
  sd = dataclasses.replace(sd, schedule=schedules.from_diffusers_config(scheduler))
  sampler = schedules.sampler_from_diffusers_config(scheduler)
  prompt, controls, guess, noise = case_inputs(sd, tokenizer, reference, case)
  nets = nets[:len(controls)]
  p = {**params, "controlnets": params["controlnets"][:len(controls)]}
  run = lambda controls: TXT2IMG(sd, p, prompt, keys_for(len(noise)), height=SIZE, width=SIZE, sampler=sampler,
                                  num_steps=STEPS, noise=noise, control=controls, controlnets=nets, guess_mode=guess)
  assert max_err(run(controls), reference[f"{case}.output"]) < IMAGE_ATOL
  if case == "txt2img":  # the ControlNet matters: at scale 0 the images are far off (the same compiled function)
    assert max_err(run(tuple(c._replace(scale=0 * c.scale) for c in controls)), reference[f"{case}.output"]) > 0.1


def posterior_latents(sd, params, image, eps):
  """diffusers' VAE encoding with its posterior draw `eps`: scaling_factor * (mean + std * eps)."""
  mean, logvar = VAE_ENCODE(sd.vae, params["vae"], image)
  return vae_lib.scale_latents(mean + jnp.exp(0.5 * logvar) * eps, sd.vae.config)


@pytest.mark.parametrize("case", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_diffusers(sd1, tokenizer, reference, case):
  """StableDiffusionControlNetImg2ImgPipeline (DDIM, strength 0.6: 3 steps, control window 0 / 0.7) and
  StableDiffusionControlNetInpaintPipeline with the ordinary 4-channel U-Net (known latents blended in every step,
  scale 1.1), from diffusers' own VAE posterior draws."""
  sd, params, nets = sd1
  prompt, controls, guess, noise = case_inputs(sd, tokenizer, reference, case)
  image = reference[f"{case}.init"].astype(np.float32) / 255.0 * 2 - 1
  init = posterior_latents(sd, params, image, reference[f"{case}.posterior_noise"])
  kwargs = dict(sampler="ddim", num_steps=STEPS, noise=noise, init_latents=init, control=controls,
                controlnets=nets[:1], guess_mode=guess)
  p = {**params, "controlnets": params["controlnets"][:1]}
  if case == "img2img":
    latents = DENOISE(sd, p, prompt, keys_for(2), tuple(init.shape[1:]), strength=float(reference["img2img.strength"]),
                      **kwargs)
  else:
    mask = reference["inpaint.mask"].astype(np.float32)[:, ::sd.downscale, ::sd.downscale]
    latents = DENOISE(sd, p, prompt, keys_for(2), tuple(init.shape[1:]), inpaint_mask=mask, **kwargs)
  assert max_err(DECODE(sd, params, latents), reference[f"{case}.output"]) < IMAGE_ATOL


def test_sdxl_txt2img_matches_diffusers(tokenizer, reference):
  """StableDiffusionXLControlNetPipeline (Euler, scale 0.8, window 0.2 / 1): the ControlNet gets the pooled text
  embeddings and time ids too."""
  sd, params, sampler = build("sdxl", tokenizer, reference, "sdxl")
  net, net_params = load_controlnet(os.path.join(CONTROL, "pipe_sdxl"))
  prompt, controls, guess, noise = case_inputs(sd, tokenizer, reference, "sdxl")
  got = TXT2IMG(sd, {**params, "controlnets": (net_params,)}, prompt, keys_for(2), height=SIZE, width=SIZE,
                sampler=sampler, num_steps=STEPS, noise=noise, control=controls, controlnets=(net,), guess_mode=guess)
  assert max_err(got, reference["sdxl.output"]) < IMAGE_ATOL


def test_keep_is_diffusers_controlnet_keep():
  """The guidance window by step, from t: diffusers' 1 - (i / n < start or (i + 1) / n > end)."""
  ts = np.asarray([999.0, 799.0, 599.0, 399.0, 199.0], np.float32)
  for start, end in ((0.2, 0.8), (0.0, 1.0), (0.4, 0.9), (0.1, 0.5)):
    want = [1.0 - float(i / 5 < start or (i + 1) / 5 > end) for i in range(5)]
    got = [float(control_lib.keep(ts, jnp.full((1,), t), jnp.float32(start), jnp.float32(end))[0]) for t in ts]
    assert got == want, (start, end)


def test_input_errors_are_clear(sd1, tokenizer, reference):
  sd, params, nets = sd1
  prompt, controls, _, noise = case_inputs(sd, tokenizer, reference, "txt2img")
  kw = dict(height=SIZE, width=SIZE, sampler="ddim", num_steps=STEPS, noise=noise)
  keys = keys_for(2)
  ctl = controls[0]
  p1 = {**params, "controlnets": params["controlnets"][:1]}
  cases = [
      (dict(control=controls, controlnets=nets), "1 control input"),
      (dict(control=controls), "no controlnets"),
      (dict(controlnets=nets[:1]), "without control inputs"),
      (dict(control=(ctl._replace(image=ctl.image[:, :16]),), controlnets=nets[:1]), r"expected \(2, 32, 32, 3\)"),
      (dict(control=(ctl._replace(scale=np.asarray([0.5, np.nan], np.float32)),), controlnets=nets[:1]),
       "finite and >= 0"),
      (dict(control=(ctl._replace(scale=np.asarray([0.5, -1.0], np.float32)),), controlnets=nets[:1]),
       "finite and >= 0"),
      (dict(control=(ctl._replace(start=np.asarray([0.9, 0.9], np.float32)),), controlnets=nets[:1]),
       "start < end"),
      (dict(control=(ctl._replace(scale=np.ones(3, np.float32)),), controlnets=nets[:1]), r"scale must be \[2\]"),
  ]
  for extra, words in cases:
    with pytest.raises(ValueError, match=words):
      pipelines.txt2img(sd, p1, prompt, keys, **kw, **extra)
  with pytest.raises(ValueError, match=r"1 ControlNet\(s\) but params\['controlnets'\] has 2"):
    pipelines.txt2img(sd, params, prompt, keys, control=controls[:1], controlnets=nets[:1], **kw)
  with pytest.raises(ValueError, match="params has no \"controlnets\""):
    no_nets = {k: v for k, v in params.items() if k != "controlnets"}
    pipelines.txt2img(sd, no_nets, prompt, keys, control=controls[:1], controlnets=nets[:1], **kw)
  # a ControlNet for another U-Net: SDXL's (via img2img and inpaint, which pass the control through)
  sdxl_net, sdxl_params = load_controlnet(os.path.join(CONTROL, "pipe_sdxl"))
  p = {**params, "controlnets": (sdxl_params,)}
  image = np.zeros((2, SIZE, SIZE, 3), np.float32)
  with pytest.raises(ValueError, match="cross_attention_dim|addition_embed_type"):
    IMG2IMG(sd, p, prompt, keys, image, strength=0.5, sampler="ddim", num_steps=STEPS, control=controls[:1],
            controlnets=(sdxl_net,))
  with pytest.raises(ValueError, match="expected"):
    INPAINT(sd, p1, prompt, keys, image, np.ones((2, SIZE, SIZE, 1), np.float32), sampler="ddim", num_steps=STEPS,
            control=(ctl._replace(image=ctl.image[:, :, :8]),), controlnets=nets[:1])
  with pytest.raises(ValueError, match="control image"):
    control_lib.control_input(np.zeros((SIZE, SIZE, 3)))
