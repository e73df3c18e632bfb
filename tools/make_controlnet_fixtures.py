"""Regenerate tests/fixtures/controlnet/ from diffusers 0.42.1's ControlNetModel and ControlNet pipelines.

  /work/tvenv/bin/python tools/make_controlnet_fixtures.py     (torch 2.13 CPU, diffusers 0.42.1)

ControlNets (diffusers folders, config.json + diffusion_pytorch_model.safetensors), each made by diffusers'
`ControlNetModel.from_unet` with its zero convolutions (controlnet_down_blocks, controlnet_mid_block,
controlnet_cond_embedding.conv_out) then drawn from N(0, 0.2^2) so the residuals are not zero:
  sd1/        from tests/fixtures/models/unet_sd1, conditioning_embedding_out_channels (4, 8, 8, 16) (8x image)
  sdxl/       from tests/fixtures/models/unet_sdxl, the same encoder widths
  pipe_sd1_a/ pipe_sd1_b/  from the tiny SD 1.x pipeline's U-Net (`sdjax.convert.random.write_random_pipeline`,
              seed 0), conditioning_embedding_out_channels (4, 8) (the tiny VAE's 2x)
  pipe_sdxl/  from the tiny SDXL pipeline's U-Net, (4, 8)

single_file_sd1.safetensors: sd1/ in lllyasviel's original layout (input_hint_block, zero_convs, middle_block_out,
  ... under "control_model.", plus one whole-model key to ignore), float16; diffusers' convert_controlnet_checkpoint
  and ControlNetModel.from_single_file(config=sd1/) read it back as sd1/.

reference.npz:
  from_unet.<sd1|sdxl>.{config, keys, zero, copied}: diffusers' from_unet (before the zero convs are redrawn): its
    config (JSON), state-dict keys, the keys whose tensors are all zero, and those equal to the U-Net's same key.
  model.<sd1|sdxl>.*: inputs x / t / context / image (NHWC, uint8: the model saw image / 255) [/ text_embeds /
    time_ids] and outputs
    down_<i> / mid (NHWC) of ControlNetModel at conditioning_scale 0.7 ("plain"), in guess mode ("guess"), and
    (sd1) with controlnet_conditioning_channel_order "bgr" + global_pool_conditions ("pool"); model.sd1.unet: the
    U-Net's output with the "plain" residuals added (down_block_additional_residuals, mid_block_additional_residual).
  <case>.*: pipeline outputs (output_type="np" * 2 - 1, NHWC), 32x32, 5 steps, guidance 5, with their prompts,
    negative prompts, starting latents `noise`, control images (`control_<k>`, uint8: diffusers got them / 255),
    per-ControlNet `scale_<k>`, `start_<k>`, `end_<k>`, `guess_mode`, the scheduler config (JSON), and for img2img /
    inpaint the image `init` (uint8, / 255), `mask` (uint8 0/1),
    the VAE posterior's standard-normal draw (`posterior_noise`) and the noise add_noise used (`noise`):
    txt2img      StableDiffusionControlNetPipeline, DDIM, scale 0.7, guidance start/end 0.2 / 0.8
    guess        the same pipeline in guess mode, scale 0.9
    multi        MultiControlNet (pipe_sd1_a + pipe_sd1_b), Euler, scales (0.6, 1.3), start (0, 0.4), end (1, 0.9)
    img2img      StableDiffusionControlNetImg2ImgPipeline, DDIM, strength 0.6, scale 0.8, start/end 0 / 0.7
    inpaint      StableDiffusionControlNetInpaintPipeline (4-channel U-Net), DDIM, strength 1, scale 1.1
    sdxl         StableDiffusionXLControlNetPipeline, Euler, scale 0.8, start/end 0.2 / 1
"""
import copy
import json
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import (ControlNetModel, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline,
                       StableDiffusionPipeline, StableDiffusionXLControlNetPipeline,
                       UNet2DConditionModel)
