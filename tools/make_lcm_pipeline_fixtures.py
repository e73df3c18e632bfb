"""Regenerate tests/fixtures/lcm/: a tiny random LCM-distilled pipeline saved by diffusers, and its outputs.

  pip install torch==2.13.0 "diffusers==0.42.*" transformers && python tools/make_lcm_pipeline_fixtures.py

Builds, with torch's default initialisation (seed 0), the tiny SD 1.x components of
`sdjax.convert.random.tiny_configs("sd1")` with the U-Net given `time_cond_proj_dim` (the guidance-scale embedding
of LCM-distilled U-Nets, `time_embedding.cond_proj`), a text encoder sized to the fixture tokenizer
(tests/fixtures/models/tokenizer: 1,000 tokens) and an LCMScheduler with LCM-Dreamshaper's settings, as a
`LatentConsistencyModelPipeline` (no safety checker), and writes:

  pipeline/        `save_pipeline_folder`'s output (`save_pretrained`, float32 safetensors), what sdjax loads
  reference.npz    per case C: C.prompt / C.negative (strings; the negatives are for sdjax, which must ignore
                   them as diffusers' LCM pipeline has none), C.guidance (the scale), C.noise (the `latents=`
                   fed to diffusers, NHWC), C.step_noise ([steps, B, h, w, c]: the noise LCMScheduler.step drew
                   at each step, zeros for the last, which draws none), C.latents (the final `denoised`, NHWC,
                   output_type="latent") and C.image (NHWC in [-1, 1]: output_type="np" * 2 - 1)

Cases (4 steps, 32x32 images, 16x16 latents): "w85" two prompts at guidance 8.5 (diffusers' default), "w1" one
prompt at guidance 1 (w = 0).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import diffusers
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sdjax.convert.random import tiny_configs  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "lcm")
SIZE, STEPS, COND_DIM = 32, 4, 8
CASES = [("w85", ["a photo of a cat", "an astronaut riding a horse"], ["blurry", ""], 8.5),
         ("w1", ["a bowl of fruit"], ["ugly"], 1.0)]
# LCM-Dreamshaper-v7's scheduler_config.json settings (the rest: LCMScheduler's defaults).
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": True, "steps_offset": 1, "original_inference_steps": 50,
             "prediction_type": "epsilon", "timestep_spacing": "leading"}


def build() -> LatentConsistencyModelPipeline:
  torch.manual_seed(0)
  configs = tiny_configs("sd1")
  unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
  unet = UNet2DConditionModel.from_config({**unet_config, "time_cond_proj_dim": COND_DIM})
  vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
  tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
  text = {k: v for k, v in configs["text_encoder"].items() if k != "architectures"}
  text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
  encoder = CLIPTextModel(CLIPTextConfig(**text))
  # torch's default init leaves the norm scales at 1 and some biases at 0: randomise every parameter a little
  # so that each one (cond_proj included) changes the output.
  with torch.no_grad():
    for model in (unet, vae, encoder):
      for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
  return LatentConsistencyModelPipeline(vae=vae, text_encoder=encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                        scheduler=LCMScheduler(**SCHEDULER), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)


def render(pipe, name, prompts, negatives, guidance, seed):
  rng = np.random.default_rng(seed)
  latent = SIZE // pipe.vae_scale_factor
  noise = rng.standard_normal((len(prompts), pipe.unet.config.in_channels, latent, latent)).astype(np.float32)
  module = diffusers.schedulers.scheduling_lcm
  original = module.randn_tensor
  out = {}
  for output_type in ("latent", "np"):
    drawn, gen = [], torch.Generator().manual_seed(seed)

    def recording_randn(shape, *args, **kwargs):
      z = torch.randn(shape, generator=gen)
      drawn.append(z.permute(0, 2, 3, 1).numpy())
      return z

    module.randn_tensor = recording_randn
    try:
      with torch.no_grad():
        result = pipe(prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
                      latents=torch.from_numpy(noise), output_type=output_type).images
    finally:
      module.randn_tensor = original
    assert len(drawn) == STEPS - 1, len(drawn)
    out[output_type] = (result, drawn)
  latents = out["latent"][0].permute(0, 2, 3, 1).numpy()
  image = np.asarray(out["np"][0], np.float32) * 2 - 1
  step_noise = np.stack(out["np"][1] + [np.zeros_like(out["np"][1][0])])
  np.testing.assert_array_equal(step_noise[:-1], np.stack(out["latent"][1]))
  print(f"{name}: guidance {guidance}, latents std {latents.std():.3f}, images {image.shape} in "
        f"[{image.min():.3f}, {image.max():.3f}], std {image.std():.3f}")
  return {f"{name}.prompt": np.asarray(prompts), f"{name}.negative": np.asarray(negatives),
          f"{name}.guidance": np.float32(guidance), f"{name}.noise": noise.transpose(0, 2, 3, 1),
          f"{name}.step_noise": step_noise, f"{name}.latents": latents, f"{name}.image": image}


def main():
  pipe = build()
  shutil.rmtree(OUT, ignore_errors=True)
  folder = os.path.join(OUT, "pipeline")
  pipe.save_pretrained(folder, safe_serialization=True)
  # Reload, so the outputs are those of the folder as diffusers reads it.
  pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  arrays = {"cases": np.asarray(json.dumps([c[0] for c in CASES]))}
  for i, (name, prompts, negatives, guidance) in enumerate(CASES):
    arrays.update(render(pipe, name, prompts, negatives, guidance, seed=i))
  np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"wrote {OUT} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
