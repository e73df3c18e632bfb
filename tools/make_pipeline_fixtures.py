"""Regenerate tests/fixtures/pipelines/reference.npz from diffusers' PyTorch pipelines.

  pip install torch==2.13.0 diffusers transformers && python tools/make_pipeline_fixtures.py

Writes the tiny random-weight SD 1.x and SDXL pipelines of `sdjax.convert.random.write_random_pipeline`
(seed 0; the test rebuilds the same weights in memory with `random_pipeline`, numpy-seeded) into a
temporary folder, loads each with diffusers' `from_pretrained` (so this also checks that the folder loads)
and renders 32x32 images from fixed starting latents, 4 steps, guidance 5, guidance_rescale 0.7:

  sd1        StableDiffusionPipeline, DDIMScheduler.from_config(the folder's scheduler config), a batch of
             3 with negative prompts ("" for the second: SD 1.x encodes the empty string)
  sdxl       StableDiffusionXLPipeline with its default EulerDiscreteScheduler, a batch of 2 with negative prompts
  sdxl_zero  the same pipeline and prompts, negative_prompt=None: force_zeros_for_empty_prompt zeroes the
             negative embeddings (sdjax: Prompt.zero_negative)

reference.npz holds, per case C: C.prompt / C.negative (strings), C.noise (the `latents=` fed to diffusers,
as NHWC), C.image (the output as NHWC in [-1, 1]: diffusers' [0, 1] `output_type="np"` * 2 - 1) and
C.scheduler (the scheduler config diffusers sampled with, JSON, for `schedules.from_diffusers_config`).
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sdjax.convert.random import write_random_pipeline  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "pipelines")
SIZE, STEPS, GUIDANCE, RESCALE = 32, 4, 5.0, 0.7
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a bowl of fruit"]
NEGATIVES = ["blurry, low quality", "", "ugly"]


def scheduler_config(scheduler) -> dict:
  """The config diffusers samples with, as a scheduler_config.json dict (private keys but the class dropped)."""
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def render(pipe, name, prompts, negatives, seed):
  rng = np.random.default_rng(seed)
  latent = SIZE // pipe.vae_scale_factor
  noise = rng.standard_normal((len(prompts), pipe.unet.config.in_channels, latent, latent)).astype(np.float32)
  with torch.no_grad():
    image = pipe(prompt=prompts, negative_prompt=negatives, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, guidance_rescale=RESCALE, latents=torch.from_numpy(noise),
                 output_type="np").images
  image = np.asarray(image, np.float32) * 2 - 1
  print(f"{name}: {type(pipe).__name__} + {type(pipe.scheduler).__name__}, images {image.shape} "
        f"in [{image.min():.3f}, {image.max():.3f}], std {image.std():.3f}")
  return {f"{name}.prompt": np.asarray(prompts), f"{name}.negative": np.asarray(negatives or [""] * len(prompts)),
          f"{name}.zero_negative": np.asarray(negatives is None), f"{name}.noise": noise.transpose(0, 2, 3, 1),
          f"{name}.image": image, f"{name}.scheduler": np.asarray(json.dumps(scheduler_config(pipe.scheduler)))}


def main():
  torch.manual_seed(0)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    write_random_pipeline(os.path.join(tmp, "sd1"), "sd1", tokenizer=TOKENIZER, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(tmp, "sd1"), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out.update(render(pipe, "sd1", PROMPTS, NEGATIVES, seed=1))

    write_random_pipeline(os.path.join(tmp, "sdxl"), "sdxl", tokenizer=TOKENIZER, seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(tmp, "sdxl"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    out.update(render(pipe, "sdxl", PROMPTS[:2], ["blurry, low quality", "ugly"], seed=2))
    out.update(render(pipe, "sdxl_zero", PROMPTS[:2], None, seed=3))
  os.makedirs(OUT, exist_ok=True)
  path = os.path.join(OUT, "reference.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
