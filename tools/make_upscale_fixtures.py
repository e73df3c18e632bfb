"""Regenerate tests/fixtures/upscale/: a tiny random Stable Diffusion x4 upscaler saved by diffusers, and its outputs.

  pip install torch==2.13.0 "diffusers==0.42.*" transformers && python tools/make_upscale_fixtures.py

Builds, with torch's default initialisation (seed 0) plus a small random perturbation of every parameter, a
`StableDiffusionUpscalePipeline` shaped like stabilityai/stable-diffusion-x4-upscaler but tiny:

  unet               UNet2DConditionModel, block_out_channels (16, 16, 32), 7 input channels (4 latent + 3 image),
                     num_class_embeds 1000 (the noise level), DownBlock2D first as the real one, linear projections,
                     only_cross_attention [True, True, False] (down block 1 / up block 1 attn1 attends to the text;
                     the level-2 blocks do not; the text is 24 wide, the level-1 blocks 16, so those attn1's to_k /
                     to_v map 24 -> 16)
  vae                AutoencoderKL with 3 blocks (a 4x downscale, as the real upscaler's), scaling_factor 0.08333
  text_encoder       a CLIPTextModel (gelu, as SD 2.x's OpenCLIP) sized to the fixture tokenizer
  tokenizer          tests/fixtures/models/tokenizer (1,000 tokens)
  low_res_scheduler  DDPMScheduler (scaled_linear 1e-4 .. 0.02), the real upscaler's
  scheduler          DDIMScheduler with the real upscaler's settings (v_prediction, scaled_linear 0.00085 .. 0.012)
  max_noise_level    350

and writes

  pipeline/        the pipeline's `save_pretrained` folder (float32 safetensors), what sdjax loads
  reference.npz    unet.x / unet.t / unet.context / unet.class_labels / unet.out (one U-Net call, NHWC), and per case
                   C: C.prompt / C.negative (strings), C.guidance, C.noise_level, C.steps, C.image_in (the low-res
                   image, NHWC in [-1, 1]), C.low_res_noise (what the pipeline's `randn_tensor` drew to noise it,
                   NHWC), C.noise (the `latents=` fed to diffusers, NHWC), C.image (NHWC in [-1, 1]:
                   output_type="np" * 2 - 1) and C.scheduler (the scheduler config diffusers sampled with, JSON)

Cases (16x16 low-res images -> 64x64, 3 steps, negative prompts, guidance 7.5): "ddim" (two prompts, noise_level 20,
the pipeline's DDIMScheduler) and "euler" (one prompt, noise_level 60, EulerDiscreteScheduler.from_config of the same
config).
"""
import json
import os
import shutil

import diffusers
import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                       StableDiffusionUpscalePipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "upscale")
LOW_RES, STEPS, GUIDANCE = 16, 3, 7.5
CASES = [("ddim", DDIMScheduler, 20, ["a photo of a cat", "a bowl of fruit"], ["blurry, low quality", ""]),
         ("euler", EulerDiscreteScheduler, 60, ["a red car"], ["ugly"])]

UNET = {"sample_size": 16, "in_channels": 7, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [16, 16, 32], "norm_num_groups": 8, "attention_head_dim": 2, "cross_attention_dim": 24,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "only_cross_attention": [True, True, False], "num_class_embeds": 1000, "use_linear_projection": True}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 8, 8],
       "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
       "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.08333}
TEXT = {"hidden_size": 24, "intermediate_size": 48, "projection_dim": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_act": "gelu"}
LOW_RES_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.0001,
                     "beta_end": 0.02, "clip_sample": False, "variance_type": "fixed_small"}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction"}


def build() -> StableDiffusionUpscalePipeline:
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**UNET)
  vae = AutoencoderKL(**VAE)
  tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
  encoder = CLIPTextModel(CLIPTextConfig(**TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  # torch's default init leaves norm scales at 1 and some biases at 0: perturb every parameter a little so that
  # each one changes the output.
  with torch.no_grad():
    for model in (unet, vae, encoder):
      for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
  return StableDiffusionUpscalePipeline(vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tokenizer,
                                        unet=unet.eval(), low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER),
                                        scheduler=DDIMScheduler(**SCHEDULER), max_noise_level=350)


def nhwc(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def scheduler_config(scheduler) -> dict:
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def unet_case(pipe) -> dict:
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 7, 8, 8)).astype(np.float32)
  t = np.asarray([999.0, 37.0], np.float32)
  context = rng.standard_normal((2, 5, 24)).astype(np.float32)
  labels = np.asarray([20, 350], np.int64)
  with torch.no_grad():
    out = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                    class_labels=torch.from_numpy(labels)).sample.numpy()
  print(f"unet: out {out.shape} std {out.std():.3f}")
  return {"unet.x": nhwc(x), "unet.t": t, "unet.context": context, "unet.class_labels": labels.astype(np.int32),
          "unet.out": nhwc(out)}


def render(pipe, name, noise_level, prompts, negatives, seed) -> dict:
  rng = np.random.default_rng(seed)
  b = len(prompts)
  image = rng.uniform(-1, 1, (b, 3, LOW_RES, LOW_RES)).astype(np.float32)
  assert torch.equal(pipe.image_processor.preprocess(torch.from_numpy(image)), torch.from_numpy(image))
  noise = rng.standard_normal((b, 4, LOW_RES, LOW_RES)).astype(np.float32)
  module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale
  original, drawn = module.randn_tensor, []

  def recording_randn(*args, **kwargs):
    z = original(*args, **kwargs)
    drawn.append(z.clone())
    return z

  module.randn_tensor = recording_randn
  try:
    with torch.no_grad():
      out = pipe(prompt=prompts, negative_prompt=negatives, image=torch.from_numpy(image), noise_level=noise_level,
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise),
                 generator=torch.Generator().manual_seed(seed), output_type="np").images
  finally:
    module.randn_tensor = original
  assert len(drawn) == 1 and drawn[0].shape == image.shape, [d.shape for d in drawn]  # only the low-res noise
  out = np.asarray(out, np.float32) * 2 - 1
  print(f"{name}: {type(pipe.scheduler).__name__}, noise_level {noise_level}, images {out.shape} in "
        f"[{out.min():.3f}, {out.max():.3f}], std {out.std():.3f}")
  return {f"{name}.prompt": np.asarray(prompts), f"{name}.negative": np.asarray(negatives),
          f"{name}.guidance": np.float32(GUIDANCE), f"{name}.noise_level": np.int32(noise_level),
          f"{name}.steps": np.int32(STEPS), f"{name}.image_in": nhwc(image), f"{name}.low_res_noise": nhwc(drawn[0]),
          f"{name}.noise": nhwc(noise), f"{name}.image": out,
          f"{name}.scheduler": np.asarray(json.dumps(scheduler_config(pipe.scheduler)))}


def main():
  pipe = build()
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(OUT, "pipeline")
  shutil.rmtree(folder, ignore_errors=True)
  pipe.save_pretrained(folder)
  pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)  # the folder loads
  pipe.set_progress_bar_config(disable=True)
  out = unet_case(pipe)
  base = pipe.scheduler.config
  for i, (name, cls, level, prompts, negatives) in enumerate(CASES):
    pipe.scheduler = cls.from_config(base)
    out.update(render(pipe, name, level, prompts, negatives, seed=i + 1))
  path = os.path.join(OUT, "reference.npz")
  np.savez_compressed(path, **out)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"wrote {OUT} ({size / 1024:.0f} KiB in all)")


if __name__ == "__main__":
  main()