from diffusers.models.autoencoders import vae as vae_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sdjax.convert.random import write_random_pipeline  # noqa: E402

MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
TOKENIZER = os.path.join(MODELS, "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "controlnet")
SIZE, STEPS, GUIDANCE = 32, 5, 5.0
PROMPTS = ["a photo of a cat", "a bowl of fruit"]
NEGATIVES = ["blurry, low quality", "ugly"]
ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


def nhwc(t) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t,
                                         np.float32).transpose(0, 2, 3, 1))


def nchw(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def scheduler_config(scheduler) -> dict:
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def controlnet_from(unet, widths, seed, name, out, folder):
  """diffusers' from_unet, its from_unet facts recorded under `name` (if given), zero convs redrawn, every weight
  rounded to float16 (the folder is written in float16, half the size; the model stays float32 with the same
  values)."""
  torch.manual_seed(seed)
  cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
  if name:
    state, ustate = cn.state_dict(), unet.state_dict()
    out[f"from_unet.{name}.config"] = np.asarray(json.dumps({k: v for k, v in sorted(cn.config.items())
                                                            if not k.startswith("_")}))
    out[f"from_unet.{name}.keys"] = np.asarray(json.dumps(sorted(state)))
    out[f"from_unet.{name}.zero"] = np.asarray(json.dumps(sorted(k for k, v in state.items() if not v.any())))
    out[f"from_unet.{name}.copied"] = np.asarray(json.dumps(sorted(k for k, v in state.items()
                                                                   if k in ustate and torch.equal(v, ustate[k]))))
  g = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():
    for k, v in cn.named_parameters():
      if k.startswith(ZERO_CONVS):
        v.copy_(torch.randn(v.shape, generator=g) * 0.2)
    for v in cn.parameters():
      v.copy_(v.half().float())
  copy.deepcopy(cn).half().save_pretrained(os.path.join(OUT, folder), safe_serialization=True)
  return cn.eval()


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_original(key: str, config) -> str:
  """A diffusers ControlNetModel key -> lllyasviel's cldm.ControlNet key (the inverse of diffusers'
  convert_controlnet_checkpoint, which `single_file_case` checks)."""
  lpb, n_hint = config["layers_per_block"], len(config["conditioning_embedding_out_channels"])
  parts = key.split(".")
  head, leaf = ".".join(parts[:-1]), parts[-1]
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0",
           "controlnet_cond_embedding.conv_in": "input_hint_block.0",
           "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 + 4 * (n_hint - 1)}"}
  if head in fixed:
    return f"{fixed[head]}.{leaf}"
  if parts[0] == "controlnet_down_blocks":
    return f"zero_convs.{parts[1]}.0.{leaf}"
  if parts[:2] == ["controlnet_cond_embedding", "blocks"]:
    return f"input_hint_block.{2 * (int(parts[2]) + 1)}.{leaf}"
  resnet = lambda rest: f"{_RESNET[rest[0]]}.{leaf}" if len(rest) == 1 else None
  if parts[0] == "down_blocks":
    b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:-1]
    i = 1 + b * (lpb + 1) + j
    if kind == "resnets":
      return f"input_blocks.{i}.0.{resnet(rest)}"
    if kind == "attentions":
      return f"input_blocks.{i}.1.{'.'.join(rest)}.{leaf}"
    return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.{leaf}"  # downsamplers.0.conv
  if parts[0] == "mid_block":
    kind, j, rest = parts[1], int(parts[2]), parts[3:-1]
    if kind == "resnets":
      return f"middle_block.{2 * j}.{resnet(rest)}"
    return f"middle_block.1.{'.'.join(rest)}.{leaf}"
  raise KeyError(key)


