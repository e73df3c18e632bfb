"""Regenerate tests/fixtures/refiner/: a tiny random SDXL refiner, as a diffusers folder and as an SGM single file,
and diffusers 0.42 references for the refiner's img2img and the base + refiner ensemble of expert denoisers.

  /work/tvenv/bin/python tools/make_refiner_fixtures.py

Writes:
  pipeline/            StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=
                       True, force_zeros_for_empty_prompt=False).save_pretrained: a tiny refiner U-Net (4 levels as the
                       real one: DownBlock2D, 2 x CrossAttnDownBlock2D, DownBlock2D; 5 time ids), text_encoder_2 =
                       tests/fixtures/models/clip_sdxl2, vae = tests/fixtures/models/vae_sdxl, tokenizer_2 = the
                       tests' tokenizer, the SDXL EulerDiscreteScheduler config.
  refiner.safetensors  the same weights under the SGM key names of sd_xl_refiner_1.0.safetensors
                       (model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.model.* = the OpenCLIP
                       tower), written by tools/make_single_file_fixtures.py's inverse mapping and checked here by
                       diffusers' own `from_single_file(config=pipeline/)`, which must give back every tensor exactly.
  reference.npz        img2img.*    the refiner on 32x32 images (its VAE downscales by 4), strength 0.6, 5 Euler steps,
                                    guidance 5, aesthetic_score 7, negative_aesthetic_score 2, negative_original_size
                                    (24, 24), negative crop (2, 0), negative prompts ["blurry", ""] (the refiner
                                    encodes "": no zeros); with the generator's draws (posterior_noise, noise)
                                    replayed, as NHWC
                       ensemble_{ddim,euler}.*  tools/make_pipeline_fixtures.py's tiny SDXL base (write_random_pipeline
                                    seed 0) at 16x16 with denoising_end=0.7 and output_type="latent" from fixed
                                    starting latents [2, 8, 8, 4],
                                    then this refiner with denoising_start=0.7 on its latents; 5 steps, guidance 5, both
                                    with DDIMScheduler / EulerDiscreteScheduler.from_config(the SDXL scheduler config).
                                    base_latents (NHWC), image (NHWC in [-1, 1]); scheduler / refiner_scheduler:
                                    the two pipelines' configs.
Every case also stores its prompts, negative prompts and the scheduler config (JSON).

  /work/tvenv/bin/python tools/make_refiner_fixtures.py --full-size

writes nothing: it builds the packaged sdxl_refiner default configs (sdjax/convert/configs/sdxl_refiner) at full size
on the meta device, writes their SGM key layout the same way, and checks that diffusers' converters and sdjax's
`ldm_to_diffusers` (on zero-stride numpy views) both give back every key with its shape.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.utils.torch_utils import randn_tensor
from safetensors.numpy import save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_single_file_fixtures as sf  # noqa: E402
from sdjax.convert.random import write_random_pipeline  # noqa: E402

MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
TOKENIZER = os.path.join(MODELS, "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "refiner")
SCHEDULER = os.path.join(ROOT, "sdjax", "convert", "configs", "sdxl", "scheduler.json")
# text_encoder_2 (clip_sdxl2) is 32 wide with a 24-wide projection: 24 + 5 time ids x 4.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8, 8, 8), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=24 + 5 * 4)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]
NEGATIVES = ["blurry", ""]
STEPS, GUIDANCE, FRAC = 5, 5.0, 0.7
BASE_SIZE = 16  # the base's VAE downscales by 2: 8x8 latents, which the refiner's VAE (downscale 4) decodes to 32x32


def refiner_pipeline() -> StableDiffusionXLImg2ImgPipeline:
  torch.manual_seed(0)
  unet = sf.randomize(UNet2DConditionModel(**UNET), seed=7)
  with open(SCHEDULER) as f:
    scheduler = EulerDiscreteScheduler.from_config(json.load(f))
  pipe = StableDiffusionXLImg2ImgPipeline(
      vae=AutoencoderKL.from_pretrained(os.path.join(MODELS, "vae_sdxl")), text_encoder=None,
      text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(MODELS, "clip_sdxl2")),
      tokenizer=None, tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER), unet=unet, scheduler=scheduler,
      requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def write_single_file(pipe, folder: str, path: str) -> None:
  """The refiner's weights under SGM names (inverse mapping), checked by diffusers' from_single_file."""
  ldm = {**sf.unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
         **sf.vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config))}
  g = torch.Generator().manual_seed(5)
  ldm.update(sf.openclip_to_ldm(sf.text_state_dict(pipe.text_encoder_2), "conditioner.embedders.0.model.",
                                projection=True, extra_block=None,
                                new=lambda shape: torch.randn(shape, generator=g)))
  for key in sf.SCHEDULE_KEYS:
    ldm[key] = torch.randn((10,), generator=g)
  save_file(sf.numpy_dict(ldm), path)
  loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                             torch_dtype=torch.float32)
  assert loaded.text_encoder is None and loaded.config.requires_aesthetics_score
  for name in ("unet", "vae", "text_encoder_2"):
    want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
    sf.check_equal(f"from_single_file {name}", got, want, lambda k: k.endswith("position_ids"))


def scheduler_config(scheduler) -> dict:
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def nhwc(t) -> np.ndarray:
  return np.ascontiguousarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32))


def img2img_case(pipe) -> dict:
  rng = np.random.default_rng(11)
  image01 = np.clip(rng.random((2, 32, 32, 3)), 0, 1).astype(np.float32)
  seed = 3
  kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, image=image01, strength=0.6, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                negative_original_size=(24, 24), negative_crops_coords_top_left=(2, 0), output_type="np")
  with torch.no_grad():
    image = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
  # The generator's draws, replayed: the VAE posterior sample (retrieve_latents), then add_noise's noise.
  g = torch.Generator().manual_seed(seed)
  shape = (2, 4, 8, 8)
  posterior = randn_tensor(shape, generator=g, dtype=torch.float32)
  noise = randn_tensor(shape, generator=g, dtype=torch.float32)
  image = np.asarray(image, np.float32) * 2 - 1
  print(f"img2img: images {image.shape} in [{image.min():.3f}, {image.max():.3f}], std {image.std():.3f}")
  return {"img2img.prompt": np.asarray(PROMPTS), "img2img.negative": np.asarray(NEGATIVES),
          "img2img.image01": image01, "img2img.posterior_noise": nhwc(posterior), "img2img.noise": nhwc(noise),
          "img2img.output": image, "img2img.scheduler": np.asarray(json.dumps(scheduler_config(pipe.scheduler)))}


def ensemble_case(base, refiner, cls, name) -> dict:
  base.scheduler = cls.from_config(base.scheduler.config)
  refiner.scheduler = cls.from_config(refiner.scheduler.config)
  noise = np.random.default_rng(13).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    latents = base(prompt=PROMPTS, negative_prompt=["ugly", "low quality"], height=BASE_SIZE, width=BASE_SIZE,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise),
                   denoising_end=FRAC, output_type="latent").images
    image = refiner(prompt=PROMPTS, negative_prompt=NEGATIVES, image=latents, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, denoising_start=FRAC, output_type="np").images
  image = np.asarray(image, np.float32) * 2 - 1
  print(f"{name}: {cls.__name__}, base latents {tuple(latents.shape)}, images {image.shape} in "
        f"[{image.min():.3f}, {image.max():.3f}], std {image.std():.3f}")
  return {f"{name}.prompt": np.asarray(PROMPTS), f"{name}.negative": np.asarray(NEGATIVES),
          f"{name}.base_negative": np.asarray(["ugly", "low quality"]), f"{name}.noise": noise.transpose(0, 2, 3, 1),
          f"{name}.base_latents": nhwc(latents), f"{name}.image": image,
          f"{name}.scheduler": np.asarray(json.dumps(scheduler_config(base.scheduler))),
          f"{name}.refiner_scheduler": np.asarray(json.dumps(scheduler_config(refiner.scheduler)))}


def check_full_size():
  """The packaged sdxl_refiner default configs at full size: diffusers and sdjax agree on every key and shape."""
  from diffusers.loaders import single_file_utils as sfu
  from sdjax.convert.single_file import default_configs, ldm_to_diffusers
  configs = default_configs("sdxl_refiner")
  sf.TEXT_PREFIX["sdxl_refiner"] = [("text_encoder_2", "conditioner.embedders.0.model.", "openclip_proj")]
  models, expected, ldm = sf.build("sdxl_refiner", configs)
  counts = ", ".join(f"{c} {sum(p.numel() for p in m.parameters()):,}" for c, m in models.items())
  print(f"sdxl_refiner (full size, meta tensors): {counts}; SGM file: {len(ldm)} keys")
  sf.check_equal("diffusers unet", sfu.convert_ldm_unet_checkpoint(ldm, configs["unet"]), expected["unet"])
  sf.check_equal("diffusers vae", sfu.convert_ldm_vae_checkpoint(ldm, configs["vae"]), expected["vae"])
  converted = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix="conditioner.embedders.0.model.")
  sf.check_equal("diffusers text_encoder_2", converted, expected["text_encoder_2"])
  arrays = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in ldm.items()}
  components, ignored = ldm_to_diffusers(arrays, unet_config=configs["unet"], vae_config=configs["vae"])
  assert set(components) == set(expected), sorted(components)
  for component, sd in expected.items():
    got = {k: torch.empty(v.shape, device="meta") for k, v in components[component].items()}
    sf.check_equal(f"sdjax {component}", got, sd)
  print(f"  sdjax ignored {len(ignored)} keys: {ignored}")


def main():
  if os.path.isdir(OUT):
    shutil.rmtree(OUT)
  os.makedirs(OUT)
  folder = os.path.join(OUT, "pipeline")
  pipe = refiner_pipeline()
  pipe.save_pretrained(folder, safe_serialization=True)
  write_single_file(pipe, folder, os.path.join(OUT, "refiner.safetensors"))
  pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, local_files_only=True)  # what the tests load
  pipe.set_progress_bar_config(disable=True)
  out = img2img_case(pipe)
  with tempfile.TemporaryDirectory() as tmp:
    write_random_pipeline(os.path.join(tmp, "sdxl"), "sdxl", tokenizer=TOKENIZER, seed=0)
    base = StableDiffusionXLPipeline.from_pretrained(os.path.join(tmp, "sdxl"), local_files_only=True)
    base.set_progress_bar_config(disable=True)
    out.update(ensemble_case(base, pipe, DDIMScheduler, "ensemble_ddim"))
    out.update(ensemble_case(base, pipe, EulerDiscreteScheduler, "ensemble_euler"))
  np.savez_compressed(os.path.join(OUT, "reference.npz"), **out)
  total = 0
  for dirpath, _, files in os.walk(OUT):
    for f in files:
      total += os.path.getsize(os.path.join(dirpath, f))
  print(f"wrote {OUT}: {total / 1024:.0f} KiB in all")


if __name__ == "__main__":
  if "--full-size" in sys.argv[1:]:
    check_full_size()
  else:
    main()