def single_file_case(cn, out):
  """sd1's ControlNet in the original layout (with the control_model. prefix, and one key of a whole-model file
  that must be ignored), checked against diffusers' own converter and single-file loader."""
  from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
  from safetensors.torch import save_file
  config = dict(cn.config)
  state = {k: v.detach().clone() for k, v in cn.state_dict().items()}
  original = {f"control_model.{to_original(k, config)}": v for k, v in state.items()}
  back = convert_controlnet_checkpoint(original, config)
  assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state), "converter disagrees"
  original["model.diffusion_model.out.2.bias"] = torch.zeros(4)
  path = os.path.join(OUT, "single_file_sd1.safetensors")
  save_file({k: v.half().contiguous() for k, v in original.items()}, path)
  loaded = ControlNetModel.from_single_file(path, config=os.path.join(OUT, "sd1"), local_files_only=True,
                                            torch_dtype=torch.float32)
  got = loaded.state_dict()
  assert sorted(got) == sorted(state) and all(torch.equal(got[k].float(), state[k]) for k in state), \
      "from_single_file disagrees"
  print(f"single_file_sd1: {len(original)} keys; diffusers' convert_controlnet_checkpoint and "
        "ControlNetModel.from_single_file give the sd1 ControlNet back")


def model_case(name, cn, unet, rng, out, variants=False):
  b, h = 2, 8
  x = rng.standard_normal((b, h, h, 4)).astype(np.float32)
  t = np.asarray([10.0, 613.0], np.float32)
  ctx = rng.standard_normal((b, 3, cn.config.cross_attention_dim)).astype(np.float32)
  image = rng.integers(0, 256, (b, h * 8, h * 8, 3)).astype(np.uint8)
  kwargs = {}
  inputs = {"x": x, "t": t, "context": ctx, "image": image}
  if cn.config.addition_embed_type == "text_time":
    pooled = cn.config.projection_class_embeddings_input_dim - 6 * cn.config.addition_time_embed_dim
    inputs["text_embeds"] = rng.standard_normal((b, pooled)).astype(np.float32)
    inputs["time_ids"] = np.asarray([[32, 32, 0, 0, 32, 32], [40, 24, 4, 2, 32, 32]], np.float32)
    kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                                   "time_ids": torch.from_numpy(inputs["time_ids"])}
  for k, v in inputs.items():
    out[f"model.{name}.{k}"] = v
  args = (nchw(x), torch.from_numpy(t), torch.from_numpy(ctx))
  image = image.astype(np.float32) / 255.0
  cases = {"plain": (cn, False), "guess": (cn, True)}
  if variants:
    # (without the private keys: from_config would reset the fields listed in _use_default_values)
    config = {k: v for k, v in cn.config.items() if not k.startswith("_")}
    pool = ControlNetModel.from_config({**config, "controlnet_conditioning_channel_order": "bgr",
                                        "global_pool_conditions": True})
    assert pool.config.global_pool_conditions and pool.config.controlnet_conditioning_channel_order == "bgr"
    pool.load_state_dict(cn.state_dict())
    cases["pool"] = (pool.eval(), False)
  with torch.no_grad():
    for case, (model, guess) in cases.items():
      down, mid = model(*args, controlnet_cond=nchw(image), conditioning_scale=0.7, guess_mode=guess,
                        return_dict=False, **kwargs)
      for i, d in enumerate(down):
        out[f"model.{name}.{case}.down_{i}"] = nhwc(d)
      out[f"model.{name}.{case}.mid"] = nhwc(mid)
      if case == "plain" and unet is not None:
        y = unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        out[f"model.{name}.unet"] = nhwc(y)
  print(f"model.{name}: {len(down)} down residuals, mid {tuple(mid.shape)}, |mid| {mid.abs().mean():.4f}")


class RecordVAE:
  """Records the VAE posterior's standard-normal draws (diffusers' DiagonalGaussianDistribution.sample)."""

  def __enter__(self):
    self.draws, self.original = [], vae_module.randn_tensor

    def recording(*args, **kwargs):
      z = self.original(*args, **kwargs)
      self.draws.append(z.clone())
      return z

    vae_module.randn_tensor = recording
    return self

  def __exit__(self, *exc):
    vae_module.randn_tensor = self.original


def record_case(out, name, pipe, image, noise, controls, scales, starts, ends, guess, extra=None):
  n = len(controls)
  out[f"{name}.prompt"] = np.asarray(PROMPTS)
  out[f"{name}.negative"] = np.asarray(NEGATIVES)
  out[f"{name}.output"] = np.asarray(image, np.float32) * 2 - 1
  out[f"{name}.noise"] = noise
  out[f"{name}.guess_mode"] = np.asarray(guess)
  out[f"{name}.scheduler"] = np.asarray(json.dumps(scheduler_config(pipe.scheduler)))
  for k in range(n):
    out[f"{name}.control_{k}"] = np.round(controls[k] * 255).astype(np.uint8)
    out[f"{name}.scale_{k}"] = np.float32(scales[k])
    out[f"{name}.start_{k}"] = np.float32(starts[k])
    out[f"{name}.end_{k}"] = np.float32(ends[k])
  out.update({f"{name}.{k}": v for k, v in (extra or {}).items()})
  img = out[f"{name}.output"]
  print(f"{name}: {type(pipe).__name__} + {type(pipe.scheduler).__name__}, {n} ControlNet(s), images {img.shape} in "
        f"[{img.min():.3f}, {img.max():.3f}], std {img.std():.3f}")


def control_kwargs(controls, scales, starts, ends, guess):
  one = len(controls) == 1
  pick = (lambda v: v[0]) if one else list
  return dict(controlnet_conditioning_scale=pick([float(s) for s in scales]),
              control_guidance_start=pick([float(s) for s in starts]),
              control_guidance_end=pick([float(s) for s in ends]), guess_mode=guess)


def main():
  out = {}
  rng = np.random.default_rng(0)
  os.makedirs(OUT, exist_ok=True)
  # --- models ---
  unet = UNet2DConditionModel.from_pretrained(os.path.join(MODELS, "unet_sd1")).eval()
  cn = controlnet_from(unet, (4, 8, 8, 16), 1, "sd1", out, "sd1")
  model_case("sd1", cn, unet, rng, out, variants=True)
  single_file_case(cn, out)
  unet = UNet2DConditionModel.from_pretrained(os.path.join(MODELS, "unet_sdxl")).eval()
  cn = controlnet_from(unet, (4, 8, 8, 16), 2, "sdxl", out, "sdxl")
  model_case("sdxl", cn, None, rng, out)

  latent = SIZE // 2
  noise_of = lambda seed: np.random.default_rng(seed).standard_normal((2, latent, latent, 4)).astype(np.float32)
  # images as k / 255 (stored as uint8)
  image_of = lambda seed: np.random.default_rng(seed).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32) / 255
  common = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                output_type="np")
  with tempfile.TemporaryDirectory() as tmp:
    # --- SD 1.x pipelines ---
    write_random_pipeline(os.path.join(tmp, "sd1"), "sd1", tokenizer=TOKENIZER, seed=0)
    folder = os.path.join(tmp, "sd1")
    base = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    cn_a = controlnet_from(base.unet, (4, 8), 3, None, out, "pipe_sd1_a")
    cn_b = controlnet_from(base.unet, (4, 8), 4, None, out, "pipe_sd1_b")
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "feature_extractor")}
    ddim = DDIMScheduler.from_config(base.scheduler.config)
    euler = EulerDiscreteScheduler.from_config(base.scheduler.config)

    def sd1_pipe(cls, controlnet, scheduler):
      pipe = cls(**parts, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
                 requires_safety_checker=False)
      pipe.set_progress_bar_config(disable=True)
      return pipe

    for name, controls, scales, starts, ends, guess, sched, seed in (
        ("txt2img", [cn_a], [0.7], [0.2], [0.8], False, ddim, 10),
        ("guess", [cn_a], [0.9], [0.0], [1.0], True, ddim, 11),
        ("multi", [cn_a, cn_b], [0.6, 1.3], [0.0, 0.4], [1.0, 0.9], False, euler, 12)):
      pipe = sd1_pipe(StableDiffusionControlNetPipeline, controls[0] if len(controls) == 1 else controls, sched)
      images = [image_of(seed + 100 * k) for k in range(len(controls))]
      noise = noise_of(seed)
      with torch.no_grad():
        image = pipe(image=images[0] if len(controls) == 1 else images, height=SIZE, width=SIZE,
                     latents=nchw(noise), **control_kwargs(controls, scales, starts, ends, guess), **common).images
      record_case(out, name, pipe, image, noise, images, scales, starts, ends, guess)

    # img2img: the generator draws the VAE posterior sample, then add_noise's noise.
    pipe = sd1_pipe(StableDiffusionControlNetImg2ImgPipeline, cn_a, ddim)
    init01, control = image_of(20), image_of(21)
    with RecordVAE() as rec, torch.no_grad():
      image = pipe(image=init01, control_image=control, strength=0.6, generator=torch.Generator().manual_seed(5),
                   **control_kwargs([cn_a], [0.8], [0.0], [0.7], False), **common).images
    g = torch.Generator().manual_seed(5)
    posterior = torch.randn((2, 4, latent, latent), generator=g)
    noise = torch.randn((2, 4, latent, latent), generator=g)
    assert len(rec.draws) == 1 and torch.equal(rec.draws[0], posterior), "img2img: unexpected generator draws"
    record_case(out, "img2img", pipe, image, nhwc(noise), [control], [0.8], [0.0], [0.7], False,
                {"init": np.round(init01 * 255).astype(np.uint8), "posterior_noise": nhwc(posterior),
                 "strength": np.float32(0.6)})

    # inpaint (4-channel U-Net, strength 1): latents = the given noise; the first posterior draw is the image's.
    pipe = sd1_pipe(StableDiffusionControlNetInpaintPipeline, cn_a, ddim)
    init01, control, noise = image_of(30), image_of(31), noise_of(32)
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[0, 8:24, 4:20] = 1.0
    mask[1, :16, :] = 1.0
    with RecordVAE() as rec, torch.no_grad():
      image = pipe(image=init01, mask_image=nchw(mask), control_image=control, height=SIZE, width=SIZE,
                   strength=1.0, latents=nchw(noise), generator=torch.Generator().manual_seed(6),
                   **control_kwargs([cn_a], [1.1], [0.0], [1.0], False), **common).images
    record_case(out, "inpaint", pipe, image, noise, [control], [1.1], [0.0], [1.0], False,
                {"init": np.round(init01 * 255).astype(np.uint8), "mask": mask.astype(np.uint8),
                 "posterior_noise": nhwc(rec.draws[0])})

    # --- SDXL ---
    write_random_pipeline(os.path.join(tmp, "sdxl"), "sdxl", tokenizer=TOKENIZER, seed=0)
    folder = os.path.join(tmp, "sdxl")
    sdxl_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    cn_x = controlnet_from(sdxl_unet, (4, 8), 5, None, out, "pipe_sdxl")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(folder, controlnet=cn_x, add_watermarker=False,
                                                               local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    control, noise = image_of(40), noise_of(41)
    with torch.no_grad():
      image = pipe(image=control, height=SIZE, width=SIZE, latents=nchw(noise),
                   **control_kwargs([cn_x], [0.8], [0.2], [1.0], False), **common).images
    record_case(out, "sdxl", pipe, image, noise, [control], [0.8], [0.2], [1.0], False)

  path = os.path.join(OUT, "reference.npz")
  np.savez_compressed(path, **out)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB); {OUT}: {total / 1024:.0f} KiB in all")


if __name__ == "__main__":
  main()
